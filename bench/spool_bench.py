#!/usr/bin/env python3
"""Durable enqueues per second into the spool, and the latency of one.

Usage: python3 bench/spool_bench.py [--rounds 5] [--count 20000] [--dir DIR] [--anchors]
                                    [--delivery N]

Each round measures, on a fresh spool in DIR (default: a temporary folder
on the same file system as the repo):
  - durable enqueues/s with 1, 16 and 128 concurrent asyncio callers, each
    awaiting its enqueue (so every OK is after its commit), plus how many
    enqueues shared one commit (= one fsync);
  - the latency of one enqueue with nothing else running (p50, p99).
With --anchors the round then runs /work/shared/anchors/fsync_bench.py (write
+ fsync(file) + fsync(dir), one at a time: the one-fsync-per-request
ceiling) so that both figures come from the same minutes on this noisy
machine. With --delivery N (needs Postfix's smtp-sink) the round also
measures delivery alone: N messages already in the spool relayed with 10
pooled connections to smtp-sink, messages/s and CPU time per message of the
whole process (loop, spool writer thread, build, SMTP client); beside it, in
the same round, our SMTP client alone (SmtpConnection.send on 10 connections,
no spool, no scheduler), so the difference is what delivery and the spool
cost. The summary prints medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from smtpgate.spool.store import Spool

ANCHOR = "/work/shared/anchors/fsync_bench.py"

# About 1 KiB: a SEND, and the spec stored for it (shaped like MessageSpec's JSON).
SEND = {"from": "app@example.com", "to": ["kelly@example.org"], "subject": "记得收衣服", "text": "今天我不回家 " * 60}
SPEC = json.dumps(
    {**SEND, "message_id": "<01JD3Q7Z8K4W6X2V9N5B0C1T@host.example>", "date": "Thu, 26 Nov 2026 16:23:29 +0000"},
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


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process
    return usage.ru_utime + usage.ru_stime


async def delivery_rate(spool_dir: str, port: int, count: int) -> tuple[float, float]:
    """(messages/s, CPU us per message) of Delivery emptying a spool of `count`."""
    import structlog

    from smtpgate.delivery.scheduler import Delivery
    from smtpgate.delivery.settings import DeliverySettings
    from smtpgate.message.validate import validate_send
    from smtpgate.smtp import UpstreamSettings

    spec = validate_send(SEND, max_message_bytes=1 << 20)
    spool = Spool(spool_dir, max_queued=10**9, min_free_bytes=0)
    await spool.open()

    async def filler(n: int) -> None:
        for _ in range(n):
            await spool.enqueue(spec.to_json(), spec.envelope_from, spec.recipients)

    await asyncio.gather(*(filler(count // 50) for _ in range(50)))
    count = count // 50 * 50
    upstream = UpstreamSettings(host="127.0.0.1", port=port, tls="none", helo_name="bench.test")
    settings = DeliverySettings(upstreams=[upstream], connections_per_upstream=10)
    delivery = Delivery(spool, settings, structlog.get_logger())
    cpu, start = cpu_seconds(), time.perf_counter()
    await delivery.start()
    # Polled: a wake-up hook in the spool for a bench alone is not worth it,
    # and a check every 5 ms costs nothing beside the deliveries measured.
    while spool.counters["delivered"] < count:  # noqa: ASYNC110
        await asyncio.sleep(0.005)
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    await delivery.stop(5)
    await spool.close()
    return count / elapsed, cpu / count * 1e6


async def client_rate(port: int, count: int) -> tuple[float, float]:
    """(messages/s, CPU us per message) of SmtpConnection.send alone, 10 connections."""
    from smtpgate.message.build import build_message
    from smtpgate.message.validate import validate_send
    from smtpgate.smtp import SmtpConnection, UpstreamSettings

    data = build_message(validate_send(SEND, max_message_bytes=1 << 20))
    upstream = UpstreamSettings(host="127.0.0.1", port=port, tls="none", helo_name="bench.test")
    conns = [await SmtpConnection.open(upstream) for _ in range(10)]

    async def sender(conn) -> None:
        for _ in range(count // 10):
            await conn.send("app@example.com", ["kelly@example.org"], data)

    cpu, start = cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(sender(c) for c in conns))
    elapsed, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    await asyncio.gather(*(c.quit() for c in conns))
    return count // 10 * 10 / elapsed, cpu / (count // 10 * 10) * 1e6


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
    parser.add_argument("--delivery", type=int, default=0, metavar="N")
    args = parser.parse_args()
    if args.delivery:
        import logging

        import structlog

        from daemon_bench import start_sink  # bench/ is on sys.path when run as a script

        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
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
            if args.delivery:
                sink, port = start_sink()
                try:
                    d = os.path.join(base, f"r{r}delivery")
                    row["delivery msg/s"], row["delivery cpu us/msg"] = asyncio.run(delivery_rate(d, port, args.delivery))
                    shutil.rmtree(d)
                    row["client alone msg/s"], row["client cpu us/msg"] = asyncio.run(client_rate(port, args.delivery))
                finally:
                    sink.terminate()
                    sink.wait()
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
