#!/usr/bin/env python3
"""CPU per message of the delivery process alone, against smtp-sink.

The real `smtpgate-relay` child (delivery/process.py), started as the
daemon starts it, relays MESSAGES messages to Postfix's smtp-sink over 10
pooled connections; this script plays the daemon's part: it hands a
message over on every room the child offers (claim at enqueue, as under
load) and answers its attempt records at once, with no spool behind it.
So the figure is the child's own CPU per message (/proc/PID/stat), without
the intake that shares the machine in bench/relay_compare.py, and the
bench's (the daemon's side of the pipe) beside it. Per round, each LABEL
in rotated order; LABEL=PATH:LOOP[:LEVEL], LOOP "asyncio" or "uvloop",
LEVEL the child's log level for that run (default --log-level):

    flock /work/team/bench.lock python bench/delivery_cpu.py \\
        --run base=/var/tmp/v-main:asyncio --run std=.:asyncio --run uv=.:uvloop [--rounds 5] [--messages 20000] \\
        [--log-level info]
    flock /work/team/bench.lock python bench/delivery_cpu.py \\
        --run info=.:uvloop:info --run warning=.:uvloop:warning
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cpu_bench import cpu_seconds  # noqa: E402
from daemon_bench import REQUEST, start_sink  # noqa: E402

ROUND = r"""
import asyncio, json, os, pickle, sys, time, resource
path, loop_name, sink_port, count, spool_dir, spec_json, log_level = sys.argv[1:8]
count = int(count)
import structlog
from smtpgate.delivery import process
from smtpgate.delivery.settings import DeliverySettings
from smtpgate.smtp import UpstreamSettings
from smtpgate.spool import ops
from smtpgate.spool.ops import Claimed, ClaimDue

def records_of(op):  # the records of a checkout's RecordAttempts or PackedRecords (packed since issue 15), or None
    if type(op) is ops.RecordAttempts or type(op) is getattr(ops, "PackedRecords", None):
        return pickle.loads(op.records) if isinstance(op.records, bytes) else op.records
    return None

class Spool:
    path_dir = spool_dir
    def __init__(self): self.recorded = 0; self.done = None
    def submit(self, op):
        fut = asyncio.get_running_loop().create_future()
        records = records_of(op)
        if records is not None:
            fut.set_result(["sent"] * len(records))
            self.recorded += len(records)
            if self.recorded >= count and not self.done.done(): self.done.set_result(None)
        else:
            fut.set_result([] if type(op) is ClaimDue else 0)
        return fut
    async def next_due(self): return None
    async def count_due(self, now): return 0

async def main():
    spool = Spool(); spool.done = asyncio.get_running_loop().create_future()
    settings = DeliverySettings(upstreams=[UpstreamSettings(host="127.0.0.1", port=int(sink_port), tls="none",
                                                            helo_name="bench.example")], nice=0)
    kwargs = {"loop": loop_name} if loop_name != "-" else {}
    handle = process.DeliveryProcess(spool, settings, structlog.get_logger(), log_format="json",
                                     log_level=log_level, **kwargs)
    handed = 0
    want = handle._on_want
    def on_want(w):
        nonlocal handed
        want(w)
        while handed < count and handle.reserve():
            handed += 1
            handle.hand_over(Claimed(f"{handed:026d}", spec_json.encode(), "app@example.com",
                                     ["kelly@example.org"], 0, time.time(), False))
    handle._on_want = on_want
    handle._handlers[process.Want] = on_want
    await handle.start()
    child = handle._process.pid
    print(json.dumps({"child": child}), flush=True)
    sys.stdin.readline()  # measured from here
    handle._on_want(process.Want(0))
    await spool.done
    print(json.dumps({"recorded": spool.recorded}), flush=True)
    sys.stdin.readline()
    await handle.stop(5)

asyncio.run(main())
"""


def one_round(path: str, loop: str, sink_port: int, count: int, spec_json: str, log_level: str) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(path).resolve() / "daemon"))
    with tempfile.TemporaryDirectory(dir="/var/tmp") as spool_dir, \
            open(os.path.join(spool_dir, "delivery.log"), "w") as log:  # the lines of --log-level info go here
        proc = subprocess.Popen([sys.executable, "-c", ROUND, path, loop, str(sink_port), str(count), spool_dir,
                                 spec_json, log_level], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                text=True, env=env)
        child = json.loads(proc.stdout.readline())["child"]
        time.sleep(0.5)
        before = {"delivery": cpu_seconds(child), "daemon side": cpu_seconds(proc.pid)}
        start = time.perf_counter()
        proc.stdin.write("go\n")
        proc.stdin.flush()
        recorded = json.loads(proc.stdout.readline())["recorded"]
        seconds = time.perf_counter() - start
        after = {"delivery": cpu_seconds(child), "daemon side": cpu_seconds(proc.pid)}
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(60)
    cpu = {role: (after[role] - before[role]) / recorded * 1e6 for role in before}
    return {"messages": recorded, "rate": recorded / seconds, "cpu_us": cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="LABEL=PATH:LOOP[:LEVEL] (repeat)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--messages", type=int, default=20000)
    ap.add_argument("--log-level", default="warning",
                    help="the delivery process's (info: a delivery_attempt line per message, as the default config)")
    args = ap.parse_args()
    runs = {}
    for item in args.run:
        label, _, rest = item.partition("=")
        path, loop, level = (rest.split(":") + [args.log_level])[:3]
        runs[label] = (path, loop, level)
    from smtpgate.message.validate import validate_send

    spec = validate_send(json.loads(REQUEST[5:] % 1), max_message_bytes=1 << 20, message_id_domain="example.com")
    spec_json = spec.to_json()
    spec_json = spec_json.decode() if isinstance(spec_json, bytes) else spec_json
    sink, sink_port = start_sink()
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    results: dict[str, list[dict]] = {label: [] for label in runs}
    labels = list(runs)
    try:
        for r in range(args.rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:
                path, loop, level = runs[label]
                result = one_round(path, loop, sink_port, args.messages, spec_json, level)
                results[label].append(result)
                print(f"round={r} {label} {result}", flush=True)
    finally:
        sink.terminate()
        sink.wait()
    print("uptime:", os.popen("uptime").read().strip())
    med = statistics.median
    print(f"\nmedians of {args.rounds} rounds of {args.messages:,} messages")
    print("| run | log level | msgs/s | CPU µs per message: delivery process | the daemon's side of its pipe |")
    print("| --- | --- | ---: | ---: | ---: |")
    for label, rs in results.items():
        print(f"| {label} | {runs[label][2]} | {med(r['rate'] for r in rs):,.0f} "
              f"| {med(r['cpu_us']['delivery'] for r in rs):.0f} "
              f"| {med(r['cpu_us']['daemon side'] for r in rs):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
