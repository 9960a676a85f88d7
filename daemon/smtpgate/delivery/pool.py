"""The connections to one upstream: a pool of reused SMTP connections, its
rate limit (a token bucket) and its health (health.py).

- At most `connections_per_upstream` connections in use; when every one
  is, a message goes behind one whose upstream offers PIPELINING, its
  commands pipelined behind the final dot of the message in flight there
  (smtp/client.py): two messages on it at once. Preferably behind a dot
  still to go: the commands then share its write (socket writes of the
  delivery process per message 1.4 -> 1.1 against smtp-sink). NOOP before reusing
  one idle for more than `idle_noop_after` seconds; QUIT to one idle for
  `idle_timeout`; RSET between messages (the client sends it, pipelined
  with the next MAIL, when a transaction may still be open, RFC 5321
  4.1.1.5).
- A token bucket for `rate_per_minute` (the limit 163.com, QQ and Gmail
  impose). A message waiting for its token is already claimed: STATUS
  says 'sending'.
- Connections open as the upstream's health allows: concurrently while it
  is up, one at a time while unknown (so a refused login is refused once),
  not at all while it is down, but for `probe()`. A session that cannot be
  set up marks it down, one that is set up marks it up; `on_health(pool,
  previous)` (previous: the Health before) hears of every failure and of
  every change to up, and `on_session(name, reason)` of every session set
  up (reason None) or not (health.REASONS): what /metrics counts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from typing import TYPE_CHECKING, Callable

from smtpgate.delivery.health import DOWN, UNKNOWN, UP, Health, failure_reason
from smtpgate.delivery.settings import DeliverySettings

if TYPE_CHECKING:
    from smtpgate.smtp import SmtpConnection, SmtpSessionError, UpstreamSettings

QUIT_TIMEOUT = 5.0  # polite QUIT of an idle pooled connection (idle_timeout, stop)


class TokenBucket:
    """Rate limit: `rate_per_minute` tokens a minute, at most `burst` saved.

    reserve() always takes a token and says how long to wait before using it;
    the count may go negative, which queues later callers behind earlier
    ones in order (no thundering herd when a token frees up)."""

    def __init__(self, rate_per_minute: float, burst: int = 1, now: float = 0.0):
        self.interval = 60.0 / rate_per_minute
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = now

    def reserve(self, now: float) -> float:
        """Take one token at time `now`; returns seconds to wait (0: go now)."""
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) / self.interval)
        self._stamp = now
        self._tokens -= 1
        return 0.0 if self._tokens >= 0 else -self._tokens * self.interval


class UpstreamDown(Exception):
    """The upstream is down: nothing is tried before its next probe. The
    text is what the recipients of a message held for it show."""


class UpstreamPool:
    """Reused connections to one upstream, its rate limit and its health."""

    def __init__(self, settings: UpstreamSettings, delivery_settings: DeliverySettings, *,
                 on_health: Callable[[UpstreamPool, Health], None] | None = None,
                 on_session: Callable[[str, str | None], None] | None = None,
                 rand: Callable[[], float] = random.random):
        self.settings = settings
        self.name = f"{settings.host}:{settings.port}"
        self.health = Health(self.name)
        self.idle: list[SmtpConnection] = []
        self.in_use: dict[SmtpConnection, int] = {}  # connection -> messages on it (2 when pipelined)
        self.size = delivery_settings.connections_per_upstream
        self.slots = asyncio.Semaphore(self.size)
        self.retired = False  # removed by a reload: connections close when released
        self.opened = 0  # connections opened so far (tests and logs)
        self._opening = asyncio.Lock()  # held by the one connection attempt allowed while not up
        self._on_health = on_health or (lambda pool, before: None)
        self._on_session = on_session or (lambda name, reason: None)
        self._rand = rand
        self._reaper: asyncio.TimerHandle | None = None
        self._quitting: set[asyncio.Future] = set()
        self.configure(delivery_settings)

    def configure(self, delivery_settings: DeliverySettings) -> None:
        self.idle_noop_after = delivery_settings.idle_noop_after
        self.idle_timeout = delivery_settings.idle_timeout
        self.probe_base, self.probe_max = delivery_settings.probe_base, delivery_settings.probe_max
        rate = delivery_settings.rate_per_minute
        self.bucket = TokenBucket(rate, delivery_settings.rate_burst, time.monotonic()) if rate else None

    def take_token(self) -> float:
        """Take this upstream's rate limit's next token: the seconds to wait
        before the message may go (0: now, and no limit set). Not a
        coroutine: delivery calls it for every message, mostly unlimited."""
        if self.bucket is None:
            return 0.0
        return self.bucket.reserve(time.monotonic())

    async def acquire(self, fresh: bool = False) -> tuple[SmtpConnection, bool]:
        """A usable connection and whether it was reused; opens a new one when
        no idle one answers (or `fresh`). When every connection is in use,
        one that takes a message behind the one in flight. Raises
        UpstreamDown while the upstream is down, SmtpSessionError if a
        session cannot be set up (the upstream is then down)."""
        if not fresh and self.slots.locked() and self.health.state == UP:
            # A connection carrying two has one waiting behind already
            # (workers are twice the connections: usually all of them).
            # Better behind a message whose final dot is still to go: our
            # commands then leave in the dot's write, not in one of their own.
            chosen = None
            for conn, carried in self.in_use.items():
                if carried == 1 and conn.takes_next:
                    chosen = chosen or conn
                    if not conn.dot_queued:
                        chosen = conn
                        break
            if chosen is not None:
                self.in_use[chosen] = 2
                return chosen, True
        conn, reused = await self._acquire_slot(fresh)
        self.in_use[conn] = 1
        return conn, reused

    async def _acquire_slot(self, fresh: bool) -> tuple[SmtpConnection, bool]:
        await self.slots.acquire()
        try:
            if self.health.state == DOWN:
                raise UpstreamDown(self.health.reply)
            while self.idle and not fresh:
                conn = self.idle.pop()
                if conn.usable and time.monotonic() - conn.last_used > self.idle_noop_after:
                    await conn.noop()  # closes it if it no longer answers 250
                if conn.usable:
                    return conn, True
                conn.close()
            if self.health.state != UP:
                async with self._opening:  # one attempt at a time; those waiting learn its outcome
                    if self.health.state == DOWN:
                        raise UpstreamDown(self.health.reply)
                    if self.health.state == UNKNOWN:
                        return await self._open(), False
            return await self._open(), False
        except BaseException:
            self.slots.release()
            raise

    async def probe(self) -> bool:
        """One attempt to set up a session with a down upstream; if it works,
        the upstream is up and the connection joins the pool."""
        from smtpgate.smtp import SmtpSessionError

        async with self.slots, self._opening:
            try:
                conn = await self._open(probe=True)
            except SmtpSessionError:
                return False
            self._keep(conn)
        return True

    async def _open(self, probe: bool = False) -> SmtpConnection:
        from smtpgate.smtp import SmtpConnection, SmtpSessionError

        try:
            conn = await SmtpConnection.open(self.settings)
        except SmtpSessionError as exc:
            self._on_session(self.name, failure_reason(exc))
            self.session_failed(exc, probe)
            raise
        self.opened += 1
        self._on_session(self.name, None)
        if self.health.state != UP:
            previous = dataclasses.replace(self.health)
            self.health.succeeded(time.time())
            self._on_health(self, previous)
        return conn

    def session_failed(self, exc: SmtpSessionError, probe: bool = False, in_transaction: bool = False) -> None:
        """A session could not be set up, or the server ended it with 421:
        the upstream is down, and its idle connections are dropped. Once it
        is down only a probe's failure counts: the others were started
        before (ten connections failing at once are one failure, not ten
        steps of backoff)."""
        if self.health.state == DOWN and not probe:
            return
        previous = dataclasses.replace(self.health)
        self.health.failed(time.time(), exc, self.probe_base, self.probe_max, self._rand(), in_transaction)
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        self._on_health(self, previous)

    def release(self, conn: SmtpConnection) -> None:
        """Keep a connection for the next message, or drop it if unusable.
        No RSET here: the client sends one itself, pipelined with the next
        MAIL, when the last transaction did not end (RFC 5321 4.1.1.5); and
        a release that never waits cannot be interrupted after a message
        went out (stop would then take it for unsent)."""
        if self._let_go(conn):
            self._keep(conn)
            self.slots.release()

    def _keep(self, conn: SmtpConnection) -> None:
        if conn.usable and not self.retired and self.health.state == UP:
            self.idle.append(conn)
            if self._reaper is None:
                self._reaper = asyncio.get_running_loop().call_later(self.idle_timeout, self._reap)
        else:
            conn.close()

    def discard(self, conn: SmtpConnection) -> None:
        conn.close()
        if self._let_go(conn):
            self.slots.release()

    def _let_go(self, conn: SmtpConnection) -> bool:
        """One message is done with `conn`: True if it was the last one."""
        left = self.in_use.pop(conn) - 1
        if left:
            self.in_use[conn] = left
        return not left

    def _reap(self) -> None:
        """QUIT the connections idle for `idle_timeout`; look again when the
        next one will have been."""
        self._reaper = None
        now = time.monotonic()
        stale = [conn for conn in self.idle if now - conn.last_used >= self.idle_timeout]
        self.idle = [conn for conn in self.idle if conn not in stale]
        for conn in stale:
            self._quit(conn)
        if self.idle:
            due = min(conn.last_used for conn in self.idle) + self.idle_timeout
            self._reaper = asyncio.get_running_loop().call_later(max(0.0, due - now), self._reap)

    def _quit(self, conn: SmtpConnection) -> None:
        """QUIT in the background, bounded: a silent server cannot keep it."""
        done = asyncio.ensure_future(asyncio.wait_for(conn.quit(), QUIT_TIMEOUT))
        self._quitting.add(done)

        def finished(fut: asyncio.Future) -> None:
            self._quitting.discard(fut)
            conn.close()
            if not fut.cancelled():
                fut.exception()  # a QUIT that timed out is nothing to report

        done.add_done_callback(finished)

    async def close(self, polite: bool = True) -> None:
        """QUIT every idle connection (bounded in time), or just drop them;
        connections in use are closed when released."""
        self.retired = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self.idle = self.idle, []
        for conn in idle:
            if polite:
                self._quit(conn)
            else:
                conn.close()
        if not polite:
            for quitting in self._quitting:
                quitting.cancel()
        if self._quitting:
            await asyncio.wait(list(self._quitting))
