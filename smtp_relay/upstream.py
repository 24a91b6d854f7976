"""Delivery of one envelope to the real upstream SMTP server (TLS, AUTH, timeouts); knows nothing of policy."""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPException,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from smtp_relay import replies


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
    password: str
    timeout: float
    local_hostname: str


def client_tls_context(verify: bool, ca_file: Path | None) -> ssl.SSLContext:
    """TLS 1.2+ client context with system CAs (plus an extra bundle); built once at start-up."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class Upstream:
    """Delivers envelopes over a new connection each; holds the TLS context and settings made once."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self._tls_context = (
            client_tls_context(settings.verify, settings.ca_file) if settings.tls_mode != "none" else None
        )

    async def deliver(self, mail_from: str, rcpt_tos: Sequence[str], content: bytes, eight_bit: bool) -> Outcome:
        """Send one message; delivered only if every recipient and the end of data got a 2xx."""
        started = time.monotonic()
        stage = Stage.CONNECT
        s = self.settings
        client = aiosmtplib.SMTP(
            hostname=s.host,
            port=s.port,
            timeout=s.timeout,
            use_tls=s.tls_mode == "implicit",
            start_tls=False,
            tls_context=self._tls_context,
            local_hostname=s.local_hostname,
        )
        try:
            try:
                await client.connect()
                if s.tls_mode == "starttls":
                    stage = Stage.TLS
                    await client.ehlo()
                    if not client.supports_extension("starttls"):
                        return self._failed(
                            stage,
                            replies.UPSTREAM_TLS_UNAVAILABLE,
                            started,
                            problem="upstream does not offer STARTTLS; refusing to send in plain text",
                        )
                    await client.starttls()
                if s.username:
                    stage = Stage.AUTH
                    await client.login(s.username, s.password)
                stage = Stage.MAIL
                options = []
                if client.supports_extension("size"):
                    options.append(f"SIZE={len(content)}")
                if eight_bit and client.supports_extension("8bitmime"):
                    options.append("BODY=8BITMIME")
                await client.mail(mail_from, options=options)
                stage = Stage.RCPT
                for rcpt in rcpt_tos:
                    await client.rcpt(rcpt)
                stage = Stage.DATA
                response = await client.data(content)
            except SMTPRecipientRefused as exc:
                await _abandon(client)
                return self._rejected(stage, exc, started, problem=f"upstream refused recipient {exc.recipient}")
            except SMTPAuthenticationError as exc:
                await _abandon(client)
                # The relay's own credentials are wrong: not the client's fault, so it may retry later.
                return self._failed(
                    stage,
                    replies.UPSTREAM_AUTH_FAILED,
                    started,
                    code=exc.code,
                    text=exc.message,
                    problem="upstream rejected RELAY_USERNAME/RELAY_PASSWORD",
                )
            except SMTPResponseException as exc:
                await _abandon(client)
                return self._rejected(stage, exc, started, problem=f"upstream refused at {stage.value}")
            except SMTPTimeoutError as exc:
                return self._failed(stage, replies.UPSTREAM_TIMEOUT, started, problem=f"timeout: {exc}")
            except SMTPServerDisconnected as exc:
                return self._failed(stage, replies.UPSTREAM_CONNECTION_LOST, started, problem=f"disconnected: {exc}")
            except (ssl.SSLError, ssl.CertificateError) as exc:
                return self._failed(stage, replies.UPSTREAM_TLS_FAILED, started, problem=f"TLS failed: {exc}")
            except SMTPConnectError as exc:
                tls_cause = _ssl_cause(exc)
                if tls_cause is not None:
                    return self._failed(
                        Stage.TLS, replies.UPSTREAM_TLS_FAILED, started, problem=f"TLS failed: {tls_cause}"
                    )
                return self._failed(stage, replies.UPSTREAM_UNAVAILABLE, started, problem=f"connect failed: {exc}")
            except SMTPException as exc:
                return self._failed(
                    stage, replies.UPSTREAM_UNAVAILABLE, started, problem=f"{type(exc).__name__}: {exc}"
                )
            except (OSError, asyncio.IncompleteReadError) as exc:
                return self._failed(
                    stage, replies.UPSTREAM_CONNECTION_LOST, started, problem=f"{type(exc).__name__}: {exc}"
                )
            await _quit(client)
            return Outcome(
                True,
                replies.TRANSACTION_OK,
                Stage.DONE,
                response.code,
                response.message,
                duration=time.monotonic() - started,
            )
        finally:
            client.close()

    @staticmethod
    def _failed(
        stage: Stage,
        reply: str,
        started: float,
        *,
        code: int | None = None,
        text: str = "",
        problem: str = "",
    ) -> Outcome:
        return Outcome(False, reply, stage, code, text, problem, time.monotonic() - started)

    @staticmethod
    def _rejected(stage: Stage, exc: SMTPResponseException, started: float, *, problem: str) -> Outcome:
        reply = replies.upstream_reply(exc.code, exc.message)
        return Outcome(False, reply, stage, exc.code, exc.message, problem, time.monotonic() - started)


def _ssl_cause(exc: BaseException) -> BaseException | None:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError | ssl.CertificateError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


async def _abandon(client: aiosmtplib.SMTP) -> None:
    """End a refused transaction politely so the upstream holds nothing half-done."""
    try:
        await client.rset()
    except (SMTPException, OSError):
        return
    await _quit(client)


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit()
    except (SMTPException, OSError):
        pass
