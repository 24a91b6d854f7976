"""Entry point for `python -m smtp_relay`."""

from __future__ import annotations

from smtp_relay.cli import main

raise SystemExit(main())
