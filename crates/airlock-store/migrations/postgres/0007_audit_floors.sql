-- Where each chain starts after `airlock audit prune` removed its oldest
-- records: the last record removed (seq, mac) and a seal over them made
-- with the audit key, which `airlock audit verify` checks before it
-- starts the chain there. One row per chain pruned, moved forward by
-- every prune.
CREATE TABLE audit_floors (
    chain      BIGINT PRIMARY KEY,
    seq        BIGINT NOT NULL,
    mac        BYTEA NOT NULL,
    seal       BYTEA NOT NULL,
    pruned_at  BIGINT NOT NULL    -- unix ms
);
