#!/usr/bin/env python3
"""Hand-off latency of one mail from PHP, against a direct SMTP send from PHP.

    python3 bench/php_handoff.py [--rounds 5] [--count 1000] [--no-write]

For each local upstream (Postfix's smtp-sink, which answers at once and
stores nothing, and a trivial aiosmtpd server, the kind of upstream the
tests use) starts `smtpgate serve` relaying to it, then runs
bench/php_handoff.php (real `php`) in each mode:
- smtpgate, connect + send: a new Client and one send() per mail (a PHP page),
  over TCP and over the Unix socket;
- smtpgate, open connection: send() on a connection kept open;
- direct SMTP to the same upstream, the classic fsockopen conversation, a
  connection per mail and on one open connection (the clock stops at the 250
  after the final dot; QUIT is not timed);
- direct SMTP with the final dot in its own fwrite, as many hand-written
  scripts do (fewer mails: each costs a delayed ACK).
Modes run one after the other in an order rotated each round, and the daemon
is left to empty its queue before the next mode, so no mode pays for the
relaying of another. p50/p99 are per run; the table gives the median over
rounds and the range of the p50s. Writes the "PHP" section of
bench/results-clients.md (other sections are left as they are) and the raw
figures to bench/out/php_handoff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from daemon_bench import Daemon, free_port, start_sink, wait_port  # noqa: E402  (helpers of the main bench)
from handoff_common import daemon_and_upstream, medians, replace_section, rotated_rounds  # noqa: E402

RESULTS = HERE / "results-clients.md"
OUT = HERE / "out"
SCRIPT = HERE / "php_handoff.php"
SECTION = "## PHP"
ANCHORS = Path(os.environ.get("SMTPGATE_ANCHORS", HERE.parent.parent / "shared" / "anchors"))
DOT_APART_MAX = 60  # mails per run in smtp_dot_apart: ~45 ms each

# (key, php mode, target, label)
MODES = [
    ("gate_tcp_connect", "gate_connect", "tcp", "smtpgate, connect + send (TCP)"),
    ("gate_unix_connect", "gate_connect", "unix", "smtpgate, connect + send (Unix socket)"),
    ("gate_tcp_open", "gate_open", "tcp", "smtpgate, send on an open connection (TCP)"),
    ("ping_tcp_open", "ping_open", "tcp", "PING on an open connection (TCP): round-trip floor, nothing stored"),
    ("smtp_connect", "smtp_connect", "smtp", "direct SMTP, fsockopen per mail"),
    ("smtp_open", "smtp_open", "smtp", "direct SMTP, one open connection"),
    ("smtp_dot_apart", "smtp_dot_apart", "smtp", "direct SMTP per mail, final dot in its own fwrite"),
]


def percentile(sorted_values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    index = max(0, min(len(sorted_values) - 1, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


def start_aiosmtpd() -> tuple[subprocess.Popen, int]:
    """The anchors' trivial aiosmtpd sink (250 to everything) in its own process."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ANCHORS / "aiosmtpd_sink.py"), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    wait_port(port)
    return proc, port


UPSTREAMS = {"smtp-sink": start_sink, "aiosmtpd": start_aiosmtpd}


def run_mode(php_mode: str, count: int, target: str) -> dict:
    out = subprocess.run(["php", str(SCRIPT), php_mode, str(count), target],
                         capture_output=True, text=True, check=True, timeout=600)
    latencies = sorted(json.loads(out.stdout)["latencies_us"])
    return {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99), "n": len(latencies)}


def wait_idle(daemon: Daemon, timeout: float = 120.0) -> None:
    """Block until the daemon has nothing left to relay (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = daemon.stats().get("states", {})
        if not any(states.get(s, 0) for s in ("queued", "sending", "deferred")):
            return
        time.sleep(0.2)
    raise RuntimeError(f"daemon still busy after {timeout} s: {daemon.stats()}")


def fmt_us(value: float) -> str:
    return f"{value / 1000:.2f} ms" if value >= 10_000 else f"{value:,.0f} µs"


def render(results: dict, command: str) -> str:
    rows = []
    ratios = []
    for upstream, by_mode in results.items():
        p50 = {}
        for key, _, _, label in MODES:
            runs = by_mode[key]
            p50[key], p99, lowest, highest = medians(runs)
            rows.append(f"| {upstream} | {label} | **{fmt_us(p50[key])}** | {fmt_us(p99)} "
                        f"| {fmt_us(lowest)} - {fmt_us(highest)} | {len(runs)} x {runs[0]['n']} |")
        ratios.append(f"| {upstream} | {p50['smtp_connect'] / p50['gate_tcp_connect']:.2f}x "
                      f"| {p50['smtp_connect'] / p50['gate_unix_connect']:.2f}x "
                      f"| {p50['smtp_open'] / p50['gate_tcp_open']:.2f}x "
                      f"| {p50['smtp_dot_apart'] / p50['gate_tcp_connect']:.1f}x |")
    return "\n".join([
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({os.cpu_count()} CPUs), "
        f"PHP {subprocess.run(['php', '-r', 'echo PHP_VERSION;'], capture_output=True, text=True).stdout}, "
        "local upstreams on 127.0.0.1, each the same for the daemon and the direct sends.",
        "One mail: a UTF-8 subject and ~1 KiB of text; the clock (hrtime) runs from the call until",
        "the id (smtpgate: stored durably) or the 250 after the final dot (SMTP).",
        f"Command: `{command}`", "",
        "| upstream | PHP hands one mail to | p50 | p99 | range of p50 | rounds x mails |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *rows, "",
        "Gain of handing off, direct SMTP p50 / smtpgate p50 (above 1: smtpgate is faster):", "",
        "| upstream | per mail, TCP | per mail, Unix socket | open connection | vs. dot-apart script |",
        "| --- | ---: | ---: | ---: | ---: |",
        *ratios, "",
        "PING on the open connection is the round trip of client and daemon; the rest of an",
        "open-connection SEND is the daemon validating and durably storing the mail (the anchors'",
        "durable hand-off, write + fsync file + fsync dir, is ~300-400 µs: anchors README, 7d/7e).",
        "The direct sends here are the best case for SMTP: a local server that accepts at once",
        "and stores nothing durably, while smtpgate's figure includes its fsync. A real relay",
        "(a remote ESP, TLS, a slow or down server) adds its latency and outages to every direct",
        "send; smtpgate's hand-off does not change with the upstream. The dot-apart script pays",
        "the 40 ms Nagle/delayed-ACK stall (anchors README, msmtp); SmtpGate\\Client writes each",
        "request in one write with TCP_NODELAY.",
        "",
    ])


def bench_upstream(name: str, rounds: int, count: int) -> dict[str, list[dict]]:
    """All modes, `rounds` times in rotated order, against a daemon relaying to upstream `name`."""
    modes = {key: (php_mode, target) for key, php_mode, target, _ in MODES}
    with daemon_and_upstream(UPSTREAMS[name], "smtpgate-php-bench-") as (daemon, targets):
        def run(key: str) -> dict:
            php_mode, target = modes[key]
            result = run_mode(php_mode, min(count, DOT_APART_MAX) if php_mode == "smtp_dot_apart" else count,
                              targets[target])
            if target != "smtp":
                wait_idle(daemon)  # the next mode must not pay for this one's relaying
            return result

        return rotated_rounds(list(modes), rounds, run, label=f"upstream={name} ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000, help="timed mails per mode and round")
    parser.add_argument("--upstreams", default=",".join(UPSTREAMS), help="comma-separated: " + ", ".join(UPSTREAMS))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave results-clients.md alone")
    args = parser.parse_args()
    for tool in ("php", "smtp-sink"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")

    OUT.mkdir(exist_ok=True)
    results = {name: bench_upstream(name, args.rounds, args.count) for name in args.upstreams.split(",")}
    (OUT / "php_handoff.json").write_text(json.dumps(results, indent=1))
    command = "python3 bench/php_handoff.py" + "".join(
        f" --{k} {v}" for k, v in (("rounds", args.rounds), ("count", args.count), ("upstreams", args.upstreams))
        if v != parser.get_default(k))
    section = render(results, command)
    print(section)
    if not args.no_write:
        replace_section(RESULTS, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
