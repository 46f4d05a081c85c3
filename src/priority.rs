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

use std::cell::Cell;
use std::time::{Duration, Instant};

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

/// How long a paced thread works before it offers the core back (see [`turn_point`]).
const TURN: Duration = Duration::from_micros(200);

/// A paced thread's turn while it is behind ([`long_turns`]): three times the core's share
/// (~15 % of a tick against ~5 %), for a wait of 0.6 ms instead of 0.2 ms each.
const LONG_TURN: Duration = Duration::from_micros(600);

/// Checks of the clock are this many turn points apart (a point is a row or a message,
/// a microsecond or two of work), so the check costs next to nothing.
const CHECK_EVERY: u32 = 16;

/// A gap this long between two checks was a pause (a sleep, a preemption): the next turn
/// starts there, so only work done in one stretch counts.
///
/// Turns are wall time, not the thread's CPU clock: a shorter preemption (or time the
/// hypervisor took) counts toward the turn, which errs toward yielding early. Measured on
/// the CPU clock instead (off the CPU by 50 µs starting a new turn), the writer's turns on
/// this 2-vCPU VM ran longer: 13 of 166 over 0.5 ms in 2 s of load, against 2 of 155.
const PAUSE: Duration = Duration::from_millis(1);

/// A thread's pacing state, a cell a field: the common turn point reads and bumps two
/// counters without copying the whole state out and back.
struct Pace {
    on: Cell<bool>,
    /// Turns of [`LONG_TURN`] instead of [`TURN`].
    long: Cell<bool>,
    /// Turn points since the last clock check.
    calls: Cell<u32>,
    /// The current turn's start and the last check.
    turn: Cell<Option<(Instant, Instant)>>,
    /// Turn points reached while paced (`turn_points`).
    points: Cell<u64>,
}

thread_local! {
    static PACE: Pace = const {
        Pace {
            on: Cell::new(false),
            long: Cell::new(false),
            calls: Cell::new(0),
            turn: Cell::new(None),
            points: Cell::new(0),
        }
    };
}

/// Turns pacing on or off for the calling thread (off in every thread until turned on).
pub fn pace_this_thread(on: bool) {
    PACE.with(|p| p.on.set(on));
}

/// Lengthens (or shortens back) the calling thread's turns while it is paced.
///
/// Why: a turn a tick is the writer's share of a busy core (the worker keeps the core until
/// the next tick once the writer yields), so 0.2 ms turns give it ~5 % of the core. On
/// this shared VM, on a slow day (the bare proxy at 28k requests a second, not 40k), the
/// writer needed ~9 %: its commits fell behind, up to 0.3–0.8 s each (`benches/p99_timeline.py`),
/// so a crash would lose more than a flush interval and each batch, colder and larger,
/// cost more a request. The ledger writer asks for long turns while its last commit took
/// longer than a commit tick, and short ones again once a commit keeps up.
pub fn long_turns(long: bool) {
    PACE.with(|p| p.long.set(long));
}

/// A yield point in a paced thread's long loops (the ledger writer's drain and commit, and
/// every SQLite file write, `store::sqlite::paced_vfs`):
/// after [`TURN`] of work, the thread offers the core to whatever else wants it. Returns
/// whether it did.
///
/// Why: the writer shares the pinned core with the proxy's worker, and a lower weight makes
/// its turns rarer, not shorter. Once on the CPU it keeps it until the next scheduler tick
/// (4 ms at `CONFIG_HZ=250`) or until it sleeps, so a commit's millisecond or two of CPU
/// came in one piece and every request in flight waited for all of it (the p99 measured
/// by `benches/p99_timeline.py`). Yielding every 0.2 ms bounds that wait; the writer still
/// gets 0.2 ms a tick while the worker is busy (5 % of the core at 250 Hz, about twice
/// what a 30k-requests-a-second load needs) and the whole core when it is idle. A thread
/// that falls behind turns pacing off (the ledger writer does, past a backlog).
///
/// In a thread not paced this is one thread-local read.
pub fn turn_point() -> bool {
    PACE.with(|p| {
        if !p.on.get() {
            return false;
        }
        p.points.set(p.points.get() + 1);
        let calls = p.calls.get() + 1;
        if calls < CHECK_EVERY {
            p.calls.set(calls);
            return false;
        }
        p.calls.set(0);
        let now = Instant::now();
        let start = match p.turn.get() {
            Some((start, last)) if now.duration_since(last) < PAUSE => start,
            _ => now,
        };
        let done = now.duration_since(start) >= if p.long.get() { LONG_TURN } else { TURN };
        if done {
            std::thread::yield_now();
            let after = Instant::now();
            p.turn.set(Some((after, after)));
        } else {
            p.turn.set(Some((start, now)));
        }
        done
    })
}

/// Turn points the calling thread has reached while paced.
pub fn turn_points() -> u64 {
    PACE.with(|p| p.points.get())
}

/// The ledger writer's nice value (see the module's note).
pub const LEDGER_WRITER_NICE: i32 = 10;

/// The WAL checkpoint thread's: it copies pages back once a second and may wait for them.
pub const CHECKPOINT_NICE: i32 = 19;

#[cfg(test)]
mod pacing_tests {
    use super::*;

    /// Works (spins) for `d`, calling `turn_point` as a writer's loop does; the instants
    /// right after each yield.
    fn work(d: Duration) -> Vec<Instant> {
        let until = Instant::now() + d;
        let mut yields = Vec::new();
        while Instant::now() < until {
            std::hint::black_box((0..50u64).sum::<u64>());
            if turn_point() {
                yields.push(Instant::now());
            }
        }
        yields
    }

    #[test]
    fn a_thread_not_paced_never_yields() {
        let yields = std::thread::spawn(|| work(Duration::from_millis(5)))
            .join()
            .unwrap();
        assert!(yields.is_empty(), "{} yields", yields.len());
    }

    #[test]
    fn a_paced_thread_yields_once_per_turn_of_work_and_stops_when_turned_off() {
        let (yields, after_off) = std::thread::spawn(|| {
            pace_this_thread(true);
            // However loaded the machine, some 0.2 ms stretches run unpreempted.
            let until = Instant::now() + Duration::from_secs(5);
            let mut yields = Vec::new();
            while yields.len() < 5 && Instant::now() < until {
                yields.extend(work(Duration::from_millis(2)));
            }
            pace_this_thread(false);
            (yields, work(Duration::from_millis(5)))
        })
        .join()
        .unwrap();
        assert!(
            yields.len() >= 5,
            "only {} yields in 5 s of work",
            yields.len()
        );
        for pair in yields.windows(2) {
            // Never sooner than a whole turn after the last one (give or take the few
            // hundred nanoseconds between the clock's reading and the record here).
            let apart = pair[1] - pair[0];
            assert!(apart + Duration::from_micros(5) >= TURN, "{apart:?} apart");
        }
        assert!(after_off.is_empty(), "{} yields once off", after_off.len());
    }

    #[test]
    fn a_thread_behind_yields_after_long_turns_and_short_ones_again_once_caught_up() {
        /// Yields from work until `n` of them, in at most 5 s; consecutive ones' gaps.
        fn gaps(n: usize) -> Vec<Duration> {
            let until = Instant::now() + Duration::from_secs(5);
            let mut yields = Vec::new();
            while yields.len() < n && Instant::now() < until {
                // Each batch of work starts a new turn (its first yield follows a pause).
                yields.push(work(Duration::from_millis(4)));
                std::thread::sleep(PAUSE * 2);
            }
            yields
                .iter()
                .flat_map(|y| y.windows(2).map(|w| w[1] - w[0]))
                .collect()
        }
        let (long, short) = std::thread::spawn(|| {
            pace_this_thread(true);
            long_turns(true);
            let long = gaps(5);
            long_turns(false);
            (long, gaps(5))
        })
        .join()
        .unwrap();
        assert!(!long.is_empty() && !short.is_empty(), "{long:?} {short:?}");
        for apart in &long {
            assert!(
                *apart + Duration::from_micros(5) >= LONG_TURN,
                "{apart:?} apart"
            );
        }
        // Short turns again: under LONG_TURN apart whenever the machine let the thread run
        // (a preemption of 1 ms or more restarts the turn, so it cannot stretch one).
        assert!(short.iter().any(|a| *a < LONG_TURN), "{short:?}");
    }

    #[test]
    fn a_pause_starts_a_new_turn() {
        let (woke, first) = std::thread::spawn(|| {
            pace_this_thread(true);
            // Most of a turn, then a sleep: the work before it does not count.
            work(TURN * 3 / 4);
            std::thread::sleep(PAUSE * 2);
            let woke = Instant::now();
            let until = woke + Duration::from_secs(5);
            loop {
                if let Some(&at) = work(Duration::from_millis(1)).first() {
                    return (woke, Some(at));
                }
                if Instant::now() > until {
                    return (woke, None);
                }
            }
        })
        .join()
        .unwrap();
        let first = first.expect("a yield after the sleep");
        assert!(
            first - woke >= TURN,
            "yielded {:?} after waking",
            first - woke
        );
    }
}

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
