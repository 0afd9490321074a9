//! All SQL of the embedded store, and the mapping between a row and a
//! [`Request`]. Statements are prepared once per connection (cached).

use coatcheck_core::clock::{from_micros, to_micros};
use coatcheck_core::{EventKind, HistoryEvent, Lease, Request, Status, Ts};
use coatcheck_store::{Result, StoreError};
use rusqlite::{Connection, OptionalExtension, Row};
use serde_json::value::RawValue;

/// The migrations, in order; `PRAGMA user_version` is the number applied.
pub const MIGRATIONS: &[&str] = &[
    include_str!("../migrations/0001_init.sql"),
    include_str!("../migrations/0002_replies.sql"),
    include_str!("../migrations/0003_fairness.sql"),
    include_str!("../migrations/0004_secrets.sql"),
    include_str!("../migrations/0005_retention.sql"),
    include_str!("../migrations/0006_queue_counts.sql"),
];

const COLUMNS: &str = "id, tenant, queue, status, priority, attempts, max_attempts, cancel_requested, \
    correlation_id, input, output, error, progress, reply_to, metadata, fallback_queue, fallback_of, \
    fallback_request_id, fairness_key, created_at, updated_at, run_after, deadline, finished_at, \
    lease_token, lease_worker, lease_expires_at, lease_duration_ms, last_lease_token, history_seq";

pub fn select_by_id() -> String {
    format!("SELECT {COLUMNS} FROM requests WHERE id = ?1")
}

/// The statements every transition runs, prepared once and kept by their
/// owner (the writer), so no execution pays a statement-cache lookup (which
/// hashes the whole SQL text, twice) or a bind by name.
///
/// It also keeps the unfinished requests it wrote last ([`Recent`]): the
/// writer is the only connection that changes `requests`, so the copy it
/// wrote is the row, and a claim or settlement of a request submitted or
/// claimed moments ago needs no `SELECT` and no decoding of the row. Any
/// rollback must call [`Hot::forget`].
pub struct Hot<'c> {
    load: std::cell::RefCell<rusqlite::Statement<'c>>,
    insert: std::cell::RefCell<rusqlite::Statement<'c>>,
    update: std::cell::RefCell<rusqlite::Statement<'c>>,
    history: std::cell::RefCell<rusqlite::Statement<'c>>,
    count: std::cell::RefCell<rusqlite::Statement<'c>>,
    recent: std::cell::RefCell<Recent>,
    /// Changes to `queue_counts` not written yet.
    counts: std::cell::RefCell<coatcheck_store::CountChanges>,
}

impl<'c> Hot<'c> {
    /// Prepares them on `conn`.
    pub fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        Ok(Hot {
            load: conn.prepare(&select_by_id())?.into(),
            insert: conn.prepare(INSERT)?.into(),
            update: conn.prepare(UPDATE)?.into(),
            history: conn.prepare(INSERT_HISTORY)?.into(),
            count: conn.prepare(ADD_QUEUE_COUNT)?.into(),
            recent: Default::default(),
            counts: Default::default(),
        })
    }

    /// Notes that `queue` has `by` more (or fewer) requests in `status`.
    pub fn count(&self, queue: &str, status: Status, by: i64) {
        self.counts.borrow_mut().add(queue, status, by);
    }

    /// The count changes noted so far, to go back to if a savepoint is
    /// rolled back ([`Hot::forget_since`]).
    pub fn counts_mark(&self) -> coatcheck_store::CountChanges {
        self.counts.borrow().clone()
    }

    /// Writes the noted count changes into `queue_counts`, in the open
    /// transaction, just before its commit.
    pub fn flush_counts(&self) -> Result<()> {
        let changes = self.counts.borrow_mut().take();
        let mut stmt = self.count.borrow_mut();
        for (queue, status, n) in changes {
            stmt.execute(rusqlite::params![queue, status.as_str(), n])
                .map_err(classify)?;
        }
        Ok(())
    }

    /// Loads one request by id.
    pub fn load(&self, id: &str) -> Result<Option<Request>> {
        if let Some(req) = self.recent.borrow().get(id) {
            return Ok(Some(req.clone()));
        }
        load_with(&mut self.load.borrow_mut(), id)
    }

    /// Inserts a new request.
    pub fn insert(&self, req: &Request, idem: Option<(&str, &str)>) -> Result<()> {
        insert_with(&mut self.insert.borrow_mut(), req, idem)?;
        self.count(&req.queue, req.status, 1);
        self.recent.borrow_mut().wrote(req);
        Ok(())
    }

    /// Writes back everything a transition may have changed; `was` is the
    /// status it had when loaded.
    pub fn update(&self, was: Status, req: &Request) -> Result<()> {
        if let Err(e) = update_with(&mut self.update.borrow_mut(), req) {
            self.recent.borrow_mut().remove(&req.id);
            return Err(e);
        }
        self.counts.borrow_mut().moved(&req.queue, was, req.status);
        self.recent.borrow_mut().wrote(req);
        Ok(())
    }

    /// Appends history events.
    pub fn insert_history(&self, id: &str, events: &[HistoryEvent]) -> Result<()> {
        insert_history_with(&mut self.history.borrow_mut(), id, events)
    }

    /// Drops every kept copy: the transaction (or part of it) that wrote
    /// them was rolled back.
    pub fn forget(&self) {
        self.forget_since(Default::default());
    }

    /// [`Hot::forget`] after a rollback to a savepoint: the count changes go
    /// back to `mark`, what they were when it was set.
    pub fn forget_since(&self, mark: coatcheck_store::CountChanges) {
        self.recent.borrow_mut().clear();
        *self.counts.borrow_mut() = mark;
    }
}

/// The unfinished requests the writer wrote last, by id, as written: at
/// most [`Recent::CAP`] of them and [`Recent::BUDGET`] bytes of payloads,
/// the oldest written dropped first. A finished request is dropped at once
/// (it is rarely written again), and one with large payloads is not kept.
#[derive(Default)]
pub struct Recent {
    by_id: std::collections::HashMap<String, Request>,
    order: std::collections::VecDeque<String>,
    bytes: usize,
}

impl Recent {
    /// Enough for every request in flight under heavy load.
    pub const CAP: usize = 4096;
    /// At most this many bytes of kept requests (payloads and a fixed
    /// allowance for the rest), so large inputs cannot grow the writer's
    /// memory: 4096 echo-sized requests fit.
    pub const BUDGET: usize = 8 * 1024 * 1024;
    /// A request larger than this is never kept.
    pub const LARGEST: usize = 64 * 1024;

    fn size(req: &Request) -> usize {
        let raw = |v: &Option<Box<RawValue>>| v.as_ref().map_or(0, |v| v.get().len());
        1024 + req.input.get().len() + raw(&req.output) + raw(&req.progress)
    }

    fn get(&self, id: &str) -> Option<&Request> {
        self.by_id.get(id)
    }

    fn wrote(&mut self, req: &Request) {
        let size = Self::size(req);
        if req.status.is_terminal() || size > Self::LARGEST {
            self.remove(&req.id);
            return;
        }
        if let Some(kept) = self.by_id.get_mut(&req.id) {
            // Written again (a claim): updated in place, keeping its turn.
            self.bytes = self.bytes - Self::size(kept) + size;
            kept.clone_from(req);
        } else {
            self.by_id.insert(req.id.clone(), req.clone());
            self.bytes += size;
            self.order.push_back(req.id.clone());
        }
        while self.by_id.len() > Self::CAP || self.bytes > Self::BUDGET {
            match self.order.pop_front() {
                Some(old) => self.remove(&old),
                None => break,
            }
        }
        // Ids of dropped requests stay in `order` until they reach its front
        // (one dropped and kept again may then be dropped early: only a
        // miss); keep it from growing past twice the cap meanwhile.
        if self.order.len() > 2 * Self::CAP {
            let by_id = &self.by_id;
            let mut seen = std::collections::HashSet::new();
            self.order
                .retain(|id| by_id.contains_key(id) && seen.insert(id.clone()));
        }
    }

    fn remove(&mut self, id: &str) {
        if let Some(old) = self.by_id.remove(id) {
            self.bytes -= Self::size(&old);
        }
    }

    fn clear(&mut self) {
        self.by_id.clear();
        self.order.clear();
        self.bytes = 0;
    }
}

/// Parameters by number (`?1` … `?32`, in column order): binding by name
/// costs a lookup per parameter on every execution.
pub const INSERT: &str = "INSERT OR FAIL INTO requests (id, tenant, queue, status, priority, attempts, max_attempts, \
    cancel_requested, correlation_id, input, output, error, progress, reply_to, metadata, fallback_queue, \
    fallback_of, fallback_request_id, fairness_key, created_at, updated_at, run_after, deadline, finished_at, \
    lease_token, lease_worker, lease_expires_at, lease_duration_ms, last_lease_token, history_seq, \
    idempotency_key, idempotency_hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, \
    ?14, ?15, ?16, ?17, ?18, ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32)";

/// Everything a transition may change; `input`, identity and idempotency never change.
pub const UPDATE: &str = "UPDATE OR FAIL requests SET status = ?2, priority = ?3, attempts = ?4, \
    max_attempts = ?5, cancel_requested = ?6, output = ?7, error = ?8, progress = ?9, \
    fallback_request_id = ?10, updated_at = ?11, run_after = ?12, deadline = ?13, finished_at = ?14, \
    lease_token = ?15, lease_worker = ?16, lease_expires_at = ?17, lease_duration_ms = ?18, \
    last_lease_token = ?19, history_seq = ?20 WHERE id = ?1";

pub const INSERT_HISTORY: &str =
    "INSERT OR FAIL INTO history (request_id, seq, at, event) VALUES (?1, ?2, ?3, ?4)";

pub const SELECT_HISTORY: &str =
    "SELECT seq, at, event FROM history WHERE request_id = ?1 AND seq > ?2 ORDER BY seq";

pub const SELECT_IDEMPOTENCY: &str =
    "SELECT id, idempotency_hash FROM requests WHERE tenant = ?1 AND idempotency_key = ?2";

/// The highest priority below `?2` that has queued requests.
pub const NEXT_LEVEL: &str =
    "SELECT priority FROM requests WHERE queue = ?1 AND status = 'queued' \
    AND priority < ?2 ORDER BY priority DESC LIMIT 1";

/// The first fairness key after `?3` at priority `?2`.
pub const NEXT_KEY: &str =
    "SELECT fairness_key FROM requests WHERE queue = ?1 AND status = 'queued' \
    AND priority = ?2 AND fairness_key > ?3 ORDER BY fairness_key LIMIT 1";

/// The oldest claimable requests of one key at one priority.
pub const KEY_HEADS: &str = "SELECT id FROM requests WHERE queue = ?1 AND status = 'queued' \
    AND priority = ?2 AND fairness_key = ?3 AND (run_after IS NULL OR run_after <= ?4) ORDER BY seq LIMIT ?5";

/// Running requests of one key (for caps).
pub const KEY_RUNNING: &str =
    "SELECT count(*) FROM requests WHERE queue = ?1 AND status = 'running' AND fairness_key = ?2";

pub const SELECT_LEASES_DUE: &str = "SELECT id FROM requests WHERE status = 'running' \
    AND lease_expires_at <= ?1 ORDER BY lease_expires_at LIMIT ?2";

pub const SELECT_DEADLINES_DUE: &str = "SELECT id FROM requests WHERE deadline IS NOT NULL \
    AND status IN ('queued', 'running') AND deadline <= ?1 ORDER BY deadline LIMIT ?2";

pub const NEXT_LEASE_EXPIRY: &str =
    "SELECT min(lease_expires_at) FROM requests WHERE status = 'running'";

pub const NEXT_DEADLINE: &str = "SELECT min(deadline) FROM requests WHERE deadline IS NOT NULL \
    AND status IN ('queued', 'running')";

pub const NEXT_RUN_AFTER: &str = "SELECT min(run_after) FROM requests WHERE status = 'queued' \
    AND run_after IS NOT NULL AND run_after > ?1";

pub const QUEUE_COUNTS: &str =
    "SELECT queue, status, n FROM queue_counts WHERE n <> 0 ORDER BY queue";

/// Adds to a queue's count of one status (see [`Hot::flush_counts`]).
pub const ADD_QUEUE_COUNT: &str =
    "INSERT INTO queue_counts (queue, status, n) VALUES (?1, ?2, ?3) \
    ON CONFLICT (queue, status) DO UPDATE SET n = n + excluded.n";

pub const QUEUE_OLDEST_READY: &str =
    "SELECT queue, min(coalesce(run_after, created_at)) FROM requests \
    WHERE status = 'queued' AND (run_after IS NULL OR run_after <= ?1) GROUP BY queue";

pub fn list_query(p: &coatcheck_store::ListParams) -> (String, Vec<rusqlite::types::Value>) {
    use rusqlite::types::Value;
    let mut sql = format!("SELECT {COLUMNS} FROM requests WHERE 1 = 1");
    let mut args: Vec<Value> = Vec::new();
    let mut add = |clause: &str, v: Value| {
        args.push(v);
        sql.push_str(&format!(" AND {clause} ?{}", args.len()));
    };
    if let Some(t) = &p.tenant {
        add("tenant =", Value::Text(t.clone()));
    }
    if let Some(q) = &p.queue {
        add("queue =", Value::Text(q.clone()));
    }
    if let Some(s) = p.status {
        add("status =", Value::Text(s.as_str().to_string()));
    }
    if let Some(c) = &p.correlation_id {
        add("correlation_id =", Value::Text(c.clone()));
    }
    if let Some(b) = &p.before_id {
        add("id <", Value::Text(b.clone()));
    }
    args.push(Value::Integer(p.limit as i64));
    sql.push_str(&format!(" ORDER BY id DESC LIMIT ?{}", args.len()));
    (sql, args)
}

fn internal(e: impl std::fmt::Display) -> StoreError {
    StoreError::Internal(e.to_string())
}

/// Classifies a SQLite error: busy/locked/IO/full are `Unavailable`.
pub fn classify(e: rusqlite::Error) -> StoreError {
    use rusqlite::ErrorCode::*;
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if matches!(
                f.code,
                DatabaseBusy
                    | DatabaseLocked
                    | DiskFull
                    | SystemIoFailure
                    | CannotOpen
                    | ReadOnly
                    | OutOfMemory
            ) =>
        {
            StoreError::Unavailable(e.to_string())
        }
        _ => StoreError::Internal(e.to_string()),
    }
}

fn raw(s: Option<String>) -> Result<Option<Box<RawValue>>> {
    s.map(|s| RawValue::from_string(s).map_err(internal))
        .transpose()
}

fn json<T: serde::de::DeserializeOwned>(s: Option<String>) -> Result<Option<T>> {
    s.map(|s| serde_json::from_str(&s).map_err(internal))
        .transpose()
}

fn ts(v: Option<i64>) -> Option<Ts> {
    v.map(from_micros)
}

/// A row (in [`COLUMNS`] order) as a request.
pub fn row_to_request(row: &Row<'_>) -> Result<Request> {
    let r = |e: rusqlite::Error| internal(e);
    let status: String = row.get(3).map_err(r)?;
    let lease_token: Option<String> = row.get(24).map_err(r)?;
    let lease = match lease_token {
        Some(token) => Some(Lease {
            token,
            worker_id: row
                .get::<_, Option<String>>(25)
                .map_err(r)?
                .unwrap_or_default(),
            expires_at: from_micros(row.get::<_, Option<i64>>(26).map_err(r)?.unwrap_or(0)),
            duration_ms: row.get::<_, Option<i64>>(27).map_err(r)?.unwrap_or(0) as u64,
        }),
        None => None,
    };
    Ok(Request {
        id: row.get(0).map_err(r)?,
        tenant: row.get(1).map_err(r)?,
        queue: row.get(2).map_err(r)?,
        status: Status::parse(&status).ok_or_else(|| internal(format!("bad status {status}")))?,
        priority: row.get(4).map_err(r)?,
        attempts: row.get(5).map_err(r)?,
        max_attempts: row.get(6).map_err(r)?,
        cancel_requested: row.get(7).map_err(r)?,
        correlation_id: row.get(8).map_err(r)?,
        input: RawValue::from_string(row.get(9).map_err(r)?).map_err(internal)?,
        output: raw(row.get(10).map_err(r)?)?,
        error: json(row.get(11).map_err(r)?)?,
        progress: raw(row.get(12).map_err(r)?)?,
        reply_to: json(row.get(13).map_err(r)?)?,
        metadata: json(row.get(14).map_err(r)?)?.unwrap_or_default(),
        fallback_queue: row.get(15).map_err(r)?,
        fallback_of: row.get(16).map_err(r)?,
        fallback_request_id: row.get(17).map_err(r)?,
        fairness_key: row.get(18).map_err(r)?,
        created_at: from_micros(row.get(19).map_err(r)?),
        updated_at: from_micros(row.get(20).map_err(r)?),
        run_after: ts(row.get(21).map_err(r)?),
        deadline: ts(row.get(22).map_err(r)?),
        finished_at: ts(row.get(23).map_err(r)?),
        lease,
        last_lease_token: row.get(28).map_err(r)?,
        history_seq: row.get::<_, i64>(29).map_err(r)? as u64,
    })
}

fn to_json<T: serde::Serialize>(v: &Option<T>) -> Result<Option<String>> {
    v.as_ref()
        .map(|v| serde_json::to_string(v).map_err(internal))
        .transpose()
}

/// A timestamp as this store keeps it: whole microseconds.
fn stored_ts(t: &mut Ts) {
    *t = from_micros(to_micros(*t));
}

/// Rounds every timestamp of a request, and those inside its new history
/// events, to what this store keeps (whole microseconds). Durations finer
/// than a microsecond (a jittered backoff, `"delay": 0.1234567`) would
/// otherwise put nanoseconds into the Request a write answers, which no
/// later read of the same request shows.
pub fn as_stored(req: &mut Request, events: &mut [HistoryEvent]) {
    stored_ts(&mut req.created_at);
    stored_ts(&mut req.updated_at);
    for t in [&mut req.run_after, &mut req.deadline, &mut req.finished_at]
        .into_iter()
        .flatten()
    {
        stored_ts(t);
    }
    if let Some(l) = req.lease.as_mut() {
        stored_ts(&mut l.expires_at);
    }
    for e in events {
        stored_ts(&mut e.at);
        match &mut e.kind {
            EventKind::Submitted {
                run_after: Some(t), ..
            } => stored_ts(t),
            EventKind::Claimed {
                lease_expires_at: t,
                ..
            } => stored_ts(t),
            EventKind::AttemptFailed { run_after: t, .. } => stored_ts(t),
            EventKind::ReplyDeliveryFailed {
                next_attempt_at: Some(t),
                ..
            } => stored_ts(t),
            _ => {}
        }
    }
}

/// Loads one request by id.
pub fn load(conn: &Connection, id: &str) -> Result<Option<Request>> {
    let mut stmt = conn.prepare_cached(&select_by_id()).map_err(classify)?;
    load_with(&mut stmt, id)
}

fn load_with(stmt: &mut rusqlite::Statement<'_>, id: &str) -> Result<Option<Request>> {
    let mut rows = stmt.query([id]).map_err(classify)?;
    match rows.next().map_err(classify)? {
        Some(row) => Ok(Some(row_to_request(row)?)),
        None => Ok(None),
    }
}

fn insert_with(
    stmt: &mut rusqlite::Statement<'_>,
    req: &Request,
    idem: Option<(&str, &str)>,
) -> Result<()> {
    let metadata = if req.metadata.is_empty() {
        None
    } else {
        Some(&req.metadata)
    };
    let lease = req.lease.as_ref();
    stmt.execute(rusqlite::params![
        req.id,
        req.tenant,
        req.queue,
        req.status.as_str(),
        req.priority,
        req.attempts,
        req.max_attempts,
        req.cancel_requested,
        req.correlation_id,
        req.input.get(),
        req.output.as_ref().map(|o| o.get()),
        to_json(&req.error)?,
        req.progress.as_ref().map(|p| p.get()),
        to_json(&req.reply_to)?,
        to_json(&metadata)?,
        req.fallback_queue,
        req.fallback_of,
        req.fallback_request_id,
        req.fairness_key,
        to_micros(req.created_at),
        to_micros(req.updated_at),
        req.run_after.map(to_micros),
        req.deadline.map(to_micros),
        req.finished_at.map(to_micros),
        lease.map(|l| &l.token),
        lease.map(|l| &l.worker_id),
        lease.map(|l| to_micros(l.expires_at)),
        lease.map(|l| l.duration_ms as i64),
        req.last_lease_token,
        req.history_seq as i64,
        idem.map(|i| i.0),
        idem.map(|i| i.1),
    ])
    .map_err(classify)?;
    Ok(())
}

fn update_with(stmt: &mut rusqlite::Statement<'_>, req: &Request) -> Result<()> {
    let lease = req.lease.as_ref();
    let n = stmt
        .execute(rusqlite::params![
            req.id,
            req.status.as_str(),
            req.priority,
            req.attempts,
            req.max_attempts,
            req.cancel_requested,
            req.output.as_ref().map(|o| o.get()),
            to_json(&req.error)?,
            req.progress.as_ref().map(|p| p.get()),
            req.fallback_request_id,
            to_micros(req.updated_at),
            req.run_after.map(to_micros),
            req.deadline.map(to_micros),
            req.finished_at.map(to_micros),
            lease.map(|l| &l.token),
            lease.map(|l| &l.worker_id),
            lease.map(|l| to_micros(l.expires_at)),
            lease.map(|l| l.duration_ms as i64),
            req.last_lease_token,
            req.history_seq as i64,
        ])
        .map_err(classify)?;
    if n != 1 {
        return Err(internal(format!("update of {} touched {n} rows", req.id)));
    }
    Ok(())
}

fn insert_history_with(
    stmt: &mut rusqlite::Statement<'_>,
    id: &str,
    events: &[HistoryEvent],
) -> Result<()> {
    for e in events {
        let body = serde_json::to_string(&e.kind).map_err(internal)?;
        stmt.execute(rusqlite::params![id, e.seq as i64, to_micros(e.at), body])
            .map_err(classify)?;
    }
    Ok(())
}

/// Reads history after `after_seq`.
pub fn history(conn: &Connection, id: &str, after_seq: u64) -> Result<Vec<HistoryEvent>> {
    let mut stmt = conn.prepare_cached(SELECT_HISTORY).map_err(classify)?;
    let rows = stmt
        .query_map(rusqlite::params![id, after_seq as i64], |row| {
            Ok((
                row.get::<_, i64>(0)?,
                row.get::<_, i64>(1)?,
                row.get::<_, String>(2)?,
            ))
        })
        .map_err(classify)?;
    let mut out = Vec::new();
    for row in rows {
        let (seq, at, body) = row.map_err(classify)?;
        let kind = serde_json::from_str(&body).map_err(internal)?;
        out.push(HistoryEvent {
            seq: seq as u64,
            at: from_micros(at),
            kind,
        });
    }
    Ok(out)
}

/// Ids from a one-column query with two parameters.
pub fn ids(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Vec<String>> {
    let mut stmt = conn.prepare_cached(sql).map_err(classify)?;
    let rows = stmt
        .query_map(params, |row| row.get::<_, String>(0))
        .map_err(classify)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(classify)
}

/// A single optional timestamp from a `min(...)` query.
pub fn min_ts(conn: &Connection, sql: &str, params: impl rusqlite::Params) -> Result<Option<Ts>> {
    let mut stmt = conn.prepare_cached(sql).map_err(classify)?;
    let v: Option<i64> = stmt
        .query_row(params, |row| row.get(0))
        .optional()
        .map_err(classify)?
        .flatten();
    Ok(v.map(from_micros))
}

pub const INSERT_CHANNEL_MESSAGE: &str = "INSERT INTO channel_messages \
    (tenant, channel, message_id, request_id, body, visible_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)";

pub const SELECT_CHANNEL_VISIBLE: &str = "SELECT seq, body, deliveries FROM channel_messages \
    WHERE tenant = ?1 AND channel = ?2 AND visible_at <= ?3 ORDER BY seq LIMIT ?4";

pub const UPDATE_CHANNEL_DELIVERED: &str =
    "UPDATE channel_messages SET visible_at = ?2, deliveries = deliveries + 1, ack_token = ?3 WHERE seq = ?1";

pub const DELETE_CHANNEL_ACKED: &str =
    "DELETE FROM channel_messages WHERE tenant = ?1 AND channel = ?2 AND ack_token = ?3 AND visible_at > ?4";

pub const DELETE_CHANNEL_BEFORE: &str = "DELETE FROM channel_messages WHERE seq IN \
    (SELECT seq FROM channel_messages WHERE created_at < ?1 ORDER BY created_at LIMIT ?2)";

pub const NEXT_CHANNEL_VISIBLE: &str =
    "SELECT min(visible_at) FROM channel_messages WHERE deliveries > 0 AND visible_at > ?1";

pub const INSERT_WEBHOOK: &str = "INSERT INTO webhook_deliveries \
    (message_id, request_id, url, body, attempts, state, next_attempt_at, created_at) \
    VALUES (?1, ?2, ?3, ?4, 0, 'pending', ?5, ?5)";

pub const SELECT_WEBHOOKS_DUE: &str = "SELECT message_id, request_id, url, body, attempts, created_at \
    FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= ?1 ORDER BY next_attempt_at LIMIT ?2";

pub const LEASE_WEBHOOK: &str =
    "UPDATE webhook_deliveries SET next_attempt_at = ?2 WHERE message_id = ?1";

pub const RECORD_WEBHOOK: &str =
    "UPDATE webhook_deliveries SET attempts = ?2, state = ?3, next_attempt_at = ?4 \
    WHERE message_id = ?1 AND state = 'pending'";

pub const SELECT_WEBHOOK_REQUEST: &str =
    "SELECT request_id FROM webhook_deliveries WHERE message_id = ?1";

pub const NEXT_WEBHOOK: &str =
    "SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'";

/// The oldest finished requests before `?1`, at most `?2`.
pub const SELECT_PURGEABLE: &str = "SELECT id, queue, status FROM requests WHERE finished_at IS NOT NULL \
    AND finished_at < ?1 AND status IN ('succeeded', 'failed', 'cancelled', 'expired') ORDER BY finished_at LIMIT ?2";

pub const DELETE_REQUEST: &str = "DELETE FROM requests WHERE id = ?1";

pub const DELETE_HISTORY: &str = "DELETE FROM history WHERE request_id = ?1";

pub const DELETE_SETTLED_WEBHOOKS: &str =
    "DELETE FROM webhook_deliveries WHERE request_id = ?1 AND state <> 'pending'";

#[cfg(test)]
mod tests {
    use super::*;

    fn request(id: &str, input: &str) -> Request {
        serde_json::from_value(serde_json::json!({
            "id": id, "tenant": "t", "queue": "q", "status": "queued",
            "priority": 0, "attempts": 0, "max_attempts": 3, "cancel_requested": false,
            "input": serde_json::from_str::<serde_json::Value>(input).unwrap(),
            "fairness_key": "", "created_at": "2026-01-01T00:00:00Z",
            "updated_at": "2026-01-01T00:00:00Z", "history_seq": 1
        }))
        .expect("a request")
    }

    #[test]
    fn recent_requests_stay_within_count_and_bytes() {
        let mut r = Recent::default();
        // Written again (claimed): one entry, its bytes those of the latest.
        r.wrote(&request("again", "1"));
        let longer = request("again", r#"{"more": "input"}"#);
        r.wrote(&longer);
        assert_eq!((r.by_id.len(), r.order.len()), (1, 1));
        assert_eq!(r.bytes, Recent::size(&longer));
        r.remove("again");
        for i in 0..Recent::CAP + 10 {
            r.wrote(&request(&format!("r{i}"), "1"));
        }
        assert_eq!(r.by_id.len(), Recent::CAP);
        assert!(r.get("r0").is_none() && r.get(&format!("r{}", Recent::CAP + 9)).is_some());

        // Payloads count: a few hundred 32 KiB inputs fill the budget.
        let big = format!("\"{}\"", "x".repeat(32 * 1024));
        for i in 0..1000 {
            r.wrote(&request(&format!("b{i}"), &big));
        }
        assert!(r.bytes <= Recent::BUDGET, "{} bytes kept", r.bytes);
        assert!(r.get("b999").is_some());
        // Too large to keep at all; finished ones are dropped.
        let huge = format!("\"{}\"", "x".repeat(Recent::LARGEST));
        r.wrote(&request("h", &huge));
        assert!(r.get("h").is_none());
        let mut done = request("b999", &big);
        done.status = Status::Succeeded;
        r.wrote(&done);
        assert!(r.get("b999").is_none());
        // The byte count is exact: dropping all leaves nothing.
        let ids: Vec<String> = r.by_id.keys().cloned().collect();
        for id in ids {
            r.remove(&id);
        }
        assert_eq!(r.bytes, 0);
    }
}
