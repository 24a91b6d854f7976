"""`make demo` (scripts/demo.py) as the README's quick start runs it: the README's swaks example reaches the printing
demo upstream, and every way a user stops the demo (Ctrl-C, a burst of them, a closed terminal) stops the relay
too, leaving its port free."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
from support.net import free_port
from support.relay import REPO_ROOT, clean_env


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class Demo:
    def __init__(self, tmp_path) -> None:
        self.port, upstream = free_port(), free_port()
        env = clean_env({"LISTEN_PORT": str(self.port), "DEMO_UPSTREAM_PORT": str(upstream)})  # the demo's own host
        self.out = tmp_path / "demo.out"
        with open(self.out, "wb") as out:
            # Its own process group, as a terminal's foreground job: the signals below go to the whole group.
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO_ROOT / "scripts" / "demo.py")],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while not _listening(self.port):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()
            time.sleep(0.1)

    def output(self) -> str:
        return self.out.read_text("utf-8", errors="replace")

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stopped(self, timeout: float = 20.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail("the demo did not stop:\n" + self.output())

    def close(self) -> None:
        if self.proc.poll() is None:  # stopped as a user would, so that the demo stops its relay too
            self.signal_group(signal.SIGINT)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def demo(tmp_path):
    d = Demo(tmp_path)
    yield d
    d.close()


def readme_swaks_example() -> list[str]:
    """The quick start's swaks command, as README.md has it (continuation lines joined)."""
    text = (REPO_ROOT / "README.md").read_text()
    start = text.index("swaks --server localhost:1025")
    command = text[start : text.index("```", start)].replace("\\\n", " ")
    return shlex.split(command)


def test_the_readme_swaks_example_reaches_the_demo_upstream(demo, require_tool):
    command = readme_swaks_example()
    assert command[:3] == ["swaks", "--server", "localhost:1025"], command
    command[0], command[2] = require_tool("swaks"), f"localhost:{demo.port}"
    out = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "250 2.0.0" in out.stdout
    deadline = time.monotonic() + 5
    while "This is a test email." not in demo.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    printed = demo.output()
    assert "DEMO UPSTREAM received a message" in printed and "Subject: Test Email" in printed, printed
    assert "RCPT TO:   recipient@example.com" in printed and "Received: from" in printed, printed


@pytest.mark.parametrize(
    "signals",
    [[signal.SIGINT], [signal.SIGINT] * 3, [signal.SIGHUP], [signal.SIGTERM, signal.SIGINT]],
    ids=["ctrl-c", "ctrl-c-burst", "terminal-closed", "term-then-int"],
)
def test_stopping_the_demo_stops_its_relay_cleanly_and_frees_the_port(demo, signals):
    for sig in signals:
        demo.signal_group(sig)
    demo.stopped()
    deadline = time.monotonic() + 10
    while _listening(demo.port) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _listening(demo.port), "a relay was left behind on the demo's port"
    output = demo.output()
    assert "Traceback" not in output, output
    assert "shutdown.complete" in output, output
