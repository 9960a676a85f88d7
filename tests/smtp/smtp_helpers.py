"""Test helpers: an aiosmtpd upstream that records, a scripted server on a real socket.

Imported by name from the tests (a conftest cannot be: tests/conftest.py is
"conftest" too).
"""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

USER = "mailer@example.org"
PASSWORD = "s3cret-Pa55"  # the tests check it never shows in an error text


class FreePortController(Controller):
    """aiosmtpd's Controller bound to port 0: the kernel picks a free port.

    aiosmtpd 1.4 connects to `self.port` to check the server is up, so the
    port the kernel chose is read back first.
    """

    def _trigger_server(self):
        self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    data: bytes


@dataclass
class RecordingHandler:
    """Accepts everything except the recipients given a scripted reply."""

    rcpt_replies: dict[str, str] = field(default_factory=dict)
    messages: list[Received] = field(default_factory=list)
    ehlo_names: list[str] = field(default_factory=list)

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        self.ehlo_names.append(hostname)
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(
            Received(envelope.mail_from, list(envelope.rcpt_tos),
                     list(envelope.mail_options), envelope.original_content)
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    async def auth_XOAUTH2(self, server, args):
        """RFC-less Google XOAUTH2: user=...^Aauth=Bearer <token>^A^A, base64."""
        fields = base64.b64decode(args[1]).split(b"\x01")
        if fields[1] == b"auth=Bearer good-token":
            return AuthResult(success=True, auth_data=fields[0])
        await server.push("334 eyJzdGF0dXMiOiI0MDEifQ==")
        await server._reader.readline()  # the client's empty line
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")


def check_password(server, session, envelope, mechanism, auth_data):
    ok = isinstance(auth_data, LoginPassword) and auth_data == (USER.encode(), PASSWORD.encode())
    return AuthResult(success=ok, handled=False)  # handled=False: aiosmtpd sends the 535


# ---- a scripted server on a real socket ------------------------------------------

Responder = Callable[[bytes], bytes | None]
HANG = object()  # a responder returning HANG never answers


class ScriptedServer:
    """A TCP server on 127.0.0.1 answering each command line with responder(line).

    responder returns the bytes to write (several replies are fine), None to
    close the connection without answering, or HANG to stay silent.  After a
    354 reply the body is read up to CRLF.CRLF and the responder gets b"."
    for the end of data.  Every byte received is kept in `received`.
    """

    def __init__(self, responder: Responder, greeting: bytes = b"220 scripted ESMTP\r\n"):
        self.responder = responder
        self.greeting = greeting
        self.received = bytearray()
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc_info) -> None:
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        try:
            writer.write(self.greeting)
            while True:
                line = await reader.readline()
                if not line:
                    return
                self.received += line
                answer = self.responder(line.rstrip(b"\r\n"))
                while isinstance(answer, bytes) and _last_line(answer).startswith(b"354"):
                    writer.write(answer)
                    body = await reader.readuntil(b"\r\n.\r\n")
                    self.received += body
                    answer = self.responder(b".")
                if answer is HANG:
                    await asyncio.sleep(3600)
                if answer is None:
                    writer.transport.abort()
                    return
                writer.write(answer)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


def esmtp_responder(ehlo: bytes = b"250-scripted\r\n250 PIPELINING\r\n", **overrides) -> Responder:
    """A well-behaved server's answers; overrides map a verb (b"MAIL", b".") to its answer."""
    defaults = {
        b"EHLO": ehlo,
        b"HELO": b"250 scripted\r\n",
        b"MAIL": b"250 2.1.0 Ok\r\n",
        b"RCPT": b"250 2.1.5 Ok\r\n",
        b"DATA": b"354 go ahead\r\n",
        b".": b"250 2.0.0 Ok: queued\r\n",
        b"RSET": b"250 2.0.0 Ok\r\n",
        b"NOOP": b"250 2.0.0 Ok\r\n",
        b"QUIT": b"221 2.0.0 Bye\r\n",
    }
    defaults.update({key.encode() if isinstance(key, str) else key: value for key, value in overrides.items()})

    def respond(line: bytes):
        verb = line.split(b" ", 1)[0].split(b":", 1)[0].upper()
        answer = defaults.get(verb, b"502 5.5.2 not implemented\r\n")
        return answer(line) if callable(answer) else answer

    return respond


def run(coroutine: Awaitable):
    """Run one test scenario on a fresh event loop (no pytest-asyncio here)."""
    return asyncio.run(asyncio.wait_for(coroutine, 20))


def _last_line(answer: bytes) -> bytes:
    return answer.rstrip(b"\r\n").rpartition(b"\n")[2]
