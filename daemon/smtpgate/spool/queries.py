"""SQL that more than one user of the spool runs: the reads (the daemon's
reader thread, the queue tool) and the two writes an operator makes
(retry, delete: by the writer process for the daemon, by the queue tool in
a transaction of its own). Each function takes an open sqlite3
connection; none commits. WAL lets readers run beside the writer."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Any, NamedTuple

from smtpgate.spool.schema import DUE_STATES, IS_DUE, IS_UNFINISHED, State



def rfc3339(ts: float) -> str:
    """Unix seconds -> '2026-11-26T16:23:29.123Z' (RFC 3339, UTC)."""
    text = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def status(conn: sqlite3.Connection, msg_id: str, caller: str | None = None) -> dict | None:
    """The STATUS payload of PROTOCOL.md, or None if there is no such id or,
    when `caller` is given, if the message is another caller's: the two
    cases look the same to whoever asks."""
    conn.execute("BEGIN")  # one snapshot for the message and its recipients
    try:
        row = conn.execute(
            "SELECT state, attempts, created, updated, next_attempt, possible_duplicate, caller"
            " FROM messages WHERE id=?",
            (msg_id,),
        ).fetchone()
        if row is None or (caller is not None and row[6] != caller):
            return None
        recipients = conn.execute(
            "SELECT address, state, reply FROM recipients WHERE message_id=? ORDER BY position",
            (msg_id,),
        ).fetchall()
    finally:
        conn.execute("COMMIT")
    state, attempts, created, updated, next_attempt, dup, _ = row
    payload: dict[str, Any] = {
        "id": msg_id,
        "state": state,
        "attempts": attempts,
        "created": rfc3339(created),
        "updated": rfc3339(updated),
    }
    if state == State.DEFERRED:
        payload["next_attempt"] = rfc3339(next_attempt)
    payload["recipients"] = [{"address": a, "state": s, "reply": r} for a, s, r in recipients]
    if dup:
        payload["possible_duplicate"] = True
    return payload


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest queued or deferred message is due, or None."""
    return conn.execute(f"SELECT MIN(next_attempt) FROM messages WHERE {IS_DUE}").fetchone()[0]


def _recipients(conn: sqlite3.Connection, msg_id: str) -> list[dict]:
    return [{"address": a, "state": s, "reply": r} for a, s, r in conn.execute(
        "SELECT address, state, reply FROM recipients WHERE message_id=? ORDER BY position", (msg_id,))]


def queue_entries(conn: sqlite3.Connection, *, msg_id: str | None = None, include_final: bool = False,
                  limit: int = -1) -> list[dict]:
    """What `smtpgate queue list|show` prints: the messages oldest first (or
    the one `msg_id`), not final ones unless `include_final`, at most
    `limit` (-1: all). Each is {id, state, attempts, created, updated, from
    (the envelope sender), caller (who sent it), recipients: [{address,
    state, reply}], next_attempt (when queued or deferred),
    possible_duplicate (when true)}. In the order they were stored (rowid:
    ids made in the same millisecond are in random order, ulid.py)."""
    if msg_id is not None:
        where, params = "WHERE id=?", (msg_id,)
    else:
        where, params = ("" if include_final else f"WHERE {IS_UNFINISHED}"), ()
    entries = []
    conn.execute("BEGIN")  # one snapshot for the messages and their recipients
    try:
        rows = conn.execute(
            "SELECT id, state, attempts, created, updated, next_attempt, envelope_from, caller, possible_duplicate"
            f" FROM messages {where} ORDER BY rowid LIMIT ?",
            (*params, limit),
        ).fetchall()
        for msg_id, state, attempts, created, updated, next_attempt, sender, caller, dup in rows:
            entry = {"id": msg_id, "state": state, "attempts": attempts, "created": rfc3339(created),
                     "updated": rfc3339(updated), "from": sender, "caller": caller,
                     "recipients": _recipients(conn, msg_id)}
            if state in DUE_STATES:
                entry["next_attempt"] = rfc3339(next_attempt)
            if dup:
                entry["possible_duplicate"] = True
            entries.append(entry)
    finally:
        conn.execute("COMMIT")
    return entries


def spec(conn: sqlite3.Connection, msg_id: str) -> bytes | None:
    """The stored spec bytes of a message (for `smtpgate queue show`)."""
    row = conn.execute("SELECT spec FROM messages WHERE id=?", (msg_id,)).fetchone()
    return None if row is None else row[0]


# --- an operator's writes --------------------------------------------------------


def retry(conn: sqlite3.Connection, now: float, msg_id: str | None) -> int:
    """Make a deferred message (every deferred one when msg_id is None) due
    at `now`; returns how many. Queued ones are due already; one being sent
    is left alone. `now`, not 0: due times order the claims (a retried
    message queues behind those due before it), and STATUS shows them."""
    if msg_id is None:
        cur = conn.execute("UPDATE messages SET next_attempt=? WHERE state=?", (now, State.DEFERRED))
    else:
        cur = conn.execute("UPDATE messages SET next_attempt=? WHERE state=? AND id=?",
                           (now, State.DEFERRED, msg_id))
    return cur.rowcount


class Deleted(NamedTuple):
    state: str  # the state the message had
    caller: str  # whose it was


def delete(conn: sqlite3.Connection, msg_id: str) -> Deleted | None:
    """Remove a message, its recipients and its idempotency key; None if
    there was no such message."""
    row = conn.execute("DELETE FROM messages WHERE id=? RETURNING state, caller", (msg_id,)).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM recipients WHERE message_id=?", (msg_id,))
    conn.execute("DELETE FROM idempotency WHERE message_id=?", (msg_id,))
    return Deleted(*row)
