"""aiosmtpd's SMTP protocol with the few small overrides a relay needs; each one says why."""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import re
import secrets
import time
import types
from collections.abc import Coroutine
from typing import Any, AnyStr, Protocol, cast

import aiosmtpd.smtp
from aiosmtpd.smtp import (
    MISSING,
    SMTP,
    AuthResult,
    Envelope,
    LoginPassword,
    Session,
    TLSSetupException,
    syntax,
)

from smtp_relay import logs, replies
from smtp_relay.body import MessageBody, Refusal, receive
from smtp_relay.policy import is_clean_text

_library_sanitized_log = aiosmtpd.smtp.sanitized_log
_LEVEL_OF = {"debug": logging.DEBUG, "info": logging.INFO}


def _sanitized_log(func: Any, msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd's `sanitized_log`, skipped when the logging call it makes would print nothing.

    The library's command loop calls it twice per command line (`log.debug`, `log.info`), and it scans the line
    for AUTH credentials before the logger even checks its level: about 6% of the relay's CPU per message.
    `logs` keeps that logger at WARNING (its INFO lines would carry AUTH payloads), so these calls never print.
    Any other call goes to the library's function. This replaces a module global of the library (an override
    cannot reach it); `test_library_shortcuts` checks that the command loop still looks it up there.
    """
    try:
        if not func.__self__.isEnabledFor(_LEVEL_OF[func.__name__]):  # a Logger's debug or info, quiet
            return
    except (AttributeError, KeyError):  # anything else
        pass
    _library_sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = _sanitized_log

_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ANGLE_ADDR = re.compile(rf"[ \t]*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)\Z", re.DOTALL)
# What `_getaddr` hands on for parameters that are not printable ASCII: a parameter name the library's
# `_getparams` refuses (not alphanumeric), a 501 syntax error. (Its Unicode rules took `SIZE=²` for digits, then
# failed in `int()`: a 451 and a traceback.)
_BAD_PARAMETERS = "\x00"
# Parameters as RFC 5321 writes them (esmtp-param): printable ASCII, spaces and tabs between them.
_ASCII_PARAMETERS = re.compile(r"[\t\x20-\x7e]*")
_SOURCE_ROUTE = re.compile(r"<(?:\s|\([^()]*\))*@")
_TRAILING_DOT = re.compile(r"(?<=[A-Za-z0-9-])\.(?=>|\s|$)")


class PlainLogin(LoginPassword):
    """AUTH PLAIN's login and password, with the authorization identity the client asked for."""

    authzid: bytes

    @classmethod
    def of(cls, authzid: bytes, login: bytes, password: bytes) -> PlainLogin:
        credentials = cls(login, password)
        credentials.authzid = authzid
        return credentials


class RelaySession(Session):
    """aiosmtpd's session plus a short id that ties together every log line of one connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.id = secrets.token_hex(5)
        self.started = time.monotonic()
        self.messages = 0  # messages tried upstream or refused at DATA: the number in each message's log lines
        self.delivered = 0  # of those, the ones the upstream took
        self._peer_text: str | None = None

    @property
    def peer_text(self) -> str:
        """`host:port`, formatted once: it is in every log line of the session."""
        if self._peer_text is None:
            if self.peer is None:
                return logs.peer_text(None)
            self._peer_text = logs.peer_text(self.peer)
        return self._peer_text

    @property
    def user(self) -> str | None:
        return self.auth_data if isinstance(self.auth_data, str) else None


class RelayEnvelope(Envelope):
    """aiosmtpd's envelope plus the recipients policy refused (they refuse the whole message) and the body.

    `body` (the client's wire form, spooled) replaces aiosmtpd's `content`/`original_content`, which stay None.
    """

    def __init__(self) -> None:
        super().__init__()
        self.refused_recipients: list[str] = []
        # Commands of this transaction refused before they could be read (non-ASCII, over-long): each may have
        # been a recipient, so they refuse the message as a refused recipient does.
        self.unread_commands = 0
        self.body: MessageBody | None = None


# A log line stays short enough to be written whole (workers share stdout): the refused recipients a line names
# are the first few, at most so many bytes once escaped, and `refused_count` says how many there were.
LOGGED_ADDRESSES = 5
LOGGED_ADDRESSES_LENGTH = 400

# A DATA transfer has TIMEOUT to begin with; each read adds its bytes / MIN_DATA_RATE to the time left, which never
# exceeds TIMEOUT (Postfix's `smtpd_min_data_rate`, as with `smtpd_per_request_deadline`). So a client that sends
# nothing for TIMEOUT, or that sends slower than this rate, is cut off; one that keeps up may take as long as its
# message needs (a large message on a slow link), and a burst earns no more than TIMEOUT.
MIN_DATA_RATE = 500  # bytes per second


def _first_addresses(addresses: list[str]) -> str | None:
    """The first refused addresses, at most `LOGGED_ADDRESSES_LENGTH` bytes once escaped: JSON writes a character
    beyond ASCII as 6 or 12 bytes (`\\ud83d\\udca9`), and a line must stay short enough to be written whole."""
    if not addresses:
        return None
    shown = ",".join(addresses[:LOGGED_ADDRESSES])
    if len(shown) * 12 > LOGGED_ADDRESSES_LENGTH:
        budget = LOGGED_ADDRESSES_LENGTH
        for end, ch in enumerate(shown):
            budget -= 2 if ch in '"\\' else 1 if " " <= ch < "\x7f" else 6 if ch <= "\uffff" else 12
            if budget < 0:
                return shown[:end] + "..."
    return shown if len(addresses) <= LOGGED_ADDRESSES else f"{shown},..."


def _command_size_limits() -> collections.defaultdict[str, int]:
    """A connection's own command line limits (aiosmtpd keeps one table on the class, shared by all of them)."""
    return collections.defaultdict(lambda: SMTP.command_size_limit)


class ConnectionTracker(Protocol):
    def opened(self, protocol: RelaySMTP) -> None: ...
    def closed(self, protocol: RelaySMTP) -> None: ...


# Refusals of one connection that are logged one by one (syntax and sequence errors, commands before AUTH; the
# relay's policy decisions are always logged): after that only their number, in the `disconnect` line, so that a
# client that keeps sending what is refused cannot flood the log.
LOGGED_REFUSALS = 20
# aiosmtpd's refusals of a command line it could not read (too long, a command word that is not ASCII, or an
# empty line): it never learnt which command it was. (Arguments that are not UTF-8 reach the commands, which
# refuse them: see `is_clean_text`.)
_UNREAD_COMMAND_REPLIES = frozenset({"500 Command line too long", "500 Error: bad syntax"})


class RelaySMTP(SMTP):
    """One client connection."""

    def __init__(self, handler: Any, *, tracker: ConnectionTracker, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._tracker = tracker
        self._raw_replies = False
        self._draining = False
        self._last_reply = ""
        self._registered = False
        self._idle_deadline = 0.0
        self._tls_established = False
        # While a body is read: when the transfer is cut off unless more comes, and when the last bytes came.
        self._data_deadline: float | None = None
        self._received_at = 0.0
        self._errors = 0  # refusals not decided by the relay's policy (see `refused`)
        self._client_left = False  # the client closed its side (its replies can no longer be sent)
        self._eof_deferred = False  # ... while its message was already upstream: the session ends after its reply
        self._lost_in_delivery = False  # the connection was lost while its message was already upstream
        self.aborted = False  # the relay cut the connection (shutdown past TIMEOUT), not the client
        # The library keeps this table on the class, shared by every connection, clears it in every __init__ and
        # grows it on every EHLO: each connection has its own (`spawn`).
        self.command_size_limits = _command_size_limits()

    def spawn(self) -> RelaySMTP:
        """A protocol for one new connection, made from this one (a template that never sees a connection).

        aiosmtpd's `__init__` introspects the protocol and the handler (inspect.getmembers, dir, signature) on
        every connection to build its command tables: about 150 us, more than a whole small message costs the
        rest of the relay. The settings and tables do not change, so a connection copies the template's
        attributes, gets its own asyncio stream state (StreamReaderProtocol.__init__, as the library calls it),
        and its own bound methods in the tables. `test_protocol_spawn` checks this against the library's
        `__init__`, so a library upgrade that adds state cannot slip by.
        """
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        asyncio.StreamReaderProtocol.__init__(
            clone,
            asyncio.StreamReader(loop=self.loop, limit=self.line_length_limit),
            client_connected_cb=clone._cb_client_connected,
            loop=self.loop,
        )
        clone._smtp_methods = {name: _rebind(method, self, clone) for name, method in self._smtp_methods.items()}
        clone._auth_methods = {
            name: attr._replace(method=_rebind(attr.method, self, clone)) for name, attr in self._auth_methods.items()
        }
        clone.command_size_limits = _command_size_limits()
        return clone

    def _create_session(self) -> RelaySession:
        session = RelaySession(self.loop)
        previous = self.session
        if isinstance(previous, RelaySession):
            # After STARTTLS the SMTP session starts anew (RFC 3207 4.2), but the connection and its log lines
            # are the same: keep its id, start time and message counts.
            session.id, session.started = previous.id, previous.started
            session.messages, session.delivered = previous.messages, previous.delivered
        return session

    def _create_envelope(self) -> RelayEnvelope:
        return RelayEnvelope()

    @property
    def in_transaction(self) -> bool:
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        session = self.session
        assert isinstance(session, RelaySession)
        if first:
            self._registered = True
            self._tracker.opened(self)
            logs.event(logging.INFO, "connect", session=session.id, peer=session.peer_text)
        else:
            self._tls_established = True
            # Closing a TLS session waits for the client's close_notify, by default 30 s (asyncio's SSL shutdown
            # timeout): a client that never answers must not hold the connection longer than TIMEOUT for it.
            tls = self._tls_protocol
            wait = getattr(tls, "_ssl_shutdown_timeout", None)
            if isinstance(wait, int | float) and wait > self._timeout_duration:
                tls._ssl_shutdown_timeout = self._timeout_duration  # type: ignore[union-attr]
            cipher = transport.get_extra_info("cipher")
            logs.event(
                logging.INFO,
                "starttls",
                session=session.id,
                peer=session.peer_text,
                version=transport.get_extra_info("ssl_object").version() if cipher else None,
                cipher=cipher[0] if cipher else None,
            )

    def connection_lost(self, error: Exception | None) -> None:
        """aiosmtpd cancels the command loop here, and with it a delivery in flight: not one whose end of data
        already went upstream (see `eof_received`), unless the relay itself cut the connection (shutdown). That
        delivery finishes and logs its outcome, its reply is lost (`reply.lost`), and the connection keeps its
        MAX_CONNECTIONS slot until then (`smtp_DATA` ends it)."""
        session = self.session
        finishing = self._delivery_committed() and not self.aborted
        try:
            if finishing:
                loop_task, self._handler_coroutine = self._handler_coroutine, _NOT_CANCELLED
                try:
                    super().connection_lost(error)
                finally:
                    self._handler_coroutine = loop_task
            else:
                super().connection_lost(error)
        finally:
            if finishing:
                self._lost_in_delivery = True
            else:
                self._unregister(session)

    def _unregister(self, session: Session | None) -> None:
        """The connection is over: free its slot and log its end, once."""
        if not self._registered:
            return
        self._registered = False
        self._tracker.closed(self)
        if isinstance(session, RelaySession):
            logs.event(
                logging.INFO,
                "disconnect",
                session=session.id,
                peer=session.peer_text,
                user=session.user,
                helo=session.host_name or None,
                messages=session.messages,
                delivered=session.delivered,
                refusals=self._errors or None,
                duration=round(time.monotonic() - session.started, 3),
            )

    async def _handle_client(self) -> None:
        """aiosmtpd's command loop; a client gone while it answered ends it without an error.

        The library re-raises the ConnectionResetError of a reply to a lost connection out of the loop's task,
        which nobody awaits: asyncio then logs it at ERROR with a traceback. The session's end is already
        logged (`disconnect`, and `reply.lost` for the reply).
        """
        try:
            await super()._handle_client()
        except ConnectionResetError:
            pass

    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, and the end of a connection lost during the handshake.

        asyncio's TLS layer ends its handshake wait without an error when the connection is closed in the middle
        (our idle timeout does that to a client that never starts or finishes the handshake), and never tells
        us the connection is gone: aiosmtpd would wait on it forever, holding a MAX_CONNECTIONS slot. A handshake
        that completed has called `connection_made` again.
        """
        if self._tls_protocol is not None:
            # RFC 3207 4.2: never a second TLS layer inside the first (aiosmtpd would start one).
            await self.push(replies.TLS_ALREADY_ACTIVE)
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as error:
            cause = error.__cause__
            logs.event(logging.WARNING, "starttls.failed", **self._ids(), reason=f"{type(cause).__name__}: {cause}")
            raise
        if self._tls_protocol is not None and not self._tls_established and self._registered:
            self.connection_lost(None)

    def data_received(self, data: bytes) -> None:
        """During a DATA transfer, each read moves its deadline (see MIN_DATA_RATE): the body reader sees the
        client's progress only in large pieces."""
        deadline = self._data_deadline
        if deadline is not None:
            now = self._received_at = self.loop.time()
            self._data_deadline = min(deadline + len(data) / MIN_DATA_RATE, now + self._timeout_duration)
        super().data_received(data)

    def eof_received(self) -> bool | None:
        """The client closed its side: close ours (the connection ends, and its MAX_CONNECTIONS slot is free).

        aiosmtpd cancels its command loop here and keeps the connection half open, relying on the loop's
        cancellation handler to close it. A client that hangs up before the loop first ran (a TCP health check, a
        port scan) cancels it before that handler exists: the connection then stayed open until TIMEOUT. Replies
        already written are still sent before the close.

        A message whose end of data already went upstream is not cancelled: the upstream may have it, so a
        cancel would only withhold the reply from a client that shut down its side to read on (TCP cannot tell
        that from a close), which would then send it again. Its delivery finishes, the reply is written, and the
        session ends then (`_end_after_eof`). Over TLS the connection closes all the same (`connection_lost`).
        """
        self._client_left = True
        if self._delivery_committed():
            self._eof_deferred = True
            return self._tls_protocol is None  # plain TCP: stay half open for the reply
        super().eof_received()
        return False

    def _delivery_committed(self) -> bool:
        """The message in flight went upstream whole: cancelling its delivery would not take it back."""
        envelope = self.envelope
        return isinstance(envelope, RelayEnvelope) and envelope.body is not None and envelope.body.end_sent

    def _end_after_eof(self) -> None:
        """The client's end of stream, put off while its message was upstream: the session ends now.

        The command loop (this task) is cancelled, as aiosmtpd does at the end of stream, and closes the
        connection at its next wait; commands the client pipelined before it closed its side (a QUIT) are
        answered first, as they are already here.
        """
        self._eof_deferred = False
        self._handler_coroutine.cancel()  # type: ignore[union-attr]

    async def push(self, status: AnyStr) -> None:
        """Add RFC 3463 codes to aiosmtpd's own replies, and close after a 421 or, once draining, any reply.

        The library's `push` then logs at DEBUG and awaits `drain()` (two more coroutines) after every reply,
        four times per message; here `drain()` is awaited only when it has something to do: the transport's
        buffer is full, or the connection is closing or lost (it then raises, as in the library).
        """
        transport = self.transport
        gone = self._closing()
        if isinstance(status, str):
            logged = isinstance(status, replies.Logged)  # the relay's own, or the upstream's: never rewritten
            library = status
            if not self._raw_replies:
                status = self._last_reply = status if logged else replies.with_enhanced_code(status)
            if status[0] in "45" and not gone and not logged:
                # One of aiosmtpd's own refusals (syntax, sequence, SIZE, STARTTLS first, AUTH exchange): the
                # relay's own are logged where they are decided.
                self.refused(status)
                envelope = self.envelope
                if library in _UNREAD_COMMAND_REPLIES and isinstance(envelope, RelayEnvelope) and envelope.mail_from:
                    envelope.unread_commands += 1
            response = status.encode("utf-8", "backslashreplace")  # never a client's invalid byte back
        else:
            response = status
        if transport is None or gone:
            # The client left while this reply was being made (say, right after its final dot, as the upstream
            # accepted the message): say so; `_handle_client` ends the session quietly. After the relay closed
            # the connection itself (a 421, QUIT), commands the client pipelined behind get no reply and no line.
            if transport is None or self._client_left:
                reply = replies.for_log(response.decode("ascii", "replace"))[:64]
                logs.event(logging.INFO, "reply.lost", **self._ids(), reply=reply)
            raise ConnectionResetError("Connection lost")
        _writable(transport).write(response + b"\r\n")
        if response.startswith(b"421"):  # RFC 5321 3.8: a 421 closes the connection
            transport.close()
            return
        # asyncio's FlowControlMixin state, which typeshed leaves out.
        if self._paused or self._connection_lost or transport.is_closing():  # type: ignore[attr-defined]
            await self._writer.drain()
        if self._draining and not self.in_transaction:
            self._close_with(replies.SHUTTING_DOWN)

    def _closing(self) -> bool:
        """The connection is closed or closing: by the client, or by the relay after a 421 or QUIT."""
        transport = self.transport
        return transport is None or transport.is_closing()

    def _call_handler_hook(self, command: str, *args: Any) -> Coroutine[Any, Any, Any]:
        """The library's hook call (returned, not awaited here: no extra coroutine per command), refused once the
        connection is closing: commands pipelined behind a 421 or QUIT are neither decided nor logged."""
        if self._closing():
            raise ConnectionResetError("Connection closing")
        return super()._call_handler_hook(command, *args)

    def _authenticate(self, mechanism: str, auth_data: Any) -> AuthResult:
        """As `_call_handler_hook`: no password is checked (nor counted) behind a 421 or QUIT."""
        if self._closing():
            raise ConnectionResetError("Connection closing")
        return super()._authenticate(mechanism, auth_data)

    async def smtp_AUTH(self, arg: str | None) -> None:
        """aiosmtpd's AUTH, with the mechanism name in any case (`AUTH plain ...`), as Postfix and Exim take it."""
        if arg:
            if not arg.split():  # only (Unicode) white space: the library would fail on its first word
                arg = ""
            mechanism, space, rest = arg.partition(" ")
            if mechanism.isascii():  # a dotless i (U+0131) upper-cases to I: `PLA\u0131N` is no PLAIN
                arg = mechanism.upper() + space + rest
        await super().smtp_AUTH(arg)

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        """aiosmtpd's AUTH PLAIN, keeping the authorization identity the library drops (RFC 4616 2): the login
        fails unless it is empty or the user itself, the one identity there is (`Authenticator`)."""
        response: Any
        if len(args) == 1:
            response = await self.challenge_auth("")
            if response is MISSING:
                return AuthResult(success=False)
        else:
            try:
                response = base64.b64decode(args[1].encode(), validate=True)
            except ValueError:
                await self.push("501 5.5.2 Can't decode base64")
                return AuthResult(success=False, handled=True)
        try:
            authzid, login, password = response.split(b"\x00")
        except ValueError:
            await self.push("501 5.5.2 Can't split auth value")
            return AuthResult(success=False, handled=True)
        return self._authenticate("PLAIN", PlainLogin.of(authzid, login, password))

    async def smtp_EHLO(self, hostname: str) -> None:
        if hostname:  # a bare EHLO is refused (501) and changes nothing
            self.command_size_limits.clear()  # each EHLO grows MAIL's limit by SIZE's 26 bytes: once is enough
        # RFC 2034: the EHLO/HELO reply lines carry no enhanced status codes.
        self._raw_replies = True
        try:
            if hostname and not is_clean_text(hostname):  # controls, bytes that were not UTF-8, ...
                await self.push("501 Syntax: EHLO hostname")
                return
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            if hostname and not is_clean_text(hostname):
                await self.push("501 Syntax: HELO hostname")
                return
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """Show source routes and `<>` to policy: the library drops `@hop:` silently and answers `<>` with 501.

        Parameters after the address that are not printable ASCII come back as `_BAD_PARAMETERS`: the library
        upper-cases and splits them with Unicode rules (with a long s, U+017F, `smtputf8` would be SMTPUTF8; a
        no-break space a separator) before `_getparams` sees them.
        """
        address, rest = self._getaddr_parts(arg)
        if rest and not _ASCII_PARAMETERS.fullmatch(rest):
            rest = _BAD_PARAMETERS
        return address, rest

    def _getaddr_parts(self, arg: str) -> tuple[str | None, str | None]:
        simple = _SIMPLE_ANGLE_ADDR.match(arg)
        if simple is not None:
            # The common case, `<dot-atom@host.name>`, parses to itself: skip the email header parser, which
            # costs about a fifth of the relay's CPU per message otherwise.
            return simple.group(1), simple.group(2).lstrip(" \t")
        if not is_clean_text(arg):
            # Controls, invisible or separator characters, bytes that were not UTF-8 (which aiosmtpd keeps as lone
            # surrogates): the email header parser would drop some silently (`a@exa<NEL>mple.com` becoming
            # `a@example.com`), so what the client wrote would be neither checked nor forwarded. Malformed.
            return None, None
        stripped = arg.lstrip()
        if stripped.startswith("<>"):
            # The null sender: handed to policy (which refuses it, with a log line) instead of a bare 501.
            return "<>", stripped[2:]
        route = _SOURCE_ROUTE.match(stripped)
        if route is not None:
            # `<@hop:user@domain>`, also with spaces or comments before the `@`: the route is shown to policy.
            end = stripped.find(">")
            if end < 0:
                return None, None
            return stripped[route.end() - 1 : end], stripped[end + 1 :]
        address, rest = self._parse_address(arg)
        if address is None:
            # RFC 5321 has no trailing dot in a domain, but clients send one; the parser refuses it, so strip it.
            fixed = _TRAILING_DOT.sub("", arg, count=1)
            if fixed != arg:
                address, rest = self._parse_address(fixed)
        return address, rest

    def _parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """The library's parser; some malformed input makes the email header parser raise instead of refusing,
        which would be answered 451 (try again) and logged as an internal error: it is a malformed address."""
        try:
            address, rest = super()._getaddr(arg)
        except (IndexError, AttributeError, ValueError, TypeError):
            return None, None
        return address, rest

    async def smtp_RCPT(self, arg: str | None) -> None:
        """A recipient the library refuses itself (malformed) must refuse the whole message, like a policy refusal."""
        envelope = self.envelope
        counts = (
            (len(envelope.rcpt_tos), len(envelope.refused_recipients)) if isinstance(envelope, RelayEnvelope) else None
        )
        self._last_reply = ""
        await super().smtp_RCPT(arg)
        if (
            isinstance(envelope, RelayEnvelope)
            and envelope is self.envelope
            and envelope.mail_from is not None
            and counts == (len(envelope.rcpt_tos), len(envelope.refused_recipients))
            and self._last_reply.startswith("5")
        ):
            envelope.refused_recipients.append(arg or "")

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        """aiosmtpd's DATA, reading the body in large pieces into a spool instead of line by line into memory.

        Same checks and replies as the library's: HELO and AUTH first, `503` without a recipient, `501` with an
        argument, `354`; only <CR><LF>.<CR><LF> ends the data, and nothing after it is read (pipelined commands
        stay for the next command); a body over the SIZE limit or with a line over 1001 bytes is read to its end,
        then refused (`552 5.3.4` / `500 5.5.2`) without calling the hook. See `smtp_relay.body`.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        envelope = self.envelope
        assert isinstance(envelope, RelayEnvelope)
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        if envelope.refused_recipients or envelope.unread_commands:
            # A message goes to all its recipients or to none: refused here, before its body is sent for nothing.
            # The transaction ends, as after a refusal at the end of data.
            refusal = self._refuse_message(envelope)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(refusal)
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        body = MessageBody(size_limit=self.data_size_limit or None, line_limit=self.line_length_limit)
        try:
            self._received_at = self.loop.time()
            self._data_deadline = self._received_at + self._timeout_duration
            try:
                try:
                    await receive(self._reader, body)
                except asyncio.CancelledError:
                    # The connection was lost or timed out during DATA: aiosmtpd cancels this coroutine.
                    logs.event(logging.INFO, "data.aborted", **self._ids(), reason="connection lost")
                    self._writer.close()
                    raise
                except asyncio.IncompleteReadError:
                    logs.event(logging.INFO, "data.aborted", **self._ids(), reason="end of stream")
                    self._writer.close()
                    return
                finally:
                    self._data_deadline = None
                if body.refusal is not None:
                    self._set_post_data_state()  # type: ignore[no-untyped-call]
                    await self.push(self._refusal_reply(body))
                    return
                envelope.body = body
                status = await self._call_handler_hook("DATA")
            finally:
                envelope.body = None
                body.close()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push("250 OK" if status is MISSING else status)
        finally:
            if self._lost_in_delivery:  # the delivery is over: so is the connection (`connection_lost`)
                self._lost_in_delivery = False
                self._unregister(self.session)
        if self._eof_deferred:
            self._end_after_eof()

    def _refuse_message(self, envelope: RelayEnvelope) -> replies.Logged:
        """Log why a message is refused at DATA; its reply."""
        session = self.session
        assert isinstance(session, RelaySession)
        session.messages += 1
        logs.event(
            logging.WARNING,
            "message.refused",
            **self._ids(),
            message=session.messages,
            sender=envelope.mail_from,
            refused=_first_addresses(envelope.refused_recipients),
            refused_count=len(envelope.refused_recipients) or None,
            unread_commands=envelope.unread_commands or None,
            reason="a recipient was refused" if envelope.refused_recipients else "a command could not be read",
        )
        if envelope.refused_recipients:
            return replies.Logged(replies.MESSAGE_HAD_REFUSED_RECIPIENTS)
        return replies.Logged(replies.MESSAGE_HAD_UNREAD_COMMAND)

    def _refusal_reply(self, body: MessageBody) -> str:
        if body.refusal is Refusal.TOO_BIG:
            logs.event(
                logging.WARNING,
                "data.refused",
                **self._ids(),
                reason=f"over MAX_MESSAGE_SIZE ({body.size_limit} bytes)",
            )
            return replies.Logged(replies.MESSAGE_TOO_BIG)
        if body.refusal is Refusal.LINE_TOO_LONG:
            logs.event(logging.WARNING, "data.refused", **self._ids(), reason=f"a line over {body.line_limit} bytes")
            return replies.Logged(replies.LINE_TOO_LONG)
        logs.event(logging.ERROR, "data.spool_failed", **self._ids(), reason=str(body.spool_error))
        return replies.Logged(replies.INTERNAL_ERROR)

    async def challenge_auth(
        self, challenge: str | bytes, encode_to_b64: bool = True, log_client_response: bool = False
    ) -> Any:
        """The library's AUTH challenge, with an answer longer than a command line refused (RFC 4954 4): asyncio's
        line reader raises ValueError there, which the library would answer as an internal error."""
        try:
            return await super().challenge_auth(challenge, encode_to_b64, log_client_response)
        except ValueError as error:
            if "Separator is not found" in str(error):  # asyncio dropped what it had: the rest is still to come
                await self._skip_line()
            await self.push(replies.AUTH_LINE_TOO_LONG)
            return MISSING

    async def _skip_line(self) -> None:
        """Read and drop the rest of an over-long line (bounded in time by the idle timeout)."""
        while True:
            try:
                await self._reader.readuntil()
                return
            except asyncio.LimitOverrunError as more:
                await self._reader.readexactly(more.consumed)
            except asyncio.IncompleteReadError:
                return

    def refused(self, reply: str, **fields: str) -> None:
        """Log a refusal the relay's own code did not log: the first LOGGED_REFUSALS of a connection, then a
        line saying the rest are only counted (in `disconnect`)."""
        self._errors += 1
        reply = replies.for_log(reply)
        if self._errors <= LOGGED_REFUSALS:
            logs.event(logging.WARNING, "command.refused", **self._ids(), **fields, reply=reply)
        elif self._errors == LOGGED_REFUSALS + 1:
            logs.event(
                logging.WARNING,
                "command.refused",
                **self._ids(),
                reply=reply,
                reason=f"more than {LOGGED_REFUSALS} refusals: the rest are counted in the disconnect line",
            )

    async def check_auth_needed(self, caller_method: str) -> bool:
        """The library's check, with the refusal logged and counted."""
        assert self.session is not None
        if self._auth_required and not self.session.authenticated:
            if not self._closing():
                self.refused(replies.AUTH_REQUIRED, command=caller_method, reason="not authenticated")
            await self.push(replies.Logged(replies.AUTH_REQUIRED))
            return True
        return False

    def _ids(self) -> dict[str, str | None]:
        session = self.session
        if not isinstance(session, RelaySession):
            return {}
        return {"session": session.id, "peer": session.peer_text, "user": session.user}

    def pause_idle_timeout(self) -> None:
        """While the upstream works on a message the client is waiting on us, not idle."""
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    def resume_idle_timeout(self) -> None:
        if self.transport is not None:
            self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the idle deadline back; called by aiosmtpd for every command.

        The library cancels and re-creates a timer per command. Here the deadline is a number: the timer
        stays, and when it fires early (the deadline moved on) it is set again for the rest.
        """
        deadline = self.loop.time() + (duration or self._timeout_duration)
        self._idle_deadline = deadline
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)

    def _timeout_cb(self) -> None:
        """Say why before hanging up on an idle client (aiosmtpd just closes), and log it.

        aiosmtpd moves the deadline per command; during a DATA transfer the client's progress moves it too
        (`data_received`). A connection closed earlier that is still open a TIMEOUT later belongs to a client
        that reads nothing: a close waits until the unread replies are sent, which would hold the connection (and
        its MAX_CONNECTIONS slot) forever. It is aborted.
        """
        now = self.loop.time()
        if self._idle_deadline > now:  # a command came since the timer was set
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)
            return
        session = self.session
        ids = self._ids()
        transport = self.transport
        if transport is not None and transport.is_closing():
            logs.event(logging.INFO, "timeout", **ids, reason="replies not read, connection aborted")
            _writable(transport).abort()
            return
        reason, reply = None, replies.IDLE_TIMEOUT
        deadline = self._data_deadline
        if deadline is not None:
            if deadline > now:  # the body is still coming
                self._timeout_handle = self.loop.call_at(deadline, self._timeout_cb)
                return
            idle = self._received_at + self._timeout_duration <= now
            if idle:
                reason = "no data for TIMEOUT during DATA"
            else:
                reason, reply = f"DATA slower than {MIN_DATA_RATE} bytes/s", replies.DATA_TOO_SLOW
        if isinstance(session, RelaySession):
            logs.event(logging.INFO, "timeout", **ids, reason=reason)
        self._close_with(reply)

    def begin_shutdown(self) -> None:
        """Close now if idle; otherwise let the transaction finish and close after its reply."""
        self._draining = True
        if not self.in_transaction:
            self._close_with(replies.SHUTTING_DOWN)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        """Cut the connection (a shutdown past TIMEOUT); a delivery still finishing for a client already gone
        (`connection_lost`) is cancelled with it."""
        self.aborted = True
        if self.transport is not None:
            _writable(self.transport).abort()
        elif self._lost_in_delivery and self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _close_with(self, reply: str) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        transport = _writable(self.transport)
        try:
            transport.write(reply.encode("ascii") + b"\r\n")
        finally:
            transport.close()
        if transport.get_write_buffer_size():  # the client is not reading: abort if it still is not (_timeout_cb)
            self._idle_deadline = self.loop.time() + self._timeout_duration
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._timeout_cb)


class _NeverCancelled:
    """Stands in for aiosmtpd's command loop task while `connection_lost` would cancel it."""

    @staticmethod
    def cancel(msg: object = None) -> bool:
        return False


_NOT_CANCELLED: Any = _NeverCancelled()


class RefuseProtocol(asyncio.Protocol):
    """Answers a connection over MAX_CONNECTIONS with 421 and closes it, without starting an SMTP session."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = _writable(transport)
        peer = transport.get_extra_info("peername")
        logs.event(
            logging.WARNING,
            "connect.refused",
            session=secrets.token_hex(5),  # every connection has an id, refused ones too
            peer=logs.peer_text(peer),
            reason="MAX_CONNECTIONS reached",
        )
        transport.write(replies.TOO_MANY_CONNECTIONS.encode("ascii") + b"\r\n")
        transport.close()


def _rebind(method: Any, old: object, new: object) -> Any:
    """`method` bound to `new` instead of `old`; anything else (the handler's hooks) as it is."""
    if isinstance(method, types.MethodType) and method.__self__ is old:
        return types.MethodType(method.__func__, new)
    return method


def _writable(transport: asyncio.BaseTransport) -> asyncio.Transport:
    """uvloop's transports do not subclass asyncio's ABCs, so isinstance() cannot be used to narrow them."""
    return cast(asyncio.Transport, transport)
