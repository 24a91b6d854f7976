"""The shortcuts `smtp_relay.protocol` takes around aiosmtpd still match the library they stand in for."""

from __future__ import annotations

import logging

import aiosmtpd.smtp
import pytest

from smtp_relay import protocol


def test_command_loop_looks_up_the_replaced_log_function() -> None:
    assert aiosmtpd.smtp.sanitized_log is protocol._sanitized_log
    # The library's command loop finds `sanitized_log` as a module global at call time; were it imported or
    # bound otherwise in a new release, the replacement would silently stop applying.
    assert "sanitized_log" in aiosmtpd.smtp.SMTP._handle_client.__code__.co_names


def test_quiet_library_logger_skips_the_credential_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    def scanned(text: bytes) -> bytes:
        raise AssertionError("sanitize ran although nothing is logged")

    monkeypatch.setattr(aiosmtpd.smtp, "sanitize", scanned)
    monkeypatch.setattr(aiosmtpd.smtp.log, "level", logging.WARNING)
    aiosmtpd.smtp.sanitized_log(aiosmtpd.smtp.log.info, "%r >> %r", ("127.0.0.1", 1), b"AUTH PLAIN c2VjcmV0")


def test_enabled_library_logger_still_masks_credentials(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(aiosmtpd.smtp.log, "level", logging.INFO)
    with caplog.at_level(logging.INFO, logger="mail.log"):
        aiosmtpd.smtp.sanitized_log(aiosmtpd.smtp.log.info, "%r >> %r", ("127.0.0.1", 1), b"AUTH PLAIN c2VjcmV0")
    assert [r.getMessage() for r in caplog.records] == ["('127.0.0.1', 1) >> b'AUTH PLAIN ********'"]
