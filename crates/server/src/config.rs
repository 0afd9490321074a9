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
        }
    }
}
