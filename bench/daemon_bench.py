#!/usr/bin/env python3
"""The daemon's benchmark: durable intake, hand-off latency, end-to-end delivery.

    python3 bench/daemon_bench.py [--rounds 3] [--seconds 5] [--e2e-messages 20000]

- intake: SENDs accepted per second (durable: each OK after its fsync) at
  1, 16 and 128 concurrent connections, with delivery on hold (`hold = true`,
  like Postfix's HOLD queue in the anchors' intake figure). Load from
  bench/loadgen.c (C, one blocking thread per connection) so the load costs
  little of the 2 cores.
- hand-off latency: p50/p99 of one SEND on an open connection (the
  1-connection run).
- end to end: SENDs from 16 connections while the daemon relays with 10
  pooled connections to Postfix's smtp-sink; delivered messages per second
  from the first SEND until STATS counts every message delivered.
- durability, checked from the disk's side: the flush requests the spool's
  disk completed during each intake run (/proc/diskstats) must be at least
  the spool's commits (STATS spool.commits; with `hold` every commit is an
  enqueue batch, which fsyncs). A run with fewer flushes, or a spool on
  tmpfs (where an fsync is free) or on a device whose flushes cannot be
  counted, is reported without the word "durable".
- references in the same run: the disk's durable-create rate
  (anchors/fsync_bench.py), aiosmtplib with 10 reused connections to the
  same smtp-sink. Rounds alternate ours and theirs; medians are reported.

Writes a Markdown table to stdout and the raw figures to bench/out/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"
ANCHORS = Path(os.environ.get("SMTPGATE_ANCHORS", ROOT.parent / "shared" / "anchors"))
REQUEST = ('SEND {"from":"app@example.com","to":"kelly@example.org","subject":"bench %d",'
           '"text":"' + "x" * 1000 + '"}')


def records_op(records: list):
    """The operation that records a batch of attempts in the checkout on
    PYTHONPATH: a RecordAttempts of the records packed (main since
    2026-12-07), PackedRecords (da0e510 and the commits just before it),
    or a RecordAttempts of the list (before those)."""
    import pickle

    from smtpgate.spool import ops
    if hasattr(ops, "PackedRecords"):
        return ops.PackedRecords(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
    if "bytes" in str(ops.RecordAttempts.__annotations__["records"]):
        return ops.RecordAttempts(pickle.dumps(records, protocol=pickle.HIGHEST_PROTOCOL))
    return ops.RecordAttempts(records)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def build_c(name: str, *flags: str) -> Path:
    """bench/NAME.c built into bench/out/NAME, with `flags` (libraries) after the source."""
    OUT.mkdir(exist_ok=True)
    binary = OUT / name
    subprocess.run(["cc", "-O2", "-o", str(binary), str(HERE / f"{name}.c"), *flags], check=True)
    return binary


def build_loadgen() -> Path:
    return build_c("loadgen", "-pthread")


def start_sink() -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"127.0.0.1:{port}", "1024"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port)
    return proc, port


class Daemon:
    """`smtpgate serve` with a config of `settings`; `env`: its environment
    (PYTHONPATH names another checkout to measure)."""

    def __init__(self, workdir: Path, env: dict | None = None, **settings):
        self.port = free_port()
        self.config = {"listen": [f"127.0.0.1:{self.port}"], "spool": str(workdir / "spool"),
                       "upstream_tls": "none", "log_level": "warning", **settings}
        self.config_path = workdir / "bench.toml"
        self.write_config()
        self.log = open(workdir / "daemon.log", "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpgate", "serve", "--config", str(self.config_path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        wait_port(self.port)

    def write_config(self, **changes) -> None:
        """Write the config file (with `changes`); SIGHUP makes the daemon read it."""
        self.config.update(changes)
        self.config_path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in self.config.items()))

    def request(self, line: str) -> str:
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
            s.sendall(line.encode() + b"\n")
            data = b""
            while not data.endswith(b"\r\n"):
                data += s.recv(65536)
        return data.decode().strip()

    def stats(self) -> dict:
        return json.loads(self.request("STATS")[3:])

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        self.log.close()


class DiskFlushes:
    """Counts the flush requests completed by the disk(s) under a directory
    (/proc/diskstats, the 16th statistic, kernel 5.5 and later). `why_not`
    says why it cannot (then `read` is not to be used)."""

    NO_DISK = ("tmpfs", "ramfs")  # an fsync there costs nothing and proves nothing

    def __init__(self, path: Path):
        dev = os.stat(path).st_dev
        key = f"{os.major(dev)}:{os.minor(dev)}"
        self.fstype = next((right.split()[0] for left, right in
                            (line.split(" - ", 1) for line in open("/proc/self/mountinfo"))
                            if left.split()[2] == key), "unknown")
        sys_dir = Path(f"/sys/dev/block/{key}")
        self.disks = self._whole_disks(sys_dir.resolve()) if sys_dir.exists() else []
        self.why_not = None
        if self.fstype in self.NO_DISK:
            self.why_not = f"{path} is on {self.fstype}"
        elif not self.disks:
            self.why_not = f"{path} ({self.fstype}) is on no block device whose flushes can be counted"
        elif any(len(line.split()) < 20 for line in self._lines()):
            self.why_not = "this kernel's /proc/diskstats has no flush counts (5.5 and later have)"

    @classmethod
    def _whole_disks(cls, sys_dir: Path) -> list[str]:
        """The disks that take a block device's I/O: itself, the disk of a
        partition, the disks under a device-mapper or md device."""
        if (sys_dir / "partition").exists():
            sys_dir = sys_dir.parent
        below = sorted((sys_dir / "slaves").iterdir()) if (sys_dir / "slaves").is_dir() else []
        if below:
            return [disk for slave in below for disk in cls._whole_disks(slave.resolve())]
        return [sys_dir.name]

    def _lines(self) -> list[str]:
        return [line for line in open("/proc/diskstats") if line.split()[2] in self.disks]

    def read(self) -> int:
        return sum(int(line.split()[18]) for line in self._lines())


def loadgen(binary: Path, port: int, conns: int, seconds: float, first_line: str | None = None,
            rate: float | None = None) -> dict:
    """Run loadgen.c: `conns` connections of SENDs for `seconds`; `first_line`
    (an AUTH) is sent once on each connection first; `rate`: paced at that
    many SENDs a second in all instead of each connection's next SEND
    following its last reply (LOADGEN_RATE)."""
    env = dict(os.environ, LOADGEN_RATE=str(rate)) if rate else None
    out = subprocess.run([str(binary), "127.0.0.1", str(port), str(conns), str(seconds), REQUEST,
                          *([first_line] if first_line else [])],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout)


def fsync_reference(workdir: Path) -> float | None:
    script = ANCHORS / "fsync_bench.py"
    if not script.exists():
        return None
    # fsync_bench.py removes its directory when done: give it one of its own.
    out = subprocess.run([sys.executable, str(script), str(workdir / "fsync"), "1", "2000", "1024"],
                         capture_output=True, text=True)
    for line in out.stdout.splitlines():
        # "SUMMARY single_file_dir  <median> <min> <max> <N>": write + fsync(file) + fsync(dir)
        if line.startswith("SUMMARY single_file_dir "):
            return float(line.split()[2])
    return None


async def aiosmtplib_reference(port: int, messages: int, conns: int) -> float:
    import aiosmtplib

    body = ("From: sender@example.com\r\nTo: rcpt@example.com\r\nSubject: ref\r\n\r\n" + "x" * 1000 + "\r\n")

    async def one(n: int) -> None:
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False, use_tls=False)
        await client.connect()
        for _ in range(n):
            await client.sendmail("sender@example.com", ["rcpt@example.com"], body)
        await client.quit()

    start = time.perf_counter()
    await asyncio.gather(*(one(messages // conns) for _ in range(conns)))
    return messages / (time.perf_counter() - start)


@contextlib.contextmanager
def running_daemon(workdir: Path, **settings):
    """A daemon with its own spool in a fresh folder under `workdir`, stopped and removed after."""
    run_dir = Path(tempfile.mkdtemp(dir=workdir))
    daemon = Daemon(run_dir, **settings)
    try:
        yield daemon
    finally:
        daemon.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def send_and_drain(binary: Path, daemon: Daemon, seconds: float) -> tuple[int, int]:
    """16 connections of SENDs for `seconds`, then wait until STATS counts
    every accepted message delivered (5 minutes at most): (accepted, delivered)."""
    sent = loadgen(binary, daemon.port, 16, seconds)
    accepted = sent["requests"] - sent["errors"]
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        delivered = daemon.stats()["counters"]["delivered"]
        if delivered >= accepted:
            break
        time.sleep(0.05)
    return accepted, delivered


def intake_round(binary: Path, workdir: Path, seconds: float, flushes: DiskFlushes) -> dict:
    results = {}
    for conns in (1, 16, 128):
        with running_daemon(workdir, upstream=["127.0.0.1:9"], hold=True) as daemon:
            commits_before = daemon.stats()["spool"]["commits"]
            flushes_before = None if flushes.why_not else flushes.read()
            results[conns] = loadgen(binary, daemon.port, conns, seconds)
            stats = daemon.stats()
            accepted = stats["counters"]["accepted"]
            assert accepted == results[conns]["requests"] - results[conns]["errors"], (accepted, results[conns])
            results[conns]["commits"] = stats["spool"]["commits"] - commits_before
            if flushes_before is not None:
                results[conns]["disk_flushes"] = flushes.read() - flushes_before
    return results


def e2e_round(binary: Path, workdir: Path, sink_port: int, seconds: float) -> dict:
    with running_daemon(workdir, upstream=[f"127.0.0.1:{sink_port}"], connections_per_upstream=10) as daemon:
        start = time.perf_counter()
        accepted, delivered = send_and_drain(binary, daemon, seconds)
        elapsed = time.perf_counter() - start
        return {"accepted": accepted, "delivered": delivered,
                "seconds": round(elapsed, 3), "rate": round(delivered / elapsed)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--skip-e2e", action="store_true")
    args = ap.parse_args()

    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-bench-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    flushes = DiskFlushes(workdir)
    sink = None
    rounds = []
    try:
        if not args.skip_e2e and shutil.which("smtp-sink"):
            sink, sink_port = start_sink()
        for r in range(args.rounds):
            row = {"fsync_durable_creates": fsync_reference(workdir)}
            row["intake"] = intake_round(binary, workdir, args.seconds, flushes)
            if sink:
                row["aiosmtplib_10"] = round(asyncio.run(aiosmtplib_reference(sink_port, 20000, 10)))
                row["e2e"] = e2e_round(binary, workdir, sink_port, args.seconds)
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", file=sys.stderr)
    finally:
        if sink:
            sink.terminate()
            sink.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(values):
        present = [v for v in values if v is not None]
        return statistics.median(present) if present else None

    OUT.mkdir(exist_ok=True)
    (OUT / "daemon_bench.json").write_text(json.dumps(rounds, indent=1))
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.rounds} rounds of {args.seconds:g} s; medians\n")
    print("| figure | smtpgate | reference in the same run |\n| --- | ---: | ---: |")
    for conns in (1, 16, 128):
        rate = med([r["intake"][conns]["rate"] for r in rounds])
        ref = med([r["fsync_durable_creates"] for r in rounds]) if conns == 1 else None
        runs = [r["intake"][conns] for r in rounds]
        unflushed = [f"{r.get('disk_flushes', 0)} flushes for {r['commits']} commits" for r in runs
                     if r.get("disk_flushes", 0) < r["commits"]]
        why_not = flushes.why_not or (f"too few disk flushes: {', '.join(unflushed)}" if unflushed else None)
        what = "durable SENDs/s" if why_not is None else f"SENDs/s, NOT shown durable ({why_not})"
        print(f"| {what}, {conns} connection{'s' if conns > 1 else ''} | {rate:,.0f} | "
              + (f"disk: {ref:,.0f} durable creates/s one at a time |" if ref else "|"))
    p50 = med([r["intake"][1]["p50_us"] for r in rounds])
    p99 = med([r["intake"][1]["p99_us"] for r in rounds])
    print(f"| hand-off latency, open connection, p50 / p99 | {p50 / 1000:.3f} / {p99 / 1000:.3f} ms | |")
    if flushes.why_not is None:
        checked = [r["intake"][c] for r in rounds for c in (1, 16, 128)]
        print(f"| disk flushes / spool commits during the intake runs ({', '.join(flushes.disks)}) | "
              f"{sum(r['disk_flushes'] for r in checked):,} / {sum(r['commits'] for r in checked):,} | |")
    if rounds and "e2e" in rounds[0]:
        e2e = med([r["e2e"]["rate"] for r in rounds])
        ref = med([r["aiosmtplib_10"] for r in rounds])
        print(f"| delivered msgs/s end to end, 10 upstream connections, smtp-sink | {e2e:,.0f} | "
              f"aiosmtplib alone, 10 reused connections: {ref:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
