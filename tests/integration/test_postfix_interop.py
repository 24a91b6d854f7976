"""Interoperability with a real mail server: a private Postfix instance (STARTTLS with the test CA's certificate,
Cyrus SASL from a sasldb) is the relay's upstream and relays on to a local sink; clients are smtplib, msmtp and
curl speaking STARTTLS to the relay. Same checks as the core tests: exact envelope and bytes, 250 only after the
upstream took the message, the upstream's 5xx passed on, the relay's own credential problem a 451."""

from __future__ import annotations

import subprocess
import time
import uuid

import pytest
from support.client import RawClient, curl_send, send_data
from support.postfix import Postfix
from support.relay import CLIENT_PASSWORD, CLIENT_USER

PF_USER = "relayup"
PF_PASSWORD = "Pf-Secret-4b1d"
PF_SIZE_LIMIT = 200_000


@pytest.fixture(scope="module")
def chain(module_stack, tls):
    sink = module_stack.sink()
    postfix = Postfix(sink.port, tls.cert_pem, tls.key_pem, PF_USER, PF_PASSWORD, size_limit=PF_SIZE_LIMIT)
    try:
        postfix.start()
        relay = module_stack.relay(
            postfix.port,
            RELAY_HOST="127.0.0.1",
            RELAY_USE_TLS="true",
            RELAY_TLS_CA_FILE=str(tls.ca_pem),
            RELAY_USERNAME=PF_USER,
            RELAY_PASSWORD=PF_PASSWORD,
            USE_TLS="true",
            TLS_CERT_FILE=str(tls.cert_pem),
            TLS_KEY_FILE=str(tls.key_pem),
            MAX_MESSAGE_SIZE=str(4 * PF_SIZE_LIMIT),
            TIMEOUT="15",
        )
        yield sink, postfix, relay
    finally:
        postfix.stop()


def _at_sink(sink, marker: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [m for m in sink.messages if marker.encode() in m.data]
        if found:
            return found
        time.sleep(0.05)
    return []


def _tls_client(relay, tls) -> RawClient:
    c = RawClient(relay.port, timeout=30)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.starttls(tls.client_ctx())[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.auth_plain()[0] == 235
    return c


def test_message_goes_through_postfix_over_starttls_with_sasl_and_arrives_exactly(chain, tls):
    sink, postfix, relay = chain
    marker = uuid.uuid4().hex
    body = (
        f"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: via postfix {marker}\r\n\r\nhello\r\n".encode()
    )
    with _tls_client(relay, tls) as c:
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<other@example.org>")[0] == 250
        code, text = send_data(c, body)
    assert code == 250, text
    (msg,) = _at_sink(sink, marker)
    assert msg.mail_from == "sender@example.com"
    assert sorted(msg.rcpt_tos) == ["other@example.org", "rcpt@example.com"]
    assert msg.data.endswith(body)
    # Postfix's trace header: the relay used TLS (ESMTPS) and authenticated (A)
    assert b"(Postfix) with ESMTPSA" in msg.data and b"using TLSv1." in msg.data, msg.data[:600]
    assert b"(smtp-relay) with ESMTPSA" in msg.data  # our own Received header: client used STARTTLS and AUTH
    log = postfix.log()
    assert (
        f"sasl_method=PLAIN, sasl_username={PF_USER}@" in log or f"sasl_method=LOGIN, sasl_username={PF_USER}@" in log
    )
    assert "TLS connection established from localhost[127.0.0.1]" in log


def test_postfix_5xx_is_passed_on_and_nothing_is_delivered(chain, tls):
    sink, _, relay = chain
    marker = uuid.uuid4().hex
    body = f"Subject: too big {marker}\r\n\r\n".encode() + (b"x" * 998 + b"\r\n") * (PF_SIZE_LIMIT // 1000 + 20)
    with _tls_client(relay, tls) as c:
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = send_data(c, body)
    assert code == 552 and "5.3.4" in text, (code, text)
    assert not _at_sink(sink, marker, timeout=2)


def test_wrong_relay_password_for_postfix_is_passed_on_as_its_535_and_nothing_is_delivered(module_stack, chain, tls):
    sink, postfix, _ = chain
    relay = module_stack.relay(
        postfix.port,
        RELAY_HOST="127.0.0.1",
        RELAY_USE_TLS="true",
        RELAY_TLS_CA_FILE=str(tls.ca_pem),
        RELAY_USERNAME=PF_USER,
        RELAY_PASSWORD="not-the-password",
        TIMEOUT="15",
    )
    marker = uuid.uuid4().hex
    with RawClient(relay.port, timeout=30) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        code, text = send_data(c, f"Subject: {marker}\r\n\r\nx\r\n".encode())
    assert code == 535 and "5.7.8" in text, (code, text)  # Postfix's own refusal of the login, passed on
    assert not _at_sink(sink, marker, timeout=2)
    assert "not-the-password" not in relay.all_output()


def test_msmtp_sends_through_the_relay_and_postfix(chain, tls, tmp_path, require_tool):
    sink, _, relay = chain
    msmtp = require_tool("msmtp")
    marker = uuid.uuid4().hex
    config = tmp_path / "msmtprc"
    config.write_text(
        "account relay\n"
        "host 127.0.0.1\n"
        f"port {relay.port}\n"
        "tls on\n"
        "tls_starttls on\n"
        f"tls_trust_file {tls.ca_pem}\n"
        "auth plain\n"
        f"user {CLIENT_USER}\n"
        f"password {CLIENT_PASSWORD}\n"
        "from sender@example.com\n"
        "account default : relay\n"
    )
    config.chmod(0o600)
    message = f"From: sender@example.com\nTo: rcpt@example.com\nSubject: msmtp {marker}\n\nvia msmtp\n"
    out = subprocess.run(
        [msmtp, "-C", str(config), "rcpt@example.com"],
        input=message,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    (msg,) = _at_sink(sink, marker)
    assert msg.mail_from == "sender@example.com" and msg.rcpt_tos == ["rcpt@example.com"]
    assert b"via msmtp\r\n" in msg.data


def test_curl_sends_through_the_relay_and_postfix(chain, tls, tmp_path, require_tool):
    sink, _, relay = chain
    curl = require_tool("curl")
    marker = uuid.uuid4().hex
    mail = tmp_path / "mail.txt"
    mail.write_bytes(f"From: sender@example.com\r\nSubject: curl {marker}\r\n\r\nvia curl\r\n".encode())
    out = curl_send(curl, relay.port, mail, "rcpt@example.com", cacert=tls.ca_pem, max_time=60)
    assert out.returncode == 0, out.stderr
    (msg,) = _at_sink(sink, marker)
    assert msg.data.endswith(mail.read_bytes())
