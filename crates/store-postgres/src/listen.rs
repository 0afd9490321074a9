//! Wake-ups across nodes: one connection per node that both LISTENs and
//! NOTIFYs (the "bus").
//!
//! **Sending.** After a write commits, the store hands the bus a short entry
//! per changed request (id, queue, status, lease expiry, run_after,
//! deadline). The bus drains whatever is waiting and sends it with
//! `pg_notify` in one statement — payloads cut below PostgreSQL's 8000-byte
//! limit, each tagged with this node's id — on its own connection, which
//! commits without waiting for the WAL flush (`synchronous_commit = off`:
//! a notification is a hint, not data).
//!
//! A write answers its caller only once its notification is sent (or could
//! not be): a client that saw a claim's answer knows every other node has
//! heard of that lease, so killing the node right after loses nothing. The
//! wait is bounded (1 s) so a bus that is reconnecting never holds writes.
//!
//! Why not `NOTIFY` inside each write transaction? PostgreSQL serializes the
//! commits of all transactions that notify (a database-wide lock held
//! through the commit's WAL flush), which defeats group commit: measured
//! here with pgbench (16 clients, insert + commit), 9.4k commits/s without
//! `NOTIFY` and 3.5k/s with it. Sending right after the commit keeps the
//! writes at full speed and still never announces a change before it is
//! visible. The price: a node killed between a commit and its send (well
//! under a millisecond, and before its caller got an answer) loses those
//! wake-ups; other nodes' waiters then find the change at their next look
//! (a long-poll's timeout, a worker's next claim), and their timers at
//! their next round (any lease hint from anywhere starts one).
//!
//! **Receiving.** Notifications from other nodes become
//! [`RemoteChange::Request`]s on a broadcast channel, which
//! `Store::remote_changes` hands to the engine; this node's own are skipped
//! (the engine already saw them). If the connection drops, the bus
//! reconnects with backoff (100 ms doubling to 5 s) and then sends
//! [`RemoteChange::Resync`]: every waiter and timer re-checks, so nothing
//! missed while it was away stays missed. If a batch could not be sent, the
//! bus tells the other nodes to resync once it is back.

use std::time::Duration;

use coatcheck_core::clock::{from_micros, to_micros};
use coatcheck_core::{Request, Status};
use coatcheck_store::RemoteChange;
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, Notification};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::sql;

/// The largest payload sent (PostgreSQL refuses 8000 bytes and more).
const MAX_PAYLOAD: usize = 7900;

/// How many remote changes a slow follower may fall behind before it is
/// told it lagged (and re-checks everything).
const FEED_CAPACITY: usize = 4096;

/// A notification's payload: the sending node, and its changes, each a
/// JSON array tagged by its first element:
/// `["r", id, queue, status, lease_expires_at, run_after, deadline]` (a
/// request; times in microseconds since the epoch), `["c", tenant,
/// channel]` (a reply appended to a channel), `["w", due]` (a webhook
/// delivery due).
#[derive(Deserialize)]
struct Message {
    /// The sending node.
    n: String,
    /// The changes.
    #[serde(default)]
    c: Vec<serde_json::Value>,
    /// "You may have missed some: re-check everything."
    #[serde(default)]
    r: bool,
}

/// What the bus sends for a changed request.
pub fn entry(req: &Request) -> String {
    let running = req.status == Status::Running;
    let queued = req.status == Status::Queued;
    serde_json::json!([
        "r",
        req.id,
        req.queue,
        req.status.as_str(),
        req.lease
            .as_ref()
            .filter(|_| running)
            .map(|l| to_micros(l.expires_at)),
        req.run_after.filter(|_| queued).map(to_micros),
        req.deadline
            .filter(|_| !req.status.is_terminal())
            .map(to_micros),
    ])
    .to_string()
}

/// What the bus sends for a reply appended to a channel.
pub fn channel_entry(tenant: &str, channel: &str) -> String {
    serde_json::json!(["c", tenant, channel]).to_string()
}

/// What the bus sends for a webhook delivery due at `due`.
pub fn webhook_entry(due: coatcheck_core::Ts) -> String {
    serde_json::json!(["w", to_micros(due)]).to_string()
}

/// Reads one tagged entry.
fn decode(e: &serde_json::Value) -> Option<RemoteChange> {
    let a = e.as_array()?;
    let text = |i: usize| a.get(i).and_then(|v| v.as_str()).map(str::to_string);
    let time = |i: usize| a.get(i).and_then(|v| v.as_i64()).map(from_micros);
    match a.first()?.as_str()? {
        "r" => Some(RemoteChange::Request {
            id: text(1)?,
            queue: text(2)?,
            status: Status::parse(a.get(3)?.as_str()?)?,
            lease_expires_at: time(4),
            run_after: time(5),
            deadline: time(6),
        }),
        "c" => Some(RemoteChange::Channel {
            tenant: text(1)?,
            channel: text(2)?,
        }),
        "w" => Some(RemoteChange::Webhook { due: time(1)? }),
        _ => None,
    }
}

/// An error with the server's message, if it sent one ("db error" alone
/// says little).
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

/// Packs entries into payloads below [`MAX_PAYLOAD`].
fn payloads(node: &str, entries: &[String]) -> Vec<String> {
    let head = format!("{{\"n\":\"{node}\",\"c\":[");
    let mut out = Vec::new();
    let mut cur = head.clone();
    for e in entries {
        if e.len() + head.len() + 2 > MAX_PAYLOAD {
            tracing::warn!("a change entry is too long to announce; skipped");
            continue;
        }
        if cur.len() + e.len() + 3 > MAX_PAYLOAD {
            cur.push_str("]}");
            out.push(std::mem::replace(&mut cur, head.clone()));
        }
        if cur.len() > head.len() {
            cur.push(',');
        }
        cur.push_str(e);
    }
    if cur.len() > head.len() {
        cur.push_str("]}");
        out.push(cur);
    }
    out
}

/// The notification channel of a schema: `coatcheck_changes` for the
/// default schema, `coatcheck_changes_<schema>` otherwise (so clusters and
/// tests sharing a database do not wake each other), at most 63 bytes.
pub fn channel_name(schema: Option<&str>) -> String {
    let mut name = match schema {
        None => "coatcheck_changes".to_string(),
        Some(s) => format!("coatcheck_changes_{s}"),
    };
    name.truncate(63);
    name
}

/// How long a write waits for its notification to be sent.
const SEND_WAIT: Duration = Duration::from_secs(1);

/// Entries to send, and who to tell when they are sent.
type Outgoing = (Vec<String>, oneshot::Sender<()>);

/// The handle the store keeps.
pub struct Bus {
    out: mpsc::UnboundedSender<Outgoing>,
    feed: broadcast::Sender<RemoteChange>,
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Bus {
    /// Connects, starts listening, and runs the bus until [`Bus::close`].
    /// Fails if the first connection cannot be made.
    pub async fn start(
        pg: tokio_postgres::Config,
        tls: MakeRustlsConnect,
        channel: String,
        node: String,
    ) -> Result<Bus, tokio_postgres::Error> {
        let conn = Conn::open(&pg, &tls, &channel).await?;
        let (out, out_rx) = mpsc::unbounded_channel();
        let (feed, _) = broadcast::channel(FEED_CAPACITY);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(
            Runner {
                pg,
                tls,
                channel,
                node,
                feed: feed.clone(),
                out: out_rx,
                stop: stop_rx,
                lost: false,
            }
            .run(conn),
        );
        Ok(Bus {
            out,
            feed,
            stop: std::sync::Mutex::new(Some(stop)),
            task: std::sync::Mutex::new(Some(task)),
        })
    }

    /// Announces changes (entries from [`entry`]) to the other nodes;
    /// resolves once they are sent, could not be, or after a bounded wait.
    pub async fn send(&self, entries: Vec<String>) {
        if entries.is_empty() {
            return;
        }
        let (done, sent) = oneshot::channel();
        if self.out.send((entries, done)).is_ok() {
            let _ = tokio::time::timeout(SEND_WAIT, sent).await;
        }
    }

    /// A new receiver of other nodes' changes.
    pub fn subscribe(&self) -> broadcast::Receiver<RemoteChange> {
        self.feed.subscribe()
    }

    /// Sends what is pending, then stops.
    pub async fn close(&self) {
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
    }
}

/// A live bus connection: the client, and notifications as they arrive
/// (the channel closes when the connection ends).
struct Conn {
    client: Client,
    incoming: mpsc::UnboundedReceiver<Notification>,
    driver: JoinHandle<()>,
}

impl Conn {
    async fn open(
        pg: &tokio_postgres::Config,
        tls: &MakeRustlsConnect,
        channel: &str,
    ) -> Result<Conn, tokio_postgres::Error> {
        let (client, mut connection) = pg.connect(tls.clone()).await?;
        let (tx, incoming) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::warn!(error = %describe(&e), "the LISTEN connection failed");
                        return;
                    }
                    None => return,
                }
            }
        });
        let setup = format!("SET synchronous_commit TO off; LISTEN \"{channel}\"");
        if let Err(e) = client.batch_execute(&setup).await {
            driver.abort();
            return Err(e);
        }
        Ok(Conn {
            client,
            incoming,
            driver,
        })
    }
}

struct Runner {
    pg: tokio_postgres::Config,
    tls: MakeRustlsConnect,
    channel: String,
    node: String,
    feed: broadcast::Sender<RemoteChange>,
    out: mpsc::UnboundedReceiver<Outgoing>,
    stop: oneshot::Receiver<()>,
    /// A batch could not be sent: tell the others to resync when back.
    lost: bool,
}

enum Ended {
    Stop,
    Dropped,
}

impl Runner {
    async fn run(mut self, first: Conn) {
        let mut conn = Some(first);
        let mut backoff = Duration::from_millis(100);
        loop {
            let c = match conn.take() {
                Some(c) => c,
                None => match Conn::open(&self.pg, &self.tls, &self.channel).await {
                    Ok(c) => {
                        tracing::info!("the LISTEN connection is back; every waiter re-checks");
                        backoff = Duration::from_millis(100);
                        let _ = self.feed.send(RemoteChange::Resync);
                        c
                    }
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), retry_in = ?backoff, "cannot open the LISTEN connection");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = &mut self.stop => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        continue;
                    }
                },
            };
            let ended = self.serve(c).await;
            if let Ended::Stop = ended {
                return;
            }
        }
    }

    /// Serves one connection until it drops or the bus stops.
    async fn serve(&mut self, mut c: Conn) -> Ended {
        if self.lost {
            let resync = format!("{{\"n\":\"{}\",\"r\":true}}", self.node);
            if self.notify(&c.client, vec![resync]).await {
                self.lost = false;
            }
        }
        let ended = loop {
            tokio::select! {
                n = c.incoming.recv() => match n {
                    Some(n) => self.receive(&n),
                    None => break Ended::Dropped,
                },
                batch = self.out.recv() => match batch {
                    Some(first) => {
                        let (entries, _acks) = self.drain(first);
                        let sent = self.notify(&c.client, payloads(&self.node, &entries)).await;
                        if !sent {
                            self.lost = true;
                            break Ended::Dropped;
                        }
                    }
                    None => break Ended::Stop,
                },
                _ = &mut self.stop => {
                    // Send what is already waiting, then stop.
                    if let Ok(first) = self.out.try_recv() {
                        let (entries, _acks) = self.drain(first);
                        self.notify(&c.client, payloads(&self.node, &entries)).await;
                    }
                    break Ended::Stop;
                }
            }
        };
        c.driver.abort();
        ended
    }

    /// Everything waiting, and the senders to tell (dropping them tells).
    fn drain(&mut self, first: Outgoing) -> (Vec<String>, Vec<oneshot::Sender<()>>) {
        let (mut entries, done) = first;
        let mut acks = vec![done];
        while let Ok((more, done)) = self.out.try_recv() {
            entries.extend(more);
            acks.push(done);
            if entries.len() > 10_000 {
                break;
            }
        }
        (entries, acks)
    }

    async fn notify(&self, client: &Client, payloads: Vec<String>) -> bool {
        if payloads.is_empty() {
            return true;
        }
        match client.query(sql::NOTIFY, &[&self.channel, &payloads]).await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %describe(&e), "could not announce changes to other nodes");
                false
            }
        }
    }

    fn receive(&self, n: &Notification) {
        let Ok(m) = serde_json::from_str::<Message>(n.payload()) else {
            tracing::warn!(payload = n.payload(), "an unreadable change notification");
            return;
        };
        if m.n == self.node {
            return;
        }
        if m.r {
            let _ = self.feed.send(RemoteChange::Resync);
        }
        for change in m.c.iter().filter_map(decode) {
            let _ = self.feed.send(change);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_stay_below_the_limit_and_keep_every_entry() {
        let entries: Vec<String> = (0..500)
            .map(|i| {
                serde_json::json!([
                    "r",
                    format!("0190c0de-0000-7000-8000-{i:012}"),
                    "a-queue",
                    "queued",
                    null,
                    1_700_000_000_000_000i64,
                    null
                ])
                .to_string()
            })
            .chain([
                channel_entry("t1", "replies"),
                webhook_entry(from_micros(5)),
            ])
            .collect();
        let out = payloads("node1", &entries);
        assert!(out.len() > 1);
        let mut n = 0;
        for p in &out {
            assert!(p.len() < 8000, "{}", p.len());
            let m: Message = serde_json::from_str(p).unwrap();
            assert_eq!(m.n, "node1");
            n += m.c.len();
        }
        assert_eq!(n, 502);
    }

    #[test]
    fn entries_decode_to_remote_changes() {
        let c = decode(&serde_json::from_str(&channel_entry("t1", "ch")).unwrap());
        assert_eq!(
            c,
            Some(RemoteChange::Channel {
                tenant: "t1".into(),
                channel: "ch".into()
            })
        );
        let w = decode(&serde_json::from_str(&webhook_entry(from_micros(7))).unwrap());
        assert_eq!(
            w,
            Some(RemoteChange::Webhook {
                due: from_micros(7)
            })
        );
        assert_eq!(decode(&serde_json::json!(["?", 1])), None);
    }

    #[test]
    fn channel_names_fit_an_identifier() {
        assert_eq!(channel_name(None), "coatcheck_changes");
        assert_eq!(channel_name(Some("cc_t")), "coatcheck_changes_cc_t");
        assert!(channel_name(Some(&"x".repeat(63))).len() <= 63);
    }
}
