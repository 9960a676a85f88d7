"""The spool opened directly, for an operator's tools (`smtpgate queue`):
whether or not the daemon runs, SQLite in WAL mode lets them read beside
it, and write between its writer's transactions.

After a change, `notify_daemon()` sends SIGUSR1 to the daemon that holds
the spool, which recounts its queue, looks for due messages at once and
probes a down upstream at once.

The upstreams' health is what the running daemon's delivery last recorded
in the spool (queries.upstreams): read only while a daemon holds the spool,
since a daemon that was killed leaves its last record behind.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sqlite3
import time

from smtpgate.spool import queries
from smtpgate.spool.errors import SpoolError
from smtpgate.spool.schema import DB_FILE, LOCK_FILE, SCHEMA_VERSION

BUSY_TIMEOUT = 30.0  # seconds to wait for the daemon's writer between its commits


class SpoolAdmin:
    """A connection to the spool's database in `path_dir`, read-only unless
    `write`. Raises SpoolError if there is no spool there."""

    def __init__(self, path_dir: str, *, write: bool = False):
        self.path_dir = path_dir
        db = os.path.join(path_dir, DB_FILE)
        if not os.path.exists(db):
            raise SpoolError(f"no spool at {path_dir}")
        mode = "rw" if write else "ro"
        self._conn = sqlite3.connect(f"file:{db}?mode={mode}", uri=True, isolation_level=None,
                                     timeout=BUSY_TIMEOUT)
        # Only the daemon's writer upgrades a spool (schema.migrate): its
        # queries do not fit another version's tables.
        row = self._conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        found = int(row[0]) if row else 0
        if found != SCHEMA_VERSION:
            self._conn.close()
            hint = "start the daemon once to upgrade it" if found < SCHEMA_VERSION else "a newer smtpgate wrote it"
            raise SpoolError(f"the spool at {path_dir} has schema {found}, this smtpgate reads "
                             f"{SCHEMA_VERSION}: {hint}")
        # Without a daemon, the health it recorded is stale.
        self._live = self.daemon_pid() is not None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> SpoolAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def entries(self, *, msg_id: str | None = None, include_final: bool = False) -> list[dict]:
        """The messages as `queue list|show` print them (queries.queue_entries)."""
        return queries.queue_entries(self._conn, time.time(), msg_id=msg_id, include_final=include_final,
                                     live=self._live)

    def upstreams(self) -> list[dict] | None:
        """Each upstream's health as the running daemon sees it
        (queries.upstreams); None when no daemon runs."""
        return queries.upstreams(self._conn, time.time()) if self._live else None

    def retry(self, msg_id: str | None) -> int:
        """Make a deferred message (every one when msg_id is None) due now;
        returns how many (queries.retry)."""
        return self._write(queries.retry, time.time(), msg_id)

    def delete(self, msg_id: str) -> str | None:
        """Remove a message; returns the state it had, None if there was none."""
        deleted = self._write(queries.delete, msg_id)
        return None if deleted is None else deleted.state

    def _write(self, change, *args):
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            result = change(self._conn, *args)
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")
        return result

    def daemon_pid(self) -> int | None:
        """The pid of the daemon that holds the spool, None if none does.

        The lock file keeps the pid of the last daemon after it stopped, and
        by now that pid may be another process's: the pid counts only while
        the file is flock()ed."""
        try:
            with open(os.path.join(self.path_dir, LOCK_FILE)) as fh:
                try:
                    fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    return None  # nobody holds it (our probe ends when the file closes)
                except BlockingIOError:
                    return int(fh.read().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def notify_daemon(self) -> bool:
        """SIGUSR1 to the daemon that holds the spool, if one does; whether
        one was told. A daemon that is not running sees the change when it
        starts."""
        pid = self.daemon_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            return False
        return True
