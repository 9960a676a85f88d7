"""SMTP replies and a sans-IO reply parser (RFC 5321 4.2).

Grammar (RFC 5321 4.2)::

    Reply-line = *( Reply-code "-" [ textstring ] CRLF )
                    Reply-code [ SP textstring ] CRLF
    Reply-code = %x32-35 %x30-35 %x30-39

Every line of a multi-line reply carries the same code; only the last has a
space (or nothing) after the code.  A bare LF is accepted as a line end (some
servers send it); anything else off the grammar is a SmtpProtocolError.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SmtpProtocolError

__all__ = ["Reply", "ReplyParser", "MAX_LINE", "MAX_REPLY"]

# RFC 5321 4.5.3.1.5 allows 512 octets per reply line; real servers exceed it
# (long EHLO AUTH lists, verbose 5xx texts), so accept 16 times that, as
# aiosmtplib does (8192), and bound a whole reply at 8 such lines' worth of
# bytes (64 KiB) so a server streaming continuation lines cannot grow memory.
MAX_LINE = 8192
MAX_REPLY = 64 * 1024

# RFC 3463: class.subject.detail, class matching the reply's first digit.
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?= |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    """One complete server reply: its code and the text of each line."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code ("2.0.0") if the first line starts with one."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match and int(match.group(1)) == self.code // 100:
            return match.group(0)
        return None

    @property
    def text(self) -> str:
        """The text after the codes, lines joined with "\\n"."""
        return "\n".join(self.lines)

    @property
    def is_positive(self) -> bool:
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return 500 <= self.code < 600

    def __str__(self) -> str:
        return "\n".join(f"{self.code} {line}".rstrip() for line in self.lines)


class ReplyParser:
    """Sans-IO: feed(bytes) the server's bytes, next_reply() -> Reply | None (need more).

    Raises SmtpProtocolError on a line off the grammar, a code change inside a
    multi-line reply, a line over MAX_LINE or a reply over MAX_REPLY octets.
    Bytes after the last complete reply stay buffered (``pending``).
    """

    def __init__(self, max_line: int = MAX_LINE, max_reply: int = MAX_REPLY) -> None:
        self._buffer = bytearray()
        self._reply_start = 0  # offset of the reply in progress
        self._pos = 0  # offset of the first line not yet parsed
        self._lines: list[str] = []  # lines of the reply in progress, parsed
        self._code = 0
        self._max_line = max_line
        self._max_reply = max_reply

    @property
    def pending(self) -> int:
        """Octets received but not yet part of a returned reply."""
        return len(self._buffer) - self._reply_start

    def feed(self, data: bytes) -> None:
        if self._reply_start:
            # Drop what earlier replies used, once per read, not per line.
            del self._buffer[: self._reply_start]
            self._pos -= self._reply_start
            self._reply_start = 0
        self._buffer += data

    def next_reply(self) -> Reply | None:
        buffer = self._buffer
        while True:
            pos = self._pos
            end = buffer.find(b"\n", pos)
            if end < 0:
                if len(buffer) - pos > self._max_line:
                    raise SmtpProtocolError(f"reply line longer than {self._max_line} octets")
                return None
            if end - pos > self._max_line:
                raise SmtpProtocolError(f"reply line longer than {self._max_line} octets")
            if end + 1 - self._reply_start > self._max_reply:
                raise SmtpProtocolError(f"reply longer than {self._max_reply} octets")
            match = _LINE.match(buffer, pos, end)
            if match is None:
                shown = bytes(buffer[pos : min(end, pos + 40)]).decode("ascii", "backslashreplace")
                raise SmtpProtocolError(f"malformed reply line: {shown!r}")
            self._pos = end + 1
            code = int(match[1])
            if self._lines and code != self._code:
                raise SmtpProtocolError(
                    f"reply code changed from {self._code} to {code} inside a multi-line reply"
                )
            self._code = code
            self._lines.append(match[3].decode("utf-8", "replace") if match[2] else "")
            if match[2] != b"-":
                reply = Reply(code, tuple(self._lines))
                self._lines = []
                self._reply_start = self._pos
                return reply


# Code, then nothing or a space or hyphen and the text; a CR before the LF
# is dropped (a bare LF is tolerated).  `.` matches any byte but LF here, and
# the match runs only up to the LF (endpos), so \Z is the line's end.
_LINE = re.compile(rb"([2-5][0-9][0-9])(?:([ -])(.*?))?\r?\Z", re.DOTALL)
