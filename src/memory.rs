//! The process's memory policy: no transparent huge pages for the allocator's arenas.
//!
//! mimalloc reserves its arenas with `madvise(MADV_HUGEPAGE)`, so on a kernel whose THP
//! mode is `madvise` (or `always`) every 2 MiB region a thread touches becomes resident
//! whole: an idle gateway held 10 MB of huge pages for a few hundred KB of live objects
//! (`AnonHugePages` in `/proc/<pid>/smaps_rollup`), and the pieces of an upload spread
//! over a few more. With THP off the same objects take 4 KiB pages.

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
