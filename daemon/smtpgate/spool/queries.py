"""The spool's reads: SQL run on a connection of the reader's own (the
daemon's reader thread), beside the writer process thanks to WAL."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Any



def rfc3339(ts: float) -> str:
    """Unix seconds -> '2026-11-26T16:23:29.123Z' (RFC 3339, UTC)."""
    text = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def status(conn: sqlite3.Connection, msg_id: str) -> dict | None:
    """The STATUS payload of PROTOCOL.md, or None if there is no such id."""
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


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest queued or deferred message is due, or None."""
    row = conn.execute(
        "SELECT MIN(next_attempt) FROM messages WHERE state IN ('queued', 'deferred')"
    ).fetchone()
    return row[0]


def list_messages(conn: sqlite3.Connection, limit: int, include_final: bool) -> list[dict]:
    """Messages oldest first, each {id, state, attempts, created,
    next_attempt, envelope_from, recipients} (recipients: the pending ones);
    not final ones unless include_final."""
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


def spec(conn: sqlite3.Connection, msg_id: str) -> bytes | None:
    """The stored spec bytes of a message (for `smtpgate queue show`)."""
    row = conn.execute("SELECT spec FROM messages WHERE id=?", (msg_id,)).fetchone()
    return None if row is None else row[0]
