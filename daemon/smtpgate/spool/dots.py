"""Which messages' final dot may have reached the upstream: a record that
outlives the delivery process, read at the next start.

Once the final dot of a message is written to the upstream, the upstream
may have the message, whatever becomes of its reply. If smtpgate dies
before that attempt's outcome is committed, the message is found in
'sending' at the next start and sent again; the record here is how that
start knows to flag it `possible_duplicate` (and to count the attempt)
rather than take it for a message never tried.

- The delivery process (`DotLog`) appends the message's id to a file of the
  spool directory with one write() just before the write that carries the
  dot, and no fsync: the bytes are in the kernel once write() returns, so
  they survive the death of any smtpgate process (a crash, `kill -9`,
  systemd's SIGKILL after a stop timeout), which is what the crash soak
  showed to matter. A power cut may lose them, as it may lose the relaxed
  commits of attempts (spool/writer.py, RELAXED_OPS): the message is then
  sent again unflagged, the at-least-once promise still kept. A spool
  operation instead would have to be committed before the dot goes out:
  a round trip through two pipes and a commit inside every transaction.
- Two files, written in turn, keep the record small: the delivery process
  empties the other file and moves to it once the current one holds
  ROTATE_AT bytes and every id in the other has been settled (its attempt
  committed or released). About 2,400 ids fill a file; at 4,000 messages/s
  that is a switch every 0.6 s, long after the last record of the older
  file was committed (a few ms).
- The spool writer reads both files when it opens the spool (`read_dots`),
  flags the messages found in 'sending' among them, commits, then empties
  the files (`clear_dots`) before any delivery starts.
"""

from __future__ import annotations

import os

from smtpgate.spool.schema import DOT_FILES

ROTATE_AT = 64 * 1024  # bytes in a file before the record moves to the other


class DotLog:
    """The delivery process's side: `record(id)` before the final dot,
    `settled(id)` once that attempt's outcome is committed (or released)."""

    def __init__(self, path_dir: str):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        self._fds = [os.open(os.path.join(path_dir, name), flags, 0o600) for name in DOT_FILES]
        self._sizes = [os.fstat(fd).st_size for fd in self._fds]
        self._current = 0
        self._unsettled = [0, 0]  # ids written to each file, not yet settled
        self._file_of: dict[str, int] = {}

    def record(self, msg_id: str) -> None:
        """Note that `msg_id`'s final dot is about to go out (one write())."""
        line = f"{msg_id}\n".encode("ascii")
        current = self._current
        os.write(self._fds[current], line)
        self._sizes[current] += len(line)
        self._unsettled[current] += 1
        self._file_of[msg_id] = current
        other = 1 - current
        if self._sizes[current] >= ROTATE_AT and not self._unsettled[other]:
            os.ftruncate(self._fds[other], 0)
            self._sizes[other] = 0
            self._current = other

    def settled(self, msg_id: str) -> None:
        """The attempt of `msg_id` is in the spool: its record may go."""
        where = self._file_of.pop(msg_id, None)
        if where is not None:
            self._unsettled[where] -= 1

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


def read_dots(path_dir: str) -> set[str]:
    """The ids recorded in the spool directory's dot files (none if absent)."""
    ids: set[str] = set()
    for name in DOT_FILES:
        try:
            with open(os.path.join(path_dir, name), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue
        # A line a power cut left half-written names no message: only
        # whole lines count.
        ids.update(line.decode("ascii", "replace") for line in data.split(b"\n")[:-1] if line)
    return ids


def clear_dots(path_dir: str) -> None:
    """Empty the dot files (after the ids read from them are committed)."""
    for name in DOT_FILES:
        path = os.path.join(path_dir, name)
        if os.path.exists(path):
            os.truncate(path, 0)
