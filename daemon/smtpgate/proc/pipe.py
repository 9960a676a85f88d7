"""The asyncio side of a pipe pair to or from a child process (framing.py).

Messages sent in one turn of the event loop go out in one frame, one
pickle and one write: under load a turn produces many (the SENDs read in
it, the records of the deliveries that finished), and the cost per message
stays a fraction of a syscall.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from smtpgate.proc.framing import encode, take_messages


class FramedPipe(asyncio.Protocol):
    """Reads frames from one pipe (calling on_message for each message) and
    writes frames to another. `closed` is done at EOF of the read side."""

    def __init__(self, on_message: Callable[[object], None], on_eof: Callable[[], None]):
        self._on_message = on_message
        self._on_eof = on_eof
        self._buf = bytearray()
        self._outbox: list = []
        self._writer: asyncio.WriteTransport | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    async def open(self, read_file, write_file) -> None:
        """Attach the pipes: the write side first, so that a message answered
        as soon as one is read has somewhere to go."""
        self._writer, _ = await self._loop.connect_write_pipe(asyncio.BaseProtocol, write_file)
        await self._loop.connect_read_pipe(lambda: self, read_file)

    def send(self, message) -> None:
        if not self._outbox:
            self._loop.call_soon(self.flush)
        self._outbox.append(message)

    def flush(self) -> None:
        if self._outbox and self._writer is not None and not self._writer.is_closing():
            self._writer.writelines(encode(self._outbox))
        self._outbox = []

    def close_write(self) -> None:
        """Send what is pending, then EOF (the transport writes its buffer first)."""
        self.flush()
        if self._writer is not None:
            self._writer.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        for message in take_messages(self._buf):
            self._on_message(message)

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        self._on_eof()
