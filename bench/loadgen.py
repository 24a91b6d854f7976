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
import resource
import sys
import time

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


async def read_reply(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    while True:
        line = await reader.readline()
        if not line:
            raise Failure("connection closed")
        if line[3:4] != b"-":
            return int(line[:3]), line


async def expect(reader: asyncio.StreamReader, ok: int) -> None:
    code, line = await read_reply(reader)
    if code // 100 != ok // 100:
        raise Failure(line.decode(errors="replace").strip())


async def connection(args: argparse.Namespace, payload: bytes, latencies: list[float], hold: bool) -> None:
    reader, writer = await asyncio.open_connection(args.host, args.port, limit=2**20)
    try:
        await expect(reader, 220)
        writer.write(b"EHLO loadgen.example.com\r\n")
        await expect(reader, 250)
        if args.user:
            token = base64.b64encode(f"\0{args.user}\0{args.password}".encode()).decode()
            writer.write(f"AUTH PLAIN {token}\r\n".encode())
            await expect(reader, 235)
        if hold:
            await asyncio.sleep(args.hold)
        for _ in range(args.per_conn):
            started = time.perf_counter()
            writer.write(b"MAIL FROM:<bench@example.com>\r\n")
            await expect(reader, 250)
            writer.write(b"RCPT TO:<sink@example.com>\r\n")
            await expect(reader, 250)
            writer.write(b"DATA\r\n")
            await expect(reader, 354)
            writer.write(payload)
            await expect(reader, 250)
            latencies.append(time.perf_counter() - started)
        writer.write(b"QUIT\r\n")
        await writer.drain()
        try:
            await asyncio.wait_for(reader.read(), 5)
        except TimeoutError:
            pass
    finally:
        writer.close()


async def worker(args: argparse.Namespace, payload: bytes, latencies: list[float], errors: list[str]) -> None:
    for _ in range(args.rounds):
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
        tasks = [asyncio.create_task(connection(args, payload, latencies, True)) for _ in range(args.conns)]
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
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

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
