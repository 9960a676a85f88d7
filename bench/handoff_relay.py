#!/usr/bin/env python3
"""The hand-off a lone caller feels while the daemon relays (issue 15).

One connection, one SEND in flight (bench/c_handoff.c `gate_open`, the C
library), `count` SENDs per mode and round, modes rotated each round:

- `floor`: an asyncio server that, for each request line, rewrites a small
  file, fsyncs it and its directory, then replies: a round trip plus one
  durable write, the least a durable hand-off can cost here;
- `relay@LABEL`: smtpgate relaying every message at once to Postfix's
  smtp-sink (the PHP page on an otherwise idle daemon);
- `hold@LABEL`: the same daemon build with delivery on hold (`hold = true`):
  the hand-off with no delivery beside it.

Each LABEL=PATH of --checkout runs its own daemons from that checkout's
`daemon/` (PYTHONPATH), so a change and its base are measured in the same
run, interleaved. For the daemon modes the bench also reports the CPU per
SEND of the daemon, its spool writer and its delivery process
(/proc/PID/stat); how long the daemon's and the writer's main threads
waited on a run queue per SEND, runnable and not running (the second
field of /proc/PID/schedstat: the scheduler's share of the hand-off);
and the disk's flush requests and the spool's commits per SEND
(/proc/diskstats, STATS): every OK must follow a flush of its commit.

    flock /work/team/bench.lock python3 bench/handoff_relay.py \
        --checkout base=/tmp/base --checkout this=. [--rounds 5] [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from cpu_bench import cpu_seconds, processes  # noqa: E402
from daemon_bench import Daemon, DiskFlushes, free_port, start_sink, wait_port  # noqa: E402
from handoff_common import rotated_rounds  # noqa: E402
from php_handoff import percentile, wait_idle  # noqa: E402


# --- the floor server -----------------------------------------------------------

async def floor_server(port: int, directory: Path) -> None:
    """Per request line: rewrite a file, fsync it and the directory, reply `OK <n>`."""
    path = directory / "floor.dat"
    dir_fd = os.open(directory, os.O_RDONLY)
    served = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        while line := await reader.readline():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, line[:512])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.fsync(dir_fd)
            served += 1
            writer.write(b"OK 01FLOOR%016d\r\n" % served)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def start_floor(directory: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--floor-server", str(port), str(directory)])
    wait_port(port)
    return proc, port


# --- the bench --------------------------------------------------------------------

def run_queue_wait(pid: int) -> float:
    """Seconds the process's main thread has waited on a run queue
    (the second field of /proc/PID/schedstat, in ns)."""
    with open(f"/proc/{pid}/schedstat") as fh:
        return int(fh.read().split()[1]) / 1e9


def gate_open(binary: Path, count: int, uri: str) -> list[float]:
    out = subprocess.run([str(binary), "gate_open", str(count), uri], capture_output=True, text=True,
                         check=True, timeout=600)
    return sorted(json.loads(out.stdout)["latencies_us"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", action="append", default=[],
                        help="LABEL=PATH of a checkout to measure (repeat); default this=<this checkout>")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=2000, help="SENDs per mode and round")
    parser.add_argument("--hold", help="comma-separated labels that get a no-delivery mode (default: all)")
    parser.add_argument("--floor-server", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_server:
        asyncio.run(floor_server(int(args.floor_server[0]), Path(args.floor_server[1])))
        return 0
    if shutil.which("smtp-sink") is None:
        sys.exit("smtp-sink is not installed")
    checkouts = dict(c.split("=", 1) for c in args.checkout) or {"this": str(ROOT)}
    binary = build_c_handoff()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-handoff-relay-", dir=os.environ.get("SCRATCH")))
    flushes = DiskFlushes(workdir)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    sink, sink_port = start_sink()
    floor, floor_port = start_floor(workdir)
    daemons: dict[str, Daemon] = {}
    try:
        for label, path in checkouts.items():
            env = dict(os.environ, PYTHONPATH=str(Path(path).resolve() / "daemon"))
            held = args.hold is None or label in args.hold.split(",")
            for kind in ("relay",) + (("hold",) if held else ()):
                run_dir = workdir / f"{kind}-{label}"
                run_dir.mkdir()
                daemons[f"{kind}@{label}"] = Daemon(
                    run_dir, env=env, upstream=[f"127.0.0.1:{sink_port}"], hold=kind == "hold",
                    connections_per_upstream=2)
        time.sleep(1.0)  # the children are up and idle

        def run(mode: str) -> dict:
            if mode == "floor":
                lat = gate_open(binary, args.count, f"tcp://127.0.0.1:{floor_port}")
                return {"p50": percentile(lat, 0.50), "p90": percentile(lat, 0.90), "p99": percentile(lat, 0.99)}
            daemon = daemons[mode]
            pids = processes(daemon)
            cpu_before = {role: cpu_seconds(pid) for role, pid in pids.items()}
            waited_before = {role: run_queue_wait(pids[role]) for role in ("daemon", "writer")}
            stats = daemon.stats()
            commits_before, accepted_before = stats["spool"]["commits"], stats["counters"]["accepted"]
            flushes_before = None if flushes.why_not else flushes.read()
            lat = gate_open(binary, args.count, f"tcp://127.0.0.1:{daemon.port}")
            flushed = None if flushes_before is None else flushes.read() - flushes_before
            waited = {role: run_queue_wait(pids[role]) - before for role, before in waited_before.items()}
            stats = daemon.stats()
            sends = stats["counters"]["accepted"] - accepted_before  # c_handoff's warm-up SENDs too
            result = {"p50": percentile(lat, 0.50), "p90": percentile(lat, 0.90), "p99": percentile(lat, 0.99),
                      "sends": sends, "run_queue_us": {role: round(w / sends * 1e6, 1) for role, w in waited.items()},
                      "commits": stats["spool"]["commits"] - commits_before, "disk_flushes": flushed}
            if mode.startswith("relay"):
                wait_idle(daemon)  # every message delivered: its CPU counts, the next mode is not charged
            result["cpu_us"] = {role: round((cpu_seconds(pid) - cpu_before[role]) / sends * 1e6, 1)
                                for role, pid in pids.items()}
            return result

        modes = ["floor", *daemons]
        results = rotated_rounds(modes, args.rounds, run)
    finally:
        for daemon in daemons.values():
            daemon.stop()
        floor.terminate()
        sink.terminate()
        floor.wait(10)
        sink.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)
    print("uptime:", os.popen("uptime").read().strip())
    print(json.dumps(results))
    floor_p50 = statistics.median(r["p50"] for r in results["floor"])
    floor_p99 = statistics.median(r["p99"] for r in results["floor"])
    print(f"\nflushes: {flushes.why_not or 'counted on ' + ', '.join(flushes.disks)}")
    print("| mode | p50 | p90 | p99 | p50 / floor | p99 / floor's | CPU per SEND: daemon + writer + delivery "
          "| run-queue wait per SEND: daemon + writer | commits, disk flushes per SEND | rounds x SENDs (range of p50) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | --- |")
    for mode, runs in results.items():
        p50 = statistics.median(r["p50"] for r in runs)
        p90 = statistics.median(r["p90"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        lo, hi = min(r["p50"] for r in runs), max(r["p50"] for r in runs)
        cpu = commits = waits = ""
        if mode != "floor":
            roles = [role for role in ("daemon", "writer", "delivery") if role in runs[0]["cpu_us"]]
            by_role = {role: statistics.median(r["cpu_us"][role] for r in runs) for role in roles}
            cpu = " + ".join(f"{by_role[role]:.0f}" for role in roles) + f" = {sum(by_role.values()):.0f} µs"
            waits = " + ".join(f'{statistics.median(r["run_queue_us"][role] for r in runs):.0f}'
                               for role in ("daemon", "writer")) + " µs"
            per = [r["commits"] / r["sends"] for r in runs]
            flushed = [r["disk_flushes"] / r["sends"] for r in runs if r["disk_flushes"] is not None]
            commits = f"{statistics.median(per):.2f}, " + (f"{statistics.median(flushed):.2f}" if flushed else "n/a")
        print(f"| {mode} | **{p50:.0f} µs** | {p90:.0f} µs | {p99:.0f} µs | {p50 / floor_p50:.2f}x | {p99 / floor_p99:.2f}x "
              f"| {cpu} | {waits} | {commits} | {args.rounds} x {args.count} ({lo:.0f}-{hi:.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
