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
        self._search_from = 0  # no LF before this offset: do not rescan
        self._lines: list[str] = []  # lines of the reply in progress
        self._code = 0
        self._reply_size = 0
        self._max_line = max_line
        self._max_reply = max_reply

    @property
    def pending(self) -> int:
        """Octets received but not yet part of a returned reply."""
        return len(self._buffer) + self._reply_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_reply(self) -> Reply | None:
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", self._search_from)
            if end < 0:
                self._search_from = len(buffer)
                if len(buffer) > self._max_line:
                    raise SmtpProtocolError(
                        f"reply line longer than {self._max_line} octets"
                    )
                return None
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            self._search_from = 0
            if len(line) > self._max_line:
                raise SmtpProtocolError(f"reply line longer than {self._max_line} octets")
            self._reply_size += end + 1
            if self._reply_size > self._max_reply:
                raise SmtpProtocolError(f"reply longer than {self._max_reply} octets")
            code, last, text = _parse_line(line)
            if self._lines and code != self._code:
                raise SmtpProtocolError(
                    f"reply code changed from {self._code} to {code} inside a multi-line reply"
                )
            self._code = code
            self._lines.append(text)
            if last:
                reply = Reply(code, tuple(self._lines))
                self._lines = []
                self._reply_size = 0
                return reply


def _parse_line(line: bytes) -> tuple[int, bool, str]:
    """Split one reply line (without LF) into (code, is_last_line, text)."""
    if line.endswith(b"\r"):
        line = line[:-1]
    head = line[:3]
    if (
        len(head) != 3
        or not head.isdigit()
        or head[0] not in b"2345"
        or len(line) > 3 and line[3] not in b" -"
    ):
        shown = line[:40].decode("ascii", "backslashreplace")
        raise SmtpProtocolError(f"malformed reply line: {shown!r}")
    last = line[3:4] != b"-"
    return int(head), last, line[4:].decode("utf-8", "replace")
