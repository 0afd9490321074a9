//! # coatcheck-store-postgres
//!
//! The store for outgrowing one machine: any number of stateless coatcheck
//! nodes share one PostgreSQL database. It implements the same
//! [`Store`] trait as the embedded store and passes the same conformance
//! suite: every write loads the request, calls the pure rule in
//! `coatcheck_core::rules`, and persists the outcome — request, history,
//! fallback, reply — in one transaction. It never decides a transition
//! itself.
//!
//! Key decisions:
//! - **tokio-postgres + deadpool-postgres**, prepared statements cached per
//!   connection, and pipelining: a transition is two round trips ("begin +
//!   lock and read", "write everything + commit"), a submit one (`tx.rs`).
//! - **Row locks serialize writers of one request** (`SELECT … FOR
//!   UPDATE`); **sweeps skip what others hold** (`FOR UPDATE SKIP LOCKED`):
//!   batched claims, lease expiry, deadline expiry, webhook and channel
//!   deliveries. Every node runs every background service at once; no
//!   leader, no double transition (`write.rs`).
//! - **Fair claims planned whole** (`claim.rs`): priority, then turns across
//!   fairness keys found by a loose index scan, then each key's oldest —
//!   three round trips per claim however many keys. The rotation cursor is
//!   per node; running caps are strict across nodes (an advisory lock per
//!   capped queue).
//! - **Built for churn** (`migrations/0001_init.sql`): the hot `requests`
//!   row holds only what transitions change; payloads live in
//!   `request_payloads`, history in its own insert-only table; the indexes
//!   hot queries read are partial, so finished requests leave them;
//!   [`PgStore::request_purge`] deletes finished requests in bounded batches.
//! - **Numbered migrations** embedded and applied at start under an
//!   advisory lock ([`migrate`]); all SQL lives in `sql.rs`.
//! - **Wake-ups across nodes over LISTEN/NOTIFY** ([`listen`]), sent right
//!   after each commit by a per-node bus (not inside the write transaction:
//!   PostgreSQL serializes notifying commits, which would cost most of the
//!   throughput), received as [`RemoteChange`]s (requests, channel replies,
//!   webhook deliveries due); a dropped listening connection reconnects and
//!   makes everyone re-check.
//! - **Bounded failure**: a call waits at most 5 s for a connection; an
//!   unreachable, restarting or overloaded database is
//!   [`StoreError::Unavailable`] (HTTP 503 + `Retry-After`), never an
//!   internal error; the pool makes new connections when the database comes
//!   back, without a restart ([`error`]).
//! - **A schema per URL** (`?schema=name`), so tests run in parallel, each in
//!   a fresh schema ([`testing`]).
//!
//! What it deliberately does not do: read the database's clock (all time
//! comes in as `now`, so tests drive it), hold request state in memory, or
//! re-encode payloads (input and output are stored as the bytes received).

#![warn(missing_docs)]

mod claim;
pub mod config;
pub mod error;
mod group;
pub mod listen;
pub mod migrate;
mod read;
mod sql;
pub mod testing;
pub mod tls;

/// The batched update of request rows, for tests that check its plan.
#[doc(hidden)]
pub const UPDATE_REQUESTS_SQL: &str = sql::UPDATE_REQUESTS;
mod tx;
mod write;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use coatcheck_core::rules::CancelOutcome;
use coatcheck_core::wire::ChannelMessage;
use coatcheck_core::{HistoryEvent, Request, RetryPolicy, Ts};
use coatcheck_store::{
    Changed, ChannelReceiveParams, ClaimParams, DueTimes, HeartbeatParams, ListParams, QueueCounts,
    RemoteChange, RequestRef, Result, SettleParams, Store, StoreError, StoreOptions, SubmitParams,
    Submitted, WebhookDelivery, WebhookOutcome,
};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};

pub use config::PgOptions;

use crate::error::{classify, pool};
use crate::listen::Bus;
use crate::tx::closed;

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The URL is not usable.
    #[error(transparent)]
    Url(#[from] config::UrlError),
    /// The database could not be reached or refused us.
    #[error("cannot connect to PostgreSQL: {0}")]
    Connect(String),
    /// Migrating the schema failed.
    #[error("cannot migrate the PostgreSQL schema: {0}")]
    Migrate(#[from] migrate::MigrateError),
}

/// The shared state of a store, used by its spawned calls.
pub(crate) struct Inner {
    pub(crate) pool: Pool,
    pub(crate) retry: RetryPolicy,
    pub(crate) cursors: claim::Cursors,
    /// Submits and settlements, group-committed.
    pub(crate) submits: group::Group<group::Submit>,
    pub(crate) settles: group::Group<group::Settle>,
    bus: Bus,
}

impl Inner {
    /// Tells other nodes about changed requests (after their commit).
    pub(crate) async fn announce(&self, entries: Vec<String>) {
        self.bus.send(entries).await;
    }
}

/// The PostgreSQL store.
pub struct PgStore {
    inner: Arc<Inner>,
    closed: AtomicBool,
    options: PgOptions,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("options", &self.options)
            .finish()
    }
}

/// An error and what caused it, in one line (a TLS handshake failure says
/// only that; its cause says which certificate check failed).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let more = c.to_string();
        if !msg.contains(&more) {
            msg = format!("{msg}: {more}");
        }
        cause = c.source();
    }
    msg
}

impl PgStore {
    /// Connects, applies missing migrations (under an advisory lock), starts
    /// listening for other nodes' changes, and opens the pool.
    pub async fn open(url: &str, opts: StoreOptions) -> std::result::Result<Self, OpenError> {
        let options = PgOptions::parse(url)?;
        let tls = tls::connector(&options.tls, options.client_cert.as_ref())
            .map_err(OpenError::Connect)?;
        let (client, connection) = options
            .pg
            .connect(tls.clone())
            .await
            .map_err(|e| OpenError::Connect(with_causes(&e)))?;
        let driver = tokio::spawn(connection);
        let migrated = migrate::run(&client, &options).await;
        drop(client);
        let _ = driver.await;
        migrated?;

        let node = format!("{:016x}", rand::random::<u64>());
        let channel = listen::channel_name(options.schema.as_deref());
        let bus = Bus::start(options.pg.clone(), tls.clone(), channel, node)
            .await
            .map_err(|e| OpenError::Connect(with_causes(&e)))?;

        let manager = Manager::from_config(
            options.pg.clone(),
            tls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size)
            .wait_timeout(Some(config::POOL_WAIT))
            .create_timeout(Some(config::POOL_WAIT))
            .recycle_timeout(Some(config::POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| OpenError::Connect(with_causes(&e)))?;
        let inner = Arc::new(Inner {
            pool,
            retry: opts.retry,
            cursors: Default::default(),
            submits: group::Group::new(),
            settles: group::Group::new(),
            bus,
        });
        inner.submits.start(&inner, group::write_submits);
        inner.settles.start(&inner, group::write_settles);
        Ok(PgStore {
            inner,
            closed: AtomicBool::new(false),
            options,
        })
    }

    /// The parsed connection options.
    pub fn options(&self) -> &PgOptions {
        &self.options
    }

    /// Retention: deletes up to `limit` requests that finished before
    /// `before` — row, payloads, history and idempotency key — in one
    /// statement; answers how many. Safe on every node at once (rows another
    /// node is deleting are skipped). Call it in a loop until it answers
    /// less than `limit`.
    pub async fn request_purge(&self, before: Ts, limit: u32) -> Result<u64> {
        self.spawn(move |i| async move { i.purge_finished(before, limit).await })
            .await
    }

    /// Runs a call on its own task, so that a caller going away cannot cut
    /// a transaction short.
    async fn spawn<T, F>(&self, f: impl FnOnce(Arc<Inner>) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T>> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(closed());
        }
        tokio::spawn(f(self.inner.clone()))
            .await
            .map_err(|e| StoreError::Internal(format!("a store task failed: {e}")))?
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(closed())
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Store for PgStore {
    async fn request_purge(&self, finished_before: Ts, limit: u32) -> Result<u64> {
        PgStore::request_purge(self, finished_before, limit).await
    }

    async fn due_times(&self, now: Ts) -> Result<DueTimes> {
        self.check_open()?;
        self.inner.due_times(now).await
    }

    async fn channel_ack(
        &self,
        tenant: String,
        channel: String,
        tokens: Vec<String>,
        now: Ts,
    ) -> Result<Vec<bool>> {
        self.spawn(move |i| async move { i.channel_ack(tenant, channel, tokens, now).await })
            .await
    }

    async fn channel_purge(&self, before: Ts, limit: u32) -> Result<u64> {
        self.spawn(move |i| async move { i.channel_purge(before, limit).await })
            .await
    }

    async fn channel_receive(&self, p: ChannelReceiveParams) -> Result<Vec<ChannelMessage>> {
        self.spawn(move |i| async move { i.channel_receive(p).await })
            .await
    }

    async fn dead_letter_redrive(&self, r: RequestRef, now: Ts) -> Result<Changed> {
        self.spawn(move |i| async move { i.redrive(r, now).await })
            .await
    }

    async fn deadline_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.spawn(move |i| async move { i.expire_deadlines(now, limit).await })
            .await
    }

    async fn lease_heartbeat(&self, p: HeartbeatParams) -> Result<Changed> {
        self.spawn(move |i| async move { i.heartbeat(p).await })
            .await
    }

    async fn lease_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.spawn(move |i| async move { i.expire_leases(now, limit).await })
            .await
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        self.check_open()?;
        self.inner.queue_depth(queue).await
    }

    async fn queue_stats(&self, now: Ts) -> Result<Vec<QueueCounts>> {
        self.check_open()?;
        self.inner.queue_stats(now).await
    }

    async fn request_cancel(&self, r: RequestRef, now: Ts) -> Result<(CancelOutcome, Changed)> {
        self.spawn(move |i| async move { i.cancel(r, now).await })
            .await
    }

    async fn request_claim(&self, p: ClaimParams) -> Result<Vec<Request>> {
        self.spawn(move |i| async move { i.claim(p).await }).await
    }

    async fn request_get(&self, r: RequestRef) -> Result<Request> {
        self.check_open()?;
        self.inner.get_scoped(&r).await
    }

    async fn request_history(&self, r: RequestRef, after_seq: u64) -> Result<Vec<HistoryEvent>> {
        self.check_open()?;
        self.inner.history(&r, after_seq).await
    }

    async fn request_list(&self, p: ListParams) -> Result<Vec<Request>> {
        self.check_open()?;
        self.inner.list(&p).await
    }

    async fn request_settle_many(
        &self,
        items: Vec<SettleParams>,
        now: Ts,
    ) -> Result<Vec<Result<Changed>>> {
        self.spawn(move |i| async move { i.settle_many(items, now).await })
            .await
    }

    async fn request_submit(&self, p: SubmitParams) -> Result<Submitted> {
        self.spawn(move |i| async move { i.submit(p).await }).await
    }

    async fn webhook_claim_due(
        &self,
        now: Ts,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<WebhookDelivery>> {
        self.spawn(move |i| async move { i.webhook_claim(now, limit, lease).await })
            .await
    }

    async fn webhook_record(&self, o: WebhookOutcome) -> Result<()> {
        self.spawn(move |i| async move { i.webhook_record(o).await })
            .await
    }

    async fn store_close(&self) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        // What was handed over is written; the writers then stop.
        self.inner.submits.close().await;
        self.inner.settles.close().await;
        self.inner.bus.close().await;
        self.inner.pool.close();
    }

    async fn store_ping(&self) -> Result<()> {
        self.check_open()?;
        let client = self.inner.pool.get().await.map_err(pool)?;
        client.simple_query("SELECT 1").await.map_err(classify)?;
        Ok(())
    }

    async fn store_secret(&self, name: &str) -> Result<Vec<u8>> {
        let name = name.to_string();
        self.spawn(move |i| async move { i.secret(&name).await })
            .await
    }

    fn remote_changes(&self) -> Option<tokio::sync::broadcast::Receiver<RemoteChange>> {
        Some(self.inner.bus.subscribe())
    }
}
