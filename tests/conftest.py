"""Shared fixtures: a trustme CA, certificate files, upstream sinks and relay processes."""

from __future__ import annotations

import shutil
import ssl
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import trustme
from support.relay import RelayProcess, relay_env
from support.sink import Sink


@dataclass
class TLSFiles:
    """A CA (trusted by clients and the relay) and PEM files issued by it for localhost/127.0.0.1."""

    ca: trustme.CA
    ca_pem: Path
    cert_pem: Path  # certificate chain for localhost / 127.0.0.1
    key_pem: Path
    server_ctx: ssl.SSLContext  # a server context presenting that certificate

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def _tls_files(ca: trustme.CA, directory: Path, *names: str) -> TLSFiles:
    directory.mkdir(parents=True, exist_ok=True)
    cert = ca.issue_cert(*names)
    ca_pem = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert_pem = directory / "cert.pem"
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_pem = directory / "key.pem"
    cert.private_key_pem.write_to_path(str(key_pem))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    return TLSFiles(ca=ca, ca_pem=ca_pem, cert_pem=cert_pem, key_pem=key_pem, server_ctx=ctx)


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """The trusted CA and a certificate for localhost / 127.0.0.1."""
    return _tls_files(trustme.CA(), tmp_path_factory.mktemp("tls"), "localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def untrusted_tls(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A certificate for localhost / 127.0.0.1 issued by a CA nobody trusts."""
    return _tls_files(trustme.CA(), tmp_path_factory.mktemp("untrusted"), "localhost", "127.0.0.1")


@pytest.fixture(scope="session")
def wrong_name_tls(tls: TLSFiles, tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A certificate from the trusted CA, but for another host name."""
    return _tls_files(tls.ca, tmp_path_factory.mktemp("wrongname"), "mail.other-host.test")


class Stack:
    """Starts sinks and relays and stops them all at teardown."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.sinks: list[Sink] = []
        self.relays: list[RelayProcess] = []

    def sink(self, **kwargs) -> Sink:
        s = Sink(**kwargs).start()
        self.sinks.append(s)
        return s

    def relay(
        self,
        upstream_port: int,
        wait: bool = True,
        args: list[str] | None = None,
        **env: str,
    ) -> RelayProcess:
        d = self.workdir / f"relay{len(self.relays)}"
        d.mkdir(parents=True, exist_ok=True)
        r = RelayProcess(relay_env(d, upstream_port, **env), d, args=args)
        self.relays.append(r)
        return r.start(wait=wait)

    def close(self) -> None:
        for r in self.relays:
            r.stop(timeout=10)
            r.kill()
        for s in self.sinks:
            s.stop()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    st = Stack(tmp_path)
    yield st
    st.close()


@pytest.fixture(scope="module")
def module_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    st = Stack(tmp_path_factory.mktemp("stack"))
    yield st
    st.close()


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    def _require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            pytest.fail(f"{name} is required by the integration tests (installed by .ci/run)")
        return path

    return _require


def pytest_configure(config: pytest.Config) -> None:
    # The sinks deliberately require AUTH over plain text in some cases (aiosmtpd warns at connect).
    config.addinivalue_line("filterwarnings", "ignore:Requiring AUTH while not requiring TLS:UserWarning")
