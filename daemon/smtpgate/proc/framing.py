"""Framing of the pipes between the daemon and its child processes (the
spool writer, delivery): each frame is a 4-byte big-endian length and a
pickle of a list of messages.

Pickle is safe here because both ends are smtpgate processes and the pipes
are private to them; nothing from the network is unpickled. This module
stays free of asyncio so that the spool writer starts fast.

The messages are NamedTuples marked with `@message`, which pickles each as
its class and a plain tuple of its fields. Pickle's generic way for a
tuple subclass (object.__reduce_ex__, which calls the class's Python
__getnewargs__) costs about twice as much, and every SEND sends four of
them: a Call and its Enqueue to the writer, an Answer and its Enqueued
back (pickling and unpickling them, 5.9 us per SEND across both processes
the generic way, 3.5 us with @message, 0.8 us as bare tuples).
"""

from __future__ import annotations

import copyreg
import pickle
import struct

FRAME = struct.Struct(">I")


def message(cls: type) -> type:
    """Class decorator for a NamedTuple that crosses a pipe (see above)."""
    copyreg.pickle(cls, _class_and_fields)
    return cls


def _class_and_fields(obj) -> tuple:
    return type(obj), tuple(obj)


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
