"""Configuration from the environment as the operator meets it: invalid values stop the program with exit
code 2 and one line on stderr naming the variable; --check-config masks secrets; --version; start-up
warnings; secrets read from *_FILE variables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support.client import RawClient, plain_b64, transaction
from support.net import free_port
from support.relay import REPO_ROOT, clean_env, run_cli

SECRET = "Cfg-Secret-Value-4242"
RELAY_SECRET = "Cfg-Relay-Secret-777"


def _base(tmp_path) -> dict[str, str]:
    """A valid configuration that would listen on a free loopback port (never 0.0.0.0:1025)."""
    return {
        "LISTEN_HOST": "127.0.0.1",
        "LISTEN_PORT": str(free_port()),
        "RELAY_HOST": "127.0.0.1",
        "RELAY_PORT": str(free_port()),
        "LOG_FILE": str(tmp_path / "relay.log"),
        "SMTP_AUTH_PASSWORD": SECRET,
    }


def _run_invalid(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    try:
        return run_cli([], env, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("the relay started with an invalid configuration instead of exiting")


BAD = {
    "port-not-a-number": ({"LISTEN_PORT": "abc"}, "LISTEN_PORT"),
    "port-out-of-range": ({"LISTEN_PORT": "70000"}, "LISTEN_PORT"),
    "relay-port-not-a-number": ({"RELAY_PORT": "twenty-five"}, "RELAY_PORT"),
    "use-tls-maybe": ({"USE_TLS": "maybe"}, "USE_TLS"),
    "relay-use-ssl-sometimes": ({"RELAY_USE_SSL": "sometimes"}, "RELAY_USE_SSL"),
    "relay-tls-verify-garbage": ({"RELAY_TLS_VERIFY": "perhaps"}, "RELAY_TLS_VERIFY"),
    "missing-certificate": (
        {"USE_TLS": "true", "TLS_CERT_FILE": "/nonexistent/cert.pem", "TLS_KEY_FILE": "/nonexistent/key.pem"},
        "TLS_",
    ),
    "empty-from-allowlist": ({"ALLOWED_FROM_DOMAINS": ""}, "ALLOWED_FROM_DOMAINS"),
    "blank-to-allowlist": ({"ALLOWED_TO_DOMAINS": " , ,"}, "ALLOWED_TO_DOMAINS"),
    "timeout-not-a-number": ({"TIMEOUT": "soon"}, "TIMEOUT"),
    "timeout-nan": ({"TIMEOUT": "nan"}, "TIMEOUT"),
    "lockout-infinite": ({"AUTH_LOCKOUT_SECONDS": "inf"}, "AUTH_LOCKOUT_SECONDS"),
    "pool-idle-nan": ({"RELAY_POOL_IDLE_SECONDS": "NaN"}, "RELAY_POOL_IDLE_SECONDS"),
    "max-connections-negative": ({"MAX_CONNECTIONS": "-3"}, "MAX_CONNECTIONS"),
    "max-message-size-garbage": ({"MAX_MESSAGE_SIZE": "big"}, "MAX_MESSAGE_SIZE"),
    "log-format-unknown": ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
    "missing-ca-file": ({"RELAY_TLS_CA_FILE": "/nonexistent/ca.pem"}, "RELAY_TLS_CA_FILE"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_invalid_configuration_exits_2_with_one_stderr_line_naming_the_variable(tmp_path, case):
    overrides, variable = BAD[case]
    env = {**_base(tmp_path), **overrides}
    out = _run_invalid(env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert variable in lines[0]
    assert "Traceback" not in out.stderr + out.stdout


def test_password_and_password_file_both_set_is_an_error_that_does_not_show_the_secret(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("from-file-secret")
    env = {**_base(tmp_path), "SMTP_AUTH_PASSWORD_FILE": str(pw)}
    out = _run_invalid(env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "SMTP_AUTH_PASSWORD" in lines[0], out.stderr
    assert SECRET not in out.stderr + out.stdout and "from-file-secret" not in out.stderr + out.stdout


def test_relay_password_and_relay_password_file_both_set_is_an_error(tmp_path):
    pw = tmp_path / "rpw"
    pw.write_text(RELAY_SECRET)
    env = {**_base(tmp_path), "RELAY_USERNAME": "u", "RELAY_PASSWORD": RELAY_SECRET, "RELAY_PASSWORD_FILE": str(pw)}
    out = _run_invalid(env)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "RELAY_PASSWORD" in lines[0], out.stderr
    assert RELAY_SECRET not in out.stderr + out.stdout


def _not_pem(tmp_path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("this is not a certificate\n")
    return str(path)


# Found only when the files are loaded or the address is used: at start, and by --check-config too.
BAD_AT_START = {
    "ca-file-not-pem": (lambda tmp: {"RELAY_TLS_CA_FILE": _not_pem(tmp)}, "RELAY_TLS_CA_FILE"),
    "ca-file-empty": (lambda tmp: {"RELAY_TLS_CA_FILE": "/dev/null"}, "RELAY_TLS_CA_FILE"),
    "listen-host-not-of-this-host": (lambda tmp: {"LISTEN_HOST": "192.0.2.1"}, "LISTEN_HOST"),
    "listen-host-unknown": (lambda tmp: {"LISTEN_HOST": "no-such-host.invalid"}, "LISTEN_HOST"),
    "log-file-is-a-directory": (lambda tmp: {"LOG_FILE": str(tmp)}, "LOG_FILE"),
    # Root passes every permission check, yet cannot create a file here: only trying tells.
    "log-file-cannot-be-created": (lambda tmp: {"LOG_FILE": "/proc/smtp-relay.log"}, "LOG_FILE"),
    # The relay makes missing directories: a file (executable, so permission bits would not tell) in their place,
    # and a directory that cannot be made, even by root.
    "log-directory-is-a-file": (lambda tmp: {"LOG_FILE": str(_executable_file(tmp) / "relay.log")}, "LOG_FILE"),
    "log-directory-cannot-be-made": (lambda tmp: {"LOG_FILE": "/proc/smtp-relay/relay.log"}, "LOG_FILE"),
}


def _executable_file(tmp_path) -> Path:
    path = tmp_path / "logs"
    path.write_text("")
    path.chmod(0o755)
    return path


def test_check_config_leaves_no_trace_of_its_log_file_check(tmp_path):
    log = tmp_path / "relay.log"
    assert run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": str(log)}, timeout=10).returncode == 0
    assert not log.exists()
    log.write_text("kept\n")
    assert run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": str(log)}, timeout=10).returncode == 0
    assert log.read_text() == "kept\n"
    # Directories the relay would make are made and removed again.
    deep = tmp_path / "new" / "logs" / "relay.log"
    assert run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": str(deep)}, timeout=10).returncode == 0
    assert not (tmp_path / "new").exists()
    # ... also when the file is reached through them, and exists.
    through = f"{tmp_path}/new/../relay.log"
    assert run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": through}, timeout=10).returncode == 0
    assert log.read_text() == "kept\n" and not (tmp_path / "new").exists()


def test_check_config_follows_log_file_links_and_never_waits_on_a_fifo(tmp_path):
    (tmp_path / "target").mkdir()
    link = tmp_path / "relay.log"
    link.symlink_to(tmp_path / "target" / "relay.log")  # dangling until the relay writes its first line
    out = run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": str(link)}, timeout=10)
    assert out.returncode == 0, out.stderr
    assert link.is_symlink() and not (tmp_path / "target" / "relay.log").exists()
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)  # nobody reads it: opening it for writing would wait forever
    out = run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": str(fifo)}, timeout=10)
    assert out.returncode == 0, out.stderr
    # Docker's stdout is a pipe: /dev/stdout is a link to it, which the relay writes to like any file.
    out = run_cli(["--check-config"], {**_base(tmp_path), "LOG_FILE": "/dev/stdout"}, timeout=10)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("check", [False, True], ids=["start", "check-config"])
@pytest.mark.parametrize("case", list(BAD_AT_START), ids=list(BAD_AT_START))
def test_files_and_addresses_that_cannot_be_used_exit_2_naming_the_variable(tmp_path, case, check):
    overrides, variable = BAD_AT_START[case]
    env = {**_base(tmp_path), **overrides(tmp_path)}
    out = run_cli(["--check-config"], env, timeout=10) if check else _run_invalid(env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"smtp-relay: configuration error: {variable}"), out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    if variable == "LISTEN_HOST":
        assert f":{env['LISTEN_PORT']}:" in lines[0], lines[0]  # the port it would listen on, not a probe's


@pytest.mark.parametrize("case", [c for c in BAD_AT_START if c.startswith("log-")])
def test_check_config_gives_the_log_file_error_the_relay_gives_at_start(tmp_path, case):
    overrides, _ = BAD_AT_START[case]
    env = {**_base(tmp_path), **overrides(tmp_path)}
    checked, started = run_cli(["--check-config"], env, timeout=10), _run_invalid(env)
    assert checked.stderr.strip().splitlines() == started.stderr.strip().splitlines(), (checked.stderr, started.stderr)


def test_check_config_finds_a_certificate_that_does_not_match_its_key(tmp_path, tls):
    import trustme

    other_key = tmp_path / "other.key"
    trustme.CA().issue_cert("localhost").private_key_pem.write_to_path(str(other_key))
    env = {**_base(tmp_path), "USE_TLS": "true", "TLS_CERT_FILE": str(tls.cert_pem), "TLS_KEY_FILE": str(other_key)}
    out = run_cli(["--check-config"], env, timeout=10)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stderr.startswith("smtp-relay: configuration error: TLS_KEY_FILE: does not match TLS_CERT_FILE")


@pytest.mark.parametrize("check", [False, True], ids=["start", "check-config"])
@pytest.mark.parametrize("bad", ["TLS_CERT_FILE", "TLS_KEY_FILE"])
def test_a_file_that_is_not_pem_is_named_in_the_error(tmp_path, tls, bad, check):
    files = {"TLS_CERT_FILE": str(tls.cert_pem), "TLS_KEY_FILE": str(tls.key_pem), bad: _not_pem(tmp_path)}
    env = {**_base(tmp_path), "USE_TLS": "true", **files}
    out = run_cli(["--check-config"], env, timeout=10) if check else _run_invalid(env)
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"smtp-relay: configuration error: {bad}: "), out.stderr


def test_a_password_that_is_not_utf8_exits_2_without_a_traceback(tmp_path):
    # os.environ shows a byte that is not UTF-8 as a lone surrogate; subprocess passes it back as that byte.
    for env in (
        {**_base(tmp_path), "SMTP_AUTH_PASSWORD": "pa\udcffss"},
        {**_base(tmp_path), "RELAY_USERNAME": "relay", "RELAY_PASSWORD": "pa\udcffss"},
    ):
        for args in ([], ["--check-config"]):
            out = run_cli(args, env, timeout=10)
            assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and "PASSWORD: must be UTF-8 text" in lines[0], out.stderr


def test_invalid_configuration_with_check_config_also_exits_2(tmp_path):
    out = run_cli(["--check-config"], {**_base(tmp_path), "USE_TLS": "maybe"}, timeout=10)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and "USE_TLS" in out.stderr


def _setting(output: str, name: str) -> str:
    """The value printed for one variable by --check-config (NAME=value, NAME: value, or NAME value)."""
    for line in output.splitlines():
        m = re.match(rf"\s*{name}(?:\s*[=:]\s*|\s+)(.*)$", line)
        if m:
            return m.group(1).strip()
    raise AssertionError(f"{name} not in --check-config output:\n{output}")


def test_check_config_prints_effective_settings_with_secrets_masked(tmp_path):
    env = {
        **_base(tmp_path),
        "RELAY_HOST": "upstream.mail.test",
        "RELAY_USERNAME": "relay-account",
        "RELAY_PASSWORD": RELAY_SECRET,
        "ALLOWED_FROM_DOMAINS": " example.com , Example.NET ",
    }
    out = run_cli(["--check-config"], env, timeout=20)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert SECRET not in text and RELAY_SECRET not in text
    assert "upstream.mail.test" in _setting(out.stdout, "RELAY_HOST")
    assert "relay-account" in _setting(out.stdout, "RELAY_USERNAME")
    assert _setting(out.stdout, "SMTP_AUTH_PASSWORD")  # shown, but masked
    assert _setting(out.stdout, "RELAY_PASSWORD")
    allowed = _setting(out.stdout, "ALLOWED_FROM_DOMAINS")
    assert "example.com" in allowed.lower() and " " not in allowed.replace(", ", ",").strip()
    for name in (
        "LISTEN_PORT",
        "USE_TLS",
        "RELAY_USE_TLS",
        "RELAY_USE_SSL",
        "MAX_CONNECTIONS",
        "TIMEOUT",
        "LOG_FILE",
        "LOG_LEVEL",
        "LOG_FORMAT",
        "MAX_MESSAGE_SIZE",
        "RELAY_TLS_VERIFY",
    ):
        _setting(out.stdout, name)


def test_check_config_masks_secrets_read_from_files(tmp_path):
    pw, rpw = tmp_path / "pw", tmp_path / "rpw"
    pw.write_text("client-secret-from-file")
    rpw.write_text("relay-secret-from-file")
    env = {
        **_base(tmp_path),
        "RELAY_USERNAME": "acct",
        "SMTP_AUTH_PASSWORD_FILE": str(pw),
        "RELAY_PASSWORD_FILE": str(rpw),
    }
    del env["SMTP_AUTH_PASSWORD"]
    out = run_cli(["--check-config"], env, timeout=20)
    assert out.returncode == 0, out.stderr
    assert "client-secret-from-file" not in out.stdout + out.stderr
    assert "relay-secret-from-file" not in out.stdout + out.stderr


@pytest.mark.parametrize(
    "value,expected",
    [
        ("TRUE", True),
        ("yes", True),
        ("On", True),
        ("1", True),
        ("False", False),
        ("NO", False),
        ("off", False),
        ("0", False),
    ],
)
def test_booleans_accept_true_false_1_0_yes_no_on_off_in_any_case(tmp_path, tls, value, expected):
    env = {
        **_base(tmp_path),
        "USE_TLS": value,
        "TLS_CERT_FILE": str(tls.cert_pem),
        "TLS_KEY_FILE": str(tls.key_pem),
        "RELAY_TLS_VERIFY": value,
    }
    out = run_cli(["--check-config"], env, timeout=20)
    assert out.returncode == 0, out.stderr
    for name in ("USE_TLS", "RELAY_TLS_VERIFY"):
        shown = _setting(out.stdout, name).lower()
        assert shown in (("true", "1", "yes", "on") if expected else ("false", "0", "no", "off")), shown


def test_version_prints_the_version():
    out = run_cli(["--version"], {}, timeout=20)
    assert out.returncode == 0, out.stderr
    expected = subprocess.run(
        [sys.executable, "-c", "import smtp_relay; print(smtp_relay.__version__)"],
        cwd=REPO_ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=20,
        check=True,
    ).stdout.strip()
    assert expected and expected in out.stdout
    assert re.search(r"\d+\.\d+", out.stdout)


# -- start-up warnings and secrets from files (the relay really runs) ---------------------------------


def test_startup_warns_about_default_password_wildcard_allowlist_and_unverified_upstream(stack):
    upstream = stack.sink()
    from support.relay import RelayProcess, relay_env

    d = stack.workdir / "warn"
    env = relay_env(
        d,
        upstream.port,
        ALLOWED_TO_DOMAINS="*",
        RELAY_USE_TLS="true",
        RELAY_TLS_VERIFY="false",
        SMTP_AUTH_USERNAME="user",
    )
    del env["SMTP_AUTH_PASSWORD"]
    relay = RelayProcess(env, d)
    stack.relays.append(relay)
    relay.start()
    warnings = [ln for ln in relay.stdout.splitlines() if "WARNING" in ln]
    assert any("SMTP_AUTH_PASSWORD" in ln or "default" in ln.lower() for ln in warnings), warnings
    assert any("*" in ln for ln in warnings), warnings
    assert any("RELAY_TLS_VERIFY" in ln or "verif" in ln.lower() for ln in warnings), warnings
    # the default credentials work, and '*' really allows any recipient domain
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64("user", "password"))[0] == 235
        assert c.cmd("MAIL FROM:<s@example.com>")[0] == 250
        assert c.cmd("RCPT TO:<anyone@any-domain.test>")[0] == 250


def test_smtp_auth_password_file_sets_the_client_password(stack, tmp_path):
    upstream = stack.sink()
    pw = tmp_path / "client_pw"
    pw.write_text("Password-From-File-1")
    from support.relay import RelayProcess, relay_env

    d = tmp_path / "pwfile"
    env = relay_env(d, upstream.port, SMTP_AUTH_PASSWORD_FILE=str(pw))
    del env["SMTP_AUTH_PASSWORD"]
    relay = RelayProcess(env, d)
    stack.relays.append(relay)
    relay.start()
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("AUTH PLAIN " + plain_b64("relayuser", "password"))[0] == 535
        assert c.cmd("AUTH PLAIN " + plain_b64("relayuser", "Password-From-File-1"))[0] == 235
    assert "Password-From-File-1" not in relay.all_output()


def test_listen_port_in_use_exits_2_naming_listen_port(stack, tmp_path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        env = {**_base(tmp_path), "LISTEN_PORT": str(busy.getsockname()[1])}
        out = _run_invalid(env)
    assert out.returncode == 2, out.stderr
    assert "LISTEN_PORT" in out.stderr and "Traceback" not in out.stderr


def test_allowed_domains_ignore_spaces(stack):
    upstream = stack.sink()
    relay = stack.relay(
        upstream.port, ALLOWED_FROM_DOMAINS="  other.test ,example.com  ", ALLOWED_TO_DOMAINS=" dest.test , *.sub.test "
    )
    stage, code, text = transaction(relay.port, "s@example.com", ["a@dest.test", "b@x.sub.test"], b"S: x\r\n\r\ny\r\n")
    assert (stage, code) == ("DATA", 250), text
    stage, code, _ = transaction(relay.port, "s@example.com", ["b@sub.test"], b"S: x\r\n\r\ny\r\n")
    assert code == 550


def test_allowlist_matches_idn_in_either_form_and_ignores_trailing_dot_in_the_list(stack):
    upstream = stack.sink()
    relay = stack.relay(upstream.port, ALLOWED_TO_DOMAINS="bücher.example, xn--mnchen-3ya.example, trailing.example.")
    with RawClient(relay.port) as c:
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.auth_plain()[0] == 235
        assert c.cmd("MAIL FROM:<s@example.com>")[0] == 250
        for rcpt in (
            "a@xn--bcher-kva.example",
            "b@XN--BCHER-KVA.EXAMPLE",
            "c@xn--mnchen-3ya.example",
            "d@trailing.example",
            "e@TRAILING.example",
        ):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 250, (rcpt, code, text)
        for rcpt in ("f@bucher.example", "g@xn--bcher-kva.example.evil.test", "h@sub.trailing.example"):
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            assert code == 550, (rcpt, code, text)


def test_listen_host_ipv6_any_takes_ipv4_connections_too(stack):
    # README: `::` for IPv6 and IPv4 (an empty LISTEN_HOST binds both families separately).
    relay = stack.relay(stack.sink().port, wait=False, LISTEN_HOST="::")
    relay.wait_ready()  # over IPv4: 127.0.0.1
    for host in ("127.0.0.1", "::1"):
        with RawClient(relay.port, host=host) as c:
            assert c.greeting[0] == 220, host
            assert c.cmd("EHLO client.test")[0] == 250
