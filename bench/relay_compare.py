#!/usr/bin/env python3
"""End to end and intake of smtpgate checkouts beside Postfix, in one run.

Per round, in rotated order:
- `e2e@LABEL`: 16 connections of bench/loadgen.c send for `seconds` while
  the daemon relays to Postfix's smtp-sink with 10 pooled connections;
  delivered messages per second from the first SEND until STATS counts
  every message delivered, and the CPU per message of the daemon, its
  writer and its delivery process (/proc/PID/stat);
- `intake@LABEL`: the same 16 connections with delivery on hold: durable
  SENDs per second, the spool's commits and the disk's flush requests
  (/proc/diskstats) during the run, CPU per SEND;
- `postfix`: the anchors' Postfix relay (anchors/postfix_relay.py 1 MSGS 16:
  smtp-source -> smtpd -> queue -> smtp -> smtp-sink, until the queue is
  empty) and its HOLD intake, 16 sessions.

Each LABEL=PATH of --checkout runs from that checkout's `daemon/`
(PYTHONPATH); `--setting LABEL:KEY=VALUE` adds a configuration key to
that label's daemons, so one checkout can run twice, e.g. with and without
uvloop (`--checkout this=. --checkout std=. --setting std:event_loop=asyncio`).
The daemons run at log level info (their default: one line per delivery
attempt, as Postfix logs each delivery). Postfix is set up and torn down
by the anchors' scripts, so run it under the machine's bench lock:

    flock /work/team/bench.lock python3 bench/relay_compare.py \
        --checkout base=/tmp/base --checkout this=. [--setting this:KEY=VALUE] \
        [--rounds 3] [--seconds 5] [--postfix-messages 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from cpu_bench import cpu_seconds, processes  # noqa: E402
from daemon_bench import ANCHORS, Daemon, DiskFlushes, build_loadgen, loadgen, send_and_drain, start_sink  # noqa: E402


def per_message(daemon: Daemon, run, roles: set[str]) -> dict:
    """run() -> message count; CPU µs per message of each process, and the wall time."""
    deadline = time.monotonic() + 30
    while (pids := processes(daemon)).keys() < roles and time.monotonic() < deadline:
        time.sleep(0.1)  # the children are starting
    time.sleep(0.5)  # and idle
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    start = time.perf_counter()
    messages = run()
    seconds = time.perf_counter() - start
    cpu = {role: (cpu_seconds(pid) - before[role]) / messages * 1e6 for role, pid in pids.items()}
    return {"messages": messages, "seconds": seconds, "rate": messages / seconds, "cpu_us": cpu}


def e2e(binary: Path, workdir: Path, env: dict, settings: dict, sink_port: int, seconds: float) -> dict:
    daemon = Daemon(Path(tempfile.mkdtemp(dir=workdir)), env=env, upstream=[f"127.0.0.1:{sink_port}"],
                    connections_per_upstream=10, **settings)
    try:
        return per_message(daemon, lambda: send_and_drain(binary, daemon, seconds)[1],
                           {"daemon", "writer", "delivery"})
    finally:
        daemon.stop()


def intake(binary: Path, workdir: Path, env: dict, settings: dict, seconds: float, flushes: DiskFlushes) -> dict:
    daemon = Daemon(Path(tempfile.mkdtemp(dir=workdir)), env=env, upstream=["127.0.0.1:9"], hold=True, **settings)
    try:
        commits = daemon.stats()["spool"]["commits"]
        flushed = None if flushes.why_not else flushes.read()

        def run() -> int:
            sent = loadgen(binary, daemon.port, 16, seconds)
            return sent["requests"] - sent["errors"]

        result = per_message(daemon, run, {"daemon", "writer"})
        result["commits"] = daemon.stats()["spool"]["commits"] - commits
        result["disk_flushes"] = None if flushed is None else flushes.read() - flushed
        return result
    finally:
        daemon.stop()


def postfix(messages: int) -> dict:
    out = subprocess.run([sys.executable, str(ANCHORS / "postfix_relay.py"), "1", str(messages), "16"],
                         capture_output=True, text=True, cwd=ANCHORS, timeout=900, check=True).stdout
    e2e_rate = float(re.search(r"e2e_msg_per_s=(\d+)", out).group(1))
    hold_rate = float(re.search(r"hold-intake .* msg_per_s=(\d+)", out).group(1))
    return {"e2e": e2e_rate, "intake": hold_rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkout", action="append", default=[], help="LABEL=PATH (repeat); default this=.")
    ap.add_argument("--setting", action="append", default=[],
                    help="LABEL:KEY=VALUE (repeat): a config key for that label's daemons; VALUE is JSON or a string")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--postfix-messages", type=int, default=10000)
    ap.add_argument("--no-postfix", action="store_true")
    args = ap.parse_args()
    checkouts = dict(c.split("=", 1) for c in args.checkout) or {"this": str(ROOT)}
    envs = {label: dict(os.environ, PYTHONPATH=str(Path(path).resolve() / "daemon"))
            for label, path in checkouts.items()}
    # At the daemon's default log level, not bench/daemon_bench.py's
    # warning: the delivery process logs one line per attempt at info, and
    # the Postfix beside it logs each delivery too (anchors/postfix_setup.sh:
    # maillog_file). `--setting LABEL:log_level=warning` leaves the line out.
    settings: dict[str, dict] = {label: {"log_level": "info"} for label in checkouts}
    for item in args.setting:
        label, _, pair = item.partition(":")
        key, _, value = pair.partition("=")
        try:
            settings[label][key] = json.loads(value)
        except json.JSONDecodeError:
            settings[label][key] = value
    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-relay-compare-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    flushes = DiskFlushes(workdir)
    sink, sink_port = start_sink()
    if not args.no_postfix:
        subprocess.run(["bash", str(ANCHORS / "postfix_setup.sh")], check=True, capture_output=True)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    modes = [f"{kind}@{label}" for label in checkouts for kind in ("e2e", "intake")]
    modes += [] if args.no_postfix else ["postfix"]
    results: dict[str, list[dict]] = {mode: [] for mode in modes}
    try:
        for r in range(args.rounds):
            shift = r % len(modes)
            for mode in modes[shift:] + modes[:shift]:
                if mode == "postfix":
                    result = postfix(args.postfix_messages)
                else:
                    kind, label = mode.split("@")
                    result = (e2e(binary, workdir, envs[label], settings[label], sink_port, args.seconds)
                              if kind == "e2e" else
                              intake(binary, workdir, envs[label], settings[label], args.seconds, flushes))
                results[mode].append(result)
                print(f"round={r} mode={mode} {result}", flush=True)
    finally:
        sink.terminate()
        sink.wait()
        if not args.no_postfix:
            subprocess.run(["bash", str(ANCHORS / "postfix_teardown.sh")], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)
    print("uptime:", os.popen("uptime").read().strip())
    med = statistics.median
    pf = results.get("postfix")
    print(f"\nflushes: {flushes.why_not or 'counted on ' + ', '.join(flushes.disks)}; medians of {args.rounds}")
    print("| mode | msgs/s | vs Postfix | CPU µs per message: daemon + writer + delivery | commits; disk flushes |")
    print("| --- | ---: | ---: | --- | --- |")
    for mode, runs in results.items():
        if mode == "postfix":
            print(f"| Postfix relay end to end | {med(r['e2e'] for r in runs):,.0f} | 1x | | |")
            print(f"| Postfix intake (HOLD), 16 sessions | {med(r['intake'] for r in runs):,.0f} | 1x | | |")
            continue
        kind = mode.split("@")[0]
        rate = med(r["rate"] for r in runs)
        ref = med(r[kind] for r in pf) if pf else None
        roles = [role for role in ("daemon", "writer", "delivery") if role in runs[0]["cpu_us"]]
        cpu = {role: med(r["cpu_us"][role] for r in runs) for role in roles}
        cpu_text = " + ".join(f"{cpu[role]:.0f}" for role in roles) + f" = {sum(cpu.values()):.0f}"
        durable = ""
        if kind == "intake":
            commits = sum(r["commits"] for r in runs)
            flushed = [r["disk_flushes"] for r in runs if r["disk_flushes"] is not None]
            durable = f"{commits:,} commits; {sum(flushed):,} flushes" if flushed else f"{commits:,} commits"
        print(f"| {mode} | {rate:,.0f} | {f'{rate / ref:.1f}x' if ref else ''} | {cpu_text} | {durable} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
