-- `GET /v1/sessions` reads one page at a time, newest first: keyset
-- pagination on (created_at, id) (`id` compares bytewise, SQLite's BINARY
-- collation), walking this index backwards from the last key of the
-- previous page instead of sorting the whole table for every call.
CREATE INDEX sessions_created_at_id ON sessions (created_at, id);
