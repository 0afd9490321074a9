//! The client-side pending journal: a durable list of the requests this client
//! submitted and has not yet seen finish, so that a restarted process knows
//! what to resume waiting for ([`crate::Client::pending`]).
//!
//! Opt in with [`crate::ClientBuilder::journal`] or
//! [`crate::Client::with_journal`].
//!
//! # Format and why
//!
//! One file of JSON lines, append-only, each append `fsync`'d before the call
//! that made it returns:
//!
//! ```text
//! {"op":"journal","version":1}
//! {"op":"sent","key":"<idempotency key>","queue":"q","correlation_id":"c","at":"<RFC 3339>"}
//! {"op":"accepted","key":"…","id":"<request id>","queue":"q","correlation_id":"c","at":"…"}
//! {"op":"forget","key":"…"}
//! ```
//!
//! - Append-only lines make every write a single `write` of a small buffer at
//!   the end of the file; a crash can only tear the *last* line, which opening
//!   ignores. A malformed line anywhere else is corruption and refuses to open
//!   (silently dropping pending work is what the journal exists to prevent).
//! - Two records per submit close the crash window: `sent` is durable *before*
//!   the request goes out, `accepted` (with the server's id) before `send`
//!   returns. A `sent` with no `accepted` after a restart is a submit whose
//!   answer never arrived; resubmitting with its idempotency key (same input)
//!   returns the request if it was created, or creates it now.
//! - Opening compacts: the live entries are written to a temporary file,
//!   `fsync`'d and renamed over the journal (and the directory `fsync`'d), so
//!   the file stays proportional to what is pending. A long-running client
//!   compacts the same way when dead records dominate.
//! - Concurrent appends share `fsync`s (group commit): each writer appends its
//!   line, then one `fsync` covers every line written before it.
//! - A sidecar `<path>.lock` file is locked exclusively for the journal's
//!   lifetime, so two processes never interleave writes to one journal.
//! - After a failed write or `fsync` the journal refuses further use: what is
//!   on disk is no longer known, and pretending otherwise would lose requests.
//!
//! Only SDK-generated small records are stored (no inputs or outputs).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use coatcheck_core::Ts;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

const VERSION: u32 = 1;

/// Compact at runtime when the file holds more than this many records…
const COMPACT_MIN_RECORDS: usize = 4096;
/// …and more than this many per live entry.
const COMPACT_RATIO: usize = 4;

/// A request this client submitted and has not seen finish.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct PendingEntry {
    /// The request id; `None` when the submit was sent but its answer never
    /// arrived (a crash or a transport failure): resubmit with
    /// `idempotency_key` and the same input to find out, or forget it.
    pub id: Option<String>,
    /// The `Idempotency-Key` the submit was sent with.
    pub idempotency_key: String,
    /// The queue it was submitted to.
    pub queue: String,
    /// Its correlation id, if it had one.
    pub correlation_id: Option<String>,
    /// When this client sent it (client clock).
    pub submitted_at: Ts,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Record {
    Journal {
        version: u32,
    },
    Sent {
        key: String,
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        at: Ts,
    },
    Accepted {
        key: String,
        id: String,
        queue: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        correlation_id: Option<String>,
        at: Ts,
    },
    Forget {
        key: String,
    },
}

/// The in-memory view of the journal.
#[derive(Debug, Default)]
struct Entries {
    by_key: HashMap<String, PendingEntry>,
    key_of_id: HashMap<String, String>,
}

impl Entries {
    fn apply(&mut self, rec: Record) -> Result<()> {
        match rec {
            Record::Journal { version } if version > VERSION => {
                return Err(Error::Journal(format!(
                    "journal format version {version} is newer than this SDK's ({VERSION})"
                )));
            }
            Record::Journal { .. } => {}
            Record::Sent {
                key,
                queue,
                correlation_id,
                at,
            } => {
                // A resubmit under a known key keeps what is known of it.
                self.by_key.entry(key.clone()).or_insert(PendingEntry {
                    id: None,
                    idempotency_key: key,
                    queue,
                    correlation_id,
                    submitted_at: at,
                });
            }
            Record::Accepted {
                key,
                id,
                queue,
                correlation_id,
                at,
            } => {
                let at = self.by_key.get(&key).map_or(at, |e| e.submitted_at);
                self.key_of_id.insert(id.clone(), key.clone());
                self.by_key.insert(
                    key.clone(),
                    PendingEntry {
                        id: Some(id),
                        idempotency_key: key,
                        queue,
                        correlation_id,
                        submitted_at: at,
                    },
                );
            }
            Record::Forget { key } => {
                if let Some(e) = self.by_key.remove(&key) {
                    if let Some(id) = e.id {
                        self.key_of_id.remove(&id);
                    }
                }
            }
        }
        Ok(())
    }

    /// The key of an entry named by its id or, failing that, its key.
    fn key_for(&self, id_or_key: &str) -> Option<&str> {
        if let Some(k) = self.key_of_id.get(id_or_key) {
            return Some(k);
        }
        self.by_key
            .get_key_value(id_or_key)
            .map(|(k, _)| k.as_str())
    }

    fn sorted(&self) -> Vec<PendingEntry> {
        let mut v: Vec<PendingEntry> = self.by_key.values().cloned().collect();
        v.sort_by(|a, b| {
            (a.submitted_at, &a.idempotency_key).cmp(&(b.submitted_at, &b.idempotency_key))
        });
        v
    }

    /// Records that recreate this state.
    fn snapshot(&self) -> Vec<Record> {
        let mut out = vec![Record::Journal { version: VERSION }];
        for e in self.sorted() {
            out.push(match e.id {
                Some(id) => Record::Accepted {
                    key: e.idempotency_key,
                    id,
                    queue: e.queue,
                    correlation_id: e.correlation_id,
                    at: e.submitted_at,
                },
                None => Record::Sent {
                    key: e.idempotency_key,
                    queue: e.queue,
                    correlation_id: e.correlation_id,
                    at: e.submitted_at,
                },
            });
        }
        out
    }
}

struct State {
    file: Arc<File>,
    /// Records in the file now.
    records: usize,
    entries: Entries,
}

/// The journal file; see the module docs. All methods block (file I/O):
/// async callers run them on the blocking pool.
pub(crate) struct Journal {
    path: PathBuf,
    state: Mutex<State>,
    /// Appends so far (a sequence number per record).
    written: AtomicU64,
    /// Appends known to be on disk; held while `fsync`ing.
    synced: Mutex<u64>,
    broken: AtomicBool,
    _lock: File,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Opens (creating if need be) and compacts the journal at `path`.
    pub fn open(path: &Path) -> Result<Journal> {
        let lock = lock_file(path)?;
        let entries = read(path)?;
        let file = compact(path, &entries)?;
        let records = entries.by_key.len() + 1;
        Ok(Journal {
            path: path.to_path_buf(),
            state: Mutex::new(State {
                file: Arc::new(file),
                records,
                entries,
            }),
            written: AtomicU64::new(0),
            synced: Mutex::new(0),
            broken: AtomicBool::new(false),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records that a submit under `key` is about to be sent.
    pub fn record_sent(&self, key: &str, queue: &str, correlation_id: Option<&str>) -> Result<()> {
        self.append(Record::Sent {
            key: key.to_string(),
            queue: queue.to_string(),
            correlation_id: correlation_id.map(str::to_string),
            at: chrono::Utc::now(),
        })
    }

    /// Records the id the server gave the submit under `key`.
    pub fn record_accepted(
        &self,
        key: &str,
        id: &str,
        queue: &str,
        correlation_id: Option<&str>,
    ) -> Result<()> {
        self.append(Record::Accepted {
            key: key.to_string(),
            id: id.to_string(),
            queue: queue.to_string(),
            correlation_id: correlation_id.map(str::to_string),
            at: chrono::Utc::now(),
        })
    }

    /// Whether an entry has this id (or, failing that, this key).
    pub fn contains(&self, id_or_key: &str) -> bool {
        self.lock_state()
            .is_ok_and(|s| s.entries.key_for(id_or_key).is_some())
    }

    /// Removes the entry with this id (or key); returns whether there was one.
    pub fn forget(&self, id_or_key: &str) -> Result<bool> {
        let key = match self.lock_state()?.entries.key_for(id_or_key) {
            Some(k) => k.to_string(),
            None => return Ok(false),
        };
        self.append(Record::Forget { key })?;
        Ok(true)
    }

    /// What is pending, oldest first.
    pub fn pending(&self) -> Vec<PendingEntry> {
        self.lock_state()
            .map(|s| s.entries.sorted())
            .unwrap_or_default()
    }

    fn lock_state(&self) -> Result<MutexGuard<'_, State>> {
        if self.broken.load(Ordering::Acquire) {
            return Err(Error::Journal(format!(
                "{} failed earlier and is no longer used; reopen it",
                self.path.display()
            )));
        }
        self.state
            .lock()
            .map_err(|_| Error::Journal("journal lock poisoned".into()))
    }

    fn fail<T>(&self, what: &str, e: impl std::fmt::Display) -> Result<T> {
        self.broken.store(true, Ordering::Release);
        Err(Error::Journal(format!(
            "{what} {}: {e}",
            self.path.display()
        )))
    }

    /// Appends one record and returns once it is on disk.
    fn append(&self, rec: Record) -> Result<()> {
        let mut line = serde_json::to_vec(&rec).map_err(|e| Error::Journal(e.to_string()))?;
        line.push(b'\n');
        let seq = {
            let mut st = self.lock_state()?;
            if let Err(e) = (&*st.file).write_all(&line) {
                return self.fail("cannot append to", e);
            }
            st.entries.apply(rec)?;
            st.records += 1;
            let seq = self.written.fetch_add(1, Ordering::AcqRel) + 1;
            let live = st.entries.by_key.len();
            if st.records > COMPACT_MIN_RECORDS && st.records > COMPACT_RATIO * (live + 1) {
                // The rewrite is fsync'd and holds everything appended so far.
                match compact(&self.path, &st.entries) {
                    Ok(f) => {
                        st.file = Arc::new(f);
                        st.records = live + 1;
                        return Ok(());
                    }
                    Err(e) => return self.fail("cannot compact", e),
                }
            }
            seq
        };
        self.sync(seq)
    }

    /// Group commit: returns once append number `seq` is on disk, sharing
    /// one `fsync` among every writer waiting at the same time.
    fn sync(&self, seq: u64) -> Result<()> {
        let mut synced = self
            .synced
            .lock()
            .map_err(|_| Error::Journal("journal lock poisoned".into()))?;
        if *synced >= seq {
            return Ok(());
        }
        // Everything appended up to `upto` is in `file` (a compaction that
        // replaced the file had already made older appends durable).
        let (upto, file) = {
            let st = self.lock_state()?;
            (self.written.load(Ordering::Acquire), st.file.clone())
        };
        if let Err(e) = file.sync_data() {
            return self.fail("cannot fsync", e);
        }
        *synced = upto;
        Ok(())
    }
}

fn sidecar(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(suffix);
    PathBuf::from(s)
}

fn lock_file(path: &Path) -> Result<File> {
    let lock_path = sidecar(path, ".lock");
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| Error::Journal(format!("cannot open {}: {e}", lock_path.display())))?;
    match f.try_lock() {
        Ok(()) => Ok(f),
        Err(std::fs::TryLockError::WouldBlock) => Err(Error::Journal(format!(
            "{} is in use by another client (locked {})",
            path.display(),
            lock_path.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(Error::Journal(format!(
            "cannot lock {}: {e}",
            lock_path.display()
        ))),
    }
}

/// Replays the journal at `path` (missing: empty). A torn last line is
/// ignored; any other malformed line is an error.
fn read(path: &Path) -> Result<Entries> {
    let mut entries = Entries::default();
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(entries),
        Err(e) => {
            return Err(Error::Journal(format!(
                "cannot open {}: {e}",
                path.display()
            )))
        }
    };
    let mut lines = BufReader::new(file).split(b'\n').enumerate().peekable();
    while let Some((n, line)) = lines.next() {
        let line =
            line.map_err(|e| Error::Journal(format!("cannot read {}: {e}", path.display())))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Record>(&line) {
            Ok(rec) => entries.apply(rec)?,
            // Only the last line can be torn by a crash mid-append.
            Err(_) if lines.peek().is_none() => break,
            Err(e) => {
                return Err(Error::Journal(format!(
                    "{} line {} is corrupt: {e}",
                    path.display(),
                    n + 1
                )))
            }
        }
    }
    Ok(entries)
}

/// Writes `entries` to a fresh file, makes it durable and renames it over
/// `path`; returns it opened for appending.
fn compact(path: &Path, entries: &Entries) -> Result<File> {
    let io = |what: &str, e: std::io::Error| Error::Journal(format!("{what}: {e}"));
    let tmp = sidecar(path, ".tmp");
    let mut buf = Vec::new();
    for rec in entries.snapshot() {
        serde_json::to_writer(&mut buf, &rec).map_err(|e| Error::Journal(e.to_string()))?;
        buf.push(b'\n');
    }
    {
        let mut f = File::create(&tmp).map_err(|e| io(&format!("create {}", tmp.display()), e))?;
        f.write_all(&buf)
            .map_err(|e| io(&format!("write {}", tmp.display()), e))?;
        f.sync_all()
            .map_err(|e| io(&format!("fsync {}", tmp.display()), e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io(&format!("rename to {}", path.display()), e))?;
    sync_dir(path).map_err(|e| io("fsync the journal's directory", e))?;
    OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| io(&format!("open {}", path.display()), e))
}

/// Makes a rename in the journal's directory durable.
#[cfg(unix)]
fn sync_dir(path: &Path) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

/// Tests open journals in throwaway directories.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory, removed on drop.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new() -> TempDir {
            let p = std::env::temp_dir().join(format!("coatcheck-client-{}", uuid::Uuid::new_v4()));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn ids(j: &Journal) -> Vec<Option<String>> {
        j.pending().into_iter().map(|e| e.id).collect()
    }

    #[test]
    fn survives_reopen() {
        let dir = TempDir::new();
        let path = dir.0.join("pending.jsonl");
        {
            let j = Journal::open(&path).unwrap();
            j.record_sent("k1", "q", Some("order-1")).unwrap();
            j.record_accepted("k1", "id-1", "q", Some("order-1"))
                .unwrap();
            j.record_sent("k2", "q", None).unwrap();
            j.record_accepted("k2", "id-2", "q", None).unwrap();
            j.record_sent("k3", "q2", Some("order-3")).unwrap();
            assert!(j.forget("id-2").unwrap());
            assert!(!j.forget("id-2").unwrap());
            assert!(j.contains("id-1") && j.contains("k3") && !j.contains("id-2"));
        }
        let j = Journal::open(&path).unwrap();
        let p = j.pending();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].id.as_deref(), Some("id-1"));
        assert_eq!(p[0].idempotency_key, "k1");
        assert_eq!(p[0].correlation_id.as_deref(), Some("order-1"));
        assert_eq!(p[0].queue, "q");
        assert_eq!(p[1].id, None);
        assert_eq!(p[1].idempotency_key, "k3");
        assert_eq!(p[1].queue, "q2");
        // Compacted on open: one header and one line per entry.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        // Forgetting the id-less entry by its key.
        assert!(j.forget("k3").unwrap());
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(ids(&j), vec![Some("id-1".to_string())]);
    }

    #[test]
    fn submitted_at_survives_acceptance_and_reopen() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        let j = Journal::open(&path).unwrap();
        j.record_sent("k", "q", None).unwrap();
        let at = j.pending()[0].submitted_at;
        j.record_accepted("k", "id", "q", None).unwrap();
        assert_eq!(j.pending()[0].submitted_at, at);
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().pending()[0].submitted_at, at);
    }

    #[test]
    fn torn_last_line_is_ignored() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        {
            let j = Journal::open(&path).unwrap();
            j.record_sent("k1", "q", None).unwrap();
            j.record_accepted("k1", "id-1", "q", None).unwrap();
        }
        // A crash in the middle of an append.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"op":"accepted","key":"k2","id":"id-"#)
            .unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        assert_eq!(ids(&j), vec![Some("id-1".to_string())]);
        // And the journal is usable (the torn tail was compacted away).
        j.record_sent("k3", "q", None).unwrap();
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(j.pending().len(), 2);
    }

    #[test]
    fn corruption_in_the_middle_refuses_to_open() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        std::fs::write(
            &path,
            "{\"op\":\"journal\",\"version\":1}\ngarbage\n{\"op\":\"forget\",\"key\":\"k\"}\n",
        )
        .unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(&err, Error::Journal(m) if m.contains("line 2")),
            "{err}"
        );

        std::fs::write(&path, "{\"op\":\"journal\",\"version\":99}\n").unwrap();
        assert!(matches!(Journal::open(&path), Err(Error::Journal(m)) if m.contains("newer")));
    }

    #[test]
    fn one_process_at_a_time() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        let j = Journal::open(&path).unwrap();
        let err = Journal::open(&path).unwrap_err();
        assert!(
            matches!(&err, Error::Journal(m) if m.contains("in use")),
            "{err}"
        );
        drop(j);
        Journal::open(&path).unwrap();
    }

    #[test]
    fn compacts_while_running() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        let j = Journal::open(&path).unwrap();
        j.record_accepted("keep", "id-keep", "q", None).unwrap();
        for i in 0..COMPACT_MIN_RECORDS {
            let key = format!("k{i}");
            j.record_sent(&key, "q", None).unwrap();
            j.forget(&key).unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines < COMPACT_MIN_RECORDS, "{lines}");
        drop(j);
        let j = Journal::open(&path).unwrap();
        assert_eq!(ids(&j), vec![Some("id-keep".to_string())]);
    }

    #[test]
    fn concurrent_appends_all_land() {
        let dir = TempDir::new();
        let path = dir.0.join("j");
        let j = Arc::new(Journal::open(&path).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let j = j.clone();
                std::thread::spawn(move || {
                    for i in 0..25 {
                        let key = format!("k{t}-{i}");
                        j.record_sent(&key, "q", None).unwrap();
                        j.record_accepted(&key, &format!("id{t}-{i}"), "q", None)
                            .unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        drop(j);
        let j = Journal::open(&path).unwrap();
        let p = j.pending();
        assert_eq!(p.len(), 200);
        assert!(p.iter().all(|e| e.id.is_some()));
    }
}
