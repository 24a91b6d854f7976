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


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    # A SIGTERM (a closed terminal, `timeout`, a process manager) stops the relay as Ctrl-C does, so no relay is
    # left behind holding the port.
    signal.signal(signal.SIGTERM, _interrupt)
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
        # Demo defaults; anything already set in the environment wins.
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
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal (make passes its own on) must not cut this short
            signal.signal(sig, signal.SIG_IGN)
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
