//! The server's validated configuration. The CLI parses flags and
//! environment once into a [`Config`]; nothing else reads the environment.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use coatcheck_core::{Clock, RetryPolicy, SystemClock};

/// Which store to run on.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// The embedded store in this data directory.
    Embedded {
        /// The data directory.
        dir: PathBuf,
    },
    /// A PostgreSQL database (many nodes may share it).
    Postgres {
        /// The connection URL.
        url: String,
    },
}

/// TLS: the server's certificate chain and private key, PEM files
/// (`--tls-cert`, `--tls-key`). Read at start and again on
/// [`crate::Server::reload_tls`] (SIGHUP), so renewed certificates take
/// effect without a restart.
#[derive(Debug, Clone)]
pub struct TlsConfig {
    /// The certificate chain, leaf first (PEM).
    pub cert_path: PathBuf,
    /// The private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_path: PathBuf,
}

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The store.
    pub store: StoreConfig,
    /// The externally visible base URL (`--public-url`); makes
    /// `Operation-Location` absolute.
    pub public_url: Option<String>,
    /// The largest request body accepted, in bytes.
    pub max_body: usize,
    /// The cap on any long-poll (`wait`), at least 60 s.
    pub max_wait: Duration,
    /// The lease length when a claim gives none.
    pub default_lease: Duration,
    /// Attempts when a submit gives none.
    pub default_max_attempts: u32,
    /// The backoff of failed attempts.
    pub retry: RetryPolicy,
    /// Where "now" comes from (a manual clock in tests).
    pub clock: Arc<dyn Clock>,
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Standard Webhooks secrets (`whsec_…`, decoded); replies are signed
    /// with each (several allow rotation). Empty: webhook replies refused.
    pub webhook_secrets: Vec<Vec<u8>>,
    /// Allow webhook targets on private, loopback and link-local addresses.
    pub webhook_allow_private: bool,
    /// How long one webhook attempt may take.
    pub webhook_timeout: Duration,
    /// The delays before each retry of a failed webhook attempt; when they
    /// are used up the delivery fails for good.
    pub webhook_schedule: Vec<Duration>,
    /// Unacknowledged channel messages older than this are deleted.
    pub channel_retention: Duration,
    /// Finished requests (with their history) are deleted this long after
    /// they finished.
    pub request_retention: Duration,
    /// How often an idle SSE stream sends a keep-alive comment.
    pub sse_keep_alive: Duration,
    /// The keys file (`None`: no keys; the server must listen on loopback).
    pub keys_file: Option<PathBuf>,
    /// Queue depth, submit rate and stream limits.
    pub limits: crate::limits::LimitsConfig,
    /// How claims share a queue among fairness keys (weights, caps).
    pub fairness: Arc<coatcheck_store::FairnessRules>,
    /// Serve HTTPS with this certificate (`None`: plain HTTP).
    pub tls: Option<TlsConfig>,
    /// How long a client may take to send a request's headers, and how long
    /// an idle keep-alive connection (or a TLS handshake) is kept open;
    /// then the connection is closed. Slow-loris protection.
    pub header_read_timeout: Duration,
    /// How long a client may take to send a request's body; then `408`.
    pub body_read_timeout: Duration,
}

/// The default webhook retry schedule (Svix's): 5 s, 5 min, 30 min, 2 h,
/// 5 h, 10 h, 10 h — eight attempts over about 27 hours.
pub fn default_webhook_schedule() -> Vec<Duration> {
    [5, 300, 1800, 7200, 18000, 36000, 36000]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

impl Config {
    /// Defaults for the embedded store in `dir`.
    pub fn embedded(dir: impl Into<PathBuf>) -> Self {
        Config {
            store: StoreConfig::Embedded { dir: dir.into() },
            public_url: None,
            max_body: 1024 * 1024,
            max_wait: Duration::from_secs(60),
            default_lease: Duration::from_secs(30),
            default_max_attempts: 3,
            retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
            shutdown_grace: Duration::from_secs(10),
            webhook_secrets: Vec::new(),
            webhook_allow_private: false,
            webhook_timeout: Duration::from_secs(10),
            webhook_schedule: default_webhook_schedule(),
            channel_retention: Duration::from_secs(7 * 24 * 3600),
            request_retention: Duration::from_secs(7 * 24 * 3600),
            sse_keep_alive: Duration::from_secs(15),
            keys_file: None,
            limits: crate::limits::LimitsConfig::new(),
            fairness: Default::default(),
            tls: None,
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
        }
    }
}
