#!/usr/bin/env python3
"""What a webhook event costs the spool writer and the sender's reader, measured directly.

    python bench/outbox_cost.py [--messages 3000]
    PYTHONPATH=/var/tmp/v-7f5/daemon python bench/outbox_cost.py   # another checkout

A Writer (spool/writer.py) on a spool in /dev/shm, synchronous=OFF (the
disk is not measured, bench/daemon_bench.py does): 30 claimed messages of
two recipients stored in one batch, their attempts (both recipients sent)
recorded in one RecordAttempts, and, with webhooks on (every caller's
events to the outbox), their events settled in one WebhookDone, each
batch's answer pickled as the writer sends it (Committed): CPU
microseconds per message of each step (time.process_time, best of 5
rounds), webhooks off and on. Then the sender's read of a page of 16 due
events (its OutboxReader's call: outbox.sendable, or outbox.due in a
checkout where the writer made the payloads) on a read-only connection.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
from pathlib import Path

from daemon_bench import records_op
from smtpgate.proc.calls import Call
from smtpgate.proc.framing import encode
from smtpgate.spool import outbox
from smtpgate.spool.ops import Enqueue, Limits, RecipientOutcome, RecordAttempt, WebhookDone
from smtpgate.spool.writer import Writer

BATCH = 30
ROUNDS = 5
NOW = 1.8e9
REPLY = "250 2.0.0 Ok: queued as 4F2A1"


class Driven:
    def __init__(self, folder: str, hooks: bool):
        self.writer = Writer(str(Path(folder) / "spool.db"), Limits(10**9, 3600.0, 3600.0, None if hooks else frozenset()))
        self.writer.open()
        self.writer.conn.execute("PRAGMA synchronous=OFF")  # sync_full stays True: run_batch leaves it so
        self.tokens = iter(range(10**9))

    def run(self, ops: list) -> list:
        calls = [Call(next(self.tokens), op) for op in ops]
        outcome = self.writer.run_batch(calls)
        encode([self.writer.committed(outcome)])  # what the answer carries costs the writer too
        return [outcome.results[call.token] for call in calls]

    def batch(self, settle: bool) -> tuple[float, float, float]:
        """One batch of messages through the three steps: CPU seconds of each."""
        started = time.process_time()
        ids = [enqueued.id for enqueued in self.run(
            [Enqueue(NOW, b"{}", "a@x.org", ["b@y.org", "c@y.org"], None, "shop", 0, True) for _ in range(BATCH)])]
        stored = time.process_time()
        self.run([records_op([RecordAttempt(NOW, msg_id, [RecipientOutcome("b@y.org", "sent", REPLY),
                                                          RecipientOutcome("c@y.org", "sent", REPLY)], None, False)
                               for msg_id in ids])])
        recorded = time.process_time()
        if settle:
            events = [(seq, msg_id, True) for seq, msg_id in self.writer.conn.execute(
                "SELECT seq, message_id FROM webhook_outbox")]
            recorded = time.process_time()
            # Trees before 2026-12-07 (the base of a comparison) still carry `now`.
            self.run([WebhookDone(**({"now": NOW} if "now" in WebhookDone._fields else {}), events=events)])
        return stored - started, recorded - stored, time.process_time() - recorded


def writer(messages: int, hooks: bool) -> dict:
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        spool = Driven(folder, hooks)
        best = [float("inf")] * 3
        for _ in range(ROUNDS):
            sums = [0.0] * 3
            for _ in range(messages // BATCH):
                sums = [a + b for a, b in zip(sums, spool.batch(hooks), strict=True)]
            best = [min(b, s / (messages // BATCH * BATCH) * 1e6) for b, s in zip(best, sums, strict=True)]
        spool.writer.close()
    return dict(zip(("store_us", "record_us", "settle_us"), (round(b, 1) for b in best), strict=True))


def reader(messages: int) -> float:
    """CPU us per event of the sender's read of a page of 16."""
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        spool = Driven(folder, True)
        for _ in range(messages // BATCH):
            spool.batch(settle=False)
        conn = sqlite3.connect(str(Path(folder) / "spool.db"), isolation_level=None)
        conn.execute("PRAGMA query_only=1")
        read = getattr(outbox, "sendable", None) or outbox.due
        best = float("inf")
        for _ in range(ROUNDS):
            started = time.process_time()
            for _ in range(200):
                assert len(read(conn, NOW + 1, 16, ())) == 16
            best = min(best, (time.process_time() - started) / 200 / 16 * 1e6)
        conn.close()
        spool.writer.close()
    return round(best, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=3000)
    args = ap.parse_args()
    off, on = writer(args.messages, False), writer(args.messages, True)
    print(json.dumps({"webhooks_off": off, "webhooks_on": on,
                      "writer_us_per_event": round(sum(on.values()) - sum(off.values()), 1),
                      "reader_us_per_event": reader(args.messages),
                      "reads": "sendable" if hasattr(outbox, "sendable") else "due"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
