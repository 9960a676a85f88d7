"""`smtpgate queue list|show|retry|delete`: the queue tools (like mailq, postqueue, postsuper).

They work on the spool database directly, whether or not the daemon runs:
SQLite in WAL mode lets them read beside the daemon and write between its
transactions. After a change they send the running daemon (its pid is in the
spool's lock file) SIGUSR1, which makes it recount its queue and look for due
messages at once.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import sqlite3
import sys
import time
import tomllib

from smtpgate.config import DEFAULT_CONFIG_PATH, Config
from smtpgate.spool import queries
from smtpgate.spool.schema import DB_FILE, FINAL_STATES, LOCK_FILE, State


def _spool_dir(args) -> str:
    if args.spool:
        return args.spool
    path = args.config or (DEFAULT_CONFIG_PATH if os.path.exists(DEFAULT_CONFIG_PATH) else None)
    if path:
        # Only the spool key: a full load_config would also open the password
        # and token files, which the operator running the tool need not read.
        try:
            with open(path, "rb") as fh:
                spool = tomllib.load(fh).get("spool")
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SystemExit(f"smtpgate queue: cannot read {path}: {exc}")
        if spool is not None:
            return spool
    return os.environ.get("STATE_DIRECTORY", Config.spool)


def _connect(spool: str, write: bool) -> sqlite3.Connection:
    db = os.path.join(spool, DB_FILE)
    if not os.path.exists(db):
        raise SystemExit(f"smtpgate queue: no spool at {spool} (give --spool DIR or --config FILE)")
    mode = "rw" if write else "ro"
    conn = sqlite3.connect(f"file:{db}?mode={mode}", uri=True, isolation_level=None, timeout=30)
    return conn


def _notify_daemon(spool: str) -> None:
    """SIGUSR1 to the daemon that holds the spool, if one does.

    The lock file keeps the pid of the last daemon after it stopped, and by
    now that pid may be another process's, which SIGUSR1 would kill: the
    pid counts only while the file is flock()ed. A daemon that is not
    running sees the change when it starts."""
    try:
        with open(os.path.join(spool, LOCK_FILE)) as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return  # nobody holds it (our probe ends when the file closes)
            except BlockingIOError:
                pid = int(fh.read().strip() or 0)
        if pid:
            os.kill(pid, signal.SIGUSR1)
    except (OSError, ValueError):
        pass


def run_queue_command(args) -> int:
    spool = _spool_dir(args)
    command = args.queue_command
    if command in ("list", "show"):
        conn = _connect(spool, write=False)
        if command == "show":
            found = queries.queue_entries(conn, msg_id=args.id)
            if not found:
                print(f"smtpgate queue: no message {args.id}", file=sys.stderr)
                return 1
            print(json.dumps(found[0], ensure_ascii=False, indent=2))
            return 0
        rows = queries.queue_entries(conn, include_final=args.all)
        if args.json:
            print(json.dumps(rows, ensure_ascii=False))
            return 0
        for m in rows:
            pending = [r for r in m["recipients"] if r["state"] not in FINAL_STATES] or m["recipients"]
            when = m.get("next_attempt", m["updated"])
            print(f"{m['id']}  {m['state']:<8} {m['attempts']:>3}  {when}  {m['from']}")
            for r in pending:
                print(f"    {r['address']:<40} {r['state']:<8} {r['reply'] or ''}")
        print(f"-- {len(rows)} message{'s' if len(rows) != 1 else ''}")
        return 0

    conn = _connect(spool, write=True)
    conn.execute("BEGIN IMMEDIATE")
    if command == "retry":
        # Deferred recipients become due now; queued ones already are. Now,
        # not at 0: due times order the claims (a retried message queues
        # behind those due before it) and STATUS shows them.
        where, params = ("", ()) if args.all else ("AND id=?", (args.id,))
        changed = conn.execute(f"UPDATE messages SET next_attempt=? WHERE state=? {where}",
                               (time.time(), State.DEFERRED, *params)).rowcount
        conn.execute("COMMIT")
        print(f"{changed} message{'s' if changed != 1 else ''} due now")
        result = 0 if changed or args.all else 1
    else:  # delete
        row = conn.execute("SELECT state FROM messages WHERE id=?", (args.id,)).fetchone()
        if row is None:
            conn.execute("ROLLBACK")
            print(f"smtpgate queue: no message {args.id}", file=sys.stderr)
            return 1
        conn.execute("DELETE FROM recipients WHERE message_id=?", (args.id,))
        conn.execute("DELETE FROM idempotency WHERE message_id=?", (args.id,))
        conn.execute("DELETE FROM messages WHERE id=?", (args.id,))
        conn.execute("COMMIT")
        print(f"deleted {args.id} ({row[0]})")
        result = 0
    _notify_daemon(spool)
    return result
