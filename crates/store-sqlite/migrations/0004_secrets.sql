-- Schema version 4: named server secrets (the key that signs page tokens),
-- created once at random by the writer and then read back unchanged.
CREATE TABLE secrets (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
) WITHOUT ROWID;
