"""Who is on the other end of a connection (both doors).

On the Unix socket the kernel tells us the peer's uid, gid and pid
(SO_PEERCRED, socket(7) and unix(7): the credentials of the process that
called connect(), fixed at that moment). On TCP all we know is the address.
The per-peer connection cap counts by `Peer.key`: the uid on the Unix socket,
the address on TCP (every local process that uses TCP loopback is the one
peer 127.0.0.1: the Unix socket is how local users are told apart).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Peer:
    kind: str                # "tcp" or "unix"
    address: str | None      # TCP: the client's IP address; Unix: None
    uid: int | None          # Unix: the peer process's credentials; TCP: None
    gid: int | None
    pid: int | None

    @property
    def key(self) -> tuple:
        """What the per-peer limits count by."""
        return (self.kind, self.address if self.kind == "tcp" else self.uid)

    def __str__(self) -> str:
        if self.kind == "tcp":
            return self.address or "tcp"
        return f"uid {self.uid} pid {self.pid}" if self.uid is not None else "unix"


def peer_of_socket(sock) -> Peer:
    """The peer of a connected socket (a socket.socket or asyncio's TransportSocket)."""
    if sock.family == socket.AF_UNIX:
        try:
            pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError:  # not Linux, or the peer is already gone
            return Peer("unix", None, None, None, None)
        return Peer("unix", None, uid, gid, pid)
    try:
        address = sock.getpeername()[0]
    except OSError:  # reset before we asked
        address = None
    return Peer("tcp", address, None, None, None)


def peer_of(transport) -> Peer:
    """The peer of an asyncio transport's connection."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return Peer("unix", None, None, None, None)
    return peer_of_socket(sock)
