-- Schema version 6: requests per queue and status, kept by the writer in the
-- same transaction as every change (once per batch, not per request), so
-- `GET /v1/queues` and `/metrics` read a few rows instead of counting the
-- whole table (which holds every finished request until retention).
CREATE TABLE queue_counts (
    queue  TEXT NOT NULL,
    status TEXT NOT NULL,
    n      INTEGER NOT NULL,
    PRIMARY KEY (queue, status)
) WITHOUT ROWID;
INSERT INTO queue_counts (queue, status, n)
    SELECT queue, status, count(*) FROM requests GROUP BY queue, status;
