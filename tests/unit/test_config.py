"""Configuration parsing: defaults, booleans, lists, secrets files and one-line errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from smtp_relay import config
from smtp_relay.config import ConfigError, cgroup_cpu_limit, load_settings, variable_names


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in variable_names():
        monkeypatch.delenv(name, raising=False)


def test_defaults_match_the_documented_table() -> None:
    s = load_settings()
    assert s.smtp_auth_username == "user"
    assert s.smtp_auth_password.get_secret_value() == "password"
    assert s.allowed_from_domains == ("example.com",)
    assert s.allowed_to_domains == ("example.com",)
    assert (s.listen_host, s.listen_port) == ("0.0.0.0", 1025)
    assert s.use_tls is False
    assert (str(s.tls_cert_file), str(s.tls_key_file)) == ("/etc/certs/server.crt", "/etc/certs/server.key")
    assert (s.relay_host, s.relay_port) == ("smtp.example.com", 25)
    assert (s.relay_use_tls, s.relay_use_ssl, s.relay_tls_verify) == (True, False, True)
    assert (s.relay_username, s.relay_password.get_secret_value()) == ("", "")
    assert (s.max_connections, s.timeout) == (50, 60)
    assert (s.log_file, s.log_level, s.log_format) == ("/var/log/smtp-relay.log", "INFO", "text")
    assert s.max_message_size == 26214400
    assert s.relay_tls_ca_file is None


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "Yes", "on", "ON"])
def test_true_booleans_in_any_case(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("RELAY_USE_SSL", text)
    assert load_settings().relay_use_ssl is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "NO", "off", "Off"])
def test_false_booleans_in_any_case(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("RELAY_USE_TLS", text)
    assert load_settings().relay_use_tls is False


@pytest.mark.parametrize("text", ["t", "f", "y", "n", "2", "truthy", "enabled", ""])
def test_only_the_documented_boolean_spellings_are_taken(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    # pydantic alone takes t/f/y/n: RELAY_TLS_VERIFY=n would turn certificate checks off by a typo.
    monkeypatch.setenv("RELAY_TLS_VERIFY", text)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "RELAY_TLS_VERIFY" and "true/false" in str(err.value)


def test_only_the_exact_upper_case_names_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("use_tls", "maybe")
    monkeypatch.setenv("Relay_Host", "evil.test")
    monkeypatch.setenv("relay_tls_verify", "false")
    s = load_settings()
    assert (s.use_tls, s.relay_host, s.relay_tls_verify) == (False, "smtp.example.com", True)
    monkeypatch.setenv("RELAY_HOST", "mail.example.net")
    assert load_settings().relay_host == "mail.example.net"


@pytest.mark.parametrize(
    "host", ["smtp.example.com", "smtp.example.com.", "mx_1.internal", "192.0.2.7", "::1", "localhost"]
)
def test_host_names_and_addresses_are_taken(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("RELAY_HOST", f" {host} ")
    assert load_settings().relay_host == host


@pytest.mark.parametrize(
    ("variable", "host"),
    [
        ("SMTP_HOSTNAME", "192.0.2.1"),  # EHLO would need [192.0.2.1]
        ("SMTP_HOSTNAME", "::1"),
        ("SMTP_HOSTNAME", "relay example"),
        ("RELAY_HOST", "smtp\nexample.com"),
        ("RELAY_HOST", "smtp example.com"),
        ("RELAY_HOST", "[::1]"),
        ("RELAY_HOST", "smtp..example.com"),
        ("RELAY_HOST", "-smtp.example.com"),
        ("RELAY_HOST", "x" * 64 + ".example.com"),
        ("LISTEN_HOST", "127.0.0.1\nfoo"),
        ("LISTEN_HOST", "127.0.0.1:25"),
    ],
)
def test_anything_else_as_a_host_is_refused_on_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, host: str
) -> None:
    monkeypatch.setenv(variable, host)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == variable and "\n" not in str(err.value)


@pytest.mark.parametrize("variable", ["SMTP_AUTH_PASSWORD", "RELAY_PASSWORD"])
def test_a_secret_that_is_not_utf8_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv("RELAY_USERNAME", "relay")
    monkeypatch.setenv("RELAY_PASSWORD", "fine")
    monkeypatch.setenv(variable, "pa\udcffss-secret")  # how Python shows the byte 0xff of a non-UTF-8 environment
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == variable and "secret" not in str(err.value)


@pytest.mark.parametrize("variable", ["SMTP_AUTH_USERNAME", "RELAY_USERNAME"])
def test_a_username_that_is_not_utf8_is_refused_at_start(monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    """Not only at the first AUTH: the upstream one used to start, then answer 451 with a traceback per message."""
    monkeypatch.setenv("RELAY_USERNAME", "relay")
    monkeypatch.setenv("RELAY_PASSWORD", "fine")
    monkeypatch.setenv(variable, "us\udcffer")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == variable and "UTF-8" in str(err.value)


def test_domain_lists_split_on_commas_and_ignore_spaces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_TO_DOMAINS", " a.com , *.b.org,c.net ,")
    assert load_settings().allowed_to_domains == ("a.com", "*.b.org", "c.net")


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LISTEN_PORT", "abc"),
        ("LISTEN_PORT", "70000"),
        ("RELAY_PORT", "0"),
        ("USE_TLS", "maybe"),
        ("ALLOWED_FROM_DOMAINS", ""),
        ("ALLOWED_TO_DOMAINS", " , "),
        ("ALLOWED_TO_DOMAINS", "bad domain.com"),
        ("MAX_CONNECTIONS", "0"),
        ("TIMEOUT", "-5"),
        ("LOG_LEVEL", "LOUD"),
        ("LOG_FORMAT", "xml"),
        ("MAX_MESSAGE_SIZE", "ten"),
        ("WORKERS", "0"),
        ("WORKERS", "65"),
        ("WORKERS", "many"),
        ("WORKERS", "-2"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch: pytest.MonkeyPatch, variable: str, value: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == variable
    assert str(err.value).startswith(f"{variable}: ")
    assert "\n" not in str(err.value)


def test_use_tls_requires_existing_certificate(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("USE_TLS", "true")
    monkeypatch.setenv("TLS_CERT_FILE", str(tmp_path / "missing.crt"))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "TLS_CERT_FILE"


def test_password_file_is_read_and_trailing_newline_dropped(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("s3cret value\n")
    monkeypatch.setenv("SMTP_AUTH_PASSWORD_FILE", str(secret))
    monkeypatch.setenv("RELAY_USERNAME", "relay")
    relay_secret = tmp_path / "relay"
    relay_secret.write_text("r3lay")
    monkeypatch.setenv("RELAY_PASSWORD_FILE", str(relay_secret))
    s = load_settings()
    assert s.smtp_auth_password.get_secret_value() == "s3cret value"
    assert s.relay_password.get_secret_value() == "r3lay"


def test_variable_and_its_file_together_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("x")
    monkeypatch.setenv("SMTP_AUTH_PASSWORD", "direct")
    monkeypatch.setenv("SMTP_AUTH_PASSWORD_FILE", str(secret))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "SMTP_AUTH_PASSWORD_FILE"


def test_missing_password_file_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RELAY_PASSWORD_FILE", str(tmp_path / "nope"))
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "RELAY_PASSWORD_FILE"


def test_masked_settings_never_show_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_AUTH_PASSWORD", "topsecret-1")
    monkeypatch.setenv("RELAY_USERNAME", "relay")
    monkeypatch.setenv("RELAY_PASSWORD", "topsecret-2")
    shown = load_settings().masked()
    assert set(shown) == set(variable_names())
    assert "topsecret" not in repr(shown)
    assert shown["SMTP_AUTH_PASSWORD"] == "********"


def test_warnings_for_weak_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALLOWED_TO_DOMAINS", "*")
    monkeypatch.setenv("RELAY_TLS_VERIFY", "false")
    text = " ".join(load_settings().warnings())
    assert "SMTP_AUTH_PASSWORD" in text
    assert "ALLOWED_TO_DOMAINS" in text
    assert "RELAY_TLS_VERIFY" in text


def test_password_values_are_never_echoed_in_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_AUTH_PASSWORD", "")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "SMTP_AUTH_PASSWORD"


def test_empty_variable_beside_its_file_counts_as_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file")
    monkeypatch.setenv("RELAY_USERNAME", "relay")
    monkeypatch.setenv("RELAY_PASSWORD", "")
    monkeypatch.setenv("RELAY_PASSWORD_FILE", str(secret))
    assert load_settings().relay_password.get_secret_value() == "from-file"


def test_pool_settings_default_and_zero_disables_reuse(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (s.relay_pool_size, s.relay_pool_idle_seconds, s.relay_pool_max_messages) == (16, 30, 1000)
    monkeypatch.setenv("RELAY_POOL_SIZE", "0")
    assert load_settings().relay_pool_size == 0
    monkeypatch.setenv("RELAY_POOL_MAX_MESSAGES", "0")
    with pytest.raises(ConfigError) as err:
        load_settings()
    assert err.value.variable == "RELAY_POOL_MAX_MESSAGES"


@pytest.mark.parametrize(
    ("cpus", "quota_files", "expected"),
    [
        (8, [], 8),  # no cgroup limit: every CPU the process may run on
        (8, [("max 100000\n", None)], 8),
        (8, [("200000 100000\n", None)], 2),  # docker --cpus 2 (cgroup v2)
        (8, [("150000 100000\n", None)], 1),  # 1.5 CPUs: one worker, never throttled
        (8, [("50000 100000", None)], 1),
        (8, [("-1\n", "100000\n")], 8),  # cgroup v1, no quota
        (8, [("300000\n", "100000\n")], 3),  # cgroup v1 --cpus 3
        (8, [("400000 100000", None), ("200000", "100000")], 2),  # the tightest limit counts
        (2, [("400000 100000", None)], 2),  # a quota above the CPUs pinned to
        (100, [], 64),  # at most 64 workers
        (4, [("garbage", None), ("", "")], 4),  # unreadable quota files count as no limit
    ],
)
def test_workers_auto_is_the_cpus_the_process_may_use(
    monkeypatch: pytest.MonkeyPatch, cpus: int, quota_files: list[tuple[str, str | None]], expected: int
) -> None:
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: set(range(cpus)))
    monkeypatch.setattr(config, "_cgroup_files", lambda: quota_files)
    for value in ("auto", " AUTO "):
        monkeypatch.setenv("WORKERS", value)
        assert load_settings().workers == expected


@pytest.mark.parametrize(
    ("quota", "period", "expected"),
    [
        ("max 100000", None, None),
        ("250000 100000", None, 2.5),
        ("1 2 3", None, None),
        ("x 100000", None, None),
        ("-1", "100000", None),
        ("100000", "100000", 1.0),
        ("0", "100000", None),
        ("100000", "0", None),
    ],
)
def test_cgroup_cpu_limits_are_read_as_cpus(quota: str, period: str | None, expected: float | None) -> None:
    assert cgroup_cpu_limit(quota, period) == expected


def test_workers_auto_on_this_machine_is_within_its_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKERS", "auto")
    assert 1 <= load_settings().workers <= min(64, len(config.os.sched_getaffinity(0)))


def test_cgroup_quotas_of_the_own_group_and_its_parents_are_read(tmp_path: Path) -> None:
    membership = tmp_path / "cgroup"
    membership.write_text("12:cpu,cpuacct:/outer/inner\n0::/system.slice/relay.service\n")
    base = tmp_path / "fs"
    for folder, text in {
        "system.slice/relay.service": "max 100000\n",
        "system.slice": "300000 100000\n",  # a slice's CPUQuota=300%
        "": "max 100000\n",
    }.items():
        (base / folder).mkdir(parents=True, exist_ok=True)
        (base / folder / "cpu.max").write_text(text)
    v1 = base / "cpu,cpuacct" / "outer"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("250000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    found = config._cgroup_files(base, membership)
    limits = sorted(limit for limit in (cgroup_cpu_limit(*texts) for texts in found) if limit is not None)
    assert limits == [2.5, 3.0]
    assert config._cgroup_files(base, tmp_path / "missing") == [("max 100000\n", None)]  # only the root's own


@pytest.mark.parametrize("given", [None, "", "  "])
def test_smtp_hostname_unset_or_empty_is_the_machines_name_as_check_config_shows(
    monkeypatch: pytest.MonkeyPatch, given: str | None
) -> None:
    if given is not None:
        monkeypatch.setenv("SMTP_HOSTNAME", given)
    s = load_settings()
    assert s.smtp_hostname == (socket.gethostname() or "smtp-relay")
    assert s.masked()["SMTP_HOSTNAME"] == s.smtp_hostname


def test_smtp_hostname_given_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMTP_HOSTNAME", "relay.example.com")
    assert load_settings().smtp_hostname == "relay.example.com"
