-- Schema version 3: fair claiming. Claims walk a queue by priority, then
-- rotate across fairness keys, then take each key's oldest: this index
-- serves all three (and replaces the plain ready index).
DROP INDEX requests_ready;
CREATE INDEX requests_fair ON requests (queue, priority DESC, fairness_key, seq) WHERE status = 'queued';
-- Per-key running counts, for concurrency caps.
CREATE INDEX requests_running_key ON requests (queue, fairness_key) WHERE status = 'running';
