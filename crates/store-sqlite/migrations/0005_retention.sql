-- Schema version 5: retention. Finished requests by when they finished, so
-- the purge takes the oldest in bounded batches without a scan.
CREATE INDEX requests_finished ON requests (finished_at) WHERE finished_at IS NOT NULL;
