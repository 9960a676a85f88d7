#!/usr/bin/env python3
"""What issue 12's metrics work adds per record and per SEND, in process,
and what a queue search by recipient costs.

    python bench/metrics_cost.py [--search 300000]

Run it once per checkout (PYTHONPATH=/path/to/checkout/daemon), alternately:
- records_frame: a RecordAttempts frame of 16 records pickled and read
  back, per record (the attempt record now names its upstream and reason);
- committed_frame: a Committed frame answering 16 SENDs, per SEND (it now
  carries the per-caller counts, None for an enqueue-only batch);
- figures_record: DeliveryFigures.record per attempt (the daemon, while
  the HTTP side runs);
- writer_enqueue: the spool writer's batch of 16 Enqueues (Writer.run_batch
  and its Committed), per SEND; writer_relay: a batch of 16 Enqueues
  claimed at enqueue and the batch of their 16 attempt records, per
  message; on a database in /dev/shm without fsync (synchronous=OFF), so
  that only the CPU is measured;
best of 5 repeats, in microseconds. With --search N: a spool of N sent
messages of one recipient each (in a temporary folder), and the seconds
of a search matching every address, one address, and none, for an admin
and for one caller (half of the messages are its own).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import timeit
from pathlib import Path

from daemon_bench import records_op
from smtpgate.http.metrics import DeliveryFigures
from smtpgate.proc.calls import Call
from smtpgate.proc.framing import encode, take_messages
from smtpgate.spool import queries
from smtpgate.spool.ops import (
    Committed, Enqueue, Enqueued, Limits, RecipientOutcome, RecordAttempt,
)
from smtpgate.spool.schema import migrate
from smtpgate.spool.ulid import new_ulid
from smtpgate.spool.writer import Writer

BATCH = 16
NUMBER = 20_000


def best_us(fn, per: int) -> float:
    rounds = NUMBER // per
    return round(min(timeit.repeat(fn, number=rounds, repeat=5)) / rounds / per * 1e6, 3)


def frames() -> dict:
    named = "upstream" in RecordAttempt._fields  # this branch, or one before it
    extra = ["smtp.example.com:587", None] if named else []
    records = [RecordAttempt(1.8e9, new_ulid(1.8e9), [RecipientOutcome(f"r{i}@example.org", "sent", "250 2.0.0 Ok")],
                             None, False, *extra) for i in range(BATCH)]
    committed = Committed({i: Enqueued(new_ulid(1.8e9), False) for i in range(BATCH)}, {}, [], {"queued": 5},
                          {"accepted": 1, "delivered": 2, "failed": 0, "deferred": 0}, {"anonymous": 3}, 1, 1, BATCH)

    def roundtrip(frame):
        take_messages(bytearray(b"".join(encode(frame))))

    figures = DeliveryFigures()

    def record_all():
        for record in records:
            figures.record(record, "sent")

    return {"record_fields": len(RecordAttempt._fields),
            "records_frame_us": best_us(lambda: roundtrip([Call(1, records_op(records))]), BATCH),
            "committed_frame_us": best_us(lambda: roundtrip([committed]), BATCH),
            "figures_record_us": best_us(record_all, BATCH)}


def writer() -> dict:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        spool = Writer(str(Path(folder) / "spool.db"), Limits(10**9, 3600.0, 3600.0))
        spool.open()
        spool.conn.execute("PRAGMA synchronous=OFF")  # sync_full stays True: run_batch leaves it so
        tokens = iter(range(10**9))

        def enqueue(claim: bool) -> list:
            calls = [Call(next(tokens), Enqueue(1.8e9, b"{}", "a@x.org", ["b@y.org"], None, "shop", 0, claim))
                     for _ in range(BATCH)]
            outcome = spool.run_batch(calls)
            spool.committed(outcome)
            return [outcome.results[call.token].id for call in calls]

        def relay() -> None:
            ids = enqueue(True)
            outcome = spool.run_batch([Call(next(tokens), records_op([
                RecordAttempt(1.8e9, msg_id, [RecipientOutcome("b@y.org", "sent", "250 ok")], None, False)
                for msg_id in ids]))])
            spool.committed(outcome)

        result = {"writer_enqueue_us": best_us(lambda: enqueue(False), BATCH), "writer_relay_us": best_us(relay, BATCH)}
        spool.conn.close()
        return result


def search(n: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        conn = sqlite3.connect(Path(folder) / "spool.db", isolation_level=None)
        migrate(conn)
        conn.execute("BEGIN")
        for i in range(n):
            msg_id = new_ulid(1.8e9 + i)
            conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt, caller)"
                         " VALUES (?, 'sent', 'a@x.org', x'7b7d', 0, 0, 0, ?)", (msg_id, ("shop", "blog")[i % 2]))
            conn.execute("INSERT INTO recipients VALUES (?, ?, 0, 'sent', NULL)", (msg_id, f"user{i}@example.org"))
        conn.execute("COMMIT")
        out = {}
        for label, recipient in (("every", "example"), ("one", f"user{n // 2}@"), ("none", "nobody")):
            for who in (None, "shop"):
                queries.queue_entries(conn, 2e9, include_final=True, limit=50, live=False, recipient=recipient,
                                      caller=who)  # warm the page cache
                start = time.perf_counter()
                queries.queue_entries(conn, 2e9, include_final=True, limit=50, live=False, recipient=recipient,
                                      caller=who)
                out[f"{label}_{who or 'admin'}_s"] = round(time.perf_counter() - start, 3)
        conn.close()
        return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", type=int, default=0, help="recipients in the spool searched (0: no search)")
    args = ap.parse_args()
    result = frames() | writer()
    if args.search:
        result |= search(args.search)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
