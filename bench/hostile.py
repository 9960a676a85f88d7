#!/usr/bin/env python3
"""A real client's hand-off while hostile connections run against the same daemon.

    python3 bench/hostile.py [--rounds 3] [--seconds 5] [--hostile 500]

One daemon (tokens set, `hold = true`: intake alone, spool on $SCRATCH as in
daemon_bench.py). Each round measures the real client twice, once quiet and
once while the attacker runs, the order alternating from round to round:
- the real client: bench/loadgen.c after `AUTH <token>`, 1 connection
  (hand-off latency p50/p99, SENDs/s) and 16 connections (SENDs/s);
- the attacker, a separate process (asyncio) keeping `--hostile`
  connections busy from 10 loopback addresses of its own (127.0.0.2-11, so
  that the per-peer cap does not simply refuse them):
  40% slowloris (a SEND line trickled one byte a second, reconnecting when
  cut), 30% oversized lines before AUTH (64 KiB of a `SEND` line of zeros,
  then wait for the close, reconnect a second later), 30% token guessing
  (3 wrong AUTHs a connection, then reconnect a second later).
Medians over the rounds. The goal (issue 10): under attack, p99 within 3x
and SENDs/s at least half of the quiet figures.

Writes a Markdown table to stdout and the raw figures to bench/out/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from daemon_bench import OUT, build_loadgen, loadgen, running_daemon  # noqa: E402

TOKEN = "hostile-bench-token-8d2f6b0a"
SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]


# -- the attacker (a process of its own: `hostile.py --attacker PORT COUNT`) ----------

async def _closed(reader: asyncio.StreamReader) -> None:
    """Returns when the daemon closed the connection."""
    try:
        while await reader.read(65536):
            pass
    except OSError:
        pass


async def _open(port: int, source: str):
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def slowloris(port: int, source: str, counts: dict) -> None:
    while True:
        try:
            reader, writer = await _open(port, source)
        except OSError:
            await asyncio.sleep(1)
            continue
        counts["connects"] += 1
        closed = asyncio.ensure_future(_closed(reader))
        try:
            writer.write(b"SEND {")
            while not closed.done():
                await writer.drain()
                await asyncio.wait([closed], timeout=1.0)
                writer.write(b"x")
        except OSError:
            pass
        counts["slowloris_cut"] += 1
        writer.close()


async def oversized(port: int, source: str, counts: dict) -> None:
    chunk = b"SEND " + bytes(64 * 1024)
    while True:
        try:
            reader, writer = await _open(port, source)
            counts["connects"] += 1
            writer.write(chunk)
            await writer.drain()
            await asyncio.wait_for(_closed(reader), 10)
            counts["oversized_lines"] += 1
        except (OSError, asyncio.TimeoutError):
            pass
        else:
            writer.close()
        await asyncio.sleep(1)


async def guesser(port: int, source: str, counts: dict) -> None:
    n = 0
    while True:
        try:
            reader, writer = await _open(port, source)
            counts["connects"] += 1
            lines = b"".join(b"AUTH wrong-guess-%016d\n" % (n + i) for i in range(3))
            n += 3
            writer.write(lines)
            await writer.drain()
            replies = b""
            while chunk := await asyncio.wait_for(reader.read(4096), 10):
                replies += chunk
            counts["wrong_auths"] += replies.count(b"AUTH_FAILED")
            writer.close()
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(1)


async def attack(port: int, hostile: int) -> dict:
    counts = {"connects": 0, "slowloris_cut": 0, "oversized_lines": 0, "wrong_auths": 0}
    kinds = [slowloris] * (hostile * 4 // 10) + [oversized] * (hostile * 3 // 10)
    kinds += [guesser] * (hostile - len(kinds))
    tasks = [asyncio.ensure_future(kind(port, SOURCES[i % len(SOURCES)], counts))
             for i, kind in enumerate(kinds)]
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    started = time.monotonic()
    await stop
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    counts["seconds"] = round(time.monotonic() - started, 3)
    return counts


def run_attacker(port: int, hostile: int) -> int:
    counts = asyncio.run(attack(port, hostile))
    print(json.dumps(counts), flush=True)
    return 0


# -- the measurement -------------------------------------------------------------

def stats(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"AUTH {TOKEN}\nSTATS\n".encode())
        data = b""
        while data.count(b"\r\n") < 2:
            data += sock.recv(1 << 16)
    return json.loads(data.split(b"\r\n")[1][3:])


def rss_mb(pid: int) -> float:
    pids = [pid] + [int(c) for t in os.listdir(f"/proc/{pid}/task")
                    for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
    total = 0
    for p in pids:
        with open(f"/proc/{p}/status") as status:
            total += next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return round(total / 1024, 1)


def measure(binary: Path, port: int, seconds: float) -> dict:
    auth = f"AUTH {TOKEN}"
    return {"one": loadgen(binary, port, 1, seconds, auth), "sixteen": loadgen(binary, port, 16, seconds, auth)}


def attacked(binary: Path, daemon, seconds: float, hostile: int) -> dict:
    before = stats(daemon.port)["limits"]
    attacker = subprocess.Popen([sys.executable, __file__, "--attacker", str(daemon.port), str(hostile)],
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(2.0)  # the hostile connections are up
        row = measure(binary, daemon.port, seconds)
        row["rss_mb"] = rss_mb(daemon.proc.pid)
        row["open_connections"] = stats(daemon.port)["limits"]["connections"].get("line", 0)
    finally:
        attacker.send_signal(signal.SIGTERM)
        out, _ = attacker.communicate(timeout=60)
    row["attacker"] = json.loads(out)
    after = stats(daemon.port)["limits"]
    row["daemon"] = {k: after[k] - before[k] for k in ("auth_failures", "auth_closed", "preauth_too_long",
                                                        "request_timeouts", "refused_connections")}
    time.sleep(1.0)  # the attacker's sockets are gone before the next phase
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hostile", type=int, default=500)
    ap.add_argument("--attacker", nargs=2, type=int, metavar=("PORT", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.attacker:
        return run_attacker(*args.attacker)

    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-hostile-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    rounds = []
    with running_daemon(workdir, upstream=["127.0.0.1:9"], hold=True, tokens=[TOKEN]) as daemon:
        rss_start = rss_mb(daemon.proc.pid)
        for r in range(args.rounds):
            row = {}
            order = ("quiet", "attack") if r % 2 == 0 else ("attack", "quiet")
            for mode in order:
                row[mode] = (measure(binary, daemon.port, args.seconds) if mode == "quiet"
                             else attacked(binary, daemon, args.seconds, args.hostile))
            rounds.append(row)
            print(f"round {r + 1}: {json.dumps(row)}", file=sys.stderr)
        rss_end = rss_mb(daemon.proc.pid)
    OUT.mkdir(exist_ok=True)
    (OUT / "hostile.json").write_text(json.dumps(rounds, indent=1))

    def med(mode, conns, key):
        return statistics.median(r[mode][conns][key] for r in rounds)

    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}; {args.rounds} rounds of {args.seconds:g} s per figure, "
          f"quiet and attacked interleaved; medians; {args.hostile} hostile connections\n")
    print("| figure | no attack | under attack | attack / quiet | goal |\n| --- | ---: | ---: | ---: | --- |")
    for label, conns, key, unit, goal in (
            ("hand-off p50, 1 connection", "one", "p50_us", "ms", ""),
            ("hand-off p99, 1 connection", "one", "p99_us", "ms", "at most 3x"),
            ("SENDs/s, 1 connection", "one", "rate", "/s", "at least 0.5x"),
            ("hand-off p99, 16 connections", "sixteen", "p99_us", "ms", "at most 3x"),
            ("SENDs/s, 16 connections", "sixteen", "rate", "/s", "at least 0.5x")):
        quiet, hit = med("quiet", conns, key), med("attack", conns, key)
        fmt = (lambda v: f"{v / 1000:.3f} ms") if unit == "ms" else (lambda v: f"{v:,.0f}")
        print(f"| {label} | {fmt(quiet)} | {fmt(hit)} | {hit / quiet:.2f} | {goal} |")
    attacks = [r["attack"] for r in rounds]
    per_s = lambda key: statistics.median(a["attacker"][key] / a["attacker"]["seconds"] for a in attacks)  # noqa: E731
    print(f"\nthe attack, per second (medians): {per_s('connects'):,.0f} hostile connections opened, "
          f"{per_s('wrong_auths'):,.0f} wrong AUTHs answered, {per_s('oversized_lines'):,.0f} oversized "
          f"lines cut before AUTH; connections open on the line door during it: "
          f"{statistics.median(a['open_connections'] for a in attacks):,.0f}; errors the real client got: "
          f"{sum(r[m][c]['errors'] for r in rounds for m in ('quiet', 'attack') for c in ('one', 'sixteen'))}")
    print(f"daemon RSS (with its children): {rss_start} MB at start, "
          f"{max(a['rss_mb'] for a in attacks)} MB at most under attack, {rss_end} MB at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
