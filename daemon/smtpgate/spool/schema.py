"""The spool's database: its tables and the states of a message."""

from __future__ import annotations

STATES = ("queued", "sending", "deferred", "sent", "failed")
FINAL_STATES = ("sent", "failed")

SCHEMA_VERSION = "1"
SCHEMA = """
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
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_final ON messages (updated)
    WHERE state IN ('sent', 'failed');
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
