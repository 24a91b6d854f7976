"""An unexpected fault inside the relay is answered 451 4.3.0 (retry later) and logged with its traceback."""

from __future__ import annotations

import asyncio
import logging

import pytest

from smtp_relay import replies
from smtp_relay.handler import RelayHandler
from smtp_relay.lockout import LoginThrottle
from smtp_relay.policy import DomainAllowlist, RelayPolicy
from smtp_relay.shared import FailureTable
from smtp_relay.upstream import Upstream, UpstreamSettings


def _handler() -> RelayHandler:
    allow = DomainAllowlist.parse(["example.com"])
    upstream = Upstream(UpstreamSettings("127.0.0.1", 9, "none", True, None, "", "", 1.0, "test"))
    return RelayHandler(RelayPolicy(allow, allow), upstream, "test", LoginThrottle(5, 60, FailureTable(8)))


def test_unexpected_exception_is_answered_451_and_logged_with_traceback(caplog: pytest.LogCaptureFixture) -> None:
    def fail() -> None:
        raise KeyError("boom")

    try:
        fail()
    except KeyError as exc:
        error = exc
    with caplog.at_level(logging.ERROR, logger="smtp_relay"):
        reply = asyncio.run(_handler().handle_exception(error))
    assert reply == replies.INTERNAL_ERROR
    assert reply.startswith("451 4.3.0 ")
    record = next(r for r in caplog.records if r.msg == "internal.error")
    assert record.exc_info is not None and record.exc_info[0] is KeyError
