"""Stateful fuzzing of the live relay (hypothesis RuleBasedStateMachine): random sequences of SMTP commands and
data, valid and not, over one relay and one sink for the whole run. After every step: every reply line is a
well-formed SMTP reply, a fresh client is answered, and the sink holds only messages whose envelope the policy
allows and whose client got 250, each exactly once. FUZZ_EXAMPLES=N (default 200) and
FUZZ_STEPS=N (default 30) run longer."""

from __future__ import annotations

import base64
import os
import re
import socket
import time
import uuid

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support.client import plain_b64
from support.faults import record
from support.relay import CLIENT_PASSWORD, CLIENT_USER

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
STEPS = int(os.environ.get("FUZZ_STEPS", "30"))
MAX_SIZE = 4096
REPLY_LINE = re.compile(rb"^(\d{3})([ -])[^\r\n]*$")
UNREAD = ("Command line too long", "bad syntax")  # refusals of a line the relay could not read
SENDER_DOMAINS = {"example.com"}
RCPT_DOMAINS = {"example.com", "example.org"}

RIG: dict = {}

good_senders = st.sampled_from(["sender@example.com", "Sender@EXAMPLE.com", "a.b@example.com."])
good_rcpts = st.sampled_from(["rcpt@example.com", "x@example.org", "R@Example.Org"])
bad_addresses = st.sampled_from(
    [
        "x@evil.test",
        "x@example.com.evil.test",
        "x%evil.test@example.com",
        "evil.test!x@example.com",
        '"x@evil.test"@example.com',
        "@example.com:x@evil.test",
        "",
        "x@[127.0.0.1]",
        "x@sub.example.com",
        "no-domain",
        "x@",
        "@example.com",
    ]
)
junk_text = st.text(
    alphabet=st.characters(min_codepoint=1, max_codepoint=0x2FF, exclude_characters="\r\n"), max_size=80
)
addresses = st.one_of(good_senders, good_rcpts, bad_addresses, junk_text)
verbs = st.sampled_from(
    [
        "NOOP",
        "RSET",
        "HELP",
        "VRFY x",
        "EXPN x",
        "HELO h",
        "EHLO h",
        "STARTTLS",
        "AUTH",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT 1",
    ]
)
junk_lines = st.one_of(
    verbs,
    st.builds(lambda v, a: f"{v} {a}", verbs, junk_text),
    st.binary(max_size=700).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
)
body_lines = st.lists(
    st.one_of(
        st.sampled_from(["", ".", "..", ". ", ".x", "From: a@example.com", "Subject: fuzz", "\x00", "ü"]),
        st.text(alphabet=st.characters(min_codepoint=1, max_codepoint=0x7FF, exclude_characters="\r\n"), max_size=120),
        st.integers(min_value=990, max_value=1010).map(lambda n: "L" * n),
    ),
    max_size=12,
)


def _allowed(address: str, domains: set[str]) -> bool:
    local, at, domain = address.rpartition("@")
    if not at or not local or any(c in local for c in '%!"@') or local.startswith("@"):
        return False
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in address):
        return False
    return domain.lower().rstrip(".") in domains


def _norm(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local}@{domain.lower().rstrip('.')}"


class Conn:
    """A byte-level client that checks every reply line's form."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        self.closed = False
        self.last = ""  # the text of the last reply read
        code, _ = self.reply()
        assert code == 220

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            self.closed = True

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                try:
                    chunk = self.sock.recv(65536)
                except TimeoutError:
                    raise AssertionError(f"no reply within 10 s; buffer {self.buf!r}") from None
                except OSError:
                    chunk = b""
                if not chunk:
                    self.closed = True
                    assert not self.buf, f"partial reply line {self.buf!r}"
                    return 0, "closed"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            m = REPLY_LINE.match(line)
            assert m, f"malformed reply line {line!r}"
            assert not lines or m.group(1) == lines[0][:3], f"code changed inside a multi-line reply: {lines} {line!r}"
            lines.append(line)
            if m.group(2) == b" ":
                self.last = b"\n".join(lines).decode("utf-8", "replace")
                return int(m.group(1)), self.last

    def cmd(self, line: bytes | str) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode("utf-8", "surrogateescape")
        self.send(line + b"\r\n")
        if self.closed:
            return 0, "closed"
        return self.reply()

    def close(self) -> None:
        self.sock.close()


class RelayFuzz(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        # Each example checks only its own messages, so that a replay (while shrinking) sees the same state.
        self.sink_base = len(RIG["sink"].messages)
        self.acknowledged: dict[str, tuple[str, list[str]]] = {}

    @initialize()
    def connect(self) -> None:
        self.conn = Conn(RIG["relay"].port)
        self.authed = False
        self.sender: str | None = None
        self.rcpts: list[str] = []
        self.refused = 0
        self.steps = 0

    def _fresh_transaction(self) -> None:
        self.sender, self.rcpts, self.refused = None, [], 0

    def _check(self, code: int) -> None:
        if self.sender is not None and any(t in self.conn.last for t in UNREAD):
            self.refused += 1  # a line the relay could not read may have been a recipient: the message is refused
        self.conn.last = ""
        if code == 0 or self.conn.closed:
            self.conn.close()
            self.connect()
        RIG["replies"] += 1

    @rule(name=st.one_of(st.just("client.test"), junk_text))
    def ehlo(self, name: str) -> None:
        code, _ = self.conn.cmd(f"EHLO {name}")
        assert code in (250, 501, 500, 0), code
        if code == 250:
            self._fresh_transaction()
        self._check(code)

    @rule(good=st.booleans(), mech=st.sampled_from(["PLAIN", "LOGIN"]))
    def auth(self, good: bool, mech: str) -> None:
        password = CLIENT_PASSWORD if good else "wrong"
        if mech == "PLAIN":
            code, _ = self.conn.cmd("AUTH PLAIN " + base64.b64encode(f"\0{CLIENT_USER}\0{password}".encode()).decode())
        else:
            code, _ = self.conn.cmd("AUTH LOGIN")
            if code == 334:
                code, _ = self.conn.cmd(base64.b64encode(CLIENT_USER.encode()))
            if code == 334:
                code, _ = self.conn.cmd(base64.b64encode(password.encode()))
        if code == 235:
            assert good and not self.authed
            self.authed = True
        else:
            assert not (good and not self.authed and code // 100 == 2)
        self._check(code)

    @precondition(lambda self: not self.authed)
    @rule()
    def valid_login(self) -> None:
        code, _ = self.conn.cmd("EHLO client.test")
        if code == 250:
            self._fresh_transaction()
            code, _ = self.conn.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD))
            assert code == 235, code
            self.authed = True
        self._check(code)

    @precondition(lambda self: self.authed and self.sender is None)
    @rule(address=good_senders)
    def valid_mail(self, address: str) -> None:
        code, _ = self.conn.cmd(f"MAIL FROM:<{address}>")
        assert code == 250, code
        self.sender = address
        self._check(code)

    @precondition(lambda self: self.sender is not None)
    @rule(address=good_rcpts)
    def valid_rcpt(self, address: str) -> None:
        code, _ = self.conn.cmd(f"RCPT TO:<{address}>")
        assert code == 250, code
        self.rcpts.append(address)
        self._check(code)

    @rule(blob=junk_text)
    def auth_garbage(self, blob: str) -> None:
        code, _ = self.conn.cmd(f"AUTH PLAIN {blob}")
        if code == 334:
            code, _ = self.conn.cmd(blob)
        assert code != 235 or blob == "", code
        self._check(code)

    @rule(address=st.one_of(good_senders, bad_addresses, junk_text))
    def mail(self, address: str) -> None:
        code, _ = self.conn.cmd(f"MAIL FROM:<{address}>")
        if code == 250:
            assert self.authed and self.sender is None, "MAIL accepted without AUTH or inside a transaction"
            assert _allowed(address, SENDER_DOMAINS), f"sender {address!r} accepted"
            self.sender = address
        self._check(code)

    @rule(address=addresses)
    def rcpt(self, address: str) -> None:
        code, text = self.conn.cmd(f"RCPT TO:<{address}>")
        if code == 250:
            assert self.authed and self.sender is not None
            assert _allowed(address, RCPT_DOMAINS), f"recipient {address!r} accepted"
            self.rcpts.append(address)
        self._note_refusal(code, text)
        self._check(code)

    def _note_refusal(self, code: int, text: str) -> None:
        """Any 5xx to a RCPT the protocol dispatched (policy or syntax) refuses the whole message; lines refused
        before dispatch are counted by `_check` (too long, verb not ASCII, empty: each may have been a RCPT)."""
        before_dispatch = UNREAD
        if code // 100 == 5 and self.sender is not None and not any(t in text for t in before_dispatch):
            self.refused += 1

    @rule(lines=body_lines)
    def data(self, lines: list[str]) -> None:
        code, _ = self.conn.cmd("DATA")
        if self.authed and self.sender is not None and self.rcpts and self.refused:
            assert code == 554, f"DATA after a refused recipient got {code}, not 554 at once"
        if code == 554:
            self._fresh_transaction()  # the transaction ended there
        if code != 354:
            assert code != 250
            self._check(code)
            return
        self._message(lines)

    def _message(self, lines: list[str]) -> None:
        assert self.authed and self.sender is not None and self.rcpts
        marker = uuid.uuid4().hex
        stuffed = [("." + ln if ln.startswith(".") else ln) for ln in lines]
        body = "\r\n".join([f"X-Fuzz: {marker}", *stuffed, ""]).encode("utf-8") + b".\r\n"
        self.conn.send(body)
        code, text = self.conn.reply()
        fits = len(body) - 3 <= MAX_SIZE and all(len(ln.encode()) + 2 <= 1001 for ln in stuffed)
        if fits and self.refused == 0:
            assert code == 250, f"a valid message was not accepted: {code} {text}"
        if code == 250:
            assert self.refused == 0, "message accepted although a recipient was refused"
            assert all(len(ln.encode()) + 2 <= 1001 for ln in stuffed)
            self.acknowledged[marker] = (self.sender, list(self.rcpts))
            RIG["acknowledged"] += 1
        self._fresh_transaction()
        self._check(code)

    @rule(
        sender=st.one_of(good_senders, good_senders, bad_addresses),
        rcpts=st.lists(st.one_of(good_rcpts, good_rcpts, good_rcpts, bad_addresses), min_size=1, max_size=3),
        lines=body_lines,
    )
    def transaction(self, sender: str, rcpts: list[str], lines: list[str]) -> None:
        """A whole (mostly valid) transaction, so that random sequences reach the upstream often."""
        if not self.authed:
            self.valid_login()
        if self.sender is None:
            self.mail(sender)
        for address in rcpts:
            self.rcpt(address)
        self.data(lines)

    @rule(line=junk_lines)
    def junk(self, line: str | bytes) -> None:
        code, text = self.conn.cmd(line)
        verb = line.upper() if isinstance(line, str) else ""
        if code == 250 and verb.startswith(("MAIL", "RCPT")):
            # a random argument was accepted: it must still satisfy the policy
            raise AssertionError(f"{line!r} accepted")
        if verb.startswith("RCPT"):
            self._note_refusal(code, text)
        if code == 221 or (verb.startswith(("RSET", "EHLO", "HELO")) and code == 250):
            self._fresh_transaction()
        if verb.startswith("DATA") and code == 554:  # refused at the DATA command: the transaction ended
            self._fresh_transaction()
        assert code != 235, f"{line!r} got {code}"
        if code == 354:
            assert verb == "DATA", f"{line!r} got 354"
            self._message([])
            return
        self._check(code)

    @rule()
    def rset(self) -> None:
        code, _ = self.conn.cmd("RSET")
        if code == 250:
            self._fresh_transaction()
        self._check(code)

    @rule()
    def reconnect(self) -> None:
        self.conn.close()
        self.connect()

    @precondition(lambda self: True)
    @invariant()
    def relay_serves_a_fresh_client_and_sink_is_consistent(self) -> None:
        assert RIG["relay"].returncode is None, RIG["relay"].describe()
        fresh = Conn(RIG["relay"].port)
        assert fresh.cmd("NOOP")[0] == 250
        fresh.close()
        counts: dict[str, int] = {}
        for m in RIG["sink"].messages[self.sink_base :]:
            found = re.search(rb"X-Fuzz: ([0-9a-f]{32})", m.data)
            assert found, m.data[:200]
            key = found.group(1).decode()
            counts[key] = counts.get(key, 0) + 1
            assert key in self.acknowledged, "the sink holds a message whose client never got 250"
            sender, rcpts = self.acknowledged[key]
            # aiosmtpd drops a trailing dot of the domain when it parses the address; the same address
            assert [_norm(a) for a in (m.mail_from, *m.rcpt_tos)] == [_norm(a) for a in (sender, *rcpts)], (
                "the upstream got another envelope than the client sent"
            )
            assert _allowed(m.mail_from, SENDER_DOMAINS) and all(_allowed(r, RCPT_DOMAINS) for r in m.rcpt_tos)
        assert all(n == 1 for n in counts.values()), "duplicate delivery"
        assert set(counts) == set(self.acknowledged), "a message acknowledged with 250 is missing at the sink"

    def teardown(self) -> None:
        self.conn.close()


@pytest.fixture(scope="module")
def fuzz_rig(module_stack):
    sink = module_stack.sink()
    relay = module_stack.relay(
        sink.port,
        TIMEOUT="5",
        MAX_MESSAGE_SIZE=str(MAX_SIZE),
        AUTH_MAX_FAILURES="10000",
        AUTH_LOCKOUT_SECONDS="0",
        MAX_CONNECTIONS="50",
        LOG_LEVEL="WARNING",
    )
    RIG.update(relay=relay, sink=sink, acknowledged=0, replies=0)
    yield RIG
    RIG.clear()


@pytest.mark.timeout(max(120, EXAMPLES * 3))  # the default run takes ~10 s; shrinking a failure takes longer
def test_stateful_fuzz_of_the_live_relay(fuzz_rig):
    started = time.monotonic()
    run_state_machine_as_test(
        RelayFuzz,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
    relay = fuzz_rig["relay"]
    assert "Traceback" not in relay.all_output(), relay.describe()
    record(
        "fuzz",
        "stateful",
        passed=True,
        examples=EXAMPLES,
        steps_per_example=STEPS,
        replies_checked=fuzz_rig["replies"],
        messages_acknowledged=fuzz_rig["acknowledged"],
        messages_at_sink=len(fuzz_rig["sink"].messages),
        seconds=round(time.monotonic() - started, 1),
    )
