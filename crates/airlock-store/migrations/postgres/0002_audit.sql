-- Audit chains: one per writer process, with its sealed head (last seq and
-- mac). A process owns its chain while it holds the session-level advisory
-- lock (1096107092, id) on a connection kept for its lifetime.
CREATE SEQUENCE audit_chain_ids AS BIGINT MINVALUE 1 MAXVALUE 4294967295;
CREATE TABLE audit_chains (
    id          BIGINT PRIMARY KEY NOT NULL,
    head_seq    BIGINT NOT NULL,
    head_mac    BYTEA NOT NULL,
    head_seal   BYTEA NOT NULL,
    created_at  BIGINT NOT NULL       -- unix ms
);

-- Audit records: never a token, credential, query string or body.
CREATE TABLE audit_records (
    chain            BIGINT NOT NULL,
    seq              BIGINT NOT NULL,
    ts               BIGINT NOT NULL, -- unix ms
    session          TEXT,
    provider         TEXT,
    method           TEXT NOT NULL,
    path             TEXT NOT NULL,
    decision         TEXT NOT NULL,
    status           BIGINT NOT NULL,
    upstream_status  BIGINT,
    duration_us      BIGINT NOT NULL,
    bytes_in         BIGINT NOT NULL,
    bytes_out        BIGINT NOT NULL,
    flags            BIGINT NOT NULL,
    prev_mac         BYTEA NOT NULL,
    mac              BYTEA NOT NULL,
    PRIMARY KEY (chain, seq)
);
CREATE INDEX audit_records_ts ON audit_records (ts, chain, seq);
CREATE INDEX audit_records_session ON audit_records (session, ts);
