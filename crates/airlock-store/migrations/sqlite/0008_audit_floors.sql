-- Where each chain starts after `airlock audit prune` removed its oldest
-- records: the last record removed (seq, mac) and a seal over them made
-- with the audit key, which `airlock audit verify` checks before it
-- starts the chain there. One row per chain pruned, moved forward by
-- every prune.
CREATE TABLE audit_floors (
    chain      INTEGER PRIMARY KEY,
    seq        INTEGER NOT NULL,
    mac        BLOB NOT NULL,
    seal       BLOB NOT NULL,
    pruned_at  INTEGER NOT NULL   -- unix ms
);
