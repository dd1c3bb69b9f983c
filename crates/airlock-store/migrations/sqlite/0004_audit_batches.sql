-- The audit trail as batches: the records of one commit in one row,
-- encoded together (see src/audit_batch.rs). `audit_records` rows from
-- before this migration are moved here when the store opens, then the
-- table is dropped.
CREATE TABLE audit_batches (
    chain      INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    ts_max     INTEGER NOT NULL,   -- unix ms, latest record in the chain up to this batch
    records    BLOB NOT NULL,
    PRIMARY KEY (chain, first_seq)
);
-- ts_max never decreases along a chain, so this finds the first batch
-- that can hold a record from a given time on.
CREATE INDEX audit_batches_ts ON audit_batches (chain, ts_max);

-- Which batches name a session: one row per session and batch.
CREATE TABLE audit_batch_sessions (
    session    TEXT NOT NULL,
    chain      INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    PRIMARY KEY (session, chain, first_seq)
) WITHOUT ROWID;
