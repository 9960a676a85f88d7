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

# The anonymous caller: whoever uses a daemon that has no tokens and no
# callers configured; the owner of every message stored before callers
# existed (schema version 1).
ANONYMOUS_CALLER = "anonymous"

# The tables as schema version 1 created them. Never edit this text: a
# change to the tables is a new step of MIGRATIONS. A new spool is made
# with it and then taken through every step, so a new spool and an
# upgraded one are the same (and every step runs in every test).
SCHEMA_V1 = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
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
CREATE INDEX messages_pending ON messages (next_attempt)
    WHERE {IS_DUE};
CREATE INDEX messages_final ON messages (updated)
    WHERE {IS_FINAL};
CREATE TABLE recipients (
    message_id TEXT NOT NULL,
    address TEXT NOT NULL,
    position INTEGER NOT NULL,
    state TEXT NOT NULL,              -- queued|deferred|sent|failed
    reply TEXT,                       -- the upstream's last reply
    PRIMARY KEY (message_id, address)
) WITHOUT ROWID;
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    message_id TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX idempotency_age ON idempotency (created);
INSERT INTO meta VALUES ('schema_version', '1');
"""

# (version, SQL): run in order at open, each step in one transaction with
# the new version, on a spool whose version is lower (spool.writer.open).
MIGRATIONS: list[tuple[int, str]] = [
    # 2: callers. Every message belongs to the caller that sent it (STATUS
    # and WAIT answer only that caller); idempotency keys are per caller;
    # `caller_key` is the secret that names the unnamed tokens' callers
    # (intake/callers.py). Messages stored before are the anonymous caller's.
    (2, f"""
ALTER TABLE messages ADD COLUMN caller TEXT NOT NULL DEFAULT '{ANONYMOUS_CALLER}';
CREATE TABLE idempotency_2 (
    caller TEXT NOT NULL,
    key TEXT NOT NULL,
    message_id TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (caller, key)
) WITHOUT ROWID;
INSERT INTO idempotency_2 SELECT '{ANONYMOUS_CALLER}', key, message_id, created FROM idempotency;
DROP TABLE idempotency;
ALTER TABLE idempotency_2 RENAME TO idempotency;
CREATE INDEX idempotency_age ON idempotency (created);
INSERT INTO meta VALUES ('caller_key', lower(hex(randomblob(32))));
"""),
    # 3: the health of each upstream as delivery last saw it
    # (delivery/health.py): what STATUS, STATS and `smtpgate queue` show
    # while every upstream is down.
    (3, """
CREATE TABLE upstreams (
    position INTEGER PRIMARY KEY,  -- order in the configuration
    name TEXT NOT NULL,            -- HOST:PORT
    state TEXT NOT NULL,           -- unknown|up|down
    since REAL NOT NULL,           -- unix seconds: down (or up) since
    reason TEXT NOT NULL,          -- why it is down ('' when up)
    failures INTEGER NOT NULL,     -- the failure that took it down, and failed probes since
    next_probe REAL                -- when it is tried again, while down
);
"""),
    # 4: the webhook outbox (smtpgate/webhooks/): an event per state change
    # a caller's webhook wants, written in the transaction of that change
    # and deleted once its receiver answered 2xx (or it was given up). The
    # payload is the JSON body, made once and sent as it is at every try.
    (4, """
CREATE TABLE webhook_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the events' order; never reused
    id TEXT NOT NULL,              -- the webhook-id header: evt_ and a ULID
    message_id TEXT NOT NULL,
    caller TEXT NOT NULL,          -- whose webhook_url it goes to (read when sent)
    type TEXT NOT NULL,            -- message.sent|deferred|failed|possible_duplicate
    payload BLOB NOT NULL,         -- the body, exactly as signed and sent
    created REAL NOT NULL,         -- unix seconds: when the state changed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,    -- a message's later events wait with its first
    last_error TEXT
);
-- The sender walks the due events; a message's events go out in seq order.
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt);
CREATE INDEX webhook_outbox_message ON webhook_outbox (message_id, seq);
"""),
    # 5: a `message.sent` or `message.failed` event's payload is NULL until
    # it is sent: the sender makes it from the message's rows, which no
    # attempt changes any more (spool/outbox.py), so that the writer does
    # not on every message's path. SQLite cannot drop a NOT NULL: the table
    # is made again, keeping its rows and its sequence (seq never reused).
    (5, """
CREATE TABLE webhook_outbox_5 (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    caller TEXT NOT NULL,
    type TEXT NOT NULL,
    payload BLOB,                  -- NULL: made from the final message when sent
    created REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_error TEXT
);
INSERT INTO webhook_outbox_5 SELECT * FROM webhook_outbox;
UPDATE sqlite_sequence SET seq = (SELECT seq FROM sqlite_sequence WHERE name='webhook_outbox')
    WHERE name='webhook_outbox_5';
INSERT INTO sqlite_sequence (name, seq) SELECT 'webhook_outbox_5', seq FROM sqlite_sequence
    WHERE name='webhook_outbox' AND NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name='webhook_outbox_5');
DROP TABLE webhook_outbox;
ALTER TABLE webhook_outbox_5 RENAME TO webhook_outbox;
CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt);
CREATE INDEX webhook_outbox_message ON webhook_outbox (message_id, seq);
"""),
    # 6: the waiting messages by age. /metrics reports how long the oldest
    # one has waited (queries.oldest_due) at every scrape, and without this
    # index SQLite read every waiting message's row to find it: 0.18 s of
    # CPU for 100,000, at every scrape, most of all during an outage, when
    # the figure matters. The queue page lists the oldest waiting through
    # it too, instead of skipping the final messages kept before them.
    # Partial like messages_pending: a message claimed at enqueue, being
    # sent or final is not in it, so the usual SEND never touches it.
    (6, f"""
CREATE INDEX messages_waiting ON messages (created) WHERE {IS_DUE};
"""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def migrate(conn) -> tuple[int, int]:
    """Bring the database of `conn` (autocommit mode) to SCHEMA_VERSION:
    create version 1 in an empty one, then run each step of MIGRATIONS
    above its version. Returns (version found, version now); raises
    ValueError for the spool of a newer smtpgate, leaving it untouched."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name='meta'").fetchone() is None:
        _in_transaction(conn, SCHEMA_V1)
    (found,) = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(found)
    if version > SCHEMA_VERSION:
        raise ValueError(f"schema {version} is newer than this smtpgate's ({SCHEMA_VERSION})")
    for step, sql in MIGRATIONS:
        if step > version:
            _in_transaction(conn, f"{sql}\nUPDATE meta SET value='{step}' WHERE key='schema_version';")
            version = step
    return int(found), version


def _in_transaction(conn, sql: str) -> None:
    """Run a script in one transaction: SQLite's DDL is transactional, so a
    step that fails (or a crash) leaves the spool as it was before it."""
    try:
        conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nCOMMIT;")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
