"""Brute force and floods: failed logins from one address are slowed, then refused with 421 for
AUTH_LOCKOUT_SECONDS, each failure logged at WARNING, while another address logs in at once; connections past
MAX_CONNECTIONS get 421 and do not starve the clients being served."""

from __future__ import annotations

import base64
import socket
import threading
import time
import uuid

from support.client import RawClient, plain_b64, send_data, transaction
from support.faults import open_fds, record, settle
from support.relay import CLIENT_PASSWORD, CLIENT_USER


class SourcedClient(RawClient):
    """RawClient bound to a local source address (127.0.0.2 is another client on Linux loopback)."""

    def __init__(self, port: int, source: str, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.buf = b""
        self.greeting = self.reply()


def _timed_auth(c: RawClient, password: str) -> tuple[int, float]:
    started = time.monotonic()
    code, _ = c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, password))
    return code, time.monotonic() - started


def test_failed_logins_are_slowed_then_locked_out_421_while_another_address_logs_in(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, AUTH_MAX_FAILURES="4", AUTH_LOCKOUT_SECONDS="3")
    delays = []
    with SourcedClient(relay.port, "127.0.0.1") as c:
        assert c.cmd("EHLO attacker.test")[0] == 250
        for _ in range(4):
            code, took = _timed_auth(c, "wrong-password")
            assert code == 535
            delays.append(took)
        # locked out now: even the right password gets 421 and the connection is closed
        code, _ = _timed_auth(c, CLIENT_PASSWORD)
        assert code == 421
        assert c.closed_by_peer(3)
    # slowed: each failure makes the next answer later (0.25 s per failure)
    assert delays[0] < 0.2 and delays[1] >= 0.2 and delays[2] >= 0.45 and delays[3] >= 0.7, delays

    # a new connection from the locked-out address: 421 at once, whatever the password
    with SourcedClient(relay.port, "127.0.0.1") as c:
        assert c.cmd("EHLO attacker.test")[0] == 250
        code, took = _timed_auth(c, CLIENT_PASSWORD)
        assert code == 421 and took < 0.5

    # another address is not affected: logs in at once and delivers
    with SourcedClient(relay.port, "127.0.0.2") as c:
        assert c.cmd("EHLO good.test")[0] == 250
        code, took = _timed_auth(c, CLIENT_PASSWORD)
        assert code == 235 and took < 0.2, (code, took)
        marker = uuid.uuid4().hex
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert send_data(c, f"X-Case: {marker}\r\n\r\nx\r\n".encode())[0] == 250

    failures = [ln for ln in relay.log_lines() if "event=auth " in ln and "outcome=failure" in ln]
    assert len(failures) == 4 and all("level=WARNING" in ln for ln in failures), failures
    assert relay.wait_for_log("level=WARNING", "event=auth.lockout", "address=127.0.0.1")
    assert CLIENT_PASSWORD not in relay.all_output() and "wrong-password" not in relay.all_output()

    # after AUTH_LOCKOUT_SECONDS the address may log in again
    time.sleep(3.2)
    with SourcedClient(relay.port, "127.0.0.1") as c:
        assert c.cmd("EHLO attacker.test")[0] == 250
        assert _timed_auth(c, CLIENT_PASSWORD)[0] == 235
    record("bruteforce", "lockout", passed=True, failures_before_lockout=4, delays=[round(d, 2) for d in delays])


def test_auth_login_failures_count_too(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, AUTH_MAX_FAILURES="2", AUTH_LOCKOUT_SECONDS="30")

    with SourcedClient(relay.port, "127.0.0.3") as c:
        assert c.cmd("EHLO x")[0] == 250
        for _ in range(2):
            assert c.cmd("AUTH LOGIN")[0] == 334
            assert c.cmd(base64.b64encode(CLIENT_USER.encode()))[0] == 334
            assert c.cmd(base64.b64encode(b"nope"))[0] == 535
        assert c.cmd("AUTH LOGIN")[0] == 421


def test_connection_flood_past_max_connections_gets_421_and_served_clients_go_on(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, MAX_CONNECTIONS="5", TIMEOUT="5")
    pid = relay.proc.pid
    warm = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], b"Subject: warm\r\n\r\nx\r\n")
    assert warm[1] == 250  # the upstream session (pooled) is open before the baseline
    time.sleep(0.2)
    baseline_fds = open_fds(pid)
    served = [RawClient(relay.port) for _ in range(4)]
    for c in served:
        assert c.cmd("EHLO served.test")[0] == 250
        assert c.auth_plain()[0] == 235
    stop = threading.Event()
    outcomes: dict[str, int] = {"refused_421": 0, "other": 0}
    lock = threading.Lock()

    def flood() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as s:
                    s.settimeout(5)
                    data = s.recv(256)
            except OSError:
                data = b""
            with lock:
                outcomes["refused_421" if data.startswith(b"421 4.7.0") else "other"] += 1

    # one slot is left for a newcomer; the flood takes it over and over, so fill it first
    extra = RawClient(relay.port)
    assert extra.cmd("EHLO served.test")[0] == 250
    served.append(extra)
    floods = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in floods:
        t.start()
    try:
        time.sleep(0.3)
        latencies = []
        for c in served:
            if c is extra:
                assert c.auth_plain()[0] == 235
            marker = uuid.uuid4().hex
            started = time.monotonic()
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
            assert send_data(c, f"X-Case: {marker}\r\n\r\nflood\r\n".encode())[0] == 250
            latencies.append(time.monotonic() - started)
    finally:
        stop.set()
        for t in floods:
            t.join(10)
        for c in served:
            c.close()
    assert outcomes["refused_421"] >= 50, outcomes
    assert outcomes["other"] == 0, outcomes
    assert max(latencies) < 2.0, latencies
    # after the flood: a newcomer is served (once the relay has seen the closed sessions go) and nothing leaked
    deadline = time.monotonic() + 5
    while not _served_newcomer(relay.port):
        assert time.monotonic() < deadline, "no newcomer served within 5 s after the flood"
        time.sleep(0.05)
    fds = settle(lambda: open_fds(pid), baseline_fds, timeout=5)
    assert fds <= baseline_fds, (baseline_fds, fds)
    record("bruteforce", "connection-flood", passed=True, refused=outcomes["refused_421"], max_latency=max(latencies))


def _served_newcomer(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            greeting = s.recv(256)
            if not greeting.startswith(b"220"):
                return False
            s.sendall(b"EHLO after.test\r\n")
            return s.recv(4096).startswith(b"250")
    except OSError:
        return False


def test_clients_that_connect_and_hang_up_at_once_do_not_hold_connection_slots(stack):
    # TCP health checks, load balancer probes and port scanners connect and close before reading the greeting.
    # Each must give its MAX_CONNECTIONS slot back at once, not after TIMEOUT: otherwise a few of them lock every
    # real client out (421) for a minute.
    upstream = stack.sink()
    relay = stack.relay(upstream.port, MAX_CONNECTIONS="3", TIMEOUT="30")
    for _ in range(3):
        for _ in range(6):
            socket.create_connection(("127.0.0.1", relay.port), timeout=5).close()
        deadline = time.monotonic() + 3
        while True:
            with RawClient(relay.port) as c:
                if c.greeting[0] == 220:
                    assert c.cmd("EHLO served.test")[0] == 250
                    break
                assert c.greeting[0] == 421, c.greeting
            assert time.monotonic() < deadline, "probes still hold the connection slots:\n" + relay.describe()
            time.sleep(0.05)
    assert relay.wait_for_log("event=disconnect", "duration=0.0"), relay.describe()


def test_commands_pipelined_behind_a_421_get_no_reply_and_no_log_line(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, AUTH_MAX_FAILURES="1", AUTH_LOCKOUT_SECONDS="30")
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO attacker.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, "wrong"))[0] == 535  # now locked out
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO attacker.test")[0] == 250
        good = plain_b64(CLIENT_USER, CLIENT_PASSWORD)
        c.send(f"AUTH PLAIN {good}\r\nMAIL FROM:<a@example.com>\r\nNOOP\r\nQUIT\r\n".encode())
        assert c.reply()[0] == 421
        assert c.closed_by_peer(5)
    assert relay.wait_for_log("event=disconnect", f"peer={peer}"), relay.describe()
    events = [ln.split("event=")[1].split()[0] for ln in relay.log_lines() if f"peer={peer}" in ln]
    assert events == ["connect", "auth.refused", "disconnect"], events


def test_auth_lockout_seconds_0_locks_nobody_out_and_logs_no_lockout(stack):
    relay = stack.relay(stack.sink().port, AUTH_MAX_FAILURES="1", AUTH_LOCKOUT_SECONDS="0")
    for _ in range(3):
        with RawClient(relay.port) as c:
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain(CLIENT_USER, "wrong")[0] == 535
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
    assert relay.wait_for_log("event=auth", "outcome=success")
    assert "event=auth.lockout" not in relay.stdout, relay.describe()
