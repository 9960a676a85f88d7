"""Delivery: a scheduler claims due messages, workers relay them upstream.

    spool.claim_due --> ready queue --> N workers --> pool per upstream --> SMTP
                 <--  spool.record_attempt (per-recipient outcomes, backoff)

- The scheduler keeps up to CLAIM_AHEAD times `workers` messages claimed
  (in flight or ready), claiming a worker's count at a time, so a worker that
  finishes finds the next one without waiting for a claim; it sleeps until `wake()`
  (intake stored something), a worker finished while more may be due, an
  attempt was deferred, or the earliest deferred message is due.
- Claim at enqueue: with `offer`, delivery offers intake room for
  OFFER_PER_WORKER x `workers` messages; intake then stores a new message
  already claimed ('sending', in the SEND's own commit) and hands it over
  (`take`), instead of a wake-up and a claim through the daemon and the
  writer. Each such message, once attempted, gives its room back
  (`offer(1)`; the delivery process sends it with the attempt's record).
- Each upstream has a pool of reused connections, a rate limit and a
  health (pool.py, health.py). Upstreams are tried in order; one that is
  down is skipped (failover at once) and probed on its backoff by the
  prober, one session set-up per step.
- While every upstream is down nothing is claimed: due messages are held
  where they are, without an attempt and without a line of log each (the
  reads show them deferred with the upstreams' reason and the next probe,
  spool/queries.py), and claims already made go back as they were. When a
  probe finds an upstream back, the scheduler claims again and the held
  messages go out at the relay's rate. A held message past `max_age`
  fails with the upstreams' reason, untried (`_expire`).
- Outcomes and retries follow retry.py: only pending recipients are
  retried, with exponential backoff and jitter, until `max_age` after the
  message was accepted. A connection lost after the final dot means the
  upstream may have the message: it is retried anyway (at-least-once) and
  marked `possible_duplicate`. Just before the final dot goes out, the
  message's id is written to the spool directory (spool/dots.py), so that
  a crash before its outcome is stored is known at the next start.
- stop(grace): no more claims; in-flight deliveries get `grace` seconds,
  and what they wait for is logged while they do; stop_now() ends the
  wait. Whatever is left goes back to 'queued' for the next start.

All spool writes go through the spool's group-commit writer, so the
claims and attempt records of many workers share commits (and need no
fsync of their own: see spool/writer.py, RELAXED_OPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from typing import TYPE_CHECKING, Callable

from smtpgate.delivery.health import DOWN, UP, Health, failure_reason, failure_text, outcomes_reason
from smtpgate.delivery.pool import UpstreamDown, UpstreamPool
from smtpgate.delivery.retry import gave_up, give_up, next_attempt_at, outcomes_from_result
from smtpgate.delivery.settings import DeliverySettings
from smtpgate.message.build import build_message
from smtpgate.message.spec import MessageSpec
from smtpgate.smtp import SmtpMessageError, SmtpServerRefused, SmtpSessionError
from smtpgate.spool.ops import Claimed, RecipientOutcome
from smtpgate.spool.schema import State
from smtpgate.spool.store import Spool

if TYPE_CHECKING:
    from smtpgate.spool.dots import DotLog

# The scheduler is woken by intake, by finishing workers and by the earliest
# due time; this bound only covers changes nobody announced (a clock step).
MAX_SCHEDULER_SLEEP = 30.0  # seconds
# Messages claimed per worker, in flight or ready. A claim goes from the
# delivery process through the daemon to the spool writer and back (two
# pipes and a commit, a few ms under load); 10 workers' worth of 10 keeps
# 5,000 messages/s going for 20 ms. A claimed message shows 'sending'.
CLAIM_AHEAD = 10
# Room offered to intake for messages claimed at enqueue, per worker: half
# of CLAIM_AHEAD, the other half left to the scheduler's own claims (mail
# that was deferred or queued before the start). The room an attempt gives
# back reaches the daemon with the attempt records, every few ms
# (process.py, RECORD_EVERY = 3 ms), and a delivery process at its lower
# priority falls behind a lone caller's SENDs for a while: with two per
# worker, 19-40 % of a lone caller's relayed SENDs found no room and took
# the wake-and-claim path (a wake-up, a claim through the daemon and the
# writer, its answer); with five, the daemon's pipe writes per relayed
# SEND fell from 3.2 to 2.6, delivery's spool calls from 0.75-0.89 to
# 0.45 (issue 15, bench/results.md).
OFFER_PER_WORKER = CLAIM_AHEAD // 2

# Specs larger than this are built in a thread.
LARGE_SPEC = 256 * 1024

# RFC 5321 4.5.3.1.8: the minimum a server must accept in one transaction.
MAX_RCPTS_PER_TRANSACTION = 100

# A down upstream's failed probes are logged at most this often (the first
# failure is logged when it goes down), and held messages are checked
# against max_age at most this often (or ten times per max_age).
PROBE_LOG_EVERY = 60.0  # seconds
EXPIRE_EVERY = 60.0  # seconds

# Stopping: what in-flight deliveries wait for is logged after this long,
# then again every STOP_REPORT_EVERY, until they end or the grace is over.
STOP_REPORT_AFTER = 1.0  # seconds
STOP_REPORT_EVERY = 5.0  # seconds


def default_build(spec_json: bytes) -> bytes:
    """The RFC 5322 bytes of a stored spec (message/build.py)."""
    return build_message(MessageSpec.from_json(spec_json))


@dataclasses.dataclass
class _Attempt:
    """The result of one delivery attempt of one message."""

    outcomes: list[RecipientOutcome]
    upstream: str | None = None
    possible_duplicate: bool = False
    upstream_down: bool = False  # the session failed the upstream (a 421): held with the rest
    reason: str | None = None  # why not every recipient was sent (health.REASONS)


@dataclasses.dataclass
class _InFlight:
    """What one message in delivery is doing (the log of a stop that waits)."""

    upstream: str
    conn: object  # the SmtpConnection it uses
    started: float  # monotonic


class Delivery:
    """Scheduler + workers + pools + prober; see the module docstring."""

    def __init__(
        self,
        spool: Spool,
        settings: DeliverySettings,
        log,
        *,
        build: Callable[[bytes], bytes] = default_build,
        rand: Callable[[], float] = random.random,
        dots: DotLog | None = None,
        offer: Callable[[int], None] | None = None,
        on_session: Callable[[str, str | None], None] | None = None,
        attempt_line: Callable[..., None] | None = None,
    ):
        self._spool = spool
        self._settings = settings
        self._log = log
        self._build = build
        self._rand = rand
        self._dots = dots
        self._offer = offer
        self._on_session = on_session  # each session set up or not (pool.py)
        # The delivery_attempt line: log.json_line's where the delivery
        # process writes JSON lines (one per message relayed), else the log's.
        self._log_attempt = attempt_line or functools.partial(log.info, "delivery_attempt")
        self._unspent = 0  # room offered to intake and not yet used (take)
        self._taken: set[str] = set()  # ids handed over by intake, until attempted
        self._claim_more = True  # the last claim may have left due messages: a finishing worker wakes us
        self._pools = [self._new_pool(u) for u in settings.upstreams]
        self._ready: asyncio.Queue[Claimed] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._probe_wake = asyncio.Event()
        self._stop_now = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._prober: asyncio.Task | None = None
        self._workers: list[asyncio.Task] = []
        self._in_flight: dict[asyncio.Task, Claimed] = {}
        self._doing: dict[str, _InFlight] = {}  # message id -> its connection, while it has one
        self._dot_sent: set[str] = set()  # ids whose final dot went out in the attempt running now
        self._recording: set[asyncio.Future] = set()  # spool writes not yet committed
        self._probe_logged: dict[str, float] = {}  # upstream -> monotonic time of its last line
        self._expired_at = float("-inf")
        self._held: int | None = None  # messages held by the outage, as of the last probe
        self._stopping = False

    def _new_pool(self, upstream) -> UpstreamPool:
        return UpstreamPool(upstream, self._settings, on_health=self._health_changed, on_session=self._on_session,
                            rand=self._rand)

    @property
    def pools(self) -> list[UpstreamPool]:
        return list(self._pools)

    async def start(self) -> None:
        """Start the scheduler, the prober and the workers."""
        self._stopping = False
        self._stop_now.clear()
        self._record_upstreams()
        self._scheduler = asyncio.create_task(self._schedule(), name="delivery-scheduler")
        self._prober = asyncio.create_task(self._probe_loop(), name="delivery-prober")
        self._adjust_workers()
        if self._offer is not None:
            self._unspent = OFFER_PER_WORKER * self._settings.worker_count
            self._offer(self._unspent)
        self._log.info("delivery_started", upstreams=[p.name for p in self._pools], workers=len(self._workers))

    def wake(self) -> None:
        """Something was enqueued or made due: look at the spool now."""
        self._wake.set()

    def take(self, message: Claimed) -> None:
        """A message intake claimed for us at enqueue, on room we offered."""
        self._unspent = max(0, self._unspent - 1)
        self._taken.add(message.id)
        self._ready.put_nowait(message)

    def probe_now(self) -> None:
        """Probe every down upstream at once (the operator ran `queue retry`)."""
        now = time.time()
        for pool in self._pools:
            if pool.health.state == DOWN:
                pool.health.next_probe = now
        self._probe_wake.set()

    def reload(self, settings: DeliverySettings) -> None:
        """Apply new settings: pools of unchanged upstreams (and their open
        connections and health) are kept; the others are closed as their
        connections come back, and their replacements start unknown, so a
        changed upstream (a new password, say) is tried at once."""
        self._settings = settings
        old = {p.settings: p for p in self._pools}
        pools = []
        for upstream in settings.upstreams:
            pool = old.pop(upstream, None)
            if pool is not None and pool.size == settings.connections_per_upstream:
                pool.configure(settings)
            else:
                if pool is not None:
                    old[upstream] = pool  # resized: replaced, closed below
                pool = self._new_pool(upstream)
            pools.append(pool)
        for pool in old.values():
            asyncio.ensure_future(pool.close())
        self._pools = pools
        if self._scheduler is not None and not self._stopping:
            self._adjust_workers()
            self._record_upstreams()
        self._log.info("delivery_reloaded", upstreams=[p.name for p in pools], workers=settings.worker_count)
        self._probe_wake.set()
        self.wake()

    def _adjust_workers(self) -> None:
        self._workers = [w for w in self._workers if not w.done()]
        for i in range(len(self._workers), self._settings.worker_count):
            self._workers.append(asyncio.create_task(self._work(i), name=f"delivery-worker-{i}"))

    async def stop(self, grace: float) -> None:
        """Stop claiming and probing; let deliveries in flight finish within
        `grace` seconds (or until stop_now()), logging what they wait for;
        put the rest back to 'queued'; close the pools."""
        self._stopping = True
        if self._scheduler is not None:
            # Not cancelled: a claim cancelled half-way would still be
            # committed by the writer, leaving its messages 'sending'.
            self._wake.set()
            await self._scheduler
            self._scheduler = None
        if self._prober is not None:
            self._prober.cancel()  # a probe holds no message
            await asyncio.gather(self._prober, return_exceptions=True)
            self._prober = None
        unstarted = self._take_ready()
        if unstarted:
            await self._spool.release(unstarted)
        busy = set(self._in_flight)
        for worker in self._workers:
            if worker not in busy:
                worker.cancel()  # idle: waiting for the ready queue
        if busy:
            for worker in await self._wait_in_flight(busy, grace):
                worker.cancel()  # its delivery puts the message back to 'queued'
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        polite = not self._stop_now.is_set()
        await asyncio.gather(*(p.close(polite) for p in self._pools))
        self._record_upstreams([])  # stopped: nothing is held for an upstream any more
        await asyncio.gather(*self._recording, return_exceptions=True)  # finished attempts are stored
        self._log.info("delivery_stopped", released=len(unstarted), unfinished=len(busy))

    def stop_now(self) -> None:
        """Interrupt the deliveries a stop is waiting for (a second SIGTERM):
        their messages stay queued, possible_duplicate if their dot went out."""
        self._stop_now.set()

    async def _wait_in_flight(self, busy: set[asyncio.Task], grace: float) -> set[asyncio.Task]:
        """Wait up to `grace` seconds, or until stop_now(), for `busy` to
        end, logging now and then what they wait for; returns the late ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        report_at = loop.time() + STOP_REPORT_AFTER
        interrupt = asyncio.ensure_future(self._stop_now.wait())
        pending = set(busy)
        try:
            while pending and not interrupt.done() and loop.time() < deadline:
                await asyncio.wait(pending | {interrupt}, timeout=min(report_at, deadline) - loop.time(),
                                   return_when=asyncio.FIRST_COMPLETED)
                pending = {task for task in pending if not task.done()}
                if pending and not interrupt.done() and loop.time() >= report_at:
                    self._log_waiting(pending, deadline - loop.time())
                    report_at = loop.time() + STOP_REPORT_EVERY
        finally:
            interrupt.cancel()
        return pending

    def _log_waiting(self, pending: set[asyncio.Task], grace_left: float) -> None:
        now = time.monotonic()
        deliveries = []
        for task in pending:
            message = self._in_flight.get(task)
            if message is None:
                continue
            doing = self._doing.get(message.id)
            verb = getattr(doing.conn, "awaiting", None) if doing else None
            deliveries.append({
                "message_id": message.id,
                "upstream": doing.upstream if doing else None,
                "waiting_for": _WAITING_FOR.get(verb, f"the reply to {verb}") if doing else "a connection",
                "seconds": round(now - doing.started, 1) if doing else None,
            })
        self._log.warning("stop_waiting", deliveries=deliveries, grace_left=round(max(0.0, grace_left), 1),
                          note="a second SIGTERM or SIGINT stops at once; the messages stay queued")

    def _take_ready(self) -> list[str]:
        """Empty the ready queue: the ids of the claimed messages not started."""
        ids = []
        while not self._ready.empty():
            ids.append(self._ready.get_nowait().id)
        return ids

    def _track(self, write: asyncio.Future) -> asyncio.Future:
        """Keep a spool write until it is committed (stop waits for them all)."""
        write = asyncio.ensure_future(write)
        self._recording.add(write)
        write.add_done_callback(self._written)
        return write

    def _written(self, write: asyncio.Future) -> None:
        self._recording.discard(write)
        if not write.cancelled() and write.exception() is not None:
            self._log.error("spool_write_failed", error=repr(write.exception()))

    # --- upstream health ---------------------------------------------------------

    def _outage(self) -> bool:
        """Every upstream is down: messages are held, not claimed."""
        return bool(self._pools) and all(p.health.state == DOWN for p in self._pools)

    def _held_reply(self) -> str:
        """What the recipients of a message held by an outage show (the
        same text the spool's reads build from the recorded health)."""
        return "; ".join(p.health.reply for p in self._pools)

    def _record_upstreams(self, rows: list | None = None) -> None:
        """Record the upstreams' health for the reads (spool/queries.py)."""
        try:
            self._track(self._spool.record_upstreams([p.health.row() for p in self._pools] if rows is None else rows))
        except Exception as exc:  # the spool is gone: the daemon is stopping
            self._log.error("spool_write_failed", error=repr(exc))

    def _health_changed(self, pool: UpstreamPool, previous: Health) -> None:
        """A pool's session failed or an upstream came up (pool.on_health):
        record it for the reads, and log the changes, not every failure."""
        if pool not in self._pools:
            return  # retired by a reload
        health = pool.health
        self._record_upstreams()
        now = time.monotonic()
        if health.state == DOWN and previous.state != DOWN:
            self._probe_logged[pool.name] = now
            self._log.warning("upstream_down", upstream=pool.name, kind=health.kind, error=health.reason,
                              next_probe=round(health.next_probe, 3), all_down=self._outage())
            self._probe_wake.set()
            self.wake()  # the scheduler gives back what it holds if nothing is left up
        elif health.state == DOWN:
            if now - self._probe_logged.get(pool.name, float("-inf")) >= PROBE_LOG_EVERY:
                self._probe_logged[pool.name] = now
                self._log.warning("upstream_probe_failed", upstream=pool.name, kind=health.kind,
                                  error=health.reason, failures=health.failures,
                                  down_since=round(health.since, 3), next_probe=round(health.next_probe, 3))
        elif previous.state == DOWN:
            # How many it releases: the messages held when its probe began.
            held = all(p is pool or p.health.state == DOWN for p in self._pools)
            self._log.info("upstream_up", upstream=pool.name, down_for=round(time.time() - previous.since, 3),
                           failures=previous.failures, released=self._held if held else None)
            self.wake()
        elif previous.state != UP:
            self.wake()

    async def _probe_loop(self) -> None:
        """Probe each down upstream when its backoff step is over (or at once
        after probe_now); while every upstream is down, apply max_age."""
        while not self._stopping:
            self._probe_wake.clear()
            for pool in list(self._pools):
                if pool.health.state == DOWN and pool.health.next_probe <= time.time():
                    if self._outage():
                        await self._expire()
                        await self._count_held()
                    try:
                        await pool.probe()  # its outcome reaches _health_changed
                    except Exception:
                        self._log.exception("probe_failed", upstream=pool.name)
                        pool.health.next_probe = time.time() + pool.probe_max
            probes = [p.health.next_probe for p in self._pools if p.health.state == DOWN]
            sleep = min(probes) - time.time() if probes else MAX_SCHEDULER_SLEEP
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._probe_wake.wait(), min(max(sleep, 0.0), MAX_SCHEDULER_SLEEP))

    async def _count_held(self) -> None:
        """How many messages the outage holds (an index-only count in the
        daemon's reader thread, once per probe): the `released` of the line
        that says an upstream is back."""
        try:
            self._held = await self._spool.count_due(time.time())
        except Exception as exc:
            self._log.error("count_failed", error=repr(exc))

    async def _expire(self) -> None:
        """Fail the held messages past max_age with the upstreams' reason,
        untried; at most every EXPIRE_EVERY (or tenth of max_age)."""
        now, max_age = time.time(), self._settings.max_age
        if now - self._expired_at < min(EXPIRE_EVERY, max_age / 10):
            return
        self._expired_at = now
        try:
            failed = await self._spool.expire(now - max_age, gave_up(self._held_reply(), max_age))
        except Exception as exc:
            self._log.error("expire_failed", error=repr(exc))
            return
        if failed:
            self._log.warning("held_messages_expired", messages=failed, max_age=max_age,
                              error=self._held_reply())

    # --- the scheduler -----------------------------------------------------

    async def _schedule(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a wake-up during the claim is not lost
            timeout = None
            if self._outage():
                # Nothing can go out: claims made before the outage go back
                # as they were (no attempt counted); an upstream coming back
                # wakes us.
                given_back = self._take_ready()
                if given_back:
                    self._track(self._spool.release(given_back))
            else:
                timeout = await self._claim()
            sleep = MAX_SCHEDULER_SLEEP if timeout is None else min(timeout, MAX_SCHEDULER_SLEEP)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

    async def _claim(self) -> float | None:
        """Claim due messages if there is room; returns how long to sleep at
        most (None: until woken)."""
        workers = self._settings.worker_count
        # Up to `workers` in flight and CLAIM_AHEAD - 1 times that ready.
        # Claiming when a worker's count of room is free makes one
        # writer operation serve many messages, while the ready queue
        # covers the claim's round trip: workers never starve.
        room = CLAIM_AHEAD * workers - len(self._in_flight) - self._ready.qsize() - self._unspent
        self._claim_more = True
        if not (room >= workers or (room > 0 and self._ready.empty())):
            return None  # not claiming (little room): a finishing worker wakes us
        try:
            claimed = await self._spool.claim_due(time.time(), room)
            for message in claimed:
                self._ready.put_nowait(message)
            if claimed:
                # With messages claimed, a finishing worker wakes us to claim
                # again, and that claim finds whatever became due meanwhile.
                return None
            # Nothing due now (intake's wake-ups and the deferred attempts
            # say when that changes): when is the next one?
            self._claim_more = False
            due = await self._spool.next_due()
        except Exception as exc:  # the spool failed (its writer gone: the daemon stops)
            self._log.error("claim_failed", error=str(exc) or repr(exc))
            return 1.0
        return None if due is None else max(0.0, due - time.time())

    # --- the workers ---------------------------------------------------------

    async def _work(self, index: int) -> None:
        me = asyncio.current_task()
        while not self._stopping and index < self._settings.worker_count:
            message = await self._ready.get()
            self._in_flight[me] = message
            try:
                await self._deliver(message)
            finally:
                del self._in_flight[me]
                if message.id in self._taken:
                    self._taken.discard(message.id)
                    if not self._stopping:
                        self._unspent += 1
                        self._offer(1)
                if self._claim_more:
                    self._wake.set()

    async def _deliver(self, message: Claimed) -> None:
        """One attempt at one message, recorded in the spool; if every
        upstream is down, no attempt: it goes back as it was; if cancelled
        (stop after the grace period), it goes back to 'queued'."""
        # The lines about a message name it first (message_id=), as a logger
        # bound with it would, without a bound logger made per message.
        try:
            attempt = await self._attempt(message)
        except asyncio.CancelledError:
            dot_sent = message.id in self._dot_sent
            self._dot_sent.discard(message.id)
            release = self._settle(self._spool.release([message.id], possible_duplicate=dot_sent), message.id)
            await asyncio.shield(release)
            self._log.info("delivery_interrupted", message_id=message.id, possible_duplicate=dot_sent,
                           note="stopping; the message stays queued")
            raise
        except Exception:
            self._log.exception("delivery_error", message_id=message.id)
            attempt = _Attempt(
                [RecipientOutcome(r, State.DEFERRED, "smtpgate: internal error, see the log") for r in message.recipients],
                possible_duplicate=message.id in self._dot_sent, reason="other",
            )
        self._dot_sent.discard(message.id)
        if attempt is None:  # every upstream is down: held, not attempted
            self._track(self._spool.release([message.id]))
            return
        outcomes = attempt.outcomes
        next_attempt = None
        if any(o.state == State.DEFERRED for o in outcomes):
            now = time.time()
            next_attempt = next_attempt_at(now, message.created, message.attempts + 1, self._settings, self._rand())
            if next_attempt is None:
                outcomes = give_up(outcomes, self._settings.max_age)
            elif attempt.upstream_down:
                next_attempt = now  # due with the messages its upstream's outage holds
        # The worker goes on to its next message while the record waits for
        # its group commit: a crash before that commit only means the message
        # is sent again (at-least-once), and the worker is not idle meanwhile.
        record = self._spool.record_attempt(
            message.id, outcomes, next_attempt=next_attempt, possible_duplicate=attempt.possible_duplicate,
            upstream=attempt.upstream, reason=attempt.reason,
        )
        # One callback per record does what each write that ends an attempt
        # needs (_settle) and logs the attempt: callbacks are run by the
        # loop one by one, and the record of every message relayed has them.
        self._recording.add(record)
        record.add_done_callback(functools.partial(self._recorded, message, attempt, outcomes, next_attempt))

    def _settle(self, write, msg_id: str) -> asyncio.Future:
        """Track a write that ends an attempt; once it is committed, the
        record of the attempt's final dot (spool/dots.py) may go."""
        write = self._track(write)
        if self._dots is not None:
            dots = self._dots
            write.add_done_callback(lambda done: done.cancelled() or done.exception() or dots.settled(msg_id))
        return write

    def _recorded(self, message: Claimed, attempt: _Attempt, outcomes, next_attempt, record: asyncio.Future):
        """An attempt's record is done: as _settle's callbacks would, untrack
        it and, once committed, let its final dot's record go; then log the
        attempt with the resulting state."""
        self._written(record)
        if record.cancelled() or record.exception() is not None:
            return  # logged by _written; stays 'sending' until restart
        if self._dots is not None:
            self._dots.settled(message.id)
        if next_attempt is not None:
            self._wake.set()  # the scheduler's next due time may be this one
        self._log_attempt(
            message_id=message.id,
            state=record.result(),
            attempt=message.attempts + 1,
            upstream=attempt.upstream,
            replies={o.address: o.reply for o in outcomes},
            possible_duplicate=attempt.possible_duplicate or message.possible_duplicate,
            next_attempt=next_attempt,
        )

    async def _attempt(self, message: Claimed) -> _Attempt | None:
        """One attempt at every pending recipient, in transactions of at most
        MAX_RCPTS_PER_TRANSACTION recipients; never raises for SMTP trouble,
        which becomes per-recipient outcomes. None if no upstream is up to
        try (nothing was sent)."""
        try:
            if len(message.spec_json) > LARGE_SPEC:
                # Megabytes of attachments take tens of milliseconds to
                # encode: not on the loop, where every hand-off would wait.
                data = await asyncio.to_thread(self._build, message.spec_json)
            else:
                data = self._build(message.spec_json)
        except Exception as exc:
            self._log.error("message_build_failed", message_id=message.id, error=f"{type(exc).__name__}: {exc}")
            return _Attempt(
                [RecipientOutcome(r, State.FAILED, "smtpgate: the message could not be built") for r in message.recipients],
                reason="message",
            )
        # RFC 5321 4.5.3.1.8: a server need only take 100 recipients per
        # transaction and answers 452 to the rest; sending them in several
        # transactions now beats deferring them to a later attempt.
        recipients = message.recipients
        chunks = [recipients[i:i + MAX_RCPTS_PER_TRANSACTION]
                  for i in range(0, len(recipients), MAX_RCPTS_PER_TRANSACTION)] or [recipients]
        combined = None
        for part_recipients in chunks:
            part = await self._transaction(message, part_recipients, data)
            if part is None:
                if combined is None:
                    return None
                # Every upstream went down after a part went out: the rest
                # waits with the messages the outage holds.
                reply = self._held_reply()
                part = _Attempt([RecipientOutcome(r, State.DEFERRED, reply) for r in part_recipients],
                                upstream_down=True)
            if combined is None:
                combined = part
                continue
            combined.outcomes += part.outcomes
            combined.upstream = part.upstream or combined.upstream
            combined.possible_duplicate |= part.possible_duplicate
            combined.upstream_down |= part.upstream_down
            combined.reason = combined.reason or part.reason
        return combined

    def _final_dot(self, msg_id: str) -> None:
        """The final dot of `msg_id` is about to go out: from now on the
        upstream may have it, whatever happens to us (spool/dots.py)."""
        self._dot_sent.add(msg_id)
        if self._dots is not None:
            self._dots.record(msg_id)

    async def _transaction(self, message: Claimed, recipients: list[str], data: bytes) -> _Attempt | None:
        """Try the upstreams that are not down, in order, until one takes one
        transaction for `recipients`; None if none could be tried."""
        for pool in self._pools:
            if pool.health.state == DOWN:
                continue
            delay = pool.take_token()
            if delay:
                await asyncio.sleep(delay)
            fresh = False
            for _ in range(2):  # a second try only for a reused connection found dead
                try:
                    conn, reused = await pool.acquire(fresh=fresh)
                except (SmtpSessionError, UpstreamDown):
                    break  # down (logged once, by _health_changed): the next upstream
                self._doing[message.id] = _InFlight(pool.name, conn, time.monotonic())
                try:
                    result = await conn.send(message.envelope_from, recipients, data,
                                             before_data_end=lambda: self._final_dot(message.id))
                except SmtpMessageError as exc:
                    pool.release(conn)  # nothing was sent; the session is fine
                    reply = f"smtpgate: {exc}"
                    return _Attempt([RecipientOutcome(r, State.FAILED, reply) for r in recipients], pool.name,
                                    reason="message")
                except SmtpSessionError as exc:
                    pool.discard(conn)
                    if reused and not exc.after_data_end and exc.reply is None and not fresh:
                        # An idle pooled connection the server had dropped:
                        # nothing reached it, so a fresh connection is safe.
                        self._log.info("pooled_connection_dead", message_id=message.id, upstream=pool.name, error=str(exc))
                        fresh = True
                        continue
                    if isinstance(exc, SmtpServerRefused):
                        # 421: the server closes its door, not just this message's
                        pool.session_failed(exc, in_transaction=True)
                    self._log.warning("upstream_session_failed", message_id=message.id, upstream=pool.name, error=failure_text(exc),
                                after_data_end=exc.after_data_end)
                    reply = failure_text(exc) if exc.reply is not None else f"smtpgate: {exc}"
                    return _Attempt(
                        [RecipientOutcome(r, State.DEFERRED, reply) for r in recipients],
                        pool.name,
                        possible_duplicate=exc.after_data_end,
                        upstream_down=pool.health.state == DOWN,
                        reason=failure_reason(exc),
                    )
                except BaseException:
                    pool.discard(conn)
                    raise
                finally:
                    self._doing.pop(message.id, None)
                pool.release(conn)
                outcomes = outcomes_from_result(result)
                return _Attempt(outcomes, pool.name, reason=outcomes_reason(outcomes))
        return None


# What a delivery waits for, by the command awaiting its reply (SmtpConnection.awaiting).
_WAITING_FOR = {None: "nothing (finishing)", "DATA_END": "the reply to the final dot"}
