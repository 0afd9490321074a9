//! Reads: one pooled connection each, no transaction (every read is one
//! statement, or two pipelined ones that need not agree to the instant).
//!
//! A read whose connection turns out closed (the database restarted or
//! ended the session, and the pool handed the connection out before its
//! task saw the end) runs once more on a fresh connection: reads change
//! nothing, so asking again is safe, and the caller gets an answer instead
//! of a `503`. If the database is really gone, the fresh connection fails
//! fast and the `503` stands.

use coatcheck_core::clock::truncate;
use coatcheck_core::{HistoryEvent, Request, Ts};
use coatcheck_store::{DueTimes, ListParams, QueueCounts, RequestRef, Result, StoreError};
use tokio_postgres::types::ToSql;

use crate::error::{classify, internal, pool};
use crate::sql;
use crate::Inner;

/// Runs `$body` with `$client` bound to a pooled connection; once more on a
/// fresh one if the first turned out closed.
macro_rules! read {
    ($self:ident, |$client:ident| $body:block) => {{
        let mut fresh = false;
        loop {
            let $client = $self.pool.get().await.map_err(pool)?;
            let res = async { $body }.await;
            match res {
                Err(StoreError::Unavailable(why)) if !fresh && $client.is_closed() => {
                    tracing::debug!(%why, "a pooled connection was closed; reading on a fresh one");
                    fresh = true;
                }
                other => break other,
            }
        }
    }};
}

impl Inner {
    pub async fn get(&self, id: &str) -> Result<Request> {
        read!(self, |client| {
            let stmt = client
                .prepare_cached(sql::SELECT_REQUEST)
                .await
                .map_err(classify)?;
            let rows = client.query(&stmt, &[&id]).await.map_err(classify)?;
            match rows.first() {
                Some(row) => sql::row_to_request(row),
                None => Err(StoreError::NotFound),
            }
        })
    }

    pub async fn get_scoped(&self, r: &RequestRef) -> Result<Request> {
        let req = self.get(&r.id).await?;
        match &r.tenant {
            Some(t) if *t != req.tenant => Err(StoreError::NotFound),
            _ => Ok(req),
        }
    }

    pub async fn history(&self, r: &RequestRef, after_seq: u64) -> Result<Vec<HistoryEvent>> {
        read!(self, |client| {
            let (get, hist) = tokio::join!(
                client.prepare_cached(sql::SELECT_REQUEST),
                client.prepare_cached(sql::SELECT_HISTORY)
            );
            let (get, hist) = (get.map_err(classify)?, hist.map_err(classify)?);
            let after = after_seq.min(i64::MAX as u64) as i64;
            let get_params: [&(dyn ToSql + Sync); 1] = [&r.id];
            let hist_params: [&(dyn ToSql + Sync); 2] = [&r.id, &after];
            let (req, events) = tokio::join!(
                client.query(&get, &get_params),
                client.query(&hist, &hist_params)
            );
            let req = req.map_err(classify)?;
            let req = sql::row_to_request(req.first().ok_or(StoreError::NotFound)?)?;
            if r.tenant.as_ref().is_some_and(|t| *t != req.tenant) {
                return Err(StoreError::NotFound);
            }
            events
                .map_err(classify)?
                .iter()
                .map(sql::row_to_event)
                .collect()
        })
    }

    pub async fn list(&self, p: &ListParams) -> Result<Vec<Request>> {
        read!(self, |client| {
            let stmt = client
                .prepare_cached(&sql::list_query(p))
                .await
                .map_err(classify)?;
            let params = sql::list_params(p);
            let refs: Vec<&(dyn ToSql + Sync)> = params
                .iter()
                .map(|b| b.as_ref() as &(dyn ToSql + Sync))
                .collect();
            let rows = client.query(&stmt, &refs).await.map_err(classify)?;
            rows.iter().map(sql::row_to_request).collect()
        })
    }

    pub async fn due_times(&self, now: Ts) -> Result<DueTimes> {
        let now = truncate(now);
        read!(self, |client| {
            let stmt = client
                .prepare_cached(sql::DUE_TIMES)
                .await
                .map_err(classify)?;
            let row = client.query_one(&stmt, &[&now]).await.map_err(classify)?;
            let t = |i: usize| row.try_get::<_, Option<Ts>>(i).map_err(internal);
            Ok(DueTimes {
                lease_expiry: t(0)?,
                deadline: t(1)?,
                run_after: t(2)?,
                channel_visible: t(3)?,
                webhook: t(4)?,
            })
        })
    }

    pub async fn queue_depth(&self, queue: &str) -> Result<u64> {
        read!(self, |client| {
            let stmt = client
                .prepare_cached(sql::QUEUE_DEPTH)
                .await
                .map_err(classify)?;
            let row = client.query_one(&stmt, &[&queue]).await.map_err(classify)?;
            Ok(row.try_get::<_, i64>(0).map_err(internal)? as u64)
        })
    }

    /// A named secret, created (32 random bytes) by the first caller on any node.
    pub async fn secret(&self, name: &str) -> Result<Vec<u8>> {
        read!(self, |client| {
            let (insert, select) = tokio::join!(
                client.prepare_cached(sql::INSERT_SECRET),
                client.prepare_cached(sql::SELECT_SECRET)
            );
            let (insert, select) = (insert.map_err(classify)?, select.map_err(classify)?);
            let fresh: Vec<u8> = rand::random::<[u8; 32]>().to_vec();
            let insert_params: [&(dyn ToSql + Sync); 2] = [&name, &fresh];
            let select_params: [&(dyn ToSql + Sync); 1] = [&name];
            // Pipelined; the select runs after the insert, with a snapshot of its own.
            let (inserted, found) = tokio::join!(
                client.execute(&insert, &insert_params),
                client.query(&select, &select_params)
            );
            inserted.map_err(classify)?;
            let rows = found.map_err(classify)?;
            let row = rows
                .first()
                .ok_or_else(|| StoreError::Internal(format!("secret {name} vanished")))?;
            row.try_get(0).map_err(internal)
        })
    }

    pub async fn queue_stats(&self, now: Ts) -> Result<Vec<QueueCounts>> {
        let now = truncate(now);
        read!(self, |client| {
            let (counts, oldest) = tokio::join!(
                client.prepare_cached(sql::QUEUE_COUNTS),
                client.prepare_cached(sql::QUEUE_OLDEST_READY)
            );
            let (counts, oldest) = (counts.map_err(classify)?, oldest.map_err(classify)?);
            let oldest_params: [&(dyn ToSql + Sync); 1] = [&now];
            let (counts, oldest) = tokio::join!(
                client.query(&counts, &[]),
                client.query(&oldest, &oldest_params)
            );
            let mut out: Vec<QueueCounts> = Vec::new();
            for row in counts.map_err(classify)? {
                let queue: String = row.try_get(0).map_err(internal)?;
                let status: String = row.try_get(1).map_err(internal)?;
                let n: i64 = row.try_get(2).map_err(internal)?;
                QueueCounts::add_row(&mut out, queue, &status, n);
            }
            for row in oldest.map_err(classify)? {
                let queue: String = row.try_get(0).map_err(internal)?;
                let at: Option<Ts> = row.try_get(1).map_err(internal)?;
                if let Some(q) = out.iter_mut().find(|q| q.queue == queue) {
                    q.oldest_ready = at;
                }
            }
            Ok(out)
        })
    }
}
