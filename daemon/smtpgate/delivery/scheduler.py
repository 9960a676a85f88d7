"""Delivery: a scheduler claims due messages, workers relay them upstream.

    spool.claim_due --> ready queue --> N workers --> pool per upstream --> SMTP
                 <--  spool.record_attempt (per-recipient outcomes, backoff)

- The scheduler keeps up to CLAIM_AHEAD times `workers` messages claimed
  (in flight or ready), claiming a worker's count at a time, so a worker that
  finishes finds the next one without waiting for a claim; it sleeps until `wake()`
  (intake stored something), a worker finished, or the earliest deferred
  message is due.
- Each upstream has a pool of reused connections, a rate limit and a
  health mark (pool.py). Upstreams are tried in order, those recently
  unreachable last (failover).
- Outcomes and retries follow retry.py: only pending recipients are
  retried, with exponential backoff and jitter, until `max_age` after the
  message was accepted. A connection lost after the final dot means the
  upstream may have the message: it is retried anyway (at-least-once) and
  marked `possible_duplicate`.
- stop(grace): no more claims; in-flight deliveries get `grace` seconds;
  whatever is left goes back to 'queued' for the next start.

All spool writes go through the spool's group-commit writer, so the
claims and attempt records of many workers share commits (and need no
fsync of their own: see spool/writer.py, RELAXED_OPS).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import time
from typing import Callable

from smtpgate.delivery.pool import UpstreamPool
from smtpgate.delivery.retry import give_up, next_attempt_at, outcomes_from_result
from smtpgate.delivery.settings import DeliverySettings
from smtpgate.spool.ops import Claimed, RecipientOutcome
from smtpgate.spool.schema import State
from smtpgate.spool.store import Spool

# The scheduler is woken by intake, by finishing workers and by the earliest
# due time; this bound only covers changes nobody announced (a clock step).
MAX_SCHEDULER_SLEEP = 30.0  # seconds
# Messages claimed per worker, in flight or ready. A claim goes from the
# delivery process through the daemon to the spool writer and back (two
# pipes and a commit, a few ms under load); 10 workers' worth of 10 keeps
# 5,000 messages/s going for 20 ms. A claimed message shows 'sending'.
CLAIM_AHEAD = 10

# Specs larger than this are built in a thread.
LARGE_SPEC = 256 * 1024

# RFC 5321 4.5.3.1.8: the minimum a server must accept in one transaction.
MAX_RCPTS_PER_TRANSACTION = 100


def default_build(spec_json: bytes) -> bytes:
    """The RFC 5322 bytes of a stored spec (message/build.py, imported lazily)."""
    from smtpgate.message.build import build_message
    from smtpgate.message.spec import MessageSpec

    return build_message(MessageSpec.from_json(spec_json))


@dataclasses.dataclass
class _Attempt:
    """The result of one delivery attempt of one message."""

    outcomes: list[RecipientOutcome]
    upstream: str | None = None
    possible_duplicate: bool = False


class Delivery:
    """Scheduler + workers + pools; see the module docstring."""

    def __init__(
        self,
        spool: Spool,
        settings: DeliverySettings,
        log,
        *,
        build: Callable[[bytes], bytes] = default_build,
        rand: Callable[[], float] = random.random,
    ):
        self._spool = spool
        self._settings = settings
        self._log = log
        self._build = build
        self._rand = rand
        self._pools = [UpstreamPool(u, settings) for u in settings.upstreams]
        self._ready: asyncio.Queue[Claimed] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._scheduler: asyncio.Task | None = None
        self._workers: list[asyncio.Task] = []
        self._in_flight: dict[asyncio.Task, Claimed] = {}
        self._in_transaction: set[str] = set()  # ids inside conn.send right now
        self._recording: set[asyncio.Future] = set()  # attempts waiting for their commit
        self._stopping = False

    @property
    def pools(self) -> list[UpstreamPool]:
        return list(self._pools)

    async def start(self) -> None:
        """Start the scheduler and the workers."""
        self._stopping = False
        self._scheduler = asyncio.create_task(self._schedule(), name="delivery-scheduler")
        self._adjust_workers()
        self._log.info("delivery_started", upstreams=[p.name for p in self._pools], workers=len(self._workers))

    def wake(self) -> None:
        """Something was enqueued or made due: look at the spool now."""
        self._wake.set()

    def reload(self, settings: DeliverySettings) -> None:
        """Apply new settings: pools of unchanged upstreams (and their open
        connections) are kept; the others are closed as their connections
        come back."""
        old = {p.settings: p for p in self._pools}
        pools = []
        for upstream in settings.upstreams:
            pool = old.pop(upstream, None)
            if pool is not None and pool.size == settings.connections_per_upstream:
                pool.configure(settings)
            else:
                if pool is not None:
                    old[upstream] = pool  # resized: replaced, closed below
                pool = UpstreamPool(upstream, settings)
            pools.append(pool)
        for pool in old.values():
            asyncio.ensure_future(pool.close())
        self._settings = settings
        self._pools = pools
        if self._scheduler is not None and not self._stopping:
            self._adjust_workers()
        self._log.info("delivery_reloaded", upstreams=[p.name for p in pools], workers=settings.worker_count)
        self.wake()

    def _adjust_workers(self) -> None:
        self._workers = [w for w in self._workers if not w.done()]
        for i in range(len(self._workers), self._settings.worker_count):
            self._workers.append(asyncio.create_task(self._work(i), name=f"delivery-worker-{i}"))

    async def stop(self, grace: float) -> None:
        """Stop claiming; let deliveries in flight finish within `grace`
        seconds; put the rest back to 'queued'; close the pools."""
        self._stopping = True
        if self._scheduler is not None:
            # Not cancelled: a claim cancelled half-way would still be
            # committed by the writer, leaving its messages 'sending'.
            self._wake.set()
            await self._scheduler
            self._scheduler = None
        unstarted = []
        while not self._ready.empty():
            unstarted.append(self._ready.get_nowait().id)
        if unstarted:
            await self._spool.release(unstarted)
        busy = set(self._in_flight)
        for worker in self._workers:
            if worker not in busy:
                worker.cancel()  # idle: waiting for the ready queue
        if busy:
            _, late = await asyncio.wait(busy, timeout=grace)
            for worker in late:
                worker.cancel()  # its delivery puts the message back to 'queued'
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        await asyncio.gather(*self._recording, return_exceptions=True)  # finished attempts are stored
        await asyncio.gather(*(p.close() for p in self._pools))
        self._log.info("delivery_stopped", released=len(unstarted), unfinished=len(busy))

    # --- the scheduler -----------------------------------------------------

    async def _schedule(self) -> None:
        while not self._stopping:
            self._wake.clear()  # before looking: a wake-up during the claim is not lost
            workers = self._settings.worker_count
            # Up to `workers` in flight and CLAIM_AHEAD - 1 times that ready.
            # Claiming when a worker's count of room is free makes one
            # writer operation serve many messages, while the ready queue
            # covers the claim's round trip: workers never starve.
            room = CLAIM_AHEAD * workers - len(self._in_flight) - self._ready.qsize()
            timeout = None
            if room >= workers or (room > 0 and self._ready.empty()):
                try:
                    claimed = await self._spool.claim_due(time.time(), room)
                except Exception:
                    self._log.exception("claim_failed")
                    claimed, timeout = [], 1.0
                for message in claimed:
                    self._ready.put_nowait(message)
                if not claimed and timeout is None:
                    # Nothing due now: when is the next one? (With messages
                    # claimed, a finishing worker wakes us to claim again,
                    # and that claim finds whatever became due meanwhile.)
                    due = await self._spool.next_due()
                    if due is not None:
                        timeout = max(0.0, due - time.time())
            # Not claiming (little room): a finishing worker wakes us.
            sleep = MAX_SCHEDULER_SLEEP if timeout is None else min(timeout, MAX_SCHEDULER_SLEEP)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), sleep)

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
                self._wake.set()

    async def _deliver(self, message: Claimed) -> None:
        """One attempt at one message, recorded in the spool; if cancelled
        (stop after the grace period), the message goes back to 'queued'."""
        log = self._log.bind(message_id=message.id)
        try:
            attempt = await self._attempt(message, log)
        except asyncio.CancelledError:
            # Interrupted inside a transaction: the final dot may have gone out.
            in_transaction = message.id in self._in_transaction
            self._in_transaction.discard(message.id)
            await asyncio.shield(self._spool.release([message.id], possible_duplicate=in_transaction))
            log.info("delivery_interrupted", note="stopping; the message stays queued")
            raise
        except Exception:
            self._in_transaction.discard(message.id)
            log.exception("delivery_error")
            attempt = _Attempt(
                [RecipientOutcome(r, State.DEFERRED, "smtpgate: internal error, see the log") for r in message.recipients]
            )
        outcomes = attempt.outcomes
        next_attempt = None
        if any(o.state == State.DEFERRED for o in outcomes):
            next_attempt = next_attempt_at(
                time.time(), message.created, message.attempts + 1, self._settings, self._rand()
            )
            if next_attempt is None:
                outcomes = give_up(outcomes, self._settings.max_age)
        # The worker goes on to its next message while the record waits for
        # its group commit: a crash before that commit only means the message
        # is sent again (at-least-once), and the worker is not idle meanwhile.
        record = self._spool.record_attempt(
            message.id, outcomes, next_attempt=next_attempt, possible_duplicate=attempt.possible_duplicate
        )
        self._recording.add(record)
        record.add_done_callback(lambda done: self._recorded(done, message, attempt, outcomes, next_attempt, log))

    def _recorded(self, record: asyncio.Future, message: Claimed, attempt: _Attempt, outcomes, next_attempt, log):
        """Log one attempt once it is in the spool, with the resulting state."""
        self._recording.discard(record)
        error = "cancelled" if record.cancelled() else record.exception()
        if error is not None:
            log.error("record_attempt_failed", error=repr(error))  # stays 'sending' until restart
            return
        log.info(
            "delivery_attempt",
            state=record.result(),
            attempt=message.attempts + 1,
            upstream=attempt.upstream,
            replies={o.address: o.reply for o in outcomes},
            possible_duplicate=attempt.possible_duplicate or message.possible_duplicate,
            next_attempt=next_attempt,
        )

    def _ordered_pools(self) -> list[UpstreamPool]:
        """Upstreams in configured order, those recently unreachable last."""
        now = time.monotonic()
        return sorted(self._pools, key=lambda p: p.down_until > now)

    async def _attempt(self, message: Claimed, log) -> _Attempt:
        """One attempt at every pending recipient, in transactions of at most
        MAX_RCPTS_PER_TRANSACTION recipients; never raises for SMTP trouble,
        which becomes per-recipient outcomes."""
        try:
            if len(message.spec_json) > LARGE_SPEC:
                # Megabytes of attachments take tens of milliseconds to
                # encode: not on the loop, where every hand-off would wait.
                data = await asyncio.to_thread(self._build, message.spec_json)
            else:
                data = self._build(message.spec_json)
        except Exception as exc:
            log.error("message_build_failed", error=f"{type(exc).__name__}: {exc}")
            return _Attempt(
                [RecipientOutcome(r, State.FAILED, "smtpgate: the message could not be built") for r in message.recipients]
            )
        recipients = message.recipients
        if len(recipients) <= MAX_RCPTS_PER_TRANSACTION:
            return await self._transaction(message, recipients, data, log)
        # RFC 5321 4.5.3.1.8: a server need only take 100 recipients per
        # transaction and answers 452 to the rest; sending them in several
        # transactions now beats deferring them to a later attempt.
        combined = _Attempt([])
        for i in range(0, len(recipients), MAX_RCPTS_PER_TRANSACTION):
            part = await self._transaction(message, recipients[i:i + MAX_RCPTS_PER_TRANSACTION], data, log)
            combined.outcomes += part.outcomes
            combined.upstream = part.upstream or combined.upstream
            combined.possible_duplicate |= part.possible_duplicate
        return combined

    async def _transaction(self, message: Claimed, recipients: list[str], data: bytes, log) -> _Attempt:
        """Try the upstreams in order until one takes one transaction for `recipients`."""
        from smtpgate.smtp import SmtpMessageError, SmtpSessionError

        last_error = "smtpgate: no upstream configured"
        for pool in self._ordered_pools():
            await pool.take_token()
            fresh = False
            for _ in range(2):  # a second try only for a reused connection found dead
                try:
                    conn, reused = await pool.acquire(fresh=fresh)
                except SmtpSessionError as exc:
                    last_error = _reply_text(exc)
                    log.warning("upstream_unreachable", upstream=pool.name, error=last_error)
                    break  # next upstream
                interrupted = False
                self._in_transaction.add(message.id)
                try:
                    result = await conn.send(message.envelope_from, recipients, data)
                except SmtpMessageError as exc:
                    pool.release(conn)  # nothing was sent; the session is fine
                    reply = f"smtpgate: {exc}"
                    return _Attempt([RecipientOutcome(r, State.FAILED, reply) for r in recipients], pool.name)
                except SmtpSessionError as exc:
                    pool.discard(conn)
                    if reused and not exc.after_data_end and exc.reply is None and not fresh:
                        # An idle pooled connection the server had dropped:
                        # nothing reached it, so a fresh connection is safe.
                        log.info("pooled_connection_dead", upstream=pool.name, error=str(exc))
                        fresh = True
                        continue
                    log.warning("upstream_session_failed", upstream=pool.name, error=_reply_text(exc),
                                after_data_end=exc.after_data_end)
                    reply = _reply_text(exc)
                    return _Attempt(
                        [RecipientOutcome(r, State.DEFERRED, reply) for r in recipients],
                        pool.name,
                        possible_duplicate=exc.after_data_end,
                    )
                except BaseException:
                    interrupted = True  # _deliver reads the mark, then clears it
                    pool.discard(conn)
                    raise
                finally:
                    if not interrupted:
                        self._in_transaction.discard(message.id)
                pool.release(conn)
                return _Attempt(outcomes_from_result(result), pool.name)
        return _Attempt([RecipientOutcome(r, State.DEFERRED, last_error) for r in recipients])


def _reply_text(exc: Exception) -> str:
    """What STATUS shows for a session failure: the server's reply if there
    was one, else the error's text (which never holds credentials)."""
    reply = getattr(exc, "reply", None)
    return str(reply) if reply is not None else f"smtpgate: {exc}"
