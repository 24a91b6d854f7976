"""Login throttle: slowing, lockout, expiry, per-address isolation (pure rules, with a fake clock)."""

from __future__ import annotations

import pytest

from smtp_relay.lockout import MAX_DELAY, LoginThrottle, Outcome
from smtp_relay.shared import FailureTable


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("shared", [True, False], ids=["workers", "one-process"])
def test_failures_slow_down_then_lock_out_for_the_configured_time(shared: bool) -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, lockout_seconds=60, store=FailureTable(shared=shared), clock=clock)
    assert throttle.delay("1.2.3.4") == 0
    assert throttle.failure("1.2.3.4") is False
    assert 0 < throttle.delay("1.2.3.4") <= MAX_DELAY
    assert throttle.failure("1.2.3.4") is False
    assert throttle.locked_for("1.2.3.4") == 0
    assert throttle.failure("1.2.3.4") is True
    assert throttle.locked_for("1.2.3.4") == 60
    clock.now += 59
    assert throttle.locked_for("1.2.3.4") == 1
    clock.now += 2
    assert throttle.locked_for("1.2.3.4") == 0


def test_other_addresses_are_not_affected() -> None:
    throttle = LoginThrottle(max_failures=1, lockout_seconds=60, store=FailureTable(), clock=Clock())
    assert throttle.failure("1.2.3.4") is True
    assert throttle.locked_for("5.6.7.8") == 0
    assert throttle.delay("5.6.7.8") == 0


def test_a_login_is_checked_and_counted_in_one_step() -> None:
    throttle = LoginThrottle(max_failures=2, lockout_seconds=60, store=FailureTable(), clock=Clock())
    assert throttle.attempt("1.2.3.4", lambda: False) is Outcome.FAILURE
    assert throttle.attempt("1.2.3.4", lambda: True) is Outcome.SUCCESS  # clears the count
    assert throttle.attempt("1.2.3.4", lambda: False) is Outcome.FAILURE
    assert throttle.attempt("1.2.3.4", lambda: False) is Outcome.LOCKOUT
    checked = []
    # Locked out: the credentials are not even checked, and the right ones do not lift the lockout.
    assert throttle.attempt("1.2.3.4", lambda: checked.append(1) or True) is Outcome.LOCKED
    assert checked == [] and throttle.locked_for("1.2.3.4") == 60


def test_old_failures_are_forgotten_after_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, lockout_seconds=10, store=FailureTable(), clock=clock)
    throttle.failure("1.2.3.4")
    clock.now += 11
    assert throttle.failure("1.2.3.4") is False


def test_a_locked_out_address_outlasts_a_flood_of_other_addresses() -> None:
    # The table is bounded (shared.LOGIN_SLOTS); addresses with a single failure take the place of older ones,
    # never of one that is locked out.
    clock = Clock()
    table = FailureTable()
    throttle = LoginThrottle(max_failures=2, lockout_seconds=60, store=table, clock=clock)
    throttle.failure("192.0.2.1")
    assert throttle.failure("192.0.2.1") is True
    for i in range(70_000):
        clock.now += 0.0001
        throttle.failure(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
    assert 50 < throttle.locked_for("192.0.2.1") <= 60
    assert sum(1 for i in range(70_000) if table.get(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")) <= 65_536


def test_when_the_table_is_full_the_oldest_failures_are_forgotten_first() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, lockout_seconds=60, store=FailureTable(8), clock=clock)
    addresses = [f"10.0.0.{i}" for i in range(9)]  # one more than the table holds
    for address in addresses:
        clock.now += 1
        throttle.failure(address)
    assert throttle.delay(addresses[0]) == 0  # forgotten
    assert all(throttle.delay(address) > 0 for address in addresses[1:])
