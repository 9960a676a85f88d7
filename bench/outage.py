#!/usr/bin/env python3
"""What an upstream outage costs, and how fast the queue drains once it is over.

    flock /work/team/bench.lock python3 bench/outage.py [--messages 100000] [--window 60]
        [--rounds 1] [--before CHECKOUT]

Each round, in a network namespace of its own (so the kernel's TCP counters
count this bench's connections and nothing else on the machine):

1. outage: a daemon relays to 127.0.0.1:PORT where nothing listens (every
   connection refused). `--messages` SENDs are queued (8 connections,
   pipelined). Once every message has had its first attempt (or been held:
   STATS shows none queued and none being sent), for `--window` seconds:
   the CPU of the daemon and its two children (/proc/PID/stat), the
   connection attempts refused (the namespace's TCP AttemptFails), and the
   daemon's log lines.
2. return: Postfix's smtp-sink starts on PORT. Seconds from then to the
   first delivery and to the last (STATS counters.delivered, polled every
   10 ms).
3. healthy start, the reference in the same round: a fresh daemon on a
   fresh spool, `hold = true`, the same number of messages queued, then
   `hold = false` by SIGHUP with smtp-sink running: seconds from the SIGHUP
   to the first and the last delivery. Both daemons log at `info` (a JSON
   line per delivery), so the drains (first to last delivery) compare.
4. with `--before CHECKOUT` (the root of another checkout, main before the
   change): step 1 with that code, and its step 2 bounded to 120 s (it
   waits for each message's own retry timer).

Defaults as shipped (upstream_probe_base 1 s, upstream_probe_max 300 s,
10 connections). SCRATCH=/path chooses the disk of the spools (default
/var/tmp). Prints one JSON line per phase and a Markdown table of the
medians; raw figures in bench/out/outage.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_bench import cpu_seconds, processes  # noqa: E402
from daemon_bench import OUT, REQUEST, Daemon, free_port, wait_port  # noqa: E402

IN_NAMESPACE = "SMTPGATE_OUTAGE_NETNS"
BEFORE_DRAIN = 120.0  # seconds the code before the change gets to drain


def tcp_counters() -> dict[str, int]:
    """This network namespace's TCP counters (/proc/net/snmp)."""
    lines = [line.split() for line in open("/proc/net/snmp") if line.startswith("Tcp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True))


def queue_messages(port: int, total: int, conns: int = 8, window: int = 128) -> float:
    """`total` SENDs over `conns` connections, `window` unanswered on each;
    every reply must be OK. Returns the seconds it took."""
    def one(first: int, count: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
            replies = sock.makefile("rb")
            sent = answered = 0
            while answered < count:
                batch = min(window - (sent - answered), count - sent)
                if batch:
                    sock.sendall(b"".join((REQUEST % (first + n)).encode() + b"\n" for n in range(sent, sent + batch)))
                    sent += batch
                reply = replies.readline()
                assert reply.startswith(b"OK "), reply
                answered += 1

    start = time.perf_counter()
    share = total // conns
    threads = [threading.Thread(target=one, args=(i * share, share + (total % conns if i == 0 else 0)))
               for i in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def start_sink(port: int) -> subprocess.Popen:
    args = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port)
    return proc


def until_delivered(daemon: Daemon, total: int, start: float, limit: float) -> dict:
    """Poll STATS until `total` are delivered or `limit` seconds passed:
    seconds from `start` (perf_counter) to the first and the last delivery."""
    first = last = None
    delivered = 0
    while time.perf_counter() - start < limit:
        delivered = daemon.stats()["counters"]["delivered"]
        now = time.perf_counter() - start
        if delivered and first is None:
            first = now
        if delivered >= total:
            last = now
            break
        time.sleep(0.01)
    return {"first_delivery_s": None if first is None else round(first, 3),
            "last_delivery_s": None if last is None else round(last, 3),
            "drain_s": None if last is None else round(last - first, 3), "delivered": delivered}


def settled(daemon: Daemon, limit: float = 600.0) -> float:
    """Wait until no message is queued or being sent (each had its first
    attempt, or is held); returns the seconds it took."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        states = daemon.stats()["states"]
        if states["queued"] == 0 and states["sending"] == 0:
            break
        time.sleep(0.1)
    return round(time.perf_counter() - start, 1)


def log_lines(daemon_dir: Path) -> int:
    with open(daemon_dir / "daemon.log", "rb") as fh:
        return sum(1 for _ in fh)


def outage_phase(workdir: Path, messages: int, window: float, env_path: str | None, drain_limit: float) -> dict:
    """Steps 1 and 2 of the module docstring, with the code on `env_path` (None: this checkout)."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    port = free_port()
    env = dict(os.environ)
    if env_path:
        env["PYTHONPATH"] = env_path
    daemon = Daemon(run_dir, upstream=[f"127.0.0.1:{port}"], connections_per_upstream=10,
                    log_level="info", log_format="json", env=env)
    sink = None
    try:
        row: dict = {"queue_s": round(queue_messages(daemon.port, messages), 1)}
        row["first_attempts_s"] = settled(daemon)
        pids = processes(daemon)
        cpu_before = sum(cpu_seconds(pid) for pid in pids.values())
        tcp_before, lines_before = tcp_counters(), log_lines(run_dir)
        time.sleep(window)
        cpu = sum(cpu_seconds(pid) for pid in pids.values()) - cpu_before
        tcp_after = tcp_counters()
        row["cpu_share_of_one_core"] = round(cpu / window, 4)
        row["refused_connects_per_min"] = round((tcp_after["AttemptFails"] - tcp_before["AttemptFails"]) * 60 / window, 1)
        row["log_lines_per_min"] = round((log_lines(run_dir) - lines_before) * 60 / window, 1)
        upstreams = daemon.stats().get("upstreams")
        if upstreams:
            row["next_probe_in_s"] = round(_epoch(upstreams[0]["next_probe"]) - time.time(), 1)
            row["failures_before_return"] = upstreams[0]["failures"]
        sink = start_sink(port)
        row.update(until_delivered(daemon, messages, time.perf_counter(), drain_limit))
        return row
    finally:
        if sink is not None:
            sink.terminate()
            sink.wait()
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def healthy_phase(workdir: Path, messages: int) -> dict:
    """Step 3: the same number relayed from a healthy start."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    port = free_port()
    sink = start_sink(port)
    daemon = Daemon(run_dir, upstream=[f"127.0.0.1:{port}"], connections_per_upstream=10, hold=True,
                    log_level="info", log_format="json")  # a line per delivery, as in the outage
    try:
        row = {"queue_s": round(queue_messages(daemon.port, messages), 1)}
        daemon.write_config(hold=False)
        start = time.perf_counter()
        daemon.proc.send_signal(signal.SIGHUP)
        row.update(until_delivered(daemon, messages, start, 600.0))
        return row
    finally:
        daemon.stop()
        sink.terminate()
        sink.wait()
        shutil.rmtree(run_dir, ignore_errors=True)


def _epoch(rfc3339: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def in_own_namespace() -> None:
    """Run this script again in a network namespace of its own, with loopback up."""
    if os.environ.get(IN_NAMESPACE):
        return
    command = f"ip link set lo up && exec {sys.executable} {' '.join(map(_quote, sys.argv))}"
    os.execvpe("unshare", ["unshare", "--net", "sh", "-c", command], dict(os.environ, **{IN_NAMESPACE: "1"}))


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=100_000)
    ap.add_argument("--window", type=float, default=60.0)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--before", metavar="CHECKOUT", help="root of a checkout of the code before the change")
    args = ap.parse_args()
    in_own_namespace()

    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-outage-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    rounds = []
    try:
        for r in range(args.rounds):
            row = {"load": os.getloadavg()[0],
                   "outage": outage_phase(workdir, args.messages, args.window, None, 600.0)}
            print(f"round {r + 1} outage: {json.dumps(row['outage'])}", file=sys.stderr, flush=True)
            row["healthy"] = healthy_phase(workdir, args.messages)
            print(f"round {r + 1} healthy: {json.dumps(row['healthy'])}", file=sys.stderr, flush=True)
            if args.before:
                row["before"] = outage_phase(workdir, args.messages, args.window,
                                             str(Path(args.before) / "daemon"), BEFORE_DRAIN)
                print(f"round {r + 1} before: {json.dumps(row['before'])}", file=sys.stderr, flush=True)
            rounds.append(row)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    OUT.mkdir(exist_ok=True)
    (OUT / "outage.json").write_text(json.dumps(rounds, indent=1))

    def med(phase: str, key: str):
        values = [r[phase][key] for r in rounds if phase in r and r[phase].get(key) is not None]
        return statistics.median(values) if values else None

    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}; {args.messages:,} messages; window {args.window:g} s; "
          f"{len(rounds)} round(s), medians; load {statistics.median(r['load'] for r in rounds):.2f}\n")
    before = "before" in rounds[0]
    print("| figure | this checkout | " + ("before the change |" if before else "") + "\n| --- | ---: |"
          + (" ---: |" if before else ""))
    for label, key in (("CPU of all smtpgate processes while down, share of one core", "cpu_share_of_one_core"),
                       ("refused connection attempts per minute while down", "refused_connects_per_min"),
                       ("log lines per minute while down", "log_lines_per_min"),
                       ("seconds from the return to the first delivery", "first_delivery_s"),
                       ("seconds from the return to the last delivery", "last_delivery_s"),
                       ("seconds from the first delivery to the last (the drain)", "drain_s")):
        cells = [med("outage", key)] + ([med("before", key)] if before else [])
        print(f"| {label} | " + " | ".join("-" if c is None else f"{c:,}" for c in cells) + " |")
    print(f"| reference, a healthy start (hold, then SIGHUP): seconds to the first / last delivery, drain | "
          f"{med('healthy', 'first_delivery_s')} / {med('healthy', 'last_delivery_s')}, "
          f"{med('healthy', 'drain_s')} |" + (" |" if before else ""))
    if before:
        print(f"| delivered {BEFORE_DRAIN:g} s after the return (before the change) | | "
              f"{med('before', 'delivered'):,} of {args.messages:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
