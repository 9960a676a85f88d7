#!/usr/bin/env python3
"""What the spool writes for a message of a given size, step by step.

    python bench/spool_bytes.py [--sizes 1000,100000,1000000] [--messages 20]

A Writer (spool/writer.py) on a spool in a temporary folder of /var/tmp,
its WAL never checkpointed during a run, stores `messages` messages whose
text is `size` bytes, then records their delivery: either claimed at
enqueue (the daemon hands a new message to delivery itself: Enqueue's
`claim`) or stored 'queued' and claimed later (ClaimDue, when delivery
had no room). Per message, the WAL bytes of each step as a multiple of
the stored message's size: what a step rewrites beyond its own rows. No
fsync is measured; this is bytes, not time.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_bench import records_op  # noqa: E402

from smtpgate.proc.calls import Call  # noqa: E402
from smtpgate.spool.ops import ClaimDue, Enqueue, Limits, RecipientOutcome, RecordAttempt  # noqa: E402
from smtpgate.spool.schema import DB_FILE  # noqa: E402
from smtpgate.spool.writer import Writer  # noqa: E402

TOKENS = itertools.count()


def run(writer: Writer, op):
    call = Call(next(TOKENS), op)
    outcome = writer.run_batch([call])
    writer.committed(outcome)
    return outcome.results[call.token]


def one(size: int, messages: int, claim: bool) -> dict:
    with tempfile.TemporaryDirectory(dir=os.environ.get("SCRATCH", "/var/tmp")) as folder:
        writer = Writer(f"{folder}/{DB_FILE}", Limits(10**9, 3600.0, 3600.0, None))
        writer.open()
        writer.conn.execute("PRAGMA wal_autocheckpoint=0")  # every page written stays in the WAL
        wal = Path(f"{folder}/{DB_FILE}-wal")
        spec = json.dumps({"text": "x" * size}).encode()
        steps, last = {}, wal.stat().st_size if wal.exists() else 0

        def step(name: str) -> None:
            nonlocal last
            now = wal.stat().st_size
            steps[name] = round((now - last) / messages / len(spec), 2)
            last = now

        now = time.time()
        ids = [run(writer, Enqueue(now, spec, "app@shop.example", ["kelly@example.org"], None, "", 0, claim)).id
               for _ in range(messages)]
        step("enqueue")
        if not claim:
            assert len(run(writer, ClaimDue(now + 1, messages))) == messages
            step("claim")
        run(writer, records_op([RecordAttempt(now, msg_id, [RecipientOutcome(
            "kelly@example.org", "sent", "250 2.0.0 Ok")], None, False) for msg_id in ids]))
        step("record")
        writer.close()
        return {"size": len(spec), "claimed_at_enqueue": claim, "wal_per_message_size": steps,
                "total": round(sum(steps.values()), 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,100000,1000000")
    ap.add_argument("--messages", type=int, default=20)
    args = ap.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        for claim in (True, False):
            print(json.dumps(one(size, args.messages, claim)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
