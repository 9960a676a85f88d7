"""SQL that more than one user of the spool runs: the reads (the daemon's
reader thread, the queue tool) and the two writes an operator makes
(retry, delete: by the writer process for the daemon, by the queue tool in
a transaction of its own). Each function takes an open sqlite3
connection; none commits. WAL lets readers run beside the writer.

Held messages: while every upstream is down (as delivery last recorded in
the `upstreams` table), a message that is due is not tried (delivery/
health.py). Nothing about it is written: the reads show it `deferred`,
its pending recipients with the upstreams' reason, and the next probe as
its `next_attempt`; when an upstream is back the message is simply due.
Parking 100,000 messages in their rows instead would rewrite every row
(the spec is stored inline): 1.7 s of the writer and 139 MB of WAL to
park them, as much again for every probe that moved their next attempt.
"""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from typing import Any, NamedTuple

from smtpgate.spool import outbox
from smtpgate.spool.schema import DUE_STATES, IS_DUE, IS_UNFINISHED, State



def rfc3339(ts: float) -> str:
    """Unix seconds -> '2026-11-26T16:23:29.123Z' (RFC 3339, UTC)."""
    text = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def down_reply(name: str, since: float, reason: str) -> str:
    """What a held message's recipients show for a down upstream."""
    return f"smtpgate: upstream {name} down since {rfc3339(since)}: {reason}"


class Outage(NamedTuple):
    """Every upstream is down: what the messages held for them show."""

    reply: str  # each upstream's down_reply, in configured order
    next_probe: float  # the earliest next probe


def outage(conn: sqlite3.Connection) -> Outage | None:
    """The outage as delivery last recorded it, or None if an upstream is
    up (or none is recorded: delivery not running)."""
    rows = conn.execute(
        "SELECT name, state, since, reason, next_probe FROM upstreams ORDER BY position").fetchall()
    if not rows or any(state != "down" for _, state, _, _, _ in rows):
        return None
    return Outage("; ".join(down_reply(name, since, reason) for name, _, since, reason, _ in rows),
                  min(probe for *_, probe in rows))


def _shown(state: str, next_attempt: float, recipients: list[dict], held: Outage | None, now: float):
    """(state, next_attempt, recipients) as the reads show them: a due
    message during an outage is held (see the module docstring)."""
    if held is None or state not in DUE_STATES or next_attempt > now:
        return state, next_attempt, recipients
    pending = [dict(r, state=State.DEFERRED, reply=held.reply) if r["state"] in DUE_STATES else r
               for r in recipients]
    return State.DEFERRED, held.next_probe, pending


def status(conn: sqlite3.Connection, msg_id: str, now: float, caller: str | None = None) -> dict | None:
    """The STATUS payload of PROTOCOL.md at `now`, or None if there is no
    such id or, when `caller` is given, if the message is another caller's:
    the two cases look the same to whoever asks."""
    conn.execute("BEGIN")  # one snapshot for the message, its recipients and the upstreams
    try:
        row = conn.execute(
            "SELECT state, attempts, created, updated, next_attempt, possible_duplicate, caller"
            " FROM messages WHERE id=?",
            (msg_id,),
        ).fetchone()
        if row is None or (caller is not None and row[6] != caller):
            return None
        recipients = _recipients(conn, msg_id)
        held = outage(conn)
    finally:
        conn.execute("COMMIT")
    state, attempts, created, updated, next_attempt, dup, _ = row
    state, next_attempt, recipients = _shown(state, next_attempt, recipients, held, now)
    payload: dict[str, Any] = {
        "id": msg_id,
        "state": state,
        "attempts": attempts,
        "created": rfc3339(created),
        "updated": rfc3339(updated),
    }
    if state == State.DEFERRED:
        payload["next_attempt"] = rfc3339(next_attempt)
    payload["recipients"] = recipients
    if dup:
        payload["possible_duplicate"] = True
    return payload


def next_due(conn: sqlite3.Connection) -> float | None:
    """When the earliest queued or deferred message is due, or None."""
    return conn.execute(f"SELECT MIN(next_attempt) FROM messages WHERE {IS_DUE}").fetchone()[0]


def count_due(conn: sqlite3.Connection, now: float) -> int:
    """How many messages are due by `now` (an index-only count: 11 ms for 100,000)."""
    return conn.execute(f"SELECT COUNT(*) FROM messages WHERE {IS_DUE} AND next_attempt <= ?",
                        (now,)).fetchone()[0]


def upstreams(conn: sqlite3.Connection, now: float) -> list[dict]:
    """STATS' `upstreams` and `smtpgate queue upstreams`: each upstream in
    configured order, {name, state, since, reason, failures, next_probe,
    waiting}; `waiting` counts the messages held while every upstream is
    down (0 otherwise). Empty when delivery does not run."""
    conn.execute("BEGIN")
    try:
        rows = conn.execute("SELECT name, state, since, reason, failures, next_probe FROM upstreams"
                            " ORDER BY position").fetchall()
        waiting = count_due(conn, now) if rows and all(row[1] == "down" for row in rows) else 0
    finally:
        conn.execute("COMMIT")
    listed = []
    for name, state, since, reason, failures, next_probe in rows:
        entry: dict[str, Any] = {"name": name, "state": state, "since": rfc3339(since)}
        if state == "down":
            entry.update(reason=reason, failures=failures, next_probe=rfc3339(next_probe), waiting=waiting)
        listed.append(entry)
    return listed


def _recipients(conn: sqlite3.Connection, msg_id: str) -> list[dict]:
    return [{"address": a, "state": s, "reply": r} for a, s, r in conn.execute(
        "SELECT address, state, reply FROM recipients WHERE message_id=? ORDER BY position", (msg_id,))]


def queue_entries(conn: sqlite3.Connection, now: float, *, msg_id: str | None = None,
                  include_final: bool = False, limit: int = -1, live: bool = True,
                  caller: str | None = None, recipient: str | None = None,
                  waiting: bool = False) -> list[dict]:
    """What `smtpgate queue list|show` prints at `now`: the messages oldest
    first (or the one `msg_id`), not final ones unless `include_final`, at
    most `limit` (-1: all). Each is {id, state, attempts, created, updated,
    from (the envelope sender), caller (who sent it), recipients: [{address,
    state, reply}], next_attempt (when queued or deferred),
    possible_duplicate (when true)}. In the order they were stored (rowid:
    ids made in the same millisecond are in random order, ulid.py).
    `live`: a daemon runs, so its recorded outage holds due messages.
    `caller`: only that caller's messages. `recipient`: only the messages
    with a recipient whose address contains it (any case; % and _ are
    themselves; a scan of the recipients, for the queue page's search).
    `waiting`: only the queued and deferred messages, oldest first by their
    creation, through the index messages_waiting (the queue page's list: in
    store order, the messages kept final for keep_final came first, and
    200,000 of them took 0.2 s to skip at every reload of the page)."""
    conditions, params = [], []
    order = "rowid"
    if msg_id is not None:
        conditions.append("id=?")
        params.append(msg_id)
    elif waiting:
        conditions.append(IS_DUE)
        order = "created, rowid"
    elif not include_final:
        conditions.append(IS_UNFINISHED)
    if caller is not None:
        conditions.append("caller=?")
        params.append(caller)
    if recipient is not None:
        # The scan of the recipients stops at `limit` messages found, and
        # looks a message up (the other conditions) only for an address
        # that matches: a search matching every address stops at once
        # instead of collecting and sorting every match (0.24 s for
        # 300,000 recipients, against 0.04 s for one matching none). The
        # worst left: every address matches and none passes the other
        # conditions (another caller's), 0.3 s for 300,000.
        pattern = "%" + recipient.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        among = (" AND EXISTS (SELECT 1 FROM messages WHERE id = recipients.message_id AND "
                 + " AND ".join(conditions) + ")") if conditions else ""
        conditions = [f"id IN (SELECT DISTINCT message_id FROM recipients WHERE address LIKE ? ESCAPE '\\'{among}"
                      " LIMIT ?)"]
        params = [pattern, *params, limit]
    where = ("WHERE " + " AND ".join(conditions)) if conditions else ""
    entries = []
    conn.execute("BEGIN")  # one snapshot for the messages, their recipients and the upstreams
    try:
        held = outage(conn) if live else None
        rows = conn.execute(
            "SELECT id, state, attempts, created, updated, next_attempt, envelope_from, caller, possible_duplicate"
            f" FROM messages {where} ORDER BY {order} LIMIT ?",
            (*params, limit),
        ).fetchall()
        for msg_id, state, attempts, created, updated, next_attempt, sender, caller, dup in rows:
            state, next_attempt, recipients = _shown(state, next_attempt, _recipients(conn, msg_id), held, now)
            entry = {"id": msg_id, "state": state, "attempts": attempts, "created": rfc3339(created),
                     "updated": rfc3339(updated), "from": sender, "caller": caller,
                     "recipients": recipients}
            if state in DUE_STATES:
                entry["next_attempt"] = rfc3339(next_attempt)
            if dup:
                entry["possible_duplicate"] = True
            entries.append(entry)
    finally:
        conn.execute("COMMIT")
    return entries


def oldest_due(conn: sqlite3.Connection) -> float | None:
    """When the oldest message waiting (queued or deferred) was created, or
    None: the first entry of the partial index messages_waiting (schema
    step 6), whatever the number waiting."""
    return conn.execute(f"SELECT MIN(created) FROM messages WHERE {IS_DUE}").fetchone()[0]


def spec(conn: sqlite3.Connection, msg_id: str) -> bytes | None:
    """The stored spec bytes of a message (for `smtpgate queue show`)."""
    row = conn.execute("SELECT spec FROM messages WHERE id=?", (msg_id,)).fetchone()
    return None if row is None else row[0]


# --- an operator's writes --------------------------------------------------------


def retry(conn: sqlite3.Connection, now: float, msg_id: str | None) -> int:
    """Make a deferred message (every deferred one when msg_id is None) due
    at `now`; returns how many of those asked for are due now (a queued
    message, or one held by an outage, is due already). One being sent is
    left alone. `now`, not 0: due times order the claims (a retried message
    queues behind those due before it), and STATUS shows them."""
    one, params = ("", ()) if msg_id is None else (" AND id=?", (msg_id,))
    conn.execute(f"UPDATE messages SET next_attempt=? WHERE state=? AND next_attempt > ?{one}",
                 (now, State.DEFERRED, now, *params))
    return conn.execute(f"SELECT COUNT(*) FROM messages WHERE {IS_DUE} AND next_attempt <= ?{one}",
                        (now, *params)).fetchone()[0]


class Deleted(NamedTuple):
    state: str  # the state the message had
    caller: str  # whose it was


def delete(conn: sqlite3.Connection, msg_id: str) -> Deleted | None:
    """Remove a message, its recipients and its idempotency key; None if
    there was no such message. Its webhook events stay, their payloads
    made first (the writer's Delete and the queue tool's both come here)."""
    outbox.freeze(conn, "messages.id=?", (msg_id,))
    row = conn.execute("DELETE FROM messages WHERE id=? RETURNING state, caller", (msg_id,)).fetchone()
    if row is None:
        return None
    conn.execute("DELETE FROM recipients WHERE message_id=?", (msg_id,))
    conn.execute("DELETE FROM idempotency WHERE message_id=?", (msg_id,))
    return Deleted(*row)
