-- Schema version 3: named server secrets (the key that signs page tokens),
-- shared by every node on this database. Created once at random by
-- whichever node asks first (INSERT … ON CONFLICT DO NOTHING), then read
-- back by all of them.
CREATE TABLE secrets (
    name  text PRIMARY KEY,
    value bytea NOT NULL
);
