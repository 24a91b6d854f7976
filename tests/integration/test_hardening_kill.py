"""The relay killed (SIGKILL) in the middle of 200 concurrent sends: every client that got 250 has its message at
the upstream, every other client saw an error or a dropped connection (so it retries), messages that reached the
upstream although their client saw a drop (SMTP's duplicate window, RFC 1047) are counted and reported, and a
restarted relay serves at once."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid

import pytest
from support.client import transaction
from support.faults import record
from support.relay import RelayProcess

CLIENTS = 200
SEED = int(os.environ.get("KILL_SEED", str(int(time.time()))))


def _one(port: int, marker: str, start_at: float, results: dict[str, tuple[str, int | None, str]]) -> None:
    time.sleep(max(0.0, start_at - time.monotonic()))
    body = f"Subject: kill {marker}\r\nX-Case: {marker}\r\n\r\n{'line of text ' * 40}\r\n".encode()
    try:
        stage, code, text = transaction(port, "sender@example.com", ["rcpt@example.com"], body, timeout=10)
        results[marker] = (stage, code, text)
    except (OSError, ConnectionError, TimeoutError, AssertionError) as exc:
        results[marker] = ("dropped", None, type(exc).__name__)


@pytest.mark.parametrize("window", [(0.05, 0.3), (0.3, 0.8), (0.8, 1.4)], ids=["early", "middle", "late"])
def test_sigkill_during_200_concurrent_sends_loses_nothing_acknowledged(stack, window):
    rng = random.Random(f"{SEED}-{window}")
    upstream = stack.sink()
    upstream.configure(data_delay=0.05)
    relay = stack.relay(upstream.port, MAX_CONNECTIONS="400", TIMEOUT="5")
    results: dict[str, tuple[str, int | None, str]] = {}
    t0 = time.monotonic()
    markers = [uuid.uuid4().hex for _ in range(CLIENTS)]
    workers = [
        threading.Thread(target=_one, args=(relay.port, m, t0 + rng.uniform(0, 1.5), results), daemon=True)
        for m in markers
    ]
    for w in workers:
        w.start()
    kill_at = rng.uniform(*window)
    time.sleep(max(0.0, t0 + kill_at - time.monotonic()))
    relay.send_signal(signal.SIGKILL)
    relay.wait(5)
    killed = time.monotonic()
    restarted = RelayProcess(relay.env, relay.workdir / "restart")
    stack.relays.append(restarted)
    restarted.start(wait=True, timeout=10)
    ready_after = time.monotonic() - killed
    for w in workers:
        w.join(30)
    assert all(not w.is_alive() for w in workers), "a client hung"

    # The restarted relay serves at once.
    probe = uuid.uuid4().hex
    body = f"X-Case: {probe}\r\n\r\nx\r\n".encode()
    reply = transaction(restarted.port, "sender@example.com", ["rcpt@example.com"], body)
    assert reply[1] == 250, reply

    time.sleep(0.5)  # let the sink finish anything it was committing
    at_sink: dict[str, int] = {}
    for msg in upstream.messages:
        for m in markers:
            if m.encode() in msg.data:
                at_sink[m] = at_sink.get(m, 0) + 1
    acked = [m for m in markers if results[m][1] == 250]
    lost = [m for m in acked if at_sink.get(m, 0) == 0]
    duplicated = [m for m in markers if at_sink.get(m, 0) > 1]
    window_cases = [m for m in markers if at_sink.get(m, 0) and results[m][1] != 250]
    errors = [m for m in markers if results[m][1] is not None and results[m][1] != 250]
    dropped = [m for m in markers if results[m][1] is None]
    bad_codes = [results[m] for m in errors if not 400 <= (results[m][1] or 0) < 600]
    record(
        "kill",
        f"sigkill-{window[0]}-{window[1]}s",
        passed=not lost and not duplicated and not bad_codes,
        clients=CLIENTS,
        kill_at=round(kill_at, 3),
        acknowledged=len(acked),
        errors=len(errors),
        dropped=len(dropped),
        lost=len(lost),
        duplicates=len(duplicated),
        duplicate_window=len(window_cases),
        restart_seconds=round(ready_after, 2),
        seed=SEED,
    )
    print(
        f"seed={SEED} kill_at={kill_at:.2f}s acknowledged={len(acked)} errors={len(errors)} dropped={len(dropped)} "
        f"lost={len(lost)} duplicate_window={len(window_cases)} restart={ready_after:.2f}s"
    )
    assert len(results) == CLIENTS
    assert not lost, f"acknowledged with 250 but not at the upstream: {lost}"
    assert not duplicated, "the relay itself sent a message twice"
    assert not bad_codes, bad_codes
    assert ready_after < 5, f"restart took {ready_after:.1f}s"
