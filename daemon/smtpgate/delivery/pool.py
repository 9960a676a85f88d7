"""The connections to one upstream: a pool of reused SMTP connections, its
rate limit (a token bucket) and its health (down for a while after it
could not be reached).

- At most `connections_per_upstream` connections; NOOP before reusing one
  idle for more than `idle_noop_after` seconds; RSET between messages (the
  client sends it, pipelined with the next MAIL, when a transaction may
  still be open, RFC 5321 4.1.1.5).
- A token bucket for `rate_per_minute` (the limit 163.com, QQ and Gmail
  impose). A message waiting for its token is already claimed: STATUS
  says 'sending'.
- An upstream that cannot be reached (connect, TLS, greeting, AUTH
  failure) is marked down for `upstream_down_for` seconds; the scheduler
  tries the others first meanwhile (failover).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from smtpgate.delivery.settings import DeliverySettings

if TYPE_CHECKING:
    from smtpgate.smtp import SmtpConnection, UpstreamSettings

QUIT_TIMEOUT = 5.0  # polite QUIT of pooled connections at stop


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


class UpstreamPool:
    """Reused connections to one upstream, its rate limit and its health."""

    def __init__(self, settings: UpstreamSettings, delivery_settings: DeliverySettings):
        self.settings = settings
        self.name = f"{settings.host}:{settings.port}"
        self.idle: list[SmtpConnection] = []
        self.size = delivery_settings.connections_per_upstream
        self.slots = asyncio.Semaphore(self.size)
        self.retired = False  # removed by a reload: connections close when released
        self.down_until = 0.0  # monotonic
        self.opened = 0  # connections opened so far (tests and logs)
        self.configure(delivery_settings)

    def configure(self, delivery_settings: DeliverySettings) -> None:
        self.idle_noop_after = delivery_settings.idle_noop_after
        self.down_for = delivery_settings.upstream_down_for
        rate = delivery_settings.rate_per_minute
        self.bucket = TokenBucket(rate, delivery_settings.rate_burst, time.monotonic()) if rate else None

    async def take_token(self) -> None:
        """Wait for this upstream's rate limit to allow one more message."""
        if self.bucket is not None:
            delay = self.bucket.reserve(time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)

    async def acquire(self, fresh: bool = False) -> tuple[SmtpConnection, bool]:
        """A usable connection and whether it was reused; opens a new one when
        no idle one answers (or `fresh`). Raises SmtpSessionError if the
        upstream cannot be reached (and marks it down)."""
        from smtpgate.smtp import SmtpConnection, SmtpSessionError

        await self.slots.acquire()
        try:
            while self.idle and not fresh:
                conn = self.idle.pop()
                if conn.usable and time.monotonic() - conn.last_used > self.idle_noop_after:
                    await conn.noop()  # closes it if it no longer answers 250
                if conn.usable:
                    return conn, True
                conn.close()
            try:
                conn = await SmtpConnection.open(self.settings)
            except SmtpSessionError:
                self.down_until = time.monotonic() + self.down_for
                raise
            self.opened += 1
            self.down_until = 0.0
            return conn, False
        except BaseException:
            self.slots.release()
            raise

    def release(self, conn: SmtpConnection) -> None:
        """Keep a connection for the next message, or drop it if unusable.
        No RSET here: the client sends one itself, pipelined with the next
        MAIL, when the last transaction did not end (RFC 5321 4.1.1.5); and
        a release that never waits cannot be interrupted after a message
        went out (stop would then take it for unsent)."""
        if conn.usable and not self.retired:
            self.idle.append(conn)
        else:
            conn.close()
        self.slots.release()

    def discard(self, conn: SmtpConnection) -> None:
        conn.close()
        self.slots.release()

    async def close(self) -> None:
        """QUIT every idle connection (bounded in time); connections in use
        are closed when released."""
        self.retired = True
        idle, self.idle = self.idle, []
        if idle:
            await asyncio.wait([asyncio.ensure_future(c.quit()) for c in idle], timeout=QUIT_TIMEOUT)
            for conn in idle:
                conn.close()
