//! The syncer: makes commits durable off the writer's thread.
//!
//! The writer commits with `synchronous=NORMAL`, so a commit appends its
//! frames to the WAL with `write()` and returns without an fsync. It then
//! hands the syncer the answers that must not leave before the commit is on
//! disk. The syncer takes every job waiting, fsyncs the WAL file **once**
//! for all of them (an fsync flushes every write made to the file before it,
//! through any descriptor), and only then sends those answers — exactly the
//! guarantee `synchronous=FULL` gives, but the writer is already applying
//! the next batch while the disk flushes.
//!
//! Jobs are answered in commit order. A job that needs no fsync of its own
//! (say, a reply-channel receive in a batch with nothing durable) still
//! waits behind every earlier job, so it can never hand out a change that a
//! power cut could take back.
//!
//! **Checkpoints** (copying the WAL back into the database file) run on a
//! third thread with its own connection, not inside the writer's commits
//! (`wal_autocheckpoint` is off on the writer): the syncer nudges it after
//! each flush, and it runs a `PASSIVE` checkpoint at most every
//! [`CHECKPOINT_EVERY`]. SQLite fsyncs the WAL before a checkpoint copies it
//! and the database after, so a checkpoint never moves data that is not on
//! disk yet. An idle store gets no nudges and its checkpointer sleeps.
//!
//! A checkpoint running beside the writer can never catch up with it under
//! steady load (the writer adds frames while it copies), and SQLite starts
//! the WAL over only once every frame is copied — so once a checkpoint finds
//! [`CATCH_UP_FRAMES`] in the WAL the checkpointer raises a flag, and the
//! writer, between two batches, runs a `PASSIVE` checkpoint itself: it copies only what was
//! committed meanwhile, and the writer's next transaction can then start the
//! WAL from the beginning (truncated to `journal_size_limit`). Without this
//! the WAL grew by ~60 MB/s under the echo benchmark.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use coatcheck_store::StoreError;

/// An answer to a caller; called with the error that stops it, if any.
pub type Answer = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// The answers of one commit.
pub struct SyncJob {
    /// Sent after the fsync (or with its error).
    pub answers: Vec<Answer>,
    /// Whether this commit holds a change whose acknowledgement promises
    /// durability (otherwise the job only keeps its place in line).
    pub fsync: bool,
}

/// The shortest time between two checkpoints. Each one fsyncs the WAL and
/// the database, and those flushes queue on the disk with the syncer's: a
/// checkpoint every 50 ms made the syncer's fsyncs slower under load.
pub const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// WAL frames (pages) after which the writer runs its catch-up checkpoint,
/// so the WAL can start over (~8 MiB). The catch-up fsyncs on the writer's
/// thread, so it runs only when the WAL got this long, not after every
/// checkpoint.
pub const CATCH_UP_FRAMES: i64 = 2048;

/// Starts the syncer for the WAL file at `wal`, and the checkpointer on
/// `checkpoints` (a connection of its own to the same database).
pub fn spawn(wal: PathBuf, checkpoints: rusqlite::Connection) -> std::io::Result<Syncer> {
    let (tx, rx) = mpsc::channel();
    let (kick_tx, kick_rx) = mpsc::sync_channel::<()>(1);
    let catch_up = Arc::new(AtomicBool::new(false));
    let flag = catch_up.clone();
    let checkpointer = std::thread::Builder::new()
        .name("coatcheck-sqlite-checkpointer".into())
        .spawn(move || checkpoint_loop(&checkpoints, kick_rx, &flag))?;
    let handle = std::thread::Builder::new()
        .name("coatcheck-sqlite-syncer".into())
        .spawn(move || {
            run(&wal, rx, &kick_tx);
            drop(kick_tx);
            let _ = checkpointer.join();
        })?;
    Ok(Syncer {
        jobs: tx,
        thread: handle,
        catch_up,
    })
}

/// The running syncer (and checkpointer), as the writer sees it.
pub struct Syncer {
    /// Where the writer sends the answers of each commit.
    pub jobs: mpsc::Sender<SyncJob>,
    /// Ends after every job was answered.
    pub thread: JoinHandle<()>,
    /// Raised by a checkpoint that found the WAL long: the writer should run
    /// a short one of its own between batches (see the module docs).
    pub catch_up: Arc<AtomicBool>,
}

fn checkpoint_loop(conn: &rusqlite::Connection, kicks: mpsc::Receiver<()>, catch_up: &AtomicBool) {
    while kicks.recv().is_ok() {
        // Its row: (busy, frames in the WAL, frames copied).
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) if frames >= CATCH_UP_FRAMES => catch_up.store(true, Ordering::Relaxed),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint failed; the next one retries"),
        }
        std::thread::sleep(CHECKPOINT_EVERY);
    }
}

fn run(wal: &std::path::Path, rx: mpsc::Receiver<SyncJob>, kick: &mpsc::SyncSender<()>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let err = if jobs.iter().any(|j| j.fsync) {
            sync_file(wal).err().map(|e| {
                tracing::error!(error = %e, wal = %wal.display(), "fsync of the WAL failed; the commits it covers are refused");
                StoreError::Unavailable(format!("the write-ahead log could not be flushed to disk: {e}"))
            })
        } else {
            None
        };
        for job in jobs {
            for answer in job.answers {
                answer(err.as_ref());
            }
        }
        // Full (a checkpoint is already due) or gone (shutting down): either way, fine.
        let _ = kick.try_send(());
    }
}

/// fdatasync of the file by name: opened afresh each time, so it is always
/// the WAL SQLite is writing now.
fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}
