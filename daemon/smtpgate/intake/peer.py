"""Who is on the other end of a connection, as the kernel says.

For a Unix socket, the peer's uid, gid and pid from SO_PEERCRED: taken by
the kernel when the peer called connect(), so the peer cannot forge them
(socket(7), unix(7)). For TCP, its address; a TCP peer's uid is not known
to us (identd is no proof), so there it is None.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid (unix(7))


class Peer(NamedTuple):
    kind: str  # "unix" or "tcp"
    address: str  # "host:port", or the Unix socket's path ("" for an unnamed one)
    uid: int | None
    gid: int | None
    pid: int | None

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:uid={self.uid}" if self.uid is not None else "unix"
        return self.address


def peer_of(transport) -> Peer:
    """The peer of an asyncio transport's socket (a TCP or Unix stream)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:  # the peer is already gone
            pid = uid = gid = None
        return Peer("unix", str(sock.getsockname() or ""), uid, gid, pid)
    name = transport.get_extra_info("peername")
    address = f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name or "")
    return Peer("tcp", address, None, None, None)
