#!/usr/bin/env python3
"""CPU per webhook POST of the sender's HTTP client, beside aiohttp's and a floor.

    flock /work/team/bench.lock python3 bench/webhook_post.py [--posts 3000] [--rounds 3] [--loop uvloop]

An aiohttp server in a subprocess answers every POST 204. This process
POSTs a 400-byte JSON body `posts` times, 16 at once over 16 keep-alive
connections, with: "floor" (fixed request bytes written on an asyncio
stream, read until the end of the answer's head: no HTTP client at all),
"protocol_floor" (the same on an asyncio Protocol, no streams),
"client" (smtpgate.webhooks.client.Client, one request per call),
"client_pipelined" (the same, 8 requests pipelined per call on 2 connections,
as the sender sends the events due together) and
"aiohttp" (a ClientSession as the sender used it before). Prints this
process's CPU microseconds per POST (time.process_time: user and system),
each round's, and the medians.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_bench import free_port  # noqa: E402

from smtpgate.webhooks.client import Client  # noqa: E402
from smtpgate.webhooks.sender import PIPELINE  # noqa: E402

RECEIVER = """
import sys
from aiohttp import web
async def hook(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/hook", hook)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""
BODY = b'{"type":"message.sent","data":{"pad":"' + b"x" * 360 + b'"}}'
HEADERS = [("Content-Type", "application/json"), ("webhook-id", "evt_01JEXAMPLE0000000000000000"),
           ("webhook-timestamp", "1765000000"), ("webhook-signature", "v1," + "A" * 43 + "=")]
CONCURRENCY = 16


async def timed(post, posts: int, concurrency: int = CONCURRENCY) -> float:
    """CPU us per call of `posts` calls of `post`, `concurrency` at once (after a warm-up)."""
    slots = asyncio.Semaphore(concurrency)

    async def one():
        async with slots:
            await post()

    await asyncio.gather(*(one() for _ in range(100)))
    started = time.process_time()
    await asyncio.gather(*(one() for _ in range(posts)))
    return (time.process_time() - started) / posts * 1e6


async def floor(url: str, port: int, posts: int) -> float:
    request = b"".join([b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                        *(f"{name}: {value}\r\n".encode() for name, value in HEADERS),
                        b"Content-Length: %d\r\n\r\n" % len(BODY), BODY])
    idle = asyncio.Queue()
    for _ in range(CONCURRENCY):
        idle.put_nowait(await asyncio.open_connection("127.0.0.1", port))

    async def post():
        reader, writer = await idle.get()
        writer.write(request)
        await reader.readuntil(b"\r\n\r\n")  # a 204: no body
        idle.put_nowait((reader, writer))

    try:
        return await timed(post, posts)
    finally:
        while not idle.empty():
            idle.get_nowait()[1].close()


class _Answered(asyncio.Protocol):
    """A connection whose `answered` future is set at the end of an answer's head."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.answered: asyncio.Future | None = None
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and self.answered is not None:
            self.buffer = b""
            self.answered.set_result(None)


async def protocol_floor(url: str, port: int, posts: int) -> float:
    """The floor of an asyncio Protocol instead of streams: what a client of
    our own on a protocol could at best save."""
    loop = asyncio.get_running_loop()
    request = b"".join([b"POST /hook HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                        *(f"{name}: {value}\r\n".encode() for name, value in HEADERS),
                        b"Content-Length: %d\r\n\r\n" % len(BODY), BODY])
    idle = asyncio.Queue()
    for _ in range(CONCURRENCY):
        idle.put_nowait((await loop.create_connection(_Answered, "127.0.0.1", port))[1])

    async def post():
        conn = await idle.get()
        conn.answered = loop.create_future()
        conn.transport.write(request)
        await conn.answered
        idle.put_nowait(conn)

    try:
        return await timed(post, posts)
    finally:
        while not idle.empty():
            idle.get_nowait().transport.close()


async def client(url: str, port: int, posts: int, pipelined: int = 1) -> float:
    """`pipelined` requests per call (and connection), CONCURRENCY // pipelined calls at once."""
    http = Client("smtpgate/bench")

    async def post():
        answers = await http.post(url, [(HEADERS, BODY)] * pipelined, 10)
        assert all(answer.status == 204 for answer in answers), answers

    try:
        return await timed(post, posts // pipelined, CONCURRENCY // pipelined) / pipelined
    finally:
        http.close()


async def client_pipelined(url: str, port: int, posts: int) -> float:
    return await client(url, port, posts, PIPELINE)


async def aiohttp_session(url: str, port: int, posts: int) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=CONCURRENCY),
                                     auto_decompress=False) as session:
        async def post():
            async with session.post(url, data=BODY, headers=dict(HEADERS), allow_redirects=False) as response:
                assert response.status == 204

        return await timed(post, posts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--posts", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                    help="this process's event loop (the delivery process takes uvloop where installed)")
    args = ap.parse_args()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    url = f"http://127.0.0.1:{port}/hook"
    runs: dict[str, list[float]] = {"floor": [], "protocol_floor": [], "client": [], "client_pipelined": [],
                                   "aiohttp": []}
    run = asyncio.run
    if args.loop == "uvloop":
        import uvloop
        run = uvloop.run
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                asyncio.run(floor(url, port, 1))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        for _ in range(args.rounds):
            for name, bench in (("floor", floor), ("protocol_floor", protocol_floor), ("client", client),
                                ("client_pipelined", client_pipelined), ("aiohttp", aiohttp_session)):
                runs[name].append(round(run(bench(url, port, args.posts)), 1))
            print({name: values[-1] for name, values in runs.items()}, flush=True)
    finally:
        receiver.terminate()
        receiver.wait()
    print("CPU us per POST, medians of", args.rounds, {name: statistics.median(v) for name, v in runs.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
