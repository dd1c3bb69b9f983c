-- A revocation is announced with the session's stored total of denied
-- calls, just before it (`denied ID N`), so that a replica told of it
-- knows at once whether max_denied ended the session. A replica of an
-- older version still running logs the extra notification as malformed
-- and ignores it (it takes the `session …` one, whose format is
-- unchanged); like every migration, this one stops an older version from
-- starting on the database.
CREATE OR REPLACE FUNCTION airlock_session_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        PERFORM pg_notify('airlock_changes', 'denied ' || NEW.id || ' ' || NEW.denied::text);
    END IF;
    PERFORM pg_notify(
        'airlock_changes',
        'session ' || NEW.id || ' ' || COALESCE(NEW.revoked_at::text, '-') || ' '
            || NEW.expires_at::text
    );
    RETURN NULL;
END
$$;
