//! # coatcheck-server
//!
//! The coatcheck server as a library (the `coatcheck serve` binary is a thin
//! wrapper). Start it with [`run`] — a config, a bound listener and a
//! shutdown token — or with [`Server::start`] to keep a handle (tests do).
//!
//! The parts:
//! - [`engine`]: the one path every change takes (rules → store → notify).
//! - [`notify`]: the in-process hub that wakes long-polls and claims.
//! - [`api`]: the HTTP contract of API.md; every error a problem document.
//! - [`tasks`]: the lease reaper, deadline expirer and delayed-run
//!   scheduler, each sleeping until its next due time.
//!
//! What it deliberately does not do: poll on a timer, hold request state in
//! memory (the store is the truth, so any node may die), or re-encode
//! payloads (input and output bytes are stored as received).

#![warn(missing_docs)]

pub mod api;
pub mod config;
pub mod engine;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod serve;
pub mod tasks;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use coatcheck_store::{Store, StoreOptions};
use coatcheck_store_postgres::PgStore;
use coatcheck_store_sqlite::SqliteStore;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::{Config, StoreConfig, TlsConfig};
pub use engine::Engine;

/// Opens the configured store (applying migrations, taking locks).
pub async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn Store>> {
    let opts = StoreOptions {
        retry: config.retry,
    };
    match &config.store {
        StoreConfig::Embedded { dir } => {
            let dir = dir.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(dir, opts)).await??;
            Ok(Arc::new(store))
        }
        StoreConfig::Postgres { url } => {
            let store = PgStore::open(url, opts).await?;
            Ok(Arc::new(store))
        }
    }
}

/// A running server.
pub struct Server {
    engine: Arc<Engine>,
    addr: SocketAddr,
    tls: Option<Arc<serve::Tls>>,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server").field("addr", &self.addr).finish()
    }
}

impl Server {
    /// Opens the store, starts the background tasks and serves on
    /// `listener` until `shutdown` fires; then drains in-flight calls (up to
    /// the configured grace) and closes the store.
    pub async fn start(
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Server> {
        // A bad certificate is refused before the store is opened (and locked).
        let tls = load_tls(&config)?;
        let store = open_store(&config).await?;
        Self::launch(store, config, listener, shutdown, tls).await
    }

    /// Like [`Server::start`] over an already opened store.
    pub async fn start_with_store(
        store: Arc<dyn Store>,
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Server> {
        let tls = load_tls(&config)?;
        Self::launch(store, config, listener, shutdown, tls).await
    }

    async fn launch(
        store: Arc<dyn Store>,
        config: Config,
        listener: TcpListener,
        shutdown: CancellationToken,
        tls: Option<Arc<serve::Tls>>,
    ) -> anyhow::Result<Server> {
        let addr = listener.local_addr().context("listener has no address")?;
        let grace = config.shutdown_grace;
        let page_key = store
            .store_secret(api::page_token::SECRET_NAME)
            .await
            .context("cannot read the page-token key from the store")?;
        let engine =
            Arc::new(Engine::new(store, config, shutdown.clone()).with_page_key(&page_key));
        engine.reload_keys().map_err(|e| anyhow::anyhow!(e))?;
        let tasks = TaskTracker::new();
        tasks.spawn(tasks::reaper::run(engine.clone()));
        tasks.spawn(tasks::expirer::run(engine.clone()));
        tasks.spawn(tasks::scheduler::run(engine.clone()));
        tasks.spawn(tasks::webhooks::run(engine.clone()));
        tasks.spawn(tasks::retention::run(engine.clone()));
        tasks.spawn(engine.clone().follow_remote());
        tasks.close();
        let app = api::router(engine.clone());
        let e = engine.clone();
        let serving_tls = tls.clone();
        let handle = tokio::spawn(async move {
            // Serves until `shutdown`, then drains: long-polls answer at once
            // (they watch the same token); in-flight calls get the grace period.
            serve::run(listener, app, serving_tls, e.clone(), shutdown, grace).await;
            tasks.wait().await;
            e.store.store_close().await;
            Ok(())
        });
        Ok(Server {
            engine,
            addr,
            tls,
            handle,
        })
    }

    /// Whether it serves HTTPS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The base URL it serves on, `http://` or `https://` and its address.
    pub fn url(&self) -> String {
        let scheme = if self.is_tls() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The TLS side (`None` without TLS), to reload it from another task.
    pub fn tls(&self) -> Option<Arc<serve::Tls>> {
        self.tls.clone()
    }

    /// Reads the TLS certificate and key files again (on SIGHUP): new
    /// connections get the new certificate. `Ok(false)` without TLS; on
    /// error the certificate in force stays.
    pub fn reload_tls(&self) -> anyhow::Result<bool> {
        match &self.tls {
            Some(t) => t.reload().map(|()| true),
            None => Ok(false),
        }
    }

    /// The engine (tests use it to move a manual clock).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The address it serves on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits until it has stopped.
    pub async fn join(self) -> anyhow::Result<()> {
        self.handle.await.context("server task panicked")?
    }
}

fn load_tls(config: &Config) -> anyhow::Result<Option<Arc<serve::Tls>>> {
    config
        .tls
        .as_ref()
        .map(|t| serve::Tls::load(t).map(Arc::new))
        .transpose()
}

/// Serves until `shutdown` fires, then drains and closes the store.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    Server::start(config, listener, shutdown)
        .await?
        .join()
        .await
}
