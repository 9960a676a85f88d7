"""Soak and fuzz runs, by hand: `python3 -m pytest -m soak` (minutes, not seconds).

Not part of the default run (pyproject.toml deselects the marker). Each test
is bounded in time and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import random
import signal
import socket
import threading
import time

import pytest

from support import read_line
from test_daemon import SIMPLE, ok_payload, send_line

pytestmark = pytest.mark.soak

FUZZ_SECONDS = 60.0
KILL_CYCLES = 10


def hostile_chunks(rng: random.Random):
    """Bytes a hostile or broken client might send, in random pieces."""
    pieces = [
        b"SEND " + json.dumps(dict(SIMPLE, subject="x" * rng.randint(0, 3000))).encode() + b"\n",
        b"SEND {\"from\":\"a@example.com\",\"to\":\"b\\r\\nBcc: c@example.org\",\"text\":\"x\"}\n",
        b"SEND {\"from\":" + b"[" * rng.randint(1, 5000) + b"\n",
        b"STATUS " + bytes(rng.randrange(256) for _ in range(rng.randint(0, 64))) + b"\n",
        b"WAIT x 0\n", b"PING\r\n", b"\r\n", b"\n", b"HELLO\n", b"AUTH " + b"a" * 5000 + b"\n",
        bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096))),
        b"x" * rng.randint(1, 300_000),
    ]
    data = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 20)))
    cut = 0
    while cut < len(data):
        step = rng.randint(1, 8192)
        yield data[cut:cut + step]
        cut += step


def test_fuzzed_clients_never_take_the_daemon_down(make_daemon):
    daemon = make_daemon(max_message_size=64 * 1024, request_timeout=2.0, upstream=["127.0.0.1:9"],
                         retry_base=600.0)
    rng = random.Random(20261126)
    deadline = time.monotonic() + FUZZ_SECONDS
    connections = 0
    while time.monotonic() < deadline:
        connections += 1
        try:
            with socket.create_connection(daemon.tcp, timeout=5) as sock:
                for chunk in hostile_chunks(rng):
                    sock.sendall(chunk)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(1 << 16):
                    pass
        except OSError:
            pass  # cut off for a foreign-looking line, or a timeout: the daemon's right
        if connections % 50 == 0:
            assert daemon.request("PING") == "OK PONG"
    assert daemon.proc.poll() is None
    assert daemon.request("PING") == "OK PONG"
    assert not [l for l in daemon.log_lines() if l.get("level") in ("error", "critical")]


def test_repeated_kill_9_loses_nothing(make_daemon, upstream):
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=600.0)
    acknowledged: list[str] = []
    for cycle in range(KILL_CYCLES):
        stop = threading.Event()

        def stream():
            try:
                with daemon.connect() as sock:
                    while not stop.is_set():
                        subject = f"c{cycle}-{len(acknowledged)}"
                        sock.sendall(send_line(dict(SIMPLE, subject=subject)).encode() + b"\n")
                        ok_payload(read_line(sock))
                        acknowledged.append(subject)
            except (OSError, ConnectionError):
                return

        thread = threading.Thread(target=stream)
        thread.start()
        time.sleep(random.uniform(0.2, 1.5))
        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        stop.set()
        thread.join(30)
        daemon.start()
    daemon.settings.update(upstream=[upstream.hostport], retry_base=0.2)
    daemon.stop()
    daemon.start()
    deadline = time.monotonic() + 300
    wanted = set(acknowledged)
    while time.monotonic() < deadline:
        subjects = {m.message["Subject"] for m in upstream.wait_for(len(wanted), timeout=5)}
        if wanted <= subjects:
            break
    assert not wanted - subjects, f"{len(wanted - subjects)} acknowledged messages lost"
