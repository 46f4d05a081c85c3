//! The process's memory policy: no transparent huge pages for the allocator's arenas.
//!
//! mimalloc reserves its arenas with `madvise(MADV_HUGEPAGE)`, so on a kernel whose THP
//! mode is `madvise` (or `always`) every 2 MiB region a thread touches becomes resident
//! whole: an idle gateway held 10 MB of huge pages for a few hundred KB of live objects
//! (`AnonHugePages` in `/proc/<pid>/smaps_rollup`), and the pieces of an upload spread
//! over a few more. With THP off the same objects take 4 KiB pages.
//!
//! And one allocator for the whole process: SQLite's own allocations go to mimalloc too
//! ([`sqlite_on_mimalloc`]).

/// Turns transparent huge pages off for this process (and any it starts), before the
/// first large allocation: the kernel checks the flag at each page fault, so arenas
/// already advised for huge pages fault 4 KiB pages from then on. Linux only; a refusal
/// (an old kernel) changes nothing else.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Routes SQLite's allocations to mimalloc, the allocator the rest of the process uses.
/// Call it before the first connection opens (SQLite accepts it only before it
/// initializes); `false` when it came too late, which leaves glibc malloc in place and
/// changes nothing else.
///
/// Why: SQLite otherwise allocates with glibc malloc, which gives the ledger writer its own
/// arena. Each commit grew that arena's heap (an `mprotect` a few pages at a time, then a
/// page fault per page) and the free at the end trimmed it back (`MADV_DONTNEED`), so the
/// next commit paid it all again: ~400 `mprotect` calls a second under load, and about
/// half of the writer's CPU in the kernel. mimalloc keeps freed pages for reuse.
pub fn sqlite_on_mimalloc() -> bool {
    use rusqlite::ffi;
    use std::os::raw::{c_int, c_void};

    extern "C" {
        // In the mimalloc library libmimalloc-sys builds and links (its `extended`
        // declarations, which this crate does not enable).
        fn mi_usable_size(p: *const c_void) -> usize;
        fn mi_good_size(size: usize) -> usize;
    }
    /// SQLite asks for sizes up to 2^31 - 1 and stores them in an `int`.
    fn clamp(size: usize) -> c_int {
        c_int::try_from(size).unwrap_or(c_int::MAX)
    }
    unsafe extern "C" fn malloc(n: c_int) -> *mut c_void {
        // SAFETY: mi_malloc takes any size and returns null when it cannot allocate.
        unsafe { libmimalloc_sys::mi_malloc(usize::try_from(n).unwrap_or(0)) }
    }
    unsafe extern "C" fn free(p: *mut c_void) {
        // SAFETY: SQLite frees only what `malloc` or `realloc` above returned (or null).
        unsafe { libmimalloc_sys::mi_free(p) }
    }
    unsafe extern "C" fn realloc(p: *mut c_void, n: c_int) -> *mut c_void {
        // SAFETY: as for `free`; mi_realloc keeps `p` valid when it returns null.
        unsafe { libmimalloc_sys::mi_realloc(p, usize::try_from(n).unwrap_or(0)) }
    }
    unsafe extern "C" fn size(p: *mut c_void) -> c_int {
        // SAFETY: `p` came from `malloc` or `realloc` above (SQLite's contract for xSize).
        clamp(unsafe { mi_usable_size(p) })
    }
    unsafe extern "C" fn roundup(n: c_int) -> c_int {
        // SAFETY: a pure function of the size.
        clamp(unsafe { mi_good_size(usize::try_from(n).unwrap_or(0)) })
    }
    unsafe extern "C" fn init(_: *mut c_void) -> c_int {
        ffi::SQLITE_OK
    }
    unsafe extern "C" fn shutdown(_: *mut c_void) {}

    let methods = ffi::sqlite3_mem_methods {
        xMalloc: Some(malloc),
        xFree: Some(free),
        xRealloc: Some(realloc),
        xSize: Some(size),
        xRoundup: Some(roundup),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: SQLITE_CONFIG_MALLOC copies the methods before it returns, and is refused
    // with SQLITE_MISUSE once SQLite has initialized, so no block moves between allocators.
    let rc = unsafe { ffi::sqlite3_config(ffi::SQLITE_CONFIG_MALLOC, &methods) };
    rc == ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    extern "C" {
        fn mi_is_in_heap_region(p: *const std::os::raw::c_void) -> bool;
    }

    /// Set in the process this test starts to run itself alone.
    const PROBE: &str = "SPIDERGATE_TEST_SQLITE_MALLOC_PROBE";

    /// SQLite takes its allocator once per process, before it initializes: the test runs
    /// itself in a process of its own (this binary, this test alone), whatever runs the
    /// tests (nextest gives each its own process; `cargo test` runs them as threads of one,
    /// where other tests open SQLite first).
    #[test]
    fn sqlite_allocates_from_mimalloc_once_routed_and_still_works() {
        const NAME: &str =
            "memory::tests::sqlite_allocates_from_mimalloc_once_routed_and_still_works";
        if std::env::var_os(PROBE).is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
                .env(PROBE, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            return;
        }
        assert!(
            super::sqlite_on_mimalloc(),
            "SQLite was already initialized"
        );
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch("CREATE TABLE t(v TEXT); INSERT INTO t VALUES (hex(randomblob(5000)));")
            .unwrap();
        let len: i64 = db
            .query_row("SELECT length(v) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(len, 10_000);
        // SAFETY: sqlite3_malloc/sqlite3_free pair; the block is freed once.
        unsafe {
            let p = rusqlite::ffi::sqlite3_malloc(100);
            assert!(!p.is_null());
            assert!(mi_is_in_heap_region(p), "SQLite's block is not mimalloc's");
            assert!(rusqlite::ffi::sqlite3_msize(p) >= 100);
            rusqlite::ffi::sqlite3_free(p);
        }
        // Too late now: refused, and nothing changes.
        assert!(!super::sqlite_on_mimalloc());
    }
}
