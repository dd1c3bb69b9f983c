-- Fewer pages per audit commit: the batches are stored in their primary
-- key's order (WITHOUT ROWID), so a commit writes no separate key index,
-- and the time index goes: `ts_max` never decreases along a chain, so the
-- first batch from a given time on is found by a binary search over the
-- key (src/sqlite/audit_batches.rs). A commit that wrote five B-tree pages
-- to the log now writes three.
CREATE TABLE audit_batches_clustered (
    chain      INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    last_seq   INTEGER NOT NULL,
    ts_max     INTEGER NOT NULL,   -- unix ms, latest record in the chain up to this batch
    records    BLOB NOT NULL,
    PRIMARY KEY (chain, first_seq)
) WITHOUT ROWID;
INSERT INTO audit_batches_clustered (chain, first_seq, last_seq, ts_max, records)
    SELECT chain, first_seq, last_seq, ts_max, records FROM audit_batches;
-- Dropping the old table drops its time index with it.
DROP TABLE audit_batches;
ALTER TABLE audit_batches_clustered RENAME TO audit_batches;
