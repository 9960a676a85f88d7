"""The spool's database: its tables, the states of a message, the files of
the spool directory.

A message is `queued` once accepted, `sending` while delivery holds it
(claimed), `deferred` when an attempt left recipients to try again, and
final once every recipient is: `sent`, or `failed` when one of them
failed. A recipient has the same states but `sending`. The states are plain
strings, not an Enum: they are stored as they are, and cross the pipes in
every answer of the writer.
"""

from __future__ import annotations


class State:
    QUEUED = "queued"
    SENDING = "sending"
    DEFERRED = "deferred"
    SENT = "sent"
    FAILED = "failed"


STATES = (State.QUEUED, State.SENDING, State.DEFERRED, State.SENT, State.FAILED)
FINAL_STATES = (State.SENT, State.FAILED)
DUE_STATES = (State.QUEUED, State.DEFERRED)  # tried once next_attempt has passed
UNFINISHED_STATES = (State.QUEUED, State.SENDING, State.DEFERRED)


def state_in(states: tuple[str, ...]) -> str:
    """The SQL condition `state IN ('a', 'b')` (the states are ours, never input)."""
    return "state IN (" + ", ".join(f"'{state}'" for state in states) + ")"


# SQLite uses a partial index only for a query whose WHERE holds the index's
# own condition: the indexes below and the queries that walk them share
# these very texts.
IS_DUE = state_in(DUE_STATES)
IS_FINAL = state_in(FINAL_STATES)
IS_UNFINISHED = state_in(UNFINISHED_STATES)

DB_FILE = "spool.sqlite3"
LOCK_FILE = "lock"  # flock()ed by the daemon (and its writer); holds the daemon's pid
# Which messages' final dot may have gone out (spool/dots.py): two files
# written in turn by the delivery process, read and emptied at open.
DOT_FILES = ("dots.0", "dots.1")

# The tables of the first version. A spool is created with these, then
# brought to SCHEMA_VERSION by MIGRATIONS, as an older spool is: one path.
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY,              -- ULID, time-ordered
    state TEXT NOT NULL,              -- queued|sending|deferred|sent|failed
    envelope_from TEXT NOT NULL,
    spec BLOB NOT NULL,               -- MessageSpec.to_json(), opaque here
    idempotency_key TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,            -- unix seconds
    updated REAL NOT NULL,
    next_attempt REAL NOT NULL,
    possible_duplicate INTEGER NOT NULL DEFAULT 0
);
-- Partial indexes: claim_due walks the pending messages in next_attempt
-- order (no sort of the whole backlog), purge walks the final ones by age.
CREATE INDEX IF NOT EXISTS messages_pending ON messages (next_attempt)
    WHERE {IS_DUE};
CREATE INDEX IF NOT EXISTS messages_final ON messages (updated)
    WHERE {IS_FINAL};
CREATE TABLE IF NOT EXISTS recipients (
    message_id TEXT NOT NULL,
    address TEXT NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,              -- queued|deferred|sent|failed
    reply TEXT,                       -- the upstream's last reply
    PRIMARY KEY (message_id, address)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency (created);
"""

# Ordered steps from one version to the next: (version reached, statements).
# The writer runs the missing ones at open, each in a transaction with the
# new version number, so a spool of any earlier version opens with its
# messages; a spool of a later version than this is refused.
MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (2, (
        # The health of each upstream as delivery last saw it (delivery/health.py):
        # what STATUS, STATS and `smtpgate queue` show while every upstream is down.
        """CREATE TABLE upstreams (
            position INTEGER PRIMARY KEY,  -- order in the configuration
            name TEXT NOT NULL,            -- HOST:PORT
            state TEXT NOT NULL,           -- unknown|up|down
            since REAL NOT NULL,           -- unix seconds: down (or up) since
            reason TEXT NOT NULL,          -- why it is down ('' when up)
            failures INTEGER NOT NULL,     -- the failure that took it down, and failed probes since
            next_probe REAL                -- when it is tried again, while down
        )""",
    )),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
