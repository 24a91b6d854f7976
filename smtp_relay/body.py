"""The message body of one DATA transfer: where it ends, its limits, and its bytes spooled and sent on; no sockets.

The relay keeps a body in the client's *wire form*: dot-stuffed CRLF lines exactly as received, up to but
excluding the final ".<CR><LF>". Such a body is already a valid SMTP DATA payload, so it is sent upstream as it
came, in large chunks, with no per-line work. Only a body with a bare CR or a bare LF is rewritten on the way out
(un-stuffed, line endings made CRLF, re-stuffed), so an upstream that takes a bare LF for a line end can never read
two messages in it.
"""

from __future__ import annotations

import asyncio
import enum
import re
import tempfile
from collections.abc import Iterator
from typing import IO, Any

END_OF_DATA = b"\r\n.\r\n"
# aiosmtpd's `line_length_limit`: a line of the message may have 1001 bytes, its CRLF included.
LINE_LENGTH_LIMIT = 1001
# A body up to this size stays in memory; a larger one goes to an unnamed temporary file.
MEMORY_LIMIT = 1024 * 1024
# Size of the pieces read back from the temporary file.
READ_BLOCK = 256 * 1024
# How much of the message the client's stream reader may hold while a body is read (it pauses the socket at twice
# this): large enough for a 100 KB message in one piece, small enough for 20 large messages at once.
READ_LIMIT = 256 * 1024

_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r(?!\n)")


class Refusal(enum.Enum):
    """Why a body is refused; it is read to its end all the same, then answered."""

    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"
    SPOOL_FAILED = "spool failed"  # the temporary file could not be written (a fault of the relay's host)


class EndOfDataScanner:
    """Finds the end of data, <CR><LF>.<CR><LF>, in a stream read piece by piece, never reading past it.

    The CRLF that ended the DATA command counts as the start of an end marker, so data that begins with
    ".<CR><LF>" is an empty body. The reader asks `need()` before each read: 0 means no end marker has begun,
    so it may read up to the next full marker (`readuntil(END_OF_DATA)`), which cannot then overlap what was
    read before; n > 0 means the last bytes began a marker, and exactly n more bytes finish it if anything does,
    so reading n bytes never takes a byte of the next command. `feed()` returns the body bytes of a piece
    (a marker's leading CRLF is the last line's end and belongs to the body; its ".<CR><LF>" does not).
    """

    def __init__(self) -> None:
        self._tail = b"\r\n"  # the last (at most 4) bytes of the stream, starting with the DATA command's CRLF
        self._held = b""  # bytes that may be the "." or ".\r" of an end marker: not body yet
        self.done = False

    def need(self) -> int:
        """How many bytes finish an end marker already begun (0: none begun)."""
        overlap = _marker_prefix(self._tail)
        return len(END_OF_DATA) - overlap if overlap else 0

    def feed(self, piece: bytes) -> bytes:
        """Take the next piece of the stream (it must not go past the end marker); return its body bytes."""
        assert not self.done, "data fed after the end of data"
        if len(piece) < len(END_OF_DATA):
            window = self._tail + piece
            # A short piece is one that finishes a marker already begun (or not): check it whole.
            end = window.find(END_OF_DATA)
            assert end < 0 or end + len(END_OF_DATA) == len(window), "read past the end of data"
            ended = end >= 0
            tail = window[-4:]
        else:
            # A long piece comes from readuntil(END_OF_DATA) (a marker can only be at its end) or is cut by
            # the read limit (no marker at all).
            ended = piece.endswith(END_OF_DATA)
            tail = piece[-4:]
        data = self._held + piece if self._held else piece
        if ended:
            self.done = True
            self._held = b""
            return data[:-3]
        self._tail = tail
        overlap = _marker_prefix(tail)
        hold = overlap - 2 if overlap > 2 else 0
        self._held = data[len(data) - hold :] if hold else b""
        return data[: len(data) - hold] if hold else data

    def completes(self, upcoming: bytes) -> bool:
        """Whether `upcoming` (at least `need()` bytes not yet read) finishes the end marker already begun."""
        need = self.need()
        return upcoming[:need] == END_OF_DATA[len(END_OF_DATA) - need :]


async def receive(reader: asyncio.StreamReader, body: MessageBody, read_limit: int = READ_LIMIT) -> None:
    """Read one data section from `reader` into `body`, up to and including its end marker, in large pieces.

    Nothing after the end marker is read: pipelined commands stay in the reader for the next command. The
    reader's line limit is raised while the body is read and restored afterwards, also on cancellation.
    """
    scanner = EndOfDataScanner()
    stream: Any = reader  # asyncio has no public setter for the limit; aiosmtpd sets it to its line limit
    saved: int = stream._limit
    stream._limit = max(saved, read_limit)
    try:
        while not scanner.done:
            need = scanner.need()
            if need and not _rules_out(reader, scanner, need):
                piece = await reader.readexactly(need)
            else:
                try:
                    piece = await reader.readuntil(END_OF_DATA)
                except asyncio.LimitOverrunError as exc:
                    # No end marker within the limit; asyncio keeps back a tail that may begin one.
                    piece = await reader.read(exc.consumed)
            body.feed(scanner.feed(piece))
        body.finish()
    finally:
        stream._limit = saved


def _rules_out(reader: asyncio.StreamReader, scanner: EndOfDataScanner, need: int) -> bool:
    """True if the bytes already buffered show that the end marker begun does not finish (a peek)."""
    buffered = getattr(reader, "_buffer", None)  # asyncio's StreamReader; without it, read `need` bytes
    if not isinstance(buffered, bytearray) or len(buffered) < need:
        return False
    return not scanner.completes(bytes(buffered[:need]))


def _lines_fit(data: bytes, carried: int, allowed: int) -> bool:
    """Whether every line of `data` has at most `allowed` bytes besides its CRLF, the first one continuing a line
    of `carried` bytes, and the last one possibly unfinished. `data` has CRLF line ends only (no bare CR or LF).

    Jumps from a line end to the last line end within reach (rfind is memrchr), about `allowed` bytes at a
    time, instead of splitting the data into lines.
    """
    start, end = 0, len(data)
    while True:
        # The line that starts at `start` fits if its LF is before `reach`.
        reach = start + allowed + 2 - carried
        if reach > end:
            last = data.rfind(b"\n", start)
            if last < 0:
                return end - start + carried <= allowed
            return end - last - 1 <= allowed
        last = data.rfind(b"\n", start, reach)
        if last < 0:
            return False
        start, carried = last + 1, 0


def _marker_prefix(tail: bytes) -> int:
    """The length of the longest suffix of `tail` that begins an end marker (0 to 4)."""
    for k in (4, 3, 2, 1):
        if tail.endswith(END_OF_DATA[:k]):
            return k
    return 0


class MessageBody:
    """The wire form of one message, spooled (memory up to `memory_limit`, then a temporary file).

    `feed()` takes body bytes in any pieces and tracks the size, the longest line and whether a bare CR or LF
    occurs, with C-level byte operations only; a limit crossed refuses the body and discards what was stored.
    The size limit counts the message as RFC 1870 does (the dots the client doubled at line starts are not
    part of it) and as it goes upstream (a bare CR or LF is sent as a CRLF), and a message over it is refused as
    too big even when a line too long came first: the size is still counted to the end. `chunks()` gives the
    bytes to send after the upstream's 354 (the ".<CR><LF>" is the sender's); it can be called again to resend
    from the start. `close()` frees the temporary file.
    """

    def __init__(
        self,
        size_limit: int | None = None,
        line_limit: int = LINE_LENGTH_LIMIT,
        memory_limit: int = MEMORY_LIMIT,
    ) -> None:
        self.size_limit = size_limit
        self.line_limit = line_limit
        self.memory_limit = memory_limit
        self.size = 0  # wire bytes received (CRLFs and stuffing dots included, the final ".\r\n" excluded)
        self.stuffing = 0  # dots the client doubled at CRLF line starts: in `size`, not in the message
        self._line_start = True  # the next byte fed starts a line (the CRLF ending DATA started the first)
        self.bare_line_ends = 0  # bare CRs and LFs seen
        self.refusal: Refusal | None = None
        self.spool_error: OSError | None = None
        self._line = 0  # length of the line in progress (without its CRLF)
        self._cr_held = False  # the last byte fed was a CR: it is kept back until the next byte is seen
        self._memory: list[bytes] = []
        self._memory_size = 0
        self._file: IO[bytes] | None = None
        self._finished = False
        self._closed = False
        # The end of data was written upstream: from then on the upstream may have the message, whatever
        # happens to the connection (see `RelaySMTP.eof_received`).
        self.end_sent = False

    # -- receiving -------------------------------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Add body bytes (the client's wire form, in order)."""
        assert not self._finished and not self._closed
        if not data:
            return
        if self._cr_held:
            data = b"\r" + data
            self._cr_held = False
        if data.endswith(b"\r"):
            # It may be the first half of a CRLF split between two pieces.
            self._cr_held = True
            data = data[:-1]
            if not data:
                return
        refusal = self.refusal
        crlf = data.count(b"\r\n")
        bare = data.count(b"\r") + data.count(b"\n") - 2 * crlf
        if refusal is not None:
            if refusal is Refusal.LINE_TOO_LONG and self._count(data, bare):  # a message also too big is so answered
                self.refusal = Refusal.TOO_BIG
            return
        line = self._line
        if self._count(data, bare):
            self._refuse(Refusal.TOO_BIG)
            return
        if bare or not _lines_fit(data, line, self.line_limit - 2):
            self._feed_exactly(data, crlf, line)
            return
        # The common case: CRLF lines only, all within the limit. No per-line objects (a 100 KB body has 1300).
        self._line = len(data) - data.rfind(b"\n") - 1 if crlf else line + len(data)
        self._store(data)

    def _count(self, data: bytes, bare: int) -> bool:
        """Add `data` (with `bare` bare CRs and LFs) to the size; True if the message is now over the size limit,
        counted as it goes upstream: a bare line end becomes a CRLF."""
        self.size += len(data)
        self.bare_line_ends += bare
        self.stuffing += data.count(b"\r\n.") + (self._line_start and data[:1] == b".")
        self._line_start = data.endswith(b"\r\n")
        return self.size_limit is not None and self.content_size > self.size_limit

    def _feed_exactly(self, data: bytes, crlf: int, line: int) -> None:
        """`feed` for data (already counted) with a bare CR or LF, or a line over the limit."""
        pieces = data.split(b"\r\n")
        first = line + len(pieces[0])
        if crlf:
            longest = max(first, max(map(len, pieces[1:-1]), default=0), len(pieces[-1]))
        else:
            longest = first
        if longest + 2 > self.line_limit:
            self._refuse(Refusal.LINE_TOO_LONG)
            return
        self._line = len(pieces[-1]) if crlf else first
        self._store(data)

    def finish(self) -> None:
        """The end of data was reached: no more bytes."""
        if self._cr_held:
            # Cannot happen after a real end of data (the body then ends with CRLF); kept exact all the same.
            self._cr_held = False
            if self._count(b"\r", 1) and self.refusal in (None, Refusal.LINE_TOO_LONG):
                self._refuse(Refusal.TOO_BIG)
            elif self.refusal is None:
                self._line = 0
                self._store(b"\r")
        self._finished = True

    def _refuse(self, why: Refusal) -> None:
        self.refusal = why
        self._discard()

    def _store(self, data: bytes) -> None:
        if self._file is None and self._memory_size + len(data) <= self.memory_limit:
            self._memory.append(data)
            self._memory_size += len(data)
            return
        try:
            if self._file is None:
                self._file = tempfile.TemporaryFile(prefix="smtp-relay-")  # closed by close()
                for piece in self._memory:
                    self._file.write(piece)
                self._memory = []
                self._memory_size = 0
            self._file.write(data)
        except OSError as exc:
            # The rest is still read (never taken for commands); the client gets a 4xx and retries.
            self.spool_error = exc
            self._refuse(Refusal.SPOOL_FAILED)

    def _discard(self) -> None:
        self._memory = []
        self._memory_size = 0
        if self._file is not None:
            self._file.close()
            self._file = None

    # -- sending ---------------------------------------------------------------------------------------------
    @property
    def needs_rewriting(self) -> bool:
        """True if a bare CR or LF occurs: then the body is rewritten on the way out."""
        return self.bare_line_ends > 0

    @property
    def spooled_to_disk(self) -> bool:
        return self._file is not None

    @property
    def content_size(self) -> int:
        """An upper bound of the message size as RFC 1870 counts it (no stuffing dots, CRLF line ends)."""
        return self.size - self.stuffing + self.bare_line_ends

    def header_is_ascii(self) -> bool:
        """Whether the header section (up to the first empty line) is ASCII: a message marked SMTPUTF8 that needs
        none of it may go to an upstream without SMTPUTF8."""
        tail = b""
        for chunk in self.chunks():
            block = tail + chunk
            if not tail and block.startswith(b"\r\n"):  # no header at all
                return True
            end = block.find(b"\r\n\r\n")
            if end >= 0:
                return block[:end].isascii()
            if not block.isascii():
                return False
            tail = block[-3:]
        return True

    def chunks(self) -> Iterator[bytes]:
        """The bytes to send upstream after its 354, from the start (the caller adds ".<CR><LF>")."""
        assert self._finished and self.refusal is None and not self._closed
        if not self.needs_rewriting:
            yield from self._stored()
            return
        carry = b""
        for block in self._stored():
            block = carry + block
            cut = block.rfind(b"\r\n") + 2
            if cut < 2:
                carry = block
                continue
            carry = block[cut:]
            yield _restuff(_normalise(_unstuff(block[:cut])))
        if carry:
            yield _restuff(_normalise(_unstuff(carry) + b"\r\n"))

    def content(self) -> bytes:
        """The message as an RFC 5321 receiver reconstructs it from `chunks()` (for tests and tools)."""
        assert self._finished and self.refusal is None
        content = _normalise(_unstuff(b"".join(self._stored())))
        return content if not content or content.endswith(b"\r\n") else content + b"\r\n"

    def _stored(self) -> Iterator[bytes]:
        if self._file is None:
            yield from self._memory
            return
        file = self._file
        file.seek(0)
        while True:
            block = file.read(READ_BLOCK)
            if not block:
                return
            yield block

    def close(self) -> None:
        """Free the spool (the temporary file's descriptor); the body cannot be read afterwards."""
        self._closed = True
        self._discard()

    def __enter__(self) -> MessageBody:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unstuff(lines: bytes) -> bytes:
    """Remove the transparency dot of each CRLF line (RFC 5321 4.5.2); `lines` starts at a line start."""
    lines = lines.replace(b"\r\n.", b"\r\n")
    return lines[1:] if lines.startswith(b".") else lines


def _normalise(lines: bytes) -> bytes:
    """Bare CR and bare LF become CRLF (as aiosmtplib did when it sent the relay's messages)."""
    return _LINE_ENDINGS.sub(b"\r\n", lines)


def _restuff(lines: bytes) -> bytes:
    """Double the leading dot of each line; `lines` starts at a line start and has CRLF line ends only."""
    lines = lines.replace(b"\r\n.", b"\r\n..")
    return b"." + lines if lines.startswith(b".") else lines
