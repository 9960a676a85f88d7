"""Sans-IO parser of the request lines (PROTOCOL.md, "Framing").

Bytes go in with `feed()`, events come out of `next_event()`; the caller owns
the socket (the shape of h11). A request is one line ending in LF, a CR right
before the LF is dropped, and `VERB[ ARGUMENT]` splits at the first space.

Memory: the parser holds at most one incomplete line of `max_line` (+1 for a
CR; at least 15, the longest foreign prefix) bytes plus whatever the caller
fed since it last emptied the events.
A longer line is drained: its bytes are counted and dropped as they arrive
until its LF, then `LineTooLong(size)` is emitted and the connection goes on.
With `drain=False` (a connection that has not authenticated yet) the parser
does not wait for that LF: `LineTooLong(size)` comes as soon as the line
passes `max_line`, and the parser closes. Both are attributes, so the caller
changes them when the connection changes state (AUTH). `drop_line()` drains
the incomplete line at the caller's request (its memory budget is spent):
`LineDropped(size)` at its LF.

Cost: the buffer remembers how far it has already looked for an LF (like
h11's _receivebuffer), so a line arriving one byte at a time, or 1,000
pipelined requests in one feed, cost O(total bytes), not O(n^2). Deleting the
front of a bytearray is amortised O(1) in CPython >= 3.4 (bpo-19087).

Foreign protocols: a browser (or a web page forging a request to
127.0.0.1:2526) or an SMTP client at the wrong port speaks first with
`GET / HTTP/1.1`, `EHLO ...`, a TLS ClientHello... The prefix is recognised
as soon as its bytes are in, before the LF, so the server can close the
connection without waiting for a line that a browser might never finish.
"""

from dataclasses import dataclass

__all__ = ["LineParser", "Request", "LineTooLong", "LineDropped", "ForeignProtocol", "BadLine",
           "FOREIGN_PREFIXES"]


@dataclass(frozen=True, slots=True)
class Request:
    """One request line: `verb` upper-cased ASCII, `arg` the rest (None without a space)."""
    verb: str
    arg: str | None


@dataclass(frozen=True, slots=True)
class LineTooLong:
    """A line longer than max_line was drained; `size` counts its bytes without
    the LF (a CR before it included). With `drain` off, `verb` is the line's
    first word as far as it was read (upper-cased, at most 16 characters), so
    that the caller can answer what the line asked for."""
    size: int
    verb: str = ""


@dataclass(frozen=True, slots=True)
class LineDropped:
    """A line the caller dropped with `drop_line()` was drained; `size` as for LineTooLong."""
    size: int


@dataclass(frozen=True, slots=True)
class ForeignProtocol:
    """The line starts like another protocol; `line_start` holds its first bytes (for the log)."""
    line_start: bytes


@dataclass(frozen=True, slots=True)
class BadLine:
    """A complete line that is not a request (invalid UTF-8, empty, non-ASCII verb):
    answer `ERR BAD_REQUEST <reason>`; the connection stays usable."""
    reason: str


# Upper-cased line starts that no request of ours can have. HTTP methods
# (RFC 9110 9.1 plus PATCH and the HTTP/2 preface "PRI * HTTP/2.0"), request
# headers a browser sends, SMTP commands (RFC 5321 4.1.1) typed at the wrong
# port, TLS (a ClientHello record starts 0x16 0x03, RFC 8446 5.1) and SSH.
# None of our verbs (PING HELLO AUTH SEND STATUS WAIT STATS NOOP HELP QUIT)
# starts with any of them: HELO differs from HELLO at its fourth byte.
FOREIGN_PREFIXES: tuple[bytes, ...] = (
    b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"CONNECT ",
    b"TRACE ", b"PATCH ", b"PRI * HTTP",
    b"HOST:", b"USER-AGENT:", b"ACCEPT:", b"ORIGIN:", b"REFERER:", b"COOKIE:",
    b"CONTENT-TYPE:", b"CONTENT-LENGTH:", b"CONNECTION:", b"UPGRADE:",
    b"EHLO ", b"HELO ", b"MAIL FROM:", b"RCPT TO:", b"STARTTLS ",
    b"\x16\x03", b"SSH-",
)
_LONGEST_PREFIX = max(len(p) for p in FOREIGN_PREFIXES)
_VERB_SHOWN = 16  # characters of an over-long line's verb reported with drain off


def _foreign_verdict(head: bytes) -> bool | None:
    """True if `head` (a line start, upper-cased) is foreign, False if it cannot
    become foreign, None if more bytes are needed to tell."""
    if head.startswith(FOREIGN_PREFIXES):
        return True
    for prefix in FOREIGN_PREFIXES:
        if prefix.startswith(head):
            return None
    return False


class LineParser:
    """Turns bytes into Request / LineTooLong / LineDropped / ForeignProtocol / BadLine events.

    After a ForeignProtocol event, or a LineTooLong with `drain` off, the
    parser is closed: feed() drops data and next_event() returns None; the
    caller is expected to close the connection.
    """

    def __init__(self, max_line: int, *, drain: bool = True):
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        self.drain = drain
        self._buf = bytearray()
        self._searched = 0          # bytes of _buf already known to hold no LF
        self._line_checked = False  # the current line start is known not to be foreign
        self._draining = False      # inside an over-long or dropped line, dropping bytes
        self._drained = 0           # bytes dropped so far of that line
        self._drain_event = LineTooLong  # what the drained line becomes at its LF
        self._drained_line = None   # that event, once its LF came, to emit
        self.closed = False

    @property
    def pending_bytes(self) -> int:
        """Bytes held in the buffer (incomplete line and unread lines); 0 while draining."""
        return len(self._buf)

    @property
    def mid_request(self) -> bool:
        """Whether a line has begun and not ended (held, or being drained)."""
        return bool(self._buf) or self._draining

    def drop_line(self) -> None:
        """Drain the incomplete line instead of holding it; LineDropped(size) at its LF.

        Call it only after next_event() returned None (the buffer then holds
        one incomplete line, if any)."""
        if self._buf and not self.closed:
            self._start_drain(LineDropped)

    def feed(self, data: bytes) -> None:
        """Append received bytes. While draining, bytes up to the LF are dropped here."""
        if self.closed or not data:
            return
        if self._draining:
            lf = data.find(b"\n")
            if lf < 0:
                self._drained += len(data)
                return
            self._finish_drain(self._drained + lf)
            data = data[lf + 1:]
        self._buf += data

    def next_event(self):
        """Return the next event, or None when more data is needed."""
        if self.closed:
            return None
        if self._drained_line is not None:
            event, self._drained_line = self._drained_line, None
            return event
        if self._draining:
            return None
        buf = self._buf
        lf = buf.find(b"\n", self._searched)
        if lf < 0:
            return self._incomplete_line()
        line = bytes(buf[:lf])
        del buf[:lf + 1]
        self._searched = 0
        checked, self._line_checked = self._line_checked, False
        if len(line) > self.max_line:
            if len(line) > self.max_line + 1 or not line.endswith(b"\r"):
                if not checked and line[:_LONGEST_PREFIX].upper().startswith(FOREIGN_PREFIXES):
                    return self._close(line)
                if not self.drain:
                    return self._refuse(len(line), line)
                return LineTooLong(len(line))   # CR counted, as when drained
        if line.endswith(b"\r"):
            line = line[:-1]
        # The added space makes a bare "HELO" or "GET" line match "HELO ", "GET ".
        # A complete line cannot grow: only "is it foreign" matters, not
        # "might it become foreign" (_foreign_verdict's slower second half).
        if not checked and (line[:_LONGEST_PREFIX] + b" ").upper().startswith(FOREIGN_PREFIXES):
            return self._close(line)
        return _request_from(line)

    def _incomplete_line(self):
        """Handle a buffer that holds no LF: early foreign detection, or start draining."""
        buf = self._buf
        self._searched = len(buf)
        if not self._line_checked and buf:
            # A trailing CR may be the end of a bare "HELO\r\n": undecided yet.
            head = bytes(buf[:_LONGEST_PREFIX]).upper().rstrip(b"\r")
            verdict = _foreign_verdict(head)
            if verdict:
                return self._close(bytes(buf[:_LONGEST_PREFIX]))
            if verdict is False or len(buf) >= _LONGEST_PREFIX:
                self._line_checked = True
        # max_line + 1: the line may still end in CR LF, and the CR is not
        # counted. A line start that may still turn out foreign is kept (at
        # most _LONGEST_PREFIX bytes) so that the verdict does not depend on
        # how the bytes were cut.
        if len(buf) > self.max_line + 1 and self._line_checked:
            if not self.drain:
                return self._refuse(len(buf), bytes(buf[:_VERB_SHOWN + 1]))
            self._start_drain(LineTooLong)
        return None

    def _start_drain(self, event) -> None:
        self._draining = True
        self._drain_event = event
        self._drained = len(self._buf)
        self._buf.clear()
        self._searched = 0
        self._line_checked = False

    def _finish_drain(self, size: int) -> None:
        self._draining = False
        self._drained = 0
        self._drained_line = self._drain_event(size)

    def _refuse(self, size: int, line_start: bytes) -> LineTooLong:
        """An over-long line with `drain` off: report it now, hold nothing, close."""
        self.closed = True
        self._buf.clear()
        verb = line_start[:_VERB_SHOWN + 1].partition(b" ")[0][:_VERB_SHOWN]
        return LineTooLong(size, verb.decode("ascii", "replace").upper())

    def _close(self, line_start: bytes) -> ForeignProtocol:
        self.closed = True
        self._buf.clear()
        return ForeignProtocol(line_start[:_LONGEST_PREFIX])


def _request_from(line: bytes):
    """Split a complete line (without its terminator) into a Request, or a BadLine."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return BadLine(f"request is not valid UTF-8 (byte {exc.start})")
    verb, space, arg = text.partition(" ")
    if not verb:
        return BadLine("empty request line" if not text else "request starts with a space")
    # str.upper() maps some non-ASCII letters onto ASCII ("ſ" -> "S"), which
    # would let "ſend" pass as SEND: verbs must be ASCII before upper-casing.
    if not verb.isascii():
        return BadLine("verb is not ASCII")
    return Request(verb.upper(), arg if space else None)
