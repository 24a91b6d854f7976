"""Life cycle: graceful SIGTERM/SIGINT (idle sessions get 421, transactions in flight finish, exit 0), a
second signal exits at once; the connection limit and the client idle timeout."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from support.client import RawClient, transaction
from support.net import ThreadedServer, wait_until

MSG = b"Subject: lifecycle\r\n\r\nbody\r\n"


def _authed_idle_client(relay) -> RawClient:
    c = RawClient(relay.port)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.auth_plain()[0] == 235
    return c


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("state", ["greeted", "authenticated"])
def test_signal_closes_idle_sessions_with_421_and_exits_0(stack, sig, state):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, TIMEOUT="5")
    c = _authed_idle_client(relay) if state == "authenticated" else RawClient(relay.port)
    try:
        relay.send_signal(sig)
        code, text = c.reply()
        assert code == 421, text
        assert c.closed_by_peer(5)
    finally:
        c.close()
    assert relay.wait(10) == 0, relay.describe()


def test_sigterm_lets_a_transaction_in_flight_finish_and_stops_accepting(stack):
    upstream = stack.sink()
    upstream.configure(data_delay=2.0)
    relay = stack.relay(upstream.port, TIMEOUT="8")
    result: list[tuple[str, int, str]] = []
    worker = threading.Thread(
        target=lambda: result.append(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG))
    )
    worker.start()
    try:
        assert wait_until(lambda: upstream.data_started, 5), "the message never reached the upstream"
        relay.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert relay.returncode is None, "exited with a transaction in flight"
        # no new sessions while draining: refused, or closed without a 220 greeting
        try:
            with socket.create_connection(("127.0.0.1", relay.port), timeout=2) as s:
                s.settimeout(2)
                data = s.recv(1024)
                assert not data.startswith(b"220"), data
        except OSError:
            pass
    finally:
        worker.join(15)
    assert result and result[0][:2] == ("DATA", 250), result
    assert len(upstream.messages) == 1
    assert relay.wait(10) == 0, relay.describe()


def test_second_signal_exits_at_once(stack):
    upstream = stack.sink()
    upstream.configure(hang=30)
    relay = stack.relay(upstream.port, TIMEOUT="20")

    def client() -> None:
        try:
            transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG, timeout=25)
        except (OSError, ConnectionError, TimeoutError):
            pass  # the relay was told to exit at once: the connection may die mid-transaction

    worker = threading.Thread(target=client, daemon=True)
    worker.start()
    assert wait_until(lambda: upstream.data_started, 5)
    relay.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert relay.returncode is None, "the first signal should wait for the transaction in flight"
    started = time.monotonic()
    relay.send_signal(signal.SIGTERM)
    relay.wait(5)
    assert time.monotonic() - started < 3


def test_connection_over_max_connections_gets_421_and_is_closed(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, MAX_CONNECTIONS="2")
    first, second = RawClient(relay.port), RawClient(relay.port)
    try:
        assert first.greeting[0] == 220 and second.greeting[0] == 220
        with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
            s.settimeout(5)
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(1024)
                if not chunk:
                    break
                data += chunk
            assert data.startswith(b"421"), data
            assert s.recv(1024) == b""
        first.cmd("QUIT")
        first.close()

        def a_slot_is_free() -> bool:
            try:
                with RawClient(relay.port, timeout=3) as c:
                    return c.greeting[0] == 220
            except (OSError, ValueError):
                return False

        assert wait_until(a_slot_is_free, 5)
    finally:
        first.close()
        second.close()


def test_idle_client_is_disconnected_after_timeout(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, TIMEOUT="1.5")
    with RawClient(relay.port, timeout=10) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        started = time.monotonic()
        assert c.closed_by_peer(8)
        assert time.monotonic() - started < 6
        assert c.buf.startswith(b"421 4.4.2 "), c.buf
    assert relay.wait_for_log("event=timeout"), relay.describe()


def test_each_command_restarts_the_idle_timeout(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, TIMEOUT="1.5")
    with RawClient(relay.port, timeout=10) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        started = time.monotonic()
        for _ in range(4):  # 4 x 0.8 s: longer than TIMEOUT in all, never idle that long at once
            time.sleep(0.8)
            assert c.cmd("NOOP")[0] == 250
        assert time.monotonic() - started > 3
        last = time.monotonic()
        assert c.closed_by_peer(8)
        assert 1.2 < time.monotonic() - last < 4, "idle for TIMEOUT after the last command, then closed"
        assert b"421 4.4.2 " in c.buf, c.buf


def test_sigterm_with_a_hung_upstream_exits_0_within_the_timeout_and_never_answers_250(stack):
    upstream = stack.sink()
    upstream.configure(hang=20)
    relay = stack.relay(upstream.port, TIMEOUT="2")
    result: list[object] = []

    def client() -> None:
        try:
            result.append(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG, timeout=15))
        except (OSError, ConnectionError, TimeoutError) as e:
            result.append(e)

    worker = threading.Thread(target=client)
    worker.start()
    try:
        assert wait_until(lambda: upstream.data_started, 5)
        started = time.monotonic()
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0, relay.describe()
        assert time.monotonic() - started < 2 + 3
    finally:
        worker.join(15)
    assert result
    if isinstance(result[0], tuple):
        assert result[0][1] != 250 and 400 <= result[0][1] < 500, result
    assert upstream.messages == []


def _received(conn, greeting: bytes) -> Iterator[bytes]:
    """Greet the relay, then what it sends, read by read, until it hangs up (bounded by the socket timeout)."""
    conn.settimeout(10)
    conn.sendall(greeting)
    while chunk := conn.recv(65536):
        yield chunk


class SlowUpstream(ThreadedServer):
    """Answers every command after `delay` seconds: each step within TIMEOUT, a whole delivery well past it."""

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay
        self.mail_commands = 0

    def session(self, conn) -> None:
        buffer = b""
        with conn, contextlib.suppress(OSError):
            for chunk in _received(conn, b"220 slow.test ESMTP\r\n"):
                buffer += chunk
                while b"\r\n" in buffer:
                    line, buffer = buffer.split(b"\r\n", 1)
                    self.mail_commands += line[:4].upper() == b"MAIL"
                    time.sleep(self.delay)
                    conn.sendall(b"354 go\r\n" if line[:4].upper() == b"DATA" else b"250 ok\r\n")


def test_a_delivery_cut_short_by_the_shutdown_timeout_is_logged_as_the_relays_doing(stack):
    with SlowUpstream(delay=1.2) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="2")
        with RawClient(relay.port) as c:
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(MSG + b".\r\n")
            assert wait_until(lambda: upstream.mail_commands or upstream.sessions, 5)
            relay.send_signal(signal.SIGTERM)
            assert relay.wait(10) == 0, relay.describe()
        line = relay.wait_for_log("event=forward.cancelled")
        assert line is not None and "the relay stopped" in line and "client closed" not in line, relay.describe()


class RefuseThenHangUpstream(ThreadedServer):
    """Takes the envelope at once, refuses the end of data after `refuse_after` seconds, then leaves the relay's
    RSET unanswered: a delivery that outlasts a shutdown's TIMEOUT after its end of data went upstream."""

    def __init__(self, refuse_after: float) -> None:
        super().__init__()
        self.refuse_after = refuse_after
        self.dot_seen = threading.Event()

    def session(self, conn) -> None:
        buffer, in_data = b"", False
        with conn, contextlib.suppress(OSError):
            for chunk in _received(conn, b"220 hang.test ESMTP\r\n"):
                buffer += chunk
                if in_data:
                    if b"\r\n.\r\n" not in buffer:
                        continue
                    buffer, in_data = buffer.split(b"\r\n.\r\n", 1)[1], False
                    self.dot_seen.set()
                    time.sleep(self.refuse_after)
                    conn.sendall(b"554 5.7.1 refused\r\n")
                while b"\r\n" in buffer and not in_data:
                    line, buffer = buffer.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    if verb == b"RSET":
                        time.sleep(8)  # no answer
                        return
                    in_data = verb == b"DATA"
                    conn.sendall(b"354 go\r\n" if in_data else b"250 ok\r\n")


def test_a_shutdown_past_timeout_cancels_a_delivery_finishing_for_a_client_already_gone(stack):
    # The client left (a reset) after its end of data went upstream: its delivery finishes on its own (see
    # test_relay_forwarding), but a shutdown past TIMEOUT cuts it as it cuts every connection, and says so
    # before it completes.
    with RefuseThenHangUpstream(refuse_after=1.5) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="2")
        c = RawClient(relay.port)
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        assert upstream.dot_seen.wait(5)
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
        time.sleep(0.2)
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(10) == 0, relay.describe()
    events = [line.split("event=")[1].split()[0] for line in relay.stdout.splitlines() if "event=" in line]
    assert "shutdown.timeout" in events, relay.describe()
    assert events.index("forward.cancelled") < events.index("shutdown.complete"), relay.describe()
    assert relay.wait_for_log("event=forward.cancelled", "the relay stopped") is not None, relay.describe()
    assert "Traceback" not in relay.all_output()
