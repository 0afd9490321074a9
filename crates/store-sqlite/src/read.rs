//! Reads: a small pool of read-only connections used from blocking tasks.
//! In WAL mode they see the last commit and never wait for the writer.

use std::path::PathBuf;
use std::sync::Mutex;

use coatcheck_core::clock::to_micros;
use coatcheck_core::{Request, Ts};
use coatcheck_store::{DueTimes, ListParams, QueueCounts, RequestRef, Result, StoreError};
use rusqlite::{Connection, OpenFlags};

use crate::sql;

/// Idle read connections kept for reuse.
const MAX_IDLE: usize = 8;

pub struct ReadPool {
    db: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl ReadPool {
    pub fn new(db: PathBuf) -> Self {
        ReadPool {
            db,
            idle: Mutex::new(Vec::new()),
        }
    }

    fn take(&self) -> Result<Connection> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop() {
            return Ok(c);
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.db, flags).map_err(sql::classify)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(sql::classify)?;
        conn.set_prepared_statement_cache_capacity(64);
        Ok(conn)
    }

    fn give_back(&self, conn: Connection) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push(conn);
        }
    }

    /// Runs a point read (one row by key, a request's history) on a read
    /// connection right here: it takes microseconds and never waits for the
    /// writer (WAL), so a hand-off to a blocking thread would cost more than
    /// the read itself.
    pub fn run_now<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        let conn = self.take()?;
        let res = f(&conn);
        self.give_back(conn);
        res
    }

    /// Runs `f` on a read connection in a blocking task (scans: lists, stats).
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let conn = self.take()?;
        let (conn, res) = tokio::task::spawn_blocking(move || {
            let res = f(&conn);
            (conn, res)
        })
        .await
        .map_err(|e| StoreError::Internal(e.to_string()))?;
        self.give_back(conn);
        res
    }
}

pub fn get(c: &Connection, r: &RequestRef) -> Result<Request> {
    let req = sql::load(c, &r.id)?.ok_or(StoreError::NotFound)?;
    match &r.tenant {
        Some(t) if *t != req.tenant => Err(StoreError::NotFound),
        _ => Ok(req),
    }
}

pub fn list(c: &Connection, p: &ListParams) -> Result<Vec<Request>> {
    let (q, args) = sql::list_query(p);
    let mut stmt = c.prepare_cached(&q).map_err(sql::classify)?;
    let mut rows = stmt
        .query(rusqlite::params_from_iter(args))
        .map_err(sql::classify)?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(sql::classify)? {
        out.push(sql::row_to_request(row)?);
    }
    Ok(out)
}

pub fn due_times(c: &Connection, now: Ts) -> Result<DueTimes> {
    Ok(DueTimes {
        lease_expiry: sql::min_ts(c, sql::NEXT_LEASE_EXPIRY, [])?,
        deadline: sql::min_ts(c, sql::NEXT_DEADLINE, [])?,
        run_after: sql::min_ts(c, sql::NEXT_RUN_AFTER, [to_micros(now)])?,
        channel_visible: sql::min_ts(c, sql::NEXT_CHANNEL_VISIBLE, [to_micros(now)])?,
        webhook: sql::min_ts(c, sql::NEXT_WEBHOOK, [])?,
    })
}

pub fn queue_stats(c: &Connection, now: Ts) -> Result<Vec<QueueCounts>> {
    let mut out: Vec<QueueCounts> = Vec::new();
    let mut stmt = c.prepare_cached(sql::QUEUE_COUNTS).map_err(sql::classify)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
            ))
        })
        .map_err(sql::classify)?;
    for row in rows {
        let (queue, status, n) = row.map_err(sql::classify)?;
        QueueCounts::add_row(&mut out, queue, &status, n);
    }
    let mut stmt = c
        .prepare_cached(sql::QUEUE_OLDEST_READY)
        .map_err(sql::classify)?;
    let rows = stmt
        .query_map([to_micros(now)], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
        })
        .map_err(sql::classify)?;
    for row in rows {
        let (queue, oldest) = row.map_err(sql::classify)?;
        if let Some(q) = out.iter_mut().find(|q| q.queue == queue) {
            q.oldest_ready = Some(coatcheck_core::clock::from_micros(oldest));
        }
    }
    Ok(out)
}
