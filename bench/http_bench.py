#!/usr/bin/env python3
"""What the HTTP side and webhooks cost the line protocol (issue 12's goal: within 10%).

    flock /work/team/bench.lock python bench/http_bench.py [--rounds 5] [--seconds 5] [--hold]
        [--webhooks [--no-http]] [--rate N] [--receiver-kind c|lean|aiohttp] [--receiver-nice N]
        [--checkout base=/var/tmp/v-main --checkout this=.]

Each round runs the same load once per mode, in an order rotated each
round: 16 connections of bench/loadgen.c SENDs for `seconds` while the
daemon relays to Postfix's smtp-sink with 10 pooled connections,
- off@LABEL: no `http_listen` (the reference);
- http@LABEL: `http_listen` set and a scraper reading /metrics every
  second (every scrape must be a 200 with the accepted count in it);
- hooks@LABEL (with --webhooks): the same and a `webhook_url`: every
  delivered message's `message.sent` event is POSTed to a receiver in a
  process of its own, so that its CPU is apart from the daemon's. In
  production the receiver is on another machine; here it shares the 2
  cores, so the cheaper the better: by default bench/webhook_sink.c, what
  smtp-sink is to the SMTP side (C, epoll, answering 204 and verifying
  every 16th signature; the default since 2026-12-07 morning), or
  `--receiver-kind lean`, the same in an asyncio protocol (the figures of
  2026-12-06 evening to 2026-12-07 early morning), or aiohttp's server
  (`--receiver-kind aiohttp`, the figures before 2026-12-06 evening).
With --rate N, the 16 connections send N SENDs a second in all, each on
a fixed schedule (loadgen.c's LOADGEN_RATE: the hand-off counted from the
scheduled time), a load the machine can carry: without it each
connection sends its next SEND when the last is answered, which
saturates the 2 cores, and SENDs/s is then the machine's capacity.
With --hold, delivery is on hold instead (intake alone: the daemon's CPU
per SEND is then the hand-off path's, where the HTTP side adds its
histogram observe; no event is made). Each LABEL=PATH of --checkout runs
that checkout's `daemon/` (PYTHONPATH); the default is this one.

Per run: SENDs/s, hand-off p50/p99 (loadgen's, from the client's side),
and the CPU per SEND accepted of each process (/proc/PID/stat: the figure
that moves least on a shared machine, bench/cpu_bench.py), from the start
of the load until every message is delivered and, with webhooks, every
event answered (the work a SEND causes, not only what fits in the load's
seconds), and the spool writer's bytes written to the disk per SEND
(/proc/PID/io: `writer_kb`, and `writer_kb_in_load` for the load's
seconds alone: webhooks add the outbox's pages to its commits). Prints `uptime`, one JSON line per run and a Markdown table of
the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hmac
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from cpu_bench import cpu_seconds, processes  # noqa: E402
from daemon_bench import Daemon, build_c, build_loadgen, free_port, loadgen, start_sink, wait_port  # noqa: E402

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
ROLES = ("daemon", "writer", "delivery", "receiver")


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


def receive_aiohttp(port: int) -> None:
    """The first receiver (`--receiver-kind aiohttp`): aiohttp's server,
    204 to every POST to /hook, no signature checked; GET /count says how
    many came."""
    from aiohttp import web

    received = [0]

    async def hook(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(status=204)

    async def count(_: web.Request) -> web.Response:
        return web.Response(text=str(received[0]))

    app = web.Application()
    app.router.add_post("/hook", hook)
    app.router.add_get("/count", count)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


class LeanReceiver(asyncio.Protocol):
    """A receiver as cheap as a correct one can be: HTTP/1.1 keep-alive
    requests framed by Content-Length (what smtpgate sends; anything else
    is a 400 and the connection closed), pipelined or not (the answers to
    the requests of one read in one write), 204 to a POST to /hook, and the
    Standard Webhooks signature of every VERIFY_EVERY-th event checked
    (with the JSON parsed), so a wrong one cannot pass unseen. GET /count
    answers `received bad`."""

    VERIFY_EVERY = 16
    received = 0
    bad = 0
    key = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        answers = []  # to the requests of this read (pipelined ones): one write, as nginx does
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > 65536:
                    self.transport.close()
                break
            head = self.buffer[:end].decode("latin-1").split("\r\n")
            headers = {name.lower(): value for name, _, value in (line.partition(": ") for line in head[1:])}
            length = int(headers.get("content-length", "0"))
            if len(self.buffer) < end + 4 + length:
                break
            body, self.buffer = self.buffer[end + 4:end + 4 + length], self.buffer[end + 4 + length:]
            if head[0].startswith("POST /hook "):
                self.event(headers, body)
                answers.append(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif head[0].startswith("GET /count "):
                text = f"{LeanReceiver.received} {LeanReceiver.bad}".encode()
                answers.append(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text))
            else:
                answers.append(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
                self.transport.write(b"".join(answers))
                self.transport.close()
                return
        if answers:
            self.transport.write(b"".join(answers))

    def event(self, headers: dict, body: bytes) -> None:
        LeanReceiver.received += 1
        if LeanReceiver.received % self.VERIFY_EVERY:
            return
        signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
        mac = "v1," + base64.b64encode(hmac.digest(LeanReceiver.key, signed, "sha256")).decode()
        good = any(hmac.compare_digest(mac, one) for one in headers["webhook-signature"].split())
        if not good or json.loads(body)["data"]["message_id"] is None:
            LeanReceiver.bad += 1


def receive_lean(port: int) -> None:
    LeanReceiver.key = base64.b64decode(os.environ["HTTP_BENCH_SECRET"][len("whsec_"):])

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(LeanReceiver, "127.0.0.1", port)
        await server.serve_forever()

    asyncio.run(serve())


def start_receiver(nice: int, kind: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [str(build_c("webhook_sink", "-lcrypto")), str(port)] if kind == "c" else [
        sys.executable, __file__, "--receiver", str(port), "--receiver-kind", kind]
    proc = subprocess.Popen(["nice", "-n", str(nice), *command], env=dict(os.environ, HTTP_BENCH_SECRET=SECRET))
    wait_port(port)
    return proc, port


def received(port: int) -> int:
    """How many events the receiver got; it must have found no bad signature."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/count", timeout=10) as reply:
        count, *bad = reply.read().split()
    assert not bad or bad[0] == b"0", f"{bad[0].decode()} events with a bad signature"
    return int(count)


def drain(daemon: Daemon, accepted: int, webhooks: bool) -> None:
    """Until every accepted message is delivered and, with webhooks, the
    outbox is empty (5 minutes at most)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        stats = daemon.stats()
        if stats["counters"]["delivered"] >= accepted and not (webhooks and stats["webhooks"]["pending"]):
            return
        time.sleep(0.2)  # each STATS costs the daemon CPU, which is counted
    raise RuntimeError(f"not drained in 5 minutes: {daemon.stats()}")


def written_bytes(pid: int) -> int:
    """Bytes a process has had written to the disk so far (/proc/PID/io's
    write_bytes): the spool writer's WAL frames and checkpoints."""
    with open(f"/proc/{pid}/io") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("write_bytes:"))


def one_run(binary: Path, workdir: Path, env: dict, sink_port: int, seconds: float, kind: str, hold: bool,
            hooks: dict | None, receiver: tuple[subprocess.Popen, int] | None, rate: float | None = None) -> dict:
    """One run of `kind` (off, http, hooks); `receiver` only for hooks."""
    settings = {"upstream": [f"127.0.0.1:{sink_port}"], "connections_per_upstream": 10, "hold": hold}
    http_port = free_port()
    http = kind != "off"
    if http:
        settings["http_listen"] = f"127.0.0.1:{http_port}"
    if kind == "hooks":
        settings.update(hooks)
    webhooks = kind == "hooks" and not hold
    daemon = Daemon(Path(tempfile.mkdtemp(dir=workdir)), env=env, **settings)
    try:
        if http:
            wait_port(http_port)  # bound after the line door, which Daemon waits for
        time.sleep(0.5)  # the children are up and idle
        pids = processes(daemon)
        if receiver is not None:
            pids["receiver"] = receiver[0].pid
        scraper = Scraper(http_port) if http else None
        if scraper:
            scraper.start()
        events = received(receiver[1]) if receiver else 0
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        written = written_bytes(pids["writer"])
        sent = loadgen(binary, daemon.port, 16, seconds, rate=rate)
        accepted = sent["requests"] - sent["errors"]
        written_in_load = written_bytes(pids["writer"]) - written
        if not hold:
            drain(daemon, accepted, webhooks)
        cpu = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
        written = written_bytes(pids["writer"]) - written
        if scraper:
            scraper.stopped.set()
            scraper.join(15)
        row = {"kind": kind, "rate": sent["rate"], "p50_us": sent["p50_us"], "p99_us": sent["p99_us"],
               "accepted": accepted, "errors": sent["errors"],
               "cpu_us": {role: round(seconds / accepted * 1e6, 1) for role, seconds in cpu.items()},
               "writer_kb": round(written / accepted / 1024, 2), "writer_kb_in_load": round(written_in_load / accepted / 1024, 2)}
        if scraper:
            row["scrapes"] = scraper.scrapes
            row["scrape_ms_max"] = round(max(scraper.seconds) * 1000, 1) if scraper.seconds else None
        if webhooks:
            row["events"] = received(receiver[1]) - events
            assert row["events"] >= accepted, row  # at least once: every message's event came
        return row
    finally:
        daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--hold", action="store_true", help="delivery on hold: intake alone")
    ap.add_argument("--no-http", action="store_true",
                    help="leave out the mode http: with --webhooks, only off and hooks (the goal's pair), so"
                         " that the same time holds more rounds")
    ap.add_argument("--webhooks", action="store_true", help="also the mode hooks: HTTP on and webhooks to a receiver")
    ap.add_argument("--rate", type=float, help="paced: this many SENDs a second in all (default: as fast as answered)")
    ap.add_argument("--receiver-nice", type=int, default=0,
                    help="the receiver's nice level: 0 competes with intake for the 2 cores as a receiver on"
                         " the same machine would; 10, as delivery, is closer to one on another machine")
    ap.add_argument("--receiver-kind", choices=("c", "lean", "aiohttp"), default="c",
                    help="c: bench/webhook_sink.c, answering 204 and verifying every 16th signature (the"
                         " cheapest correct receiver, built with cc and libcrypto); lean: the same as an"
                         " asyncio protocol; aiohttp: aiohttp's server, no signature checked")
    ap.add_argument("--checkout", action="append", default=[], help="LABEL=PATH (repeat); default this=.")
    ap.add_argument("--receiver", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.receiver:
        (receive_lean if args.receiver_kind == "lean" else receive_aiohttp)(args.receiver)
        return 0
    if not shutil.which("smtp-sink"):
        raise SystemExit("http_bench: Postfix's smtp-sink is needed (apt-get install postfix)")

    checkouts = dict(c.split("=", 1) for c in args.checkout) or {"this": str(HERE.parent)}
    envs = {label: dict(os.environ, PYTHONPATH=str(Path(path).resolve() / "daemon"))
            for label, path in checkouts.items()}
    binary = build_loadgen()
    workdir = Path(tempfile.mkdtemp(prefix="smtpgate-http-", dir=os.environ.get("SCRATCH", "/var/tmp")))
    sink, sink_port = start_sink()
    receiver = hooks = None
    if args.webhooks:
        receiver = start_receiver(args.receiver_nice, args.receiver_kind)
        secret = workdir / "webhook.secret"
        secret.write_text(SECRET)
        secret.chmod(0o600)
        hooks = {"webhook_url": f"http://127.0.0.1:{receiver[1]}/hook", "webhook_secret_file": str(secret)}
    kinds = ("off", "http", "hooks") if args.webhooks else ("off", "http")
    if args.no_http:
        if not args.webhooks:
            raise SystemExit("http_bench: --no-http leaves only off: give --webhooks too")
        kinds = ("off", "hooks")
    modes = [(label, kind) for label in checkouts for kind in kinds]
    runs: dict[tuple[str, str], list[dict]] = {mode: [] for mode in modes}
    print("uptime:", os.popen("uptime").read().strip(), flush=True)
    try:
        for r in range(args.rounds):
            shift = r % len(modes)
            for label, kind in modes[shift:] + modes[:shift]:
                row = one_run(binary, workdir, envs[label], sink_port, args.seconds, kind, args.hold, hooks,
                              receiver if kind == "hooks" else None, args.rate)
                runs[label, kind].append(row)
                print(json.dumps({"checkout": label, **row}), flush=True)
    finally:
        sink.terminate()
        sink.wait()
        if receiver is not None:
            receiver[0].terminate()
            receiver[0].wait()
        shutil.rmtree(workdir, ignore_errors=True)
    print("uptime:", os.popen("uptime").read().strip())

    def med(mode: tuple[str, str], key: str, role: str | None = None) -> float | None:
        values = [run["cpu_us"].get(role) if role else run[key] for run in runs[mode]]
        return statistics.median(values) if None not in values else None

    doing = "delivery on hold" if args.hold else "relaying to smtp-sink"
    receiving = f"; the {args.receiver_kind} receiver at nice {args.receiver_nice}" if args.webhooks else ""
    pace = f" paced at {args.rate:g} SENDs/s" if args.rate else ""
    print(f"\n{args.rounds} rounds of {args.seconds:g} s, 16 connections{pace}, {doing}{receiving}; medians")
    print("off: no HTTP side; http: /metrics scraped every 1 s; hooks: that and webhooks; x: the last / off\n")
    head = "| figure |" + "".join("".join(f" {label} {kind} |" for kind in kinds) + f" {label} x |"
                                  for label in checkouts)
    print(head + "\n| --- |" + (" ---: |" * (len(kinds) + 1)) * len(checkouts))
    figures = [("rate", None, "SENDs/s", 1, ""), ("p50_us", None, "hand-off p50", 1000, " ms"),
               ("p99_us", None, "hand-off p99", 1000, " ms")]
    figures += [("cpu", role, f"{role} CPU per SEND", 1, " us") for role in ROLES]
    for key, role, what, scale, unit in figures:
        cells = []
        fmt = (lambda v, s=scale, u=unit: "" if v is None else f"{v / s:.3f}{u}") if scale != 1 else (
            lambda v, u=unit: "" if v is None else f"{v:,.1f}{u}")
        for label in checkouts:
            values = [med((label, kind), key, role) for kind in kinds]
            ratio = f"{values[-1] / values[0]:.2f}" if values[0] and values[-1] is not None else ""
            cells.append("".join(f" {fmt(v)} |" for v in values) + f" {ratio} |")
        print(f"| {what} |" + "".join(cells))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
