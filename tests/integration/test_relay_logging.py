"""Logging: one line per event to stdout and LOG_FILE, each with a session id and the peer; the username
but never a password; client text escaped so CR/LF cannot forge a line; JSON format."""

from __future__ import annotations

import base64
import json
import re
import time

import pytest
from support.client import RawClient, plain_b64, send_data
from support.relay import CLIENT_PASSWORD, CLIENT_USER

MSG = b"Subject: log me\r\n\r\nlogged body\r\n"
WRONG_PASSWORD = "Wrong-Pw-Zq81"
SESSION_KEY = re.compile(r"\b(?:session|session_id|sid)=(\S+)")


@pytest.fixture(scope="module")
def upstream(module_stack):
    return module_stack.sink()


@pytest.fixture(scope="module")
def relays(module_stack, upstream):
    """Three relays on one upstream, started together: INFO text, DEBUG text, INFO json."""
    out = {
        "text": module_stack.relay(upstream.port, wait=False),
        "debug": module_stack.relay(upstream.port, wait=False, LOG_LEVEL="DEBUG"),
        "json": module_stack.relay(upstream.port, wait=False, LOG_FORMAT="json"),
    }
    for r in out.values():
        r.wait_ready()
    return out


@pytest.fixture
def relay(relays):
    return relays["text"]


def _session_lines(relay, peer: str, needle: str, timeout: float = 5.0) -> tuple[str, list[str]]:
    """Wait for a line with the peer and needle; return the session id and every line of that session."""
    line = relay.wait_for_log(peer, needle, timeout=timeout)
    assert line is not None, f"no log line with {peer} and {needle!r}\n{relay.describe()}"
    m = SESSION_KEY.search(line)
    assert m, f"no session id in {line!r}"
    sid = m.group(1)
    return sid, [
        ln for ln in relay.log_lines() if re.search(rf"\b(?:session|session_id|sid)={re.escape(sid)}(\s|$)", ln)
    ]


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r'(\w[\w.]*)=("(?:[^"\\]|\\.)*"|\S+)', line))


def _one_delivery(relay, rcpts=("a@example.com", "b@example.org")) -> str:
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<logged-sender@example.com>")[0] == 250
        for r in rcpts:
            assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
        assert send_data(c, MSG)[0] == 250
        assert c.cmd("QUIT")[0] == 221
    return peer


def test_session_events_are_logged_with_session_id_and_peer(relay):
    peer = _one_delivery(relay)
    time.sleep(0.3)
    _sid, lines = _session_lines(relay, peer, CLIENT_USER)
    assert len(lines) >= 5, lines  # connection, auth, mail, 2 x rcpt, forward (at least)
    for ln in lines:
        assert "127.0.0.1" in ln, f"line without the peer: {ln!r}"
    joined = "\n".join(lines)
    assert "logged-sender@example.com" in joined
    assert "a@example.com" in joined and "b@example.org" in joined
    assert any(CLIENT_USER in ln and "auth" in ln.lower() for ln in lines), lines


def test_forward_result_line_has_upstream_reply_size_recipient_count_and_duration(relay):
    peer = _one_delivery(relay)
    _sid, lines = _session_lines(relay, peer, CLIENT_USER)
    forward = [ln for ln in lines if "queued as sink" in ln or re.search(r"\b250\b", ln)]
    forward = [ln for ln in forward if any(k in ln.lower() for k in ("size", "bytes"))]
    assert forward, lines
    fields = {k.lower(): v for k, v in _fields(forward[-1]).items()}
    sizes = [int(v) for k, v in fields.items() if ("size" in k or "bytes" in k) and v.isdigit()]
    assert sizes and max(sizes) >= len(MSG), fields
    counts = [v for k, v in fields.items() if "rcpt" in k or "recipient" in k]
    assert "2" in counts, fields
    assert any("duration" in k or "elapsed" in k or k.endswith("_ms") for k in fields), fields


def test_log_file_gets_the_same_lines_as_stdout(relay):
    peer = _one_delivery(relay)
    _sid, lines = _session_lines(relay, peer, CLIENT_USER)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(ln in relay.log_file for ln in lines):
        time.sleep(0.05)
    file_lines = set(relay.log_file.splitlines())
    missing = [ln for ln in lines if ln not in file_lines]
    assert not missing, missing


def test_refused_sender_warning_names_domain_user_and_peer(relay):
    with RawClient(relay.port) as c:
        port = c.sock.getsockname()[1]
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<x@refused-domain-for-log.test>")[0] == 553
    line = relay.wait_for_log("WARNING", "refused-domain-for-log.test")
    assert line is not None, relay.describe()
    assert CLIENT_USER in line
    assert f"127.0.0.1:{port}" in line or "127.0.0.1" in line


def test_auth_results_log_the_username_and_never_a_password(relay):
    with RawClient(relay.port) as c:
        port = c.sock.getsockname()[1]
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64("auth-fail-user", WRONG_PASSWORD))[0] == 535
        # AUTH LOGIN, right user, wrong password
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(base64.b64encode(CLIENT_USER.encode()).decode())[0] == 334
        code, text = c.cmd(base64.b64encode(WRONG_PASSWORD.encode()).decode())
        assert code == 535 and text.startswith("5.7.8"), (code, text)
        assert c.auth_plain()[0] == 235
    peer = f"127.0.0.1:{port}"
    assert relay.wait_for_log(peer, "auth-fail-user") is not None, relay.describe()
    failure = relay.wait_for_log("auth-fail-user")
    assert "WARNING" in failure or "fail" in failure.lower(), failure
    time.sleep(0.2)
    _assert_no_secrets(relay)


def _assert_no_secrets(relay):
    everything = relay.all_output()
    for secret in (CLIENT_PASSWORD, WRONG_PASSWORD):
        assert secret not in everything
        assert base64.b64encode(secret.encode()).decode() not in everything
    for user in (CLIENT_USER, "auth-fail-user"):
        for pw in (CLIENT_PASSWORD, WRONG_PASSWORD):
            assert plain_b64(user, pw) not in everything


def test_no_password_in_the_logs_even_at_debug_level(relays):
    relay = relays["debug"]
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, WRONG_PASSWORD))[0] == 535
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd(base64.b64encode(CLIENT_USER.encode()).decode())[0] == 334
        assert c.cmd(base64.b64encode(CLIENT_PASSWORD.encode()).decode())[0] == 235
        assert c.cmd("MAIL FROM:<s@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<r@example.com>")[0] == 250
        assert send_data(c, MSG)[0] == 250
    time.sleep(0.3)
    _assert_no_secrets(relay)


def test_credentials_read_as_unknown_commands_never_reach_the_log(relay):
    """AUTH data the relay reads as commands (AUTH LOGIN pipelined before EHLO, the lines after a cancelled
    exchange, a bare AUTH PLAIN token) gets aiosmtpd's `500 ... command "..." not recognized`, which echoes the
    line upper-cased: the log masks it, as the upper-cased base64 gives the password back in a few guesses."""
    user64 = base64.b64encode(CLIENT_USER.encode()).decode()
    password64 = base64.b64encode(CLIENT_PASSWORD.encode()).decode()
    with RawClient(relay.port) as c:
        c.send(f"AUTH LOGIN\r\n{user64}\r\n{password64}\r\n")
        assert [c.reply()[0] for _ in range(3)] == [503, 500, 500]
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH LOGIN")[0] == 334
        assert c.cmd("*")[0] == 501  # cancelled (RFC 4954): the next line is a command
        assert c.cmd(password64)[0] == 500
        assert c.cmd(plain_b64(CLIENT_USER, CLIENT_PASSWORD))[0] == 500
    assert relay.wait_for_log("event=disconnect", "refusals=") is not None, relay.describe()
    everything = relay.all_output()
    assert everything.count('command \\"...\\" not recognized') + everything.count('command "..." not') >= 4
    for secret in (password64, plain_b64(CLIENT_USER, CLIENT_PASSWORD)):
        assert secret.upper() not in everything.upper()
    _assert_no_secrets(relay)


def test_crlf_in_client_text_cannot_forge_a_log_line(relay):
    forged_user = f"evil\r\nFORGED-LINE level=INFO event=auth outcome=success user={CLIENT_USER}\nFORGED-TWO x=1"
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64(forged_user, "nope"))[0] == 535
        assert c.auth_plain()[0] == 235
        # a bare CR inside a command line is not a line end for SMTP, but must not become one in the log
        c.cmd(b"MAIL FROM:<x@forged-cr.test\rFORGED-THREE level=ERROR>")
        c.cmd(b"EHLO host\rFORGED-FOUR level=ERROR")
    assert relay.wait_for_log("FORGED-LINE") is not None, "the attempt was not logged at all"
    time.sleep(0.2)
    for source in (relay.stdout, relay.log_file):
        for line in source.splitlines():
            assert not re.match(r"\s*FORGED", line), f"forged log line: {line!r}"
            assert "\r" not in line, f"raw CR in log line: {line!r}"


def test_json_log_format_writes_one_json_object_per_line(relays):
    relay = relays["json"]
    peer = _one_delivery(relay)
    time.sleep(0.3)
    lines = [ln for ln in relay.stdout.splitlines() if ln.strip()]
    assert lines
    docs = []
    for ln in lines:
        try:
            docs.append(json.loads(ln))
        except json.JSONDecodeError:
            pytest.fail(f"not JSON: {ln!r}")
    session_docs = [d for d in docs if peer in json.dumps(d)]
    assert any(CLIENT_USER in json.dumps(d) for d in session_docs), session_docs
    assert all(isinstance(d, dict) for d in docs)
    # numbers stay numbers, so that a log pipeline can sum and compare them
    delivered = [d for d in session_docs if d["event"] == "forward.delivered"]
    closed = [d for d in session_docs if d["event"] == "disconnect"]
    assert delivered and closed, session_docs
    for doc in delivered + closed:
        assert isinstance(doc["duration"], float) and doc["duration"] >= 0, doc
    assert (closed[-1]["messages"], closed[-1]["delivered"]) == (1, 1), closed
    assert isinstance(delivered[0]["size"], int) and isinstance(delivered[0]["recipients"], int), delivered
    assert CLIENT_PASSWORD not in relay.all_output()
    file_lines = [ln for ln in relay.log_file.splitlines() if ln.strip()]
    assert file_lines and all(json.loads(ln) for ln in file_lines)


def test_every_refusal_the_smtp_library_makes_is_logged_with_its_reply(stack, upstream):
    # Refusals decided before the relay's own checks (by aiosmtpd: SIZE, syntax, sequence, not authenticated)
    # and while the body is read (too big, line too long) each leave a line saying why.
    relay = stack.relay(upstream.port, MAX_MESSAGE_SIZE="2048")
    with RawClient(relay.port) as c:
        peer = f"127.0.0.1:{c.sock.getsockname()[1]}"
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<early@example.com>")[0] == 530
        assert c.auth_plain()[0] == 235
        assert c.cmd("RCPT TO:<a@example.com>")[0] == 503  # no MAIL yet
        assert c.cmd("MAIL FROM:<big@example.com> SIZE=999999")[0] == 552
        assert c.cmd("FROBNICATE")[0] == 500
        assert c.cmd("MAIL FROM:<big@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<a@example.com>")[0] == 250
        assert send_data(c, b"Subject: big\r\n\r\n" + (b"x" * 80 + b"\r\n") * 40)[0] == 552
        assert c.cmd("MAIL FROM:<long@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<a@example.com>")[0] == 250
        assert send_data(c, b"Subject: long\r\n\r\n" + b"y" * 1200 + b"\r\n")[0] == 500
        assert c.cmd("QUIT")[0] == 221
    _sid, lines = _session_lines(relay, peer, "event=disconnect")
    refused = [_fields(line) for line in lines if "event=command.refused" in line or "event=data.refused" in line]
    assert [(f["event"], f.get("reply", f.get("reason", ""))[:4]) for f in refused] == [
        ("command.refused", '"530'),  # MAIL before AUTH
        ("command.refused", '"503'),
        ("command.refused", '"552'),
        ("command.refused", '"500'),
        ("data.refused", '"ove'),
        ("data.refused", '"a l'),
    ], lines
    assert refused[0]["command"] == "MAIL" and refused[0]["reason"] == '"not authenticated"', refused[0]
    assert all("level=WARNING" in line for line in lines if ".refused " in line)
    assert " refusals=4 " in lines[-1], lines[-1]  # disconnect: the four command.refused
    assert not [m for m in upstream.messages if m.mail_from in ("big@example.com", "long@example.com")]


def test_debug_level_adds_the_upstream_sessions_opened_and_closed(stack):
    # What an operator turns DEBUG on for: when the relay opens upstream sessions, and why it closes them.
    sink = stack.sink()
    relays = {level: stack.relay(sink.port, LOG_LEVEL=level) for level in ("DEBUG", "INFO")}
    for relay in relays.values():
        _one_delivery(relay)
        assert relay.stop() == 0
    debug = relays["DEBUG"]
    opened = debug.wait_for_log("level=DEBUG event=upstream.opened", f"upstream=127.0.0.1:{sink.port}", "tls=none")
    assert opened is not None and " duration=" in opened, debug.describe()
    closed = debug.wait_for_log("level=DEBUG event=upstream.closed", "reason=shutdown", "messages=1")
    assert closed is not None, debug.describe()
    assert "event=upstream." not in relays["INFO"].stdout


def test_a_message_with_hundreds_of_refused_recipients_is_logged_on_one_short_line(relay):
    # Client-controlled: 900 refused recipients of 400 characters each must not make a 360 KB line (with WORKERS,
    # lines over the pipe's atomic write size could mix with other workers' lines).
    long_local = "z" * 380
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<many-refused@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<ok@example.com>")[0] == 250
        c.send(b"".join(f"RCPT TO:<{long_local}{n}@evil.test>\r\n".encode() for n in range(900)))
        for _ in range(900):
            assert c.reply()[0] == 550
        assert send_data(c, MSG)[0] == 554
    line = relay.wait_for_log("event=message.refused", "sender=many-refused@example.com")
    assert line is not None and " refused_count=900 " in line, relay.describe()
    assert len(line.encode()) < 4000, len(line.encode())
    # Control characters, which escaping makes four times longer (six in JSON), do not make it long either.
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<control-refused@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<ok@example.com>")[0] == 250
        for n in range(6):
            assert c.cmd(b"RCPT TO:<" + b"\x01" * 240 + f"{n}@evil.test>".encode())[0] >= 500
        assert send_data(c, MSG)[0] == 554
    line = relay.wait_for_log("event=message.refused", "sender=control-refused@example.com")
    assert line is not None and len(line.encode()) < 4000, line and len(line.encode())


def test_refused_smtputf8_recipients_stay_short_once_escaped_in_json(relays):
    # JSON writes a character beyond the BMP as a 12-byte surrogate pair: 5 recipients of 120 such characters
    # used to make a 4.8 KB line, over the size a pipe writes whole.
    relay = relays["json"]
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<astral-refused@example.com> SMTPUTF8")[0] == 250
        assert c.cmd("RCPT TO:<ok@example.com>")[0] == 250
        for n in range(5):
            assert c.cmd(f"RCPT TO:<{chr(0x1F4A9) * 120}@e{n}.evil.test>".encode())[0] == 550
        assert send_data(c, MSG)[0] == 554
    line = relay.wait_for_log('"event": "message.refused"', "astral-refused@example.com")
    assert line is not None and len(line.encode()) < 1000, line and len(line.encode())
    doc = json.loads(line)
    assert doc["refused_count"] == 5 and doc["refused"].endswith("...")
