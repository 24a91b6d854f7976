"""Hostile clients against the real relay process: smuggling, STARTTLS injection, over-long lines, NUL and invalid
UTF-8, SMTPUTF8, 1,000 recipients, the size limit to the byte, slowloris, a client that never reads, CR/LF
injection, malformed AUTH, relay tricks. Each: no crash, no hang, bounded memory, the right reply, and the next
client is served."""

from __future__ import annotations

import base64
import re
import socket
import time
import uuid

import pytest
from support.client import RawClient, plain_b64, send_data, transaction
from support.faults import open_fds, peak_rss_kb, rss_kb, settle
from support.net import wait_until
from support.relay import CLIENT_PASSWORD, CLIENT_USER

TIMEOUT = 2.0
MAX_SIZE = 64 * 1024
# The relay buffers a message (aiosmtpd keeps it in memory, about twice over); anything above this is a leak.
RSS_HEADROOM_KB = 48 * 1024


@pytest.fixture(scope="module")
def rig(module_stack):
    sink = module_stack.sink()
    relay = module_stack.relay(sink.port, TIMEOUT=str(TIMEOUT), MAX_MESSAGE_SIZE=str(MAX_SIZE), MAX_CONNECTIONS="20")
    for _ in range(3):  # warm up before the memory baseline
        assert _deliver(relay, sink)
    time.sleep(0.2)
    baseline = {"rss": rss_kb(relay.proc.pid), "fds": open_fds(relay.proc.pid)}
    yield relay, sink, baseline
    peak = peak_rss_kb(relay.proc.pid)
    assert peak < baseline["rss"] + RSS_HEADROOM_KB, f"relay peak RSS {peak} kB, baseline {baseline['rss']} kB"


def _deliver(relay, sink) -> bool:
    marker = uuid.uuid4().hex
    _, code, _ = transaction(
        relay.port, "sender@example.com", ["rcpt@example.com"], f"X-Case: {marker}\r\n\r\nok\r\n".encode()
    )
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if any(marker.encode() in m.data for m in sink.messages):
            return code == 250
        time.sleep(0.02)
    return False


@pytest.fixture
def healthy(rig):
    """After the test: the relay is alive, serves a fresh client, leaks no fds, and its memory is bounded."""
    relay, sink, baseline = rig
    yield relay, sink
    assert relay.returncode is None, relay.describe()
    assert _deliver(relay, sink), "the next client was not served"
    fds = settle(lambda: open_fds(relay.proc.pid), baseline["fds"], timeout=TIMEOUT + 3)
    assert fds <= baseline["fds"], f"fds {baseline['fds']} -> {fds}"
    assert rss_kb(relay.proc.pid) < baseline["rss"] + RSS_HEADROOM_KB
    assert "Traceback" not in relay.all_output(), relay.describe()


def _authed(relay, timeout: float = 10.0) -> RawClient:
    c = RawClient(relay.port, timeout=timeout)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.auth_plain()[0] == 235
    return c


def _envelope(c: RawClient, sender: str = "sender@example.com", rcpt: str = "rcpt@example.com") -> None:
    assert c.cmd(f"MAIL FROM:<{sender}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def _stored(sink, marker: str):
    return [m for m in sink.messages if marker.encode() in m.data]


def _silent(c: RawClient, seconds: float) -> bool:
    """True if the relay says nothing for `seconds` (it is still reading the message)."""
    c.sock.settimeout(seconds)
    try:
        chunk = c.sock.recv(1024)
    except TimeoutError:
        return True
    finally:
        c.sock.settimeout(c.timeout)
    c.buf += chunk
    return False


# -- SMTP smuggling ------------------------------------------------------------------------------------------

SMUGGLE_ENDS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLE_ENDS, ids=[repr(e)[2:-1] for e in SMUGGLE_ENDS])
def test_smuggling_fake_end_of_data_never_splits_the_message(healthy, fake_end):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    smuggled = (
        b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        b"From: ceo@example.com\r\nSubject: smuggled " + marker.encode() + b"\r\n\r\nsmuggled\r\n"
    )
    with _authed(relay) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(f"Subject: outer {marker}\r\n\r\nhello".encode() + fake_end + smuggled)
        assert _silent(c, 0.4), f"the relay answered after {fake_end!r}: it ended DATA there ({c.buf!r})"
        c.send(b"\r\n.\r\n")
        code, text = c.reply()
        assert code == 250, text
    stored = _stored(sink, marker)
    assert len(stored) == 1, "one message in, one message out"
    assert stored[0].mail_from == "sender@example.com" and stored[0].rcpt_tos == ["rcpt@example.com"]
    assert not [m for m in sink.messages if "victim@example.com" in m.rcpt_tos]


def test_commands_pipelined_after_end_of_data_get_one_reply_each(healthy):
    relay, sink = healthy
    m1, m2 = uuid.uuid4().hex, uuid.uuid4().hex
    with _authed(relay) as c:
        _envelope(c)
        c.send(
            f"DATA\r\nX-Case: {m1}\r\n\r\none\r\n.\r\nMAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.org>\r\n"
            f"DATA\r\nX-Case: {m2}\r\n\r\ntwo\r\n.\r\nQUIT\r\n".encode()
        )
        codes = [c.reply()[0] for _ in range(7)]
    assert codes == [354, 250, 250, 250, 354, 250, 221]
    assert len(_stored(sink, m1)) == 1 and len(_stored(sink, m2)) == 1
    assert _stored(sink, m2)[0].rcpt_tos == ["rcpt@example.org"]


def test_commands_sent_before_the_354_are_message_content_not_commands(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    with _authed(relay) as c:
        _envelope(c)
        c.send(f"DATA\r\nRCPT TO:<victim@example.com>\r\nX-Case: {marker}\r\n\r\nbody\r\n.\r\n".encode())
        assert c.reply()[0] == 354
        assert c.reply()[0] == 250
    (stored,) = _stored(sink, marker)
    assert stored.rcpt_tos == ["rcpt@example.com"]
    assert b"RCPT TO:<victim@example.com>\r\n" in stored.data


# -- STARTTLS command injection ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_relay(module_stack, tls, rig):
    _, sink, _ = rig
    return module_stack.relay(
        sink.port, USE_TLS="true", TLS_CERT_FILE=str(tls.cert_pem), TLS_KEY_FILE=str(tls.key_pem), TIMEOUT="3"
    )


def test_plaintext_pipelined_after_starttls_is_discarded(tls_relay, tls, rig):
    _, sink, _ = rig
    c = RawClient(tls_relay.port)
    try:
        assert c.cmd("EHLO client.test")[0] == 250
        injected = f"AUTH PLAIN {plain_b64(CLIENT_USER, CLIENT_PASSWORD)}\r\nMAIL FROM:<sender@example.com>\r\n"
        c.send("STARTTLS\r\n" + injected)
        code, _ = c.reply()
        assert code == 220
        c.sock = tls.client_ctx().wrap_socket(c.sock, server_hostname="localhost")
        code, text = c.cmd("EHLO client.test")
        assert code == 250 and "AUTH" in text, "the first reply after TLS must answer our EHLO"
        code, text = c.cmd("MAIL FROM:<sender@example.com>")
        assert code == 530, f"the injected AUTH was executed: {code} {text}"
        assert c.auth_plain()[0] == 235
        _envelope(c)
        marker = uuid.uuid4().hex
        assert send_data(c, f"X-Case: {marker}\r\n\r\nx\r\n".encode())[0] == 250
    finally:
        c.close()
    session_lines = [ln for ln in tls_relay.log_lines() if "event=auth " in ln and "outcome=success" in ln]
    assert len(session_lines) == 1
    assert len(_stored(sink, marker)) == 1


# -- over-long lines -------------------------------------------------------------------------------------------


def test_too_many_unknown_commands_close_the_connection_with_a_421(healthy):
    """aiosmtpd hangs up after 5 unknown commands; the reply that goes with a close must be a 421, not a 5xx."""
    relay, _ = healthy
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        for n in range(4):
            code, text = c.cmd(f"BOGUS{n}")
            assert code == 500 and "5.5.2" in text, (code, text)
        code, text = c.cmd("BOGUS4")
        assert (code, text.split()[0]) == (421, "4.7.0"), (code, text)
        assert c.closed_by_peer()
    assert wait_until(lambda: "421 4.7.0 Too many unrecognized commands" in relay.stdout, 5)


@pytest.mark.parametrize("length", [513, 4096, 2 * 1024 * 1024])
def test_over_long_command_line_is_refused_500_and_the_session_goes_on(healthy, length):
    relay, _ = healthy
    with RawClient(relay.port) as c:
        code, text = c.cmd("NOOP " + "A" * (length - 5))
        assert code == 500 and "5.5.2" in text, (code, text)
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("NOOP")[0] == 250


@pytest.mark.parametrize("where", ["header", "body", "unterminated-3MB"])
def test_over_long_message_line_is_refused_and_nothing_is_forwarded(healthy, where):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    if where == "header":
        body = f"X-Case: {marker}\r\nSubject: {'x' * 2000}\r\n\r\nbody\r\n".encode()
    elif where == "body":
        body = f"X-Case: {marker}\r\n\r\n{'y' * 1100}\r\n".encode()
    else:
        body = f"X-Case: {marker}\r\n\r\n".encode() + b"z" * (3 * 1024 * 1024) + b"\r\n"
    with _authed(relay) as c:
        _envelope(c)
        code, text = send_data(c, body)
        assert code // 100 == 5, (code, text)
        assert c.cmd("RSET")[0] == 250
    time.sleep(0.2)
    assert not _stored(sink, marker)


# -- NUL, invalid UTF-8, SMTPUTF8 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"EHLO a\x00b",
        b"MAIL FROM:<sen\x00der@example.com>",
        b"MAIL FROM:<sender@example.com\x00.evil.test>",
        b"MAIL FROM:<\xff\xfe@example.com>",
        b"MAIL FROM:<sender@ex\xc3\x28ample.com>",
        b"MAIL FROM:<\xce\xb4\xce\xbf\xce\xba@example.com>",  # UTF-8, but without SMTPUTF8: 553 5.6.7
        b"MAIL FROM:<sender@b\xc3\xbccher.example>",
        b"MA\x00IL FROM:<sender@example.com>",
        b"\xff\xfe\xfd",
    ],
)
def test_nul_invalid_utf8_and_smtputf8_in_commands_are_refused_cleanly(healthy, line):
    relay, sink = healthy
    before = len(sink.messages)
    with _authed(relay) as c:
        code, text = c.cmd(line)
        if line.startswith(b"EHLO"):
            assert code in (250, 501, 500), (code, text)
            return
        assert code // 100 == 5, (line, code, text)
        # the session is still in a sane state: a clean envelope works
        _envelope(c)
        assert send_data(c, b"Subject: after\r\n\r\nok\r\n")[0] == 250
    assert len(sink.messages) == before + 1
    assert all("\x00" not in m.mail_from for m in sink.messages)


def test_an_smtputf8_sender_with_smtputf8_is_taken(healthy):
    """SMTPUTF8 is offered (RFC 6531): see test_smtputf8.py for where such mail goes."""
    relay, _ = healthy
    with _authed(relay) as c:
        assert c.cmd("MAIL FROM:<\u03b4\u03bf\u03ba@example.com> SMTPUTF8".encode())[0] == 250
        assert c.cmd("RSET")[0] == 250


def test_nul_in_recipient_is_refused(healthy):
    relay, _ = healthy
    with _authed(relay) as c:
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd(b"RCPT TO:<rcpt\x00@example.com>")[0] // 100 == 5
        assert c.cmd(b"RCPT TO:<rcpt@example.com\x00evil.test>")[0] // 100 == 5


def test_nul_and_invalid_utf8_in_headers_are_passed_through_byte_for_byte(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    body = f"X-Case: {marker}\r\n".encode() + b"Subject: a\x00b \xff\xfe \xc3\x28\r\n\r\nbody \x00 \xff\r\n"
    with _authed(relay) as c:
        _envelope(c)
        code, text = send_data(c, body)
    stored = _stored(sink, marker)
    if code == 250:
        assert len(stored) == 1 and stored[0].data.endswith(body)
    else:
        assert code // 100 == 5 and not stored, (code, text)


# -- recipients and size ---------------------------------------------------------------------------------------


def test_1000_recipients_are_taken_and_the_1001st_gets_452(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    with _authed(relay, timeout=30) as c:
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        c.send("".join(f"RCPT TO:<r{i}@example.com>\r\n" for i in range(1001)))
        codes = [c.reply()[0] for _ in range(1001)]
        assert codes[:1000] == [250] * 1000
        assert codes[1000] == 452
        assert send_data(c, f"X-Case: {marker}\r\n\r\nmany\r\n".encode())[0] == 250
    (stored,) = _stored(sink, marker)
    assert len(stored.rcpt_tos) == 1000
    # Logged as the other recipient refusals are: the address and a reason.
    line = relay.wait_for_log("event=rcpt.refused", "recipient=r1000@example.com", "reason=too_many_recipients")
    assert line is not None, relay.describe()


def _sized(marker: str, size: int) -> bytes:
    """DATA bytes of a message of exactly `size` bytes as RFC 1870 counts it: CRLFs included; the dot the client
    doubled (one line here starts with a dot) and the terminating '.<CR><LF>' excluded."""
    head = f"X-Case: {marker}\r\n\r\n..stuffed line\r\n".encode()
    lines = [head]
    left = size - (len(head) - 1)
    while left > 0:
        n = min(998, left - 2) if left >= 3 else None
        if n is None:  # 1 or 2 bytes left: shorten the previous line
            prev = lines.pop()
            lines.append(prev[: len(prev) - 2 - (3 - left)] + b"\r\n")
            left = 3
            continue
        lines.append(b"s" * n + b"\r\n")
        left -= n + 2
    data = b"".join(lines)
    assert len(data) == size + 1
    return data


@pytest.mark.parametrize("extra", [0, 1], ids=["exactly-MAX_MESSAGE_SIZE", "one-byte-over"])
def test_message_of_exactly_max_message_size_passes_and_one_byte_more_is_refused(healthy, extra):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    data = _sized(marker, MAX_SIZE + extra)
    with _authed(relay) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\n")
        code, text = c.reply()
    stored = _stored(sink, marker)
    if extra == 0:
        assert code == 250, text
        assert len(stored) == 1
        assert stored[0].data.endswith(data.replace(b"\r\n..stuffed", b"\r\n.stuffed"))
    else:
        assert code == 552 and "5.3.4" in text, (code, text)
        assert not stored


def test_a_message_over_the_limit_in_one_long_line_is_refused_as_too_big(healthy):
    """Too big (552) although its line also grew too long before the size limit was crossed."""
    relay, sink = healthy
    marker = uuid.uuid4().hex
    with _authed(relay) as c:
        _envelope(c)
        code, text = send_data(c, f"X-Case: {marker}\r\n\r\n".encode() + b"x" * (MAX_SIZE + 10) + b"\r\n")
        assert (code, text.split()[0]) == (552, "5.3.4"), (code, text)
        assert c.cmd("RSET")[0] == 250
    assert relay.wait_for_log("event=data.refused", "MAX_MESSAGE_SIZE")
    assert not _stored(sink, marker)


def test_30mb_message_against_a_64k_limit_is_refused_with_bounded_memory(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    with _authed(relay, timeout=60) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        line = b"b" * 998 + b"\r\n"
        c.send(f"X-Case: {marker}\r\n\r\n".encode())
        for _ in range(30 * 1024):
            c.send(line)
        c.send(b".\r\n")
        code, text = c.reply()
    assert code == 552, text
    assert not _stored(sink, marker)


# -- slow and deaf clients ---------------------------------------------------------------------------------------


def test_client_sending_byte_by_byte_is_served(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    script = (
        f"EHLO slow.test\r\nAUTH PLAIN {plain_b64(CLIENT_USER, CLIENT_PASSWORD)}\r\n"
        f"MAIL FROM:<sender@example.com>\r\nRCPT TO:<rcpt@example.com>\r\nDATA\r\n"
        f"X-Case: {marker}\r\n\r\nslow\r\n.\r\nQUIT\r\n"
    ).encode()
    with RawClient(relay.port) as c:
        for i in range(len(script)):
            c.send(script[i : i + 1])
            time.sleep(0.002)
        codes = [c.reply()[0] for _ in range(7)]
    assert codes == [250, 235, 250, 250, 354, 250, 221]
    assert len(_stored(sink, marker)) == 1


def _dribble(c: RawClient, piece: bytes, every: float, seconds: float) -> float | None:
    """Send `piece` every `every` seconds for up to `seconds`; when the relay closed the connection (seconds from
    the start), or None if it did not."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        try:
            c.send(piece)
        except OSError:
            return time.monotonic() - started
        if c.closed_by_peer(every):
            return time.monotonic() - started
    return None


@pytest.mark.parametrize("phase", ["command", "data"])
def test_slowloris_dribbling_forever_is_disconnected_within_timeout(healthy, phase):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _authed(relay)
    try:
        if phase == "data":
            _envelope(c)
            assert c.cmd("DATA")[0] == 354
            c.send(f"X-Case: {marker}\r\n".encode())
        closed_after = _dribble(c, b"x", every=0.25, seconds=TIMEOUT * 4)
        assert closed_after is not None, "a client dribbling one byte at a time was never disconnected"
        assert closed_after < TIMEOUT + 1.5, closed_after
    finally:
        c.close()
    assert not _stored(sink, marker)


def _in_data(relay) -> RawClient:
    """A logged-in client whose DATA was just answered 354."""
    c = _authed(relay)
    _envelope(c)
    assert c.cmd("DATA")[0] == 354
    return c


def _dribble_body(c: RawClient, marker: str, piece: int, every: float, seconds: float) -> float | None:
    """After DATA: send body lines of `piece` bytes every `every` seconds for `seconds` (see `_dribble`)."""
    c.send(f"X-Case: {marker}\r\n\r\n".encode())
    return _dribble(c, b"y" * (piece - 2) + b"\r\n", every, seconds)


def test_slow_but_steady_body_outlasting_timeout_is_delivered(healthy):
    """TIMEOUT is an idle timeout: a large message on a slow link (here about 1.6 KB/s, over 3 x TIMEOUT) that
    keeps coming is not cut off for taking longer than TIMEOUT as a whole."""
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _in_data(relay)
    try:
        assert _dribble_body(c, marker, piece=400, every=0.25, seconds=TIMEOUT * 3) is None
        c.send(b".\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    assert len(_stored(sink, marker)) == 1


def test_body_below_the_minimum_rate_is_cut_off(healthy):
    """A body trickling in below MIN_DATA_RATE (here 200 bytes/s) is cut off with 421 once its first TIMEOUT and
    the time its bytes earned are spent (2 s + 200 t / 500 s: about 3.3 s), and the reason is logged."""
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _in_data(relay)
    try:
        closed_after = _dribble_body(c, marker, piece=50, every=0.25, seconds=TIMEOUT * 4)
        assert closed_after is not None, "a body coming at 200 bytes/s was never cut off"
        assert TIMEOUT < closed_after < TIMEOUT * 2 + 1, closed_after
        assert b"421 4.4.2 Message data too slow" in c.buf
    finally:
        c.close()
    assert not _stored(sink, marker)
    assert wait_until(lambda: 'reason="DATA slower than 500 bytes/s"' in relay.stdout, 5), relay.describe()


def test_body_that_stops_coming_is_cut_off_after_timeout(healthy):
    """A client that sends part of a body and then nothing is cut off TIMEOUT after its last bytes, with the
    idle timeout's 421, also after it sent fast."""
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _in_data(relay)
    try:
        c.send(f"X-Case: {marker}\r\n\r\n".encode() + (b"z" * 998 + b"\r\n") * 30)  # 30 KB: at most TIMEOUT
        last = time.monotonic()
        assert c.closed_by_peer(TIMEOUT * 3), "a body that stopped coming was never cut off"
        assert TIMEOUT - 0.5 < time.monotonic() - last < TIMEOUT + 1.5
        assert b"421 4.4.2 Idle timeout" in c.buf
    finally:
        c.close()
    assert not _stored(sink, marker)
    assert wait_until(lambda: 'reason="no data for TIMEOUT during DATA"' in relay.stdout, 5), relay.describe()


def test_a_burst_earns_no_more_than_timeout_for_a_body_dribbled_after_it(healthy):
    """Time earned by sending fast is capped at TIMEOUT (as Postfix caps it): a 60 KB burst (2 minutes at
    500 bytes/s) then a byte every 0.3 s is cut off about TIMEOUT after the burst, not minutes later."""
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _in_data(relay)
    try:
        c.send(f"X-Case: {marker}\r\n\r\n".encode() + (b"b" * 998 + b"\r\n") * 60)
        closed = _dribble(c, b"x", every=0.3, seconds=TIMEOUT * 4)
        assert closed is not None, "a body dribbled after a burst was never cut off"
        assert closed < TIMEOUT + 1.5, closed
        assert b"421 4.4.2 Message data too slow" in c.buf
    finally:
        c.close()
    assert not _stored(sink, marker)


def test_client_that_never_reads_replies_is_held_back_and_cut_off(healthy, rig):
    relay, _, baseline = rig
    sock = socket.create_connection(("127.0.0.1", relay.port), timeout=5)
    ended = f"event=disconnect session=\\S+ peer=127.0.0.1:{sock.getsockname()[1]} "
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    chunk = b"NOOP\r\n" * 2000
    sent = 0
    blocked_at = None
    started = time.monotonic()
    try:
        while time.monotonic() - started < TIMEOUT * 4:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                if blocked_at is None:
                    blocked_at = sent
                time.sleep(0.05)
            except OSError:
                break
        # the relay stopped reading (back pressure): what we could push is bounded by socket buffers
        assert blocked_at is not None, f"sent {sent} bytes without ever being held back"
        assert sent < 64 * 1024 * 1024
        assert rss_kb(relay.proc.pid) < baseline["rss"] + RSS_HEADROOM_KB
        with RawClient(relay.port) as other:
            assert other.cmd("NOOP")[0] == 250
        # ... and cut off while this client still holds its end open: after the idle timeout the relay lets go of
        # the connection, at once if its 421 and the replies before it fit in the socket buffers, else (the close
        # cannot finish while they wait to be read) aborted one more TIMEOUT later.
        assert wait_until(lambda: re.search(ended, relay.stdout), TIMEOUT * 4), relay.describe()
        assert settle(lambda: open_fds(relay.proc.pid), baseline["fds"], timeout=TIMEOUT * 2) <= baseline["fds"]
    finally:
        sock.close()


# -- injection through arguments -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<sender@example.com>\rRCPT TO:<victim@evil.test>",
        b"MAIL FROM:<sender@example.com\r\nRCPT TO:<victim@evil.test>>",
        b"MAIL FROM:<sender@example.com\nRCPT TO:<victim@evil.test>>",
        b"MAIL FROM:<sender@example.com> BODY=8BITMIME\rRSET",
    ],
)
def test_cr_lf_inside_address_arguments_injects_nothing_upstream(healthy, line):
    relay, sink = healthy
    before = len(sink.messages)
    with _authed(relay) as c:
        c.send(line + b"\r\nHELP\r\n")
        replies = []
        while not replies or "Supported commands" not in replies[-1][1]:
            replies.append(c.reply())  # bounded: RawClient times out; at most a few lines were sent
            assert len(replies) <= 4, replies
        # However the line was split (a CR/LF ends a command line), the evil recipient was never accepted.
        assert not [text for _, text in replies if "2.1.5" in text], replies
        assert c.cmd("RSET")[0] == 250
        _envelope(c)
        assert send_data(c, b"Subject: inj\r\n\r\nx\r\n")[0] == 250
    new = sink.messages[before:]
    assert len(new) == 1
    for m in new:
        assert m.mail_from == "sender@example.com", m.mail_from
        assert m.rcpt_tos == ["rcpt@example.com"]
    assert not [m for m in sink.messages if "victim@evil.test" in m.rcpt_tos]
    for ln in relay.log_lines():
        assert not ln.startswith("RCPT") and not ln.startswith("RSET"), ln


def test_cr_lf_inside_auth_cannot_forge_a_log_line_or_log_in(healthy):
    relay, _ = healthy
    forged = "level=INFO event=auth outcome=success user=admin"
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        blob = base64.b64encode(f"\0{CLIENT_USER}\r\n{forged}\0wrong\r\n".encode()).decode()
        assert c.cmd(f"AUTH PLAIN {blob}")[0] == 535
    time.sleep(0.2)
    assert not [ln for ln in relay.log_lines() if ln.startswith(forged) or ln.startswith("level=")]
    assert not [ln for ln in relay.log_lines() if "user=admin" in ln and "outcome=success" in ln and "\\r" not in ln]


@pytest.mark.parametrize(
    "exchange",
    [
        ["AUTH PLAIN !!!not-base64!!!"],
        ["AUTH PLAIN AAAA"],
        ["AUTH PLAIN " + base64.b64encode(b"only-one-part").decode()],
        ["AUTH PLAIN ="],
        ["AUTH LOGIN", "@@@"],
        ["AUTH LOGIN " + base64.b64encode(CLIENT_USER.encode()).decode(), "%%%"],
        ["AUTH CRAM-MD5"],
        ["AUTH"],
        ["AUTH PLAIN " + "A" * 480],
    ],
)
def test_malformed_auth_is_refused_and_the_session_goes_on(healthy, exchange):
    relay, _ = healthy
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code = 0
        for line in exchange:
            code, text = c.cmd(line)
            if code != 334:
                break
        assert code // 100 in (5,), (exchange, code, text)
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 530
        assert c.auth_plain()[0] == 235


@pytest.mark.parametrize(
    ("command", "address"),
    [
        ("MAIL FROM", "user%evil.test@example.com"),
        ("MAIL FROM", "evil.test!user@example.com"),
        ("MAIL FROM", '"user@evil.test"@example.com'),
        ("MAIL FROM", "@example.com:user@evil.test"),
        ("RCPT TO", "victim%evil.test@example.com"),
        ("RCPT TO", "evil.test!victim@example.com"),
        ("RCPT TO", '"victim@evil.test"@example.com'),
        ("RCPT TO", "@example.com:victim@evil.test"),
        ("RCPT TO", "@example.com,@example.org:victim@evil.test"),
        ("RCPT TO", '"victim%evil.test"@example.com'),
        ("RCPT TO", "victim@[127.0.0.1]"),
    ],
)
def test_relay_tricks_are_refused_and_nothing_is_forwarded(healthy, command, address):
    relay, sink = healthy
    before = len(sink.messages)
    with _authed(relay) as c:
        if command == "RCPT TO":
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        code, text = c.cmd(f"{command}:<{address}>")
        assert code // 100 == 5, (address, code, text)
        if command == "RCPT TO":
            assert send_data(c, b"Subject: t\r\n\r\nx\r\n")[0] // 100 == 5
    time.sleep(0.1)
    assert len(sink.messages) == before
