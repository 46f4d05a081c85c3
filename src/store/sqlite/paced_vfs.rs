//! The store's SQLite files, opened through a thin VFS that offers the core back between
//! writes (`priority::turn_point`) in the threads that pace themselves.
//!
//! Why: the ledger writer and the checkpoint thread share the pinned core with the proxy's
//! worker. The writer's own loops yield every 0.2 ms, but a commit ends in SQLite: the WAL
//! frames of every page the batch touched, written one `write` each, then the `fsync`. That
//! stretch (0.5–2 ms of CPU under load, `perf sched` showed) and a checkpoint's copy of the
//! WAL back into the database (up to 4 ms once a second) ran whole, and every request in
//! flight on the core waited through them (the p99). With the turn point in the write, both
//! come in turns of at most 0.2 ms between the worker's.
//!
//! How: the VFS is the default one (`unix`) with `xOpen` wrapped. A file is the default
//! VFS's own file, opened by it; only its method table is swapped for a copy whose `xWrite`
//! calls `turn_point` first and then the original. Every other method is the original's, on
//! the same file object, so nothing else changes. In a thread that does not pace itself the
//! turn point is one thread-local read.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::{Mutex, OnceLock, PoisonError};

use rusqlite::ffi;

/// The VFS's name, for `Connection::open_with_flags_and_vfs`, and as SQLite keeps it.
const NAME: &str = "spidergate-paced";
const C_NAME: &CStr = c"spidergate-paced";

#[cfg(test)]
thread_local! {
    /// Writes this thread made through the VFS: the tests' evidence that a file is the
    /// VFS's (per thread, as other tests write their own files at the same time).
    static WRITES: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// A method table: the original's copy with `xWrite` wrapped, and the original (which the
/// wrapper calls). `methods` comes first: a file's `pMethods` points at it, and so at this.
#[repr(C)]
struct Paced {
    methods: ffi::sqlite3_io_methods,
    original: *const ffi::sqlite3_io_methods,
}

// SAFETY: the tables are written once, before any file uses them, then only read.
unsafe impl Send for Paced {}
unsafe impl Sync for Paced {}

/// One paced copy per distinct original table (the default VFS has a few, chosen by the
/// file's locking style), made at the first open that needs it and kept for good.
static TABLES: Mutex<Vec<&'static Paced>> = Mutex::new(Vec::new());

/// Registers the VFS once (a failure is logged once); the name to open files with.
pub(super) fn ensure() -> Option<&'static str> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| match register() {
        Ok(()) => true,
        Err(e) => {
            log::warn!("{e}; SQLite files are written without pacing");
            false
        }
    });
    ok.then_some(NAME)
}

fn register() -> Result<(), String> {
    // SAFETY: `sqlite3_vfs_find(NULL)` initialises SQLite and returns the default VFS, which
    // lives as long as the process. The copy is leaked (registered VFSes must outlive every
    // connection); its `pAppData` carries the original for `x_open`.
    unsafe {
        let base = ffi::sqlite3_vfs_find(std::ptr::null());
        if base.is_null() {
            return Err("SQLite has no default VFS".into());
        }
        let mut vfs: ffi::sqlite3_vfs = std::ptr::read(base);
        vfs.pNext = std::ptr::null_mut();
        vfs.zName = C_NAME.as_ptr();
        vfs.pAppData = base.cast::<c_void>();
        vfs.xOpen = Some(x_open);
        let vfs = Box::leak(Box::new(vfs));
        match ffi::sqlite3_vfs_register(vfs, 0) {
            ffi::SQLITE_OK => Ok(()),
            rc => Err(format!(
                "registering the paced VFS failed (SQLite code {rc})"
            )),
        }
    }
}

/// Opens `name` with the default VFS (passed as itself: it keeps its own VFS pointer and
/// reads its `pAppData`), then gives the file the paced copy of its method table.
unsafe extern "C" fn x_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    // SAFETY: SQLite calls this with the registered VFS (whose `pAppData` is the default
    // VFS) and room for the default VFS's file (`szOsFile` is the default's).
    unsafe {
        let base = (*vfs).pAppData.cast::<ffi::sqlite3_vfs>();
        let Some(open) = (*base).xOpen else {
            return ffi::SQLITE_CANTOPEN;
        };
        let rc = open(base, name, file, flags, out_flags);
        let original = (*file).pMethods;
        if rc == ffi::SQLITE_OK && !original.is_null() && (*original).xWrite.is_some() {
            // A pointer to the whole `Paced` (not to its first field), so `x_write` may read
            // `original` through it.
            (*file).pMethods = std::ptr::from_ref(paced(original)).cast();
        }
        rc
    }
}

/// The paced copy of `original`.
///
/// # Safety
/// `original` is a method table that outlives the process (the default VFS's are static).
unsafe fn paced(original: *const ffi::sqlite3_io_methods) -> &'static Paced {
    let mut tables = TABLES.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(t) = tables.iter().find(|t| std::ptr::eq(t.original, original)) {
        return t;
    }
    // SAFETY: as the caller promised, `original` is a live table; it is copied, not kept.
    let mut methods = unsafe { std::ptr::read(original) };
    methods.xWrite = Some(x_write);
    let table: &'static Paced = Box::leak(Box::new(Paced { methods, original }));
    tables.push(table);
    table
}

/// A turn point, then the original `xWrite`.
unsafe extern "C" fn x_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    crate::priority::turn_point();
    #[cfg(test)]
    WRITES.with(|w| w.set(w.get() + 1));
    // SAFETY: only files given a paced table reach this, and their `pMethods` points at
    // the start of a `Paced` (`repr(C)`, `methods` first), whose original has an `xWrite`.
    unsafe {
        let paced = (*file).pMethods.cast::<Paced>();
        match (*(*paced).original).xWrite {
            Some(write) => write(file, buf, amount, offset),
            None => ffi::SQLITE_IOERR_WRITE,
        }
    }
}

/// Writes this thread made through the VFS so far.
#[cfg(test)]
fn writes() -> u64 {
    WRITES.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> rusqlite::Connection {
        let name = ensure().expect("the paced VFS registers");
        rusqlite::Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), name)
            .expect("open through the paced VFS")
    }

    #[test]
    fn the_name_sqlite_keeps_is_the_one_connections_ask_for() {
        assert_eq!(C_NAME.to_str(), Ok(NAME));
    }

    #[test]
    fn a_database_written_through_it_reads_back_with_the_default_vfs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let before = writes();
        {
            let db = open(&path);
            db.pragma_update(None, "journal_mode", "WAL").unwrap();
            db.pragma_update(None, "synchronous", "FULL").unwrap();
            db.execute_batch("CREATE TABLE t (n INTEGER, s TEXT)")
                .unwrap();
            let tx = db.unchecked_transaction().unwrap();
            for n in 0..2_000 {
                tx.execute("INSERT INTO t VALUES (?1, ?2)", (n, "x".repeat(100)))
                    .unwrap();
            }
            tx.commit().unwrap();
            db.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .unwrap();
        }
        assert!(writes() > before, "the writes went through the paced VFS");
        // The default VFS reads the same file: nothing about it is the paced VFS's own.
        let plain = rusqlite::Connection::open(&path).unwrap();
        let (count, sum): (i64, i64) = plain
            .query_row("SELECT COUNT(*), SUM(n) FROM t", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        assert_eq!((count, sum), (2_000, (0..2_000).sum::<i64>()));
    }

    #[test]
    fn a_transaction_in_a_paced_thread_reaches_a_turn_point_at_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let db = open(&path);
        db.pragma_update(None, "journal_mode", "WAL").unwrap();
        db.execute_batch("CREATE TABLE t (b BLOB)").unwrap();
        let (points, tx_writes) = std::thread::spawn(move || {
            crate::priority::pace_this_thread(true);
            let (points, before) = (crate::priority::turn_points(), writes());
            let tx = db.unchecked_transaction().unwrap();
            // ~4,000 pages in one statement (no turn point of the caller's): SQLite writes
            // them to the WAL as its cache fills and at the commit.
            tx.execute(
                "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < 4000)
                 INSERT INTO t SELECT randomblob(4000) FROM c",
                [],
            )
            .unwrap();
            tx.commit().unwrap();
            let counted = (crate::priority::turn_points() - points, writes() - before);
            crate::priority::pace_this_thread(false);
            counted
        })
        .join()
        .unwrap();
        // Every page reaches the WAL at least once, and every write is a turn point.
        assert!(tx_writes >= 4_000, "{tx_writes} writes in the transaction");
        assert_eq!(points, tx_writes);
    }
}
