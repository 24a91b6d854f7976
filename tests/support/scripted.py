"""A small scripted SMTP upstream (a thread, plain TCP) that records how the relay's commands arrive.

It answers from a table (so it can do what a good server should not, e.g. accept DATA after refusing a
recipient) and notes, for each read from the socket, which command lines came in it: commands that arrive in
one read were written together (pipelined) by the relay. Replies to a read can be sent in one write or one
by one with a pause between them. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import socket
import time
from dataclasses import dataclass, field

from .net import ThreadedServer


@dataclass
class Script:
    pipelining: bool = True
    eight_bit_mime: bool = True  # offer 8BITMIME
    ehlo: bytes | None = None  # a refusal of EHLO (HELO is then taken, with no extension)
    mail: bytes = b"250 2.1.0 OK"
    sender: dict[str, bytes] = field(default_factory=dict)  # address -> reply to its MAIL; others get `mail`
    rcpt: dict[str, bytes] = field(default_factory=dict)  # address -> reply; others get `rcpt_ok`
    rcpt_ok: bytes = b"250 2.1.5 OK"
    data: bytes = b"354 End data with <CR><LF>.<CR><LF>"
    data_no_rcpt: bytes = b"554 5.5.1 No valid recipients"  # DATA after every recipient was refused
    end_of_data: bytes = b"250 2.0.0 OK queued"
    reply_gap: float = 0.0  # > 0: each reply of a read in its own write, this many seconds apart
    hang_up_after_refusal: bool = False  # close the connection after answering MAIL or RCPT with 4xx/5xx


class ScriptedUpstream(ThreadedServer):
    def __init__(self, script: Script | None = None) -> None:
        super().__init__()
        self.script = script or Script()
        self.reads: list[list[str]] = []  # command lines per read, in order
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.aborted_data = 0  # sessions closed after 354 without the final dot

    def session(self, conn: socket.socket) -> None:
        s = self.script
        deadline = time.monotonic() + 30
        buffer = b""
        mail_from, rcpts = "", []
        in_mail = in_data = False
        with conn, contextlib.suppress(OSError):
            conn.settimeout(0.2)
            conn.sendall(b"220 scripted.test ESMTP\r\n")
            while time.monotonic() < deadline and not self._stop.is_set():
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    if in_data:
                        self.aborted_data += 1
                    return
                buffer += chunk
                if in_data:
                    end = buffer.find(b"\r\n.\r\n")
                    if end < 0:
                        continue
                    self.messages.append((mail_from, rcpts, buffer[: end + 2]))
                    buffer = buffer[end + 5 :]
                    in_data = False
                    conn.sendall(s.end_of_data + b"\r\n")
                lines = buffer.split(b"\r\n")
                buffer = lines.pop()
                if not lines:
                    continue
                self.reads.append([line.decode("ascii", "replace") for line in lines])
                answers = []
                for line in lines:
                    verb = line[:4].upper()
                    if verb == b"EHLO" and s.ehlo is not None:
                        answers.append(s.ehlo)
                    elif verb == b"HELO":
                        answers.append(b"250 scripted.test")
                    elif verb == b"EHLO":
                        caps = [b"scripted.test", b"SIZE 10485760", *([b"8BITMIME"] * s.eight_bit_mime)]
                        if s.pipelining:
                            caps.append(b"PIPELINING")
                        answers.append(b"\r\n".join(b"250-" + c for c in caps[:-1]) + b"\r\n250 " + caps[-1])
                    elif verb == b"MAIL":
                        mail_from, rcpts = line[10:].split(b">")[0].strip(b"<").decode(), []
                        answers.append(s.sender.get(mail_from, s.mail))
                        in_mail = answers[-1].startswith(b"2")
                    elif verb == b"RCPT":
                        address = line[8:].split(b">")[0].strip(b"<").decode()
                        reply = s.rcpt.get(address, s.rcpt_ok) if in_mail else b"503 5.5.1 Need MAIL first"
                        if reply.startswith(b"2"):
                            rcpts.append(address)
                        answers.append(reply)
                    elif verb == b"DATA":
                        answers.append(s.data if rcpts else s.data_no_rcpt)
                        in_data = answers[-1].startswith(b"354")
                        in_mail = False
                    elif verb == b"RSET":
                        mail_from, rcpts, in_mail = "", [], False
                        answers.append(b"250 2.0.0 OK")
                    elif verb == b"QUIT":
                        conn.sendall(b"221 2.0.0 Bye\r\n")
                        return
                    else:
                        answers.append(b"502 5.5.2 not in the script")
                if s.hang_up_after_refusal:
                    refused = next((n for n, a in enumerate(answers) if a[:1] in (b"4", b"5")), None)
                    if refused is not None:
                        conn.sendall(b"".join(a + b"\r\n" for a in answers[: refused + 1]))
                        return
                if s.reply_gap > 0:
                    for answer in answers:
                        conn.sendall(answer + b"\r\n")
                        time.sleep(s.reply_gap)
                else:
                    conn.sendall(b"".join(a + b"\r\n" for a in answers))
