//! The alert outbox in SQLite: alerts recorded inside the ledger's batch transaction, and
//! the deliveries the worker claims (a lease column: one worker per delivery at a time).

use rusqlite::{params, OptionalExtension, Transaction};

use super::Sqlite;
use crate::alerts::{AlertRules, NewAlert};
use crate::clock::month_label;
use crate::money::Nanos;
use crate::store::alerts::{
    plan, AlertSubjects, ClaimedDelivery, DeliveryRow, DeliveryUpdate, KeyStanding,
};
use crate::store::ledger::Batch;
use crate::store::Result;

fn key_standing(tx: &Transaction<'_>, key_id: &str, month: i64) -> Result<Option<KeyStanding>> {
    // Its spend against its budget: its own and every key's below it.
    let mut stmt = tx.prepare_cached(
        "WITH RECURSIVE tree(id) AS (
            SELECT ?1 UNION ALL SELECT k.id FROM keys k JOIN tree t ON k.parent_id = t.id)
         SELECT name, budget_nanos, group_name, parent_id,
            (SELECT COALESCE(SUM(s.cost_nanos), 0) FROM spend s JOIN tree t ON s.key_id = t.id
             WHERE s.month = ?2)
         FROM keys WHERE id = ?1",
    )?;
    Ok(stmt
        .query_row(params![key_id, month_label(month)], |r| {
            Ok(KeyStanding {
                name: r.get(0)?,
                budget: r.get::<_, Option<i64>>(1)?.map(Nanos::new),
                group: r.get(2)?,
                parent: r.get(3)?,
                spend: Nanos::new(r.get(4)?),
            })
        })
        .optional()?)
}

/// A group's budget and its members' month-to-date spend; `None` without a budget.
fn group_standing(tx: &Transaction<'_>, name: &str, month: i64) -> Result<Option<(Nanos, Nanos)>> {
    let mut stmt = tx.prepare_cached(
        "SELECT budget_nanos,
            (SELECT COALESCE(SUM(s.cost_nanos), 0) FROM spend s JOIN keys k ON k.id = s.key_id
             WHERE k.group_name = ?1 AND s.month = ?2)
         FROM groups WHERE name = ?1 AND budget_nanos IS NOT NULL",
    )?;
    Ok(stmt
        .query_row(params![name, month_label(month)], |r| {
            Ok((Nanos::new(r.get(0)?), Nanos::new(r.get(1)?)))
        })
        .optional()?)
}

fn insert(tx: &Transaction<'_>, a: &NewAlert, webhooks: &[String], now: i64) -> Result<()> {
    let mut alert = tx.prepare_cached(
        "INSERT OR IGNORE INTO alerts (id, subject_kind, subject, event, period, threshold_ppm,
            payload, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    let new = alert.execute(params![
        a.id,
        a.kind.label(),
        a.subject,
        a.event,
        a.period,
        a.threshold_ppm,
        a.payload,
        now
    ])? > 0;
    // Deliveries only with the alert's first insert: a webhook added later does not get
    // alerts that fired before it existed.
    if new {
        let mut delivery = tx.prepare_cached(
            "INSERT OR IGNORE INTO alert_deliveries (alert_id, webhook, state, attempts,
                next_attempt_at, lease_until, created_at)
             VALUES (?1, ?2, 'pending', 0, ?3, 0, ?3)",
        )?;
        for w in webhooks {
            delivery.execute(params![a.id, w, now])?;
        }
    }
    Ok(())
}

/// Records the alerts `parts` (the batch and its booked settlements) raise, inside the
/// batch's transaction, after its sums are written (so spend is month-to-date after it).
pub(super) fn record_alerts(
    tx: &Transaction<'_>,
    parts: &[&Batch],
    rules: &AlertRules,
    now: i64,
) -> Result<()> {
    let subjects = AlertSubjects::of(parts);
    if subjects.is_empty() {
        return Ok(());
    }
    let alerts = plan(
        &subjects,
        rules,
        |key, month| key_standing(tx, key, month),
        |name, month| group_standing(tx, name, month),
    )?;
    for a in &alerts {
        insert(tx, a, &rules.webhooks, now)?;
    }
    Ok(())
}

impl Sqlite {
    /// Takes up to `limit` due deliveries (pending, next attempt reached, lease expired)
    /// until `lease_until`, none to a webhook in `skip`.
    pub fn claim_deliveries(
        &mut self,
        now: i64,
        limit: u32,
        lease_until: i64,
        skip: &[&str],
    ) -> Result<Vec<ClaimedDelivery>> {
        // The webhooks to skip, as a JSON array `json_each` reads (one statement to cache).
        let skip = serde_json::to_string(skip).unwrap_or_else(|_| "[]".into());
        // A plain read first: an empty outbox (the usual case) costs no write lock, which
        // the ledger writer would otherwise wait on every poll.
        let due: Option<i64> = self
            .conn
            .prepare_cached(
                "SELECT id FROM alert_deliveries WHERE state = 'pending'
                    AND next_attempt_at <= ?1 AND lease_until <= ?1
                    AND webhook NOT IN (SELECT value FROM json_each(?2)) LIMIT 1",
            )?
            .query_row(params![now, skip], |r| r.get(0))
            .optional()?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "UPDATE alert_deliveries SET lease_until = ?3
                 WHERE id IN (SELECT id FROM alert_deliveries
                              WHERE state = 'pending' AND next_attempt_at <= ?1
                                AND lease_until <= ?1
                                AND webhook NOT IN (SELECT value FROM json_each(?4))
                              ORDER BY next_attempt_at, id LIMIT ?2)
                 RETURNING id, alert_id, webhook, attempts,
                    (SELECT created_at FROM alerts a WHERE a.id = alert_id),
                    (SELECT payload FROM alerts a WHERE a.id = alert_id)",
            )?;
            let rows = stmt.query_map(params![now, limit, lease_until, skip], |r| {
                Ok(ClaimedDelivery {
                    id: r.get(0)?,
                    alert_id: r.get(1)?,
                    webhook: r.get(2)?,
                    attempts: r.get(3)?,
                    created_at: r.get(4)?,
                    payload: r.get(5)?,
                })
            })?;
            let mut out: Vec<ClaimedDelivery> = rows.collect::<rusqlite::Result<_>>()?;
            out.sort_by_key(|d| d.id);
            Ok(out)
        })
    }

    /// Writes one attempt's outcome and ends the lease.
    pub fn finish_delivery(&mut self, id: i64, u: &DeliveryUpdate) -> Result<()> {
        self.write(|tx| {
            tx.prepare_cached(
                "UPDATE alert_deliveries SET state = ?2, attempts = ?3, next_attempt_at = ?4,
                    last_error = ?5, delivered_at = ?6, lease_until = 0 WHERE id = ?1",
            )?
            .execute(params![
                id,
                u.state.label(),
                u.attempts,
                u.next_attempt_at,
                u.last_error,
                u.delivered_at
            ])?;
            Ok(())
        })
    }

    /// Ends the lease of deliveries taken but not attempted.
    pub fn release_deliveries(&mut self, ids: &[i64]) -> Result<()> {
        self.write(|tx| {
            let mut stmt =
                tx.prepare_cached("UPDATE alert_deliveries SET lease_until = 0 WHERE id = ?1")?;
            for id in ids {
                stmt.execute([id])?;
            }
            Ok(())
        })
    }

    /// Deliveries waiting for an attempt.
    pub fn pending_deliveries(&self) -> Result<u64> {
        Ok(self.conn.query_row(
            "SELECT COUNT(*) FROM alert_deliveries WHERE state = 'pending'",
            [],
            |r| r.get::<_, i64>(0),
        )? as u64)
    }

    /// Deliveries newest first; `before` (a delivery id) pages back.
    pub fn alert_deliveries(&self, limit: u32, before: Option<i64>) -> Result<Vec<DeliveryRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT d.id, d.alert_id, a.event, a.subject_kind, a.subject, a.period,
                a.threshold_ppm, d.webhook, d.state, d.attempts, d.last_error, d.created_at,
                d.next_attempt_at, d.delivered_at, a.payload
             FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
             WHERE d.id < ?2 ORDER BY d.id DESC LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit, before.unwrap_or(i64::MAX)], |r| {
            Ok(DeliveryRow {
                delivery_id: r.get(0)?,
                alert_id: r.get(1)?,
                event: r.get(2)?,
                subject_kind: r.get(3)?,
                subject: r.get(4)?,
                period: r.get(5)?,
                threshold_ppm: r.get(6)?,
                webhook: r.get(7)?,
                state: r.get(8)?,
                attempts: r.get(9)?,
                last_error: r.get(10)?,
                created_at: r.get(11)?,
                next_attempt_at: r.get(12)?,
                delivered_at: r.get(13)?,
                payload: r.get(14)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}
