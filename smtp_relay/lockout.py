"""Brute-force protection: failed logins per client address are slowed, then locked out for a while."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

# Bounded so that a flood from many addresses cannot grow memory without limit; the oldest entries go first.
MAX_TRACKED_ADDRESSES = 65_536
# Each failure adds this much delay before the next AUTH on that address is answered, up to MAX_DELAY.
DELAY_STEP = 0.25
MAX_DELAY = 2.0


@dataclass(slots=True)
class _Record:
    failures: int
    last_failure: float
    locked_until: float


class LoginThrottle:
    """Counts failures per address within the lockout window; pure logic with an injectable clock."""

    def __init__(self, max_failures: int, lockout_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self._clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()

    def _current(self, address: str) -> _Record | None:
        record = self._records.get(address)
        if record is None:
            return None
        now = self._clock()
        if record.locked_until <= now and now - record.last_failure > self.lockout_seconds:
            del self._records[address]  # forgotten: the window passed without a new failure
            return None
        return record

    def locked_for(self, address: str) -> float:
        """Seconds this address stays locked out; 0 when it may try to log in."""
        record = self._current(address)
        if record is None:
            return 0.0
        return max(0.0, record.locked_until - self._clock())

    def delay(self, address: str) -> float:
        """How long to wait before answering this address's next AUTH: grows with its failures."""
        record = self._current(address)
        return 0.0 if record is None else min(MAX_DELAY, DELAY_STEP * record.failures)

    def failure(self, address: str) -> bool:
        """Record a failed login; True when this failure locks the address out."""
        now = self._clock()
        record = self._current(address)
        if record is None:
            record = _Record(0, now, 0.0)
            self._records[address] = record
            while len(self._records) > MAX_TRACKED_ADDRESSES:
                self._records.popitem(last=False)
        self._records.move_to_end(address)
        record.failures += 1
        record.last_failure = now
        if record.failures >= self.max_failures and record.locked_until <= now:
            record.locked_until = now + self.lockout_seconds
            record.failures = 0
            return True
        return False

    def success(self, address: str) -> None:
        self._records.pop(address, None)
