-- A revocation is announced with the session's stored total of denied
-- calls, just before it (`denied ID N`), so that a replica told of it
-- knows at once whether max_denied ended the session. Replicas of an
-- older version ignore the extra notification (and still take the
-- `session …` one, whose format is unchanged).
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
