"""The aiosmtpd hooks: joins policy and upstream for each transaction; orchestration only."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from aiosmtpd.smtp import MISSING, TLSSetupException

from smtp_relay import logs, replies
from smtp_relay.auth import peer_address
from smtp_relay.lockout import LoginThrottle
from smtp_relay.policy import Decision, RelayPolicy, Verdict
from smtp_relay.protocol import RelayEnvelope, RelaySession, RelaySMTP
from smtp_relay.upstream import Upstream

# RFC 5321 asks servers to take at least 100; 1000 covers every real list while bounding one envelope.
MAX_RECIPIENTS = 1000
TOO_MANY_RECIPIENTS = replies.Logged(replies.TOO_MANY_RECIPIENTS)

# The handler logs every refusal it decides: its replies say so (`replies.Logged`), so that the protocol does not.
_SENDER_REPLIES = {
    Decision.NULL_SENDER: replies.Logged(replies.NULL_SENDER_DENIED),
    Decision.MALFORMED: replies.Logged(replies.ADDRESS_INVALID),
    Decision.ROUTING: replies.Logged(replies.ADDRESS_ROUTING_DENIED),
    Decision.DOMAIN_NOT_ALLOWED: replies.Logged(replies.SENDER_DOMAIN_DENIED),
}
_RECIPIENT_REPLIES = {
    Decision.NULL_SENDER: replies.Logged(replies.RECIPIENT_ADDRESS_INVALID),
    Decision.MALFORMED: replies.Logged(replies.RECIPIENT_ADDRESS_INVALID),
    Decision.ROUTING: replies.Logged(replies.ADDRESS_ROUTING_DENIED),
    Decision.DOMAIN_NOT_ALLOWED: replies.Logged(replies.RECIPIENT_DOMAIN_DENIED),
}
_INTERNAL_ERROR = replies.Logged(replies.INTERNAL_ERROR)
_NEEDS_SMTPUTF8 = replies.Logged(replies.ADDRESS_NEEDS_SMTPUTF8)
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")


class RelayHandler:
    """Decides each MAIL and RCPT by policy and hands accepted messages to the upstream."""

    def __init__(self, policy: RelayPolicy, upstream: Upstream, hostname: str, throttle: LoginThrottle) -> None:
        self.policy = policy
        self.upstream = upstream
        self.hostname = hostname
        self.throttle = throttle

    async def handle_EHLO(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: RelayEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        lines = responses[:-1]  # the last one is aiosmtpd's "250 HELP"
        if session.authenticated:  # RFC 4954 4: a second AUTH is refused (503), so it is not offered again
            lines = [line for line in lines if not line.startswith("250-AUTH ")]
        lines += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES"]
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    async def handle_AUTH(
        self, server: RelaySMTP, session: RelaySession, envelope: RelayEnvelope, args: list[str]
    ) -> Any:
        """Refuse locked-out addresses with 421 and hang up; slow down addresses that keep failing."""
        address = peer_address(session)
        locked_for = self.throttle.locked_for(address)
        if locked_for > 0:
            logs.event(logging.WARNING, "auth.refused", **_ids(session), reason="locked out", seconds=round(locked_for))
            await server.push(replies.Logged(replies.AUTH_LOCKED_OUT))
            server.close()
            return None
        delay = self.throttle.delay(address)
        if delay > 0:
            await asyncio.sleep(delay)
            if self.throttle.locked_for(address) > 0:  # other connections' failures locked it meanwhile
                return await self.handle_AUTH(server, session, envelope, args)
        return MISSING

    async def handle_MAIL(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: RelayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if not (address.isascii() or envelope.smtp_utf8):
            logs.event(logging.WARNING, "mail.refused", **_ids(session), sender=address, reason="smtputf8_required")
            return _NEEDS_SMTPUTF8
        verdict = self.policy.check_sender(address)
        if not verdict.allowed:
            self._log_refusal("mail.refused", session, verdict, sender=address)
            return _SENDER_REPLIES[verdict.decision]
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        logs.event(logging.INFO, "mail.accepted", **_ids(session), sender=address)
        return replies.SENDER_OK

    async def handle_RCPT(
        self,
        server: RelaySMTP,
        session: RelaySession,
        envelope: RelayEnvelope,
        address: str,
        options: list[str],
    ) -> str:
        if len(envelope.rcpt_tos) + len(envelope.refused_recipients) >= MAX_RECIPIENTS:
            logs.event(
                logging.WARNING,
                "rcpt.refused",
                **_ids(session),
                recipient=address,
                reason="too_many_recipients",
            )
            return TOO_MANY_RECIPIENTS
        if not (address.isascii() or envelope.smtp_utf8):
            envelope.refused_recipients.append(address)
            logs.event(logging.WARNING, "rcpt.refused", **_ids(session), recipient=address, reason="smtputf8_required")
            return _NEEDS_SMTPUTF8
        verdict = self.policy.check_recipient(address)
        if not verdict.allowed:
            envelope.refused_recipients.append(address)
            self._log_refusal("rcpt.refused", session, verdict, recipient=address)
            return _RECIPIENT_REPLIES[verdict.decision]
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        logs.event(logging.INFO, "rcpt.accepted", **_ids(session), recipient=address)
        return replies.RECIPIENT_OK

    async def handle_DATA(self, server: RelaySMTP, session: RelaySession, envelope: RelayEnvelope) -> str:
        session.messages += 1
        ids = _ids(session, message=session.messages)
        assert envelope.mail_from is not None and envelope.body is not None
        header = self._received_header(session, envelope.smtp_utf8)
        eight_bit = "BODY=8BITMIME" in envelope.mail_options
        server.pause_idle_timeout()
        try:
            outcome = await self.upstream.deliver(
                envelope.mail_from, envelope.rcpt_tos, header, envelope.body, eight_bit, envelope.smtp_utf8
            )
        except Exception:
            logs.log.exception("forward.error", extra={"fields": {**ids, "reason": "internal error"}})
            return _INTERNAL_ERROR
        except asyncio.CancelledError:
            # aiosmtpd cancels the session when the client closes its side, also while its message is on the way:
            # the relay lets it, until the end of data went upstream (`RelaySMTP.eof_received`).
            logs.event(
                logging.WARNING,
                "forward.cancelled",
                **ids,
                sender=envelope.mail_from,
                recipients=len(envelope.rcpt_tos),
                reason=(
                    "the relay stopped (shutdown past TIMEOUT) during the delivery; the client got no reply"
                    if server.aborted
                    else "client closed the connection before its message went upstream whole: not delivered"
                ),
            )
            raise
        finally:
            server.resume_idle_timeout()
        fields = dict(
            ids,
            sender=envelope.mail_from,
            recipients=len(envelope.rcpt_tos),
            size=len(header) + envelope.body.size,
            stage=outcome.stage.value,
            upstream_code=outcome.upstream_code,
            upstream_reply=outcome.upstream_text or None,
            reply=outcome.reply,
            duration=round(outcome.duration, 3),
        )
        if outcome.delivered:
            session.delivered += 1
            logs.event(logging.INFO, "forward.delivered", **fields)
        else:
            logs.event(
                logging.ERROR if outcome.transient or outcome.relay_setup else logging.WARNING,
                "forward.failed",
                **fields,
                reason=outcome.problem,
            )
        return replies.Logged(outcome.reply)

    async def handle_exception(self, error: Exception) -> str:
        if not isinstance(error, TLSSetupException):  # that one is logged by `RelaySMTP.smtp_STARTTLS`
            logs.log.error("internal.error", exc_info=error, extra={"fields": {"reason": type(error).__name__}})
        return _INTERNAL_ERROR

    def _log_refusal(self, name: str, session: RelaySession, verdict: Verdict, **address: str) -> None:
        """`sender=` or `recipient=`: the same field names as on the accepted lines, so one grep finds both."""
        logs.event(
            logging.WARNING,
            name,
            **_ids(session),
            **address,
            domain=verdict.domain or None,
            reason=verdict.decision.value,
        )

    def _received_header(self, session: RelaySession, smtp_utf8: bool) -> bytes:
        """RFC 5321 4.4 trace header; the client's HELO name is reduced to safe characters. The protocol name is
        one of RFC 3848's (RFC 6531's UTF8SMTP... for an SMTPUTF8 transaction)."""
        helo = _HELO_UNSAFE.sub("_", session.host_name or "unknown")[:255]
        peer = session.peer[0] if isinstance(session.peer, tuple) else "unknown"
        protocol = "UTF8SMTP" if smtp_utf8 else "ESMTP" if session.extended_smtp else "SMTP"
        if session.ssl is not None:
            protocol += "S"
        if session.authenticated:
            protocol += "A"
        header = (
            f"Received: from {helo} ([{peer}])\r\n"
            f"\tby {self.hostname} (smtp-relay) with {protocol} id {session.id}.{session.messages};\r\n"
            f"\t{_rfc5322_date()}\r\n"
        )
        return header.encode("ascii", errors="replace")


_date: tuple[int, str] = (-1, "")


def _rfc5322_date() -> str:
    """The current date for the trace header, formatted once per second instead of once per message."""
    global _date
    now = int(time.time())
    if _date[0] != now:
        _date = (now, format_datetime(datetime.fromtimestamp(now, UTC)))  # "+0000": UTC, as RFC 5322 3.3
    return _date[1]


def _ids(session: RelaySession, **extra: Any) -> dict[str, Any]:
    return {"session": session.id, "peer": session.peer_text, "user": session.user, **extra}
