"""SMTPUTF8 (RFC 6531): internationalised addresses through the real relay, to upstreams with and without it.

Allowlists match a domain in either form (U-label or punycode), also when the address uses the U-label, which a
client can send only in an SMTPUTF8 transaction. An upstream without SMTPUTF8 gets the message in ASCII (domains
as A-labels) when nothing in it needs UTF-8, and the client gets a 5xx when something does.
"""

from __future__ import annotations

import smtplib

import pytest
from support.client import RawClient, authed, quit_quietly, send_data
from support.relay import CLIENT_PASSWORD, CLIENT_USER

TIMEOUT = 3
UMLAUT_DOMAIN = "bücher.example"
PUNYCODE_DOMAIN = "xn--bcher-kva.example"
BODY = b"Subject: idn\r\nFrom: sender@example.com\r\n\r\nplain ASCII body\r\n"


@pytest.fixture(scope="module")
def utf8_sink(module_stack):
    return module_stack.sink(smtputf8=True)


@pytest.fixture(scope="module")
def ascii_sink(module_stack):
    return module_stack.sink()


def _relay(module_stack, sink):
    # The list names the domain in punycode; the client writes it as a U-label (and the other way round).
    return module_stack.relay(
        sink.port,
        TIMEOUT=str(TIMEOUT),
        ALLOWED_FROM_DOMAINS=f"example.com,{UMLAUT_DOMAIN}",
        ALLOWED_TO_DOMAINS=f"example.com,{PUNYCODE_DOMAIN}",
    )


@pytest.fixture(scope="module")
def to_utf8(module_stack, utf8_sink):
    return _relay(module_stack, utf8_sink)


@pytest.fixture(scope="module")
def to_ascii(module_stack, ascii_sink):
    return _relay(module_stack, ascii_sink)


@pytest.fixture(autouse=True)
def _fresh(utf8_sink, ascii_sink):
    utf8_sink.reset()
    ascii_sink.reset()


def _send(relay, sender: str, rcpts: list[str], body: bytes = BODY) -> dict:
    """smtplib as an application uses it for internationalised addresses: SMTPUTF8 on MAIL FROM."""
    smtp = authed(relay.port)
    try:
        return smtp.sendmail(sender, rcpts, body, mail_options=["SMTPUTF8"])
    finally:
        quit_quietly(smtp)


def _authed_raw(relay) -> RawClient:
    c = RawClient(relay.port)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.auth_plain(CLIENT_USER, CLIENT_PASSWORD)[0] == 235
    return c


def test_ehlo_offers_smtputf8(to_utf8):
    smtp = authed(to_utf8.port)
    try:
        assert smtp.has_extn("smtputf8")
    finally:
        quit_quietly(smtp)


def test_u_label_address_matches_a_punycode_list_and_reaches_an_smtputf8_upstream_as_written(to_utf8, utf8_sink):
    sender, rcpt = "sender@bücher.example", "josé@bücher.example"
    assert _send(to_utf8, sender, [rcpt]) == {}
    (got,) = utf8_sink.wait_for_messages(1)
    assert (got.mail_from, got.rcpt_tos) == (sender, [rcpt])
    assert "SMTPUTF8" in got.mail_options
    assert got.data.endswith(BODY)
    received = got.data[: got.data.index(b"Subject:")]
    assert b" with UTF8SMTPA id " in received, received
    assert to_utf8.wait_for_log("event=rcpt.accepted", f'recipient="{rcpt}"'), to_utf8.stdout[-2000:]


def test_an_upstream_without_smtputf8_gets_ascii_domains_when_nothing_needs_utf8(to_ascii, ascii_sink):
    assert _send(to_ascii, "sender@bücher.example", ["rcpt@bücher.example", "other@example.com"]) == {}
    (got,) = ascii_sink.wait_for_messages(1)
    assert got.mail_from == f"sender@{PUNYCODE_DOMAIN}"
    assert got.rcpt_tos == [f"rcpt@{PUNYCODE_DOMAIN}", "other@example.com"]
    assert "SMTPUTF8" not in got.mail_options
    assert got.data.endswith(BODY)


def test_a_non_ascii_local_part_is_refused_554_5_6_7_when_the_upstream_lacks_smtputf8(to_ascii, ascii_sink):
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _send(to_ascii, "sender@example.com", ["josé@example.com"])
    assert refused.value.smtp_code == 554 and refused.value.smtp_error.startswith(b"5.6.7"), refused.value
    assert to_ascii.wait_for_log("event=forward.failed", "does not offer SMTPUTF8")
    assert not ascii_sink.messages


def test_a_utf8_header_is_refused_554_5_6_9_when_the_upstream_lacks_smtputf8(to_ascii, ascii_sink):
    body = "Subject: Grüße\r\nFrom: sender@example.com\r\n\r\nbody\r\n".encode()
    with pytest.raises(smtplib.SMTPDataError) as refused:
        _send(to_ascii, "sender@example.com", ["rcpt@example.com"], body)
    assert refused.value.smtp_code == 554 and refused.value.smtp_error.startswith(b"5.6.9"), refused.value
    assert not ascii_sink.messages


def test_utf8_in_the_body_only_needs_no_smtputf8_upstream(to_ascii, ascii_sink):
    body = "Subject: ok\r\n\r\nGrüße\r\n".encode()
    assert _send(to_ascii, "sender@example.com", ["rcpt@example.com"], body) == {}
    (got,) = ascii_sink.wait_for_messages(1)
    assert got.data.endswith(body)


@pytest.mark.parametrize("command", ["MAIL", "RCPT"])
def test_a_non_ascii_address_without_smtputf8_is_refused_553_5_6_7(to_utf8, utf8_sink, command):
    with _authed_raw(to_utf8) as c:
        if command == "MAIL":
            code, text = c.cmd("MAIL FROM:<josé@example.com>".encode())
            assert (code, text.split()[0]) == (553, "5.6.7"), (code, text)
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250  # the session goes on
            assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
            assert send_data(c, BODY)[0] == 250
        else:
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            code, text = c.cmd(f"RCPT TO:<rcpt@{UMLAUT_DOMAIN}>".encode())
            assert (code, text.split()[0]) == (553, "5.6.7"), (code, text)
            assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
            assert c.cmd("DATA")[0] == 554  # all or none: the message had a refused recipient
    assert to_utf8.wait_for_log(f"event={command.lower()}.refused", "reason=smtputf8_required")
    assert len(utf8_sink.wait_for_messages(1 if command == "MAIL" else 0, timeout=0.5)) == (command == "MAIL")


@pytest.mark.parametrize(
    ("address", "reply"),
    [
        (b"rcpt\xff\xfe@example.com", "553 5.1.3"),  # not UTF-8
        (b"rcpt@b\xc3\x28cher.example", "553 5.1.3"),
        ("a\uff05b@example.com".encode(), "553 5.7.1"),  # fullwidth percent sign: `a%b` once normalised
        ("a\u202eb@example.com".encode(), "553 5.1.3"),  # a bidi control: not text
        ("a\u00a0b@example.com".encode(), "553 5.1.3"),  # a no-break space
        ("a@exa\u0085mple.com".encode(), "553 5.1.3"),  # NEL, which the address parser used to drop unseen
        ("a@exam\u200cple.com".encode(), "501 5.1.3"),  # a joiner IDNA 2003 would drop: example.com to it
        ('"a b\uff20evil.test"@example.com'.encode(), "553 5.7.1"),  # a fullwidth @ inside quotes
    ],
    ids=[
        "invalid-utf8-local",
        "invalid-utf8-domain",
        "fullwidth-percent",
        "bidi-control",
        "nbsp",
        "nel-in-domain",
        "joiner-in-domain",
        "quoted-fullwidth-at",
    ],
)
def test_hostile_smtputf8_recipients_are_refused_and_refuse_the_message(to_utf8, utf8_sink, address, reply):
    with _authed_raw(to_utf8) as c:
        assert c.cmd("MAIL FROM:<sender@example.com> SMTPUTF8")[0] == 250
        code, text = c.cmd(b"RCPT TO:<" + address + b">")
        assert f"{code} {text.split()[0]}" == reply, (code, text)
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 554
        assert c.cmd("NOOP")[0] == 250
    assert not utf8_sink.wait_for_messages(1, timeout=0.3)
    assert "Traceback" not in to_utf8.all_output()  # internal errors log theirs to stdout


@pytest.mark.parametrize(
    "params",
    [
        " SIZE=\u00b2",  # a superscript two: a digit to Python, not to int()
        " SIZE=\u0661\u0660",  # Arabic-Indic digits
        " \u017fmtputf8",  # long s: SMTPUTF8 once upper-cased
        " BODY=8B\u0131TMIME",  # dotless i
        "\u00a0SIZE=10",  # a no-break space as the separator
        ' "x"',
    ],
)
def test_mail_parameters_that_are_not_printable_ascii_are_a_syntax_error(to_utf8, params):
    with _authed_raw(to_utf8) as c:
        code, text = c.cmd(f"MAIL FROM:<sender@example.com>{params}".encode())
        assert code == 501, (code, text)
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
    assert "internal.error" not in to_utf8.stdout and "Traceback" not in to_utf8.all_output()


@pytest.mark.parametrize("blank", ["\u0085", "\u00a0", "\u3000", "\x1c", "\x0b\x1c"])
def test_auth_with_only_white_space_is_a_syntax_error_before_login(to_utf8, blank):
    with RawClient(to_utf8.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.cmd(f"AUTH {blank}".encode())
        assert code == 501, (code, text)
        assert c.auth_plain(CLIENT_USER, CLIENT_PASSWORD)[0] == 235
    assert "internal.error" not in to_utf8.stdout and "Traceback" not in to_utf8.all_output()


def test_ehlo_name_that_is_not_utf8_is_refused_and_the_session_goes_on(to_utf8):
    with RawClient(to_utf8.port) as c:
        assert c.cmd(b"EHLO bad\xff.name")[0] == 501
        assert c.cmd("EHLO client.test")[0] == 250
