"""Framing of the pipes between the daemon and its child processes (the
spool writer, delivery): each frame is a 4-byte big-endian length and a
pickle of a list of messages.

Pickle is safe here because both ends are smtpgate processes and the pipes
are private to them; nothing from the network is unpickled. This module
stays free of asyncio so that the spool writer starts fast.
"""

from __future__ import annotations

import os
import pickle
import signal
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


def become_child(name: str) -> tuple[int, int]:
    """Set up a child process of the daemon: named `name` in ps, top and
    pgrep; deaf to signals (a Ctrl-C or a SIGTERM to the whole group must
    not end it before the daemon is done with it: it leaves when its pipe
    from the daemon ends). Returns the pipe's file descriptors (in, out);
    stdout then goes to stderr, so a stray print lands in the log and never
    in the frames."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    with open("/proc/self/comm", "w") as comm:
        comm.write(name)
    pipe_in, pipe_out = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    return pipe_in, pipe_out
