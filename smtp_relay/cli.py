"""The `smtp-relay` command: run the relay, check the configuration, or probe a running relay's health."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from smtp_relay import __version__, logs
from smtp_relay.config import ConfigError, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smtp-relay",
        description="Authenticating, allowlisting SMTP relay. Configured by environment variables (see README).",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "healthcheck"),
        default="serve",
        help="serve (default) runs the relay; healthcheck probes the relay's own listener",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the environment, print the effective settings (secrets masked) and exit",
    )
    parser.add_argument("--version", action="version", version=f"smtp-relay {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.check_config:
            return _print_config(settings)
        if args.command == "healthcheck":
            return _healthcheck(settings)
        logs.setup(settings)
        return _run(settings)
    except ConfigError as exc:
        if args.command == "healthcheck" and not args.check_config:
            # Docker reserves a health check's exit code 2; a relay whose configuration no longer loads
            # (say, a certificate became unreadable) is simply unhealthy.
            print(f"unhealthy: configuration error: {exc}", file=sys.stderr)
            return 1
        print(f"smtp-relay: configuration error: {exc}", file=sys.stderr)
        return 2


def _print_config(settings: Settings) -> int:
    from smtp_relay.server import preflight

    preflight(settings)
    for name, value in settings.masked().items():
        print(f"{name}={value}")
    for warning in settings.warnings():
        print(f"warning: {warning}", file=sys.stderr)
    print("configuration OK", file=sys.stderr)
    return 0


def _healthcheck(settings: Settings) -> int:
    from smtp_relay.healthcheck import check

    problem = check(settings)
    if problem is None:
        return 0
    print(f"unhealthy: {problem}", file=sys.stderr)
    return 1


def _run(settings: Settings) -> int:
    from smtp_relay.server import RelayServer, run_loop

    for warning in settings.warnings():
        logs.event(logging.WARNING, "config.warning", reason=warning)
    if settings.workers > 1:
        from smtp_relay.workers import Supervisor

        return Supervisor(settings).run()

    async def serve() -> int:
        return await RelayServer(settings).serve()

    return run_loop(serve)
