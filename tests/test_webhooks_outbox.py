"""The webhook outbox in the spool (spool/outbox.py), its writer driven
directly on a real SQLite spool: a `message.sent` or `message.failed`
event is stored without its payload and made when read for sending, from
the message's rows; a deferral's is made at once (a later attempt changes
the rows); a message deleted or purged first has its events' payloads made
before its rows go; the schema step that allows it keeps the outbox's rows
and sequence.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import datetime, timezone
from itertools import count

import pytest

from smtpgate.proc.calls import Call
from smtpgate.proc.framing import pack
from smtpgate.spool import outbox
from smtpgate.spool.ops import (ClaimDue, Delete, Enqueue, Limits, Purge, RecipientOutcome, RecordAttempt,
                                RecordAttempts, WebhookDone)
from smtpgate.spool.admin import SpoolAdmin
from smtpgate.spool.schema import DB_FILE, MIGRATIONS, SCHEMA_V1, SCHEMA_VERSION
from smtpgate.spool.writer import Writer

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
KEEP_FINAL = 3600.0


class Spool:
    """A Writer on tmp_path, every caller's events in the outbox, and a
    read-only connection as the sender's OutboxReader has."""

    def __init__(self, folder):
        self.writer = Writer(str(folder / DB_FILE), Limits(10**6, KEEP_FINAL, 3600.0, None))
        self.writer.open()
        self.reader = sqlite3.connect(str(folder / DB_FILE), isolation_level=None)
        self.reader.execute("PRAGMA query_only=1")
        self.tokens = count()

    def run(self, op):
        call = Call(next(self.tokens), op)
        outcome = self.writer.run_batch([call])
        self.writer.committed(outcome)
        assert call.token not in outcome.errors, outcome.errors
        return outcome.results[call.token]

    def send(self, now: float, to: list[str], key: str | None = None) -> str:
        return self.run(Enqueue(now, b"{}", "app@shop.example", to, key, "shop", 0, claim=True)).id

    def attempt(self, now: float, msg_id: str, *outcomes: tuple[str, str, str], next_attempt: float | None = None):
        return self.run(RecordAttempt(now, msg_id, [RecipientOutcome(*o) for o in outcomes], next_attempt, False))

    def sendable(self) -> list[tuple[str, dict | None]]:
        return [(e.type, e.payload and json.loads(e.payload)) for e in outbox.sendable(self.reader, T0 + 10**6, 16)]

    def stored_payloads(self) -> list[bytes | None]:
        return [p for (p,) in self.writer.conn.execute("SELECT payload FROM webhook_outbox ORDER BY seq")]

    def close(self):
        self.reader.close()
        self.writer.close()


@pytest.fixture
def spool(tmp_path):
    spool = Spool(tmp_path)
    yield spool
    spool.close()


def test_a_final_event_is_stored_without_its_payload_and_made_from_the_message_when_read(spool):
    msg_id = spool.send(T0, ["kelly@example.org", "gone@example.org"], key="order-17")
    assert spool.attempt(T0 + 1.5, msg_id, ("kelly@example.org", "sent", "250 ok"),
                         ("gone@example.org", "failed", "550 5.1.1 no such user")) == "failed"
    assert spool.stored_payloads() == [None]  # the writer made no JSON

    [(kind, event)] = spool.sendable()
    assert kind == "message.failed"
    assert event == {"type": "message.failed", "timestamp": "2027-01-15T08:00:01.500Z", "data": {
        "message_id": msg_id, "caller": "shop", "state": "failed", "from": "app@shop.example",
        "idempotency_key": "order-17", "created": "2027-01-15T08:00:00.000Z", "attempts": 1,
        "next_attempt": None, "possible_duplicate": False, "recipients": [
            {"address": "kelly@example.org", "state": "sent", "reply": "250 ok"},
            {"address": "gone@example.org", "state": "failed", "reply": "550 5.1.1 no such user"}]}}
    # Read again (a retry), the same bytes: the signature covers them.
    first, again = (outbox.sendable(spool.reader, T0 + 10**6, 16)[0].payload for _ in range(2))
    assert first == again


def test_a_deferral_shows_its_own_attempt_after_a_later_one_changed_the_message(spool):
    msg_id = spool.send(T0, ["later@example.org"])
    spool.attempt(T0 + 1, msg_id, ("later@example.org", "deferred", "451 4.7.1 greylisted"), next_attempt=T0 + 60)
    assert spool.run(ClaimDue(T0 + 60, 10))[0].id == msg_id
    spool.attempt(T0 + 61, msg_id, ("later@example.org", "sent", "250 ok"))
    assert [p is None for p in spool.stored_payloads()] == [False, True]  # the deferral's made at once

    [(kind, deferred)] = spool.sendable()  # only a message's first event is due
    assert kind == "message.deferred" and deferred["data"]["attempts"] == 1
    assert deferred["data"]["state"] == "deferred" and deferred["data"]["next_attempt"] == "2027-01-15T08:01:00.000Z"
    assert deferred["data"]["recipients"] == [
        {"address": "later@example.org", "state": "deferred", "reply": "451 4.7.1 greylisted"}]

    [seq] = [seq for (seq,) in spool.writer.conn.execute("SELECT seq FROM webhook_outbox WHERE type=?",
                                                         (outbox.DEFERRED,))]
    spool.run(WebhookDone([(seq, msg_id, True)]))
    [(kind, sent)] = spool.sendable()
    assert kind == "message.sent" and sent["data"]["attempts"] == 2 and sent["data"]["state"] == "sent"
    assert sent["timestamp"] == "2027-01-15T08:01:01.000Z"
    assert sent["data"]["recipients"] == [{"address": "later@example.org", "state": "sent", "reply": "250 ok"}]


def test_a_deleted_or_purged_message_keeps_its_pending_events_whole(spool, tmp_path):
    deleted = spool.send(T0, ["a@example.org"])
    deleted_offline = spool.send(T0, ["d@example.org"])
    purged = spool.send(T0, ["b@example.org"])
    kept = spool.send(T0, ["c@example.org"])
    sent = ((deleted, "a@example.org"), (deleted_offline, "d@example.org"), (purged, "b@example.org"),
            (kept, "c@example.org"))
    for msg_id, to in sent:
        spool.attempt(T0 + 1, msg_id, (to, "sent", f"250 ok {to}"))
    spool.writer.conn.execute("UPDATE messages SET updated=? WHERE id=?", (T0 + 10 * KEEP_FINAL, kept))

    assert spool.run(Delete(deleted)) is True
    with SpoolAdmin(str(tmp_path), write=True) as queue_tool:  # `smtpgate queue delete` without a daemon
        assert queue_tool.delete(deleted_offline) == "sent"
    assert spool.run(Purge(T0 + 2 * KEEP_FINAL))[0] == 1  # `purged`; `kept` is younger
    assert spool.writer.conn.execute("SELECT id FROM messages").fetchall() == [(kept,)]
    assert [p is None for p in spool.stored_payloads()] == [False, False, False, True]

    events = {event["data"]["message_id"]: event for _, event in spool.sendable()}
    for msg_id, to in sent:
        assert events[msg_id]["data"]["recipients"] == [{"address": to, "state": "sent", "reply": f"250 ok {to}"}]
        assert events[msg_id]["type"] == "message.sent" and events[msg_id]["data"]["state"] == "sent"


def test_an_event_whose_message_rows_are_gone_is_read_without_a_payload(spool):
    msg_id = spool.send(T0, ["a@example.org"])
    spool.attempt(T0 + 1, msg_id, ("a@example.org", "sent", "250 ok"))
    spool.writer.conn.execute("DELETE FROM messages WHERE id=?", (msg_id,))  # by hand, not through Delete
    [event] = outbox.sendable(spool.reader, T0 + 10**6, 16)
    assert event.payload is None and event.message_id == msg_id  # the sender gives it up, saying so


def test_schema_step_5_keeps_the_outbox_rows_and_never_reuses_a_seq(tmp_path):
    conn = sqlite3.connect(str(tmp_path / DB_FILE), isolation_level=None)
    conn.executescript(SCHEMA_V1)
    for step, sql in MIGRATIONS:
        if step <= 4:
            conn.executescript(f"BEGIN; {sql}; UPDATE meta SET value='{step}' WHERE key='schema_version'; COMMIT;")
    insert = ("INSERT INTO webhook_outbox (id, message_id, caller, type, payload, created, next_attempt)"
              " VALUES (?, 'm1', 'shop', 'message.sent', ?, 1, 1)")
    for n in range(3):
        conn.execute(insert, (f"evt_{n}", b'{"n":%d}' % n))
    conn.execute("DELETE FROM webhook_outbox WHERE seq=3")  # the last one sent: seq 3 is used
    conn.close()

    spool = Spool(tmp_path)
    try:
        assert spool.writer.schema == (4, SCHEMA_VERSION)
        rows = spool.writer.conn.execute("SELECT seq, id, payload FROM webhook_outbox ORDER BY seq").fetchall()
        assert rows == [(1, "evt_0", b'{"n":0}'), (2, "evt_1", b'{"n":1}')]
        msg_id = spool.send(T0, ["a@example.org"])
        spool.attempt(T0 + 1, msg_id, ("a@example.org", "sent", "250 ok"))
        assert spool.writer.conn.execute("SELECT MAX(seq) FROM webhook_outbox").fetchone() == (4,)
    finally:
        spool.close()


def test_a_payload_read_for_sending_is_the_one_the_writer_would_make_byte_for_byte(spool):
    # The sender makes a final event's payload when it reads it, freeze and
    # the deferrals in the writer: the same rows must give the same bytes
    # either way (the signature covers them). Twelve recipients: their
    # order is by position as a number (10 after 9).
    replies = ['250 "quoted" \\ ok', "250 é 记得 ✓", "250 \x01 control", "550 \t tab", None, ""]
    to = [f"r{i}@example.org" for i in range(12)]
    msg_id = spool.send(T0, to)
    spool.attempt(T0 + 1.0004995, msg_id, *[(a, "failed", replies[i % len(replies)] or "550 no") for i, a in
                                             enumerate(to)])
    spool.writer.conn.execute("UPDATE recipients SET reply=NULL WHERE address='r4@example.org'")
    [event] = outbox.sendable(spool.reader, T0 + 10**6, 16)
    made = outbox.payload(outbox.FAILED, event.created, outbox.data_of(spool.writer.conn, [msg_id])[msg_id])
    assert event.payload == made
    data = json.loads(event.payload)["data"]
    assert [r["address"] for r in data["recipients"]] == to
    assert data["recipients"][0]["reply"] == replies[0] and data["recipients"][4]["reply"] is None


def test_a_page_leaves_out_the_events_being_sent_and_each_message_s_later_events(spool):
    first, second, third = (spool.send(T0, [f"{n}@example.org"]) for n in ("a", "b", "c"))
    for msg_id, n in ((first, "a"), (second, "b"), (third, "c")):
        spool.attempt(T0 + 1, msg_id, (f"{n}@example.org", "deferred", "451 later"), next_attempt=T0 + 60)
        spool.run(ClaimDue(T0 + 60, 10))
        spool.attempt(T0 + 61, msg_id, (f"{n}@example.org", "sent", "250 ok"))
    events = outbox.sendable(spool.reader, T0 + 10**6, 16)
    assert [(e.message_id, e.type) for e in events] == [(m, outbox.DEFERRED) for m in (first, second, third)]
    being_sent = (events[0].seq, events[2].seq)
    assert [e.seq for e in outbox.sendable(spool.reader, T0 + 10**6, 16, being_sent)] == [events[1].seq]
    assert outbox.sendable(spool.reader, T0 + 10**6, 16, tuple(e.seq for e in events)) == []


def test_a_settle_of_more_events_than_sqlite_takes_parameters_deletes_them_all(spool):
    ids = [spool.run(Enqueue(T0, b"{}", "app@shop.example", ["a@example.org"], None, "shop", 0, claim=True)).id
           for _ in range(1100)]
    spool.run(RecordAttempts(pack([RecordAttempt(T0 + 1, msg_id, [RecipientOutcome("a@example.org", "sent", "250 ok")],
                                            None, False) for msg_id in ids])))
    rows = spool.writer.conn.execute("SELECT seq, message_id FROM webhook_outbox").fetchall()
    assert len(rows) == 1100
    spool.run(WebhookDone([(seq, msg_id, True) for seq, msg_id in rows]))
    assert outbox.count(spool.writer.conn) == 0


@pytest.mark.parametrize("when", [
    T0, T0 + 0.0004995, T0 + 0.0005, T0 + 0.9994999, T0 + 0.9995, T0 + 0.9999994, T0 + 0.9999995,
    T0 + 0.9999996, T0 + 59.9999999, 1_765_062_245.123456, 1_765_062_245.1234565, 1_765_062_245.999_999_5,
    *(T0 + i * 0.123_456_789 for i in range(1, 50)),
])
def test_an_event_s_time_is_datetime_s_isoformat_to_the_millisecond(when):
    # iso() formats a second once and rounds the microseconds itself:
    # it must give datetime's text (half-even microseconds, cut to ms).
    assert outbox.iso(when) == datetime.fromtimestamp(when, timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def test_an_outcome_for_an_address_the_message_does_not_have_changes_nothing(spool):
    # The writer works out the message's new state from its recipients as
    # it read them and the outcomes it applies: an address of no recipient
    # of the message is no recipient, as the UPDATE that matches no row.
    msg_id = spool.send(T0, ["kelly@example.org"])
    assert spool.attempt(T0 + 1, msg_id, ("kelly@example.org", "sent", "250 ok"),
                         ("stranger@example.org", "deferred", "451 later"), next_attempt=T0 + 60) == "sent"
    assert spool.writer.conn.execute("SELECT address, state FROM recipients").fetchall() == [
        ("kelly@example.org", "sent")]
    assert [kind for kind, _ in spool.sendable()] == [outbox.SENT]


def test_a_message_marked_a_possible_duplicate_has_that_event_once(spool):
    # The writer reads what each message of a batch of records was before
    # it (from its reads of the run's messages and recipients, before it
    # writes them): marked already, or deferred already.
    msg_id, other = spool.send(T0, ["a@example.org"]), spool.send(T0, ["b@example.org"])
    spool.run(RecordAttempts(pack([
        RecordAttempt(T0 + 1, msg_id, [RecipientOutcome("a@example.org", "deferred", "451 later")], T0 + 60, True),
        RecordAttempt(T0 + 1, other, [RecipientOutcome("b@example.org", "deferred", "451 later")], T0 + 60, False)])))
    assert len(spool.run(ClaimDue(T0 + 60, 10))) == 2
    spool.run(RecordAttempts(pack([
        RecordAttempt(T0 + 61, msg_id, [RecipientOutcome("a@example.org", "deferred", "451 later")], T0 + 120, True),
        RecordAttempt(T0 + 61, other, [RecipientOutcome("b@example.org", "sent", "250 ok")], None, True)])))
    types = spool.writer.conn.execute("SELECT message_id, type FROM webhook_outbox ORDER BY seq").fetchall()
    assert types == [(msg_id, outbox.POSSIBLE_DUPLICATE), (msg_id, outbox.DEFERRED), (other, outbox.DEFERRED),
                     (other, outbox.POSSIBLE_DUPLICATE), (other, outbox.SENT)]
