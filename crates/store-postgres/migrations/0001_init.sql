-- coatcheck PostgreSQL store, schema version 1: requests, their payloads,
-- their history and idempotency keys.
--
-- Built for churn. A request's row in `requests` is rewritten by every
-- transition, so it holds only what transitions touch (fixed-width columns
-- first); the payloads live in `request_payloads` and the timeline in
-- `history`, both written far less often. Every index that a hot query reads
-- is partial, so finished requests leave it. Text that is compared or ordered
-- uses the "C" collation: byte order, as the embedded store, whatever the
-- database's locale.

CREATE TABLE requests (
    seq                 bigint GENERATED ALWAYS AS IDENTITY,  -- insertion order: the FIFO tie-break
    priority            integer NOT NULL,
    attempts            integer NOT NULL,
    max_attempts        integer NOT NULL,
    cancel_requested    boolean NOT NULL,
    history_seq         bigint NOT NULL,
    lease_duration_ms   bigint,
    created_at          timestamptz NOT NULL,
    updated_at          timestamptz NOT NULL,
    run_after           timestamptz,
    deadline            timestamptz,
    finished_at         timestamptz,
    lease_expires_at    timestamptz,
    id                  text COLLATE "C" PRIMARY KEY,
    tenant              text COLLATE "C" NOT NULL,
    queue               text COLLATE "C" NOT NULL,
    status              text COLLATE "C" NOT NULL
        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'expired')),
    fairness_key        text COLLATE "C" NOT NULL,
    correlation_id      text COLLATE "C",
    lease_token         text,
    lease_worker        text,
    last_lease_token    text,
    fallback_queue      text,
    fallback_of         text,
    fallback_request_id text,
    idempotency_key     text COLLATE "C",                    -- also in idempotency_keys; kept for retention
    error               text                                 -- ErrorInfo JSON
)
-- Every transition changes `status` (or the lease expiry), which partial
-- indexes depend on, so updates here are never HOT and leave a dead tuple
-- and dead index entries each: vacuum this table early and without pauses.
WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02,
      autovacuum_vacuum_cost_delay = 0);

-- Claims: only queued rows, walked by priority, then across fairness keys
-- (a loose index scan finds the keys), then each key's oldest.
CREATE INDEX requests_fair ON requests (queue, priority DESC, fairness_key, seq)
    WHERE status = 'queued';
-- The reaper: running rows by lease expiry.
CREATE INDEX requests_lease ON requests (lease_expires_at) WHERE status = 'running';
-- Per-key running counts, for fairness caps.
CREATE INDEX requests_running_key ON requests (queue, fairness_key) WHERE status = 'running';
-- The expirer: unfinished rows with a deadline.
CREATE INDEX requests_deadline ON requests (deadline)
    WHERE deadline IS NOT NULL AND status IN ('queued', 'running');
-- Delayed runs: when the next one becomes claimable.
CREATE INDEX requests_run_after ON requests (run_after)
    WHERE status = 'queued' AND run_after IS NOT NULL;
-- Listing one tenant's requests newest first; lookups by correlation id.
CREATE INDEX requests_tenant_id ON requests (tenant, id);
CREATE INDEX requests_correlation ON requests (tenant, correlation_id)
    WHERE correlation_id IS NOT NULL;
-- Retention: finished rows by age.
CREATE INDEX requests_finished ON requests (finished_at) WHERE finished_at IS NOT NULL;

-- Payloads: written at submit (input, reply_to, metadata), at a heartbeat
-- with progress, and at complete (output). Large values are TOASTed. No
-- index covers output or progress, so their updates are HOT (measured: 97 %).
CREATE TABLE request_payloads (
    id        text COLLATE "C" PRIMARY KEY,
    input     text NOT NULL,    -- the JSON bytes as received
    output    text,
    progress  text,
    reply_to  text,             -- ReplyTo JSON
    metadata  text              -- object JSON, NULL when empty
);

-- The timeline: insert-only.
CREATE TABLE history (
    request_id text COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,
    at         timestamptz NOT NULL,
    event      text NOT NULL,   -- EventKind JSON (with its "kind")
    PRIMARY KEY (request_id, seq)
);

-- Idempotency keys, unique per tenant, living as long as their request.
CREATE TABLE idempotency_keys (
    tenant     text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    body_hash  text NOT NULL,
    request_id text NOT NULL,
    PRIMARY KEY (tenant, key)
);
