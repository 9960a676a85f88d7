"""The durable spool: SQLite in WAL mode, written by a writer process with
group commit; read in the daemon.

Why SQLite in WAL mode: one append to the WAL and one fsync make a whole
batch of SENDs durable, whatever their number, and the record of a message
(its spec, its recipients, their replies) stays in one place that queries
(STATUS, queue list, due messages) can read without a file per message.
`synchronous=FULL` makes SQLite fsync the WAL at every commit, so a commit
survives a power loss (with `NORMAL` the last commits could be lost).

Group commit: every write (enqueue, claim, record_attempt, retry, delete,
purge) is an operation with an asyncio future. The operations submitted in
one turn of the event loop go to the writer process (writer.py) in one
frame; the writer runs everything it has in ONE transaction, commits (one
fsync), and answers with all the results at once. While it is fsyncing, new
requests pile up and form the next batch: under load the number of fsyncs
per second stays near the disk's rate while the number of messages per
fsync grows with the concurrency. writer.py says why a process and
not a thread.

Reads (STATUS, queue list, due times) use a connection of the daemon's own
in a reader thread; WAL lets them run while the writer commits. The
message counts per state are the writer's, sent along with every answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import itertools
import os
import socket
import sqlite3
import stat
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from smtpgate.proc.calls import PendingCalls
from smtpgate.proc.child import spawn
from smtpgate.proc.pipe import FramedPipe
from smtpgate.spool import queries
from smtpgate.spool.errors import SpoolError, SpoolFull, SpoolLocked
from smtpgate.spool.ops import (
    PURGE_AT_ONCE, Claimed, ClaimDue, Committed, Configure, Delete, Enqueue, Expire, Limits, Open, Purge,
    RecipientOutcome, Recount, RecordAttempt, RecordUpstreams, Release, ReplyTo, Retry, Unlend, UpstreamRow,
)
from smtpgate.spool.lent import lend
from smtpgate.spool.schema import ANONYMOUS_CALLER, DB_FILE, FINAL_STATES, LOCK_FILE, STATES, State

DISK_CHECK_INTERVAL = 1.0  # seconds between two statvfs calls
# After a kill -9 of a daemon its writer still holds the lock for the
# moment it takes to finish its last commit and see the end of its pipe.
LOCK_WAIT = 5.0  # seconds
SETTLE_WAIT = 1.0  # seconds the figures wait at most for writes in flight (settled)


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
        webhook_callers: frozenset[str] | None = frozenset(),
        clock: Callable[[], float] = time.time,
    ):
        self.path_dir = os.fspath(path_dir)
        self.db_path = os.path.join(self.path_dir, DB_FILE)
        self.max_queued = max_queued
        self.min_free_bytes = min_free_bytes
        self.keep_final = keep_final
        self.idempotency_window = idempotency_window
        self.webhook_callers = webhook_callers  # whose events go to the outbox (None: everyone's)
        self._clock = clock  # "now" of every write, read when it is submitted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._process: subprocess.Popen | None = None
        self._pipe: FramedPipe | None = None
        self._calls: PendingCalls | None = None  # the writer's unanswered operations
        self._closing = False
        self._broken: str | None = None  # why the writer is gone, once it is
        self.on_writer_lost: Callable[[str], None] | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._read_conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._lending: socket.socket | None = None  # to lend the writer callers' connections (lent.py)
        self._lent_keys = itertools.count(1)
        self.modes_fixed: list[tuple[str, int]] = []  # (path, mode it had) made private by open()
        self._waiters: dict[str, set[asyncio.Future]] = {}
        self._disk_checked_at = float("-inf")
        self._disk_low = False
        # The writer's figures, as of its last answer.
        self._state_counts = {s: 0 for s in STATES}
        self.pending: dict[str, int] = {}  # caller -> its messages not yet final
        # caller -> its messages delivered, failed and attempts deferred since open()
        self.caller_counters: dict[str, dict[str, int]] = {}
        self.caller_key = b""  # the spool's secret for naming callers (intake/callers.py)
        self.schema_upgrade: tuple[int, int] | None = None  # (from, to) if open() upgraded it
        self.counters = {"accepted": 0, "delivered": 0, "failed": 0, "deferred": 0}
        # Group-commit evidence for tests and the bench: commits vs operations.
        self.commits = 0
        self.durable_commits = 0  # those with an fsync (synchronous=FULL)
        self.operations = 0

    # --- life cycle --------------------------------------------------------

    async def open(self) -> None:
        """Create and lock the directory, start the writer process (which
        creates the schema and puts messages left in 'sending' by a crash
        back to 'queued'), open the read connection. Raises SpoolLocked if
        another process uses the directory, SpoolError if it is unusable."""
        self._loop = asyncio.get_running_loop()
        self._closing, self._broken = False, None
        try:
            await self._loop.run_in_executor(None, self._lock_and_spawn)
            self._calls = PendingCalls(self._loop)
            self._pipe = FramedPipe(self._on_committed, self._on_writer_gone)
            await self._pipe.open(self._process.stdout, self._process.stdin)
            opened = await self.submit(Open(self.db_path, self._limits()))
            self.caller_key = bytes.fromhex(opened.caller_key)
            if opened.schema_found != opened.schema:
                self.schema_upgrade = (opened.schema_found, opened.schema)
            self._read_conn = sqlite3.connect(self.db_path, isolation_level=None, check_same_thread=False)
            self._read_conn.execute("PRAGMA query_only=1")
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")
        except BaseException:
            await self._shut_writer()
            self._unlock()
            raise

    def _limits(self) -> Limits:
        return Limits(self.max_queued, self.keep_final, self.idempotency_window, self.webhook_callers)

    async def configure(self, *, max_queued: int, min_free_bytes: int, keep_final: float,
                        idempotency_window: float, webhook_callers: frozenset[str] | None = frozenset()) -> None:
        """Apply new limits (a reloaded configuration) from the next batch on."""
        self.max_queued, self.min_free_bytes = max_queued, min_free_bytes
        self.keep_final, self.idempotency_window = keep_final, idempotency_window
        self.webhook_callers = webhook_callers
        self._disk_checked_at = float("-inf")  # the free-space floor may have moved
        await self.submit(Configure(self._limits()))

    def _lock_and_spawn(self) -> None:
        try:
            os.makedirs(self.path_dir, mode=0o700, exist_ok=True)
            self.modes_fixed = make_private(self.path_dir)
        except OSError as exc:
            raise SpoolError(f"cannot create spool directory {self.path_dir}: {exc.strerror}") from None
        fd = os.open(os.path.join(self.path_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                if _alive(holder) or time.monotonic() > deadline:
                    os.close(fd)
                    raise SpoolLocked(
                        f"spool directory {self.path_dir} is in use by another smtpgate (pid {holder})"
                    ) from None
                time.sleep(0.02)  # its daemon is dead: its writer is finishing
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        # The writer keeps the lock (pass_fds) as long as it lives. It gets
        # callers' connections lent over a socket pair (lent.py).
        self._lending, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._lending.setblocking(False)
        try:
            self._process = spawn("smtpgate.spool", pass_fds=(fd, writer_end.fileno()),
                                  args=(str(writer_end.fileno()),))
        finally:
            writer_end.close()

    async def close(self) -> None:
        """Finish the pending writes, stop the writer and the reader, release the lock."""
        if self._process is None:
            return
        await self._shut_writer()
        if self._lending is not None:
            self._lending.close()
            self._lending = None
        if self._reader is not None:
            self._reader.shutdown(wait=True)
            self._read_conn.close()
            self._reader = self._read_conn = None
        self._unlock()
        for waiters in self._waiters.values():
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)
        self._waiters.clear()

    async def _shut_writer(self) -> None:
        """EOF to the writer: it commits what it has, answers, and exits."""
        process, self._process = self._process, None
        if process is None:
            return
        self._closing = True
        if self._pipe is not None:
            self._pipe.close_write()  # after the pending operations
            await self._pipe.closed
        await self._loop.run_in_executor(None, process.wait)
        process.stdout.close()

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock (once the writer is gone too)
            self._lock_fd = None

    @property
    def alive(self) -> bool:
        """Whether the writer runs and takes operations (/healthz)."""
        return self._process is not None and self._broken is None and not self._closing

    @property
    def writer_lost(self) -> bool:
        """Whether the writer exited unexpectedly (its pending calls failed)."""
        return self._broken is not None

    # --- the pipe to the writer --------------------------------------------

    def submit(self, op) -> asyncio.Future:
        """Send one write operation (ops.py) to the writer: a future of its
        result, done once its batch is committed. The delivery process's
        claims, records and releases come here as they are."""
        if self._broken is not None or self._process is None or self._closing:
            raise SpoolError(self._broken or "spool is not open")
        call, fut = self._calls.new(op)
        self._pipe.send(call)
        return fut

    def lend(self, fd: int) -> int | None:
        """Lend the writer a caller's connection (its socket `fd`), so that it
        answers the SENDs enqueued with a ReplyTo of the key returned (None:
        not lent, the daemon answers). `unlend` the key when done with it."""
        if self._lending is None or self._broken is not None or self._closing:
            return None
        key = next(self._lent_keys)
        return key if lend(self._lending, key, fd) else None

    def unlend(self, key: int) -> None:
        if self._pipe is not None and self._broken is None:
            self._pipe.send(Unlend(key))

    def _on_committed(self, committed: Committed) -> None:
        """A committed batch: update the figures, resolve the callers, wake WAIT."""
        self._state_counts, self.counters = committed.state_counts, committed.counters
        if committed.pending:
            pending = self.pending
            for caller, n in committed.pending.items():
                if n:
                    pending[caller] = n
                else:
                    pending.pop(caller, None)
        if committed.caller_counters:
            self.caller_counters.update(committed.caller_counters)
        self.commits, self.durable_commits = committed.commits, committed.durable_commits
        self.operations = committed.operations
        resolve = self._calls.resolve
        for token, value in committed.results.items():
            resolve(token, value)
        for token, error in committed.errors.items():
            resolve(token, None, error)
        for msg_id in committed.finalized:
            for fut in self._waiters.pop(msg_id, ()):
                if not fut.done():
                    fut.set_result(None)

    def _on_writer_gone(self) -> None:
        """The writer's stdout closed: expected at close, a failure otherwise."""
        if self._closing and not self._calls:
            return
        code = self._process.poll() if self._process is not None else None
        self._broken = why = f"the spool writer process exited unexpectedly (status {code})"
        self._calls.fail_all(lambda: SpoolError(why))
        if not self._closing and self.on_writer_lost is not None:
            self.on_writer_lost(why)

    # --- writes (run by the writer process) ---------------------------------

    def enqueue(
        self,
        spec_json: bytes,
        envelope_from: str,
        recipients: list[str],
        idempotency_key: str | None = None,
        caller: str = ANONYMOUS_CALLER,
        max_pending: int = 0,
        claim: bool = False,
        reply_to: ReplyTo | None = None,
    ) -> asyncio.Future:
        """Store a message of `caller` durably: a future of Enqueued(id,
        existing), done once committed. existing is True when the caller's
        idempotency_key was seen within the window: the first message's id is
        returned and nothing is stored. Raises SpoolFull (at once for low
        disk, through the future when max_queued is reached, and CallerFull
        when the caller already has `max_pending` messages not yet final;
        0: no cap). With `claim`, a new message is stored 'sending': claimed
        for delivery by the same commit (an existing one is not).

        A plain function returning the future, not a coroutine: `await
        spool.enqueue(...)` works, and the hand-off adds a callback instead
        of paying for a task per SEND."""
        self._check_disk()
        return self.submit(Enqueue(self._clock(), spec_json, envelope_from, recipients, idempotency_key,
                                   caller, max_pending, claim, reply_to))

    def _check_disk(self) -> None:
        now = time.monotonic()
        if now - self._disk_checked_at >= DISK_CHECK_INTERVAL:
            st = os.statvfs(self.path_dir)
            self._disk_low = st.f_bavail * st.f_frsize < self.min_free_bytes
            self._disk_checked_at = now
        if self._disk_low:
            raise SpoolFull("free disk space below min_free_bytes")

    async def claim_due(self, now: float, limit: int) -> list[Claimed]:
        """Take up to `limit` messages due at `now` (queued or deferred with
        next_attempt <= now), oldest due first, and mark them 'sending'."""
        return await self.submit(ClaimDue(now, limit))

    def record_attempt(
        self,
        msg_id: str,
        outcomes: Iterable[RecipientOutcome],
        *,
        next_attempt: float | None = None,
        possible_duplicate: bool = False,
        upstream: str | None = None,
        reason: str | None = None,
    ) -> asyncio.Future:
        """Write one delivery attempt's per-recipient outcomes; the message
        becomes 'sent' when every recipient is sent, 'failed' when every
        recipient is final and one failed, else 'deferred' until next_attempt.
        Returns a future (await it, or add a callback: delivery does not wait)
        of the new state (None if the message was deleted meanwhile).
        `upstream` and `reason`: ops.RecordAttempt."""
        return self.submit(RecordAttempt(self._clock(), msg_id, list(outcomes), next_attempt, possible_duplicate,
                                         upstream, reason))

    async def release(self, msg_ids: list[str], possible_duplicate: bool = False) -> int:
        """Put claimed messages whose attempt did not finish back to 'queued'
        (delivery stopping, or every upstream down); possible_duplicate when
        it was interrupted after the final dot went out (the attempt then
        counts). Returns how many."""
        return await self.submit(Release(list(msg_ids), possible_duplicate))

    def record_upstreams(self, rows: list[UpstreamRow]) -> asyncio.Future:
        """Record the upstreams' health (delivery/health.py) for the reads."""
        return self.submit(RecordUpstreams(list(rows)))

    async def expire(self, created_before: float, reply: str) -> int:
        """Fail the messages held by an outage that were created at or
        before `created_before`, their pending recipients with `reply`."""
        return await self.submit(Expire(self._clock(), created_before, reply))

    async def retry(self, msg_id: str | None = None) -> int:
        """Make a deferred message (or every deferred message when msg_id is
        None) due now; returns how many were changed."""
        return await self.submit(Retry(self._clock(), msg_id))

    async def delete(self, msg_id: str) -> bool:
        """Remove a message, its recipients and its idempotency key; False if
        there was no such message."""
        return await self.submit(Delete(msg_id))

    async def purge(self, now: float, limit: int = PURGE_AT_ONCE) -> tuple[int, int]:
        """Delete final messages last updated more than keep_final ago and
        idempotency keys older than the window; returns (messages, keys).
        In transactions of at most `limit` of each, one after the other, so
        that the SENDs arriving meanwhile never wait behind all of them."""
        if limit < 1:
            raise ValueError(f"purge limit {limit}: it would never finish")
        messages = keys = 0
        while True:
            some_messages, some_keys = await self.submit(Purge(now, limit))
            messages, keys = messages + some_messages, keys + some_keys
            if some_messages < limit and some_keys < limit:
                return messages, keys

    async def recount(self) -> dict[str, int]:
        """Recount the messages per state from the database (after the queue
        tool changed it directly); returns the counts."""
        return await self.submit(Recount())

    # --- reads (reader thread) ---------------------------------------------

    async def _read(self, query: Callable, *args: Any) -> Any:
        """Run `query(connection, *args)` (queries.py) in the reader thread."""
        if self._reader is None:
            raise SpoolError("spool is not open")
        return await self._loop.run_in_executor(self._reader, query, self._read_conn, *args)

    async def status(self, msg_id: str, caller: str | None = None) -> dict | None:
        """The STATUS payload of PROTOCOL.md, or None if there is no such id
        (or it is not `caller`'s, when given)."""
        return await self._read(queries.status, msg_id, self._clock(), caller)

    async def wait_final(self, msg_id: str, seconds: float, caller: str | None = None) -> dict | None:
        """WAIT: the STATUS payload as soon as the message is final (sent or
        failed), or its current state after `seconds` (an answer, not an
        error: no timeout to cancel it from outside); None if there
        is no such id (or it is not `caller`'s, when given). Woken by the
        writer's commit, no polling."""
        fut = self._loop.create_future()
        self._waiters.setdefault(msg_id, set()).add(fut)  # before reading: no lost wake-up
        try:
            state = await self.status(msg_id, caller)
            if state is None or state["state"] in FINAL_STATES:
                return state
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(fut, seconds)
            return await self.status(msg_id, caller)
        finally:
            waiters = self._waiters.get(msg_id)
            if waiters is not None:
                waiters.discard(fut)
                if not waiters:
                    del self._waiters[msg_id]

    async def stats(self) -> dict:
        """{'states': {state: count}, 'counters': {accepted, delivered, failed,
        deferred}, 'upstreams': [...], 'webhooks': {delivered, failed,
        retried, pending}}: messages per state now, counts since open(), each
        upstream's health (queries.upstreams), and the webhook events
        delivered and given up since open(), their tries that failed and
        are made again, and the events in the outbox now. While
        every upstream is down, the queued messages are held (shown deferred)."""
        await self.settled()
        counters = dict(self.counters)
        webhooks = {name: counters.pop(f"webhooks_{name}", 0) for name in ("delivered", "failed", "retried", "pending")}
        states = dict(self._state_counts)
        upstreams = await self._read(queries.upstreams, self._clock())
        if upstreams and all(u["state"] == "down" for u in upstreams):
            states[State.DEFERRED] += states[State.QUEUED]  # a queued message is always due
            states[State.QUEUED] = 0
        return {"states": states, "counters": counters, "upstreams": upstreams, "webhooks": webhooks}

    async def settled(self) -> None:
        """Once the writer's answers to the writes sent to it so far are read
        (at most SETTLE_WAIT): a caller that has its OK from the writer
        itself (lent.py) may ask for the figures before the daemon has read
        that commit, and must find its message counted."""
        if self._calls and self._broken is None:
            await asyncio.wait(self._calls.waiting(), timeout=SETTLE_WAIT)

    async def next_due(self) -> float | None:
        """When the earliest queued or deferred message is due, or None."""
        return await self._read(queries.next_due)

    async def count_due(self, now: float) -> int:
        """How many messages are due by `now`."""
        return await self._read(queries.count_due, now)

    async def list_messages(self, limit: int = 1000, include_final: bool = False, **where) -> list[dict]:
        """Messages oldest first, not final ones unless include_final: the
        entries `smtpgate queue list` prints (queries.queue_entries; `where`:
        its msg_id, caller and recipient)."""
        return await self._read(functools.partial(queries.queue_entries, now=self._clock(),
                                                  include_final=include_final, limit=limit, **where))

    async def oldest_due(self) -> float | None:
        """When the oldest message waiting to be tried was created, or None."""
        return await self._read(queries.oldest_due)

    async def spec(self, msg_id: str) -> bytes | None:
        """The stored spec bytes of a message (for `smtpgate queue show`)."""
        return await self._read(queries.spec, msg_id)


def make_private(path_dir: str) -> list[tuple[str, int]]:
    """Take group and other permissions off the spool directory (0700) and
    the files in it (0600): message bodies live in the database and its
    WAL. Returns the (path, old mode) of what it changed, for the log."""
    fixed = []
    mode = stat.S_IMODE(os.stat(path_dir).st_mode)
    if mode & 0o077:
        os.chmod(path_dir, 0o700)
        fixed.append((path_dir, mode))
    for entry in os.scandir(path_dir):
        if entry.is_file(follow_symlinks=False):
            mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
            if mode & 0o077:
                os.chmod(entry.path, 0o600)
                fixed.append((entry.path, mode))
    return fixed


def _alive(pid_text: str) -> bool:
    """Whether the process that wrote the lock file still runs (unknown: yes)."""
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (ValueError, OSError):
        return True
    return True
