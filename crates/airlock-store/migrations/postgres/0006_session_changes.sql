-- Replicas keep their cached sessions true to the table by reading only the
-- rows that changed since their last look, not every cached row each
-- second (an idle replica with 45,000 cached sessions read 45,000 rows a
-- second).
--
-- `change_xid` is the id of the transaction that last changed a session's
-- state (revocation, expiry, call totals), set by the trigger below
-- whatever statement, of whatever client, made the change. A replica
-- remembers the oldest transaction still running when it last looked
-- (`txid_snapshot_xmin` of that statement's snapshot) and next reads the rows
-- with `change_xid` at or above it: every transaction its look did not see
-- is at or above that horizon, so a change is never missed, however commits
-- interleave, and no wall clock is involved (`txid_current()` ids carry
-- the epoch: 64-bit, they never wrap; the txid_* functions rather than
-- PostgreSQL 13's pg_current_xact_id, so that PostgreSQL 11 and 12 still
-- run airlock). A row inserted and never changed keeps NULL; the
-- partial index holds only the changed ones.
--
-- Replicas upgrading at once: sqlx's migrator holds pg_advisory_lock while
-- it migrates, so one replica applies this. The column is added without a
-- default (no table rewrite), but the migration is one transaction: the
-- ALTER TABLE's exclusive lock on `sessions` is held through the index
-- build, so every replica's reads and writes of `sessions` wait until it
-- commits (the build reads the table once: about a second per million
-- sessions).
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS change_xid BIGINT;

CREATE FUNCTION airlock_session_touched() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_xid := txid_current();
    RETURN NEW;
END
$$;

CREATE TRIGGER sessions_touched
    BEFORE UPDATE OF revoked_at, expires_at, allowed, denied ON sessions
    FOR EACH ROW
    WHEN (OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at
          OR OLD.allowed IS DISTINCT FROM NEW.allowed
          OR OLD.denied IS DISTINCT FROM NEW.denied)
    EXECUTE FUNCTION airlock_session_touched();

CREATE INDEX IF NOT EXISTS sessions_change_xid ON sessions (change_xid)
    WHERE change_xid IS NOT NULL;
