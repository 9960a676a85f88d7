#!/usr/bin/env python3
"""CPU per message with delivery webhooks on, beside the same run with them off.

    flock /work/team/bench.lock python3 bench/webhook_cpu.py [--rounds 3] [--seconds 5]

Each round runs bench/cpu_bench.py's end-to-end load twice, alternately
off and on: 16 connections of bench/loadgen.c send for `seconds` while the
daemon relays to Postfix's smtp-sink (10 pooled connections), until every
message is delivered and, with webhooks on, until the outbox is empty
(every `message.sent` event answered 204 by an aiohttp receiver in this
process). CPU microseconds per message of the daemon, the spool writer
(which writes and deletes the events) and delivery (which signs and posts
them; the daemon did before issue 12's change, bench/results.md), from
/proc/PID/stat. bench/http_bench.py --webhooks measures the same with the
receiver in a process of its own, beside the HTTP side alone. Prints one JSON line per run and the
medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_bench import measure  # noqa: E402
from daemon_bench import build_loadgen, free_port, running_daemon, send_and_drain, start_sink  # noqa: E402

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


def start_receiver() -> tuple[int, list[int]]:
    """An aiohttp server answering every POST 204, in a thread; (port, [events received])."""
    port, received = free_port(), [0]
    loop = asyncio.new_event_loop()

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(status=204)

    async def start():
        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    threading.Thread(target=loop.run_forever, daemon=True).start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    return port, received


def run(binary: Path, workdir: Path, sink_port: int, seconds: float, hooks: dict) -> dict:
    with running_daemon(workdir, upstream=[f"127.0.0.1:{sink_port}"], connections_per_upstream=10,
                        **hooks) as daemon:
        def load() -> int:
            accepted, _ = send_and_drain(binary, daemon, seconds)
            deadline = time.monotonic() + 300
            while daemon.stats()["webhooks"]["pending"] and time.monotonic() < deadline:
                time.sleep(0.05)
            return accepted
        row = measure(daemon, load)
        row["webhooks"] = daemon.stats()["webhooks"]
        return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    if not shutil.which("smtp-sink"):
        print("needs Postfix's smtp-sink (tests/setup.sh installs postfix)", file=sys.stderr)
        return 1
    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-hooks-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    secret = workdir / "webhook.secret"
    secret.write_text(SECRET)
    secret.chmod(0o600)
    port, received = start_receiver()
    on = {"webhook_url": f"http://127.0.0.1:{port}/hook", "webhook_secret_file": str(secret)}
    sink, sink_port = start_sink()
    rows: dict[str, list[dict]] = {"off": [], "on": []}
    try:
        for _ in range(args.rounds):
            for name, hooks in (("off", {}), ("on", on)):
                row = run(binary, workdir, sink_port, args.seconds, hooks)
                rows[name].append(row)
                print(json.dumps({"webhooks_" + name: row}), flush=True)
    finally:
        sink.terminate()
        sink.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"events received: {received[0]}")
    for name, runs in rows.items():
        medians = {role: statistics.median(r[role] for r in runs if role in r) for role in ("daemon", "writer", "delivery")}
        print(f"webhooks {name}: CPU us per message, medians of {len(runs)}: {json.dumps(medians)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
