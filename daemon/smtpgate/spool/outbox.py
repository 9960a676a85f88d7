"""The webhook outbox (schema steps 4 and 5): the events the writer adds in
the transaction of the state change that causes them, and the reads and
writes of the sender (smtpgate/webhooks/sender.py, in the delivery process).

An event is added when a message is sent, failed, deferred for the first
time (no recipient was deferred before this attempt), or newly marked a
possible duplicate. Its payload (docs/webhooks.md) is the message as that
change left it:
- a `message.deferred` or `message.possible_duplicate` event's is made
  here, from the rows the transaction has just written: a later attempt
  changes them;
- a `message.sent` or `message.failed` event's (every message has one,
  the others are rare) is made by the sender (`sendable`), in the delivery
  process, from the message's rows: no attempt changes a final message,
  and before its rows are deleted (queries.delete, the writer's purge)
  `freeze` makes the payloads still to be made. The writer, on every
  message's path, pays for an INSERT of a few fields, not for the reads
  and the JSON.
Either way the same rows give the same bytes (`payload`), at every try:
the signature covers these very bytes. A message's events go out in `seq`
order: only the first of a message is ever due (`due` skips the others),
and when it is done the next one is due.
"""

from __future__ import annotations

import json
import math
import sqlite3
from datetime import datetime, timezone
from typing import NamedTuple

from smtpgate.spool.schema import State
from smtpgate.spool.ulid import new_ulid

SENT = "message.sent"
DEFERRED = "message.deferred"
FAILED = "message.failed"
POSSIBLE_DUPLICATE = "message.possible_duplicate"
EVENT_TYPES = (SENT, DEFERRED, FAILED, POSSIBLE_DUPLICATE)
MADE_WHEN_SENT = (SENT, FAILED)  # their message is final: its rows stay as the event left them


class Before(NamedTuple):
    """What a message was before an attempt is recorded: what decides its events."""

    deferred: bool  # a recipient was deferred by an earlier attempt
    possible_duplicate: bool


class OutboxEvent(NamedTuple):
    """One event as the sender reads it."""

    seq: int
    id: str  # the webhook-id header
    message_id: str
    caller: str
    type: str
    payload: bytes | None  # None: its message is gone (sendable)
    created: float
    attempts: int


def attempt_events(was: Before, new_state: str, possible_duplicate: bool) -> list[str]:
    """The events of a recorded attempt, in the order they are sent."""
    events = [POSSIBLE_DUPLICATE] if possible_duplicate and not was.possible_duplicate else []
    if new_state == State.SENT:
        events.append(SENT)
    elif new_state == State.FAILED:
        events.append(FAILED)
    elif not was.deferred:
        events.append(DEFERRED)
    return events


def unflagged(conn: sqlite3.Connection, msg_ids: list[str]) -> list[tuple[str, str]]:
    """(id, caller) of those of `msg_ids` being sent and not yet marked a
    possible duplicate: marking them now is an event."""
    found = []
    for start in range(0, len(msg_ids), 500):  # SQLite's parameter limit
        chunk = msg_ids[start:start + 500]
        found += conn.execute(
            f"SELECT id, caller FROM messages WHERE id IN ({','.join('?' * len(chunk))})"
            " AND state=? AND possible_duplicate=0", (*chunk, State.SENDING)).fetchall()
    return found


def add(conn: sqlite3.Connection, events: list[tuple[float, str, str, str]]) -> int:
    """Add `events`, each (now, message id, caller, type), in this order
    (their seqs), each message as it stands in this transaction; returns
    how many were added. One statement for a writer's run of records, not
    one per message."""
    made_now = {msg_id for _, msg_id, _, event_type in events if event_type not in MADE_WHEN_SENT}
    datas = data_of(conn, list(made_now)) if made_now else {}
    conn.executemany("INSERT INTO webhook_outbox (id, message_id, caller, type, payload, created, next_attempt)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [("evt_" + new_ulid(now), msg_id, caller, event_type,
                       None if event_type in MADE_WHEN_SENT else payload(event_type, now, datas.get(msg_id)), now, now)
                      for now, msg_id, caller, event_type in events])
    return len(events)


def data_of(conn: sqlite3.Connection, msg_ids: list[str]) -> dict[str, dict]:
    """The `data` of an event of each of the messages `msg_ids` as their
    rows stand, by id (a message that is gone is left out): two statements
    for a page of events, not two per event."""
    found: dict[str, dict] = {}
    for start in range(0, len(msg_ids), 500):  # SQLite's parameter limit
        chunk = msg_ids[start:start + 500]
        marks = ",".join("?" * len(chunk))
        for msg_id, caller, state, envelope_from, key, attempts, created, next_attempt, dup in conn.execute(
                "SELECT id, caller, state, envelope_from, idempotency_key, attempts, created, next_attempt,"
                f" possible_duplicate FROM messages WHERE id IN ({marks})", chunk):
            found[msg_id] = {
                "message_id": msg_id, "caller": caller, "state": state, "from": envelope_from,
                "idempotency_key": key, "created": iso(created), "attempts": attempts,
                "next_attempt": iso(next_attempt) if state == State.DEFERRED else None,
                "possible_duplicate": bool(dup), "recipients": [],
            }
        for msg_id, address, state, reply in conn.execute(
                f"SELECT message_id, address, state, reply FROM recipients WHERE message_id IN ({marks})"
                " ORDER BY message_id, position", chunk):
            if msg_id in found:  # recipients left without their message: only by hand
                found[msg_id]["recipients"].append({"address": address, "state": state, "reply": reply})
    return found


_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # made once: json.dumps makes one per call


def payload(event_type: str, when: float, data: dict | None) -> bytes | None:
    """The body of an event (docs/webhooks.md): one line of JSON, UTF-8 as it is."""
    if data is None:
        return None
    return _JSON.encode({"type": event_type, "timestamp": iso(when), "data": data}).encode()


def freeze(conn: sqlite3.Connection, messages: str, params: tuple) -> int:
    """Make now the payloads still to be made of the events of the
    messages the condition `messages` (on the messages table) selects,
    before their rows are deleted; returns how many were made."""
    rows = conn.execute(
        "SELECT o.seq, o.type, o.created, o.message_id FROM webhook_outbox o JOIN messages ON messages.id = o.message_id"
        f" WHERE o.payload IS NULL AND {messages}", params).fetchall()
    datas = data_of(conn, list({msg_id for *_, msg_id in rows}))
    conn.executemany("UPDATE webhook_outbox SET payload=? WHERE seq=?",
                     [(payload(event_type, created, datas.get(msg_id)), seq)
                      for seq, event_type, created, msg_id in rows])
    return len(rows)


_second = (0, "1970-01-01T00:00:00")  # the last second formatted, and its text


def iso(when: float) -> str:
    """RFC 3339 in UTC to the millisecond: 2026-12-06T13:04:05.123Z, the
    same text as datetime's isoformat(timespec="milliseconds") (microseconds
    rounded half to even, then cut to milliseconds), its date and time of
    day formatted once a second: a datetime per call cost 3 us, and a
    payload holds two or three times."""
    second = math.floor(when)
    micro = round((when - second) * 1e6)  # when - floor(when) is exact, as datetime's modf
    if micro == 1_000_000:
        second, micro = second + 1, 0
    global _second
    last, text = _second
    if second != last:
        text = datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
        _second = (second, text)  # one tuple, swapped whole: the reader thread calls this too
    return f"{text}.{micro // 1000:03d}Z"


def count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT COUNT(*) FROM webhook_outbox").fetchone()[0]


def due(conn: sqlite3.Connection, now: float, limit: int, exclude: tuple[int, ...] = ()) -> list[OutboxEvent]:
    """Up to `limit` events due at `now`, each the first of its message,
    earliest due first, leaving out the events `exclude` (being sent). The
    index on next_attempt walks only due events: a receiver's held events
    have their next_attempt in the future (WebhookRetry moves every event
    of their messages)."""
    skip = f" AND o.seq NOT IN ({','.join('?' * len(exclude))})" if exclude else ""
    return [OutboxEvent(*row) for row in conn.execute(
        "SELECT seq, id, message_id, caller, type, payload, created, attempts FROM webhook_outbox o"
        f" WHERE next_attempt <= ?{skip} AND NOT EXISTS (SELECT 1 FROM webhook_outbox p"
        " WHERE p.message_id = o.message_id AND p.seq < o.seq)"
        " ORDER BY next_attempt LIMIT ?", (now, *exclude, limit))]


def sendable(conn: sqlite3.Connection, now: float, limit: int, exclude: tuple[int, ...] = ()) -> list[OutboxEvent]:
    """`due`, each payload made: in one read transaction (`conn` in
    autocommit mode), so that a payload is made from the rows as they
    stood when the event was read (a message deleted since had its
    payloads made first: `freeze`)."""
    conn.execute("BEGIN")
    try:
        events = due(conn, now, limit, exclude)
        datas = data_of(conn, list({event.message_id for event in events if event.payload is None}))
        return [event if event.payload is not None else
                event._replace(payload=payload(event.type, event.created, datas.get(event.message_id)))
                for event in events]
    finally:
        conn.execute("COMMIT")


def done(conn: sqlite3.Connection, seqs: list[int]) -> int:
    """Delete events (those not gone already); returns how many were
    deleted. One statement for a batch, not one per event: the sender
    settles its 2xx answers in batches, and a statement costs the writer
    more than the rows it touches; the seqs as a JSON array, so that it
    keeps one text and stays prepared. The next event of each one's
    message is then due as it stands: its next_attempt is its creation,
    or where `retry` moved it with the whole message's, never later than
    the first's, which was due when it was sent."""
    return conn.execute("DELETE FROM webhook_outbox WHERE seq IN (SELECT value FROM json_each(?))",
                        (json.dumps(seqs),)).rowcount


def retry(conn: sqlite3.Connection, next_attempt: float, events: list[tuple[int, str]], error: str | None) -> None:
    """Move events, and every event of their messages, to `next_attempt`;
    with `error`, the events themselves were tried and failed."""
    conn.executemany("UPDATE webhook_outbox SET next_attempt=? WHERE message_id=?",
                     [(next_attempt, message_id) for _, message_id in events])
    if error is not None:
        conn.executemany("UPDATE webhook_outbox SET attempts=attempts+1, last_error=? WHERE seq=?",
                         [(error, seq) for seq, _ in events])
