"""WORKERS > 1: a supervisor and N relay processes on one port. Every message is relayed, limits stay the
operator's totals, SIGTERM drains every worker, a dead worker is replaced, and workers never outlive their
supervisor."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from support.client import RawClient, plain_b64, transaction
from support.faults import open_sockets
from support.net import wait_until
from support.relay import CLIENT_PASSWORD, CLIENT_USER, REPO_ROOT, clean_env, relay_env
from support.sink import Sink

MSG = b"Subject: workers\r\n\r\nbody\r\n"


def _children(pid: int) -> list[int]:
    found = []
    for stat in os.listdir("/proc"):
        if not stat.isdigit():
            continue
        try:
            with open(f"/proc/{stat}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat))
    return sorted(found)


def _settled(pids: list[int], timeout: float = 5.0) -> bool:
    """The workers' socket counts stay the same for half a second."""
    deadline = time.monotonic() + timeout
    last = {pid: open_sockets(pid) for pid in pids}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = {pid: open_sockets(pid) for pid in pids}
        if now == last:
            return True
        last = now
    return False


def _wait(predicate, timeout: float = 10.0) -> bool:
    return wait_until(predicate, timeout, interval=0.05)


def _two_workers(stack, **env: str):
    """A relay of two workers in front of a fresh sink, once both run: (relay, sink, the workers' pids)."""
    sink = stack.sink()
    relay = stack.relay(sink.port, WORKERS="2", **env)
    assert _wait(lambda: len(_children(relay.proc.pid)) == 2)
    return relay, sink, _children(relay.proc.pid)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def test_workers_share_one_port_and_relay_every_message(stack):
    sink = stack.sink()
    relay = stack.relay(sink.port, WORKERS="3", MAX_CONNECTIONS="150")
    assert _wait(lambda: len(_children(relay.proc.pid)) == 3)
    workers = _children(relay.proc.pid)
    for n in (1, 2, 3):
        assert relay.wait_for_log("event=listening", f"worker={n}"), relay.describe()
    assert relay.wait_for_log("event=supervisor.started", "workers=3", "max_connections=150")
    for i in range(30):
        assert transaction(relay.port, "sender@example.com", [f"r{i}@example.com"], MSG)[1] == 250
    assert sorted(m.rcpt_tos[0] for m in sink.wait_for_messages(30)) == sorted(f"r{i}@example.com" for i in range(30))
    # Connections held open at once are spread over the workers (the kernel wakes them all; one accepts).
    # Counted once the last transaction's connection is closed on the relay's side too.
    assert relay.wait_for_log("event=disconnect", "messages=1") and _settled(workers)
    before = {pid: open_sockets(pid) for pid in workers}
    clients = [RawClient(relay.port) for _ in range(24)]
    try:
        gained = {pid: open_sockets(pid) - before[pid] for pid in workers}
        assert sum(gained.values()) == 24, gained
        assert sum(1 for n in gained.values() if n > 0) >= 2, f"one worker took every connection: {gained}"
    finally:
        for c in clients:
            c.close()


def test_sigterm_lets_each_worker_finish_its_transaction_and_the_relay_exits_0(stack):
    relay, sink, workers = _two_workers(stack, TIMEOUT="10")
    clients = [RawClient(relay.port) for _ in range(6)]
    for i, c in enumerate(clients):
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd(f"RCPT TO:<drain{i}@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
    relay.send_signal(signal.SIGTERM)
    assert relay.wait_for_log("event=shutdown.started", "workers=2")
    for c in clients:
        c.send(MSG + b".\r\n")
        assert c.reply()[0] == 250
        c.close()
    assert relay.wait(timeout=15) == 0, relay.describe()
    assert all(not os.path.exists(f"/proc/{pid}") or _children(pid) == [] for pid in workers)
    assert _wait(lambda: all(not os.path.exists(f"/proc/{pid}") for pid in workers), 5)
    assert len(sink.wait_for_messages(6)) == 6
    assert relay.stdout.count("event=worker.stopped") == 2
    assert not _listening(relay.port)


def test_a_worker_that_dies_is_replaced_and_the_relay_keeps_serving(stack):
    relay, _, workers = _two_workers(stack)
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    line = relay.wait_for_log("event=worker.exited", f"pid={victim}", "exit_code=-9", timeout=10)
    assert line is not None and "level=ERROR" in line, relay.describe()
    assert _wait(lambda: len(_children(relay.proc.pid)) == 2 and victim not in _children(relay.proc.pid), 10)
    for i in range(10):
        assert transaction(relay.port, "sender@example.com", [f"after{i}@example.com"], MSG)[1] == 250
    assert relay.returncode is None


def test_workers_stop_by_themselves_when_the_supervisor_is_killed(stack):
    relay, sink, workers = _two_workers(stack)
    with RawClient(relay.port) as busy:  # a transaction in progress when the supervisor dies
        assert busy.cmd("EHLO client.test")[0] == 250
        assert busy.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD))[0] == 235
        assert busy.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert busy.cmd("RCPT TO:<old@example.com>")[0] == 250
        relay.kill()
        # The workers stop listening at once, so that the relay can be started again on its port right away,
        # and finish the transactions they hold.
        assert _wait(lambda: not _listening(relay.port), 0.5)
        again = stack.relay(sink.port, listen_port=relay.port)
        assert transaction(again.port, "sender@example.com", ["new@example.com"], MSG)[1] == 250
        assert busy.cmd("DATA")[0] == 354
        busy.send(MSG + b".\r\n")
        assert busy.reply()[0] == 250
    assert _wait(lambda: not any(_alive(pid) for pid in workers), 10)
    assert relay.wait_for_log("event=worker.orphaned")
    assert again.returncode is None


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _fill(port: int, attempts: int) -> tuple[list[RawClient], list[RawClient]]:
    """Open `attempts` connections one after another: (those served, those refused with 421, already closed)."""
    served, refused = [], []
    for _ in range(attempts):
        c = RawClient(port)
        assert c.greeting[0] in (220, 421), c.greeting
        if c.greeting[0] == 220:
            served.append(c)
        else:
            c.close()
            refused.append(c)
    return served, refused


def test_connection_limit_is_the_total_over_all_workers_whichever_worker_holds_them(stack):
    # The kernel may hand every connection to one worker: that worker still takes all MAX_CONNECTIONS, and no
    # worker takes one more while the others hold the rest.
    relay, _, workers = _two_workers(stack, MAX_CONNECTIONS="4")
    stopped = workers[0]
    os.kill(stopped, signal.SIGSTOP)  # every connection now goes to the other worker
    try:
        served, refused = _fill(relay.port, 6)
    finally:
        os.kill(stopped, signal.SIGCONT)
    try:
        assert (len(served), len(refused)) == (4, 2), relay.describe()
        # Both workers running: still four in all.
        more, refused = _fill(relay.port, 6)
        served += more
        assert (len(more), len(refused)) == (0, 6)
        for c in served[:2]:
            c.close()
        served = served[2:]
        assert _wait(lambda: sum("event=disconnect" in ln for ln in relay.log_lines()) >= 2), relay.describe()
        more, refused = _fill(relay.port, 6)
        served += more
        assert (len(more), len(refused)) == (2, 4), relay.describe()
    finally:
        for c in served:
            c.close()


def test_connections_of_a_killed_worker_no_longer_count_against_the_limit(stack):
    relay, _, workers = _two_workers(stack, MAX_CONNECTIONS="4")
    before = {pid: open_sockets(pid) for pid in workers}
    served, _ = _fill(relay.port, 4)
    assert len(served) == 4
    holding = [pid for pid in workers if open_sockets(pid) > before[pid]]
    victim = holding[0]
    os.kill(victim, signal.SIGKILL)
    assert relay.wait_for_log("event=worker.exited", f"pid={victim}", timeout=10), relay.describe()
    assert _wait(lambda: len(_children(relay.proc.pid)) == 2 and victim not in _children(relay.proc.pid), 10)
    kept = [c for c in served if not c.closed_by_peer(0.5)]  # those of the other worker
    try:
        assert len(kept) < 4
        more, refused = _fill(relay.port, 4)
        served += more
        assert len(kept) + len(more) == 4 and len(refused) == 4 - len(more), relay.describe()
    finally:
        for c in served:
            c.close()


def test_failed_logins_are_counted_against_the_total_limit_over_all_workers(stack):
    # The workers count failed logins in one shared table: exactly AUTH_MAX_FAILURES wrong passwords are
    # answered 535, whichever workers saw them, and from then on every worker refuses the address.
    relay, _, _ = _two_workers(stack, AUTH_MAX_FAILURES="4", AUTH_LOCKOUT_SECONDS="60")
    codes = []
    for _ in range(10):
        with RawClient(relay.port) as c:
            assert c.cmd("EHLO attacker.test")[0] == 250
            codes.append(c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, "wrong-password"))[0])
    assert codes == [535] * 4 + [421] * 6, codes
    assert relay.wait_for_log("event=auth.lockout", timeout=5), relay.describe()
    # A mistyped password locks nobody out where one process would not: the right one, after failures below the
    # limit, is accepted by whichever worker takes it.
    with RawClient(relay.port, source="127.0.0.2") as c:
        assert c.cmd("EHLO user.test")[0] == 250
        for _ in range(3):
            assert c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, "typo"))[0] == 535
    with RawClient(relay.port, source="127.0.0.2") as c:
        assert c.cmd("EHLO user.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64(CLIENT_USER, CLIENT_PASSWORD))[0] == 235


def test_sigterm_to_the_whole_process_group_drains_and_exits_0(tmp_path):
    # systemd and other service managers signal every process of the service: a worker then gets SIGTERM both
    # directly and from its supervisor, and must still drain (not take the second for "force").
    sink = Sink().start()
    env = clean_env(relay_env(tmp_path, sink.port, WORKERS="2", TIMEOUT="10"))
    port = int(env["LISTEN_PORT"])
    with open(tmp_path / "out.txt", "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smtp_relay"],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        assert _wait(lambda: len(_children(proc.pid)) == 2 and _listening(port))
        with RawClient(port) as c:
            assert c.cmd("EHLO client.test")[0] == 250
            assert c.auth_plain()[0] == 235
            assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
            assert c.cmd("RCPT TO:<group@example.com>")[0] == 250
            assert c.cmd("DATA")[0] == 354
            os.killpg(proc.pid, signal.SIGTERM)
            time.sleep(0.3)
            c.send(MSG + b".\r\n")
            assert c.reply()[0] == 250
        assert proc.wait(timeout=15) == 0, (tmp_path / "out.txt").read_text()
        assert "shutdown.forced" not in (tmp_path / "out.txt").read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        sink.stop()


def test_a_third_signal_kills_a_worker_that_cannot_stop(stack):
    relay, _, workers = _two_workers(stack)
    stuck = workers[0]
    os.kill(stuck, signal.SIGSTOP)  # its event loop cannot run: neither SIGTERM nor the forcing SIGUSR1 helps
    try:
        for _ in range(3):
            relay.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        assert relay.wait(timeout=10) == 1, relay.describe()
        assert not _alive(stuck)
    finally:
        if _alive(stuck):
            os.kill(stuck, signal.SIGKILL)


@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("host", ["no-such-host.invalid", "a..b", "x" * 70 + ".example"])
def test_a_listen_host_that_cannot_be_used_is_a_configuration_error(stack, workers, host):
    sink = stack.sink()
    relay = stack.relay(sink.port, wait=False, WORKERS=workers, LISTEN_HOST=host)
    assert relay.wait(timeout=30) == 2
    assert "LISTEN_HOST" in relay.stderr and "Traceback" not in relay.stderr + relay.stdout


def test_workers_auto_starts_one_worker_per_usable_cpu(stack):
    from smtp_relay.config import usable_cpus

    expected = min(64, usable_cpus())
    sink = stack.sink()
    relay = stack.relay(sink.port, WORKERS="auto")
    if expected > 1:
        assert relay.wait_for_log("event=supervisor.started", f"workers={expected}"), relay.describe()
        assert _wait(lambda: len(_children(relay.proc.pid)) == expected)
    else:  # one usable CPU: the relay runs as a single process, as with WORKERS=1
        assert relay.wait_for_log("event=listening") and not _children(relay.proc.pid)
    assert transaction(relay.port, "sender@example.com", ["auto@example.com"], MSG)[1] == 250


@pytest.mark.parametrize("value", ["0", "65", "two"])
def test_invalid_workers_is_a_configuration_error(stack, value):
    sink = stack.sink()
    relay = stack.relay(sink.port, wait=False, WORKERS=value)
    assert relay.wait(timeout=15) == 2
    assert "WORKERS" in relay.stderr


def test_sigterm_right_after_start_stops_every_worker_and_exits_0(stack):
    # A signal that reaches a worker before its event loop handles SIGTERM must not be lost (or kill it).
    sink = stack.sink()
    for _ in range(5):
        relay = stack.relay(sink.port, wait=False, WORKERS="4")
        deadline = time.monotonic() + 10
        while "event=supervisor.started" not in relay.stdout and time.monotonic() < deadline:
            pass  # no sleep: the signal is to come while the workers are still starting
        relay.send_signal(signal.SIGTERM)
        assert relay.wait(timeout=15) == 0, relay.describe()
        assert "exit_code=-15" not in relay.stdout


def test_new_connections_are_refused_while_the_workers_drain(stack):
    relay, _, _ = _two_workers(stack, TIMEOUT="10")
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<sender@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<late@example.com>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        relay.send_signal(signal.SIGTERM)
        assert relay.wait_for_log("event=shutdown.started", "workers=2")
        assert _wait(lambda: not _listening(relay.port), 5), "a new connection would wait for nobody"
        c.send(MSG + b".\r\n")
        assert c.reply()[0] == 250
    assert relay.wait(timeout=15) == 0


def test_a_worker_that_keeps_dying_at_start_stops_the_relay_with_exit_1(stack):
    # No endless crash loop: after 5 quick deaths in a row the supervisor stops the rest (a container's restart
    # policy takes over).
    relay, _, workers = _two_workers(stack)
    first = set(workers)
    killed: set[int] = set()
    deadline = time.monotonic() + 30
    while relay.returncode is None and time.monotonic() < deadline:
        for pid in set(_children(relay.proc.pid)) - first - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        if not killed:
            victim = sorted(first)[0]
            os.kill(victim, signal.SIGKILL)
            killed.add(victim)
        time.sleep(0.05)
    assert relay.wait(timeout=15) == 1, relay.describe()
    line = relay.wait_for_log("event=worker.failing")
    assert line is not None and "level=ERROR" in line and "5 times in a row" in line
    assert not _listening(relay.port)


def test_a_stray_orphan_signal_does_not_stop_a_worker_whose_supervisor_lives(stack):
    relay, _, workers = _two_workers(stack)
    for pid in workers:
        os.kill(pid, signal.SIGUSR2)  # what the kernel sends a worker when its supervisor dies
    time.sleep(1.5)  # past the watchdog's look at its supervisor
    assert _children(relay.proc.pid) == workers
    assert all(_alive(pid) for pid in workers)
    assert not relay.wait_for_log("event=worker.orphaned", timeout=0.1)
    for i in range(6):
        assert transaction(relay.port, "sender@example.com", [f"r{i}@example.com"], MSG)[1] == 250
