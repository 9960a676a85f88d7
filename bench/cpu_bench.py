#!/usr/bin/env python3
"""CPU time per message of each smtpgate process, from /proc/PID/stat.

    python3 bench/cpu_bench.py [--rounds 3] [--seconds 5]

Throughput on a shared 2-core machine moves by half from one run to the
next with the other work on it; the CPU a process spends per message moves
far less, so this is the figure to compare two versions of the code with
(run it once per version, alternately, and compare the rounds).

- intake: 16 connections of bench/loadgen.c send for `seconds` with
  delivery on hold (`hold = true`); CPU of the daemon and of its spool
  writer per SEND accepted.
- end to end: the same load while the daemon relays to Postfix's
  smtp-sink with 10 pooled connections, until every message is delivered;
  CPU of the daemon, the writer and the delivery process per message.

The package measured is whichever `python3 -m smtpgate` finds (set
PYTHONPATH to measure another checkout). Prints one JSON line per round
and the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_bench import Daemon, build_loadgen, loadgen, running_daemon, send_and_drain, start_sink  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
CHILDREN = {"smtpgate-spool": "writer", "smtpgate-relay": "delivery"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def processes(daemon: Daemon) -> dict[str, int]:
    """The daemon's pid and its children's, by role."""
    found = {"daemon": daemon.proc.pid}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == daemon.proc.pid and name in CHILDREN:
            found[CHILDREN[name]] = int(entry)
    return found


def measure(daemon: Daemon, run) -> dict:
    """CPU microseconds per message of each process while `run()` returns the message count."""
    time.sleep(0.5)  # the children are up and idle
    pids = processes(daemon)
    before = {role: cpu_seconds(pid) for role, pid in pids.items()}
    messages = run()
    return {role: round((cpu_seconds(pid) - before[role]) / messages * 1e6, 1) for role, pid in pids.items()} | {
        "messages": messages}


def intake_round(binary: Path, workdir: Path, seconds: float) -> dict:
    with running_daemon(workdir, upstream=["127.0.0.1:9"], hold=True) as daemon:
        def run() -> int:
            sent = loadgen(binary, daemon.port, 16, seconds)
            return sent["requests"] - sent["errors"]
        return measure(daemon, run)


def e2e_round(binary: Path, workdir: Path, sink_port: int, seconds: float) -> dict:
    with running_daemon(workdir, upstream=[f"127.0.0.1:{sink_port}"], connections_per_upstream=10) as daemon:
        return measure(daemon, lambda: send_and_drain(binary, daemon, seconds)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()

    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-cpu-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    sink, sink_port = start_sink() if shutil.which("smtp-sink") else (None, None)
    rounds = []
    try:
        for _ in range(args.rounds):
            row = {"intake": intake_round(binary, workdir, args.seconds)}
            if sink:
                row["e2e"] = e2e_round(binary, workdir, sink_port, args.seconds)
            rounds.append(row)
            print(json.dumps(row), flush=True)
    finally:
        if sink:
            sink.terminate()
            sink.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    for phase in rounds[0]:
        medians = {role: statistics.median(r[phase][role] for r in rounds)
                   for role in rounds[0][phase] if role != "messages"}
        print(f"{phase}: CPU us per message, medians of {len(rounds)}: {json.dumps(medians)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
