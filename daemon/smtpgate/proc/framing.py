"""Framing of the pipes between the daemon and its child processes (the
spool writer, delivery): each frame is a 4-byte big-endian length and a
pickle of a list of messages.

Pickle is safe here because both ends are smtpgate processes and the pipes
are private to them; nothing from the network is unpickled. This module
stays free of asyncio so that the spool writer starts fast.
"""

from __future__ import annotations

import pickle
import struct

FRAME = struct.Struct(">I")


def encode(messages: list) -> list[bytes]:
    """One frame of `messages`, as buffers to write in order."""
    data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return [FRAME.pack(len(data)), data]


def take_messages(buf: bytearray) -> list:
    """The messages of every complete frame at the start of `buf`, which are
    removed from it; a partial frame stays for the next read."""
    messages, pos = [], 0
    while len(buf) - pos >= FRAME.size:
        (size,) = FRAME.unpack_from(buf, pos)
        end = pos + FRAME.size + size
        if len(buf) < end:
            break
        messages += pickle.loads(memoryview(buf)[pos + FRAME.size:end])
        pos = end
    del buf[:pos]
    return messages
