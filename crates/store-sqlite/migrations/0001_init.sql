-- coatcheck embedded store, schema version 1.
-- Times are integer microseconds since the Unix epoch (UTC).
CREATE TABLE requests (
    seq                 INTEGER PRIMARY KEY,          -- insertion order: the FIFO tie-break
    id                  TEXT NOT NULL UNIQUE,
    tenant              TEXT NOT NULL,
    queue               TEXT NOT NULL,
    status              TEXT NOT NULL,
    priority            INTEGER NOT NULL,
    attempts            INTEGER NOT NULL,
    max_attempts        INTEGER NOT NULL,
    cancel_requested    INTEGER NOT NULL,
    correlation_id      TEXT,
    input               TEXT NOT NULL,                -- the JSON bytes as received
    output              TEXT,
    error               TEXT,                         -- ErrorInfo JSON
    progress            TEXT,
    reply_to            TEXT,                         -- ReplyTo JSON
    metadata            TEXT,                         -- object JSON, NULL when empty
    fallback_queue      TEXT,
    fallback_of         TEXT,
    fallback_request_id TEXT,
    fairness_key        TEXT NOT NULL,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    run_after           INTEGER,
    deadline            INTEGER,
    finished_at         INTEGER,
    lease_token         TEXT,
    lease_worker        TEXT,
    lease_expires_at    INTEGER,
    lease_duration_ms   INTEGER,
    last_lease_token    TEXT,
    history_seq         INTEGER NOT NULL,
    idempotency_key     TEXT,
    idempotency_hash    TEXT
);

-- Claims: only queued rows are in this index, in claim order.
CREATE INDEX requests_ready ON requests (queue, priority DESC, seq) WHERE status = 'queued';
-- The reaper: running rows by lease expiry.
CREATE INDEX requests_lease ON requests (lease_expires_at) WHERE status = 'running';
-- The expirer: unfinished rows with a deadline.
CREATE INDEX requests_deadline ON requests (deadline)
    WHERE deadline IS NOT NULL AND status IN ('queued', 'running');
-- Delayed runs: when the next one becomes claimable.
CREATE INDEX requests_run_after ON requests (run_after) WHERE status = 'queued' AND run_after IS NOT NULL;
-- Listing: newest first per tenant; lookups by correlation id.
CREATE INDEX requests_tenant_id ON requests (tenant, id);
CREATE INDEX requests_correlation ON requests (tenant, correlation_id) WHERE correlation_id IS NOT NULL;
-- Idempotency keys are unique per tenant, and persist with the request.
CREATE UNIQUE INDEX requests_idempotency ON requests (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE history (
    request_id TEXT NOT NULL,
    seq        INTEGER NOT NULL,
    at         INTEGER NOT NULL,
    event      TEXT NOT NULL,                         -- EventKind JSON (with its "kind")
    PRIMARY KEY (request_id, seq)
) WITHOUT ROWID;
