-- Sessions: only the SHA-256 of a token is kept.
CREATE TABLE sessions (
    id            TEXT PRIMARY KEY NOT NULL,
    token_hash    TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL,  -- unix ms
    expires_at    BIGINT NOT NULL,  -- unix ms
    revoked_at    BIGINT,           -- unix ms, NULL while not revoked
    scope         TEXT NOT NULL,    -- JSON
    limits        TEXT NOT NULL,    -- JSON
    labels        TEXT NOT NULL,    -- JSON object
    allowed       BIGINT NOT NULL DEFAULT 0,  -- calls forwarded, all replicas
    denied        BIGINT NOT NULL DEFAULT 0,  -- calls denied, all replicas
    -- Copies of limits.max_requests / limits.max_denied for the statements
    -- that enforce them across replicas.
    max_requests  BIGINT,
    max_denied    BIGINT,
    -- Calls of max_requests handed out to replicas as leases; never above
    -- max_requests.
    reserved      BIGINT NOT NULL DEFAULT 0,
    CHECK (max_requests IS NULL OR reserved <= max_requests)
);
CREATE INDEX sessions_expires_at ON sessions (expires_at);
CREATE INDEX sessions_created_at ON sessions (created_at DESC, id);

-- Server settings such as the admin token hash.
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);

-- Every replica LISTENs on airlock_changes. A change of a session's
-- revocation or expiry, by any statement of any client, is announced to all
-- of them when its transaction commits:
--   session ID REVOKED_AT|- EXPIRES_AT
CREATE FUNCTION airlock_session_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(
        'airlock_changes',
        'session ' || NEW.id || ' ' || COALESCE(NEW.revoked_at::text, '-') || ' '
            || NEW.expires_at::text
    );
    RETURN NULL;
END
$$;

CREATE TRIGGER sessions_changed
    AFTER UPDATE OF revoked_at, expires_at ON sessions
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at)
    EXECUTE FUNCTION airlock_session_changed();
