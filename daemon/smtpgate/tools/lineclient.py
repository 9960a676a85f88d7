"""A small synchronous client of the line protocol (PROTOCOL.md).

Used by `smtpgate send`, `smtpgate sendmail` and the tests. Every request
goes out in one `sendall`; replies are read up to CRLF. An `ERR` reply
raises `RemoteError(code, text)`; a network failure raises `OSError`, and
a reply that is not the protocol `ProtocolError` (an OSError too).
"""

from __future__ import annotations

import json
import socket

DEFAULT_URI = "tcp://127.0.0.1:2526"
MAX_REPLY = 16 * 1024 * 1024


class RemoteError(Exception):
    """The daemon answered `ERR CODE TEXT`."""

    def __init__(self, code: str, text: str):
        super().__init__(f"{code} {text}")
        self.code = code
        self.text = text


class ProtocolError(ConnectionError):
    """The peer answered something that is not a line-protocol reply."""


def parse_uri(uri: str) -> tuple[int, object]:
    """"tcp://HOST:PORT" or "unix:///PATH" (or a bare HOST:PORT) -> (family, address)."""
    if uri.startswith("unix://"):
        return socket.AF_UNIX, uri[len("unix://"):]
    if uri.startswith("tcp://"):
        uri = uri[len("tcp://"):]
    host, sep, port = uri.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not a server address: {uri!r} (tcp://HOST:PORT or unix:///PATH)")
    return socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET, (host.strip("[]"), int(port))


class LineClient:
    def __init__(self, uri: str = DEFAULT_URI, token: str | None = None, timeout: float = 10.0):
        family, address = parse_uri(uri)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(address)
        except OSError:
            self.sock.close()
            raise
        if family != socket.AF_UNIX:
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        self.unanswered: str | None = None  # the verb of a request written whole and not yet answered
        if token:
            self.request(f"AUTH {token}")

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send_lines(self, lines: list[str]) -> None:
        self.sock.sendall("".join(line + "\n" for line in lines).encode())

    def read_reply(self) -> str:
        """Return the payload of the next `OK` reply ('' when bare); raise RemoteError for ERR."""
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the daemon closed the connection")
            self.buffer += chunk
            if len(self.buffer) > MAX_REPLY:
                raise ProtocolError("reply too long")
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"malformed reply: {line[:80]!r}") from None
        if text == "OK" or text.startswith("OK "):
            return text[3:]
        if text.startswith("ERR "):
            code, _, message = text[4:].partition(" ")
            self.unanswered = None
            raise RemoteError(code, message)
        raise ProtocolError(f"malformed reply: {text[:80]!r}")

    def request(self, line: str) -> str:
        self.send_lines([line])
        self.unanswered = line.partition(" ")[0]
        reply = self.read_reply()  # an ERR raises too: answered either way
        self.unanswered = None
        return reply

    def send(self, message: dict) -> str:
        return self.request("SEND " + json.dumps(message, ensure_ascii=False, separators=(",", ":")))

    def status(self, msg_id: str) -> dict:
        return json.loads(self.request(f"STATUS {msg_id}"))

    def wait(self, msg_id: str, seconds: float = 30.0) -> dict:
        return json.loads(self.request(f"WAIT {msg_id} {seconds:g}"))

    def stats(self) -> dict:
        return json.loads(self.request("STATS"))
