//! A fresh schema per test, so tests on one database run in parallel.
//!
//! [`TestSchema::create`] makes an empty schema named
//! `cc_test_<unix seconds>_<random>` on the database of
//! `COATCHECK_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432/test`) and answers a store URL for
//! it (`…?schema=…&application_name=…`). Dropping it ends every session of
//! that URL (they carry the schema's name as `application_name`) and drops
//! the schema with everything in it. Schemas that a killed test run left
//! behind are dropped by the first `create` of a later run once they are
//! an hour old.
//!
//! [`Proxy`] stands between nodes and the database so a test can take the
//! database away and bring it back — what a restart or a network cut looks
//! like to a node — without disturbing anyone else using the same server.

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_postgres::NoTls;

/// The database tests use unless `COATCHECK_TEST_POSTGRES` says otherwise.
pub const DEFAULT_TEST_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The base URL of the test database.
pub fn base_url() -> String {
    std::env::var("COATCHECK_TEST_POSTGRES").unwrap_or_else(|_| DEFAULT_TEST_URL.to_string())
}

/// An empty schema that lives as long as this value.
#[derive(Debug)]
pub struct TestSchema {
    base: String,
    name: String,
}

static SWEPT: AtomicBool = AtomicBool::new(false);

impl TestSchema {
    /// Creates a fresh schema on the test database. Panics (it is for
    /// tests) if the database cannot be reached.
    pub async fn create() -> TestSchema {
        Self::create_at(&base_url()).await
    }

    /// Creates a fresh schema on the database of `base`.
    pub async fn create_at(base: &str) -> TestSchema {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let name = format!("cc_test_{secs}_{:08x}", rand::random::<u32>());
        let (client, conn) = tokio_postgres::connect(base, NoTls)
            .await
            .unwrap_or_else(|e| panic!("the test database {base} is not reachable: {e}"));
        let driver = tokio::spawn(conn);
        if !SWEPT.swap(true, Ordering::AcqRel) {
            sweep_stale(&client, secs).await;
        }
        client
            .batch_execute(&format!("CREATE SCHEMA \"{name}\""))
            .await
            .expect("create a test schema");
        drop(client);
        let _ = driver.await;
        TestSchema {
            base: base.to_string(),
            name,
        }
    }

    /// The schema's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A store URL for this schema.
    pub fn url(&self) -> String {
        self.url_with("")
    }

    /// A store URL for this schema with more parameters (`"pool_size=2"`).
    pub fn url_with(&self, extra: &str) -> String {
        let sep = if self.base.contains('?') { '&' } else { '?' };
        let mut url = format!(
            "{}{sep}schema={}&application_name={}",
            self.base, self.name, self.name
        );
        if !extra.is_empty() {
            url.push('&');
            url.push_str(extra);
        }
        url
    }

    /// A store URL for this schema that connects through `addr` (a
    /// [`Proxy`]) instead of the database's own address.
    pub fn url_via(&self, addr: SocketAddr, extra: &str) -> String {
        let url = self.url_with(extra);
        // postgres://user@host:port/db?… → postgres://user@ADDR/db?…
        let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
        let rest = &url[scheme_end..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        let user = authority.rsplit_once('@').map(|(u, _)| format!("{u}@"));
        format!(
            "{}{}{addr}{}",
            &url[..scheme_end],
            user.unwrap_or_default(),
            &rest[authority_end..]
        )
    }

    /// Ends every session connected with this schema's URL (a node's pool
    /// and its LISTEN connection): what a database restart looks like to
    /// those nodes. Answers how many sessions ended.
    pub async fn terminate_sessions(&self) -> u64 {
        terminate(&self.base, &self.name).await.unwrap_or(0)
    }
}

async fn terminate(base: &str, name: &str) -> Result<u64, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(base, NoTls).await?;
    let driver = tokio::spawn(conn);
    let n = client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&name],
        )
        .await;
    drop(client);
    let _ = driver.await;
    n
}

async fn drop_schema(base: &str, name: &str) -> Result<(), tokio_postgres::Error> {
    terminate(base, name).await?;
    let (client, conn) = tokio_postgres::connect(base, NoTls).await?;
    let driver = tokio::spawn(conn);
    let res = client
        .batch_execute(&format!(
            "SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
        ))
        .await;
    drop(client);
    let _ = driver.await;
    res
}

/// Drops test schemas older than an hour (left by killed runs).
async fn sweep_stale(client: &tokio_postgres::Client, now_secs: u64) {
    let Ok(rows) = client
        .query(
            "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'cc\\_test\\_%'",
            &[],
        )
        .await
    else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let born = name
            .split('_')
            .nth(2)
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        if born.saturating_add(3600) < now_secs {
            let _ = client
                .batch_execute(&format!(
                    "SET lock_timeout = '2s'; DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
                ))
                .await;
        }
    }
}

/// A TCP proxy to the test database that can be switched off (every
/// connection through it cut, new ones refused) and on again.
///
/// A switch returns only once every connection through the proxy has made
/// it: a test's next statement cannot slip through before the cut (a query
/// forwarded to the database whose connection is then made stale would
/// wait forever for an answer that nobody sends).
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    conns: Arc<Mutex<Conns>>,
    task: tokio::task::JoinHandle<()>,
}

/// What happens to the connections open through a proxy.
#[derive(Debug, Clone, Copy)]
enum Switch {
    /// Both sides closed.
    Cut,
    /// Closed for the database, open for the client until it sends something.
    Stale,
}

/// A connection's switch, with the sender of its acknowledgement.
type SwitchTx = oneshot::Sender<(Switch, oneshot::Sender<()>)>;

/// Whether the proxy accepts connections, and the switches of those open.
/// One lock, so that no connection is let in after a cut without its switch.
#[derive(Debug)]
struct Conns {
    up: bool,
    open: Vec<SwitchTx>,
}

impl Proxy {
    /// A proxy to the test database's address, listening on `127.0.0.1:0`.
    pub async fn start() -> Proxy {
        let cfg = tokio_postgres::Config::from_str(&base_url()).expect("a valid test database URL");
        let host = match cfg.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
            _ => "127.0.0.1".to_string(),
        };
        let port = cfg.get_ports().first().copied().unwrap_or(5432);
        let target = format!("{host}:{port}");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a proxy");
        let addr = listener.local_addr().expect("proxy address");
        let conns = Arc::new(Mutex::new(Conns {
            up: true,
            open: Vec::new(),
        }));
        let shared = conns.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (tx, rx) = oneshot::channel();
                {
                    let mut c = shared.lock().expect("proxy state");
                    if !c.up {
                        continue; // refused: the database is "down"
                    }
                    c.open.retain(|s| !s.is_closed());
                    c.open.push(tx);
                }
                tokio::spawn(relay(client, target.clone(), rx));
            }
        });
        Proxy { addr, conns, task }
    }

    /// Where nodes should connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends `switch` to every open connection; answers their acknowledgements.
    fn switch_all(&self, switch: Switch, up: Option<bool>) -> Vec<oneshot::Receiver<()>> {
        let mut c = self.conns.lock().expect("proxy state");
        if let Some(up) = up {
            c.up = up;
        }
        c.open
            .drain(..)
            .filter_map(|tx| {
                let (ack, acked) = oneshot::channel();
                tx.send((switch, ack)).ok().map(|()| acked)
            })
            .collect()
    }

    /// The database goes away: every connection through the proxy is cut
    /// and new ones are refused.
    pub async fn down(&self) {
        for acked in self.switch_all(Switch::Cut, Some(false)) {
            let _ = acked.await;
        }
    }

    /// The database ends every session through the proxy, but the clients
    /// learn of it only when they next send something (their sockets stay
    /// open until then): a pooled connection that looks alive and is not.
    /// New connections work.
    pub async fn close_unnoticed(&self) {
        for acked in self.switch_all(Switch::Stale, None) {
            let _ = acked.await;
        }
    }

    /// The database is back.
    pub fn up(&self) {
        self.conns.lock().expect("proxy state").up = true;
    }
}

/// Relays one connection to the database until its switch.
async fn relay(
    mut client: TcpStream,
    target: String,
    mut switch: oneshot::Receiver<(Switch, oneshot::Sender<()>)>,
) {
    let Ok(mut server) = TcpStream::connect(&target).await else {
        return;
    };
    let switched = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => None,
        s = &mut switch => s.ok(),
    };
    let Some((how, ack)) = switched else {
        return;
    };
    drop(server);
    match how {
        Switch::Cut => {
            drop(client);
            let _ = ack.send(());
        }
        Switch::Stale => {
            let _ = ack.send(());
            let mut byte = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut client, &mut byte).await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = self.switch_all(Switch::Cut, Some(false));
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        let (base, name) = (self.base.clone(), self.name.clone());
        // Drop may run inside an async runtime: do the work on a thread of
        // its own with a small runtime of its own, and wait for it.
        let worker = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            rt.block_on(async {
                match tokio::time::timeout(Duration::from_secs(20), drop_schema(&base, &name)).await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => eprintln!("could not drop test schema {name}: {e}"),
                    Err(_) => eprintln!("dropping test schema {name} timed out"),
                }
            })
        });
        let _ = worker.join();
    }
}
