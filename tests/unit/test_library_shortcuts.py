"""The shortcuts `smtp_relay.protocol` takes around aiosmtpd still match the library they stand in for."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import aiosmtpd.smtp
import pytest

from smtp_relay import protocol

LINE = b"AUTH PLAIN c2VjcmV0"


@pytest.fixture
def library_level() -> Iterator[logging.Logger]:
    """aiosmtpd's logger; its level (set with setLevel, which clears the logging cache) is restored afterwards."""
    logger = aiosmtpd.smtp.log
    saved = logger.level
    yield logger
    logger.setLevel(saved)


def test_command_loop_looks_up_the_replaced_log_function() -> None:
    assert aiosmtpd.smtp.sanitized_log is protocol._sanitized_log
    # The library's command loop finds `sanitized_log` as a module global at call time; were it imported or
    # bound otherwise in a new release, the replacement would silently stop applying.
    assert "sanitized_log" in aiosmtpd.smtp.SMTP._handle_client.__code__.co_names


@pytest.mark.parametrize("method", ["debug", "info"])
def test_quiet_library_logger_skips_the_credential_scan(
    monkeypatch: pytest.MonkeyPatch, library_level: logging.Logger, method: str
) -> None:
    def scanned(text: bytes) -> bytes:
        raise AssertionError("sanitize ran although nothing is logged")

    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", scanned)
    library_level.setLevel(logging.WARNING)
    aiosmtpd.smtp.sanitized_log(getattr(library_level, method), "%r >> %r", ("127.0.0.1", 1), LINE)


@pytest.mark.parametrize(("level", "method"), [(logging.INFO, "info"), (logging.DEBUG, "debug")])
def test_enabled_library_logger_still_masks_credentials(
    library_level: logging.Logger, caplog: pytest.LogCaptureFixture, level: int, method: str
) -> None:
    library_level.setLevel(level)
    with caplog.at_level(level, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(getattr(library_level, method), "%r >> %r", ("127.0.0.1", 1), LINE)
    assert [r.getMessage() for r in caplog.records] == ["('127.0.0.1', 1) >> b'AUTH PLAIN ********'"]


def test_other_logging_calls_go_to_the_library(caplog: pytest.LogCaptureFixture) -> None:
    other = logging.getLogger("smtp_relay.test")
    with caplog.at_level(logging.WARNING, logger="smtp_relay.test"):
        aiosmtpd.smtp.sanitized_log(other.warning, "%r", LINE)
    assert [r.getMessage() for r in caplog.records] == ["b'AUTH PLAIN ********'"]
