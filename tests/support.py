"""Helpers shared by the test modules (conftest.py holds the fixtures)."""

from __future__ import annotations

import contextlib
import os
import socket
import time


def free_port() -> int:
    """A port free right now (aiosmtpd's Controller cannot bind port 0: it probes its own port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(check, timeout: float = 20.0, what: str = "condition"):
    """Poll `check()` until it returns something true (bounded); return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


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


@contextlib.contextmanager
def stuck_listener():
    """A listener whose accept queue is full: the kernel drops further SYNs,
    so a connect there hangs until the client's own connect timeout.
    Yields its "tcp://127.0.0.1:PORT" URI."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        fillers = [socket.socket() for _ in range(3)]
        try:
            for sock in fillers:
                sock.setblocking(False)
                sock.connect_ex(listener.getsockname())
            yield f"tcp://127.0.0.1:{listener.getsockname()[1]}"
        finally:
            for sock in fillers:
                sock.close()


def children_of(pid: int) -> list[int]:
    """The pids of a process's children (from /proc, every thread's list)."""
    tasks = f"/proc/{pid}/task"
    try:
        return [int(c) for t in os.listdir(tasks) for c in open(f"{tasks}/{t}/children").read().split()]
    except FileNotFoundError:  # the process is gone
        return []


def process_name(pid: int) -> str | None:
    """A process's name as ps shows it (smtpgate-spool, ...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except FileNotFoundError:
        return None


class RawSmtp:
    """Line-by-line SMTP over a plain socket, for what smtplib hides. The
    server's first reply (220, or a 421 refusal) is in `greeting`."""

    CLOSED = "<closed>"  # what reply() gives for a connection the server ended

    def __init__(self, port: int, host: str = "127.0.0.1"):
        self.sock = socket.create_connection((host, port), timeout=10)
        self.file = self.sock.makefile("rb")
        self.greeting = self.reply()

    def reply(self) -> str:
        """One reply, its lines joined by "\\n"; CLOSED in place of what never came."""
        lines = []
        while True:
            line = self.file.readline().decode()
            if not line.endswith("\r\n"):
                return "\n".join(lines + [self.CLOSED])
            lines.append(line[:-2])
            if line[3:4] != "-":
                return "\n".join(lines)

    def cmd(self, line: str) -> str:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self):
        self.file.close()
        self.sock.close()
