//! Every write: load (and lock) → call the rule → persist, in one
//! transaction; then announce the change to other nodes.
//!
//! Rows are locked with `SELECT … FOR UPDATE`, so concurrent writers of one
//! request (a complete racing the reaper, a cancel racing a heartbeat) are
//! serialized and each applies its rule to the state the other committed.
//! Work that sweeps many rows — claims, lease and deadline expiry — locks
//! with `FOR UPDATE SKIP LOCKED`, so any number of nodes may sweep at once:
//! each takes rows no one else holds, and every rule re-checks the locked
//! row, so nothing is ever transitioned twice.
//!
//! Whatever a transaction changed is written with one statement per table
//! (`unnest` of arrays), then `COMMIT`, in one round trip ([`Batch`]).

use std::collections::HashMap;

use coatcheck_core::clock::{add, truncate};
use coatcheck_core::model::{new_lease_token, new_request_id};
use coatcheck_core::rules::{self, CancelOutcome};
use coatcheck_core::wire::ChannelMessage;
use coatcheck_core::{HistoryEvent, ReplyTo, Request, Status, Ts};
use coatcheck_store::{
    Changed, ChannelReceiveParams, HeartbeatParams, RequestRef, Result, SettleParams, Settlement,
    StoreError, SubmitParams, Submitted, WebhookDelivery, WebhookOutcome,
};
use serde_json::value::RawValue;
use tokio_postgres::types::ToSql;

use crate::error::{classify, internal, pool};
use crate::listen;
use crate::sql::{self, History, NewRow, PayloadUpdates, Updates};
use crate::tx::{Tx, Write};
use crate::Inner;

/// A request as loaded: its payloads, to tell whether a transition changed
/// them (most do not, and then `request_payloads` is not written), and its
/// status, for the queue counts.
struct Payloads {
    output: Option<Box<RawValue>>,
    progress: Option<Box<RawValue>>,
    status: Status,
}

impl Payloads {
    fn of(req: &Request) -> Self {
        Payloads {
            output: req.output.clone(),
            progress: req.progress.clone(),
            status: req.status,
        }
    }

    fn changed_in(&self, req: &Request) -> bool {
        !Request::same_output(self.output.as_deref(), req.output.as_deref())
            || !Request::same_output(self.progress.as_deref(), req.progress.as_deref())
    }
}

/// A reply to append to a channel or to queue for webhook delivery.
struct ReplyRow {
    to: ReplyTo,
    tenant: String,
    message_id: String,
    request_id: String,
    body: String,
    at: Ts,
}

/// Everything one transaction writes, collected while the rules run.
#[derive(Default)]
pub(crate) struct Batch {
    /// Changed requests, last state per id (a batch may change one twice).
    changed: Vec<Request>,
    position: HashMap<String, usize>,
    /// Payloads as first loaded, per id.
    before: HashMap<String, Payloads>,
    history: History,
    inserts: Vec<NewRow>,
    replies: Vec<ReplyRow>,
    /// Changes to the queue counts.
    counts: coatcheck_store::CountChanges,
}

impl Batch {
    /// Records a request as loaded, before any rule changes it (the first
    /// load counts, if a batch loads one twice).
    pub(crate) fn loaded(&mut self, req: &Request) {
        self.before
            .entry(req.id.clone())
            .or_insert_with(|| Payloads::of(req));
    }

    /// Records a changed request and its new events.
    pub(crate) fn update(&mut self, req: &Request, events: &[HistoryEvent]) -> Result<()> {
        self.history.push(&req.id, events)?;
        match self.position.get(&req.id) {
            Some(&i) => self.changed[i] = req.clone(),
            None => {
                self.position.insert(req.id.clone(), self.changed.len());
                self.changed.push(req.clone());
            }
        }
        Ok(())
    }

    /// Records a new request (a fallback) and its events.
    fn insert(&mut self, req: &Request, events: &[HistoryEvent]) -> Result<()> {
        self.inserts.push(NewRow::new(req, events, None)?);
        self.counts.add(&req.queue, req.status, 1);
        Ok(())
    }

    fn reply(&mut self, req: &Request, reply: &rules::Reply, now: Ts) -> Result<()> {
        self.replies.push(ReplyRow {
            to: reply.to.clone(),
            tenant: req.tenant.clone(),
            message_id: reply.message.message_id.clone(),
            request_id: req.id.clone(),
            body: serde_json::to_string(&reply.message).map_err(internal)?,
            at: now,
        });
        Ok(())
    }

    /// Writes everything and commits.
    pub(crate) async fn commit(mut self, tx: Tx) -> Result<()> {
        let mut updates = Updates::default();
        let mut payloads = PayloadUpdates::default();
        for req in &self.changed {
            updates.push(req)?;
            match self.before.get(&req.id) {
                Some(b) => {
                    if b.changed_in(req) {
                        payloads.push(req);
                    }
                    self.counts.moved(&req.queue, b.status, req.status);
                }
                None => {
                    return Err(internal(format!(
                        "request {} changed without being recorded as loaded",
                        req.id
                    )))
                }
            }
        }
        let counts = self.counts.take();
        let count_queues: Vec<&str> = counts.iter().map(|(q, _, _)| q.as_str()).collect();
        let count_statuses: Vec<&str> = counts.iter().map(|(_, s, _)| s.as_str()).collect();
        let count_changes: Vec<i64> = counts.iter().map(|(_, _, n)| *n).collect();
        let update_params = updates.params();
        let payload_write = payloads.write();
        let history_params = self.history.params();
        let mut writes: Vec<Write<'_>> = Vec::new();
        // A reply may be delivered, or a fallback claimed, right after the
        // commit: a crash must not undo it, so its commit is durable even
        // in a relaxed transaction (a sweep's).
        if tx.is_relaxed() && (!self.replies.is_empty() || !self.inserts.is_empty()) {
            writes.push((crate::tx::DURABLE_COMMIT, Vec::new()));
        }
        if !updates.is_empty() {
            writes.push((sql::UPDATE_REQUESTS, update_params.to_vec()));
        }
        if !payloads.is_empty() {
            writes.push(payload_write);
        }
        if !self.history.is_empty() {
            writes.push((sql::INSERT_HISTORY, history_params.to_vec()));
        }
        if !count_changes.is_empty() {
            writes.push((
                sql::ADD_QUEUE_COUNTS,
                vec![&count_queues, &count_statuses, &count_changes],
            ));
        }
        let insert_params: Vec<_> = self.inserts.iter().map(|r| r.params()).collect();
        for p in insert_params {
            writes.push((sql::INSERT_REQUEST, p));
        }
        for r in &self.replies {
            match &r.to {
                ReplyTo::Channel(channel) => writes.push((
                    sql::INSERT_CHANNEL_MESSAGE,
                    vec![
                        &r.tenant as &(dyn ToSql + Sync),
                        channel,
                        &r.message_id,
                        &r.request_id,
                        &r.body,
                        &r.at,
                    ],
                )),
                ReplyTo::Webhook(w) => writes.push((
                    sql::INSERT_WEBHOOK,
                    vec![
                        &r.message_id as &(dyn ToSql + Sync),
                        &r.request_id,
                        &w.url,
                        &r.body,
                        &r.at,
                    ],
                )),
            }
        }
        if writes.is_empty() {
            tx.rollback().await;
            return Ok(());
        }
        let first_update = writes
            .iter()
            .position(|(sql, _)| *sql == sql::UPDATE_REQUESTS);
        let counts = tx.commit(&writes).await?;
        if let Some(i) = first_update.filter(|&i| counts[i] != updates.len() as u64) {
            let counts = counts[i];
            tracing::error!(
                expected = updates.len(),
                updated = counts,
                "a transition updated fewer rows than it locked"
            );
        }
        Ok(())
    }
}

fn scoped(req: Request, r: &RequestRef) -> Result<Request> {
    match &r.tenant {
        Some(t) if *t != req.tenant => Err(StoreError::NotFound),
        _ => Ok(req),
    }
}

impl Inner {
    /// Loads and locks one request (until the transaction ends).
    async fn lock(&self, tx: &mut Tx, id: &str) -> Result<Request> {
        let rows = tx.query(sql::LOCK_REQUEST, &[&id]).await?;
        match rows.first() {
            Some(row) => sql::row_to_request(row),
            None => Err(StoreError::NotFound),
        }
    }

    /// Saves a transitioned request into the batch — and, in the same
    /// transaction, the fallback request if it just dead-lettered with a
    /// fallback queue, and its reply if it just became terminal with a
    /// return address (mirroring the embedded store).
    fn after_transition(
        &self,
        batch: &mut Batch,
        mut req: Request,
        mut events: Vec<HistoryEvent>,
        now: Ts,
    ) -> Result<Changed> {
        let mut spawned = None;
        if !events.is_empty() {
            if let Some((new, more)) = rules::fallback(&mut req, new_request_id(), now) {
                events.extend(more);
                let (fb, fb_events) = rules::submit(new, now);
                batch.insert(&fb, &fb_events)?;
                spawned = Some(fb);
            }
        }
        let reply = rules::reply(&mut req, &mut events, now);
        batch.update(&req, &events)?;
        if let Some(r) = &reply {
            batch.reply(&req, r, now)?;
        }
        Ok(Changed {
            request: req,
            spawned,
            reply: reply.map(|r| r.to),
        })
    }

    /// Runs one transition of one locked request and commits it.
    async fn transition<T>(
        &self,
        r: RequestRef,
        now: Ts,
        rule: impl FnOnce(&mut Request) -> Result<(T, Vec<HistoryEvent>)>,
    ) -> Result<(T, Changed)> {
        let mut tx = Tx::start(&self.pool).await?;
        let res = async {
            let mut req = scoped(self.lock(&mut tx, &r.id).await?, &r)?;
            let mut batch = Batch::default();
            batch.loaded(&req);
            let (out, events) = rule(&mut req)?;
            let changed = self.after_transition(&mut batch, req, events, now)?;
            Ok((out, changed, batch))
        }
        .await;
        match res {
            Ok((out, changed, batch)) => {
                batch.commit(tx).await?;
                self.announce(changed_entries([&changed])).await;
                Ok((out, changed))
            }
            Err(e) => tx.end(Err(e)).await,
        }
    }

    pub async fn submit(&self, p: SubmitParams) -> Result<Submitted> {
        let now = truncate(p.now);
        let (req, events) = rules::submit(p.new, now);
        // Group-committed with other submits (see `group.rs`), which also
        // takes the idempotency key and announces the request.
        let (done, written) = tokio::sync::oneshot::channel();
        let call = crate::group::Submit {
            req,
            events,
            idem: p.idempotency,
            done,
        };
        if !self.submits.send(call) {
            return Err(crate::tx::closed());
        }
        written.await.map_err(|_| crate::tx::closed())?
    }

    pub async fn heartbeat(&self, p: HeartbeatParams) -> Result<Changed> {
        let now = truncate(p.now);
        let HeartbeatParams {
            id,
            lease_token,
            progress,
            extend,
            ..
        } = p;
        let ((), changed) = self
            .transition(RequestRef::any(id), now, |req| {
                Ok((
                    (),
                    rules::heartbeat(req, &lease_token, progress, extend, now)?,
                ))
            })
            .await?;
        Ok(changed)
    }

    pub async fn cancel(&self, r: RequestRef, now: Ts) -> Result<(CancelOutcome, Changed)> {
        let now = truncate(now);
        self.transition(r, now, |req| Ok(rules::cancel(req, now)?))
            .await
    }

    pub async fn redrive(&self, r: RequestRef, now: Ts) -> Result<Changed> {
        let now = truncate(now);
        let ((), changed) = self
            .transition(r, now, |req| Ok(((), rules::redrive(req, now)?)))
            .await?;
        Ok(changed)
    }

    /// Settlements, group-committed with other callers' (see `group.rs`).
    pub async fn settle_many(
        &self,
        items: Vec<SettleParams>,
        now: Ts,
    ) -> Result<Vec<Result<Changed>>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let (done, settled) = tokio::sync::oneshot::channel();
        let call = crate::group::Settle { items, now, done };
        if !self.settles.send(call) {
            return Err(crate::tx::closed());
        }
        settled.await.map_err(|_| crate::tx::closed())?
    }

    /// Applies settlement items (each with its own `now`) in one
    /// transaction; each item's outcome is independent of the others'.
    pub async fn settle_items(
        &self,
        items: Vec<(SettleParams, Ts)>,
    ) -> Result<Vec<Result<Changed>>> {
        let mut ids: Vec<&str> = items.iter().map(|(i, _)| i.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        let mut tx = Tx::start(&self.pool).await?;
        // One request (the common case) by the one-row statement: the
        // many-row one is planned anew at every execution.
        let locked = match ids.as_slice() {
            [one] => tx.query(sql::LOCK_REQUEST, &[one]).await,
            _ => tx.query(sql::LOCK_REQUESTS, &[&ids]).await,
        };
        let rows = match locked {
            Ok(rows) => rows,
            Err(e) => return tx.end(Err(e)).await,
        };
        let mut current: HashMap<String, Request> = HashMap::with_capacity(rows.len());
        let mut batch = Batch::default();
        for row in &rows {
            let req = match sql::row_to_request(row) {
                Ok(r) => r,
                Err(e) => return tx.end(Err(e)).await,
            };
            batch.loaded(&req);
            current.insert(req.id.clone(), req);
        }
        let mut out = Vec::with_capacity(items.len());
        for (item, now) in items {
            let now = truncate(now);
            let res = match current.get(&item.id) {
                None => Err(StoreError::NotFound),
                Some(req) if item.queue.as_ref().is_some_and(|q| *q != req.queue) => {
                    Err(StoreError::NotFound)
                }
                Some(req) => {
                    let mut req = req.clone();
                    self.settle_one(&mut batch, &mut req, item, now)
                        .inspect(|changed| {
                            current.insert(changed.request.id.clone(), changed.request.clone());
                        })
                }
            };
            out.push(res);
        }
        batch.commit(tx).await?;
        let entries = changed_entries(out.iter().filter_map(|r| r.as_ref().ok()));
        self.announce(entries).await;
        Ok(out)
    }

    fn settle_one(
        &self,
        batch: &mut Batch,
        req: &mut Request,
        item: SettleParams,
        now: Ts,
    ) -> Result<Changed> {
        let events = match item.settlement {
            Settlement::Complete { output } => {
                rules::complete(req, &item.lease_token, output, now)?
            }
            Settlement::Fail {
                error,
                retryable,
                retry_after,
            } => rules::fail(
                req,
                &item.lease_token,
                error,
                retryable,
                retry_after,
                &self.retry,
                rand::random::<f64>(),
                now,
            )?,
        };
        self.after_transition(batch, req.clone(), events, now)
    }

    /// Lease expiry or deadline expiry of up to `limit` due requests.
    async fn sweep(
        &self,
        lock_sql: &str,
        now: Ts,
        limit: u32,
        rule: fn(&mut Request, Ts) -> std::result::Result<Vec<HistoryEvent>, rules::RuleError>,
    ) -> Result<Vec<Changed>> {
        let now = truncate(now);
        if limit == 0 {
            return Ok(Vec::new());
        }
        // A sweep a crash undoes simply runs again: no WAL flush wait.
        let mut tx = Tx::start_relaxed(&self.pool).await?;
        let rows = match tx.query(lock_sql, &[&now, &(limit as i64)]).await {
            Ok(rows) => rows,
            Err(e) => return tx.end(Err(e)).await,
        };
        if rows.is_empty() {
            tx.rollback().await;
            return Ok(Vec::new());
        }
        let mut batch = Batch::default();
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut req = match sql::row_to_request(row) {
                Ok(r) => r,
                Err(e) => return tx.end(Err(e)).await,
            };
            batch.loaded(&req);
            if let Ok(events) = rule(&mut req, now) {
                out.push(self.after_transition(&mut batch, req, events, now)?);
            }
        }
        batch.commit(tx).await?;
        self.announce(changed_entries(&out)).await;
        Ok(out)
    }

    pub async fn expire_leases(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.sweep(sql::LOCK_LEASES_DUE, now, limit, rules::expire_lease)
            .await
    }

    pub async fn expire_deadlines(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.sweep(sql::LOCK_DEADLINES_DUE, now, limit, rules::expire_deadline)
            .await
    }

    pub async fn channel_receive(&self, p: ChannelReceiveParams) -> Result<Vec<ChannelMessage>> {
        if p.max == 0 {
            return Ok(Vec::new());
        }
        let now = truncate(p.now);
        let hidden_until = add(now, p.visibility);
        let tokens: Vec<String> = (0..p.max).map(|_| new_lease_token()).collect();
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::RECEIVE_CHANNEL)
            .await
            .map_err(classify)?;
        let rows = client
            .query(
                &stmt,
                &[
                    &p.tenant,
                    &p.channel,
                    &now,
                    &hidden_until,
                    &tokens,
                    &(p.max as i64),
                ],
            )
            .await
            .map_err(classify)?;
        let mut got = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.try_get(0).map_err(internal)?;
            let body: String = row.try_get(1).map_err(internal)?;
            let deliveries: i32 = row.try_get(2).map_err(internal)?;
            let ack_token: String = row.try_get(3).map_err(internal)?;
            let message = serde_json::from_str(&body).map_err(internal)?;
            got.push((
                seq,
                ChannelMessage {
                    message,
                    ack_token,
                    delivery_count: deliveries as u32,
                },
            ));
        }
        got.sort_by_key(|(seq, _)| *seq);
        Ok(got.into_iter().map(|(_, m)| m).collect())
    }

    pub async fn channel_ack(
        &self,
        tenant: String,
        channel: String,
        tokens: Vec<String>,
        now: Ts,
    ) -> Result<Vec<bool>> {
        let now = truncate(now);
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::ACK_CHANNEL)
            .await
            .map_err(classify)?;
        let rows = client
            .query(&stmt, &[&tenant, &channel, &tokens, &now])
            .await
            .map_err(classify)?;
        let mut acked = std::collections::HashSet::with_capacity(rows.len());
        for row in rows {
            acked.insert(row.try_get::<_, String>(0).map_err(internal)?);
        }
        Ok(tokens.iter().map(|t| acked.remove(t)).collect())
    }

    pub async fn channel_purge(&self, before: Ts, limit: u32) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::PURGE_CHANNEL)
            .await
            .map_err(classify)?;
        client
            .execute(&stmt, &[&before, &(limit as i64)])
            .await
            .map_err(classify)
    }

    pub async fn webhook_claim(
        &self,
        now: Ts,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<WebhookDelivery>> {
        let now = truncate(now);
        let until = add(now, lease);
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::CLAIM_WEBHOOKS)
            .await
            .map_err(classify)?;
        let rows = client
            .query(&stmt, &[&now, &(limit as i64), &until])
            .await
            .map_err(classify)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(WebhookDelivery {
                message_id: row.try_get(0).map_err(internal)?,
                request_id: row.try_get(1).map_err(internal)?,
                url: row.try_get(2).map_err(internal)?,
                body: row.try_get(3).map_err(internal)?,
                attempt: row.try_get::<_, i32>(4).map_err(internal)? as u32 + 1,
                created_at: row.try_get(5).map_err(internal)?,
            });
        }
        out.sort_by_key(|d| d.created_at);
        Ok(out)
    }

    pub async fn webhook_record(&self, o: WebhookOutcome) -> Result<()> {
        let now = truncate(o.now);
        let state = if o.delivered {
            "delivered"
        } else if o.next_attempt_at.is_some() {
            "pending"
        } else {
            "failed"
        };
        let next = o.next_attempt_at.map(truncate);
        let mut tx = Tx::start(&self.pool).await?;
        let res = async {
            let rows = tx
                .query(
                    sql::RECORD_WEBHOOK,
                    &[&o.message_id, &(o.attempt as i32), &state, &next],
                )
                .await?;
            let Some(row) = rows.first() else {
                return Ok(None); // already settled (e.g. by a slower duplicate attempt)
            };
            let request_id: String = row.try_get(0).map_err(internal)?;
            let mut req = self.lock(&mut tx, &request_id).await?;
            let mut batch = Batch::default();
            batch.loaded(&req);
            let kind = o.history_event(next);
            let events = rules::record(&mut req, kind, now);
            batch.update(&req, &events)?;
            Ok(Some(batch))
        }
        .await;
        match res {
            Ok(Some(batch)) => batch.commit(tx).await,
            Ok(None) => tx.commit(&[]).await.map(|_| ()),
            Err(e) => tx.end(Err(e)).await,
        }
    }

    /// Retention: deletes up to `limit` requests finished before `before`.
    pub async fn purge_finished(&self, before: Ts, limit: u32) -> Result<u64> {
        let client = self.pool.get().await.map_err(pool)?;
        let stmt = client
            .prepare_cached(sql::PURGE_FINISHED)
            .await
            .map_err(classify)?;
        let row = client
            .query_one(&stmt, &[&before, &(limit as i64)])
            .await
            .map_err(classify)?;
        let purged: i64 = row.try_get(0).map_err(internal)?;
        // Retention runs on every node now and then: a good time to fold the
        // count rows of connections that are gone.
        let fold = client
            .prepare_cached(sql::FOLD_QUEUE_COUNTS)
            .await
            .map_err(classify)?;
        client.execute(&fold, &[]).await.map_err(classify)?;
        Ok(purged as u64)
    }
}

/// What to announce for changes: each request, each fallback spawned, and
/// each reply (a channel to wake, a webhook delivery due).
fn changed_entries<'a>(changed: impl IntoIterator<Item = &'a Changed>) -> Vec<String> {
    let mut out = Vec::new();
    for c in changed {
        out.push(listen::entry(&c.request));
        if let Some(s) = &c.spawned {
            out.push(listen::entry(s));
        }
        match &c.reply {
            Some(ReplyTo::Channel(ch)) => out.push(listen::channel_entry(&c.request.tenant, ch)),
            Some(ReplyTo::Webhook(_)) => out.push(listen::webhook_entry(c.request.updated_at)),
            None => {}
        }
    }
    out
}
