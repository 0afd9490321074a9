//! All SQL of the PostgreSQL store, as named statements, and the mapping
//! between rows and [`Request`]s.
//!
//! Conventions: every time is a `timestamptz` passed in by the caller (the
//! store never reads the database's clock, so tests drive time); batches
//! are written with `unnest` of parallel arrays, one statement per table
//! however many requests a transaction changes; every hot query repeats the
//! `WHERE` of the partial index it is meant to use.

use coatcheck_core::{HistoryEvent, Lease, Request, Status, Ts};
use coatcheck_store::{ListParams, Result};
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use crate::error::internal;

/// The migrations, in order: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "init", include_str!("../migrations/0001_init.sql")),
    (2, "replies", include_str!("../migrations/0002_replies.sql")),
    (3, "secrets", include_str!("../migrations/0003_secrets.sql")),
    (
        4,
        "queue_counts",
        include_str!("../migrations/0004_queue_counts.sql"),
    ),
];

// ---------------------------------------------------------------- migrations

/// Serializes migrations across every node starting at once (per schema).
pub const MIGRATE_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

pub const MIGRATIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS schema_migrations (\
    version integer PRIMARY KEY, name text NOT NULL, checksum text NOT NULL, \
    applied_at timestamptz NOT NULL DEFAULT now())";

pub const MIGRATIONS_APPLIED: &str =
    "SELECT version, checksum FROM schema_migrations ORDER BY version";

pub const MIGRATION_RECORD: &str =
    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)";

// ---------------------------------------------------------------- requests

/// The columns of a full request, in the order [`row_to_request`] reads them.
macro_rules! request_columns {
    () => {
        "r.id, r.tenant, r.queue, r.status, r.priority, r.attempts, r.max_attempts, \
         r.cancel_requested, r.correlation_id, p.input, p.output, r.error, p.progress, \
         p.reply_to, p.metadata, r.fallback_queue, r.fallback_of, r.fallback_request_id, \
         r.fairness_key, r.created_at, r.updated_at, r.run_after, r.deadline, r.finished_at, \
         r.lease_token, r.lease_worker, r.lease_expires_at, r.lease_duration_ms, \
         r.last_lease_token, r.history_seq"
    };
}

macro_rules! select_requests {
    () => {
        concat!(
            "SELECT ",
            request_columns!(),
            " FROM requests r JOIN request_payloads p ON p.id = r.id"
        )
    };
}

/// One request by id.
pub const SELECT_REQUEST: &str = concat!(select_requests!(), " WHERE r.id = $1");

/// One request by id, locked for a transition until the transaction ends.
pub const LOCK_REQUEST: &str = concat!(select_requests!(), " WHERE r.id = $1 FOR UPDATE OF r");

/// Several requests by id, locked in id order (so two batches never
/// deadlock on each other).
pub const LOCK_REQUESTS: &str = concat!(
    select_requests!(),
    " WHERE r.id = ANY($1) ORDER BY r.id FOR UPDATE OF r"
);

/// Fair claims, step 1: the highest priority level at or below `$2` with
/// queued requests, and its fairness keys in order (at most `$3`), found by
/// a loose index scan of `requests_fair` — one index seek per key, however
/// deep the backlog. (The level is a scalar subquery, not a join, so that
/// each seek has it as an index condition.)
pub const LEVEL_KEYS: &str = "WITH RECURSIVE lvl AS MATERIALIZED (\
      SELECT (SELECT priority FROM requests \
              WHERE queue = $1 AND status = 'queued' AND priority <= $2 \
              ORDER BY priority DESC LIMIT 1) AS p), \
    keys AS (\
      (SELECT r.fairness_key AS k FROM requests r \
       WHERE r.queue = $1 AND r.status = 'queued' AND r.priority = (SELECT p FROM lvl) \
       ORDER BY r.fairness_key LIMIT 1) \
      UNION ALL \
      SELECT (SELECT r.fairness_key FROM requests r \
              WHERE r.queue = $1 AND r.status = 'queued' AND r.priority = (SELECT p FROM lvl) \
                AND r.fairness_key > keys.k \
              ORDER BY r.fairness_key LIMIT 1) \
      FROM keys WHERE keys.k IS NOT NULL) \
    SELECT (SELECT p FROM lvl), k FROM keys WHERE k IS NOT NULL LIMIT $3";

/// Fair claims, step 2: the oldest claimable requests of one key at one
/// priority, locked; rows another claim holds are skipped, not waited for.
pub const LOCK_KEY_HEADS: &str = concat!(
    select_requests!(),
    " WHERE r.queue = $1 AND r.status = 'queued' AND r.priority = $2 AND r.fairness_key = $3 \
      AND (r.run_after IS NULL OR r.run_after <= $4) \
      AND (r.deadline IS NULL OR r.deadline > $4) AND r.attempts < r.max_attempts \
      ORDER BY r.seq LIMIT $5 FOR UPDATE OF r SKIP LOCKED"
);

/// Running requests per fairness key of a queue (for caps).
pub const KEYS_RUNNING: &str = "SELECT fairness_key, count(*) FROM requests \
    WHERE queue = $1 AND status = 'running' GROUP BY fairness_key";

/// Serializes the claims of one queue whose keys have running caps, across
/// nodes, until the claim commits (so two nodes cannot both fill one slot).
pub const LOCK_QUEUE_CAPS: &str = "SELECT pg_advisory_xact_lock($1)";

/// How many requests of a queue are queued.
pub const QUEUE_DEPTH: &str =
    "SELECT count(*) FROM requests WHERE queue = $1 AND status = 'queued'";

/// A named secret: create it if absent (the first caller wins)…
pub const INSERT_SECRET: &str =
    "INSERT INTO secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING";

/// …then read what is there (a statement of its own, so it sees a secret
/// another node committed meanwhile).
pub const SELECT_SECRET: &str = "SELECT value FROM secrets WHERE name = $1";

/// Running requests whose lease ran out, locked; rows another node's
/// reaper holds are skipped.
pub const LOCK_LEASES_DUE: &str = concat!(
    select_requests!(),
    " WHERE r.status = 'running' AND r.lease_expires_at <= $1 \
      ORDER BY r.lease_expires_at LIMIT $2 FOR UPDATE OF r SKIP LOCKED"
);

/// Unfinished requests whose deadline passed, locked; rows another node's
/// expirer holds are skipped.
pub const LOCK_DEADLINES_DUE: &str = concat!(
    select_requests!(),
    " WHERE r.deadline IS NOT NULL AND r.status IN ('queued', 'running') AND r.deadline <= $1 \
      ORDER BY r.deadline LIMIT $2 FOR UPDATE OF r SKIP LOCKED"
);

/// A new request: its row, its payloads and its first history events, in
/// one statement (a submit is one round trip).
pub const INSERT_REQUEST: &str = "WITH r AS (\
    INSERT INTO requests (id, tenant, queue, status, priority, attempts, max_attempts, \
        cancel_requested, correlation_id, error, fallback_queue, fallback_of, fallback_request_id, \
        fairness_key, created_at, updated_at, run_after, deadline, finished_at, lease_token, \
        lease_worker, lease_expires_at, lease_duration_ms, last_lease_token, history_seq, \
        idempotency_key) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, \
        $19, $20, $21, $22, $23, $24, $25, $26)), \
  p AS (INSERT INTO request_payloads (id, input, output, progress, reply_to, metadata) \
    VALUES ($1, $27, $28, $29, $30, $31)) \
  INSERT INTO history (request_id, seq, at, event) \
    SELECT $1::text, h.seq, h.at, h.event \
    FROM unnest($32::bigint[], $33::timestamptz[], $34::text[]) AS h(seq, at, event)";

/// New requests (many submits group-committed in one statement): rows,
/// payloads and first history events from parallel arrays. Rows go in in
/// array order, so `seq` (the FIFO tie-break) follows arrival order.
///
/// Submits with an idempotency key take it in the same statement (`k`, its
/// own arrays `$28…$31` sorted by tenant and key, so two batches never wait
/// on each other's keys in opposite orders): a request is inserted only if
/// it has no key or its key was free — a taken key (by an earlier request,
/// or by an earlier submit of the same batch) inserts nothing, and the
/// caller then reads whose it is. The statement returns the ids it created.
pub const INSERT_REQUESTS: &str = "WITH k AS (\
    INSERT INTO idempotency_keys (tenant, key, body_hash, request_id) \
    SELECT * FROM unnest($28::text[], $29::text[], $30::text[], $31::text[]) \
    ON CONFLICT DO NOTHING RETURNING request_id), \
  v AS (SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], \
        $6::integer[], $7::integer[], $8::boolean[], $9::text[], $10::text[], $11::text[], \
        $12::text[], $13::text[], $14::text[], $15::timestamptz[], $16::timestamptz[], \
        $17::timestamptz[], $18::timestamptz[], $19::timestamptz[], $20::bigint[], $32::text[]) \
        WITH ORDINALITY AS v(id, tenant, queue, status, priority, attempts, max_attempts, \
        cancel_requested, correlation_id, error, fallback_queue, fallback_of, fallback_request_id, \
        fairness_key, created_at, updated_at, run_after, deadline, finished_at, history_seq, \
        idempotency_key, n) \
    WHERE v.idempotency_key IS NULL OR v.id IN (SELECT request_id FROM k)), \
  r AS (\
    INSERT INTO requests (id, tenant, queue, status, priority, attempts, max_attempts, \
        cancel_requested, correlation_id, error, fallback_queue, fallback_of, fallback_request_id, \
        fairness_key, created_at, updated_at, run_after, deadline, finished_at, history_seq, \
        idempotency_key) \
    SELECT id, tenant, queue, status, priority, attempts, max_attempts, cancel_requested, \
        correlation_id, error, fallback_queue, fallback_of, fallback_request_id, fairness_key, \
        created_at, updated_at, run_after, deadline, finished_at, history_seq, idempotency_key \
    FROM v ORDER BY n RETURNING id, queue, status), \
  c AS (INSERT INTO queue_counts (queue, status, slot, n) \
    SELECT queue, status, pg_backend_pid(), count(*) FROM r GROUP BY queue, status \
    ON CONFLICT (queue, status, slot) DO UPDATE SET n = queue_counts.n + excluded.n), \
  p AS (INSERT INTO request_payloads (id, input, reply_to, metadata) \
    SELECT * FROM unnest($1::text[], $21::text[], $22::text[], $23::text[]) AS x(id, input, reply_to, metadata) \
    WHERE x.id IN (SELECT id FROM v)), \
  h AS (INSERT INTO history (request_id, seq, at, event) \
    SELECT * FROM unnest($24::text[], $25::bigint[], $26::timestamptz[], $27::text[]) AS e(request_id, seq, at, event) \
    WHERE e.request_id IN (SELECT id FROM v)) \
  SELECT id FROM r";

/// Everything a transition may change in the hot row, for many requests.
/// Identity, input and idempotency never change. (`r.id = ANY($1)`
/// repeats the join key so that even a generic plan, which cannot see how
/// long the arrays are, finds the rows by the primary key instead of
/// scanning the table.)
pub const UPDATE_REQUESTS: &str = "UPDATE requests AS r SET status = v.status, \
    priority = v.priority, attempts = v.attempts, max_attempts = v.max_attempts, \
    cancel_requested = v.cancel_requested, error = v.error, \
    fallback_request_id = v.fallback_request_id, updated_at = v.updated_at, \
    run_after = v.run_after, deadline = v.deadline, finished_at = v.finished_at, \
    lease_token = v.lease_token, lease_worker = v.lease_worker, \
    lease_expires_at = v.lease_expires_at, lease_duration_ms = v.lease_duration_ms, \
    last_lease_token = v.last_lease_token, history_seq = v.history_seq \
  FROM unnest($1::text[], $2::text[], $3::integer[], $4::integer[], $5::integer[], \
    $6::boolean[], $7::text[], $8::text[], $9::timestamptz[], $10::timestamptz[], \
    $11::timestamptz[], $12::timestamptz[], $13::text[], $14::text[], $15::timestamptz[], \
    $16::bigint[], $17::text[], $18::bigint[]) \
    AS v(id, status, priority, attempts, max_attempts, cancel_requested, error, \
    fallback_request_id, updated_at, run_after, deadline, finished_at, lease_token, \
    lease_worker, lease_expires_at, lease_duration_ms, last_lease_token, history_seq) \
  WHERE r.id = v.id AND r.id = ANY($1)";

/// The payloads a transition changed (output, progress), for many requests.
pub const UPDATE_PAYLOADS: &str = "UPDATE request_payloads AS p \
    SET output = v.output, progress = v.progress \
  FROM unnest($1::text[], $2::text[], $3::text[]) AS v(id, output, progress) \
  WHERE p.id = v.id AND p.id = ANY($1)";

/// The payloads a transition changed, for one request (a statement of its
/// own: the many-row form above is planned anew at every execution).
pub const UPDATE_PAYLOAD: &str =
    "UPDATE request_payloads SET output = $2, progress = $3 WHERE id = $1";

/// History events of many requests.
pub const INSERT_HISTORY: &str = "INSERT INTO history (request_id, seq, at, event) \
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::timestamptz[], $4::text[])";

pub const SELECT_HISTORY: &str =
    "SELECT seq, at, event FROM history WHERE request_id = $1 AND seq > $2 ORDER BY seq";

pub const SELECT_IDEMPOTENCY: &str =
    "SELECT request_id, body_hash FROM idempotency_keys WHERE tenant = $1 AND key = $2";

/// The earliest due times of every background service, in one round trip.
pub const DUE_TIMES: &str = "SELECT \
    (SELECT min(lease_expires_at) FROM requests WHERE status = 'running'), \
    (SELECT min(deadline) FROM requests \
        WHERE deadline IS NOT NULL AND status IN ('queued', 'running')), \
    (SELECT min(run_after) FROM requests \
        WHERE status = 'queued' AND run_after IS NOT NULL AND run_after > $1), \
    (SELECT min(visible_at) FROM channel_messages WHERE deliveries > 0 AND visible_at > $1), \
    (SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending')";

/// Requests per queue and status: the sum of every connection's slot.
pub const QUEUE_COUNTS: &str = "SELECT queue, status, sum(n)::bigint FROM queue_counts \
    GROUP BY queue, status HAVING sum(n) <> 0 ORDER BY queue";

/// Adds to the counts of this connection's slot (`$1` queues, `$2`
/// statuses, `$3` changes; each pair at most once).
pub const ADD_QUEUE_COUNTS: &str = "INSERT INTO queue_counts (queue, status, slot, n) \
    SELECT q, s, pg_backend_pid(), d FROM unnest($1::text[], $2::text[], $3::bigint[]) AS x(q, s, d) \
    ON CONFLICT (queue, status, slot) DO UPDATE SET n = queue_counts.n + excluded.n";

/// Moves the counts of connections that are gone into slot 0 (so the table
/// does not keep a row per connection ever opened).
pub const FOLD_QUEUE_COUNTS: &str = "WITH gone AS (\
    DELETE FROM queue_counts WHERE slot <> 0 \
      AND slot NOT IN (SELECT pid FROM pg_stat_activity WHERE pid IS NOT NULL) \
    RETURNING queue, status, n) \
  INSERT INTO queue_counts (queue, status, slot, n) \
    SELECT queue, status, 0, sum(n) FROM gone GROUP BY queue, status \
  ON CONFLICT (queue, status, slot) DO UPDATE SET n = queue_counts.n + excluded.n";

pub const QUEUE_OLDEST_READY: &str =
    "SELECT queue, min(coalesce(run_after, created_at)) FROM requests \
    WHERE status = 'queued' AND (run_after IS NULL OR run_after <= $1) GROUP BY queue";

/// Retention: deletes up to `$2` requests that finished before `$1` — their
/// row, payloads, history and idempotency key, and their queue counts — in
/// one statement that answers how many. Rows another node is deleting are
/// skipped.
pub const PURGE_FINISHED: &str = "WITH doomed AS (\
    SELECT id, tenant, idempotency_key FROM requests \
    WHERE finished_at IS NOT NULL AND finished_at < $1 \
      AND status IN ('succeeded', 'failed', 'cancelled', 'expired') \
    ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
  p AS (DELETE FROM request_payloads x USING doomed d WHERE x.id = d.id), \
  h AS (DELETE FROM history x USING doomed d WHERE x.request_id = d.id), \
  k AS (DELETE FROM idempotency_keys x USING doomed d \
        WHERE x.tenant = d.tenant AND x.key = d.idempotency_key), \
  gone AS (DELETE FROM requests x USING doomed d WHERE x.id = d.id RETURNING x.queue, x.status), \
  c AS (INSERT INTO queue_counts (queue, status, slot, n) \
    SELECT queue, status, pg_backend_pid(), -count(*) FROM gone GROUP BY queue, status \
    ON CONFLICT (queue, status, slot) DO UPDATE SET n = queue_counts.n + excluded.n) \
  SELECT count(*) FROM gone";

/// A page of requests, newest first: the fixed text for one combination of
/// filters (at most 32 distinct statements, each prepared once per connection).
pub fn list_query(p: &ListParams) -> String {
    let mut sql = String::from(select_requests!());
    sql.push_str(" WHERE true");
    let mut n = 0;
    let mut add = |clause: &str| {
        n += 1;
        sql.push_str(&format!(" AND {clause} ${n}"));
    };
    if p.tenant.is_some() {
        add("r.tenant =");
    }
    if p.queue.is_some() {
        add("r.queue =");
    }
    if p.status.is_some() {
        add("r.status =");
    }
    if p.correlation_id.is_some() {
        add("r.correlation_id =");
    }
    if p.before_id.is_some() {
        add("r.id <");
    }
    sql.push_str(&format!(" ORDER BY r.id DESC LIMIT ${}", n + 1));
    sql
}

/// The parameters of [`list_query`], in its order.
pub fn list_params(p: &ListParams) -> Vec<Box<dyn ToSql + Sync + Send>> {
    let mut out: Vec<Box<dyn ToSql + Sync + Send>> = Vec::new();
    for v in [
        p.tenant.clone(),
        p.queue.clone(),
        p.status.map(|s| s.as_str().to_string()),
        p.correlation_id.clone(),
        p.before_id.clone(),
    ]
    .into_iter()
    .flatten()
    {
        out.push(Box::new(v));
    }
    out.push(Box::new(p.limit as i64));
    out
}

// ---------------------------------------------------------------- replies

pub const INSERT_CHANNEL_MESSAGE: &str = "INSERT INTO channel_messages \
    (tenant, channel, message_id, request_id, body, visible_at, created_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $6)";

/// Receives: the oldest visible messages of a channel, each hidden until
/// `$4` under the next token of `$5`; messages another receive holds are
/// skipped. Answers them with their new delivery count.
pub const RECEIVE_CHANNEL: &str = "WITH picked AS (\
    SELECT seq, row_number() OVER (ORDER BY seq) AS n FROM (\
      SELECT seq FROM channel_messages \
      WHERE tenant = $1 AND channel = $2 AND visible_at <= $3 \
      ORDER BY seq LIMIT $6 FOR UPDATE SKIP LOCKED) s) \
  UPDATE channel_messages m SET visible_at = $4, deliveries = m.deliveries + 1, \
    ack_token = ($5::text[])[picked.n] \
  FROM picked WHERE m.seq = picked.seq \
  RETURNING m.seq, m.body, m.deliveries, m.ack_token";

/// Acks: removes each message still hidden under one of the tokens.
pub const ACK_CHANNEL: &str = "DELETE FROM channel_messages \
    WHERE tenant = $1 AND channel = $2 AND ack_token = ANY($3) AND visible_at > $4 \
    RETURNING ack_token";

pub const PURGE_CHANNEL: &str = "DELETE FROM channel_messages WHERE seq IN (\
    SELECT seq FROM channel_messages WHERE created_at < $1 \
    ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

pub const INSERT_WEBHOOK: &str = "INSERT INTO webhook_deliveries \
    (message_id, request_id, url, body, attempts, state, next_attempt_at, created_at) \
    VALUES ($1, $2, $3, $4, 0, 'pending', $5, $5)";

/// Takes due webhook deliveries under a lease (until `$3`); deliveries
/// another node is taking are skipped.
pub const CLAIM_WEBHOOKS: &str = "UPDATE webhook_deliveries w SET next_attempt_at = $3 \
  FROM (SELECT message_id FROM webhook_deliveries \
        WHERE state = 'pending' AND next_attempt_at <= $1 \
        ORDER BY next_attempt_at LIMIT $2 FOR UPDATE SKIP LOCKED) d \
  WHERE w.message_id = d.message_id \
  RETURNING w.message_id, w.request_id, w.url, w.body, w.attempts, w.created_at, w.next_attempt_at";

pub const RECORD_WEBHOOK: &str = "UPDATE webhook_deliveries \
    SET attempts = $2, state = $3, next_attempt_at = $4 \
    WHERE message_id = $1 AND state = 'pending' RETURNING request_id";

// ---------------------------------------------------------------- wake-ups

/// Sends every payload of `$2` on channel `$1`.
pub const NOTIFY: &str = "SELECT pg_notify($1, x) FROM unnest($2::text[]) AS x";

// ---------------------------------------------------------------- rows

fn raw(s: Option<String>) -> Result<Option<Box<RawValue>>> {
    s.map(|s| RawValue::from_string(s).map_err(internal))
        .transpose()
}

fn json<T: serde::de::DeserializeOwned>(s: Option<String>) -> Result<Option<T>> {
    s.map(|s| serde_json::from_str(&s).map_err(internal))
        .transpose()
}

/// A row of [`request_columns!`] as a request.
pub fn row_to_request(row: &Row) -> Result<Request> {
    let get_err = |e: tokio_postgres::Error| internal(e);
    let status: String = row.try_get(3).map_err(get_err)?;
    let lease_token: Option<String> = row.try_get(24).map_err(get_err)?;
    let lease = match lease_token {
        Some(token) => Some(Lease {
            token,
            worker_id: row
                .try_get::<_, Option<String>>(25)
                .map_err(get_err)?
                .unwrap_or_default(),
            expires_at: row
                .try_get::<_, Option<Ts>>(26)
                .map_err(get_err)?
                .unwrap_or_default(),
            duration_ms: row
                .try_get::<_, Option<i64>>(27)
                .map_err(get_err)?
                .unwrap_or(0) as u64,
        }),
        None => None,
    };
    Ok(Request {
        id: row.try_get(0).map_err(get_err)?,
        tenant: row.try_get(1).map_err(get_err)?,
        queue: row.try_get(2).map_err(get_err)?,
        status: Status::parse(&status).ok_or_else(|| internal(format!("bad status {status}")))?,
        priority: row.try_get(4).map_err(get_err)?,
        attempts: row.try_get::<_, i32>(5).map_err(get_err)? as u32,
        max_attempts: row.try_get::<_, i32>(6).map_err(get_err)? as u32,
        cancel_requested: row.try_get(7).map_err(get_err)?,
        correlation_id: row.try_get(8).map_err(get_err)?,
        input: RawValue::from_string(row.try_get(9).map_err(get_err)?).map_err(internal)?,
        output: raw(row.try_get(10).map_err(get_err)?)?,
        error: json(row.try_get(11).map_err(get_err)?)?,
        progress: raw(row.try_get(12).map_err(get_err)?)?,
        reply_to: json(row.try_get(13).map_err(get_err)?)?,
        metadata: json(row.try_get(14).map_err(get_err)?)?.unwrap_or_default(),
        fallback_queue: row.try_get(15).map_err(get_err)?,
        fallback_of: row.try_get(16).map_err(get_err)?,
        fallback_request_id: row.try_get(17).map_err(get_err)?,
        fairness_key: row.try_get(18).map_err(get_err)?,
        created_at: row.try_get(19).map_err(get_err)?,
        updated_at: row.try_get(20).map_err(get_err)?,
        run_after: row.try_get(21).map_err(get_err)?,
        deadline: row.try_get(22).map_err(get_err)?,
        finished_at: row.try_get(23).map_err(get_err)?,
        lease,
        last_lease_token: row.try_get(28).map_err(get_err)?,
        history_seq: row.try_get::<_, i64>(29).map_err(get_err)? as u64,
    })
}

/// A history row (`seq, at, event`) as an event.
pub fn row_to_event(row: &Row) -> Result<HistoryEvent> {
    let seq: i64 = row.try_get(0).map_err(internal)?;
    let at: Ts = row.try_get(1).map_err(internal)?;
    let body: String = row.try_get(2).map_err(internal)?;
    Ok(HistoryEvent {
        seq: seq as u64,
        at,
        kind: serde_json::from_str(&body).map_err(internal)?,
    })
}

fn to_json<T: serde::Serialize>(v: Option<&T>) -> Result<Option<String>> {
    v.map(|v| serde_json::to_string(v).map_err(internal))
        .transpose()
}

/// The parameters of [`INSERT_REQUEST`] for a new request, its first
/// events and its idempotency key, owned.
pub struct NewRow {
    params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl NewRow {
    /// Builds the parameters.
    pub fn new(req: &Request, events: &[HistoryEvent], idem_key: Option<&str>) -> Result<Self> {
        let lease = req.lease.as_ref();
        let metadata = (!req.metadata.is_empty()).then_some(&req.metadata);
        let mut hist = History::default();
        hist.push(&req.id, events)?;
        let params: Vec<Box<dyn ToSql + Sync + Send>> = vec![
            Box::new(req.id.clone()),
            Box::new(req.tenant.clone()),
            Box::new(req.queue.clone()),
            Box::new(req.status.as_str()),
            Box::new(req.priority),
            Box::new(req.attempts as i32),
            Box::new(req.max_attempts as i32),
            Box::new(req.cancel_requested),
            Box::new(req.correlation_id.clone()),
            Box::new(to_json(req.error.as_ref())?),
            Box::new(req.fallback_queue.clone()),
            Box::new(req.fallback_of.clone()),
            Box::new(req.fallback_request_id.clone()),
            Box::new(req.fairness_key.clone()),
            Box::new(req.created_at),
            Box::new(req.updated_at),
            Box::new(req.run_after),
            Box::new(req.deadline),
            Box::new(req.finished_at),
            Box::new(lease.map(|l| l.token.clone())),
            Box::new(lease.map(|l| l.worker_id.clone())),
            Box::new(lease.map(|l| l.expires_at)),
            Box::new(lease.map(|l| l.duration_ms as i64)),
            Box::new(req.last_lease_token.clone()),
            Box::new(req.history_seq as i64),
            Box::new(idem_key.map(str::to_string)),
            Box::new(req.input.get().to_string()),
            Box::new(req.output.as_ref().map(|o| o.get().to_string())),
            Box::new(req.progress.as_ref().map(|o| o.get().to_string())),
            Box::new(to_json(req.reply_to.as_ref())?),
            Box::new(to_json(metadata)?),
            Box::new(hist.seq),
            Box::new(hist.at),
            Box::new(hist.event),
        ];
        Ok(NewRow { params })
    }

    /// As statement parameters.
    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params
            .iter()
            .map(|p| p.as_ref() as &(dyn ToSql + Sync))
            .collect()
    }
}

/// History events of many requests, as the parallel arrays of
/// [`INSERT_HISTORY`].
#[derive(Default)]
pub struct History {
    pub request_id: Vec<String>,
    pub seq: Vec<i64>,
    pub at: Vec<Ts>,
    pub event: Vec<String>,
}

impl History {
    /// Adds a request's new events.
    pub fn push(&mut self, id: &str, events: &[HistoryEvent]) -> Result<()> {
        for e in events {
            self.request_id.push(id.to_string());
            self.seq.push(e.seq as i64);
            self.at.push(e.at);
            self.event
                .push(serde_json::to_string(&e.kind).map_err(internal)?);
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.seq.is_empty()
    }

    pub fn params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.request_id, &self.seq, &self.at, &self.event]
    }
}

/// Changed hot rows of many requests, as the parallel arrays of
/// [`UPDATE_REQUESTS`].
#[derive(Default)]
pub struct Updates {
    id: Vec<String>,
    status: Vec<&'static str>,
    priority: Vec<i32>,
    attempts: Vec<i32>,
    max_attempts: Vec<i32>,
    cancel_requested: Vec<bool>,
    error: Vec<Option<String>>,
    fallback_request_id: Vec<Option<String>>,
    updated_at: Vec<Ts>,
    run_after: Vec<Option<Ts>>,
    deadline: Vec<Option<Ts>>,
    finished_at: Vec<Option<Ts>>,
    lease_token: Vec<Option<String>>,
    lease_worker: Vec<Option<String>>,
    lease_expires_at: Vec<Option<Ts>>,
    lease_duration_ms: Vec<Option<i64>>,
    last_lease_token: Vec<Option<String>>,
    history_seq: Vec<i64>,
}

impl Updates {
    /// Adds a request's new state.
    pub fn push(&mut self, req: &Request) -> Result<()> {
        let lease = req.lease.as_ref();
        self.id.push(req.id.clone());
        self.status.push(req.status.as_str());
        self.priority.push(req.priority);
        self.attempts.push(req.attempts as i32);
        self.max_attempts.push(req.max_attempts as i32);
        self.cancel_requested.push(req.cancel_requested);
        self.error.push(to_json(req.error.as_ref())?);
        self.fallback_request_id
            .push(req.fallback_request_id.clone());
        self.updated_at.push(req.updated_at);
        self.run_after.push(req.run_after);
        self.deadline.push(req.deadline);
        self.finished_at.push(req.finished_at);
        self.lease_token.push(lease.map(|l| l.token.clone()));
        self.lease_worker.push(lease.map(|l| l.worker_id.clone()));
        self.lease_expires_at.push(lease.map(|l| l.expires_at));
        self.lease_duration_ms
            .push(lease.map(|l| l.duration_ms as i64));
        self.last_lease_token.push(req.last_lease_token.clone());
        self.history_seq.push(req.history_seq as i64);
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    pub fn params(&self) -> [&(dyn ToSql + Sync); 18] {
        [
            &self.id,
            &self.status,
            &self.priority,
            &self.attempts,
            &self.max_attempts,
            &self.cancel_requested,
            &self.error,
            &self.fallback_request_id,
            &self.updated_at,
            &self.run_after,
            &self.deadline,
            &self.finished_at,
            &self.lease_token,
            &self.lease_worker,
            &self.lease_expires_at,
            &self.lease_duration_ms,
            &self.last_lease_token,
            &self.history_seq,
        ]
    }
}

/// Changed payloads of many requests, as the arrays of [`UPDATE_PAYLOADS`].
#[derive(Default)]
pub struct PayloadUpdates {
    id: Vec<String>,
    output: Vec<Option<String>>,
    progress: Vec<Option<String>>,
}

impl PayloadUpdates {
    /// Adds a request's payloads.
    pub fn push(&mut self, req: &Request) {
        self.id.push(req.id.clone());
        self.output
            .push(req.output.as_ref().map(|o| o.get().to_string()));
        self.progress
            .push(req.progress.as_ref().map(|o| o.get().to_string()));
    }

    pub fn is_empty(&self) -> bool {
        self.id.is_empty()
    }

    pub fn params(&self) -> [&(dyn ToSql + Sync); 3] {
        [&self.id, &self.output, &self.progress]
    }

    /// The statement and parameters that write these payloads: the
    /// one-row statement for one request, else the many-row one.
    pub fn write(&self) -> (&'static str, Vec<&(dyn ToSql + Sync)>) {
        if self.id.len() == 1 {
            (
                UPDATE_PAYLOAD,
                vec![&self.id[0], &self.output[0], &self.progress[0]],
            )
        } else {
            (UPDATE_PAYLOADS, self.params().to_vec())
        }
    }
}

/// New requests as the parallel arrays of [`INSERT_REQUESTS`] (fresh
/// submits only: no lease, output or progress yet).
#[derive(Default)]
pub struct NewRows {
    id: Vec<String>,
    tenant: Vec<String>,
    queue: Vec<String>,
    status: Vec<&'static str>,
    priority: Vec<i32>,
    attempts: Vec<i32>,
    max_attempts: Vec<i32>,
    cancel_requested: Vec<bool>,
    correlation_id: Vec<Option<String>>,
    error: Vec<Option<String>>,
    fallback_queue: Vec<Option<String>>,
    fallback_of: Vec<Option<String>>,
    fallback_request_id: Vec<Option<String>>,
    fairness_key: Vec<String>,
    created_at: Vec<Ts>,
    updated_at: Vec<Ts>,
    run_after: Vec<Option<Ts>>,
    deadline: Vec<Option<Ts>>,
    finished_at: Vec<Option<Ts>>,
    history_seq: Vec<i64>,
    input: Vec<String>,
    reply_to: Vec<Option<String>>,
    metadata: Vec<Option<String>>,
    history: History,
    idempotency_key: Vec<Option<String>>,
    /// The keys to take, sorted by tenant and key before the statement runs:
    /// (tenant, key, body hash, request id).
    keys: Vec<(String, String, String, String)>,
    key_params: [Vec<String>; 4],
}

impl NewRows {
    /// Adds a new request and its first events; with `idem`, only if that
    /// key (of the request's tenant) is free.
    pub fn push(
        &mut self,
        req: &Request,
        events: &[HistoryEvent],
        idem: Option<&coatcheck_store::Idempotency>,
    ) -> Result<()> {
        if let Some(i) = idem {
            self.keys.push((
                req.tenant.clone(),
                i.key.clone(),
                i.body_hash.clone(),
                req.id.clone(),
            ));
        }
        self.idempotency_key.push(idem.map(|i| i.key.clone()));
        let metadata = (!req.metadata.is_empty()).then_some(&req.metadata);
        let (error, reply_to, metadata) = (
            to_json(req.error.as_ref())?,
            to_json(req.reply_to.as_ref())?,
            to_json(metadata)?,
        );
        self.history.push(&req.id, events)?;
        self.id.push(req.id.clone());
        self.tenant.push(req.tenant.clone());
        self.queue.push(req.queue.clone());
        self.status.push(req.status.as_str());
        self.priority.push(req.priority);
        self.attempts.push(req.attempts as i32);
        self.max_attempts.push(req.max_attempts as i32);
        self.cancel_requested.push(req.cancel_requested);
        self.correlation_id.push(req.correlation_id.clone());
        self.error.push(error);
        self.fallback_queue.push(req.fallback_queue.clone());
        self.fallback_of.push(req.fallback_of.clone());
        self.fallback_request_id
            .push(req.fallback_request_id.clone());
        self.fairness_key.push(req.fairness_key.clone());
        self.created_at.push(req.created_at);
        self.updated_at.push(req.updated_at);
        self.run_after.push(req.run_after);
        self.deadline.push(req.deadline);
        self.finished_at.push(req.finished_at);
        self.history_seq.push(req.history_seq as i64);
        self.input.push(req.input.get().to_string());
        self.reply_to.push(reply_to);
        self.metadata.push(metadata);
        Ok(())
    }

    /// Sorts the keys to take into one global order (see [`INSERT_REQUESTS`]).
    pub fn seal(&mut self) {
        self.keys.sort();
        let [t, k, b, r] = &mut self.key_params;
        for (tenant, key, hash, id) in &self.keys {
            t.push(tenant.clone());
            k.push(key.clone());
            b.push(hash.clone());
            r.push(id.clone());
        }
    }

    pub fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        let h = self.history.params();
        let [t, k, b, r] = &self.key_params;
        vec![
            &self.id,
            &self.tenant,
            &self.queue,
            &self.status,
            &self.priority,
            &self.attempts,
            &self.max_attempts,
            &self.cancel_requested,
            &self.correlation_id,
            &self.error,
            &self.fallback_queue,
            &self.fallback_of,
            &self.fallback_request_id,
            &self.fairness_key,
            &self.created_at,
            &self.updated_at,
            &self.run_after,
            &self.deadline,
            &self.finished_at,
            &self.history_seq,
            &self.input,
            &self.reply_to,
            &self.metadata,
            h[0],
            h[1],
            h[2],
            h[3],
            t,
            k,
            b,
            r,
            &self.idempotency_key,
        ]
    }
}
