"""Several relay processes on one listening socket (WORKERS > 1): a supervisor starts, watches and stops them.

One Python process relays on one core. With WORKERS=N the supervisor binds the listening socket once, forks N
workers that each run a whole relay (event loop, upstream pool) on that shared socket, and
restarts a worker that dies. The kernel hands each new connection to whichever worker accepts it first, so a
busy worker takes fewer. The supervisor itself relays nothing: on SIGTERM or SIGINT it passes SIGTERM to every
worker (each finishes its transactions, as a single relay does), a second signal forces them, and it exits
once all are gone. A worker whose supervisor disappears (SIGKILL) is told so by the kernel at once and shuts
down as on SIGTERM: it stops listening (so a relay started anew can take the port) and finishes its transactions.

MAX_CONNECTIONS and AUTH_MAX_FAILURES hold for the whole relay, as for one process: the workers count open
connections and failed logins in memory shared with the supervisor (`shared`), whichever worker the kernel
hands a connection to.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass

from smtp_relay import logs
from smtp_relay.config import ConfigError, Settings
from smtp_relay.shared import ConnectionCounts, FailureTable

# How often the supervisor looks for exited workers, and a worker for its supervisor.
POLL_SECONDS = 0.2
WATCHDOG_SECONDS = 1.0
# A worker that dies sooner than this after its start is restarted only after RESTART_DELAY; after
# MAX_QUICK_DEATHS such deaths in a row the supervisor gives up, stops the others and exits 1 (no crash loop:
# a container's restart policy takes over from there).
MIN_UPTIME = 5.0
RESTART_DELAY = 1.0
MAX_QUICK_DEATHS = 5
# The signal the kernel sends a worker when its supervisor dies (prctl PR_SET_PDEATHSIG).
ORPHANED = signal.SIGUSR2
# Signals blocked around fork() so that a worker never loses one before its event loop handles it (the worker
# unblocks them then: `RelayServer.startup`).
SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, ORPHANED}
# A worker drains on SIGTERM however often it comes (a service manager may signal the whole process group, so a
# worker gets the supervisor's SIGTERM and its own); SIGUSR1 from the supervisor forces it; SIGKILL follows when a
# third signal finds a worker still there (one that cannot run its event loop).
FORCE = signal.SIGUSR1


@dataclass
class _Worker:
    index: int
    pid: int = 0
    started: float = 0.0
    restart_at: float = 0.0  # > 0: exited; start again at this monotonic time
    quick_deaths: int = 0  # deaths in a row sooner than MIN_UPTIME after a start


class Supervisor:
    """Runs `settings.workers` relay processes on one socket; `run()` returns the exit code."""

    def __init__(self, settings: Settings) -> None:
        from smtp_relay.server import RelayServer

        self.settings = settings
        self._sockets: list[socket.socket] = []
        self._counts = ConnectionCounts(settings.workers)
        self._logins = FailureTable()
        RelayServer(settings, self._logins)  # any configuration error (TLS files) shows here, once
        self._workers = [_Worker(i) for i in range(1, settings.workers + 1)]
        self._signals = 0
        self._pending_signals: list[int] = []
        self._failed = False

    def run(self) -> int:
        from smtp_relay.server import bind

        s = self.settings
        self._sockets = bind(s.listen_host, s.listen_port)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        signal.signal(FORCE, signal.SIG_IGN)  # meant for workers only (a group-wide one must not end this process)
        logs.event(
            logging.INFO,
            "supervisor.started",
            workers=s.workers,
            host=s.listen_host,
            port=s.listen_port,
            max_connections=s.max_connections,
        )
        try:
            for worker in self._workers:
                self._start(worker)
            while any(w.pid for w in self._workers) or not self._signals:
                while self._pending_signals:
                    self._pass_on(self._pending_signals.pop(0))
                self._reap()
                now = time.monotonic()
                for worker in self._workers:
                    if not worker.pid and not self._signals and 0 < worker.restart_at <= now:
                        self._start(worker)
                time.sleep(POLL_SECONDS)
        finally:
            self._close_sockets()
        logs.event(logging.INFO, "shutdown.complete", workers=s.workers)
        return 1 if self._failed else 0

    def _close_sockets(self) -> None:
        for sock in self._sockets:
            sock.close()

    def _on_signal(self, signum: int, frame: object) -> None:
        # Only noted here: the main loop acts on it (a handler that logs could re-enter a write in progress).
        self._pending_signals.append(signum)

    def _pass_on(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        running = [w.pid for w in self._workers if w.pid]
        if self._signals == 1:
            logs.event(logging.INFO, "shutdown.started", signal=name, workers=len(running))
            self._close_sockets()  # new connections are refused now, not queued for workers that are leaving
        else:
            logs.event(logging.WARNING, "shutdown.forced", signal=name, workers=len(running))
        passed = (signal.SIGTERM, FORCE)[self._signals - 1] if self._signals <= 2 else signal.SIGKILL
        for pid in running:
            try:
                os.kill(pid, passed)
            except ProcessLookupError:
                pass

    def _start(self, worker: _Worker) -> None:
        logs.flush_all()  # or the child would write the supervisor's pending lines again
        me = os.getpid()
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            pid = os.fork()
        except OSError as exc:  # out of processes or memory: try again later
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
            logs.event(logging.ERROR, "worker.fork_failed", worker=worker.index, reason=str(exc))
            worker.restart_at = time.monotonic() + RESTART_DELAY
            return
        if pid != 0:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        else:  # the worker: never returns into the supervisor's code
            code = 70
            try:
                code = _worker_main(self.settings, self._sockets, (self._counts, self._logins), worker.index, me)
            except ConfigError as exc:
                print(f"smtp-relay: configuration error: {exc}", file=sys.stderr)
                code = 2
            except BaseException:
                logs.log.exception("worker.crashed", extra={"fields": {"worker": worker.index}})
            finally:
                logs.flush_all()
                os._exit(code)
        worker.pid, worker.started, worker.restart_at = pid, time.monotonic(), 0.0

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self._workers if w.pid == pid), None)
            if worker is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            worker.pid = 0
            self._counts.set(worker.index, 0)  # its connections died with it
            if self._signals:
                self._failed = self._failed or code != 0
                logs.event(logging.INFO, "worker.stopped", worker=worker.index, pid=pid, exit_code=code)
                continue
            uptime = time.monotonic() - worker.started
            worker.quick_deaths = worker.quick_deaths + 1 if uptime < MIN_UPTIME else 0
            if worker.quick_deaths >= MAX_QUICK_DEATHS:
                logs.event(
                    logging.ERROR,
                    "worker.failing",
                    worker=worker.index,
                    exit_code=code,
                    reason=f"died {worker.quick_deaths} times in a row within {MIN_UPTIME:.0f} s of its start; "
                    "stopping the relay",
                )
                self._failed = True
                self._pending_signals.append(signal.SIGTERM)
                continue
            delay = RESTART_DELAY if worker.quick_deaths else 0.0
            worker.restart_at = time.monotonic() + delay
            logs.event(
                logging.ERROR,
                "worker.exited",
                worker=worker.index,
                pid=pid,
                exit_code=code,
                uptime=f"{uptime:.1f}",
                reason="restarting" + (f" in {delay:.0f} s" if delay else ""),
            )


def _worker_main(
    settings: Settings,
    sockets: list[socket.socket],
    shared: tuple[ConnectionCounts, FailureTable],
    index: int,
    supervisor: int,
) -> int:
    """One worker: a whole relay on the supervisor's sockets; stops when told to or when orphaned."""
    from smtp_relay.server import RelayServer, run_loop

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor passes Ctrl-C on as SIGTERM
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    counts, logins = shared
    server = RelayServer(settings, logins)

    _signal_when_orphaned(supervisor)

    async def serve() -> int:
        loop = asyncio.get_running_loop()

        def orphaned() -> None:
            """The kernel's ORPHANED, or the watchdog: stop once, if the supervisor is really gone."""
            if os.getppid() == supervisor or server.stopping:
                return  # a stray signal, or already stopping
            logs.event(logging.WARNING, "worker.orphaned", worker=index, reason="supervisor gone")
            server.stop()

        def watchdog() -> None:  # in case the kernel's signal could not be asked for
            orphaned()
            if not server.stopping:
                loop.call_later(WATCHDOG_SECONDS, watchdog)

        loop.add_signal_handler(ORPHANED, orphaned)
        loop.call_later(WATCHDOG_SECONDS, watchdog)
        return await server.serve(sockets, worker=index, counts=counts)

    return run_loop(serve)


def _signal_when_orphaned(supervisor: int) -> None:
    """Ask the kernel for ORPHANED when the supervisor dies (it is blocked until the event loop handles it)."""
    pr_set_pdeathsig = 1
    try:
        if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(ORPHANED), 0, 0, 0) != 0:
            return  # pragma: no cover - refused: the watchdog notices within a second
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the watchdog notices within a second
        return
    if os.getppid() != supervisor:  # it died before the request: no signal will come
        os.kill(os.getpid(), ORPHANED)
