"""Upstream PIPELINING (RFC 2920): the envelope goes in one write when the upstream offers it, the replies are
read in order however they arrive, a message goes to all its recipients or to none, and an upstream without
PIPELINING gets one command at a time."""

from __future__ import annotations

import contextlib
import socket
import time

import pytest
from support.client import RawClient, send_data, transaction
from support.net import ThreadedServer
from support.scripted import Script, ScriptedUpstream

MSG = b"Subject: pipelining\r\n\r\nbody\r\n"


def _envelope_reads(upstream: ScriptedUpstream) -> list[list[str]]:
    """The reads that carried MAIL, RCPT or DATA commands (not EHLO, RSET or QUIT)."""
    verbs = ("MAIL", "RCPT", "DATA")
    return [[line.split(":")[0].split(" ")[0] for line in read] for read in upstream.reads if read[0][:4] in verbs]


def test_single_recipient_envelope_and_data_go_in_one_write(stack):
    with ScriptedUpstream() as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for i in range(3):
            assert transaction(relay.port, "sender@example.com", [f"r{i}@example.com"], MSG)[1] == 250
        assert [m[1] for m in upstream.messages] == [[f"r{i}@example.com"] for i in range(3)]
        assert _envelope_reads(upstream) == [["MAIL", "RCPT", "DATA"]] * 3
        assert upstream.sessions == 1


def test_several_recipients_are_pipelined_but_data_waits_for_their_replies(stack):
    with ScriptedUpstream() as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        rcpts = ["a@example.com", "b@example.com", "c@example.com"]
        assert transaction(relay.port, "sender@example.com", rcpts, MSG)[1] == 250
        assert _envelope_reads(upstream) == [["MAIL", "RCPT", "RCPT", "RCPT"], ["DATA"]]
        assert upstream.messages[0][1] == rcpts


@pytest.mark.parametrize("gap", [0.0, 0.02])
def test_replies_arriving_one_by_one_are_all_read_in_order(stack, gap):
    # The relay must not lose a reply that arrives while it is still handling the one before.
    with ScriptedUpstream(Script(reply_gap=gap)) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for i in range(5):
            rcpts = [f"x{i}@example.com"] if i % 2 else [f"x{i}@example.com", f"y{i}@example.com"]
            assert transaction(relay.port, "sender@example.com", rcpts, MSG)[1] == 250
        assert [m[1][0] for m in upstream.messages] == [f"x{i}@example.com" for i in range(5)]
        assert upstream.sessions == 1


def test_refused_single_recipient_keeps_the_session_and_delivers_nothing(stack):
    script = Script(rcpt={"bad@example.com": b"550 5.1.1 No such user"})
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        stage, code, text = transaction(relay.port, "sender@example.com", ["bad@example.com"], MSG)
        assert (stage, code) == ("DATA", 550) and "No such user" in text
        assert transaction(relay.port, "sender@example.com", ["good@example.com"], MSG)[1] == 250
        assert [m[1] for m in upstream.messages] == [["good@example.com"]]
        assert upstream.sessions == 1, "a refusal is a verdict, not a broken session"
        assert relay.wait_for_log("event=forward.failed", "stage=rcpt", "upstream_code=550")


def test_data_accepted_after_a_refused_recipient_is_abandoned_without_the_final_dot(stack):
    # A server that (wrongly) answers 354 although the only recipient was refused: the relay must not send
    # anything that could end the data, so nothing is delivered, and it answers the recipient's refusal.
    script = Script(rcpt={"bad@example.com": b"550 5.1.1 No such user"}, data_no_rcpt=b"354 Go ahead anyway")
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        stage, code, text = transaction(relay.port, "sender@example.com", ["bad@example.com"], MSG)
        assert (stage, code) == ("DATA", 550) and "No such user" in text
        assert upstream.messages == []
        assert transaction(relay.port, "sender@example.com", ["good@example.com"], MSG)[1] == 250
        assert [m[1] for m in upstream.messages] == [["good@example.com"]]
        assert upstream.aborted_data == 1 and upstream.sessions == 2


def test_refused_sender_is_answered_with_the_upstreams_reply(stack):
    script = Script(mail=b"553 5.7.1 Sender not permitted", data_no_rcpt=b"503 5.5.1 Need MAIL first")
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for _ in range(2):
            stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], MSG)
            assert (stage, code) == ("DATA", 553) and "not permitted" in text
        assert upstream.messages == [] and upstream.sessions == 1
        assert relay.wait_for_log("event=forward.failed", "stage=mail", "upstream_code=553")


def test_upstream_without_pipelining_gets_one_command_at_a_time(stack):
    with ScriptedUpstream(Script(pipelining=False)) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        assert transaction(relay.port, "sender@example.com", ["a@example.com", "b@example.com"], MSG)[1] == 250
        assert _envelope_reads(upstream) == [["MAIL"], ["RCPT"], ["RCPT"], ["DATA"]]
        assert upstream.messages[0][1] == ["a@example.com", "b@example.com"]


def test_aiosmtpd_upstream_without_pipelining_still_relays(stack):
    sink = stack.sink(pipelining=False)
    relay = stack.relay(sink.port, TIMEOUT="5")
    assert transaction(relay.port, "sender@example.com", ["a@example.com", "b@example.com"], MSG)[1] == 250
    sink.configure(refuse_rcpt={"bad@example.com": "550 5.1.1 No such user"})
    assert transaction(relay.port, "sender@example.com", ["bad@example.com"], MSG)[1] == 550
    assert [m.rcpt_tos for m in sink.wait_for_messages(1)] == [["a@example.com", "b@example.com"]]


def test_unreadable_reply_is_answered_451_and_the_session_is_not_reused(stack):
    script = Script(rcpt={"odd@example.com": b"garbage instead of a reply"})
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        stage, code, text = transaction(relay.port, "sender@example.com", ["odd@example.com"], MSG)
        assert (stage, code) == ("DATA", 451), text
        assert transaction(relay.port, "sender@example.com", ["good@example.com"], MSG)[1] == 250
        assert [m[1] for m in upstream.messages] == [["good@example.com"]]
        assert upstream.sessions == 2, "a session whose replies could not be read is out of step: not reused"


def test_hundreds_of_recipients_with_long_replies_are_pipelined_in_bounded_groups(stack):
    # 600 replies of 100 bytes would overflow the upstream client's 32 KiB reply buffer in one group.
    script = Script(rcpt_ok=b"250 2.1.5 Recipient <accepted> " + b"x" * 68)
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="10")
        rcpts = [f"r{i}@example.com" for i in range(600)]
        assert transaction(relay.port, "sender@example.com", rcpts, MSG, timeout=60)[1] == 250
        assert upstream.messages[0][1] == rcpts
        envelope = [read for read in _envelope_reads(upstream) if read != ["DATA"]]
        assert sum(len(read) for read in envelope) == 601 and max(len(read) for read in envelope) <= 32


@pytest.mark.parametrize(
    ("script", "rcpts", "expected"),
    [
        (
            Script(sender={"blocked@example.com": b"554 5.7.1 Sender blocked"}, hang_up_after_refusal=True),
            ["a@example.com"],
            554,
        ),
        (
            Script(rcpt={"bad@example.com": b"550 5.7.1 Prohibited"}, hang_up_after_refusal=True),
            ["bad@example.com"],
            550,
        ),
        (
            Script(rcpt={"bad@example.com": b"550 5.7.1 Prohibited"}, hang_up_after_refusal=True),
            ["ok@example.com", "bad@example.com"],
            550,
        ),
    ],
)
def test_refusal_followed_by_a_hang_up_is_answered_with_the_refusal(stack, script, rcpts, expected):
    # Some servers (Exim's drop ACL, "554 blocked" gateways) refuse and close at once: their verdict counts.
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        assert transaction(relay.port, "sender@example.com", ["warm@example.com"], MSG)[1] == 250
        sender = "blocked@example.com" if expected == 554 else "sender@example.com"
        _, code, text = transaction(relay.port, sender, rcpts, MSG)
        assert code == expected, text
        assert upstream.sessions == 1, "a verdict is not retried on a fresh session"
        assert len(upstream.messages) == 1
        assert transaction(relay.port, "sender@example.com", ["next@example.com"], MSG)[1] == 250


def test_refused_end_of_data_keeps_the_session(stack):
    with ScriptedUpstream(Script(end_of_data=b"554 5.7.1 Looks like spam")) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for _ in range(3):
            stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], MSG)
            assert (stage, code) == ("DATA", 554) and "spam" in text
        assert upstream.sessions == 1, "after a refused end of data the session is reset and reused"


class EarlyRefusalUpstream(ThreadedServer):
    """Answers 552 after 200 KB of the first message's data, reads on to the final dot and answers that 250 too
    (a server that refuses early but keeps the protocol going); replies name their command ("250 ok RCPT").

    With `hang_up`, it ends the session after the refusal instead: "graceful" closes its side and reads on until the
    relay closes; "abrupt" stops reading, waits a second (the relay's writes back up) and closes the socket with
    data unread, which resets the connection; "stall" stops reading and holds the connection for 8 seconds.
    """

    def __init__(self, *, hang_up: str = "") -> None:
        super().__init__()
        self.delivered: list[bytes] = []
        self.refused = False
        self.hang_up = hang_up

    def session(self, conn) -> None:
        buffer = b""

        def line() -> bytes:
            nonlocal buffer
            while b"\r\n" not in buffer:
                chunk = conn.recv(65536)
                if not chunk:
                    raise EOFError
                buffer += chunk
            first, buffer = buffer.split(b"\r\n", 1)
            return first

        def data(until: bytes | int) -> bytes:
            nonlocal buffer
            while (buffer.find(until) < 0) if isinstance(until, bytes) else len(buffer) < until:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    raise EOFError
                buffer += chunk
            return buffer

        conn.settimeout(10)
        with conn, contextlib.suppress(OSError, EOFError):
            conn.sendall(b"220 early.test ESMTP\r\n")
            line()
            conn.sendall(b"250-early.test\r\n250-SIZE 100000000\r\n250 PIPELINING\r\n")
            while True:
                verb = line()[:4].upper()
                if verb == b"DATA":
                    conn.sendall(b"354 go\r\n")
                    if not self.refused:
                        self.refused = True
                        data(200_000)
                        conn.sendall(b"552 5.3.4 Message too big for this system\r\n")
                        if self.hang_up == "graceful":
                            conn.shutdown(socket.SHUT_WR)
                            while conn.recv(1 << 20):
                                pass
                        if self.hang_up:
                            time.sleep(8.0 if self.hang_up == "stall" else 1.0)
                            return
                    data(b"\r\n.\r\n")
                    body, buffer = buffer.split(b"\r\n.\r\n", 1)
                    self.delivered.append(body)
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok " + verb + b"\r\n")


def test_a_refusal_sent_before_the_end_of_a_large_message_does_not_leave_the_session_out_of_step(stack):
    # The reply to the final dot is still to come after such a refusal: that session must not carry the next
    # message, whose replies would otherwise be read one behind.
    with EarlyRefusalUpstream() as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="10")
        big = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 25_000
        stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], big)
        assert (stage, code) == ("DATA", 552) and "too big" in text
        for i in range(3):
            stage, code, text = transaction(relay.port, "sender@example.com", [f"next{i}@example.com"], MSG)
            assert (stage, code) == ("DATA", 250), text
        assert upstream.sessions == 2, "the session that refused early is not reused"


@pytest.mark.parametrize("hang_up", ["graceful", "abrupt", "stall"])
def test_a_refusal_followed_by_a_hang_up_in_the_middle_of_a_large_message_is_passed_on_as_permanent(stack, hang_up):
    # The upstream refused the message (5xx) and ended the session, or stopped reading, while the relay was still
    # sending it: that is a verdict, not a lost connection, so the client must get the 552 (not a 451 that has it
    # retry for days), and at once, not after TIMEOUT.
    with EarlyRefusalUpstream(hang_up=hang_up) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="10")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20_000  # 20 MB: more than the socket buffers
        started = time.monotonic()
        stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], big)
        assert (stage, code) == ("DATA", 552) and "too big" in text, (stage, code, text)
        assert time.monotonic() - started < 6, "the verdict waited for the relay's TIMEOUT"
        assert upstream.delivered == []
        stage, code, text = transaction(relay.port, "sender@example.com", ["next@example.com"], MSG)
        assert (stage, code) == ("DATA", 250), text
        assert upstream.sessions == 2
        line = relay.wait_for_log("event=forward.failed", "upstream_code=552")
        assert line is not None and 'reply="552 5.3.4' in line, relay.describe()


def test_the_upstream_client_does_not_reuse_a_session_that_refused_before_the_end_of_data():
    # The same, driving the upstream module directly on uvloop (as the relay runs), where the next message
    # follows at once: the reply to the first message's final dot must never be taken for the next message's.
    import uvloop

    from smtp_relay.body import MessageBody
    from smtp_relay.upstream import Upstream, UpstreamSettings

    def body(data: bytes) -> MessageBody:
        b = MessageBody()
        b.feed(data)
        b.finish()
        return b

    async def run(port: int) -> list[tuple[bool, str]]:
        settings = UpstreamSettings("127.0.0.1", port, "none", True, None, "", "", 10.0, "relay.test")
        upstream = Upstream(settings)
        big = b"Subject: big\r\n\r\n" + (b"x" * 76 + b"\r\n") * 25_000
        results = []
        for data, rcpts in ((big, ["a@example.com"]), (MSG, ["b@example.com"]), (MSG, ["c@example.com"])):
            outcome = await upstream.deliver("s@example.com", rcpts, b"Received: test\r\n", body(data), False)
            results.append((outcome.delivered, outcome.reply))
        await upstream.close()
        return results

    with EarlyRefusalUpstream() as server:
        results = uvloop.run(run(server.port))
    assert results[0][0] is False and results[0][1].startswith("552")
    assert [r[0] for r in results[1:]] == [True, True], results
    assert server.sessions == 2


@pytest.mark.parametrize("final", [b"252 2.0.0 accepted", b"250-2.0.0 queued\r\n251 2.0.0 as 4Xk"])
def test_any_positive_reply_to_the_end_of_data_is_a_delivery(stack, final):
    # RFC 5321 4.2.1: a 2yz reply is positive completion. Telling the client 451 for a message the upstream
    # took would have it send the message again, and again at every retry.
    with ScriptedUpstream(Script(end_of_data=final)) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for n in range(2):
            stage, code, text = transaction(relay.port, "sender@example.com", [f"to{n}@example.com"], MSG)
            assert (stage, code) == ("DATA", 250), text
        assert [m[1] for m in upstream.messages] == [["to0@example.com"], ["to1@example.com"]]
        assert upstream.sessions == 1
        assert relay.wait_for_log("event=forward.delivered", f"upstream_code={int(final.splitlines()[-1][:3])}")


@pytest.mark.parametrize("early", [b"250 2.0.0 early", b"552 5.3.4 too big, said early"])
def test_a_reply_before_the_end_of_data_stops_the_message_before_its_final_dot(stack, early):
    # An upstream that answers before it has the whole message is out of step: whatever it said, the final dot
    # must not follow (the upstream would take the message while the client is told to try again).
    with ScriptedUpstream(Script(data=b"354 go\r\n" + early)) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], MSG)
        assert stage == "DATA" and code == (451 if early.startswith(b"2") else 552), (code, text)
        assert f"{code // 100}." == text[:2], text  # an enhanced code of the reply's class
        deadline = time.monotonic() + 5
        while upstream.aborted_data < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert upstream.messages == [] and upstream.aborted_data == 1


def test_smtp_hostname_names_the_relay_in_its_greeting_its_ehlo_and_its_received_header(stack):
    # In a container the host name is the container's id, which upstreams that check EHLO refuse.
    with ScriptedUpstream() as upstream:
        relay = stack.relay(upstream.port, SMTP_HOSTNAME="relay.example.net")
        with RawClient(relay.port) as client:
            assert client.greeting[0] == 220 and client.greeting[1].startswith("relay.example.net"), client.greeting
        assert transaction(relay.port, "sender@example.com", ["a@example.com"], MSG)[1] == 250
        assert ["EHLO relay.example.net"] in upstream.reads, upstream.reads
        received = upstream.messages[0][2].split(b"\r\n\r\n")[0].split(b"\r\n")[:3]
        assert received[0].startswith(b"Received: from ") and b"by relay.example.net" in b" ".join(received), received


class EarlyReplyUpstream(ThreadedServer):
    """Answers DATA with 354 and, once `after` bytes of the message came (0: in the same write as the 354), with
    `first`; `rest` follows `gap` seconds later. Reads on, and records whether the final dot ever came."""

    def __init__(self, first: bytes, *, after: int = 0, rest: bytes = b"", gap: float = 0.0) -> None:
        super().__init__()
        self.first, self.after, self.rest, self.gap = first, after, rest, gap
        self.got_dot = False

    def answer_early(self, conn, lead: bytes = b"") -> None:
        conn.sendall(lead + self.first)
        self.first = b""
        if self.rest:
            time.sleep(self.gap)
            conn.sendall(self.rest)

    def session(self, conn) -> None:
        conn.settimeout(10)
        buffer = b""
        in_data = False
        with conn, contextlib.suppress(OSError):
            conn.sendall(b"220 early.test ESMTP\r\n")
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    return
                buffer += chunk
                if in_data:
                    self.got_dot = self.got_dot or b"\r\n.\r\n" in buffer[-(len(chunk) + 5) :]
                    if self.first and len(buffer) > self.after:
                        self.answer_early(conn)
                    continue
                while b"\r\n" in buffer and not in_data:
                    line, buffer = buffer.split(b"\r\n", 1)
                    verb = line[:4].upper()
                    if verb == b"EHLO":
                        conn.sendall(b"250-early.test\r\n250 PIPELINING\r\n")
                    elif verb == b"DATA":
                        in_data = True
                        if self.after:
                            conn.sendall(b"354 go\r\n")
                        else:
                            self.answer_early(conn, b"354 go\r\n")
                    elif verb in (b"MAIL", b"RCPT", b"RSET"):
                        conn.sendall(b"250 ok\r\n")


def test_a_refusal_that_begins_before_the_end_of_data_is_read_to_its_end_and_passed_on(stack):
    # Its first line came before the relay had sent the message: the relay waits for the rest (bounded by
    # TIMEOUT) rather than answering 451, which would have the client retry a message the upstream refuses.
    upstream = EarlyReplyUpstream(b"552-5.3.4 Message too big\r\n", rest=b"552 5.3.4 for this system\r\n", gap=1.0)
    with upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], MSG)
        assert (stage, code) == ("DATA", 552) and "too big" in text, (stage, code, text)
        time.sleep(0.3)
        assert not upstream.got_dot


HUGE_REPLY = (b"552-5.3.4 " + b"x" * 500 + b"\r\n") * 90 + b"552 5.3.4 too big\r\n"  # 45 KB: over 32 KiB


@pytest.mark.parametrize("reply", [HUGE_REPLY, b"garbage\r\n"], ids=["over-32KiB", "not-smtp"])
def test_an_unreadable_reply_before_the_end_of_data_stops_the_message_without_its_final_dot(stack, reply):
    # The upstream said something while the message was on its way: whatever it was, it must not get the final
    # dot (it would take the message while the client is told to try again).
    with EarlyReplyUpstream(reply, after=200_000) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        big = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 20_000  # 20 MB: more than the socket buffers
        stage, code, text = transaction(relay.port, "sender@example.com", ["a@example.com"], big)
        assert stage == "DATA" and code >= 400, (stage, code, text)
        time.sleep(0.5)
        assert not upstream.got_dot


def test_a_message_declared_8bit_is_refused_for_an_upstream_without_8bitmime(stack):
    # RFC 6152 3: the relay does not convert to 7 bit, so such a message must not go on as if it were 7-bit.
    with ScriptedUpstream(Script(eight_bit_mime=False)) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        body = "Subject: 8bit\r\n\r\nGrüße\r\n".encode()
        with RawClient(relay.port) as c:
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd("MAIL FROM:<sender@example.com> BODY=8BITMIME")[0] == 250
            assert c.cmd("RCPT TO:<a@example.com>")[0] == 250
            code, text = send_data(c, body)
            assert code == 554 and text.startswith("5.6.3"), (code, text)
            # Undeclared (7-bit, as far as the client says) it goes on as before.
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<b@example.com>")[0] == 250
            assert send_data(c, MSG)[0] == 250
        assert [m[1] for m in upstream.messages] == [["b@example.com"]]
        assert not any("BODY=8BITMIME" in line for read in upstream.reads for line in read)
        assert relay.wait_for_log("event=forward.failed", "upstream does not offer 8BITMIME")


def test_an_ehlo_refused_before_the_relays_login_is_passed_on_with_its_text(stack):
    # aiosmtplib's login() would answer the refusal with HELO, which lists no AUTH, and report only that: a 451
    # without the upstream's words. The relay sends EHLO itself, and the upstream's 5xx reaches the client.
    with ScriptedUpstream(Script(ehlo=b"550 5.7.1 not you")) as upstream:
        relay = stack.relay(upstream.port, RELAY_USERNAME="relay-user", RELAY_PASSWORD="relay-pass")
        _, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
        assert (code, text) == (550, "5.7.1 not you"), (code, text)
        assert relay.wait_for_log("level=ERROR", "event=forward.failed", "not you"), relay.describe()


def test_a_stray_reply_after_the_final_one_does_not_answer_the_next_message(stack):
    """An upstream that sends more than the reply to the end of data (here a stray 554 in the same write) has a
    session out of step: kept, its next transaction would read that 554 as the reply to its MAIL and refuse a
    message the upstream never saw. The session is closed; the next message goes on a new one and is delivered."""
    script = Script(end_of_data=b"250 2.0.0 OK queued\r\n554 5.7.1 stray line")
    with ScriptedUpstream(script) as upstream:
        relay = stack.relay(upstream.port, TIMEOUT="5")
        for i in range(3):  # each within a second of the last: no health probe between them
            stage, code, text = transaction(relay.port, "sender@example.com", [f"r{i}@example.com"], MSG)
            assert (stage, code) == ("DATA", 250), (i, stage, code, text)
        assert [m[1] for m in upstream.messages] == [[f"r{i}@example.com"] for i in range(3)]
        assert upstream.sessions == 3


def test_an_upstream_that_does_not_know_ehlo_gets_helo_when_no_extension_is_needed(stack):
    # RFC 5321 3.2: a client whose EHLO is refused as unknown falls back to HELO. Without STARTTLS and without
    # a login the relay needs no extension, so an old plain-SMTP upstream is served (one command at a time).
    with ScriptedUpstream(Script(ehlo=b"502 5.5.2 Command not recognized")) as upstream:
        relay = stack.relay(upstream.port)
        assert transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)[1] == 250
        assert [m[1] for m in upstream.messages] == [["rcpt@example.com"]]
        assert any(line.startswith("HELO ") for read in upstream.reads for line in read)
        assert _envelope_reads(upstream) == [["MAIL"], ["RCPT"], ["DATA"]]
    # With a login to do, the extensions are needed: the refusal is passed on, as above.
    with ScriptedUpstream(Script(ehlo=b"502 5.5.2 Command not recognized")) as upstream:
        relay = stack.relay(upstream.port, RELAY_USERNAME="relay-user", RELAY_PASSWORD="relay-pass")
        _, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
        assert (code, text) == (502, "5.5.2 Command not recognized"), (code, text)
        assert not upstream.messages
