"""The spool's writer: a child process that makes every spool write, with
group commit. The daemon side (store.Spool) sends it operations and gets
their results back once they are committed.

Why a process and not a thread of the daemon: Python's sqlite3 module gives
up the GIL around every SQLite call and must take it back afterwards. Under
load the event loop holds the GIL nearly all the time, so a writer thread
waited for it after every statement (up to a 5 ms switch interval each
time): the commit cycle, and with it the hand-off of every SEND, stretched
to several milliseconds, and SQLite's work shared one core with the loop.
In a process of its own the writer runs SQLite and the fsync on the other
core and never waits for the loop.

Group commit: the writer takes every operation that has arrived, runs them
in ONE transaction, commits (one fsync of the WAL), and sends all their
results in one reply. While it commits, new operations pile up in the pipe
and form the next batch, so the number of messages per fsync grows with
the load.

The wire: frames (proc/framing.py) over the writer's stdin and stdout.
- daemon -> writer: `Call(token, op)`, op one of the operations of ops.py;
  the first is `Open`; and `Unlend(key)`, not a call (lent.py).
- writer -> daemon: one `Committed` per committed batch, holding the
  result or the error of each of its calls by token.
- callers' connections, lent by the daemon over the socket named by the
  writer's one argument: the writer writes the OK of an Enqueue with a
  ReplyTo itself, before the Committed (lent.py).
At EOF on stdin (the daemon closed the spool, or died) the writer finishes
what it has read and exits, so a `kill -9` of the daemon leaves no writer
behind; it inherits the spool's lock, so no new daemon opens the spool
before it is gone.
"""

from __future__ import annotations

import dataclasses
import os
import select
import socket
import sqlite3
import threading
import time

from smtpgate.proc.calls import Call
from smtpgate.proc.child import become_child
from smtpgate.proc.framing import encode, take_messages, unpack
from smtpgate.proc.policy import IdleSwitch
from smtpgate.spool import outbox, queries
from smtpgate.spool.dots import clear_dots, read_dots
from smtpgate.spool.errors import CallerFull, SpoolError, SpoolFull
from smtpgate.spool.lent import Lent
from smtpgate.spool.ops import (
    Claimed, ClaimDue, Committed, Configure, Delete, Enqueue, Enqueued, Expire, Limits, Open, Opened,
    Purge, Recount, RecordAttempt, RecordAttempts, RecordUpstreams, Release, Retry, Unlend, WebhookDone,
    WebhookRetry,
)
from smtpgate.spool.schema import (
    FINAL_STATES, IS_DUE, IS_FINAL, IS_UNFINISHED, STATES, UNFINISHED_STATES, State, migrate,
)
from smtpgate.spool.ulid import new_ulid

# A batch is bounded so that one commit never holds thousands of callers on
# one very large transaction (and the reply latency of the first caller).
MAX_BATCH = 1024
SQLITE_FULL = 13  # "database or disk is full": reported to the caller as SpoolFull
# The most one read of the pipe takes. A 1 MiB read allocated a bytes object
# above glibc's mmap threshold (128 KiB): an mmap, an mremap to what came and
# a munmap per batch, 20-30 us here, where 64 KiB comes from the heap in 2-4
# us (a SEND is ~2 KB).
READ_SIZE = 64 * 1024

# Checkpoints, off the request path. SQLite's own (wal_autocheckpoint) runs
# inside the COMMIT that takes the WAL past 1,000 pages: it copies them into
# the database file and fdatasyncs it before that COMMIT returns. A lone
# caller's commit writes about 5.5 pages, so one SEND in ~180 waited 1-3 ms
# longer for its OK (issue 15, bench/results.md). Here a thread with its own
# connection checkpoints after CHECKPOINT_COMMITS commits or
# CHECKPOINT_OPERATIONS operations (PASSIVE: it never holds up a commit, and
# sqlite3 gives up the GIL while it copies and syncs). The WAL starts over
# from its first page only after a checkpoint that left nothing behind,
# which one running beside commits seldom is; so once a checkpoint finds
# the WAL past WAL_PAGES, the writer checkpoints the few pages left itself
# when no call is waiting. A flood leaves it no such moment: SQLite's own
# checkpoint then bounds the WAL at twice WAL_PAGES, in the COMMIT that
# passes that, with only the pages the thread has not copied yet left to do.
CHECKPOINT_COMMITS = 100
CHECKPOINT_OPERATIONS = 1000
# Records stored in one run at most (never reached: the delivery process
# sends its records every few ms), so that a run's IN lists stay far below
# SQLite's 32,766 parameters.
MAX_RECORDS_AT_ONCE = 512
WAL_PAGES = 4096  # 16 MiB of 4 KiB pages
# A checkpoint's copying and its fsync of the database file took the CPU of
# a lone caller's SEND in the slow ones: on hold, its p99 was 2.1x the fsync
# floor's with checkpoints at the normal policy, 1.3-1.5x with the thread
# at SCHED_IDLE (proc/policy.py). Always at SCHED_IDLE, a saturated machine
# starved it and the WAL grew (end to end -19 %). So only a checkpoint
# after light commits (at most LIGHT_OPERATIONS operations a commit on
# average) runs at SCHED_IDLE, and one that is still running when the next
# is due is set back to the normal policy by the writer's main thread.
LIGHT_OPERATIONS = 3


class _Effects:
    """What a batch changes in memory; applied only once the batch commits."""

    def __init__(self) -> None:
        self.state_delta: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.finalized: list[str] = []
        self.pending_delta: dict[str, int] = {}  # caller -> change of its unfinished messages
        self.caller_delta: dict[tuple[str, str], int] = {}  # (caller, counter) -> its increase

    def move(self, old: str | None, new: str | None, caller: str | None = None) -> None:
        """A message of `caller` went from state `old` to `new` (None: not
        stored). The caller is needed only where a message starts or stops
        being unfinished."""
        if old is not None:
            self.state_delta[old] = self.state_delta.get(old, 0) - 1
        if new is not None:
            self.state_delta[new] = self.state_delta.get(new, 0) + 1
        if new in FINAL_STATES and old not in FINAL_STATES:
            self.count("delivered" if new == State.SENT else "failed", caller=caller)
        change = (new in UNFINISHED_STATES) - (old in UNFINISHED_STATES)
        if change:
            self.pending_delta[caller] = self.pending_delta.get(caller, 0) + change

    def count(self, name: str, n: int = 1, caller: str | None = None) -> None:
        """Add to a counter, and to `caller`'s if one is given (those of CALLER_COUNTERS)."""
        self.counters[name] = self.counters.get(name, 0) + n
        if caller is not None:
            key = (caller, name)
            self.caller_delta[key] = self.caller_delta.get(key, 0) + n


@dataclasses.dataclass
class Outcome:
    """What a batch gives its callers: results and errors by token, and
    the messages it made final."""

    results: dict = dataclasses.field(default_factory=dict)
    errors: dict = dataclasses.field(default_factory=dict)
    finalized: list = dataclasses.field(default_factory=list)
    callers: set = dataclasses.field(default_factory=set)  # whose pending count changed
    counted: set = dataclasses.field(default_factory=set)  # whose CALLER_COUNTERS changed


# Operations whose commit need not wait for an fsync: losing them in a power
# cut only means a message is delivered again (at-least-once), never that an
# accepted message is lost. A batch of only these commits with
# synchronous=NORMAL; the next durable commit (an enqueue) fsyncs the WAL and
# with it every earlier frame, so recovery always sees a prefix of commits.
# What the writer counts per caller as well (the callers of STATS and
# /metrics); each caller's is sent to the daemon after a batch changed it.
CALLER_COUNTERS = ("delivered", "failed", "deferred")

RELAXED_OPS = frozenset({ClaimDue, RecordAttempt, RecordAttempts, Release, RecordUpstreams, Expire,
                         Configure, WebhookDone, WebhookRetry})


class Writer:
    """The write connection and every write operation: `handlers` maps each
    operation type of ops.py to its method, (conn, effects, op) -> result."""

    def __init__(self, db_path: str, limits: Limits):
        self.db_path = db_path
        self.max_queued, self.keep_final, self.idempotency_window, self.webhook_callers = limits
        self.handlers = {
            Enqueue: self.enqueue,
            ClaimDue: self.claim_due,
            RecordAttempt: self.record_attempt,
            RecordAttempts: self.record_attempts,
            Release: self.release,
            Retry: self.retry,
            Delete: self.delete,
            Purge: self.purge,
            Configure: self.configure,
            Recount: self.recount,
            RecordUpstreams: self.record_upstreams,
            Expire: self.expire,
            WebhookDone: self.webhook_done,
            WebhookRetry: self.webhook_retry,
        }
        self.state_counts = {s: 0 for s in STATES}
        # Unfinished messages per caller, kept here like state_counts: the
        # writer alone sees every change, so the max_pending check needs no
        # read. Callers with none are left out.
        self.pending: dict[str, int] = {}
        self.caller_counters: dict[str, dict[str, int]] = {}  # caller -> CALLER_COUNTERS since start
        self.caller_key = ""
        self.schema = (0, 0)  # the schema version found at open, and now
        self.counters = {"accepted": 0, "delivered": 0, "failed": 0, "deferred": 0,
                         "webhooks_delivered": 0, "webhooks_failed": 0, "webhooks_retried": 0, "webhooks_pending": 0}
        self.commits = 0
        self.durable_commits = 0  # those with an fsync (synchronous=FULL)
        self.operations = 0
        self.sync_full = True
        self.conn: sqlite3.Connection | None = None
        self.checkpointer: Checkpointer | None = None
        self.unchecked = [0, 0]  # commits and operations since the last checkpoint began

    def open(self) -> None:
        """Create or upgrade the schema (schema.migrate), put messages left in
        'sending' by a crash back to 'queued', count the messages per state
        and the unfinished ones per caller."""
        conn = sqlite3.connect(self.db_path, isolation_level=None)
        # A writer of a daemon killed a moment ago may still be finishing
        # its last commit: wait for it rather than fail.
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=67108864")  # keep the WAL under 64 MiB
        conn.execute(f"PRAGMA wal_autocheckpoint={2 * WAL_PAGES}")  # only if the Checkpointer falls behind
        try:
            found, version = migrate(conn)
        except ValueError as exc:
            raise SpoolError(f"spool {self.db_path}: {exc}") from None
        self.schema = (found, version)
        (self.caller_key,) = conn.execute("SELECT value FROM meta WHERE key='caller_key'").fetchone()
        # Crash recovery: a 'sending' message was being delivered when the
        # process died; deliver it again (at-least-once). If its final dot
        # had gone out (spool/dots.py), the upstream may have it: flag it
        # and count that attempt.
        spool_dir = os.path.dirname(self.db_path) or "."
        dots = sorted(read_dots(spool_dir))
        conn.execute("BEGIN IMMEDIATE")
        flagged = self._hooked_of(outbox.unflagged(conn, dots))
        for start in range(0, len(dots), 500):  # SQLite's parameter limit
            chunk = dots[start:start + 500]
            conn.execute(
                "UPDATE messages SET possible_duplicate=1, attempts=attempts+1"
                f" WHERE state=? AND id IN ({','.join('?' * len(chunk))})", (State.SENDING, *chunk))
        conn.execute("UPDATE messages SET state=? WHERE state=?", (State.QUEUED, State.SENDING))
        outbox.add(conn, [(time.time(), msg_id, caller, outbox.POSSIBLE_DUPLICATE) for msg_id, caller in flagged])
        # The health recorded by a delivery process that is gone: nothing is
        # known of the upstreams until the next one records its own.
        conn.execute("DELETE FROM upstreams")
        conn.execute("COMMIT")  # synchronous=FULL: durable before the record goes
        clear_dots(spool_dir)
        for state, n in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"):
            self.state_counts[state] = n
        self.pending = dict(conn.execute(f"SELECT caller, COUNT(*) FROM messages WHERE {IS_UNFINISHED} GROUP BY caller"))
        self.counters["webhooks_pending"] = outbox.count(conn)
        # The database and WAL files were perhaps just created: make their
        # directory entries durable too.
        dir_fd = os.open(os.path.dirname(self.db_path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.conn = conn
        self.checkpointer = Checkpointer(self.db_path)

    def close(self) -> None:
        """The checkpointer's connection first: the last one to close
        checkpoints the whole WAL and removes it."""
        self.checkpointer.close()
        self.conn.close()

    def committed(self, outcome: Outcome, all_callers: bool = False) -> Committed:
        """The reply to a batch: its results and errors, and the figures after
        it (the pending counts of the callers it changed, or of all)."""
        callers = self.pending if all_callers else outcome.callers
        counted = self.caller_counters if all_callers else outcome.counted
        return Committed(outcome.results, outcome.errors, outcome.finalized, dict(self.state_counts),
                         dict(self.counters), {c: self.pending.get(c, 0) for c in callers},
                         self.commits, self.durable_commits, self.operations,
                         {c: dict(self.caller_counters[c]) for c in counted} if counted else None)

    # --- batches -------------------------------------------------------------

    def run_batch(self, batch: list[Call]) -> Outcome:
        """Run a batch of calls in one transaction. If something unexpected
        fails, roll back and run each call alone so only the culprit fails."""
        conn = self.conn
        effects = _Effects()
        outcome = Outcome()
        durable = not all(type(call.op) in RELAXED_OPS for call in batch)
        if durable != self.sync_full:
            conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self.sync_full = durable
        try:
            conn.execute("BEGIN IMMEDIATE")
            bulk = [call for call in batch if type(call.op) is Enqueue and call.op.idempotency_key is None]
            rest = batch
            if len(bulk) > 1:
                self._bulk_enqueue(conn, effects, bulk, outcome)
                rest = [call for call in batch
                        if not (type(call.op) is Enqueue and call.op.idempotency_key is None)]
            handlers, results, errors = self.handlers, outcome.results, outcome.errors
            for call in rest:
                try:
                    results[call.token] = handlers[type(call.op)](conn, effects, call.op)
                except SpoolError as exc:  # raised before the op wrote anything
                    errors[call.token] = exc
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                    exc = SpoolFull("the disk is full")
                elif not isinstance(exc, SpoolError):  # only our own errors cross the pipe
                    exc = SpoolError(f"{type(exc).__name__}: {exc}")
                return Outcome(errors={batch[0].token: exc})
            outcome = Outcome()
            for call in batch:
                one = self.run_batch([call])
                outcome.results.update(one.results)
                outcome.errors.update(one.errors)
                outcome.finalized += one.finalized
                outcome.callers |= one.callers
                outcome.counted |= one.counted
            return outcome
        self.commits += 1
        self.durable_commits += durable
        self.operations += len(batch)
        unchecked = self.unchecked
        unchecked[0] += 1
        unchecked[1] += len(batch)
        if (unchecked[0] >= CHECKPOINT_COMMITS or unchecked[1] >= CHECKPOINT_OPERATIONS) \
                and self.checkpointer.start(light=unchecked[1] <= LIGHT_OPERATIONS * unchecked[0]):
            unchecked[:] = [0, 0]
        for state, delta in effects.state_delta.items():
            self.state_counts[state] += delta
        for name, delta in effects.counters.items():
            self.counters[name] += delta
        pending = self.pending
        for caller, delta in effects.pending_delta.items():
            if delta:
                pending[caller] = pending.get(caller, 0) + delta
                if not pending[caller]:
                    del pending[caller]
                outcome.callers.add(caller)
        for (caller, name), delta in effects.caller_delta.items():
            counters = self.caller_counters.get(caller)
            if counters is None:
                counters = self.caller_counters[caller] = dict.fromkeys(CALLER_COUNTERS, 0)
            counters[name] += delta
            outcome.counted.add(caller)
        outcome.finalized = effects.finalized
        return outcome

    def _unfinished(self, effects: _Effects) -> int:
        return sum(
            self.state_counts[s] + effects.state_delta.get(s, 0) for s in UNFINISHED_STATES
        )

    def _check_room(self, effects: _Effects, op: Enqueue) -> None:
        """Raise SpoolFull when the spool, CallerFull when the caller, has no room for one more."""
        if self._unfinished(effects) >= self.max_queued:
            raise SpoolFull(f"{self.max_queued} messages queued")
        if op.max_pending:
            caller = op.caller
            if self.pending.get(caller, 0) + effects.pending_delta.get(caller, 0) >= op.max_pending:
                raise CallerFull(f"caller {caller} has {op.max_pending} messages not yet final (max_pending); "
                                 "retry once some are delivered")

    def _bulk_enqueue(self, conn, effects, calls: list[Call], outcome: Outcome) -> None:
        """Store many enqueues (those without an idempotency key) with one
        multi-row INSERT per table: a batch costs a handful of statements
        whatever its size."""
        messages, recipients = [], []
        for call in calls:
            op = call.op
            try:
                self._check_room(effects, op)
            except SpoolFull as exc:
                outcome.errors[call.token] = exc
                continue
            msg_id = new_ulid(op.now)
            state = State.SENDING if op.claim else State.QUEUED
            messages.append((msg_id, state, op.envelope_from, op.spec_json, op.caller, op.now, op.now, op.now))
            recipients.extend((msg_id, address, i) for i, address in enumerate(dict.fromkeys(op.recipients)))
            effects.move(None, state, op.caller)
            effects.count("accepted")
            outcome.results[call.token] = Enqueued(msg_id, False)
        for rows, head, row in (
            (messages, "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key, caller,"
                       " created, updated, next_attempt) VALUES ", "(?, ?, ?, ?, NULL, ?, ?, ?, ?)"),
            (recipients, "INSERT INTO recipients (message_id, address, position, state) VALUES ",
             f"(?, ?, ?, '{State.QUEUED}')"),
        ):
            # Chunks of 2**k rows (k <= 9): a few statement texts that the
            # sqlite3 module's statement cache keeps prepared (a text per
            # row count would evict the other statements), and never more
            # than SQLite's 32,766 parameters per statement.
            start = 0
            while start < len(rows):
                size = min(512, 1 << ((len(rows) - start).bit_length() - 1))
                chunk = rows[start:start + size]
                conn.execute(head + ",".join([row] * size), [v for r in chunk for v in r])
                start += size

    # --- operations: (conn, effects, op) -> result -------------------------

    def enqueue(self, conn, effects, op: Enqueue) -> Enqueued:
        now, key, caller = op.now, op.idempotency_key, op.caller
        if key is not None:
            # A repeat is answered even when the caller is at max_pending:
            # it stores nothing.
            row = conn.execute("SELECT message_id, created FROM idempotency WHERE caller=? AND key=?",
                               (caller, key)).fetchone()
            if row is not None and row[1] >= now - self.idempotency_window:
                return Enqueued(row[0], True)
        self._check_room(effects, op)
        msg_id = new_ulid(now)
        state = State.SENDING if op.claim else State.QUEUED
        conn.execute(
            "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key, caller,"
            " created, updated, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (msg_id, state, op.envelope_from, op.spec_json, key, caller, now, now, now),
        )
        conn.executemany(
            "INSERT INTO recipients (message_id, address, position, state) VALUES (?, ?, ?, ?)",
            [(msg_id, address, i, State.QUEUED) for i, address in enumerate(dict.fromkeys(op.recipients))],
        )
        if key is not None:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (caller, key, message_id, created) VALUES (?, ?, ?, ?)",
                (caller, key, msg_id, now),
            )
        effects.move(None, state, caller)
        effects.count("accepted")
        return Enqueued(msg_id, False)

    def claim_due(self, conn, effects, op: ClaimDue) -> list[Claimed]:
        rows = conn.execute(
            "SELECT id, state, spec, envelope_from, attempts, created, possible_duplicate"
            f" FROM messages WHERE {IS_DUE} AND next_attempt <= ?"
            " ORDER BY next_attempt LIMIT ?",
            (op.due_by, op.limit),
        ).fetchall()
        if not rows:
            return []
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))  # limit is small (a few times the workers)
        conn.execute(f"UPDATE messages SET state=? WHERE id IN ({marks})", (State.SENDING, *ids))
        pending: dict[str, list[str]] = {msg_id: [] for msg_id in ids}
        for msg_id, address in conn.execute(
            f"SELECT message_id, address FROM recipients WHERE message_id IN ({marks})"
            f" AND {IS_DUE} ORDER BY message_id, position",
            ids,
        ):
            pending[msg_id].append(address)
        claimed = []
        for msg_id, state, spec, envelope_from, attempts, created, dup in rows:
            effects.move(state, State.SENDING)
            claimed.append(Claimed(id=msg_id, spec_json=spec, envelope_from=envelope_from,
                                   recipients=pending[msg_id], attempts=attempts, created=created,
                                   possible_duplicate=bool(dup)))
        return claimed

    def record_attempt(self, conn, effects, op: RecordAttempt) -> str | None:
        return self._record_run(conn, effects, [op])[0]

    def record_attempts(self, conn, effects, op: RecordAttempts) -> list[str | None]:
        """The records of a batch in runs of distinct messages, four
        statements a run, not four per message: while relaying, the
        per-message statements were most of the writer's CPU per delivered
        message beyond intake's (issue 15). A record naming a message already
        in the run starts the next one: it must see the record before."""
        results: list[str | None] = []
        run: list[RecordAttempt] = []
        in_run: set[str] = set()
        for record in unpack(op.records):
            if len(run) == MAX_RECORDS_AT_ONCE or record.msg_id in in_run:
                results += self._record_run(conn, effects, run)
                run, in_run = [], set()
            run.append(record)
            in_run.add(record.msg_id)
        return results + (self._record_run(conn, effects, run) if run else [])

    def _record_run(self, conn, effects, records: list[RecordAttempt]) -> list[str | None]:
        """Records of distinct messages: each message's recipients, its new
        state (from all its recipients' states), its counters and its
        webhook events, in the records' order."""
        ids = [record.msg_id for record in records]
        # The IN list padded to a power of two (repeating an id changes
        # nothing): a few statement texts, which the sqlite3 module keeps
        # prepared, instead of one per run length.
        size = 1 << (len(ids) - 1).bit_length()
        marks = ",".join("?" * size)
        id_list = ids + ids[:1] * (size - len(ids))
        found = {msg_id: (state, caller, bool(dup)) for msg_id, state, caller, dup in conn.execute(
            f"SELECT id, state, caller, possible_duplicate FROM messages WHERE id IN ({marks})", id_list)}
        # Each message's recipients as they were (what decides its webhook
        # events: was one deferred by an earlier attempt), then as this
        # record leaves them, from the one read: a second read after the
        # UPDATE, and one more for the events, cost the writer a statement
        # each per run.
        recipients: dict[str, dict[str, str]] = {msg_id: {} for msg_id in found}
        for msg_id, address, state in conn.execute(
                f"SELECT message_id, address, state FROM recipients WHERE message_id IN ({marks})", id_list):
            recipients[msg_id][address] = state
        was = {msg_id: outbox.Before(State.DEFERRED in recipients[msg_id].values(), dup)
               for msg_id, (_, caller, dup) in found.items() if self._hooked(caller)}
        changes = []
        for record in records:
            now_states = recipients.get(record.msg_id)
            if now_states is None:
                continue
            for o in record.outcomes:
                if o.address in now_states:  # the UPDATE matches no other
                    now_states[o.address] = o.state
                    changes.append((o.state, o.reply, record.msg_id, o.address))
        conn.executemany("UPDATE recipients SET state=?, reply=? WHERE message_id=? AND address=?", changes)
        results: list[str | None] = []
        updates = []
        for record in records:
            msg_id = record.msg_id
            row = found.get(msg_id)
            if row is None:
                results.append(None)
                continue
            new_state = _attempt_state(set(recipients[msg_id].values()))
            if new_state == State.DEFERRED:
                effects.count("deferred", caller=row[1])
            updates.append((new_state, record.now, record.next_attempt if record.next_attempt is not None else record.now,
                            record.possible_duplicate, msg_id))
            effects.move(row[0], new_state, row[1])
            if new_state in FINAL_STATES:
                effects.finalized.append(msg_id)
            results.append(new_state)
        conn.executemany(
            "UPDATE messages SET state=?, attempts=attempts+1, updated=?, next_attempt=?,"
            " possible_duplicate=possible_duplicate OR ? WHERE id=?", updates)
        self._events(conn, effects, [
            (record.now, record.msg_id, found[record.msg_id][1], event_type)
            for record, new_state in zip(records, results, strict=True) if record.msg_id in was
            for event_type in outbox.attempt_events(was[record.msg_id], new_state, record.possible_duplicate)])
        return results

    def release(self, conn, effects, op: Release) -> int:
        flagged = self._hooked_of(outbox.unflagged(conn, op.msg_ids)) if op.possible_duplicate else []
        released = 0
        for msg_id in op.msg_ids:
            cur = conn.execute(
                "UPDATE messages SET state=?, possible_duplicate=possible_duplicate OR ?,"
                " attempts=attempts+? WHERE id=? AND state=?",
                (State.QUEUED, op.possible_duplicate, int(op.possible_duplicate), msg_id, State.SENDING),
            )
            if cur.rowcount:
                effects.move(State.SENDING, State.QUEUED)
                released += 1
        self._events(conn, effects, [(time.time(), msg_id, caller, outbox.POSSIBLE_DUPLICATE) for msg_id, caller in flagged])
        return released

    def record_upstreams(self, conn, effects, op: RecordUpstreams) -> None:
        conn.execute("DELETE FROM upstreams")
        conn.executemany("INSERT INTO upstreams (position, name, state, since, reason, failures, next_probe)"
                         " VALUES (?, ?, ?, ?, ?, ?, ?)", [(i, *row) for i, row in enumerate(op.rows)])

    def expire(self, conn, effects, op: Expire) -> int:
        # Their states before (RETURNING would give the new one: each move
        # would be failed to failed, and the counts per state and caller
        # would not change). Through messages_waiting (created <= ?): only
        # the rows past max_age are read, where messages_pending (every
        # held one is due) read all 100,000 held in 0.15 s, once a minute,
        # with every SEND's commit waiting behind it.
        held = f"{IS_DUE} AND next_attempt <= ? AND created <= ?"
        rows = conn.execute(f"SELECT id, state, caller FROM messages WHERE {held}",
                            (op.now, op.created_before)).fetchall()
        conn.execute(f"UPDATE messages SET state=?, updated=? WHERE {held}",
                     (State.FAILED, op.now, op.now, op.created_before))
        conn.executemany(
            f"UPDATE recipients SET state=?, reply=? WHERE message_id=? AND {IS_DUE}",
            [(State.FAILED, op.reply, msg_id) for msg_id, _, _ in rows],
        )
        for msg_id, state, caller in rows:
            effects.move(state, State.FAILED, caller)
            effects.finalized.append(msg_id)
        self._events(conn, effects, [(op.now, msg_id, caller, outbox.FAILED) for msg_id, _, caller in rows
                                     if self._hooked(caller)])
        return len(rows)

    def webhook_done(self, conn, effects, op: WebhookDone) -> None:
        for counter, delivered in (("webhooks_delivered", True), ("webhooks_failed", False)):
            deleted = outbox.done(conn, [seq for seq, _, d in op.events if d is delivered])
            effects.count(counter, deleted)
            effects.count("webhooks_pending", -deleted)

    def webhook_retry(self, conn, effects, op: WebhookRetry) -> None:
        outbox.retry(conn, op.next_attempt, op.events, op.error)
        if op.error is not None:  # tried and failed (not held unsent behind a down receiver)
            effects.count("webhooks_retried", len(op.events))

    def _hooked(self, caller: str) -> bool:
        """Whether `caller`'s state changes go to the webhook outbox."""
        return self.webhook_callers is None or caller in self.webhook_callers

    def _hooked_of(self, messages: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(msg_id, caller) for msg_id, caller in messages if self._hooked(caller)]

    def _events(self, conn, effects, events: list[tuple[float, str, str, str]]) -> None:
        """Add webhook events, each (now, message id, caller, type)."""
        if events:
            effects.count("webhooks_pending", outbox.add(conn, events))

    def retry(self, conn, effects, op: Retry) -> int:
        return queries.retry(conn, op.now, op.msg_id)

    def delete(self, conn, effects, op: Delete) -> bool:
        deleted = queries.delete(conn, op.msg_id)
        if deleted is None:
            return False
        effects.move(deleted.state, None, deleted.caller)
        effects.finalized.append(op.msg_id)  # WAIT on it returns (NOT_FOUND)
        return True

    def purge(self, conn, effects, op: Purge) -> tuple[int, int]:
        # The oldest `limit` by the messages_final index (updated, then
        # rowid): the same ones for freeze and the DELETE, in this transaction.
        oldest = (f"messages.id IN (SELECT id FROM messages WHERE {IS_FINAL} AND updated < ?"
                  " ORDER BY updated LIMIT ?)")
        params = (op.now - self.keep_final, op.limit)
        outbox.freeze(conn, oldest, params)
        rows = conn.execute(f"DELETE FROM messages WHERE {oldest} RETURNING id, state", params).fetchall()
        conn.executemany("DELETE FROM recipients WHERE message_id=?", [(msg_id,) for msg_id, _ in rows])
        for _, state in rows:
            effects.move(state, None)
        keys = conn.execute(
            "DELETE FROM idempotency WHERE (caller, key) IN"
            " (SELECT caller, key FROM idempotency WHERE created < ? ORDER BY created LIMIT ?)",
            (op.now - self.idempotency_window, op.limit)).rowcount
        return len(rows), keys

    def configure(self, conn, effects, op: Configure) -> None:
        """New limits from a reloaded configuration; writes nothing."""
        self.max_queued, self.keep_final, self.idempotency_window, self.webhook_callers = op.limits

    def recount(self, conn, effects, op: Recount) -> dict[str, int]:
        counts = {s: 0 for s in STATES}
        counts.update(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
        for state in STATES:  # so that current + delta == counted once committed
            effects.state_delta[state] = counts[state] - self.state_counts[state]
        pending = dict(conn.execute(f"SELECT caller, COUNT(*) FROM messages WHERE {IS_UNFINISHED} GROUP BY caller"))
        for caller in pending.keys() | self.pending.keys():
            effects.pending_delta[caller] = pending.get(caller, 0) - self.pending.get(caller, 0)
        return counts


class Checkpointer:
    """Copies the WAL back into the database file beside the writer's
    commits, on a thread with its own connection (see CHECKPOINT_COMMITS).
    `wal_pages` is the WAL's length found by the last checkpoint."""

    def __init__(self, db_path: str):
        self.conn = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        # The database file is fsynced before the WAL pages it took may be
        # overwritten (FULL: the WAL is synced first too).
        self.conn.execute("PRAGMA synchronous=FULL")
        self.wal_pages = 0
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="checkpointer", daemon=True)
        self._thread.start()
        self.policy = IdleSwitch(lambda: [self._thread.native_id])

    def start(self, light: bool = False) -> bool:
        """Checkpoint on the thread, at SCHED_IDLE after `light` commits;
        False if it is at it already, which is then set back to the normal
        policy (LIGHT_OPERATIONS)."""
        if not self._idle.is_set():
            self.policy.set(False, 0.0)
            return False
        self.policy.set(light, 0.0)
        self._idle.clear()
        self._wanted.set()
        return True

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                self.checkpoint(self.conn)
            finally:
                self._idle.set()

    def checkpoint(self, conn: sqlite3.Connection) -> None:
        """A PASSIVE checkpoint on `conn`: the thread's, or the writer's
        own to let the WAL start over. A failure (a full disk) leaves the
        WAL longer, never a commit undone."""
        try:
            _, pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error:
            return
        self.wal_pages = pages

    def wal_long(self) -> bool:
        """Whether the last checkpoint found the WAL past WAL_PAGES, and
        none runs now."""
        return self.wal_pages >= WAL_PAGES and self._idle.is_set()

    def finish(self, conn: sqlite3.Connection) -> None:
        """The writer's own checkpoint, when the thread is not at one, of
        the pages written since the thread's: nothing is appended
        meanwhile, so the WAL's next commit starts over from its first page."""
        self.checkpoint(conn)
        self.wal_pages = 0

    def close(self) -> None:
        self._idle.wait()
        self._closing = True
        self._wanted.set()
        self._thread.join()
        self.conn.close()


# --- the process -----------------------------------------------------------


class _Frames:
    """Reads the daemon's frames of operations from a file descriptor;
    `Unlend`s among them go to `lent` at once."""

    def __init__(self, fd: int, lent: Lent | None = None):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False
        self.lent = lent

    def waiting(self) -> bool:
        """Whether a call is arriving: part of a frame read, or bytes (or
        EOF) to read."""
        return bool(self.buf) or bool(select.select([self.fd], [], [], 0)[0])

    def read(self, block: bool) -> list[Call]:
        """The calls of every complete frame available; with `block`, wait
        until there is at least one (or EOF)."""
        items = []
        while not self.eof and len(items) < MAX_BATCH:  # a flood never postpones the commit
            if not block and not select.select([self.fd], [], [], 0)[0]:
                break
            chunk = os.read(self.fd, READ_SIZE)
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
            for item in take_messages(self.buf):
                if type(item) is Unlend:
                    self.lent.unlend(item.key)
                else:
                    items.append(item)
            if items:
                block = False
        return items


def _attempt_state(states: set[str]) -> str:
    """A message's state after an attempt, from its recipients' states."""
    if states <= {State.SENT}:
        return State.SENT
    if states <= {State.SENT, State.FAILED}:
        return State.FAILED
    return State.DEFERRED


def _send(fd: int, committed: Committed) -> None:
    head, data = encode([committed])
    view = memoryview(head + data)
    while view:
        view = view[os.write(fd, view):]


def main(argv: list[str]) -> int:
    rfd, wfd = become_child("smtpgate-spool")
    # The database, -wal and -shm hold message bodies: 0600 whatever the
    # umask the daemon was started with (SQLite creates them 0644 & ~umask).
    os.umask(0o077)
    # The socket the daemon lends callers' connections by (lent.py), if any.
    lent = Lent(socket.socket(fileno=int(argv[0]))) if argv else None
    frames = _Frames(rfd, lent)
    opening = frames.read(block=True)
    if not opening:
        return 0
    call = opening[0]
    assert type(call.op) is Open, call
    writer = Writer(call.op.db_path, call.op.limits)
    try:
        writer.open()
    except (sqlite3.Error, OSError, SpoolError) as exc:
        error = SpoolError(f"cannot open spool {writer.db_path}: {exc}")
        _send(wfd, writer.committed(Outcome(errors={call.token: error})))
        return 1
    _send(wfd, writer.committed(Outcome(results={call.token: Opened(writer.caller_key, *writer.schema)}), all_callers=True))
    pending = opening[1:]
    checkpointer = writer.checkpointer
    while True:
        if not pending and checkpointer.wal_long() and not frames.waiting():
            checkpointer.finish(writer.conn)  # idle: no call waits for it
        pending += frames.read(block=not pending)
        if not pending:  # EOF and nothing left to do
            break
        batch, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
        try:
            outcome = writer.run_batch(batch)
        except Exception as exc:  # e.g. ROLLBACK failed: fail the batch, keep serving
            error = SpoolError(f"{type(exc).__name__}: {exc}")
            outcome = Outcome(errors={call.token: error for call in batch})
        else:
            # Only here, once nothing can fail the batch any more: an OK
            # written must never be followed by an error for the same call.
            if lent is not None:
                lent.answer(batch, outcome.results)
        _send(wfd, writer.committed(outcome))
    writer.close()
    if lent is not None:
        lent.close()
    return 0

