//! WAL checkpoints off the ledger writer's commits.
//!
//! SQLite's default copies the WAL back into the database file from inside the commit that
//! crosses 1,000 WAL pages: that commit then takes ~15 ms instead of ~1 ms, on a CPU the
//! request path may share (the p99 follows it; `benches/p99_timeline.py`). The writer's
//! connection turns that off, and this thread does the copying instead: a `PASSIVE`
//! checkpoint each second (it never waits for, or blocks, a reader or the writer), at the
//! lowest CPU priority, so a saturated core spreads it thin instead of stalling requests
//! behind it. Durability is the commits' own (WAL, `synchronous=FULL`); a checkpoint only
//! bounds the WAL file's size, and whatever it has not copied yet is read from the WAL and
//! copied by the next one (or at the next open after a crash).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const EVERY: Duration = Duration::from_secs(1);

/// Runs checkpoints of the database at `path` until `running` turns false.
pub fn spawn(path: PathBuf, running: Arc<AtomicBool>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("spidergate-checkpoint".into())
        .spawn(move || {
            crate::priority::lower_this_thread(crate::priority::CHECKPOINT_NICE, "checkpoint");
            // Its copy of the WAL back into the file comes in turns (`paced_vfs`).
            crate::priority::pace_this_thread(true);
            let conn = match open(&path) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("WAL checkpoints fall back to SQLite's own: {e}");
                    return;
                }
            };
            while running.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
                match checkpoint_passive(&conn) {
                    Ok((wal, copied)) => {
                        log::debug!("WAL checkpoint: {copied} of {wal} pages copied");
                    }
                    Err(e) => log::warn!("WAL checkpoint failed (retried in a second): {e}"),
                }
            }
        })?;
    Ok(())
}

/// The checkpoints' connection, past its first read: a connection learns that the database
/// is in WAL mode (and finds the WAL) only when it first reads the file. `schema_version`
/// is that read without parsing the schema.
fn open(path: &std::path::Path) -> rusqlite::Result<rusqlite::Connection> {
    let conn = super::open_paced(path)?;
    conn.query_row("PRAGMA schema_version", [], |_| Ok(()))?;
    Ok(conn)
}

/// One `PASSIVE` checkpoint through the C API: (WAL pages, pages copied back).
///
/// Not `PRAGMA wal_checkpoint`: a pragma is a statement, prepared against the schema, and on
/// this connection every one of them parsed the whole schema again (a uprobe on
/// `sqlite3Init` fired once a second; callgrind counts ~0.5 M instructions each, idle or
/// not). The C call prepares nothing, so the connection never loads the schema.
fn checkpoint_passive(conn: &rusqlite::Connection) -> Result<(i64, i64), String> {
    let mut wal = 0;
    let mut copied = 0;
    // SAFETY: the handle is this live connection's, used on the one thread that owns it;
    // the schema name is a NUL-terminated literal and both out-pointers are live locals.
    let rc = unsafe {
        rusqlite::ffi::sqlite3_wal_checkpoint_v2(
            conn.handle(),
            c"main".as_ptr(),
            rusqlite::ffi::SQLITE_CHECKPOINT_PASSIVE,
            &mut wal,
            &mut copied,
        )
    };
    if rc == rusqlite::ffi::SQLITE_OK {
        Ok((i64::from(wal), i64::from(copied)))
    } else {
        Err(rusqlite::ffi::code_to_str(rc).to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer as the ledger's: WAL, no checkpoints of its own, `schema` created.
    fn wal_writer(path: &std::path::Path, schema: &str) -> rusqlite::Connection {
        let writer = rusqlite::Connection::open(path).expect("open");
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("autocheckpoint off");
        writer.execute_batch(schema).expect("schema");
        writer
    }

    #[test]
    fn commits_leave_the_wal_to_the_checkpoint_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let writer = wal_writer(&path, "CREATE TABLE t (x BLOB)");
        // ~2,000 pages through the WAL, twice SQLite's default checkpoint threshold.
        for _ in 0..1_000 {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(8000))", [])
                .expect("insert");
        }
        let db_size = || std::fs::metadata(&path).map_or(0, |m| m.len());
        assert!(
            db_size() < 1_000_000,
            "the commits copied nothing back: {} bytes",
            db_size()
        );
        let running = Arc::new(AtomicBool::new(true));
        spawn(path.clone(), running.clone()).expect("spawn");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while db_size() < 8_000_000 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        running.store(false, Ordering::Relaxed);
        assert!(
            db_size() >= 8_000_000,
            "the thread copied the WAL back: {} bytes",
            db_size()
        );
        let rows: i64 = writer
            .query_row("SELECT COUNT(*) FROM t", [], |r| r.get(0))
            .expect("count");
        assert_eq!(rows, 1_000);
    }

    /// Memory a connection holds for its parsed schema (0 until it loads one).
    fn schema_bytes(conn: &rusqlite::Connection) -> i32 {
        let (mut cur, mut high) = (0, 0);
        // SAFETY: a live connection's handle and two live out-pointers, on this thread.
        let rc = unsafe {
            rusqlite::ffi::sqlite3_db_status(
                conn.handle(),
                rusqlite::ffi::SQLITE_DBSTATUS_SCHEMA_USED,
                &mut cur,
                &mut high,
                0,
            )
        };
        assert_eq!(rc, rusqlite::ffi::SQLITE_OK);
        cur
    }

    #[test]
    fn a_checkpoint_copies_the_wal_back_without_reading_the_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let writer = wal_writer(&path, "CREATE TABLE t (x BLOB); CREATE INDEX t_x ON t (x);");
        let checkpoints = open(&path).expect("open");
        assert_eq!(schema_bytes(&checkpoints), 0, "opening parsed the schema");
        for round in 1..=3 {
            writer
                .execute("INSERT INTO t VALUES (zeroblob(8000))", [])
                .expect("insert");
            let (wal, copied) = checkpoint_passive(&checkpoints).expect("checkpoint");
            assert!(wal > 0, "round {round}: the WAL had pages");
            assert_eq!(copied, wal, "round {round}: nothing held the WAL back");
            assert_eq!(
                schema_bytes(&checkpoints),
                0,
                "round {round}: the checkpoint parsed the schema"
            );
        }
        // What a statement on the same connection costs, for contrast: it loads the schema.
        checkpoints
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))
            .expect("pragma");
        assert!(schema_bytes(&checkpoints) > 0);
    }
}
