"""Demo: a local upstream that prints every message, and the relay in front of it (Ctrl-C stops both).

Run with `make demo`, then in another terminal:

    swaks --server localhost:1025 --auth-user user --auth-password password \\
          --from sender@example.com --to recipient@example.com \\
          --header "Subject: Test Email" --body "This is a test email."
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from aiosmtpd.controller import Controller

UPSTREAM_PORT = int(os.environ.get("DEMO_UPSTREAM_PORT", "2525"))


class PrintingUpstream:
    """Stands in for the organisation's mail server: shows what the relay forwarded."""

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        bar = "-" * 72
        body = envelope.original_content.decode("utf-8", errors="replace")
        print(f"\n{bar}\nDEMO UPSTREAM received a message", flush=True)
        print(f"MAIL FROM: {envelope.mail_from}\nRCPT TO:   {', '.join(envelope.rcpt_tos)}\n{bar}", flush=True)
        print(body.rstrip("\r\n").replace("\r\n", "\n"), flush=True)
        print(bar, flush=True)
        return "250 2.0.0 Accepted by the demo upstream"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_stopping = False


def _interrupt(signum: int, frame: object) -> None:
    """The first stop signal stops the demo; any later one (a burst of Ctrl-C, make passing its own on) is
    ignored, so that the relay's clean stop is never cut short and no relay is left behind. (Not by SIG_IGN:
    Python reports a signal that was already on its way then as an error, with a traceback.)"""
    global _stopping
    if _stopping:
        return
    _stopping = True
    raise KeyboardInterrupt


def main() -> int:
    # Ctrl-C, SIGTERM (`timeout`, a process manager) and SIGHUP (the terminal was closed) all stop the relay
    # too: it runs in its own session, so no signal reaches it but the one sent below.
    for sig in STOP_SIGNALS:
        signal.signal(sig, _interrupt)
    upstream = Controller(PrintingUpstream(), hostname="127.0.0.1", port=UPSTREAM_PORT)
    try:
        upstream.start()
    except OSError as exc:  # most often: something else already listens on the port
        print(
            f"demo: cannot listen on 127.0.0.1:{UPSTREAM_PORT} for the demo upstream ({exc.strerror or exc}); "
            "choose another port with DEMO_UPSTREAM_PORT=<port> make demo",
            file=sys.stderr,
        )
        return 1
    print(f"demo upstream listening on 127.0.0.1:{UPSTREAM_PORT}", flush=True)
    env = {
        # Demo defaults; anything already set in the environment wins. The demo runs with the default password:
        # it listens on this machine only (swaks and smtplib try 127.0.0.1 after ::1 for "localhost").
        "LISTEN_HOST": "127.0.0.1",
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(UPSTREAM_PORT),
        "RELAY_USE_TLS": "false",
        "LOG_FILE": "",
        **os.environ,
    }
    # Own session: Ctrl-C reaches only this script, which then asks the relay once to stop gracefully.
    relay = subprocess.Popen([sys.executable, "-m", "smtp_relay"], env=env, start_new_session=True)
    try:
        while relay.poll() is None:
            time.sleep(0.2)
    except KeyboardInterrupt:
        relay.send_signal(signal.SIGTERM)
        try:
            relay.wait(timeout=15)
        except subprocess.TimeoutExpired:
            relay.kill()
    finally:
        upstream.stop()
    return relay.returncode or 0


if __name__ == "__main__":
    raise SystemExit(main())
