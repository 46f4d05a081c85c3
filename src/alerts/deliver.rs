//! The delivery worker: one thread that takes due deliveries from the outbox, POSTs each
//! alert's stored payload (signed) to its webhook, and writes back delivered, or the next
//! attempt with exponential backoff, or failed once the retry period is over. It never
//! touches the request path: requests only ever write the outbox through the ledger.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::post::{post, Target};
use super::{signature, Alerts};
use crate::clock::now_ms;
use crate::store::{ClaimedDelivery, DeliveryState, DeliveryUpdate, Store, StoreLocation};

/// Deliveries taken per round. Each may take up to `alerts.timeout_ms`, so the lease
/// covers all of them with room to spare.
const CLAIM: u32 = 8;
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
        let worker = Worker {
            location,
            settings,
            stats: self.stats.clone(),
            stop: self.stop.clone(),
            store: None,
            last_count: None,
        };
        *slot = Some(
            std::thread::Builder::new()
                .name("spidergate-alerts".into())
                .spawn(move || worker.run())?,
        );
        Ok(())
    }

    /// Stops the worker: an attempt in flight finishes (within `alerts.timeout_ms`), the
    /// deliveries it had taken but not tried are released for the next start or node.
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
}

impl Worker {
    fn run(mut self) {
        while !self.stop.load(Relaxed) {
            let Some(alerts) = self.settings.load_full() else {
                std::thread::park_timeout(Duration::from_secs(1));
                continue;
            };
            let busy = match self.round(&alerts) {
                Ok(full) => full,
                Err(e) => {
                    log::warn!("alerts: the outbox is unreachable, will retry: {e}");
                    self.store = None;
                    false
                }
            };
            // A full claim means more may be due: go again at once.
            if !busy {
                std::thread::park_timeout(alerts.poll);
            }
        }
    }

    fn store(&mut self) -> Result<&mut Store, crate::store::StoreError> {
        match &mut self.store {
            Some(s) => Ok(s),
            slot => Ok(slot.insert(Store::open_at(&self.location)?)),
        }
    }

    /// One round: claim due deliveries and attempt each. Returns whether the claim was full.
    fn round(&mut self, alerts: &Alerts) -> Result<bool, crate::store::StoreError> {
        let now = now_ms();
        if self.last_count.is_none_or(|t| t.elapsed() >= COUNT_EVERY) {
            self.last_count = Some(Instant::now());
            let n = self.store()?.pending_deliveries()?;
            self.stats.pending.store(n, Relaxed);
        }
        // Long enough for every claimed attempt to time out, plus slack.
        let lease = alerts.timeout.as_millis() as i64 * i64::from(CLAIM) + 30_000;
        let claimed = self.store()?.claim_deliveries(now, CLAIM, now + lease)?;
        let full = claimed.len() == CLAIM as usize;
        for (i, d) in claimed.iter().enumerate() {
            if self.stop.load(Relaxed) {
                let rest: Vec<i64> = claimed[i..].iter().map(|d| d.id).collect();
                self.store()?.release_deliveries(&rest)?;
                return Ok(false);
            }
            let update = attempt(alerts, d, &self.stats);
            self.store()?.finish_delivery(d.id, &update)?;
        }
        if !claimed.is_empty() {
            let n = self.store()?.pending_deliveries()?;
            self.stats.pending.store(n, Relaxed);
        }
        Ok(full)
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
