"""An upstream SMTP sink run inside the test process (aiosmtpd Controller in a thread).

It records every envelope it accepts and can be switched, at run time, to misbehave the ways a real
upstream does: refuse a recipient, answer a given code at MAIL or at the end of DATA, hang at the end of
DATA, drop the connection, require AUTH, offer STARTTLS or implicit TLS, or not offer STARTTLS at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from .net import ThreadedServer, free_port


@dataclass
class Received:
    """One envelope the sink accepted."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    mail_options: list[str]
    tls: bool
    auth_user: str | None
    peer: Any


@dataclass
class Behaviour:
    """What the sink does; change it between tests with `Sink.configure`."""

    # address (lower case) -> full reply line, e.g. "550 5.1.1 No such user"
    refuse_rcpt: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None  # e.g. "451 4.3.2 try later" answered to MAIL FROM
    data_reply: str | None = None  # e.g. "554 5.6.0 content rejected" answered at end of DATA
    data_delay: float = 0.0  # seconds to wait at end of DATA before accepting (a slow upstream)
    hang: float = 0.0  # seconds to hang at end of DATA, then answer 451 WITHOUT recording (bounded)
    drop_at_data: bool = False  # close the connection at end of DATA without a reply


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        if self.sink.pipelining:  # as Postfix, Exchange and every large provider do (RFC 2920)
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        self.sink.mail_commands.append(address)
        b = self.sink.behaviour
        if b.mail_reply:
            return b.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        b = self.sink.behaviour
        reply = b.refuse_rcpt.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server, session, envelope):
        b = self.sink.behaviour
        self.sink.data_started.append(time.monotonic())
        if b.drop_at_data:
            if server.transport is not None:
                server.transport.abort()
            return "421 4.3.0 dropped"
        if b.hang:
            await asyncio.sleep(min(b.hang, 60.0))
            return "451 4.3.0 sink hung and gave up"
        if b.data_delay:
            await asyncio.sleep(min(b.data_delay, 60.0))
        if b.data_reply:
            return b.data_reply
        user = session.auth_data if isinstance(session.auth_data, str) else None
        rec = Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=bytes(envelope.original_content or b""),
            mail_options=list(envelope.mail_options),
            tls=session.ssl is not None or self.sink.mode == "implicit",
            auth_user=user,
            peer=session.peer,
        )
        with self.sink._lock:
            self.sink._messages.append(rec)
        return "250 2.0.0 OK queued as sink"


class Sink:
    """An aiosmtpd upstream on 127.0.0.1:<free port>.

    mode: "plain" (no STARTTLS offered), "starttls" (STARTTLS offered and required), "implicit" (TLS from
    the first byte). `server_ctx` is an ssl server context (e.g. from a trustme certificate) for the TLS
    modes. `auth`: (username, password) required from the relay before MAIL. `pipelining`: offer PIPELINING
    (RFC 2920) in the EHLO reply. `smtputf8`: offer SMTPUTF8 (RFC 6531; aiosmtpd's default is not to).
    """

    def __init__(
        self,
        mode: str = "plain",
        server_ctx: ssl.SSLContext | None = None,
        auth: tuple[str, str] | None = None,
        require_starttls: bool = True,
        pipelining: bool = True,
        smtputf8: bool = False,
    ) -> None:
        assert mode in ("plain", "starttls", "implicit")
        if mode != "plain":
            assert server_ctx is not None, "TLS modes need a server context"
        self.mode = mode
        self.server_ctx = server_ctx
        self.auth = auth
        self.require_starttls = require_starttls
        self.pipelining = pipelining
        self.smtputf8 = smtputf8
        self.behaviour = Behaviour()
        self._lock = threading.Lock()
        self._messages: list[Received] = []
        self.mail_commands: list[str] = []
        self.data_started: list[float] = []
        self.auth_attempts: list[tuple[str, str, bool]] = []  # (mechanism, user, success)
        self.port = 0
        self.controller: Controller | None = None

    # -- behaviour ---------------------------------------------------------------------------------
    def configure(self, **kwargs: Any) -> None:
        """Replace the behaviour (anything not given goes back to the default: accept everything)."""
        self.behaviour = Behaviour(**kwargs)

    def reset(self) -> None:
        self.behaviour = Behaviour()
        with self._lock:
            self._messages.clear()
        self.mail_commands.clear()
        self.data_started.clear()
        self.auth_attempts.clear()

    @property
    def messages(self) -> list[Received]:
        with self._lock:
            return list(self._messages)

    def wait_for_messages(self, n: int, timeout: float = 5.0) -> list[Received]:
        """Wait (bounded) until at least n messages arrived; return them all."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msgs = self.messages
            if len(msgs) >= n:
                return msgs
            time.sleep(0.02)
        return self.messages

    # -- auth --------------------------------------------------------------------------------------
    def _authenticator(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            self.auth_attempts.append((mechanism, "?", False))
            return AuthResult(success=False, handled=False)
        user = auth_data.login.decode("utf-8", "replace")
        password = auth_data.password.decode("utf-8", "replace")
        ok = self.auth is not None and (user, password) == self.auth
        self.auth_attempts.append((mechanism, user, ok))
        return AuthResult(success=ok, handled=False, auth_data=user)

    # -- life cycle --------------------------------------------------------------------------------
    def start(self) -> Sink:
        kwargs: dict[str, Any] = {
            "hostname": "127.0.0.1",
            "port": free_port(),
            "server_hostname": "sink.test",
            "ready_timeout": 5.0,
            "enable_SMTPUTF8": self.smtputf8,
        }
        if self.mode == "starttls":
            kwargs["tls_context"] = self.server_ctx
            kwargs["require_starttls"] = self.require_starttls
        elif self.mode == "implicit":
            kwargs["ssl_context"] = self.server_ctx
        if self.auth is not None:
            kwargs["authenticator"] = self._authenticator
            kwargs["auth_required"] = True
            # aiosmtpd never marks an implicit-TLS session as TLS (issues #274/#281)
            kwargs["auth_require_tls"] = self.mode == "starttls"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Requiring AUTH while not requiring TLS": deliberate here
            self.controller = Controller(_Handler(self), **kwargs)
        self.controller.start()
        self.port = self.controller.port
        return self

    def stop(self) -> None:
        if self.controller is not None:
            with contextlib.suppress(Exception):
                self.controller.stop()
            self.controller = None

    def __enter__(self) -> Sink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def down_port() -> int:
    """A port with nothing listening: an upstream that is down."""
    port = free_port()
    # make sure nothing answers there (bounded check)
    with socket.socket() as s:
        s.settimeout(0.5)
        assert s.connect_ex(("127.0.0.1", port)) != 0
    return port


class JunkUpstream(ThreadedServer):
    """A TCP server that is not a proper SMTP server: it sends `greeting` bytes, then (optionally) answers
    every line with `reply`, and closes after `linger` seconds. Every wait is bounded."""

    def __init__(self, greeting: bytes, reply: bytes | None = None, linger: float = 5.0) -> None:
        super().__init__()
        self.greeting = greeting
        self.reply = reply
        self.linger = linger
        self.received = bytearray()

    def session(self, conn: socket.socket) -> None:
        deadline = time.monotonic() + self.linger
        with conn:
            with contextlib.suppress(OSError):
                conn.sendall(self.greeting)
                conn.settimeout(0.2)
                while time.monotonic() < deadline and not self._stop.is_set():
                    try:
                        data = conn.recv(4096)
                    except TimeoutError:
                        continue
                    if not data:
                        return
                    self.received += data
                    if self.reply is not None:
                        conn.sendall(self.reply)
