"""SMTP clients for the tests: smtplib helpers and a raw, byte-exact line client."""

from __future__ import annotations

import base64
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

from .relay import CLIENT_PASSWORD, CLIENT_USER


def connect(port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> smtplib.SMTP:
    smtp = smtplib.SMTP(host, port, timeout=timeout)
    smtp.ehlo("client.test")
    return smtp


def login(smtp: smtplib.SMTP, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD, mech: str = "PLAIN"):
    """AUTH with an explicit mechanism; returns (code, text)."""
    smtp.user, smtp.password = user, password
    authobject = {"PLAIN": smtp.auth_plain, "LOGIN": smtp.auth_login}[mech]
    try:
        return smtp.auth(mech, authobject, initial_response_ok=True)
    except smtplib.SMTPAuthenticationError as e:
        return e.smtp_code, e.smtp_error


def authed(port: int, **kw) -> smtplib.SMTP:
    smtp = connect(port)
    code, text = login(smtp, **kw)
    assert code == 235, (code, text)
    return smtp


def quit_quietly(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


def plain_b64(user: str, password: str) -> str:
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


class RawClient:
    """A byte-exact SMTP client over one socket: send lines, read (multi-line) replies, bounded in time."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0, source: str = "") -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.sock.settimeout(timeout)
        self.timeout = timeout
        self.buf = b""
        self.greeting = self.reply()

    def send(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        if isinstance(line, str):
            line = line.encode()
        self.send(line + b"\r\n")
        return self.reply()

    def _readline(self) -> bytes:
        deadline = time.monotonic() + self.timeout
        while b"\r\n" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no complete reply line; buffer={self.buf!r}")
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; buffer={self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, str]:
        """Read one (possibly multi-line) reply: (code, text joined with newlines)."""
        lines = []
        while True:
            line = self._readline()
            lines.append(line[4:].decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    def starttls(self, ctx: ssl.SSLContext, server_hostname: str = "localhost") -> tuple[int, str]:
        code, text = self.cmd("STARTTLS")
        if code == 220:
            self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)
        return code, text

    def auth_plain(self, user: str = CLIENT_USER, password: str = CLIENT_PASSWORD) -> tuple[int, str]:
        return self.cmd("AUTH PLAIN " + plain_b64(user, password))

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        """True if the peer closes the connection (EOF or reset) within timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return False
            except (ConnectionError, OSError):
                return True
            if not chunk:
                return True
            self.buf += chunk
        return False

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def send_data(client: RawClient, body: bytes) -> tuple[int, str]:
    """DATA + body (already dot-stuffed, CRLF-ended) + end marker; the final reply.

    A relay may refuse at the DATA command itself (no 354): that reply is returned.
    """
    code, text = client.cmd("DATA")
    if code != 354:
        return code, text
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    client.send(body + b".\r\n")
    return client.reply()


def transaction(
    port: int,
    mail_from: str,
    rcpt_tos: list[str],
    body: bytes,
    auth: bool = True,
    timeout: float = 20.0,
) -> tuple[str, int, str]:
    """One full transaction over a fresh connection.

    Returns (stage, code, text) of the first refusal, or ("DATA", 250, text) on success. Recipients
    refused at RCPT are recorded but DATA is still attempted if any was accepted (as a client would).
    """
    with RawClient(port, timeout=timeout) as c:
        code, text = c.cmd("EHLO client.test")
        assert code == 250, (code, text)
        if auth:
            code, text = c.auth_plain()
            if code != 235:
                return "AUTH", code, text
        code, text = c.cmd(f"MAIL FROM:<{mail_from}>")
        if code != 250:
            return "MAIL", code, text
        refused: tuple[str, int, str] | None = None  # the first refused recipient's reply
        accepted = 0
        for rcpt in rcpt_tos:
            code, text = c.cmd(f"RCPT TO:<{rcpt}>")
            if code == 250:
                accepted += 1
            elif refused is None:
                refused = ("RCPT", code, text)
        if not accepted:
            assert refused is not None
            return refused
        code, text = send_data(c, body)
        try:
            c.cmd("QUIT")
        except (OSError, ConnectionError, TimeoutError):
            pass
        return "DATA", code, text


def curl_send(
    curl: str,
    port: int,
    mail_file: Path,
    *rcpts: str,
    sender: str = "sender@example.com",
    user: str | None = None,
    cacert: Path | None = None,
    max_time: int = 20,
) -> subprocess.CompletedProcess[str]:
    """Send one message with the real `curl` program (STARTTLS required when `cacert` is given)."""
    args = [curl, "-sS", "--max-time", str(max_time), "--url", f"smtp://127.0.0.1:{port}"]
    if cacert is not None:
        args += ["--ssl-reqd", "--cacert", str(cacert)]
    args += ["--mail-from", sender, "--user", user or f"{CLIENT_USER}:{CLIENT_PASSWORD}"]
    args += ["--upload-file", str(mail_file)]
    for rcpt in rcpts:
        args += ["--mail-rcpt", rcpt]
    return subprocess.run(args, capture_output=True, text=True, timeout=max_time + 10, check=False)


def swaks_send(swaks: str, port: int, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run the real `swaks` program against the relay, logged in as the test user; `extra` adds options."""
    args = [swaks, "--server", "127.0.0.1", "--port", str(port), "--auth-user", CLIENT_USER]
    args += ["--auth-password", CLIENT_PASSWORD, "--from", "sender@example.com", "--timeout", "15", *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
