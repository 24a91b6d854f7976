"""Login throttle: slowing, lockout, expiry, per-address isolation (pure, with a fake clock)."""

from __future__ import annotations

from smtp_relay.lockout import MAX_DELAY, LoginThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_failures_slow_down_then_lock_out_for_the_configured_time() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=3, lockout_seconds=60, clock=clock)
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
    throttle = LoginThrottle(max_failures=1, lockout_seconds=60, clock=Clock())
    assert throttle.failure("1.2.3.4") is True
    assert throttle.locked_for("5.6.7.8") == 0
    assert throttle.delay("5.6.7.8") == 0


def test_success_clears_the_count() -> None:
    throttle = LoginThrottle(max_failures=2, lockout_seconds=60, clock=Clock())
    throttle.failure("1.2.3.4")
    throttle.success("1.2.3.4")
    assert throttle.failure("1.2.3.4") is False


def test_old_failures_are_forgotten_after_the_window() -> None:
    clock = Clock()
    throttle = LoginThrottle(max_failures=2, lockout_seconds=10, clock=clock)
    throttle.failure("1.2.3.4")
    clock.now += 11
    assert throttle.failure("1.2.3.4") is False


def test_memory_is_bounded_under_a_flood_of_addresses() -> None:
    throttle = LoginThrottle(max_failures=5, lockout_seconds=60, clock=Clock())
    for i in range(70_000):
        throttle.failure(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
    assert len(throttle._records) <= 65_536
