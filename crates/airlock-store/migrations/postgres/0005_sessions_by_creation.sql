-- `GET /v1/sessions` reads one page at a time, newest first: keyset
-- pagination on (created_at, id), `id` compared bytewise (COLLATE "C",
-- whatever the database's collation), walking this index backwards from
-- the last key of the previous page. It replaces `sessions_created_at`
-- (created_at DESC, id), whose ascending `id` under the database's
-- collation matched neither that order nor a row comparison.
--
-- Replicas upgrading at once: sqlx's migrator holds pg_advisory_lock on
-- the database while it migrates, so one replica applies this and the
-- others wait, then find it applied. It runs in one transaction: the index
-- build holds a SHARE lock on `sessions` (reads go on; writes of replicas
-- still on the old version wait until it commits, a few seconds for
-- millions of sessions), the old index is dropped last, just before the
-- commit. IF [NOT] EXISTS: an index an operator built or dropped by hand
-- ahead of the upgrade is no error.
CREATE INDEX IF NOT EXISTS sessions_created_at_id ON sessions (created_at, id COLLATE "C");
DROP INDEX IF EXISTS sessions_created_at;
