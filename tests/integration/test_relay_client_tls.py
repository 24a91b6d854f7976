"""USE_TLS: the relay offers STARTTLS and requires it before AUTH and MAIL; real clients (smtplib, swaks,
curl) deliver over it with the test CA."""

from __future__ import annotations

import time

import pytest
from support.client import RawClient, curl_send, login, quit_quietly, send_data, swaks_send
from support.relay import CLIENT_PASSWORD

MSG = b"Subject: over starttls\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def upstream(module_stack):
    return module_stack.sink()


@pytest.fixture(scope="module")
def relay(module_stack, upstream, tls):
    return module_stack.relay(
        upstream.port, USE_TLS="true", TLS_CERT_FILE=str(tls.cert_pem), TLS_KEY_FILE=str(tls.key_pem)
    )


@pytest.fixture(autouse=True)
def _fresh_upstream(upstream):
    upstream.reset()
    yield
    upstream.reset()


def _ehlo_keywords(text: str) -> set[str]:
    return {line.split()[0].upper() for line in text.splitlines()[1:] if line.strip()}


def test_before_starttls_ehlo_offers_starttls_but_not_auth(relay):
    with RawClient(relay.port) as c:
        code, text = c.cmd("EHLO client.test")
        assert code == 250
        keywords = _ehlo_keywords(text)
        assert "STARTTLS" in keywords
        assert "AUTH" not in keywords
        assert {"SIZE", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"} <= keywords


def test_auth_before_starttls_is_refused(relay):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.auth_plain()
        assert 500 <= code < 600, (code, text)


def test_mail_before_starttls_is_refused_530(relay, upstream):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        code, text = c.cmd("MAIL FROM:<sender@example.com>")
        assert code == 530, text
    time.sleep(0.2)
    assert upstream.messages == []


def test_after_starttls_auth_is_offered_and_starttls_is_not(relay, tls):
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.starttls(tls.client_ctx(), server_hostname="localhost")[0] == 220
        code, text = c.cmd("EHLO client.test")
        assert code == 250
        keywords = _ehlo_keywords(text)
        assert "STARTTLS" not in keywords
        assert "AUTH" in keywords
        auth_line = next(line for line in text.splitlines() if line.upper().startswith("AUTH"))
        assert {"PLAIN", "LOGIN"} <= set(auth_line.upper().split()[1:])
        assert c.auth_plain()[0] == 235


@pytest.mark.parametrize("mech", ["PLAIN", "LOGIN"])
def test_smtplib_delivers_over_starttls(relay, upstream, tls, mech):
    import smtplib

    smtp = smtplib.SMTP("127.0.0.1", relay.port, timeout=15)
    try:
        smtp.ehlo("client.test")
        smtp.starttls(context=tls.client_ctx())
        smtp.ehlo("client.test")
        code, text = login(smtp, mech=mech)
        assert code == 235, text
        assert smtp.sendmail("sender@example.com", ["rcpt@example.com"], MSG) == {}
    finally:
        quit_quietly(smtp)
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1 and msgs[0].data.endswith(MSG)


def test_every_log_line_of_a_connection_carries_one_session_id_across_starttls(relay, upstream, tls):
    import smtplib

    smtp = smtplib.SMTP("127.0.0.1", relay.port, timeout=15)
    peer = f"127.0.0.1:{smtp.sock.getsockname()[1]}"
    try:
        smtp.ehlo("client.test")
        time.sleep(0.3)  # before STARTTLS: counted in the connection's duration
        smtp.starttls(context=tls.client_ctx())
        smtp.ehlo("client.test")
        assert login(smtp)[0] == 235
        assert smtp.sendmail("sender@example.com", ["rcpt@example.com"], MSG) == {}
    finally:
        quit_quietly(smtp)
    assert relay.wait_for_log("event=disconnect", f"peer={peer}"), relay.describe()
    lines = [line for line in relay.log_lines() if f"peer={peer}" in line]
    events = [line.split("event=")[1].split()[0] for line in lines]
    assert events[0] == "connect" and "starttls" in events and events[-1] == "disconnect", lines
    assert len({line.split("session=")[1].split()[0] for line in lines}) == 1, lines
    assert "messages=1" in lines[-1] and float(lines[-1].split("duration=")[1].split()[0]) >= 0.3, lines[-1]


def test_swaks_delivers_over_starttls_with_verified_certificate(relay, upstream, tls, require_tool):
    swaks = require_tool("swaks")
    out = swaks_send(
        swaks,
        relay.port,
        "--tls",
        "--tls-verify",
        "--tls-ca-path",
        str(tls.ca_pem),
        "--auth",
        "LOGIN",
        "--to",
        "rcpt@example.com",
        "--header",
        "Subject: swaks tls",
        "--body",
        "swaks over tls",
    )
    assert out.returncode == 0, out.stdout + out.stderr
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1 and b"swaks over tls" in msgs[0].data
    assert CLIENT_PASSWORD not in relay.all_output()


def test_curl_delivers_over_starttls_with_ssl_reqd_and_cacert(relay, upstream, tls, tmp_path, require_tool):
    curl = require_tool("curl")
    mail = tmp_path / "mail.eml"
    body = b"From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: curl tls\r\n\r\ncurl over tls\r\n"
    mail.write_bytes(body)
    out = curl_send(curl, relay.port, mail, "rcpt@example.com", "other@example.org", cacert=tls.ca_pem)
    assert out.returncode == 0, out.stdout + out.stderr
    msgs = upstream.wait_for_messages(1)
    assert len(msgs) == 1
    assert msgs[0].rcpt_tos == ["rcpt@example.com", "other@example.org"]
    assert msgs[0].data.endswith(body)


def test_curl_without_ssl_cannot_authenticate(relay, upstream, tmp_path, require_tool):
    curl = require_tool("curl")
    mail = tmp_path / "mail.eml"
    mail.write_bytes(b"Subject: plain\r\n\r\nno tls\r\n")
    out = curl_send(curl, relay.port, mail, "rcpt@example.com")
    assert out.returncode != 0
    time.sleep(0.2)
    assert upstream.messages == []


def _two_slot_tls_relay(stack, upstream, tls, timeout: str):
    """A STARTTLS relay with two connection slots and a short TIMEOUT: stalled clients fill it at once."""
    return stack.relay(
        upstream.port,
        USE_TLS="true",
        TLS_CERT_FILE=str(tls.cert_pem),
        TLS_KEY_FILE=str(tls.key_pem),
        MAX_CONNECTIONS="2",
        TIMEOUT=timeout,
    )


@pytest.mark.parametrize("after_starttls", [b"", b"\x16\x03\x01\x00"])  # nothing, or a ClientHello cut short
def test_a_client_that_never_finishes_the_tls_handshake_is_cut_off_and_frees_its_slot(
    stack, upstream, tls, after_starttls
):
    # After "220 Ready to start TLS" the connection belongs to the TLS layer until the handshake completes. A
    # client that stalls there is cut off at TIMEOUT like any idle client, and its MAX_CONNECTIONS slot must come
    # back: otherwise a few such clients shut everyone out until a restart.
    relay = _two_slot_tls_relay(stack, upstream, tls, timeout="1")
    stalled = []
    for _ in range(2):
        c = RawClient(relay.port)
        assert c.cmd("EHLO stall.test")[0] == 250
        assert c.cmd("STARTTLS")[0] == 220
        c.send(after_starttls) if after_starttls else None
        stalled.append(c)
    try:
        with RawClient(relay.port) as c:
            assert c.greeting[0] == 421  # both slots are taken while the two stall
        for c in stalled:
            assert c.closed_by_peer(5), "a stalled handshake was not cut off"
        deadline = time.monotonic() + 3
        while True:
            with RawClient(relay.port) as c:
                if c.greeting[0] == 220:
                    break
            assert time.monotonic() < deadline, "the stalled clients still hold their slots:\n" + relay.describe()
            time.sleep(0.1)
        assert len([ln for ln in relay.log_lines() if "event=disconnect" in ln]) >= 2, relay.describe()
        assert "Traceback" not in relay.all_output(), relay.describe()
    finally:
        for c in stalled:
            c.close()


def test_a_tls_client_that_goes_quiet_is_cut_off_within_timeout_not_asyncios_30_seconds(stack, upstream, tls):
    # After the idle timeout the relay closes the TLS session and waits for the client's close_notify. A client
    # that never answers must not hold its slot for asyncio's default 30 s of that wait on top of TIMEOUT.
    relay = _two_slot_tls_relay(stack, upstream, tls, timeout="2")
    quiet = []
    for _ in range(2):
        c = RawClient(relay.port)
        assert c.cmd("EHLO quiet.test")[0] == 250
        assert c.starttls(tls.client_ctx(), server_hostname="localhost")[0] == 220
        assert c.cmd("EHLO quiet.test")[0] == 250
        quiet.append(c)  # from here on it reads and writes nothing, and keeps the connection open
    try:
        started = time.monotonic()
        while True:
            with RawClient(relay.port) as c:
                if c.greeting[0] == 220:
                    break
            assert time.monotonic() - started < 10, "quiet TLS clients still hold their slots:\n" + relay.describe()
            time.sleep(0.2)
        assert "Traceback" not in relay.all_output(), relay.describe()
    finally:
        for c in quiet:
            c.close()


def test_starttls_inside_tls_is_refused_and_the_session_goes_on(stack, upstream, tls):
    # RFC 3207 4.2. aiosmtpd would start a second TLS layer; a client that stalled in it held its connection
    # slot for good.
    relay = stack.relay(
        upstream.port,
        USE_TLS="true",
        TLS_CERT_FILE=str(tls.cert_pem),
        TLS_KEY_FILE=str(tls.key_pem),
        MAX_CONNECTIONS="1",
    )
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.starttls(tls.client_ctx(), server_hostname="localhost")[0] == 220
        assert "STARTTLS" not in c.cmd("EHLO client.test")[1]
        code, text = c.cmd("STARTTLS")
        assert (code, text[:5]) == (503, "5.5.1"), (code, text)
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250
    assert relay.wait_for_log("event=disconnect", f"peer={peer}"), relay.describe()
    with RawClient(relay.port) as c:  # the only slot is free again
        assert c.greeting[0] == 220
    assert "Traceback" not in relay.stdout + relay.stderr


def test_a_client_gone_over_tls_after_its_message_went_upstream_has_it_delivered_once(relay, upstream, tls):
    # Over TLS the relay's connection closes when the client's does (no half-open TLS): a delivery whose end of
    # data already went upstream still finishes, once, and its reply is logged as lost; the session ends with
    # one disconnect line.
    upstream.configure(data_delay=1.0)
    c = RawClient(relay.port)
    try:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.starttls(tls.client_ctx(), server_hostname="localhost")[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<tls-leaver@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<rcpt@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(MSG + b".\r\n")
        time.sleep(0.3)  # the relay waits on the slow upstream's reply to the end of data
    finally:
        c.close()
    assert [m.mail_from for m in upstream.wait_for_messages(1)] == ["tls-leaver@example.com"]
    assert relay.wait_for_log("event=forward.delivered", "sender=tls-leaver@example.com"), relay.describe()
    assert relay.wait_for_log("event=reply.lost", 'reply="250'), relay.describe()
    session = relay.wait_for_log("event=forward.delivered").split("session=")[1].split()[0]
    assert relay.wait_for_log("event=disconnect", f"session={session}"), relay.describe()
    time.sleep(0.3)
    assert relay.stdout.count(f"event=disconnect session={session}") == 1
    assert "event=forward.cancelled" not in relay.all_output()
    assert "Traceback" not in relay.all_output()
