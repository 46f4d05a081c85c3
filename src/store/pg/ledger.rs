//! The spend ledger in PostgreSQL: the same semantics as `sqlite::ledger`, each table of a
//! batch written by one array (`UNNEST`) statement, so a commit costs a handful of round
//! trips whatever its size.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use postgres::{Row, Statement, Transaction};

use super::{prepared, Postgres};
use crate::alerts::AlertRules;
use crate::clock::{day_label, month_label, now_ms};
use crate::limits::ModelTally;
use crate::money::Nanos;
use crate::store::ledger::{
    parse_trace_id, trace_id_hex, Batch, BatchSums, ModelSpend, TraceRow, ORPHANED,
};
use crate::store::{Result, StoreError};

type Cache = HashMap<&'static str, Statement>;

fn count(n: i64) -> u64 {
    n.max(0) as u64
}

/// Daily request counts as the `u32` the counters hold (saturating, never an error).
fn day_count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// A row of (model, requests, prompt_tokens, completion_tokens, cost_nanos).
pub(super) fn model_spend_from_row(r: &Row) -> Result<ModelSpend> {
    Ok(ModelSpend {
        model: r.try_get(0)?,
        requests: count(r.try_get(1)?),
        prompt_tokens: count(r.try_get(2)?),
        completion_tokens: count(r.try_get(3)?),
        cost: Nanos::new(r.try_get(4)?),
    })
}

fn shared(v: Option<String>) -> Option<Arc<str>> {
    v.map(Arc::from)
}

fn trace_from_row(row: &Row) -> Result<TraceRow> {
    let status: i64 = row.try_get(6)?;
    Ok(TraceRow {
        id: row.try_get(15)?,
        ts: row.try_get(0)?,
        key_id: shared(row.try_get(1)?),
        endpoint: Cow::Owned(row.try_get(2)?),
        requested_model: shared(row.try_get(3)?),
        served_model: shared(row.try_get(4)?),
        provider: shared(row.try_get(5)?),
        status: u16::try_from(status)
            .map_err(|_| StoreError::Other(format!("stored status {status} is out of range")))?,
        error_code: row.try_get::<_, Option<String>>(7)?.map(Cow::Owned),
        latency_ms: row.try_get(8)?,
        ttfb_ms: row.try_get(9)?,
        prompt_tokens: count(row.try_get(10)?),
        completion_tokens: count(row.try_get(11)?),
        cost: Nanos::new(row.try_get(12)?),
        usage_estimated: row.try_get(13)?,
        fallback_from: shared(row.try_get(14)?),
        trace_id: parse_trace_id(row.try_get(16)?),
        unit: row.try_get::<_, Option<String>>(17)?.map(Cow::Owned),
        units: count(row.try_get::<_, Option<i64>>(18)?.unwrap_or(0)),
    })
}

/// Inserts traces in their given order (ids follow it), one statement for all of them.
fn insert_traces(tx: &mut Transaction<'_>, cache: &mut Cache, traces: &[&TraceRow]) -> Result<()> {
    if traces.is_empty() {
        return Ok(());
    }
    let stmt = prepared(
        cache,
        tx,
        "INSERT INTO traces (ts, key_id, endpoint, requested_model, served_model, provider,
            status, error_code, latency_ms, ttfb_ms, prompt_tokens, completion_tokens,
            cost_nanos, usage_estimated, fallback_from, trace_id, unit, units)
         SELECT ts, key_id, endpoint, requested_model, served_model, provider, status,
            error_code, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, cost_nanos,
            usage_estimated, fallback_from, trace_id, unit, units
         FROM UNNEST($1::BIGINT[], $2::TEXT[], $3::TEXT[], $4::TEXT[], $5::TEXT[], $6::TEXT[],
                     $7::BIGINT[], $8::TEXT[], $9::BIGINT[], $10::BIGINT[], $11::BIGINT[],
                     $12::BIGINT[], $13::BIGINT[], $14::BOOLEAN[], $15::TEXT[], $16::TEXT[],
                     $17::TEXT[], $18::BIGINT[])
              WITH ORDINALITY AS t(ts, key_id, endpoint, requested_model, served_model,
                     provider, status, error_code, latency_ms, ttfb_ms, prompt_tokens,
                     completion_tokens, cost_nanos, usage_estimated, fallback_from, trace_id,
                     unit, units, ord)
         ORDER BY ord",
    )?;
    let col = |f: fn(&TraceRow) -> Option<&str>| traces.iter().map(|t| f(t)).collect::<Vec<_>>();
    let ints = |f: fn(&TraceRow) -> i64| traces.iter().map(|t| f(t)).collect::<Vec<_>>();
    tx.execute(
        &stmt,
        &[
            &ints(|t| t.ts),
            &col(|t| t.key_id.as_deref()),
            &traces
                .iter()
                .map(|t| t.endpoint.as_ref())
                .collect::<Vec<_>>(),
            &col(|t| t.requested_model.as_deref()),
            &col(|t| t.served_model.as_deref()),
            &col(|t| t.provider.as_deref()),
            &ints(|t| i64::from(t.status)),
            &col(|t| t.error_code.as_deref()),
            &ints(|t| t.latency_ms),
            &traces.iter().map(|t| t.ttfb_ms).collect::<Vec<_>>(),
            &ints(|t| t.prompt_tokens as i64),
            &ints(|t| t.completion_tokens as i64),
            &ints(|t| t.cost.get()),
            &traces.iter().map(|t| t.usage_estimated).collect::<Vec<_>>(),
            &col(|t| t.fallback_from.as_deref()),
            &traces.iter().map(|t| trace_id_hex(t)).collect::<Vec<_>>(),
            &col(|t| t.unit.as_deref()),
            &ints(|t| t.units as i64),
        ],
    )?;
    Ok(())
}

/// Sorts rows by key and merges rows with equal keys (an upsert statement may touch each
/// row once).
fn merged<K: Ord, V>(mut rows: Vec<(K, V)>, add: impl Fn(&mut V, &V)) -> Vec<(K, V)> {
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows.dedup_by(|next, kept| {
        let same = next.0 == kept.0;
        if same {
            add(&mut kept.1, &next.1);
        }
        same
    });
    rows
}

/// Adds the sums of `parts` to `spend`, `daily_requests`, `daily_spend` and
/// `key_last_used`, one statement per table for all parts. Rows are sorted by their key
/// first: two nodes committing at once then lock shared rows in the same order and never
/// deadlock.
fn add_sums(tx: &mut Transaction<'_>, cache: &mut Cache, parts: &[&Batch]) -> Result<()> {
    let parts: Vec<BatchSums> = parts.iter().map(|b| b.sums()).collect();
    let spend = merged(
        parts
            .iter()
            .flat_map(|b| &b.spend)
            .map(|((k, month, model), sums)| {
                ((k.as_ref(), month_label(*month), model.as_ref()), *sums)
            })
            .collect(),
        |kept, next| {
            for (k, n) in kept.iter_mut().zip(next) {
                *k = k.saturating_add(*n);
            }
        },
    );
    if !spend.is_empty() {
        let stmt = prepared(
            cache,
            tx,
            "INSERT INTO spend (key_id, month, model, requests, prompt_tokens,
                completion_tokens, cost_nanos)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[],
                                  $5::BIGINT[], $6::BIGINT[], $7::BIGINT[])
             ON CONFLICT (key_id, month, model) DO UPDATE SET
                requests = spend.requests + excluded.requests,
                -- Saturating, as `Nanos` is: a sum past BIGINT would fail the batch.
                prompt_tokens = CASE
                    WHEN excluded.prompt_tokens > 9223372036854775807 - spend.prompt_tokens
                    THEN 9223372036854775807
                    ELSE spend.prompt_tokens + excluded.prompt_tokens END,
                completion_tokens = CASE
                    WHEN excluded.completion_tokens
                        > 9223372036854775807 - spend.completion_tokens
                    THEN 9223372036854775807
                    ELSE spend.completion_tokens + excluded.completion_tokens END,
                cost_nanos = CASE
                    WHEN excluded.cost_nanos > 9223372036854775807 - spend.cost_nanos
                    THEN 9223372036854775807
                    ELSE spend.cost_nanos + excluded.cost_nanos END",
        )?;
        tx.execute(
            &stmt,
            &[
                &spend.iter().map(|r| r.0 .0).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.0 .1.as_str()).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.0 .2).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.1[1]).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.1[2]).collect::<Vec<_>>(),
                &spend.iter().map(|r| r.1[3]).collect::<Vec<_>>(),
            ],
        )?;
    }
    let daily = merged(
        parts
            .iter()
            .flat_map(|b| &b.daily)
            .map(|((k, day), n)| ((k.as_ref(), day_label(*day)), *n))
            .collect(),
        |kept, next| *kept = kept.saturating_add(*next),
    );
    if !daily.is_empty() {
        let stmt = prepared(
            cache,
            tx,
            "INSERT INTO daily_requests (key_id, day, requests)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[])
             ON CONFLICT (key_id, day) DO UPDATE SET
                requests = daily_requests.requests + excluded.requests",
        )?;
        tx.execute(
            &stmt,
            &[
                &daily.iter().map(|r| r.0 .0).collect::<Vec<_>>(),
                &daily.iter().map(|r| r.0 .1.as_str()).collect::<Vec<_>>(),
                &daily.iter().map(|r| r.1).collect::<Vec<_>>(),
            ],
        )?;
    }
    let daily_spend = merged(
        parts
            .iter()
            .flat_map(|b| &b.daily_spend)
            .map(|((k, day, model), sums)| ((k.as_ref(), day_label(*day), model.as_ref()), *sums))
            .collect(),
        |kept, next| {
            for (k, n) in kept.iter_mut().zip(next) {
                *k = k.saturating_add(*n);
            }
        },
    );
    if !daily_spend.is_empty() {
        let stmt = prepared(
            cache,
            tx,
            "INSERT INTO daily_spend (key_id, day, model, requests, cost_nanos)
             SELECT * FROM UNNEST($1::TEXT[], $2::TEXT[], $3::TEXT[], $4::BIGINT[],
                                  $5::BIGINT[])
             ON CONFLICT (key_id, day, model) DO UPDATE SET
                requests = daily_spend.requests + excluded.requests,
                cost_nanos = CASE
                    WHEN excluded.cost_nanos > 9223372036854775807 - daily_spend.cost_nanos
                    THEN 9223372036854775807
                    ELSE daily_spend.cost_nanos + excluded.cost_nanos END",
        )?;
        tx.execute(
            &stmt,
            &[
                &daily_spend.iter().map(|r| r.0 .0).collect::<Vec<_>>(),
                &daily_spend
                    .iter()
                    .map(|r| r.0 .1.as_str())
                    .collect::<Vec<_>>(),
                &daily_spend.iter().map(|r| r.0 .2).collect::<Vec<_>>(),
                &daily_spend.iter().map(|r| r.1[0]).collect::<Vec<_>>(),
                &daily_spend.iter().map(|r| r.1[1]).collect::<Vec<_>>(),
            ],
        )?;
    }
    let last_used = merged(
        parts
            .iter()
            .flat_map(|b| &b.last_used)
            .map(|(k, at)| (k.as_ref(), *at))
            .collect(),
        |kept, next| *kept = (*kept).max(*next),
    );
    if !last_used.is_empty() {
        let stmt = prepared(
            cache,
            tx,
            "INSERT INTO key_last_used (key_id, at)
             SELECT * FROM UNNEST($1::TEXT[], $2::BIGINT[])
             ON CONFLICT (key_id) DO UPDATE SET
                at = GREATEST(key_last_used.at, excluded.at)",
        )?;
        tx.execute(
            &stmt,
            &[
                &last_used.iter().map(|r| r.0).collect::<Vec<_>>(),
                &last_used.iter().map(|r| r.1).collect::<Vec<_>>(),
            ],
        )?;
    }
    Ok(())
}

/// Deletes this node's journal rows that `batch` closes, locking them in id order (as
/// `charge_orphans` does, so the two never deadlock), and returns the batch's settlements
/// whose row it deleted, as sums to book. A row already gone was taken by the orphan sweep
/// of another node, which charged its estimate: that request books nothing more.
fn close_journal(
    tx: &mut Transaction<'_>,
    cache: &mut Cache,
    batch: &Batch,
    owner: i64,
) -> Result<Batch> {
    let mut booked = Batch::default();
    if batch.journal_closed.is_empty() && batch.settlements.is_empty() {
        return Ok(booked);
    }
    let mut ids: Vec<i64> = batch
        .journal_closed
        .iter()
        .copied()
        .chain(batch.settlements.iter().map(|s| s.journal_id))
        .collect();
    ids.sort_unstable();
    let stmt = prepared(
        cache,
        tx,
        "WITH doomed AS (
            SELECT owner, id FROM inflight WHERE owner = $1 AND id = ANY($2::BIGINT[])
            ORDER BY id FOR UPDATE)
         DELETE FROM inflight i USING doomed d WHERE i.owner = d.owner AND i.id = d.id
         RETURNING i.id",
    )?;
    let mut deleted = tx
        .query(&stmt, &[&owner, &ids])?
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    deleted.sort_unstable();
    for s in &batch.settlements {
        if deleted.binary_search(&s.journal_id).is_ok() {
            booked.book_settled(s);
        }
    }
    Ok(booked)
}

/// The trace columns as `trace_from_row` reads them.
macro_rules! trace_columns {
    () => {
        "ts, key_id, endpoint, requested_model, served_model, provider, status, error_code, \
         latency_ms, ttfb_ms, prompt_tokens, completion_tokens, cost_nanos, usage_estimated, \
         fallback_from, id, trace_id, unit, units"
    };
}

impl Postgres {
    pub fn spend_by_key(&self, month: &str) -> Result<HashMap<String, Vec<ModelTally>>> {
        let rows = self.query(
            "SELECT key_id, model, requests, prompt_tokens, completion_tokens, cost_nanos
             FROM spend WHERE month = $1",
            &[&month],
        )?;
        let mut out: HashMap<String, Vec<ModelTally>> = HashMap::new();
        for r in &rows {
            out.entry(r.try_get(0)?).or_default().push(ModelTally {
                model: Arc::from(r.try_get::<_, &str>(1)?),
                requests: count(r.try_get(2)?),
                prompt_tokens: count(r.try_get(3)?),
                completion_tokens: count(r.try_get(4)?),
                spent: Nanos::new(r.try_get(5)?),
            });
        }
        Ok(out)
    }

    pub fn requests_by_key(&self, day: &str) -> Result<HashMap<String, u32>> {
        self.query(
            "SELECT key_id, requests FROM daily_requests WHERE day = $1",
            &[&day],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, day_count(r.try_get(1)?))))
        .collect()
    }

    pub fn spend_for_key(&self, key_id: &str, month: &str) -> Result<Vec<ModelSpend>> {
        self.query(
            "SELECT model, requests, prompt_tokens, completion_tokens, cost_nanos FROM spend
             WHERE key_id = $1 AND month = $2 ORDER BY model",
            &[&key_id, &month],
        )?
        .iter()
        .map(model_spend_from_row)
        .collect()
    }

    pub fn requests_on(&self, key_id: &str, day: &str) -> Result<u32> {
        let rows = self.query(
            "SELECT requests FROM daily_requests WHERE key_id = $1 AND day = $2",
            &[&key_id, &day],
        )?;
        match rows.first() {
            Some(r) => Ok(day_count(r.try_get(0)?)),
            None => Ok(0),
        }
    }

    /// The key's charges (unix ms when the request ended, cost) at or after `since` (see the
    /// SQLite store). In a cluster Redis keeps the hour window; this serves a node that
    /// falls back to its own counters, so it reads at most the key's newest 10,000 traces
    /// (by the `(key_id, id)` index) rather than its history.
    pub fn recent_charges(&self, key_id: &str, since: i64) -> Result<Vec<(i64, Nanos)>> {
        let rows = self.query(
            "SELECT ts + latency_ms, cost_nanos FROM traces
             WHERE key_id = $1 ORDER BY id DESC LIMIT 10000",
            &[&key_id],
        )?;
        let mut out = Vec::new();
        for r in &rows {
            let (at, cost): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            if at >= since && cost > 0 {
                out.push((at, Nanos::new(cost)));
            }
        }
        Ok(out)
    }

    /// Model requests the key had admitted at or after `since` (see the SQLite store), from
    /// its newest 10,000 traces.
    pub fn admitted_since(&self, key_id: &str, since: i64) -> Result<u32> {
        let rows = self.query(
            "SELECT count(*) FROM (SELECT ts, served_model FROM traces
             WHERE key_id = $1 ORDER BY id DESC LIMIT 10000) AS t
             WHERE ts >= $2 AND served_model IS NOT NULL",
            &[&key_id, &since],
        )?;
        let n: i64 = match rows.first() {
            Some(r) => r.try_get(0)?,
            None => 0,
        };
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    pub fn traces(
        &self,
        key_id: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<TraceRow>> {
        let before = before.unwrap_or(i64::MAX);
        let limit = i64::from(limit);
        let rows = match key_id {
            Some(key) => self.query(
                concat!(
                    "SELECT ",
                    trace_columns!(),
                    " FROM traces WHERE key_id = $1 AND id < $3 ORDER BY id DESC LIMIT $2"
                ),
                &[&key, &limit, &before],
            )?,
            None => {
                // Larger than any batch, so the window holds every row newer than its start.
                let window = limit + 200_000;
                self.query(
                    concat!(
                        "SELECT ",
                        trace_columns!(),
                        " FROM traces
                         WHERE id < $3 AND id > (SELECT COALESCE(MAX(id), 0) FROM traces
                                                 WHERE id < $3) - $1
                         ORDER BY id DESC LIMIT $2"
                    ),
                    &[&window, &limit, &before],
                )?
            }
        };
        rows.iter().map(trace_from_row).collect()
    }

    pub fn daily_spend(
        &self,
        month: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<(String, String, Nanos)>> {
        let like = format!("{month}-%");
        // SUM of BIGINT is NUMERIC in PostgreSQL: cast back (a month's spend fits).
        self.query(
            "SELECT day, model, SUM(cost_nanos)::BIGINT FROM daily_spend
             WHERE day LIKE $1 AND ($2::TEXT IS NULL OR key_id = $2)
             GROUP BY day, model ORDER BY day, model",
            &[&like, &key_id],
        )?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, Nanos::new(r.try_get(2)?))))
        .collect()
    }

    /// One transaction per batch, as in SQLite; journal rows are keyed by `(owner, id)`.
    /// Journal rows are deleted first (inflight row locks, then sums rows, each in a fixed
    /// order, as in `charge_orphans`): a journaled request is booked only if its row was
    /// still there, so it is charged once whichever node takes the row.
    pub fn write_batch(
        &mut self,
        batch: &Batch,
        owner: i64,
        alerts: Option<&AlertRules>,
    ) -> Result<()> {
        self.write(|tx, cache| {
            let booked = close_journal(tx, cache, batch, owner)?;
            // Grouped by key (stable), as in SQLite: each key's traces stay in order and
            // the per-key index takes runs of appends.
            let mut by_key: Vec<&TraceRow> = batch.traces.iter().collect();
            by_key.sort_by(|a, b| a.key_id.cmp(&b.key_id));
            insert_traces(tx, cache, &by_key)?;
            add_sums(tx, cache, &[batch, &booked])?;
            if !batch.journal_open.is_empty() {
                let mut open: Vec<_> = batch.journal_open.values().collect();
                open.sort_by_key(|j| j.id);
                let stmt = prepared(
                    cache,
                    tx,
                    "INSERT INTO inflight (owner, id, ts, key_id, endpoint, requested_model,
                        served_model, prompt_tokens, completion_tokens, cost_nanos)
                     SELECT $1::BIGINT, * FROM UNNEST($2::BIGINT[], $3::BIGINT[], $4::TEXT[],
                        $5::TEXT[], $6::TEXT[], $7::TEXT[], $8::BIGINT[], $9::BIGINT[],
                        $10::BIGINT[])
                     ON CONFLICT (owner, id) DO UPDATE SET
                        ts = excluded.ts, key_id = excluded.key_id,
                        endpoint = excluded.endpoint,
                        requested_model = excluded.requested_model,
                        served_model = excluded.served_model,
                        prompt_tokens = excluded.prompt_tokens,
                        completion_tokens = excluded.completion_tokens,
                        cost_nanos = excluded.cost_nanos",
                )?;
                tx.execute(
                    &stmt,
                    &[
                        &owner,
                        &open.iter().map(|j| j.id).collect::<Vec<_>>(),
                        &open.iter().map(|j| j.ts).collect::<Vec<_>>(),
                        &open.iter().map(|j| j.key_id.as_ref()).collect::<Vec<_>>(),
                        &open.iter().map(|j| j.endpoint).collect::<Vec<_>>(),
                        &open
                            .iter()
                            .map(|j| j.requested_model.as_ref())
                            .collect::<Vec<_>>(),
                        &open
                            .iter()
                            .map(|j| j.served_model.as_ref())
                            .collect::<Vec<_>>(),
                        &open
                            .iter()
                            .map(|j| j.prompt_tokens as i64)
                            .collect::<Vec<_>>(),
                        &open
                            .iter()
                            .map(|j| j.completion_tokens as i64)
                            .collect::<Vec<_>>(),
                        &open.iter().map(|j| j.cost.get()).collect::<Vec<_>>(),
                    ],
                )?;
            }
            // Last: spend is month-to-date including this batch.
            if let Some(rules) = alerts {
                super::alerts::record_alerts(tx, cache, &[batch, &booked], rules, now_ms())?;
            }
            Ok(())
        })
    }

    /// Orphans are taken with one `DELETE ... RETURNING`, their rows locked in
    /// `(owner, id)` order: when two nodes charge the same dead owner at once (or the owner,
    /// alive after all, settles a request in `write_batch`), the second waits on the row
    /// locks, then finds the rows gone, so each admission is charged exactly once.
    pub fn charge_orphans(&mut self, is_live: impl Fn(i64) -> bool) -> Result<usize> {
        self.write(|tx, cache| {
            let owners = prepared(cache, tx, "SELECT DISTINCT owner FROM inflight")?;
            let dead = tx
                .query(&owners, &[])?
                .iter()
                .map(|r| r.try_get::<_, i64>(0))
                .collect::<std::result::Result<Vec<_>, _>>()?
                .into_iter()
                .filter(|o| !is_live(*o))
                .collect::<Vec<_>>();
            if dead.is_empty() {
                return Ok(0);
            }
            let take = prepared(
                cache,
                tx,
                "WITH doomed AS (
                    SELECT owner, id FROM inflight WHERE owner = ANY($1::BIGINT[])
                    ORDER BY owner, id FOR UPDATE)
                 DELETE FROM inflight i USING doomed d WHERE i.owner = d.owner AND i.id = d.id
                 RETURNING i.owner, i.id, i.ts, i.key_id, i.endpoint, i.requested_model,
                    i.served_model, i.prompt_tokens, i.completion_tokens, i.cost_nanos",
            )?;
            let mut rows = tx
                .query(&take, &[&dead])?
                .iter()
                .map(|r| {
                    let trace = TraceRow {
                        ts: r.try_get(2)?,
                        key_id: Some(Arc::from(r.try_get::<_, &str>(3)?)),
                        endpoint: Cow::Owned(r.try_get(4)?),
                        requested_model: Some(Arc::from(r.try_get::<_, &str>(5)?)),
                        served_model: Some(Arc::from(r.try_get::<_, &str>(6)?)),
                        status: 0,
                        error_code: Some(Cow::Borrowed(ORPHANED)),
                        prompt_tokens: count(r.try_get(7)?),
                        completion_tokens: count(r.try_get(8)?),
                        cost: Nanos::new(r.try_get(9)?),
                        usage_estimated: true,
                        ..TraceRow::default()
                    };
                    Ok(((r.try_get::<_, i64>(0)?, r.try_get::<_, i64>(1)?), trace))
                })
                .collect::<Result<Vec<_>>>()?;
            rows.sort_by_key(|(owner_id, _)| *owner_id);
            let charged = rows.len();
            // The sums as one batch (an upsert statement may touch each row once, and
            // several orphans can share a key, month and model); orphans are not "use".
            let mut sums = Batch::default();
            for (_, t) in &rows {
                if let Some(key_id) = &t.key_id {
                    let cost = [
                        t.prompt_tokens as i64,
                        t.completion_tokens as i64,
                        t.cost.get(),
                    ];
                    sums.book(key_id, t.ts, t.served_model.clone(), true, cost);
                }
            }
            let traces: Vec<&TraceRow> = rows.iter().map(|(_, t)| t).collect();
            insert_traces(tx, cache, &traces)?;
            add_sums(tx, cache, &[&sums])?;
            Ok(charged)
        })
    }

    pub fn prune_traces(&mut self, before_ms: i64) -> Result<usize> {
        let n = self.execute(
            "DELETE FROM traces WHERE id < COALESCE(
                (SELECT id FROM traces WHERE ts >= $1 ORDER BY id LIMIT 1),
                (SELECT MAX(id) + 1 FROM traces))",
            &[&before_ms],
        )?;
        Ok(n as usize)
    }
}
