"""Exactly-once under upstream faults: at every step of the upstream dialogue the upstream closes, resets, hangs
past TIMEOUT or answers 4xx/5xx; the client's reply class is right, the upstream holds the message exactly once
iff the client got 250, the next client is served, and the relay's file descriptors and threads do not leak."""

from __future__ import annotations

import time
import uuid

import pytest
from support.client import transaction
from support.faults import FAULTS, STEPS, FaultUpstream, Stored, open_fds, record, settle, threads
from support.faults import _reset as reset

UPSTREAM_AUTH = ("relay-up", "Up-Secret-77")
TIMEOUT = 1.0

CASES = [(s, f) for s in STEPS for f in FAULTS if not (s == "connect" and f in ("4xx", "5xx"))]


def expected_class(step: str, fault: str) -> int:
    """Issue: 4xx for transient, 5xx for permanent. An upstream's 5xx is passed on at every step, also when it
    refuses the relay's own session or login (greeting, EHLO, STARTTLS, AUTH: "Upstream 5xx: the client gets
    a 5xx with the upstream's text")."""
    if step == "quit":
        return 2  # the upstream already answered 250 to the end of data: the message is delivered
    return 5 if fault == "5xx" else 4


@pytest.fixture(scope="module")
def rig(module_stack, tls):
    upstream = FaultUpstream(server_ctx=tls.server_ctx, auth=UPSTREAM_AUTH).start()
    relay = module_stack.relay(
        upstream.port,
        RELAY_HOST="127.0.0.1",
        RELAY_USE_TLS="true",
        RELAY_TLS_CA_FILE=str(tls.ca_pem),
        RELAY_USERNAME=UPSTREAM_AUTH[0],
        RELAY_PASSWORD=UPSTREAM_AUTH[1],
        TIMEOUT=str(TIMEOUT),
    )
    # Warm up (lazy imports, TLS context, log files) before the baseline is taken.
    for _ in range(3):
        marker = _marker()
        assert _send(relay, marker)[1] == 250, relay.describe()
    time.sleep(0.3)
    baseline = {"fds": open_fds(relay.proc.pid), "threads": threads(relay.proc.pid)}
    yield upstream, relay, baseline
    upstream.stop()


def _marker() -> str:
    return uuid.uuid4().hex


def _send(relay, marker: str) -> tuple[str, int, str]:
    body = f"Subject: fault {marker}\r\nX-Case: {marker}\r\n\r\nbody {marker}\r\n".encode()
    return transaction(relay.port, "sender@example.com", ["rcpt@example.com"], body, timeout=15)


@pytest.mark.parametrize(("step", "fault"), CASES, ids=[f"{s}-{f}" for s, f in CASES])
def test_upstream_fault_gives_right_reply_class_exactly_once_and_no_leak(rig, step, fault):
    upstream, relay, baseline = rig
    pid = relay.proc.pid
    upstream.set_fault(step, fault)
    marker = _marker()
    started = time.monotonic()
    stage, code, text = _send(relay, marker)
    elapsed = time.monotonic() - started
    got = upstream.stored(marker.encode())

    upstream.set_fault(None)
    next_marker = _marker()
    next_reply = _send(relay, next_marker)
    next_got = upstream.stored(next_marker.encode())

    fds = settle(lambda: open_fds(pid), baseline["fds"], timeout=5)
    thread_count = settle(lambda: threads(pid), baseline["threads"], timeout=2)
    ok_class = code // 100 == expected_class(step, fault)
    exactly_once = len(got) == (1 if code == 250 else 0)
    record(
        "faults",
        f"{step}/{fault}",
        passed=bool(ok_class and exactly_once and next_reply[1] == 250 and len(next_got) == 1),
        reply=code,
        delivered=len(got),
        lost=1 if code == 250 and not got else 0,
        duplicates=max(0, len(got) - 1),
        fd_leak=fds - baseline["fds"],
        seconds=round(elapsed, 2),
    )
    assert stage == "DATA", (stage, code, text)
    assert ok_class, f"{step}/{fault}: client got {code} {text}, expected {expected_class(step, fault)}xx"
    assert exactly_once, f"{step}/{fault}: client got {code} but the upstream holds {len(got)} copies"
    assert elapsed < 4 * TIMEOUT + 3, f"{step}/{fault}: the client waited {elapsed:.1f}s"
    assert next_reply[:2] == ("DATA", 250), next_reply
    assert len(next_got) == 1
    assert fds <= baseline["fds"], f"{step}/{fault}: relay fds {baseline['fds']} -> {fds}"
    assert thread_count <= baseline["threads"], f"{step}/{fault}: threads {baseline['threads']} -> {thread_count}"
    assert relay.returncode is None


def _reply_with_fault(rig, step: str, fault: str) -> tuple[int, str]:
    """The client's reply to one message while the upstream fails at `step`."""
    upstream, relay, _ = rig
    upstream.set_fault(step, fault)
    try:
        _, code, text = _send(relay, _marker())
    finally:
        upstream.set_fault(None)
    return code, text


PERMANENT = [(s, "5xx") for s in STEPS if s not in ("connect", "quit")]


@pytest.mark.parametrize(("step", "fault"), PERMANENT, ids=[f"{s}-{f}" for s, f in PERMANENT])
def test_an_upstream_5xx_at_any_step_gives_the_client_a_5xx_with_the_upstreams_text(rig, step, fault):
    relay = rig[1]
    code, text = _reply_with_fault(rig, step, fault)
    assert code // 100 == 5 and "fault:" in text, (code, text)
    stage = {"greeting": "connect", "ehlo": "connect", "starttls": "tls", "auth": "auth"}.get(step)
    if stage is not None:  # the relay's own session or login: its operator must act
        assert relay.wait_for_log("level=ERROR", "event=forward.failed", f"stage={stage}", "fault:")


TRANSIENT = [(s, f) for s in STEPS if s != "quit" for f in ("close", "reset", "4xx") if (s, f) in CASES]


@pytest.mark.parametrize(("step", "fault"), TRANSIENT, ids=[f"{s}-{f}" for s, f in TRANSIENT])
def test_an_upstream_unreachable_dropping_or_answering_4xx_gives_451_4_4_x_or_its_own_4xx(rig, step, fault):
    """Issue: "Upstream unreachable, timing out, dropping the connection, or answering 4xx: the client gets
    451 4.4.x (or the upstream's own 4xx)"; a drop at STARTTLS, before any TLS, too."""
    code, text = _reply_with_fault(rig, step, fault)
    if fault == "4xx" and step != "greeting":  # a 421 greeting closes the relay's session: 451 4.4.2
        assert code // 100 == 4 and "fault:" in text, (code, text)  # the upstream's own
    else:
        assert code == 451 and text.startswith("4.4."), (code, text)


def test_upstream_commits_then_loses_the_reply_is_the_reported_duplicate_window(rig):
    """The upstream stores the message and resets before its 250 arrives: the client must get 4xx (it will
    retry, so the message arrives twice). This is SMTP's own duplicate window (RFC 1047), counted, not hidden."""
    upstream, relay, _ = rig
    upstream.set_fault(None)
    marker = _marker()
    original_apply = upstream._apply

    async def commit_then_reset(step, reader, writer):
        if step == "eod":
            upstream.messages.append(Stored("x", [], f"X-Case: {marker}".encode(), True, None))
            reset(writer)
            return True
        return await original_apply(step, reader, writer)

    upstream._apply = commit_then_reset
    try:
        _, code, text = _send(relay, marker)
    finally:
        upstream._apply = original_apply
    got = upstream.stored(marker.encode())
    record("faults", "eod/commit-then-reset", passed=code // 100 == 4, reply=code, delivered=len(got), duplicates=1)
    assert code // 100 == 4, (code, text)
    assert len(got) == 1
    assert _send(relay, _marker())[1] == 250


def test_no_internal_error_or_traceback_during_the_fault_matrix(rig):
    _, relay, _ = rig
    output = relay.all_output()
    assert "Traceback" not in output, relay.describe()
    assert "internal.error" not in output, relay.describe()
