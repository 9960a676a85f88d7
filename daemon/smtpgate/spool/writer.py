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
- daemon -> writer: operations (token, op, now, args); the first one is
  (token, "open", now, (settings,)).
- writer -> daemon: one answer per committed batch, (results, finalized,
  state_counts, counters, commit_stats), results a list of
  (token, value, error).
At EOF on stdin (the daemon closed the spool, or died) the writer finishes
what it has read and exits, so a `kill -9` of the daemon leaves no writer
behind; it inherits the spool's lock, so no new daemon opens the spool
before it is gone.
"""

from __future__ import annotations

import os
import select
import sqlite3
import sys

from smtpgate.proc.child import become_child
from smtpgate.proc.framing import encode, take_messages
from smtpgate.spool import queries
from smtpgate.spool.errors import SpoolError, SpoolFull
from smtpgate.spool.schema import FINAL_STATES, IS_DUE, IS_FINAL, SCHEMA, SCHEMA_VERSION, STATES, UNFINISHED_STATES, State
from smtpgate.spool.ulid import UlidGenerator

# A batch is bounded so that one commit never holds thousands of callers on
# one very large transaction (and the reply latency of the first caller).
MAX_BATCH = 1024
SQLITE_FULL = 13  # "database or disk is full": reported to the caller as SpoolFull


class _Effects:
    """What a batch changes in memory; applied only once the batch commits."""

    def __init__(self) -> None:
        self.state_delta: dict[str, int] = {}
        self.counters: dict[str, int] = {}
        self.finalized: list[str] = []

    def move(self, old: str | None, new: str | None) -> None:
        if old is not None:
            self.state_delta[old] = self.state_delta.get(old, 0) - 1
        if new is not None:
            self.state_delta[new] = self.state_delta.get(new, 0) + 1
        if new in FINAL_STATES and old not in FINAL_STATES:
            name = "delivered" if new == State.SENT else "failed"
            self.counters[name] = self.counters.get(name, 0) + 1

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


# Operations whose commit need not wait for an fsync: losing them in a power
# cut only means a message is delivered again (at-least-once), never that an
# accepted message is lost. A batch of only these commits with
# synchronous=NORMAL; the next durable commit (an enqueue) fsyncs the WAL and
# with it every earlier frame, so recovery always sees a prefix of commits.
RELAXED_OPS = frozenset({"claim_due", "record_attempt", "release", "configure"})


class Writer:
    """The write connection and every write operation (op_* methods)."""

    def __init__(self, db_path: str, max_queued: int, keep_final: float, idempotency_window: float):
        self.db_path = db_path
        self.max_queued = max_queued
        self.keep_final = keep_final
        self.idempotency_window = idempotency_window
        self.ulid = UlidGenerator()
        self.state_counts = {s: 0 for s in STATES}
        self.counters = {"accepted": 0, "delivered": 0, "failed": 0, "deferred": 0}
        self.commits = 0
        self.durable_commits = 0  # those with an fsync (synchronous=FULL)
        self.operations = 0
        self.sync_full = True
        self.conn: sqlite3.Connection | None = None

    def open(self) -> None:
        """Create the schema, put messages left in 'sending' by a crash back to
        'queued', count the messages per state."""
        conn = sqlite3.connect(self.db_path, isolation_level=None)
        # A writer of a daemon killed a moment ago may still be finishing
        # its last commit: wait for it rather than fail.
        conn.execute("PRAGMA busy_timeout=10000")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA journal_size_limit=67108864")  # keep the WAL under 64 MiB
        conn.executescript(SCHEMA)
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))
        (version,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version != SCHEMA_VERSION:
            raise SpoolError(f"spool {self.db_path} has schema {version}, expected {SCHEMA_VERSION}")
        # Crash recovery: a 'sending' message was being delivered when the
        # process died; deliver it again (at-least-once).
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE messages SET state=? WHERE state=?", (State.QUEUED, State.SENDING))
        conn.execute("COMMIT")
        for state, n in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"):
            self.state_counts[state] = n
        # The database and WAL files were perhaps just created: make their
        # directory entries durable too.
        dir_fd = os.open(os.path.dirname(self.db_path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.conn = conn

    def snapshot(self) -> tuple:
        return (dict(self.state_counts), dict(self.counters),
                (self.commits, self.durable_commits, self.operations))

    # --- batches -------------------------------------------------------------

    def run_batch(self, batch: list) -> tuple[list, list[str]]:
        """Run a batch of (token, op, now, args) in one transaction; returns
        (results, finalized ids). If something unexpected fails, roll back
        and run each operation alone so only the culprit fails."""
        conn = self.conn
        effects = _Effects()
        results = []
        durable = not all(op in RELAXED_OPS for _, op, _, _ in batch)
        if durable != self.sync_full:
            conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self.sync_full = durable
        try:
            conn.execute("BEGIN IMMEDIATE")
            bulk = [item for item in batch if item[1] == "enqueue" and item[3][3] is None]
            rest = batch
            if len(bulk) > 1:
                results = self._bulk_enqueue(conn, effects, bulk)
                rest = [item for item in batch if not (item[1] == "enqueue" and item[3][3] is None)]
            for token, op, now, args in rest:
                try:
                    results.append((token, getattr(self, "op_" + op)(conn, effects, now, *args), None))
                except SpoolError as exc:  # raised before the op wrote anything
                    results.append((token, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                    exc = SpoolFull("the disk is full")
                elif not isinstance(exc, SpoolError):  # only our own errors cross the pipe
                    exc = SpoolError(f"{type(exc).__name__}: {exc}")
                return [(batch[0][0], None, exc)], []
            results, finalized = [], []
            for item in batch:
                one, done = self.run_batch([item])
                results += one
                finalized += done
            return results, finalized
        self.commits += 1
        self.durable_commits += durable
        self.operations += len(batch)
        for state, delta in effects.state_delta.items():
            self.state_counts[state] += delta
        for name, delta in effects.counters.items():
            self.counters[name] += delta
        return results, effects.finalized

    def _unfinished(self, effects: _Effects) -> int:
        return sum(
            self.state_counts[s] + effects.state_delta.get(s, 0) for s in UNFINISHED_STATES
        )

    def _bulk_enqueue(self, conn, effects, items: list) -> list:
        """Store many enqueues (those without an idempotency key) with one
        multi-row INSERT per table: a batch costs a handful of statements
        whatever its size."""
        results, messages, recipients = [], [], []
        for token, _, now, (spec_json, envelope_from, rcpts, _key) in items:
            if self._unfinished(effects) >= self.max_queued:
                results.append((token, None, SpoolFull(f"{self.max_queued} messages queued")))
                continue
            msg_id = self.ulid.new(now)
            messages.append((msg_id, envelope_from, spec_json, now, now, now))
            recipients.extend((msg_id, address, i) for i, address in enumerate(dict.fromkeys(rcpts)))
            effects.move(None, State.QUEUED)
            effects.count("accepted")
            results.append((token, (msg_id, False), None))
        for rows, head, row in (
            (messages, "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key,"
                       " created, updated, next_attempt) VALUES ", f"(?, '{State.QUEUED}', ?, ?, NULL, ?, ?, ?)"),
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
        return results

    # --- operations: (conn, effects, now, *args) -> result -------------------

    def op_enqueue(self, conn, effects, now, spec_json, envelope_from, recipients, key):
        if key is not None:
            row = conn.execute("SELECT message_id, created FROM idempotency WHERE key=?", (key,)).fetchone()
            if row is not None and row[1] >= now - self.idempotency_window:
                return row[0], True
        if self._unfinished(effects) >= self.max_queued:
            raise SpoolFull(f"{self.max_queued} messages queued")
        msg_id = self.ulid.new(now)
        conn.execute(
            "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key,"
            " created, updated, next_attempt) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (msg_id, State.QUEUED, envelope_from, spec_json, key, now, now, now),
        )
        conn.executemany(
            "INSERT INTO recipients (message_id, address, position, state) VALUES (?, ?, ?, ?)",
            [(msg_id, address, i, State.QUEUED) for i, address in enumerate(dict.fromkeys(recipients))],
        )
        if key is not None:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (key, message_id, created) VALUES (?, ?, ?)",
                (key, msg_id, now),
            )
        effects.move(None, State.QUEUED)
        effects.count("accepted")
        return msg_id, False

    def op_claim_due(self, conn, effects, _now, due_by, limit):
        rows = conn.execute(
            "SELECT id, state, spec, envelope_from, attempts, created, possible_duplicate"
            f" FROM messages WHERE {IS_DUE} AND next_attempt <= ?"
            " ORDER BY next_attempt LIMIT ?",
            (due_by, limit),
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
            claimed.append((msg_id, spec, envelope_from, pending[msg_id], attempts, created, bool(dup)))
        return claimed

    def op_record_attempt(self, conn, effects, now, msg_id, outcomes, next_attempt, possible_duplicate):
        row = conn.execute("SELECT state FROM messages WHERE id=?", (msg_id,)).fetchone()
        if row is None:
            return None
        conn.executemany(
            "UPDATE recipients SET state=?, reply=? WHERE message_id=? AND address=?",
            [(state, reply, msg_id, address) for address, state, reply in outcomes],
        )
        states = {s for (s,) in conn.execute("SELECT state FROM recipients WHERE message_id=?", (msg_id,))}
        if states <= {State.SENT}:
            new_state = State.SENT
        elif states <= {State.SENT, State.FAILED}:
            new_state = State.FAILED
        else:
            new_state = State.DEFERRED
            effects.count("deferred")
        conn.execute(
            "UPDATE messages SET state=?, attempts=attempts+1, updated=?, next_attempt=?,"
            " possible_duplicate=possible_duplicate OR ? WHERE id=?",
            (new_state, now, next_attempt if next_attempt is not None else now, possible_duplicate, msg_id),
        )
        effects.move(row[0], new_state)
        if new_state in FINAL_STATES:
            effects.finalized.append(msg_id)
        return new_state

    def op_release(self, conn, effects, _now, msg_ids, possible_duplicate):
        released = 0
        for msg_id in msg_ids:
            cur = conn.execute(
                "UPDATE messages SET state=?, possible_duplicate=possible_duplicate OR ?"
                " WHERE id=? AND state=?",
                (State.QUEUED, possible_duplicate, msg_id, State.SENDING),
            )
            if cur.rowcount:
                effects.move(State.SENDING, State.QUEUED)
                released += 1
        return released

    def op_retry(self, conn, effects, now, msg_id):
        return queries.retry(conn, now, msg_id)

    def op_delete(self, conn, effects, _now, msg_id):
        state = queries.delete(conn, msg_id)
        if state is None:
            return False
        effects.move(state, None)
        effects.finalized.append(msg_id)  # WAIT on it returns (NOT_FOUND)
        return True

    def op_purge(self, conn, effects, _now, purge_at):
        rows = conn.execute(
            f"DELETE FROM messages WHERE {IS_FINAL} AND updated < ? RETURNING id, state",
            (purge_at - self.keep_final,),
        ).fetchall()
        conn.executemany("DELETE FROM recipients WHERE message_id=?", [(msg_id,) for msg_id, _ in rows])
        for _, state in rows:
            effects.move(state, None)
        keys = conn.execute(
            "DELETE FROM idempotency WHERE created < ?", (purge_at - self.idempotency_window,)
        ).rowcount
        return len(rows), keys

    def op_configure(self, conn, effects, _now, settings):
        """New limits from a reloaded configuration; writes nothing."""
        self.max_queued = settings["max_queued"]
        self.keep_final = settings["keep_final"]
        self.idempotency_window = settings["idempotency_window"]

    def op_recount(self, conn, effects, _now):
        counts = {s: 0 for s in STATES}
        counts.update(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
        for state in STATES:  # so that current + delta == counted once committed
            effects.state_delta[state] = counts[state] - self.state_counts[state]
        return counts


# --- the process -----------------------------------------------------------


class _Frames:
    """Reads the daemon's frames of operations from a file descriptor."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = bytearray()
        self.eof = False

    def read(self, block: bool) -> list:
        """The operations of every complete frame available; with `block`,
        wait until there is at least one (or EOF)."""
        items = []
        while not self.eof and len(items) < MAX_BATCH:  # a flood never postpones the commit
            if not block and not select.select([self.fd], [], [], 0)[0]:
                break
            chunk = os.read(self.fd, 1 << 20)
            if not chunk:
                self.eof = True
                break
            self.buf += chunk
            items += take_messages(self.buf)
            if items:
                block = False
        return items


def _send(fd: int, answer: tuple) -> None:
    head, data = encode([answer])
    view = memoryview(head + data)
    while view:
        view = view[os.write(fd, view):]


def main() -> int:
    rfd, wfd = become_child("smtpgate-spool")
    frames = _Frames(rfd)
    opening = frames.read(block=True)
    if not opening:
        return 0
    token, op, _, (settings,) = opening[0]
    assert op == "open", op
    writer = Writer(**settings)
    try:
        writer.open()
    except (sqlite3.Error, OSError, SpoolError) as exc:
        _send(wfd, ([(token, None, SpoolError(f"cannot open spool {writer.db_path}: {exc}"))], [], *writer.snapshot()))
        return 1
    _send(wfd, ([(token, None, None)], [], *writer.snapshot()))
    pending = opening[1:]
    while True:
        pending += frames.read(block=not pending)
        if not pending:  # EOF and nothing left to do
            break
        batch, pending = pending[:MAX_BATCH], pending[MAX_BATCH:]
        try:
            results, finalized = writer.run_batch(batch)
        except Exception as exc:  # e.g. ROLLBACK failed: fail the batch, keep serving
            error = SpoolError(f"{type(exc).__name__}: {exc}")
            results, finalized = [(token, None, error) for token, _, _, _ in batch], []
        _send(wfd, (results, finalized, *writer.snapshot()))
    writer.conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
