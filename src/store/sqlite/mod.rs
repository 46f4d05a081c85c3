//! The SQLite backend: the schema and its migrations here, keys in `keys`, the spend ledger,
//! journal and traces in `ledger`.
//!
//! One file shared by the server, the CLI and the admin API: WAL so readers never block the
//! writer, a busy timeout so concurrent writers queue, `BEGIN IMMEDIATE` for every write, and
//! only parameterised SQL.

mod alerts;
mod audit;
pub mod checkpoint;
mod groups;
mod keys;
mod ledger;
pub mod paced_vfs;
mod trace_page;

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::Result;

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

-- The change log: every insert, update or delete of a key appends its id, so a running
-- gateway applies N changes in O(N) instead of reloading every key.
CREATE TABLE IF NOT EXISTS key_changes (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS keys_log_ai AFTER INSERT ON keys
    BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS keys_log_au AFTER UPDATE ON keys
    BEGIN INSERT INTO key_changes (key_id) VALUES (NEW.id); END;
CREATE TRIGGER IF NOT EXISTS keys_log_ad AFTER DELETE ON keys
    BEGIN INSERT INTO key_changes (key_id) VALUES (OLD.id); END;

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

-- Traces in pages: up to 256 traces of one key from one commit, `rows` a JSON array with
-- one array per trace (see trace_page.rs); trace `id + i` is row `i`. The `traces` view
-- reads them back one row per trace.
CREATE TABLE IF NOT EXISTS trace_page (
    id     INTEGER PRIMARY KEY,
    n      INTEGER NOT NULL,
    key_id TEXT,
    ts_min INTEGER NOT NULL,
    ts_max INTEGER NOT NULL,
    rows   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS trace_page_key ON trace_page (key_id, id);

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

-- A binary upgrade (`serve --upgrade`, then SIGQUIT): the admission times of the last
-- minute that the old process (`owner`) counted, per key (or `*group:<name>`), written when
-- it hands its sockets over, so the new process's rolling minutes start where they were.
CREATE TABLE IF NOT EXISTS handover_minutes (
    owner  INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    at     INTEGER NOT NULL
);

-- Gateway nodes sharing this store and when each last said it was alive: a node's journal
-- rows are charged as orphans once its heartbeat is older than the caller's TTL.
CREATE TABLE IF NOT EXISTS nodes (owner INTEGER PRIMARY KEY, seen_at INTEGER NOT NULL);

-- Each running gateway's position in `key_changes`, once it applied the changes up to it:
-- a CLI change waits until every live gateway on this file has it (SPEC §1: revocation is
-- immediate), so the key is refused from the moment the command returns.
CREATE TABLE IF NOT EXISTS key_sync (owner INTEGER PRIMARY KEY, seq INTEGER NOT NULL);

-- Groups of keys with a budget and rpm over the sum of their keys (SPEC §7). A change logs
-- '*group:<name>' in key_changes, which tells a running gateway to rebuild its snapshot.
CREATE TABLE IF NOT EXISTS groups (
    name         TEXT PRIMARY KEY,
    budget_nanos INTEGER,
    budget_mode  TEXT NOT NULL,
    rpm          INTEGER,
    created_at   INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS groups_ai AFTER INSERT ON groups BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'keys_version';
    INSERT INTO key_changes (key_id) VALUES ('*group:' || NEW.name); END;
CREATE TRIGGER IF NOT EXISTS groups_au AFTER UPDATE ON groups BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'keys_version';
    INSERT INTO key_changes (key_id) VALUES ('*group:' || NEW.name); END;
CREATE TRIGGER IF NOT EXISTS groups_ad AFTER DELETE ON groups BEGIN
    UPDATE meta SET v = v + 1 WHERE k = 'keys_version';
    INSERT INTO key_changes (key_id) VALUES ('*group:' || OLD.name); END;

-- Every management change: door, actor, action, target, before and after (public fields as
-- JSON text, never a secret).
CREATE TABLE IF NOT EXISTS audit (
    id      INTEGER PRIMARY KEY,
    ts      INTEGER NOT NULL,
    door    TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    before  TEXT,
    after   TEXT
);

-- The alert outbox (SPEC §7): one row per alert, written in the same transaction as the
-- spend (or the refusal) that raised it. Unique per subject, event, period (YYYY-MM for
-- budget thresholds, the UTC hour for brake alerts) and threshold, so an alert fires once
-- however many batches, restarts or processes see the crossing. `payload` is the exact
-- body every delivery sends; `id` (alrt_...) is derived from the unique tuple.
CREATE TABLE IF NOT EXISTS alerts (
    id            TEXT PRIMARY KEY,
    subject_kind  TEXT NOT NULL,
    subject       TEXT NOT NULL,
    event         TEXT NOT NULL,
    period        TEXT NOT NULL,
    threshold_ppm INTEGER NOT NULL,
    payload       TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    UNIQUE (subject_kind, subject, event, period, threshold_ppm)
);

-- One delivery per alert and webhook: pending (until next_attempt_at), delivered or
-- failed. A worker takes a due row by setting lease_until; another takes it only after the
-- lease ends (a worker that died mid-attempt).
CREATE TABLE IF NOT EXISTS alert_deliveries (
    id              INTEGER PRIMARY KEY,
    alert_id        TEXT NOT NULL REFERENCES alerts (id),
    webhook         TEXT NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    lease_until     INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    UNIQUE (alert_id, webhook)
);
CREATE INDEX IF NOT EXISTS alert_deliveries_due
    ON alert_deliveries (state, next_attempt_at);
"#;

/// Columns added after the first release, applied to older databases at open.
const MIGRATIONS: [(&str, &str, &str); 13] = [
    // The process (pid) that journaled an admission: a live one still owns it.
    ("inflight", "owner", "INTEGER NOT NULL DEFAULT 0"),
    ("keys", "max_inflight", "INTEGER"),
    // Rotation: the secret before the last rotation keeps working until `prev_valid_until`.
    ("keys", "prev_token_hash", "BLOB"),
    ("keys", "prev_valid_until", "INTEGER"),
    ("keys", "rotated_at", "INTEGER"),
    // The W3C trace id of the request (32 hex digits), for finding it from an agent's trace.
    ("traces", "trace_id", "TEXT"),
    // Fleets (SPEC §7): the key's group, and the key that minted it.
    ("keys", "group_name", "TEXT"),
    ("keys", "parent_id", "TEXT"),
    // Runaway-agent brakes (SPEC §7): NULL = no limit.
    ("keys", "max_usd_per_hour_nanos", "INTEGER"),
    ("keys", "loop_limit", "INTEGER"),
    // The unit a trace's cost was charged in, and how many (SPEC §4).
    ("traces", "unit", "TEXT"),
    ("traces", "units", "INTEGER"),
    // A process handing over to `serve --upgrade` marks its journal rows settled (1: booked
    // with the charge in the row; 2: closed, nothing booked) instead of deleting them, so
    // the new process can release its copy of the hold and book the same charge.
    ("inflight", "settled", "INTEGER NOT NULL DEFAULT 0"),
];

pub(super) struct Sqlite {
    conn: Connection,
}

/// How long a write waits for another writer (the CLI and the gateway share the file).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

impl Sqlite {
    /// Commits on this connection no longer checkpoint the WAL ([`checkpoint`] does).
    pub fn defer_checkpoints(&self) -> Result<()> {
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// Opens (creating if needed) the database and applies the schema. Some steps of an
    /// open (the journal-mode pragma on a WAL file other connections are writing) can get
    /// `SQLITE_BUSY` without SQLite's busy handler being asked, so a busy open is retried for
    /// as long as the busy timeout: the CLI opening the file while the gateway commits must
    /// not fail.
    pub(super) fn open(path: &Path) -> Result<Sqlite> {
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        loop {
            match Self::open_once(path) {
                Err(crate::store::StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open_once(path: &Path) -> Result<Sqlite> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let conn = open_paced(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // The ledger's statements (the trace page insert, spend upserts, the journal) all stay
        // prepared: re-preparing one costs more than the rows it inserts.
        conn.set_prepared_statement_cache_capacity(64);
        // Only takes effect when the file is created (set before WAL, which fixes the page
        // size). SQLite's default: a commit writes every page it touched whole to the WAL and
        // checksums it, and with traces in pages most of a commit's pages are the few leaves
        // of the sums and the journal; 16 KiB pages made each of those four times the work.
        conn.pragma_update(None, "page_size", 4_096)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: every batch commit is durable; batches are few, so this costs little.
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // The ledger appends to large B-trees: keep their hot pages in memory instead of
        // re-reading them with a syscall per page (64 MiB cache, 256 MiB memory map). With
        // thousands of active keys the writer touches a leaf or two of each key's trace
        // index, spend and daily rows per commit: a smaller cache would evict them. (Until it
        // is full, each new cache page is a fresh allocation the kernel zeroes: a warm-up
        // cost of the first ~16k pages, which `perf record` of a short benchmark shows.)
        conn.pragma_update(None, "cache_size", -65_536)?;
        conn.pragma_update(None, "mmap_size", 268_435_456)?;
        let mut store = Sqlite { conn };
        store.write(|tx| {
            tx.execute_batch(SCHEMA)?;
            // `traces` is a view over `trace_page`. A file from before it has a `traces`
            // table (given its newer columns below), or a `trace_log` table with a view over
            // it: either is moved into pages, ids kept.
            let traces: Option<String> = tx
                .query_row(
                    "SELECT type FROM sqlite_master WHERE name = 'traces'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            let trace_log: bool = tx.query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'trace_log' AND type = 'table'",
                [],
                |r| r.get(0),
            )?;
            if traces.is_none() {
                tx.execute_batch(&trace_page::view_sql())?;
            }
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
            if traces.as_deref() == Some("table") {
                tx.execute_batch(&trace_page::convert_table_sql())?;
            }
            if trace_log {
                tx.execute_batch(&trace_page::convert_trace_log_sql())?;
            }
            tx.execute_batch(&trace_page::view_sql())?;
            // A group's spend (alerts, every commit that charges a member) is found through
            // its keys; after the columns, since older files gain `group_name` just above.
            tx.execute_batch(
                "CREATE INDEX IF NOT EXISTS keys_group ON keys (group_name)
                 WHERE group_name IS NOT NULL",
            )?;
            // After the column exists: a key's descendants are found through it (§7).
            tx.execute_batch(
                "CREATE INDEX IF NOT EXISTS keys_parent ON keys (parent_id)
                 WHERE parent_id IS NOT NULL",
            )?;
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
        Ok(self
            .conn
            .query_row("SELECT v FROM meta WHERE k = 'keys_version'", [], |r| {
                r.get(0)
            })?)
    }

    /// The newest change-log position (0 when nothing changed yet).
    pub fn last_key_change(&self) -> Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                r.get(0)
            })?)
    }

    /// Key ids changed after `seq` (each once) and the newest position, or `None` when the
    /// log no longer reaches back to `seq` (pruned): then only a full reload is exact.
    pub fn key_changes_since(&self, seq: i64) -> Result<Option<(i64, Vec<String>)>> {
        // Polled every `reload_interval_ms` and nearly always unchanged: one cached read of
        // the log's end answers that (`query_row` prepared its statement again each poll).
        let newest: Option<i64> = self
            .conn
            .prepare_cached("SELECT MAX(seq) FROM key_changes")?
            .query_row([], |r| r.get(0))?;
        if newest.is_none_or(|n| n <= seq) {
            return Ok(Some((seq, Vec::new())));
        }
        let oldest: Option<i64> = self
            .conn
            .prepare_cached("SELECT MIN(seq) FROM key_changes")?
            .query_row([], |r| r.get(0))?;
        if oldest.is_some_and(|o| o > seq + 1) {
            return Ok(None);
        }
        let mut stmt = self.conn.prepare_cached(
            "SELECT MAX(seq), key_id FROM key_changes WHERE seq > ?1 GROUP BY key_id",
        )?;
        let rows = stmt.query_map([seq], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut newest = seq;
        let mut ids = Vec::new();
        for row in rows {
            let (s, id) = row?;
            newest = newest.max(s);
            ids.push(id);
        }
        Ok(Some((newest, ids)))
    }

    /// Drops change-log entries older than the newest `keep` (a gateway that fell behind
    /// them reloads in full).
    pub fn prune_key_changes(&mut self, keep: i64) -> Result<usize> {
        self.write(|tx| {
            Ok(tx.execute(
                "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - ?1",
                [keep],
            )?)
        })
    }

    /// Records that gateway `owner` applied the key changes up to `seq`.
    pub fn note_keys_applied(&mut self, owner: i64, seq: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO key_sync (owner, seq) VALUES (?1, ?2)
                 ON CONFLICT (owner) DO UPDATE SET seq = excluded.seq",
                params![owner, seq],
            )?;
            Ok(())
        })
    }

    /// A gateway stopping: no one is to wait for it.
    pub fn forget_keys_applied(&mut self, owner: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute("DELETE FROM key_sync WHERE owner = ?1", [owner])?;
            Ok(())
        })
    }

    /// Every gateway's (owner, position) recorded, live or not.
    pub fn keys_applied(&self) -> Result<Vec<(i64, i64)>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT owner, seq FROM key_sync ORDER BY owner")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// The newest `ts_max` among the newest trace pages (by id: the clock may have gone back
    /// while they were written, so a few are read, never the whole table).
    pub fn latest_trace_ms(&self) -> Result<Option<i64>> {
        Ok(self.conn.query_row(
            "SELECT MAX(ts_max) FROM (SELECT ts_max FROM trace_page ORDER BY id DESC LIMIT 64)",
            [],
            |r| r.get(0),
        )?)
    }

    pub fn integrity_check(&self) -> Result<String> {
        Ok(self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?)
    }

    /// Records that `owner` is alive at `now_ms` (never moves a heartbeat back).
    pub fn heartbeat(&mut self, owner: i64, now_ms: i64) -> Result<()> {
        self.write(|tx| {
            tx.execute(
                "INSERT INTO nodes (owner, seen_at) VALUES (?1, ?2)
                 ON CONFLICT (owner) DO UPDATE SET seen_at = MAX(seen_at, excluded.seen_at)",
                params![owner, now_ms],
            )?;
            Ok(())
        })
    }

    /// Owners whose last heartbeat is at or after `seen_since_ms`, ascending.
    pub fn live_owners(&self, seen_since_ms: i64) -> Result<Vec<i64>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT owner FROM nodes WHERE seen_at >= ?1 ORDER BY owner")?;
        let rows = stmt.query_map([seen_since_ms], |r| r.get(0))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }
}

/// A connection to `path` through the paced VFS ([`paced_vfs`]), or SQLite's default one
/// if that could not be registered (nothing but the pacing differs).
pub(crate) fn open_paced(path: &Path) -> rusqlite::Result<Connection> {
    match paced_vfs::ensure() {
        Some(vfs) => Connection::open_with_flags_and_vfs(path, rusqlite::OpenFlags::default(), vfs),
        None => Connection::open(path),
    }
}
