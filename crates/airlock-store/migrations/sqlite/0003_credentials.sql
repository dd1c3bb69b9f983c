-- Provider credentials set with `airlock credential set`, sealed with the
-- master key (XChaCha20-Poly1305; the provider name is bound as associated
-- data). The plaintext is never stored.
CREATE TABLE credentials (
    provider    TEXT PRIMARY KEY NOT NULL,
    sealed      BLOB NOT NULL,
    updated_at  INTEGER NOT NULL   -- unix ms
);
