//! The spend ledger in SQLite: batched commits of traces, spend per key/model/month and
//! per day, daily counts, last use, the admission journal and its orphans, and trace reads.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::{params, OptionalExtension, Row};

use super::trace_page::{column, columns, insert_traces, FROM_PAGES, PAGE_ROWS};
use super::Sqlite;
use crate::alerts::AlertRules;
use crate::clock::{day_index, day_label, month_index, month_label, now_ms};
use crate::limits::ModelTally;
use crate::money::Nanos;
use crate::store::ledger::{parse_trace_id, Batch, HandoverRow, ModelSpend, TraceRow, ORPHANED};
use crate::store::Result;

fn add_spend(
    tx: &rusqlite::Transaction<'_>,
    key_id: &str,
    month: i64,
    model: &str,
    [n, p, c, cost]: [i64; 4],
) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO spend (key_id, month, model, requests, prompt_tokens,
            completion_tokens, cost_nanos) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (key_id, month, model) DO UPDATE SET
            requests = requests + excluded.requests,
            -- Saturating, as `Nanos` is: a sum past i64 would turn the column into a REAL.
            prompt_tokens = CASE WHEN excluded.prompt_tokens > 9223372036854775807 - prompt_tokens
                THEN 9223372036854775807 ELSE prompt_tokens + excluded.prompt_tokens END,
            completion_tokens = CASE WHEN excluded.completion_tokens
                    > 9223372036854775807 - completion_tokens
                THEN 9223372036854775807 ELSE completion_tokens + excluded.completion_tokens END,
            cost_nanos = CASE WHEN excluded.cost_nanos > 9223372036854775807 - cost_nanos
                THEN 9223372036854775807 ELSE cost_nanos + excluded.cost_nanos END",
    )?;
    stmt.execute(params![key_id, month_label(month), model, n, p, c, cost])?;
    Ok(())
}

fn add_daily_spend(
    tx: &rusqlite::Transaction<'_>,
    key_id: &str,
    day: i64,
    model: &str,
    n: i64,
    cost: i64,
) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO daily_spend (key_id, day, model, requests, cost_nanos)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (key_id, day, model) DO UPDATE SET
            requests = requests + excluded.requests,
            cost_nanos = CASE WHEN excluded.cost_nanos > 9223372036854775807 - cost_nanos
                THEN 9223372036854775807 ELSE cost_nanos + excluded.cost_nanos END",
    )?;
    stmt.execute(params![key_id, day_label(day), model, n, cost])?;
    Ok(())
}

fn add_daily(tx: &rusqlite::Transaction<'_>, key_id: &str, day: i64, n: i64) -> Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO daily_requests (key_id, day, requests) VALUES (?1, ?2, ?3)
         ON CONFLICT (key_id, day) DO UPDATE SET requests = requests + excluded.requests",
    )?;
    stmt.execute(params![key_id, day_label(day), n])?;
    Ok(())
}

/// The columns [`trace_from_row`] reads.
const TRACE_COLUMNS: &str = "ts, key_id, endpoint, requested_model, served_model, provider, \
     status, error_code, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, cost_nanos, \
     usage_estimated, fallback_from, id, trace_id, unit, units";

/// One key's pages newest first, below id `?2`: its index alone, in order (nothing sorted).
const KEY_PAGES_SQL: &str =
    "SELECT id FROM trace_page WHERE key_id = ?1 AND id < ?2 ORDER BY id DESC";

/// One page's traces below id `?2`, newest first, `?3` of them (at most [`PAGE_ROWS`] to sort).
fn page_traces_sql() -> String {
    format!(
        "SELECT {} FROM {FROM_PAGES} WHERE p.id = ?1 AND p.id + j.key < ?2
         ORDER BY j.key DESC LIMIT ?3",
        columns(TRACE_COLUMNS)
    )
}

/// The newest trace id below `?1`: the last page's, through the primary key.
const NEWEST_TRACE_SQL: &str = "SELECT MIN(id + n - 1, ?1 - 1) FROM trace_page WHERE id < ?1
     ORDER BY id DESC LIMIT 1";

/// Every key's traces with ids in (`?1`, `?3`), the `?2` largest ids: a range of pages
/// through the primary key (a page starts at most [`PAGE_ROWS`] before its traces).
fn window_traces_sql() -> String {
    format!(
        "SELECT {} FROM {FROM_PAGES}
         WHERE p.id < ?3 AND p.id > ?1 - {PAGE_ROWS}
           AND p.id + j.key < ?3 AND p.id + j.key > ?1
         ORDER BY 16 DESC LIMIT ?2",
        columns(TRACE_COLUMNS)
    )
}

/// One page's traces' (end time, cost), newest first.
fn page_charges_sql() -> String {
    format!(
        "SELECT {} + {}, {} FROM {FROM_PAGES} WHERE p.id = ?1 ORDER BY j.key DESC",
        column("ts"),
        column("latency_ms"),
        column("cost_nanos"),
    )
}

/// One page's traces newest first: when each was admitted, and whether it was (a model
/// served it: refusals name none).
fn page_admissions_sql() -> String {
    format!(
        "SELECT {}, {} IS NOT NULL FROM {FROM_PAGES} WHERE p.id = ?1 ORDER BY j.key DESC",
        column("ts"),
        column("served_model"),
    )
}

/// A row of (model, requests, prompt_tokens, completion_tokens, cost_nanos).
pub(super) fn model_spend_from_row(r: &Row<'_>) -> rusqlite::Result<ModelSpend> {
    Ok(ModelSpend {
        model: r.get(0)?,
        requests: r.get::<_, i64>(1)?.max(0) as u64,
        prompt_tokens: r.get::<_, i64>(2)?.max(0) as u64,
        completion_tokens: r.get::<_, i64>(3)?.max(0) as u64,
        cost: Nanos::new(r.get(4)?),
    })
}

fn shared(v: Option<String>) -> Option<Arc<str>> {
    v.map(Arc::from)
}

fn trace_from_row(row: &Row<'_>) -> rusqlite::Result<TraceRow> {
    Ok(TraceRow {
        id: row.get(15)?,
        ts: row.get(0)?,
        key_id: shared(row.get(1)?),
        endpoint: Cow::Owned(row.get(2)?),
        requested_model: shared(row.get(3)?),
        served_model: shared(row.get(4)?),
        provider: shared(row.get(5)?),
        status: row.get(6)?,
        error_code: row.get::<_, Option<String>>(7)?.map(Cow::Owned),
        latency_ms: row.get(8)?,
        ttfb_ms: row.get(9)?,
        prompt_tokens: row.get::<_, i64>(10)? as u64,
        completion_tokens: row.get::<_, i64>(11)? as u64,
        cost: Nanos::new(row.get(12)?),
        usage_estimated: row.get(13)?,
        fallback_from: shared(row.get(14)?),
        trace_id: parse_trace_id(row.get(16)?),
        unit: row.get::<_, Option<String>>(17)?.map(Cow::Owned),
        units: row.get::<_, Option<i64>>(18)?.unwrap_or(0).max(0) as u64,
    })
}

impl Sqlite {
    /// Month-to-date spend per key and model.
    pub fn spend_by_key(&self, month: &str) -> Result<HashMap<String, Vec<ModelTally>>> {
        let mut stmt = self.conn.prepare(
            "SELECT key_id, model, requests, prompt_tokens, completion_tokens, cost_nanos
             FROM spend WHERE month = ?1",
        )?;
        let mut out: HashMap<String, Vec<ModelTally>> = HashMap::new();
        let mut rows = stmt.query([month])?;
        while let Some(r) = rows.next()? {
            out.entry(r.get(0)?).or_default().push(ModelTally {
                model: Arc::from(r.get::<_, String>(1)?),
                requests: r.get::<_, i64>(2)? as u64,
                prompt_tokens: r.get::<_, i64>(3)? as u64,
                completion_tokens: r.get::<_, i64>(4)? as u64,
                spent: Nanos::new(r.get(5)?),
            });
        }
        Ok(out)
    }

    /// Admitted requests per key on one UTC day.
    pub fn requests_by_key(&self, day: &str) -> Result<HashMap<String, u32>> {
        let mut stmt = self
            .conn
            .prepare("SELECT key_id, requests FROM daily_requests WHERE day = ?1")?;
        let rows = stmt.query_map([day], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn spend_for_key(&self, key_id: &str, month: &str) -> Result<Vec<ModelSpend>> {
        let mut stmt = self.conn.prepare(
            "SELECT model, requests, prompt_tokens, completion_tokens, cost_nanos FROM spend
             WHERE key_id = ?1 AND month = ?2 ORDER BY model",
        )?;
        let rows = stmt.query_map(params![key_id, month], model_spend_from_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    pub fn requests_on(&self, key_id: &str, day: &str) -> Result<u32> {
        Ok(self
            .conn
            .query_row(
                "SELECT requests FROM daily_requests WHERE key_id = ?1 AND day = ?2",
                params![key_id, day],
                |r| r.get(0),
            )
            .optional()?
            .unwrap_or(0))
    }

    /// Visits the key's traces at or after `since`, by the time in the first column of
    /// `page_sql` (one page's rows, newest first): walks the key's pages newest first and
    /// stops ten minutes of request time before `since` (rows of one batch can be out of
    /// order by a request's duration), so it reads the recent traces, not the key's history.
    fn each_recent(
        &self,
        key_id: &str,
        since: i64,
        page_sql: &str,
        mut visit: impl FnMut(i64, &Row<'_>) -> rusqlite::Result<()>,
    ) -> Result<()> {
        const SLACK_MS: i64 = 600_000;
        let mut pages = self.conn.prepare_cached(KEY_PAGES_SQL)?;
        let mut traces = self.conn.prepare_cached(page_sql)?;
        let mut ids = pages.query(params![key_id, i64::MAX])?;
        while let Some(page) = ids.next()? {
            let mut rows = traces.query([page.get::<_, i64>(0)?])?;
            while let Some(r) = rows.next()? {
                let at: i64 = r.get(0)?;
                if at < since - SLACK_MS {
                    return Ok(());
                }
                if at >= since {
                    visit(at, r)?;
                }
            }
        }
        Ok(())
    }

    /// The key's charges (unix ms when the request ended, cost) at or after `since`, for the
    /// hour window of `max_usd_per_hour` after a restart: the last hour, not the key's history.
    pub fn recent_charges(&self, key_id: &str, since: i64) -> Result<Vec<(i64, Nanos)>> {
        let mut out = Vec::new();
        self.each_recent(key_id, since, &page_charges_sql(), |at, r| {
            let cost: i64 = r.get(1)?;
            if cost > 0 {
                out.push((at, Nanos::new(cost)));
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// How many model requests the key had admitted at or after `since` (unix ms), from its
    /// traces: the CLI's `requests_this_minute`, which cannot see the running gateway's
    /// counters.
    pub fn admitted_since(&self, key_id: &str, since: i64) -> Result<u32> {
        let mut n = 0;
        self.each_recent(key_id, since, &page_admissions_sql(), |_, r| {
            n += u32::from(r.get::<_, bool>(1)?);
            Ok(())
        })?;
        Ok(n)
    }

    /// The `limit` traces with the largest ids below `before`, for one key (newest first) or
    /// all (in id order; [`Store::traces`] sorts them by time).
    pub fn traces(
        &self,
        key_id: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<TraceRow>> {
        let before = before.unwrap_or(i64::MAX);
        let rows = match key_id {
            Some(key) => {
                // The key's pages newest first; the first `limit` traces end the walk.
                let mut pages = self.conn.prepare_cached(KEY_PAGES_SQL)?;
                let mut traces = self.conn.prepare_cached(&page_traces_sql())?;
                let mut ids = pages.query(params![key, before])?;
                let mut out = Vec::new();
                while out.len() < limit as usize {
                    let Some(page) = ids.next()? else { break };
                    let left = limit as usize - out.len();
                    let rows = traces.query_map(
                        params![page.get::<_, i64>(0)?, before, left as i64],
                        trace_from_row,
                    )?;
                    for row in rows {
                        out.push(row?);
                    }
                }
                Ok(out)
            }
            None => {
                // Larger than any batch, so the window holds every trace newer than its
                // start: the traces with ids in (newest - window, before), sorted by time.
                let window = limit as i64 + 200_000;
                let newest: i64 = self
                    .conn
                    .prepare_cached(NEWEST_TRACE_SQL)?
                    .query_row([before], |r| r.get(0))
                    .optional()?
                    .unwrap_or(0);
                let mut stmt = self.conn.prepare_cached(&window_traces_sql())?;
                let rows =
                    stmt.query_map(params![newest - window, limit, before], trace_from_row)?;
                rows.collect::<rusqlite::Result<_>>()
            }
        };
        Ok(rows?)
    }

    /// Spend per UTC day and model in one month (`YYYY-MM`), for one key or summed over all:
    /// `(day "YYYY-MM-DD", model, cost)`.
    pub fn daily_spend(
        &self,
        month: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<(String, String, Nanos)>> {
        let like = format!("{month}-%");
        let mut stmt = self.conn.prepare_cached(
            "SELECT day, model, SUM(cost_nanos) FROM daily_spend
             WHERE day LIKE ?1 AND (?2 IS NULL OR key_id = ?2)
             GROUP BY day, model ORDER BY day, model",
        )?;
        let rows = stmt.query_map(params![like, key_id], |r| {
            Ok((r.get(0)?, r.get(1)?, Nanos::new(r.get(2)?)))
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Commits one batch atomically: traces, spend, daily counts, last use and the
    /// admission journal. A journaled request's sums are booked only if this commit deletes
    /// its journal row (a row already gone was charged as an orphan). On error nothing is
    /// written and the caller keeps the batch.
    pub fn write_batch(
        &mut self,
        batch: &Batch,
        owner: i64,
        alerts: Option<&AlertRules>,
        handing_over: bool,
    ) -> Result<()> {
        self.write(|tx| {
            // Journal rows first, as in PostgreSQL: whoever deletes a row books it. A process
            // handing over to a new one marks the row settled instead, with what it booked:
            // the new process holds the same admission and follows the row (see `handover`).
            let mut booked = Batch::default();
            if handing_over {
                let mut close = tx.prepare_cached(
                    "UPDATE inflight SET settled = 2 WHERE id = ?1 AND settled = 0",
                )?;
                for id in &batch.journal_closed {
                    close.execute([id])?;
                }
                let mut settle = tx.prepare_cached(
                    "UPDATE inflight SET settled = ?2, served_model = COALESCE(?3, served_model),
                        prompt_tokens = ?4, completion_tokens = ?5, cost_nanos = ?6
                     WHERE id = ?1 AND settled = 0",
                )?;
                for s in &batch.settlements {
                    let (model, [p, c, cost]) = s.charge();
                    let state = if model.is_some() { 1 } else { 2 };
                    if settle.execute(params![s.journal_id, state, model, p, c, cost])? > 0 {
                        booked.book_settled(s);
                    }
                }
            } else {
                let mut delete = tx.prepare_cached("DELETE FROM inflight WHERE id = ?1")?;
                for id in &batch.journal_closed {
                    crate::priority::turn_point();
                    delete.execute([id])?;
                }
                for s in &batch.settlements {
                    crate::priority::turn_point();
                    if delete.execute([s.journal_id])? > 0 {
                        booked.book_settled(s);
                    }
                }
            }
            // One page per key (and per PAGE_ROWS traces), each key's traces in order.
            insert_traces(tx, &batch.traces)?;
            let batch_sums = batch.sums();
            for sums in [&batch_sums, &booked.sums()] {
                for ((key_id, month, model), [n, p, c, cost]) in &sums.spend {
                    add_spend(tx, key_id, *month, model, [*n, *p, *c, *cost])?;
                }
                for ((key_id, day), n) in &sums.daily {
                    add_daily(tx, key_id, *day, *n)?;
                }
                for ((key_id, day, model), [n, cost]) in &sums.daily_spend {
                    add_daily_spend(tx, key_id, *day, model, *n, *cost)?;
                }
            }
            let mut stmt = tx.prepare_cached(
                "INSERT INTO key_last_used (key_id, at) VALUES (?1, ?2)
                 ON CONFLICT (key_id) DO UPDATE SET at = MAX(at, excluded.at)",
            )?;
            for (key_id, at) in &batch_sums.last_used {
                stmt.execute(params![key_id.as_ref(), at])?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT OR REPLACE INTO inflight (id, ts, key_id, endpoint, requested_model,
                    served_model, prompt_tokens, completion_tokens, cost_nanos, owner)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
            )?;
            for j in batch.journal_open.values() {
                stmt.execute(params![
                    j.id,
                    j.ts,
                    j.key_id.as_ref(),
                    j.endpoint,
                    j.requested_model.as_ref(),
                    j.served_model.as_ref(),
                    j.prompt_tokens as i64,
                    j.completion_tokens as i64,
                    j.cost.get(),
                    owner,
                ])?;
            }
            // Last: spend is month-to-date including this batch.
            if let Some(rules) = alerts {
                super::alerts::record_alerts(tx, &[batch, &booked], rules, now_ms())?;
            }
            Ok(())
        })
    }

    /// Charges every admission a crashed process left open (journal rows with no booked
    /// spend, whose owner `is_live` says is gone) at its journaled upper-bound cost: a trace
    /// marked estimated with code `orphaned`, the spend and the day's count. Returns how
    /// many. Run at start-up, before keys are loaded, and periodically: a process handed
    /// over to by `--upgrade` keeps its own rows until it exits.
    pub fn charge_orphans(&mut self, is_live: impl Fn(i64) -> bool) -> Result<usize> {
        self.write(|tx| {
            let orphans: Vec<(TraceRow, i64)> = {
                let mut stmt = tx.prepare(
                    "SELECT ts, key_id, endpoint, requested_model, served_model, prompt_tokens,
                        completion_tokens, cost_nanos, id, owner FROM inflight
                     WHERE settled = 0 ORDER BY id",
                )?;
                let rows = stmt.query_map([], |r| {
                    Ok((
                        TraceRow {
                            ts: r.get(0)?,
                            key_id: Some(Arc::from(r.get::<_, String>(1)?)),
                            endpoint: Cow::Owned(r.get(2)?),
                            requested_model: Some(Arc::from(r.get::<_, String>(3)?)),
                            served_model: Some(Arc::from(r.get::<_, String>(4)?)),
                            status: 0,
                            error_code: Some(Cow::Borrowed(ORPHANED)),
                            prompt_tokens: r.get::<_, i64>(5)? as u64,
                            completion_tokens: r.get::<_, i64>(6)? as u64,
                            cost: Nanos::new(r.get(7)?),
                            usage_estimated: true,
                            ..TraceRow::default()
                        },
                        r.get::<_, i64>(8)?,
                        r.get::<_, i64>(9)?,
                    ))
                })?;
                rows.collect::<rusqlite::Result<Vec<_>>>()?
                    .into_iter()
                    .filter(|(_, _, owner)| !is_live(*owner))
                    .map(|(t, id, _)| (t, id))
                    .collect()
            };
            let traces: Vec<&TraceRow> = orphans.iter().map(|(t, _)| t).collect();
            insert_traces(tx, traces.iter().copied())?;
            for t in &traces {
                let key_id = t.key_id.as_deref().unwrap_or("");
                let model = t.served_model.as_deref().unwrap_or("");
                let sums = [
                    1,
                    t.prompt_tokens as i64,
                    t.completion_tokens as i64,
                    t.cost.get(),
                ];
                add_spend(tx, key_id, month_index(t.ts), model, sums)?;
                add_daily(tx, key_id, day_index(t.ts), 1)?;
                add_daily_spend(tx, key_id, day_index(t.ts), model, 1, t.cost.get())?;
            }
            let mut delete = tx.prepare_cached("DELETE FROM inflight WHERE id = ?1")?;
            for (_, id) in &orphans {
                delete.execute([id])?;
            }
            Ok(orphans.len())
        })
    }

    /// Journal rows of other processes (a predecessor handing over), settled ones included.
    pub fn foreign_journal(&self, own: i64) -> Result<Vec<HandoverRow>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, owner, ts, key_id, served_model, prompt_tokens, completion_tokens,
                cost_nanos, settled FROM inflight WHERE owner != ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map([own], |r| {
            Ok(HandoverRow {
                id: r.get(0)?,
                owner: r.get(1)?,
                ts: r.get(2)?,
                key_id: r.get(3)?,
                served_model: r.get(4)?,
                prompt_tokens: r.get::<_, i64>(5)?.max(0) as u64,
                completion_tokens: r.get::<_, i64>(6)?.max(0) as u64,
                cost: Nanos::new(r.get(7)?),
                settled: r.get(8)?,
            })
        })?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Deletes settled journal rows (their charge is booked in the ledger and, by the
    /// process that followed them, in its live counters).
    pub fn delete_settled(&mut self, ids: &[i64]) -> Result<()> {
        self.write(|tx| {
            let mut delete =
                tx.prepare_cached("DELETE FROM inflight WHERE id = ?1 AND settled != 0")?;
            for id in ids {
                delete.execute([id])?;
            }
            Ok(())
        })
    }

    /// Replaces every saved rolling minute with `owner`'s `rows` (key id or
    /// `*group:<name>`, unix ms of each admission): its windows include what it took over
    /// from a predecessor, whose rows would count twice.
    pub fn save_minutes(&mut self, owner: i64, rows: &[(Arc<str>, i64)]) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM handover_minutes", [])?;
            let mut insert = tx.prepare_cached(
                "INSERT INTO handover_minutes (owner, key_id, at) VALUES (?1, ?2, ?3)",
            )?;
            for (key, at) in rows {
                insert.execute(params![owner, key.as_ref(), at])?;
            }
            Ok(())
        })
    }

    /// Rolling minutes other processes saved when they handed over: (key, unix ms).
    pub fn foreign_minutes(&self, own: i64) -> Result<Vec<(String, i64)>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT key_id, at FROM handover_minutes WHERE owner != ?1 ORDER BY at",
        )?;
        let rows = stmt.query_map([own], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// Rolling minutes saved by processes that are gone (`is_live` false): (key, unix ms).
    pub fn left_minutes(&self, is_live: impl Fn(i64) -> bool) -> Result<Vec<(String, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT owner, key_id, at FROM handover_minutes ORDER BY at")?;
        let rows = stmt.query_map([], |r| {
            Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (owner, key, at) = row?;
            if !is_live(owner) {
                out.push((key, at));
            }
        }
        Ok(out)
    }

    /// Forgets what processes that are gone left for a successor: saved minutes, and
    /// settled journal rows (booked already).
    pub fn forget_handovers(&mut self, is_live: impl Fn(i64) -> bool) -> Result<()> {
        self.write(|tx| {
            let owners: Vec<i64> = {
                let mut stmt = tx.prepare(
                    "SELECT owner FROM handover_minutes UNION
                     SELECT owner FROM inflight WHERE settled != 0",
                )?;
                let rows = stmt.query_map([], |r| r.get(0))?;
                rows.collect::<rusqlite::Result<_>>()?
            };
            for owner in owners.into_iter().filter(|o| !is_live(*o)) {
                tx.execute("DELETE FROM handover_minutes WHERE owner = ?1", [owner])?;
                tx.execute(
                    "DELETE FROM inflight WHERE owner = ?1 AND settled != 0",
                    [owner],
                )?;
            }
            Ok(())
        })
    }

    /// Starts a read transaction: every read until [`Sqlite::end_read`] sees one state of
    /// the file, whatever other processes commit meanwhile (WAL).
    pub fn begin_read(&self) -> Result<()> {
        self.conn.execute_batch("BEGIN DEFERRED")?;
        // The snapshot starts at the first read.
        self.conn
            .query_row("SELECT COUNT(*) FROM meta", [], |r| r.get::<_, i64>(0))?;
        Ok(())
    }

    pub fn end_read(&self) -> Result<()> {
        self.conn.execute_batch("COMMIT")?;
        Ok(())
    }

    /// Deletes traces older than `before_ms`; returns how many. Trace ids grow with time (up to
    /// the key grouping inside one batch), so the cut is the first id, walking from the oldest,
    /// whose trace is recent enough: nothing newer than `before_ms` is ever deleted, and a few
    /// older rows of the last batch before the cut wait for the next prune. No `ts` index is
    /// maintained for this: the walk reads each page's `ts_max`, and only the page holding
    /// the cut is opened (its older traces are cut off its front, so its ids stay).
    pub fn prune_traces(&mut self, before_ms: i64) -> Result<usize> {
        self.write(|tx| {
            let cut: Option<(i64, i64)> = tx
                .query_row(
                    "SELECT id, n FROM trace_page WHERE ts_max >= ?1 ORDER BY id LIMIT 1",
                    [before_ms],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            let Some((page, n)) = cut else {
                let gone: i64 =
                    tx.query_row("SELECT COALESCE(SUM(n), 0) FROM trace_page", [], |r| {
                        r.get(0)
                    })?;
                tx.execute("DELETE FROM trace_page", [])?;
                return Ok(gone as usize);
            };
            let gone: i64 = tx.query_row(
                "SELECT COALESCE(SUM(n), 0) FROM trace_page WHERE id < ?1",
                [page],
                |r| r.get(0),
            )?;
            tx.execute("DELETE FROM trace_page WHERE id < ?1", [page])?;
            // The page holding the cut: its traces before the first recent one go.
            let first: i64 = tx.query_row(
                "SELECT MIN(j.key) FROM trace_page AS p, json_each(p.rows) AS j
                 WHERE p.id = ?1 AND json_extract(j.value, '$[0]') >= ?2",
                params![page, before_ms],
                |r| r.get(0),
            )?;
            if first > 0 {
                tx.execute(
                    "UPDATE trace_page SET id = id + ?2, n = n - ?2,
                        ts_min = (SELECT MIN(json_extract(value, '$[0]')) FROM json_each(rows)
                                  WHERE key >= ?2),
                        rows = (SELECT json_group_array(json(value) ORDER BY key)
                                FROM json_each(rows) WHERE key >= ?2)
                     WHERE id = ?1 AND n = ?3",
                    params![page, first, n],
                )?;
            }
            Ok((gone + first) as usize)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan SQLite chooses for `sql`, one line per step.
    fn plan(s: &Sqlite, sql: &str) -> String {
        let mut stmt = s
            .conn
            .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
            .unwrap();
        let nulls = vec![rusqlite::types::Null; stmt.parameter_count()];
        let rows = stmt
            .query_map(rusqlite::params_from_iter(nulls), |r| r.get::<_, String>(3))
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>()
            .unwrap()
            .join("\n")
    }

    #[test]
    fn trace_reads_seek_pages_by_key_or_id_and_never_scan_the_table() {
        let dir = tempfile::tempdir().unwrap();
        let s = Sqlite::open(&dir.path().join("x.db")).unwrap();
        let pages = plan(&s, KEY_PAGES_SQL);
        // The index alone, in its order: nothing sorted, the walk stops when it has enough.
        assert_eq!(
            pages,
            "SEARCH trace_page USING COVERING INDEX trace_page_key (key_id=? AND id<?)"
        );
        for sql in [page_traces_sql(), page_charges_sql()] {
            let steps = plan(&s, &sql);
            assert!(
                steps.contains("SEARCH p USING INTEGER PRIMARY KEY (rowid=?)"),
                "{steps}"
            );
            assert!(!steps.contains("SCAN p"), "{steps}");
        }
        let window = plan(&s, &window_traces_sql());
        assert!(
            window.contains("SEARCH p USING INTEGER PRIMARY KEY (rowid>? AND rowid<?)"),
            "{window}"
        );
        let newest = plan(&s, NEWEST_TRACE_SQL);
        assert!(
            newest.contains("SEARCH trace_page USING INTEGER PRIMARY KEY (rowid<?)"),
            "{newest}"
        );
    }
}
