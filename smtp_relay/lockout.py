"""Brute-force protection: failed logins per client address are slowed, then locked out for a while."""

from __future__ import annotations

import enum
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


class Outcome(enum.Enum):
    LOCKED = "locked"  # refused unchecked: the address was locked out
    SUCCESS = "success"
    FAILURE = "failure"
    LOCKOUT = "lockout"  # a failure that locked the address out


class FailureStore(Protocol):
    """Where the records live: `shared.FailureTable`, one table for all workers of a relay."""

    def get(self, address: str) -> Record | None: ...

    def put(self, address: str, record: Record) -> None: ...

    def delete(self, address: str) -> None: ...

    def lock(self) -> AbstractContextManager[None]: ...


class LoginThrottle:
    """Counts failures per address within the lockout window; pure rules over an injected store and clock.

    A login is checked and counted in one step under the store's lock (`attempt`), so that logins handled by other
    workers at the same moment cannot slip between the two; `locked_for` and `delay` only advise.
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

    def _current(self, record: Record | None, now: float) -> Record | None:
        if record is None or (record.locked_until <= now and now - record.last_failure > self.lockout_seconds):
            return None  # none, or forgotten: the window passed without a new failure
        return record

    def locked_for(self, address: str) -> float:
        """Seconds this address stays locked out; 0 when it may try to log in. Advice, read without the lock:
        `attempt` decides."""
        now = self._clock()
        record = self._current(self._store.get(address), now)
        return 0.0 if record is None else max(0.0, record.locked_until - now)

    def delay(self, address: str) -> float:
        """How long to wait before answering this address's next AUTH: grows with its failures."""
        record = self._current(self._store.get(address), self._clock())
        return 0.0 if record is None else min(MAX_DELAY, DELAY_STEP * record.failures)

    def attempt(self, address: str, credentials_ok: Callable[[], bool]) -> Outcome:
        """A login from `address`: refused unchecked while it is locked out, else checked and counted."""
        with self._store.lock():
            now = self._clock()
            record = self._current(self._store.get(address), now)
            if record is not None and record.locked_until > now:
                return Outcome.LOCKED
            if credentials_ok():
                if record is not None:
                    self._store.delete(address)
                return Outcome.SUCCESS
            return Outcome.LOCKOUT if self._count_failure(address, record, now) else Outcome.FAILURE

    def failure(self, address: str) -> bool:
        """Record a failed login; True when this failure locks the address out."""
        with self._store.lock():
            now = self._clock()
            return self._count_failure(address, self._current(self._store.get(address), now), now)

    def _count_failure(self, address: str, record: Record | None, now: float) -> bool:
        record = record or Record(0, now, 0.0)
        failures = record.failures + 1
        if failures >= self.max_failures and self.lockout_seconds > 0 and record.locked_until <= now:  # 0: off
            self._store.put(address, Record(0, now, now + self.lockout_seconds))
            return True
        self._store.put(address, Record(failures, now, record.locked_until))
        return False
