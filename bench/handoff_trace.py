#!/usr/bin/env python3
"""Where a lone caller's slow SENDs come from (issue 15): a trace of one run.

One daemon from a checkout (relaying to Postfix's smtp-sink, or with
`--hold`), one connection, one SEND in flight (bench/c_handoff.c
`gate_open`), and `perf record` of the scheduler and of fdatasync for
`--seconds` in the middle of the run (needs root and perf). The SENDs of
that window are lined up with the trace (c_handoff's start times and perf's
timestamps are both CLOCK_MONOTONIC) and the script prints:

- the SENDs' p50 and p99, and how many took over twice the p50 ("slow");
- the spool writer's fdatasync of the WAL: its p50 and p99, and the
  longest one within each SEND, for the slow SENDs and the others;
- the run-queue waits of the daemon's and the writer's main threads
  (woken or preempted, until they run) per SEND, by what ran on the CPU
  they waited for, and how much of that wait the other CPU sat idle (a
  task woken on a busy CPU while the other idles waits there until it is
  preempted or a balance moves it).

    flock /work/team/bench.lock python bench/handoff_trace.py [--checkout PATH] [--hold] [--count 3000] [--seconds 2]
"""

from __future__ import annotations

import argparse
import collections
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

from c_handoff import build as build_c_handoff  # noqa: E402
from cpu_bench import processes  # noqa: E402
from daemon_bench import Daemon, start_sink  # noqa: E402
from php_handoff import percentile, wait_idle  # noqa: E402

EVENTS = ("sched:sched_switch", "sched:sched_wakeup", "syscalls:sys_enter_fdatasync", "syscalls:sys_exit_fdatasync")
LINE = re.compile(r"\s*(.+?)\s+(\d+)/(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
SWITCH = re.compile(r"prev_comm=(.*?) prev_pid=(\d+) .*?prev_state=(\S+) ==> next_comm=(.*?) next_pid=(\d+)")
WAKEUP = re.compile(r"pid=(\d+) .*target_cpu=(\d+)")
IDLE = "swapper"


def read_trace(path: Path) -> list[tuple]:
    """(time in µs, tid, cpu, event, its text) of each event of `perf script`."""
    out = subprocess.run(["perf", "script", "-i", str(path), "-F", "comm,pid,tid,cpu,time,event,trace"],
                         capture_output=True, text=True, check=True).stdout
    events = []
    for line in out.splitlines():
        m = LINE.match(line)
        if m:
            events.append((float(m[5]) * 1e6, int(m[3]), int(m[4]), m[6].rpartition(":")[2], m[7]))
    return events


def analyse(events: list[tuple], sends: list[tuple[float, float]], roles: dict[int, str],
            names: dict[int, str]) -> dict:
    """Per SEND of `sends` (start, latency) inside the trace: the writer's
    longest fdatasync and the run-queue waits of `roles` (tid -> name);
    `names` names the threads of smtpgate's processes (others go by comm)."""
    writer = next(tid for tid, role in roles.items() if role == "writer")
    running: dict[int, str] = {}  # cpu -> comm
    waiting: dict[int, tuple[float, int]] = {}  # tid -> (since, cpu)
    behind: dict[int, str] = {}  # tid -> what ran on the CPU it is queued on
    # (start, length, role, what ran on its CPU, how much of it the other
    # CPU had been idle, counted from when it went idle until the wait ended)
    waits = []
    idle_since: dict[int, float | None] = {}
    syncs, in_sync = [], None
    for t, tid, cpu, event, text in events:
        if event == "sched_switch":
            m = SWITCH.search(text)
            prev, prev_state, nxt, nxt_comm = int(m[2]), m[3], int(m[5]), m[4]
            running[cpu] = names.get(nxt, nxt_comm)
            idle_since[cpu] = t if nxt_comm.startswith(IDLE) else None
            if nxt in waiting:
                since, on = waiting.pop(nxt)
                other = idle_since.get(1 - on)
                waits.append((since, t - since, roles[nxt], behind.get(nxt, "?"),
                               max(0.0, t - max(since, other)) if other is not None else 0.0))
            if prev in roles and prev_state.startswith("R"):  # preempted
                waiting[prev] = (t, cpu)
                behind[prev] = running[cpu]
        elif event == "sched_wakeup":
            m = WAKEUP.search(text)
            woken, on = int(m[1]), int(m[2])
            if woken in roles:
                waiting[woken] = (t, on)
                behind[woken] = running.get(on, "?")
        elif event == "sys_enter_fdatasync" and tid == writer:
            in_sync = t
        elif event == "sys_exit_fdatasync" and tid == writer and in_sync is not None:
            syncs.append((in_sync, t - in_sync))
            in_sync = None
    first, last = events[0][0], events[-1][0]
    window = [(s, lat) for s, lat in sends if first <= s and s + lat <= last]
    p50 = statistics.median(lat for _, lat in window)
    rows = {"slow": [], "others": []}
    for s, lat in window:
        longest = max((d for t, d in syncs if s <= t < s + lat), default=0.0)
        mine = [w for w in waits if s <= w[0] < s + lat]
        rows["slow" if lat > 2 * p50 else "others"].append((lat, longest, mine))
    return {"window": window, "p50": p50, "syncs": [d for _, d in syncs], "rows": rows}


def report(result: dict) -> None:
    lats = sorted(lat for _, lat in result["window"])
    syncs = sorted(result["syncs"])
    print(f"SENDs in the trace: {len(lats)}, p50 {percentile(lats, 0.5):.0f} µs, p99 {percentile(lats, 0.99):.0f} µs; "
          f"writer fdatasyncs: {len(syncs)}, p50 {percentile(syncs, 0.5):.0f} µs, p99 {percentile(syncs, 0.99):.0f} µs\n")
    print("| SENDs | n | latency p50 | longest fdatasync in it, p50 | run-queue wait per SEND: daemon + writer "
          "| of it, the other CPU idle | waited behind (µs per SEND) |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for kind, rows in result["rows"].items():
        if not rows:
            continue
        n = len(rows)
        by_role = collections.Counter()
        behind = collections.Counter()
        idle = 0.0
        for _, _, mine in rows:
            for _, length, role, comm, idle_part in mine:
                by_role[role] += length
                behind[comm] += length
                idle += idle_part
        top = ", ".join(f"{comm} {v / n:.0f}" for comm, v in behind.most_common(4))
        print(f"| {kind} | {n} | {statistics.median(r[0] for r in rows):.0f} µs "
              f"| {statistics.median(r[1] for r in rows):.0f} µs "
              f"| {by_role['daemon'] / n:.0f} + {by_role['writer'] / n:.0f} µs | {idle / n:.0f} µs | {top} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", default=str(ROOT), help="the checkout whose daemon/ runs")
    parser.add_argument("--hold", action="store_true", help="delivery on hold: the hand-off alone")
    parser.add_argument("--count", type=int, default=3000, help="SENDs (the trace covers the middle of them)")
    parser.add_argument("--seconds", type=float, default=2.0, help="how long perf records")
    args = parser.parse_args()
    if shutil.which("perf") is None or shutil.which("smtp-sink") is None:
        sys.exit("needs perf and smtp-sink")
    binary = build_c_handoff()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-handoff-trace-", dir=os.environ.get("SCRATCH")))
    print("uptime:", os.popen("uptime").read().strip())
    sink, sink_port = start_sink()
    env = dict(os.environ, PYTHONPATH=str(Path(args.checkout).resolve() / "daemon"))
    daemon = Daemon(workdir, env=env, upstream=[f"127.0.0.1:{sink_port}"], hold=args.hold,
                    connections_per_upstream=2)
    try:
        time.sleep(1.0)  # the children are up and idle
        pids = processes(daemon)
        roles = {pids["daemon"]: "daemon", pids["writer"]: "writer"}  # main threads: tid == pid
        names = {int(tid): role if int(tid) == pid else f"{role} thread"
                 for role, pid in pids.items() for tid in os.listdir(f"/proc/{pid}/task")}
        client = subprocess.Popen([str(binary), "gate_open", str(args.count), f"tcp://127.0.0.1:{daemon.port}"],
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        data = workdir / "perf.data"
        subprocess.run(["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-a", "-o", str(data),
                        *[arg for event in EVENTS for arg in ("-e", event)], "--", "sleep", str(args.seconds)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        out, _ = client.communicate(timeout=600)
        if not args.hold:
            wait_idle(daemon)
        sent = json.loads(out)
        events = read_trace(data)
    finally:
        daemon.stop()
        sink.terminate()
        sink.wait(10)
    print("uptime:", os.popen("uptime").read().strip())
    report(analyse(events, list(zip(sent["starts_us"], sent["latencies_us"], strict=True)), roles, names))
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
