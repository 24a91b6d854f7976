"""`smtp-relay healthcheck`: against a running relay (healthy, down, TLS), and its exact conversation on the wire."""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
from support.client import RawClient, authed, quit_quietly
from support.net import free_port
from support.relay import relay_env, run_cli
from support.sink import down_port

from smtp_relay.healthcheck import EHLO_NAME, TOTAL_TIMEOUT, check, probe_address

FAST = 2.0  # seconds: the bound for one healthcheck run, interpreter start-up included
AUTH_LOG = re.compile(r"event=auth\b|auth\S*[ ._=-]*fail|\b535\b", re.IGNORECASE)


def _healthcheck(env: dict[str, str]) -> tuple[int, str, float]:
    started = time.monotonic()
    done = run_cli(["healthcheck"], env, timeout=20)
    return done.returncode, done.stderr, time.monotonic() - started


# -- against the real relay ------------------------------------------------------------------------------------
def test_healthcheck_of_a_running_relay_exits_0_quickly_and_silently(stack):
    relay = stack.relay(stack.sink().port)
    code, err, elapsed = _healthcheck(relay.env)
    assert (code, err) == (0, ""), err
    assert elapsed < FAST, f"healthcheck took {elapsed:.2f}s"
    # Logged like any connection, and recognisable by its EHLO name on the summary line.
    line = relay.wait_for_log("event=disconnect", f"helo={EHLO_NAME}", "messages=0")
    assert line and "peer=127.0.0.1:" in line, relay.describe()


def test_healthcheck_of_a_relay_with_every_connection_in_use_is_healthy(stack):
    # A full relay is working: reporting it unhealthy would have an orchestrator restart it and cut off every
    # session it is serving. Its own log says it is full (connect.refused).
    relay = stack.relay(stack.sink().port, MAX_CONNECTIONS="1")

    def take_the_slot() -> RawClient:  # the start-up probe's connection may still hold it for a moment
        client = RawClient(relay.port)
        if client.greeting[0] != 220:
            client.close()
            raise AssertionError(client.greeting)
        return client

    with _when_a_slot_is_free(take_the_slot):
        with RawClient(relay.port) as other:
            assert other.greeting[0] == 421  # full
        code, err, elapsed = _healthcheck(relay.env)
        assert (code, err) == (0, ""), err
        assert elapsed < FAST
    refused = relay.wait_for_log("event=connect.refused", 'reason="MAX_CONNECTIONS reached"')
    assert refused and re.search(r" session=[0-9a-f]{10} peer=127\.0\.0\.1:\d+ ", refused), refused


def test_healthcheck_when_the_relay_is_down_exits_1_with_one_line_why(tmp_path):
    env = relay_env(tmp_path, down_port(), listen_port=free_port())
    code, err, elapsed = _healthcheck(env)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert env["LISTEN_PORT"] in lines[0] and "refused" in lines[0].lower(), lines[0]
    assert elapsed < FAST


def test_healthcheck_with_use_tls_does_starttls_and_exits_0(stack, tls):
    relay = stack.relay(
        stack.sink().port, USE_TLS="true", TLS_CERT_FILE=str(tls.cert_pem), TLS_KEY_FILE=str(tls.key_pem)
    )
    code, err, elapsed = _healthcheck(relay.env)
    assert (code, err) == (0, ""), err
    assert elapsed < FAST, f"healthcheck took {elapsed:.2f}s"
    assert "starttls.failed" not in relay.all_output()


def test_healthcheck_expecting_tls_from_a_plain_relay_is_unhealthy(stack, tls):
    relay = stack.relay(stack.sink().port)
    env = {**relay.env, "USE_TLS": "true", "TLS_CERT_FILE": str(tls.cert_pem), "TLS_KEY_FILE": str(tls.key_pem)}
    code, err, _ = _healthcheck(env)
    assert code == 1
    assert "STARTTLS is not offered" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "overrides",
    [{"LISTEN_PORT": "not-a-port"}, {"USE_TLS": "true", "TLS_CERT_FILE": "/nonexistent/cert.pem"}],
    ids=["invalid", "certificate-gone"],
)
def test_healthcheck_with_a_configuration_the_relay_cannot_use_is_unhealthy_exit_1(tmp_path, overrides):
    # Exit 1, not the 2 of other configuration errors: Docker reserves a health check's exit code 2.
    env = relay_env(tmp_path, down_port(), **overrides)
    code, err, _ = _healthcheck(env)
    assert code == 1
    assert err.startswith("unhealthy: configuration error: ") and len(err.strip().splitlines()) == 1, err
    assert next(iter(overrides)) in err


def _when_a_slot_is_free(attempt: Callable[[], object], within: float = 2.0) -> object:
    """Retry (bounded) while the relay still counts a just-closed connection against MAX_CONNECTIONS."""
    deadline = time.monotonic() + within
    while True:
        try:
            return attempt()
        except (smtplib.SMTPServerDisconnected, smtplib.SMTPConnectError, ConnectionError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_healthchecks_never_count_as_failed_logins_nor_hold_a_connection(stack):
    # One connection allowed, a long idle timeout, and one failed login locks out: a probe that left its
    # session open would keep the next client out for TIMEOUT seconds, and one that tried AUTH would lock
    # the real user out.
    relay = stack.relay(
        stack.sink().port, MAX_CONNECTIONS="1", TIMEOUT="30", AUTH_MAX_FAILURES="1", AUTH_LOCKOUT_SECONDS="600"
    )
    for _ in range(3):
        code, err, _ = _healthcheck(relay.env)
        assert (code, err) == (0, ""), err
        smtp = _when_a_slot_is_free(lambda: authed(relay.port))  # not locked out, the slot is free again
        quit_quietly(smtp)  # type: ignore[arg-type]
    auth_lines = [line for line in relay.log_lines() if AUTH_LOG.search(line)]
    assert len(auth_lines) == 3 and all("success" in line for line in auth_lines), auth_lines  # ours only
    assert not [line for line in relay.all_output().splitlines() if re.search(r"fail|lock", line, re.I)]


# -- the conversation on the wire (a scripted server that records what the probe says) ------------------------
class ScriptedServer:
    """A one-connection-at-a-time SMTP server on 127.0.0.1 that records every line the client sends."""

    def __init__(self, greeting: bytes | None = b"220 scripted ESMTP", tls: ssl.SSLContext | None = None) -> None:
        self.greeting = greeting
        self.tls = tls
        self.lines: list[str] = []
        self.closed_by_client = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            conn, _ = self.listener.accept()
            with conn:
                conn.settimeout(5)
                self._talk(conn)

    def _talk(self, conn: socket.socket | ssl.SSLSocket) -> None:
        if self.greeting is None:  # a stuck relay: accept, never greet
            time.sleep(TOTAL_TIMEOUT + 1)
            return
        conn.sendall(self.greeting + b"\r\n")
        buffer = b""
        while True:
            chunk = conn.recv(4096)
            if not chunk:
                self.closed_by_client.set()
                return
            buffer += chunk
            while b"\r\n" in buffer:
                raw, buffer = buffer.split(b"\r\n", 1)
                verb, _, rest = raw.decode("ascii", "replace").partition(" ")
                verb = verb.upper()
                self.lines.append(f"{verb} {rest}".rstrip())
                if verb == "EHLO":
                    offers = b"250-STARTTLS\r\n" if self.tls and not isinstance(conn, ssl.SSLSocket) else b""
                    conn.sendall(b"250-scripted\r\n" + offers + b"250 AUTH PLAIN LOGIN\r\n")
                elif verb == "STARTTLS" and self.tls:
                    conn.sendall(b"220 2.0.0 go ahead\r\n")
                    conn = self.tls.wrap_socket(conn, server_side=True)
                elif verb == "QUIT":
                    conn.sendall(b"221 2.0.0 bye\r\n")
                else:
                    conn.sendall(b"502 5.5.1 not here\r\n")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(timeout=5)


@pytest.fixture
def scripted() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(**kwargs: object) -> ScriptedServer:
        server = ScriptedServer(**kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


def _settings(port: int, use_tls: bool = False, host: str = "0.0.0.0") -> SimpleNamespace:
    return SimpleNamespace(listen_host=host, listen_port=port, use_tls=use_tls)


def test_probe_says_ehlo_then_quit_and_closes_never_auth(scripted):
    server = scripted()
    assert check(_settings(server.port)) is None
    assert server.closed_by_client.wait(5)
    assert server.lines == [f"EHLO {EHLO_NAME}", "QUIT"]


def test_probe_with_tls_says_ehlo_starttls_ehlo_quit(scripted, tls):
    server = scripted(tls=tls.server_ctx)
    assert check(_settings(server.port, use_tls=True)) is None
    assert server.closed_by_client.wait(5)
    assert server.lines == [f"EHLO {EHLO_NAME}", "STARTTLS", f"EHLO {EHLO_NAME}", "QUIT"]


def test_probe_reports_a_refusing_greeting_and_still_says_quit(scripted):
    server = scripted(greeting=b"421-4.3.2 Too many\r\n421 4.3.2 connections")
    reason = check(_settings(server.port))
    assert reason is not None and "421" in reason and "\n" not in reason, reason
    assert server.closed_by_client.wait(5)
    assert server.lines[-1:] == ["QUIT"]


def test_probe_takes_only_the_relays_own_full_reply_for_busy(scripted):
    from smtp_relay.replies import SHUTTING_DOWN, TOO_MANY_CONNECTIONS

    assert check(_settings(scripted(greeting=TOO_MANY_CONNECTIONS.encode()).port)) is None
    for other in (SHUTTING_DOWN, "421 4.7.0 Too many connections from your address", "554 5.7.1 Go away"):
        reason = check(_settings(scripted(greeting=other.encode()).port))
        assert reason is not None and other[:3] in reason, (other, reason)


def test_probe_of_a_silent_listener_gives_up_within_its_time_bound(scripted):
    server = scripted(greeting=None)
    started = time.monotonic()
    reason = check(_settings(server.port))
    waited = time.monotonic() - started
    assert waited < TOTAL_TIMEOUT + 0.5
    assert reason is not None and "no answer within" in reason, reason
    said = float(reason.split("within ")[1].split()[0])  # the time it really waited
    assert abs(said - waited) < 0.3, (said, waited)


@pytest.mark.parametrize(
    ("listen_host", "expected"),
    [
        ("0.0.0.0", "127.0.0.1"),
        ("", "127.0.0.1"),
        ("::", "::1"),
        ("[::]", "::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("::1", "::1"),
        ("192.0.2.10", "192.0.2.10"),
        ("localhost", "localhost"),
    ],
)
def test_probe_reaches_a_wildcard_listener_on_loopback_and_others_where_they_listen(listen_host, expected):
    assert probe_address(listen_host) == expected
