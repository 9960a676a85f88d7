#!/usr/bin/env python3
"""Hand-off latency of one mail from C (libsmtpgate, smtpgate-send), against a direct SMTP send from C.

    python3 bench/c_handoff.py [--rounds 5] [--count 1000] [--cli-count 200] [--no-write]

Builds clients/c (`make`) and bench/c_handoff.c against its static library.
For each local upstream (Postfix's smtp-sink, and the anchors' trivial
aiosmtpd server) starts `smtpgate serve` relaying to it, then runs
c_handoff in each mode:
- smtpgate, connect + send per mail (TCP and Unix socket);
- smtpgate, send on an open connection;
- PING on an open connection: the round-trip floor of client and daemon;
- one smtpgate-send process per mail (what a shell or monitoring script pays);
- direct SMTP from C to the same upstream, per connection and on one open
  connection (the clock stops at the 250 after the final dot).
Modes run in an order rotated each round, and the daemon is left to empty
its queue before the next mode. p50/p99 are per run; the table gives the
median over rounds and the range of the p50s. Writes the "C" section of
bench/results-clients.md (other sections are left as they are) and the raw
figures to bench/out/c_handoff.json.
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
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from handoff_common import daemon_and_upstream, medians, replace_section, rotated_rounds  # noqa: E402
from php_handoff import UPSTREAMS, fmt_us, percentile, wait_idle  # noqa: E402  (shared with the PHP bench)

RESULTS = HERE / "results-clients.md"
OUT = HERE / "out"
SECTION = "## C"
CLIENT = ROOT / "clients" / "c"
MSMTP_PER_PROCESS_US = 48_000.0  # msmtp, one process per mail, p50 (anchors README, 6b)

# (key, c_handoff mode, target, label)
MODES = [
    ("gate_tcp_connect", "gate_connect", "tcp", "smtpgate, connect + send (TCP)"),
    ("gate_unix_connect", "gate_connect", "unix", "smtpgate, connect + send (Unix socket)"),
    ("gate_tcp_open", "gate_open", "tcp", "smtpgate, send on an open connection (TCP)"),
    ("gate_unix_open", "gate_open", "unix", "smtpgate, send on an open connection (Unix socket)"),
    ("ping_tcp_open", "ping_open", "tcp", "PING on an open connection (TCP): round-trip floor, nothing stored"),
    ("cli_tcp", "cli", "tcp", "smtpgate-send process per mail (TCP)"),
    ("smtp_connect", "smtp_connect", "smtp", "direct SMTP, a connection per mail"),
    ("smtp_open", "smtp_open", "smtp", "direct SMTP, one open connection"),
]


def build() -> Path:
    """The library (make -C clients/c) and the bench binary linked to its static archive."""
    subprocess.run(["make", "-s", "-C", str(CLIENT)], check=True)
    OUT.mkdir(exist_ok=True)
    binary = OUT / "c_handoff"
    subprocess.run(["cc", "-std=c99", "-O2", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Werror",
                    f"-I{CLIENT / 'include'}", "-o", str(binary), str(HERE / "c_handoff.c"),
                    str(CLIENT / "build" / "libsmtpgate.a")], check=True)
    return binary


def run_mode(binary: Path, mode: str, count: int, target: str) -> dict:
    out = subprocess.run([str(binary), mode, str(count), target, str(CLIENT / "build" / "smtpgate-send")],
                         capture_output=True, text=True, check=True, timeout=600)
    latencies = sorted(json.loads(out.stdout)["latencies_us"])
    return {"p50": percentile(latencies, 0.50), "p99": percentile(latencies, 0.99), "n": len(latencies)}


def bench_upstream(binary: Path, name: str, rounds: int, count: int, cli_count: int) -> dict[str, list[dict]]:
    modes = {key: (mode, target) for key, mode, target, _ in MODES}
    with daemon_and_upstream(UPSTREAMS[name], "smtpgate-c-bench-") as (daemon, targets):
        def run(key: str) -> dict:
            mode, target = modes[key]
            result = run_mode(binary, mode, cli_count if mode == "cli" else count, targets[target])
            if target != "smtp":
                wait_idle(daemon)  # the next mode must not pay for this one's relaying
            return result

        return rotated_rounds(list(modes), rounds, run, label=f"upstream={name} ")


def render(results: dict, command: str) -> str:
    rows, ratios = [], []
    for upstream, by_mode in results.items():
        p50 = {}
        for key, _, _, label in MODES:
            runs = by_mode[key]
            p50[key], p99, low, high = medians(runs)
            rows.append(f"| {upstream} | {label} | **{fmt_us(p50[key])}** | {fmt_us(p99)} "
                        f"| {fmt_us(low)} - {fmt_us(high)} | {len(runs)} x {runs[0]['n']} |")
        ratios.append(f"| {upstream} | {p50['smtp_connect'] / p50['gate_tcp_connect']:.2f}x "
                      f"| {p50['smtp_connect'] / p50['gate_unix_connect']:.2f}x "
                      f"| {p50['smtp_open'] / p50['gate_tcp_open']:.2f}x "
                      f"| {MSMTP_PER_PROCESS_US / p50['cli_tcp']:.1f}x |")
    cc = subprocess.run(["cc", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    return "\n".join([
        SECTION, "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M %Z')} on {platform.node()} ({os.cpu_count()} CPUs), {cc}, -O2,",
        "local upstreams on 127.0.0.1, each the same for the daemon and the direct sends.",
        "One mail: the PHP section's mail (a UTF-8 subject, ~1 KiB of text); the clock",
        "(CLOCK_MONOTONIC) runs from the call until the id (smtpgate: stored durably) or the",
        "250 after the final dot (SMTP; QUIT untimed). The smtpgate-send row times a whole",
        "process: posix_spawn until its exit status.",
        f"Command: `{command}`", "",
        "| upstream | C hands one mail to | p50 | p99 | range of p50 | rounds x mails |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
        *rows, "",
        "Gain of handing off, direct SMTP p50 / smtpgate p50 (above 1: smtpgate is faster):", "",
        "| upstream | per mail, TCP | per mail, Unix socket | open connection | smtpgate-send vs. msmtp process |",
        "| --- | ---: | ---: | ---: | ---: |",
        *ratios, "",
        "PING on an open connection is the round trip of libsmtpgate and the daemon, at the",
        "machine's asyncio round trip (anchors README, 7c: 62 µs), so the C client adds nothing",
        "measurable; the rest of a SEND is the daemon validating and durably storing the mail.",
        "As in the PHP section, the direct sends are SMTP's best case: a local upstream that",
        "answers at once and stores nothing, while smtpgate's figure includes its fsync. The",
        "last column sets a whole smtpgate-send process (what an alert or cron script pays)",
        "against msmtp's 48 ms per process to a local sink (anchors README, 6b; msmtp there",
        "sends the mail itself).",
        "",
    ])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=1000, help="timed mails per mode and round")
    parser.add_argument("--cli-count", type=int, default=200, help="timed smtpgate-send processes per round")
    parser.add_argument("--upstreams", default=",".join(UPSTREAMS), help="comma-separated: " + ", ".join(UPSTREAMS))
    parser.add_argument("--no-write", action="store_true", help="print the section, leave results-clients.md alone")
    args = parser.parse_args()
    if shutil.which("smtp-sink") is None:
        sys.exit("smtp-sink is not installed")
    binary = build()
    results = {name: bench_upstream(binary, name, args.rounds, args.count, args.cli_count)
               for name in args.upstreams.split(",")}
    (OUT / "c_handoff.json").write_text(json.dumps(results, indent=1))
    command = "python3 bench/c_handoff.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in (("rounds", args.rounds), ("count", args.count),
                                                      ("cli_count", args.cli_count), ("upstreams", args.upstreams))
        if v != parser.get_default(k))
    section = render(results, command)
    print(section)
    if not args.no_write:
        replace_section(RESULTS, SECTION, section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
