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
            lowest_priority();
            let conn = match rusqlite::Connection::open(&path) {
                Ok(c) => c,
                Err(e) => {
                    log::warn!("WAL checkpoints fall back to SQLite's own: {e}");
                    return;
                }
            };
            while running.load(Ordering::Relaxed) {
                std::thread::sleep(EVERY);
                let done = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                match done {
                    Ok((wal, copied)) => {
                        log::debug!("WAL checkpoint: {copied} of {wal} pages copied");
                    }
                    Err(e) => log::warn!("WAL checkpoint failed (retried in a second): {e}"),
                }
            }
        })?;
    Ok(())
}

/// Nice 19 for this thread only (on Linux a thread's nice value is its own).
fn lowest_priority() {
    // SAFETY: gettid and setpriority take and return plain integers; setpriority on this
    // thread's id changes nothing but its scheduling weight.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, 19)
    };
    if rc != 0 {
        log::debug!("the checkpoint thread keeps the process's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_leave_the_wal_to_the_checkpoint_thread() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ledger.db");
        let writer = rusqlite::Connection::open(&path).expect("open");
        writer
            .pragma_update(None, "journal_mode", "WAL")
            .expect("wal");
        writer
            .pragma_update(None, "wal_autocheckpoint", 0)
            .expect("autocheckpoint off");
        writer
            .execute_batch("CREATE TABLE t (x BLOB)")
            .expect("table");
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
}
