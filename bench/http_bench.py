#!/usr/bin/env python3
"""What the HTTP side costs the line protocol (issue 12's goal: within 10%).

    python3 bench/http_bench.py [--rounds 5] [--seconds 5] [--hold]

Each round runs the same load twice, alternately in order (off/on, then
on/off): 16 connections of bench/loadgen.c SENDs for `seconds` while the
daemon relays to Postfix's smtp-sink with 10 pooled connections,
- off: no `http_listen` (the reference);
- on: `http_listen` set and a scraper reading /metrics every second
  (every scrape must be a 200 with the accepted count in it).
With --hold, delivery is on hold instead (intake alone: the daemon's CPU
per SEND is then the hand-off path's, where the HTTP side adds its
histogram observe). Per run: SENDs/s, hand-off p50/p99 (loadgen's, from the client's side),
and the daemon process's CPU per SEND accepted (/proc/PID/stat: the
figure that moves least on a shared machine, bench/cpu_bench.py).
Prints one JSON line per run and a Markdown table of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import cpu_seconds  # noqa: E402
from daemon_bench import build_loadgen, free_port, loadgen, running_daemon, start_sink, wait_port  # noqa: E402


class Scraper(threading.Thread):
    """GET /metrics every `interval` seconds until stopped; counts the scrapes."""

    def __init__(self, port: int, interval: float = 1.0):
        super().__init__(daemon=True)
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.interval = interval
        self.stopped = threading.Event()
        self.scrapes = 0
        self.seconds: list[float] = []

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            start = time.perf_counter()
            with urllib.request.urlopen(self.url, timeout=10) as reply:
                body = reply.read()
            assert reply.status == 200 and b"smtpgate_messages_accepted_total" in body
            self.seconds.append(time.perf_counter() - start)
            self.scrapes += 1


def one_run(binary: Path, workdir: Path, sink_port: int, seconds: float, http: bool, hold: bool) -> dict:
    settings = {"upstream": [f"127.0.0.1:{sink_port}"], "connections_per_upstream": 10, "hold": hold}
    http_port = free_port()
    if http:
        settings["http_listen"] = f"127.0.0.1:{http_port}"
    with running_daemon(workdir, **settings) as daemon:
        if http:
            wait_port(http_port)  # bound after the line door, which running_daemon waits for
        time.sleep(0.5)  # the children are up and idle
        scraper = Scraper(http_port) if http else None
        if scraper:
            scraper.start()
        before = cpu_seconds(daemon.proc.pid)
        sent = loadgen(binary, daemon.port, 16, seconds)
        cpu = cpu_seconds(daemon.proc.pid) - before
        if scraper:
            scraper.stopped.set()
            scraper.join(15)
        accepted = sent["requests"] - sent["errors"]
        row = {"http": http, "rate": sent["rate"], "p50_us": sent["p50_us"], "p99_us": sent["p99_us"],
               "daemon_cpu_us_per_send": round(cpu / accepted * 1e6, 1), "errors": sent["errors"]}
        if scraper:
            row["scrapes"] = scraper.scrapes
            row["scrape_ms_max"] = round(max(scraper.seconds) * 1000, 1) if scraper.seconds else None
        return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hold", action="store_true", help="delivery on hold: intake alone")
    args = ap.parse_args()
    if not shutil.which("smtp-sink"):
        raise SystemExit("http_bench: Postfix's smtp-sink is needed (apt-get install postfix)")

    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-http-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    sink, sink_port = start_sink()
    runs = []
    try:
        for r in range(args.rounds):
            for http in ((False, True) if r % 2 == 0 else (True, False)):
                runs.append(one_run(binary, workdir, sink_port, args.seconds, http, args.hold))
                print(json.dumps(runs[-1]), flush=True)
    finally:
        sink.terminate()
        sink.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(http: bool, key: str) -> float:
        return statistics.median(run[key] for run in runs if run["http"] == http)

    doing = "delivery on hold" if args.hold else "relaying to smtp-sink"
    print(f"\n{args.rounds} rounds of {args.seconds:g} s, 16 connections, {doing}; medians\n")
    print("| figure | HTTP side off | on, /metrics every 1 s | on / off |\n| --- | ---: | ---: | ---: |")
    for key, what, scale, unit in (("rate", "SENDs/s", 1, ""), ("p50_us", "hand-off p50", 1000, " ms"),
                                   ("p99_us", "hand-off p99", 1000, " ms"),
                                   ("daemon_cpu_us_per_send", "daemon CPU per SEND", 1, " us")):
        off, on = med(False, key), med(True, key)
        fmt = (lambda v, s=scale, u=unit: f"{v / s:.3f}{u}") if scale != 1 else (lambda v, u=unit: f"{v:,.1f}{u}")
        print(f"| {what} | {fmt(off)} | {fmt(on)} | {on / off:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
