"""A connection's protocol copied from the template (`RelaySMTP.spawn`) equals one built by aiosmtpd's __init__."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator

import pytest

from smtp_relay.config import load_settings, variable_names
from smtp_relay.protocol import RelaySMTP
from smtp_relay.server import RelayServer

# Attributes a spawned protocol may share with its template: settings and long-lived collaborators, never
# per-connection state. `_handle_hooks` maps to the handler's bound methods, which the library only reads.
SHARED = {"event_handler", "loop", "tls_context", "_authenticator", "_tracker", "_handle_hooks", "_loop"}


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[RelayServer]:
    for name in variable_names():
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "RELAY_HOST": "127.0.0.1",
        "SMTP_AUTH_USERNAME": "app",
        "SMTP_AUTH_PASSWORD": "a-long-enough-secret",
        "ALLOWED_FROM_DOMAINS": "example.com",
        "ALLOWED_TO_DOMAINS": "example.com",
        "USE_TLS": "false",
        "LOG_FILE": "",
    }.items():
        monkeypatch.setenv(name, value)
    yield RelayServer(load_settings())


def _pair(server: RelayServer) -> tuple[RelaySMTP, RelaySMTP, RelaySMTP]:
    async def build() -> tuple[RelaySMTP, RelaySMTP, RelaySMTP]:
        template = server.protocol_template()
        return template, template.spawn(), server.protocol_template()

    return asyncio.run(build())


def _is_immutable(value: object) -> bool:
    if isinstance(value, tuple | frozenset):
        return all(_is_immutable(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str | bytes)


def test_spawned_protocol_has_exactly_the_attributes_the_library_sets(server: RelayServer) -> None:
    _, spawned, built = _pair(server)
    assert sorted(vars(spawned)) == sorted(vars(built))


def test_spawned_protocol_shares_no_per_connection_state_with_its_template(server: RelayServer) -> None:
    template, spawned, _ = _pair(server)
    for name, value in vars(spawned).items():
        if value is vars(template)[name] and name not in SHARED:
            assert _is_immutable(value), f"{name} ({type(value).__name__}) is shared with the template"


def test_spawned_protocol_settings_equal_the_librarys(server: RelayServer) -> None:
    _, spawned, built = _pair(server)
    for name, value in vars(built).items():
        if _is_immutable(value):
            assert vars(spawned)[name] == value, name


def test_spawned_command_tables_are_bound_to_the_new_connection(server: RelayServer) -> None:
    template, spawned, built = _pair(server)
    assert spawned._smtp_methods.keys() == built._smtp_methods.keys()
    for name, method in spawned._smtp_methods.items():
        assert isinstance(method, types.MethodType) and method.__self__ is spawned, name
        assert method.__func__ is built._smtp_methods[name].__func__
    assert spawned._auth_methods.keys() == built._auth_methods.keys() and spawned._auth_methods
    for name, attr in spawned._auth_methods.items():
        assert attr.is_builtin == built._auth_methods[name].is_builtin
        owner = spawned if attr.is_builtin else template.event_handler
        assert attr.method.__self__ is owner, name  # type: ignore[attr-defined]
    assert spawned._handle_hooks == built._handle_hooks


def test_each_spawned_protocol_reads_its_own_stream(server: RelayServer) -> None:
    async def build() -> tuple[RelaySMTP, RelaySMTP, RelaySMTP]:
        template = server.protocol_template()
        return template, template.spawn(), template.spawn()

    template, first, second = asyncio.run(build())
    assert first._stream_reader is not second._stream_reader is not template._stream_reader
    assert first._closed is not second._closed
    assert first._client_connected_cb.__self__ is first  # type: ignore[attr-defined]
