"""Intake: the line protocol over TCP and Unix sockets (PROTOCOL.md).

A thin asyncio layer around the sans-IO `LineParser`. Each connection has a
reader loop and a writer task. Requests are dispatched in arrival order (so
AUTH takes effect for the requests after it), but a SEND waits for its
durable commit concurrently with the SENDs pipelined behind it: all of them
share one group commit in the spool. Replies leave strictly in request order,
coalesced into one write when several are ready.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import socket
import stat
import time

from smtpgate import PROTOCOL_VERSION, __version__
from smtpgate.config import Config, parse_hostport
from smtpgate.message import RequestError, validate_send
from smtpgate.protocol import ForeignProtocol, LineParser, LineTooLong, Request
from smtpgate.protocol import codes
from smtpgate.protocol.parser import reply_err, reply_ok
from smtpgate.spool import SpoolFull

VERBS = ("PING", "HELLO", "AUTH", "SEND", "STATUS", "WAIT", "STATS", "NOOP", "HELP", "QUIT")
OPEN_VERBS = frozenset({"PING", "HELLO", "HELP", "AUTH", "QUIT"})
# Replies queued but not yet written, per connection. Past this the reader
# stops reading, so a client that pipelines without reading cannot grow our
# memory without bound.
MAX_PIPELINE = 1024
MAX_WAIT_SECONDS = 3600.0
# SEND arguments above this many characters are validated in a thread.
LARGE_REQUEST = 256 * 1024
DEFAULT_WAIT_SECONDS = 30.0
_QUIT = object()


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class Intake:
    """Serves the line protocol; `start()` binds, `close()` stops accepting."""

    def __init__(self, config: Config, spool, delivery, log):
        self.config = config
        self.spool = spool
        self.delivery = delivery
        self.log = log
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[asyncio.Task] = set()
        self.accepting = True
        self.counters = {"connections": 0, "requests": 0, "sends_accepted": 0,
                         "sends_refused": 0, "foreign_protocol": 0}
        self.started = time.time()
        self.own_socket_path: str | None = None

    # -- binding ---------------------------------------------------------

    async def start(self, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        """Bind (inherited systemd sockets if any, else the configured addresses); do not serve yet.

        Serving starts with `start_serving()`, after the daemon told systemd
        READY=1: a connection already waiting in an inherited socket's backlog
        must not be served before that.
        """
        handler = self._on_connection
        opts = {"limit": 2**16, "start_serving": False}
        if inherited:
            for name, socks in inherited.items():
                if name not in ("tcp", "unix"):
                    self.log.warning("inherited_socket_unnamed", name=name,
                                     hint="set FileDescriptorName=tcp or unix in the socket unit")
                for sock in socks:
                    if sock.family == socket.AF_UNIX:
                        self.servers.append(await asyncio.start_unix_server(handler, sock=sock, **opts))
                    else:
                        self.servers.append(await asyncio.start_server(handler, sock=sock, **opts))
        else:
            for value in self.config.listen:
                host, port = parse_hostport(value, "listen")
                self.servers.append(await asyncio.start_server(
                    handler, host, port, reuse_address=True, **opts))
            if self.config.socket:
                _remove_stale_socket(self.config.socket)
                server = await asyncio.start_unix_server(handler, self.config.socket, **opts)
                os.chmod(self.config.socket, self.config.socket_mode)
                # Only a socket file we created is ours to remove at exit; an
                # inherited one belongs to systemd's socket unit.
                self.own_socket_path = self.config.socket
                self.servers.append(server)
        for server in self.servers:
            for sock in server.sockets:
                self.log.info("listening", address=_sockname(sock))

    async def start_serving(self) -> None:
        for server in self.servers:
            await server.start_serving()

    @property
    def addresses(self) -> list:
        return [sock.getsockname() for server in self.servers for sock in server.sockets]

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; give open connections `grace` seconds to finish, then cut them."""
        self.accepting = False
        for server in self.servers:
            server.close()
        if self.own_socket_path:
            try:
                os.unlink(self.own_socket_path)
            except OSError:
                pass
        if self.connections:
            _, pending = await asyncio.wait(self.connections, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    # -- one connection --------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self.connections.add(task)
        self.counters["connections"] += 1
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = writer.get_extra_info("peername") or "unix"
        try:
            if len(self.connections) > self.config.max_connections or not self.accepting:
                writer.write(reply_err(codes.BUSY, "too many connections, try again later"))
                await asyncio.wait_for(writer.drain(), 1.0)
                return
            await Connection(self, reader, writer, peer).run()
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            self.log.exception("connection_failed", peer=str(peer))
        finally:
            self.connections.discard(task)
            if writer.transport.get_write_buffer_size():
                # Replies the client never read: close() would wait for them forever.
                writer.transport.abort()
            else:
                writer.close()


class Connection:
    def __init__(self, intake: Intake, reader, writer, peer):
        self.intake = intake
        self.config = intake.config
        self.reader = reader
        self.writer = writer
        self.peer = peer
        self.parser = LineParser(max_line=self.config.max_line)
        self.authenticated = not self.config.tokens
        self.replies: asyncio.Queue = asyncio.Queue(MAX_PIPELINE)

    async def run(self) -> None:
        writer_task = asyncio.create_task(self._write_replies())
        # If the writer dies (a client that stopped reading its replies), the
        # reader may be parked on a full reply queue: end the connection.
        this = asyncio.current_task()

        def writer_done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                self.intake.log.warning("connection_cut", peer=str(self.peer),
                                        reason=f"replies not read ({type(task.exception()).__name__})")
                this.cancel()

        writer_task.add_done_callback(writer_done)
        try:
            await self._read_requests()
        finally:
            if not writer_task.done():
                await self.replies.put(_QUIT)
                try:
                    await writer_task
                except (ConnectionError, asyncio.TimeoutError):
                    pass

    async def _read_requests(self) -> None:
        config = self.config
        while True:
            # A half-sent request gets the short timeout: a slow or stalled
            # client may not pin a connection slot.
            timeout = config.request_timeout if self.parser.pending_bytes else config.idle_timeout
            try:
                # asyncio.timeout, not wait_for: wait_for wraps the read in a
                # new task, a cost paid on every request.
                async with asyncio.timeout(timeout):
                    data = await self.reader.read(65536)
            except TimeoutError:
                self.intake.log.info("connection_timeout", peer=str(self.peer),
                                     pending=self.parser.pending_bytes)
                return
            if not data:
                return
            self.parser.feed(data)
            while (event := self.parser.next_event()) is not None:
                if isinstance(event, ForeignProtocol):
                    self.intake.counters["foreign_protocol"] += 1
                    self.intake.log.warning("foreign_protocol_closed", peer=str(self.peer),
                                            start=event.line_start[:40])
                    self.writer.transport.abort()
                    return
                if isinstance(event, LineTooLong):
                    await self.replies.put(reply_err(
                        codes.TOO_LARGE, f"request line over {self.config.max_line} bytes"))
                    continue
                if not isinstance(event, Request):  # a line that is not UTF-8, etc.
                    await self.replies.put(reply_err(codes.BAD_REQUEST, str(getattr(event, "reason", "bad request line"))))
                    continue
                self.intake.counters["requests"] += 1
                if event.verb == "QUIT":
                    await self.replies.put(reply_ok("BYE"))
                    return
                await self.replies.put(self._dispatch(event))

    async def _write_replies(self) -> None:
        replies = self.replies
        while True:
            item = await replies.get()
            if item is _QUIT:
                return
            out = [await item if isinstance(item, asyncio.Future) else item]
            # Coalesce every reply that is already ready into one write.
            while not replies.empty():
                nxt = replies._queue[0]  # peek: only ready items are taken
                if nxt is _QUIT or (isinstance(nxt, asyncio.Future) and not nxt.done()):
                    break
                replies.get_nowait()
                out.append(nxt.result() if isinstance(nxt, asyncio.Future) else nxt)
            self.writer.write(b"".join(out))
            async with asyncio.timeout(self.config.request_timeout):
                await self.writer.drain()

    def _dispatch(self, req: Request):
        """Return the reply bytes, or a Future of them for verbs that must wait."""
        verb, arg = req.verb, req.arg
        if verb not in VERBS:
            return reply_err(codes.BAD_REQUEST, f"unknown verb {verb[:32]!r}; try HELP")
        if not self.authenticated and verb not in OPEN_VERBS:
            return reply_err(codes.AUTH_REQUIRED, "send AUTH <token> first")
        if verb == "PING":
            return reply_ok("PONG")
        if verb == "NOOP":
            return reply_ok()
        if verb == "HELP":
            return reply_ok(" ".join(VERBS))
        if verb == "HELLO":
            return reply_ok(f"smtpgate {PROTOCOL_VERSION} {__version__}")
        if verb == "AUTH":
            return self._auth(arg)
        if verb == "SEND":
            return asyncio.ensure_future(self._send(arg))
        if verb == "STATUS":
            return asyncio.ensure_future(self._status(arg))
        if verb == "WAIT":
            return asyncio.ensure_future(self._wait(arg))
        return asyncio.ensure_future(self._stats())

    def _auth(self, token: str | None) -> bytes:
        tokens = self.config.tokens
        if not tokens:
            self.authenticated = True
            return reply_ok()
        given = (token or "").encode()
        # Compare against every token so the time taken does not tell which
        # (or whether an early one) matched.
        matched = False
        for expected in tokens:
            matched |= hmac.compare_digest(given, expected.encode())
        if matched:
            self.authenticated = True
            return reply_ok()
        self.intake.log.warning("auth_failed", peer=str(self.peer))
        return reply_err(codes.AUTH_FAILED, "wrong token")

    async def _send(self, arg: str | None) -> bytes:
        intake = self.intake
        try:
            if len(arg or "") > LARGE_REQUEST:
                # Decoding and checking megabytes of attachments takes tens of
                # milliseconds: not on the loop, where it would stall every
                # other connection.
                spec = await asyncio.to_thread(self._validate, arg)
            else:
                spec = self._validate(arg)
        except RequestError as exc:
            intake.counters["sends_refused"] += 1
            return reply_err(exc.code, exc.text)
        try:
            msg_id, existing = await intake.spool.enqueue(
                spec.to_json(), spec.envelope_from, spec.recipients, spec.idempotency_key)
        except SpoolFull as exc:
            intake.counters["sends_refused"] += 1
            return reply_err(codes.BUSY, f"nothing stored: {exc}")
        except Exception:
            intake.log.exception("enqueue_failed")
            return reply_err(codes.INTERNAL, "nothing stored: the spool failed; see the daemon's log")
        if not existing:
            intake.counters["sends_accepted"] += 1
            intake.delivery.wake()
        return reply_ok(msg_id)

    def _validate(self, arg: str | None):
        """Parse and check a SEND argument; return its MessageSpec or raise RequestError."""
        try:
            obj = json.loads(arg or "")
        except ValueError as exc:
            raise RequestError(codes.BAD_REQUEST, f"SEND needs one JSON object: {exc}") from None
        if not isinstance(obj, dict):
            raise RequestError(codes.BAD_REQUEST, "SEND needs one JSON object")
        spec = validate_send(obj, max_message_bytes=self.config.max_message_size,
                             message_id_domain=self.config.message_id_domain or None)
        check_policy(self.config, spec)
        return spec

    async def _status(self, arg: str | None) -> bytes:
        if not arg or " " in arg:
            return reply_err(codes.BAD_REQUEST, "usage: STATUS <id>")
        state = await self.intake.spool.status(arg)
        if state is None:
            return reply_err(codes.NOT_FOUND, f"no message {arg[:64]}")
        return reply_ok(_json(state))

    async def _wait(self, arg: str | None) -> bytes:
        parts = (arg or "").split(" ")
        if not parts[0] or len(parts) > 2:
            return reply_err(codes.BAD_REQUEST, "usage: WAIT <id> [seconds]")
        seconds = DEFAULT_WAIT_SECONDS
        if len(parts) == 2:
            try:
                seconds = float(parts[1])
            except ValueError:
                return reply_err(codes.BAD_REQUEST, "WAIT seconds must be a number")
            if not 0 <= seconds <= MAX_WAIT_SECONDS:
                return reply_err(codes.BAD_REQUEST, f"WAIT seconds must be 0 to {MAX_WAIT_SECONDS:g}")
        state = await self.intake.spool.wait_final(parts[0], seconds)
        if state is None:
            return reply_err(codes.NOT_FOUND, f"no message {parts[0][:64]}")
        return reply_ok(_json(state))

    async def _stats(self) -> bytes:
        stats = dict(await self.intake.spool.stats())
        stats["version"] = __version__
        stats["protocol"] = PROTOCOL_VERSION
        stats["uptime"] = round(time.time() - self.intake.started, 3)
        stats["intake"] = dict(self.intake.counters, open_connections=len(self.intake.connections))
        return reply_ok(_json(stats))


def _address_allowed(address: str, patterns: list[str]) -> bool:
    """`patterns` holds full addresses or "@domain"; empty means everything."""
    if not patterns:
        return True
    address = address.lower()
    domain = "@" + address.rpartition("@")[2]
    return any(p.lower() in (address, domain) for p in patterns)


def check_policy(config: Config, spec) -> None:
    if not _address_allowed(spec.envelope_from, config.allowed_senders):
        raise RequestError(codes.DENIED, f"sender {spec.envelope_from} is not allowed")
    for rcpt in spec.recipients:
        if not _address_allowed(rcpt, config.allowed_recipients):
            raise RequestError(codes.DENIED, f"recipient {rcpt} is not allowed")


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead daemon; refuse to steal a live one."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"socket: {path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
    else:
        raise OSError(f"socket: another daemon is listening on {path}")
    finally:
        probe.close()


def _sockname(sock) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)
