//! The ledger's data as both backends store it: trace rows, ledger entries, admission
//! journal rows and the per-commit `Batch` that aggregates them.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::{day_index, month_index, MS_PER_DAY};
use crate::money::Nanos;

/// One finished request, as the ledger writer commits it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceRow {
    /// Row id once stored (0 before); newer traces have larger ids, per key.
    pub id: i64,
    pub ts: i64,
    // Shared and static strings: recording a trace on the request path copies no text.
    pub key_id: Option<Arc<str>>,
    pub endpoint: Cow<'static, str>,
    pub requested_model: Option<Arc<str>>,
    pub served_model: Option<Arc<str>>,
    pub provider: Option<Arc<str>>,
    pub status: u16,
    pub error_code: Option<Cow<'static, str>>,
    pub latency_ms: i64,
    pub ttfb_ms: Option<i64>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
    pub usage_estimated: bool,
    pub fallback_from: Option<Arc<str>>,
    /// The W3C trace this request belonged to (the agent's, or one the gateway started).
    pub trace_id: Option<opentelemetry::trace::TraceId>,
    /// The unit the cost was charged in (SPEC §4): `token`, or a multi-modal model's
    /// `image`, `char` or `ms` (of audio); `None` when nothing was charged.
    pub unit: Option<Cow<'static, str>>,
    /// How many of `unit` were charged (0 for tokens: see the token counts).
    pub units: u64,
}

/// A ledger entry: the trace plus what it counts toward. Spend and the daily count are
/// booked to the month and day of `trace.ts`, the admission time, so a request that ends
/// after midnight counts where it was admitted.
#[derive(Debug, Clone, Default)]
pub struct LedgerEntry {
    pub trace: TraceRow,
    /// Admitted model request: books spend.
    pub admitted: bool,
    /// Counts toward the key's requests per day (model requests and usage calls).
    pub counted: bool,
    /// The admission journal row this entry closes. When the row was written (by an earlier
    /// commit), the entry's spend and daily count are booked only if the row is still there
    /// at commit: a row already gone was charged at its estimate as an orphan.
    pub journal_id: Option<i64>,
    /// Whether the trace row itself is kept (unauthenticated floods are sampled).
    pub keep_trace: bool,
    /// What the writer needs to export this call as an OpenTelemetry span (telemetry on).
    /// Boxed: with telemetry off every entry carries only a null pointer through the channel.
    pub span: Option<Box<crate::telemetry::SpanSeed>>,
}

/// A trace id as stored: 32 lower-case hex digits, as in `traceparent`.
pub(in crate::store) fn trace_id_hex(t: &TraceRow) -> Option<String> {
    t.trace_id.map(|id| id.to_string())
}

/// A stored trace id back; anything unreadable is treated as none.
pub(in crate::store) fn parse_trace_id(v: Option<String>) -> Option<opentelemetry::trace::TraceId> {
    v.and_then(|s| opentelemetry::trace::TraceId::from_hex(&s).ok())
}

/// An admitted request as journaled at admission: what it would cost at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalRow {
    pub id: i64,
    pub ts: i64,
    pub key_id: Arc<str>,
    pub endpoint: &'static str,
    pub requested_model: Arc<str>,
    pub served_model: Arc<str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
}

/// A journal row of another process, as a successor (`serve --upgrade`) reads it: open
/// (`settled` 0: its bound is held), or settled by its owner (1: booked with the charge in
/// the row; 2: closed with nothing booked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoverRow {
    pub id: i64,
    pub owner: i64,
    pub ts: i64,
    pub key_id: String,
    pub served_model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
    pub settled: i64,
}

/// Trace error code of a request charged from the journal after a crash.
pub const ORPHANED: &str = "orphaned";

/// A finished request whose admission was journaled (its row written by an earlier
/// commit): its sums are booked only if that row is still there when the batch commits.
/// If it is gone, another node (or a later start) took it as an orphan and already charged
/// its upper-bound estimate; booking the real cost too would charge the request twice.
#[derive(Debug)]
pub(in crate::store) struct Settlement {
    pub(in crate::store) journal_id: i64,
    key_id: Arc<str>,
    ts: i64,
    /// The model spend is booked to; `None` when the entry books no spend (not admitted).
    model: Option<Arc<str>>,
    counted: bool,
    /// Prompt tokens, completion tokens, cost.
    sums: [i64; 3],
}

/// One commit's worth of ledger work, aggregated as it arrives: spend, daily counts and last
/// use are tallied per key, model and UTC day (bounded by keys x models, not by requests),
/// traces are kept up to a cap. Requests whose admission was journaled are kept apart, one
/// by one (see [`Settlement`]): only those still in the journal at commit are booked. A
/// batch that fails to commit is kept whole and retried.
/// A batch's maps, hashed with foldhash: their keys are the gateway's own key ids and model
/// names, so SipHash's protection against chosen keys buys nothing here (still randomly
/// seeded).
pub(in crate::store) type Sums<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Default)]
pub struct Batch {
    pub(in crate::store) traces: Vec<TraceRow>,
    /// What the batch books, one entry per key, model (none: counted only) and UTC day.
    tally: Vec<Tally>,
    /// Where each (key, model, day) is in `tally`.
    tally_at: Sums<TallyKey, usize>,
    /// The entry of `tally` booked last: a request of the same key and model on the same
    /// day (the common case) adds to it with three comparisons, without hashing a name.
    last: usize,
    pub(in crate::store) journal_open: Sums<i64, JournalRow>,
    /// Journal rows to delete that book nothing (no key, or nothing to count).
    pub(in crate::store) journal_closed: Vec<i64>,
    /// Journaled requests, booked only if their row is still there at commit.
    pub(in crate::store) settlements: Vec<Settlement>,
    /// Trace rows dropped because the batch was at its cap (spend is never dropped).
    pub dropped_traces: u64,
}

/// A key, a model (none: counted only) and a UTC day.
type TallyKey = (Arc<str>, Option<Arc<str>>, i64);

/// The sums of one key on one model (or none) on one UTC day, as a batch tallies them.
#[derive(Debug)]
struct Tally {
    key: Arc<str>,
    model: Option<Arc<str>>,
    day: i64,
    /// Requests, prompt tokens, completion tokens, cost; booked only with a model.
    spend: [i64; 4],
    /// Requests counted toward the day.
    counted: i64,
    /// The latest admission time of a counted request (last use), if any.
    last_used: Option<i64>,
}

/// A batch's sums as the stores write them: spend per (key, month, model), requests per
/// (key, day), spend per (key, day, model), and last use per key.
#[derive(Debug, Default)]
pub(in crate::store) struct BatchSums {
    pub(in crate::store) spend: Sums<(Arc<str>, i64, Arc<str>), [i64; 4]>,
    pub(in crate::store) daily: Sums<(Arc<str>, i64), i64>,
    pub(in crate::store) daily_spend: Sums<(Arc<str>, i64, Arc<str>), [i64; 2]>,
    pub(in crate::store) last_used: Sums<Arc<str>, i64>,
}

/// The model a trace's spend is booked to: the served one, else the requested one.
fn spend_model(t: &TraceRow) -> Arc<str> {
    match (&t.served_model, &t.requested_model) {
        (Some(m), _) => m.clone(),
        (None, Some(m)) => m.clone(),
        (None, None) => Arc::from(""),
    }
}

fn same_model(a: &Option<Arc<str>>, b: &Option<Arc<str>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

impl Settlement {
    /// The model the charge is booked to (none: nothing booked) and its prompt tokens,
    /// completion tokens and cost.
    pub(in crate::store) fn charge(&self) -> (Option<&str>, [i64; 3]) {
        (self.model.as_deref(), self.sums)
    }
}

impl Batch {
    /// Adds one finished request; its trace is moved out (`e` keeps a default one), or
    /// dropped (and counted) past `max_traces`.
    pub fn add(&mut self, e: &mut LedgerEntry, max_traces: usize) {
        let t = &e.trace;
        // Journaled by an earlier commit; an admission still waiting in this batch's
        // `journal_open` was never written, so closing it is free and books as usual.
        let journaled = e
            .journal_id
            .filter(|id| self.journal_open.is_empty() || self.journal_open.remove(id).is_none());
        if let Some(key_id) = t.key_id.as_ref() {
            let sums = [
                t.prompt_tokens as i64,
                t.completion_tokens as i64,
                t.cost.get(),
            ];
            let model = e.admitted.then(|| spend_model(t));
            match journaled {
                Some(id) if e.admitted || e.counted => {
                    self.settlements.push(Settlement {
                        journal_id: id,
                        key_id: key_id.clone(),
                        ts: t.ts,
                        model,
                        counted: e.counted,
                        sums,
                    });
                    // Last use is not a charge: kept whether or not the spend is booked.
                    if e.counted {
                        self.tally_for(key_id, day_index(t.ts), None).used_at(t.ts);
                    }
                }
                Some(id) => self.journal_closed.push(id),
                None => {
                    let tally = self.tally_for(key_id, day_index(t.ts), model);
                    tally.book(e.counted, sums);
                    if e.counted {
                        tally.used_at(t.ts);
                    }
                }
            }
        } else if let Some(id) = journaled {
            self.journal_closed.push(id);
        }
        if e.keep_trace {
            if self.traces.len() < max_traces {
                self.traces.push(std::mem::take(&mut e.trace));
            } else {
                self.dropped_traces += 1;
            }
        }
    }

    /// The tally of `key` on `model` (none: counts only) on `day`, created if new.
    fn tally_for(&mut self, key: &Arc<str>, day: i64, model: Option<Arc<str>>) -> &mut Tally {
        let last = self.last;
        let hit = self.tally.get(last).is_some_and(|t| {
            t.day == day && Arc::ptr_eq(&t.key, key) && same_model(&t.model, &model)
        });
        if !hit {
            let tally = &mut self.tally;
            self.last = *self
                .tally_at
                .entry((key.clone(), model.clone(), day))
                .or_insert_with(|| {
                    tally.push(Tally {
                        key: key.clone(),
                        model,
                        day,
                        spend: [0; 4],
                        counted: 0,
                        last_used: None,
                    });
                    tally.len() - 1
                });
        }
        &mut self.tally[self.last]
    }

    /// Adds one request's sums: spend to `model` (if any) for the month and day of `ts`,
    /// and one to the day's count if `counted`. Last use is not touched.
    pub(in crate::store) fn book(
        &mut self,
        key_id: &Arc<str>,
        ts: i64,
        model: Option<Arc<str>>,
        counted: bool,
        sums: [i64; 3],
    ) {
        self.tally_for(key_id, day_index(ts), model)
            .book(counted, sums);
    }

    /// Books a settlement whose journal row this commit deleted.
    pub(in crate::store) fn book_settled(&mut self, s: &Settlement) {
        self.book(&s.key_id, s.ts, s.model.clone(), s.counted, s.sums);
    }

    /// The batch's sums, per row of the ledger's tables (built at commit, from the
    /// tallies).
    pub(in crate::store) fn sums(&self) -> BatchSums {
        let mut out = BatchSums::default();
        for t in &self.tally {
            if let (Some(model), [n, p, c, cost]) = (&t.model, t.spend) {
                if n > 0 {
                    let row = out
                        .spend
                        .entry((
                            t.key.clone(),
                            month_index(t.day * MS_PER_DAY),
                            model.clone(),
                        ))
                        .or_default();
                    for (sum, v) in row.iter_mut().zip([n, p, c, cost]) {
                        *sum = sum.saturating_add(v);
                    }
                    let day = out
                        .daily_spend
                        .entry((t.key.clone(), t.day, model.clone()))
                        .or_default();
                    day[0] += n;
                    day[1] = day[1].saturating_add(cost);
                }
            }
            if t.counted > 0 {
                *out.daily.entry((t.key.clone(), t.day)).or_default() += t.counted;
            }
            if let Some(at) = t.last_used {
                let last = out.last_used.entry(t.key.clone()).or_insert(at);
                *last = (*last).max(at);
            }
        }
        out
    }

    /// (key, month) of every spend the batch books.
    pub(in crate::store) fn spend_months(&self) -> impl Iterator<Item = (&Arc<str>, i64)> {
        self.tally
            .iter()
            .filter(|t| t.model.is_some() && t.spend[0] > 0)
            .map(|t| (&t.key, month_index(t.day * MS_PER_DAY)))
    }

    /// Empties the batch after its commit, keeping the room its traces and tallies took
    /// (growing a vector of traces to a batch's size again cost as much as encoding them).
    /// Room far beyond what the batch used is given back.
    pub fn clear(&mut self) {
        const KEEP: usize = 4096;
        let used = self.traces.len();
        // One at a time, with the writer's yield points: thousands of rows' strings. Each
        // is dropped where it lies (a drain would first copy its ~270 bytes out).
        while let Some(last) = self.traces.len().checked_sub(1) {
            crate::priority::turn_point();
            self.traces.truncate(last);
        }
        if self.traces.capacity() > KEEP.max(4 * used) {
            self.traces.shrink_to(KEEP.max(used));
        }
        self.tally.clear();
        self.tally_at.clear();
        self.last = 0;
        self.journal_open.clear();
        self.journal_closed.clear();
        self.settlements.clear();
        self.dropped_traces = 0;
    }

    /// Journals an admission still open at commit time.
    pub fn open(&mut self, row: JournalRow) {
        self.journal_open.insert(row.id, row);
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
            && self.tally.is_empty()
            && self.journal_open.is_empty()
            && self.journal_closed.is_empty()
            && self.settlements.is_empty()
    }

    pub fn trace_count(&self) -> usize {
        self.traces.len()
    }

    /// Builds a batch from entries (tests and benchmarks).
    pub fn of(entries: impl IntoIterator<Item = LedgerEntry>) -> Batch {
        let mut b = Batch::default();
        for mut e in entries {
            b.add(&mut e, usize::MAX);
        }
        b
    }
}

impl Tally {
    fn book(&mut self, counted: bool, [prompt, completion, cost]: [i64; 3]) {
        if self.model.is_some() {
            let s = &mut self.spend;
            s[0] += 1;
            s[1] = s[1].saturating_add(prompt);
            s[2] = s[2].saturating_add(completion);
            s[3] = s[3].saturating_add(cost);
        }
        if counted {
            self.counted += 1;
        }
    }

    fn used_at(&mut self, ts: i64) {
        self.last_used = Some(self.last_used.map_or(ts, |at| at.max(ts)));
    }
}

/// Spend of one key on one model in one month.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSpend {
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
}
