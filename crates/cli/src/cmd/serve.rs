//! `coatcheck serve`: flags and environment become one validated
//! [`Config`], then the server library runs until SIGTERM/SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use coatcheck_server::{Config, Server, StoreConfig};
use tokio_util::sync::CancellationToken;

use crate::cmd::one_line;
use crate::exit;

/// `coatcheck serve` flags; each also reads a `COATCHECK_*` variable.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// The address to listen on.
    #[arg(long, env = "COATCHECK_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// The data directory of the embedded store.
    #[arg(long, env = "COATCHECK_DATA", default_value = "./coatcheck-data")]
    pub data: PathBuf,
    /// A store URL instead of the embedded store (postgres://user@host/db).
    // hide_env_values: `--help` must not print a password held in the URL.
    #[arg(long, env = "COATCHECK_STORE", hide_env_values = true)]
    pub store: Option<String>,
    /// The externally visible base URL; makes Operation-Location absolute.
    #[arg(long, env = "COATCHECK_PUBLIC_URL")]
    pub public_url: Option<String>,
    /// The largest request body, in bytes.
    #[arg(long, env = "COATCHECK_MAX_BODY", default_value_t = 1024 * 1024)]
    pub max_body: usize,
    /// The cap on long-poll waits, in seconds (at least 60).
    #[arg(long, env = "COATCHECK_MAX_WAIT", default_value_t = 60.0)]
    pub max_wait: f64,
    /// The Standard Webhooks secret (`whsec_…`) that signs webhook replies;
    /// several (comma-separated, or the flag repeated) sign with each, for rotation.
    #[arg(
        long,
        env = "COATCHECK_WEBHOOK_SECRET",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub webhook_secret: Vec<String>,
    /// Seconds between webhook attempts (comma-separated): one more attempt
    /// than delays, then the delivery fails for good. Each delay gets ±10 %
    /// jitter. Default: 5, 300, 1800, 7200, 18000, 36000, 36000 (eight
    /// attempts over about 27 hours).
    #[arg(long, env = "COATCHECK_WEBHOOK_RETRIES", value_delimiter = ',')]
    pub webhook_retries: Vec<f64>,
    /// Allow webhook targets on private, loopback and link-local addresses (development).
    #[arg(long, env = "COATCHECK_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,
    /// Seconds a finished request (and its history) is kept after it finished.
    #[arg(long, env = "COATCHECK_RETENTION", default_value_t = 7.0 * 24.0 * 3600.0)]
    pub retention: f64,
    /// Seconds an unacknowledged reply-channel message is kept.
    #[arg(long, env = "COATCHECK_CHANNEL_RETENTION", default_value_t = 7.0 * 24.0 * 3600.0)]
    pub channel_retention: f64,
    /// Queued requests any one queue may hold; submits beyond get 429.
    #[arg(long, env = "COATCHECK_MAX_QUEUE_DEPTH")]
    pub max_queue_depth: Option<u64>,
    /// A per-queue depth limit, QUEUE=N (repeatable; overrides --max-queue-depth).
    #[arg(
        long = "queue-depth",
        value_name = "QUEUE=N",
        env = "COATCHECK_QUEUE_DEPTH",
        value_delimiter = ','
    )]
    pub queue_depth: Vec<String>,
    /// Submits per second per tenant (token bucket); beyond get 429.
    #[arg(long, env = "COATCHECK_SUBMIT_RATE")]
    pub submit_rate: Option<f64>,
    /// The submit-rate bucket size (default: one second's worth).
    #[arg(long, env = "COATCHECK_SUBMIT_BURST")]
    pub submit_burst: Option<f64>,
    /// Long-polls and streams one key (or tenant, without keys) may hold open.
    #[arg(long, env = "COATCHECK_MAX_STREAMS_PER_KEY", default_value_t = 1000)]
    pub max_streams_per_key: usize,
    /// Fair claiming: requests a fairness key gets per turn, KEY=N (repeatable; default 1).
    #[arg(
        long = "fair-weight",
        value_name = "KEY=N",
        env = "COATCHECK_FAIR_WEIGHT",
        value_delimiter = ','
    )]
    pub fair_weight: Vec<String>,
    /// Fair claiming: most requests of a fairness key running at once, KEY=N (repeatable).
    #[arg(
        long = "fair-cap",
        value_name = "KEY=N",
        env = "COATCHECK_FAIR_CAP",
        value_delimiter = ','
    )]
    pub fair_cap: Vec<String>,
    /// Fair claiming: the running cap of keys without --fair-cap.
    #[arg(long, env = "COATCHECK_FAIR_CAP_DEFAULT")]
    pub fair_cap_default: Option<u32>,
    /// The keys file (TOML; see `coatcheck keys new`). Reloaded on SIGHUP.
    #[arg(long, env = "COATCHECK_KEYS")]
    pub keys: Option<PathBuf>,
    /// Serve on a non-loopback address without API keys (anyone who can
    /// reach the port may do anything). For trusted networks only.
    #[arg(long, env = "COATCHECK_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// Serve HTTPS with this certificate chain (PEM, leaf first); needs
    /// --tls-key. Re-read on SIGHUP.
    #[arg(long, env = "COATCHECK_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, env = "COATCHECK_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Seconds a client may take to send a request's headers; also how long
    /// an idle keep-alive connection or a TLS handshake may last.
    #[arg(long, env = "COATCHECK_HEADER_TIMEOUT", default_value_t = 30.0)]
    pub header_timeout: f64,
    /// Seconds a client may take to send a request's body (then 408).
    #[arg(long, env = "COATCHECK_BODY_TIMEOUT", default_value_t = 60.0)]
    pub body_timeout: f64,
    /// Threads that serve HTTP and run the server's tasks (the embedded
    /// store's writer, syncer and checkpointer have their own). Default: half
    /// the CPUs, at least one.
    #[arg(long, env = "COATCHECK_THREADS")]
    pub threads: Option<usize>,
}

/// The runtime's worker threads: `--threads`, or half of `cpus` (at least
/// one). Every request hops between these threads and the store's, so on a
/// small machine fewer threads mean fewer hand-offs: on two CPUs one thread
/// answered the echo benchmark's sequential requests ~0.08 ms sooner than
/// two, at the same or a higher throughput (BENCHMARKS.md).
fn runtime_threads(requested: Option<usize>, cpus: usize) -> anyhow::Result<usize> {
    match requested {
        Some(n) if !(1..=1024).contains(&n) => {
            bail!("--threads must be between 1 and 1024 (got {n})")
        }
        Some(n) => Ok(n),
        None => Ok((cpus / 2).max(1)),
    }
}

fn config(a: &Args) -> anyhow::Result<(SocketAddr, Config)> {
    let addr: SocketAddr = a.listen.parse().with_context(|| {
        format!(
            "--listen {:?} is not an address like 127.0.0.1:8080",
            a.listen
        )
    })?;
    let keyed = match &a.keys {
        Some(path) => !coatcheck_server::keys::Keys::load(path)
            .map_err(|e| anyhow::anyhow!(e))?
            .is_empty(),
        None => false,
    };
    if !addr.ip().is_loopback() && !a.insecure_no_auth && !keyed {
        bail!(
            "refusing to listen on the non-loopback address {addr} without API keys; \
             listen on 127.0.0.1, or pass --insecure-no-auth for a trusted network"
        );
    }
    if !a.max_wait.is_finite() || a.max_wait < 60.0 || a.max_wait > 86_400.0 {
        bail!(
            "--max-wait must be between 60 and 86400 seconds (got {})",
            a.max_wait
        );
    }
    if a.max_body < 1024 || a.max_body > 256 * 1024 * 1024 {
        bail!(
            "--max-body must be between 1024 bytes and 256 MiB (got {})",
            a.max_body
        );
    }
    let mut config = Config::embedded(a.data.clone());
    if let Some(url) = &a.store {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            config.store = StoreConfig::Postgres { url: url.clone() };
        } else {
            bail!("--store must be a postgres:// URL (omit it for the embedded store in --data)");
        }
    }
    if let Some(u) = &a.public_url {
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            bail!("--public-url must start with http:// or https://");
        }
        config.public_url = Some(u.trim_end_matches('/').to_string());
    }
    for secret in a.webhook_secret.iter().filter(|s| !s.trim().is_empty()) {
        let key = coatcheck_server::webhook::parse_secret(secret)
            .map_err(|e| anyhow::anyhow!("--webhook-secret: {e}"))?;
        config.webhook_secrets.push(key);
    }
    config.webhook_allow_private = a.webhook_allow_private;
    if !a.webhook_retries.is_empty() {
        config.webhook_schedule = webhook_schedule(&a.webhook_retries)?;
    }
    config.channel_retention =
        coatcheck_core::validate::duration("channel-retention", a.channel_retention)
            .map_err(|e| anyhow::anyhow!("--{e}"))?;
    config.request_retention = coatcheck_core::validate::duration("retention", a.retention)
        .map_err(|e| anyhow::anyhow!("--{e}"))?;
    if config.request_retention.is_zero() {
        bail!("--retention must be more than 0 seconds");
    }
    if config.channel_retention.is_zero() {
        bail!("--channel-retention must be more than 0 seconds");
    }
    config.keys_file = a.keys.clone();
    let mut fairness = coatcheck_store::FairnessRules {
        default_cap: a.fair_cap_default,
        ..Default::default()
    };
    for (flag, specs, map) in [
        ("--fair-weight", &a.fair_weight, &mut fairness.weights),
        ("--fair-cap", &a.fair_cap, &mut fairness.caps),
    ] {
        for spec in specs {
            let (k, n) = spec
                .rsplit_once('=')
                .with_context(|| format!("{flag} {spec:?} is not KEY=N"))?;
            let n: u32 = n
                .parse()
                .with_context(|| format!("{flag} {spec:?}: N must be a whole number"))?;
            if n == 0 && flag == "--fair-weight" {
                bail!("{flag} {spec:?}: a weight must be at least 1");
            }
            map.insert(k.to_string(), n);
        }
    }
    config.fairness = std::sync::Arc::new(fairness);
    config.limits.max_queue_depth = a.max_queue_depth;
    for spec in &a.queue_depth {
        let (q, n) = spec
            .split_once('=')
            .with_context(|| format!("--queue-depth {spec:?} is not QUEUE=N"))?;
        coatcheck_core::validate::name("queue", q)
            .map_err(|e| anyhow::anyhow!("--queue-depth: {e}"))?;
        let n: u64 = n
            .parse()
            .with_context(|| format!("--queue-depth {spec:?}: N must be a whole number"))?;
        config.limits.queue_depth.insert(q.to_string(), n);
    }
    for (flag, v) in [
        ("--submit-rate", a.submit_rate),
        ("--submit-burst", a.submit_burst),
    ] {
        if v.is_some_and(|v| !v.is_finite() || v <= 0.0) {
            bail!("{flag} must be a positive number");
        }
    }
    config.limits.submit_rate = a.submit_rate;
    config.limits.submit_burst = a.submit_burst;
    if a.max_streams_per_key == 0 {
        bail!("--max-streams-per-key must be at least 1");
    }
    config.limits.max_streams_per_key = a.max_streams_per_key;
    config.max_body = a.max_body;
    config.max_wait = Duration::from_secs_f64(a.max_wait);
    if let (Some(cert_path), Some(key_path)) = (&a.tls_cert, &a.tls_key) {
        config.tls = Some(coatcheck_server::TlsConfig {
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
        });
    }
    for (flag, v, slot) in [
        (
            "--header-timeout",
            a.header_timeout,
            &mut config.header_read_timeout,
        ),
        (
            "--body-timeout",
            a.body_timeout,
            &mut config.body_read_timeout,
        ),
    ] {
        if !v.is_finite() || !(0.1..=3600.0).contains(&v) {
            bail!("{flag} must be between 0.1 and 3600 seconds (got {v})");
        }
        *slot = Duration::from_secs_f64(v);
    }
    Ok((addr, config))
}

/// The most delays `--webhook-retries` takes.
const MAX_WEBHOOK_RETRIES: usize = 50;

/// `--webhook-retries`: 1 to 50 delays, each more than 0 and at most ten years.
fn webhook_schedule(secs: &[f64]) -> anyhow::Result<Vec<Duration>> {
    if secs.len() > MAX_WEBHOOK_RETRIES {
        bail!(
            "--webhook-retries takes at most {MAX_WEBHOOK_RETRIES} delays (got {})",
            secs.len()
        );
    }
    secs.iter()
        .map(|&s| {
            let d = coatcheck_core::validate::duration("webhook-retries", s)
                .map_err(|e| anyhow::anyhow!("--{e}"))?;
            if d.is_zero() {
                bail!("--webhook-retries: each delay must be more than 0 seconds (got {s})");
            }
            Ok(d)
        })
        .collect()
}

fn describe(store: &StoreConfig) -> String {
    match store {
        StoreConfig::Embedded { dir } => format!("embedded store in {}", dir.display()),
        StoreConfig::Postgres { .. } => "PostgreSQL store".into(),
    }
}

/// Runs the server; the exit code is 0 after a clean shutdown.
pub fn main(a: Args) -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match runtime_threads(a.threads, cpus) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return exit::ERROR;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return exit::ERROR;
        }
    };
    match rt.block_on(serve(a)) {
        Ok(()) => exit::OK,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            exit::ERROR
        }
    }
}

async fn serve(a: Args) -> anyhow::Result<()> {
    let (addr, config) = config(&a)?;
    let what = describe(&config.store);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let shutdown = CancellationToken::new();
    let server = Server::start(config, listener, shutdown.clone()).await?;
    let engine = server.engine().clone();
    let tls = server.tls();
    // SIGHUP re-reads the keys file and the TLS certificate and key. On an
    // error the ones in force stay (and the error is logged). The handler is
    // installed before the ready line: a SIGHUP sent as soon as the server
    // says it is ready must reload, not kill it (SIGHUP's default action).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match engine.reload_keys() {
                Ok(n) => tracing::info!(keys = n, "keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "keys not reloaded; the previous keys stay in force")
                }
            }
            if let Some(tls) = &tls {
                match tls.reload() {
                    Ok(()) => tracing::info!("TLS certificate reloaded"),
                    Err(e) => tracing::error!(
                        error = %format!("{e:#}"),
                        "TLS certificate not reloaded; the previous one stays in force"
                    ),
                }
            }
        }
    });
    // Likewise SIGTERM: registered before the ready line, so a SIGTERM right
    // after it drains and exits 0 instead of killing the process.
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    // The one line that says it is ready (tests and scripts wait for it).
    println!("coatcheck ready: listening on {} ({what})", server.url());
    tracing::info!(url = %server.url(), "coatcheck ready");
    tokio::spawn(async move {
        wait_for_signal(term).await;
        tracing::info!("shutting down: draining in-flight calls");
        shutdown.cancel();
    });
    server.join().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal(mut term: tokio::signal::unix::Signal) {
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_default_to_half_the_cpus_and_refuse_zero() {
        assert_eq!(runtime_threads(None, 1).unwrap(), 1);
        assert_eq!(runtime_threads(None, 2).unwrap(), 1);
        assert_eq!(runtime_threads(None, 3).unwrap(), 1);
        assert_eq!(runtime_threads(None, 16).unwrap(), 8);
        assert_eq!(runtime_threads(Some(3), 2).unwrap(), 3);
        for bad in [0, 1025] {
            let e = runtime_threads(Some(bad), 2).unwrap_err().to_string();
            assert!(e.starts_with("--threads must be"), "{bad}: {e}");
        }
    }

    #[test]
    fn webhook_retries_are_positive_bounded_delays() {
        assert_eq!(
            webhook_schedule(&[0.5, 60.0, 3600.0]).unwrap(),
            [
                Duration::from_millis(500),
                Duration::from_secs(60),
                Duration::from_secs(3600)
            ]
        );
        for bad in [&[0.0][..], &[-1.0], &[f64::NAN], &[1e12], &[1.0; 51]] {
            let e = webhook_schedule(bad).unwrap_err().to_string();
            assert!(e.starts_with("--webhook-retries"), "{bad:?}: {e}");
        }
    }
}
