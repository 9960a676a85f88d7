#!/usr/bin/env python3
"""What the spool's periodic work costs with a large spool: the reads and
writes that run every few seconds or minutes whatever the load, and so
must not grow with the number of messages.

    PYTHONPATH=/path/to/checkout/daemon python bench/housekeeping_cost.py [--messages 100000]

Run it once per checkout, alternately. Each figure on a spool of its own
(in a temporary folder on this file system), rows of a small mail's size,
best of 3, in seconds:
- oldest_due_s: the age of the oldest waiting message, read at every
  /metrics scrape (queries.oldest_due), with N waiting and N sent;
- page_list_s: the queue page's "Oldest waiting" list of 50 (reloaded
  every 10 s), behind N final messages kept (keep_final);
- expire_s: the writer's Expire during an outage (once a minute, every
  SEND's commit waiting behind it), N held and none past max_age;
- the purge (every 5 minutes) of N final messages past keep_final, with
  their recipients and idempotency keys, in writer transactions as the
  daemon's spool makes them (one until purges were cut into transactions
  of a limited size): purge_transactions, purge_longest_s (what a SEND
  arriving meanwhile may wait), purge_total_s (once, cold).
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
import time
import timeit
from pathlib import Path

from smtpgate.proc.calls import Call
from smtpgate.spool import queries
from smtpgate.spool.ops import Expire, Limits, Purge
from smtpgate.spool.ulid import new_ulid
from smtpgate.spool.writer import Writer

SPEC = b"x" * 1400
T0 = 1.8e9


def writer_with(folder: str, rows: list[tuple[str, float, float]], keys: bool = False) -> Writer:
    """A writer on a new spool holding `rows` (state, created, updated)."""
    writer = Writer(str(Path(folder) / "spool.sqlite3"), Limits(10**9, 3600.0, 3600.0))
    writer.open()
    conn = writer.conn
    conn.execute("BEGIN")
    for n, (state, created, updated) in enumerate(rows):
        msg_id = new_ulid(T0 + n)
        conn.execute("INSERT INTO messages (id, state, envelope_from, spec, created, updated, next_attempt)"
                     " VALUES (?, ?, 'a@x.org', ?, ?, ?, ?)", (msg_id, state, SPEC, created, updated, created))
        conn.execute("INSERT INTO recipients VALUES (?, 'r@y.org', 0, ?, '250 ok')", (msg_id, state))
        if keys:
            conn.execute("INSERT INTO idempotency VALUES ('anonymous', ?, ?, ?)", (f"k{n}", msg_id, created))
    conn.execute("COMMIT")
    for state, _, _ in rows:
        writer.state_counts[state] += 1
    return writer


def best(fn) -> float:
    return round(min(timeit.repeat(fn, number=1, repeat=3)), 6)


def measure(n: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        writer = writer_with(folder, [(("sent", "queued", "sent", "deferred")[i % 4], T0 + i, T0 + i)
                                      for i in range(2 * n)])
        out["oldest_due_s"] = best(lambda: queries.oldest_due(writer.conn))
        writer.close()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        writer = writer_with(folder, [("sent", T0 + i, T0 + i) for i in range(n)] +
                             [("queued", T0 + n + i, T0 + n + i) for i in range(50)])
        waiting = {"waiting": True} if "waiting" in inspect.signature(queries.queue_entries).parameters else {}
        out["page_list_s"] = best(lambda: queries.queue_entries(writer.conn, 2e9, limit=50, **waiting))
        writer.close()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        writer = writer_with(folder, [("queued", T0 + i, T0 + i) for i in range(n)])
        out["expire_s"] = best(lambda: writer.run_batch([Call(1, Expire(2e9, T0 - 1, "550 gave up"))]))
        writer.close()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as folder:
        writer = writer_with(folder, [("sent", T0 + i, T0 + i) for i in range(n)], keys=True)
        limit = Purge._field_defaults.get("limit")
        took = []
        while True:
            start = time.perf_counter()
            messages, keys = writer.run_batch([Call(1, Purge(2e9))]).results[1]
            took.append(time.perf_counter() - start)
            if limit is None or (messages < limit and keys < limit):
                break
        out |= {"purge_transactions": len(took), "purge_longest_s": round(max(took), 6),
                "purge_total_s": round(sum(took), 6)}
        writer.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    args = ap.parse_args()
    print(json.dumps({"messages": args.messages} | measure(args.messages)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
