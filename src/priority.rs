//! Scheduling weight of the gateway's background threads.
//!
//! Ops pin the whole process to a core (`benches/wrk_compare.sh` measures it so), so the
//! threads that write the ledger and checkpoint the WAL share that core with the proxy's
//! worker. At the default weight, a commit (a batch of a thousand or more rows every 50 ms
//! under load, about a millisecond of CPU) preempts the worker and every request in flight
//! waits for it: the gateway's p99 was ~1.5x the bare proxy's while its p50 was ~1.1x. A
//! lower weight lets the worker preempt the writer instead; the writer needs a few percent
//! of the core and still gets it (nice 10 is a tenth of the worker's weight when both
//! want the core), and a writer that falls behind is what `LedgerHealth` already reports.

/// Lowers the calling thread's priority to `nice` (on Linux a thread's nice value is its
/// own); never raises it: a process started at a higher nice value (`nice -n 15 spidergate
/// serve`) keeps it in every thread, even as root, who may raise it. `what` names the
/// thread in the log line of a refusal, which changes nothing else.
pub fn lower_this_thread(nice: i32, what: &str) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid, getpriority and setpriority take and return plain integers;
        // setpriority on this thread's id changes nothing but its scheduling weight.
        let rc = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            // -1 is both a valid nice value and the error return: errno tells them apart.
            *libc::__errno_location() = 0;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            if *libc::__errno_location() == 0 && current >= nice {
                return;
            }
            libc::setpriority(libc::PRIO_PROCESS, tid, nice)
        };
        if rc != 0 {
            log::debug!("the {what} thread keeps the process's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (nice, what);
}

/// The ledger writer's nice value (see the module's note).
pub const LEDGER_WRITER_NICE: i32 = 10;

/// The WAL checkpoint thread's: it copies pages back once a second and may wait for them.
pub const CHECKPOINT_NICE: i32 = 19;

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn only_the_calling_thread_is_lowered() {
        let before = unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let lowered = std::thread::spawn(|| {
            lower_this_thread(7, "test");
            // SAFETY: plain integers in and out.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::getpriority(libc::PRIO_PROCESS, tid)
            }
        })
        .join()
        .unwrap();
        // Lowered to 7, or left where the process already was if that is lower (the
        // test may run under `nice -n 10`, as root too).
        assert_eq!(lowered, 7.max(before));
        // SAFETY: as above.
        let after = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::getpriority(libc::PRIO_PROCESS, tid)
        };
        assert_eq!(after, before, "the calling thread of the test is untouched");
    }
}
