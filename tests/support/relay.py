"""Start and stop the relay as a real process (`python -m smtp_relay`), the way a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from smtp_relay.config import variable_names

from .net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]

# Credentials the test relays accept; the password is distinctive so that a leak is easy to find.
CLIENT_USER = "relayuser"
CLIENT_PASSWORD = "S3cret-Pw-9f2e7c"

# Every variable the relay reads; scrubbed from the inherited environment so the host cannot leak in.
# Every variable the relay reads, from the code itself, so none leaks in from the inherited environment.
RELAY_VARIABLES = frozenset(variable_names())


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RELAY_VARIABLES}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if extra:
        env.update(extra)
    return env


def run_cli(args: list[str], env: dict[str, str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    """Run `python -m smtp_relay ARGS` to completion (bounded) with exactly env (plus the scrubbed base)."""
    return subprocess.run(
        [sys.executable, "-m", "smtp_relay", *args],
        cwd=REPO_ROOT,
        env=clean_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def relay_env(
    workdir: Path,
    upstream_port: int,
    listen_port: int | None = None,
    **overrides: str,
) -> dict[str, str]:
    """The environment of a test relay: plain upstream on 127.0.0.1:upstream_port, log file in workdir."""
    env = {
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": str(listen_port or free_port()),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(upstream_port),
        "RELAY_USE_TLS": "false",
        "RELAY_USE_SSL": "false",
        "SMTP_AUTH_USERNAME": CLIENT_USER,
        "SMTP_AUTH_PASSWORD": CLIENT_PASSWORD,
        "ALLOWED_FROM_DOMAINS": "example.com",
        "ALLOWED_TO_DOMAINS": "example.com, example.org",
        "LOG_FILE": str(workdir / "relay.log"),
        "LOG_LEVEL": "INFO",
        "TIMEOUT": "4",
    }
    env.update(overrides)
    return env


class RelayProcess:
    """One relay process; stdout and stderr go to files in workdir (never a pipe that could fill up)."""

    def __init__(self, env: dict[str, str], workdir: Path, args: list[str] | None = None) -> None:
        self.env = env
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.args = args or []
        self.host = env.get("LISTEN_HOST", "127.0.0.1")
        self.port = int(env["LISTEN_PORT"])
        self.stdout_path = workdir / f"stdout-{self.port}.txt"
        self.stderr_path = workdir / f"stderr-{self.port}.txt"
        self.proc: subprocess.Popen[bytes] | None = None

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, wait: bool = True, timeout: float = 15.0) -> RelayProcess:
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtp_relay", *self.args],
                cwd=REPO_ROOT,
                env=clean_env(self.env),
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 15.0) -> None:
        """Poll-connect until a 220 greeting arrives; fail with the process output if it exits first."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited early with {self.proc.returncode}\n{self.describe()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1.0) as s:
                    s.settimeout(2.0)
                    greeting = s.recv(1024)
                    if greeting.startswith(b"220"):
                        # QUIT, then wait for the relay to close: until then this probe holds one of
                        # MAX_CONNECTIONS, which a test with MAX_CONNECTIONS=1 would find taken.
                        with contextlib.suppress(OSError):
                            s.sendall(b"QUIT\r\n")
                            while s.recv(1024):
                                pass
                        return
                    last_error = AssertionError(f"unexpected greeting {greeting!r}")
            except OSError as e:
                last_error = e
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"relay not ready after {timeout}s ({last_error!r})\n{self.describe()}")

    def send_signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal and wait (bounded); kill if it does not exit. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    # -- output ------------------------------------------------------------------------------------
    @property
    def stdout(self) -> str:
        return _read(self.stdout_path)

    @property
    def stderr(self) -> str:
        return _read(self.stderr_path)

    @property
    def log_file(self) -> str:
        path = self.env.get("LOG_FILE")
        return _read(Path(path)) if path else ""

    def all_output(self) -> str:
        """stdout + LOG_FILE + stderr: everything the relay ever wrote."""
        return "\n".join((self.stdout, self.log_file, self.stderr))

    def log_lines(self) -> list[str]:
        """The relay's log lines (stdout)."""
        return self.stdout.splitlines()

    def wait_for_log(self, *needles: str, timeout: float = 5.0, source: str = "stdout") -> str | None:
        """Wait (bounded) for a log line containing every needle; return it or None."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.stdout if source == "stdout" else self.log_file
            for line in text.splitlines():
                if all(n in line for n in needles):
                    return line
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def describe(self) -> str:
        return f"--- relay stdout ---\n{self.stdout[-4000:]}\n--- relay stderr ---\n{self.stderr[-4000:]}"


def _read(path: Path) -> str:
    try:
        return path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
