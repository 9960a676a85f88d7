"""Callers' connections lent to the writer, so that it answers a SEND's
`OK <id>` itself as soon as its batch is committed.

Why: otherwise the OK waits for the writer to send the daemon its
`Committed`, for the daemon to be woken and scheduled, to unpickle it and
to write the reply: a process hop on the path of every SEND, and on two
CPUs shared with delivery the place where a lone caller's SEND waits
longest for a CPU (issue 15, bench/results.md). The writer's write is the
same `send` the daemon would make; the daemon still learns of the commit
right after, and does everything else a stored message needs.

How: the daemon lends a connection once, on its first such SEND, by
passing a copy of its socket over a Unix SOCK_SEQPACKET pair (SCM_RIGHTS;
one datagram per connection: its key and the descriptor). An Enqueue that
carries a ReplyTo names the connection by that key. `Unlend` in the
operations' pipe, after the connection's last Enqueue, closes the copy.

Order: replies on a connection leave in request order. The daemon marks a
SEND for the writer only while every reply before it on that connection is
also one the writer is to write, and tells it which (`after`); the writer
writes a reply only when it wrote the whole of that one. Whatever the
writer did not write (refused, the caller's buffer full, the connection
unknown) it reports as `sent` bytes short, and the daemon writes the rest
in its place.
"""

from __future__ import annotations

import os
import socket
import struct

from smtpgate.protocol.formatter import reply_ok
from smtpgate.spool.ops import Enqueue, Enqueued

KEY = struct.Struct(">Q")
_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL


def lend(channel: socket.socket, key: int, fd: int) -> bool:
    """The daemon's side: pass a copy of the socket `fd` as `key`. False
    when it could not (the writer has not read the ones before: then the
    daemon answers on this connection itself)."""
    try:  # `channel` is non-blocking: Python 3.11's send_fds and recv_fds drop their flags
        return socket.send_fds(channel, [KEY.pack(key)], [fd]) > 0
    except OSError:
        return False


class Lent:
    """The writer's side: the connections lent to it, by key."""

    def __init__(self, channel: socket.socket):
        channel.setblocking(False)
        self.channel = channel
        self.socks: dict[int, socket.socket] = {}
        self.written: dict[int, int] = {}  # key -> seq of the last OK written whole

    def _take_lent(self) -> None:
        while True:
            try:
                data, fds, _flags, _ = socket.recv_fds(self.channel, KEY.size, 1)
            except BlockingIOError:
                return
            if not data:
                return
            if fds:  # none when our descriptors ran out (MSG_CTRUNC): the daemon answers
                (key,) = KEY.unpack(data)
                self.socks[key] = socket.socket(fileno=fds[0])

    def unlend(self, key: int) -> None:
        sock = self.socks.pop(key, None)
        self.written.pop(key, None)
        if sock is None:
            self._take_lent()  # lent and given back before any SEND of it was read
            sock = self.socks.pop(key, None)
        if sock is not None:
            sock.close()

    def answer(self, batch: list, results: dict) -> None:
        """Write the OK of each committed Enqueue of `batch` that has a
        ReplyTo, in order; record in its result how much was written."""
        wrote = False
        for call in batch:
            op = call.op
            if type(op) is not Enqueue or op.reply_to is None:
                continue
            result = results.get(call.token)
            if type(result) is not Enqueued:
                continue
            key, seq, after = op.reply_to
            if after and self.written.get(key) != after:
                continue  # the OK before it is not (all) out: the daemon writes both
            sock = self.socks.get(key)
            if sock is None:
                self._take_lent()
                sock = self.socks.get(key)
                if sock is None:
                    continue
            data = reply_ok(result.id)
            try:
                sent = sock.send(data, _FLAGS)
            except OSError:  # full (a caller not reading), or gone
                continue
            results[call.token] = Enqueued(result.id, result.existing, sent)
            if sent == len(data):
                self.written[key] = seq
            wrote = True
        if wrote:
            # The caller an OK wakes is often queued on the writer's own CPU
            # (the kernel places a woken task near its waker) while the other
            # runs delivery, and would wait there for the writer to make and
            # send its Committed. Yielded to, the relaying p99 of a lone
            # caller was 1.92-1.99x the fsync floor in three runs, against
            # 2.06-2.38x without (bench/results.md).
            os.sched_yield()

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close()
        self.socks.clear()
        self.channel.close()
