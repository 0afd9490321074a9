//! The engine: the one path every change takes — rules (inside the store's
//! transaction) → store → notify waiters → hint background timers → metrics.
//! HTTP handlers parse and authorise, then call exactly one engine method.

use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::rules::CancelOutcome;
use coatcheck_core::{Clock, HistoryEvent, ReplyTo, Request, Status, Ts};
use coatcheck_store::{
    Changed, ClaimParams, HeartbeatParams, ListParams, ParkedClaim, RemoteChange, RequestRef,
    Result, SettleParams, Settlement, Store, StoreError, SubmitParams, Submitted,
};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::keys::Keys;
use crate::metrics::{Counter, Metrics};
use crate::notify::{Key, Notifier};
use crate::tasks::Timers;

/// Shared state of a running server.
pub struct Engine {
    /// The store.
    pub store: Arc<dyn Store>,
    /// Wakes waiters.
    pub notifier: Notifier,
    /// Metrics.
    pub metrics: Metrics,
    /// The configuration.
    pub config: Config,
    /// Background timers to hint at new due times.
    pub timers: Timers,
    /// Fires when the server is stopping: long-polls answer at once.
    pub shutdown: CancellationToken,
    keys: std::sync::RwLock<Arc<Keys>>,
    /// Rate, depth and stream limits.
    pub limiter: crate::limits::Limiter,
    /// Issues and checks list page tokens (keyed by a store secret).
    pub page_tokens: crate::api::page_token::PageTokens,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

impl Engine {
    /// A new engine over a store.
    pub fn new(store: Arc<dyn Store>, config: Config, shutdown: CancellationToken) -> Self {
        let notifier = Notifier::new();
        let hub = notifier.clone();
        store.on_claimable(Arc::new(move |queue: &str| {
            hub.notify(&Key::Queue(queue.to_string()))
        }));
        Engine {
            store,
            notifier,
            metrics: Metrics::default(),
            config,
            timers: Timers::default(),
            shutdown,
            keys: Default::default(),
            limiter: Default::default(),
            page_tokens: crate::api::page_token::PageTokens::random(),
        }
    }

    /// Signs page tokens with `key` (the store's page-token secret, so
    /// tokens stay valid across restarts and nodes) instead of a random key.
    pub fn with_page_key(mut self, key: &[u8]) -> Self {
        self.page_tokens = crate::api::page_token::PageTokens::new(key);
        self
    }

    /// The keys in force.
    pub fn keys(&self) -> Arc<Keys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// (Re)loads the keys file, if one is configured. On error the keys in
    /// force stay as they were.
    pub fn reload_keys(&self) -> std::result::Result<usize, String> {
        let Some(path) = &self.config.keys_file else {
            return Ok(0);
        };
        let keys = Keys::load(path)?;
        let n = keys.len();
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
        Ok(n)
    }

    /// Now, by the configured clock.
    pub fn now(&self) -> Ts {
        self.config.clock.now()
    }

    /// The clock.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.config.clock
    }

    /// Tells waiters and timers about a request's new state.
    pub fn observe(&self, req: &Request, now: Ts) {
        self.notifier.notify_request(req);
        match req.status {
            Status::Queued => match req.run_after {
                Some(t) if t > now => self.timers.scheduler.hint(t),
                _ => self.notifier.notify(&Key::Queue(req.queue.clone())),
            },
            Status::Running => {
                if let Some(l) = &req.lease {
                    self.timers.reaper.hint(l.expires_at);
                }
            }
            _ => {}
        }
        if !req.status.is_terminal() {
            if let Some(d) = req.deadline {
                self.timers.expirer.hint(d);
            }
        }
    }

    fn observe_changed(&self, c: &Changed, now: Ts) {
        self.observe(&c.request, now);
        let r = &c.request;
        if r.finished_at == Some(now) {
            self.metrics.finished(&r.queue, r.created_at, now);
            let counter = match r.status {
                Status::Succeeded => Some(Counter::Completed),
                Status::Failed => Some(Counter::DeadLettered),
                Status::Cancelled => Some(Counter::Cancelled),
                Status::Expired => Some(Counter::Expired),
                _ => None,
            };
            if let Some(counter) = counter {
                self.metrics.add(counter, &r.queue, 1);
            }
        }
        match &c.reply {
            Some(ReplyTo::Channel(ch)) => self
                .notifier
                .notify(&Key::Channel(r.tenant.clone(), ch.clone())),
            Some(ReplyTo::Webhook(_)) => self.timers.webhooks.hint(now),
            None => {}
        }
        if let Some(s) = &c.spawned {
            self.metrics.add(Counter::Submitted, &s.queue, 1);
            self.observe(s, now);
        }
    }

    /// Stores a new request (or finds it by idempotency key).
    pub async fn submit(&self, p: SubmitParams) -> Result<Submitted> {
        Ok(self.submit_as(p, false).await?.0)
    }

    /// [`Engine::submit`] for a caller that holds its answer until the
    /// request finishes (`Prefer: wait`): the store may answer before the
    /// request is on disk, with a mark the caller must pass to
    /// [`Engine::sync_through`] before it answers anything
    /// (`Store::request_submit_unsynced`).
    pub async fn submit_unsynced(&self, p: SubmitParams) -> Result<(Submitted, Option<u64>)> {
        self.submit_as(p, true).await
    }

    async fn submit_as(
        &self,
        mut p: SubmitParams,
        unsynced: bool,
    ) -> Result<(Submitted, Option<u64>)> {
        let now = self.now();
        p.now = now;
        let out = if unsynced {
            self.store.request_submit_unsynced(p).await?
        } else {
            (self.store.request_submit(p).await?, None)
        };
        if let Submitted::Created(req) = &out.0 {
            self.metrics.add(Counter::Submitted, &req.queue, 1);
            self.observe(req, now);
        }
        Ok(out)
    }

    /// Returns once everything before `mark` is durable (see
    /// [`Engine::submit_unsynced`]).
    pub async fn sync_through(&self, mark: u64) -> Result<()> {
        self.store.sync_through(mark).await
    }

    /// One request.
    pub async fn get(&self, r: RequestRef) -> Result<Request> {
        self.store.request_get(r).await
    }

    /// Waits up to `wait` until the request finished (a terminal status),
    /// then answers it as it is (at once on shutdown).
    pub async fn wait_finished(&self, r: RequestRef, wait: Duration) -> Result<Request> {
        let sub = self.subscribe_finished(&r.id);
        self.wait_subscribed(sub, r, None, wait).await
    }

    /// Subscribes to a request's end; with [`Engine::wait_subscribed`], a
    /// caller that subscribes *before* it makes the request (a submit with
    /// `Prefer: wait`) needs no read to start waiting. Only changes that
    /// may have finished it wake the subscription.
    pub fn subscribe_finished(&self, id: &str) -> crate::notify::Subscription {
        self.notifier.subscribe(Key::Finished(id.to_string()))
    }

    /// [`Engine::wait_finished`] on a subscription made earlier; `known` is
    /// the request as the caller last saw it *after* subscribing (none: read
    /// it). A wake-up that carries the request answers without reading it back.
    pub async fn wait_subscribed(
        &self,
        mut sub: crate::notify::Subscription,
        r: RequestRef,
        mut known: Option<Request>,
        wait: Duration,
    ) -> Result<Request> {
        let done = |r: &Request| r.status.is_terminal();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let req = match known.take() {
                Some(req) => req,
                None => self.store.request_get(r.clone()).await?,
            };
            if done(&req) || wait.is_zero() || tokio::time::Instant::now() >= deadline {
                return Ok(req);
            }
            tokio::select! {
                _ = sub.changed() => {
                    // The wake-up carries the request (a local change):
                    // no need to read it back, whether it is done or not.
                    if let Some(latest) = sub.latest() {
                        if done(&latest) {
                            return Ok(Arc::unwrap_or_clone(latest));
                        }
                        known = Some(Arc::unwrap_or_clone(latest));
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => {
                    return self.store.request_get(r).await;
                }
            }
        }
    }

    /// A request's history after `after_seq`.
    pub async fn history(&self, r: RequestRef, after_seq: u64) -> Result<Vec<HistoryEvent>> {
        self.store.request_history(r, after_seq).await
    }

    /// A page of requests.
    pub async fn list(&self, p: ListParams) -> Result<Vec<Request>> {
        self.store.request_list(p).await
    }

    /// Cancel.
    pub async fn cancel(&self, r: RequestRef) -> Result<(CancelOutcome, Request)> {
        let now = self.now();
        let (outcome, changed) = self.store.request_cancel(r, now).await?;
        self.observe_changed(&changed, now);
        Ok((outcome, changed.request))
    }

    /// Redrive.
    pub async fn redrive(&self, r: RequestRef) -> Result<Request> {
        let now = self.now();
        let changed = self.store.dead_letter_redrive(r, now).await?;
        self.observe_changed(&changed, now);
        Ok(changed.request)
    }

    /// Claims up to `max` requests, long-polling up to `wait` for the first.
    pub async fn claim(
        &self,
        queue: &str,
        worker_id: &str,
        max: u32,
        lease: Duration,
        wait: Duration,
    ) -> Result<Vec<Request>> {
        let deadline = tokio::time::Instant::now() + wait;
        let params = |now| ClaimParams {
            fairness: self.config.fairness.clone(),
            queue: queue.to_string(),
            worker_id: worker_id.to_string(),
            max,
            lease,
            now,
        };
        if !wait.is_zero() && !self.shutdown.is_cancelled() {
            // A parked claim is handed every change the store makes itself;
            // only time passing needs telling (subscribed before parking).
            let mut due = self.notifier.subscribe(Key::Due);
            if let Some(parked) = self.store.request_claim_parked(params(self.now())) {
                let got = self.wait_parked(parked, &mut due, deadline).await?;
                self.claimed(queue, &got);
                return Ok(got);
            }
        }
        // Joined before each look, so a submit in between wakes it; woken
        // one per claimable request, not with every other waiting claim.
        let waiters = self.notifier.claim_waiters(queue);
        loop {
            let woken = waiters.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            self.metrics.add(Counter::ClaimLooks, queue, 1);
            let got = self.store.request_claim(params(self.now())).await?;
            if !got.is_empty() {
                if got.len() >= max as usize {
                    // Full: more may be waiting for the next claim.
                    waiters.more();
                }
                self.claimed(queue, &got);
                return Ok(got);
            }
            if wait.is_zero()
                || tokio::time::Instant::now() >= deadline
                || self.shutdown.is_cancelled()
            {
                return Ok(got);
            }
            tokio::select! {
                _ = woken => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = self.shutdown.cancelled() => return Ok(Vec::new()),
            }
        }
    }

    /// Waits for a claim parked in the store: it is answered when work is
    /// handed to it. What the store cannot see itself — time passing, so a
    /// delayed request came due (`due`) — is passed on as a poke; at the
    /// deadline (or shutdown) it is unparked and answered with what it got
    /// by then.
    async fn wait_parked(
        &self,
        parked: ParkedClaim,
        due: &mut crate::notify::Subscription,
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Request>> {
        let ParkedClaim { mut answer, handle } = parked;
        let closed = |_| StoreError::Unavailable("the store is closed".into());
        loop {
            tokio::select! {
                biased;
                got = &mut answer => return got.map_err(closed)?,
                _ = due.changed() => handle.poke(self.now()),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = self.shutdown.cancelled() => break,
            }
        }
        handle.unpark();
        answer.await.map_err(closed)?
    }

    /// Metrics, timers and waiters for requests just claimed.
    fn claimed(&self, queue: &str, got: &[Request]) {
        if got.is_empty() {
            return;
        }
        self.metrics.claimed(queue, got.len() as u64, self.now());
        if let Some(first) = got
            .iter()
            .filter_map(|r| r.lease.as_ref())
            .map(|l| l.expires_at)
            .min()
        {
            self.timers.reaper.hint(first);
        }
        for r in got {
            self.notifier.notify_request(r);
        }
    }

    /// Heartbeat.
    pub async fn heartbeat(&self, p: HeartbeatParams) -> Result<Request> {
        let now = self.now();
        let changed = self
            .store
            .lease_heartbeat(HeartbeatParams { now, ..p })
            .await?;
        self.observe_changed(&changed, now);
        Ok(changed.request)
    }

    /// Completes or fails many requests in one commit.
    pub async fn settle_many(&self, items: Vec<SettleParams>) -> Result<Vec<Result<Request>>> {
        let now = self.now();
        let fails: Vec<bool> = items
            .iter()
            .map(|i| matches!(i.settlement, Settlement::Fail { .. }))
            .collect();
        let results = self.store.request_settle_many(items, now).await?;
        let out = results
            .into_iter()
            .zip(fails)
            .map(|(res, is_fail)| {
                res.map(|changed| {
                    if is_fail && changed.request.updated_at == now {
                        self.metrics.add(Counter::Failed, &changed.request.queue, 1);
                    }
                    self.observe_changed(&changed, now);
                    changed.request
                })
            })
            .collect();
        // The changes above woke the requests' waiters (a `Prefer: wait`
        // submit, a long-poll, a stream): let them write their answers
        // before this settlement writes the worker's. On a runtime of one
        // thread they would otherwise wait for it, and theirs is the answer
        // a client is waiting on (sequential echo p50 −0.06 to −0.11 ms,
        // BENCHMARKS.md).
        tokio::task::yield_now().await;
        Ok(out)
    }

    /// Settles one request.
    pub async fn settle(&self, item: SettleParams) -> Result<Request> {
        self.settle_many(vec![item])
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Internal("settlement lost".into())))
    }

    /// Runs one round of lease expiry; returns how many changed.
    pub async fn expire_leases(&self, limit: u32) -> Result<usize> {
        let now = self.now();
        let changed = self.store.lease_expire_due(now, limit).await?;
        for c in &changed {
            self.metrics
                .add(Counter::LeasesExpired, &c.request.queue, 1);
            self.observe_changed(c, now);
        }
        Ok(changed.len())
    }

    /// Runs one round of deadline expiry; returns how many changed.
    pub async fn expire_deadlines(&self, limit: u32) -> Result<usize> {
        let now = self.now();
        let changed = self.store.deadline_expire_due(now, limit).await?;
        for c in &changed {
            self.observe_changed(c, now);
        }
        Ok(changed.len())
    }

    /// Follows changes other nodes make to a shared store, waking local
    /// waiters and timers as if the change were local. Runs until shutdown.
    pub async fn follow_remote(self: Arc<Self>) {
        let Some(mut rx) = self.store.remote_changes() else {
            return;
        };
        loop {
            let change = tokio::select! {
                c = rx.recv() => c,
                _ = self.shutdown.cancelled() => return,
            };
            match change {
                Ok(RemoteChange::Request {
                    id,
                    queue,
                    status,
                    lease_expires_at,
                    run_after,
                    deadline,
                }) => {
                    let now = self.now();
                    self.notifier.notify(&Key::Request(id));
                    if status == Status::Queued {
                        match run_after {
                            Some(t) if t > now => self.timers.scheduler.hint(t),
                            _ => self.notifier.notify(&Key::Queue(queue)),
                        }
                    }
                    if let Some(t) = lease_expires_at {
                        self.timers.reaper.hint(t);
                    }
                    if let Some(t) = deadline {
                        self.timers.expirer.hint(t);
                    }
                }
                Ok(RemoteChange::Channel { tenant, channel }) => {
                    self.notifier.notify(&Key::Channel(tenant, channel));
                }
                Ok(RemoteChange::Webhook { due }) => self.timers.webhooks.hint(due),
                // Missed some (lagged, or the store re-established its feed):
                // everyone re-checks.
                Ok(RemoteChange::Resync)
                | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    self.notifier.notify_all();
                    self.timers.wake_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// The clock moved (tests with a manual clock): re-check every timer and
    /// wake every claim.
    pub fn clock_moved(&self) {
        self.timers.wake_all();
        self.notifier.notify_all_queues();
    }
}
