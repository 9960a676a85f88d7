"""The line door: the line protocol over TCP and Unix sockets (PROTOCOL.md).

A SEND goes through the hand-off (handoff.py) that the SMTP door shares;
STATUS, WAIT and STATS read the spool.

Each connection is a caller (callers.py): found by its peer when it
connects (the anonymous caller of an open daemon, a Unix peer by its
uid/gid), or by its AUTH token; STATUS and WAIT answer only for the
caller's own messages, and every log line of a connection names it.

A thin asyncio layer around the sans-IO `LineParser`, written as a Protocol
with callbacks rather than streams and a task per request: the hand-off is
the product, and each task step, stream wake-up and timeout context costs
microseconds on every SEND. Requests are dispatched in arrival order (so AUTH
takes effect for the requests after it), but a SEND waits for its durable
commit concurrently with the SENDs pipelined behind it: all of them share one
group commit in the spool. Replies leave strictly in request order, coalesced
into one write when several are ready.

Limits before trust (limits.py, docs/security.md): connections are admitted
by acceptor.py; until it has authenticated, a connection's request line is
held up to SMALL_LINE bytes and a longer one closes it; the bytes of partial
lines and of SENDs until their reply count in the shared budget (plain
integer adds on the hot path); a request must be complete within
`request_timeout` of its first byte, checked by the connection's one timer.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import socket
import stat
import time

from smtpgate import PROTOCOL_VERSION, __version__
from smtpgate.config import Config, parse_hostport
from smtpgate.intake.acceptor import Acceptor, listening_sockets, unix_listening_socket
from smtpgate.intake.callers import Caller
from smtpgate.intake.handoff import Handoff
from smtpgate.intake.limits import MAX_AUTH_FAILURES, SMALL_LINE, Limits, Slot
from smtpgate.intake.peer import Peer
from smtpgate.log import sockname
from smtpgate.message.spec import RequestError
from smtpgate.protocol import (
    ForeignProtocol, LineDropped, LineParser, LineTooLong, Request, codes, reply_err, reply_ok,
)
from smtpgate.spool.ops import Enqueued, ReplyTo

OPEN_VERBS = frozenset({"PING", "HELLO", "HELP", "AUTH", "QUIT"})
# Replies queued but not yet written, per connection. Past this the reader
# stops reading, so a client that pipelines without reading cannot grow our
# memory without bound.
MAX_PIPELINE = 1024
# Connections lent to the spool's writer at once (spool/lent.py): each is a
# descriptor in the writer. Past this a connection's OKs come from the daemon.
MAX_LENT = 256
MAX_WAIT_SECONDS = 3600.0
DEFAULT_WAIT_SECONDS = 30.0
_BUDGET_FULL = "nothing stored: the daemon holds its limit of requests in flight, try again later"


def _json(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


class LineDoor:
    """Serves the line protocol; `start()` binds, `close()` stops accepting.
    SENDs go to `handoff`; STATUS, WAIT and STATS read `spool`; `limits` is
    shared with the SMTP door."""

    def __init__(self, config: Config, handoff: Handoff, spool, log, limits: Limits):
        self.config = config
        self.handoff = handoff
        self.spool = spool
        self.log = log
        self.limits = limits
        self.gate = limits.gate("line")
        self.gate.on_stress = self._stressed
        self.acceptor: Acceptor | None = None
        self.connections: set[Connection] = set()
        self.all_closed = asyncio.Event()  # set by the last connection to close after close()
        self.accepting = True
        self.counters = {"connections": 0, "requests": 0, "sends_accepted": 0,
                         "sends_refused": 0, "foreign_protocol": 0}
        self.started = time.time()
        self.own_socket_path: str | None = None
        self.waits = 0  # WAIT requests in progress
        self.lent = 0  # connections lent to the spool's writer now
        # Set by the HTTP side (http/metrics.py): each stored SEND's time
        # from its request line to its OK, observed when it is answered.
        self.handoff_seconds = None

    # -- binding ---------------------------------------------------------

    async def start(self, inherited: dict[str, list[socket.socket]] | None = None) -> None:
        """Bind (inherited systemd sockets if any, else the configured addresses); do not serve yet.

        Serving starts with `start_serving()`, after the daemon told systemd
        READY=1: a connection already waiting in an inherited socket's backlog
        must not be served before that.
        """
        socks: list[socket.socket] = []
        if inherited:
            for name, inherited_socks in inherited.items():
                if name not in ("tcp", "unix"):
                    self.log.warning("inherited_socket_unnamed", name=name,
                                     hint="set FileDescriptorName=tcp or unix in the socket unit")
                socks += inherited_socks
        else:
            try:
                for value in self.config.listen:
                    socks += listening_sockets(*parse_hostport(value, "listen"))
                if self.config.socket:
                    _remove_stale_socket(self.config.socket)
                    socks.append(unix_listening_socket(self.config.socket))
                    os.chmod(self.config.socket, self.config.socket_mode)
                    # Only a socket file we created is ours to remove at exit; an
                    # inherited one belongs to systemd's socket unit.
                    self.own_socket_path = self.config.socket
            except BaseException:
                for sock in socks:
                    sock.close()
                raise
        self.acceptor = Acceptor(socks, self.gate, lambda peer, slot: Connection(self, peer, slot),
                                 _refusal, self.log)
        for sock in socks:
            self.log.info("listening", address=sockname(sock))

    async def start_serving(self) -> None:
        await self.acceptor.start_serving()

    async def stats(self) -> dict:
        """The STATS payload (PROTOCOL.md); /metrics reads it too."""
        spool = self.spool
        stats = dict(await spool.stats())
        stats["version"] = __version__
        stats["protocol"] = PROTOCOL_VERSION
        stats["uptime"] = round(time.time() - self.started, 3)
        stats["intake"] = dict(self.counters, open_connections=len(self.connections), waits=self.waits)
        stats["limits"] = self.limits.stats()
        # Writes per commit: how well concurrent requests share fsyncs.
        stats["spool"] = {"commits": spool.commits, "operations": spool.operations}
        stats["callers"] = self.handoff.callers.stats(spool.pending, spool.caller_counters)
        return stats

    @property
    def addresses(self) -> list:
        return [sock.getsockname() for sock in self.acceptor.sockets]

    async def close(self, grace: float = 5.0) -> None:
        """Stop accepting; give open connections `grace` seconds to finish, then cut them."""
        self.accepting = False
        self.acceptor.close()
        if self.own_socket_path:
            try:
                os.unlink(self.own_socket_path)
            except OSError:
                pass
        for conn in list(self.connections):
            conn.close_when_idle()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.all_closed.wait(), grace)
        for conn in list(self.connections):
            conn.transport.abort()

    def _stressed(self) -> None:
        """Stress began: every connection's timer checks its (now shorter) limit at once."""
        now = asyncio.get_running_loop().time()
        for conn in self.connections:
            conn._arm(now)


def _refusal(why: str) -> bytes:
    return reply_err(codes.BUSY, f"{why}, try again later")


class Connection(asyncio.Protocol):
    """One client connection: parse requests, dispatch them, write replies in order."""

    def __init__(self, door: LineDoor, peer: Peer, slot: Slot):
        self.door = door
        self.config = door.config
        self.handoff = door.handoff
        self.limits = door.limits
        self.loop = asyncio.get_running_loop()
        self.peer = peer
        self.slot = slot  # our place in the door's connection count, given back at the end
        # None until identified (callers.py): only OPEN_VERBS, and a short line
        self.caller: Caller | None = door.handoff.callers.for_peer(peer)
        self.token_digest: bytes | None = None  # of the token its AUTH showed (_identify_again)
        if self.caller is not None:
            self.parser = LineParser(max_line=self.config.max_line)
        else:
            self.parser = LineParser(max_line=SMALL_LINE, drain=False)
        self.auth_failures = 0
        # One slot per request, in request order: [reply bytes or None].
        self.slots: collections.deque[list] = collections.deque()
        self.tasks: set[asyncio.Task] = set()  # STATUS/WAIT/STATS running now
        self.closing = False
        self.write_paused = False
        self.transport = None
        self.last_activity = 0.0
        self.request_started: float | None = None  # first byte of the partial request
        self.held = 0  # bytes of that partial request counted in limits.inflight
        self.timer = None
        self.timer_at = 0.0  # when `timer` fires (uvloop's Handle for a past time has no when())
        # The spool's writer answers this connection's SENDs itself while
        # their replies are the only ones waiting (spool/lent.py):
        self.lent_key: int | None = None  # the key it was lent by, once lent
        self.lend_tried = False
        self.writer_seq = 0  # the number of the last SEND the writer was to answer
        self.writer_waiting = 0  # those of them not answered yet (all at the head of `slots`)

    # -- asyncio.Protocol ------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        door = self.door
        door.counters["connections"] += 1
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        door.connections.add(self)
        self.last_activity = self.loop.time()
        self._arm(self.last_activity + door.gate.idle_timeout)
        if not door.accepting:  # accepted as the door closed
            self.close_when_idle()

    def connection_lost(self, exc) -> None:
        self.door.connections.discard(self)
        if not self.door.connections and not self.door.accepting:
            self.door.all_closed.set()
        self.slot.release()
        if self.lent_key is not None:
            self.door.spool.unlend(self.lent_key)
            self.door.lent -= 1
            self.lent_key = None
        self.limits.inflight -= self.held
        self.held = 0
        self.closing = True
        for slot in self.slots:  # coroutines never started: close them quietly
            if len(slot) > 1:
                slot.pop().close()
        # A WAIT may run for an hour: a client that hung up must not leave it
        # (and this connection) in memory that long.
        for task in self.tasks:
            task.cancel()
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        # The timer checks these stamps when it fires: cheaper than moving a
        # timer on every read.
        self.last_activity = now = self.loop.time()
        parser = self.parser
        parser.feed(data)
        if self.held:  # counted again below, as much of it as is still held
            self.limits.inflight -= self.held
            self.held = 0
        ended = False  # a line ended: what is held now is a new request
        while (event := parser.next_event()) is not None:
            ended = True
            if isinstance(event, Request):
                self.door.counters["requests"] += 1
                try:
                    self._dispatch(event)
                except Exception:  # a bug: answer it, keep the connection and the daemon serving
                    self.door.log.exception("request_failed", verb=event.verb)
                    self._reply(reply_err(codes.INTERNAL, "the daemon failed; see its log"))
            elif isinstance(event, LineTooLong):
                self._too_long(event)
            elif isinstance(event, LineDropped):
                self._reply(reply_err(codes.BUSY, _BUDGET_FULL))
            elif isinstance(event, ForeignProtocol):
                self._foreign(event)
            else:  # a line that is not UTF-8, etc.
                self._reply(reply_err(codes.BAD_REQUEST, event.reason))
            if self.closing:  # QUIT, a foreign protocol...: nothing after it is answered
                break
        self._flush()
        if self.closing:
            return
        # A client that pipelines without reading may not grow our memory
        # without bound: stop reading until replies drain.
        if len(self.slots) >= MAX_PIPELINE:
            self.transport.pause_reading()
        if parser.mid_request:
            held = parser.pending_bytes
            if held > SMALL_LINE and not self.limits.budget_allows(held):
                parser.drop_line()  # drained from now on, answered BUSY at its end
                self.limits.refuse_over_budget()
            elif held:
                self.held = held
                self.limits.inflight += held
            if ended or self.request_started is None:
                self.request_started = now
                self._arm(now + self.door.gate.request_timeout)
        else:
            self.request_started = None

    def _too_long(self, event: LineTooLong) -> None:
        if self.parser.closed:  # before AUTH: the line is not held, the connection ends
            self.limits.counters["preauth_too_long"] += 1
            if event.verb in OPEN_VERBS:  # an AUTH with a token of kilobytes, say
                self._reply(reply_err(codes.TOO_LARGE, f"request line over {SMALL_LINE} bytes before AUTH"))
            else:  # what a SEND without its AUTH gets at any length: the client says "set the token"
                self._reply(reply_err(codes.AUTH_REQUIRED, f"send AUTH <token> first (a request line over "
                                                           f"{SMALL_LINE} bytes before AUTH ends the connection)"))
            self.close_when_idle()
        else:
            self._reply(reply_err(codes.TOO_LARGE, f"request line over {self.config.max_line} bytes "
                                                   "(2 x max_message_size + 64 KiB)"))

    def _foreign(self, event: ForeignProtocol) -> None:
        """Read nothing more; answer what came before the line, then close (PROTOCOL.md)."""
        self.door.counters["foreign_protocol"] += 1
        if count := self.limits.throttle(("foreign", self.peer.key)):
            self.door.log.warning("foreign_protocol_closed", peer=str(self.peer),
                                  start=event.line_start[:40], times=count)
        self.close_when_idle()

    def eof_received(self) -> bool:
        self.close_when_idle()
        return True  # keep the write side open until the last reply is out

    def pause_writing(self) -> None:
        # The client does not read its replies: stop reading its requests.
        self.write_paused = True
        self.transport.pause_reading()
        self._arm(self.loop.time() + self.door.gate.request_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        self.last_activity = self.loop.time()
        if len(self.slots) < MAX_PIPELINE and not self.closing:
            self.transport.resume_reading()

    # -- replies, in order -------------------------------------------------

    def _reply(self, data: bytes) -> None:
        self.slots.append([data])

    def _slot(self) -> list:
        slot = [None]
        self.slots.append(slot)
        return slot

    def _fill(self, slot: list, data: bytes) -> None:
        slot[0] = data
        self._flush()

    def _flush(self) -> None:
        """Write every reply that is ready at the head of the queue, in one write."""
        slots = self.slots
        if not slots or slots[0][0] is None or self.transport.is_closing():
            return
        out = []
        while slots and slots[0][0] is not None:
            out.append(slots.popleft()[0])
        data = b"".join(out)
        if data:  # empty when the spool's writer wrote them all
            self.transport.write(data)
        if slots:
            self._start_head()
        if self.closing and not slots:
            self.transport.close()
        elif len(slots) < MAX_PIPELINE and not self.write_paused and not self.closing:
            self.transport.resume_reading()

    def close_when_idle(self) -> None:
        """Stop reading; close once every pending reply is written."""
        self.closing = True
        if self.transport.is_closing():
            return
        self.transport.pause_reading()
        if not self.slots:
            self.transport.close()

    def _arm(self, when: float) -> None:
        """Make the timer fire by `when` (it only ever moves earlier here)."""
        if self.timer is not None:
            if self.timer_at <= when:
                return
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._check_timeout)

    def _check_timeout(self) -> None:
        self.timer = None
        gate = self.door.gate  # its timeouts are shorter under stress
        since = self.last_activity
        if self.write_paused:
            limit, what = gate.request_timeout, "replies not read"
        elif self.request_started is not None:
            # A request must be whole within request_timeout of its first
            # byte, however slowly it trickles: a slow or stalled client may
            # not pin a connection slot.
            limit, what, since = gate.request_timeout, "request stalled", self.request_started
        elif self.slots:
            limit, what = None, ""  # waiting on us (a WAIT, a commit): not the client's fault
        else:
            limit, what = gate.idle_timeout, "idle"
        now = self.loop.time()
        if limit is not None and now - since >= limit:
            if what == "request stalled":
                self.limits.counters["request_timeouts"] += 1
            if count := self.limits.throttle((what, self.peer.key)):
                log = self.door.log.warning if what == "replies not read" else self.door.log.info
                log("connection_cut" if what == "replies not read" else "connection_timeout",
                    peer=str(self.peer), reason=what, pending=self.parser.pending_bytes, times=count)
            self.closing = True
            # abort, not close: close() would wait to flush replies nobody reads.
            self.transport.abort()
            return
        nxt = (since + limit) if limit is not None else now + gate.request_timeout
        self._arm(max(nxt, now + 0.01))

    def _dispatch(self, req: Request) -> None:
        """Queue the reply to one request: at once, or when its work completes."""
        handler = self.VERBS.get(req.verb)
        if handler is None:
            self._reply(reply_err(codes.BAD_REQUEST, f"unknown verb {req.verb[:32]!r}; try HELP"))
        elif (self.caller is None or self.caller.revoked) and req.verb not in OPEN_VERBS \
                and not self._identify_again():
            self._reply(reply_err(codes.AUTH_REQUIRED, "send AUTH <token> first"))
        else:
            handler(self, req.arg)

    def _identify_again(self) -> Caller | None:
        """Who the peer is now: a reload may have revoked the caller this
        connection was (gone, or its tokens or uid changed), or made its peer
        one (a new unix_user). By what it showed: the token of its AUTH, if
        still a caller's, else its peer."""
        callers = self.handoff.callers
        caller = (callers.for_digest(self.token_digest) if self.token_digest is not None else None) \
            or callers.for_peer(self.peer)
        if caller is not None:
            self._identified(caller)
        else:
            self.caller = None
        return caller

    def _identified(self, caller: Caller) -> None:
        """The connection is `caller` from now on: its lines may be as long as a SEND's."""
        self.caller = caller
        self.parser.max_line, self.parser.drain = self.config.max_line, True

    @property
    def log(self):
        """The door's log, with this connection's caller on every line
        (bound when a line is written: most connections never write one)."""
        return self.door.log.bind(caller=self.caller.name if self.caller is not None else None)

    def _later(self, coro) -> None:
        """Run a coroutine that returns the reply bytes; its reply keeps its place.

        It starts only once every request before it on this connection is
        answered: a STATS or STATUS pipelined after a SEND must see that SEND
        stored, not run ahead of its commit."""
        slot = self._slot()
        slot.append(coro)
        if len(self.slots) == 1:
            self._start_head()

    def _start_head(self) -> None:
        """Start the deferred coroutine of the slot at the head of the queue, if any."""
        slot = self.slots[0]
        if slot[0] is not None or len(slot) == 1:
            return
        task = self.loop.create_task(slot.pop())
        self.tasks.add(task)

        def done(task: asyncio.Task) -> None:
            self.tasks.discard(task)
            if task.cancelled():
                self._fill(slot, reply_err(codes.INTERNAL, "cancelled"))
            elif task.exception() is not None:
                self.log.error("request_failed", error=repr(task.exception()))
                self._fill(slot, reply_err(codes.INTERNAL, "the daemon failed; see its log"))
            else:
                self._fill(slot, task.result())

        task.add_done_callback(done)

    # -- the verbs (PROTOCOL.md): each queues its reply -------------------

    def _ping(self, arg: str | None) -> None:
        self._reply(reply_ok("PONG"))

    def _hello(self, arg: str | None) -> None:
        self._reply(reply_ok(f"smtpgate {PROTOCOL_VERSION} {__version__}"))

    def _auth(self, token: str | None) -> None:
        callers = self.handoff.callers
        # An open daemon: AUTH with anything is OK.
        digest = None if callers.anonymous else callers.digest((token or "").encode())
        caller = callers.anonymous or callers.for_digest(digest)
        if caller is not None:
            self.token_digest = digest
            self._identified(caller)
            self._reply(reply_ok())
            return
        self.auth_failures += 1
        self.limits.auth_failed("line", self.peer, self.caller.name if self.caller is not None else None)
        self._reply(reply_err(codes.AUTH_FAILED, "wrong token"))
        if self.auth_failures >= MAX_AUTH_FAILURES:  # guessing: the reply, then the close
            self.limits.counters["auth_closed"] += 1
            self.close_when_idle()

    def _send(self, arg: str | None) -> None:
        slot = self._slot()
        size = len(arg) if arg else 0
        limits = self.limits
        if limits.inflight + size > self.config.inflight_budget:
            limits.refuse_over_budget()
            self._refused(slot, RequestError(codes.BUSY, _BUDGET_FULL))
            return
        limits.inflight += size  # until the reply: the request and what is made of it
        start = time.monotonic() if self.door.handoff_seconds is not None else 0.0
        reply_to = self._writer_replies()
        try:
            self.handoff.take_send(self.caller, arg, lambda result: self._sent(slot, result, size, start, reply_to),
                                   reply_to)
        except BaseException as exc:
            limits.inflight -= size
            if reply_to is not None:  # never reached the writer
                self.writer_waiting -= 1
                self.writer_seq -= 1
            if not isinstance(exc, RequestError):  # a bug: data_received answers it in this slot's place
                self.slots.pop()
                raise
            self._refused(slot, exc)  # written with the other replies to this read

    def _writer_replies(self) -> ReplyTo | None:
        """Where the spool's writer is to write this SEND's OK itself
        (spool/lent.py), or None: the daemon writes it. Only while every
        reply before it is the writer's too and none waits in our buffer.
        Never for a caller with a rate: the caller has its OK before the
        daemon reads the outcome, and a repeat (which does not count) must
        have given its share of the rate back before the next SEND is
        admitted."""
        caller = self.caller
        if self.writer_waiting != len(self.slots) - 1 or self.write_paused \
                or caller.per_minute is not None or caller.per_day is not None \
                or self.transport.get_write_buffer_size():
            return None
        if self.lent_key is None:
            door = self.door
            if self.lend_tried or door.lent >= MAX_LENT:
                return None
            self.lend_tried = True
            sock = self.transport.get_extra_info("socket")
            if sock is None or (key := door.spool.lend(sock.fileno())) is None:
                return None
            self.lent_key = key
            door.lent += 1
        after = self.writer_seq if self.writer_waiting else 0
        self.writer_seq += 1
        self.writer_waiting += 1
        return ReplyTo(self.lent_key, self.writer_seq, after)

    def _sent(self, slot: list, result: Enqueued | RequestError, size: int, start: float,
              reply_to: ReplyTo | None) -> None:
        """The hand-off's outcome: OK <id> once durable, or why nothing was stored."""
        self.limits.inflight -= size
        if reply_to is not None:
            self.writer_waiting -= 1
        if isinstance(result, RequestError):
            if reply_to is not None and self.door.spool.writer_lost:
                # The writer died: it may have written this OK before. No
                # reply is true now ("nothing stored" may not be): the caller
                # sees the connection cut, an unknown outcome, as on a crash.
                self.closing = True
                self.transport.abort()
                return
            self._refused(slot, result)
            self._flush()
            return
        if not result.existing:
            self.door.counters["sends_accepted"] += 1
        if start:
            self.door.handoff_seconds.observe(time.monotonic() - start)
        # What the writer did not write of it, if it was to write it.
        self._fill(slot, reply_ok(result.id)[result.sent:])

    def _refused(self, slot: list, exc: RequestError) -> None:
        self.door.counters["sends_refused"] += 1
        slot[0] = reply_err(exc.code, exc.text)

    # STATUS and WAIT take the caller as it is now: an AUTH pipelined
    # behind them must not change whose message they may see.
    def _status(self, arg: str | None) -> None:
        self._later(self._status_reply(arg, self.caller.name))

    def _wait(self, arg: str | None) -> None:
        self._later(self._wait_reply(arg, self.caller.name))

    def _stats(self, arg: str | None) -> None:
        self._later(self._stats_reply())

    def _noop(self, arg: str | None) -> None:
        self._reply(reply_ok())

    def _help(self, arg: str | None) -> None:
        self._reply(reply_ok(" ".join(self.VERBS)))

    def _quit(self, arg: str | None) -> None:
        self._reply(reply_ok("BYE"))
        self.closing = True
        self.transport.pause_reading()

    # The verbs and their handlers, in the order HELP lists them.
    VERBS = {"PING": _ping, "HELLO": _hello, "AUTH": _auth, "SEND": _send, "STATUS": _status,
             "WAIT": _wait, "STATS": _stats, "NOOP": _noop, "HELP": _help, "QUIT": _quit}

    async def _status_reply(self, arg: str | None, caller: str) -> bytes:
        if not arg or " " in arg:
            return reply_err(codes.BAD_REQUEST, "usage: STATUS <id>")
        state = await self.door.spool.status(arg, caller)
        if state is None:  # no such id, or another caller's: the same answer
            return reply_err(codes.NOT_FOUND, f"no message {arg[:64]}")
        return reply_ok(_json(state))

    async def _wait_reply(self, arg: str | None, caller: str) -> bytes:
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
        self.door.waits += 1
        try:
            state = await self.door.spool.wait_final(parts[0], seconds, caller)
        finally:
            self.door.waits -= 1
        if (self.caller is None or self.caller.revoked) and \
                (self._identify_again() is None or self.caller.name != caller):
            # A reload during the wait took the caller's access away (its
            # token rotated out, say): the answer is not its to have any more.
            return reply_err(codes.AUTH_REQUIRED, "send AUTH <token> first")
        if state is None:
            return reply_err(codes.NOT_FOUND, f"no message {parts[0][:64]}")
        return reply_ok(_json(state))

    async def _stats_reply(self) -> bytes:
        return reply_ok(_json(await self.door.stats()))


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
