//! Every SQLite call: the schema and its migrations here, keys in `keys`, the spend ledger,
//! journal and traces in `ledger`.
//!
//! One file shared by the server, the CLI and the admin API: WAL so readers never block the
//! writer, a busy timeout so concurrent writers queue, `BEGIN IMMEDIATE` for every write, and
//! only parameterised SQL.

mod keys;
mod ledger;

use std::path::Path;
use std::time::Duration;

use rusqlite::{params, Connection, TransactionBehavior};

pub use keys::KeyPatch;
pub use ledger::{Batch, JournalRow, LedgerEntry, ModelSpend, TraceRow, ORPHANED};
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

pub struct Store {
    conn: Connection,
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

    /// The newest change-log position (0 when nothing changed yet).
    pub fn last_key_change(&self) -> Result<i64> {
        self.conn
            .query_row("SELECT COALESCE(MAX(seq), 0) FROM key_changes", [], |r| {
                r.get(0)
            })
    }

    /// Key ids changed after `seq` (each once) and the newest position, or `None` when the
    /// log no longer reaches back to `seq` (pruned): then only a full reload is exact.
    pub fn key_changes_since(&self, seq: i64) -> Result<Option<(i64, Vec<String>)>> {
        let oldest: Option<i64> =
            self.conn
                .query_row("SELECT MIN(seq) FROM key_changes", [], |r| r.get(0))?;
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
            tx.execute(
                "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - ?1",
                [keep],
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
    use super::keys::split;
    use super::*;
    use crate::keys::token;
    use crate::keys::{BudgetMode, KeyRecord};
    use crate::money::Nanos;
    use std::sync::Arc;

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
