-- `max_requests` is spent from leases reserved in the database, as on
-- PostgreSQL: a process that dies loses at most the unused part of its
-- lease (the quota errs on the side of refusing), where counting in memory
-- and writing the count once a second let a crash forget the calls of
-- that second and allow them again. What a session used so far counts as
-- reserved.
ALTER TABLE sessions ADD COLUMN reserved INTEGER NOT NULL DEFAULT 0;
UPDATE sessions SET reserved = allowed;
