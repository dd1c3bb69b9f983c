-- Replicas keep their cached sessions true to the table by reading only the
-- rows that changed since their last look, not every cached row each
-- second (an idle replica with 45,000 cached sessions read 45,000 rows a
-- second).
--
-- `change_xid` is the id of the transaction that last changed a session's
-- state (revocation, expiry, call totals), set by the trigger below
-- whatever statement, of whatever client, made the change. A replica
-- remembers the oldest transaction still running when it last looked
-- (`pg_snapshot_xmin` of that statement's snapshot) and next reads the rows
-- with `change_xid` at or above it: every transaction its look did not see
-- is at or above that horizon, so a change is never missed, however commits
-- interleave, and no wall clock is involved (transaction ids are 64-bit
-- 64-bit, from xid8: they never wrap; kept as BIGINT so that the planner's
-- statistics apply to it). A row inserted and never changed keeps NULL; the
-- partial index holds only the changed ones.
--
-- Replicas upgrading at once: sqlx's migrator holds pg_advisory_lock while
-- it migrates, so one replica applies this. The column is added without a
-- default (no table rewrite); the index build holds a SHARE lock on
-- `sessions` (writes of replicas still on the old version wait until it
-- commits).
ALTER TABLE sessions ADD COLUMN IF NOT EXISTS change_xid BIGINT;

CREATE FUNCTION airlock_session_touched() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.change_xid := pg_current_xact_id()::text::bigint;
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
