//! Spend and trace writer: request path -> queue -> one writer thread -> SQLite, batched.
//!
//! Recording is a push onto a vector behind a mutex held for that push alone (see [`Queue`]):
//! no syscall unless another thread holds it at that instant. The writer never waits on the
//! queue (a waiting reader would make every push wake it with a futex call); it parks for
//! one flush interval, then takes whatever arrived and commits it in one transaction.
//! A failed commit keeps the batch and retries, so nothing is dropped before it is durable;
//! meanwhile the batch stays bounded (spend is aggregated per key and model, traces are
//! capped) and the ledger reports itself unhealthy, so hard-budget keys pause instead of
//! running unaccounted. `flush_blocking` unparks the writer for an immediate commit.
//!
//! Every admission is also journaled here (one more channel push): an admission still open
//! at a commit is written to the `inflight` table and deleted when its spend is booked, so
//! after a crash the next start charges what was left open.
//!
//! With `alerts` configured, each commit also records the alerts its spend raised (budget
//! thresholds, brake refusals) in the store's outbox, in the same transaction; the
//! thresholds are read at every commit, so a SIGHUP reload applies from the next one.
//!
//! With `telemetry` exporting, the writer also turns each entry that carries a span seed
//! into an OpenTelemetry span and offers it to the exporter's bounded queue (never waiting).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::alerts::Alerts;
use crate::clock::{now_ms, MS_PER_DAY};
use crate::store::{Batch, JournalRow, LedgerEntry, Store, StoreLocation};
use crate::telemetry::{span, SpanQueue, SpanSender, SpanStats};

const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// How often a cluster node writes its heartbeat and sweeps stopped nodes' journals.
const CLUSTER_EVERY: Duration = Duration::from_secs(1);

/// How often the writer looks at what it has (or `flush_interval`, when shorter).
const COMMIT_TICK: Duration = Duration::from_millis(50);

/// A batch this large commits at the next tick: under load the writer commits every
/// [`COMMIT_TICK`], small bursts of work on the core the requests share (the p99), while a
/// trickle commits once per `flush_interval` (default 500 ms), because a commit's cost (its
/// pages and the fsync) hardly depends on its size.
const BURST: u64 = 256;

/// The writer yields the core every 0.2 ms while its batch holds at most this many entries
/// (`priority::turn_point`), and works in whole scheduler turns past it: ~0.25 s of traffic
/// at 30k requests a second, five commit ticks behind.
const PACED_UP_TO: u64 = 8_192;

/// Whether the writer paces itself with `waiting` entries in its batch and inbox: up to
/// [`PACED_UP_TO`], and never past half the trace backlog it keeps (`max_backlog`, which
/// may be set lower), so it catches up before the batch drops a trace.
fn paced(waiting: u64, max_backlog: usize) -> bool {
    waiting <= PACED_UP_TO.min(max_backlog as u64 / 2)
}

/// Whether the writer commits at this tick: a batch of [`BURST`] entries; `flush_interval`
/// since the last commit (so a finished request waits at most that long, which is what a
/// crash can lose); or an admission open for a whole tick (`opened`: the open admissions'
/// start, wall ms), which a crash must find in the journal. So an admission still open is
/// journaled within two ticks of its start whatever the traffic; one that settles sooner
/// never needs a journal row.
fn commit_due(
    entries: u64,
    since_commit: Duration,
    interval: Duration,
    now_ms: i64,
    mut opened: impl Iterator<Item = i64>,
) -> bool {
    if entries >= BURST || since_commit >= interval {
        return true;
    }
    let opened_before = now_ms - COMMIT_TICK.min(interval).as_millis() as i64;
    opened.any(|ts| ts <= opened_before)
}

/// This gateway among the nodes sharing one PostgreSQL ledger.
#[derive(Debug, Clone, Copy)]
pub struct ClusterNode {
    /// The `owner` of this process's journal rows (random per process).
    pub owner: i64,
    /// A node whose heartbeat is older than this has stopped: its open admissions are
    /// charged at their upper-bound cost by whichever node sweeps first.
    pub ttl: Duration,
}

enum Msg {
    Entry(LedgerEntry),
    Admit(JournalRow),
    /// Commit everything queued so far, then answer.
    Flush(mpsc::SyncSender<()>),
    /// What the writer leaves in its inbox where it took a message out whole.
    Taken,
}

/// The request path's hand-off to the writer: a vector behind a mutex, which a push holds
/// for one `Vec::push` and the writer for one swap with its own (empty) vector, so neither
/// side allocates once both have grown to the traffic.
///
/// Not `std::sync::mpsc`: its unbounded channel cost ~550 instructions a send and ~150 a
/// receive (`benches/instr.py`), two of each per request (the journal row, the entry); an
/// uncontended lock and a push cost a fifth of that. The critical sections are a few dozen
/// instructions, so even with many worker threads the lock is rarely contended.
#[derive(Default)]
struct Queue {
    msgs: Mutex<Vec<Msg>>,
    /// Set when the ledger handle is dropped: the writer commits what is left and stops
    /// (what a channel's disconnection said).
    closed: AtomicBool,
    /// Set when the writer thread ends (its store did not open, or it stopped): nothing
    /// would take a message any more, so pushes are refused instead of kept forever.
    writer_gone: AtomicBool,
}

impl Queue {
    /// Queues `msg`; false (and `msg` dropped) when no writer will take it.
    #[must_use]
    fn push(&self, msg: Msg) -> bool {
        if self.writer_gone.load(Ordering::Relaxed) {
            return false;
        }
        self.msgs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(msg);
        true
    }

    /// Swaps everything queued into `inbox` (which must be empty; its capacity becomes the
    /// queue's). True once the handle was dropped: then nothing more can come.
    fn take(&self, inbox: &mut Vec<Msg>) -> bool {
        // Read first: a close seen here happened after the last push, which the swap sees.
        let closed = self.closed.load(Ordering::Acquire);
        std::mem::swap(
            &mut *self.msgs.lock().unwrap_or_else(PoisonError::into_inner),
            inbox,
        );
        closed
    }
}

/// Messages' worth of room the writer keeps between drains; the queue gets this vector
/// back at the next swap. ~5 MB: a 50 ms tick at ~300k requests a second.
const KEEP_QUEUED: usize = 16_384;

/// Readies a drained vector for the next swap: a burst's room (the queue grows while the
/// writer is held up, in a slow commit or a stalled store) is given back instead of kept
/// by both vectors for the life of the process.
fn recycle(inbox: &mut Vec<Msg>) {
    inbox.clear();
    if inbox.capacity() > KEEP_QUEUED {
        inbox.shrink_to(KEEP_QUEUED);
    }
}

/// Marks the queue's writer gone when the writer thread ends, however it ends.
struct WriterGone(Arc<Queue>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.writer_gone.store(true, Ordering::Relaxed);
    }
}

/// What the writer reports to the request path and `/health`, as plain atomics.
#[derive(Debug, Default)]
pub struct LedgerHealth {
    failing: AtomicBool,
    /// A cluster node's heartbeat to the shared store failed: the store is down for this
    /// node even while it has nothing to commit.
    unreachable: AtomicBool,
    /// Trace rows waiting for a commit.
    backlog: AtomicU64,
    dropped_traces: AtomicU64,
    failed_commits: AtomicU64,
    /// Set by [`SpendLedger::nudge`]: commit now instead of at the end of the interval.
    nudged: AtomicBool,
    /// Requests handed to [`SpendLedger::record`] (one relaxed increment each).
    finished: AtomicU64,
    /// Of those, the ones whose spend and trace are committed. Equal to `finished` with no
    /// request in flight: every finished request is durable (the tests' quiescence marker).
    committed: AtomicU64,
    /// Cluster upkeep rounds completed (heartbeat written and stopped nodes swept).
    sweeps: AtomicU64,
    /// Commits that wrote something, and how long each took from the writer's wake-up
    /// (taking the queue, then the transaction): a histogram over
    /// [`COMMIT_BUCKETS_US`], its sum in µs, its count.
    commit_buckets: [AtomicU64; COMMIT_BUCKETS_US.len()],
    commit_us_sum: AtomicU64,
    commits: AtomicU64,
}

/// Upper bounds (µs) of the commit-duration histogram (`spidergate_ledger_commit_seconds`).
pub const COMMIT_BUCKETS_US: [u64; 9] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 50_000, 250_000, 1_000_000,
];

impl LedgerHealth {
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Relaxed) || self.unreachable.load(Ordering::Relaxed)
    }

    pub fn backlog(&self) -> u64 {
        self.backlog.load(Ordering::Relaxed)
    }

    pub fn dropped_traces(&self) -> u64 {
        self.dropped_traces.load(Ordering::Relaxed)
    }

    pub fn failed_commits(&self) -> u64 {
        self.failed_commits.load(Ordering::Relaxed)
    }

    pub fn finished(&self) -> u64 {
        self.finished.load(Ordering::Acquire)
    }

    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::Acquire)
    }

    pub fn sweeps(&self) -> u64 {
        self.sweeps.load(Ordering::Relaxed)
    }

    /// Commits that wrote something.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Their summed duration, µs.
    pub fn commit_us_sum(&self) -> u64 {
        self.commit_us_sum.load(Ordering::Relaxed)
    }

    /// Commits per bucket of [`COMMIT_BUCKETS_US`] (not cumulative; the rest took longer).
    pub fn commit_buckets(&self) -> [u64; COMMIT_BUCKETS_US.len()] {
        std::array::from_fn(|i| self.commit_buckets[i].load(Ordering::Relaxed))
    }

    fn record_commit(&self, us: u64) {
        if let Some(i) = COMMIT_BUCKETS_US.iter().position(|&b| us <= b) {
            self.commit_buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.commit_us_sum.fetch_add(us, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }
}

/// Handle to the writer. Cheap to share; `record` never waits on the writer and makes no
/// syscall unless another thread holds the queue's lock at that instant.
pub struct SpendLedger {
    queue: Arc<Queue>,
    /// Whether [`SpendLedger::start`] ran (it spawns the writer once).
    started: AtomicBool,
    writer: OnceLock<Thread>,
    db: StoreLocation,
    cluster: Option<ClusterNode>,
    flush_interval: Duration,
    retention_days: u32,
    max_backlog: usize,
    health: Arc<LedgerHealth>,
    next_journal_id: AtomicI64,
    /// The OTLP exporter's queue, when `telemetry` names a collector.
    spans: Option<SpanQueue>,
    /// `alerts`, as last (re)loaded: shared with the writer and the delivery worker.
    alerts: Arc<ArcSwapOption<Alerts>>,
    /// Set once the sockets went to a successor (`serve --upgrade`): commits leave settled
    /// journal rows for it to follow (see `handover`).
    handing_over: Arc<AtomicBool>,
}

impl Drop for SpendLedger {
    /// The writer commits what is queued and stops (at once if it is parked).
    fn drop(&mut self) {
        self.queue.closed.store(true, Ordering::Release);
        if let Some(writer) = self.writer.get() {
            writer.unpark();
        }
    }
}

impl SpendLedger {
    /// Creates the ledger; entries queue until [`SpendLedger::start`] spawns the writer (which
    /// must happen after Pingora daemonizes, since a fork keeps no threads).
    pub fn new(
        db: StoreLocation,
        cluster: Option<ClusterNode>,
        flush_interval: Duration,
        retention_days: u32,
        max_backlog: usize,
        spans: Option<SpanQueue>,
    ) -> SpendLedger {
        // Unique across restarts: the start time in ms, shifted, plus a counter. In a
        // cluster the ids also name holds in Redis, so they are unique across nodes too:
        // the node's random owner id above 40 bits of counter.
        let first_id = match cluster {
            None => now_ms().max(0) << 20,
            Some(n) => (n.owner & 0x7F_FFFF) << 40,
        };
        SpendLedger {
            queue: Arc::default(),
            started: AtomicBool::new(false),
            writer: OnceLock::new(),
            db,
            cluster,
            flush_interval,
            retention_days,
            max_backlog,
            health: Arc::default(),
            next_journal_id: AtomicI64::new(first_id),
            spans,
            alerts: Arc::default(),
            handing_over: Arc::default(),
        }
    }

    /// The sockets go to a successor: every admission still open is journaled and everything
    /// recorded so far committed before this returns (true), and from the next commit on,
    /// settled journal rows are left for the successor instead of deleted. Blocking.
    pub fn hand_over(&self) -> bool {
        self.handing_over.store(true, Ordering::SeqCst);
        self.flush_blocking()
    }

    /// Swaps in the `alerts` settings (start-up and SIGHUP); the writer's next commit
    /// records alerts with them, the delivery worker's next round delivers with them.
    pub fn set_alerts(&self, alerts: Option<Alerts>) {
        self.alerts.store(alerts.map(Arc::new));
    }

    /// The live `alerts` settings, shared (the delivery worker reads them each round).
    pub fn alerts(&self) -> Arc<ArcSwapOption<Alerts>> {
        self.alerts.clone()
    }

    /// The span exporter's counters, when exporting.
    pub fn span_stats(&self) -> Option<&SpanStats> {
        self.spans.as_ref().map(SpanQueue::stats)
    }

    pub fn health(&self) -> &LedgerHealth {
        &self.health
    }

    /// A fresh journal id for one admission.
    pub fn journal_id(&self) -> i64 {
        self.next_journal_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks the writer to commit what it has now, without waiting for it (a `/v1/usage`
    /// call, so the CLI and admin API see the caller's spend at once). Never blocks.
    pub fn nudge(&self) {
        if let Some(writer) = self.writer.get() {
            self.health.nudged.store(true, Ordering::Relaxed);
            writer.unpark();
        }
    }

    /// Journals one admission. Never blocks, never touches SQLite.
    pub fn journal(&self, row: JournalRow) {
        if !self.queue.push(Msg::Admit(row)) {
            log::error!("ledger writer is gone; an admission was not journaled");
        }
    }

    /// Spawns the writer thread (once).
    pub fn start(&self) -> std::io::Result<()> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let queue = self.queue.clone();
        // Opened on the writer's own thread: this may be called from an async task, where a
        // blocking PostgreSQL client must not run (it drives a runtime of its own).
        let db = self.db.clone();
        let cluster = self.cluster;
        let flush_interval = self.flush_interval;
        let retention_ms = self.retention_days as i64 * MS_PER_DAY;
        let max_backlog = self.max_backlog;
        let health = self.health.clone();
        let spans = self.spans.as_ref().map(SpanQueue::sender);
        let alerts = self.alerts.clone();
        let handing_over = self.handing_over.clone();
        if let Some(q) = &self.spans {
            q.start()?;
        }
        let (opened_tx, opened_rx) = mpsc::sync_channel(1);
        let handle = std::thread::Builder::new()
            .name("spidergate-ledger".into())
            .spawn(move || {
                // The proxy's worker preempts it, not the other way (`priority`'s note).
                crate::priority::lower_this_thread(crate::priority::LEDGER_WRITER_NICE, "ledger");
                crate::priority::pace_this_thread(true);
                let _gone = WriterGone(queue.clone());
                let mut store = match Store::open_at(&db) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = opened_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                if let Some(node) = cluster {
                    store.set_owner(node.owner);
                }
                let checkpoints = Arc::new(AtomicBool::new(true));
                store.checkpoint_apart(&db, checkpoints.clone());
                let _ = opened_tx.send(Ok(()));
                Writer {
                    store,
                    cluster,
                    queue,
                    inbox: Vec::new(),
                    flush_interval,
                    retention_ms,
                    max_backlog,
                    health,
                    spans,
                    alerts,
                    handing_over,
                    open: HashMap::default(),
                    batch: Batch::default(),
                    batch_entries: 0,
                    waiters: Vec::new(),
                    behind: false,
                }
                .run();
                checkpoints.store(false, Ordering::Relaxed);
            })?;
        opened_rx
            .recv()
            .map_err(|_| std::io::Error::other("the ledger writer stopped at start"))?
            .map_err(std::io::Error::other)?;
        let _ = self.writer.set(handle.thread().clone());
        Ok(())
    }

    /// Queues one finished request. Never blocks, never touches SQLite.
    pub fn record(&self, entry: LedgerEntry) {
        self.health.finished.fetch_add(1, Ordering::Relaxed);
        if !self.queue.push(Msg::Entry(entry)) {
            log::error!("ledger writer is gone; a ledger entry was not recorded");
        }
    }

    /// Waits until everything queued before this call is committed (blocking: call it from a
    /// blocking thread). Returns false if the writer is not running or does not answer.
    pub fn flush_blocking(&self) -> bool {
        let Some(writer) = self.writer.get() else {
            return false;
        };
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if !self.queue.push(Msg::Flush(done_tx)) {
            return false;
        }
        writer.unpark();
        done_rx.recv_timeout(Duration::from_secs(30)).is_ok()
    }

    /// Commits everything recorded so far; called once the proxy has stopped, before exit.
    pub fn close(&self) -> bool {
        let flushed = self.flush_blocking();
        // The spans of those last entries, within a bounded wait: a collector that is down
        // must not hold up the exit.
        if let Some(q) = &self.spans {
            if !q.flush(Duration::from_secs(5)) {
                log::warn!("telemetry: the last spans were not all sent before exit");
            }
        }
        flushed
    }
}

struct Writer {
    store: Store,
    cluster: Option<ClusterNode>,
    queue: Arc<Queue>,
    /// What the last [`Writer::drain`] took from the queue (empty between drains; kept for
    /// its capacity).
    inbox: Vec<Msg>,
    flush_interval: Duration,
    retention_ms: i64,
    max_backlog: usize,
    health: Arc<LedgerHealth>,
    spans: Option<SpanSender>,
    alerts: Arc<ArcSwapOption<Alerts>>,
    handing_over: Arc<AtomicBool>,
    /// Admissions not yet written to the journal table (most finish before they need to be).
    open: HashMap<i64, JournalRow, foldhash::fast::RandomState>,
    batch: Batch,
    /// Ledger entries in `batch` (counted into `LedgerHealth::committed` once it commits).
    batch_entries: u64,
    waiters: Vec<mpsc::SyncSender<()>>,
    /// The last commit took longer than a [`COMMIT_TICK`], from its wake-up: the writer is
    /// not getting the core often enough to keep up (`priority::long_turns`).
    behind: bool,
}

impl Writer {
    fn run(mut self) {
        let mut last_prune = Instant::now();
        let mut last_commit = Instant::now();
        let mut last_cluster = None::<Instant>;
        loop {
            if let Some(node) = self.cluster {
                if last_cluster.is_none_or(|t| t.elapsed() >= CLUSTER_EVERY) {
                    last_cluster = Some(Instant::now());
                    self.cluster_upkeep(node);
                }
            }
            // The next tick, or the end of the interval since the last commit if sooner.
            let deadline = (Instant::now() + COMMIT_TICK).min(last_commit + self.flush_interval);
            // Park until the interval ends; an unpark (flush request) ends it early.
            let mut asked = false;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                if self.drain()
                    || !self.waiters.is_empty()
                    || self.health.nudged.swap(false, Ordering::Relaxed)
                {
                    asked = true;
                    break;
                }
            }
            let woke = Instant::now();
            let disconnected = self.drain();
            if !asked && !disconnected && !self.due(last_commit) {
                continue;
            }
            let committed = self.commit(woke);
            // Failed or not: a failed commit is retried at the next due tick, not at once.
            last_commit = Instant::now();
            let behind = last_commit.duration_since(woke) > COMMIT_TICK;
            if behind != self.behind {
                self.behind = behind;
                crate::priority::long_turns(behind);
            }
            if disconnected && committed {
                return;
            }
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                if let Err(e) = self.store.prune_traces(now_ms() - self.retention_ms) {
                    log::warn!("trace retention prune failed: {e}");
                }
            }
        }
    }

    /// Writes this node's heartbeat, then charges the open admissions of nodes whose
    /// heartbeat stopped (crashed, or killed) at their upper-bound cost.
    fn cluster_upkeep(&mut self, node: ClusterNode) {
        let now = now_ms();
        if let Err(e) = self.store.heartbeat(node.owner, now) {
            // Known at once, traffic or not: hard-budget keys pause and /health says so.
            if !self.health.unreachable.swap(true, Ordering::Relaxed) {
                log::error!(
                    "ledger: the store is unreachable (heartbeat failed); hard-budget keys are paused until it answers: {e}"
                );
            }
            return;
        }
        if self.health.unreachable.swap(false, Ordering::Relaxed) {
            log::warn!("ledger: the store answers again");
        }
        let live = match self.store.live_owners(now - node.ttl.as_millis() as i64) {
            Ok(live) => live,
            Err(e) => {
                log::warn!("ledger: cannot read the nodes' heartbeats: {e}");
                return;
            }
        };
        match self
            .store
            .charge_orphans(|owner| owner == node.owner || live.contains(&owner))
        {
            Ok(n) => {
                if n > 0 {
                    log::warn!(
                        "ledger: charged {n} requests left open by a stopped node at their upper-bound cost"
                    );
                }
                self.health.sweeps.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::warn!("ledger: charging a stopped node's open requests failed: {e}"),
        }
    }

    /// Whether the interval that just ended commits (see [`commit_due`]).
    fn due(&self, last_commit: Instant) -> bool {
        commit_due(
            self.batch_entries,
            last_commit.elapsed(),
            self.flush_interval,
            now_ms(),
            self.open.values().map(|row| row.ts),
        )
    }

    /// Moves everything queued into the batch; true once the ledger handle was dropped.
    fn drain(&mut self) -> bool {
        let mut inbox = std::mem::take(&mut self.inbox);
        let closed = self.queue.take(&mut inbox);
        // Behind (a slow store, or more traffic than its turns cover): whole turns until it
        // has caught up. Decided before the drain, with what it is about to take.
        let waiting = self.batch_entries + inbox.len() as u64;
        crate::priority::pace_this_thread(paced(waiting, self.max_backlog));
        // Read in place, in order (an admission comes before its entry): an entry's trace is
        // moved once, into the batch, not first out of the inbox (a copy of ~300 bytes).
        for msg in inbox.iter_mut() {
            match msg {
                Msg::Entry(e) => {
                    // A yield point an entry: an admission's row is only moved into a map.
                    crate::priority::turn_point();
                    if let Some(seed) = e.span.take() {
                        if let Some(spans) = &self.spans {
                            spans.offer(span::build(&e.trace, *seed));
                        }
                    }
                    // Finished before its admission was journaled: nothing to delete.
                    if e.journal_id
                        .is_some_and(|id| self.open.remove(&id).is_some())
                    {
                        e.journal_id = None;
                    }
                    let dropped = self.batch.dropped_traces;
                    self.batch.add(e, self.max_backlog);
                    self.batch_entries += 1;
                    if self.batch.dropped_traces > dropped {
                        self.health.dropped_traces.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Msg::Admit(_) | Msg::Flush(_) => match std::mem::replace(msg, Msg::Taken) {
                    Msg::Admit(row) => {
                        self.open.insert(row.id, row);
                    }
                    Msg::Flush(done) => self.waiters.push(done),
                    Msg::Entry(_) | Msg::Taken => {}
                },
                Msg::Taken => {}
            }
        }
        recycle(&mut inbox);
        self.inbox = inbox;
        closed
    }

    /// Commits the pending batch, then answers flush requests; on failure keeps the batch
    /// for the next round. `woke`: when this round's work began (for the commit's duration).
    fn commit(&mut self, woke: Instant) -> bool {
        // Admissions still open now are journaled with this commit.
        for (_, row) in self.open.drain() {
            self.batch.open(row);
        }
        if !self.batch.is_empty() {
            let traces = self.batch.trace_count();
            self.health.backlog.store(traces as u64, Ordering::Relaxed);
            let rules = self.alerts.load().as_ref().map(|a| a.rules.clone());
            self.store.set_alert_rules(rules);
            self.store
                .set_handing_over(self.handing_over.load(Ordering::SeqCst));
            if let Err(e) = self.store.write_batch(&self.batch) {
                if !self.health.failing.swap(true, Ordering::Relaxed) {
                    log::error!(
                        "ledger commit failed ({traces} traces waiting), will retry; \
                         hard-budget keys are paused until it succeeds: {e}"
                    );
                }
                self.health.failed_commits.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // Emptied, not replaced: its vectors and maps keep their room for the next one.
            self.batch.clear();
            self.health.backlog.store(0, Ordering::Relaxed);
            let us = woke.elapsed().as_micros() as u64;
            self.health.record_commit(us);
            // One line per commit at debug (off by default: the level check is all it costs),
            // with the wall clock to the µs, so a benchmark can line commits up with requests
            // (benches/p99_timeline.py).
            if log::log_enabled!(log::Level::Debug) {
                log::debug!(
                    "commit: {} requests, {traces} traces in {us} us, ended at unix_us {}",
                    self.batch_entries,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap_or_default()
                        .as_micros()
                );
            }
        }
        let entries = std::mem::take(&mut self.batch_entries);
        self.health.committed.fetch_add(entries, Ordering::Release);
        if self.health.failing.swap(false, Ordering::Relaxed) {
            log::warn!("ledger commits succeed again; hard-budget keys are served");
        }
        for w in self.waiters.drain(..) {
            let _ = w.try_send(());
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writer_paces_itself_only_while_well_within_its_backlog() {
        assert!(paced(0, 100_000));
        assert!(paced(PACED_UP_TO, 100_000));
        assert!(!paced(PACED_UP_TO + 1, 100_000));
        // A small backlog setting: whole turns from half of it, before a trace is dropped.
        assert!(paced(500, 1_000));
        assert!(!paced(501, 1_000));
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn row(id: i64) -> JournalRow {
        JournalRow {
            id,
            ts: 0,
            key_id: Arc::from("key_1"),
            endpoint: "/v1/chat/completions",
            requested_model: Arc::from("m"),
            served_model: Arc::from("m"),
            prompt_tokens: 0,
            completion_tokens: 0,
            cost: crate::money::Nanos::ZERO,
        }
    }

    fn admit(id: i64) -> Msg {
        Msg::Admit(row(id))
    }

    fn ids(msgs: &[Msg]) -> Vec<i64> {
        msgs.iter()
            .map(|m| match m {
                Msg::Admit(row) => row.id,
                _ => -1,
            })
            .collect()
    }

    #[test]
    fn the_queue_hands_over_everything_once_in_order() {
        let q = Queue::default();
        for id in 1..=3 {
            assert!(q.push(admit(id)));
        }
        let mut inbox = Vec::new();
        assert!(!q.take(&mut inbox), "not closed");
        assert_eq!(ids(&inbox), [1, 2, 3]);
        inbox.clear();
        assert!(q.push(admit(4)));
        assert!(!q.take(&mut inbox));
        assert_eq!(ids(&inbox), [4], "taken messages are not handed over again");
        inbox.clear();
        q.take(&mut inbox);
        assert!(inbox.is_empty());
    }

    #[test]
    fn a_bursts_room_is_given_back_after_the_drain() {
        let q = Queue::default();
        for id in 0..(3 * KEEP_QUEUED as i64) {
            assert!(q.push(admit(id)));
        }
        let mut inbox = Vec::new();
        q.take(&mut inbox);
        assert_eq!(inbox.len(), 3 * KEEP_QUEUED);
        recycle(&mut inbox);
        assert!(inbox.is_empty());
        assert!(inbox.capacity() <= KEEP_QUEUED, "{}", inbox.capacity());
        // The queue gets the trimmed vector back at the next swap.
        q.take(&mut inbox);
        assert!(inbox.is_empty());
        assert!(q.msgs.lock().unwrap().capacity() <= KEEP_QUEUED);
        // A small drain keeps its room: steady traffic reallocates nothing.
        let mut small = Vec::with_capacity(1_000);
        small.push(admit(1));
        recycle(&mut small);
        assert_eq!(small.capacity(), 1_000);
    }

    #[test]
    fn pushes_from_many_threads_all_arrive_each_threads_in_its_order() {
        const THREADS: i64 = 4;
        const EACH: i64 = 5_000;
        let q = Arc::new(Queue::default());
        let pushers: Vec<_> = (0..THREADS)
            .map(|t| {
                let q = q.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        assert!(q.push(admit(t * EACH + i)));
                    }
                })
            })
            .collect();
        // Taken while the pushes run, as the writer does.
        let mut got = Vec::new();
        let mut inbox = Vec::new();
        while got.len() < (THREADS * EACH) as usize {
            q.take(&mut inbox);
            got.extend(ids(&inbox));
            inbox.clear();
            std::thread::yield_now();
        }
        for p in pushers {
            p.join().unwrap();
        }
        q.take(&mut inbox);
        assert!(inbox.is_empty(), "nothing arrived twice or late");
        for t in 0..THREADS {
            let mine: Vec<i64> = got.iter().copied().filter(|id| id / EACH == t).collect();
            assert_eq!(mine, (t * EACH..(t + 1) * EACH).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_dropped_ledger_closes_its_queue_with_what_it_recorded_and_a_gone_writer_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = SpendLedger::new(
            StoreLocation::Sqlite(dir.path().join("l.db")),
            None,
            MS(50),
            90,
            1_000,
            None,
        );
        ledger.journal(row(7));
        let q = ledger.queue.clone();
        drop(ledger);
        let mut inbox = Vec::new();
        assert!(q.take(&mut inbox), "closed once the handle is gone");
        assert_eq!(ids(&inbox), [7], "what was recorded before is still there");

        drop(WriterGone(q.clone()));
        assert!(
            !q.push(admit(8)),
            "nothing is kept for a writer that is gone"
        );
        inbox.clear();
        q.take(&mut inbox);
        assert!(inbox.is_empty());
    }

    /// The finished request that closes the admission `row` journaled.
    fn closing(row: &JournalRow) -> LedgerEntry {
        LedgerEntry {
            trace: crate::store::TraceRow {
                ts: now_ms(),
                key_id: Some(row.key_id.clone()),
                endpoint: row.endpoint.into(),
                requested_model: Some(row.requested_model.clone()),
                served_model: Some(row.served_model.clone()),
                status: 200,
                prompt_tokens: 3,
                completion_tokens: 2,
                cost: crate::money::Nanos::new(7),
                ..Default::default()
            },
            admitted: true,
            counted: true,
            journal_id: Some(row.id),
            keep_trace: true,
            span: None,
        }
    }

    /// Whatever drain each lands in, an admission and the entry that closes it book the
    /// spend once and leave no journal row: the entry may come in the same drain as its
    /// admission (the writer must have seen the admission first, or the entry would take it
    /// for one an earlier commit wrote, and the row it then journals would stay open,
    /// charged again after a restart as an orphan), or after a commit wrote the admission.
    #[test]
    fn admissions_and_their_entries_book_once_and_leave_no_journal_row_whatever_the_drains() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l.db");
        let ledger = SpendLedger::new(
            StoreLocation::Sqlite(path.clone()),
            None,
            MS(20),
            90,
            100_000,
            None,
        );
        ledger.start().unwrap();
        let mut requests = 0;
        for round in 0..40 {
            let rows: Vec<JournalRow> = (0..4)
                .map(|_| JournalRow {
                    ts: now_ms(),
                    ..row(ledger.journal_id())
                })
                .collect();
            for row in &rows {
                ledger.journal(row.clone());
            }
            // Closed right after its admission, in the same drain most of the time.
            ledger.record(closing(&rows[0]));
            if round % 2 == 0 {
                // The others are open at this commit: journaled, then closed later.
                assert!(ledger.flush_blocking());
            }
            for row in &rows[1..] {
                ledger.record(closing(row));
            }
            requests += rows.len() as i64;
        }
        assert!(ledger.flush_blocking());
        let db = rusqlite::Connection::open(&path).unwrap();
        let open: i64 = db
            .query_row("SELECT COUNT(*) FROM inflight", [], |r| r.get(0))
            .unwrap();
        assert_eq!(open, 0, "every admission was closed by its entry");
        let (booked, cost): (i64, i64) = db
            .query_row(
                "SELECT SUM(requests), SUM(cost_nanos) FROM spend WHERE key_id = 'key_1'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((booked, cost), (requests, 7 * requests), "each booked once");
    }

    #[test]
    fn a_trickle_commits_once_per_interval_and_a_burst_at_the_tick() {
        let interval = MS(500);
        let now = 1_000_000;
        let none = std::iter::empty;
        // A trickle: 10 settled requests, 60 ms after the last commit, nothing open.
        assert!(!commit_due(10, MS(60), interval, now, none()));
        // At the end of the interval they commit: a crash loses at most the interval.
        assert!(commit_due(10, MS(500), interval, now, none()));
        assert!(!commit_due(10, MS(499), interval, now, none()));
        // A burst commits at the tick, as under load.
        assert!(commit_due(BURST, MS(50), interval, now, none()));
        assert!(!commit_due(BURST - 1, MS(50), interval, now, none()));
        // A short interval is kept as is.
        assert!(commit_due(1, MS(20), MS(20), now, none()));
    }

    #[test]
    fn an_admission_open_for_a_tick_commits_whatever_the_traffic() {
        let interval = MS(500);
        let now = 1_000_000;
        // Opened 10 ms ago: it may settle before it needs a journal row.
        assert!(!commit_due(
            0,
            MS(60),
            interval,
            now,
            [now - 10].into_iter()
        ));
        // Opened a whole tick ago (one of several): journaled now.
        assert!(commit_due(
            0,
            MS(60),
            interval,
            now,
            [now - 10, now - 50, now - 5].into_iter()
        ));
    }
}
