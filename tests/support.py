"""Helpers shared by the test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

import socket


def read_line(sock: socket.socket, buffer: bytearray | None = None) -> str:
    """Read one CRLF-terminated reply from `sock` (byte by byte is fine in tests)."""
    data = bytearray()
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {bytes(data)!r}")
        data += chunk
    return data[:-2].decode()


def read_lines(sock: socket.socket, count: int) -> list[str]:
    """Read `count` CRLF-terminated replies, efficiently."""
    data = b""
    while data.count(b"\r\n") < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise ConnectionError(f"closed after {data[-200:]!r}")
        data += chunk
    return [line.decode() for line in data.split(b"\r\n")[:count]]
