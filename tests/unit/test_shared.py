"""Memory shared by the workers: what one process writes, the others read; the lock excludes them and is freed
when its holder dies, so the connection and login-failure limits hold for all workers together."""

from __future__ import annotations

import os
import signal
import time

import pytest

from smtp_relay.lockout import LoginThrottle, Outcome, Record
from smtp_relay.shared import ConnectionCounts, FailureTable


def _fork(child: object) -> int:
    """Run `child()` in a forked process (as the supervisor forks a worker); its pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()  # type: ignore[operator]
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_code(pid: int, timeout: float = 10.0) -> int | None:
    """The child's exit code, or None if it is still running after `timeout` (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def test_connection_counts_are_seen_by_every_process_that_shares_them() -> None:
    counts = ConnectionCounts(3)
    counts.set(1, 4)
    assert _exit_code(_fork(lambda: counts.set(3, 7))) == 0  # a worker writes its own slot
    assert counts.total() == 11
    counts.set(3, 0)
    assert counts.total() == 4


def test_a_connection_is_taken_only_under_the_limit_and_counted_at_once() -> None:
    counts = ConnectionCounts(2)
    counts.set(2, 3)
    assert counts.take(1, 0, limit=5) is True
    assert counts.total() == 4
    assert counts.take(1, 1, limit=5) is True
    assert counts.take(1, 2, limit=5) is False
    assert counts.total() == 5


def test_workers_taking_connections_at_once_never_pass_the_limit_together() -> None:
    counts = ConnectionCounts(2)

    def worker(index: int) -> None:
        for _ in range(20_000):  # take the last place and give it back, as fast as the other worker
            if counts.take(index, 0, limit=1):
                assert counts.total() <= 1
                counts.set(index, 0)

    pids = [_fork(lambda: worker(1)), _fork(lambda: worker(2))]
    assert [_exit_code(pid, 60) for pid in pids] == [0, 0]


def test_a_held_lock_makes_other_processes_wait() -> None:
    counts = ConnectionCounts(2)
    lock = counts._file.lock
    with lock():
        pid = _fork(lambda: counts.take(2, 0, limit=10))
        assert _exit_code(pid, 0.3) is None  # still waiting for the lock: killed
        pid = _fork(lambda: counts.take(2, 0, limit=10))
        time.sleep(0.2)
        assert counts.total() == 0
    assert _exit_code(pid) == 0
    assert counts.total() == 1


def test_the_lock_of_a_killed_process_is_released() -> None:
    counts = ConnectionCounts(2)

    def die_holding_the_lock() -> None:
        with counts._file.lock():
            os.kill(os.getpid(), signal.SIGKILL)

    assert _exit_code(_fork(die_holding_the_lock)) == -signal.SIGKILL
    assert _exit_code(_fork(lambda: counts.take(1, 0, limit=10)), 5) == 0
    assert counts.total() == 1


def test_failed_logins_seen_by_one_worker_count_in_all() -> None:
    table = FailureTable()
    throttle = LoginThrottle(max_failures=3, lockout_seconds=60, store=table)

    def other_worker() -> None:
        assert throttle.failure("198.51.100.7") is False
        assert throttle.failure("198.51.100.7") is False

    assert _exit_code(_fork(other_worker)) == 0
    assert throttle.failure("198.51.100.7") is True  # the third failure, seen here
    assert throttle.locked_for("198.51.100.7") > 59
    assert _exit_code(_fork(lambda: os._exit(0 if throttle.locked_for("198.51.100.7") > 59 else 1))) == 0


def test_failures_recorded_by_workers_at_once_all_count() -> None:
    table = FailureTable()
    throttle = LoginThrottle(max_failures=10**9, lockout_seconds=600, store=table)

    def worker() -> None:
        for _ in range(2_000):
            throttle.failure("203.0.113.9")

    pids = [_fork(worker), _fork(worker)]
    assert [_exit_code(pid, 60) for pid in pids] == [0, 0]
    record = table.get("203.0.113.9")
    assert record is not None and record.failures == 4_000


@pytest.mark.parametrize("slots", [0, 4, 12])
def test_a_table_size_that_is_not_whole_buckets_is_refused(slots: int) -> None:
    with pytest.raises(ValueError):
        FailureTable(slots)


def test_records_are_kept_per_address_and_deleted() -> None:
    table = FailureTable(16)
    with table.lock():
        table.put("a", Record(1, 10.0, 0.0))
        table.put("b", Record(2, 11.0, 70.0))
        table.put("a", Record(3, 12.0, 0.0))
    assert table.get("a") == Record(3, 12.0, 0.0)
    assert table.get("b") == Record(2, 11.0, 70.0)
    with table.lock():
        table.delete("a")
    assert table.get("a") is None
    assert table.get("b") == Record(2, 11.0, 70.0)


def test_a_login_is_checked_and_counted_while_other_workers_wait() -> None:
    # Between the lockout check and the count of a login, no other worker may count a failure: else one more
    # password could be tried, or a right one could lift a lockout made meanwhile.
    table = FailureTable()
    throttle = LoginThrottle(max_failures=1, lockout_seconds=60, store=table)
    other_worker: list[int | None] = []

    def credentials_ok() -> bool:
        pid = _fork(lambda: throttle.failure("192.0.2.8"))  # another worker's failure, at this moment
        other_worker.append(_exit_code(pid, 0.3))  # None: it waited for this login's lock (then killed)
        return False

    assert throttle.attempt("192.0.2.8", credentials_ok) is Outcome.LOCKOUT
    assert other_worker == [None]
    assert _exit_code(_fork(lambda: throttle.failure("192.0.2.8"))) == 0  # runs once the lock is free
