"""Health probe of the relay's own SMTP listener (`smtp-relay healthcheck`, Docker's HEALTHCHECK)."""

from __future__ import annotations

import contextlib
import ipaddress
import smtplib
import socket
import ssl
import time
from typing import TYPE_CHECKING

from smtp_relay.replies import TOO_MANY_CONNECTIONS

if TYPE_CHECKING:
    from smtp_relay.config import Settings

#: The EHLO name of the probe: a reserved TLD (RFC 2606), so it can never be mistaken for a real client.
EHLO_NAME = "healthcheck.smtp-relay.invalid"
#: The whole probe (connect, greeting, EHLO, STARTTLS, EHLO, QUIT) must finish within this many seconds,
#: well under Docker's HEALTHCHECK --timeout, so a stuck relay is reported as such and not as a killed probe.
TOTAL_TIMEOUT = 1.5

_WILDCARDS_V4 = frozenset({"", "0.0.0.0", "*"})
_MAX_REASON = 200


class _Unhealthy(Exception):
    """A failed step; its message is the one-line reason."""


class _Busy(Exception):
    """The relay answered that all MAX_CONNECTIONS are in use: it works, and is serving that many clients."""


class _Client(smtplib.SMTP):
    """smtplib's client, able to STARTTLS after a separate connect().

    smtplib takes the TLS server name for STARTTLS (`_host`) only from its constructor, which would also read
    the greeting and, when it is not 220, close without QUIT; so the name is given here and connect() is
    called separately. local_hostname is given so that smtplib never looks up this host's FQDN (slow DNS).
    connect() spends at most `timeout` on the TCP connection and as much again on the greeting: half the
    total each.
    """

    def __init__(self, server_name: str) -> None:
        super().__init__(local_hostname=EHLO_NAME, timeout=TOTAL_TIMEOUT / 2)
        self._host = server_name


def probe_address(listen_host: str) -> str:
    """The address to reach a relay that listens on `listen_host`, from inside the same host or container.

    A wildcard listener (0.0.0.0, or empty) is reached on 127.0.0.1, and `::` on ::1. A specific address
    (loopback or not) or a host name is reached where it is: it is where the relay listens, on this host.
    """
    host = listen_host.strip().strip("[]")
    if host in _WILDCARDS_V4:
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host  # a host name such as "localhost"
    if address.is_unspecified:
        return "::1" if address.version == 6 else "127.0.0.1"
    return str(address)


def check(settings: Settings) -> str | None:
    """Probe the relay's own listener once: None when healthy, otherwise a one-line reason.

    The probe does what a client does before it would log in, and no more: it connects to LISTEN_PORT,
    expects the 220 greeting, sends EHLO and expects 250; when USE_TLS is on it also expects STARTTLS to be
    offered, completes the TLS handshake and sends EHLO again. A relay that greets with its own "all
    MAX_CONNECTIONS in use" reply is healthy, only full. Then it always sends QUIT and closes the socket,
    also after a failed step, so it never leaves a half-open session behind to hold one of MAX_CONNECTIONS.
    It never sends AUTH, MAIL or RCPT: it can never count as a failed login, trip the AUTH lockout, or relay
    anything. Everything is bounded by TOTAL_TIMEOUT seconds in all.
    """
    host = probe_address(settings.listen_host)
    where = f"[{host}]:{settings.listen_port}" if ":" in host else f"{host}:{settings.listen_port}"
    deadline = time.monotonic() + TOTAL_TIMEOUT
    client = _Client(host)
    try:
        _session(client, host, settings.listen_port, settings.use_tls, deadline)
    except _Busy:
        return None  # healthy: a restart would only cut off the sessions it is serving (its log says it is full)
    except _Unhealthy as exc:
        return f"{where}: {exc}"
    except TimeoutError:
        return f"{where}: no answer within {_waited(deadline):.1f} s"
    except smtplib.SMTPResponseException as exc:
        error = exc.smtp_error.decode("utf-8", "replace") if isinstance(exc.smtp_error, bytes) else exc.smtp_error
        return f"{where}: answered {exc.smtp_code} {_one_line(str(error))}".rstrip()
    except smtplib.SMTPServerDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):  # smtplib turns a read timeout into "disconnected"
            return f"{where}: no answer within {_waited(deadline):.1f} s"
        return f"{where}: connection closed by the relay ({_one_line(str(exc)) or 'no reason given'})"
    except ssl.SSLError as exc:
        return f"{where}: TLS handshake failed: {_one_line(exc.reason or str(exc))}"
    except smtplib.SMTPException as exc:
        return f"{where}: {_one_line(str(exc)) or type(exc).__name__}"
    except OSError as exc:
        return f"{where}: connection failed: {_one_line(exc.strerror or str(exc))}"
    finally:
        _close(client, deadline)
    return None


def _waited(deadline: float) -> float:
    """Seconds the probe has been waiting (its deadline is TOTAL_TIMEOUT after its start)."""
    return TOTAL_TIMEOUT - max(0.0, deadline - time.monotonic())


def _session(client: smtplib.SMTP, host: str, port: int, use_tls: bool, deadline: float) -> None:
    code, text = client.connect(host, port)
    if b"%d %s" % (code, text) == TOO_MANY_CONNECTIONS.encode("ascii"):
        raise _Busy
    _expect("greeting", 220, code, text)
    _ehlo(client, deadline)
    if use_tls:
        if not client.has_extn("starttls"):
            raise _Unhealthy("USE_TLS is on but STARTTLS is not offered")
        _bound(client, deadline)
        code, text = client.starttls(context=loopback_tls_context())
        _expect("STARTTLS", 220, code, text)
        _ehlo(client, deadline)


def _ehlo(client: smtplib.SMTP, deadline: float) -> None:
    _bound(client, deadline)
    code, text = client.ehlo(EHLO_NAME)
    _expect("EHLO", 250, code, text)


def loopback_tls_context() -> ssl.SSLContext:
    """A TLS client context for the relay's own listener, without certificate verification.

    Verification would prove nothing here and would break healthy relays: the probe reaches its own listener
    by a loopback address, while the certificate names the relay's public host name and is often self-signed
    or issued by a private CA that this container does not trust. What matters is that the listener completes
    a TLS handshake with the configured certificate and key and answers EHLO inside TLS. The probe sends no
    secret and nothing else over this connection, so there is nothing for a man in the middle to take; and a
    man in the middle on the container's own loopback interface would already own the container.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _left(deadline: float) -> float:
    """What is left of the total time; TimeoutError when nothing is."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _bound(client: smtplib.SMTP, deadline: float) -> None:
    """Give the next step only what is left of the total time."""
    left = _left(deadline)
    if client.sock is not None:
        client.sock.settimeout(left)


def _expect(step: str, wanted: int, code: int, text: bytes) -> None:
    if code != wanted:
        reply = _one_line(text.decode("utf-8", "replace")) if text else ""
        raise _Unhealthy(f"{step} answered {code} {reply}".rstrip() + f" (expected {wanted})")


def _close(client: smtplib.SMTP, deadline: float) -> None:
    """Say QUIT (bounded, best effort) and close the socket, whatever happened before."""
    if client.sock is None:
        return
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.sock.settimeout(max(deadline - time.monotonic(), 0.2))
        client.quit()  # QUIT, read the 221, close
    with contextlib.suppress(OSError):
        if client.sock is not None:
            client.sock.shutdown(socket.SHUT_RDWR)
    client.close()


def _one_line(text: str) -> str:
    """Server-supplied text as one short printable line (a reply may span lines or carry control bytes)."""
    flat = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    return flat if len(flat) <= _MAX_REASON else flat[: _MAX_REASON - 3] + "..."
