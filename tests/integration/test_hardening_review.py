"""Findings of an independent review, each pinned by a test against the real relay: a client that vanishes while
the upstream stalls leaves no upstream socket behind, logins sent at once on many connections cannot get around the
lockout, parser crashes and source-route spellings get a permanent refusal, and an upstream's 421 or its demand for
authentication are answered as the relay's transient fault, and clients that reset right after their final dot
end quietly."""

from __future__ import annotations

import socket
import struct
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from support.client import RawClient, plain_b64, send_data, transaction
from support.faults import FaultUpstream, open_sockets, settle
from support.net import wait_until
from support.relay import CLIENT_PASSWORD, CLIENT_USER

MSG = b"Subject: review\r\n\r\nbody\r\n"


@pytest.mark.parametrize("step", ["ehlo", "mail"])
def test_client_vanishing_while_the_upstream_stalls_leaves_no_upstream_socket(stack, step):
    upstream = FaultUpstream(hang_limit=20).start()
    try:
        relay = stack.relay(upstream.port, RELAY_USE_TLS="false", TIMEOUT="6")
        assert transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)[1] == 250  # warm up
        time.sleep(0.3)
        baseline = open_sockets(relay.proc.pid)
        upstream.set_fault(step, "hang")
        for _ in range(3):
            c = RawClient(relay.port)
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(f"X-Case: {uuid.uuid4().hex}\r\n\r\nx\r\n.\r\n")
            time.sleep(0.5)  # the relay is now waiting on the stalled upstream
            c.close()
        # Well before TIMEOUT would end the upstream wait: the cancelled deliveries closed their sockets.
        assert settle(lambda: open_sockets(relay.proc.pid), baseline, timeout=3) <= baseline, relay.describe()
    finally:
        upstream.stop()


def test_logins_sent_at_once_cannot_get_around_the_lockout(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, AUTH_MAX_FAILURES="3", AUTH_LOCKOUT_SECONDS="60")
    clients = [RawClient(relay.port) for _ in range(12)]
    for c in clients:
        assert c.cmd("EHLO client.test")[0] == 250
    codes: list[int] = []
    lock = threading.Lock()

    def attempt(c: RawClient) -> None:
        try:
            code = c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, "wrong-password"))[0]
        except (OSError, ConnectionError, TimeoutError):
            code = 0
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=attempt, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in clients:
        c.close()
    assert codes.count(235) == 0
    # The address is locked: even the right password, on a fresh connection, is not accepted.
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.auth_plain(CLIENT_USER, CLIENT_PASSWORD)
        assert code in (421, 535), (code, text)
    evaluated = relay.stdout.count("outcome=failure")
    assert evaluated <= 3, f"{evaluated} wrong passwords were checked; the lockout allows 3"


@pytest.mark.parametrize("arg", ["<", "<<>", "<(", "<a@b@>"])
def test_address_the_parser_chokes_on_is_refused_permanently_without_an_internal_error(stack, arg):
    upstream = stack.sink()
    relay = stack.relay(upstream.port)
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        code, text = c.cmd(f"MAIL FROM:{arg}")
        assert 500 <= code < 600, (code, text)
        assert c.cmd("NOOP")[0] == 250
    assert "internal.error" not in relay.all_output()


@pytest.mark.parametrize("rcpt", ["< @evil.test:b@example.com>", "<(c)@evil.test:b@example.com>"])
def test_source_routes_spelled_with_spaces_or_comments_are_refused(stack, rcpt):
    upstream = stack.sink()
    relay = stack.relay(upstream.port)
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = c.cmd(f"RCPT TO:{rcpt}")
        assert code == 553 and "5.7.1" in text, (code, text)
        assert send_data(c, MSG)[0] == 554
    assert upstream.messages == []


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("421 4.3.2 Service shutting down", 451), ("530 5.7.0 Authentication required", 530)],
    ids=["421", "530"],
)
def test_upstream_closing_or_demanding_auth_at_mail(stack, reply, expected):
    # A 421 closes the upstream's session only (the client's goes on): 451. A 530 is the upstream's 5xx, passed
    # on; that the relay must log in is its operator's to fix, which an ERROR line says.
    upstream = stack.sink()
    upstream.configure(mail_reply=reply)
    relay = stack.relay(upstream.port)
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert (stage, code) == ("DATA", expected), (stage, code, text)
    if expected == 530:
        assert relay.wait_for_log("level=ERROR", "event=forward.failed", "RELAY_USERNAME"), relay.describe()
        # The same at a recipient: the relay's login, not the recipient, is what the operator must fix.
        upstream.configure(refuse_rcpt={"rcpt@example.com": reply})
        stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
        assert code == 530, (stage, code, text)
        lines = [ln for ln in relay.log_lines() if "event=forward.failed" in ln and "RELAY_USERNAME" in ln]
        assert len(lines) == 2 and lines[-1].split()[1] == "level=ERROR", lines
    upstream.configure()
    assert transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)[1] == 250


def test_clients_resetting_right_after_their_final_dot_end_quietly(stack):
    # A client that resets its connection just as the upstream accepts its message: the relay cannot send the 250
    # any more. That is logged (reply.lost, disconnect), never as an ERROR with a traceback from the session's
    # task; every session still ends, and the relay goes on relaying.
    upstream = stack.sink()
    relay = stack.relay(upstream.port, MAX_CONNECTIONS="64", TIMEOUT="10")

    def reset_after_dot(i: int) -> None:
        c = RawClient(relay.port)
        try:
            assert c.cmd("EHLO resetter.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd(f"RCPT TO:<r{i}@example.com>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            c.send(MSG + b".\r\n")
            time.sleep((i % 7) / 1000)  # 0-6 ms: around the moment the upstream's reply comes back
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            c.close()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(reset_after_dot, range(240)))
    assert transaction(relay.port, "sender@example.com", ["after@example.com"], MSG)[1] == 250

    # Every session ends: as many disconnect lines as connect lines (the last ones may take a moment).
    def all_ended() -> bool:
        out = relay.stdout
        return out.count("event=connect ") >= 242 and out.count("event=disconnect") == out.count("event=connect ")

    assert wait_until(all_ended, 10, interval=0.1), relay.describe()
    output = relay.all_output()
    assert "Traceback" not in output and "never retrieved" not in output, relay.describe()
