"""The webhook sender: POSTs the events of the spool's outbox
(spool/outbox.py) to their callers' URLs, signed (signing.py), until each
is answered 2xx or given up after `webhook_retry_for`.

It runs in the delivery process (smtpgate-relay, delivery/process.py),
beside delivery: like a relay, an event is background work that nobody
waits for by the millisecond, and on the daemon's loop it cost intake
about 120 us of CPU per event (bench/results.md, "Delivery webhooks").
It reads the outbox itself (OutboxReader: a read-only connection in a
thread of its own), a page of at most WINDOW events at a time (so a
receiver that is down costs rows on disk, not memory; after a page that
held every due event, READ_PAUSE before the next), making there the
payloads of `message.sent` and `message.failed` from their messages' rows
(spool/outbox.py: not the writer, on every message's path), sends those
of one receiver pipelined on a connection (PIPELINE; CONNECTIONS at
most to one receiver), and writes every
outcome back through the relay's spool calls, which the daemon passes to
the spool's one writer (no fsync: losing one in a power cut only sends an
event again), the 2xx answers of SETTLE seconds in one operation: the
daemon's loop sees one message per SETTLE, not one per event. At least
once and in order per message: an event is deleted only after a 2xx, and
only the first event of a message is ever due.

A receiver that fails is "down" until a backoff passes (RETRY_BASE doubling
to RETRY_MAX, with jitter; longer if it sent Retry-After): its events found
due meanwhile are moved to that time without a request, and the first page
due then probes it. Standard Webhooks, "Delivery success and failure": 2xx
is success, a redirect is a failure (not followed), 410 Gone gives the event
up at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import functools
import os
import random
import re
import sqlite3
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, NamedTuple

from smtpgate import __version__
from smtpgate.delivery.retry import retry_delay
from smtpgate.spool import outbox
from smtpgate.spool.errors import SpoolError
from smtpgate.spool.outbox import OutboxEvent
from smtpgate.webhooks import signing
from smtpgate.webhooks.client import Answer, Client

if TYPE_CHECKING:
    from smtpgate.config import Config

# Events read per page, and in flight at once (sent, or read and waiting
# for a connection): what a receiver that is down can cost in memory. 64,
# not 16: a read and a pipeline cost about the same for 16 events as for
# 64, so the sender's CPU per event fell by a third to a half with a
# backlog (bench/webhook_sender.py: 67-82 -> 36-44 us alone; in place, at
# 16 connections relaying, the delivery process's extra per event 63 ->
# 43 us; bench/results.md, issue 12, 2026-12-07, morning 3).
WINDOW = 64
# Requests pipelined on one connection (RFC 9112 section 9.3.2): one write
# and a read or two for all of them instead of each: the sender's CPU per
# event halved at saturation (bench/results.md, "Webhooks pipelined"). Half
# the window: the next page is read and sent while the other half is answered.
# A receiver answers a connection's requests one after the other, so a slow
# one would be slower still: a pipeline is cut to what the receiver answers
# in about PIPELINE_SPAN seconds at its pace (the time between two answers
# of one pipeline: not our own wait for the CPU, which delays the reads of
# all of them alike), down to 2 per connection (its pace is still seen).
# 20 ms, not less: on a busy machine a fast receiver's answers come 1-2 ms
# apart (its own wait for a CPU), and a 5 ms span cut the depth to 2-3 just
# when the machine was busiest: the CPU per event rose most of the way back
# to one request per write (bench/results.md, "The night's main").
PIPELINE = WINDOW // 2
# A receiver not yet timed (the first pipeline after a start) gets this many:
# every request of a pipeline carries the timestamp of its start, and 32
# answers at up to webhook_timeout (15 s) each would take the last ones
# past the 5 minutes a verifier tolerates; 8 stay within 2 minutes.
UNTIMED_DEPTH = 8
# Connections to one receiver at once: a slow one gets at most 16 requests
# at once (2 on each), the most it got before the window grew; what the
# window holds beyond that waits in memory for a connection.
CONNECTIONS = 8
PIPELINE_SPAN = 0.02
POLL = 1.0  # seconds between two reads of the outbox when nothing woke the sender
# Seconds after a read that found every due event (less than a page)
# before the next: woken at each answer and each settle, the sender read
# again at once, and under a steady stream of mail its pages held an event
# or two, each read, pipeline and settle paid for that few. Paced at 1,500
# SENDs/s, the delivery process's CPU per event fell from 82-104 to 23-61
# us, the receiver's by half, and the hand-off's p99 went from 1.16-1.51 to
# 1.17-1.31 times its figure without webhooks (bench/results.md, issue 12,
# session 30). A backlog is read as fast as the window frees: a full page
# waits for nothing.
READ_PAUSE = 0.05
# A receiver that holds half the window or more and has answered nothing for
# SLOW_AFTER seconds, or would take that long to answer what it holds at
# its pace (it answers 2xx, but in seconds), is slow: its events
# in flight no longer count against the window, and its other due events
# wait SLOW_HOLD seconds in the outbox (held as a down receiver's are), so
# that the other receivers' events, read after them in next_attempt order,
# are not held up behind its backlog.
SLOW_AFTER = 5.0
SLOW_HOLD = 5.0
RETRY_BASE = 5.0  # seconds before the first retry of a failed receiver
RETRY_MAX = 1800.0
SHOWN_REPLY = 200  # bytes of a failed receiver's body shown in the log
# Seconds the 2xx answers gather before one write to the spool: each write
# wakes the writer process, about as costly as the POST itself
# (bench/results.md, "Delivery webhooks"); the next event of those
# messages waits as long.
SETTLE = 0.02
# The CPU counts as contended while more than BUSY of the time some
# runnable task waited for one (the kernel's pressure stall information):
# then the sender reads only the events older than `webhook_yield_for`
# (10 s): through a burst, the hand-offs and the mail go first and the
# events after them, seconds late; a load that lasts longer gets its events
# that late. At 16 connections relaying, intake took 0.93 of its SENDs/s
# without webhooks while no event was sent and 0.84 while they were
# (bench/results.md, issue 12, 2026-12-07, morning 3): nice values did not
# keep the sending off intake's cores. Saturated by intake, this machine's
# two cores showed 0.35-0.5; idle, 0.
BUSY = 0.25
# The outbox reader's thread runs this many nice steps below the relay
# (19 at most: 19 with the default delivery_nice of 10). Making the pages'
# payloads is most of an event's CPU (60-90 us in place), and nobody waits
# for an event by the millisecond: at 16 connections relaying with
# webhooks on, intake kept 0.85-0.94 of its SENDs/s without them instead
# of 0.80-0.82 (bench/results.md, issue 12, 2026-12-07 morning).
READER_NICE_STEPS = 9


class Target(NamedTuple):
    """Where a caller's events go, and the keys that sign them."""

    url: str
    keys: tuple[bytes, ...]


class _Down(NamedTuple):
    until: float  # no request before this
    failures: int  # in a row
    since: float  # when the last failure was counted


class WebhookSettings(NamedTuple):
    """What the sender needs from the configuration (it crosses the
    relay's pipe inside DeliverySettings)."""

    own: dict[str, Target]  # the named callers' own targets
    default: Target | None  # every other caller's
    retry_for: float  # webhook_retry_for
    timeout: float  # webhook_timeout
    yield_for: float  # webhook_yield_for


def webhook_settings(config: Config) -> WebhookSettings:
    own, default = targets(config)
    return WebhookSettings(own, default, config.webhook_retry_for, config.webhook_timeout, config.webhook_yield_for)


def targets(config: Config) -> tuple[dict[str, Target], Target | None]:
    """The named callers' own targets, and the top-level one (every other caller's)."""
    default = Target(config.webhook_url, config.webhook_secret) if config.webhook_url else None
    own = {}
    for name, caller in config.callers.items():
        url = caller.webhook_url or config.webhook_url
        if url:
            own[name] = Target(url, caller.webhook_secret or config.webhook_secret)
    return own, default


def webhook_callers(config: Config) -> frozenset[str] | None:
    """Whose state changes the spool writes to the outbox: every caller's
    (None) when there is a top-level webhook_url, else those with their own."""
    own, default = targets(config)
    return None if default is not None else frozenset(own)


@functools.lru_cache(maxsize=256)  # a few URLs, each logged at every event
def shown(url: str) -> str:
    """A URL for the logs: without its query, which may hold a token."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


class OutboxReader:
    """The outbox read from the sender's own process: a read-only connection
    (WAL: a reader never waits for the writer, nor the writer for it) in a
    thread of its own, so that neither the daemon nor the relay's loop runs
    the query."""

    def __init__(self, db_path: str):
        self._conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._conn.execute("PRAGMA query_only=1")
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="outbox-reader", initializer=_reader_nicer)

    async def due(self, now: float, limit: int, exclude: tuple[int, ...]) -> list[OutboxEvent]:
        """Up to `limit` events due at `now`, each the first of its message,
        leaving out `exclude` (seqs being sent), their payloads made:
        outbox.sendable."""
        return await asyncio.get_running_loop().run_in_executor(
            self._thread, outbox.sendable, self._conn, now, limit, exclude)

    def close(self) -> None:
        self._thread.shutdown(wait=True)
        self._conn.close()


def pressure_file(proc: str = "/proc", cgroups: str = "/sys/fs/cgroup") -> str:
    """Where the CPU's pressure stall information is read: the cpu.pressure
    of this process's own cgroup (v2), whose tasks are the service's under
    systemd, else the machine's /proc/pressure/cpu. The unit's ProcSubset=pid
    hides /proc/pressure, and the cgroup's figure counts only the waits of
    smtpgate's own tasks, not those of whatever else the host runs. The v2
    hierarchy is the root of `cgroups`, or its `unified` beside v1's (the
    hybrid layout of systemd before 256)."""
    try:
        with open(f"{proc}/self/cgroup") as groups:
            for line in groups:
                hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
                if hierarchy == "0" and not controllers and path != "/":
                    for own in (f"{cgroups}{path}/cpu.pressure", f"{cgroups}/unified{path}/cpu.pressure"):
                        if os.path.exists(own):
                            return own
    except (OSError, ValueError):
        pass
    return f"{proc}/pressure/cpu"


class CpuPressure:
    """Whether the CPU was contended since the last look: the share of the
    time some runnable task waited for a CPU (pressure_file, "some"), above
    BUSY. Never, where the kernel does not say (no PSI)."""

    SPAN = 0.1  # seconds: a shorter look says the same as the last one

    def __init__(self, path: str | None = None, clock: Callable[[], float] = time.monotonic):
        self._path = path or pressure_file()
        self._clock = clock
        self._last: tuple[float, int] | None = None  # (when, the stalled microseconds so far)
        self._said = False

    def contended(self) -> bool:
        now = self._clock()
        if self._last is not None and now - self._last[0] < self.SPAN:
            return self._said
        try:
            with open(self._path) as stall:
                total = int(stall.readline().rpartition("total=")[2])  # the "some" line
        except (OSError, ValueError):
            return False
        last, self._last = self._last, (now, total)
        self._said = last is not None and (total - last[1]) / 1e6 / (now - last[0]) > BUSY
        return self._said


def _reader_nicer() -> None:
    """The reader's thread, READER_NICE_STEPS nicer than the relay (Linux
    sets a nice value per thread: the relay's loop keeps its own)."""
    thread = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, thread,
                       min(19, os.getpriority(os.PRIO_PROCESS, thread) + READER_NICE_STEPS))
    except OSError:  # a system without per-thread priorities: the reader keeps the relay's
        pass


class WebhookSender:
    def __init__(self, spool, reader: OutboxReader, settings: WebhookSettings, log,
                 clock: Callable[[], float] = time.time, pressure: CpuPressure | None = None):
        """`spool` writes the outcomes (webhook_done, webhook_retry:
        delivery/process.py's SpoolCalls); `reader` reads the due events;
        `pressure` says when to leave the CPU to intake and delivery."""
        self.spool = spool
        self.reader = reader
        self.log = log
        self._clock = clock
        self._pressure = pressure or CpuPressure()
        self.reload(settings)
        self._down: dict[str, _Down] = {}  # by URL: bounded by the configuration
        self._pace: dict[str, float] = {}  # by URL: seconds between two answers of its last pipeline
        self._inflight: set[int] = set()  # seqs being sent or waiting for a connection
        self._taken: collections.Counter[str] = collections.Counter()  # by URL: of _inflight
        self._said_slow: set[str] = set()  # slow receivers logged (once each time they become slow)
        self._progress: dict[str, float] = {}  # by URL: its last answers, or its first event taken since none
        self._waiting: dict[str, tuple[Target, collections.deque[OutboxEvent]]] = {}  # by URL: for a connection
        self._connections: collections.Counter[str] = collections.Counter()  # by URL: pipelines in flight
        self._settling: list[tuple[int, str, bool]] = []  # answered 2xx, to be written
        self._settled: set[int] = set()  # their seqs, until written: not read as due again
        self._settle_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopping = False
        self._wake = asyncio.Event()
        self._last_read = 0.0  # time.monotonic() of the last read
        self._read_all = True  # it found fewer events than it could take: none is left due
        self._runner: asyncio.Task | None = None
        self._client = Client(f"smtpgate/{__version__}")

    def reload(self, settings: WebhookSettings) -> None:
        self._own, self._default, self.retry_for, self.timeout, self.yield_for = settings

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Stop sending; an event in flight stays in the outbox and is sent
        again by the next start (at least once)."""
        self._stopping = True  # a pipeline cancelled starts no other (_sent)
        tasks = [t for t in (self._runner, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._client.close()
        self.reader.close()
        if self._settle_timer is not None:
            self._settle_timer.cancel()
            self._write_settled()

    def _target(self, caller: str) -> Target | None:
        return self._own.get(caller, self._default)

    async def _run(self) -> None:
        # Not `while True`: Python 3.11's wait_for returns the wake instead of
        # raising a cancellation that comes as the wake does, and the loop
        # would go on after stop() (seen: stop() called as the settles of
        # the last events were written hung).
        while not self._stopping:
            self._wake.clear()
            try:
                if await self._page():
                    continue
            except SpoolError:
                pass  # the spool is closing or gone: the daemon stops
            except Exception:
                self.log.exception("webhook_sender_failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL)
            pause = self._last_read + READ_PAUSE - time.monotonic()
            if self._read_all and pause > 0 and not self._stopping:
                await asyncio.sleep(pause)

    def _slow(self, now: float) -> set[str]:
        """The receivers that are slow (SLOW_AFTER): holding half the window
        or more, with no answer for SLOW_AFTER seconds or, at the pace of
        their last answers, SLOW_AFTER seconds of it still to answer."""
        return {url for url, taken in self._taken.items()
                if taken >= WINDOW // 2 and (now - self._progress.get(url, now) >= SLOW_AFTER
                                             or taken * self._pace.get(url, 0.0) / CONNECTIONS >= SLOW_AFTER)}

    def _took(self, url: str, count: int) -> None:
        if not self._taken[url]:
            self._progress[url] = self._clock()
        self._taken[url] += count

    def _gave_back(self, url: str, count: int) -> None:
        self._taken[url] -= count
        if self._taken[url] <= 0:
            del self._taken[url]

    async def _page(self) -> bool:
        """Start sending the events due now (up to the free slots); hold
        those of a receiver that is down or slow, give up the stale ones.
        True when more may be due at once."""
        now = self._clock()
        slow = self._slow(now)
        busy = len(self._inflight) - sum(self._taken[url] for url in slow)
        free = WINDOW - busy
        if free < WINDOW // 2 and busy:
            return False  # a read per half page, not per event: each costs a trip to the reader thread
        due = now - self.yield_for if self.yield_for and self._pressure.contended() else now
        self._last_read = time.monotonic()
        events = await self.reader.due(due, free, (*self._inflight, *self._settled))
        self._read_all = len(events) < free
        held: dict[float, list[tuple[int, str]]] = {}
        batches: dict[str, tuple[Target, list[OutboxEvent]]] = {}  # by URL, in the order read
        for event in events:
            if event.payload is None:  # never, unless someone deleted its rows by hand
                await self._give_up(event, "its message is gone from the spool")
                continue
            target = self._target(event.caller)
            if target is None:
                await self._give_up(event, "no webhook_url for its caller any more")
                continue
            down = self._down.get(target.url)
            until = down.until if down is not None and down.until > now else \
                now + SLOW_HOLD if target.url in slow else None
            if until is not None:
                if until - event.created >= self.retry_for:
                    why = "down" if down is not None and down.until > now else "slow"
                    await self._give_up(event, f"its receiver is {why}: {webhook_retry_for(self.retry_for)}")
                else:
                    held.setdefault(until, []).append((event.seq, event.message_id))
                continue
            batches.setdefault(target.url, (target, []))[1].append(event)
        for target, batch in batches.values():
            self._inflight.update(event.seq for event in batch)
            self._took(target.url, len(batch))
            self._waiting.setdefault(target.url, (target, collections.deque()))[1].extend(batch)
            self._start(target.url)
        for until, ids in held.items():
            await self.spool.webhook_retry(until, ids, None)
        for url in slow - self._said_slow:
            self._said_slow.add(url)
            self.log.warning("webhook_receiver_slow", url=shown(url), in_flight=self._taken[url],
                             hint=f"no answer for {SLOW_AFTER:g} s, or as long to answer what it holds: "
                                  "its other events wait, the other receivers' go")
        self._said_slow &= slow
        # A full page of which some were not sent: read the next one now.
        return len(events) == free and len(self._inflight) - sum(self._taken[url] for url in slow) < WINDOW

    def _depth(self, url: str) -> int:
        """How many requests to pipeline to `url` (UNTIMED_DEPTH for a
        receiver not yet timed, PIPELINE for one that answers at once)."""
        pace = self._pace.get(url)
        if pace is None:
            return UNTIMED_DEPTH
        return max(2, min(PIPELINE, int(PIPELINE_SPAN / pace))) if pace else PIPELINE

    def _start(self, url: str) -> None:
        """Send the events waiting for `url`, a pipeline on each connection
        free (CONNECTIONS at most)."""
        target, waiting = self._waiting[url]
        depth = self._depth(url)
        while waiting and self._connections[url] < CONNECTIONS:
            batch = [waiting.popleft() for _ in range(min(depth, len(waiting)))]
            self._connections[url] += 1
            task = asyncio.create_task(self._send(batch, target))
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._sent, url))
        if not waiting:
            del self._waiting[url]

    def _sent(self, url: str, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        self._connections[url] -= 1
        if url in self._waiting and not self._stopping:
            down = self._down.get(url)
            if down is not None and down.until > self._clock():
                # Left in the outbox, due: the next page holds them as the
                # receiver's others (or gives them up), as if never read.
                left = self._waiting.pop(url)[1]
                self._inflight.difference_update(event.seq for event in left)
                self._gave_back(url, len(left))
            else:
                self._start(url)
        self._wake.set()

    async def _send(self, events: list[OutboxEvent], target: Target) -> None:
        """One try of `events` (of different messages), pipelined to one
        receiver, and their outcomes written to the outbox in order."""
        try:
            started = self._clock()
            timestamp = int(started)
            answers = await self._client.post(target.url, [
                ([("Content-Type", "application/json"),
                  *signing.headers(target.keys, event.id, timestamp, event.payload).items()], event.payload)
                for event in events], self.timeout)
            self._progress[target.url] = self._clock()
            answered = [answer.received for answer in answers if not isinstance(answer, Exception)]
            if len(answered) > 1:
                self._pace[target.url] = (answered[-1] - answered[0]) / (len(answered) - 1)
            retries: dict[tuple[float, str], list[tuple[int, str]]] = {}
            for event, answer in zip(events, answers, strict=True):
                status, error, retry_after = self._judged(answer)
                if status is not None and 200 <= status < 300:
                    self._down.pop(target.url, None)
                    self._settle(event)
                    self.log.debug("webhook_sent", webhook_id=event.id, type=event.type,
                                   message_id=event.message_id, url=shown(target.url), status=status,
                                   attempts=event.attempts + 1)
                    continue
                if status == 410:  # Gone: the receiver wants no more of this
                    await self._give_up(event, error, target.url, tried=True)
                    continue
                until = self._failed(target.url, started, retry_after)
                if until - event.created >= self.retry_for:
                    await self._give_up(event, f"{error}; {webhook_retry_for(self.retry_for)}", target.url, tried=True)
                    continue
                retries.setdefault((until, error), []).append((event.seq, event.message_id))
                self.log.warning("webhook_failed", webhook_id=event.id, type=event.type, message_id=event.message_id,
                                 url=shown(target.url), error=error, attempts=event.attempts + 1,
                                 next_attempt=round(until, 3))
            for (until, error), ids in retries.items():
                await self.spool.webhook_retry(until, ids, error)
        except SpoolError:
            pass  # the spool is closing: the events stay in the outbox
        except Exception:
            self.log.exception("webhook_sender_failed", webhook_ids=[event.id for event in events])
        finally:
            self._inflight.difference_update(event.seq for event in events)
            self._gave_back(target.url, len(events))

    def _judged(self, answer: Answer | Exception) -> tuple[int | None, str, str | None]:
        """An event's answer: (status or None, what went wrong, Retry-After)."""
        if isinstance(answer, TimeoutError):
            return None, f"no answer within webhook_timeout ({self.timeout:g} s)", None
        if isinstance(answer, Exception):
            return None, f"{type(answer).__name__}: {answer}", None
        if 200 <= answer.status < 300:
            return answer.status, "", None
        reason = answer.body[:SHOWN_REPLY].decode("utf-8", "replace").strip() or answer.reason
        error = f"HTTP {answer.status} {reason}".strip()
        if 300 <= answer.status < 400:
            error += " (redirects are not followed: configure the final URL)"
        return answer.status, error, answer.header(b"retry-after")

    def _settle(self, event: OutboxEvent) -> None:
        """Write that `event` was answered 2xx, with the others of SETTLE seconds."""
        if not self._settling:
            self._settle_timer = asyncio.get_running_loop().call_later(SETTLE, self._write_settled)
        self._settling.append((event.seq, event.message_id, True))
        self._settled.add(event.seq)

    def _write_settled(self) -> None:
        events, self._settling, self._settle_timer = self._settling, [], None
        seqs = [seq for seq, _, _ in events]

        def written(future: asyncio.Future) -> None:
            self._settled.difference_update(seqs)  # deleted, or read and sent again (at least once)
            if not future.cancelled() and not isinstance(future.exception(), (SpoolError, type(None))):
                self.log.error("webhook_sender_failed", error=repr(future.exception()))
            self._wake.set()

        try:
            self.spool.webhook_done(events).add_done_callback(written)
        except SpoolError:
            self._settled.difference_update(seqs)  # the spool is closing: they stay in the outbox

    def _failed(self, url: str, started: float, retry_after: str | None) -> float:
        """Mark `url` down after a failed try begun at `started`; returns when
        it is tried again. The tries of one round count as one failure."""
        down = self._down.get(url)
        if down is not None and down.since >= started:
            return down.until
        failures = (down.failures if down is not None else 0) + 1
        now = self._clock()
        delay = retry_delay(failures, RETRY_BASE, RETRY_MAX, random.random())
        asked = retry_after_seconds(retry_after, time.time()) if retry_after is not None else None
        if asked is not None:
            delay = max(delay, min(asked, RETRY_MAX))
        self._down[url] = _Down(now + delay, failures, now)
        return now + delay

    async def _give_up(self, event: OutboxEvent, why: str, url: str | None = None, tried: bool = False) -> None:
        """Give `event` up; `tried`: after a try of it that failed, which its
        `attempts` (the outbox's count before the try) does not hold yet."""
        await self.spool.webhook_done([(event.seq, event.message_id, False)])
        self.log.error("webhook_given_up", webhook_id=event.id, type=event.type, message_id=event.message_id,
                       url=shown(url) if url else None, error=why, attempts=event.attempts + tried)


def retry_after_seconds(value: str, now: float) -> float | None:
    """A Retry-After header's wait in seconds from `now` (Unix time): its
    delay-seconds or its HTTP-date (RFC 9110 section 10.2.3); None for
    anything else. ASCII digits only: str.isdigit() takes "²" too, which
    float() then refuses, and the error skipped the backoff (the receiver
    was tried again at once, over and over)."""
    value = value.strip()
    if re.fullmatch(r"[0-9]{1,10}", value):
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # an HTTP-date is GMT, and says so
    return max(0.0, when.timestamp() - now)


def webhook_retry_for(seconds: float) -> str:
    return f"given up after webhook_retry_for ({seconds:g} s)"
