//! The writer's VFS: SQLite's own unix VFS, except that a commit's WAL
//! frames reach the file in **one** `pwrite` instead of two per page.
//!
//! SQLite writes each WAL frame as two calls (its 24-byte header, then the
//! page), so a commit of nine pages made eighteen system calls before its
//! answer could leave (a syscall trace of the echo benchmark; ~5 µs per
//! frame here, ~1.8 µs per frame written at once). This shim keeps the
//! writes to a WAL file in a buffer while they run on, and writes the buffer
//! out with one call:
//!
//! - at the commit's sync: the writer connection runs `synchronous=FULL`, so
//!   SQLite syncs the WAL after writing a commit's frames and *before* it
//!   publishes them in the WAL index — the frames are in the file before any
//!   reader can look for them. That sync (flag `SQLITE_SYNC_NORMAL`) only
//!   writes the buffer out: the fsync that makes the commit durable is the
//!   syncer's (`sync.rs`), as before, and no answer that promises durability
//!   leaves before it.
//! - before anything that looks at the file: a read, a size, a truncation, a
//!   memory map, a close; and when the buffer passes [`BUFFER_LIMIT`], or a
//!   write does not continue it (one that lands inside it is copied in).
//!
//! Checkpoints sync with `SQLITE_SYNC_FULL` (the writer sets
//! `checkpoint_fullfsync`): those syncs go through to the disk untouched, so
//! a checkpoint never copies frames that are not durable, and a restarted
//! WAL's header is on disk before frames follow it. On Linux `FULL` costs
//! the same `fdatasync` as `NORMAL`.
//!
//! Only the writer's connection opens files through this VFS; every other
//! file it opens (the database, its shared memory) and every other call
//! pass straight to the unix VFS.
#![allow(unsafe_code)]

use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name to open a connection with.
pub const NAME: &str = "coatcheck-wal";
const NAME_C: &CStr = c"coatcheck-wal";

/// A buffer past this is written out without waiting for the sync (a large
/// transaction spilling pages).
const BUFFER_LIMIT: usize = 1 << 20;

/// The buffer capacity kept between commits.
const KEEP: usize = 256 * 1024;

/// The most one write passes on: the unix VFS writes at most 128 KiB − 1
/// per call (it masks longer lengths), so longer buffers go in pieces.
const CHUNK: usize = 0x1f000;

thread_local! {
    /// Writes passed on to WAL files by this thread (each one system call):
    /// what the tests count. The writer's connection runs on one thread.
    static WAL_WRITES: Cell<u64> = const { Cell::new(0) };
    /// Syncs of WAL files this thread passed on to the disk.
    static WAL_SYNCS: Cell<u64> = const { Cell::new(0) };
}

fn count(c: &'static std::thread::LocalKey<Cell<u64>>) {
    c.with(|n| n.set(n.get() + 1));
}

/// Registers the VFS (once per process). `false` if the default VFS is not
/// one it can wrap; the writer then opens with the default VFS.
pub fn register() -> bool {
    static DONE: OnceLock<bool> = OnceLock::new();
    // SAFETY: `sqlite3_vfs_find(NULL)` returns the default VFS, which lives
    // for the process; the copy is leaked, so it lives as long; registration
    // happens once, under the `OnceLock`.
    *DONE.get_or_init(|| unsafe {
        if ffi::sqlite3_initialize() != ffi::SQLITE_OK {
            return false;
        }
        let parent = ffi::sqlite3_vfs_find(std::ptr::null());
        if parent.is_null() || (*parent).iVersion < 1 || (*parent).xOpen.is_none() {
            return false;
        }
        PARENT.store(parent, Ordering::Release);
        // A copy of the parent: its own functions, `pAppData` and
        // `mxPathname`, so each of them sees the values it expects whichever
        // of the two structs it is handed. Only opening differs, and the
        // size of an open file (ours in front of the parent's).
        let mut vfs: ffi::sqlite3_vfs = std::ptr::read(parent);
        vfs.szOsFile = (HEADER + (*parent).szOsFile as usize) as c_int;
        vfs.zName = NAME_C.as_ptr();
        vfs.pNext = std::ptr::null_mut();
        vfs.xOpen = Some(x_open);
        let vfs = Box::leak(Box::new(vfs));
        ffi::sqlite3_vfs_register(vfs, 0) == ffi::SQLITE_OK
    })
}

static PARENT: std::sync::atomic::AtomicPtr<ffi::sqlite3_vfs> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());

/// Our part of an open file; the parent's file follows at [`HEADER`].
#[repr(C)]
struct File {
    base: ffi::sqlite3_file,
    /// Set for WAL files only.
    wal: *mut Pending,
}

/// Offset of the parent's file: our part, rounded up to 16 bytes.
const HEADER: usize = std::mem::size_of::<File>().div_ceil(16) * 16;

/// Writes to a WAL file not yet passed on: `data` belongs at `start`.
#[derive(Default)]
struct Pending {
    start: i64,
    data: Vec<u8>,
}

/// # Safety
/// `file` points to `szOsFile` bytes that SQLite gave for this open.
unsafe extern "C" fn x_open(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let parent = PARENT.load(Ordering::Acquire);
    let me = file.cast::<File>();
    let inner = parent_file(file);
    std::ptr::write(
        me,
        File {
            base: ffi::sqlite3_file {
                pMethods: std::ptr::null(),
            },
            wal: std::ptr::null_mut(),
        },
    );
    let Some(open) = (*parent).xOpen else {
        return ffi::SQLITE_CANTOPEN;
    };
    let rc = open(parent, name, inner, flags, out_flags);
    if rc != ffi::SQLITE_OK || (*inner).pMethods.is_null() {
        // SQLite calls no method of a file whose open failed.
        return rc;
    }
    if flags & ffi::SQLITE_OPEN_WAL != 0 {
        (*me).wal = Box::into_raw(Box::default());
    }
    (*me).base.pMethods = &METHODS;
    rc
}

/// The parent's file inside ours (at [`HEADER`]).
unsafe fn parent_file(f: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    f.cast::<u8>().add(HEADER).cast::<ffi::sqlite3_file>()
}

/// The parent's methods of this file, and its file.
unsafe fn methods(
    f: *mut ffi::sqlite3_file,
) -> (&'static ffi::sqlite3_io_methods, *mut ffi::sqlite3_file) {
    let inner = parent_file(f);
    (&*(*inner).pMethods, inner)
}

/// Passes the buffered writes on, in one call. The buffer is emptied either
/// way: a failed write fails the commit that made it, and SQLite writes
/// those frames again.
unsafe fn flush(f: *mut ffi::sqlite3_file) -> c_int {
    let pending = (*f.cast::<File>()).wal;
    if pending.is_null() || (*pending).data.is_empty() {
        return ffi::SQLITE_OK;
    }
    let (m, inner) = methods(f);
    let Some(write) = m.xWrite else {
        (*pending).data.clear();
        return ffi::SQLITE_IOERR_WRITE;
    };
    let data = std::mem::take(&mut (*pending).data);
    let mut rc = ffi::SQLITE_OK;
    let mut at = (*pending).start;
    for piece in data.chunks(CHUNK) {
        count(&WAL_WRITES);
        // A piece is at most CHUNK bytes: it fits.
        let len = piece.len() as c_int;
        rc = write(inner, piece.as_ptr().cast(), len, at);
        if rc != ffi::SQLITE_OK {
            break;
        }
        at += piece.len() as i64;
    }
    // Keep the allocation for the next commit — unless a large transaction
    // grew it (commits of the echo workload are ~20–200 KiB).
    (*pending).data = data;
    (*pending).data.clear();
    (*pending).data.shrink_to(KEEP);
    rc
}

macro_rules! forward {
    ($f:expr, $method:ident ( $($arg:expr),* ), $missing:expr) => {{
        let (m, inner) = methods($f);
        match m.$method {
            Some(call) => call(inner $(, $arg)*),
            None => $missing,
        }
    }};
}

unsafe extern "C" fn x_close(f: *mut ffi::sqlite3_file) -> c_int {
    let flushed = flush(f);
    let me = f.cast::<File>();
    if !(*me).wal.is_null() {
        drop(Box::from_raw((*me).wal));
        (*me).wal = std::ptr::null_mut();
    }
    let rc = forward!(f, xClose(), ffi::SQLITE_OK);
    if flushed != ffi::SQLITE_OK {
        flushed
    } else {
        rc
    }
}

unsafe extern "C" fn x_read(
    f: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    n: c_int,
    at: i64,
) -> c_int {
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    forward!(f, xRead(buf, n, at), ffi::SQLITE_IOERR_READ)
}

unsafe extern "C" fn x_write(
    f: *mut ffi::sqlite3_file,
    buf: *const c_void,
    n: c_int,
    at: i64,
) -> c_int {
    let pending = (*f.cast::<File>()).wal;
    let Ok(len) = usize::try_from(n) else {
        return ffi::SQLITE_IOERR_WRITE;
    };
    if pending.is_null() {
        return forward!(f, xWrite(buf, n, at), ffi::SQLITE_IOERR_WRITE);
    }
    let p = &mut *pending;
    let bytes = std::slice::from_raw_parts(buf.cast::<u8>(), len);
    let end = p.start + p.data.len() as i64;
    if !p.data.is_empty() && at >= p.start && at + n as i64 <= end {
        // Inside the buffer (SQLite rewriting a frame of this transaction).
        let from = (at - p.start) as usize;
        p.data[from..from + len].copy_from_slice(bytes);
        return ffi::SQLITE_OK;
    }
    if !p.data.is_empty() && at != end {
        let rc = flush(f);
        if rc != ffi::SQLITE_OK {
            return rc;
        }
    }
    let p = &mut *pending;
    if p.data.is_empty() {
        p.start = at;
    }
    p.data.extend_from_slice(bytes);
    if p.data.len() >= BUFFER_LIMIT {
        return flush(f);
    }
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_truncate(f: *mut ffi::sqlite3_file, size: i64) -> c_int {
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    forward!(f, xTruncate(size), ffi::SQLITE_IOERR_TRUNCATE)
}

unsafe extern "C" fn x_sync(f: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    if (*f.cast::<File>()).wal.is_null() {
        return forward!(f, xSync(flags), ffi::SQLITE_IOERR_FSYNC);
    }
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    if flags & 0x0f == ffi::SQLITE_SYNC_FULL {
        // A checkpoint's sync (or a restarted WAL's header): to the disk.
        count(&WAL_SYNCS);
        return forward!(f, xSync(flags), ffi::SQLITE_IOERR_FSYNC);
    }
    // A commit's: its frames are in the file; the syncer makes them durable.
    ffi::SQLITE_OK
}

unsafe extern "C" fn x_file_size(f: *mut ffi::sqlite3_file, size: *mut i64) -> c_int {
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    forward!(f, xFileSize(size), ffi::SQLITE_IOERR_FSTAT)
}

unsafe extern "C" fn x_lock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(f, xLock(level), ffi::SQLITE_OK)
}

unsafe extern "C" fn x_unlock(f: *mut ffi::sqlite3_file, level: c_int) -> c_int {
    forward!(f, xUnlock(level), ffi::SQLITE_OK)
}

unsafe extern "C" fn x_check_reserved_lock(f: *mut ffi::sqlite3_file, out: *mut c_int) -> c_int {
    forward!(f, xCheckReservedLock(out), ffi::SQLITE_OK)
}

unsafe extern "C" fn x_file_control(
    f: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    forward!(f, xFileControl(op, arg), ffi::SQLITE_NOTFOUND)
}

unsafe extern "C" fn x_sector_size(f: *mut ffi::sqlite3_file) -> c_int {
    forward!(f, xSectorSize(), 4096)
}

unsafe extern "C" fn x_device_characteristics(f: *mut ffi::sqlite3_file) -> c_int {
    forward!(f, xDeviceCharacteristics(), 0)
}

unsafe extern "C" fn x_shm_map(
    f: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    if methods(f).0.iVersion < 2 {
        return ffi::SQLITE_IOERR_SHMMAP;
    }
    forward!(
        f,
        xShmMap(page, size, extend, out),
        ffi::SQLITE_IOERR_SHMMAP
    )
}

unsafe extern "C" fn x_shm_lock(
    f: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    if methods(f).0.iVersion < 2 {
        return ffi::SQLITE_IOERR_SHMLOCK;
    }
    forward!(f, xShmLock(offset, n, flags), ffi::SQLITE_IOERR_SHMLOCK)
}

unsafe extern "C" fn x_shm_barrier(f: *mut ffi::sqlite3_file) {
    if methods(f).0.iVersion >= 2 {
        forward!(f, xShmBarrier(), ());
    }
}

unsafe extern "C" fn x_shm_unmap(f: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    if methods(f).0.iVersion < 2 {
        return ffi::SQLITE_OK;
    }
    forward!(f, xShmUnmap(delete), ffi::SQLITE_OK)
}

unsafe extern "C" fn x_fetch(
    f: *mut ffi::sqlite3_file,
    at: i64,
    n: c_int,
    out: *mut *mut c_void,
) -> c_int {
    if methods(f).0.iVersion < 3 {
        *out = std::ptr::null_mut();
        return ffi::SQLITE_OK;
    }
    let rc = flush(f);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    forward!(f, xFetch(at, n, out), ffi::SQLITE_OK)
}

unsafe extern "C" fn x_unfetch(f: *mut ffi::sqlite3_file, at: i64, p: *mut c_void) -> c_int {
    if methods(f).0.iVersion < 3 {
        return ffi::SQLITE_OK;
    }
    forward!(f, xUnfetch(at, p), ffi::SQLITE_OK)
}

static METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(x_close),
    xRead: Some(x_read),
    xWrite: Some(x_write),
    xTruncate: Some(x_truncate),
    xSync: Some(x_sync),
    xFileSize: Some(x_file_size),
    xLock: Some(x_lock),
    xUnlock: Some(x_unlock),
    xCheckReservedLock: Some(x_check_reserved_lock),
    xFileControl: Some(x_file_control),
    xSectorSize: Some(x_sector_size),
    xDeviceCharacteristics: Some(x_device_characteristics),
    xShmMap: Some(x_shm_map),
    xShmLock: Some(x_shm_lock),
    xShmBarrier: Some(x_shm_barrier),
    xShmUnmap: Some(x_shm_unmap),
    xFetch: Some(x_fetch),
    xUnfetch: Some(x_unfetch),
};

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    fn counts() -> (u64, u64) {
        (WAL_WRITES.with(Cell::get), WAL_SYNCS.with(Cell::get))
    }

    /// A connection as the writer opens it, and a plain one (a reader).
    fn open(dir: &std::path::Path) -> (Connection, Connection) {
        assert!(register(), "the unix VFS can be wrapped");
        let db = dir.join("t.db");
        let w = Connection::open_with_flags_and_vfs(&db, OpenFlags::default(), NAME).unwrap();
        w.pragma_update(None, "journal_mode", "WAL").unwrap();
        w.pragma_update(None, "synchronous", "FULL").unwrap();
        w.pragma_update(None, "checkpoint_fullfsync", "ON").unwrap();
        w.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        w.execute_batch(
            "CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL); CREATE INDEX t_v ON t (v);",
        )
        .unwrap();
        let r = Connection::open(&db).unwrap();
        (w, r)
    }

    fn one(c: &Connection, sql: &str) -> i64 {
        c.query_row(sql, [], |row| row.get(0)).unwrap()
    }

    fn assert_intact(c: &Connection) {
        let ok: String = c
            .query_row("PRAGMA integrity_check", [], |row| row.get(0))
            .unwrap();
        assert_eq!(ok, "ok");
    }

    fn wal_len(dir: &std::path::Path) -> u64 {
        std::fs::metadata(dir.join("t.db-wal")).unwrap().len()
    }

    #[test]
    fn a_commit_of_many_pages_reaches_the_wal_in_one_write_and_syncs_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = open(dir.path());
        let before_len = wal_len(dir.path());
        let before = counts();
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in 0..20 {
            w.execute("INSERT INTO t VALUES (?1, ?2)", (k, vec![k as u8; 1500]))
                .unwrap();
        }
        w.execute_batch("COMMIT").unwrap();
        let after = counts();
        let bytes = wal_len(dir.path()) - before_len;
        let frames = bytes / (4096 + 24);
        assert!(frames >= 30, "the commit wrote {frames} frames");
        // SQLite would have made two writes per frame; the unix VFS takes
        // at most CHUNK bytes per write.
        let writes = bytes.div_ceil(CHUNK as u64);
        assert_eq!(writes, 2);
        assert_eq!(
            after.0 - before.0,
            writes,
            "{writes} writes for the commit's {frames} frames"
        );
        assert_eq!(after.1, before.1, "a commit's sync stays with the syncer");
        // A reader sees the commit at once: its frames were in the file
        // before SQLite published them.
        let n = one(&r, "SELECT count(*) FROM t");
        assert_eq!(n, 20);
    }

    #[test]
    fn a_checkpoint_syncs_the_wal_to_the_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = open(dir.path());
        w.execute("INSERT INTO t VALUES (1, x'00')", []).unwrap();
        let before = counts();
        let (frames, copied): (i64, i64) = w
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                Ok((row.get(1)?, row.get(2)?))
            })
            .unwrap();
        assert!(
            copied > 0 && copied == frames,
            "copied {copied} of {frames} frames"
        );
        assert!(
            counts().1 > before.1,
            "the checkpoint's syncs reached the disk"
        );
        // The WAL starts over: its new header is synced before frames follow it.
        let before = counts();
        w.execute("INSERT INTO t VALUES (2, x'01')", []).unwrap();
        assert!(counts().1 > before.1, "a restarted WAL's header is synced");
        let n = one(&r, "SELECT count(*) FROM t");
        assert_eq!(n, 2);
    }

    #[test]
    fn a_transaction_larger_than_the_cache_spills_rewrites_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = open(dir.path());
        // A tiny page cache: the transaction spills pages into the WAL
        // mid-way, then changes and reads them again.
        w.pragma_update(None, "cache_size", 8).unwrap();
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in 0..3000i64 {
            w.execute(
                "INSERT INTO t VALUES (?1, ?2)",
                (k, vec![(k % 251) as u8; 700]),
            )
            .unwrap();
        }
        w.execute("UPDATE t SET v = zeroblob(650) WHERE k % 3 = 0", [])
            .unwrap();
        let sum = one(&w, "SELECT sum(length(v)) FROM t");
        w.execute_batch("COMMIT").unwrap();
        assert_eq!(sum, 1000 * 650 + 2000 * 700);
        let seen = one(&r, "SELECT sum(length(v)) FROM t");
        assert_eq!(seen, sum);
        let zeros = one(&r, "SELECT count(*) FROM t WHERE v = zeroblob(650)");
        assert_eq!(zeros, 1000);
        assert_intact(&r);
        // And after a checkpoint copies it all into the database file.
        w.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        drop(w);
        assert_intact(&r);
    }

    #[test]
    fn a_rolled_back_transaction_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (w, r) = open(dir.path());
        w.pragma_update(None, "cache_size", 8).unwrap();
        w.execute_batch("BEGIN IMMEDIATE").unwrap();
        for k in 0..2000i64 {
            w.execute("INSERT INTO t VALUES (?1, ?2)", (k, vec![1u8; 700]))
                .unwrap();
        }
        w.execute_batch("ROLLBACK").unwrap();
        w.execute("INSERT INTO t VALUES (7, x'07')", []).unwrap();
        let n = one(&r, "SELECT count(*) FROM t");
        assert_eq!(n, 1);
        drop(w);
        drop(r);
        // Reopened (WAL recovery from the file alone): the same.
        let again = Connection::open(dir.path().join("t.db")).unwrap();
        let n = one(&again, "SELECT count(*) FROM t");
        assert_eq!(n, 1);
        assert_intact(&again);
    }
}
