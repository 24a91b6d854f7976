"""SMTP behaviour of the relay seen by a client: EHLO, AUTH, sender/recipient policy, transactions, size,
SMTP smuggling. One relay (plain listener, plain upstream) serves the whole module."""

from __future__ import annotations

import base64
import re
import smtplib
import time

import pytest
from support.client import RawClient, authed, connect, login, plain_b64, quit_quietly, send_data, transaction
from support.relay import CLIENT_PASSWORD, CLIENT_USER

MAX_SIZE = 20000


@pytest.fixture(scope="module")
def upstream(module_stack):
    return module_stack.sink()


@pytest.fixture(scope="module")
def relay(module_stack, upstream):
    return module_stack.relay(upstream.port, MAX_MESSAGE_SIZE=str(MAX_SIZE))


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()
    yield
    upstream.reset()


def _nothing_forwarded(upstream, wait: float = 0.3) -> bool:
    time.sleep(wait)
    return upstream.messages == []


MSG = b"Subject: hello\r\nFrom: a@example.com\r\nTo: b@example.com\r\n\r\nHello there.\r\n"


# -- EHLO --------------------------------------------------------------------------------------------


def test_ehlo_advertises_size_8bitmime_pipelining_enhancedstatuscodes(relay):
    smtp = connect(relay.port)
    try:
        assert smtp.has_extn("size")
        assert smtp.esmtp_features["size"].strip() == str(MAX_SIZE)
        assert smtp.has_extn("8bitmime")
        assert smtp.has_extn("pipelining")
        assert smtp.has_extn("enhancedstatuscodes")
    finally:
        quit_quietly(smtp)


def test_ehlo_advertises_auth_plain_login_and_no_starttls_without_use_tls(relay):
    smtp = connect(relay.port)
    try:
        assert smtp.has_extn("auth")
        mechanisms = smtp.esmtp_features["auth"].upper().split()
        assert "PLAIN" in mechanisms and "LOGIN" in mechanisms
        assert not smtp.has_extn("starttls")
    finally:
        quit_quietly(smtp)


def test_ehlo_after_a_successful_auth_no_longer_offers_auth(relay):
    """AUTH is advertised only where it is allowed: after a login a second AUTH is refused (RFC 4954 4)."""
    smtp = authed(relay.port)
    try:
        code, _ = smtp.ehlo("again.test")
        assert code == 250
        assert not smtp.has_extn("auth"), smtp.esmtp_features
        assert smtp.has_extn("size") and smtp.has_extn("pipelining")
        assert smtp.docmd("AUTH", "PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD))[0] == 503
        assert smtp.mail("sender@example.com")[0] == 250  # still logged in
    finally:
        quit_quietly(smtp)


# -- AUTH ---------------------------------------------------------------------------------------------


def test_mail_before_auth_is_refused_with_530_5_7_0(relay, upstream):
    smtp = connect(relay.port)
    try:
        code, text = smtp.mail("sender@example.com")
        assert code == 530
        assert text.startswith(b"5.7.0")
    finally:
        quit_quietly(smtp)
    assert _nothing_forwarded(upstream)


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_auth_with_configured_credentials_succeeds_and_delivers(relay, upstream, mech):
    smtp = connect(relay.port)
    try:
        code, text = login(smtp, mech=mech)
        assert code == 235, text
        assert smtp.sendmail("sender@example.com", ["rcpt@example.com"], MSG) == {}
    finally:
        quit_quietly(smtp)
    msgs = upstream.wait_for_messages(1)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [("sender@example.com", ["rcpt@example.com"])]


@pytest.mark.parametrize("mech", ["plain", "Login"])
def test_auth_mechanism_names_are_taken_in_any_case(relay, mech):
    # As Postfix and Exim do: some clients send them in lower case.
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        if mech == "plain":
            code, text = c.cmd(f"AUTH {mech} {plain_b64(CLIENT_USER, CLIENT_PASSWORD)}")
        else:
            assert c.cmd(f"AUTH {mech}")[0] == 334
            assert c.cmd(base64.b64encode(CLIENT_USER.encode()).decode())[0] == 334
            code, text = c.cmd(base64.b64encode(CLIENT_PASSWORD.encode()).decode())
        assert code == 235, (code, text)


def _plain(authzid: str, user: str, password: str) -> str:
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def test_auth_plain_authorization_identity_must_be_empty_or_the_user_itself(relay):
    # RFC 4616 2: a server fails a login whose authorization identity the user may not act as; the relay has
    # one identity, the user's own. (aiosmtpd drops the field, and took `admin\0user\0password`.)
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.cmd("AUTH PLAIN " + _plain("postmaster", CLIENT_USER, CLIENT_PASSWORD))
        assert (code, text[:5]) == (535, "5.7.8"), (code, text)
        assert c.cmd("AUTH PLAIN")[0] == 334  # the same with the credentials sent after the challenge
        assert c.cmd(_plain("postmaster", CLIENT_USER, CLIENT_PASSWORD))[0] == 535
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 530
        assert c.cmd("AUTH PLAIN " + _plain(CLIENT_USER, CLIENT_USER, CLIENT_PASSWORD))[0] == 235
    line = relay.wait_for_log("event=auth ", "outcome=failure", "authzid=postmaster")
    assert line is not None and "may not act as another identity" in line, relay.describe()
    assert CLIENT_PASSWORD not in relay.all_output()


# -- sender and recipient policy ---------------------------------------------------------------------


def test_disallowed_sender_domain_is_refused_553_5_7_1_with_warning_naming_domain_user_peer(relay, upstream):
    smtp = authed(relay.port)
    try:
        code, text = smtp.mail("someone@forbidden-sender.test")
        assert code == 553
        assert text.startswith(b"5.7.1")
    finally:
        quit_quietly(smtp)
    line = relay.wait_for_log("WARNING", "forbidden-sender.test")
    assert line is not None, relay.describe()
    assert CLIENT_USER in line
    assert "127.0.0.1" in line
    assert _nothing_forwarded(upstream)


def test_disallowed_recipient_domain_is_refused_550_5_7_1_with_warning(relay):
    smtp = authed(relay.port)
    try:
        assert smtp.mail("sender@example.com")[0] == 250
        code, text = smtp.rcpt("victim@forbidden-rcpt.test")
        assert code == 550
        assert text.startswith(b"5.7.1")
    finally:
        quit_quietly(smtp)
    line = relay.wait_for_log("WARNING", "forbidden-rcpt.test")
    assert line is not None, relay.describe()
    assert "127.0.0.1" in line


def test_disallowed_recipient_rejects_whole_message(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<bad@elsewhere.test>")[0] == 550
        assert c.cmd("RCPT TO:<good2@example.org>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 554, text
        assert text.startswith("5.7.1")
    assert _nothing_forwarded(upstream)


def test_message_with_a_refused_recipient_is_refused_at_the_data_command_and_the_transaction_ends(relay, upstream):
    # "refused at DATA": the client is not asked for a body that would be thrown away. The transaction is over,
    # so the next MAIL needs no RSET (smtplib's sendmail sends none after a refused DATA).
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<bad@refused-at-data.test>")[0] == 550
        code, text = c.cmd("DATA")
        assert code == 554 and text.startswith("5.7.1"), (code, text)
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250
    assert [m.rcpt_tos for m in upstream.wait_for_messages(1)] == [["good@example.com"]]
    line = relay.wait_for_log("event=message.refused", "refused=bad@refused-at-data.test")
    assert line is not None and 'reason="a recipient was refused"' in line, relay.describe()
    session = re.search(r" session=(\w+) ", line)[1]
    closed = relay.wait_for_log("event=disconnect", f"session={session}")
    assert closed is not None and " messages=2 delivered=1 " in closed, closed  # one refused, one delivered


@pytest.mark.parametrize(
    "unread",
    [
        b"RCPT TO:<" + b"x" * 600 + b"@example.com>",  # over the command line limit: 500
        "RCPT\u00a0TO:<c@example.com>".encode(),  # a command word that is not ASCII: 500 bad syntax
        b"\xff\xfe RCPT TO:<c@example.com>",  # not even UTF-8: 500 bad syntax
    ],
    ids=["too-long", "non-ascii-verb", "not-utf8-verb"],
)
def test_a_recipient_the_relay_could_not_read_also_refuses_the_whole_message(relay, upstream, unread):
    # aiosmtpd refuses such a line before it knows its command: it may have been a recipient, so the message,
    # which would otherwise go to the other recipients only, is refused as a whole.
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        code, text = c.cmd(unread)
        assert code == 500, (code, text)
        code, text = send_data(c, MSG)
        assert code == 554 and text.startswith("5.7.1") and "could not be read" in text, (code, text)
        # Outside a transaction the same line refuses nothing to come.
        code, text = c.cmd(unread)
        assert code == 500, (code, text)
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250
    assert len(upstream.wait_for_messages(1)) == 1
    time.sleep(0.2)
    assert len(upstream.messages) == 1  # the second transaction's only
    line = relay.wait_for_log("event=message.refused", "unread_commands=1")
    assert line is not None and 'reason="a command could not be read"' in line, relay.describe()


def test_disallowed_recipient_rejects_whole_message_with_smtplib_sendmail(relay, upstream):
    smtp = authed(relay.port)
    try:
        with pytest.raises(smtplib.SMTPDataError) as err:
            smtp.sendmail("sender@example.com", ["good@example.com", "bad@elsewhere.test"], MSG)
        assert err.value.smtp_code == 554
    finally:
        quit_quietly(smtp)
    assert _nothing_forwarded(upstream)


def test_refused_recipient_does_not_poison_the_next_transaction(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<bad@elsewhere.test>")[0] == 550
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 250, text
    assert [m.rcpt_tos for m in upstream.wait_for_messages(1)] == [["good@example.com"]]


@pytest.mark.parametrize(
    "command",
    [
        "MAIL FROM:<>",
        "MAIL FROM:<user%elsewhere.test@example.com>",
        "MAIL FROM:<elsewhere.test!user@example.com>",
        "MAIL FROM:<@relay.example.com:user@example.com>",
    ],
    ids=["null-sender", "percent", "bang", "source-route"],
)
def test_relay_tricks_in_sender_are_refused_5xx(relay, upstream, command):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        code, text = c.cmd(command)
        assert 500 <= code < 600, (code, text)
    assert _nothing_forwarded(upstream, 0.1)


@pytest.mark.parametrize(
    "rcpt",
    [
        "victim%elsewhere.test@example.com",
        "elsewhere.test!victim@example.com",
        "@example.com:victim@elsewhere.test",
        "@elsewhere.test:victim@example.com",
    ],
    ids=["percent", "bang", "source-route-to-foreign", "source-route-via-foreign"],
)
def test_relay_tricks_in_recipient_are_refused_5xx(relay, upstream, rcpt):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{rcpt}>")
        assert 500 <= code < 600, (code, text)
    assert _nothing_forwarded(upstream, 0.1)


def test_domain_matching_is_case_insensitive(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<Sender@EXAMPLE.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@Example.COM>")[0] == 250
        assert c.cmd("RCPT TO:<x@example.ORG>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 250, text
    assert len(upstream.wait_for_messages(1)) == 1


@pytest.mark.parametrize("bad", ["rcpt@ex..ample.com", "rcpt@-example.com", "rcpt@", "rcpt@exa mple.com"])
def test_recipient_refused_as_malformed_also_rejects_whole_message(relay, upstream, bad):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<good@example.com>")[0] == 250
        code, text = c.cmd(f"RCPT TO:<{bad}>")
        assert 500 <= code < 600, (code, text)
        code, text = send_data(c, MSG)
        assert code == 554, (code, text)
    assert _nothing_forwarded(upstream)


def test_trailing_dot_in_address_is_ignored_and_forwarded_without_it(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com.>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@Example.com.>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 250, text
    (message,) = upstream.wait_for_messages(1)
    assert message.mail_from == "sender@example.com"
    assert message.rcpt_tos == ["rcpt@Example.com"]


def test_lookalike_domains_are_not_allowed(relay, upstream):
    for sender in ("a@example.com.evil.test", "a@notexample.com", "a@sub.example.com"):
        stage, code, _ = transaction(relay.port, sender, ["rcpt@example.com"], MSG)
        assert (stage, code) == ("MAIL", 553), sender
    assert _nothing_forwarded(upstream, 0.1)


# -- transactions -------------------------------------------------------------------------------------


def test_several_transactions_on_one_connection(relay, upstream):
    smtp = authed(relay.port)
    try:
        assert smtp.sendmail("one@example.com", ["r1@example.com"], MSG + b"first\r\n") == {}
        assert smtp.sendmail("two@example.com", ["r2@example.org", "r3@example.com"], MSG + b"second\r\n") == {}
        assert smtp.sendmail("three@example.com", ["r4@example.com"], MSG + b"third\r\n") == {}
    finally:
        quit_quietly(smtp)
    msgs = upstream.wait_for_messages(3)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [
        ("one@example.com", ["r1@example.com"]),
        ("two@example.com", ["r2@example.org", "r3@example.com"]),
        ("three@example.com", ["r4@example.com"]),
    ]
    assert all(m.data.endswith(end) for m, end in zip(msgs, (b"first\r\n", b"second\r\n", b"third\r\n"), strict=True))


def test_rset_discards_the_envelope(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<first@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<dropped@example.com>")[0] == 250
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<second@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<kept@example.com>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 250, text
    msgs = upstream.wait_for_messages(1)
    assert [(m.mail_from, m.rcpt_tos) for m in msgs] == [("second@example.com", ["kept@example.com"])]


def test_pipelined_commands_get_one_reply_each_in_order(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        c.send(
            b"MAIL FROM:<sender@example.com>\r\nRCPT TO:<a@example.com>\r\nRCPT TO:<b@nope.test>\r\n"
            b"RCPT TO:<c@example.org>\r\n"
        )
        codes = [c.reply()[0] for _ in range(4)]
        assert codes == [250, 250, 550, 250]
        assert c.cmd("RSET")[0] == 250
    assert _nothing_forwarded(upstream, 0.1)


# -- size ---------------------------------------------------------------------------------------------


def test_message_larger_than_max_message_size_is_refused_552_5_3_4_and_not_forwarded(relay, upstream):
    big = MSG + (b"x" * 70 + b"\r\n") * (MAX_SIZE // 72 + 50)
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = send_data(c, big)
        assert code == 552, text
        assert text.startswith("5.3.4")
    assert _nothing_forwarded(upstream)


def test_mail_from_size_parameter_over_the_limit_is_refused_552_5_3_4(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        code, text = c.cmd(f"MAIL FROM:<sender@example.com> SIZE={MAX_SIZE * 10}")
        assert code == 552, text
        assert text.startswith("5.3.4")


def test_message_just_under_the_limit_is_delivered(relay, upstream):
    body = MSG + (b"y" * 70 + b"\r\n") * ((MAX_SIZE - 2000) // 72)
    assert len(body) < MAX_SIZE
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], body)
    assert (stage, code) == ("DATA", 250), text
    assert upstream.wait_for_messages(1)[0].data.endswith(body)


# -- SMTP smuggling -----------------------------------------------------------------------------------


def _bare_dot_lines(data: bytes) -> list[bytes]:
    """Every "." standing alone between line breaks other than a proper CRLF on both sides.

    The sink has already removed the transparency dot of a stuffed line, so a proper CRLF "." CRLF here
    was ".." on the wire, which is harmless; anything else is a line a lenient server may end DATA on.
    """
    found = []
    for m in re.finditer(rb"\.", data):
        i = m.start()
        before, after = data[max(0, i - 2) : i], data[i + 1 : i + 3]
        starts_line = before.endswith((b"\n", b"\r"))
        ends_line = after.startswith((b"\n", b"\r"))
        if starts_line and ends_line and not (before == b"\r\n" and after == b"\r\n"):
            found.append(data[max(0, i - 2) : i + 3])
    return found


@pytest.mark.parametrize("seq", [b"\n.\n", b"\r.\r", b"\n.\r\n"], ids=["LF.LF", "CR.CR", "LF.CRLF"])
def test_smtp_smuggling_sequences_never_split_the_message(relay, upstream, seq):
    smuggled = (
        b"MAIL FROM:<attacker@example.com>\r\nRCPT TO:<victim@example.com>\r\nDATA\r\n"
        b"Subject: smuggled\r\n\r\nSMUGGLED-PAYLOAD"
    )
    body = b"Subject: innocent\r\n\r\nbefore" + seq + smuggled + seq + b"after\r\n"
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = send_data(c, body)
        assert code == 250, text
        # exactly one reply for the whole message: nothing else is pending
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("QUIT")[0] == 221
    msgs = upstream.wait_for_messages(1)
    time.sleep(0.3)
    msgs = upstream.messages
    assert len(msgs) == 1
    assert (msgs[0].mail_from, msgs[0].rcpt_tos) == ("sender@example.com", ["rcpt@example.com"])
    assert b"SMUGGLED-PAYLOAD" in msgs[0].data and b"after" in msgs[0].data
    assert "attacker@example.com" not in upstream.mail_commands
    # what went upstream cannot be read as two messages by a lenient server either
    assert _bare_dot_lines(msgs[0].data) == []


def test_dot_stuffed_lines_survive_unchanged(relay, upstream):
    original = b"Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    on_wire = b"Subject: dots\r\n\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n"
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = send_data(c, on_wire)
        assert code == 250, text
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1
    assert msgs[0].data.endswith(original)


def test_a_client_that_keeps_sending_refused_commands_cannot_flood_the_log(relay):
    # Every refusal is answered, the first 20 are logged one by one, the rest only counted (disconnect line).
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO flood.test")[0] == 250
        c.send(b"MAIL FROM:<a@example.com>\r\n" * 100)
        assert [c.reply()[0] for _ in range(100)] == [530] * 100
        assert c.auth_plain()[0] == 235  # the session goes on
        assert c.cmd("QUIT")[0] == 221
    line = relay.wait_for_log("event=disconnect", f"peer={peer}")
    assert line is not None and " refusals=100 " in line, line
    lines = [ln for ln in relay.log_lines() if f"peer={peer}" in ln]
    assert sum("event=command.refused" in ln for ln in lines) == 21, lines
    assert "the rest are counted" in [ln for ln in lines if "event=command.refused" in ln][-1]


def test_policy_refusals_are_each_logged_and_not_counted_as_errors(relay, upstream):
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO many.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        c.send(b"".join(b"RCPT TO:<x%d@not-allowed.test>\r\n" % i for i in range(30)))
        assert [c.reply()[0] for _ in range(30)] == [550] * 30
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250
    line = relay.wait_for_log("event=disconnect", f"peer={peer}")
    assert line is not None and "refusals=" not in line, line
    lines = [ln for ln in relay.log_lines() if f"peer={peer}" in ln]
    assert sum("event=rcpt.refused" in ln for ln in lines) == 30 and "event=command.refused" not in str(lines)


def test_an_upstream_421_for_a_recipient_is_a_451_and_the_client_session_goes_on(relay, upstream):
    upstream.configure(refuse_rcpt={"closing@example.com": "421 4.3.0 Service closing transmission channel"})
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<closing@example.com>")[0] == 250
        code, text = send_data(c, MSG)
        assert code == 451 and not text.startswith("421"), (code, text)
        assert c.cmd("NOOP")[0] == 250  # the relay did not close the client's connection
        upstream.configure()
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<closing@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
def test_an_auth_answer_longer_than_a_command_line_is_refused_500_not_an_internal_error(relay, mechanism):
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd(f"AUTH {mechanism}")[0] == 334
        code, text = c.cmd(b"A" * 1100)
        assert (code, text[:5]) == (500, "5.5.6"), (code, text)
        assert c.cmd("NOOP")[0] == 250
        assert c.auth_plain()[0] == 235  # the session goes on
    assert relay.wait_for_log("event=command.refused", f"peer={peer}", "5.5.6"), relay.describe()
    assert "internal.error" not in relay.stdout and "Traceback" not in relay.stdout + relay.stderr


def _mail_line(length: int, size: bool = False) -> str:
    suffix = "@example.com>" + (" SIZE=1000" if size else "")
    return "MAIL FROM:<" + "a" * (length - len("MAIL FROM:<") - len(suffix)) + suffix


def test_the_mail_command_line_limit_is_each_connections_own(relay):
    # 512 bytes, plus 26 for SIZE= once the client said EHLO (RFC 1870); no other client can change it.
    with RawClient(relay.port) as other:
        for _ in range(30):
            assert other.cmd("EHLO other.test")[0] == 250
        with RawClient(relay.port) as c:
            for _ in range(3):
                assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd(_mail_line(900))[0] == 500
            with RawClient(relay.port) as third:  # another client connecting changes nothing either
                assert third.greeting[0] == 220
                assert c.cmd(_mail_line(536, size=True))[0] == 250
                assert c.cmd("RSET")[0] == 250
                assert c.cmd(_mail_line(560, size=True))[0] == 500


def test_an_over_long_auth_answer_sent_in_pieces_gets_one_reply(relay):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN")[0] == 334
        c.send(b"A" * 3000)
        time.sleep(0.3)  # the rest of the line comes later: it must not be read as commands
        c.send(b"B" * 3000 + b"\r\nNOOP\r\n")
        assert c.reply()[:2] == (500, "5.5.6 Authentication exchange line is too long")
        assert c.reply()[0] == 250  # NOOP's, next in line
        assert c.cmd("RSET")[0] == 250


def test_nothing_is_decided_or_logged_for_commands_pipelined_behind_quit(relay, upstream):
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        bad = base64.b64encode(b"\0relayuser\0wrong").decode()
        c.send(f"QUIT\r\nAUTH PLAIN {bad}\r\nMAIL FROM:<x@evil.test>\r\n".encode())
        assert c.reply()[0] == 221
        assert c.closed_by_peer(5)
    assert relay.wait_for_log("event=disconnect", f"peer={peer}"), relay.describe()
    # By session: an earlier test's connection may have had the same client port.
    connects = [ln for ln in relay.log_lines() if "event=connect " in ln and f"peer={peer}" in ln]
    session = re.search(r" session=(\w+)", connects[-1])[1]
    events = [ln.split("event=")[1].split()[0] for ln in relay.log_lines() if f"session={session}" in ln]
    assert events == ["connect", "disconnect"], events


def test_an_upstream_refusal_is_passed_on_as_it_came_and_logged_once(relay, upstream):
    # Its text happens to be one aiosmtpd uses too: still the upstream's reply, not rewritten, one log line.
    upstream.configure(refuse_rcpt={"gone@example.com": "553 5.1.3 Error: malformed address"})
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<gone@example.com>")[0] == 250
        assert send_data(c, MSG) == (553, "5.1.3 Error: malformed address")
    assert relay.wait_for_log("event=forward.failed", f"peer={peer}"), relay.describe()
    lines = [ln for ln in relay.log_lines() if f"peer={peer}" in ln]
    assert not [ln for ln in lines if "event=command.refused" in ln], lines


def test_a_bare_ehlo_is_refused_and_changes_no_limit(relay):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("EHLO")[0] == 501
        assert c.cmd(_mail_line(530, size=True))[0] == 250  # over 512, within 512 + 26 for SIZE=
