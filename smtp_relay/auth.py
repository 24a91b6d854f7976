"""Client authentication: the authenticator aiosmtpd calls for AUTH PLAIN and LOGIN."""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiosmtpd.smtp import AuthResult, LoginPassword

from smtp_relay import logs, replies
from smtp_relay.lockout import LoginThrottle, Outcome


class Authenticator:
    """Checks one configured username/password pair in constant time; logs every outcome, never the password."""

    def __init__(self, username: str, password: str, throttle: LoginThrottle) -> None:
        self._username = username.encode("utf-8")
        self._password = password.encode("utf-8")
        self.throttle = throttle

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        address = peer_address(session)
        login: bytes = auth_data.login
        password: bytes = auth_data.password
        # AUTH PLAIN's authorization identity (RFC 4616): the user may act only as itself.
        authzid: bytes = getattr(auth_data, "authzid", b"")
        foreign = bool(authzid) and authzid != login

        def credentials_ok() -> bool:
            # Compare both, always: which of the two was wrong must not show in the timing.
            user_ok = hmac.compare_digest(login, self._username)
            password_ok = hmac.compare_digest(password, self._password)
            return user_ok and password_ok and not foreign

        # One step: logins sent at once on many connections (and workers) must not get around the lockout,
        # and a right password must not lift it early.
        outcome = self.throttle.attempt(address, credentials_ok)
        fields = {
            "session": getattr(session, "id", None),
            "peer": logs.peer_text(getattr(session, "peer", None)),
        }
        if outcome is Outcome.LOCKED:  # locked by another connection since this one sent AUTH: as before AUTH
            logs.event(logging.WARNING, "auth", outcome="locked", mechanism=mechanism, **fields)
            return AuthResult(success=False, handled=False, message=replies.Logged(replies.AUTH_LOCKED_OUT))
        user = fields["user"] = login.decode("utf-8", errors="replace")
        if outcome is Outcome.SUCCESS:
            logs.event(logging.INFO, "auth", outcome="success", mechanism=mechanism, **fields)
            return AuthResult(success=True, auth_data=user)
        refusal = (
            {"authzid": authzid.decode("utf-8", errors="replace"), "reason": "may not act as another identity"}
            if foreign
            else {}
        )
        logs.event(logging.WARNING, "auth", outcome="failure", mechanism=mechanism, **fields, **refusal)
        if outcome is Outcome.LOCKOUT:
            logs.event(
                logging.WARNING,
                "auth.lockout",
                **fields,
                address=address,
                seconds=self.throttle.lockout_seconds,
                reason="AUTH_MAX_FAILURES reached",
            )
        return AuthResult(success=False, handled=False, message=replies.Logged(replies.AUTH_INVALID))


def peer_address(session: Any) -> str:
    """The client's IP address: what lockouts are keyed on."""
    peer = getattr(session, "peer", None)
    return str(peer[0]) if isinstance(peer, tuple) and peer else str(peer)
