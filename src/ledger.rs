//! Spend and trace writer: request path -> channel -> one writer thread -> SQLite, batched.
//!
//! Sending is a lock-free channel push; only the writer thread touches SQLite. A batch is
//! committed at least once per flush interval, and a failed commit keeps the batch and retries
//! (nothing is dropped before it is durable). Closing the ledger drains and commits everything.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::clock::{now_ms, MS_PER_DAY};
use crate::store::{LedgerEntry, Store};

const MAX_BATCH: usize = 4096;
const PRUNE_EVERY: Duration = Duration::from_secs(60);

enum Msg {
    Entry(Box<LedgerEntry>),
    /// Commit everything queued so far, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// Handle to the writer. Cheap to share; `record` never blocks.
pub struct SpendLedger {
    sender: Sender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    db: PathBuf,
    flush_interval: Duration,
    retention_days: u32,
}

impl SpendLedger {
    /// Creates the ledger; entries queue until [`SpendLedger::start`] spawns the writer (which
    /// must happen after Pingora daemonizes, since a fork keeps no threads).
    pub fn new(db: PathBuf, flush_interval: Duration, retention_days: u32) -> SpendLedger {
        let (tx, rx) = mpsc::channel();
        SpendLedger {
            sender: tx,
            rx: Mutex::new(Some(rx)),
            db,
            flush_interval,
            retention_days,
        }
    }

    /// Spawns the writer thread (once).
    pub fn start(&self) -> std::io::Result<()> {
        let Some(rx) = self.rx.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let store = Store::open(&self.db).map_err(std::io::Error::other)?;
        let writer = Writer {
            store,
            rx,
            flush_interval: self.flush_interval,
            retention_ms: self.retention_days as i64 * MS_PER_DAY,
            pending: Vec::new(),
            waiters: Vec::new(),
        };
        std::thread::Builder::new()
            .name("spidergate-ledger".into())
            .spawn(move || writer.run())?;
        Ok(())
    }

    /// Queues one finished request. Never blocks, never touches SQLite.
    pub fn record(&self, entry: LedgerEntry) {
        if self.sender.send(Msg::Entry(Box::new(entry))).is_err() {
            log::error!("ledger writer is gone; a ledger entry was not recorded");
        }
    }

    /// Waits until everything queued before this call is committed (blocking: call it from a
    /// blocking thread). Returns false if the writer is not running.
    pub fn flush_blocking(&self) -> bool {
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        if self.sender.send(Msg::Flush(done_tx)).is_err() {
            return false;
        }
        done_rx.recv_timeout(Duration::from_secs(30)).is_ok()
    }

    /// Commits everything recorded so far; called once the proxy has stopped, before exit.
    pub fn close(&self) -> bool {
        self.flush_blocking()
    }
}

struct Writer {
    store: Store,
    rx: Receiver<Msg>,
    flush_interval: Duration,
    retention_ms: i64,
    pending: Vec<LedgerEntry>,
    waiters: Vec<mpsc::SyncSender<()>>,
}

impl Writer {
    fn run(mut self) {
        let mut last_prune = Instant::now() - PRUNE_EVERY;
        loop {
            // Wait for the first message of a batch.
            match self.rx.recv_timeout(PRUNE_EVERY) {
                Ok(msg) => self.take(msg),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.commit_until_done();
                    return;
                }
            }
            // Gather for at most one flush interval, then commit.
            let deadline = Instant::now() + self.flush_interval;
            while self.waiters.is_empty() && self.pending.len() < MAX_BATCH {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match self.rx.recv_timeout(left) {
                    Ok(msg) => self.take(msg),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) => {
                        self.commit_until_done();
                        return;
                    }
                }
            }
            // A flush request also takes whatever is already queued behind it.
            while let Ok(msg) = self.rx.try_recv() {
                self.take(msg);
                if self.pending.len() >= MAX_BATCH {
                    break;
                }
            }
            self.commit();
            if last_prune.elapsed() >= PRUNE_EVERY {
                last_prune = Instant::now();
                if let Err(e) = self.store.prune_traces(now_ms() - self.retention_ms) {
                    log::warn!("trace retention prune failed: {e}");
                }
            }
        }
    }

    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Entry(e) => self.pending.push(*e),
            Msg::Flush(done) => self.waiters.push(done),
        }
    }

    /// Commits the pending batch; on failure keeps it for the next round.
    fn commit(&mut self) -> bool {
        if !self.pending.is_empty() {
            if let Err(e) = self.store.write_batch(&self.pending) {
                log::error!(
                    "ledger commit of {} entries failed, will retry: {e}",
                    self.pending.len()
                );
                return false;
            }
            self.pending.clear();
        }
        for w in self.waiters.drain(..) {
            let _ = w.try_send(());
        }
        true
    }

    fn commit_until_done(&mut self) {
        for attempt in 0..50 {
            if self.commit() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100 * (attempt + 1).min(10)));
        }
        log::error!(
            "ledger gave up on {} entries at shutdown",
            self.pending.len()
        );
    }
}
