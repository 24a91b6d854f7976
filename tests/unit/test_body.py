"""The DATA body without sockets: where data ends, limits, spooling, and what the upstream receives (hypothesis)."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import unittest.mock

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from smtp_relay.body import END_OF_DATA, LINE_LENGTH_LIMIT, MessageBody, Refusal, receive

# -- references: what clients send and what receivers make of it -----------------------------------------------

_ANY_LINE_END = re.compile(rb"\r\n|\n|\r")


def rfc_client_wire(content: bytes) -> bytes:
    """What an RFC 5321 client sends for `content`: CRLF line ends, leading dots doubled (before the final '.')."""
    content = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", content)
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    return re.sub(rb"(?m)^\.", b"..", content.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n")


def raw_client_wire(content: bytes) -> bytes:
    """What a careless (or hostile) client sends: bare CR and LF kept, dots doubled only at CRLF line starts."""
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"
    lines = content.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def strict_receiver(stream: bytes) -> tuple[bytes, bytes]:
    """An RFC 5321 receiver: CRLF lines up to the line '.', un-stuffed; returns (message, rest of the stream)."""
    pos, out = 0, []
    while True:
        end = stream.index(b"\r\n", pos)
        line = stream[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(out), stream[pos:]
        out.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def lenient_end(stream: bytes) -> int:
    """Where a receiver that takes a bare CR or LF for a line end would see the end of data (smuggling)."""
    starts = [0] + [m.end() for m in _ANY_LINE_END.finditer(stream)]
    for start in starts:
        if stream[start : start + 1] == b"." and _ANY_LINE_END.match(stream, start + 1):
            return start
    raise AssertionError("no end of data at all")


def normalised(content: bytes) -> bytes:
    content = re.sub(rb"\r\n|\n|\r(?!\n)", b"\r\n", content)
    return content if not content or content.endswith(b"\r\n") else content + b"\r\n"


def wire_lines(wire: bytes) -> list[bytes]:
    return wire.split(b"\r\n")[:-1]


# -- driving `receive` through a real asyncio.StreamReader ---------------------------------------------------------


def run_receive(
    stream: bytes, cuts: list[int], *, read_limit: int = 64, memory_limit: int = 1 << 20, **limits: int
) -> tuple[MessageBody, bytes]:
    """Feed `stream` to a StreamReader in pieces (at `cuts`), receive one body; returns it and what is left."""

    async def main() -> tuple[MessageBody, bytes]:
        reader = asyncio.StreamReader(limit=LINE_LENGTH_LIMIT)
        points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})

        async def feeder() -> None:
            for a, b in itertools.pairwise(points):
                reader.feed_data(stream[a:b])
                await asyncio.sleep(0)
            reader.feed_eof()

        task = asyncio.create_task(feeder())
        body = MessageBody(memory_limit=memory_limit, **limits)  # type: ignore[arg-type]
        await asyncio.wait_for(receive(reader, body, read_limit=read_limit), 10)
        assert reader._limit == LINE_LENGTH_LIMIT, "the reader's limit is restored"
        await task
        return body, await reader.read()

    return asyncio.run(main())


content_parts = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"..", b"a", b"Subject: x", b"\x00", b"\xff\xfe", b" ", b"\r\n.\r\n", b"\n.\n"]
)
contents = st.one_of(st.binary(max_size=300), st.lists(content_parts, max_size=60).map(b"".join))
trailers = st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\n", b".\r\n"])
cut_lists = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


def upstream_stream(body: MessageBody) -> bytes:
    return b"".join(body.chunks()) + b".\r\n"


# -- round trips -----------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=contents, trailer=trailers, cuts=cut_lists, read_limit=st.sampled_from([1, 5, 16, 64, 1 << 20]))
def test_rfc_client_content_arrives_upstream_intact_and_pipelined_commands_stay(content, trailer, cuts, read_limit):
    wire = rfc_client_wire(content)
    body, rest = run_receive(wire + b".\r\n" + trailer, cuts, read_limit=read_limit, memory_limit=37)
    with body:
        assert rest == trailer
        assert body.refusal is None and body.size == len(wire)
        assert not body.needs_rewriting
        sent = upstream_stream(body)
        assert sent == wire + b".\r\n", "a clean body is sent exactly as received"
        message, after = strict_receiver(sent)
        assert message == normalised(content) == body.content()
        assert after == b""


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=contents, trailer=trailers, cuts=cut_lists, read_limit=st.sampled_from([1, 7, 64, 1 << 20]))
def test_bare_cr_and_lf_are_rewritten_so_no_receiver_can_see_two_messages(content, trailer, cuts, read_limit):
    if content and not content.endswith(b"\r\n"):
        content += b"\r\n"  # a client ends its last line
    wire = raw_client_wire(content)
    body, rest = run_receive(wire + b".\r\n" + trailer, cuts, read_limit=read_limit, memory_limit=50)
    with body:
        assert rest == trailer, "the data section ends only at CRLF.CRLF"
        assert body.refusal is None and body.size == len(wire)
        sent = upstream_stream(body)
        again = upstream_stream(body)
        assert sent == again, "chunks() rewinds (a retry resends the same bytes)"
        message, after = strict_receiver(sent)
        assert after == b""
        assert message == normalised(content) == body.content()
        assert lenient_end(sent) == len(sent) - 3, "even a bare-LF receiver sees only one end of data"
        assert body.content_size >= len(message), "the SIZE= declared is an upper bound"
        if b"\r" not in wire.replace(b"\r\n", b"") and b"\n" not in wire.replace(b"\r\n", b""):
            assert sent == wire + b".\r\n"


@pytest.mark.parametrize(
    "stream, body_wire, rest",
    [
        (b".\r\n", b"", b""),
        (b".\r\nQUIT\r\n", b"", b"QUIT\r\n"),
        (b"\r\n.\r\n", b"\r\n", b""),
        (b"..\r\n.\r\n", b"..\r\n", b""),
        (b".x\r\n.\r\nNOOP\r\n", b".x\r\n", b"NOOP\r\n"),
        (b"a\n.\nb\r.\rc\n.\r\nd\r\n.\r\n", b"a\n.\nb\r.\rc\n.\r\nd\r\n", b""),
        (b"a\r\n.\r\r\n.\r\n", b"a\r\n.\r\r\n", b""),
        (b"a\r\n\x00.\r\n.\r\n", b"a\r\n\x00.\r\n", b""),
    ],
)
def test_only_crlf_dot_crlf_ends_data(stream, body_wire, rest):
    for cuts in ([], list(range(len(stream)))):  # at once, and byte by byte
        body, left = run_receive(stream, cuts)
        assert left == rest
        assert b"".join(body._stored()) == body_wire
        body.close()


def test_leading_dots_and_8bit_bytes_pass_unchanged():
    content = b"..leading\r\n.\xe9t\xe9\r\n\x80\xff\r\n.\r\n"  # a line '.' inside, stuffed by the client
    wire = rfc_client_wire(content)
    body, _ = run_receive(wire + b".\r\n", [5, 9])
    assert body.content() == content
    assert upstream_stream(body) == wire + b".\r\n"


# -- limits ------------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(content=contents, cuts=cut_lists, limit=st.integers(min_value=0, max_value=400))
def test_size_limit_counts_the_message_as_rfc_1870_and_refuses_one_over(content, cuts, limit):
    """The message's bytes with CRLF line ends, without the dots the client doubled (RFC 1870 4)."""
    wire = rfc_client_wire(content)
    body, rest = run_receive(wire + b".\r\nQUIT\r\n", cuts, size_limit=limit)
    assert rest == b"QUIT\r\n", "a refused body is still read to its end"
    assert (body.refusal is Refusal.TOO_BIG) == (len(normalised(content)) > limit)
    if body.refusal is None:
        assert body.content_size == len(normalised(content)) and body.size == len(wire)


@pytest.mark.parametrize("extra", [0, 1])
def test_doubled_dots_do_not_count_toward_the_size_limit(extra):
    content = b".a\r\n" * 100 + b"x" * extra + b"\r\n"  # 402 (+1) bytes; 502 (+1) on the wire
    body, _ = run_receive(rfc_client_wire(content) + b".\r\n", [1, 4, 5, 6, 7, 200], size_limit=402)
    assert body.refusal is (Refusal.TOO_BIG if extra else None)


@pytest.mark.parametrize("extra", [0, 1])
def test_exactly_at_the_size_limit_passes_and_one_byte_more_is_refused(extra):
    wire = b"x" * 98 + b"\r\n" + b"y" * extra
    if extra:
        wire += b"\r\n"
    body, _ = run_receive(wire + b".\r\n", [7, 50, 99], size_limit=100 + (2 if extra else 0) - extra)
    assert body.refusal is (Refusal.TOO_BIG if extra else None)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(min_value=0, max_value=1100), min_size=1, max_size=4),
    cuts=cut_lists,
    bare=st.booleans(),
)
def test_line_limit_is_aiosmtpds_1001_bytes_with_the_crlf(lengths, cuts, bare):
    lines = [(b"a\nb" if bare and n >= 3 else b"") + b"z" * (n - (3 if bare and n >= 3 else 0)) for n in lengths]
    wire = b"".join(line + b"\r\n" for line in lines)
    body, rest = run_receive(wire + b".\r\nNOOP\r\n", cuts)
    assert rest == b"NOOP\r\n"
    too_long = max(len(line) + 2 for line in wire_lines(wire)) > LINE_LENGTH_LIMIT
    assert (body.refusal is Refusal.LINE_TOO_LONG) == too_long


@pytest.mark.parametrize("extra", [0, 1])
def test_bare_line_ends_count_as_the_crlf_they_are_sent_as(extra):
    """A body of bare LFs cannot carry twice MAX_MESSAGE_SIZE upstream: each is counted as the CRLF it becomes."""
    wire = (b"\n" * 998 + b"\r\n") * 4  # 4000 bytes on the wire, 7992 as sent
    body, _ = run_receive(wire + b".\r\n", [1, 999, 2500], size_limit=7992 - extra)
    assert body.refusal is (Refusal.TOO_BIG if extra else None)
    if not extra:
        assert len(upstream_stream(body)) - 3 == body.content_size == 7992


@pytest.mark.parametrize("cuts", [[], [700, 1400, 2000], list(range(0, 5000, 64))])
def test_a_message_over_the_size_limit_is_too_big_even_when_a_long_line_came_first(cuts):
    long_first = b"a" * 1500 + b"\r\n" + b"b" * 900 + b"\r\n"
    body, _ = run_receive(long_first + b".\r\n", cuts, size_limit=2403)  # the message has 2404 bytes
    assert body.refusal is Refusal.TOO_BIG
    body, _ = run_receive(long_first + b".\r\n", cuts, size_limit=2404)
    assert body.refusal is Refusal.LINE_TOO_LONG
    big_first = (b"b" * 900 + b"\r\n") * 3 + b"a" * 1500 + b"\r\n"
    body, _ = run_receive(big_first + b".\r\n", cuts, size_limit=1200)
    assert body.refusal is Refusal.TOO_BIG


def test_an_unterminated_huge_line_is_drained_in_bounded_pieces():
    stream = b"z" * 3_000_000 + b"\r\n.\r\nRSET\r\n"
    body, rest = run_receive(stream, list(range(0, len(stream), 65536)), read_limit=256 * 1024)
    assert rest == b"RSET\r\n"
    assert body.refusal is Refusal.LINE_TOO_LONG and not body.spooled_to_disk


# -- spooling ----------------------------------------------------------------------------------------------------


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_large_body_goes_to_a_temporary_file_which_close_releases():
    before = _fds()
    wire = (b"line of text " * 70 + b"\r\n") * 4000  # about 3.6 MB
    body, _ = run_receive(wire + b".\r\n", [], read_limit=256 * 1024)
    assert body.spooled_to_disk and body.size == len(wire)
    assert _fds() == before + 1
    assert b"".join(body.chunks()) == wire
    assert b"".join(body.chunks()) == wire  # rewinds
    body.close()
    assert _fds() == before


def test_refusal_discards_what_was_spooled():
    before = _fds()
    body = MessageBody(size_limit=2_000_000, memory_limit=1000)
    body.feed(b"x" * 998 + b"\r\n")
    body.feed(b"y" * 998 + b"\r\n")
    assert body.spooled_to_disk
    for _ in range(2000):
        body.feed(b"z" * 998 + b"\r\n")
    body.finish()
    assert body.refusal is Refusal.TOO_BIG and not body.spooled_to_disk
    assert _fds() == before
    body.close()


def test_end_marker_at_the_very_start_is_an_empty_body():
    body, rest = run_receive(b".\r\nMAIL FROM:<x@example.com>\r\n", [1, 2])
    assert body.size == 0 and upstream_stream(body) == b".\r\n" and body.content() == b""
    assert rest == b"MAIL FROM:<x@example.com>\r\n"


def test_end_marker_constant():
    assert END_OF_DATA == b"\r\n.\r\n"


def test_a_spool_that_cannot_be_written_refuses_the_body_but_still_reads_it_to_its_end(monkeypatch, tmp_path):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path / "missing"))
    wire = (b"x" * 98 + b"\r\n") * 100
    body, rest = run_receive(wire + b".\r\nMAIL FROM:<a@example.com>\r\n", [], memory_limit=500)
    assert body.refusal is Refusal.SPOOL_FAILED and isinstance(body.spool_error, OSError)
    assert rest == b"MAIL FROM:<a@example.com>\r\n", "the body's lines are never taken for commands"


def _fed(pieces: list[bytes], line_limit: int, size_limit: int | None) -> tuple[object, ...]:
    body = MessageBody(size_limit=size_limit, line_limit=line_limit)
    for piece in pieces:
        body.feed(piece)
    body.finish()
    stored = b"".join(body._stored()) if body.refusal is None else None
    return body.size, body.bare_line_ends, body._line, body.refusal, stored


@settings(max_examples=1000, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.integers(min_value=0, max_value=70), st.sampled_from([b"\r\n", b"\r\n", b"\r", b"\n", b""])),
        max_size=12,
    ).map(lambda runs: b"".join(b"x" * n + end for n, end in runs)),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=6),
    line_limit=st.integers(min_value=3, max_value=60),
    size_limit=st.none() | st.integers(min_value=0, max_value=500),
)
@example(data=b"xxxx", cuts=[], line_limit=5, size_limit=None)  # an open line one byte over
@example(data=b"xxx\r\nxxxx\r\nxxx", cuts=[], line_limit=5, size_limit=None)  # a middle line one byte over
@example(data=b"xx\r\nxxx\r\nxxx", cuts=[2, 4], line_limit=5, size_limit=None)  # all at the limit, cut
def test_the_line_jumping_fast_path_agrees_with_line_by_line_counting(data, cuts, line_limit, size_limit):
    # feed() skips per-line work for CRLF-only pieces within the limits; the result must be the same as
    # splitting every piece into lines: size, bare line ends, the open line, the refusal and what is stored.
    bounds = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(bounds)]
    fast = _fed(pieces, line_limit, size_limit)
    with unittest.mock.patch("smtp_relay.body._lines_fit", return_value=False):  # every piece line by line
        exact = _fed(pieces, line_limit, size_limit)
    assert fast == exact
