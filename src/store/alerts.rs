//! The alert outbox as both backends store it: which alerts a committed batch raises
//! (planned here from the batch and the backend's reads, inside the batch's transaction),
//! and the delivery rows the worker claims, updates and lists.
//!
//! Tables: `alerts` (one row per alert, unique on subject kind, subject, event, period and
//! threshold) and `alert_deliveries` (one row per alert and webhook: state, attempts,
//! next attempt, lease, last error).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::alerts::{self, AlertRules, NewAlert, SubjectKind};
use crate::clock::month_index;
use crate::money::Nanos;
use crate::store::ledger::Batch;
use crate::store::Result;

/// A delivery's state: `pending` (waiting for its next attempt), `delivered` (a 2xx), or
/// `failed` (given up after the retry period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Failed,
}

impl DeliveryState {
    pub fn label(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Failed => "failed",
        }
    }
}

/// A delivery taken by one worker until `lease_until` (no other worker or node takes it
/// meanwhile).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedDelivery {
    pub id: i64,
    pub alert_id: String,
    pub webhook: String,
    /// Attempts made before this one.
    pub attempts: u32,
    /// When the alert was recorded (retries stop a fixed time after it).
    pub created_at: i64,
    pub payload: String,
}

/// The outcome of one attempt, written back (which also ends the lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryUpdate {
    pub state: DeliveryState,
    pub attempts: u32,
    pub next_attempt_at: i64,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
}

/// One delivery with its alert, as `GET /admin/alerts` lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryRow {
    pub delivery_id: i64,
    pub alert_id: String,
    pub event: String,
    pub subject_kind: String,
    pub subject: String,
    pub period: String,
    pub threshold_ppm: i64,
    pub webhook: String,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub next_attempt_at: i64,
    pub delivered_at: Option<i64>,
    pub payload: String,
}

/// A key as the alert planner needs it: its name, monthly budget, group, and its
/// month-to-date spend (after the batch) in the month asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(in crate::store) struct KeyStanding {
    pub name: String,
    pub budget: Option<Nanos>,
    pub group: Option<String>,
    /// The key that minted it: its spend counts against that key's budget too.
    pub parent: Option<String>,
    /// Month-to-date spend against its budget: its own and every key's below it (SPEC §7).
    pub spend: Nanos,
}

/// What a batch may alert about: keys whose spend it booked, per month, and brake refusals
/// (key, event, UTC hour) among its traces.
#[derive(Debug, Default)]
pub(in crate::store) struct AlertSubjects {
    pub spend: BTreeSet<(Arc<str>, i64)>,
    pub brakes: BTreeSet<(Arc<str>, &'static str, i64)>,
}

impl AlertSubjects {
    /// `parts`: the batch and the sums its settlements booked at commit.
    pub(in crate::store) fn of(parts: &[&Batch]) -> AlertSubjects {
        let mut s = AlertSubjects::default();
        for b in parts {
            for (key, month) in b.spend_months() {
                s.spend.insert((key.clone(), month));
            }
            for t in &b.traces {
                let (Some(key), Some(code)) = (&t.key_id, &t.error_code) else {
                    continue;
                };
                if let Some(event) = alerts::brake_event(code) {
                    s.brakes
                        .insert((key.clone(), event, alerts::hour_index(t.ts)));
                }
            }
        }
        s
    }

    pub(in crate::store) fn is_empty(&self) -> bool {
        self.spend.is_empty() && self.brakes.is_empty()
    }

    /// Every (key, month) whose standing the planner reads.
    pub(in crate::store) fn key_months(&self) -> BTreeSet<(Arc<str>, i64)> {
        let mut all = self.spend.clone();
        for (key, _, hour) in &self.brakes {
            all.insert((key.clone(), month_index(hour * 3_600_000)));
        }
        all
    }
}

/// The alerts a batch raises, sorted by id (so concurrent writers insert in one order).
/// `key` reads a key's standing (None: no such key); `group` reads a group's budget and
/// month-to-date spend (None: no such group, or no budget). Inserting them is idempotent.
pub(in crate::store) fn plan(
    subjects: &AlertSubjects,
    rules: &AlertRules,
    mut key: impl FnMut(&str, i64) -> Result<Option<KeyStanding>>,
    mut group: impl FnMut(&str, i64) -> Result<Option<(Nanos, Nanos)>>,
) -> Result<Vec<NewAlert>> {
    let mut out = Vec::new();
    let mut groups: BTreeSet<(String, i64)> = BTreeSet::new();
    if !rules.thresholds_ppm.is_empty() {
        // The keys that booked spend, and every key above them: a child's spend counts
        // against its parent's budget (SPEC §7), so it can cross the parent's thresholds.
        let mut pending: Vec<(String, i64)> = subjects
            .spend
            .iter()
            .map(|(k, m)| (k.to_string(), *m))
            .collect();
        let mut seen: BTreeSet<(String, i64)> = BTreeSet::new();
        while let Some((key_id, month)) = pending.pop() {
            if !seen.insert((key_id.clone(), month)) {
                continue;
            }
            let Some(k) = key(&key_id, month)? else {
                continue;
            };
            if let Some(parent) = &k.parent {
                pending.push((parent.clone(), month));
            }
            let (key_id, month) = (&key_id, &month);
            if let Some(budget) = k.budget {
                out.extend(alerts::budget_alerts(
                    rules,
                    SubjectKind::Key,
                    key_id,
                    &k.name,
                    *month,
                    k.spend,
                    budget,
                ));
            }
            if let Some(g) = k.group {
                groups.insert((g, *month));
            }
        }
        for (name, month) in &groups {
            if let Some((budget, spend)) = group(name, *month)? {
                out.extend(alerts::budget_alerts(
                    rules,
                    SubjectKind::Group,
                    name,
                    name,
                    *month,
                    spend,
                    budget,
                ));
            }
        }
    }
    for (key_id, event, hour) in &subjects.brakes {
        let month = month_index(hour * 3_600_000);
        let Some(k) = key(key_id, month)? else {
            continue;
        };
        out.push(alerts::brake_alert(
            event, key_id, &k.name, *hour, month, k.spend, k.budget,
        ));
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out.dedup_by(|a, b| a.id == b.id);
    Ok(out)
}
