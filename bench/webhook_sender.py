#!/usr/bin/env python3
"""What a webhook event costs the sender (webhooks/sender.py) in the delivery process, measured alone.

    python bench/webhook_sender.py [--events 6000] [--rounds 3]
    PYTHONPATH=/var/tmp/v-m12/daemon python bench/webhook_sender.py   # another checkout

A spool in /dev/shm holds `events` sent messages of one recipient, each
with its `message.sent` event (written by a Writer, spool/writer.py); a
WebhookSender with its OutboxReader (its own read-only connection in its
thread, as in smtpgate-relay) posts them all, signed, to
bench/http_bench.py's lean receiver in a process of its own, on uvloop.
Its outcomes go to the Writer in this process, whose CPU for them is
measured apart and left out. Per round: CPU microseconds per event of the
loop's thread and of the reader thread (/proc/self/task), the events per
second; then the medians. The delivery process at nice 10 pays this
for every event beside its deliveries (bench/http_bench.py: hooks - off).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from itertools import count
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_bench  # noqa: E402
from daemon_bench import records_op  # noqa: E402

from smtpgate.proc.calls import Call  # noqa: E402
from smtpgate.spool.ops import (  # noqa: E402
    Enqueue, Limits, RecipientOutcome, RecordAttempt, WebhookDone, WebhookRetry,
)
from smtpgate.spool.schema import DB_FILE  # noqa: E402
from smtpgate.spool.writer import Writer  # noqa: E402
from smtpgate.webhooks.sender import OutboxReader, Target, WebhookSender, WebhookSettings  # noqa: E402

NOW = time.time()


class Spool:
    """The relay's spool calls the sender makes, run at once by a Writer;
    the CPU they take is counted in `seconds`, to be left out."""

    def __init__(self, path: str):
        self.writer = Writer(path, Limits(10**9, 3600.0, 3600.0, None))
        self.writer.open()
        self.writer.conn.execute("PRAGMA synchronous=OFF")  # the disk is not measured here
        self.tokens = count()
        self.seconds = 0.0
        self.left = 0  # events not yet answered
        self.emptied = asyncio.Event()

    def run(self, *ops):
        """Run `ops` in one transaction; returns the first one's result."""
        started = time.thread_time()
        calls = [Call(next(self.tokens), op) for op in ops]
        outcome = self.writer.run_batch(calls)
        self.writer.committed(outcome)
        self.seconds += time.thread_time() - started
        return outcome.results[calls[0].token]

    def _done(self, op) -> asyncio.Future:
        self.run(op)
        future = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future

    def webhook_done(self, events):
        self.left -= len(events)
        if self.left <= 0:
            self.emptied.set()
        # Trees before 2026-12-07 (the base of a comparison) still carry `now`.
        return self._done(WebhookDone(**({"now": time.time()} if "now" in WebhookDone._fields else {}),
                                      events=list(events)))

    def webhook_retry(self, next_attempt, events, error):
        return self._done(WebhookRetry(next_attempt, list(events), error))

    def fill(self, events: int) -> None:
        """`events` sent messages, each with its event; the WAL checkpointed
        (as the writer's Checkpointer keeps it short)."""
        for _ in range(0, events, 100):
            ids = [self.run(Enqueue(NOW, b"{}", "app@shop.example", ["kelly@example.org"], None, "shop", 0, True)).id
                   for _ in range(100)]
            self.run(records_op([RecordAttempt(NOW, msg_id, [RecipientOutcome(
                "kelly@example.org", "sent", "250 2.0.0 Ok: queued as 4F2A1")], None, False) for msg_id in ids]))
        self.writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


class Silent:
    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def threads_cpu() -> dict[int, float]:
    """CPU seconds of each thread of this process, by thread id."""
    found = {}
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/stat") as stat:
            fields = stat.read().rpartition(")")[2].split()
        found[int(task)] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


async def one_round(folder: Path, events: int, url: str, key: bytes) -> dict:
    spool = Spool(str(folder / DB_FILE))
    spool.fill(events)
    spool.seconds, spool.left = 0.0, events
    reader = OutboxReader(str(folder / DB_FILE))
    # The sender alone, never waiting for the CPU (webhook_yield_for 0; not in trees before it).
    settings = ({}, Target(url, (key,)), 3600.0, 10.0) + ((0.0,) if "yield_for" in WebhookSettings._fields else ())
    sender = WebhookSender(spool, reader, WebhookSettings(*settings), Silent())
    before = threads_cpu()
    started = time.perf_counter()
    sender.start()
    await spool.emptied.wait()
    wall = time.perf_counter() - started
    after = threads_cpu()
    await sender.stop()
    spool.writer.close()
    loop_thread = threading.get_native_id()
    loop_us = (after[loop_thread] - before[loop_thread] - spool.seconds) / events * 1e6
    reader_us = sum(after[t] - before.get(t, 0.0) for t in after if t != loop_thread) / events * 1e6
    return {"loop_us": round(loop_us, 1), "reader_us": round(reader_us, 1),
            "sender_us": round(loop_us + reader_us, 1), "events_per_s": round(events / wall)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=6000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import uvloop
    receiver, port = http_bench.start_receiver(0, "lean")
    key = base64.b64decode(http_bench.SECRET[len("whsec_"):])
    url = f"http://127.0.0.1:{port}/hook"
    rows = []
    try:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
                before = http_bench.received(port)
                row = uvloop.run(one_round(Path(folder), args.events, url, key))
                assert http_bench.received(port) - before >= args.events, "an event did not arrive"
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        receiver.terminate()
        receiver.wait()
    print(json.dumps({"median": {key: statistics.median(row[key] for row in rows) for key in rows[0]},
                      "code": str(Path(sys.modules["smtpgate"].__file__).parent)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
