"""Logging: one event per line, key=value text or JSON, to stdout and LOG_FILE; client text sanitised."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import io
import json
import logging
import os
import re
import stat
import sys
import time
import warnings
from pathlib import Path
from typing import Any, TextIO

from smtp_relay.config import ConfigError, Settings

log = logging.getLogger("smtp_relay")

_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# Printable ASCII but for the quote, backslash and equals sign: such values are written as they are.
_PLAIN = re.compile(r"[!#-<>-\[\]-~]+")
_plain = _PLAIN.fullmatch
# Printable ASCII and spaces but for the quote and backslash (replies, reasons): quoted, nothing to escape.
_QUOTABLE = re.compile(r"[ !#-\[\]-~]*")
_quotable = _QUOTABLE.fullmatch


def escape(value: object) -> str:
    """Render a value so it can never break out of its field or start a new log line."""
    if type(value) is int:
        return str(value)
    text = value if type(value) is str else str(value)
    if _plain(text):
        return text
    if _quotable(text):
        return '"' + text + '"'
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        elif 0xDC80 <= ord(ch) <= 0xDCFF:  # undecodable byte kept by surrogateescape
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        else:  # C1 controls, Unicode line and paragraph separators, bidi and other format characters
            out.append(
                f"\\x{ord(ch):02x}"
                if ord(ch) < 0x100
                else f"\\u{ord(ch):04x}"
                if ord(ch) < 0x10000
                else f"\\U{ord(ch):08x}"
            )
    return '"' + "".join(out) + '"'


def peer_text(peer: object) -> str:
    """`host:port` (IPv6 in brackets) for a socket peer address."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


# Set by `setup()`: our own events go straight to it (see `event`).
_direct: LineHandler | None = None


def event(level: int, name: str, /, **fields: object) -> None:
    """Log one event; the fields are formatted only if the level is enabled.

    Once `setup()` has run, an event is formatted and queued by our handler directly: a LogRecord, the logger
    and handler locks and the filter walk cost more than the line itself, three to five times per message.
    Before that (and in tests that capture records) it is an ordinary logging record.
    """
    if not log.isEnabledFor(level):
        return
    if _direct is not None:
        _direct.emit_event(level, name, fields)
    else:
        log.handle(log.makeRecord(log.name, level, "", 0, name, (), None, extra={"fields": fields}))


_second: tuple[int, str] = (-1, "")
_millisecond: tuple[int, str] = (-1, "")
_MS_SUFFIX = tuple(f".{ms:03d}Z" for ms in range(1000))


def _timestamp(created: float) -> str:
    """UTC, to the millisecond: made once per millisecond (a busy relay logs several lines in one) from a
    strftime made once per second."""
    global _second, _millisecond
    ms = int(created * 1000)
    if _millisecond[0] == ms:
        return _millisecond[1]
    whole, fraction = divmod(ms, 1000)
    if _second[0] != whole:
        _second = (whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)))
    text = _second[1] + _MS_SUFFIX[fraction]
    _millisecond = (ms, text)
    return text


def _fields(record: logging.LogRecord) -> tuple[dict[str, object], str]:
    """Our events carry their fields; other libraries' records become event=<logger> msg=<text>."""
    fields: dict[str, object] | None = record.__dict__.get("fields")
    if fields is None:
        return {"msg": record.getMessage()}, record.name
    return fields, str(record.msg)


class _FormatOnce(logging.Formatter):
    """stdout and LOG_FILE share one formatting of each record."""

    def format(self, record: logging.LogRecord) -> str:
        key = f"_line_{type(self).__name__}"
        cached: str | None = record.__dict__.get(key)
        if cached is None:
            cached = self._format(record)
            record.__dict__[key] = cached
        return cached

    def _format(self, record: logging.LogRecord) -> str:
        fields, name = _fields(record)
        traceback = self.formatException(record.exc_info) if record.exc_info else None
        return self.format_event(record.created, record.levelname, name, fields, traceback)

    def format_event(
        self, created: float, level: str, name: str, fields: dict[str, object], traceback: str | None = None
    ) -> str:
        raise NotImplementedError


# `key=value` texts of recent short text fields: a session's id, peer and user, the sender and recipients recur
# on every line of a session (and across sessions), and a lookup costs a fraction of escaping again. Bounded in
# entries and in length (long client-supplied values are escaped each time): it starts afresh when full.
_PAIRS_LIMIT = 4096
_PAIR_VALUE_LIMIT = 128
_pairs: dict[tuple[str, str], str] = {}
# `level=... event=...` per level and event name (ours are a few dozen; other loggers' names are few, and the
# cache is bounded like the pairs).
_heads: dict[tuple[str, str], str] = {}


class TextFormatter(_FormatOnce):
    """`time level=... event=... key=value ...` with every value escaped."""

    def format_event(
        self, created: float, level: str, name: str, fields: dict[str, object], traceback: str | None = None
    ) -> str:
        head = _heads.get((level, name))
        if head is None:
            if len(_heads) >= _PAIRS_LIMIT:
                _heads.clear()
            head = _heads[(level, name)] = f"level={level} event={escape(name)}"
        parts = [_timestamp(created), head]
        for key, value in fields.items():
            if type(value) is str and len(value) <= _PAIR_VALUE_LIMIT:
                pair = (key, value)
                text = _pairs.get(pair)
                if text is None:
                    if len(_pairs) >= _PAIRS_LIMIT:
                        _pairs.clear()
                    text = _pairs[pair] = f"{key}={escape(value)}"
                parts.append(text)
            elif value is not None:
                parts.append(f"{key}={escape(value)}")
        line = " ".join(parts)
        return line if traceback is None else line + "\n" + traceback


class JsonFormatter(_FormatOnce):
    """One JSON object per line; json.dumps escapes control characters itself."""

    def format_event(
        self, created: float, level: str, name: str, fields: dict[str, object], traceback: str | None = None
    ) -> str:
        doc: dict[str, Any] = {"time": _timestamp(created), "level": level, "event": name}
        for key, value in fields.items():
            if value is not None:
                doc[key] = value if isinstance(value, int | float | bool) else str(value)
        if traceback is not None:
            doc["traceback"] = traceback
        return json.dumps(doc, ensure_ascii=True)


# aiosmtpd says these on every connection or login for settings we chose on purpose (AUTH without
# STARTTLS when USE_TLS is off; its own deprecated login_data setter): noise, not news.
_LIBRARY_NOISE = frozenset(
    {
        "auth_required == True but auth_require_tls == False",
        "Session.login_data is deprecated and will be removed in version 2.0",
    }
)


def _not_noise(record: logging.LogRecord) -> bool:
    return record.msg not in _LIBRARY_NOISE


# Lines go out in writes of at most this many bytes (whole lines), so that the lines of several worker processes
# sharing stdout (a pipe: writes up to PIPE_BUF, 4096 bytes, are atomic) or LOG_FILE (O_APPEND) never interleave.
# A single line longer than that (a traceback) still goes out in one write, and on a pipe may interleave.
WRITE_LIMIT = 4000


def _batches(lines: list[str]) -> list[str]:
    """`lines` joined, each with its newline, into as few texts of at most WRITE_LIMIT UTF-8 bytes as fit."""
    text = "\n".join(lines) + "\n"
    if len(text) <= WRITE_LIMIT // 4 or (text.isascii() and len(text) <= WRITE_LIMIT):
        return [text]
    batches: list[str] = []
    batch: list[str] = []
    size = 0
    for line in lines:
        length = (len(line) if line.isascii() else len(line.encode("utf-8", "surrogateescape"))) + 1
        if batch and size + length > WRITE_LIMIT:
            batches.append("\n".join(batch) + "\n")
            batch, size = [], 0
        batch.append(line)
        size += length
    batches.append("\n".join(batch) + "\n")
    return batches


_LEVEL_NAMES = {level: logging.getLevelName(level) for level in range(logging.CRITICAL + 1)}


class LineHandler(logging.Handler):
    """Writes each line to stdout and LOG_FILE; lines logged in one event-loop turn go out in one write each.

    A relay logs three to five lines per message: one write and flush per line per stream cost more CPU than
    the formatting. The lines wait at most until the loop's current turn ends (microseconds after the reply they
    explain went out); outside a running loop (start-up, other threads,
    shutdown) a line is written at once.
    """

    def __init__(self, streams: list[TextIO]) -> None:
        super().__init__()
        self.streams = streams
        self._pending: list[str] = []
        self._scheduled = False

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._queue(line)

    def emit_event(self, level: int, name: str, fields: dict[str, object]) -> None:
        """One of our own events, without a LogRecord (see `event`)."""
        formatter = self.formatter
        assert isinstance(formatter, _FormatOnce)
        self._queue(formatter.format_event(time.time(), _LEVEL_NAMES[level], name, fields))

    def _queue(self, line: str) -> None:
        self._pending.append(line)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._scheduled = False
            self._write()

    def _write(self) -> None:
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        for text in _batches(lines):
            for stream in self.streams:
                try:
                    stream.write(text)
                    stream.flush()
                except (OSError, ValueError):  # a full disk or a closed stdout must not stop the relay
                    pass

    def close(self) -> None:
        self.flush()
        for stream in self.streams[1:]:
            stream.close()
        super().close()


def flush_all() -> None:
    """Write out every pending line (before `os._exit` or `fork`, which would lose or duplicate them)."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()


def check_log_file(settings: Settings) -> None:
    """For `--check-config`: LOG_FILE can be opened for appending, as the relay will, leaving no trace.

    Permission bits alone cannot tell (root may be refused, say under /proc), so it is tried: a regular file is
    opened for appending (which writes nothing), a device or socket without waiting (`/dev/stdout` may be a
    pipe), and a missing file (also the target of a link) is created and removed again, with the directories the
    relay would make for it, as `setup` makes them (so the error is the one the relay would give). A FIFO is only
    checked for permission (opening it would wait for a reader).
    """
    if not settings.log_file:
        return
    shown = settings.log_file
    path = Path(shown)
    try:
        if path.is_file():
            path.open("a").close()
        elif path.exists():
            if stat.S_ISFIFO(path.stat().st_mode):
                if not os.access(path, os.W_OK):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK))
        else:
            _try_create(path)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError("LOG_FILE", f"cannot open {shown!r} for writing: {reason}") from None


def _try_create(path: Path) -> None:
    """Make the missing directories and the file as `setup` would (through a link with no file behind it, its
    target), then remove what was made."""
    missing = []
    parent = path.parent
    while not os.path.lexists(parent) and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        target = Path(os.path.realpath(path))
        if target.exists():  # reached through the directories just made (`new/../relay.log`)
            target.open("a").close()
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
            target.unlink()
    finally:
        for directory in missing:  # the deepest first
            with contextlib.suppress(OSError):
                directory.rmdir()


def setup(settings: Settings) -> None:
    """Send our events to stdout and LOG_FILE; keep libraries that log protocol lines quiet."""
    formatter: logging.Formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    # Lines are UTF-8 text (addresses may be, with SMTPUTF8): a stdout of another encoding escapes what it cannot
    # show instead of failing, which would drop the line.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")
    streams: list[TextIO] = [sys.stdout]
    if settings.log_file:
        path = Path(settings.log_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            streams.append(path.open("a", encoding="utf-8", errors="backslashreplace"))
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError("LOG_FILE", f"cannot open {str(path)!r} for writing: {reason}") from None
    global _direct
    handler = LineHandler(streams)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    _direct = handler
    root.setLevel(settings.log_level)
    # Nobody prints thread, process or multiprocessing names: skip collecting them for every record.
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command line at INFO, AUTH payloads included, and its WARNINGs are refusals the relay
    # logs itself with the session id (`command.refused`): only its errors are let through.
    library = logging.getLogger("mail.log")
    library.setLevel(logging.ERROR)
    library.addFilter(_not_noise)
    warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning)
    logging.getLogger("aiosmtplib").setLevel(logging.WARNING)
