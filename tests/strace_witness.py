"""What the kernel saw: the system calls of a process tree, from `strace -f`,
to prove "OK <id> only after fsync" from outside the daemon.

Run a command under `strace_command(trace_path)` + argv, then
`Trace.read(trace_path)`. strace stops a traced process at each system
call's entry and exit and prints the event before letting it go on, so
with -f the order of the lines is the order in which events happened
across the processes: a call that begins on a line after another call's
return line began after that call returned. A call interrupted by another
process's events is printed in two lines,

    12741 fdatasync(7</spool/spool.sqlite3-wal> <unfinished ...>
    12737 sendto(12<socket:[26838]>, "OK 01M95...\\r\\n", 31, 0, NULL, 0) = 31
    12741 <... fdatasync resumed>)          = 0

and the `resumed` line is its return (here the OK went out while the
fdatasync was still running: an OK before its fsync).

-y prints the file behind each descriptor, which tells the spool's files
from a caller's socket or a pipe between the daemon's processes.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass

# What a writer of the spool and a sender of replies can call: the flushes,
# the writes (SQLite uses pwrite64; write, writev in case another build
# does not), and every way asyncio sends on a socket.
CALLS = ("fdatasync", "fsync", "pwrite64", "pwritev", "write", "writev", "sendto", "sendmsg")
FLUSHES = ("fdatasync", "fsync")
SOCKET_SENDS = ("write", "writev", "sendto", "sendmsg")
FILE_WRITES = ("pwrite64", "pwritev", "write", "writev")
WAL = "spool.sqlite3-wal"

ULID = "[0-9A-HJKMNP-TV-Z]{26}"
OK_REPLY = re.compile(r"OK (" + ULID + r")\\r\\n")

_LINE = re.compile(r"^(\d+) +(.*)$")
_WHOLE = re.compile(r"^(\w+)\((.*)\) += (.*)$")
_ENTRY = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>.*\) += (.*)$")
_FD = re.compile(r"^\d+<([^>]*)>")


def strace_command(trace_path) -> list[str]:
    """The argv prefix that runs a command under strace, writing to trace_path.
    -s: a WAL page (4 KiB) is printed whole, so a message's id is found in it."""
    return ["strace", "-f", "-qq", "-y", "-s", "65536", "-o", str(trace_path),
            "-e", "trace=" + ",".join(CALLS)]


def have_strace() -> bool:
    return shutil.which("strace") is not None


@dataclass
class Call:
    pid: int
    name: str
    args: str  # as printed at entry: descriptor and buffers
    entry: int  # line number of its entry
    exit: int | None = None  # line number of its return; None if it never returned
    result: str | None = None

    @property
    def path(self) -> str:
        """The file behind the first argument (a descriptor), '' if none."""
        match = _FD.match(self.args)
        return match.group(1) if match else ""

    def on(self, *basenames: str) -> bool:
        return self.path.rsplit("/", 1)[-1] in basenames

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.split()[0] not in ("-1", "?")


class Trace:
    """The calls of one strace output file, in the order they began."""

    def __init__(self, calls: list[Call]):
        self.calls = calls

    @classmethod
    def read(cls, path) -> "Trace":
        calls: list[Call] = []
        pending: dict[int, Call] = {}
        with open(path, encoding="ascii", errors="replace") as lines:
            for number, line in enumerate(lines):
                match = _LINE.match(line.rstrip("\n"))
                if not match:
                    continue
                pid, rest = int(match.group(1)), match.group(2)
                if whole := _WHOLE.match(rest):
                    calls.append(Call(pid, whole.group(1), whole.group(2), number, number, whole.group(3)))
                elif entry := _ENTRY.match(rest):
                    call = Call(pid, entry.group(1), entry.group(2), number)
                    calls.append(call)
                    pending[pid] = call
                elif resumed := _RESUMED.match(rest):
                    call = pending.pop(pid, None)
                    if call is not None and call.name == resumed.group(1):
                        call.exit, call.result = number, resumed.group(2)
        return cls(calls)

    def flushes(self) -> list[Call]:
        """Successful fsync/fdatasync of the spool's WAL: what makes a
        commit durable. (The database file is synced by checkpoints, which
        run on a thread of their own beside the commits.)"""
        return [c for c in self.calls if c.name in FLUSHES and c.on(WAL) and c.ok]

    def oks(self) -> dict[str, Call]:
        """msg id -> the call that sent its `OK <id>` to a caller's socket."""
        sent: dict[str, Call] = {}
        for call in self.calls:
            if call.name in SOCKET_SENDS and call.path.startswith("socket:"):
                for msg_id in OK_REPLY.findall(call.args):
                    sent.setdefault(msg_id, call)
        return sent

    def first_wal_writes(self, ids) -> dict[str, Call]:
        """msg id -> the first write to the WAL whose bytes hold the id."""
        wanted, found = set(ids), {}
        for call in self.calls:
            if not wanted:
                break
            if call.name not in FILE_WRITES or not call.on(WAL):
                continue
            # Ids made within the same second share their first 8 characters
            # (the top 40 bits of the millisecond time): a few C-speed finds
            # per page instead of one per id.
            for prefix in {msg_id[:8] for msg_id in wanted}:
                pos = call.args.find(prefix)
                while pos != -1:
                    msg_id = call.args[pos:pos + 26]
                    if msg_id in wanted:
                        found[msg_id] = call
                        wanted.discard(msg_id)
                    pos = call.args.find(prefix, pos + 1)
        return found

    def broken_promises(self) -> list[str]:
        """Every OK sent without this before it: the message's WAL write
        returned, then an fsync/fdatasync of the WAL began and returned.
        One line per broken promise."""
        oks = self.oks()
        writes = self.first_wal_writes(oks)
        flushes = self.flushes()
        broken = []
        for msg_id, ok in oks.items():
            write = writes.get(msg_id)
            if write is None or write.exit is None or write.exit > ok.entry:
                broken.append(f"OK {msg_id} (line {ok.entry + 1}) before any write of it to the WAL")
            elif not any(write.exit < f.entry and f.exit < ok.entry for f in flushes):
                broken.append(f"OK {msg_id} (line {ok.entry + 1}) without an fsync between its WAL write "
                              f"(line {write.entry + 1}) and the reply")
        return broken
