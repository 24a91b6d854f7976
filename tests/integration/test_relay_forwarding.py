"""Pass-through forwarding: exact envelope and bytes, the upstream's verdict passed back, upstream faults
(down, hanging, dropping, 4xx, 5xx, refused recipients) never turned into a 250 or a client-side 5xx."""

from __future__ import annotations

import datetime
import email.utils
import re
import smtplib
import socket
import struct
import threading
import time
import uuid

import pytest
from support.client import RawClient, authed, curl_send, quit_quietly, send_data, swaks_send, transaction
from support.sink import down_port

TIMEOUT = 3  # the relay's TIMEOUT in this module: every upstream operation
MSG = b"Subject: fwd\r\nFrom: sender@example.com\r\nTo: rcpt@example.com\r\n\r\nbody line\r\n"


@pytest.fixture(scope="module")
def upstream(module_stack):
    return module_stack.sink()


@pytest.fixture(scope="module")
def relay(module_stack, upstream):
    return module_stack.relay(upstream.port, TIMEOUT=str(TIMEOUT))


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()
    yield
    upstream.reset()


def _received_headers(prefix: bytes) -> list[bytes]:
    """Split the added header block into header fields (folded lines joined)."""
    fields: list[bytes] = []
    for line in prefix.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        else:
            fields.append(line)
    return fields


# -- delivery -----------------------------------------------------------------------------------------


def test_upstream_receives_exact_envelope_and_bytes_with_one_received_header_on_top(relay, upstream):
    original = (
        b"Received: from earlier.hop.test by mx.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        b"From: Sender <sender@example.com>\r\n"
        b"To: a@example.com, b@example.org\r\n"
        b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
        b"caf\xc3\xa9 \xe2\x82\xac \t tab and trailing space \r\n"
        b".a line starting with a dot\r\n"
        b"\r\n"
        b"From the start of a line\r\n" + b"z" * 900 + b"\r\n"
        b"last line\r\n"
    )
    on_wire = original.replace(b"\r\n.", b"\r\n..")
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com> BODY=8BITMIME")[0] == 250
        for rcpt in ("a@example.com", "B.Person+tag@example.org", "c@Example.COM"):
            assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
        code, text = send_data(c, on_wire)
        assert code == 250, text
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1
    m = msgs[0]
    assert m.mail_from == "sender@example.com"
    assert m.rcpt_tos == ["a@example.com", "B.Person+tag@example.org", "c@Example.COM"]
    assert m.data.endswith(original), m.data[:400]
    prefix = m.data[: len(m.data) - len(original)]
    assert prefix.startswith(b"Received:"), prefix
    assert prefix.endswith(b"\r\n")
    fields = _received_headers(prefix)
    assert len(fields) == 1 and fields[0].startswith(b"Received:"), fields
    # Its date is the time it was received, in UTC stated as such (+0000; -0000 would mean "zone unknown").
    stamp = email.utils.parsedate_to_datetime(fields[0].rsplit(b";", 1)[1].decode().strip())
    assert stamp.utcoffset() == datetime.timedelta(0) and fields[0].rstrip().endswith(b" +0000"), fields
    assert abs(time.time() - stamp.timestamp()) < 30


def test_client_gets_250_only_after_the_upstream_accepted(relay, upstream):
    upstream.configure(data_delay=1.0)
    smtp = authed(relay.port)
    try:
        smtp.mail("sender@example.com")
        smtp.rcpt("rcpt@example.com")
        started = time.monotonic()
        code, _ = smtp.data(MSG)
        elapsed = time.monotonic() - started
        # at the moment the client hears 250, the upstream already holds the message
        delivered_now = len(upstream.messages)
    finally:
        quit_quietly(smtp)
    assert code == 250
    assert elapsed >= 0.9
    assert delivered_now == 1


def test_swaks_delivers_through_the_relay(relay, upstream, require_tool):
    swaks = require_tool("swaks")
    out = swaks_send(
        swaks,
        relay.port,
        "--to",
        "recipient@example.com",
        "--header",
        "Subject: Test Email",
        "--body",
        "This is a test email.",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1
    assert msgs[0].rcpt_tos == ["recipient@example.com"]
    assert b"Subject: Test Email" in msgs[0].data
    assert b"This is a test email." in msgs[0].data


# -- upstream answers ---------------------------------------------------------------------------------


def _assert_transient(stage_code_text):
    stage, code, text = stage_code_text
    assert 400 <= code < 500, (stage, code, text)
    return stage, code, text


def test_upstream_4xx_at_mail_gives_client_4xx_and_nothing_delivered(relay, upstream):
    upstream.configure(mail_reply="451 4.3.2 sink is busy")
    _assert_transient(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG))
    assert upstream.messages == []


def test_upstream_4xx_at_end_of_data_gives_client_4xx(relay, upstream):
    upstream.configure(data_reply="452 4.3.1 sink out of storage")
    _assert_transient(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG))


def test_upstream_5xx_gives_client_5xx_with_the_upstreams_text(relay, upstream):
    upstream.configure(data_reply="554 5.6.0 sink-says-content-rejected")
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert 500 <= code < 600, (stage, code, text)
    assert "sink-says-content-rejected" in text


def test_upstream_5xx_at_mail_gives_client_5xx_with_the_upstreams_text(relay, upstream):
    upstream.configure(mail_reply="550 5.7.1 sink-refuses-this-sender")
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert 500 <= code < 600, (stage, code, text)
    assert "sink-refuses-this-sender" in text
    assert upstream.messages == []


def test_upstream_refusing_a_recipient_5xx_delivers_nothing_and_client_gets_5xx(relay, upstream):
    upstream.configure(refuse_rcpt={"unknown@example.com": "550 5.1.1 sink-no-such-user"})
    stage, code, text = transaction(relay.port, "sender@example.com", ["known@example.com", "unknown@example.com"], MSG)
    assert 500 <= code < 600, (stage, code, text)
    time.sleep(0.3)
    assert upstream.messages == []


def test_upstream_refusing_a_recipient_4xx_delivers_nothing_and_client_gets_4xx(relay, upstream):
    upstream.configure(refuse_rcpt={"full@example.com": "450 4.2.2 sink-mailbox-full"})
    _assert_transient(transaction(relay.port, "sender@example.com", ["known@example.com", "full@example.com"], MSG))
    time.sleep(0.3)
    assert upstream.messages == []


def test_upstream_hanging_gives_client_451_4_4_within_the_timeout(relay, upstream):
    upstream.configure(hang=TIMEOUT + 8)
    started = time.monotonic()
    stage, code, text = _assert_transient(
        transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG, timeout=TIMEOUT + 10)
    )
    elapsed = time.monotonic() - started
    assert code == 451 and re.match(r"4\.4\.\d", text), (stage, code, text)
    assert elapsed < TIMEOUT + 4, elapsed


def test_upstream_dropping_the_connection_gives_client_4xx(relay, upstream):
    upstream.configure(drop_at_data=True)
    stage, _code, _text = _assert_transient(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG))
    assert stage == "DATA"


def test_relay_keeps_working_after_upstream_faults(relay, upstream):
    upstream.configure(mail_reply="421 4.3.2 sink closing")
    _assert_transient(transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG))
    upstream.configure()
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert (stage, code) == ("DATA", 250), text
    assert len(upstream.wait_for_messages(1)) == 1


def test_upstream_down_gives_client_451_4_4_and_never_250(stack):
    relay = stack.relay(down_port(), TIMEOUT=str(TIMEOUT))
    smtp = authed(relay.port)
    try:
        code = None
        try:
            smtp.sendmail("sender@example.com", ["rcpt@example.com"], MSG)
        except smtplib.SMTPResponseException as e:
            code, text = e.smtp_code, e.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as e:
            code, text = next(iter(e.recipients.values()))
            text = text.decode()
        assert code == 451, "the message was accepted although the upstream is down"
        assert re.match(r"4\.4\.\d", text), text
    finally:
        quit_quietly(smtp)


def test_concurrent_clients_are_each_delivered(relay, upstream):
    results: list[tuple[str, int, str]] = []

    def one(i: int) -> None:
        results.append(transaction(relay.port, f"s{i}@example.com", [f"r{i}@example.com"], MSG))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(r[1] for r in results) == [250] * 6, results
    msgs = upstream.wait_for_messages(6)
    assert sorted(m.mail_from for m in msgs) == sorted(f"s{i}@example.com" for i in range(6))


# -- real clients: swaks and curl --------------------------------------------------------------------


def _swaks(relay, require_tool, *extra: str):
    return swaks_send(require_tool("swaks"), relay.port, *extra)


def _curl(relay, require_tool, mail_file, *rcpts: str, user: str | None = None, sender: str = "sender@example.com"):
    return curl_send(require_tool("curl"), relay.port, mail_file, *rcpts, user=user, sender=sender)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_swaks_authenticates_with_each_mechanism(relay, upstream, require_tool, mech):
    out = _swaks(relay, require_tool, "--auth", mech, "--to", "rcpt@example.com", "--body", f"via {mech}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"via {mech}".encode() in upstream.wait_for_messages(1)[0].data


def test_swaks_with_one_disallowed_recipient_delivers_nothing(relay, upstream, require_tool):
    out = _swaks(relay, require_tool, "--to", "rcpt@example.com,victim@elsewhere.test", "--body", "x")
    assert out.returncode != 0
    assert "554" in out.stdout or "550" in out.stdout, out.stdout
    time.sleep(0.3)
    assert upstream.messages == []


def test_curl_delivers_exact_bytes_to_every_recipient(relay, upstream, require_tool, tmp_path):
    body = b"From: sender@example.com\r\nTo: a@example.com\r\nSubject: curl\r\n\r\n.dot line\r\ncurl body\r\n"
    mail = tmp_path / "mail.eml"
    mail.write_bytes(body)
    out = _curl(relay, require_tool, mail, "a@example.com", "b@example.org")
    assert out.returncode == 0, out.stdout + out.stderr
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1
    assert msgs[0].rcpt_tos == ["a@example.com", "b@example.org"]
    assert msgs[0].data.endswith(body)


def test_curl_with_disallowed_recipient_fails_and_delivers_nothing(relay, upstream, require_tool, tmp_path):
    mail = tmp_path / "mail.eml"
    mail.write_bytes(b"Subject: x\r\n\r\ny\r\n")
    out = _curl(relay, require_tool, mail, "a@example.com", "victim@elsewhere.test")
    assert out.returncode != 0
    time.sleep(0.3)
    assert upstream.messages == []


def test_curl_with_disallowed_sender_fails(relay, upstream, require_tool, tmp_path):
    mail = tmp_path / "mail.eml"
    mail.write_bytes(b"Subject: x\r\n\r\ny\r\n")
    out = _curl(relay, require_tool, mail, "a@example.com", sender="spoof@forbidden.test")
    assert out.returncode != 0
    assert "553" in out.stderr, out.stderr
    time.sleep(0.3)
    assert upstream.messages == []


@pytest.mark.parametrize(
    "greeting,reply",
    [
        (b"HTTP/1.1 400 Bad Request\r\n\r\n", None),
        (b"220 junk.test ESMTP\r\n", b"\x00\xff garbage without a code\r\n"),
        (b"220 junk.test ESMTP\r\n", b"250-first line of a reply that never ends\r\n"),
        (b"", None),
    ],
    ids=["not-smtp", "garbage-replies", "unterminated-multiline", "silent"],
)
def test_upstream_speaking_garbage_gives_client_4xx_never_5xx_or_250(stack, greeting, reply):
    from support.sink import JunkUpstream

    junk = JunkUpstream(greeting, reply, linger=TIMEOUT + 4).start()
    try:
        relay = stack.relay(junk.port, TIMEOUT=str(TIMEOUT))
        started = time.monotonic()
        stage, code, text = transaction(
            relay.port, "sender@example.com", ["rcpt@example.com"], MSG, timeout=TIMEOUT + 10
        )
        assert 400 <= code < 500, (stage, code, text, relay.describe())
        assert re.match(r"4\.\d\.\d", text), text
        assert time.monotonic() - started < TIMEOUT + 5
        # the relay itself is still healthy
        with RawClient(relay.port) as c:
            assert c.cmd("NOOP")[0] == 250
    finally:
        junk.stop()
    assert "Traceback" not in relay.all_output()


def _sent_whole_then(relay, marker: str, leave) -> RawClient:
    """A client sends a message, waits until it went upstream whole (the slow upstream holds its reply), then
    leaves as `leave` says."""
    c = RawClient(relay.port)
    assert c.cmd("EHLO closer.test")[0] == 250
    assert c.auth_plain()[0] == 235
    assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
    assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(f"X-Case: {marker}\r\n\r\nbody\r\n.\r\n".encode())
    time.sleep(0.3)  # the relay is waiting on the slow upstream's reply to the end of data now
    leave(c.sock)
    return c


def test_a_client_that_shuts_down_its_side_after_its_final_dot_gets_its_250_and_one_copy(relay, upstream):
    # TCP cannot tell a client that shuts down its side to read on from one that closed. Once the end of data
    # went upstream, the upstream may have the message: cancelling would only keep the 250 from a client that
    # is waiting for it, and which would send the message again (a copy per attempt). The delivery finishes.
    upstream.configure(data_delay=1.0)
    marker = uuid.uuid4().hex

    def quit_and_shut_down(sock: socket.socket) -> None:
        sock.sendall(b"QUIT\r\n")
        sock.shutdown(socket.SHUT_WR)

    c = _sent_whole_then(relay, marker, quit_and_shut_down)
    try:
        code, text = c.reply()
        assert code == 250, (code, text)
        assert c.reply()[0] == 221
        assert c.closed_by_peer(5)
    finally:
        c.close()
    assert len([m for m in upstream.wait_for_messages(1) if marker.encode() in m.data]) == 1
    assert relay.wait_for_log("event=forward.delivered", "sender=sender@example.com") is not None, relay.describe()
    assert "event=forward.cancelled" not in relay.all_output()


def test_a_client_gone_after_its_final_dot_went_upstream_has_its_delivery_finished_and_logged(relay, upstream):
    # A reset (the connection is gone at once): the delivery still finishes, so the log says what became of the
    # message (delivered, the reply lost) instead of "may or may not have it".
    upstream.configure(data_delay=1.0)
    marker = uuid.uuid4().hex

    def reset(sock: socket.socket) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    _sent_whole_then(relay, marker, reset).close()
    assert len([m for m in upstream.wait_for_messages(1) if marker.encode() in m.data]) == 1
    assert relay.wait_for_log("event=forward.delivered", "sender=sender@example.com") is not None, relay.describe()
    assert relay.wait_for_log("event=reply.lost", 'reply="250') is not None, relay.describe()
    assert "event=forward.cancelled" not in relay.all_output()
    assert "Traceback" not in relay.all_output()
