//! The delivery worker: one thread that takes due deliveries from the outbox and hands each
//! to a thread of its own, which POSTs the alert's stored payload (signed) to its webhook;
//! the worker writes back delivered, or the next attempt with exponential backoff, or failed
//! once the retry period is over. It never touches the request path: requests only ever
//! write the outbox through the ledger.
//!
//! Attempts run side by side, so a webhook that hangs until `alerts.timeout_ms` holds up no
//! other: at most [`PER_HOOK`] of its deliveries are in flight, and the rest of the
//! [`SLOTS`] go to the other webhooks (SPEC §7: the first retry within a minute).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::post::{post, Target};
use super::{signature, Alerts};
use crate::clock::now_ms;
use crate::store::{ClaimedDelivery, DeliveryState, DeliveryUpdate, Store, StoreLocation};

/// Attempts in flight at once, over every webhook: deliveries are claimed for free slots.
const SLOTS: usize = 16;
/// Attempts in flight at once to one webhook: one that hangs holds this many slots, no more.
const PER_HOOK: usize = 4;
/// How long a stopping worker waits for the attempts in flight.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// How often the pending gauge is refreshed (one COUNT).
const COUNT_EVERY: Duration = Duration::from_secs(2);

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct AlertStats {
    sent: AtomicU64,
    failed_attempts: AtomicU64,
    given_up: AtomicU64,
    pending: AtomicU64,
}

impl AlertStats {
    /// Deliveries a webhook accepted (2xx).
    pub fn sent(&self) -> u64 {
        self.sent.load(Relaxed)
    }
    /// Attempts that failed (a non-2xx answer, a timeout, no connection).
    pub fn failed_attempts(&self) -> u64 {
        self.failed_attempts.load(Relaxed)
    }
    /// Deliveries given up after the retry period (state `failed`).
    pub fn given_up(&self) -> u64 {
        self.given_up.load(Relaxed)
    }
    /// Deliveries pending in the outbox (all nodes), as of the last count.
    pub fn pending(&self) -> u64 {
        self.pending.load(Relaxed)
    }
}

/// The worker's handle: start once (after Pingora daemonizes), stop at exit.
#[derive(Default)]
pub struct Dispatcher {
    stats: Arc<AlertStats>,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Dispatcher {
    pub fn stats(&self) -> &AlertStats {
        &self.stats
    }

    /// Spawns the worker thread (once). It idles cheaply while `alerts` is unset.
    pub fn start(
        &self,
        location: StoreLocation,
        settings: Arc<ArcSwapOption<Alerts>>,
    ) -> std::io::Result<()> {
        let mut slot = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            return Ok(());
        }
        let (done_tx, done_rx) = channel();
        let worker = Worker {
            location,
            settings,
            stats: self.stats.clone(),
            stop: self.stop.clone(),
            store: None,
            last_count: None,
            in_flight: HashMap::new(),
            done_tx,
            done_rx,
        };
        *slot = Some(
            std::thread::Builder::new()
                .name("spidergate-alerts".into())
                .spawn(move || worker.run())?,
        );
        Ok(())
    }

    /// Stops the worker once the attempts in flight end and their outcomes are written, or
    /// after [`STOP_WAIT`] (a hung webhook's attempt is left to its lease).
    pub fn stop(&self) {
        self.stop.store(true, Relaxed);
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            h.thread().unpark();
            if h.join().is_err() {
                log::error!("alerts: the delivery worker panicked");
            }
        }
    }
}

struct Worker {
    location: StoreLocation,
    settings: Arc<ArcSwapOption<Alerts>>,
    stats: Arc<AlertStats>,
    stop: Arc<AtomicBool>,
    /// Opened on first use, reopened after an error.
    store: Option<Store>,
    last_count: Option<Instant>,
    /// The webhook of each delivery being attempted, by delivery id.
    in_flight: HashMap<i64, String>,
    /// Each attempt's thread sends its outcome here, then wakes the worker.
    done_tx: Sender<(i64, DeliveryUpdate)>,
    done_rx: Receiver<(i64, DeliveryUpdate)>,
}

impl Worker {
    fn run(mut self) {
        let me = std::thread::current();
        let mut timeout = Duration::from_secs(10);
        while !self.stop.load(Relaxed) {
            let Some(alerts) = self.settings.load_full() else {
                std::thread::park_timeout(Duration::from_secs(1));
                self.record_finished_or_warn();
                continue;
            };
            timeout = alerts.timeout;
            if let Err(e) = self.round(&alerts, &me) {
                log::warn!("alerts: the outbox is unreachable, will retry: {e}");
                self.store = None;
            }
            // An attempt that ends (and stop) wakes the worker before the poll is up.
            std::thread::park_timeout(alerts.poll);
            self.record_finished_or_warn();
        }
        // Stopping: the outcomes of attempts that end soon are kept. One still waiting on
        // its webhook after that is left to its lease: tried again, with the same `id`, by
        // the next start or another node; shutdown does not wait out a hung webhook.
        let until = Instant::now() + timeout.min(STOP_WAIT);
        while !self.in_flight.is_empty() {
            let left = until.saturating_duration_since(Instant::now());
            let Ok(done) = self.done_rx.recv_timeout(left) else {
                // Their leases run out and another start or node tries them again.
                break;
            };
            if let Err(e) = self.record(done) {
                log::warn!("alerts: an attempt's outcome was not written, it will be retried: {e}");
                self.store = None;
            }
        }
    }

    fn store(&mut self) -> Result<&mut Store, crate::store::StoreError> {
        match &mut self.store {
            Some(s) => Ok(s),
            slot => Ok(slot.insert(Store::open_at(&self.location)?)),
        }
    }

    /// One round: write the outcomes of the attempts that ended, then claim due deliveries
    /// for the free slots and start an attempt for each.
    fn round(&mut self, alerts: &Arc<Alerts>, me: &Thread) -> Result<(), crate::store::StoreError> {
        self.record_finished()?;
        if self.last_count.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
            self.last_count = Some(Instant::now());
            let n = self.store()?.pending_deliveries()?;
            self.stats.pending.store(n, Relaxed);
        }
        let free = SLOTS.saturating_sub(self.in_flight.len());
        if free == 0 {
            return Ok(());
        }
        let mut per_hook: HashMap<String, usize> = HashMap::new();
        for hook in self.in_flight.values() {
            *per_hook.entry(hook.clone()).or_default() += 1;
        }
        let full: Vec<&str> = per_hook
            .iter()
            .filter(|(_, n)| **n >= PER_HOOK)
            .map(|(h, _)| h.as_str())
            .collect();
        // Long enough for the attempt to time out, plus slack.
        let now = now_ms();
        let lease = alerts.timeout.as_millis() as i64 + 30_000;
        let claimed = self
            .store()?
            .claim_deliveries(now, free as u32, now + lease, &full)?;
        let mut later = Vec::new();
        for d in claimed {
            let n = per_hook.entry(d.webhook.clone()).or_default();
            if *n >= PER_HOOK {
                // One claim may bring more to a webhook than it may have in flight.
                later.push(d.id);
                continue;
            }
            let (id, hook) = (d.id, d.webhook.clone());
            let (alerts, stats, done, me) = (
                alerts.clone(),
                self.stats.clone(),
                self.done_tx.clone(),
                me.clone(),
            );
            let started = std::thread::Builder::new()
                .name("spidergate-alert-post".into())
                .spawn(move || {
                    let update = attempt(&alerts, &d, &stats);
                    // The worker is gone only once it stopped waiting: the lease runs out.
                    let _ = done.send((d.id, update));
                    me.unpark();
                });
            match started {
                Ok(_) => {
                    *n += 1;
                    self.in_flight.insert(id, hook);
                }
                Err(e) => {
                    log::warn!("alerts: no thread for a delivery, will retry: {e}");
                    later.push(id);
                }
            }
        }
        if !later.is_empty() {
            self.store()?.release_deliveries(&later)?;
        }
        Ok(())
    }

    /// Writes the outcome of every attempt that ended since the last call.
    fn record_finished(&mut self) -> Result<(), crate::store::StoreError> {
        let mut any = false;
        while let Ok(done) = self.done_rx.try_recv() {
            any = true;
            self.record(done)?;
        }
        if any {
            let n = self.store()?.pending_deliveries()?;
            self.stats.pending.store(n, Relaxed);
        }
        Ok(())
    }

    fn record_finished_or_warn(&mut self) {
        if let Err(e) = self.record_finished() {
            log::warn!("alerts: the outbox is unreachable, will retry: {e}");
            self.store = None;
        }
    }

    /// Writes one attempt's outcome. One not written (the store failed) is tried again
    /// once its lease runs out.
    fn record(
        &mut self,
        (id, update): (i64, DeliveryUpdate),
    ) -> Result<(), crate::store::StoreError> {
        self.in_flight.remove(&id);
        self.store()?.finish_delivery(id, &update)
    }
}

/// Sends one delivery and decides what comes next.
fn attempt(alerts: &Alerts, d: &ClaimedDelivery, stats: &AlertStats) -> DeliveryUpdate {
    let attempts = d.attempts.saturating_add(1);
    let result = match alerts.webhook(&d.webhook) {
        // Removed from the config since the alert was recorded: nowhere to send it.
        None => {
            stats.given_up.fetch_add(1, Relaxed);
            return DeliveryUpdate {
                state: DeliveryState::Failed,
                attempts: d.attempts,
                next_attempt_at: now_ms(),
                last_error: Some("the webhook is no longer configured".into()),
                delivered_at: None,
            };
        }
        Some(hook) => Target::parse(&hook.url).and_then(|t| {
            let sig = signature(hook.secret.as_bytes(), d.payload.as_bytes());
            post(
                &t,
                &[
                    ("X-SpiderGate-Signature", &sig),
                    ("X-SpiderGate-Alert-Id", &d.alert_id),
                ],
                d.payload.as_bytes(),
                alerts.timeout,
            )
        }),
    };
    let now = now_ms();
    let error = match result {
        Ok(status) if (200..300).contains(&status) => {
            stats.sent.fetch_add(1, Relaxed);
            return DeliveryUpdate {
                state: DeliveryState::Delivered,
                attempts,
                next_attempt_at: now,
                last_error: None,
                delivered_at: Some(now),
            };
        }
        Ok(status) => format!("HTTP {status}"),
        Err(e) => e,
    };
    stats.failed_attempts.fetch_add(1, Relaxed);
    // Only the host in the log: a webhook URL's path often carries a token.
    let host = Target::parse(&d.webhook)
        .map(|t| t.authority)
        .unwrap_or_default();
    match alerts.retry.next_attempt(attempts, d.created_at, now) {
        Some(at) => {
            log::warn!(
                "alerts: delivery of {} to {host} failed (attempt {attempts}): {error}; retrying in {} ms",
                d.alert_id,
                at - now
            );
            DeliveryUpdate {
                state: DeliveryState::Pending,
                attempts,
                next_attempt_at: at,
                last_error: Some(error),
                delivered_at: None,
            }
        }
        None => {
            stats.given_up.fetch_add(1, Relaxed);
            log::error!(
                "alerts: giving up delivering {} to {host} after {attempts} attempts: {error}",
                d.alert_id
            );
            DeliveryUpdate {
                state: DeliveryState::Failed,
                attempts,
                next_attempt_at: now,
                last_error: Some(error),
                delivered_at: None,
            }
        }
    }
}
