"""The DATA path end to end (the real relay process, an aiosmtpd sink): bodies read in large pieces and spooled,
sent upstream as received; smuggling, pipelining, dots, 8-bit, limits, long lines, 10 MB, no descriptor leak."""

from __future__ import annotations

import hashlib
import time
import uuid

import pytest
from support.client import RawClient, send_data
from support.faults import open_fds, settle

TIMEOUT = 4.0
MAX_SIZE = 12 * 1024 * 1024


@pytest.fixture(scope="module")
def rig(module_stack):
    sink = module_stack.sink()
    relay = module_stack.relay(sink.port, TIMEOUT=str(TIMEOUT), MAX_MESSAGE_SIZE=str(MAX_SIZE), MAX_CONNECTIONS="20")
    with _authed(relay) as c:  # warm up (imports, pool) before the descriptor baseline
        _envelope(c)
        assert send_data(c, b"Subject: warm-up\r\n\r\nok\r\n")[0] == 250
    time.sleep(0.2)
    return relay, sink, open_fds(relay.proc.pid)


@pytest.fixture
def healthy(rig):
    """After the test: the relay is alive, holds no extra descriptor (spool files closed), wrote no traceback."""
    relay, sink, fds = rig
    yield relay, sink
    assert relay.returncode is None, relay.describe()
    after = settle(lambda: open_fds(relay.proc.pid), fds, timeout=TIMEOUT + 3)
    assert after <= fds, f"descriptors {fds} -> {after}: a spool file or socket leaked"
    assert "Traceback" not in relay.all_output(), relay.describe()


def _authed(relay, timeout: float = 30.0) -> RawClient:
    c = RawClient(relay.port, timeout=timeout)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.auth_plain()[0] == 235
    return c


def _envelope(c: RawClient, rcpt: str = "rcpt@example.com") -> None:
    assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def _stored(sink, marker: str, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in sink.messages if marker.encode() in m.data]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


def _content(stored) -> bytes:
    """The message without the relay's Received: header (its first three lines)."""
    data = stored.data
    assert data.startswith(b"Received: from ")
    return data.split(b"\r\n", 3)[3]


# -- smuggling and pipelining ----------------------------------------------------------------------------------

SMUGGLE = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\n.\r", b"\n..\n", b"\r\n..\r\n"]


@pytest.mark.parametrize("fake_end", SMUGGLE, ids=[repr(e)[2:-1] for e in SMUGGLE])
def test_fake_end_of_data_reaches_the_upstream_as_one_message_with_crlf_lines(healthy, fake_end):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    mails_before = len(sink.mail_commands)
    smuggled = b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\nSubject: smuggled\r\n"
    body = f"X-Case: {marker}\r\n\r\nhello".encode() + fake_end + smuggled
    with _authed(relay) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(body + b"\r\n.\r\n")  # one write: the relay sees the fake end and the real one together
        code, text = c.reply()
        assert code == 250, text
        assert c.cmd("NOOP")[0] == 250
    (stored,) = _stored(sink, marker)
    assert stored.rcpt_tos == ["rcpt@example.com"]
    assert len(sink.mail_commands) == mails_before + 1, "the upstream saw one MAIL: the attacker's never"
    assert not [m for m in sink.messages if "victim@example.com" in m.rcpt_tos]
    content = _content(stored)
    assert b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<victim@example.com>\r\n" in content, "kept as text"
    assert b"\r" not in content.replace(b"\r\n", b"") and b"\n" not in content.replace(b"\r\n", b"")


def test_commands_pipelined_right_after_a_large_body_stay_for_the_next_command(healthy):
    relay, sink = healthy
    m1, m2 = uuid.uuid4().hex, uuid.uuid4().hex
    big = b"".join(b"%06d " % i + b"x" * 90 + b"\r\n" for i in range(3000))  # ~290 KB: several reads
    with _authed(relay) as c:
        _envelope(c)
        c.send(
            b"DATA\r\nX-Case: " + m1.encode() + b"\r\n\r\n" + big + b".\r\nMAIL FROM:<sender@example.com>\r\n"
            b"RCPT TO:<rcpt@example.org>\r\nDATA\r\nX-Case: " + m2.encode() + b"\r\n\r\n..\r\n.\r\nRSET\r\nQUIT\r\n"
        )
        codes = [c.reply()[0] for _ in range(8)]
    assert codes == [354, 250, 250, 250, 354, 250, 250, 221]
    (first,) = _stored(sink, m1)
    assert _content(first) == b"X-Case: " + m1.encode() + b"\r\n\r\n" + big
    (second,) = _stored(sink, m2)
    assert second.rcpt_tos == ["rcpt@example.org"]
    assert _content(second) == b"X-Case: " + m2.encode() + b"\r\n\r\n.\r\n"


def test_empty_body_and_a_body_of_empty_lines(healthy):
    relay, sink = healthy
    with _authed(relay) as c:
        before = len(sink.messages)
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(".")
        assert code == 250, text
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"\r\n\r\n\r\n.\r\n")
        assert c.reply()[0] == 250
    msgs = sink.wait_for_messages(before + 2)[before:]
    assert [_content(m) for m in msgs] == [b"", b"\r\n\r\n\r\n"]


def test_leading_dots_and_8bit_bytes_arrive_unchanged(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    content = f"X-Case: {marker}\r\nSubject: \xe9t\xe9\r\n\r\n".encode("latin-1") + (
        b".\r\n..\r\n.leading dot\r\n...three\r\n\x80\x81\xfe\xff\r\nend.\r\n"
    )
    wire = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in content.split(b"\r\n"))
    with _authed(relay) as c:
        _envelope(c)
        assert send_data(c, wire)[0] == 250
    (stored,) = _stored(sink, marker)
    assert _content(stored) == content


# -- limits ----------------------------------------------------------------------------------------------------


def _sized(marker: str, size: int) -> bytes:
    """Wire bytes of a message of exactly `size` bytes as RFC 1870 counts it (CRLFs counted; the dot the client
    doubled and the final '.<CR><LF>' not)."""
    head = f"X-Case: {marker}\r\n\r\n..dot\r\n".encode()
    line = b"s" * 998 + b"\r\n"
    n, rest = divmod(size + 1 - len(head), len(line))
    assert rest == 0 or rest >= 2
    return head + line * n + (b"t" * (rest - 2) + b"\r\n" if rest else b"")


@pytest.mark.parametrize("extra", [0, 1], ids=["exactly-the-limit", "one-byte-over"])
def test_size_limit_holds_to_the_byte_for_a_spooled_body(healthy, extra):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    data = _sized(marker, MAX_SIZE + extra)
    with _authed(relay) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(data + b".\r\nNOOP\r\n")
        code, text = c.reply()
        assert c.reply()[0] == 250, "the pipelined NOOP is answered after the verdict"
    stored = _stored(sink, marker, timeout=0.5 if extra else 5.0)
    if extra:
        assert (code, text.split(" ", 1)[0]) == (552, "5.3.4"), (code, text)
        assert not stored
    else:
        assert code == 250, text
        assert hashlib.sha256(_content(stored[0])).digest() == hashlib.sha256(data.replace(b"\n..", b"\n.")).digest()


@pytest.mark.parametrize("length", [1001, 1002, 1003, 5000])
def test_line_limit_is_1001_bytes_with_crlf_and_a_long_line_is_refused_after_draining(healthy, length):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    body = f"X-Case: {marker}\r\n\r\n".encode() + b"L" * (length - 2) + b"\r\nafter\r\n"
    with _authed(relay) as c:
        _envelope(c)
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\nNOOP\r\n")
        code, text = c.reply()
        assert c.reply()[0] == 250, "the session goes on after the verdict"
        _envelope(c)
        assert send_data(c, f"X-Case: {marker}-next\r\n\r\nok\r\n".encode())[0] == 250
    stored = [m for m in _stored(sink, marker) if f"{marker}-next".encode() not in m.data]
    if length <= 1001:
        assert code == 250, text
        assert len(stored) == 1
    else:
        assert (code, text) == (500, "5.5.2 Line too long"), (code, text)
        assert not stored


# -- large messages and resources ----------------------------------------------------------------------------


def test_10mb_message_is_relayed_intact(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    lines = [b"%08d " % i + hashlib.sha256(b"%d" % i).hexdigest().encode() * 2 + b"\r\n" for i in range(75_000)]
    content = f"X-Case: {marker}\r\n\r\n".encode() + b"".join(lines)
    assert 10_000_000 < len(content) < MAX_SIZE
    with _authed(relay, timeout=60) as c:
        _envelope(c)
        code, text = send_data(c, content)
    assert code == 250, text
    (stored,) = _stored(sink, marker, timeout=20)
    assert hashlib.sha256(_content(stored)).hexdigest() == hashlib.sha256(content).hexdigest()


def test_client_vanishing_mid_body_forwards_nothing_and_leaks_no_spool_file(healthy):
    relay, sink = healthy
    marker = uuid.uuid4().hex
    c = _authed(relay)
    _envelope(c)
    assert c.cmd("DATA")[0] == 354
    c.send(f"X-Case: {marker}\r\n\r\n".encode() + (b"p" * 998 + b"\r\n") * 3000)  # 3 MB: on disk by now
    time.sleep(0.3)
    c.close()
    time.sleep(0.3)
    assert not _stored(sink, marker, timeout=0.5)
    assert relay.wait_for_log("event=data.aborted", timeout=5)
