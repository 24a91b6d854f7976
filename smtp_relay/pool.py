"""A small pool of connected, TLS-protected and authenticated upstream sessions, reused between messages."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

# Module constants for now (candidates for settings): how many idle sessions are kept, how long one may sit idle,
# how many messages one session carries before it is closed, and how long the health probe may take.
POOL_SIZE = 16
IDLE_SECONDS = 30.0
MAX_MESSAGES_PER_CONNECTION = 1000
PROBE_TIMEOUT = 5.0
# A session used less than this long ago is not probed: it was just healthy, and if it broke since, the failure
# comes before the end of data and the message is retried once on a fresh session anyway.
PROBE_AFTER_IDLE = 1.0
QUIT_TIMEOUT = 2.0
_OUT_OF_STEP = "out of step"


@dataclass(eq=False, slots=True)
class PooledConnection:
    """One upstream session and its history; `reused` is True once it was taken from the pool."""

    client: aiosmtplib.SMTP
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    messages: int = 0
    reused: bool = False


class ConnectionPool:
    """Idle upstream sessions, most recently used first.

    `acquire` hands out an idle session, after a health probe (RSET) if it sat idle for a while, or a
    fresh one from `connect`; `release` puts a clean session back (or closes it when it is worn out or the pool is
    full). Only idle sessions are held here: the number in use is bounded by the client connections.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[aiosmtplib.SMTP]],
        *,
        size: int = POOL_SIZE,
        idle_seconds: float = IDLE_SECONDS,
        max_messages: int = MAX_MESSAGES_PER_CONNECTION,
        probe_timeout: float = PROBE_TIMEOUT,
        probe_after: float = PROBE_AFTER_IDLE,
        on_close: Callable[[PooledConnection, str], None] | None = None,
    ) -> None:
        self._connect = connect
        self._on_close = on_close  # told why each session is closed (the relay logs it at DEBUG)
        self.size = size
        self.idle_seconds = idle_seconds
        self.max_messages = max_messages
        self.probe_timeout = probe_timeout
        self.probe_after = probe_after
        self._idle: list[PooledConnection] = []  # oldest release first
        self._sweep: asyncio.TimerHandle | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.opened = 0  # upstream connections opened so far (for tests and the benchmark)

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> PooledConnection:
        """A healthy session: a probed idle one unless `fresh`, else a new one (connect errors propagate)."""
        while self._idle and not fresh and not self._closed:
            conn = self._idle.pop()
            idle_for = time.monotonic() - conn.last_used
            if idle_for > self.idle_seconds or not conn.client.is_connected:
                self._discard(conn, "idle" if conn.client.is_connected else "lost")
                continue
            if idle_for < self.probe_after:
                conn.reused = True
                return conn
            try:
                response = await conn.client.rset(timeout=self.probe_timeout)
            except (aiosmtplib.SMTPException, OSError, asyncio.IncompleteReadError):
                self._discard(conn, "probe failed", polite=False)
                continue
            except BaseException:  # cancelled mid-probe (the client went away): close it, it is in no pool now
                self._discard(conn, "probe cancelled", polite=False)
                raise
            if response.code != 250:
                self._discard(conn, "probe refused")
                continue
            conn.reused = True
            return conn
        client = await self._connect()
        self.opened += 1
        return PooledConnection(client)

    def release(self, conn: PooledConnection, *, reusable: bool) -> None:
        """Return a session whose last transaction is finished (delivered, or refused and reset); else close it."""
        conn.messages += 1 if reusable else 0
        conn.last_used = time.monotonic()
        reason = self._not_kept(conn, reusable)
        if reason is not None:
            # No QUIT to a session out of step: its reply would be read from what the upstream already sent.
            self._discard(conn, reason, polite=reusable and reason != _OUT_OF_STEP)
            return
        self._idle.append(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.idle_seconds, self._expire)

    def _not_kept(self, conn: PooledConnection, reusable: bool) -> str | None:
        """Why a released session is closed rather than kept idle; None: it is kept."""
        if not reusable:
            return "not reusable"
        if self._closed:
            return "shutdown"
        if not conn.client.is_connected:
            return "lost"
        if _unread(conn.client):
            return _OUT_OF_STEP
        if conn.messages >= self.max_messages:
            return "max messages"
        if len(self._idle) >= self.size:
            return "pool full"
        return None

    def discard(self, conn: PooledConnection) -> None:
        """Close a session that failed: no QUIT, it may be in any state."""
        self._discard(conn, "failed", polite=False)

    def _expire(self) -> None:
        """Close the sessions idle for `idle_seconds`; one timer for the pool, not one per message."""
        self._sweep = None
        now = time.monotonic()
        while self._idle and now - self._idle[0].last_used >= self.idle_seconds:
            self._discard(self._idle.pop(0), "idle")
        if self._idle and not self._closed:
            wait = self._idle[0].last_used + self.idle_seconds - now
            self._sweep = asyncio.get_running_loop().call_later(wait, self._expire)

    def _discard(self, conn: PooledConnection, reason: str, *, polite: bool = True) -> None:
        if polite and conn.client.is_connected:
            task = asyncio.get_running_loop().create_task(_quit(conn.client))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        else:
            conn.client.close()
        if self._on_close is not None:  # after the close: whatever it does, no socket is left open
            self._on_close(conn, reason)

    async def close(self) -> None:
        """Say QUIT to every idle session (bounded) and refuse to keep any more."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in idle:
            self._discard(conn, "shutdown")
        if self._closing:
            await asyncio.wait(list(self._closing), timeout=QUIT_TIMEOUT + 1)


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit(timeout=QUIT_TIMEOUT)
    except (aiosmtplib.SMTPException, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        client.close()


def _unread(client: aiosmtplib.SMTP) -> bool:
    """Bytes the upstream sent after the reply that ended the transaction (in the same read): replies to nothing
    the relay asked. Kept, the session would answer the next message's first command with them (a stray `554`
    refusing a message the upstream never saw), so the session is out of step and is not reused."""
    protocol = client.protocol
    return protocol is not None and bool(protocol._buffer)
