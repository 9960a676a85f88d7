#!/usr/bin/env python3
"""Durable enqueues per second into the spool, and the latency of one.

Usage: python3 bench/spool_bench.py [--rounds 5] [--count 20000] [--dir DIR] [--anchors]

Each round measures, on a fresh spool in DIR (default: a temporary folder
on the same file system as the repo):
  - durable enqueues/s with 1, 16 and 128 concurrent asyncio callers, each
    awaiting its enqueue (so every OK is after its commit), plus how many
    enqueues shared one commit (= one fsync);
  - the latency of one enqueue with nothing else running (p50, p99).
With --anchors the round then runs /work/shared/anchors/fsync_bench.py (write
+ fsync(file) + fsync(dir), one at a time: the one-fsync-per-request
ceiling) so that both figures come from the same minutes on this noisy
machine. The summary prints medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from smtpgate.spool import Spool

ANCHOR = "/work/shared/anchors/fsync_bench.py"

# About 1 KiB, shaped like a validated SEND.
SPEC = json.dumps(
    {
        "from": "app@example.com",
        "to": ["kelly@example.org"],
        "subject": "记得收衣服",
        "text": "今天我不回家 " * 60,
        "message_id": "<01JD3Q7Z8K4W6X2V9N5B0C1T@host.example>",
        "date": "Thu, 26 Nov 2026 16:23:29 +0000",
    },
    ensure_ascii=False,
).encode()


async def rate(spool_dir: str, concurrency: int, count: int) -> tuple[float, float]:
    """(enqueues per second, enqueues per commit) for `count` enqueues."""
    spool = Spool(spool_dir, max_queued=10**9, min_free_bytes=0)
    await spool.open()
    per_task = count // concurrency

    async def caller(n: int) -> None:
        for _ in range(per_task):
            await spool.enqueue(SPEC, "app@example.com", ["kelly@example.org"])

    commits_before = spool.commits
    start = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    commits = spool.commits - commits_before
    await spool.close()
    return per_task * concurrency / elapsed, per_task * concurrency / commits


async def latency(spool_dir: str, count: int) -> tuple[float, float]:
    """(p50, p99) in milliseconds of one enqueue at a time."""
    spool = Spool(spool_dir, max_queued=10**9, min_free_bytes=0)
    await spool.open()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await spool.enqueue(SPEC, "app@example.com", ["kelly@example.org"])
        samples.append((time.perf_counter() - start) * 1000)
    await spool.close()
    samples.sort()
    return samples[len(samples) // 2], samples[int(len(samples) * 0.99)]


def anchor(scratch: str) -> dict[str, float]:
    """Anchor rows 1a and 1b: files/s of write+fsync(file) and of
    write+fsync(file)+fsync(dir), one at a time (one fsync per request)."""
    if not os.path.exists(ANCHOR):
        return {}
    out = subprocess.run(
        [sys.executable, ANCHOR, scratch, "1", "2000", "1024"], capture_output=True, text=True, check=True
    ).stdout
    found = dict(re.findall(r"^SUMMARY (single_file|single_file_dir)\s+(\d+)", out, re.M))
    return {f"anchor {mode} /s": float(v) for mode, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--anchors", action="store_true")
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="spool-bench-", dir=args.dir or os.path.dirname(os.path.abspath(__file__)))
    results: dict[str, list[float]] = {}
    try:
        for r in range(args.rounds):
            row = {}
            for concurrency in (1, 16, 128):
                count = args.count if concurrency > 1 else min(args.count, 3000)
                d = os.path.join(base, f"r{r}c{concurrency}")
                per_s, per_commit = asyncio.run(rate(d, concurrency, count))
                row[f"c{concurrency}/s"] = per_s
                row[f"c{concurrency} per commit"] = per_commit
                shutil.rmtree(d)
            d = os.path.join(base, f"r{r}lat")
            row["p50 ms"], row["p99 ms"] = asyncio.run(latency(d, 2000))
            shutil.rmtree(d)
            if args.anchors:
                row.update(anchor(os.path.join(base, "anchor")))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v:,.2f}" for k, v in row.items()), flush=True)
            for k, v in row.items():
                results.setdefault(k, []).append(v)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"median of {args.rounds} rounds:")
    for k, values in results.items():
        print(f"  {k:>20}: {statistics.median(values):>10,.2f}  (min {min(values):,.2f}, max {max(values):,.2f})")


if __name__ == "__main__":
    main()
