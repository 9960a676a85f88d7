#!/usr/bin/env python3
"""The SMTP client core alone: messages/s to Postfix's smtp-sink, beside smtplib and aiosmtplib.

Usage: python3 bench/smtp_client_bench.py [--rounds 7] [--messages 5000] [--parallel 10]

Starts `smtp-sink` (package postfix) on a free loopback port, then, each
round, runs every client in turn (the order rotates from round to round so
no client always goes first on this noisy 2-core machine):

  one connection   smtplib, aiosmtplib, smtpgate: N messages over one reused
                   connection (smtpgate: send + reset, as the delivery
                   layer does; reset costs nothing when no transaction is open)
  P connections    aiosmtplib and smtpgate: P connections in one event loop,
                   each sending N*2/P messages; smtplib with P threads

Messages are 1 KiB (the anchors' message: headers + 75-column lines), one
recipient.  Prints each run and then the median and spread of every client,
and smtpgate's ratio to each reference at the same concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import smtplib
import socket
import statistics
import subprocess
import sys
import threading
import time

import aiosmtplib

from smtpgate.smtp import SmtpConnection, UpstreamSettings

HOST = "127.0.0.1"
FROM, TO = "sender@example.com", ["rcpt@example.com"]


def make_message(size: int = 1024) -> bytes:
    """The anchors' 1 KiB message (anchors_common.make_message), as bytes."""
    body = ("x" * 75 + "\r\n") * (size // 77 + 1)
    return ("From: sender@example.com\r\nTo: rcpt@example.com\r\n"
            "Subject: anchor\r\n\r\n" + body[:size] + "\r\n").encode()


MESSAGE = make_message()


# ---- the sink ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_sink() -> tuple[subprocess.Popen, int]:
    """smtp-sink on a free loopback port with a backlog of 1000 (see smtp-sink(1))."""
    if not shutil.which("smtp-sink"):
        sys.exit("smtp-sink not found: apt-get install postfix")
    port = free_port()
    args = ["smtp-sink"] + (["-u", "nobody"] if os.geteuid() == 0 else []) + [f"{HOST}:{port}", "1000"]
    sink = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=1) as sock:
                sock.recv(512)
                return sink, port
        except OSError:
            time.sleep(0.05)
    sink.kill()
    sys.exit("smtp-sink did not start")


# ---- the clients: each sends `count` messages over `conns` connections -------------


def smtplib_run(port: int, count: int, conns: int) -> None:
    def one(n: int) -> None:
        with smtplib.SMTP(HOST, port) as client:
            client.ehlo("bench.example")
            for _ in range(n):
                client.sendmail(FROM, TO, MESSAGE)

    if conns == 1:
        one(count)
        return
    threads = [threading.Thread(target=one, args=(count // conns,)) for _ in range(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def aiosmtplib_run(port: int, count: int, conns: int) -> None:
    async def one(n: int) -> None:
        client = aiosmtplib.SMTP(hostname=HOST, port=port, use_tls=False, start_tls=False,
                                 local_hostname="bench.example")
        await client.connect()
        for _ in range(n):
            await client.sendmail(FROM, TO, MESSAGE)
        await client.quit()

    async def main() -> None:
        await asyncio.gather(*(one(count // conns) for _ in range(conns)))

    asyncio.run(main())


def smtpgate_run(port: int, count: int, conns: int) -> None:
    settings = UpstreamSettings(HOST, port, tls="none", helo_name="bench.example")

    async def one(n: int) -> None:
        conn = await SmtpConnection.open(settings)
        for _ in range(n):
            result = await conn.send(FROM, TO, MESSAGE)
            if result.recipients[0].status != "accepted":
                raise RuntimeError(f"sink refused: {result.recipients[0].reply}")
            await conn.reset()
        await conn.quit()

    async def main() -> None:
        await asyncio.gather(*(one(count // conns) for _ in range(conns)))

    asyncio.run(main())


CLIENTS = {"smtplib": smtplib_run, "aiosmtplib": aiosmtplib_run, "smtpgate": smtpgate_run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--messages", type=int, default=5000, help="messages per one-connection run")
    parser.add_argument("--parallel", type=int, default=10, help="connections in the parallel runs")
    args = parser.parse_args()

    print(f"# {platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"aiosmtplib {aiosmtplib.__version__}, {len(MESSAGE)}-octet messages", flush=True)
    cases = [(name, 1, args.messages) for name in CLIENTS]
    cases += [(name, args.parallel, args.messages * 2) for name in CLIENTS]
    rates: dict[tuple[str, int], list[float]] = {(name, conns): [] for name, conns, _ in cases}
    sink, port = start_sink()
    try:
        for round_no in range(args.rounds):
            shift = round_no % len(CLIENTS)
            for conns in (1, args.parallel):
                group = [case for case in cases if case[1] == conns]
                for name, conns, count in group[shift:] + group[:shift]:
                    start = time.perf_counter()
                    CLIENTS[name](port, count, conns)
                    rate = count / (time.perf_counter() - start)
                    rates[(name, conns)].append(rate)
                    print(f"round={round_no} {name:10} conns={conns:<3} msgs={count} msg/s={rate:.0f}", flush=True)
    finally:
        sink.terminate()
        sink.wait(timeout=5)

    print("\n| client | connections | median msg/s | spread (min-max) | runs |\n| --- | --- | ---: | --- | ---: |")
    medians = {}
    for (name, conns), values in rates.items():
        medians[(name, conns)] = median = statistics.median(values)
        print(f"| {name} | {conns} | {median:,.0f} | {min(values):,.0f}-{max(values):,.0f} | {len(values)} |")
    for conns in (1, args.parallel):
        for reference in ("aiosmtplib", "smtplib"):
            # Ratios within a round are paired (same minutes of a noisy
            # machine), so their median is steadier than a ratio of medians.
            paired = [ours / theirs for ours, theirs in zip(rates[("smtpgate", conns)], rates[(reference, conns)], strict=True)]
            print(f"smtpgate / {reference} at {conns} connection(s): ratio of medians "
                  f"{medians[('smtpgate', conns)] / medians[(reference, conns)]:.2f}x, "
                  f"median of per-round ratios {statistics.median(paired):.2f}x "
                  f"({min(paired):.2f}-{max(paired):.2f})")


if __name__ == "__main__":
    main()
