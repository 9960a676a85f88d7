"""The operations on the spool, and what they give back.

They are the messages of two pipes: the daemon's spool (store.py) sends the
write operations to the writer process (writer.py) as `proc.calls.Call`s,
and the delivery process asks the daemon's spool for `ClaimDue`,
`RecordAttempts` (passed on unread), `Release`,
`RecordUpstreams`, `Expire`, `NextDue` and `CountDue`, and its webhook
sender for `WebhookDone` and `WebhookRetry`, the same way
(delivery/process.py). Each is made and read by name on both
sides.

`now` in an operation is the time it was submitted (the daemon spool's
clock): the time a message was created, an attempt recorded, a retry made.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from smtpgate.proc.framing import message

# --- the writer's operations -------------------------------------------------


@message
class Limits(NamedTuple):
    """The writer's settings that a reload may change."""

    max_queued: int
    keep_final: float  # seconds a final message is kept
    idempotency_window: float  # seconds an idempotency key is remembered
    # Whose messages' state changes go to the webhook outbox (webhooks/):
    # these callers', or every caller's (None: a top-level webhook_url).
    webhook_callers: frozenset[str] | None = frozenset()


@message
class Open(NamedTuple):
    """The first operation: open (creating) the database, recover, count."""

    db_path: str
    limits: Limits


@message
class Configure(NamedTuple):
    limits: Limits


@message
class Enqueue(NamedTuple):
    """Store a message for `caller`; answered with `Enqueued`, or CallerFull
    when the caller has `max_pending` (0: no cap) messages not yet final.
    With `claim`, a new message is stored 'sending', claimed for delivery
    in the same transaction (the daemon hands it to delivery itself).
    With `reply_to`, the writer answers `OK <id>` on the caller's connection
    itself once the commit returns (spool/lent.py)."""

    now: float
    spec_json: bytes
    envelope_from: str
    recipients: list[str]
    idempotency_key: str | None  # the caller's own: another caller's same key is another key
    caller: str
    max_pending: int
    claim: bool = False
    reply_to: ReplyTo | None = None


@message
class ReplyTo(NamedTuple):
    """Where the writer answers an Enqueue (spool/lent.py): the connection
    the daemon lent it as `key`, the SEND's number `seq` on it, and `after`,
    the number of the SEND before it whose OK the writer must have written
    first (0: none is waiting)."""

    key: int
    seq: int
    after: int


@message
class Unlend(NamedTuple):
    """The daemon is done with the connection it lent as `key` (not a call:
    the writer closes its copy as soon as it reads this)."""

    key: int


@message
class ClaimDue(NamedTuple):
    """Mark up to `limit` messages due by `due_by` 'sending'; answered with a list of `Claimed`."""

    due_by: float
    limit: int


@message
class RecordAttempt(NamedTuple):
    """One attempt's outcomes; answered with the message's new state."""

    now: float
    msg_id: str
    outcomes: list[RecipientOutcome]
    next_attempt: float | None
    possible_duplicate: bool
    # Who took the attempt (HOST:PORT, from the configuration; None: no
    # upstream was reached) and why it did not send every recipient (one
    # of delivery.health.REASONS; None: it did): counted by /metrics.
    upstream: str | None = None
    reason: str | None = None


@message
class RecordAttempts(NamedTuple):
    """The attempt records the delivery process gathers for a few
    milliseconds, answered with their new states in order. The list of
    RecordAttempt is packed once in the child (proc.framing.pack) and
    unpacked by the writer: the daemon passes it on unread (it unpacks it
    only to count the records for /metrics while the HTTP side runs), since
    unpickling the records and pickling them again cost it ~5 us per record
    (issue 15)."""

    records: bytes


@message
class Release(NamedTuple):
    """Claimed messages whose attempt did not finish go back to 'queued'.
    With `possible_duplicate` (their final dot went out) the attempt counts."""

    msg_ids: list[str]
    possible_duplicate: bool


@message
class UpstreamRow(NamedTuple):
    """One upstream's health as delivery sees it (delivery/health.py)."""

    name: str  # HOST:PORT
    state: str  # unknown|up|down
    since: float  # unix seconds: down (or up) since
    reason: str  # why it is down: the server's reply or the error ('' when up)
    failures: int  # the failure that took it down, and each failed probe since
    next_probe: float | None  # when it is tried again, while down


@message
class RecordUpstreams(NamedTuple):
    """Replace the recorded health of the upstreams (in configured order):
    what STATUS, STATS and the queue tool show of them."""

    rows: list[UpstreamRow]


@message
class Expire(NamedTuple):
    """While every upstream is down: fail the messages held for them (due by
    `now`) that were created at or before `created_before` (their max age
    has passed), each pending recipient with `reply`; answered with how many."""

    now: float
    created_before: float
    reply: str


@message
class Retry(NamedTuple):
    """Make one deferred message (or all, msg_id None) due at `now`."""

    now: float
    msg_id: str | None


@message
class Delete(NamedTuple):
    msg_id: str


# A purge deletes at most this many messages (and as many idempotency keys)
# in one transaction, each ~17 us of the writer with its recipients and
# key: the daemon's spool repeats it until less was left, so that a SEND
# arriving meanwhile waits ~17 ms (the first transaction of a purge, its
# pages cold, up to ~0.1 s), where one transaction of 30,000 took 0.5 s
# (a week-old day at 100 messages a second every 5 minutes;
# bench/housekeeping_cost.py).
PURGE_AT_ONCE = 1000


@message
class Purge(NamedTuple):
    """Delete the final messages and the idempotency keys that are old at
    `now`, the oldest first, at most `limit` of each; answered with how
    many of each."""

    now: float
    limit: int = PURGE_AT_ONCE


@message
class Recount(NamedTuple):
    """Count the messages per state again (the queue tool wrote the database)."""


@message
class NextDue(NamedTuple):
    """When the earliest queued or deferred message is due: a read, which the
    daemon's spool answers from its reader thread, not the writer."""


@message
class CountDue(NamedTuple):
    """How many messages are due by `now` (those an outage holds): a read."""

    now: float


@message
class WebhookDone(NamedTuple):
    """Events of the webhook outbox done with: each one's receiver answered
    2xx (`delivered`), or it was given up. They are deleted, and the next
    event of each one's message is due as it stands (outbox.done)."""

    events: list[tuple[int, str, bool]]  # (seq, message_id, delivered)


@message
class WebhookRetry(NamedTuple):
    """Events of the outbox to try again at `next_attempt`, with the later
    events of their messages (which wait for them). `error`: they were sent
    and failed (their attempts count); None: held while their receiver is
    down."""

    next_attempt: float
    events: list[tuple[int, str]]  # (seq, message_id)
    error: str | None


# --- what comes back -----------------------------------------------------------


@message
class Opened(NamedTuple):
    """The answer to Open."""

    caller_key: str  # the spool's secret for naming callers (hex; intake/callers.py)
    schema_found: int  # the schema version of the spool as it was opened (lower: upgraded)
    schema: int


@message
class Enqueued(NamedTuple):
    id: str
    existing: bool  # the idempotency key was seen within the window: nothing stored
    sent: int = 0  # bytes of its `OK <id>` the writer wrote on the caller's connection (ReplyTo)


@message
class Claimed(NamedTuple):
    """A message taken for delivery by ClaimDue (now in state 'sending')."""

    id: str
    spec_json: bytes
    envelope_from: str
    recipients: list[str]  # the pending ones only, in their original order
    attempts: int  # attempts made before this one
    created: float
    possible_duplicate: bool


@message
class RecipientOutcome(NamedTuple):
    """What one attempt did for one recipient: state sent|failed|deferred."""

    address: str
    state: str
    reply: str | None


@message
class Committed(NamedTuple):
    """The writer's answer to a batch of calls, once it is committed."""

    results: dict[int, Any]  # token -> the operation's value
    errors: dict[int, BaseException]  # token -> why the operation failed (SpoolError)
    finalized: list[str]  # messages that became sent or failed (or were deleted): WAIT returns
    state_counts: dict[str, int]  # messages per state, now
    # accepted, delivered, failed, deferred since the writer started; and
    # the webhook outbox's webhooks_delivered, webhooks_failed, webhooks_retried
    # (tries that failed and are made again; since then) and webhooks_pending
    # (events in it now)
    counters: dict[str, int]
    pending: dict[str, int]  # caller -> its messages not yet final, for the callers this batch changed
    commits: int
    durable_commits: int  # those with an fsync (synchronous=FULL)
    operations: int
    # caller -> its messages delivered, failed and attempts deferred since
    # the writer started, for the callers whose counts this batch changed
    caller_counters: dict[str, dict[str, int]] | None = None
