"""Framing of the pipes between the daemon and its child processes (the
spool writer, delivery): each frame is a 4-byte big-endian length and a
pickle of a list of messages.

Pickle is safe here because both ends are smtpgate processes and the pipes
are private to them; nothing from the network is unpickled. This module
stays free of asyncio so that the spool writer starts fast.

The messages are NamedTuples marked with `@message`, which pickles each as
one reconstructor shared by all of them (`_message`), the name of its type
and a plain tuple of its fields. Pickle's own way for a tuple subclass
calls the class's Python __getnewargs__ to pickle it and its Python
__new__ to unpickle it, and names each class in each frame: an import
lookup per class and frame when unpickling (about 1.5 us). Measured with
pickle.dumps and loads of frames of 1 and of 16 SENDs (a Call and its
Enqueue to the writer, a Committed with an Enqueued each back), in us per
SEND across both processes: bare tuples 6.1 / 1.2; each message pickled
as its class and fields 26.8 / 6.1; as `_message` and its type's name
15.2 / 5.0.

`_message` is pickled as a plain global, which the pickler writes once per
frame and then names by its memo. Named by a copyreg extension code
instead (240, PEP 307), the pickler looks it up again for every message (an
EXT opcode is never memoized: an import and an attribute check each time):
by timeit, a frame of 13 attempt records took 40.9 us to pickle that way
against 17.2 as a global, 6 enqueues 17.5 against 8.4, for 0.9 us less to
unpickle a frame (issue 15, bench/results.md). A relayed message is
pickled as six messages on its way: its Call and Enqueue to the writer,
its Enqueued back, its Claimed to the delivery process, its RecordAttempt
and RecipientOutcome (packed in the delivery process, unpacked by the
writer).
"""

from __future__ import annotations

import copyreg
import pickle
import struct

FRAME = struct.Struct(">I")

_TYPES: dict[str, type] = {}  # "module.Name" -> message type


def message(cls: type) -> type:
    """Class decorator for a NamedTuple that crosses a pipe (see above)."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    _TYPES[name] = cls
    copyreg.pickle(cls, lambda obj: (_message, (name, tuple(obj))))
    return cls


def _message(name: str, fields: tuple) -> tuple:
    # What NamedTuple._make does, without its Python frame.
    return tuple.__new__(_TYPES[name], fields)


def encode(messages: list) -> list[bytes]:
    """One frame of `messages`, as buffers to write in order."""
    data = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return [FRAME.pack(len(data)), data]


def pack(value) -> bytes:
    """`value` pickled on its own, to ride in a message that a process
    passes on without reading it (spool.ops.RecordAttempts)."""
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(data: bytes):
    """What `pack` packed."""
    return pickle.loads(data)


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
