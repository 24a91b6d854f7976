"""Every SMTP reply the relay writes itself: code, enhanced status code (RFC 3463) and text."""

from __future__ import annotations

import re


class Logged(str):
    """A reply whose decision was logged where it was made. `RelaySMTP.push` logs every other refusal."""

    __slots__ = ()


# Session and connection.
TOO_MANY_CONNECTIONS = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
IDLE_TIMEOUT = "421 4.4.2 Idle timeout, closing connection"
DATA_TOO_SLOW = "421 4.4.2 Message data too slow, closing connection"
AUTH_LOCKED_OUT = "421 4.7.0 Too many failed logins, try again later"
# aiosmtpd closes after 5 unknown commands with a 502; a reply that closes the connection is a 421 (RFC 5321 3.8),
# which a client takes as "try later" rather than as a permanent failure of the mail it may still hold.
TOO_MANY_UNKNOWN_COMMANDS = "421 4.7.0 Too many unrecognized commands, closing connection"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
AUTH_LINE_TOO_LONG = "500 5.5.6 Authentication exchange line is too long"
TLS_ALREADY_ACTIVE = "503 5.5.1 TLS already active"

# Envelope policy.
SENDER_OK = "250 2.1.0 Sender OK"
RECIPIENT_OK = "250 2.1.5 Recipient OK"
SENDER_DOMAIN_DENIED = "553 5.7.1 Sender domain not allowed"
RECIPIENT_DOMAIN_DENIED = "550 5.7.1 Recipient domain not allowed"
NULL_SENDER_DENIED = "553 5.7.1 Null sender not allowed"
ADDRESS_ROUTING_DENIED = "553 5.7.1 Address routing (%, !, source routes) not allowed"
ADDRESS_INVALID = "553 5.1.3 Malformed address"
# RFC 6531 3.4: a non-ASCII address only in a transaction whose MAIL FROM says SMTPUTF8.
ADDRESS_NEEDS_SMTPUTF8 = "553 5.6.7 Non-ASCII address without SMTPUTF8 in MAIL FROM"
RECIPIENT_ADDRESS_INVALID = "501 5.1.3 Malformed recipient address"
# RFC 5321 4.5.3.1.10: the client sends the rest in another transaction.
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
MESSAGE_HAD_REFUSED_RECIPIENTS = "554 5.7.1 Message refused: one or more recipients were not allowed"
MESSAGE_HAD_UNREAD_COMMAND = "554 5.7.1 Message refused: a command of this transaction could not be read"

# Message.
MESSAGE_TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
LINE_TOO_LONG = "500 5.5.2 Line too long"
TRANSACTION_OK = "250 2.0.0 OK"

# Faults of the relay or the upstream.
INTERNAL_ERROR = "451 4.3.0 Internal error, try again later"
UPSTREAM_UNAVAILABLE = "451 4.4.1 Upstream server unavailable, try again later"
UPSTREAM_TIMEOUT = "451 4.4.2 Upstream server timed out, try again later"
UPSTREAM_CONNECTION_LOST = "451 4.4.2 Upstream connection lost, try again later"
UPSTREAM_CLOSING = "451 4.4.2 Upstream server closing its session, try again later"
UPSTREAM_TLS_UNAVAILABLE = "451 4.7.5 Upstream TLS not available, try again later"
# RFC 6152 3: a message declared 8-bit goes on only to a server that takes 8BITMIME; the relay does not convert.
UPSTREAM_NO_8BITMIME = "554 5.6.3 Conversion required but not supported: the upstream does not accept 8BITMIME"
# RFC 6531 3.2: an SMTPUTF8 message that needs it (a non-ASCII local part, or UTF-8 in its header) goes on only to
# a server that offers SMTPUTF8; one that does not need it goes on in ASCII (domains as A-labels).
UPSTREAM_NO_SMTPUTF8_ADDRESS = "554 5.6.7 Non-ASCII address not permitted: the upstream does not accept SMTPUTF8"
UPSTREAM_NO_SMTPUTF8_HEADER = "554 5.6.9 UTF-8 header cannot be transferred: the upstream does not accept SMTPUTF8"
UPSTREAM_TLS_FAILED = "451 4.7.5 Upstream TLS failed, try again later"

_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}(?: |$)")
_UPSTREAM_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?: |$)")

# aiosmtpd's own replies carry no enhanced status code; once ENHANCEDSTATUSCODES is advertised every
# reply but the greeting and EHLO/HELO must (RFC 2034), so they are mapped here by their text.
_LIBRARY_REPLIES: dict[str, str] = {
    "552 Error: Too much mail data": MESSAGE_TOO_BIG,
    "552 Error: message size exceeds fixed maximum message size": MESSAGE_TOO_BIG,
    "500 Line too long (see RFC5321 4.5.3.1.6)": LINE_TOO_LONG,
    "553 5.1.3 Error: malformed address": ADDRESS_INVALID,
    "502 5.5.1 Too many unrecognized commands, goodbye.": TOO_MANY_UNKNOWN_COMMANDS,
    "250 OK": "250 2.0.0 OK",
    "221 Bye": "221 2.0.0 Bye",
    "354 End data with <CR><LF>.<CR><LF>": "354 End data with <CR><LF>.<CR><LF>",
}

# Fallback detail per reply code for the library's other replies (RFC 3463 / RFC 5248 registry).
_DETAIL_BY_CODE: dict[str, str] = {
    "250": "2.0.0",
    "221": "2.0.0",
    "252": "2.5.0",
    "421": "4.3.0",
    "451": "4.3.0",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "538": "5.7.11",
    "550": "5.7.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}


def with_enhanced_code(reply: str) -> str:
    """Give a reply line an enhanced status code if it lacks one (220/334/354 take none)."""
    mapped = _LIBRARY_REPLIES.get(reply)
    if mapped is not None:
        return mapped
    if _ENHANCED.match(reply):
        return reply
    code = reply[:3]
    detail = _DETAIL_BY_CODE.get(code)
    if detail is None:
        return reply
    return f"{code}{reply[3:4]}{detail} {reply[4:]}"


# aiosmtpd echoes an unknown command word in its reply: that word may be a password (AUTH data sent where no AUTH
# exchange was running, or pipelined after a refused AUTH), so logs show it masked.
_ECHOED_COMMAND = re.compile(r'(Error: command )".*"( not recognized)', re.DOTALL)


def for_log(reply: str) -> str:
    """A reply as it may be logged: without what the client wrote where no command was recognised."""
    return _ECHOED_COMMAND.sub(r'\1"..."\2', reply)


def upstream_reply(code: int, text: str) -> str:
    """Pass an upstream error on to the client: keep its class, code and text, on one safe line. Never 421:
    that would say the relay closes the client's connection (the upstream's session is another one)."""
    text = " ".join(text.split()) or "Upstream error"
    text = "".join(ch for ch in text if 32 <= ord(ch) < 127)[:400]
    if not 400 <= code < 600 or code == 421:
        code = 451
    enhanced = _UPSTREAM_ENHANCED.match(text)
    if enhanced and enhanced[1] == str(code)[0]:
        return f"{code} {enhanced[0].strip()} {text[enhanced.end() :].strip() or 'Upstream error'}"
    if enhanced:  # of another class (RFC 3463 3: it must match the reply's): say ours, keep the upstream's text
        text = text[enhanced.end() :].lstrip() or "Upstream error"
    detail = "4.4.0" if code < 500 else "5.0.0"
    return f"{code} {detail} Upstream: {text}"
