-- Provider credentials set with `airlock credential set`, sealed with the
-- master key (XChaCha20-Poly1305; the provider name is bound as associated
-- data). The plaintext is never stored.
CREATE TABLE credentials (
    provider    TEXT PRIMARY KEY NOT NULL,
    sealed      BYTEA NOT NULL,
    updated_at  BIGINT NOT NULL    -- unix ms
);

-- Every replica reloads a provider's credential when it changes:
--   credential PROVIDER
CREATE FUNCTION airlock_credential_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('airlock_changes', 'credential ' || NEW.provider);
    RETURN NULL;
END
$$;

CREATE TRIGGER credentials_changed
    AFTER INSERT OR UPDATE ON credentials
    FOR EACH ROW
    EXECUTE FUNCTION airlock_credential_changed();
