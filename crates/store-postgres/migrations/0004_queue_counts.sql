-- Schema version 4: requests per queue and status, kept in the same
-- transaction as every change, so `GET /v1/queues` and `/metrics` read a few
-- rows instead of counting the whole table (which holds every finished
-- request until retention).
--
-- Each connection adds to rows of its own (`slot` = its backend pid), so
-- concurrent transactions never wait on each other's counter rows; a read
-- sums the slots. Retention folds the rows of connections that are gone
-- into slot 0. `n` is not indexed, so an update of it stays on its page
-- (a HOT update) and needs no vacuum to reuse the space.
CREATE TABLE queue_counts (
    queue  text COLLATE "C" NOT NULL,
    status text COLLATE "C" NOT NULL,
    slot   integer NOT NULL,
    n      bigint NOT NULL,
    PRIMARY KEY (queue, status, slot)
) WITH (fillfactor = 50);

INSERT INTO queue_counts (queue, status, slot, n)
    SELECT queue, status, 0, count(*) FROM requests GROUP BY queue, status;
