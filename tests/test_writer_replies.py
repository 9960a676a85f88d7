"""The spool's writer answering SENDs on the callers' connections itself
(spool/lent.py): the replies stay whole and in request order whatever the
caller does, and a connection lent to the writer still ends when the
daemon ends it.

The proof that these OKs still follow their fsync is the strace witness of
test_durability.py, which also checks that they come from the writer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import threading

import pytest

from support import read_line, read_lines, wait_until

SIMPLE = {"from": "app@example.com", "to": "kelly@example.org", "subject": "hi", "text": "hello"}
OK_ID = re.compile(r"OK [0-9A-HJKMNP-TV-Z]{26}")


def send_line(message: dict) -> bytes:
    return ("SEND " + json.dumps(message, separators=(",", ":")) + "\n").encode()


def stats(daemon) -> dict:
    return json.loads(daemon.request("STATS")[3:])


def sockets_of(pid: int) -> int:
    """The sockets a process holds: the writer's are its lending channel and
    the callers' connections lent to it."""
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return count


def test_a_caller_that_does_not_read_gets_every_reply_whole_and_in_order(make_daemon):
    """SENDs pipelined by a caller that reads nothing until thousands are
    stored: its socket's buffers fill while the writer answers, so the
    kernel refuses or cuts short some OKs and the daemon writes them or
    their rest. Every 97th SEND has no recipient: its ERR, which only the
    daemon writes, must arrive in its place. Each reply arrives whole,
    once, in order; STATUS knows each id."""
    daemon = make_daemon(hold=True)
    count = 8000
    bad = {i for i in range(count) if i % 97 == 50}
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.settimeout(60)
    sock.connect(daemon.tcp)
    requests = b"".join(send_line({"from": "app@example.com", "subject": "no recipient"} if i in bad
                                  else dict(SIMPLE, subject=f"n{i}")) for i in range(count))
    sender = threading.Thread(target=sock.sendall, args=(requests,))
    with sock:
        sender.start()
        # 1,500 OKs are 46 KB: past the window and the kernel's first send
        # buffer (16 KB) by far.
        wait_until(lambda: stats(daemon)["states"]["queued"] >= 1500, what="1,500 SENDs stored")
        reader = sock.makefile("rb")
        replies = [reader.readline().decode() for _ in range(count)]
        sender.join(60)
        assert not sender.is_alive()

    def in_place(i: int, reply: str) -> bool:
        if not reply.endswith("\r\n"):
            return False
        return reply.startswith("ERR BAD_REQUEST ") if i in bad else OK_ID.fullmatch(reply[:-2]) is not None

    wrong = [(i, r) for i, r in enumerate(replies) if not in_place(i, r)]
    assert not wrong, f"{len(wrong)} replies out of place or torn: {wrong[:3]}"
    ids = [r[3:-2] for i, r in enumerate(replies) if i not in bad]
    assert len(set(ids)) == count - len(bad)
    assert stats(daemon)["states"]["queued"] == count - len(bad)
    with daemon.connect() as check:
        check.sendall(b"".join(f"STATUS {i}\n".encode() for i in (ids[0], ids[len(ids) // 2], ids[-1])))
        assert all(line.startswith("OK {") for line in read_lines(check, 3))


def test_quit_on_a_lent_connection_ends_it(make_daemon):
    """After SENDs the writer answered, QUIT still gives the caller its EOF:
    the writer lets go of its copy of the connection when the daemon does."""
    daemon = make_daemon(hold=True)
    writer = daemon.child_pid("smtpgate-spool")
    before = sockets_of(writer)
    with daemon.connect() as sock:
        for i in range(3):
            sock.sendall(send_line(dict(SIMPLE, subject=f"q{i}")))
            assert OK_ID.fullmatch(read_line(sock))
        assert sockets_of(writer) == before + 1  # lent: the writer holds a copy
        sock.sendall(b"QUIT\n")
        assert read_line(sock) == "OK BYE"
        assert sock.recv(1) == b""  # EOF, not a timeout
    wait_until(lambda: sockets_of(writer) == before, what="the writer's copy closed")


def test_a_caller_that_hangs_up_before_its_ok_leaves_nothing_open(make_daemon):
    """Callers that send and close at once (PHP's fsockopen, fwrite,
    fclose): their messages are stored, and the writer keeps no copy of
    their connections (its descriptors go back to what they were)."""
    daemon = make_daemon(hold=True)
    writer = daemon.child_pid("smtpgate-spool")
    before = len(os.listdir(f"/proc/{writer}/fd"))
    for i in range(50):
        with daemon.connect() as sock:
            sock.sendall(send_line(dict(SIMPLE, subject=f"h{i}")))
    with daemon.connect() as sock:
        sock.sendall(send_line(dict(SIMPLE, subject="last")))
        assert OK_ID.fullmatch(read_line(sock))
        assert stats(daemon)["states"]["queued"] == 51
    wait_until(lambda: len(os.listdir(f"/proc/{writer}/fd")) == before, what="the writer's copies closed")


def test_a_writer_out_of_descriptors_leaves_the_answers_to_the_daemon(make_daemon):
    """The writer's descriptor limit lowered under it (prlimit): the
    connections it cannot take are answered by the daemon, every SEND gets
    its OK, and the writer keeps committing."""
    daemon = make_daemon(hold=True)
    writer = daemon.child_pid("smtpgate-spool")
    soft, hard = resource.prlimit(writer, resource.RLIMIT_NOFILE)
    in_use = len(os.listdir(f"/proc/{writer}/fd"))
    resource.prlimit(writer, resource.RLIMIT_NOFILE, (in_use + 2, hard))
    socks = []
    lent_before = sockets_of(writer)
    try:
        for i in range(12):
            sock = daemon.connect()
            socks.append(sock)
            for j in range(2):
                sock.sendall(send_line(dict(SIMPLE, subject=f"d{i}-{j}")))
                assert OK_ID.fullmatch(read_line(sock))
        assert sockets_of(writer) - lent_before < 12  # it took what it could: the others, the daemon answers
    finally:
        for sock in socks:
            sock.close()
        resource.prlimit(writer, resource.RLIMIT_NOFILE, (soft, hard))
    assert stats(daemon)["states"]["queued"] == 24


# -- the writer's side, on real socket pairs ------------------------------------

class ShortSocket(socket.socket):
    """A real socket whose first send stops after 10 bytes: the kernel's
    short write, which a loopback socket never makes for a reply this small."""

    short = True

    def send(self, data, flags=0):
        if self.short:
            self.short = False
            data = data[:10]
        return super().send(data, flags)


def lent_pair():
    """A Lent whose channel is a real SOCK_SEQPACKET pair, and a lend() of a
    connection (a real stream socket pair: the writer's end, the caller's)."""
    from smtpgate.spool.lent import Lent, lend

    daemon_end, writer_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    daemon_end.setblocking(False)
    ours, caller = socket.socketpair()
    ours.setblocking(False)
    lent = Lent(writer_end)
    assert lend(daemon_end, 7, ours.fileno())
    ours.close()  # the writer's copy keeps the connection open
    return lent, daemon_end, caller


def enqueued(lent, calls):
    """Run Lent.answer on committed Enqueues: calls are (token, ReplyTo, id)."""
    from smtpgate.proc.calls import Call
    from smtpgate.spool.ops import Enqueue, Enqueued

    batch = [Call(token, Enqueue(1.0, b"{}", "a@b.c", ["d@e.f"], None, "x", 0, False, reply_to))
             for token, reply_to, _ in calls]
    results = {token: Enqueued(msg_id, False) for token, _, msg_id in calls}
    lent.answer(batch, results)
    return results


def test_the_writer_writes_in_order_and_stops_at_the_first_reply_it_could_not_finish():
    from smtpgate.spool.ops import ReplyTo

    lent, daemon_end, caller = lent_pair()
    a, b, c, d = ("0" * 25 + n for n in "ABCD")
    results = enqueued(lent, [(1, ReplyTo(7, 1, 0), a), (2, ReplyTo(7, 2, 1), b)])
    assert caller.recv(100) == f"OK {a}\r\nOK {b}\r\n".encode()
    assert [r.sent for r in results.values()] == [31, 31]
    # A short write: the rest of it and every reply after it are the daemon's.
    short = ShortSocket(fileno=os.dup(lent.socks[7].fileno()))
    lent.socks[7].close()
    lent.socks[7] = short
    results = enqueued(lent, [(3, ReplyTo(7, 3, 2), c), (4, ReplyTo(7, 4, 3), d)])
    assert [r.sent for r in results.values()] == [10, 0]
    assert caller.recv(100) == f"OK {c}"[:10].encode()
    # Once the daemon gives the connection back, the caller sees its end.
    lent.unlend(7)
    assert caller.recv(100) == b""
    lent.close()
    daemon_end.close()


def test_the_writer_skips_a_reply_whose_predecessor_it_did_not_write():
    from smtpgate.spool.ops import ReplyTo

    lent, daemon_end, caller = lent_pair()
    # seq 1 was refused (no result): 2, which must follow it, is left alone;
    # 3, sent after the daemon answered both (after=0), is written.
    results = enqueued(lent, [(2, ReplyTo(7, 2, 1), "0" * 25 + "B"), (3, ReplyTo(7, 3, 0), "0" * 25 + "C")])
    assert [r.sent for r in results.values()] == [0, 31]
    assert caller.recv(100) == b"OK " + b"0" * 25 + b"C\r\n"
    # An unknown connection (never lent, or lent when the writer had no
    # descriptor left): nothing written, nothing raised.
    results = enqueued(lent, [(4, ReplyTo(8, 1, 0), "0" * 25 + "D")])
    assert results[4].sent == 0
    lent.close()
    daemon_end.close()


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (tests/setup.sh installs it)")
def test_a_writer_killed_after_its_ok_leaves_the_caller_that_ok_alone(make_daemon, tmp_path):
    """The writer dies between the OK it wrote and the Committed it owes the
    daemon (strace kills it at that write). The daemon cannot know the OK
    went out: it cuts the connection rather than answer the same SEND with
    `ERR INTERNAL nothing stored`, which would make the caller send it again."""
    daemon = make_daemon(hold=True)
    writer = daemon.child_pid("smtpgate-spool")
    with daemon.connect() as sock:
        sock.sendall(send_line(dict(SIMPLE, subject="first")))
        assert OK_ID.fullmatch(read_line(sock))  # the connection is lent from here on
        tracer = subprocess.Popen(["strace", "-qq", "-o", str(tmp_path / "strace.txt"), "-p", str(writer),
                                   "-e", "trace=write", "-e", "inject=write:signal=SIGKILL"])
        try:
            wait_until(lambda: _traced(writer), what="strace attached to the writer")
            sock.sendall(send_line(dict(SIMPLE, subject="second")))
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(4096):
                    received += chunk
        finally:
            tracer.wait(30)
    assert b"ERR" not in received, received
    assert received == b"" or OK_ID.fullmatch(received.decode()[:-2]), received
    assert daemon.proc.wait(30) == 73  # the writer is gone: the daemon ends for its supervisor


def _traced(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        return any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in status)


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed (tests/setup.sh installs it)")
def test_figures_asked_for_after_an_ok_count_its_message(make_daemon, tmp_path):
    """The writer's Committed held back 0.3 s (strace delays its writes): the
    caller has its OK long before the daemon has read the commit. STATS,
    asked at once on another connection, still counts the message."""
    daemon = make_daemon(hold=True)
    writer = daemon.child_pid("smtpgate-spool")
    before = stats(daemon)
    tracer = subprocess.Popen(["strace", "-qq", "-o", str(tmp_path / "strace.txt"), "-p", str(writer),
                               "-e", "trace=write", "-e", "inject=write:delay_enter=300000"])
    try:
        wait_until(lambda: _traced(writer), what="strace attached to the writer")
        with daemon.connect() as sock:
            sock.sendall(send_line(dict(SIMPLE, subject="counted")))
            assert OK_ID.fullmatch(read_line(sock))
            after = stats(daemon)
    finally:
        tracer.terminate()
        tracer.wait(30)
    assert after["counters"]["accepted"] == before["counters"]["accepted"] + 1
    assert after["states"]["queued"] == before["states"]["queued"] + 1
