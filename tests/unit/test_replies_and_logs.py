"""Reply formatting and log escaping: pure functions."""

from __future__ import annotations

import datetime
import json
import logging
import re

from hypothesis import given
from hypothesis import strategies as st

from smtp_relay import logs, replies
from smtp_relay.logs import WRITE_LIMIT, JsonFormatter, TextFormatter, _batches, escape
from smtp_relay.protocol import LOGGED_ADDRESSES_LENGTH, _first_addresses

REPLY = re.compile(r"^[2-5]\d\d [2-5]\.\d{1,3}\.\d{1,3} \S")


def test_every_reply_constant_carries_an_enhanced_code_of_its_class() -> None:
    for name, value in vars(replies).items():
        if name.isupper() and isinstance(value, str) and value[:1].isdigit():
            assert REPLY.match(value), name
            assert value[0] == value[4], name


def test_library_replies_get_enhanced_codes() -> None:
    assert replies.with_enhanced_code("552 Error: Too much mail data") == replies.MESSAGE_TOO_BIG
    assert replies.with_enhanced_code("503 Error: need RCPT command").startswith("503 5.5.1 ")
    assert replies.with_enhanced_code("530 5.7.0 Authentication required") == "530 5.7.0 Authentication required"
    assert replies.with_enhanced_code("220 host ESMTP") == "220 host ESMTP"
    assert replies.with_enhanced_code("334 VXNlcm5hbWU6") == "334 VXNlcm5hbWU6"


@given(st.integers(min_value=0, max_value=999), st.text(max_size=80))
def test_upstream_replies_are_one_safe_line_of_an_error_class(code: int, text: str) -> None:
    line = replies.upstream_reply(code, text)
    assert line[0] in "45"
    assert "\r" not in line and "\n" not in line
    assert all(32 <= ord(ch) < 127 for ch in line)
    if 400 <= code < 600 and code != 421:
        assert line.startswith(str(code))
    assert not line.startswith("421")  # that would say the relay closes the client's connection
    assert REPLY.match(line) and line[0] == line[4], line  # an enhanced code of the reply's own class


def test_an_upstream_enhanced_code_of_another_class_is_replaced() -> None:
    # An upstream that accepted (2.0.0) or a refusal made transient: RFC 3463 wants the classes to agree.
    assert replies.upstream_reply(451, "2.0.0 accepted") == "451 4.4.0 Upstream: accepted"
    assert replies.upstream_reply(252, "2.1.5 ok") == "451 4.4.0 Upstream: ok"
    assert replies.upstream_reply(421, "4.3.2 shutting down") == "451 4.3.2 shutting down"
    assert replies.upstream_reply(550, "5.1.1 no such user") == "550 5.1.1 no such user"
    assert replies.upstream_reply(0, "4.0.0") == "451 4.0.0 Upstream error"  # a code alone still gets a text
    assert replies.upstream_reply(554, "4.7.1 later") == "554 5.0.0 Upstream: later"


@given(st.text(max_size=60))
def test_escaped_values_never_contain_line_breaks(text: str) -> None:
    out = escape(text)
    # Not for any reader: Python's splitlines (and log viewers) also break at U+0085, U+2028, U+2029 and others.
    assert len(out.splitlines()) <= 1 and not out.endswith(("\n", "\r"))
    assert " " not in out or (out.startswith('"') and out.endswith('"'))
    assert all(ch.isprintable() for ch in out)  # no C1 controls, bidi or other format characters either


def test_unicode_line_separators_and_controls_are_escaped_visibly() -> None:
    forged = "x\u2028 2026-01-01T00:00:00.000Z level=INFO event=auth outcome=success\u0085\u009b31m\u202e"
    out = escape(forged)
    assert out == '"x\\u2028 2026-01-01T00:00:00.000Z level=INFO event=auth outcome=success\\x85\\x9b31m\\u202e"'
    assert escape("bücher.example") == '"bücher.example"'  # printable text stays readable


def _record(**fields: object) -> logging.LogRecord:
    record = logging.LogRecord("smtp_relay", logging.WARNING, __file__, 1, "mail.refused", None, None)
    record.fields = fields
    return record


def test_text_log_line_cannot_be_forged_with_crlf() -> None:
    line = TextFormatter().format(_record(address="a@x\r\n2026 level=INFO event=forged", user="u"))
    assert "\n" not in line
    assert line.count("event=") == 2  # ours, and the escaped text inside the quoted value
    assert 'address="a@x\\r\\n2026 level=INFO event=forged"' in line


@given(st.dictionaries(st.sampled_from(["user", "address", "reason"]), st.text(max_size=200) | st.integers()))
def test_text_fields_read_the_same_whether_escaped_anew_or_remembered(fields: dict[str, object]) -> None:
    expected = " ".join(f"{key}={escape(value)}" for key, value in fields.items())
    for _ in range(2):  # the second time from the cache of recent fields
        line = TextFormatter().format_event(0.0, "INFO", "x", fields)
        assert line.split(" ", 3)[3:] == ([expected] if expected else [])


def test_cache_of_recent_text_fields_stays_bounded() -> None:
    formatter = TextFormatter()
    for n in range(logs._PAIRS_LIMIT + 10):
        formatter.format_event(0.0, "INFO", "x", {"session": f"s{n}", "address": f"{n}" + "a" * 500})
    assert 0 < len(logs._pairs) <= logs._PAIRS_LIMIT
    assert all(len(value) <= logs._PAIR_VALUE_LIMIT for _, value in logs._pairs)


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False), st.floats(min_value=0, max_value=0.002))
def test_timestamps_are_utc_to_the_millisecond_whether_made_anew_or_remembered(created: float, later: float) -> None:
    for moment in (created, created, created + later):  # the second from the cache; the third maybe not
        expected = datetime.datetime.fromtimestamp(int(moment * 1000) / 1000, datetime.UTC)
        text = expected.strftime("%Y-%m-%dT%H:%M:%S.") + f"{expected.microsecond // 1000:03d}Z"
        assert logs._timestamp(moment) == text


@given(st.sampled_from(["INFO", "WARNING"]), st.text(max_size=40))
def test_level_and_event_read_the_same_whether_escaped_anew_or_remembered(level: str, name: str) -> None:
    for _ in range(2):
        line = TextFormatter().format_event(0.0, level, name, {})
        assert line == f"1970-01-01T00:00:00.000Z level={level} event={escape(name)}"


def test_cache_of_level_and_event_texts_stays_bounded() -> None:
    formatter = TextFormatter()
    for n in range(logs._PAIRS_LIMIT + 10):
        formatter.format_event(0.0, "INFO", f"library.logger{n}", {})
    assert 0 < len(logs._heads) <= logs._PAIRS_LIMIT


def test_json_log_line_is_one_object() -> None:
    line = JsonFormatter().format(_record(address="a\r\nb", size=3))
    doc = json.loads(line)
    assert "\n" not in line
    assert doc["event"] == "mail.refused" and doc["address"] == "a\r\nb" and doc["size"] == 3


def test_log_writes_are_whole_lines_of_at_most_write_limit_bytes() -> None:
    # Several worker processes share stdout: each write must stay atomic (PIPE_BUF) and hold whole lines.
    lines = [f"line {i} " + ("é" * (i % 7) * 100 if i % 3 else "x" * (i * 37 % 900)) for i in range(200)]
    batches = _batches(lines)
    assert "".join(batches) == "\n".join(lines) + "\n"
    assert all(b.endswith("\n") and len(b.encode()) <= WRITE_LIMIT for b in batches)
    assert len(batches) < len(lines) / 2, "lines are joined, not written one by one"
    assert _batches(["a", "b"]) == ["a\nb\n"]


@given(st.lists(st.text(max_size=300), min_size=1, max_size=8))
def test_refused_addresses_in_a_log_line_stay_within_their_cap_once_escaped(addresses: list[str]) -> None:
    """Whatever the client sends, the `refused=` field of `message.refused` stays short in JSON (which escapes
    most) and in text: workers writing to one pipe need whole lines, written at once."""
    shown = _first_addresses(addresses)
    assert shown is not None
    assert len(json.dumps(shown)) <= LOGGED_ADDRESSES_LENGTH + len('"...,..."')
    assert len(TextFormatter().format_event(0.0, "INFO", "x", {"refused": shown}).encode()) < 4 * 1024


def test_replies_echoing_an_unknown_command_are_logged_without_it():
    echoed = replies.with_enhanced_code('500 Error: command "UZNJCMV0" not recognized')
    assert replies.for_log(echoed) == '500 5.5.2 Error: command "..." not recognized'
    assert replies.for_log('500 Error: command "A"B" not recognized') == '500 Error: command "..." not recognized'
    assert replies.for_log(replies.IDLE_TIMEOUT) == replies.IDLE_TIMEOUT
