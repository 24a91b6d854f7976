"""Delivery of one envelope to the real upstream SMTP server (TLS, AUTH, timeouts); knows nothing of policy."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, SMTPProtocol

from smtp_relay import logs, replies
from smtp_relay.body import MessageBody
from smtp_relay.config import ConfigError
from smtp_relay.policy import ascii_address
from smtp_relay.pool import IDLE_SECONDS, MAX_MESSAGES_PER_CONNECTION, POOL_SIZE, ConnectionPool, PooledConnection


class Stage(enum.Enum):
    """Where in the upstream dialogue a delivery ended; logged so an operator sees what broke."""

    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DONE = "done"


@dataclass(frozen=True, slots=True)
class Outcome:
    """The upstream's verdict on one message, and the reply the client gets for it."""

    delivered: bool
    reply: str
    stage: Stage
    upstream_code: int | None = None
    upstream_text: str = ""
    problem: str = ""
    duration: float = 0.0
    relay_setup: bool = False  # the upstream refused the relay's own session or login: the operator must act

    @property
    def transient(self) -> bool:
        return self.reply.startswith("4")


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    host: str
    port: int
    tls_mode: str  # "implicit", "starttls" or "none"
    verify: bool
    ca_file: Path | None
    username: str
    password: str = dataclasses.field(repr=False)
    timeout: float
    local_hostname: str
    pool_size: int = POOL_SIZE
    pool_idle_seconds: float = IDLE_SECONDS
    pool_max_messages: int = MAX_MESSAGES_PER_CONNECTION


# Message bytes are handed to the transport in pieces of about this size.
WRITE_BATCH = 256 * 1024
# Pipelined commands per write: 32 replies of up to 512 bytes stay within aiosmtplib's 32 KiB reply buffer.
PIPELINE_GROUP = 32


def client_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ client context with system CAs (plus an extra bundle); built once at start-up."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(ca_file))
        except (OSError, ssl.SSLError) as exc:  # unreadable, or no PEM certificate in it
            raise ConfigError("RELAY_TLS_CA_FILE", f"cannot load CA certificates from {ca_file}: {exc}") from None
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _SetupFailed(Exception):
    """Opening an upstream session failed; carries the outcome (its duration is filled in by `deliver`)."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.problem)
        self.outcome = outcome


_RETRY = object()  # a pooled session broke before end of data: try once more on a fresh one


class Upstream:
    """Delivers envelopes over pooled upstream sessions; holds the TLS context and settings made once.

    A session is opened (connect, STARTTLS or implicit TLS, AUTH) once and carries up to
    `pool.MAX_MESSAGES_PER_CONNECTION` messages; after sitting idle it is probed with RSET. If a reused session
    breaks before the DATA command was sent, the message is tried once more on a fresh session; once DATA was sent
    it is never resent (the upstream may have it), the client gets a 451 and retries itself.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._tls_context = (
            client_tls_context(settings.verify, settings.ca_file) if settings.tls_mode != "none" else None
        )
        self.pool = ConnectionPool(
            self._open,
            size=settings.pool_size,
            idle_seconds=settings.pool_idle_seconds,
            max_messages=settings.pool_max_messages,
            on_close=self._closed,
        )

    async def close(self) -> None:
        """Close the idle upstream sessions (QUIT, bounded); called once at shutdown."""
        await self.pool.close()

    def _closed(self, conn: PooledConnection, reason: str) -> None:
        logs.event(
            logging.DEBUG,
            "upstream.closed",
            upstream=f"{self.settings.host}:{self.settings.port}",
            reason=reason,
            messages=conn.messages,
            duration=round(time.monotonic() - conn.created, 3),
        )

    async def _open(self) -> aiosmtplib.SMTP:
        """A connected, TLS-protected (as configured) and authenticated session, or `_SetupFailed`."""
        s = self.settings
        started = time.monotonic()
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            use_tls=s.tls_mode == "implicit",
            start_tls=False,
            tls_context=self._tls_context,
            local_hostname=s.local_hostname,
        )
        stage = Stage.CONNECT
        opened = False
        try:
            await client.connect()
            if s.tls_mode == "starttls":
                await client.ehlo()
                stage = Stage.TLS
                if not client.supports_extension("starttls"):
                    raise _SetupFailed(
                        _failed(
                            stage,
                            replies.UPSTREAM_TLS_UNAVAILABLE,
                            problem="upstream does not offer STARTTLS; refusing to send in plain text",
                        )
                    )
                await client.starttls()
            if client.is_ehlo_or_helo_needed:
                # Before the login too: aiosmtplib's login() would answer a refused EHLO with HELO, which lists
                # no AUTH, and so hide the upstream's refusal behind "AUTH not supported". SIZE and 8BITMIME
                # are then known before the first MAIL.
                try:
                    await client.ehlo()
                except SMTPHeloError as exc:
                    # An upstream that does not know EHLO (RFC 5321 3.2: the client falls back to HELO), where no
                    # extension is needed: no STARTTLS (its EHLO was above) and no login.
                    if s.username or exc.code not in _EHLO_UNKNOWN:
                        raise
                    await client.helo()
            if s.username:
                stage = Stage.AUTH
                await client.login(s.username, s.password)
            opened = True
            logs.event(
                logging.DEBUG,
                "upstream.opened",
                upstream=f"{s.host}:{s.port}",
                tls=s.tls_mode,
                auth=bool(s.username),
                duration=round(time.monotonic() - started, 3),
            )
        except (SMTPException, OSError, asyncio.IncompleteReadError, ssl.SSLError, ssl.CertificateError) as exc:
            if isinstance(exc, SMTPResponseException) and client.is_connected:
                await _quit(client)
            raise _SetupFailed(_classify(stage, exc)) from None
        finally:
            if not opened:  # failed, refused, or cancelled (the client went away): never leave a socket open
                client.close()
        return client

    async def deliver(
        self,
        mail_from: str,
        rcpt_tos: Sequence[str],
        header: bytes,
        body: MessageBody,
        eight_bit: bool,
        smtp_utf8: bool = False,
    ) -> Outcome:
        """Send one message (`header`, then the body); delivered only if every recipient and the end of data got
        a 2xx. `header` is whole CRLF lines, none starting with a dot. `eight_bit` and `smtp_utf8`: the client
        declared BODY=8BITMIME, SMTPUTF8."""
        started = time.monotonic()
        fresh = False
        while True:
            try:
                conn = await self.pool.acquire(fresh=fresh)
            except _SetupFailed as failure:
                return dataclasses.replace(failure.outcome, duration=time.monotonic() - started)
            result = await self._transaction(
                conn,
                mail_from,
                rcpt_tos,
                header,
                body,
                eight_bit,
                smtp_utf8,
                retry_allowed=not fresh,
                started=started,
            )
            if result is _RETRY:
                fresh = True
                continue
            assert isinstance(result, Outcome)
            if result.delivered:  # made with its duration (dataclasses.replace costs more than the line)
                return result
            return dataclasses.replace(result, duration=time.monotonic() - started)

    async def _transaction(
        self,
        conn: PooledConnection,
        mail_from: str,
        rcpt_tos: Sequence[str],
        header: bytes,
        body: MessageBody,
        eight_bit: bool,
        smtp_utf8: bool,
        *,
        retry_allowed: bool,
        started: float,
    ) -> Outcome | object:
        client = conn.client
        dialogue = _Dialogue(client, self.settings.timeout)
        if eight_bit and not client.supports_extension("8bitmime"):
            self.pool.release(conn, reusable=True)  # nothing was sent on it
            return _failed(
                Stage.MAIL,
                replies.UPSTREAM_NO_8BITMIME,
                problem="the client declared BODY=8BITMIME and the upstream does not offer 8BITMIME",
            )
        utf8 = smtp_utf8 and client.supports_extension("smtputf8")
        if smtp_utf8 and not utf8:
            ascii_envelope = _without_smtputf8(mail_from, rcpt_tos, body)
            if isinstance(ascii_envelope, Outcome):
                self.pool.release(conn, reusable=True)  # nothing was sent on it
                return ascii_envelope
            mail_from, rcpt_tos = ascii_envelope
        try:
            options = []
            if client.supports_extension("size"):
                options.append(b"SIZE=%d" % (len(header) + body.content_size))
            if eight_bit:
                options.append(b"BODY=8BITMIME")
            if utf8:
                options.append(b"SMTPUTF8")
            if client.supports_extension("pipelining"):
                await dialogue.pipelined_envelope(mail_from, options, rcpt_tos)
            else:
                await dialogue.envelope(mail_from, options, rcpt_tos)
            response = await _send_body(client, header, body, self.settings.timeout)
        except SMTPResponseException as exc:
            if exc.code == 421 or not client.is_connected:
                # The upstream is closing this session. A 421 says nothing of the message, so a stale pooled
                # session is retried; any other reply (a refusal, then a hang-up) is a verdict and is answered.
                self.pool.discard(conn)
                if exc.code == 421 and conn.reused and retry_allowed and dialogue.retry_safe:
                    return _RETRY
            elif (dialogue.data_started and not isinstance(exc, _EndOfDataRefused)) or exc.code < 200:
                # DATA was accepted (354) although the envelope failed: only closing the session, without the
                # final dot, ends the transaction with nothing delivered. A reply aiosmtplib could not read
                # (code -1: malformed, too long) leaves the session out of step: it is not reused either.
                self.pool.discard(conn)
            else:
                # A verdict on this transaction (the envelope, or the end of data); end it (RSET) so nothing
                # half-done stays, and keep the session.
                try:
                    reset = await _reset(client)
                except BaseException:  # cancelled while resetting: the session's state is unknown
                    self.pool.discard(conn)
                    raise
                self.pool.release(conn, reusable=reset)
            return _classify(dialogue.stage, exc)
        except (SMTPServerDisconnected, SMTPConnectError, OSError, asyncio.IncompleteReadError) as exc:
            self.pool.discard(conn)
            if conn.reused and retry_allowed and dialogue.retry_safe:
                return _RETRY
            return _classify(dialogue.stage, exc)
        except (SMTPException, ssl.SSLError, ssl.CertificateError) as exc:
            self.pool.discard(conn)
            return _classify(dialogue.stage, exc)
        except BaseException:
            self.pool.discard(conn)
            raise
        self.pool.release(conn, reusable=True)
        duration = time.monotonic() - started
        return Outcome(True, replies.TRANSACTION_OK, Stage.DONE, response.code, response.message, "", duration)


_STAGE_OF = {b"MAIL": Stage.MAIL, b"RCPT": Stage.RCPT, b"DATA": Stage.DATA}


def _path(address: str) -> bytes:
    """`<address>` for MAIL FROM / RCPT TO, as the client wrote it and policy accepted it (UTF-8 only in an
    SMTPUTF8 transaction: see `_without_smtputf8`).

    aiosmtplib's `mail()`/`rcpt()` re-parse every address with the email header parser (a fifth of the upstream
    dialogue's CPU) only to add the brackets; its `execute_command` still refuses control characters.
    """
    return b"<" + address.encode("utf-8") + b">"


def _without_smtputf8(mail_from: str, rcpt_tos: Sequence[str], body: MessageBody) -> tuple[str, list[str]] | Outcome:
    """The envelope of an SMTPUTF8 message for an upstream that does not offer SMTPUTF8 (RFC 6531 3.2): in ASCII
    (domains as A-labels) when nothing in it needs UTF-8, or the outcome that refuses it."""
    addresses = [ascii_address(address) for address in (mail_from, *rcpt_tos)]
    if None in addresses:
        problem = "an address is not ASCII and the upstream does not offer SMTPUTF8"
        return _failed(Stage.MAIL, replies.UPSTREAM_NO_SMTPUTF8_ADDRESS, problem=problem)
    if not body.header_is_ascii():
        problem = "the message header is not ASCII and the upstream does not offer SMTPUTF8"
        return _failed(Stage.MAIL, replies.UPSTREAM_NO_SMTPUTF8_HEADER, problem=problem)
    ascii_from, *ascii_rcpts = (address for address in addresses if address is not None)
    return ascii_from, ascii_rcpts


class _Dialogue:
    """The envelope part of one upstream transaction: MAIL, RCPT for each recipient, DATA; raises on a refusal.

    `stage` says where it stopped (for the log and the reply); a session that breaks before any part of the
    message was sent may be retried on a fresh one (`retry_safe`).
    """

    def __init__(self, client: aiosmtplib.SMTP, seconds: float) -> None:
        self.client = client
        self.seconds = seconds
        self.stage = Stage.MAIL
        self.data_started = False

    @property
    def retry_safe(self) -> bool:
        return self.stage is not Stage.DATA

    async def envelope(self, mail_from: str, options: list[bytes], rcpt_tos: Sequence[str]) -> None:
        """One command at a time, each waiting for its reply (upstreams without PIPELINING)."""
        client = self.client
        self._check_mail(await client.execute_command(b"MAIL", b"FROM:" + _path(mail_from), *options), mail_from)
        self.stage = Stage.RCPT
        for rcpt in rcpt_tos:
            self._check_rcpt(await client.execute_command(b"RCPT", b"TO:" + _path(rcpt)), rcpt)
        self.stage = Stage.DATA  # from here on the upstream may have the message: never resend
        self._check_data(await client.execute_command(b"DATA"))

    async def pipelined_envelope(self, mail_from: str, options: list[bytes], rcpt_tos: Sequence[str]) -> None:
        """RFC 2920: MAIL and the RCPTs in one write (and DATA too for a single recipient), then their replies.

        One round trip and one write instead of three or more of each per message. DATA joins the group only
        for a single recipient: if that one is refused, DATA is refused too and the session stays usable. With
        several, some may be accepted and DATA would then be too, though the message must go to all or none;
        so DATA waits for their replies. Should an upstream still accept DATA after a refusal, the session is
        closed without the final dot (see `_transaction`), so nothing is delivered.

        Commands go in groups of at most `PIPELINE_GROUP`, so that a group's replies (512 bytes each at most,
        RFC 5321) fit aiosmtplib's 32 KiB reply buffer; a refusal ends the envelope before the next group.
        Every reply of a group is read before any is judged, so the session stays in step; an upstream that
        refuses and hangs up at once has its refusal answered, not a lost connection.
        """
        client = self.client
        commands = [b" ".join((b"MAIL FROM:" + _path(mail_from), *options))]
        commands += [b"RCPT TO:" + _path(rcpt) for rcpt in rcpt_tos]
        with_data = len(rcpt_tos) == 1
        if with_data:
            commands.append(b"DATA")
        for command in commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command contains a prohibited control character")
        recipients = iter(rcpt_tos)
        for first in range(0, len(commands), PIPELINE_GROUP):
            group = commands[first : first + PIPELINE_GROUP]
            responses = await self._exchange(group)
            if group[-1] == b"DATA" and len(responses) == len(group):
                self.data_started = responses[-1].code == 354
            for command, response in zip(group, responses, strict=False):
                self.stage = _STAGE_OF[command[:4]]
                if self.stage is Stage.MAIL:
                    self._check_mail(response, mail_from)
                elif self.stage is Stage.RCPT:
                    self._check_rcpt(response, next(recipients))
                else:
                    self._check_data(response)
            if len(responses) < len(group):  # only after a refusal, which was raised above
                raise SMTPServerDisconnected("Connection lost")
        if not with_data:
            self.stage = Stage.DATA
            self._check_data(await client.execute_command(b"DATA"))

    async def _exchange(self, commands: list[bytes]) -> list[SMTPResponse]:
        """Write `commands` at once and read their replies in order.

        aiosmtplib reads one reply per command: the replies after the first are taken from its protocol's
        buffer (or awaited one by one). If the connection breaks after a refusal was read, the replies read so
        far are returned (fewer than the commands) so the refusal is judged; otherwise the break is raised.
        `stage` follows the reply being awaited.
        """
        client = self.client
        protocol = client.protocol
        if protocol is None or protocol._command_lock is None:
            raise SMTPServerDisconnected("Connection lost")
        responses: list[SMTPResponse] = []
        async with protocol._command_lock:
            protocol._response_pending = True
            try:
                protocol.write(b"\r\n".join(commands) + b"\r\n")
                for command in commands:
                    self.stage = _STAGE_OF[command[:4]]
                    responses.append(await _next_reply(protocol, self.seconds))
            except (SMTPServerDisconnected, SMTPTimeoutError):
                client.close()
                if not any(r.code >= 400 for r in responses):
                    raise
            finally:
                protocol._response_pending = False
        return responses

    @staticmethod
    def _check_mail(response: SMTPResponse, mail_from: str) -> None:
        if not 200 <= response.code < 300:
            raise SMTPSenderRefused(response.code, response.message, mail_from)

    @staticmethod
    def _check_rcpt(response: SMTPResponse, rcpt: str) -> None:
        if not 200 <= response.code < 300:
            raise SMTPRecipientRefused(response.code, response.message, rcpt)

    def _check_data(self, response: SMTPResponse) -> None:
        self.data_started = response.code == 354
        if response.code != 354:
            raise SMTPDataError(response.code, response.message)


async def _next_reply(protocol: SMTPProtocol, seconds: float) -> SMTPResponse:
    """The next reply: already in the protocol's buffer (pipelined replies), or the next to arrive.

    The protocol's waiter is awaited directly, not through `read_response`'s wait_for, which wakes the task a
    loop turn later (and costs two more futures and a timer per reply): the task then always runs before the
    next data arrives, so the protocol, which keeps only one parsed reply, never drops one that follows.
    """
    response = protocol._read_response_from_buffer()
    if response is not None:
        return response
    waiter = protocol._response_waiter
    if waiter is None:
        raise SMTPServerDisconnected("Connection lost")
    # A timer that fails the waiter: cheaper than asyncio.timeout(), which cancels and uncancels the task.
    timer = protocol._loop.call_later(seconds, _expire_reply, waiter)
    try:
        return await waiter
    finally:
        timer.cancel()
        protocol._response_waiter = None if protocol.transport is None else protocol._loop.create_future()


def _expire_reply(waiter: asyncio.Future[SMTPResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(SMTPReadTimeoutError("Timed out waiting for server response"))


async def _send_body(client: aiosmtplib.SMTP, header: bytes, body: MessageBody, seconds: float) -> SMTPResponse:
    """The message as the client sent it (after DATA was accepted), streamed chunk by chunk, then ".<CR><LF>";
    the final reply.

    What `aiosmtplib.SMTP.data()` does, without its in-memory copies: the body is already CRLF-only and
    dot-stuffed (`MessageBody.chunks()` rewrites it if not), so it is written as is, waiting for the socket to
    drain (bounded by `seconds`). A timeout or a lost connection closes the session, as in `data()`.
    """
    protocol = client.protocol
    if protocol is None:
        raise SMTPServerDisconnected("Connection lost")
    try:
        # A reply (an early refusal, or the final one) is expected from here: aiosmtplib keeps it, not drops it.
        protocol._response_pending = True
        # Small pieces are joined: one write (one system call) carries a whole small message and its end.
        batch = [header]
        batched = len(header)
        streamed = False  # part of the message went out before its end: a reply could have come meanwhile
        for chunk in body.chunks():
            batch.append(chunk)
            batched += len(chunk)
            if batched < WRITE_BATCH:
                continue
            protocol.write(b"".join(batch))
            batch, batched, streamed = [], 0, True
            if protocol._paused:  # the transport's buffer is full: wait until it drains, or the upstream answers
                await _drained_or_answered(protocol, seconds)
            if _replied(protocol):
                await _stop_answered(client, protocol, seconds)
        if _replied(protocol):
            await _stop_answered(client, protocol, seconds)
        batch.append(b".\r\n")
        body.end_sent = True
        protocol.write(b"".join(batch))
        response = await _next_reply(protocol, seconds)
    except (SMTPServerDisconnected, SMTPTimeoutError, OSError):
        client.close()
        answer = _answer(protocol)
        if answer is not None and answer.code >= 400:  # refused, then the upstream hung up: its verdict stands
            raise SMTPDataError(answer.code, answer.message) from None
        raise
    finally:
        protocol._response_pending = False
    if not 200 <= response.code < 300:  # any positive completion reply means the upstream took the message
        # A refusal of a message that went out in one write is the reply to its end: the session stays in step
        # and is kept. One of a streamed message may have been sent early (uvloop writes without yielding, so
        # it shows only now), with the reply to the end still to come: that session is not reused.
        raise (
            SMTPDataError(response.code, response.message)
            if streamed
            else _EndOfDataRefused(response.code, response.message)
        )
    return response


class _EndOfDataRefused(SMTPDataError):
    """The upstream's final reply refused the message: the transaction is over and the session in step."""


def _failed(stage: Stage, reply: str, *, code: int | None = None, text: str = "", problem: str = "") -> Outcome:
    return Outcome(False, reply, stage, code, text, problem)


_SESSION_STAGES = frozenset({Stage.CONNECT, Stage.TLS, Stage.AUTH})
# aiosmtplib's words for a connection lost during the TLS handshake, after the upstream's 220 to STARTTLS.
_TLS_UPGRADE = "while upgrading transport"
_AUTH_NEEDED = frozenset({530, 538})
_EHLO_UNKNOWN = frozenset({500, 502})  # command not recognised / not implemented


def _classify(stage: Stage, exc: BaseException) -> Outcome:
    """The outcome for an exception at `stage`: the upstream's own verdict, or a 451 for a transient fault."""
    if isinstance(exc, SMTPResponseException) and exc.code == 421:  # at any stage, a recipient's included
        # The upstream is closing the session: transient, and the client's session goes on.
        return Outcome(False, replies.UPSTREAM_CLOSING, stage, exc.code, exc.message, "upstream closing (421)")
    if isinstance(exc, SMTPResponseException):
        # The upstream's own reply, passed on with its class and text (issue: "Upstream 5xx: the client gets a
        # 5xx with the upstream's text"), also when it refuses the relay's session or login, where it is the
        # relay's setup to fix: the log line says so, at ERROR.
        if isinstance(exc, SMTPAuthenticationError):
            problem, relay_setup = "upstream refused RELAY_USERNAME/RELAY_PASSWORD", exc.code >= 500
        elif exc.code in _AUTH_NEEDED:  # at MAIL or at a recipient
            problem, relay_setup = "upstream requires authentication: check RELAY_USERNAME/RELAY_PASSWORD", True
        elif isinstance(exc, SMTPRecipientRefused):
            problem, relay_setup = f"upstream refused recipient {exc.recipient}", False
        else:
            problem, relay_setup = f"upstream refused at {stage.value}", stage in _SESSION_STAGES
        reply = replies.upstream_reply(exc.code, exc.message)
        return Outcome(False, reply, stage, exc.code, exc.message, problem, relay_setup=relay_setup)
    if isinstance(exc, SMTPTimeoutError):
        return _failed(stage, replies.UPSTREAM_TIMEOUT, problem=f"timeout: {exc}")
    if stage is Stage.TLS and isinstance(exc, SMTPServerDisconnected | OSError | asyncio.IncompleteReadError):
        if isinstance(exc, SMTPServerDisconnected) and _TLS_UPGRADE not in str(exc):
            # Dropped before its 220 to STARTTLS: a lost connection like any other, before any TLS.
            return _failed(stage, replies.UPSTREAM_CONNECTION_LOST, problem=f"disconnected at STARTTLS: {exc}")
        # A handshake the upstream aborts (say, it offers only TLS 1.1) reaches us as a plain disconnect.
        return _failed(stage, replies.UPSTREAM_TLS_FAILED, problem=f"TLS handshake failed: {exc}")
    if isinstance(exc, SMTPServerDisconnected):
        return _failed(stage, replies.UPSTREAM_CONNECTION_LOST, problem=f"disconnected: {exc}")
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return _failed(stage, replies.UPSTREAM_TLS_FAILED, problem=f"TLS failed: {exc}")
    if isinstance(exc, SMTPConnectError):
        tls_cause = _ssl_cause(exc)
        if tls_cause is not None:
            return _failed(Stage.TLS, replies.UPSTREAM_TLS_FAILED, problem=f"TLS failed: {tls_cause}")
        return _failed(stage, replies.UPSTREAM_UNAVAILABLE, problem=f"connect failed: {exc}")
    if isinstance(exc, SMTPException):
        return _failed(stage, replies.UPSTREAM_UNAVAILABLE, problem=f"{type(exc).__name__}: {exc}")
    return _failed(stage, replies.UPSTREAM_CONNECTION_LOST, problem=f"{type(exc).__name__}: {exc}")


def _ssl_cause(exc: BaseException) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _answer(protocol: SMTPProtocol) -> SMTPResponse | None:
    """A whole reply the upstream sent while the message was still being written, if one came.

    Servers that refuse a message early (552: too big) may stop reading or close the session at once; the
    reply, already read, says what became of the message. (A refusal that arrives together with a reset may
    never be read: that remains a lost connection.)
    """
    waiter = protocol._response_waiter
    if waiter is None or not waiter.done() or waiter.cancelled() or waiter.exception() is not None:
        return None
    return waiter.result()


async def _early_reply(protocol: SMTPProtocol, seconds: float) -> SMTPResponse | None:
    """The reply that began before the end of data, once whole (waiting at most `seconds`); None if it never
    completes or cannot be read."""
    try:
        return await _next_reply(protocol, seconds)
    except (SMTPException, OSError):
        return None


def _replied(protocol: SMTPProtocol) -> bool:
    """Something came from the upstream before the end of data (checked per write: no coroutine unless so)."""
    waiter = protocol._response_waiter
    return bool(protocol._buffer) or (waiter is not None and waiter.done())


async def _stop_answered(client: aiosmtplib.SMTP, protocol: SMTPProtocol, seconds: float) -> None:
    """Raise the upstream's answer that came (or began) before the end of data (say, 552 once a size limit was
    crossed), or the fact that what came could not be read.

    The rest of the message is then not sent, nor the final dot, which could end a message cut short or one the
    upstream already answered; closing the session ends the transaction with nothing delivered. A refusal still
    coming in (the first lines of a multi-line 552) is read to its end first, so that its verdict is passed on.
    """
    waiter = protocol._response_waiter
    if waiter is not None and waiter.done():
        client.close()
        answer = _answer(protocol)
        if answer is not None:
            raise SMTPDataError(answer.code if answer.code >= 400 else -1, answer.message)
        error = None if waiter.cancelled() else waiter.exception()
        if isinstance(error, SMTPServerDisconnected):  # the connection was lost: as any lost connection
            raise error
        raise SMTPDataError(-1, "unreadable reply before the end of data")  # too long, malformed
    early = await _early_reply(protocol, seconds)  # begun in the buffer: read to its end
    client.close()
    if early is not None and early.code >= 400:  # a refusal: its verdict stands
        raise SMTPDataError(early.code, early.message)
    raise SMTPDataError(-1, "the upstream replied before the end of data")


async def _drained_or_answered(protocol: SMTPProtocol, seconds: float) -> None:
    """Wait until the transport's buffer drains or the upstream answers (a refusal: the caller stops writing).

    An upstream that refuses early may stop reading without closing; waiting for the drain alone would keep the
    client waiting `seconds` for a verdict already given.
    """
    waiter = protocol._response_waiter
    drained = asyncio.ensure_future(protocol._drain_helper())
    try:
        done, _ = await asyncio.wait(
            (drained,) if waiter is None else (drained, waiter),
            timeout=seconds,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        drained.cancel()  # a no-op once done
    if drained in done:
        drained.result()  # ConnectionResetError if the connection was lost meanwhile
    elif not done:
        raise SMTPTimeoutError("Timed out sending the message")


async def _reset(client: aiosmtplib.SMTP) -> bool:
    """End a refused transaction so the upstream holds nothing half-done; True if the session is still usable."""
    if not client.is_connected:
        return False
    try:
        response = await client.rset()
    except (SMTPException, OSError, asyncio.IncompleteReadError):
        return False
    return response.code == 250


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (SMTPException, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        client.close()
