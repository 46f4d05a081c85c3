//! Every SQLite call: schema, keys, the spend ledger, daily counts and traces.
//!
//! One file shared by the server, the CLI and the admin API: WAL so readers never block the
//! writer, a busy timeout so concurrent writers queue, `BEGIN IMMEDIATE` for every write, and
//! only parameterised SQL.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

use crate::clock::{day_index, day_label, month_index, month_label};
use crate::keys::token::TokenHash;
use crate::keys::{BudgetMode, KeyRecord};
use crate::limits::ModelTally;
use crate::money::Nanos;

pub use rusqlite::Error as StoreError;
pub type Result<T> = std::result::Result<T, StoreError>;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (k, v) VALUES ('schema_version', 1), ('keys_version', 0);

CREATE TABLE IF NOT EXISTS keys (
    id             TEXT PRIMARY KEY,
    token_hash     BLOB NOT NULL UNIQUE,
    prefix         TEXT NOT NULL,
    name           TEXT NOT NULL,
    scopes         TEXT NOT NULL,
    rpm            INTEGER,
    rpd            INTEGER,
    budget_nanos   INTEGER,
    budget_mode    TEXT NOT NULL,
    allowed_models TEXT NOT NULL,
    free_only      INTEGER NOT NULL,
    client_id      TEXT,
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    revoked_at     INTEGER
);
-- Any change to a key bumps keys_version; the server polls it to hot-reload.
CREATE TRIGGER IF NOT EXISTS keys_ai AFTER INSERT ON keys
    BEGIN UPDATE meta SET v = v + 1 WHERE k = 'keys_version'; END;
CREATE TRIGGER IF NOT EXISTS keys_au AFTER UPDATE ON keys
    BEGIN UPDATE meta SET v = v + 1 WHERE k = 'keys_version'; END;
CREATE TRIGGER IF NOT EXISTS keys_ad AFTER DELETE ON keys
    BEGIN UPDATE meta SET v = v + 1 WHERE k = 'keys_version'; END;

-- Kept apart from keys so recording use never triggers a reload.
CREATE TABLE IF NOT EXISTS key_last_used (key_id TEXT PRIMARY KEY, at INTEGER NOT NULL);

CREATE TABLE IF NOT EXISTS spend (
    key_id            TEXT NOT NULL,
    month             TEXT NOT NULL,
    model             TEXT NOT NULL,
    requests          INTEGER NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_nanos        INTEGER NOT NULL,
    PRIMARY KEY (key_id, month, model)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS daily_requests (
    key_id   TEXT NOT NULL,
    day      TEXT NOT NULL,
    requests INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS traces (
    id                INTEGER PRIMARY KEY,
    ts                INTEGER NOT NULL,
    key_id            TEXT,
    endpoint          TEXT NOT NULL,
    requested_model   TEXT,
    served_model      TEXT,
    provider          TEXT,
    status            INTEGER NOT NULL,
    error_code        TEXT,
    latency_ms        INTEGER NOT NULL,
    ttfb_ms           INTEGER,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_nanos        INTEGER NOT NULL,
    usage_estimated   INTEGER NOT NULL,
    fallback_from     TEXT
);
CREATE INDEX IF NOT EXISTS traces_key ON traces (key_id, id);

-- Spend per key, model and UTC day, for the dashboard's daily chart.
CREATE TABLE IF NOT EXISTS daily_spend (
    key_id     TEXT NOT NULL,
    day        TEXT NOT NULL,
    model      TEXT NOT NULL,
    requests   INTEGER NOT NULL,
    cost_nanos INTEGER NOT NULL,
    PRIMARY KEY (key_id, day, model)
) WITHOUT ROWID;

-- Admissions still open at a commit (the admission journal): a request that outlives one
-- flush interval is written here, and deleted when its spend is booked. Rows left after a
-- crash are orphans, charged at their upper-bound cost when the gateway starts again.
CREATE TABLE IF NOT EXISTS inflight (
    id                INTEGER PRIMARY KEY,
    ts                INTEGER NOT NULL,
    key_id            TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    requested_model   TEXT NOT NULL,
    served_model      TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_nanos        INTEGER NOT NULL
);
"#;

/// Columns added after the first release, applied to older databases at open.
const MIGRATIONS: [(&str, &str, &str); 5] = [
    // The process (pid) that journaled an admission: a live one still owns it.
    ("inflight", "owner", "INTEGER NOT NULL DEFAULT 0"),
    ("keys", "max_inflight", "INTEGER"),
    // Rotation: the secret before the last rotation keeps working until `prev_valid_until`.
    ("keys", "prev_token_hash", "BLOB"),
    ("keys", "prev_valid_until", "INTEGER"),
    ("keys", "rotated_at", "INTEGER"),
];

/// Rows per multi-row trace insert (15 parameters each; SQLite allows 32,766).
const TRACE_ROWS_PER_INSERT: usize = 64;
const TRACE_COLUMNS: &str = "ts, key_id, endpoint, requested_model, served_model, provider, \
     status, error_code, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, cost_nanos, \
     usage_estimated, fallback_from";

fn trace_insert_sql(rows: usize) -> String {
    let mut sql = format!("INSERT INTO traces ({TRACE_COLUMNS}) VALUES ");
    for r in 0..rows {
        if r > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..15 {
            if c > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("?{}", r * 15 + c + 1));
        }
        sql.push(')');
    }
    sql
}

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
            prompt_tokens = prompt_tokens + excluded.prompt_tokens,
            completion_tokens = completion_tokens + excluded.completion_tokens,
            cost_nanos = cost_nanos + excluded.cost_nanos",
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
            cost_nanos = cost_nanos + excluded.cost_nanos",
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

/// Inserts every trace of a batch, `TRACE_ROWS_PER_INSERT` rows per statement.
fn insert_traces(tx: &rusqlite::Transaction<'_>, batch: &[&TraceRow]) -> Result<()> {
    static FULL: once_cell::sync::Lazy<String> =
        once_cell::sync::Lazy::new(|| trace_insert_sql(TRACE_ROWS_PER_INSERT));
    for chunk in batch.chunks(TRACE_ROWS_PER_INSERT) {
        let mut stmt = if chunk.len() == TRACE_ROWS_PER_INSERT {
            tx.prepare_cached(&FULL)?
        } else {
            tx.prepare_cached(&trace_insert_sql(chunk.len()))?
        };
        for (r, t) in chunk.iter().enumerate() {
            let at = r * 15;
            stmt.raw_bind_parameter(at + 1, t.ts)?;
            stmt.raw_bind_parameter(at + 2, t.key_id.as_deref())?;
            stmt.raw_bind_parameter(at + 3, t.endpoint.as_ref())?;
            stmt.raw_bind_parameter(at + 4, t.requested_model.as_deref())?;
            stmt.raw_bind_parameter(at + 5, t.served_model.as_deref())?;
            stmt.raw_bind_parameter(at + 6, t.provider.as_deref())?;
            stmt.raw_bind_parameter(at + 7, t.status)?;
            stmt.raw_bind_parameter(at + 8, t.error_code.as_deref())?;
            stmt.raw_bind_parameter(at + 9, t.latency_ms)?;
            stmt.raw_bind_parameter(at + 10, t.ttfb_ms)?;
            stmt.raw_bind_parameter(at + 11, t.prompt_tokens as i64)?;
            stmt.raw_bind_parameter(at + 12, t.completion_tokens as i64)?;
            stmt.raw_bind_parameter(at + 13, t.cost.get())?;
            stmt.raw_bind_parameter(at + 14, t.usage_estimated)?;
            stmt.raw_bind_parameter(at + 15, t.fallback_from.as_deref())?;
        }
        stmt.raw_execute()?;
    }
    Ok(())
}

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
    /// The admission journal row this entry closes.
    pub journal_id: Option<i64>,
    /// Whether the trace row itself is kept (unauthenticated floods are sampled).
    pub keep_trace: bool,
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

/// Trace error code of a request charged from the journal after a crash.
pub const ORPHANED: &str = "orphaned";

/// One commit's worth of ledger work, aggregated as it arrives: spend, daily counts and last
/// use are summed per key (bounded by keys x models, not by requests), traces are kept up
/// to a cap. A batch that fails to commit is kept whole and retried.
#[derive(Debug, Default)]
pub struct Batch {
    traces: Vec<TraceRow>,
    spend: HashMap<(Arc<str>, i64, Arc<str>), [i64; 4]>,
    daily: HashMap<(Arc<str>, i64), i64>,
    daily_spend: HashMap<(Arc<str>, i64, Arc<str>), [i64; 2]>,
    last_used: HashMap<Arc<str>, i64>,
    journal_open: HashMap<i64, JournalRow>,
    journal_closed: Vec<i64>,
    /// Trace rows dropped because the batch was at its cap (spend is never dropped).
    pub dropped_traces: u64,
}

impl Batch {
    /// Adds one finished request; its trace is dropped (and counted) past `max_traces`.
    pub fn add(&mut self, e: LedgerEntry, max_traces: usize) {
        let t = &e.trace;
        if let Some(key_id) = t.key_id.as_ref() {
            if e.admitted {
                let model: Arc<str> = match (&t.served_model, &t.requested_model) {
                    (Some(m), _) => m.clone(),
                    (None, Some(m)) => m.clone(),
                    (None, None) => Arc::from(""),
                };
                let day = self
                    .daily_spend
                    .entry((key_id.clone(), day_index(t.ts), model.clone()))
                    .or_default();
                day[0] += 1;
                day[1] = day[1].saturating_add(t.cost.get());
                let row = self
                    .spend
                    .entry((key_id.clone(), month_index(t.ts), model))
                    .or_default();
                row[0] += 1;
                row[1] = row[1].saturating_add(t.prompt_tokens as i64);
                row[2] = row[2].saturating_add(t.completion_tokens as i64);
                row[3] = row[3].saturating_add(t.cost.get());
            }
            if e.counted {
                *self
                    .daily
                    .entry((key_id.clone(), day_index(t.ts)))
                    .or_default() += 1;
                let at = self.last_used.entry(key_id.clone()).or_insert(t.ts);
                *at = (*at).max(t.ts);
            }
        }
        if let Some(id) = e.journal_id {
            if self.journal_open.remove(&id).is_none() {
                self.journal_closed.push(id);
            }
        }
        if e.keep_trace {
            if self.traces.len() < max_traces {
                self.traces.push(e.trace);
            } else {
                self.dropped_traces += 1;
            }
        }
    }

    /// Journals an admission still open at commit time.
    pub fn open(&mut self, row: JournalRow) {
        self.journal_open.insert(row.id, row);
    }

    /// Whether an entry closing journal row `id` would find it still in this batch.
    pub fn close_if_open(&mut self, id: i64) -> bool {
        self.journal_open.remove(&id).is_some()
    }

    pub fn is_empty(&self) -> bool {
        self.traces.is_empty()
            && self.spend.is_empty()
            && self.daily.is_empty()
            && self.journal_open.is_empty()
            && self.journal_closed.is_empty()
    }

    pub fn trace_count(&self) -> usize {
        self.traces.len()
    }

    /// Builds a batch from entries (tests and benchmarks).
    pub fn of(entries: impl IntoIterator<Item = LedgerEntry>) -> Batch {
        let mut b = Batch::default();
        for e in entries {
            b.add(e, usize::MAX);
        }
        b
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

/// Fields `keys update` may change; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<String>,
    pub scopes: Option<Vec<String>>,
    pub rpm: Option<Option<u32>>,
    pub rpd: Option<Option<u32>>,
    pub budget: Option<Option<Nanos>>,
    pub budget_mode: Option<BudgetMode>,
    pub max_inflight: Option<Option<u32>>,
    pub allowed_models: Option<Vec<String>>,
    pub free_only: Option<bool>,
    pub client_id: Option<Option<String>>,
    pub expires_at: Option<i64>,
}

impl KeyPatch {
    /// Sets every field the patch names.
    pub fn apply(&self, k: &mut KeyRecord) {
        if let Some(v) = &self.name {
            k.name = v.clone();
        }
        if let Some(v) = &self.scopes {
            k.scopes = v.clone();
        }
        if let Some(v) = self.rpm {
            k.rpm = v;
        }
        if let Some(v) = self.rpd {
            k.rpd = v;
        }
        if let Some(v) = self.budget {
            k.budget = v;
        }
        if let Some(v) = self.budget_mode {
            k.budget_mode = v;
        }
        if let Some(v) = self.max_inflight {
            k.max_inflight = v;
        }
        if let Some(v) = &self.allowed_models {
            k.allowed_models = v.clone();
        }
        if let Some(v) = self.free_only {
            k.free_only = v;
        }
        if let Some(v) = &self.client_id {
            k.client_id = v.clone();
        }
        if let Some(v) = self.expires_at {
            k.expires_at = v;
        }
    }
}

pub struct Store {
    conn: Connection,
}

/// Lists are stored as JSON arrays, so an entry may hold any character (a scope with a
/// comma stays one scope).
fn join(list: &[String]) -> String {
    serde_json::to_string(list).unwrap_or_else(|_| "[]".into())
}

/// Reads a stored list: a JSON array, or the comma-joined form of databases written before
/// lists were stored as JSON.
fn split(s: &str) -> Vec<String> {
    if s.starts_with('[') {
        if let Ok(list) = serde_json::from_str(s) {
            return list;
        }
    }
    crate::keys::split_list(s)
}

const KEY_COLUMNS: &str = "k.id, k.token_hash, k.prefix, k.name, k.scopes, k.rpm, k.rpd, \
     k.budget_nanos, k.budget_mode, k.allowed_models, k.free_only, k.client_id, k.created_at, \
     k.expires_at, k.revoked_at, u.at, k.max_inflight, k.prev_token_hash, k.prev_valid_until, \
     k.rotated_at";

fn key_from_row(row: &Row<'_>) -> rusqlite::Result<KeyRecord> {
    let hash: Vec<u8> = row.get(1)?;
    let mut token_hash = [0u8; 32];
    if hash.len() == 32 {
        token_hash.copy_from_slice(&hash);
    }
    let mode: String = row.get(8)?;
    Ok(KeyRecord {
        id: row.get(0)?,
        token_hash,
        prefix: row.get(2)?,
        name: row.get(3)?,
        scopes: split(&row.get::<_, String>(4)?),
        rpm: row.get(5)?,
        rpd: row.get(6)?,
        budget: row.get::<_, Option<i64>>(7)?.map(Nanos::new),
        budget_mode: BudgetMode::parse(&mode).unwrap_or(BudgetMode::Soft),
        max_inflight: row.get(16)?,
        previous_hash: row
            .get::<_, Option<Vec<u8>>>(17)?
            .and_then(|h| h.try_into().ok()),
        previous_valid_until: row.get(18)?,
        rotated_at: row.get(19)?,
        allowed_models: split(&row.get::<_, String>(9)?),
        free_only: row.get(10)?,
        client_id: row.get(11)?,
        created_at: row.get(12)?,
        expires_at: row.get(13)?,
        revoked_at: row.get(14)?,
        last_used_at: row.get(15)?,
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
    })
}

impl Store {
    /// Opens (creating if needed) the database and applies the schema.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = Connection::open(path)?;
        conn.busy_timeout(Duration::from_secs(10))?;
        // Only takes effect when the file is created: fewer, larger pages for the append-heavy
        // trace table (set before WAL, which fixes the page size).
        conn.pragma_update(None, "page_size", 16_384)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: every batch commit is durable; batches are few, so this costs little.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The ledger appends to large B-trees: keep their hot pages in memory instead of
        // re-reading them with a syscall per page (64 MiB cache, 256 MiB memory map).
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "mmap_size", 268_435_456)?;
        let mut store = Store { conn };
        store.write(|tx| {
            tx.execute_batch(SCHEMA)?;
            for (table, column, kind) in MIGRATIONS {
                let exists: bool = tx.query_row(
                    "SELECT COUNT(*) > 0 FROM pragma_table_info(?1) WHERE name = ?2",
                    params![table, column],
                    |r| r.get(0),
                )?;
                if !exists {
                    tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {kind}"))?;
                }
            }
            Ok(())
        })?;
        Ok(store)
    }

    /// Runs `f` in a `BEGIN IMMEDIATE` transaction (takes the write lock up front, so the
    /// busy timeout applies instead of a mid-transaction SQLITE_BUSY).
    fn write<T>(&mut self, f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T>) -> Result<T> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    pub fn keys_version(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT v FROM meta WHERE k = 'keys_version'", [], |r| {
                r.get(0)
            })
    }

    pub fn insert_key(&mut self, k: &KeyRecord) -> Result<()> {
        self.insert_keys(std::slice::from_ref(k))
    }

    /// Inserts many keys in one transaction (bulk provisioning, benchmarks).
    pub fn insert_keys(&mut self, keys: &[KeyRecord]) -> Result<()> {
        self.write(|tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT INTO keys (id, token_hash, prefix, name, scopes, rpm, rpd, budget_nanos,
                    budget_mode, allowed_models, free_only, client_id, created_at, expires_at,
                    revoked_at, max_inflight)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )?;
            for k in keys {
                stmt.execute(params![
                    k.id,
                    &k.token_hash[..],
                    k.prefix,
                    k.name,
                    join(&k.scopes),
                    k.rpm,
                    k.rpd,
                    k.budget.map(Nanos::get),
                    k.budget_mode.as_str(),
                    join(&k.allowed_models),
                    k.free_only,
                    k.client_id,
                    k.created_at,
                    k.expires_at,
                    k.revoked_at,
                    k.max_inflight,
                ])?;
            }
            Ok(())
        })
    }

    pub fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             ORDER BY k.created_at, k.id"
        );
        let mut stmt = self.conn.prepare(&sql)?;
        let rows = stmt.query_map([], key_from_row)?;
        rows.collect()
    }

    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
             WHERE k.id = ?1"
        );
        self.conn.query_row(&sql, [id], key_from_row).optional()
    }

    /// Applies a patch; returns the updated key, or `None` if no such key. The read and the
    /// write share one `BEGIN IMMEDIATE` transaction, so concurrent patches of different
    /// fields (CLI and admin API at once) never overwrite each other.
    pub fn update_key(&mut self, id: &str, p: &KeyPatch) -> Result<Option<KeyRecord>> {
        self.write(|tx| {
            let sql = format!(
                "SELECT {KEY_COLUMNS} FROM keys k LEFT JOIN key_last_used u ON u.key_id = k.id
                 WHERE k.id = ?1"
            );
            let Some(mut k) = tx.query_row(&sql, [id], key_from_row).optional()? else {
                return Ok(None);
            };
            p.apply(&mut k);
            tx.execute(
                "UPDATE keys SET name = ?2, scopes = ?3, rpm = ?4, rpd = ?5, budget_nanos = ?6,
                    budget_mode = ?7, allowed_models = ?8, free_only = ?9, client_id = ?10,
                    expires_at = ?11, max_inflight = ?12
                 WHERE id = ?1",
                params![
                    id,
                    k.name,
                    join(&k.scopes),
                    k.rpm,
                    k.rpd,
                    k.budget.map(Nanos::get),
                    k.budget_mode.as_str(),
                    join(&k.allowed_models),
                    k.free_only,
                    k.client_id,
                    k.expires_at,
                    k.max_inflight,
                ],
            )?;
            Ok(Some(k))
        })
    }

    /// Gives a key a new secret (its hash and display prefix); the previous secret keeps
    /// working until `previous_valid_until`. Returns the updated key, or `None` if no such
    /// key. A revoked key cannot be rotated back to life (`Ok(None)` is not returned for it;
    /// the caller checks the status first).
    pub fn rotate_key(
        &mut self,
        id: &str,
        new_hash: &TokenHash,
        new_prefix: &str,
        previous_valid_until: i64,
        now: i64,
    ) -> Result<Option<KeyRecord>> {
        let changed = self.write(|tx| {
            tx.execute(
                "UPDATE keys SET prev_token_hash = token_hash, prev_valid_until = ?4,
                    token_hash = ?2, prefix = ?3, rotated_at = ?5
                 WHERE id = ?1",
                params![id, &new_hash[..], new_prefix, previous_valid_until, now],
            )
        })?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }

    /// Revokes a key (idempotent: the first revocation time is kept).
    pub fn revoke_key(&mut self, id: &str, now: i64) -> Result<Option<KeyRecord>> {
        let changed = self.write(|tx| {
            tx.execute(
                "UPDATE keys SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
                params![id, now],
            )
        })?;
        if changed == 0 {
            return Ok(None);
        }
        self.get_key(id)
    }

    /// Month-to-date spend per key, in nano-dollars.
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
        rows.collect()
    }

    pub fn spend_for_key(&self, key_id: &str, month: &str) -> Result<Vec<ModelSpend>> {
        let mut stmt = self.conn.prepare(
            "SELECT model, requests, prompt_tokens, completion_tokens, cost_nanos FROM spend
             WHERE key_id = ?1 AND month = ?2 ORDER BY model",
        )?;
        let rows = stmt.query_map(params![key_id, month], |r| {
            Ok(ModelSpend {
                model: r.get(0)?,
                requests: r.get::<_, i64>(1)? as u64,
                prompt_tokens: r.get::<_, i64>(2)? as u64,
                completion_tokens: r.get::<_, i64>(3)? as u64,
                cost: Nanos::new(r.get(4)?),
            })
        })?;
        rows.collect()
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

    /// Newest traces first, for one key or all; `before` pages back (traces with a smaller
    /// id). Within a committed batch rows are grouped by key (see `write_batch`), so the
    /// all-keys view sorts a recent window by time; one key's rows are always in order.
    pub fn traces(
        &self,
        key_id: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<TraceRow>> {
        const COLUMNS: &str = "ts, key_id, endpoint, requested_model, served_model, provider, \
             status, error_code, latency_ms, ttfb_ms, prompt_tokens, completion_tokens, \
             cost_nanos, usage_estimated, fallback_from, id";
        let before = before.unwrap_or(i64::MAX);
        let rows = match key_id {
            Some(key) => {
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM traces WHERE key_id = ?1 AND id < ?3
                     ORDER BY id DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![key, limit, before], trace_from_row)?;
                rows.collect()
            }
            None => {
                // Larger than any batch, so the window holds every row newer than its start.
                let window = limit as i64 + 200_000;
                let mut stmt = self.conn.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM traces
                     WHERE id < ?3 AND id > (SELECT COALESCE(MAX(id), 0) FROM traces
                                             WHERE id < ?3) - ?1
                     ORDER BY ts DESC, id DESC LIMIT ?2"
                ))?;
                let rows = stmt.query_map(params![window, limit, before], trace_from_row)?;
                rows.collect()
            }
        };
        rows
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
        rows.collect()
    }

    /// Commits one batch atomically: traces, spend, daily counts, last use and the
    /// admission journal. On error nothing is written and the caller keeps the batch.
    pub fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        self.write(|tx| {
            // Grouped by key (stable, so each key's traces keep their order): the per-key
            // index then takes one run of appends per key instead of a random insert per row,
            // which makes the batch about 3x cheaper with many active keys.
            let mut by_key: Vec<&TraceRow> = batch.traces.iter().collect();
            by_key.sort_by(|a, b| a.key_id.cmp(&b.key_id));
            insert_traces(tx, &by_key)?;
            for ((key_id, month, model), [n, p, c, cost]) in &batch.spend {
                add_spend(tx, key_id, *month, model, [*n, *p, *c, *cost])?;
            }
            for ((key_id, day), n) in &batch.daily {
                add_daily(tx, key_id, *day, *n)?;
            }
            for ((key_id, day, model), [n, cost]) in &batch.daily_spend {
                add_daily_spend(tx, key_id, *day, model, *n, *cost)?;
            }
            let mut stmt = tx.prepare_cached(
                "INSERT INTO key_last_used (key_id, at) VALUES (?1, ?2)
                 ON CONFLICT (key_id) DO UPDATE SET at = MAX(at, excluded.at)",
            )?;
            for (key_id, at) in &batch.last_used {
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
                    std::process::id(),
                ])?;
            }
            let mut stmt = tx.prepare_cached("DELETE FROM inflight WHERE id = ?1")?;
            for id in &batch.journal_closed {
                stmt.execute([id])?;
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
                        completion_tokens, cost_nanos, id, owner FROM inflight ORDER BY id",
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
                rows.collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .filter(|(_, _, owner)| !is_live(*owner))
                    .map(|(t, id, _)| (t, id))
                    .collect()
            };
            let traces: Vec<&TraceRow> = orphans.iter().map(|(t, _)| t).collect();
            insert_traces(tx, &traces)?;
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

    /// Deletes traces older than `before_ms`; returns how many. Trace ids grow with time (up to
    /// the key grouping inside one batch), so the cut is the first id, walking from the oldest,
    /// whose trace is recent enough: nothing newer than `before_ms` is ever deleted, and a few
    /// older rows of the last batch before the cut wait for the next prune. No `ts` index is
    /// maintained for this.
    pub fn prune_traces(&mut self, before_ms: i64) -> Result<usize> {
        self.write(|tx| {
            tx.execute(
                "DELETE FROM traces WHERE id < COALESCE(
                    (SELECT id FROM traces WHERE ts >= ?1 ORDER BY id LIMIT 1),
                    (SELECT MAX(id) + 1 FROM traces))",
                [before_ms],
            )
        })
    }

    pub fn integrity_check(&self) -> Result<String> {
        self.conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::token;

    fn record(id: &str) -> KeyRecord {
        let t = token::mint().unwrap();
        KeyRecord {
            id: id.into(),
            name: "agent".into(),
            prefix: t.prefix,
            token_hash: t.hash,
            scopes: vec!["gate:chat".into(), "job:*".into()],
            rpm: Some(3),
            rpd: None,
            budget: Some(Nanos::new(5_000_000_000)),
            budget_mode: BudgetMode::Hard,
            max_inflight: Some(4),
            previous_hash: None,
            previous_valid_until: None,
            rotated_at: None,
            allowed_models: vec!["a".into(), "b".into()],
            free_only: false,
            client_id: None,
            created_at: 1,
            expires_at: 2,
            revoked_at: None,
            last_used_at: None,
        }
    }

    #[test]
    fn keys_round_trip_and_bump_the_version() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("db/x.db")).unwrap();
        let v0 = s.keys_version().unwrap();
        s.insert_key(&record("key_a")).unwrap();
        assert!(s.keys_version().unwrap() > v0);
        let k = s.get_key("key_a").unwrap().unwrap();
        assert_eq!(k.scopes, vec!["gate:chat", "job:*"]);
        assert_eq!(k.budget_mode, BudgetMode::Hard);
        let patch = KeyPatch {
            rpm: Some(None),
            free_only: Some(true),
            ..KeyPatch::default()
        };
        let k = s.update_key("key_a", &patch).unwrap().unwrap();
        assert_eq!((k.rpm, k.free_only), (None, true));
        let v1 = s.keys_version().unwrap();
        let k = s.revoke_key("key_a", 77).unwrap().unwrap();
        assert_eq!(k.revoked_at, Some(77));
        assert!(s.keys_version().unwrap() > v1);
        assert!(s.revoke_key("key_nope", 1).unwrap().is_none());
    }

    #[test]
    fn batches_aggregate_spend_and_daily_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let entry = |cost, admitted| LedgerEntry {
            trace: TraceRow {
                ts: crate::clock::days_from_civil(2026, 11, 26) * crate::clock::MS_PER_DAY + 5,
                key_id: Some("key_a".into()),
                endpoint: "chat".into(),
                served_model: Some("m".into()),
                status: 200,
                prompt_tokens: 10,
                completion_tokens: 5,
                cost: Nanos::new(cost),
                ..TraceRow::default()
            },
            admitted,
            counted: admitted,
            keep_trace: true,
            journal_id: None,
        };
        let batch = Batch::of([entry(100, true), entry(250, true), entry(0, false)]);
        s.write_batch(&batch).unwrap();
        let spend = &s.spend_by_key("2026-11").unwrap()["key_a"];
        assert_eq!(spend[0].spent, Nanos::new(350));
        assert_eq!(s.requests_by_key("2026-11-26").unwrap()["key_a"], 2);
        let rows = s.spend_for_key("key_a", "2026-11").unwrap();
        assert_eq!(rows[0].requests, 2);
        assert_eq!(rows[0].prompt_tokens, 20);
        assert_eq!(s.traces(Some("key_a"), 10, None).unwrap().len(), 3);
        assert_eq!(s.traces(None, 1, None).unwrap().len(), 1);
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn large_batches_are_chunked_and_old_traces_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let entry = |i: i64, key: String| LedgerEntry {
            trace: TraceRow {
                ts: 1_000 + i,
                key_id: Some(key.into()),
                endpoint: "chat".into(),
                served_model: Some("m".into()),
                status: 200,
                cost: Nanos::new(10),
                ..TraceRow::default()
            },
            admitted: true,
            counted: true,
            keep_trace: true,
            journal_id: None,
        };
        // One key: ids follow time exactly.
        let batch = Batch::of((0..150).map(|i| entry(i, "key_a".into())));
        s.write_batch(&batch).unwrap();
        assert_eq!(s.traces(None, 1_000, None).unwrap().len(), 150);
        let month = crate::clock::month_label(crate::clock::month_index(1_000));
        assert_eq!(
            s.spend_by_key(&month).unwrap()["key_a"][0].spent,
            Nanos::new(1_500)
        );
        assert_eq!(s.prune_traces(1_100).unwrap(), 100);
        let left = s.traces(Some("key_a"), 1_000, None).unwrap();
        assert_eq!(left.len(), 50);
        assert!(left.iter().all(|t| t.ts >= 1_100));
        assert!(left.windows(2).all(|w| w[0].ts > w[1].ts), "newest first");
        assert_eq!(s.prune_traces(5_000).unwrap(), 50);

        // Many keys interleaved: never deletes anything recent, and everything old goes
        // once a later batch exists.
        let batch = Batch::of((0..140).map(|i| entry(i, format!("key_{}", i % 7))));
        s.write_batch(&batch).unwrap();
        s.prune_traces(1_070).unwrap();
        let left = s.traces(None, 1_000, None).unwrap();
        assert_eq!(left.iter().filter(|t| t.ts >= 1_070).count(), 70);
        assert!(
            left.windows(2).all(|w| w[0].ts >= w[1].ts),
            "all-keys view sorted by time"
        );
        assert_eq!(
            s.traces(Some("key_3"), 1_000, None).unwrap().len(),
            left.iter()
                .filter(|t| t.key_id.as_deref() == Some("key_3"))
                .count()
        );
        s.write_batch(&Batch::of([entry(500, "key_z".into())]))
            .unwrap();
        s.prune_traces(1_200).unwrap();
        let left = s.traces(None, 1_000, None).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].key_id.as_deref(), Some("key_z"));
    }

    #[test]
    fn lists_are_stored_as_json_so_a_comma_stays_inside_one_scope() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let mut k = record("key_c");
        k.scopes = vec!["x,gate:chat".into()];
        s.insert_key(&k).unwrap();
        assert_eq!(
            s.get_key("key_c").unwrap().unwrap().scopes,
            vec!["x,gate:chat"]
        );
        assert_eq!(
            split("gate:chat,job:*"),
            vec!["gate:chat", "job:*"],
            "legacy rows"
        );
    }

    #[test]
    fn concurrent_patches_of_different_fields_are_both_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.db");
        Store::open(&path)
            .unwrap()
            .insert_key(&record("key_p"))
            .unwrap();
        let workers: Vec<_> = (0..2)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let mut s = Store::open(&path).unwrap();
                    for i in 1..=25u32 {
                        let patch = if w == 0 {
                            KeyPatch {
                                rpm: Some(Some(i)),
                                ..KeyPatch::default()
                            }
                        } else {
                            KeyPatch {
                                rpd: Some(Some(1000 + i)),
                                ..KeyPatch::default()
                            }
                        };
                        s.update_key("key_p", &patch).unwrap();
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let k = Store::open(&path)
            .unwrap()
            .get_key("key_p")
            .unwrap()
            .unwrap();
        assert_eq!((k.rpm, k.rpd), (Some(25), Some(1025)));
    }

    #[test]
    fn orphaned_admissions_are_charged_once_at_their_bound() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let ts = crate::clock::days_from_civil(2026, 11, 26) * crate::clock::MS_PER_DAY;
        let row = |id| JournalRow {
            id,
            ts,
            key_id: Arc::from("key_o"),
            endpoint: "chat.completions",
            requested_model: Arc::from("fast"),
            served_model: Arc::from("m"),
            prompt_tokens: 100,
            completion_tokens: 50,
            cost: Nanos::new(7_000),
        };
        let mut batch = Batch::default();
        batch.open(row(1));
        batch.open(row(2));
        batch.open(row(3));
        s.write_batch(&batch).unwrap();
        // Request 3 finished and was booked; 1 and 2 were cut by a crash.
        let done = LedgerEntry {
            journal_id: Some(3),
            ..LedgerEntry::default()
        };
        s.write_batch(&Batch::of([done])).unwrap();
        assert_eq!(
            s.charge_orphans(|_| true).unwrap(),
            0,
            "a live owner keeps its rows"
        );
        assert_eq!(s.charge_orphans(|_| false).unwrap(), 2);
        assert_eq!(
            s.charge_orphans(|_| false).unwrap(),
            0,
            "charged exactly once"
        );
        let spend = &s.spend_by_key("2026-11").unwrap()["key_o"];
        assert_eq!((spend[0].spent, spend[0].requests), (Nanos::new(14_000), 2));
        assert_eq!(s.requests_by_key("2026-11-26").unwrap()["key_o"], 2);
        let traces = s.traces(Some("key_o"), 10, None).unwrap();
        assert_eq!(traces.len(), 2);
        assert!(traces
            .iter()
            .all(|t| t.usage_estimated && t.error_code.as_deref() == Some(ORPHANED)));
    }
}
