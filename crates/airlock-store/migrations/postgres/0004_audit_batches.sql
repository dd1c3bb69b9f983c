-- The audit trail as batches: the records of one commit in one row,
-- encoded together (see src/audit_batch.rs), as on SQLite. A commit writes
-- one row here and one per session it names, instead of a row and three
-- index entries per record. `audit_records` rows from before this
-- migration are moved here when a store opens (src/postgres/audit_batches.rs),
-- then the table is dropped.
CREATE TABLE audit_batches (
    chain      BIGINT NOT NULL,
    first_seq  BIGINT NOT NULL,
    last_seq   BIGINT NOT NULL,
    ts_max     BIGINT NOT NULL,   -- unix ms, latest record in the chain up to this batch
    records    BYTEA NOT NULL,
    PRIMARY KEY (chain, first_seq)
) WITH (toast_tuple_target = 8160);
-- Encoded records are not worth compressing on every commit; a batch
-- that fits in a page stays in its row.
ALTER TABLE audit_batches ALTER COLUMN records SET STORAGE EXTERNAL;

-- Which batches name a session: one row per session and batch.
CREATE TABLE audit_batch_sessions (
    session    TEXT NOT NULL,
    chain      BIGINT NOT NULL,
    first_seq  BIGINT NOT NULL,
    PRIMARY KEY (session, chain, first_seq)
);
