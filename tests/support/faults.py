"""Fault injection for the hardening tests: an SMTP upstream that fails on demand, process probes, result records.

`FaultUpstream` is a real asyncio TCP server (in its own thread) that speaks enough SMTP for the relay's
client (EHLO, STARTTLS, AUTH PLAIN/LOGIN, MAIL, RCPT, DATA, QUIT). At one chosen step of the dialogue it
misbehaves: it closes the connection (FIN), resets it (RST, SO_LINGER 0), hangs (says nothing until the
peer goes away), or answers a 4xx / 5xx reply. At the "connect" step "close" means nothing listens (the
connection is refused) and "hang" means SYNs are dropped (a full accept queue), so connect() itself hangs.
It records a message only when it answers 250 to the end of data, exactly as a real MTA commits mail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .net import free_port

STEPS = ("connect", "greeting", "ehlo", "starttls", "auth", "mail", "rcpt", "data", "eod", "quit")
FAULTS = ("close", "reset", "hang", "4xx", "5xx")

_REPLIES_4XX = {
    "greeting": b"421 4.3.2 fault: service not available\r\n",
    "ehlo": b"451 4.3.0 fault: try again\r\n",
    "starttls": b"454 4.7.0 fault: TLS not available now\r\n",
    "auth": b"454 4.7.0 fault: temporary authentication failure\r\n",
    "mail": b"451 4.3.0 fault: try again\r\n",
    "rcpt": b"450 4.2.1 fault: mailbox busy\r\n",
    "data": b"451 4.3.0 fault: try again\r\n",
    "eod": b"451 4.3.0 fault: queue file write error\r\n",
    "quit": b"421 4.3.0 fault: closing\r\n",
}
_REPLIES_5XX = {
    "greeting": b"554 5.3.2 fault: no service for you\r\n",
    "ehlo": b"550 5.7.1 fault: go away\r\n",
    "starttls": b"554 5.7.0 fault: no TLS for you\r\n",
    "auth": b"535 5.7.8 fault: authentication credentials invalid\r\n",
    "mail": b"550 5.7.1 fault: sender refused\r\n",
    "rcpt": b"550 5.1.1 fault: no such user\r\n",
    "data": b"554 5.5.1 fault: no valid recipients\r\n",
    "eod": b"554 5.6.0 fault: content refused\r\n",
    "quit": b"554 5.0.0 fault: quit refused\r\n",
}

BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "reliability"
RESULTS_FILE = BUILD_DIR / "results.jsonl"


@dataclass
class Stored:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    tls: bool
    user: str | None


@dataclass
class _Conn:
    writer: asyncio.StreamWriter
    task: asyncio.Task[None] | None = None


@dataclass
class FaultUpstream:
    """An SMTP upstream on 127.0.0.1 that fails at `step` with `fault`; `set_fault(None)` makes it healthy."""

    server_ctx: ssl.SSLContext | None = None
    auth: tuple[str, str] | None = None
    hang_limit: float = 30.0
    port: int = 0
    step: str | None = None
    fault: str | None = None
    messages: list[Stored] = field(default_factory=list)
    connections_seen: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _server: asyncio.AbstractServer | None = None
    _blocker: list[socket.socket] = field(default_factory=list)
    _conns: set[asyncio.Task[None]] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- control (called from the test thread) ------------------------------------------------------
    def start(self) -> FaultUpstream:
        self.port = free_port()
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self._listen())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=run, name="fault-upstream", daemon=True)
        self._thread.start()
        assert ready.wait(5), "fault upstream did not start"
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        self._call(self._shutdown)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        self._loop = None

    def set_fault(self, step: str | None, fault: str | None = None) -> None:
        """Arm a fault for the next connections (None: healthy); drops every open connection first."""
        assert step is None or step in STEPS, step
        assert fault is None or fault in FAULTS, fault
        self._call(self._arm, step, fault)

    def stored(self, marker: bytes) -> list[Stored]:
        with self._lock:
            return [m for m in self.messages if marker in m.data]

    # -- internals (event loop thread) ------------------------------------------------------------
    def _call(self, fn: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(_as_coro(fn, *args), self._loop)
        fut.result(10)

    async def _listen(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", self.port))
        sock.listen(128)
        self._server = await asyncio.start_server(self._session, sock=sock, limit=4 * 1024 * 1024)

    async def _close_listeners(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for s in self._blocker:
            s.close()
        self._blocker.clear()

    async def _shutdown(self) -> None:
        await self._close_listeners()
        await self._drop_all()

    async def _drop_all(self) -> None:
        tasks = list(self._conns)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _arm(self, step: str | None, fault: str | None) -> None:
        await self._drop_all()
        await self._close_listeners()
        self.step, self.fault = step, fault
        if step == "connect" and fault == "close":
            return  # nothing listens: connection refused
        if step == "connect" and fault == "hang":
            # A listener whose accept queue is full: the kernel drops further SYNs, so connect() hangs.
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", self.port))
            listener.listen(0)
            filler = socket.create_connection(("127.0.0.1", self.port), timeout=2)
            self._blocker += [listener, filler]
            return
        await self._listen()

    def _fault_at(self, step: str) -> str | None:
        return self.fault if self.step == step else None

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self.connections_seen += 1
        try:
            await self._dialogue(reader, writer)
        except (asyncio.CancelledError, ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass
        finally:
            self._conns.discard(task)
            with contextlib.suppress(Exception):
                writer.transport.abort()

    async def _apply(self, step: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Misbehave if this is the armed step; True when the dialogue must end here."""
        fault = self._fault_at(step)
        if fault is None:
            return False
        if fault == "close":
            writer.close()
            return True
        if fault == "reset":
            _reset(writer)
            return True
        if fault == "hang":
            deadline = time.monotonic() + self.hang_limit
            while time.monotonic() < deadline:  # say nothing until the peer gives up
                try:
                    chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - time.monotonic()))
                except TimeoutError:
                    break
                if not chunk:
                    break
            return True
        reply = (_REPLIES_4XX if fault == "4xx" else _REPLIES_5XX)[step]
        writer.write(reply)
        await writer.drain()
        if step in ("greeting", "quit"):
            writer.close()
            return True
        return False

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._fault_at("connect") == "reset":
            _reset(writer)
            return
        if await self._apply("greeting", reader, writer):
            return
        if self._fault_at("greeting") in ("4xx", "5xx"):
            return
        writer.write(b"220 fault.test ESMTP fault-upstream\r\n")
        tls = False
        user: str | None = None
        mail_from: str | None = None
        rcpts: list[str] = []
        ehlo_done = False
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            arg = line[5:].strip().decode("utf-8", "replace") if len(line) > 5 else ""
            if verb in (b"EHLO", b"HELO"):
                if not ehlo_done:
                    ehlo_done = True
                    if await self._apply("ehlo", reader, writer):
                        return
                    if self._fault_at("ehlo") in ("4xx", "5xx"):
                        continue
                caps = [b"fault.test", b"SIZE 10485760", b"8BITMIME", b"PIPELINING"]
                if self.server_ctx is not None and not tls:
                    caps.append(b"STARTTLS")
                if self.auth is not None and (tls or self.server_ctx is None):
                    caps.append(b"AUTH PLAIN LOGIN")
                writer.write(b"".join(b"250-" + c + b"\r\n" for c in caps[:-1]) + b"250 " + caps[-1] + b"\r\n")
            elif verb == b"STAR":  # STARTTLS
                if await self._apply("starttls", reader, writer):
                    return
                if self._fault_at("starttls") in ("4xx", "5xx"):
                    continue
                assert self.server_ctx is not None
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                await writer.start_tls(self.server_ctx)
                tls = True
            elif verb == b"AUTH":
                if await self._apply("auth", reader, writer):
                    return
                if self._fault_at("auth") in ("4xx", "5xx"):
                    continue
                user = await self._auth(arg, reader, writer)
            elif verb == b"MAIL":
                if self.auth is not None and user is None:
                    writer.write(b"530 5.7.0 Authentication required\r\n")
                    continue
                if await self._apply("mail", reader, writer):
                    return
                if self._fault_at("mail") in ("4xx", "5xx"):
                    continue
                mail_from = arg.partition(":")[2].split(" ")[0].strip("<>")
                rcpts = []
                writer.write(b"250 2.1.0 OK\r\n")
            elif verb == b"RCPT":
                if await self._apply("rcpt", reader, writer):
                    return
                if self._fault_at("rcpt") in ("4xx", "5xx"):
                    continue
                rcpts.append(arg.partition(":")[2].split(" ")[0].strip("<>"))
                writer.write(b"250 2.1.5 OK\r\n")
            elif verb == b"DATA":
                if await self._apply("data", reader, writer):
                    return
                if self._fault_at("data") in ("4xx", "5xx"):
                    continue
                if mail_from is None or not rcpts:
                    writer.write(b"503 5.5.1 need MAIL and RCPT\r\n")
                    continue
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                body = bytearray()
                while True:
                    data_line = await reader.readline()
                    if not data_line:
                        return
                    if data_line == b".\r\n":
                        break
                    body += data_line[1:] if data_line.startswith(b".") else data_line
                if await self._apply("eod", reader, writer):
                    return
                if self._fault_at("eod") in ("4xx", "5xx"):
                    mail_from, rcpts = None, []
                    continue
                with self._lock:
                    self.messages.append(Stored(mail_from, list(rcpts), bytes(body), tls, user))
                mail_from, rcpts = None, []
                writer.write(b"250 2.0.0 OK queued as fault\r\n")
            elif verb == b"RSET":
                mail_from, rcpts = None, []
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"NOOP":
                writer.write(b"250 2.0.0 OK\r\n")
            elif verb == b"QUIT":
                if await self._apply("quit", reader, writer):
                    return
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                writer.close()
                return
            else:
                writer.write(b"502 5.5.1 not implemented\r\n")
            await writer.drain()

    async def _auth(self, arg: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        mech, _, initial = arg.partition(" ")
        try:
            if mech.upper() == "PLAIN":
                if not initial:
                    writer.write(b"334 \r\n")
                    await writer.drain()
                    initial = (await reader.readline()).strip().decode()
                _, login, password = base64.b64decode(initial).split(b"\0")
            elif mech.upper() == "LOGIN":
                if not initial:
                    writer.write(b"334 VXNlcm5hbWU6\r\n")
                    await writer.drain()
                    initial = (await reader.readline()).strip().decode()
                login = base64.b64decode(initial)
                writer.write(b"334 UGFzc3dvcmQ6\r\n")
                await writer.drain()
                password = base64.b64decode((await reader.readline()).strip())
            else:
                writer.write(b"504 5.5.4 mechanism not supported\r\n")
                return None
        except ValueError:
            writer.write(b"501 5.5.2 bad base64\r\n")
            return None
        if self.auth is not None and (login.decode(), password.decode()) == self.auth:
            writer.write(b"235 2.7.0 Authentication successful\r\n")
            return login.decode()
        writer.write(b"535 5.7.8 Authentication credentials invalid\r\n")
        return None

    def __enter__(self) -> FaultUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def _as_coro(fn: Callable[..., object], *args: object) -> None:
    result = fn(*args)
    if asyncio.iscoroutine(result):
        await result


def _reset(writer: asyncio.StreamWriter) -> None:
    """Send a TCP RST: SO_LINGER with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# -- the relay process, seen from outside --------------------------------------------------------------


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def open_sockets(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:"):
                count += 1
    return count


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def rss_kb(pid: int) -> int:
    return _status(pid, "VmRSS")


def peak_rss_kb(pid: int) -> int:
    return _status(pid, "VmHWM")


def threads(pid: int) -> int:
    return _status(pid, "Threads")


def settle(probe: Callable[[], int], target: int, timeout: float = 5.0) -> int:
    """Poll (bounded) until probe() <= target; return the last value."""
    deadline = time.monotonic() + timeout
    value = probe()
    while value > target and time.monotonic() < deadline:
        time.sleep(0.05)
        value = probe()
    return value


# -- results for the README's "Reliability and security" section ------------------------------------


def record(suite: str, case: str, **fields: object) -> None:
    """Append one case's outcome to build/reliability/results.jsonl (read by scripts/reliability_report.py)."""
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    entry = {"suite": suite, "case": case, "time": time.time(), **fields}
    with RESULTS_FILE.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry, sort_keys=True) + "\n")
