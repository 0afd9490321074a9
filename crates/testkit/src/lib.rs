//! # coatcheck-testkit
//!
//! Test helpers (not published): a real coatcheck server on `127.0.0.1:0`
//! over a real store — the embedded one in its own temp dir, or PostgreSQL
//! in a fresh schema of its own — set up in one line, and assertions on
//! problem documents. Tests talk to it over real HTTP.
//!
//! Which store: [`TestServer::start_on`] takes a [`Backend`]; the plain
//! constructors ([`TestServer::start`], [`TestServer::start_with`],
//! [`TestServer::with_manual_clock`]) use [`Backend::from_env`], so
//! `COATCHECK_TEST_STORE=postgres cargo nextest run -p coatcheck-server`
//! runs the whole HTTP contract suite on PostgreSQL
//! (`COATCHECK_TEST_POSTGRES` names the database, default
//! `postgres://postgres@127.0.0.1:5432/test`).
//!
//! ```no_run
//! # async fn demo() {
//! let server = coatcheck_testkit::TestServer::start().await;
//! let resp = server.http().get(server.url("/healthz")).send().await.unwrap();
//! assert_eq!(resp.status(), 200);
//! # }
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::wire::Problem;
use coatcheck_core::ManualClock;
use coatcheck_server::{Config, Server, StoreConfig};
pub use coatcheck_store_postgres::testing::{Proxy as PgProxy, TestSchema};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The store a [`TestServer`] runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The embedded store in a temp dir.
    Embedded,
    /// PostgreSQL, in a fresh schema of the test database, dropped afterwards.
    Postgres,
}

impl Backend {
    /// `COATCHECK_TEST_STORE`: `postgres` (or `pg`) for PostgreSQL; anything
    /// else, or nothing, for the embedded store.
    pub fn from_env() -> Backend {
        match std::env::var("COATCHECK_TEST_STORE").as_deref() {
            Ok("postgres") | Ok("pg") | Ok("postgresql") => Backend::Postgres,
            _ => Backend::Embedded,
        }
    }
}

/// A running server for a test. Stops when dropped.
pub struct TestServer {
    server: Option<Server>,
    shutdown: CancellationToken,
    clock: Option<Arc<ManualClock>>,
    dir: Arc<tempfile::TempDir>,
    schema: Option<Arc<TestSchema>>,
    configure: Arc<dyn Fn(&mut Config) + Send + Sync>,
    http: reqwest::Client,
    base: String,
}

impl TestServer {
    /// A server on the wall clock, default configuration, on the store
    /// [`Backend::from_env`] names.
    pub async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// A server on a manual clock: time moves only with [`TestServer::advance`].
    pub async fn with_manual_clock() -> Self {
        Self::with_manual_clock_on(Backend::from_env()).await
    }

    /// A server on a manual clock, on `backend`.
    pub async fn with_manual_clock_on(backend: Backend) -> Self {
        let clock = Arc::new(ManualClock::new());
        let c = clock.clone();
        let mut s = Self::start_on_with(backend, move |cfg| cfg.clock = c.clone()).await;
        s.clock = Some(clock);
        s
    }

    /// A server whose configuration `configure` adjusts.
    pub async fn start_with(configure: impl Fn(&mut Config) + Send + Sync + 'static) -> Self {
        Self::start_on_with(Backend::from_env(), configure).await
    }

    /// A server on `backend`, default configuration.
    pub async fn start_on(backend: Backend) -> Self {
        Self::start_on_with(backend, |_| {}).await
    }

    /// A server on PostgreSQL (a fresh schema), default configuration.
    pub async fn start_postgres() -> Self {
        Self::start_on(Backend::Postgres).await
    }

    /// A server on `backend` whose configuration `configure` adjusts.
    pub async fn start_on_with(
        backend: Backend,
        configure: impl Fn(&mut Config) + Send + Sync + 'static,
    ) -> Self {
        let dir = Arc::new(tempfile::tempdir().expect("temp dir"));
        let schema = match backend {
            Backend::Embedded => None,
            Backend::Postgres => Some(Arc::new(TestSchema::create().await)),
        };
        Self::boot(dir, schema, Arc::new(configure), None, None).await
    }

    async fn boot(
        dir: Arc<tempfile::TempDir>,
        schema: Option<Arc<TestSchema>>,
        configure: Arc<dyn Fn(&mut Config) + Send + Sync>,
        clock: Option<Arc<ManualClock>>,
        addr: Option<SocketAddr>,
    ) -> Self {
        let mut config = Config::embedded(dir.path().join("data"));
        if let Some(schema) = &schema {
            config.store = StoreConfig::Postgres {
                url: schema.url_with("pool_size=4"),
            };
        }
        config.shutdown_grace = Duration::from_secs(5);
        configure(&mut config);
        let listener = match addr {
            None => tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
            Some(addr) => bind_again(addr).await,
        };
        let shutdown = CancellationToken::new();
        let server = Server::start(config, listener, shutdown.clone())
            .await
            .expect("server starts");
        let base = format!("http://{}", server.addr());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(90))
            .build()
            .expect("http client");
        TestServer {
            server: Some(server),
            shutdown,
            clock,
            dir,
            schema,
            configure,
            http,
            base,
        }
    }

    /// Stops the server gracefully and starts it again on the same data and
    /// the same address, so clients holding [`TestServer::base_url`] reconnect
    /// to it by themselves.
    pub async fn restart(mut self) -> Self {
        let addr = self.server().addr();
        self.stop_inner().await;
        let dir = self.dir.clone();
        let schema = self.schema.clone();
        let configure = self.configure.clone();
        let clock = self.clock.clone();
        Self::boot(dir, schema, configure, clock, Some(addr)).await
    }

    async fn stop_inner(&mut self) {
        self.shutdown.cancel();
        if let Some(s) = self.server.take() {
            s.join().await.expect("server stops cleanly");
        }
    }

    /// Stops the server gracefully.
    pub async fn stop(mut self) {
        self.stop_inner().await;
    }

    /// The store it runs on.
    pub fn backend(&self) -> Backend {
        match self.schema {
            Some(_) => Backend::Postgres,
            None => Backend::Embedded,
        }
    }

    /// Its PostgreSQL schema, when on PostgreSQL.
    pub fn schema(&self) -> Option<&TestSchema> {
        self.schema.as_deref()
    }

    /// The data directory (of the embedded store; unused on PostgreSQL).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The base URL, e.g. `http://127.0.0.1:12345`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// An absolute URL for `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// A shared HTTP client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("running")
    }

    /// Moves the manual clock forward and lets the server's timers see it.
    pub fn advance(&self, by: Duration) {
        let clock = self
            .clock
            .as_ref()
            .expect("advance needs TestServer::with_manual_clock");
        clock.advance(by);
        self.server().engine().clock_moved();
    }

    /// POSTs JSON and returns the response.
    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    /// GETs and returns the response.
    pub async fn get(&self, path: &str) -> reqwest::Response {
        self.http.get(self.url(path)).send().await.expect("GET")
    }

    /// Submits `input` to `queue` and returns the Request JSON (asserting 202).
    pub async fn submit(&self, queue: &str, body: Value) -> Value {
        let resp = self
            .post(&format!("/v1/queues/{queue}/requests"), body)
            .await;
        assert_eq!(resp.status(), 202, "submit");
        resp.json().await.expect("request JSON")
    }

    /// Claims up to `max` from `queue` without waiting; returns the claimed items.
    pub async fn claim(&self, queue: &str, max: u32) -> Vec<Value> {
        let resp = self
            .post(
                &format!("/v1/queues/{queue}/claims"),
                serde_json::json!({"worker_id": "test-worker", "max": max}),
            )
            .await;
        assert_eq!(resp.status(), 200, "claim");
        let v: Value = resp.json().await.expect("claim JSON");
        v["requests"].as_array().cloned().unwrap_or_default()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Binds `addr` again after a restart; the old listener may take a moment
/// to be released, so this retries for a few seconds.
async fn bind_again(addr: SocketAddr) -> tokio::net::TcpListener {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => return l,
            Err(_) if std::time::Instant::now() < until => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("cannot bind {addr} again after a restart: {e}"),
        }
    }
}

/// Asserts that `resp` is a problem document with `status` whose `type`
/// ends with `/problems/{slug}`; returns it.
pub async fn assert_problem(resp: reqwest::Response, status: u16, slug: &str) -> Problem {
    assert_eq!(resp.status().as_u16(), status, "status of {}", resp.url());
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type {ct:?}"
    );
    let text = resp.text().await.expect("body");
    let p: Problem = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("not a problem document ({e}): {text}"));
    assert_eq!(p.status, status, "problem status");
    assert!(
        p.type_.ends_with(&format!("/problems/{slug}")),
        "problem type {} (want {slug}): {text}",
        p.type_
    );
    assert!(
        !p.title.is_empty() && !p.detail.is_empty(),
        "title and detail: {text}"
    );
    p
}
