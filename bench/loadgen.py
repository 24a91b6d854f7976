"""SMTP load generator for the benchmark: N concurrent workers, each opening connections that send M messages.

It speaks plain ESMTP with AUTH PLAIN (when credentials are given), waits for every reply (no pipelining, like a
typical application), records the latency of each message (MAIL FROM .. the 250 after end of data), and prints
one JSON object on stdout: sent, failed, elapsed, msgs_per_s, p50_ms, p99_ms, cpu_s (its own CPU time).
Exit status 1 if any message was not accepted with a 2xx.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import resource
import sys
import time
from collections.abc import Callable

try:
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None  # type: ignore[assignment]


def make_body(size: int, index: int = 0) -> bytes:
    """A message of about `size` bytes: headers, then 76-character lines (some starting with a dot)."""
    head = (
        f"From: bench@example.com\r\nTo: sink@example.com\r\nSubject: bench {index}\r\n"
        f"Message-ID: <{index}.{time.monotonic_ns()}@bench.example.com>\r\n\r\n"
    ).encode()
    line = b"." + b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abc\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines


def dot_stuff(body: bytes) -> bytes:
    stuffed = body.replace(b"\r\n.", b"\r\n..")
    if stuffed.startswith(b"."):
        stuffed = b"." + stuffed
    if not stuffed.endswith(b"\r\n"):
        stuffed += b"\r\n"
    return stuffed + b".\r\n"


class Failure(Exception):
    pass


HELD: list[Client] = []  # hold mode: the connections logged in so far


class Client(asyncio.Protocol):
    """One SMTP connection as a state machine on asyncio's callbacks: each reply completes a step and sends the
    next command.

    No stream reader, task or coroutine per reply: the generator's own CPU per message stays small next to the
    systems it measures (on a 2-core machine, every cycle it spends is one they cannot).
    """

    def __init__(self, args: argparse.Namespace, payload: bytes, latencies: list[float], hold: bool) -> None:
        self.args = args
        self.payload = payload
        self.latencies = latencies
        self.hold = hold
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.expect = b"2"  # the first digit of the reply each step waits for
        self.after = self.greeted
        self.left = args.per_conn
        self.started = 0.0
        self.quitting = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.quitting:  # a server may hang up after QUIT without its 221
                self.done.set_result(None)
            else:
                self.done.set_exception(Failure(f"connection closed ({exc or 'EOF'})"))

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\n")
            if end < 0:
                return
            line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
            if line[3:4] == b"-":  # a continuation line: the reply goes on
                continue
            if line[:1] != self.expect:
                self.fail(line.decode(errors="replace").strip())
                return
            self.after()

    def send(self, data: bytes, expect: bytes, after: Callable[[], None]) -> None:
        assert self.transport is not None
        self.expect, self.after = expect, after
        self.transport.write(data)

    def fail(self, reason: str) -> None:
        if not self.done.done():
            self.done.set_exception(Failure(reason))
        if self.transport is not None:
            self.transport.close()

    def greeted(self) -> None:
        self.send(b"EHLO loadgen.example.com\r\n", b"2", self.helloed)

    def helloed(self) -> None:
        if self.args.user:
            token = base64.b64encode(f"\0{self.args.user}\0{self.args.password}".encode())
            self.send(b"AUTH PLAIN " + token + b"\r\n", b"2", self.ready)
        else:
            self.ready()

    def ready(self) -> None:
        if self.hold:
            HELD.append(self)
            if len(HELD) == self.args.conns:  # every connection is open and logged in: the caller may measure
                print("ready", len(HELD), file=sys.stderr, flush=True)
                loop = asyncio.get_running_loop()
                for client in HELD:  # all held from here, for `hold` seconds
                    loop.call_later(self.args.hold, client.next_message)
        else:
            self.next_message()

    def next_message(self) -> None:
        if self.left == 0:
            self.quitting = True
            self.send(b"QUIT\r\n", b"2", self.closed)
            return
        self.left -= 1
        self.started = time.perf_counter()
        self.send(b"MAIL FROM:<bench@example.com>\r\n", b"2", self.sender_ok)

    def sender_ok(self) -> None:
        self.send(b"RCPT TO:<sink@example.com>\r\n", b"2", self.recipient_ok)

    def recipient_ok(self) -> None:
        self.send(b"DATA\r\n", b"3", self.data_ok)

    def data_ok(self) -> None:
        self.send(self.payload, b"2", self.delivered)

    def delivered(self) -> None:
        self.latencies.append(time.perf_counter() - self.started)
        self.next_message()

    def closed(self) -> None:
        if not self.done.done():
            self.done.set_result(None)
        if self.transport is not None:
            self.transport.close()


async def connection(args: argparse.Namespace, payload: bytes, latencies: list[float], hold: bool) -> None:
    loop = asyncio.get_running_loop()
    transport, client = await loop.create_connection(
        lambda: Client(args, payload, latencies, hold), args.host, args.port
    )
    try:
        await client.done
    finally:
        transport.close()


async def worker(args: argparse.Namespace, payload: bytes, latencies: list[float], errors: list[str]) -> None:
    for _ in range(args.rounds):
        if errors:  # one failure fails the run: stop rather than go on for every remaining round
            return
        try:
            await asyncio.wait_for(connection(args, payload, latencies, False), args.timeout)
        except (Failure, OSError, TimeoutError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")


async def run(args: argparse.Namespace) -> dict[str, object]:
    payload = dot_stuff(make_body(args.size))
    latencies: list[float] = []
    errors: list[str] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    if args.hold:
        # Idle-connection mode: open `conns` authenticated connections, keep them for `hold` seconds.
        tasks = [
            asyncio.create_task(asyncio.wait_for(connection(args, payload, latencies, True), args.hold + args.timeout))
            for _ in range(args.conns)
        ]
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors += [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    else:
        await asyncio.gather(*(worker(args, payload, latencies, errors) for _ in range(args.conns)))
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[max(0, math.ceil(p * len(latencies)) - 1)] * 1000  # nearest rank

    expected = 0 if args.hold else args.conns * args.rounds * args.per_conn
    return {
        "sent": len(latencies),
        "expected": expected,
        "failed": len(errors),
        "errors": errors[:5],
        "elapsed": elapsed,
        "msgs_per_s": len(latencies) / elapsed if elapsed else 0.0,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "cpu_s": (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime),
        "payload_bytes": len(payload),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--user", default="")
    p.add_argument("--password", default="")
    p.add_argument("--size", type=int, default=1024, help="message size in bytes")
    p.add_argument("--conns", type=int, default=10, help="concurrent connections")
    p.add_argument("--per-conn", type=int, default=10, help="messages per connection")
    p.add_argument("--rounds", type=int, default=10, help="connections each worker opens, one after another")
    p.add_argument("--hold", type=float, default=0.0, help="open --conns authenticated idle connections for N s")
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args()
    if uvloop is not None:
        uvloop.install()
    result = asyncio.run(run(args))
    print(json.dumps(result))
    return 1 if result["failed"] or result["sent"] != result["expected"] else 0


if __name__ == "__main__":
    sys.exit(main())
