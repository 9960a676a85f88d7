"""The webhook sender's HTTP/1.1 client: httptools (llhttp, Node.js's
HTTP parser, in C) reads the answers, over asyncio streams, with
keep-alive connections per receiver, the requests of one call pipelined
(RFC 9112 section 9.3.2: written at once, answered in order).

Only what a webhook POST needs, and cheap (the delivery process's CPU is
shared with delivery; bench/results.md, "Delivery webhooks"): a request with its
Content-Length, the answer's status and headers, at most MAX_BODY bytes of
its body (a longer one closes the connection instead of being read). No
redirects (a 3xx is an answer like any other), no decompression, no
cookies. A connection goes back to its receiver's pool only after every
answer of its pipeline came complete and the last keeps it open (no
`Connection: close`, RFC 9112 section 9.6); any error, timeout or
cancellation closes it. https is
checked as a browser would: the system's CA certificates, and the URL's
host name against the certificate.

The request is rendered here (config.py lets no whitespace or control
character into a webhook URL; the other header values are ours: ASCII
without either).
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.parse
from typing import Callable, NamedTuple

import httptools

MAX_HEAD = 16384  # bytes of an answer's status line and headers (with any 1xx before it)
MAX_BODY = 4096  # bytes of an answer's body read (a receiver's "ok", or its error page's start)
KEEP_IDLE = 15.0  # seconds an idle connection is kept; receivers close theirs after 5-75 s
READ_SIZE = 65536


class Answer(NamedTuple):
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]  # names lowercased
    body: bytes  # at most MAX_BODY bytes
    received: float  # time.monotonic() when it was read

    def header(self, name: bytes) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value.decode("latin-1")
        return None


class ProtocolError(Exception):
    """The receiver broke HTTP/1.1, or closed the connection without an answer."""


class _Origin(NamedTuple):
    host: str
    port: int
    tls: bool
    head: bytes  # the request line, Host and User-Agent


class _Reading:
    """The parser's callbacks: the answers as they come, in order (several
    in one read when requests were pipelined)."""

    def __init__(self, answers: list[Answer]):
        self.answers = answers  # the caller's: the complete ones stay its own on a timeout
        self.parser: httptools.HttpResponseParser | None = None
        self.now = 0.0  # when the data being parsed was read
        self.keep_alive = False  # the last complete answer keeps the connection open
        self._begin()

    def _begin(self) -> None:
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.body = b""
        self.final = False  # the final (not 1xx) answer's headers are in

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.final = self.parser.get_status_code() >= 200
        if not self.final:  # 103 Early Hints and the like: the answer follows
            self.reason, self.headers = b"", []

    def on_body(self, data: bytes) -> None:
        if len(self.body) < MAX_BODY:
            self.body += data[:MAX_BODY - len(self.body)]

    def on_message_complete(self) -> None:
        if self.final:
            self.keep_alive = self.parser.should_keep_alive()
            self.end()

    def end(self) -> None:
        """The answer in progress is complete (or ends here: closed, or
        its body past MAX_BODY)."""
        self.answers.append(Answer(self.parser.get_status_code(), self.reason.decode("latin-1"),
                                   self.headers, self.body, self.now))
        self._begin()


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0
        self.reusable = False  # every answer came complete and keeps the connection open
        self.cut = False  # closed after some answers without saying so in the last one

    def usable(self, now: float) -> bool:
        """Still open on both sides and not idle too long: a receiver that
        closed it meanwhile has sent its FIN, which the transport has read."""
        return now - self.idle_since < KEEP_IDLE and not self.reader.at_eof() and not self.writer.is_closing()

    def close(self) -> None:
        self.writer.close()

    async def exchange(self, requests: list[bytes], answers: list[Answer], progress: Callable[[], None]) -> None:
        """Send `requests` in one write (pipelined: RFC 9112 section 9.3.2)
        and read their answers in order into `answers`, calling `progress`
        at each. Returns early, the connection not reusable, when the
        receiver closes it (with `Connection: close` or not) after some of
        them; raises ProtocolError when it answers none, or breaks HTTP."""
        self.reusable = self.cut = False
        self.writer.write(b"".join(requests))
        await self.writer.drain()
        reading = _Reading(answers)
        parser = reading.parser = httptools.HttpResponseParser(reading)
        first = len(answers)
        wanted = first + len(requests)
        head = 0  # bytes read while an answer's head is unfinished
        while len(answers) < wanted:
            # While a head is unfinished, no more than its bound allows.
            data = await self.reader.read(READ_SIZE if reading.final else MAX_HEAD + 1 - head)
            if not data:
                if reading.final:
                    reading.now = time.monotonic()
                    reading.end()  # a body that ends with the connection
                elif len(answers) == first:
                    raise ProtocolError("the connection was closed without an answer")
                self.cut = True
                return
            had = len(answers)
            reading.now = time.monotonic()
            try:
                parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                raise ProtocolError(f"not an HTTP/1.1 answer: {exc}") from None
            if len(answers) > had:
                progress()
                head = 0
                if not reading.keep_alive:
                    return  # closed after this answer: what follows is not read
            elif not reading.final:
                head += len(data)
                if head > MAX_HEAD:
                    raise ProtocolError(f"an answer's head over {MAX_HEAD} bytes")
            if reading.final and len(reading.body) >= MAX_BODY:
                reading.end()  # the rest is never read: the connection is closed
                return
        self.reusable = reading.keep_alive


class Client:
    """POSTs over pooled connections, pipelined. A pool holds at most as
    many idle connections as were in use at once (the sender's CONNECTIONS
    bounds those per receiver)."""

    def __init__(self, user_agent: str):
        self.user_agent = user_agent
        self._origins: dict[str, _Origin] = {}  # by URL: bounded by the configuration
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._tls: ssl.SSLContext | None = None  # made at the first https URL: loading the CAs costs
        self._swept = time.monotonic()
        self._one_at_a_time: set[tuple[str, int, bool]] = set()  # receivers that reset a pipeline

    async def post(self, url: str, requests: list[tuple[list[tuple[str, str]], bytes]],
                   answer_within: float) -> list[Answer | Exception]:
        """POST each (headers, body) of `requests` to `url`, pipelined on one
        connection; returns each one's Answer, or the exception that left it
        unanswered: TimeoutError (no answer within `answer_within` seconds of
        the request or the answer before it: a bound asyncio.timeout around
        the call could not give per answer), ProtocolError or OSError
        (ssl.SSLError among them).

        A receiver that closes or resets the connection after some answers
        (its limit of requests per connection, or a close without notice)
        gets the rest on another one; one that answers none on a kept connection
        (its idle timeout racing the write) gets them once more on a new
        one; one that answers none of a pipeline on a new connection (a
        server or middlebox that breaks on pipelining) gets them one at a
        time from then on. After a connection that failed (not closed by
        the receiver in its last answer), the next one starts with one
        request alone (RFC 9112 section 9.3.2: its answer could be lost
        again in a reset, section 9.6). Nothing is sent twice that was
        answered."""
        origin = self._origins.get(url) or self._origin(url)
        rendered = [b"".join([origin.head, *(f"{name}: {value}\r\n".encode() for name, value in headers),
                              b"Content-Length: %d\r\n\r\n" % len(body), body]) for headers, body in requests]
        key = origin[:3]
        answers: list[Answer] = []
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(answer_within) as deadline:
                def progress() -> None:
                    deadline.reschedule(loop.time() + answer_within)

                conn = self._take(key)
                kept = conn is not None
                cut = False  # the last connection failed: the next starts with one request alone
                while len(answers) < len(rendered):
                    if conn is None:
                        conn = await self._open(origin)
                    done = len(answers)
                    depth = 1 if cut or key in self._one_at_a_time else len(rendered)
                    sent = rendered[done:done + depth]
                    try:
                        await self._exchange(key, conn, sent, answers, progress)
                        cut = conn.cut
                    except (ProtocolError, ConnectionError) as exc:
                        cut = True
                        if len(answers) > done:
                            if isinstance(exc, ProtocolError):
                                raise
                            # reset after some answers: the rest on another connection
                        elif kept:
                            pass  # its idle timeout racing the write: on a new connection
                        elif len(sent) > 1:
                            self._one_at_a_time.add(key)
                        else:
                            raise
                    if len(answers) == len(rendered):
                        break
                    conn = self._take(key) if len(answers) > done else None
                    kept = conn is not None
        except (ProtocolError, OSError, TimeoutError) as exc:
            return [*answers, *[exc] * (len(rendered) - len(answers))]
        return answers

    async def _exchange(self, key: tuple[str, int, bool], conn: _Connection, requests: list[bytes],
                        answers: list[Answer], progress: Callable[[], None]) -> None:
        try:
            await conn.exchange(requests, answers, progress)
        finally:
            if conn.reusable:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
            else:
                conn.close()

    def _take(self, key: tuple[str, int, bool]) -> _Connection | None:
        now = time.monotonic()
        if now - self._swept > KEEP_IDLE:  # the pools of receivers no longer sent to, too
            self._swept = now
            for idle in self._idle.values():
                for conn in [c for c in idle if not c.usable(now)]:
                    idle.remove(conn)
                    conn.close()
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used: the likeliest still open
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _open(self, origin: _Origin) -> _Connection:
        if origin.tls and self._tls is None:
            self._tls = ssl.create_default_context()
        tls = self._tls if origin.tls else None
        reader, writer = await asyncio.open_connection(
            origin.host, origin.port, ssl=tls, server_hostname=origin.host if tls else None)
        return _Connection(reader, writer)

    def _origin(self, url: str) -> _Origin:
        parts = urllib.parse.urlsplit(url)  # config.py checked it: http(s), a host, no user
        tls = parts.scheme == "https"
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = f"POST {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nUser-Agent: {self.user_agent}\r\n"
        origin = _Origin(parts.hostname, parts.port or (443 if tls else 80), tls, head.encode())
        self._origins[url] = origin
        return origin

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
