"""Delivery in a child process ('smtpgate-relay' in ps).

Why: the daemon's event loop is one Python thread. Running delivery on it
(building each message, the SMTP exchange) cost about 175 us of its CPU
per message, twice what the intake of that message costs, so while the
daemon relayed, every SEND waited behind deliveries and end-to-end
throughput stopped where that one thread did. In a process of its own,
delivery runs on whatever core is free, and the loop keeps only the
intake and the spool's bookkeeping.

    daemon (intake, spool) <-- pipes --> smtpgate-relay (scheduler.Delivery)
                                         claims, attempt records, releases,
                                         next_due go back as calls

The child runs the very same `Delivery` (scheduler, workers, pools, rate
limits) as a daemon without this process would; only its spool is a
stand-in (`SpoolCalls`) whose operations the daemon answers with the real
spool. Beside it runs the webhook sender (webhooks/sender.py), the same
kind of background work: on the daemon's loop it cost intake about 120 us
of CPU per event; here it shares the relay's nice level, its spool calls
and its supervision (a lost child stops the daemon, status 70).
Messages on the pipe (named types, each side dispatching on the
type with a table):
- daemon -> child: `Start`, `Wake`, `ProbeNow`, `Reload`, `Stop`,
  `StopNow`, the `Answer`s to its calls, and each message intake stored
  already claimed ('sending'), on room of a `Want`, as its own `Claimed`
  (no message around it: one object less to pickle per relayed message).
- child -> daemon: `Started`, `Want`, `Sessions`, `Figures`, and `Call`s of the spool operations
  `ClaimDue`, `RecordAttempts` (its attempt records, which the daemon passes
  to the writer unread), `Release`, `RecordUpstreams`, `Expire`,
  `NextDue`, `CountDue`, and the sender's `WebhookDone`, `WebhookRetry`
  (spool/ops.py); after `Stop`, the end of its output says
  its Delivery and sender have stopped.
The child ignores signals (the daemon decides), and exits when its stdin
ends: a daemon killed with -9 takes its deliveries with it, and the
messages they had claimed are 'sending' until the next start puts them
back to 'queued' (at-least-once); the events being sent stay in the
outbox and are sent again (at least once).
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import time
from typing import Any, Callable, NamedTuple

from smtpgate.delivery.figures import DeliveryFigures
from smtpgate.delivery.health import DOWN
from smtpgate.log import get_logger, json_line, setup_logging
from smtpgate.proc.calls import Answer, Call, PendingCalls
from smtpgate.proc.child import become_child, spawn
from smtpgate.proc.framing import message, pack
from smtpgate.proc.pipe import FramedPipe
from smtpgate.proc.policy import IdleSwitch, threads_of
from smtpgate.spool.errors import SpoolError
from smtpgate.spool.ops import (
    Claimed, ClaimDue, CountDue, Expire, NextDue, RecordAttempt, RecordAttempts, RecordUpstreams, Release,
    UpstreamRow, WebhookDone, WebhookRetry,
)
from smtpgate.spool.store import Spool

# Beyond the grace period, what a stopping child may take: its QUITs
# (pool.QUIT_TIMEOUT) and the last records.
STOP_MARGIN = 15.0  # seconds

# Attempt records wait this long in the child and go to the daemon together
# (one Call, one writer operation): while relaying, a record per message
# cost the daemon a pipe message each way and the writer a transaction
# beside the SENDs' (issue 15). A crash loses at most these: their messages
# stay 'sending' and are sent again after the restart (at-least-once).
RECORD_EVERY = 0.003  # seconds

# While intake is light the child runs at SCHED_IDLE (proc/policy.py): a
# lone caller's SEND then never waits for a CPU behind delivery. Light: at
# most this many messages claimed at enqueue and not yet recorded, a lone
# caller's (those of the last RECORD_EVERY, about 5 at 1,700 SENDs/s, and
# the one being sent). Past it, or when messages are stored 'queued' for
# the child to claim (Wake: intake outran the room, or an upstream is
# down), it is back at the normal policy, at its nice, and stays there
# until HEAVY_FOR has passed without a Wake: the messages it claims itself
# are not in the count.
LIGHT_CLAIMS = 8
HEAVY_FOR = 1.0  # seconds
# A thread the child starts takes the policy of the thread that starts it;
# one started just as its policy changes may miss the change (its pool
# opens its first connections, and their name lookups start threads, just
# after Started), so while relaying the policy is set again on every thread
# at most this often.
POLICY_AGAIN = 1.0  # seconds


def light(in_flight: int, since_wake: float) -> bool:
    """Whether intake is light for delivery: `in_flight` messages claimed at
    enqueue and not yet recorded, `since_wake` seconds since the last Wake."""
    return in_flight <= LIGHT_CLAIMS and since_wake > HEAVY_FOR


# The child's counts of SMTP sessions, and of what its attempts tell
# /metrics (Figures), go to the daemon at most this often (a scrape every
# 15 s needs no more): nothing is sent per message.
SESSIONS_EVERY = 1.0  # seconds


@message
class Start(NamedTuple):
    """Set up logging, start a Delivery with `settings`; answered by `Started`."""

    settings: Any  # delivery.settings.DeliverySettings
    log_format: str
    log_level: str
    spool_dir: str  # where the record of final dots goes (spool/dots.py)


@message
class Started(NamedTuple):
    pass


@message
class Wake(NamedTuple):
    """Something was enqueued: look at the spool now."""


@message
class Want(NamedTuple):
    """Delivery has room for `n` more messages claimed at enqueue."""

    n: int


@message
class Sessions(NamedTuple):
    """SMTP sessions since the last `Sessions`, per (upstream, reason):
    reason None for those set up, a health.REASONS word for those that
    could not be (probes included)."""

    counts: dict[tuple[str, str | None], int]


@message
class Figures(NamedTuple):
    """What the attempts recorded since the last `Figures` tell /metrics
    (delivery/figures.py), while the HTTP side runs."""

    counted: DeliveryFigures


@message
class ProbeNow(NamedTuple):
    """Probe every down upstream at once (`smtpgate queue retry`)."""


@message
class Reload(NamedTuple):
    settings: Any


@message
class Stop(NamedTuple):
    """Stop the Delivery (in-flight messages get `grace` seconds), then end the output."""

    grace: float


@message
class StopNow(NamedTuple):
    """During a Stop: interrupt the deliveries it waits for (a second SIGTERM)."""


class DeliveryProcess:
    """The daemon's handle on delivery in a child process: the interface of
    scheduler.Delivery (start, wake, reload, stop)."""

    def __init__(self, spool: Spool, settings, log, *, log_format: str, log_level: str,
                 on_lost: Callable[[str], None] | None = None, loop: str = "asyncio"):
        self._spool = spool
        self._loop_name = loop  # the child runs the daemon's kind of event loop (eventloop.py)
        self._settings = settings
        self._log = log
        self._log_setup = (log_format, log_level)
        self._on_lost = on_lost
        self._process: subprocess.Popen | None = None
        self._pipe: FramedPipe | None = None
        self._started: asyncio.Future | None = None
        self._stopping = False
        self._interrupt = False  # stop_now() was asked for
        self._woken = False
        self._handlers = {Started: self._on_started, Call: self._on_call, Want: self._on_want,
                          Sessions: self._on_sessions, Figures: self._on_figures}
        # The child's `Figures`, added up since start (/metrics).
        self.figures = DeliveryFigures()
        # The child's `Sessions`, added up since start: (upstream, reason) -> count.
        self.sessions: dict[tuple[str, str | None], int] = {}
        # Claim at enqueue: the room delivery offered (Want) and intake has
        # not used, and whether every upstream is down (then nothing is
        # claimed at enqueue: the outage holds new messages with the rest).
        self._room = 0
        self._all_down = False
        # While it has at most LIGHT_CLAIMS of them in flight, the child runs at
        # SCHED_IDLE (proc/policy.py): the whole of its room, less the room
        # left, is what it has in flight.
        self._whole_room = 0
        self._policy: IdleSwitch | None = None  # once started
        self._woken_at = float("-inf")  # monotonic time of the last Wake
        # What the child may ask of the spool: the part of Spool that Delivery uses.
        self._spool_calls = {ClaimDue: self._write, RecordAttempts: self._write, Release: self._write,
                             RecordUpstreams: self._write, Expire: self._write,
                             NextDue: self._next_due, CountDue: self._count_due,
                             WebhookDone: self._write, WebhookRetry: self._write}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = self._interrupt = False
        self._process = await loop.run_in_executor(
            None, functools.partial(spawn, "smtpgate.delivery", args=(self._loop_name,)))
        self._started = loop.create_future()
        self._pipe = FramedPipe(self._on_message, self._on_eof)
        await self._pipe.open(self._process.stdout, self._process.stdin)
        self._whole_room, self._policy = 0, None
        self._pipe.send(Start(self._settings, *self._log_setup, self._spool.path_dir))
        await self._started

    def wake(self) -> None:
        """Something was enqueued: one wake-up per turn of the loop is enough."""
        if self._pipe is None or self._stopping or self._woken:
            return
        self._woken = True
        self._woken_at = time.monotonic()
        self._idle(False)  # messages stored 'queued': the child claims them itself
        self._pipe.send(Wake())
        asyncio.get_running_loop().call_soon(self._rearm)

    def _rearm(self) -> None:
        self._woken = False

    def reserve(self) -> bool:
        """True when the SEND about to be stored is to be claimed by its own
        commit (`Spool.enqueue(claim=True)`), on room delivery offered;
        then `hand_over` or `give_back` follows."""
        if self._room <= 0 or self._all_down or self._stopping or self._pipe is None:
            return False
        self._room -= 1
        if self._whole_room - self._room > LIGHT_CLAIMS:
            self._idle(False)
        return True

    def give_back(self) -> None:
        """The reserved SEND stored nothing new (refused, or a repeat)."""
        self._room += 1

    def hand_over(self, message: Claimed) -> None:
        """Pass a message stored claimed to delivery. If delivery is stopping
        meanwhile, the message goes back to 'queued' for the next start."""
        if self._pipe is None or self._stopping:
            self._spool.submit(Release([message.id], False))
            return
        self._pipe.send(message)

    def _on_want(self, want: Want) -> None:
        self._room += want.n
        self._whole_room = max(self._whole_room, self._room)
        if self._light():
            self._idle(True)

    def _light(self) -> bool:
        return light(self._whole_room - self._room, time.monotonic() - self._woken_at)

    def _idle(self, idle: bool) -> None:
        """The child's threads to SCHED_IDLE, or back. The daemon decides:
        a child starved at SCHED_IDLE would not run to set itself back."""
        if self._policy is not None:
            self._policy.set(idle, time.monotonic())

    def _on_sessions(self, sessions: Sessions) -> None:
        for key, n in sessions.counts.items():
            self.sessions[key] = self.sessions.get(key, 0) + n

    def _on_figures(self, figures: Figures) -> None:
        self.figures.add(figures.counted)

    def probe_now(self) -> None:
        """Probe every down upstream at once."""
        if self._pipe is not None and not self._stopping:
            self._pipe.send(ProbeNow())

    def stop_now(self) -> None:
        """Interrupt the deliveries that stop() waits for (or will): their
        messages stay queued."""
        self._interrupt = True
        if self._pipe is not None and self._stopping:
            self._pipe.send(StopNow())

    def reload(self, settings) -> None:
        self._settings = settings
        if self._pipe is not None and not self._stopping:
            self._pipe.send(Reload(settings))

    async def stop(self, grace: float) -> None:
        """The child stops its Delivery (in-flight messages get `grace`
        seconds, the rest goes back to 'queued' through our spool) and exits."""
        process, pipe = self._process, self._pipe
        if process is None:
            return
        self._stopping = True
        self._room = 0
        pipe.send(Stop(grace))
        if self._interrupt:
            pipe.send(StopNow())
        try:
            # The child ends its output once its Delivery stopped: in-flight
            # messages within `grace`, then QUIT to the pooled connections.
            await asyncio.wait_for(asyncio.shield(pipe.closed), grace + STOP_MARGIN)
        except asyncio.TimeoutError:
            self._log.error("delivery_process_stuck", note="killed; its claimed messages stay queued")
            process.kill()
        pipe.close_write()  # not before: its last releases and records need our answers
        await asyncio.get_running_loop().run_in_executor(None, process.wait)
        process.stdout.close()
        self._process = self._pipe = None

    # --- the child's messages -------------------------------------------------

    def _on_message(self, message) -> None:
        self._handlers[type(message)](message)

    def _on_started(self, _: Started) -> None:
        if not self._started.done():
            self._started.set_result(None)
        # Not before: threads it starts while it starts up could miss a change.
        process = self._process
        self._policy = IdleSwitch(lambda: threads_of(process.pid), again=POLICY_AGAIN)
        self._idle(self._light())

    def _on_call(self, call: Call) -> None:
        if type(call.op) is RecordUpstreams:
            self._all_down = bool(call.op.rows) and all(row.state == DOWN for row in call.op.rows)
        run = self._spool_calls.get(type(call.op))
        try:
            if run is None:
                raise SpoolError(f"not a spool call: {type(call.op).__name__}")
            result = run(call.op)
        except Exception as exc:
            self._answer(call.token, None, exc)
            return
        result.add_done_callback(lambda done: self._answer_from(call.token, done))

    @property
    def alive(self) -> bool:
        """Whether the child runs and is not stopping (/healthz)."""
        return self._process is not None and not self._stopping and self._process.poll() is None

    def _write(self, op) -> asyncio.Future:
        return self._spool.submit(op)

    def _next_due(self, _: NextDue) -> asyncio.Future:
        return asyncio.ensure_future(self._spool.next_due())

    def _count_due(self, op: CountDue) -> asyncio.Future:
        return asyncio.ensure_future(self._spool.count_due(op.now))

    def _answer_from(self, token: int, done: asyncio.Future) -> None:
        if done.cancelled():
            self._answer(token, None, SpoolError("cancelled"))
        else:
            self._answer(token, None if done.exception() else done.result(), done.exception())

    def _answer(self, token: int, value, error: BaseException | None) -> None:
        if error is not None and not isinstance(error, SpoolError):
            error = SpoolError(repr(error))  # only our own errors cross the pipe
        if self._pipe is not None:
            self._pipe.send(Answer(token, value, error))

    def _on_eof(self) -> None:
        if not self._started.done():
            # An OSError: the daemon's start fails with EX_OSERR, as for a
            # process or socket the system would not give us.
            self._started.set_exception(ChildProcessError("the delivery process did not start; see the log"))
        if self._stopping:
            return
        code = self._process.poll() if self._process is not None else None
        why = f"the delivery process exited unexpectedly (status {code})"
        self._log.error("delivery_process_lost", error=why)
        if self._on_lost is not None:
            self._on_lost(why)


# --- the child -----------------------------------------------------------------


class SpoolCalls:
    """The child's spool: the operations Delivery uses, answered by the daemon."""

    def __init__(self, send: Callable[[Call], None], loop: asyncio.AbstractEventLoop,
                 before_records: Callable[[], None] = lambda: None):
        self._send = send
        self._loop = loop
        self._calls = PendingCalls(loop)
        self._records: list[tuple[RecordAttempt, asyncio.Future]] = []  # until RECORD_EVERY is over
        self._before_records = before_records  # called just before the records go, in their frame
        # Told of each attempt the spool has stored, with its message's new
        # state (None: deleted meanwhile): the figures of /metrics.
        self.on_recorded: Callable[[RecordAttempt, str | None], None] | None = None

    @property
    def records_waiting(self) -> bool:
        """Whether attempt records wait for RECORD_EVERY to be over."""
        return bool(self._records)

    def _call(self, op) -> asyncio.Future:
        call, fut = self._calls.new(op)
        self._send(call)
        return fut

    async def claim_due(self, now: float, limit: int) -> list[Claimed]:
        return await self._call(ClaimDue(now, limit))

    def record_attempt(self, msg_id, outcomes, *, next_attempt=None, possible_duplicate=False, upstream=None,
                       reason=None) -> asyncio.Future:
        record = RecordAttempt(time.time(), msg_id, list(outcomes), next_attempt, possible_duplicate, upstream, reason)
        fut = self._loop.create_future()
        self._records.append((record, fut))
        if len(self._records) == 1:
            self._loop.call_later(RECORD_EVERY, self._send_records)
        return fut

    def _send_records(self) -> None:
        self._before_records()
        records, self._records = self._records, []
        sent = self._call(RecordAttempts(pack([record for record, _ in records])))
        sent.add_done_callback(lambda done: self._recorded(done, records))

    def _recorded(self, done: asyncio.Future, records: list[tuple[RecordAttempt, asyncio.Future]]) -> None:
        """Each record's future gets its own state, or the operation's error."""
        error = done.exception() if not done.cancelled() else SpoolError("cancelled")
        for i, (_, fut) in enumerate(records):
            if fut.done():
                continue
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(done.result()[i])
        # Counted once every attempt has its state: a fault in the figures
        # then costs /metrics a count, never delivery a record's answer.
        if error is None and self.on_recorded is not None:
            for (record, _), state in zip(records, done.result(), strict=True):
                self.on_recorded(record, state)

    async def release(self, msg_ids, possible_duplicate: bool = False) -> int:
        return await self._call(Release(list(msg_ids), possible_duplicate))

    def record_upstreams(self, rows: list[UpstreamRow]) -> asyncio.Future:
        return self._call(RecordUpstreams(list(rows)))

    async def expire(self, created_before: float, reply: str) -> int:
        return await self._call(Expire(time.time(), created_before, reply))

    async def next_due(self) -> float | None:
        return await self._call(NextDue())

    async def count_due(self, now: float) -> int:
        return await self._call(CountDue(now))

    def webhook_done(self, events: list[tuple[int, str, bool]]) -> asyncio.Future:
        """Outbox events (seq, message_id, delivered) were delivered (2xx) or
        given up: delete them; the next event of each one's message becomes due."""
        return self._call(WebhookDone(list(events)))

    def webhook_retry(self, next_attempt: float, events: list[tuple[int, str]], error: str | None) -> asyncio.Future:
        """Try outbox events (seq, message_id) again at `next_attempt`:
        after a failed try (`error`), or held while their receiver is down."""
        return self._call(WebhookRetry(next_attempt, list(events), error))

    def answer(self, answer: Answer) -> None:
        self._calls.resolve(answer.token, answer.value, answer.error)


class _Relay:
    """The child's side of the pipe: a Delivery run on the daemon's orders."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()  # set when the child may exit
        self.delivery = None
        self.webhooks = None
        self.pipe = FramedPipe(self.on_message, self.on_eof)
        self.spool = SpoolCalls(self.pipe.send, loop, before_records=self._send_room)
        self._room = 0  # room for messages claimed at enqueue, not yet offered (Want)
        self.sessions: dict[tuple[str, str | None], int] = {}  # since the last Sessions sent
        self.figures = DeliveryFigures()  # since the last Figures sent
        self.handlers = {Start: self.start, Wake: self.wake, Claimed: self.deliver, ProbeNow: self.probe_now,
                         Reload: self.reload, Stop: self.stop, StopNow: self.stop_now, Answer: self.spool.answer}

    def on_message(self, message) -> None:
        self.handlers[type(message)](message)

    def start(self, start: Start) -> None:
        asyncio.ensure_future(self._start(start))

    async def _start(self, start: Start) -> None:
        from smtpgate.delivery.scheduler import Delivery  # the daemon, importing this module, needs none of it
        from smtpgate.spool.dots import DotLog
        from smtpgate.spool.schema import DB_FILE
        from smtpgate.webhooks.sender import OutboxReader, WebhookSender

        setup_logging(start.log_format, start.log_level)
        # A caller waits for its SEND's reply, nobody waits for a relay by
        # the millisecond: on 2 cores busy relaying, the daemon waited ~250
        # us per SEND on the run queue behind this process; at +10 (CFS
        # weight 110 against 1024) about 25 us (issue 15; bench/results.md).
        # Not SCHED_IDLE for good: that starves delivery whenever intake is
        # busy; the daemon sets it while intake is light (LIGHT_CLAIMS).
        try:
            if start.settings.nice:
                os.nice(start.settings.nice)
        except OSError as exc:  # a system call filter without setpriority: delivery runs as intake
            get_logger().warning("delivery_nice_not_applied", nice=start.settings.nice, error=str(exc))
        if start.settings.figures:
            self.spool.on_recorded = self.count_attempt
        try:
            self.delivery = Delivery(self.spool, start.settings, get_logger(), dots=DotLog(start.spool_dir),
                                     offer=self.offer, on_session=self.count_session,
                                     attempt_line=json_line("delivery_attempt"))
            await self.delivery.start()
            if start.settings.webhooks is not None:
                reader = OutboxReader(os.path.join(start.spool_dir, DB_FILE))
                self.webhooks = WebhookSender(self.spool, reader, start.settings.webhooks, get_logger())
                self.webhooks.start()
        except Exception:
            get_logger().exception("delivery_start_failed")
            self.done.set_result(None)  # the daemon sees our end and does not start
            return
        self.pipe.send(Started())

    def count_session(self, upstream: str, reason: str | None) -> None:
        """A session set up, or not (pool.py): sent with the others in SESSIONS_EVERY."""
        if not self.sessions:
            asyncio.get_running_loop().call_later(SESSIONS_EVERY, self.send_sessions)
        key = (upstream, reason)
        self.sessions[key] = self.sessions.get(key, 0) + 1

    def send_sessions(self) -> None:
        if self.sessions:
            sessions, self.sessions = self.sessions, {}
            self.pipe.send(Sessions(sessions))

    def count_attempt(self, record: RecordAttempt, state: str | None) -> None:
        """An attempt the spool has stored: counted for /metrics, and sent
        with the others of SESSIONS_EVERY (the daemon's loop counts nothing
        per relayed message)."""
        if not self.figures.attempts:
            asyncio.get_running_loop().call_later(SESSIONS_EVERY, self.send_figures)
        self.figures.record(record, state)

    def send_figures(self) -> None:
        if self.figures.attempts:
            figures, self.figures = self.figures, DeliveryFigures()
            self.pipe.send(Figures(figures))

    def offer(self, n: int) -> None:
        """Room for `n` more messages claimed at enqueue. Room an attempt
        gives back goes to the daemon just before that attempt's record, in
        the same frame (SpoolCalls, RECORD_EVERY), so the room is there by
        the time WAIT sees the outcome: one Want per frame of records
        instead of a pipe write (and a wake-up of the daemon) per message."""
        self._room += n
        if not self.spool.records_waiting:
            self._send_room()

    def _send_room(self) -> None:
        if self._room:
            self.pipe.send(Want(self._room))
            self._room = 0

    def wake(self, _: Wake) -> None:
        if self.delivery is not None:
            self.delivery.wake()

    def deliver(self, message: Claimed) -> None:
        self.delivery.take(message)  # room is offered only once delivery started

    def probe_now(self, _: ProbeNow) -> None:
        if self.delivery is not None:
            self.delivery.probe_now()

    def reload(self, reload: Reload) -> None:
        if self.delivery is not None:
            self.delivery.reload(reload.settings)
        if self.webhooks is not None and reload.settings.webhooks is not None:
            self.webhooks.reload(reload.settings.webhooks)

    def stop(self, stop: Stop) -> None:
        asyncio.ensure_future(self._stop(stop.grace))

    def stop_now(self, _: StopNow) -> None:
        if self.delivery is not None:
            self.delivery.stop_now()

    async def _stop(self, grace: float) -> None:
        try:
            if self.webhooks is not None:
                await self.webhooks.stop()  # its last outcomes are sent before our end
            if self.delivery is not None:
                await self.delivery.stop(grace)
            self.send_sessions()  # before the end of our output
            self.send_figures()
        except Exception:  # e.g. the spool failed: what is unrecorded stays 'sending' until restart
            get_logger().exception("delivery_stop_failed")
        finally:
            self.pipe.close_write()
            if not self.done.done():
                self.done.set_result(None)

    def on_eof(self) -> None:
        # The daemon closes its end only after ours (stop), so it died: no
        # outcome can be recorded any more, and a cancelled delivery would
        # wait for the daemon to answer its release. Leave at once; the
        # messages in flight stay 'sending' until the next start puts them
        # back to 'queued' (at-least-once).
        os._exit(0)


async def _child(in_fd: int, out_fd: int) -> None:
    relay = _Relay()
    await relay.pipe.open(os.fdopen(in_fd, "rb", buffering=0), os.fdopen(out_fd, "wb", buffering=0))
    await relay.done


def main(argv: list[str]) -> int:
    """argv: the event loop to run ("uvloop" or "asyncio"; eventloop.py), as the daemon's."""
    from smtpgate.eventloop import run

    pipe_in, pipe_out = become_child("smtpgate-relay")
    run(_child(pipe_in, pipe_out), argv[0] if argv else "asyncio")
    return 0
