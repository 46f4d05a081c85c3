//! SpiderGate: a coarse timer for the long timeouts a proxy sets on every request and nearly
//! always cancels.
//!
//! A proxy arms a timeout for each wait that may not end: the kept-alive wait for a client's
//! next request head, the wait for the upstream's answer, the pooled connection's idle wait.
//! They last seconds and are cancelled microseconds later, when the bytes come. On Tokio's
//! timer each one inserts an entry into the timer wheel, re-registers it when polled, removes
//! it on drop and moves the driver's next wake-up: about 550 instructions a timeout, 3.3
//! timeouts a request (`benches/instr.py` in SpiderGate); here about 240. Pingora's own fast
//! timer costs more still (a lock and a `BTreeMap` per registration) and wakes a clock thread
//! every 10 ms.
//!
//! Here a waiting timeout takes a slot in one table under a mutex: its deadline, rounded up to
//! the next [`TICK`], and its task's waker. Dropping it frees the slot. One thread sweeps the
//! table every tick and wakes the tasks whose deadline has passed; the wait then sees the
//! sweep's tick (an atomic) at or past its deadline. A timeout so fires between its duration
//! and its duration plus about two ticks (the deadline's rounding, then the wait for the next
//! sweep), never before: right for timeouts of a second or more, which is what SpiderGate
//! sends here (`set_coarse_timer`).
//!
//! The costs: a clock read, a lock, a slot and a waker clone to arm; a lock and a slot to
//! drop; an atomic load per poll. One mutex serves every thread: uncontended on SpiderGate's
//! few worker threads, a point to shard (one table per worker) on many cores. The sweep walks
//! every slot each tick, [`SWEEP_CHUNK`] under one hold of the lock (a few thousand waiting
//! timeouts are a few microseconds); the table keeps its largest size. The thread is started
//! by the first registration (retried at the next one if it cannot be): a process that forks
//! (Pingora's daemon mode) does so before it serves, so before any; one that registered and
//! then forked would have no sweeper in the child.

use parking_lot::Mutex;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// The sweep's period: a timeout fires at most about this late.
pub const TICK: Duration = Duration::from_millis(50);

struct Slot {
    /// In ticks since [`Coarse::base`].
    deadline: u64,
    /// Bumped each time the slot is freed, so a stale key frees nothing.
    generation: u32,
    /// `None` when the slot is free.
    waker: Option<Waker>,
}

#[derive(Default)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// The sweeper thread runs.
    sweeping: bool,
}

impl Table {
    fn insert(&mut self, deadline: u64, waker: Waker) -> Key {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot {
                    deadline: 0,
                    generation: 0,
                    waker: None,
                });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.deadline = deadline;
        slot.waker = Some(waker);
        Key {
            index,
            generation: slot.generation,
        }
    }

    /// The slot's waker, if `key` still holds it (not fired, not freed).
    fn slot(&mut self, key: Key) -> Option<&mut Slot> {
        self.slots
            .get_mut(key.index as usize)
            .filter(|s| s.generation == key.generation && s.waker.is_some())
    }

    /// Frees the slot; returns its waker (to be dropped outside the lock).
    fn free(&mut self, index: u32) -> Option<Waker> {
        let slot = &mut self.slots[index as usize];
        slot.generation = slot.generation.wrapping_add(1);
        self.free.push(index);
        slot.waker.take()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Key {
    index: u32,
    generation: u32,
}

struct Coarse {
    base: Instant,
    /// The tick of the last sweep: every deadline at or before it has fired.
    swept: AtomicU64,
    table: Mutex<Table>,
}

fn coarse() -> &'static Coarse {
    static COARSE: OnceLock<Coarse> = OnceLock::new();
    COARSE.get_or_init(Coarse::new)
}

impl Coarse {
    fn new() -> Self {
        Coarse {
            base: Instant::now(),
            swept: AtomicU64::new(0),
            table: Mutex::new(Table::default()),
        }
    }

    /// Ticks since `base`, rounded down (a sweep's tick) or up (a deadline). In u64
    /// nanoseconds (584 years), where `as_nanos` would divide a u128.
    fn ticks(&self, at: Instant, round_up: bool) -> u64 {
        const TICK_NANOS: u64 = TICK.as_nanos() as u64;
        let since = at.saturating_duration_since(self.base);
        let nanos = since
            .as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(since.subsec_nanos()));
        if round_up {
            nanos.div_ceil(TICK_NANOS)
        } else {
            nanos / TICK_NANOS
        }
    }

    fn fired(&self, deadline: u64) -> bool {
        self.swept.load(Ordering::Acquire) >= deadline
    }

    /// Starts the sweeper thread unless it runs (the table's lock held): at the first
    /// registration, and again at the next one if the system could not start it.
    fn start_sweeper(&'static self, table: &mut Table) {
        if table.sweeping {
            return;
        }
        table.sweeping = std::thread::Builder::new()
            .name("Coarse timer".into())
            .spawn(move || self.sweep_forever())
            .is_ok();
    }

    fn sweep_forever(&self) -> ! {
        let mut due = Vec::new();
        loop {
            std::thread::sleep(TICK);
            self.sweep(Instant::now(), &mut due);
        }
    }

    /// Fires every timeout whose deadline is at or before `now`'s tick. The table is walked
    /// [`SWEEP_CHUNK`] slots at a time, each under the lock, so a registration waits at most
    /// for one chunk's walk however many timeouts wait.
    fn sweep(&self, now: Instant, due: &mut Vec<Waker>) {
        let now = self.ticks(now, false);
        let mut from = 0;
        loop {
            let more = {
                let mut table = self.table.lock();
                if from == 0 {
                    // Stored under the lock before the walk: a wait that registers from here
                    // on, in a slot walked or not, sees its deadline passed and does not wait.
                    self.swept.fetch_max(now, Ordering::Release);
                }
                let to = table.slots.len().min(from + SWEEP_CHUNK);
                for index in from..to {
                    let slot = &table.slots[index];
                    if slot.waker.is_some() && slot.deadline <= now {
                        due.extend(table.free(index as u32));
                    }
                }
                from = to;
                to < table.slots.len()
            };
            for waker in due.drain(..) {
                waker.wake();
            }
            if !more {
                return;
            }
        }
    }
}

/// Slots a sweep walks under one hold of the lock.
const SWEEP_CHUNK: usize = 1024;

/// A wait on the coarse timer: ready once its deadline's tick has been swept. It takes its
/// slot when first polled (that is when a waker is known) and frees it when dropped.
pub struct CoarseWait {
    timer: &'static Coarse,
    deadline: u64,
    key: Option<Key>,
}

impl CoarseWait {
    /// A wait that ends no earlier than `duration` from now.
    pub fn new(duration: Duration) -> Self {
        Self::on(coarse(), duration)
    }

    fn on(timer: &'static Coarse, duration: Duration) -> Self {
        let deadline = Instant::now()
            .checked_add(duration)
            .map_or(u64::MAX, |at| timer.ticks(at, true));
        CoarseWait {
            timer,
            deadline,
            key: None,
        }
    }
}

impl Future for CoarseWait {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let c = self.timer;
        if c.fired(self.deadline) {
            // A sweep frees the slot of every wait it fires: the key is stale (dropped, so a
            // slot reused 2^32 times could not match it).
            self.key = None;
            return Poll::Ready(());
        }
        let stale = {
            let mut table = c.table.lock();
            // Checked again under the lock: a sweep stores its tick under it.
            if c.fired(self.deadline) {
                self.key = None;
                return Poll::Ready(());
            }
            let stale = match self.key.and_then(|key| table.slot(key)) {
                Some(slot) if slot.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) => None,
                Some(slot) => slot.waker.replace(cx.waker().clone()),
                None => {
                    self.key = Some(table.insert(self.deadline, cx.waker().clone()));
                    None
                }
            };
            c.start_sweeper(&mut table);
            stale
        };
        drop(stale);
        Poll::Pending
    }
}

impl Drop for CoarseWait {
    fn drop(&mut self) {
        let Some(key) = self.key else { return };
        let waker = {
            let mut table = self.timer.table.lock();
            match table.slot(key) {
                Some(_) => table.free(key.index),
                None => None,
            }
        };
        drop(waker);
    }
}

/// The timeout generated for [`CoarseWait`]s (see [`crate::fast_timeout::set_coarse_timer`]).
pub struct CoarseTimeout(Duration);

impl crate::ToTimeout for CoarseTimeout {
    type Delay = CoarseWait;

    fn timeout(&self) -> Self::Delay {
        CoarseWait::new(self.0)
    }

    fn create(d: Duration) -> Self {
        CoarseTimeout(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Count>, Waker) {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        (count.clone(), Waker::from(count))
    }

    fn woken(count: &Count) -> usize {
        count.0.load(Ordering::SeqCst)
    }

    /// A timer of the test's own, swept by hand only (no thread), with deadlines an hour or
    /// more away.
    fn private() -> &'static Coarse {
        let c = Coarse::new();
        c.table.lock().sweeping = true;
        Box::leak(Box::new(c))
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn a_deadline_is_rounded_up_and_a_sweep_down() {
        let c = private();
        let at = c.base + TICK * 3 + Duration::from_millis(1);
        assert_eq!(c.ticks(at, true), 4);
        assert_eq!(c.ticks(at, false), 3);
        assert_eq!(c.ticks(c.base + TICK * 3, true), 3);
        assert_eq!(c.ticks(c.base + TICK * 3, false), 3);
    }

    #[tokio::test]
    async fn a_wait_fires_after_its_duration_never_before() {
        let start = Instant::now();
        CoarseWait::new(Duration::from_millis(120)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(120), "{took:?}");
        assert!(took < Duration::from_secs(5), "{took:?}");
    }

    #[tokio::test]
    async fn a_timeout_on_it_cancels_and_fires() {
        let slow = tokio::time::sleep(Duration::from_secs(60));
        let fired =
            crate::Timeout::<_, CoarseTimeout>::new_with_delay(slow, Duration::from_millis(60));
        assert!(fired.await.is_err());
        let kept = crate::Timeout::<_, CoarseTimeout>::new_with_delay(async { 7 }, HOUR);
        assert_eq!(kept.await.unwrap(), 7);
    }

    #[test]
    fn a_dropped_wait_frees_its_slot_and_is_never_woken() {
        let c = private();
        let (count, w) = waker();
        let mut wait = Box::pin(CoarseWait::on(c, HOUR));
        assert!(wait
            .as_mut()
            .poll(&mut Context::from_waker(&w))
            .is_pending());
        let key = wait.key.expect("registered");
        assert!(c.table.lock().slot(key).is_some());
        drop(wait);
        assert!(c.table.lock().slot(key).is_none());
        // A sweep long after its deadline wakes nothing, and the slot is taken again.
        let mut due = Vec::new();
        c.sweep(Instant::now() + HOUR * 2, &mut due);
        assert_eq!(woken(&count), 0);
        let mut next = Box::pin(CoarseWait::on(c, HOUR * 3));
        assert!(next
            .as_mut()
            .poll(&mut Context::from_waker(&w))
            .is_pending());
        assert_eq!(next.key.map(|k| k.index), Some(key.index));
        assert_eq!(c.table.lock().slots.len(), 1);
    }

    #[test]
    fn a_sweep_wakes_a_due_wait_once_with_its_latest_waker_and_leaves_the_rest() {
        let c = private();
        let (first, w1) = waker();
        let (second, w2) = waker();
        let (later, w3) = waker();
        let mut due_soon = Box::pin(CoarseWait::on(c, HOUR));
        let mut due_later = Box::pin(CoarseWait::on(c, HOUR * 3));
        assert!(due_soon
            .as_mut()
            .poll(&mut Context::from_waker(&w1))
            .is_pending());
        // Polled again with another waker: that one is woken, not the first.
        assert!(due_soon
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_pending());
        assert!(due_later
            .as_mut()
            .poll(&mut Context::from_waker(&w3))
            .is_pending());
        let mut due = Vec::new();
        // Just before the deadline's tick: nothing fires.
        c.sweep(Instant::now() + HOUR - TICK * 2, &mut due);
        assert!(due_soon
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_pending());
        assert_eq!((woken(&first), woken(&second)), (0, 0));
        c.sweep(Instant::now() + HOUR * 2, &mut due);
        assert_eq!((woken(&first), woken(&second), woken(&later)), (0, 1, 0));
        assert!(due_soon
            .as_mut()
            .poll(&mut Context::from_waker(&w2))
            .is_ready());
        // Fired, its slot freed by the sweep: it keeps no key that a reused slot could match.
        assert_eq!(due_soon.key, None);
        assert!(due_later
            .as_mut()
            .poll(&mut Context::from_waker(&w3))
            .is_pending());
        // A second sweep does not wake the fired one again.
        c.sweep(Instant::now() + HOUR * 2, &mut due);
        assert_eq!(woken(&second), 1);
        let key = due_later.key.expect("registered");
        drop(due_later);
        assert!(c.table.lock().slot(key).is_none());
    }

    #[test]
    fn a_sweep_fires_due_waits_in_every_chunk_of_the_table() {
        let c = private();
        let (count, w) = waker();
        let mut waits: Vec<_> = (0..SWEEP_CHUNK * 2 + 3)
            .map(|i| {
                let after = if i % 2 == 0 { HOUR } else { HOUR * 3 };
                Box::pin(CoarseWait::on(c, after))
            })
            .collect();
        for wait in &mut waits {
            assert!(wait
                .as_mut()
                .poll(&mut Context::from_waker(&w))
                .is_pending());
        }
        let mut due = Vec::new();
        c.sweep(Instant::now() + HOUR * 2, &mut due);
        assert_eq!(woken(&count), SWEEP_CHUNK + 2);
        for (i, wait) in waits.iter_mut().enumerate() {
            let ready = wait.as_mut().poll(&mut Context::from_waker(&w)).is_ready();
            assert_eq!(ready, i % 2 == 0, "wait {i}");
        }
    }

    #[test]
    fn a_wait_that_registers_after_its_deadline_was_swept_is_ready() {
        let c = private();
        let (count, w) = waker();
        let mut wait = Box::pin(CoarseWait::on(c, HOUR));
        let mut due = Vec::new();
        c.sweep(Instant::now() + HOUR * 2, &mut due);
        assert!(wait.as_mut().poll(&mut Context::from_waker(&w)).is_ready());
        assert_eq!((wait.key, woken(&count)), (None, 0));
    }
}
