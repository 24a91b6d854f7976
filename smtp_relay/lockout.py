"""Brute-force protection: failed logins per client address are slowed, then locked out for a while."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import NamedTuple, Protocol

# Each failure adds this much delay before the next AUTH on that address is answered, up to MAX_DELAY.
DELAY_STEP = 0.25
MAX_DELAY = 2.0


class Record(NamedTuple):
    failures: int
    last_failure: float
    locked_until: float


class FailureStore(Protocol):
    """Where the records live: `shared.FailureTable`, one table for all workers of a relay."""

    def get(self, address: str) -> Record | None: ...

    def put(self, address: str, record: Record) -> None: ...

    def delete(self, address: str) -> None: ...

    def lock(self) -> AbstractContextManager[None]: ...


class LoginThrottle:
    """Counts failures per address within the lockout window; pure rules over an injected store and clock.

    Changes are made under the store's lock, so failures seen by different workers at the same moment all count.
    """

    def __init__(
        self,
        max_failures: int,
        lockout_seconds: float,
        store: FailureStore,
        clock: Callable[[], float] = time.monotonic,  # one clock for every process on the host
    ) -> None:
        self.max_failures = max_failures
        self.lockout_seconds = lockout_seconds
        self._store = store
        self._clock = clock

    def _current(self, address: str, now: float) -> Record | None:
        record = self._store.get(address)
        if record is None or (record.locked_until <= now and now - record.last_failure > self.lockout_seconds):
            return None  # none, or forgotten: the window passed without a new failure
        return record

    def locked_for(self, address: str) -> float:
        """Seconds this address stays locked out; 0 when it may try to log in."""
        now = self._clock()
        record = self._current(address, now)
        return 0.0 if record is None else max(0.0, record.locked_until - now)

    def delay(self, address: str) -> float:
        """How long to wait before answering this address's next AUTH: grows with its failures."""
        record = self._current(address, self._clock())
        return 0.0 if record is None else min(MAX_DELAY, DELAY_STEP * record.failures)

    def failure(self, address: str) -> bool:
        """Record a failed login; True when this failure locks the address out."""
        with self._store.lock():
            now = self._clock()
            record = self._current(address, now) or Record(0, now, 0.0)
            failures = record.failures + 1
            locks = failures >= self.max_failures and record.locked_until <= now
            if locks:
                self._store.put(address, Record(0, now, now + self.lockout_seconds))
            else:
                self._store.put(address, Record(failures, now, record.locked_until))
            return locks

    def success(self, address: str) -> None:
        if self._store.get(address) is not None:  # the usual case, a clean address, takes no lock
            with self._store.lock():
                self._store.delete(address)
