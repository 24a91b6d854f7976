"""Memory the relay's processes share (WORKERS > 1): open connections and failed logins, under one lock each.

Both tables live in an unnamed memory file (memfd) that a process maps before it forks its workers, so every
worker sees the same pages. Changes are made under a POSIX record lock on that file (`fcntl.lockf`): the
kernel drops it when its holder dies, so a killed worker cannot leave the others waiting. A relay of one process
keeps its login table in memory of its own, without the lock.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import tempfile
import weakref
from contextlib import AbstractContextManager, nullcontext

from smtp_relay.lockout import Record

# Failed-login records kept, in buckets of WAYS slots: bounded, so that a flood of addresses cannot grow memory.
LOGIN_SLOTS = 65_536
WAYS = 8


class _Lock:
    """An exclusive POSIX record lock on a file, as a reusable context manager (not re-entrant)."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        # POSIX locks belong to a process, so they exclude the other workers; fork() does not pass them on.
        fcntl.lockf(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN)


class _SharedFile:
    """An unnamed memory file mapped shared (inherited by fork), and a lock over it between processes; or, for
    one process alone, anonymous memory and no lock."""

    def __init__(self, name: str, size: int, shared: bool = True) -> None:
        self._lock: AbstractContextManager[None] = nullcontext()
        if not shared:
            self.view = memoryview(mmap.mmap(-1, size))
            return
        if hasattr(os, "memfd_create"):
            fd = os.memfd_create(name, os.MFD_CLOEXEC)
        else:  # pragma: no cover - not Linux: an unnamed file in the temporary directory serves as well
            fd, path = tempfile.mkstemp(prefix=name)
            os.unlink(path)
        weakref.finalize(self, os.close, fd)
        os.ftruncate(fd, size)
        self.view = memoryview(mmap.mmap(fd, size))  # zero-filled; pages are allocated when first written
        self._lock = _Lock(fd)

    def lock(self) -> AbstractContextManager[None]:
        return self._lock


class ConnectionCounts:
    """Each worker's open client connections. A worker writes only its own slot; taking a connection checks the
    total and counts the new one under the lock, so MAX_CONNECTIONS holds for all workers together exactly. The
    supervisor clears the slot of a worker that exited (a killed one cannot)."""

    def __init__(self, workers: int) -> None:
        self._file = _SharedFile("smtp-relay-connections", 8 * workers)
        self._slots = self._file.view.cast("q")

    def set(self, worker: int, count: int) -> None:
        """`worker` (1 to WORKERS) has `count` connections open."""
        self._slots[worker - 1] = count

    def total(self) -> int:
        return sum(self._slots)

    def take(self, worker: int, held: int, limit: int) -> bool:
        """Count one more connection for `worker`, which holds `held`, if all workers hold fewer than `limit`."""
        with self._file.lock():
            if sum(self._slots) >= limit:
                return False
            # Connections taken but not yet opened (several accepted in one event-loop turn) count too.
            self._slots[worker - 1] = max(self._slots[worker - 1], held) + 1
            return True


class FailureTable:
    """Failed logins per client address (`lockout.FailureStore`), a fixed-size table in shared memory.

    An address is found by its `hash()`, which is the same in every worker (they are forked from one process,
    which fixes Python's hash seed), in a bucket of WAYS slots. A new address takes its bucket's empty slot or
    the one with the oldest last failure, where a lockout counts as a failure at its end: an address that is
    locked out outlasts a flood of addresses that are not. Changes, and the reads they depend on, are made under
    `lock()`; reads without it are for advice only (how long to delay, whether to refuse early).
    `shared=False`: for a relay of one process, which needs no lock.
    """

    def __init__(self, slots: int = LOGIN_SLOTS, shared: bool = True) -> None:
        if slots < WAYS or slots % WAYS:
            raise ValueError(f"slots must be a positive multiple of {WAYS}")
        self._buckets = slots // WAYS
        self._file = _SharedFile("smtp-relay-logins", 32 * slots, shared)
        view = self._file.view
        self._keys = view[: 8 * slots].cast("q")
        self._failures = view[8 * slots : 16 * slots].cast("q")
        self._last = view[16 * slots : 24 * slots].cast("d")
        self._until = view[24 * slots :].cast("d")
        self.lock = self._file.lock

    @staticmethod
    def _key(address: str) -> int:
        return hash(address) or 1  # 0 marks an empty slot

    def _find(self, key: int) -> int:
        start = key % self._buckets * WAYS
        bucket = self._keys[start : start + WAYS].tolist()
        return start + bucket.index(key) if key in bucket else -1

    def get(self, address: str) -> Record | None:
        """The record of `address`, if any. Without `lock()` it may be half updated, but never another address's."""
        key = self._key(address)
        slot = self._find(key)
        if slot < 0:
            return None
        record = Record(self._failures[slot], self._last[slot], self._until[slot])
        return record if self._keys[slot] == key else None  # the slot changed hands meanwhile

    def put(self, address: str, record: Record) -> None:
        """Store `record` (the caller holds `lock()`)."""
        key = self._key(address)
        slot = self._find(key)
        if slot < 0:
            start = key % self._buckets * WAYS
            slot = min(range(start, start + WAYS), key=self._ends)
            self._keys[slot] = 0  # while it changes hands, `get()` finds it under neither address
        self._failures[slot], self._last[slot], self._until[slot] = record
        self._keys[slot] = key

    def delete(self, address: str) -> None:
        """Forget `address` (the caller holds `lock()`)."""
        slot = self._find(self._key(address))
        if slot >= 0:
            self._keys[slot] = 0

    def _ends(self, slot: int) -> float:
        """When a slot's record stops mattering, to choose which one a new address replaces: empty ones first."""
        return -1.0 if self._keys[slot] == 0 else max(self._last[slot], self._until[slot])
