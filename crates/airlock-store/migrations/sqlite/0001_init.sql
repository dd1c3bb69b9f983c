-- Sessions: only the SHA-256 of a token is kept.
CREATE TABLE sessions (
    id          TEXT PRIMARY KEY NOT NULL,
    token_hash  TEXT NOT NULL UNIQUE,
    created_at  INTEGER NOT NULL,  -- unix ms
    expires_at  INTEGER NOT NULL,  -- unix ms
    revoked_at  INTEGER,           -- unix ms, NULL while not revoked
    scope       TEXT NOT NULL,     -- JSON
    limits      TEXT NOT NULL,     -- JSON
    labels      TEXT NOT NULL,     -- JSON object
    allowed     INTEGER NOT NULL DEFAULT 0,
    denied      INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);

-- Server settings such as the admin token hash.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
