"""Upstream connection reuse: sessions are reused across messages and clients, each message carries exactly its
own envelope, a refused recipient leaves nothing delivered, a pooled session that breaks before DATA is retried
once on a fresh session, and a message is never resent once the end of data was sent."""

from __future__ import annotations

import pytest
from support.client import transaction

MSG = b"Subject: pool\r\n\r\nbody\r\n"


@pytest.fixture
def rig(stack):
    sink = stack.sink()
    relay = stack.relay(sink.port, TIMEOUT="3")
    return sink, relay


def _peers(sink) -> set:
    return {m.peer for m in sink.messages}


@pytest.mark.parametrize(("env", "sessions"), [({"RELAY_POOL_SIZE": "0"}, 4), ({"RELAY_POOL_MAX_MESSAGES": "2"}, 2)])
def test_pool_settings_bound_reuse(stack, env, sessions):
    sink = stack.sink()
    relay = stack.relay(sink.port, TIMEOUT="3", **env)
    for _ in range(4):
        assert transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)[1] == 250
    assert len(sink.wait_for_messages(4)) == 4
    assert len(_peers(sink)) == sessions


def test_upstream_session_is_reused_for_messages_from_many_clients(rig):
    sink, relay = rig
    for i in range(6):
        body = f"Subject: pool {i}\r\n\r\nbody {i}\r\n".encode()
        assert transaction(relay.port, "sender@example.com", [f"r{i}@example.com"], body)[1] == 250
    messages = sink.wait_for_messages(6)
    assert len(messages) == 6
    assert len(_peers(sink)) == 1, "every message should travel over the one pooled upstream session"
    # Each message carries exactly its own envelope: nothing leaks from the previous transaction.
    assert [m.rcpt_tos for m in messages] == [[f"r{i}@example.com"] for i in range(6)]
    assert all(m.data.endswith(f"body {i}\r\n".encode()) for i, m in enumerate(messages))


def test_refused_recipient_delivers_nothing_and_the_next_message_is_clean(rig):
    sink, relay = rig
    assert transaction(relay.port, "sender@example.com", ["warm@example.com"], MSG)[1] == 250
    sink.configure(refuse_rcpt={"bad@example.com": "550 5.1.1 No such user"})
    stage, code, text = transaction(relay.port, "sender@example.com", ["ok@example.com", "bad@example.com"], MSG)
    assert (stage, code) == ("DATA", 550), text
    assert "No such user" in text
    sink.configure()
    assert transaction(relay.port, "sender@example.com", ["next@example.com"], MSG)[1] == 250
    messages = sink.wait_for_messages(2)
    assert [m.rcpt_tos for m in messages] == [["warm@example.com"], ["next@example.com"]]
    assert len(_peers(sink)) == 1, "after RSET the session goes back to the pool"


def test_pooled_session_failing_before_data_is_retried_once_on_a_fresh_session(rig):
    sink, relay = rig
    assert transaction(relay.port, "sender@example.com", ["warm@example.com"], MSG)[1] == 250
    sink.mail_commands.clear()
    sink.configure(mail_reply="421 4.3.2 closing this session")
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert stage == "DATA" and code // 100 == 4, (code, text)
    # One MAIL on the pooled session, one on the fresh session, and no more.
    assert len(sink.mail_commands) == 2
    sink.configure()
    assert transaction(relay.port, "sender@example.com", ["after@example.com"], MSG)[1] == 250


def test_message_is_never_resent_after_the_end_of_data_was_sent(rig):
    sink, relay = rig
    assert transaction(relay.port, "sender@example.com", ["warm@example.com"], MSG)[1] == 250
    sink.reset()
    sink.configure(drop_at_data=True)
    stage, code, text = transaction(relay.port, "sender@example.com", ["rcpt@example.com"], MSG)
    assert (stage, code) == ("DATA", 451), text
    assert len(sink.data_started) == 1, "the relay must not send the message a second time"
    assert sink.messages == []
    sink.configure()
    assert transaction(relay.port, "sender@example.com", ["after@example.com"], MSG)[1] == 250
    assert len(sink.wait_for_messages(1)) == 1
