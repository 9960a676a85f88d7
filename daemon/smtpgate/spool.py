"""The durable spool: SQLite in WAL mode, one writer thread, group commit.

Why SQLite in WAL mode: one append to the WAL and one fsync make a whole
batch of SENDs durable, whatever their number, and the record of a message
(its spec, its recipients, their replies) stays in one place that queries
(STATUS, queue list, due messages) can read without a file per message.
`synchronous=FULL` makes SQLite fsync the WAL at every commit, so a commit
survives a power loss (with `NORMAL` the last commits could be lost).

Group commit: every write (enqueue, claim, record_attempt, retry, delete,
purge) is an operation put on a queue with an asyncio future. The writer
thread takes everything pending, runs it in ONE transaction, commits (one
fsync), then resolves all the futures with one `call_soon_threadsafe`. While
it is fsyncing, new requests pile up and form the next batch: under load the
number of fsyncs per second stays near the disk's rate (about 3,500/s here)
while the number of messages per fsync grows with the concurrency.

Reads (STATUS, STATS counts, queue list) use a second connection in a
reader thread; WAL lets them run while the writer commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import os
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

STATES = ("queued", "sending", "deferred", "sent", "failed")
FINAL_STATES = ("sent", "failed")
PENDING_RECIPIENT_STATES = ("queued", "deferred")

# A batch is bounded so that one commit never holds thousands of callers on
# one very large transaction (and the reply latency of the first caller).
MAX_BATCH = 1024
DISK_CHECK_INTERVAL = 1.0  # seconds between two statvfs calls
SQLITE_FULL = 13  # "database or disk is full": reported to the caller as SpoolFull

SCHEMA_VERSION = "1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,              -- ULID, time-ordered
    state TEXT NOT NULL,              -- queued|sending|deferred|sent|failed
    envelope_from TEXT NOT NULL,
    spec BLOB NOT NULL,               -- MessageSpec.to_json(), opaque here
    idempotency_key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,            -- unix seconds
    updated REAL NOT NULL,
    next_attempt REAL NOT NULL,
    possible_duplicate INTEGER NOT NULL DEFAULT 0
);
-- Partial indexes: claim_due walks the pending messages in next_attempt
-- order (no sort of the whole backlog), purge walks the final ones by age.
CREATE INDEX IF NOT EXISTS messages_pending ON messages (next_attempt)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_final ON messages (updated)
    WHERE state IN ('sent', 'failed');
CREATE TABLE IF NOT EXISTS recipients (
    message_id TEXT NOT NULL,
    address TEXT NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,              -- queued|deferred|sent|failed
    reply TEXT,                       -- the upstream's last reply
    PRIMARY KEY (message_id, address)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created);
"""


class SpoolError(Exception):
    """Base of the spool's errors."""


class SpoolFull(SpoolError):
    """Back-pressure: too many messages queued or too little disk; nothing stored."""


class SpoolLocked(SpoolError):
    """Another process holds the spool directory."""


@dataclasses.dataclass(frozen=True)
class Claimed:
    """A message taken for delivery by claim_due (now in state 'sending')."""

    id: str
    spec_json: bytes
    envelope_from: str
    recipients: list[str]  # the pending ones only, in their original order
    attempts: int  # attempts made before this one
    created: float
    possible_duplicate: bool


@dataclasses.dataclass(frozen=True)
class RecipientOutcome:
    """What one attempt did for one recipient: state sent|failed|deferred."""

    address: str
    state: str
    reply: str | None


# --- ULID: 48-bit milliseconds + 80 random bits, Crockford base32 ---------

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


class UlidGenerator:
    """Monotonic ULIDs (ulid spec): within one millisecond the random part is
    incremented, so ids sort in creation order. Not thread-safe: the writer
    thread owns it."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._last_ms = -1
        self._last_rand = 0

    def new(self) -> str:
        ms = int(self._clock() * 1000)
        if ms <= self._last_ms:
            ms = self._last_ms
            self._last_rand = (self._last_rand + 1) & ((1 << 80) - 1)
        else:
            self._last_ms = ms
            self._last_rand = int.from_bytes(os.urandom(10), "big")
        value = (ms << 80) | self._last_rand
        chars = []
        for _ in range(26):  # 26 * 5 = 130 bits, the top 2 are zero
            chars.append(_CROCKFORD[value & 31])
            value >>= 5
        return "".join(reversed(chars))


def rfc3339(ts: float) -> str:
    """Unix seconds -> '2026-11-26T16:23:29.123Z' (RFC 3339, UTC)."""
    text = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


# --- the writer's batch bookkeeping ---------------------------------------


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
            self.counters["delivered" if new == "sent" else "failed"] = (
                self.counters.get("delivered" if new == "sent" else "failed", 0) + 1
            )

    def count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


_STOP = object()


class Spool:
    """The message store; see the module docstring. All methods are async and
    must be called from the event loop that called open()."""

    def __init__(
        self,
        path_dir: str | os.PathLike,
        *,
        max_queued: int = 100_000,
        min_free_bytes: int = 100 * 1024 * 1024,
        keep_final: float = 7 * 86400.0,
        idempotency_window: float = 86400.0,
        clock: Callable[[], float] = time.time,
    ):
        self.path_dir = os.fspath(path_dir)
        self.db_path = os.path.join(self.path_dir, "spool.sqlite3")
        self.max_queued = max_queued
        self.min_free_bytes = min_free_bytes
        self.keep_final = keep_final
        self.idempotency_window = idempotency_window
        self._clock = clock
        self._ulid = UlidGenerator(clock)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._writer: threading.Thread | None = None
        self._write_conn: sqlite3.Connection | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self._disk_checked_at = float("-inf")
        self._disk_low = False
        # Owned by the writer thread; others only read snapshots.
        self._state_counts = {s: 0 for s in STATES}
        self.counters = {"accepted": 0, "delivered": 0, "failed": 0, "deferred": 0}
        # Group-commit evidence for tests and the bench: commits vs operations.
        self.commits = 0
        self.durable_commits = 0  # those with an fsync (synchronous=FULL)
        self.operations = 0
        self._sync_full = True

    # --- life cycle --------------------------------------------------------

    async def open(self) -> None:
        """Create and lock the directory, create the schema, put messages left
        in 'sending' by a crash back to 'queued', start the writer thread.
        Raises SpoolLocked if another process uses the directory."""
        self._loop = asyncio.get_running_loop()
        await self._loop.run_in_executor(None, self._open_blocking)
        self._writer = threading.Thread(target=self._writer_main, name="spool-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")

    def _open_blocking(self) -> None:
        os.makedirs(self.path_dir, mode=0o700, exist_ok=True)
        lock_path = os.path.join(self.path_dir, "lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise SpoolLocked(
                f"spool directory {self.path_dir} is in use by another smtpgate (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

        conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
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
        conn.execute("UPDATE messages SET state='queued' WHERE state='sending'")
        conn.execute("COMMIT")
        for state, n in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"):
            self._state_counts[state] = n
        # The database and WAL files were perhaps just created: make their
        # directory entries durable too.
        dir_fd = os.open(self.path_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._write_conn = conn
        self._read_conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
        self._read_conn.execute("PRAGMA query_only=1")

    async def close(self) -> None:
        """Finish the pending writes, stop the threads, release the lock."""
        if self._writer is None:
            return
        self._queue.put(_STOP)
        await self._loop.run_in_executor(None, self._writer.join)
        self._writer = None
        self._reader.shutdown(wait=True)
        self._read_conn.close()
        self._write_conn.close()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = None
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    # --- the writer thread -------------------------------------------------

    def _submit(self, fn: Callable, *args: Any) -> asyncio.Future:
        if self._writer is None:
            raise SpoolError("spool is not open")
        fut = self._loop.create_future()
        self._queue.put((fn, args, fut))
        return fut

    def _writer_main(self) -> None:
        stopping = False
        while not stopping:
            batch = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                else:
                    batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self._run_batch(batch)
                except Exception as exc:  # e.g. ROLLBACK failed: fail the batch, keep serving
                    self._resolve([(fut, None, exc) for _, _, fut in batch], [])

    def _run_batch(self, batch: list) -> None:
        """Run a batch in one transaction; if something unexpected fails,
        roll back and run each operation alone so only the culprit fails."""
        conn = self._write_conn
        effects = _Effects()
        outcomes = []
        durable = not all(fn in _RELAXED_OPS for fn, _, _ in batch)
        if durable != self._sync_full:
            conn.execute("PRAGMA synchronous=FULL" if durable else "PRAGMA synchronous=NORMAL")
            self._sync_full = durable
        try:
            conn.execute("BEGIN IMMEDIATE")
            rest = batch
            bulk = [item for item in batch if item[0] is Spool._op_enqueue and item[1][3] is None]
            if len(bulk) > 1:
                outcomes = self._bulk_enqueue(conn, effects, bulk)
                rest = [item for item in batch if not (item[0] is Spool._op_enqueue and item[1][3] is None)]
            for fn, args, fut in rest:
                try:
                    outcomes.append((fut, fn(self, conn, effects, *args), None))
                except SpoolError as exc:  # raised before the op wrote anything
                    outcomes.append((fut, None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                if getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL:
                    exc = SpoolFull("the disk is full")
                self._resolve([(batch[0][2], None, exc)], [])
                return
            for item in batch:
                self._run_batch([item])
            return
        self.commits += 1
        self.durable_commits += durable
        self.operations += len(batch)
        for state, delta in effects.state_delta.items():
            self._state_counts[state] += delta
        for name, delta in effects.counters.items():
            self.counters[name] += delta
        self._resolve(outcomes, effects.finalized)

    def _bulk_enqueue(self, conn, effects, items: list) -> list:
        """Store many enqueues (those without an idempotency key) with one
        multi-row INSERT per table.

        Why: the sqlite3 module gives up the GIL around every SQLite call,
        and the event loop takes it each time, so the writer waited for the
        GIL once per statement: two statements per message cost ~150 us per
        enqueue under load against ~30 us alone. A batch now costs a handful
        of statements whatever its size."""
        now = self._clock()
        outcomes, messages, recipients = [], [], []
        for _, (spec_json, envelope_from, rcpts, _key), fut in items:
            if self._unfinished(effects) >= self.max_queued:
                outcomes.append((fut, None, SpoolFull(f"{self.max_queued} messages queued")))
                continue
            msg_id = self._ulid.new()
            messages.append((msg_id, envelope_from, spec_json, now, now, now))
            recipients.extend((msg_id, address, i) for i, address in enumerate(dict.fromkeys(rcpts)))
            effects.move(None, "queued")
            effects.count("accepted")
            outcomes.append((fut, (msg_id, False), None))
        for rows, head, row in (
            (messages, "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key,"
                       " created, updated, next_attempt) VALUES ", "(?, 'queued', ?, ?, NULL, ?, ?, ?)"),
            (recipients, "INSERT INTO recipients (message_id, address, position, state) VALUES ",
             "(?, ?, ?, 'queued')"),
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
        return outcomes

    def _resolve(self, outcomes: list, finalized: list[str]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
            self._loop.call_soon_threadsafe(self._on_committed, outcomes, finalized)

    def _on_committed(self, outcomes: list, finalized: list[str]) -> None:
        """On the loop: hand the results to the callers, wake WAIT."""
        for fut, result, exc in outcomes:
            if fut.done():  # cancelled by its caller, or already failed
                continue
            if exc is None:
                fut.set_result(result)
            else:
                fut.set_exception(exc)
        for msg_id in finalized:
            for fut in self._waiters.pop(msg_id, ()):
                if not fut.done():
                    fut.set_result(None)

    def _unfinished(self, effects: _Effects) -> int:
        return sum(
            self._state_counts[s] + effects.state_delta.get(s, 0)
            for s in ("queued", "sending", "deferred")
        )

    # --- writes (each _op_* runs in the writer thread inside a batch) --------

    def enqueue(
        self,
        spec_json: bytes,
        envelope_from: str,
        recipients: list[str],
        idempotency_key: str | None = None,
    ) -> asyncio.Future:
        """Store a message durably: a future of (id, existing), done once committed.
        existing is True when idempotency_key was seen within the window: the
        first message's id is returned and nothing is stored. Raises SpoolFull
        (at once for low disk, through the future when max_queued is reached).

        A plain function returning the future, not a coroutine: `await
        spool.enqueue(...)` works as before, and the intake adds a callback
        instead of paying for a task per SEND."""
        self._check_disk()
        return self._submit(Spool._op_enqueue, spec_json, envelope_from, recipients, idempotency_key)

    def _check_disk(self) -> None:
        now = time.monotonic()
        if now - self._disk_checked_at >= DISK_CHECK_INTERVAL:
            st = os.statvfs(self.path_dir)
            self._disk_low = st.f_bavail * st.f_frsize < self.min_free_bytes
            self._disk_checked_at = now
        if self._disk_low:
            raise SpoolFull("free disk space below min_free_bytes")

    def _op_enqueue(self, conn, effects, spec_json, envelope_from, recipients, key):
        now = self._clock()
        if key is not None:
            row = conn.execute(
                "SELECT message_id, created FROM idempotency WHERE key=?", (key,)
            ).fetchone()
            if row is not None and row[1] >= now - self.idempotency_window:
                return row[0], True
        if self._unfinished(effects) >= self.max_queued:
            raise SpoolFull(f"{self.max_queued} messages queued")
        msg_id = self._ulid.new()
        conn.execute(
            "INSERT INTO messages (id, state, envelope_from, spec, idempotency_key,"
            " created, updated, next_attempt) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
            (msg_id, envelope_from, spec_json, key, now, now, now),
        )
        unique = list(dict.fromkeys(recipients))
        conn.executemany(
            "INSERT INTO recipients (message_id, address, position, state) VALUES (?, ?, ?, 'queued')",
            [(msg_id, address, i) for i, address in enumerate(unique)],
        )
        if key is not None:
            conn.execute(
                "INSERT OR REPLACE INTO idempotency (key, message_id, created) VALUES (?, ?, ?)",
                (key, msg_id, now),
            )
        effects.move(None, "queued")
        effects.count("accepted")
        return msg_id, False

    async def claim_due(self, now: float, limit: int) -> list[Claimed]:
        """Take up to `limit` messages due at `now` (queued or deferred with
        next_attempt <= now), oldest due first, and mark them 'sending'."""
        return await self._submit(Spool._op_claim_due, now, limit)

    def _op_claim_due(self, conn, effects, now, limit):
        rows = conn.execute(
            "SELECT id, state, spec, envelope_from, attempts, created, possible_duplicate"
            " FROM messages WHERE state IN ('queued', 'deferred') AND next_attempt <= ?"
            " ORDER BY next_attempt LIMIT ?",
            (now, limit),
        ).fetchall()
        if not rows:
            return []
        ids = [row[0] for row in rows]
        marks = ",".join("?" * len(ids))  # limit is small (a few times the workers)
        conn.execute(f"UPDATE messages SET state='sending' WHERE id IN ({marks})", ids)
        pending: dict[str, list[str]] = {msg_id: [] for msg_id in ids}
        for msg_id, address in conn.execute(
            f"SELECT message_id, address FROM recipients WHERE message_id IN ({marks})"
            " AND state IN ('queued', 'deferred') ORDER BY message_id, position",
            ids,
        ):
            pending[msg_id].append(address)
        claimed = []
        for msg_id, state, spec, envelope_from, attempts, created, dup in rows:
            effects.move(state, "sending")
            claimed.append(Claimed(msg_id, spec, envelope_from, pending[msg_id], attempts, created, bool(dup)))
        return claimed

    def record_attempt(
        self,
        msg_id: str,
        outcomes: Iterable[RecipientOutcome],
        *,
        next_attempt: float | None = None,
        possible_duplicate: bool = False,
    ) -> asyncio.Future:
        """Write one delivery attempt's per-recipient outcomes; the message
        becomes 'sent' when every recipient is sent, 'failed' when every
        recipient is final and one failed, else 'deferred' until next_attempt.
        Returns a future (await it, or add a callback: delivery does not wait)
        of the new state (None if the message was deleted meanwhile)."""
        return self._submit(
            Spool._op_record_attempt, msg_id, list(outcomes), next_attempt, possible_duplicate
        )

    def _op_record_attempt(self, conn, effects, msg_id, outcomes, next_attempt, possible_duplicate):
        now = self._clock()
        row = conn.execute("SELECT state FROM messages WHERE id=?", (msg_id,)).fetchone()
        if row is None:
            return None
        conn.executemany(
            "UPDATE recipients SET state=?, reply=? WHERE message_id=? AND address=?",
            [(o.state, o.reply, msg_id, o.address) for o in outcomes],
        )
        states = {s for (s,) in conn.execute("SELECT state FROM recipients WHERE message_id=?", (msg_id,))}
        if states <= {"sent"}:
            new_state = "sent"
        elif states <= {"sent", "failed"}:
            new_state = "failed"
        else:
            new_state = "deferred"
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

    async def release(self, msg_ids: list[str], possible_duplicate: bool = False) -> int:
        """Put claimed messages whose attempt did not finish back to 'queued'
        (delivery stopping); possible_duplicate when it was interrupted while
        the message may have reached the upstream. Returns how many."""
        return await self._submit(Spool._op_release, list(msg_ids), possible_duplicate)

    def _op_release(self, conn, effects, msg_ids, possible_duplicate):
        released = 0
        for msg_id in msg_ids:
            cur = conn.execute(
                "UPDATE messages SET state='queued', possible_duplicate=possible_duplicate OR ?"
                " WHERE id=? AND state='sending'",
                (possible_duplicate, msg_id),
            )
            if cur.rowcount:
                effects.move("sending", "queued")
                released += 1
        return released

    async def retry(self, msg_id: str | None = None) -> int:
        """Make a deferred message (or every deferred message when msg_id is
        None) due now; returns how many were changed."""
        return await self._submit(Spool._op_retry, msg_id)

    def _op_retry(self, conn, effects, msg_id):
        now = self._clock()
        if msg_id is None:
            cur = conn.execute("UPDATE messages SET next_attempt=? WHERE state='deferred'", (now,))
        else:
            cur = conn.execute(
                "UPDATE messages SET next_attempt=? WHERE state='deferred' AND id=?", (now, msg_id)
            )
        return cur.rowcount

    async def delete(self, msg_id: str) -> bool:
        """Remove a message, its recipients and its idempotency key; False if
        there was no such message."""
        return await self._submit(Spool._op_delete, msg_id)

    def _op_delete(self, conn, effects, msg_id):
        row = conn.execute("DELETE FROM messages WHERE id=? RETURNING state", (msg_id,)).fetchone()
        if row is None:
            return False
        conn.execute("DELETE FROM recipients WHERE message_id=?", (msg_id,))
        conn.execute("DELETE FROM idempotency WHERE message_id=?", (msg_id,))
        effects.move(row[0], None)
        effects.finalized.append(msg_id)  # WAIT on it returns (NOT_FOUND)
        return True

    async def purge(self, now: float) -> tuple[int, int]:
        """Delete final messages last updated more than keep_final ago and
        idempotency keys older than the window; returns (messages, keys)."""
        return await self._submit(Spool._op_purge, now)

    def _op_purge(self, conn, effects, now):
        rows = conn.execute(
            "DELETE FROM messages WHERE state IN ('sent', 'failed') AND updated < ? RETURNING id, state",
            (now - self.keep_final,),
        ).fetchall()
        conn.executemany("DELETE FROM recipients WHERE message_id=?", [(msg_id,) for msg_id, _ in rows])
        for _, state in rows:
            effects.move(state, None)
        keys = conn.execute(
            "DELETE FROM idempotency WHERE created < ?", (now - self.idempotency_window,)
        ).rowcount
        return len(rows), keys

    async def recount(self) -> dict[str, int]:
        """Recount the messages per state from the database (after the queue
        tool changed it directly); returns the counts."""
        return await self._submit(Spool._op_recount)

    def _op_recount(self, conn, effects):
        counts = {s: 0 for s in STATES}
        counts.update(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
        for state in STATES:  # so that current + delta == counted once committed
            effects.state_delta[state] = counts[state] - self._state_counts[state]
        return counts

    # --- reads (reader thread) ---------------------------------------------

    async def _read(self, fn: Callable, *args: Any) -> Any:
        if self._reader is None:
            raise SpoolError("spool is not open")
        return await self._loop.run_in_executor(self._reader, fn, *args)

    async def status(self, msg_id: str) -> dict | None:
        """The STATUS payload of PROTOCOL.md, or None if there is no such id."""
        return await self._read(self._read_status, msg_id)

    def _read_status(self, msg_id: str) -> dict | None:
        conn = self._read_conn
        conn.execute("BEGIN")  # one snapshot for the message and its recipients
        try:
            row = conn.execute(
                "SELECT state, attempts, created, updated, next_attempt, possible_duplicate"
                " FROM messages WHERE id=?",
                (msg_id,),
            ).fetchone()
            if row is None:
                return None
            recipients = conn.execute(
                "SELECT address, state, reply FROM recipients WHERE message_id=? ORDER BY position",
                (msg_id,),
            ).fetchall()
        finally:
            conn.execute("COMMIT")
        state, attempts, created, updated, next_attempt, dup = row
        payload: dict[str, Any] = {
            "id": msg_id,
            "state": state,
            "attempts": attempts,
            "created": rfc3339(created),
            "updated": rfc3339(updated),
        }
        if state == "deferred":
            payload["next_attempt"] = rfc3339(next_attempt)
        payload["recipients"] = [{"address": a, "state": s, "reply": r} for a, s, r in recipients]
        if dup:
            payload["possible_duplicate"] = True
        return payload

    async def wait_final(self, msg_id: str, timeout: float) -> dict | None:
        """WAIT: the STATUS payload as soon as the message is final (sent or
        failed), or its current state after `timeout` seconds; None if there
        is no such id. Woken by the writer's commit, no polling."""
        fut = self._loop.create_future()
        self._waiters.setdefault(msg_id, set()).add(fut)  # before reading: no lost wake-up
        try:
            state = await self.status(msg_id)
            if state is None or state["state"] in FINAL_STATES:
                return state
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, timeout)
            return await self.status(msg_id)
        finally:
            waiters = self._waiters.get(msg_id)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[msg_id]

    async def stats(self) -> dict:
        """{'states': {state: count}, 'counters': {accepted, delivered, failed,
        deferred}}: messages per state now, and counts since open()."""
        return {"states": dict(self._state_counts), "counters": dict(self.counters)}

    async def next_due(self) -> float | None:
        """When the earliest queued or deferred message is due, or None."""
        return await self._read(self._read_next_due)

    def _read_next_due(self) -> float | None:
        row = self._read_conn.execute(
            "SELECT MIN(next_attempt) FROM messages WHERE state IN ('queued', 'deferred')"
        ).fetchone()
        return row[0]

    async def list_messages(self, limit: int = 1000, include_final: bool = False) -> list[dict]:
        """For `smtpgate queue list`: messages oldest first, each
        {id, state, attempts, created, next_attempt, envelope_from, recipients}
        (recipients: the pending ones); not final ones unless include_final."""
        return await self._read(self._read_list, limit, include_final)

    def _read_list(self, limit: int, include_final: bool) -> list[dict]:
        conn = self._read_conn
        where = "" if include_final else "WHERE state IN ('queued', 'sending', 'deferred')"
        conn.execute("BEGIN")
        try:
            rows = conn.execute(
                f"SELECT id, state, attempts, created, next_attempt, envelope_from FROM messages {where}"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
            listing = []
            for msg_id, state, attempts, created, next_attempt, envelope_from in rows:
                pending = [
                    a
                    for (a,) in conn.execute(
                        "SELECT address FROM recipients WHERE message_id=? AND state IN ('queued', 'deferred')"
                        " ORDER BY position",
                        (msg_id,),
                    )
                ]
                listing.append(
                    {
                        "id": msg_id,
                        "state": state,
                        "attempts": attempts,
                        "created": rfc3339(created),
                        "next_attempt": rfc3339(next_attempt) if state in ("queued", "deferred") else None,
                        "envelope_from": envelope_from,
                        "recipients": pending,
                    }
                )
            return listing
        finally:
            conn.execute("COMMIT")

    async def spec(self, msg_id: str) -> bytes | None:
        """The stored spec bytes of a message (for `smtpgate queue show`)."""
        return await self._read(self._read_spec, msg_id)

    def _read_spec(self, msg_id: str) -> bytes | None:
        row = self._read_conn.execute("SELECT spec FROM messages WHERE id=?", (msg_id,)).fetchone()
        return None if row is None else row[0]


# Operations whose commit need not wait for an fsync: losing them in a power
# cut only means a message is delivered again (at-least-once), never that an
# accepted message is lost. A batch of only these commits with
# synchronous=NORMAL; the next durable commit (an enqueue) fsyncs the WAL and
# with it every earlier frame, so recovery always sees a prefix of commits.
_RELAXED_OPS = frozenset({Spool._op_claim_due, Spool._op_record_attempt, Spool._op_release})
