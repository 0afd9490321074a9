//! # coatcheck-store-sqlite
//!
//! The embedded default store: one data directory, zero set-up, durable.
//!
//! - **SQLite in WAL mode**: every answer that promises durability is sent
//!   only after the WAL is fsync'd, so it survives a crash or power cut.
//! - **One writer thread that group-commits** ([`writer`]): every write is a
//!   command sent to it; it applies everything pending in one transaction,
//!   and a syncer thread ([`sync`]) fsyncs the WAL once per group of commits
//!   before answering them — while the writer already applies the next.
//! - **Reads on their own connections** ([`read`]), never queued behind writes
//!   (WAL readers see the last commit without blocking the writer).
//! - **Numbered migrations embedded in the binary** (`migrations/`), applied
//!   at open, tracked with `PRAGMA user_version`.
//! - **The data directory is locked** (an OS file lock on `LOCK`), so a second
//!   server on the same directory refuses to start instead of corrupting it.

mod read;
mod sql;
mod sync;
pub mod vfs;
pub mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use async_trait::async_trait;
use coatcheck_core::rules::CancelOutcome;
use coatcheck_core::wire::ChannelMessage;
use coatcheck_core::{HistoryEvent, Request, Ts};
use coatcheck_store::{
    Changed, ChannelReceiveParams, ClaimParams, DueTimes, HeartbeatParams, ListParams, ParkHandle,
    ParkedClaim, QueueCounts, QueueWaker, RequestRef, Result, SettleParams, Store, StoreError,
    StoreOptions, SubmitParams, Submitted, WebhookDelivery, WebhookOutcome,
};
use rusqlite::Connection;
use tokio::sync::oneshot;

use crate::read::ReadPool;
use crate::writer::Cmd;

/// Why the store could not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Another process holds the data directory.
    #[error(
        "the data directory {0} is in use by another coatcheck process (its LOCK file is held)"
    )]
    Locked(PathBuf),
    /// The directory or database could not be created or opened.
    #[error("cannot open the data directory {path}: {message}")]
    Io {
        /// The directory.
        path: PathBuf,
        /// What failed.
        message: String,
    },
}

/// The embedded store.
pub struct SqliteStore {
    dir: PathBuf,
    tx: Arc<Mutex<Option<mpsc::Sender<Cmd>>>>,
    /// Ids of parked claims.
    next_park: std::sync::atomic::AtomicU64,
    writer: Mutex<Option<JoinHandle<()>>>,
    reads: ReadPool,
    waker: Arc<OnceLock<QueueWaker>>,
    /// Commits made and covered by an fsync (for unsynced submits).
    marks: Arc<sync::Marks>,
    _lock: File,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("dir", &self.dir)
            .finish()
    }
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> OpenError {
    OpenError::Io {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Opens a connection with the store's pragmas.
fn connect(db: &Path) -> rusqlite::Result<Connection> {
    setup(Connection::open(db)?)
}

/// The writer's connection: through [`vfs`] when it can be registered, so
/// each commit's WAL frames reach the file in one write. It syncs each
/// commit (`synchronous=FULL`; the VFS turns that sync into the write) and
/// marks checkpoint syncs (`checkpoint_fullfsync`), which reach the disk.
fn connect_writer(db: &Path) -> rusqlite::Result<Connection> {
    if !vfs::register() {
        tracing::warn!("the WAL-coalescing VFS cannot wrap this SQLite's default VFS; the writer uses the default");
        let conn = connect(db)?;
        // Commits only write the WAL; the syncer makes them durable.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        return Ok(conn);
    }
    let flags = rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE
        | rusqlite::OpenFlags::SQLITE_OPEN_CREATE
        | rusqlite::OpenFlags::SQLITE_OPEN_URI
        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = setup(Connection::open_with_flags_and_vfs(db, flags, vfs::NAME)?)?;
    conn.pragma_update(None, "checkpoint_fullfsync", "ON")?;
    Ok(conn)
}

fn setup(conn: Connection) -> rusqlite::Result<Connection> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    // Savepoints (one per command in a group commit) journal the pages they
    // touch; keep that sub-journal in memory, not in a temp file.
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    let applied: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if applied as usize > sql::MIGRATIONS.len() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the data directory has schema version {applied}, newer than this coatcheck knows ({}); use a newer coatcheck",
            sql::MIGRATIONS.len()
        )));
    }
    for (i, m) in sql::MIGRATIONS.iter().enumerate().skip(applied as usize) {
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE; {m}; PRAGMA user_version = {}; COMMIT;",
            i + 1
        ))?;
    }
    Ok(())
}

impl SqliteStore {
    /// Opens (creating if needed) the store in `dir`, locking it.
    pub fn open(dir: impl AsRef<Path>, opts: StoreOptions) -> std::result::Result<Self, OpenError> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join("LOCK"))
            .map_err(|e| io_err(&dir, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(OpenError::Locked(dir)),
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(&dir, e)),
        }
        let db = dir.join("coatcheck.db");
        let conn = connect_writer(&db).map_err(|e| io_err(&dir, e))?;
        migrate(&conn).map_err(|e| io_err(&dir, e))?;
        let (tx, rx) = mpsc::channel();
        let retry = opts.retry;
        let checkpoints = connect(&db).map_err(|e| io_err(&dir, e))?;
        let mut wal = db.clone().into_os_string();
        wal.push("-wal");
        let marks = Arc::new(sync::Marks::default());
        let (syncer, synced) =
            sync::spawn(wal.into(), checkpoints, marks.clone()).map_err(|e| io_err(&dir, e))?;
        let waker: Arc<OnceLock<QueueWaker>> = Arc::default();
        let w = waker.clone();
        let writer = std::thread::Builder::new()
            .name("coatcheck-sqlite-writer".into())
            .spawn(move || writer::run(conn, rx, retry, syncer, synced, w))
            .map_err(|e| io_err(&dir, e))?;
        Ok(SqliteStore {
            reads: ReadPool::new(db),
            dir,
            tx: Arc::new(Mutex::new(Some(tx))),
            next_park: Default::default(),
            writer: Mutex::new(Some(writer)),
            waker,
            marks,
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    async fn write<T>(&self, make: impl FnOnce(oneshot::Sender<Result<T>>) -> Cmd) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        send(&self.tx, make(tx))?;
        rx.await.map_err(|_| closed())?
    }
}

/// Hands `cmd` to the writer; a closed store refuses it.
fn send(writer: &Mutex<Option<mpsc::Sender<Cmd>>>, cmd: Cmd) -> Result<()> {
    let guard = writer.lock().unwrap_or_else(|e| e.into_inner());
    let sender = guard.as_ref().ok_or_else(closed)?;
    sender.send(cmd).map_err(|_| closed())
}

/// A parked claim's way to the writer; it does not keep a closed store's
/// writer alive.
struct Park {
    id: u64,
    queue: String,
    writer: std::sync::Weak<Mutex<Option<mpsc::Sender<Cmd>>>>,
}

impl Park {
    /// A closed store drops `cmd` (and with it a parked claim's answer
    /// sender, so its waiter hears that the store closed).
    fn send(&self, cmd: Cmd) {
        if let Some(writer) = self.writer.upgrade() {
            let _ = send(&writer, cmd);
        }
    }
}

impl ParkHandle for Park {
    fn poke(&self, now: Ts) {
        self.send(Cmd::Poke(self.queue.clone(), now));
    }

    fn unpark(&self) {
        self.send(Cmd::Unpark(self.queue.clone(), self.id));
    }
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

#[async_trait]
impl Store for SqliteStore {
    fn on_claimable(&self, wake: QueueWaker) {
        let _ = self.waker.set(wake);
    }

    async fn due_times(&self, now: Ts) -> Result<DueTimes> {
        self.reads.run_now(|c| read::due_times(c, now))
    }

    async fn channel_ack(
        &self,
        tenant: String,
        channel: String,
        tokens: Vec<String>,
        now: Ts,
    ) -> Result<Vec<bool>> {
        self.write(|tx| Cmd::ChannelAck(tenant, channel, tokens, now, tx))
            .await
    }

    async fn channel_purge(&self, before: Ts, limit: u32) -> Result<u64> {
        self.write(|tx| Cmd::ChannelPurge(before, limit, tx)).await
    }

    async fn channel_receive(&self, p: ChannelReceiveParams) -> Result<Vec<ChannelMessage>> {
        self.write(|tx| Cmd::ChannelReceive(p, tx)).await
    }

    async fn dead_letter_redrive(&self, r: RequestRef, now: Ts) -> Result<Changed> {
        self.write(|tx| Cmd::Redrive(r, now, tx)).await
    }

    async fn deadline_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.write(|tx| Cmd::ExpireDeadlines(now, limit, tx)).await
    }

    async fn lease_heartbeat(&self, p: HeartbeatParams) -> Result<Changed> {
        self.write(|tx| Cmd::Heartbeat(p, tx)).await
    }

    async fn lease_expire_due(&self, now: Ts, limit: u32) -> Result<Vec<Changed>> {
        self.write(|tx| Cmd::ExpireLeases(now, limit, tx)).await
    }

    async fn queue_depth(&self, queue: &str) -> Result<u64> {
        let queue = queue.to_string();
        self.reads
            .run(move |c| {
                c.prepare_cached(
                    "SELECT count(*) FROM requests WHERE queue = ?1 AND status = 'queued'",
                )
                .and_then(|mut s| s.query_row([&queue], |r| r.get::<_, i64>(0)))
                .map(|n| n as u64)
                .map_err(sql::classify)
            })
            .await
    }

    async fn queue_stats(&self, now: Ts) -> Result<Vec<QueueCounts>> {
        self.reads.run(move |c| read::queue_stats(c, now)).await
    }

    async fn request_cancel(&self, r: RequestRef, now: Ts) -> Result<(CancelOutcome, Changed)> {
        self.write(|tx| Cmd::Cancel(r, now, tx)).await
    }

    async fn request_claim(&self, p: ClaimParams) -> Result<Vec<Request>> {
        self.write(|tx| Cmd::Claim(p, tx)).await
    }

    fn request_claim_parked(&self, p: ClaimParams) -> Option<ParkedClaim> {
        let id = self
            .next_park
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let park = Park {
            id,
            queue: p.queue.clone(),
            writer: Arc::downgrade(&self.tx),
        };
        let (tx, answer) = oneshot::channel();
        // If the store is closed the sender is dropped here, and the answer
        // reports that.
        park.send(Cmd::ClaimParked(p, tx, id));
        Some(ParkedClaim {
            answer,
            handle: Box::new(park),
        })
    }

    async fn request_get(&self, r: RequestRef) -> Result<Request> {
        self.reads.run_now(|c| read::get(c, &r))
    }

    async fn request_history(&self, r: RequestRef, after_seq: u64) -> Result<Vec<HistoryEvent>> {
        self.reads.run_now(|c| {
            read::get(c, &r)?;
            sql::history(c, &r.id, after_seq)
        })
    }

    async fn request_list(&self, p: ListParams) -> Result<Vec<Request>> {
        self.reads.run(move |c| read::list(c, &p)).await
    }

    async fn request_purge(&self, finished_before: Ts, limit: u32) -> Result<u64> {
        self.write(|tx| Cmd::Purge(finished_before, limit, tx))
            .await
    }

    async fn request_settle_many(
        &self,
        items: Vec<SettleParams>,
        now: Ts,
    ) -> Result<Vec<Result<Changed>>> {
        self.write(|tx| Cmd::Settle(items, now, tx)).await
    }

    async fn request_submit(&self, p: SubmitParams) -> Result<Submitted> {
        self.write(|tx| Cmd::Submit(Box::new(p), tx)).await
    }

    async fn request_submit_unsynced(&self, p: SubmitParams) -> Result<(Submitted, Option<u64>)> {
        if self.marks.failed.load(Ordering::Acquire) {
            // After a failed fsync no mark can be vouched for: submit the
            // plain way, flushed before it answers.
            return Ok((self.request_submit(p).await?, None));
        }
        let (submitted, mark) = self
            .write(|tx| Cmd::SubmitUnsynced(Box::new(p), tx))
            .await?;
        Ok((submitted, (!self.marks.covers(mark)).then_some(mark)))
    }

    async fn sync_through(&self, mark: u64) -> Result<()> {
        if self.marks.covers(mark) {
            return Ok(());
        }
        // A command that must be durable: its batch is flushed, and that
        // flush covers every earlier commit.
        self.write(Cmd::Sync).await?;
        if self.marks.covers(mark) {
            Ok(())
        } else {
            Err(StoreError::Unavailable(
                "an earlier flush of the write-ahead log failed; changes made before it cannot be vouched for".into(),
            ))
        }
    }

    fn flushes(&self) -> Option<u64> {
        Some(self.marks.flushes.load(Ordering::Relaxed))
    }

    async fn webhook_claim_due(
        &self,
        now: Ts,
        limit: u32,
        lease: std::time::Duration,
    ) -> Result<Vec<WebhookDelivery>> {
        self.write(|tx| Cmd::WebhookClaim(now, limit, lease, tx))
            .await
    }

    async fn webhook_record(&self, o: WebhookOutcome) -> Result<()> {
        self.write(|tx| Cmd::WebhookRecord(o, tx)).await
    }

    async fn store_close(&self) {
        let sender = self.tx.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(sender);
        let handle = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }

    async fn store_ping(&self) -> Result<()> {
        if self.tx.lock().unwrap_or_else(|e| e.into_inner()).is_none() {
            return Err(closed());
        }
        self.reads
            .run(|c| {
                c.query_row("SELECT 1", [], |_| Ok(()))
                    .map_err(sql::classify)
            })
            .await
    }

    async fn store_secret(&self, name: &str) -> Result<Vec<u8>> {
        let name = name.to_string();
        self.write(|tx| Cmd::Secret(name, tx)).await
    }
}
