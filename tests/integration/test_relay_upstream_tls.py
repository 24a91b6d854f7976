"""The relay's side towards the upstream: STARTTLS (required, verified), implicit TLS, verification
switched off, upstream AUTH (password or password file). Each case has its own sink and relay process;
all of them are started at once so the module stays fast."""

from __future__ import annotations

import time

import pytest
from support.client import transaction

MSG = b"Subject: tls\r\n\r\nover tls\r\n"
UP_USER = "upstream-user"
UP_PASSWORD = "Upstream-Secret-31337"


@pytest.fixture(scope="module")
def cases(module_stack, tls, untrusted_tls, wrong_name_tls, tmp_path_factory):
    """name -> (sink, relay); relays are launched together and then waited for."""
    pw_file = tmp_path_factory.mktemp("secrets") / "relay_password"
    pw_file.write_text(UP_PASSWORD)
    ca = str(tls.ca_pem)
    specs = {
        "starttls_verified": (
            dict(mode="starttls", server_ctx=tls.server_ctx),
            dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca),
        ),
        "no_starttls_offered": (dict(mode="plain"), dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca)),
        "untrusted_cert": (
            dict(mode="starttls", server_ctx=untrusted_tls.server_ctx),
            dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca),
        ),
        "wrong_host_name": (
            dict(mode="starttls", server_ctx=wrong_name_tls.server_ctx),
            dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca),
        ),
        "verify_off": (
            dict(mode="starttls", server_ctx=untrusted_tls.server_ctx),
            dict(RELAY_USE_TLS="true", RELAY_TLS_VERIFY="false"),
        ),
        "implicit_tls": (
            dict(mode="implicit", server_ctx=tls.server_ctx),
            dict(RELAY_USE_SSL="true", RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca),
        ),
        "implicit_untrusted": (
            dict(mode="implicit", server_ctx=untrusted_tls.server_ctx),
            dict(RELAY_USE_SSL="true", RELAY_TLS_CA_FILE=ca),
        ),
        "starttls_auth": (
            dict(mode="starttls", server_ctx=tls.server_ctx, auth=(UP_USER, UP_PASSWORD)),
            dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca, RELAY_USERNAME=UP_USER, RELAY_PASSWORD=UP_PASSWORD),
        ),
        "implicit_auth_password_file": (
            dict(mode="implicit", server_ctx=tls.server_ctx, auth=(UP_USER, UP_PASSWORD)),
            dict(
                RELAY_USE_SSL="true",
                RELAY_TLS_CA_FILE=ca,
                RELAY_USERNAME=UP_USER,
                RELAY_PASSWORD_FILE=str(pw_file),
            ),
        ),
        "plain_auth_both_tls_off": (
            dict(mode="plain", auth=(UP_USER, UP_PASSWORD)),
            dict(RELAY_USERNAME=UP_USER, RELAY_PASSWORD=UP_PASSWORD),
        ),
        "starttls_wrong_upstream_password": (
            dict(mode="starttls", server_ctx=tls.server_ctx, auth=(UP_USER, UP_PASSWORD)),
            dict(RELAY_USE_TLS="true", RELAY_TLS_CA_FILE=ca, RELAY_USERNAME=UP_USER, RELAY_PASSWORD="wrong-pw"),
        ),
    }
    out = {}
    for name, (sink_kw, env) in specs.items():
        sink = module_stack.sink(**sink_kw)
        relay = module_stack.relay(sink.port, wait=False, TIMEOUT="4", **env)
        out[name] = (sink, relay)
    for _, relay in out.values():
        relay.wait_ready()
    return out


def _deliver(relay):
    return transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)


def _no_message(sink, wait=0.3):
    time.sleep(wait)
    return sink.messages == []


def test_upstream_starttls_with_verified_certificate_delivers_over_tls(cases):
    sink, relay = cases["starttls_verified"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), (text, relay.describe())
    msgs = sink.wait_for_messages(1)
    assert len(msgs) == 1 and msgs[0].tls


def test_upstream_without_starttls_is_not_sent_in_plain_text_451_and_error_logged(cases):
    sink, relay = cases["no_starttls_offered"]
    stage, code, text = _deliver(relay)
    assert code == 451, (stage, code, text)
    assert _no_message(sink)
    assert sink.mail_commands == [], "the relay fell back to plain text"
    line = relay.wait_for_log("ERROR")
    assert line is not None, relay.describe()
    assert "tls" in line.lower(), line


@pytest.mark.parametrize("case", ["untrusted_cert", "wrong_host_name", "implicit_untrusted"])
def test_upstream_with_bad_certificate_gets_nothing_and_client_gets_4xx(cases, case):
    sink, relay = cases[case]
    stage, code, text = _deliver(relay)
    assert 400 <= code < 500, (stage, code, text)
    assert _no_message(sink)
    assert sink.mail_commands == []


def test_relay_tls_verify_false_accepts_an_untrusted_certificate_and_warns_at_start(cases):
    sink, relay = cases["verify_off"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), text
    assert sink.wait_for_messages(1)[0].tls
    assert relay.wait_for_log("WARNING", "RELAY_TLS_VERIFY") is not None, relay.describe()


def test_relay_use_ssl_uses_implicit_tls_and_wins_over_relay_use_tls(cases):
    sink, relay = cases["implicit_tls"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), (text, relay.describe())
    assert len(sink.wait_for_messages(1)) == 1


def test_upstream_auth_with_relay_username_and_password_over_starttls(cases):
    sink, relay = cases["starttls_auth"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), (text, relay.describe())
    msgs = sink.wait_for_messages(1)
    assert msgs[0].tls and msgs[0].auth_user == UP_USER


def test_upstream_auth_password_from_relay_password_file_over_implicit_tls(cases):
    sink, relay = cases["implicit_auth_password_file"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), (text, relay.describe())
    assert sink.wait_for_messages(1)[0].auth_user == UP_USER


def test_upstream_auth_over_plain_text_when_both_tls_settings_are_off(cases):
    sink, relay = cases["plain_auth_both_tls_off"]
    stage, code, text = _deliver(relay)
    assert (stage, code) == ("DATA", 250), (text, relay.describe())
    assert sink.wait_for_messages(1)[0].auth_user == UP_USER


def test_upstream_rejecting_relay_credentials_is_not_a_250(cases):
    sink, relay = cases["starttls_wrong_upstream_password"]
    stage, code, text = _deliver(relay)
    assert code != 250 and 400 <= code < 600, (stage, code, text)
    assert _no_message(sink)


def test_upstream_passwords_never_appear_in_the_logs(cases):
    for name in ("starttls_auth", "implicit_auth_password_file", "plain_auth_both_tls_off"):
        _, relay = cases[name]
        assert UP_PASSWORD not in relay.all_output(), name
