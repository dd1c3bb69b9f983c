-- Audit chains: one per writer, with its sealed head (last seq and mac).
CREATE TABLE audit_chains (
    id          INTEGER PRIMARY KEY NOT NULL,
    head_seq    INTEGER NOT NULL,
    head_mac    BLOB NOT NULL,
    head_seal   BLOB NOT NULL,
    created_at  INTEGER NOT NULL       -- unix ms
);

-- Audit records: never a token, credential, query string or body.
CREATE TABLE audit_records (
    chain            INTEGER NOT NULL,
    seq              INTEGER NOT NULL,
    ts               INTEGER NOT NULL, -- unix ms
    session          TEXT,
    provider         TEXT,
    method           TEXT NOT NULL,
    path             TEXT NOT NULL,
    decision         TEXT NOT NULL,
    status           INTEGER NOT NULL,
    upstream_status  INTEGER,
    duration_us      INTEGER NOT NULL,
    bytes_in         INTEGER NOT NULL,
    bytes_out        INTEGER NOT NULL,
    flags            INTEGER NOT NULL,
    prev_mac         BLOB NOT NULL,
    mac              BLOB NOT NULL,
    PRIMARY KEY (chain, seq)
) WITHOUT ROWID;
CREATE INDEX audit_records_ts ON audit_records (ts);
CREATE INDEX audit_records_session ON audit_records (session, ts);
