"""mail()'s hand-off: one sendmail process per message, as PHP's sendmail_path runs it.

Times the whole process (spawn, read stdin, connect, SEND, the daemon's
fsync, exit) of `smtpgate-sendmail -t -i` (C), `smtpgate sendmail -t -i`
(Python) and msmtp (SMTP straight to the same smtp-sink the daemon relays
to), beside `cat` (the cost of a process that reads the message: the
floor), rounds rotated so no command always runs first, plus the CPU each
process used (user + system, from the children's rusage). Optionally the
same through real `php -r 'mail(...)'` for the C command and msmtp, which
adds PHP's own start-up to both.

    flock /work/team/bench.lock python3 bench/sendmail_bench.py [--rounds 5] [--count 200]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from handoff_common import daemon_and_upstream, rotated_rounds  # noqa: E402
from php_handoff import UPSTREAMS, percentile, wait_idle  # noqa: E402

C_SENDMAIL = ROOT / "clients" / "c" / "build" / "smtpgate-sendmail"
PY_SMTPGATE = Path(sys.executable).parent / "smtpgate"
MESSAGE = (b"From: Shop <shop@example.com>\nTo: Kelly <kelly@example.org>\nBcc: audit@example.com\n"
           b"Subject: Order 42 shipped\nMIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n\n"
           + b"Your order 42 is on its way.\n" * 36)  # about 1 KiB, as the anchors' messages
PHP_MAIL = ('mail("kelly@example.org", "Order 42 shipped", str_repeat("Your order 42 is on its way.\\n", 36), '
            '["From" => "Shop <shop@example.com>"]) or exit(1);')


def commands(targets: dict) -> dict[str, list[str]]:
    host, port = targets["smtp"].split(":")
    return {
        "cat": ["cat"],  # the floor: a process that reads the message and exits
        "c": [str(C_SENDMAIL), "-t", "-i"],
        "python": [str(PY_SMTPGATE), "sendmail", "-t", "-i"],
        "msmtp": ["msmtp", "-C", "/dev/null", f"--host={host}", f"--port={port}", "--auth=off", "--tls=off",
                  "--from=shop@example.com", "--domain=bench.example", "-t"],
    }


def php_commands(targets: dict) -> dict[str, list[str]]:
    return {f"php_{name}": ["php", "-n", "-d", f'sendmail_path="{" ".join(argv)}"', "-r", PHP_MAIL]
            for name, argv in commands(targets).items() if name in ("c", "msmtp")}


def time_processes(argv: list[str], count: int, env: dict, stdin: bytes | None) -> dict:
    """`count` runs of argv one after the other: wall p50/p99 in µs and CPU per process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    walls = []
    for _ in range(count):
        start = time.perf_counter()
        subprocess.run(argv, input=stdin, env=env, check=True, stdout=subprocess.DEVNULL)
        walls.append((time.perf_counter() - start) * 1e6)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) / count * 1e6
    walls.sort()
    return {"p50": percentile(walls, 0.50), "p99": percentile(walls, 0.99), "cpu": cpu}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=200, help="processes per command and round")
    parser.add_argument("--php", action="store_true", help="also through php's mail()")
    args = parser.parse_args()
    for tool in ("smtp-sink", "msmtp") + (("php",) if args.php else ()):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed")
    subprocess.run(["make", "-s", "-C", str(C_SENDMAIL.parent.parent)], check=True)
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    with daemon_and_upstream(UPSTREAMS["smtp-sink"], "smtpgate-sendmail-bench-") as (daemon, targets):
        env = dict(os.environ, SMTPGATE_SERVER=targets["unix"])
        argvs = commands(targets)
        if args.php:
            argvs.update(php_commands(targets))

        def run(key: str) -> dict:
            result = time_processes(argvs[key], args.count, env, None if key.startswith("php") else MESSAGE)
            wait_idle(daemon)  # the next command must not pay for this one's relaying
            return result

        results = rotated_rounds(list(argvs), args.rounds, run)
    print("uptime:", os.popen("uptime").read().strip())
    print("\n| command, one process per message | p50 | p99 | CPU per process | rounds x processes |")
    print("| --- | ---: | ---: | ---: | --- |")
    for key, runs in results.items():
        p50 = statistics.median(r["p50"] for r in runs)
        p99 = statistics.median(r["p99"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        lo, hi = min(r["p50"] for r in runs), max(r["p50"] for r in runs)
        print(f"| {key} `{' '.join(argvs[key][:2])}...` | **{p50 / 1000:.2f} ms** | {p99 / 1000:.2f} ms "
              f"| {cpu / 1000:.2f} ms | {args.rounds} x {args.count} (p50 {lo / 1000:.2f}-{hi / 1000:.2f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
