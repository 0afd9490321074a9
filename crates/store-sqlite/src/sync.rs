//! The syncer: makes commits durable off the writer's thread.
//!
//! The writer's commit appends its frames to the WAL with `write()` (one
//! call, through [`crate::vfs`]) and returns without an fsync. It then
//! hands the syncer the answers that must not leave before the commit is on
//! disk. The syncer takes every job waiting, fsyncs the WAL file **once**
//! for all of them (an fsync flushes every write made to the file before it,
//! through any descriptor), and only then sends those answers — exactly the
//! guarantee `synchronous=FULL` gives, but the writer is already applying
//! the next batch while the disk flushes.
//!
//! With nothing to overlap (no command waiting for the writer, no job here)
//! the writer does this work itself ([`Syncer::sync_here`]): waking this
//! thread would only add a hand-off to a lone request's round trip.
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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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

/// How far commits and flushes have got: a commit numbered `n` (the
/// writer counts them) is durable once `synced >= n`. Shared by the writer,
/// the syncer and the store (for submits answered before their flush, see
/// `Store::request_submit_unsynced`).
#[derive(Debug, Default)]
pub struct Marks {
    /// Commits made so far (bumped right after each `COMMIT`, before any
    /// of its answers leaves).
    pub committed: AtomicU64,
    /// The highest commit an fsync is known to cover: `committed` as read
    /// just before a successful fsync (every commit before the read had
    /// written its frames), raised before that fsync's answers leave.
    pub synced: AtomicU64,
    /// Successful fsyncs of the WAL.
    pub flushes: AtomicU64,
    /// An fsync failed. The kernel may have dropped the pages it could not
    /// write and let a later fsync succeed, so from then on no mark counts
    /// as covered: a commit answered before its flush cannot be vouched for.
    pub failed: AtomicBool,
}

impl Marks {
    /// Whether every commit up to `mark` is known to be on disk.
    pub fn covers(&self, mark: u64) -> bool {
        !self.failed.load(Ordering::Acquire) && self.synced.load(Ordering::Acquire) >= mark
    }
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
pub fn spawn(
    wal: PathBuf,
    checkpoints: rusqlite::Connection,
    marks: Arc<Marks>,
) -> std::io::Result<(Syncer, JoinHandle<()>)> {
    let (tx, rx) = mpsc::channel();
    let (kick_tx, kick_rx) = mpsc::sync_channel::<()>(1);
    let catch_up = Arc::new(AtomicBool::new(false));
    let flag = catch_up.clone();
    let checkpointer = std::thread::Builder::new()
        .name("coatcheck-sqlite-checkpointer".into())
        .spawn(move || checkpoint_loop(&checkpoints, kick_rx, &flag))?;
    let in_flight = Arc::new(AtomicUsize::new(0));
    let (count, path, kick, m) = (
        in_flight.clone(),
        wal.clone(),
        kick_tx.clone(),
        marks.clone(),
    );
    let handle = std::thread::Builder::new()
        .name("coatcheck-sqlite-syncer".into())
        .spawn(move || {
            run(&path, rx, &kick, &count, &m);
            drop(kick);
            let _ = checkpointer.join();
        })?;
    let syncer = Syncer {
        jobs: tx,
        catch_up,
        in_flight,
        wal,
        kick: kick_tx,
        marks,
    };
    Ok((syncer, handle))
}

/// The running syncer (and checkpointer), as the writer sees it. Its
/// thread (from [`spawn`]) ends once this is dropped and every job sent was
/// answered.
pub struct Syncer {
    /// Where the writer sends the answers of each commit.
    jobs: mpsc::Sender<SyncJob>,
    /// Raised by a checkpoint that found the WAL long: the writer should run
    /// a short one of its own between batches (see the module docs).
    pub catch_up: Arc<AtomicBool>,
    /// Jobs sent to the syncer and not yet answered.
    in_flight: Arc<AtomicUsize>,
    wal: PathBuf,
    kick: mpsc::SyncSender<()>,
    /// Commits made and covered by an fsync.
    pub marks: Arc<Marks>,
}

impl Syncer {
    /// Hands the syncer a commit's answers.
    pub fn send(&self, job: SyncJob) -> Result<(), mpsc::SendError<SyncJob>> {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.jobs.send(job).inspect_err(|_| {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Whether every job sent so far was answered.
    pub fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Does the syncer's work on the caller's thread: fsyncs (if the job
    /// asks for it) and answers. Only when [`Syncer::idle`]: answers leave
    /// in commit order, and every earlier commit is already on disk.
    pub fn sync_here(&self, job: SyncJob) {
        finish(&self.wal, vec![job], &self.kick, &self.marks);
    }
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

fn run(
    wal: &std::path::Path,
    rx: mpsc::Receiver<SyncJob>,
    kick: &mpsc::SyncSender<()>,
    in_flight: &AtomicUsize,
    marks: &Marks,
) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while let Ok(more) = rx.try_recv() {
            jobs.push(more);
        }
        let n = jobs.len();
        finish(wal, jobs, kick, marks);
        in_flight.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One fsync for `jobs` (if any asks for it), then their answers, then a
/// nudge to the checkpointer.
fn finish(wal: &std::path::Path, jobs: Vec<SyncJob>, kick: &mpsc::SyncSender<()>, marks: &Marks) {
    let err = if jobs.iter().any(|j| j.fsync) {
        // Read before the fsync: every commit counted so far has written
        // its frames, so the fsync covers it.
        let through = marks.committed.load(Ordering::Acquire);
        match sync_file(wal) {
            Ok(()) => {
                marks.synced.fetch_max(through, Ordering::AcqRel);
                marks.flushes.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                marks.failed.store(true, Ordering::Release);
                tracing::error!(error = %e, wal = %wal.display(), "fsync of the WAL failed; the commits it covers are refused");
                Some(StoreError::Unavailable(format!(
                    "the write-ahead log could not be flushed to disk: {e}"
                )))
            }
        }
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

/// fdatasync of the file by name: opened afresh each time, so it is always
/// the WAL SQLite is writing now.
fn sync_file(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mark_is_covered_once_synced_reaches_it_and_never_after_a_failed_fsync() {
        let m = Marks::default();
        m.committed.store(7, Ordering::Release);
        m.synced.store(5, Ordering::Release);
        assert!(m.covers(4) && m.covers(5));
        assert!(!m.covers(6), "committed but not yet flushed");
        m.failed.store(true, Ordering::Release);
        assert!(
            !m.covers(4),
            "a failed fsync may have dropped earlier pages"
        );
    }
}
