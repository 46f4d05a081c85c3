//! Spend and trace writer: request path -> channel -> one writer thread -> SQLite, batched.
//!
//! Recording is a lock-free channel push with no syscall: the writer never blocks on the
//! channel (a blocked receiver would make every send wake it with a futex call); it parks
//! for one flush interval, then drains whatever arrived and commits it in one transaction.
//! A failed commit keeps the batch and retries, so nothing is dropped before it is durable.
//! `flush_blocking` unparks the writer for an immediate commit.

use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

use crate::clock::{now_ms, MS_PER_DAY};
use crate::store::{LedgerEntry, Store};

const PRUNE_EVERY: Duration = Duration::from_secs(60);

enum Msg {
    Entry(LedgerEntry),
    /// Commit everything queued so far, then answer.
    Flush(mpsc::SyncSender<()>),
}

/// Handle to the writer. Cheap to share; `record` never blocks and makes no syscall.
pub struct SpendLedger {
    sender: Sender<Msg>,
    rx: Mutex<Option<Receiver<Msg>>>,
    writer: OnceLock<Thread>,
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
            writer: OnceLock::new(),
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
        let handle = std::thread::Builder::new()
            .name("spidergate-ledger".into())
            .spawn(move || writer.run())?;
        let _ = self.writer.set(handle.thread().clone());
        Ok(())
    }

    /// Queues one finished request. Never blocks, never touches SQLite.
    pub fn record(&self, entry: LedgerEntry) {
        if self.sender.send(Msg::Entry(entry)).is_err() {
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
        if self.sender.send(Msg::Flush(done_tx)).is_err() {
            return false;
        }
        writer.unpark();
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
        let mut last_prune = Instant::now();
        loop {
            let deadline = Instant::now() + self.flush_interval;
            // Park until the interval ends; an unpark (flush request) ends it early.
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                std::thread::park_timeout(left);
                if self.drain() || !self.waiters.is_empty() {
                    break;
                }
            }
            let disconnected = self.drain();
            let committed = self.commit();
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

    /// Moves everything queued into the batch; true once every sender is gone.
    fn drain(&mut self) -> bool {
        loop {
            match self.rx.try_recv() {
                Ok(Msg::Entry(e)) => self.pending.push(e),
                Ok(Msg::Flush(done)) => self.waiters.push(done),
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    /// Commits the pending batch, then answers flush requests; on failure keeps the batch
    /// for the next round.
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
}
