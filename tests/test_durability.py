""""OK means on disk", shown from outside: the daemon as a subprocess, real
sockets, the kernel's record of its system calls, and its processes killed.

- The fsync witness: under strace, every `OK <id>` written to a caller's
  socket comes after an fsync of the spool that began once the message was
  written to the WAL, and concurrent SENDs share those fsyncs.
- Group commit over sockets: STATS `spool.commits` against `spool.operations`.
- Crashes: kill -9 of the whole process group (daemon, smtpgate-spool,
  smtpgate-relay), of the spool writer alone, of delivery alone, while 8
  connections send. After a restart every acknowledged message reaches the
  upstream and WAIT says sent. Delivery is at-least-once: a message that
  was on the wire when delivery died is sent again, and such duplicates
  are counted, not failed on.

Black-box on purpose: processes are found by name, not by module.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import threading
import time
from collections import Counter

import pytest

from strace_witness import Trace, have_strace, strace_command
from support import children_of, read_lines
from test_daemon import SIMPLE, ok_payload, send_line

CALLERS = 8
# The processes a kill can hit, and how the daemon must end for each: the
# whole group dies by the signal; a lost writer stops the daemon with 73
# (EX_CANTCREAT), a lost delivery process with 70 (EX_SOFTWARE), so that the
# service manager starts a fresh one.
TARGETS = {"group": -signal.SIGKILL, "writer": 73, "relay": 70}
CHILD_NAMES = {"writer": "smtpgate-spool", "relay": "smtpgate-relay"}
LOGGED = {"writer": "spool_failed", "relay": "delivery_process_lost"}  # why it stopped


class Callers:
    """`count` callers, each on a connection of its own sending SENDs one at a
    time (the next once the reply is read), every subject unique, until
    stopped, refused or cut off. `acknowledged`: (subject, id) of every OK."""

    def __init__(self, daemon, tag: str, count: int = CALLERS, per_caller: int = 100_000):
        self.daemon = daemon
        self.tag = tag
        self.per_caller = per_caller
        self.acknowledged: list[tuple[str, str]] = []
        self.refused: list[str] = []  # a reply other than OK ends its caller
        self.cond = threading.Condition()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._call, args=(n,), daemon=True) for n in range(count)]

    def __enter__(self) -> "Callers":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(30)
        assert not any(t.is_alive() for t in self.threads), "a caller hangs"

    def _call(self, n: int) -> None:
        try:
            with self.daemon.connect() as sock, sock.makefile("rb") as replies:
                for i in range(self.per_caller):
                    if self.stop.is_set():
                        return
                    subject = f"{self.tag}-{n}-{i}"
                    sock.sendall(send_line(dict(SIMPLE, subject=subject)).encode() + b"\n")
                    reply = replies.readline().decode()
                    if not reply.endswith("\r\n"):
                        return  # the daemon is gone
                    reply = reply[:-2]
                    with self.cond:
                        if not reply.startswith("OK "):
                            self.refused.append(reply)
                            return
                        self.acknowledged.append((subject, reply[3:]))
                        self.cond.notify_all()
        except OSError:  # reset or closed by a dying daemon: what the test does to it
            return

    def wait_for(self, count: int, timeout: float = 30.0) -> bool:
        """Block until `count` OKs arrived in all (bounded); False if they did not."""
        with self.cond:
            return self.cond.wait_for(lambda: len(self.acknowledged) >= count, timeout)


def stats(daemon) -> dict:
    return json.loads(ok_payload(daemon.request("STATS")))


# -- the fsync witness -------------------------------------------------------

@pytest.mark.skipif(not have_strace(), reason="strace is not installed (tests/setup.sh installs it)")
def test_every_ok_follows_an_fsync_of_its_write_and_concurrent_sends_share_them(make_daemon, tmp_path):
    daemon = make_daemon(start=False, hold=True)
    trace_path = tmp_path / "strace.txt"
    daemon.start(prefix=strace_command(trace_path))
    with Callers(daemon, "w", count=16, per_caller=15) as callers:
        assert callers.wait_for(16 * 15)
    (serve_pid,) = children_of(daemon.proc.pid)  # strace's one child
    os.kill(serve_pid, signal.SIGTERM)
    assert daemon.proc.wait(60) == 0  # strace ends with the daemon, having written it all

    trace = Trace.read(trace_path)
    acknowledged = {msg_id for _, msg_id in callers.acknowledged}
    assert len(acknowledged) == 16 * 15 and not callers.refused
    seen = trace.oks()
    assert acknowledged <= seen.keys(), f"strace missed {len(acknowledged - seen.keys())} OKs"
    broken = trace.broken_promises()
    assert not broken, f"{len(broken)} of {len(seen)} OKs before their fsync:\n" + "\n".join(broken[:5])
    # One SEND in flight per connection: each OK is written by the spool's
    # writer itself, the process that fsyncs (spool/lent.py).
    senders = {seen[msg_id].pid for msg_id in acknowledged}
    assert len(senders) == 1 and senders <= {call.pid for call in trace.flushes()}, senders
    # Group commit: 16 callers waiting at once are made durable by shared
    # fsyncs. One fsync per SEND would be 240; this allows half of that
    # (about 45 are measured).
    flushes = len(trace.flushes())
    assert flushes <= len(acknowledged) // 2, f"{flushes} fsyncs for {len(acknowledged)} SENDs"


# -- group commit over sockets -------------------------------------------------

def test_concurrent_callers_share_commits(make_daemon):
    daemon = make_daemon(hold=True)
    before = stats(daemon)["spool"]
    with Callers(daemon, "g", count=16, per_caller=20) as callers:
        assert callers.wait_for(16 * 20)
    spool = stats(daemon)["spool"]
    operations = spool["operations"] - before["operations"]
    commits = spool["commits"] - before["commits"]
    assert operations >= 16 * 20
    # A commit per operation would be `operations` commits: batches of two
    # on average at the least, with 16 callers waiting at once.
    assert commits <= operations // 2, spool


# -- crashes -----------------------------------------------------------------

def kill_mid_stream(daemon, target: str, rng: random.Random, tag: str) -> list[tuple[str, str]]:
    """Start the daemon (in a process group of its own), let CALLERS callers
    send, kill `target` with SIGKILL after a random number of OKs, wait for
    the daemon to end as it must. Returns what was acknowledged."""
    daemon.start(start_new_session=True)
    logged = len(daemon.log_lines())
    with Callers(daemon, tag) as callers:
        assert callers.wait_for(rng.randint(20, 300)), "no OKs to begin with"
        if target == "group":
            os.killpg(daemon.proc.pid, signal.SIGKILL)
        else:
            os.kill(daemon.child_pid(CHILD_NAMES[target]), signal.SIGKILL)
        status = daemon.proc.wait(60)
    daemon.stop()  # closes its log
    assert status == TARGETS[target], f"daemon ended with {status} after kill -9 of {target}"
    if target in LOGGED:
        since_start = daemon.log_lines()[logged:]
        assert any(line.get("event") == LOGGED[target] for line in since_start), since_start[-8:]
    # A SEND the dying daemon could not store gets an error, never an OK.
    assert not [r for r in callers.refused if not r.startswith("ERR INTERNAL ")], callers.refused
    return callers.acknowledged


_SUBJECT = re.compile(rb"^Subject: ([^\r\n]*)", re.MULTILINE)


def pending(daemon) -> int:
    """Messages the daemon still has to deliver (queued, being sent, deferred)."""
    states = stats(daemon)["states"]
    return states["queued"] + states["sending"] + states["deferred"]


def wait_for_subjects(daemon, upstream, wanted: set[str], timeout: float = 120.0) -> Counter:
    """How often each subject reached the upstream, once all of `wanted` did,
    or the daemon has nothing left to deliver (what is missing then is lost),
    or `timeout` passed."""
    handler = upstream.handler
    seen: Counter = Counter()
    parsed = 0
    deadline = time.monotonic() + timeout
    while not wanted <= seen.keys() and time.monotonic() < deadline:
        # Read before looking: a message marked sent had reached the upstream.
        idle = pending(daemon) == 0
        with handler.cond:
            new = handler.messages[parsed:]
        parsed += len(new)
        seen.update(_SUBJECT.search(m.data).group(1).decode() for m in new)
        if idle:
            break
        with handler.cond:
            handler.cond.wait_for(lambda parsed=parsed: len(handler.messages) > parsed, 0.2)
    return seen


def every_acknowledged_message_is_sent(daemon, upstream, acknowledged: list[tuple[str, str]]) -> int:
    """With the daemon running again: every acknowledged message reaches the
    upstream and WAIT says sent. Returns the number of duplicates."""
    seen = wait_for_subjects(daemon, upstream, {subject for subject, _ in acknowledged})
    missing = [subject for subject, _ in acknowledged if subject not in seen]
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged messages lost: {missing[:5]}"
    with daemon.connect(timeout=60) as sock:
        sock.sendall(b"".join(f"WAIT {msg_id} 30\n".encode() for _, msg_id in acknowledged))
        replies = read_lines(sock, len(acknowledged))
    states = Counter(json.loads(ok_payload(r))["state"] for r in replies)
    assert states == {"sent": len(acknowledged)}, states
    return sum(n - 1 for n in seen.values())


def kill_cycles(make_daemon, upstream, targets: list[str], seed: int) -> int:
    """kill_mid_stream once per target, restarting on the same spool each
    time, then check every acknowledged message; returns the duplicates."""
    rng = random.Random(seed)
    daemon = make_daemon(start=False)
    acknowledged = []
    for cycle, target in enumerate(targets):
        acknowledged += kill_mid_stream(daemon, target, rng, f"c{cycle}")
    daemon.start()
    duplicates = every_acknowledged_message_is_sent(daemon, upstream, acknowledged)
    print(f"{len(targets)} kills, {len(acknowledged)} acknowledged, {duplicates} delivered twice")
    return duplicates


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_kill_9_mid_stream_loses_nothing_acknowledged(make_daemon, upstream, target):
    kill_cycles(make_daemon, upstream, [target] * 3, seed=sorted(TARGETS).index(target))


def test_repeated_kill_9_of_any_process_loses_nothing(make_daemon, upstream):
    rng = random.Random(14)
    kill_cycles(make_daemon, upstream, [rng.choice(sorted(TARGETS)) for _ in range(20)], seed=14)


def test_the_children_of_a_killed_daemon_leave(make_daemon):
    # kill -9 of the daemon alone: its writer finishes what it read and
    # delivery stops, both because their pipes end; nothing is left running.
    daemon = make_daemon(upstream=["127.0.0.1:9"], retry_base=60.0)
    children = [daemon.child_pid(name) for name in CHILD_NAMES.values()]
    daemon.kill()
    deadline = time.monotonic() + 20
    while any(_running(pid) for pid in children):
        assert time.monotonic() < deadline, "a child of the killed daemon is still running"
        time.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
