-- `airlock credential remove` deletes a stored credential: every replica
-- hears of it as of any other change (`credential PROVIDER`), re-reads the
-- provider's row, finds none and stops using the key. Like every
-- migration, this one stops an older version from starting on the
-- database.
CREATE OR REPLACE FUNCTION airlock_credential_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('airlock_changes', 'credential ' || OLD.provider);
    ELSE
        PERFORM pg_notify('airlock_changes', 'credential ' || NEW.provider);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER credentials_changed ON credentials;
CREATE TRIGGER credentials_changed
    AFTER INSERT OR UPDATE OR DELETE ON credentials
    FOR EACH ROW
    EXECUTE FUNCTION airlock_credential_changed();
