"""The relay server: listener, TLS, connection limit, signals and graceful shutdown; built from config."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import ssl
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from smtp_relay import __version__, logs
from smtp_relay.auth import Authenticator
from smtp_relay.config import ConfigError, Settings
from smtp_relay.handler import RelayHandler
from smtp_relay.lockout import LoginThrottle
from smtp_relay.protocol import RefuseProtocol, RelaySMTP
from smtp_relay.shared import ConnectionCounts, FailureTable
from smtp_relay.upstream import Upstream, UpstreamSettings

# TLS 1.2 suites offered to clients: forward secrecy and AEAD only (Mozilla's "intermediate" profile). Python's
# default also takes the CBC-SHA256/384 suites when a client offers nothing else. TLS 1.3 has only AEAD suites.
SERVER_CIPHERS = "@SECLEVEL=2:ECDH+AESGCM:ECDH+CHACHA20:!aNULL:!eNULL:!aDSS:!SHA1:!AESCCM"
# How long a shutdown past TIMEOUT waits for the connections it aborted to end.
ABORT_GRACE_SECONDS = 1.0


def server_tls_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.2+ server context: AEAD suites with forward secrecy only."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(SERVER_CIPHERS)
    try:
        # The certificate alone first, so that an error names the file at fault.
        ssl.create_default_context(cafile=str(settings.tls_cert_file))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError("TLS_CERT_FILE", f"cannot load a PEM certificate: {exc}") from None
    try:
        context.load_cert_chain(str(settings.tls_cert_file), str(settings.tls_key_file))
    except (OSError, ssl.SSLError) as exc:
        problem = "does not match TLS_CERT_FILE" if "KEY_VALUES_MISMATCH" in str(exc) else "cannot load"
        raise ConfigError("TLS_KEY_FILE", f"{problem}: {exc}") from None
    return context


def run_loop(main: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run `main()` on uvloop (asyncio's own loop where uvloop is missing); its result is the exit code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return asyncio.run(main())
    return uvloop.run(main())


def bind(host: str, port: int, shown_port: int | None = None) -> list[socket.socket]:
    """Listening sockets for host:port, one per address, as asyncio's `create_server` makes them; bound once, by the
    relay or by the supervisor of its workers. Errors name `shown_port` (default: `port`)."""
    sockets: list[socket.socket] = []
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        # `::` alone (no IPv4 socket beside it) takes IPv4 connections too, as its README row says; any other IPv6
        # socket takes IPv6 only (an empty LISTEN_HOST binds 0.0.0.0 and :: separately).
        dual_stack = all(info[0] == socket.AF_INET6 and info[4][0] == "::" for info in infos)
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # an address family this host lacks (say, IPv6): skipped, as asyncio does
                continue
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
            sock.bind(address)
            sock.listen(1024)
            sock.setblocking(False)
        if not sockets:
            raise OSError(0, "no usable address")
    except (OSError, UnicodeError) as exc:  # UnicodeError: a host name with an empty or too long label
        for sock in sockets:
            sock.close()
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        # In use or privileged: the port's fault; not found, not this host's, or no usable address: the host's.
        port_fault = isinstance(exc, OSError) and exc.errno in (errno.EADDRINUSE, errno.EACCES)
        variable = "LISTEN_PORT" if port_fault else "LISTEN_HOST"
        where = f"[{host}]" if ":" in host else host
        raise ConfigError(
            variable, f"cannot listen on {where}:{port if shown_port is None else shown_port}: {reason}"
        ) from None
    return sockets


def preflight(settings: Settings) -> None:
    """What `--check-config` can try without taking the port (a running relay may hold it): the TLS files load,
    LISTEN_HOST is an address of this host, LOG_FILE can be opened for appending. Raises ConfigError."""
    RelayServer(settings)  # builds the TLS contexts
    for sock in bind(settings.listen_host, 0, shown_port=settings.listen_port):
        sock.close()
    logs.check_log_file(settings)


class RelayServer:
    """startup -> serve until a signal -> shutdown in stages (stop accepting, drain, force)."""

    def __init__(self, settings: Settings, logins: FailureTable | None = None) -> None:
        """`logins`: the failed-login table shared by all workers (see `workers`); a single relay makes its own."""
        self.settings = settings
        self.hostname = settings.smtp_hostname
        self.connections: set[RelaySMTP] = set()
        self._tls_context = server_tls_context(settings) if settings.use_tls else None
        self._upstream = Upstream(
            UpstreamSettings(
                host=settings.relay_host,
                port=settings.relay_port,
                tls_mode=settings.relay_tls_mode,
                verify=settings.relay_tls_verify,
                ca_file=settings.relay_tls_ca_file,
                username=settings.relay_username,
                password=settings.relay_password.get_secret_value(),
                timeout=settings.timeout,
                local_hostname=self.hostname,
                pool_size=settings.relay_pool_size,
                pool_idle_seconds=settings.relay_pool_idle_seconds,
                pool_max_messages=settings.relay_pool_max_messages,
            )
        )
        logins = logins or FailureTable(shared=False)
        throttle = LoginThrottle(settings.auth_max_failures, settings.auth_lockout_seconds, logins)
        self._handler = RelayHandler(settings.policy, self._upstream, self.hostname, throttle)
        password = settings.smtp_auth_password.get_secret_value()
        self._authenticator = Authenticator(settings.smtp_auth_username, password, throttle)
        self._template: RelaySMTP | None = None
        self._servers: list[asyncio.Server] = []
        self._should_exit = asyncio.Event()
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._signals = 0
        self._worker: int | None = None  # this process's number under a supervisor (WORKERS > 1)
        self._counts: ConnectionCounts | None = None  # every worker's open connections (WORKERS > 1)

    # ConnectionTracker
    def opened(self, protocol: RelaySMTP) -> None:
        self.connections.add(protocol)
        self._all_closed.clear()
        self._share_count()

    def closed(self, protocol: RelaySMTP) -> None:
        self.connections.discard(protocol)
        if not self.connections:
            self._all_closed.set()
        self._share_count()

    def _share_count(self) -> None:
        """A worker tells the others how many connections it holds (see `shared.ConnectionCounts`)."""
        if self._counts is not None and self._worker is not None:
            self._counts.set(self._worker, len(self.connections))

    def _protocol_factory(self) -> asyncio.Protocol:
        limit = self.settings.max_connections
        if self._counts is not None and self._worker is not None:
            if not self._counts.take(self._worker, len(self.connections), limit):
                return RefuseProtocol()
        elif len(self.connections) >= limit:
            return RefuseProtocol()
        if self._template is None:
            self._template = self.protocol_template()
        return self._template.spawn()

    def protocol_template(self) -> RelaySMTP:
        """The SMTP protocol as configured; each connection gets a copy (`RelaySMTP.spawn`)."""
        s = self.settings
        return RelaySMTP(
            self._handler,
            tracker=self,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,  # RFC 6531: internationalised addresses (see handler, upstream)
            decode_data=False,
            hostname=self.hostname,
            ident="ESMTP smtp-relay",
            tls_context=self._tls_context,
            require_starttls=s.use_tls,
            timeout=s.timeout,
            auth_required=True,
            auth_require_tls=s.use_tls,
            authenticator=self._authenticator,
            loop=asyncio.get_running_loop(),
        )

    async def serve(
        self, sockets: Sequence[socket.socket] = (), worker: int | None = None, counts: ConnectionCounts | None = None
    ) -> int:
        """Serve until SIGTERM/SIGINT. A worker (see `workers`) serves `sockets` its supervisor bound, and keeps
        MAX_CONNECTIONS for all workers together through `counts`."""
        self._counts = counts
        await self.startup(sockets, worker)
        await self._should_exit.wait()
        await self.shutdown()
        return 0

    def stop(self) -> None:
        """Begin a graceful shutdown, as the first SIGTERM does."""
        self._should_exit.set()

    @property
    def stopping(self) -> bool:
        return self._should_exit.is_set()

    async def startup(self, sockets: Sequence[socket.socket] = (), worker: int | None = None) -> None:
        loop = asyncio.get_running_loop()
        s = self.settings
        self._worker = worker
        for sock in sockets or bind(s.listen_host, s.listen_port):
            self._servers.append(await loop.create_server(self._protocol_factory, sock=sock, backlog=1024))
        # A worker leaves SIGINT (a terminal's Ctrl-C reaches the whole process group) to its supervisor,
        # which passes it on as SIGTERM: two signals would force the worker down at once.
        for sig in (signal.SIGTERM, signal.SIGUSR1) if worker is not None else (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if worker is not None:
            from smtp_relay.workers import SIGNALS

            # The supervisor forks with these blocked, so that one sent before now is not lost: it arrives here.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        logs.event(
            logging.INFO,
            "listening",
            worker=worker,
            version=__version__,
            host=s.listen_host,
            port=s.listen_port,
            starttls=s.use_tls,
            upstream=f"{s.relay_host}:{s.relay_port}",
            upstream_tls=s.relay_tls_mode,
            max_connections=s.max_connections,
            max_message_size=s.max_message_size,
        )

    def _on_signal(self, sig: signal.Signals) -> None:
        """First SIGTERM/SIGINT: drain; a second one forces. A worker drains on any SIGTERM (its process group may
        be signalled as well as its supervisor passing the signal on) and is forced by SIGUSR1 (see `workers`)."""
        if self._worker is not None and sig != signal.SIGUSR1 and self._signals:
            return
        self._signals += 1
        forced = self._signals > 1 or sig == signal.SIGUSR1
        logs.event(
            logging.WARNING if forced else logging.INFO,
            "shutdown.forced" if forced else "shutdown.started",
            signal=sig.name,
            worker=self._worker,
            open_connections=len(self.connections),
        )
        if forced:
            logs.flush_all()
            os._exit(1)
        self._should_exit.set()

    async def shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for protocol in list(self.connections):
            protocol.begin_shutdown()
        try:
            await asyncio.wait_for(self._all_closed.wait(), timeout=self.settings.timeout)
        except TimeoutError:
            logs.event(logging.WARNING, "shutdown.timeout", worker=self._worker, open_connections=len(self.connections))
            for protocol in list(self.connections):
                protocol.abort()
            # Aborted connections end at once; a delivery cancelled for a client already gone ends within a few
            # turns of the loop (its log lines come before `shutdown.complete`).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), timeout=ABORT_GRACE_SECONDS)
        await self._upstream.close()
        logs.event(logging.INFO, "shutdown.complete", worker=self._worker)
