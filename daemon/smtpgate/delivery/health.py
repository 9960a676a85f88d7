"""The health of one upstream: up, or down since a time for a reason, and
when it is probed next.

Why: an upstream that cannot be reached is the failure a relay exists for.
Trying every message on its own against it cost a connection (and, with
AUTH, a login: how provider accounts get locked) per message per retry
round; 100,000 queued messages kept two cores busy and left the queue
waiting for each message's own timer once the upstream was back. As
Postfix marks a dead destination and defers its queue without trying,
delivery keeps one state per upstream:

- unknown: nothing tried since the start (or a reload that changed it).
  Connections are opened one at a time until one works, so a refused
  login costs one login, not one per worker.
- up: a session was set up. Connections open concurrently.
- down: a session could not be set up (connect, TLS, greeting, EHLO,
  STARTTLS, AUTH: the session-level failures) or the server sent 421 at
  any point. No connection is opened but the probe: one attempt through
  EHLO, STARTTLS and AUTH per backoff step, `probe_base` doubling to
  `probe_max` with jitter (retry.retry_delay, as for messages). A probe
  that works puts its connection in the pool and the upstream is up.

Replies to MAIL, RCPT and DATA are about a message and leave the upstream
up; those messages keep their own retry schedule (retry.py). While every
upstream is down, due messages are held without an attempt (scheduler.py;
the reads show them, spool/queries.py).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from smtpgate.delivery.retry import retry_delay
from smtpgate.spool.ops import RecipientOutcome, UpstreamRow
from smtpgate.spool.queries import down_reply
from smtpgate.spool.schema import State

if TYPE_CHECKING:
    from smtpgate.smtp import SmtpSessionError

UNKNOWN, UP, DOWN = "unknown", "up", "down"


def failure_kind(exc: SmtpSessionError) -> str:
    """A word for the log and STATS: why a session could not be had."""
    from smtpgate.smtp import (
        SmtpAuthError, SmtpConnectError, SmtpConnectionLost, SmtpProtocolError, SmtpServerRefused,
        SmtpStartTlsUnavailable, SmtpTimeout, SmtpTlsError,
    )

    if isinstance(exc, SmtpConnectError):
        # asyncio's connect timeout is the cause of a connect that timed out.
        return "timeout" if isinstance(exc.__cause__, TimeoutError) else "connect"
    kinds = ((SmtpTimeout, "timeout"), (SmtpTlsError, "tls"), (SmtpStartTlsUnavailable, "tls"),
             (SmtpAuthError, "auth"), (SmtpServerRefused, "refused"), (SmtpConnectionLost, "lost"),
             (SmtpProtocolError, "protocol"))
    return next((kind for cls, kind in kinds if isinstance(exc, cls)), "error")


# Why delivery's work with an upstream failed, for /metrics (a fixed set:
# a label's values must be bounded): a TCP connection not made (refused,
# unreachable), no reply in time, TLS (handshake, certificate, STARTTLS
# refused or missing), AUTH refused, the connection dropped, the SMTP
# grammar broken, a 4xx or 5xx reply (to the greeting, EHLO, MAIL, RCPT,
# DATA, the final dot; a 421 at any point), a message that cannot be
# sent as it is, anything else.
REASONS = ("connect", "timeout", "tls", "auth", "dropped", "protocol", "reply_4xx", "reply_5xx", "message", "other")
_REASON_OF_KIND = {"connect": "connect", "timeout": "timeout", "tls": "tls", "auth": "auth", "lost": "dropped",
                   "protocol": "protocol"}


def failure_reason(exc: SmtpSessionError) -> str:
    """The REASONS word of a session error."""
    kind = failure_kind(exc)
    if kind == "refused":
        code = exc.reply.code if exc.reply is not None else 0
        return "reply_4xx" if 400 <= code < 500 else "reply_5xx" if 500 <= code < 600 else "protocol"
    return _REASON_OF_KIND.get(kind, "other")


def outcomes_reason(outcomes: list[RecipientOutcome]) -> str | None:
    """The REASONS word of a transaction's replies: reply_4xx if a recipient
    was deferred, else reply_5xx if one failed; None if all were sent."""
    states = {o.state for o in outcomes}
    if State.DEFERRED in states:
        return "reply_4xx"
    return "reply_5xx" if State.FAILED in states else None


def failure_text(exc: SmtpSessionError) -> str:
    """The server's reply if there was one, else the error's text (which
    never holds credentials)."""
    return str(exc.reply) if exc.reply is not None else str(exc)


@dataclasses.dataclass
class Health:
    """One upstream's state; times are unix seconds (they are shown)."""

    name: str
    state: str = UNKNOWN
    since: float = 0.0  # when it went down, or came up
    reason: str = ""  # the last failure: the server's reply or the error
    kind: str = ""  # failure_kind of the last failure
    failures: int = 0  # the failure that took it down, and each failed probe since
    next_probe: float = 0.0  # while down

    def failed(self, now: float, exc: SmtpSessionError, base: float, cap: float, rand: float,
               in_transaction: bool = False) -> None:
        """A session could not be had at `now`: down (since now, if it was
        not), probed next after the backoff step of its failures in a row.
        `in_transaction`: the server's reply came in one message's
        transaction, and its text may name that message's recipients (say
        "421 4.7.0 <ceo@bank.example> ..."): the reason, which STATS and
        every caller's held messages show, keeps only its codes."""
        if self.state != DOWN:
            self.state, self.since = DOWN, now
        self.failures += 1
        self.reason, self.kind = failure_text(exc), failure_kind(exc)
        if in_transaction and exc.reply is not None:
            codes = " ".join(str(part) for part in (exc.reply.code, exc.reply.enhanced) if part)
            self.reason = f"{codes} (in a message's transaction: its text is in the log)"
        self.next_probe = now + retry_delay(self.failures, base, cap, rand)

    def succeeded(self, now: float) -> None:
        """A session was set up at `now`: up."""
        if self.state != UP:
            self.state, self.since = UP, now
        self.failures, self.reason, self.kind = 0, "", ""

    @property
    def reply(self) -> str:
        """What the recipients of a message held for this upstream show."""
        return down_reply(self.name, self.since, self.reason)

    def row(self) -> UpstreamRow:
        return UpstreamRow(self.name, self.state, self.since, self.reason, self.failures,
                           self.next_probe if self.state == DOWN else None)
