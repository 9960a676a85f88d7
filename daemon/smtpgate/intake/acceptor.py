"""Accepting a door's connections, with its limits applied before anything
is built for them.

asyncio's servers accept by themselves; the doors accept here instead:
- the connection caps (limits.Gate) are checked on the accepted socket and
  a refused peer gets its one line (`ERR BUSY ...`, `421 ...`) and the
  close, before a transport and a protocol exist;
- running out of file descriptors is answered, not logged per attempt.
  asyncio's accept loop calls the loop's exception handler (a traceback)
  for every failed accept, up to its backlog per wake-up (issue 10 counted
  13,802 in 5 s), and leaves the connections in the kernel's queue with no
  answer. Here one spare descriptor is kept: on EMFILE or ENFILE it is
  closed, the waiting connection accepted, refused with its line and
  closed, and the spare opened again (the trick of libev and libuv). Only
  if that fails does accepting pause for PAUSE seconds. One log line per
  door a minute, with the count.

The `Acceptor` has the parts of asyncio.Server the daemon and the tests
use: `sockets`, `start_serving()`, `close()`, `wait_closed()`.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable

from smtpgate.intake.limits import Gate, Refused, Slot
from smtpgate.intake.peer import Peer, peer_of_socket

# The listen() queue: as deep as the kernel allows (net.core.somaxconn caps
# it). A burst of PHP workers larger than the queue would otherwise have its
# surplus SYNs dropped and retried 1, 3, 7 s later, behind connections that
# came after them.
BACKLOG = socket.SOMAXCONN
ACCEPT_BATCH = 100  # connections accepted per wake-up at most, as asyncio does
PAUSE = 1.0         # seconds without accepting when no descriptor is left at all

_spare: int | None = None  # the process's spare descriptor (one for every door)


def _open_spare() -> None:
    global _spare
    if _spare is None:
        try:
            _spare = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            pass  # none free right now; tried again after the next refusal


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bound, listening, non-blocking TCP sockets for every address of `host`
    (as loop.create_server binds them: SO_REUSEADDR, IPv6 sockets v6-only)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"error while attempting to bind on address "
                                         f"{address!r}: {exc.strerror.lower()}") from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    for sock in socks:
        sock.listen(BACKLOG)
        sock.setblocking(False)
    return socks


def unix_listening_socket(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
    except BaseException:
        sock.close()
        raise
    sock.listen(BACKLOG)
    sock.setblocking(False)
    return sock


class Acceptor:
    """Accepts on `sockets` for one door. `make_protocol(peer, slot)` builds
    the protocol of an admitted connection (it calls slot.release() when
    the connection is lost); `refusal(reason)` is the bytes a refused peer
    gets before the close."""

    def __init__(self, sockets: list[socket.socket], gate: Gate,
                 make_protocol: Callable[[Peer, Slot], asyncio.Protocol],
                 refusal: Callable[[str], bytes], log):
        self.sockets = list(sockets)
        self.gate = gate
        self.make_protocol = make_protocol
        self.refusal = refusal
        self.log = log
        self.loop = asyncio.get_running_loop()
        self._serving = False
        self._connecting: set[asyncio.Task] = set()
        for sock in self.sockets:
            sock.setblocking(False)
        _open_spare()

    async def start_serving(self) -> None:
        if not self._serving:
            self._serving = True
            for sock in self.sockets:
                self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop accepting and close the listening sockets (open connections stay)."""
        if self._serving:
            for sock in self.sockets:
                self.loop.remove_reader(sock.fileno())
        self._serving = False
        for sock in self.sockets:
            sock.close()

    async def wait_closed(self) -> None:
        if self._connecting:
            await asyncio.wait(list(self._connecting))

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_with_spare(sock, exc):
                    continue
                self._pause(sock, exc)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        peer = peer_of_socket(conn)
        try:
            slot = self.gate.admit(peer)
        except Refused as why:
            self._refuse(conn, str(why))
            return
        task = self.loop.create_task(self._connect(conn, self.make_protocol(peer, slot), slot))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    async def _connect(self, conn: socket.socket, protocol: asyncio.Protocol, slot: Slot) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except BaseException:
            # The protocol never got its connection (the loop is closing):
            # give the place back, as its connection_lost would have.
            slot.release()
            conn.close()

    def _refuse(self, conn: socket.socket, why: str) -> None:
        """Say why in one line, then close."""
        try:
            conn.send(self.refusal(why))
            conn.shutdown(socket.SHUT_WR)
            # Unread input makes close() send a reset, which may overtake
            # the line on its way: read what has arrived first.
            conn.recv(65536)
        except OSError:
            pass
        conn.close()

    def _refuse_with_spare(self, sock: socket.socket, exc: OSError) -> bool:
        """Out of descriptors: free the spare, take the connection, refuse it,
        open the spare again. False if there was no spare or nothing to take."""
        global _spare
        if _spare is None:
            return False
        os.close(_spare)
        _spare = None
        try:
            conn, _ = sock.accept()
        except OSError:
            conn = None
        if conn is not None:
            self.gate.limits.counters["refused_out_of_descriptors"] += 1
            self._note_out_of_descriptors(exc)
            self._refuse(conn, "out of file descriptors")
        _open_spare()
        return conn is not None

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        """Stop accepting on `sock` for PAUSE seconds (the kernel keeps the queue)."""
        self._note_out_of_descriptors(exc)
        self.loop.remove_reader(sock.fileno())

        def resume() -> None:
            if self._serving and sock.fileno() >= 0:
                self.loop.add_reader(sock.fileno(), self._accept, sock)

        self.loop.call_later(PAUSE, resume)

    def _note_out_of_descriptors(self, exc: OSError) -> None:
        if count := self.gate.limits.throttle(("accept", self.gate.door, exc.errno)):
            self.log.error("accept_failed", door=self.gate.door, error=exc.strerror or str(exc),
                           times=count, hint="raise LimitNOFILE= (ulimit -n) or lower max_connections")
