"""ConnectionPool without sockets: probe before reuse, idle expiry, message cap, size cap, close."""

from __future__ import annotations

import asyncio
import types

import aiosmtplib
from aiosmtplib import SMTPResponse

from smtp_relay.pool import ConnectionPool


class FakeClient:
    def __init__(self, n: int) -> None:
        self.n = n
        self.is_connected = True
        self.rsets = 0
        self.quits = 0
        self.probe_fails = False
        self.protocol = types.SimpleNamespace(_buffer=bytearray())  # aiosmtplib's: bytes read, not yet a reply

    async def rset(self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109
        self.rsets += 1
        if self.probe_fails:
            self.is_connected = False
            raise aiosmtplib.SMTPServerDisconnected("gone")
        return SMTPResponse(250, "OK")

    async def quit(self, timeout: float | None = None) -> SMTPResponse:  # noqa: ASYNC109
        self.quits += 1
        self.is_connected = False
        return SMTPResponse(221, "bye")

    def close(self) -> None:
        self.is_connected = False


def make_pool(**kw) -> tuple[ConnectionPool, list[FakeClient]]:
    made: list[FakeClient] = []

    async def connect() -> FakeClient:
        made.append(FakeClient(len(made)))
        return made[-1]

    return ConnectionPool(connect, **kw), made  # type: ignore[arg-type]


def test_released_session_is_probed_with_rset_and_reused():
    async def main() -> None:
        pool, made = make_pool(probe_after=0)
        conn = await pool.acquire()
        pool.release(conn, reusable=True)
        again = await pool.acquire()
        assert again.client is conn.client and again.reused
        assert made[0].rsets == 1 and pool.opened == 1

    asyncio.run(main())


def test_session_with_bytes_after_its_last_reply_is_out_of_step_and_closed():
    async def main() -> None:
        closed: list[str] = []
        pool, made = make_pool()
        pool._on_close = lambda conn, reason: closed.append(reason)
        conn = await pool.acquire()
        made[0].protocol._buffer.extend(b"554 5.7.1 stray\r\n")
        pool.release(conn, reusable=True)
        assert pool.idle == 0 and closed == ["out of step"]
        assert (await pool.acquire()).client is made[1]

    asyncio.run(main())


def test_session_failing_its_probe_is_replaced_by_a_fresh_one():
    async def main() -> None:
        pool, made = make_pool(probe_after=0)
        conn = await pool.acquire()
        pool.release(conn, reusable=True)
        made[0].probe_fails = True
        again = await pool.acquire()
        assert again.client is made[1] and not again.reused

    asyncio.run(main())


def test_session_reused_right_away_is_not_probed_but_one_idle_for_a_while_is():
    async def main() -> None:
        pool, made = make_pool(probe_after=0.05)
        pool.release(await pool.acquire(), reusable=True)
        again = await pool.acquire()
        assert again.reused and made[0].rsets == 0
        pool.release(again, reusable=True)
        await asyncio.sleep(0.1)
        assert (await pool.acquire()).client is made[0] and made[0].rsets == 1

    asyncio.run(main())


def test_idle_session_expires_and_is_quit():
    async def main() -> None:
        pool, made = make_pool(idle_seconds=0.05)
        pool.release(await pool.acquire(), reusable=True)
        await asyncio.sleep(0.2)
        assert pool.idle == 0 and made[0].quits == 1
        assert (await pool.acquire()).client is made[1]

    asyncio.run(main())


def test_each_idle_session_expires_on_its_own_schedule():
    async def main() -> None:
        pool, made = make_pool(idle_seconds=0.3)
        first, second = await pool.acquire(), await pool.acquire()
        pool.release(first, reusable=True)
        await asyncio.sleep(0.15)
        pool.release(second, reusable=True)
        await asyncio.sleep(0.25)  # first idle 0.4 s (gone), second 0.25 s (kept)
        assert (made[0].quits, made[1].quits, pool.idle) == (1, 0, 1)
        await asyncio.sleep(0.15)
        assert (made[1].quits, pool.idle) == (1, 0)
        await pool.close()

    asyncio.run(main())


def test_session_is_closed_after_max_messages_and_pool_size_is_bounded():
    async def main() -> None:
        pool, made = make_pool(max_messages=2, size=1)
        conn = await pool.acquire()
        pool.release(conn, reusable=True)
        conn = await pool.acquire()
        pool.release(conn, reusable=True)  # second message: worn out
        await asyncio.sleep(0)
        assert pool.idle == 0 and made[0].quits == 1
        a, b = await pool.acquire(), await pool.acquire()
        pool.release(a, reusable=True)
        pool.release(b, reusable=True)  # over the size: closed
        await asyncio.sleep(0)
        assert pool.idle == 1

    asyncio.run(main())


def test_unusable_session_is_closed_not_pooled_and_close_quits_idle_sessions():
    async def main() -> None:
        pool, made = make_pool()
        a, b = await pool.acquire(), await pool.acquire()
        pool.release(a, reusable=False)
        assert not made[0].is_connected and made[0].quits == 0
        pool.release(b, reusable=True)
        await pool.close()
        assert made[1].quits == 1 and pool.idle == 0
        c = await pool.acquire()
        pool.release(c, reusable=True)
        assert pool.idle == 0, "a closed pool keeps nothing"

    asyncio.run(main())


def test_the_pool_says_why_it_closes_each_session():
    async def main() -> None:
        closed: list[tuple[int, str]] = []
        made: list[FakeClient] = []

        async def connect() -> FakeClient:
            made.append(FakeClient(len(made)))
            return made[-1]

        pool = ConnectionPool(
            connect,  # type: ignore[arg-type]
            size=1,
            max_messages=2,
            idle_seconds=0.05,
            probe_after=0,
            on_close=lambda conn, reason: closed.append((conn.client.n, reason)),  # type: ignore[attr-defined]
        )
        first, second = await pool.acquire(), await pool.acquire()
        pool.release(first, reusable=True)
        pool.release(second, reusable=True)  # the pool holds one
        third = await pool.acquire(fresh=True)
        pool.discard(third)
        again = await pool.acquire()  # the first, probed
        pool.release(again, reusable=True)  # its second message: worn out
        fourth = await pool.acquire()
        pool.release(fourth, reusable=False)
        fifth = await pool.acquire()
        pool.release(fifth, reusable=True)
        await asyncio.sleep(0.12)  # idle past idle_seconds
        sixth = await pool.acquire()
        pool.release(sixth, reusable=True)
        await pool.close()
        assert closed == [
            (1, "pool full"),
            (2, "failed"),
            (0, "max messages"),
            (3, "not reusable"),
            (4, "idle"),
            (5, "shutdown"),
        ], closed

    asyncio.run(main())
