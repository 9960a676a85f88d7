"""Soak and fuzz runs, by hand: `python3 -m pytest -m soak` (minutes, not seconds).

Not part of the default run (pyproject.toml deselects the marker). Each test
is bounded in time and talks to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import random
import socket
import time

import pytest

from test_daemon import SIMPLE
from test_durability import TARGETS, kill_cycles

pytestmark = pytest.mark.soak

FUZZ_SECONDS = 60.0
KILL_CYCLES = 200  # the default run has 20 (test_durability.py)


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


@pytest.mark.timeout(FUZZ_SECONDS + 120)
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


@pytest.mark.timeout(1800)
def test_repeated_kill_9_of_any_process_loses_nothing(make_daemon, upstream):
    rng = random.Random(20261206)
    kill_cycles(make_daemon, upstream, [rng.choice(sorted(TARGETS)) for _ in range(KILL_CYCLES)], seed=1)
