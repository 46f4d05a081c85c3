//! The alert outbox in PostgreSQL: alerts recorded inside the ledger's batch transaction
//! (`ON CONFLICT DO NOTHING`: exactly once across nodes), and deliveries claimed with
//! `FOR UPDATE SKIP LOCKED` plus a lease, so two nodes never send one delivery at once.

use std::collections::HashMap;
use std::sync::Arc;

use postgres::{Statement, Transaction};

use super::{prepared, Postgres};
use crate::alerts::AlertRules;
use crate::clock::month_label;
use crate::money::Nanos;
use crate::store::alerts::{
    plan, AlertSubjects, ClaimedDelivery, DeliveryRow, DeliveryUpdate, KeyStanding,
};
use crate::store::ledger::Batch;
use crate::store::{Result, StoreError};

type Cache = HashMap<&'static str, Statement>;

fn attempts(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Every (key, month) standing the planner may ask for: those of `subjects`, in one
/// statement, then the keys above them, a generation a statement. A key's spend is its own
/// and every key's below it (SPEC §7: a child's spend counts against its parent's budget).
fn standings(
    tx: &mut Transaction<'_>,
    cache: &mut Cache,
    subjects: &AlertSubjects,
) -> Result<HashMap<(Arc<str>, i64), KeyStanding>> {
    let stmt = prepared(
        cache,
        tx,
        "SELECT m.ord, k.name, k.budget_nanos, k.group_name, k.parent_id,
            COALESCE((WITH RECURSIVE tree(id) AS (
                          SELECT m.key_id
                          UNION ALL SELECT c.id FROM keys c JOIN tree t ON c.parent_id = t.id)
                      SELECT SUM(s.cost_nanos) FROM spend s JOIN tree t ON s.key_id = t.id
                      WHERE s.month = m.month), 0)::BIGINT
         FROM UNNEST($1::TEXT[], $2::TEXT[]) WITH ORDINALITY AS m(key_id, month, ord)
         JOIN keys k ON k.id = m.key_id",
    )?;
    let mut out: HashMap<(Arc<str>, i64), KeyStanding> = HashMap::new();
    let mut wanted: Vec<(Arc<str>, i64)> = subjects.key_months().into_iter().collect();
    // A tree is at most a few generations deep; the bound only guards a corrupt one.
    for _ in 0..8 {
        if wanted.is_empty() {
            break;
        }
        let ids: Vec<&str> = wanted.iter().map(|(k, _)| k.as_ref()).collect();
        let months: Vec<String> = wanted.iter().map(|(_, m)| month_label(*m)).collect();
        let mut above = Vec::new();
        for r in tx.query(&stmt, &[&ids, &months])? {
            let ord: i64 = r.try_get(0)?;
            let Some(at) = usize::try_from(ord - 1).ok().and_then(|i| wanted.get(i)) else {
                return Err(StoreError::Other(format!(
                    "standing row {ord} out of range"
                )));
            };
            let standing = KeyStanding {
                name: r.try_get(1)?,
                budget: r.try_get::<_, Option<i64>>(2)?.map(Nanos::new),
                group: r.try_get(3)?,
                parent: r.try_get(4)?,
                spend: Nanos::new(r.try_get(5)?),
            };
            if let Some(p) = &standing.parent {
                above.push((Arc::<str>::from(p.as_str()), at.1));
            }
            out.insert(at.clone(), standing);
        }
        above.retain(|k| !out.contains_key(k));
        above.sort();
        above.dedup();
        wanted = above;
    }
    Ok(out)
}

/// Records the alerts `parts` (the batch and its booked settlements) raise, inside the
/// batch's transaction, after its sums are written. Concurrent nodes inserting the same
/// alert: the second waits on the unique index, then inserts nothing.
pub(super) fn record_alerts(
    tx: &mut Transaction<'_>,
    cache: &mut Cache,
    parts: &[&Batch],
    rules: &AlertRules,
    now: i64,
) -> Result<()> {
    let subjects = AlertSubjects::of(parts);
    if subjects.is_empty() {
        return Ok(());
    }
    let keys = standings(tx, cache, &subjects)?;
    let mut group_rows: HashMap<(String, i64), Option<(Nanos, Nanos)>> = HashMap::new();
    {
        let mut wanted: Vec<(String, i64)> = subjects
            .spend
            .iter()
            .filter_map(|(k, m)| Some((keys.get(&(k.clone(), *m))?.group.clone()?, *m)))
            .collect();
        wanted.sort();
        wanted.dedup();
        let stmt = prepared(
            cache,
            tx,
            "SELECT g.budget_nanos,
                COALESCE((SELECT SUM(s.cost_nanos) FROM spend s JOIN keys k ON k.id = s.key_id
                          WHERE k.group_name = $1 AND s.month = $2), 0)::BIGINT
             FROM groups g WHERE g.name = $1 AND g.budget_nanos IS NOT NULL",
        )?;
        for (name, month) in wanted {
            let rows = tx.query(&stmt, &[&name, &month_label(month)])?;
            let standing = match rows.first() {
                Some(r) => Some((Nanos::new(r.try_get(0)?), Nanos::new(r.try_get(1)?))),
                None => None,
            };
            group_rows.insert((name, month), standing);
        }
    }
    let alerts = plan(
        &subjects,
        rules,
        |key, month| Ok(keys.get(&(Arc::from(key), month)).cloned()),
        |name, month| {
            Ok(group_rows
                .get(&(name.to_string(), month))
                .copied()
                .flatten())
        },
    )?;
    if alerts.is_empty() {
        return Ok(());
    }
    let insert = prepared(
        cache,
        tx,
        "INSERT INTO alerts (id, subject_kind, subject, event, period, threshold_ppm, payload,
            created_at)
         SELECT id, kind, subject, event, period, ppm, payload, $8::BIGINT
         FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::BIGINT[],
                     $7::TEXT[]) AS t(id, kind, subject, event, period, ppm, payload)
         ON CONFLICT DO NOTHING
         RETURNING id",
    )?;
    let new: Vec<String> = tx
        .query(
            &insert,
            &[
                &alerts.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
                &alerts.iter().map(|a| a.kind.label()).collect::<Vec<_>>(),
                &alerts
                    .iter()
                    .map(|a| a.subject.as_str())
                    .collect::<Vec<_>>(),
                &alerts.iter().map(|a| a.event).collect::<Vec<_>>(),
                &alerts.iter().map(|a| a.period.as_str()).collect::<Vec<_>>(),
                &alerts.iter().map(|a| a.threshold_ppm).collect::<Vec<_>>(),
                &alerts
                    .iter()
                    .map(|a| a.payload.as_str())
                    .collect::<Vec<_>>(),
                &now,
            ],
        )?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
    // Deliveries only with the alert's first insert: a webhook added later does not get
    // alerts that fired before it existed.
    if !new.is_empty() && !rules.webhooks.is_empty() {
        let deliveries = prepared(
            cache,
            tx,
            "INSERT INTO alert_deliveries (alert_id, webhook, state, attempts, next_attempt_at,
                lease_until, created_at)
             SELECT a.id, w.url, 'pending', 0, $3::BIGINT, 0, $3::BIGINT
             FROM UNNEST($1::TEXT[]) WITH ORDINALITY AS a(id, i)
             CROSS JOIN UNNEST($2::TEXT[]) WITH ORDINALITY AS w(url, j)
             ORDER BY a.i, w.j
             ON CONFLICT DO NOTHING",
        )?;
        tx.execute(&deliveries, &[&new, &rules.webhooks, &now])?;
    }
    Ok(())
}

fn claimed_from_row(r: &postgres::Row) -> Result<ClaimedDelivery> {
    Ok(ClaimedDelivery {
        id: r.try_get(0)?,
        alert_id: r.try_get(1)?,
        webhook: r.try_get(2)?,
        attempts: attempts(r.try_get(3)?),
        created_at: r.try_get(4)?,
        payload: r.try_get(5)?,
    })
}

impl Postgres {
    pub fn claim_deliveries(
        &mut self,
        now: i64,
        limit: u32,
        lease_until: i64,
        skip: &[&str],
    ) -> Result<Vec<ClaimedDelivery>> {
        let limit = i64::from(limit);
        let skip: Vec<&str> = skip.to_vec();
        self.write(|tx, cache| {
            let stmt = prepared(
                cache,
                tx,
                "WITH due AS (
                    SELECT id FROM alert_deliveries
                    WHERE state = 'pending' AND next_attempt_at <= $1 AND lease_until <= $1
                      AND NOT (webhook = ANY($4::TEXT[]))
                    ORDER BY next_attempt_at, id LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                 UPDATE alert_deliveries d SET lease_until = $3
                 FROM due, alerts a
                 WHERE d.id = due.id AND a.id = d.alert_id
                 RETURNING d.id, d.alert_id, d.webhook, d.attempts, a.created_at, a.payload",
            )?;
            let mut out = tx
                .query(&stmt, &[&now, &limit, &lease_until, &skip])?
                .iter()
                .map(claimed_from_row)
                .collect::<Result<Vec<_>>>()?;
            out.sort_by_key(|d| d.id);
            Ok(out)
        })
    }

    pub fn finish_delivery(&mut self, id: i64, u: &DeliveryUpdate) -> Result<()> {
        self.execute(
            "UPDATE alert_deliveries SET state = $2, attempts = $3, next_attempt_at = $4,
                last_error = $5, delivered_at = $6, lease_until = 0 WHERE id = $1",
            &[
                &id,
                &u.state.label(),
                &i64::from(u.attempts),
                &u.next_attempt_at,
                &u.last_error,
                &u.delivered_at,
            ],
        )?;
        Ok(())
    }

    pub fn release_deliveries(&mut self, ids: &[i64]) -> Result<()> {
        self.execute(
            "UPDATE alert_deliveries SET lease_until = 0 WHERE id = ANY($1::BIGINT[])",
            &[&ids],
        )?;
        Ok(())
    }

    pub fn pending_deliveries(&self) -> Result<u64> {
        let n: i64 = self.scalar(
            "SELECT COUNT(*) FROM alert_deliveries WHERE state = 'pending'",
            &[],
        )?;
        Ok(n.max(0) as u64)
    }

    pub fn alert_deliveries(&self, limit: u32, before: Option<i64>) -> Result<Vec<DeliveryRow>> {
        let rows = self.query(
            "SELECT d.id, d.alert_id, a.event, a.subject_kind, a.subject, a.period,
                a.threshold_ppm, d.webhook, d.state, d.attempts, d.last_error, d.created_at,
                d.next_attempt_at, d.delivered_at, a.payload
             FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id
             WHERE d.id < $2 ORDER BY d.id DESC LIMIT $1",
            &[&i64::from(limit), &before.unwrap_or(i64::MAX)],
        )?;
        rows.iter()
            .map(|r| {
                Ok(DeliveryRow {
                    delivery_id: r.try_get(0)?,
                    alert_id: r.try_get(1)?,
                    event: r.try_get(2)?,
                    subject_kind: r.try_get(3)?,
                    subject: r.try_get(4)?,
                    period: r.try_get(5)?,
                    threshold_ppm: r.try_get(6)?,
                    webhook: r.try_get(7)?,
                    state: r.try_get(8)?,
                    attempts: attempts(r.try_get(9)?),
                    last_error: r.try_get(10)?,
                    created_at: r.try_get(11)?,
                    next_attempt_at: r.try_get(12)?,
                    delivered_at: r.try_get(13)?,
                    payload: r.try_get(14)?,
                })
            })
            .collect()
    }
}
