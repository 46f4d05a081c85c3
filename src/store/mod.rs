//! The store behind keys, the spend ledger, the admission journal and traces: one API over
//! two backends, SQLite (`sqlite`, one file per gateway) and PostgreSQL (`pg`, shared by the
//! nodes of a cluster).
//!
//! Both backends are blocking: call them from the ledger writer thread, `spawn_blocking` or
//! the CLI, never on an async worker thread. Shared types (`Batch`, `TraceRow`, `KeyPatch`,
//! ...) live in `keys` and `ledger`; each backend module holds only its SQL.

mod alerts;
mod audit;
mod groups;
mod keys;
mod ledger;
mod pg;
mod sqlite;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::alerts::AlertRules;

use crate::keys::token::TokenHash;
use crate::keys::{KeyRecord, KeyRow};
use crate::limits::ModelTally;
use crate::money::Nanos;

pub use alerts::{ClaimedDelivery, DeliveryRow, DeliveryState, DeliveryUpdate};
pub use audit::AuditEntry;
pub use groups::{GroupPatch, GroupRecord};
pub use keys::{KeyFilter, KeyPage, KeyPatch, KeyStatus};
pub use ledger::{Batch, HandoverRow, JournalRow, LedgerEntry, ModelSpend, TraceRow, ORPHANED};
pub type Result<T> = std::result::Result<T, StoreError>;

pub use crate::config::StoreLocation;

/// The ledger keeps one row per key, model and month; the live counters, this.
impl From<ModelSpend> for ModelTally {
    /// A month's ledger row of one model, as the live counters keep it.
    fn from(r: ModelSpend) -> ModelTally {
        ModelTally {
            model: Arc::from(r.model),
            requests: r.requests,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            spent: r.cost,
        }
    }
}

/// Any failure of either backend.
#[derive(Debug)]
pub enum StoreError {
    Sqlite(rusqlite::Error),
    Postgres(postgres::Error),
    /// PostgreSQL cannot be reached (or its URL is malformed); the message names the server.
    Connect(String),
    /// A stored value this build cannot read, or a failure outside the database itself.
    Other(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Sqlite(e) => write!(f, "{e}"),
            // The driver's own text already carries the server's message (its `source`).
            StoreError::Postgres(e) => write!(f, "postgres: {e}"),
            StoreError::Connect(msg) | StoreError::Other(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Sqlite(e) => Some(e),
            StoreError::Postgres(e) => Some(e),
            StoreError::Connect(_) | StoreError::Other(_) => None,
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Sqlite(e)
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> StoreError {
        StoreError::Postgres(e)
    }
}

enum Backend {
    Sqlite(sqlite::Sqlite),
    // Boxed: a PostgreSQL client is several times the size of a SQLite handle.
    Postgres(Box<pg::Postgres>),
}

/// One handle on the store. Not shared between threads: open one per thread (PostgreSQL
/// handles come from a process-wide pool, so opening is cheap after the first).
pub struct Store {
    backend: Backend,
    /// Written to the journal's `owner` column: who must still settle an open admission.
    owner: i64,
    /// With `alerts` configured: `write_batch` records the alerts a batch raises.
    alert_rules: Option<Arc<AlertRules>>,
    /// This process handed its sockets to a successor: `write_batch` marks journal rows
    /// settled instead of deleting them (SQLite; see `handover`).
    handing_over: bool,
}

/// Runs the same call on whichever backend the store has (both expose the same methods).
macro_rules! on_backend {
    ($backend:expr, $b:ident => $call:expr) => {
        match $backend {
            Backend::Sqlite($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

/// Where the page after `rows` (a full page of [`Store::traces`]) begins: its smallest id,
/// which on the all-keys page need not be the last row's.
pub fn next_before(rows: &[TraceRow], limit: u32) -> Option<i64> {
    (rows.len() == limit as usize)
        .then(|| rows.iter().map(|t| t.id).min())
        .flatten()
}

impl Store {
    /// Opens (creating if needed) a SQLite database and applies the schema.
    pub fn open(path: &Path) -> Result<Store> {
        Ok(Store::with_backend(Backend::Sqlite(sqlite::Sqlite::open(
            path,
        )?)))
    }

    /// Opens the store at `location`, applying the schema or pending migrations. PostgreSQL:
    /// takes a pooled connection or connects (failing within a few seconds when the server
    /// is down); migrations run once per process and URL.
    pub fn open_at(location: &StoreLocation) -> Result<Store> {
        match location {
            StoreLocation::Sqlite(path) => Store::open(path),
            StoreLocation::Postgres(url) => Ok(Store::with_backend(Backend::Postgres(Box::new(
                pg::Postgres::open(url)?,
            )))),
        }
    }

    fn with_backend(backend: Backend) -> Store {
        Store {
            backend,
            owner: crate::owner::own(),
            alert_rules: None,
            handing_over: false,
        }
    }

    /// The ledger writer's store: its commits leave WAL checkpoints to a thread of their own
    /// ([`sqlite::checkpoint`]) while `running`; PostgreSQL has nothing to do.
    pub fn checkpoint_apart(&self, location: &StoreLocation, running: Arc<AtomicBool>) {
        let (Backend::Sqlite(db), StoreLocation::Sqlite(path)) = (&self.backend, location) else {
            return;
        };
        if let Err(e) = sqlite::checkpoint::spawn(path.clone(), running) {
            log::warn!("WAL checkpoints stay in the ledger's commits: {e}");
            return;
        }
        if let Err(e) = db.defer_checkpoints() {
            log::warn!("WAL checkpoints stay in the ledger's commits too: {e}");
        }
    }

    /// Sets the owner written with journal rows by `write_batch` (default: this process's
    /// id, [`crate::owner::own`]). Nodes sharing one PostgreSQL need owners unique across
    /// the cluster.
    pub fn set_owner(&mut self, owner: i64) {
        self.owner = owner;
    }

    /// The alert thresholds and webhooks `write_batch` records alerts with (`None`: alerts
    /// are off and nothing is recorded).
    pub fn set_alert_rules(&mut self, rules: Option<Arc<AlertRules>>) {
        self.alert_rules = rules;
    }

    /// The owner journal rows are written with.
    pub fn owner(&self) -> i64 {
        self.owner
    }

    /// Records that node `owner` is alive at `now_ms` (upsert; never moves back in time).
    pub fn heartbeat(&mut self, owner: i64, now_ms: i64) -> Result<()> {
        on_backend!(&mut self.backend, b => b.heartbeat(owner, now_ms))
    }

    /// Nodes whose last heartbeat is at or after `seen_since_ms`, ascending.
    pub fn live_owners(&self, seen_since_ms: i64) -> Result<Vec<i64>> {
        on_backend!(&self.backend, b => b.live_owners(seen_since_ms))
    }

    pub fn keys_version(&self) -> Result<i64> {
        on_backend!(&self.backend, b => b.keys_version())
    }

    /// The newest change-log position (0 when nothing changed yet).
    pub fn last_key_change(&self) -> Result<i64> {
        on_backend!(&self.backend, b => b.last_key_change())
    }

    /// Key ids changed after `seq` (each once) and the newest position, or `None` when the
    /// log no longer reaches back to `seq` (pruned): then only a full reload is exact.
    pub fn key_changes_since(&self, seq: i64) -> Result<Option<(i64, Vec<String>)>> {
        on_backend!(&self.backend, b => b.key_changes_since(seq))
    }

    /// Drops change-log entries older than the newest `keep` (a gateway that fell behind
    /// them reloads in full).
    pub fn prune_key_changes(&mut self, keep: i64) -> Result<usize> {
        on_backend!(&mut self.backend, b => b.prune_key_changes(keep))
    }

    /// Records that gateway `owner` applied the key changes up to `seq` (SQLite: a CLI
    /// change waits for it; PostgreSQL's nodes are waited for by no one, and take changes
    /// within their poll).
    pub fn note_keys_applied(&mut self, owner: i64, seq: i64) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.note_keys_applied(owner, seq),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// A gateway stopping: no CLI change waits for it any more.
    pub fn forget_keys_applied(&mut self, owner: i64) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.forget_keys_applied(owner),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Every gateway's (owner, applied key-change position) on this store (SQLite only).
    pub fn keys_applied(&self) -> Result<Vec<(i64, i64)>> {
        match &self.backend {
            Backend::Sqlite(b) => b.keys_applied(),
            Backend::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// The newest time a recent trace was written at (unix ms), if any: a gateway started
    /// with its clock set back counts days and months from no earlier than this.
    pub fn latest_trace_ms(&self) -> Result<Option<i64>> {
        on_backend!(&self.backend, b => b.latest_trace_ms())
    }

    /// SQLite's `PRAGMA integrity_check`; PostgreSQL has none, and answers `ok` once a
    /// round trip succeeds.
    pub fn integrity_check(&self) -> Result<String> {
        on_backend!(&self.backend, b => b.integrity_check())
    }

    pub fn insert_key(&mut self, k: &KeyRecord) -> Result<()> {
        self.insert_keys(std::slice::from_ref(k))
    }

    /// Inserts many keys in one transaction (bulk provisioning, benchmarks).
    pub fn insert_keys(&mut self, keys: &[KeyRecord]) -> Result<()> {
        on_backend!(&mut self.backend, b => b.insert_keys(keys))
    }

    /// How many keys the store holds.
    pub fn key_count(&self) -> Result<usize> {
        on_backend!(&self.backend, b => b.key_count())
    }

    /// Calls `f` with every key as a borrowed row (start-up and full reloads of the
    /// snapshot). `f` may call the store again.
    pub fn for_each_key_row(&self, f: impl FnMut(&KeyRow<'_>)) -> Result<()> {
        on_backend!(&self.backend, b => b.for_each_key_row(f))
    }

    /// Every key, oldest first.
    pub fn all_keys(&self) -> Result<Vec<KeyRecord>> {
        on_backend!(&self.backend, b => b.all_keys())
    }

    pub fn get_key(&self, id: &str) -> Result<Option<KeyRecord>> {
        on_backend!(&self.backend, b => b.get_key(id))
    }

    /// One page of the keys that match `filter` (status as at `now`), and how many match.
    pub fn key_page(&self, filter: &KeyFilter, now: i64) -> Result<KeyPage> {
        on_backend!(&self.backend, b => b.key_page(filter, now))
    }

    /// Applies a patch; returns the updated key, or `None` if no such key. The read and the
    /// write share one transaction that locks the key, so concurrent patches of different
    /// fields (CLI and admin API at once) never overwrite each other.
    pub fn update_key(&mut self, id: &str, p: &KeyPatch) -> Result<Option<KeyRecord>> {
        on_backend!(&mut self.backend, b => b.update_key(id, p))
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
        on_backend!(&mut self.backend, b => b.rotate_key(id, new_hash, new_prefix, previous_valid_until, now))
    }

    /// Revokes a key (idempotent: the first revocation time is kept).
    pub fn revoke_key(&mut self, id: &str, now: i64) -> Result<Option<KeyRecord>> {
        on_backend!(&mut self.backend, b => b.revoke_key(id, now))
    }

    /// Inserts a group; `false` if one of that name exists.
    pub fn insert_group(&mut self, g: &GroupRecord) -> Result<bool> {
        on_backend!(&mut self.backend, b => b.insert_group(g))
    }

    pub fn get_group(&self, name: &str) -> Result<Option<GroupRecord>> {
        on_backend!(&self.backend, b => b.get_group(name))
    }

    pub fn all_groups(&self) -> Result<Vec<GroupRecord>> {
        on_backend!(&self.backend, b => b.all_groups())
    }

    pub fn update_group(&mut self, name: &str, p: &GroupPatch) -> Result<Option<GroupRecord>> {
        on_backend!(&mut self.backend, b => b.update_group(name, p))
    }

    /// Deletes a group, taking its keys out of it; `false` if there was none.
    pub fn delete_group(&mut self, name: &str) -> Result<bool> {
        on_backend!(&mut self.backend, b => b.delete_group(name))
    }

    /// Ids of a group's keys, oldest first.
    pub fn group_members(&self, name: &str) -> Result<Vec<String>> {
        on_backend!(&self.backend, b => b.group_members(name))
    }

    /// A group's spend in `month` per model (the sum of its keys').
    pub fn group_spend(&self, name: &str, month: &str) -> Result<Vec<ModelSpend>> {
        on_backend!(&self.backend, b => b.group_spend(name, month))
    }

    /// Spend in `month` of every key below `id` in its tree of minted keys.
    pub fn tree_spend(&self, id: &str, month: &str) -> Result<Nanos> {
        on_backend!(&self.backend, b => b.tree_spend(id, month))
    }

    /// Every key below `id`, oldest first.
    pub fn descendants(&self, id: &str) -> Result<Vec<KeyRecord>> {
        on_backend!(&self.backend, b => b.descendants(id))
    }

    /// (child, parent) of every minted key.
    pub fn key_parents(&self) -> Result<Vec<(String, String)>> {
        on_backend!(&self.backend, b => b.key_parents())
    }

    /// Month-to-date spend per key and model.
    pub fn spend_by_key(&self, month: &str) -> Result<HashMap<String, Vec<ModelTally>>> {
        on_backend!(&self.backend, b => b.spend_by_key(month))
    }

    /// Admitted requests per key on one UTC day.
    pub fn requests_by_key(&self, day: &str) -> Result<HashMap<String, u32>> {
        on_backend!(&self.backend, b => b.requests_by_key(day))
    }

    pub fn spend_for_key(&self, key_id: &str, month: &str) -> Result<Vec<ModelSpend>> {
        on_backend!(&self.backend, b => b.spend_for_key(key_id, month))
    }

    pub fn requests_on(&self, key_id: &str, day: &str) -> Result<u32> {
        on_backend!(&self.backend, b => b.requests_on(key_id, day))
    }

    /// How many model requests a key had admitted at or after `since`, from its traces.
    pub fn admitted_since(&self, key_id: &str, since: i64) -> Result<u32> {
        on_backend!(&self.backend, b => b.admitted_since(key_id, since))
    }

    /// A key's charges (unix ms when each request ended, cost) since `since`, from its traces.
    pub fn recent_charges(&self, key_id: &str, since: i64) -> Result<Vec<(i64, Nanos)>> {
        on_backend!(&self.backend, b => b.recent_charges(key_id, since))
    }

    /// Newest traces first, for one key or all; `before` pages back (traces with a smaller
    /// id). Within a committed batch rows are grouped by key (see `write_batch`), so the
    /// all-keys view sorts a recent window by time; one key's rows are always in order.
    /// Appends one entry to the audit log.
    pub fn record_audit(&mut self, e: &AuditEntry) -> Result<()> {
        on_backend!(&mut self.backend, b => b.record_audit(e))
    }

    /// The audit log, newest first; `before` (an entry id) pages back.
    pub fn audit(&self, limit: u32, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        on_backend!(&self.backend, b => b.audit(limit, before))
    }

    /// Newest traces first, for one key or all: the `limit` with the largest ids below
    /// `before`, so the smallest id among them pages back with no trace skipped or shown
    /// twice ([`next_before`]). One key's ids follow time; across keys a committed batch
    /// numbers each key's traces together, so the all-keys page is sorted by time here.
    pub fn traces(
        &self,
        key_id: Option<&str>,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<TraceRow>> {
        let mut rows = on_backend!(&self.backend, b => b.traces(key_id, limit, before))?;
        if key_id.is_none() {
            rows.sort_by(|a, b| b.ts.cmp(&a.ts).then(b.id.cmp(&a.id)));
        }
        Ok(rows)
    }

    /// Spend per UTC day and model in one month (`YYYY-MM`), for one key or summed over all:
    /// `(day "YYYY-MM-DD", model, cost)`.
    pub fn daily_spend(
        &self,
        month: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<(String, String, Nanos)>> {
        on_backend!(&self.backend, b => b.daily_spend(month, key_id))
    }

    /// Commits one batch atomically (one transaction): traces, spend, daily counts, last use
    /// and the admission journal, whose rows are written with this store's owner. On error
    /// nothing is written and the caller keeps the batch.
    ///
    /// With alert rules set, the same transaction records the alerts the batch raises in
    /// the outbox (`alerts`, with one `alert_deliveries` row per webhook): for each key whose
    /// spend it booked and that has a monthly budget, and for the key's group if it has a
    /// budget (the sum of its keys), every threshold the month-to-date spend has reached;
    /// and for each
    /// `spend_rate_exceeded` / `loop_detected` trace, the key's brake alert for that UTC
    /// hour. Each alert is inserted once ever (unique tuple): later batches, restarts and
    /// other nodes find it there and add nothing.
    pub fn write_batch(&mut self, batch: &Batch) -> Result<()> {
        let owner = self.owner;
        let rules = self.alert_rules.clone();
        match &mut self.backend {
            Backend::Sqlite(b) => b.write_batch(batch, owner, rules.as_deref(), self.handing_over),
            Backend::Postgres(b) => b.write_batch(batch, owner, rules.as_deref()),
        }
    }

    /// From now on `write_batch` leaves settled journal rows for a successor to follow
    /// (SQLite: a binary upgrade; a cluster shares its limits through Redis instead).
    pub fn set_handing_over(&mut self, on: bool) {
        self.handing_over = on;
    }

    /// Journal rows of other processes, open and settled (SQLite; none for PostgreSQL).
    pub fn foreign_journal(&self, own: i64) -> Result<Vec<HandoverRow>> {
        match &self.backend {
            Backend::Sqlite(b) => b.foreign_journal(own),
            Backend::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// Deletes settled journal rows a successor has followed.
    pub fn delete_settled(&mut self, ids: &[i64]) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.delete_settled(ids),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Saves `owner`'s rolling minutes for its successor: (key id or `*group:<name>`, unix ms).
    pub fn save_minutes(&mut self, owner: i64, rows: &[(Arc<str>, i64)]) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.save_minutes(owner, rows),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Rolling minutes other processes saved when they handed over.
    pub fn foreign_minutes(&self, own: i64) -> Result<Vec<(String, i64)>> {
        match &self.backend {
            Backend::Sqlite(b) => b.foreign_minutes(own),
            Backend::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// Rolling minutes saved by processes that are gone (`is_live` false): (key, unix ms).
    pub fn left_minutes(&self, is_live: impl Fn(i64) -> bool) -> Result<Vec<(String, i64)>> {
        match &self.backend {
            Backend::Sqlite(b) => b.left_minutes(is_live),
            Backend::Postgres(_) => Ok(Vec::new()),
        }
    }

    /// Drops what stopped processes left for a successor (saved minutes, settled rows).
    pub fn forget_handovers(&mut self, is_live: impl Fn(i64) -> bool) -> Result<()> {
        match &mut self.backend {
            Backend::Sqlite(b) => b.forget_handovers(is_live),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Runs `f` on one consistent state of the store (a read transaction; SQLite).
    pub fn read_consistent<T>(&self, f: impl FnOnce(&Store) -> Result<T>) -> Result<T> {
        let Backend::Sqlite(b) = &self.backend else {
            return f(self);
        };
        b.begin_read()?;
        let out = f(self);
        let end = b.end_read();
        let out = out?;
        end?;
        Ok(out)
    }

    /// Takes up to `limit` due deliveries (pending, next attempt reached, not leased) until
    /// `lease_until`, none to a webhook in `skip`: no other worker, on any node, takes them
    /// before the lease ends.
    pub fn claim_deliveries(
        &mut self,
        now: i64,
        limit: u32,
        lease_until: i64,
        skip: &[&str],
    ) -> Result<Vec<ClaimedDelivery>> {
        on_backend!(&mut self.backend, b => b.claim_deliveries(now, limit, lease_until, skip))
    }

    /// Writes one attempt's outcome and ends its lease.
    pub fn finish_delivery(&mut self, id: i64, update: &DeliveryUpdate) -> Result<()> {
        on_backend!(&mut self.backend, b => b.finish_delivery(id, update))
    }

    /// Ends the lease of claimed deliveries that were not attempted.
    pub fn release_deliveries(&mut self, ids: &[i64]) -> Result<()> {
        on_backend!(&mut self.backend, b => b.release_deliveries(ids))
    }

    /// Deliveries still pending.
    pub fn pending_deliveries(&self) -> Result<u64> {
        on_backend!(&self.backend, b => b.pending_deliveries())
    }

    /// Alert deliveries with their alerts, newest first; `before` (a delivery id) pages back.
    pub fn alert_deliveries(&self, limit: u32, before: Option<i64>) -> Result<Vec<DeliveryRow>> {
        on_backend!(&self.backend, b => b.alert_deliveries(limit, before))
    }

    /// Charges every admission whose owner `is_live` says is gone (journal rows with no
    /// booked spend) at its journaled upper-bound cost: a trace marked estimated with code
    /// `orphaned`, the spend and the day's count. Returns how many; each row is charged once
    /// even when several nodes run this at the same time. Run at start-up, before keys are
    /// loaded, and periodically: a process handed over to by `--upgrade` keeps its own rows
    /// until it exits.
    pub fn charge_orphans(&mut self, is_live: impl Fn(i64) -> bool) -> Result<usize> {
        on_backend!(&mut self.backend, b => b.charge_orphans(is_live))
    }

    /// Deletes traces older than `before_ms`; returns how many. Nothing newer than
    /// `before_ms` is ever deleted; a few older rows of the last batch before the cut may
    /// wait for the next prune.
    pub fn prune_traces(&mut self, before_ms: i64) -> Result<usize> {
        on_backend!(&mut self.backend, b => b.prune_traces(before_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::keys::split;
    use super::*;
    use crate::keys::token;
    use crate::keys::{BudgetMode, KeyRecord};
    use crate::money::Nanos;

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
            group: None,
            parent_id: None,
            allowed_models: vec!["a".into(), "b".into()],
            free_only: false,
            client_id: None,
            created_at: 1,
            expires_at: 2,
            revoked_at: None,
            last_used_at: None,
            max_usd_per_hour: Some(Nanos::new(2_500_000_000)),
            loop_limit: Some(7),
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
        assert_eq!(
            (k.max_usd_per_hour, k.loop_limit),
            (Some(Nanos::new(2_500_000_000)), Some(7))
        );
        let patch = KeyPatch {
            rpm: Some(None),
            free_only: Some(true),
            max_usd_per_hour: Some(None),
            loop_limit: Some(Some(3)),
            ..KeyPatch::default()
        };
        let k = s.update_key("key_a", &patch).unwrap().unwrap();
        assert_eq!((k.rpm, k.free_only), (None, true));
        let stored = s.get_key("key_a").unwrap().unwrap();
        assert_eq!(
            (stored.max_usd_per_hour, stored.loop_limit),
            (None, Some(3))
        );
        // The snapshot's rows carry the brakes too.
        let mut limits = Vec::new();
        s.for_each_key_row(|r| limits.push((r.limits.max_usd_per_hour, r.limits.loop_limit)))
            .unwrap();
        assert_eq!(limits, vec![(None, Some(3))]);
        let v1 = s.keys_version().unwrap();
        let k = s.revoke_key("key_a", 77).unwrap().unwrap();
        assert_eq!(k.revoked_at, Some(77));
        assert!(s.keys_version().unwrap() > v1);
        assert!(s.revoke_key("key_nope", 1).unwrap().is_none());
    }

    #[test]
    fn a_file_with_the_old_traces_table_is_moved_into_the_trace_log_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.db");
        {
            // The `traces` table as releases before `trace_log` created it.
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE traces (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, key_id TEXT,
                    endpoint TEXT NOT NULL, requested_model TEXT, served_model TEXT,
                    provider TEXT, status INTEGER NOT NULL, error_code TEXT,
                    latency_ms INTEGER NOT NULL, ttfb_ms INTEGER,
                    prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
                    cost_nanos INTEGER NOT NULL, usage_estimated INTEGER NOT NULL,
                    fallback_from TEXT, trace_id TEXT);
                 CREATE INDEX traces_key ON traces (key_id, id);
                 INSERT INTO traces VALUES (7, 1000, 'key_a', 'chat.completions', 'm', 'up-m',
                    'p', 200, NULL, 12, 3, 11, 5, 2500, 0, NULL,
                    '0af7651916cd43dd8448eb211c80319c');
                 INSERT INTO traces VALUES (9, 2000, 'key_a', 'messages', 'm', NULL, NULL,
                    402, 'budget_exceeded', 1, NULL, 0, 0, 0, 1, 'x', NULL);",
            )
            .unwrap();
        }
        let mut s = Store::open(&path).unwrap();
        let got = s.traces(Some("key_a"), 10, None).unwrap();
        assert_eq!(got.iter().map(|t| t.id).collect::<Vec<_>>(), vec![9, 7]);
        let (new, old) = (&got[0], &got[1]);
        assert_eq!(
            (
                old.ts,
                old.status,
                old.latency_ms,
                old.ttfb_ms,
                old.cost.get()
            ),
            (1000, 200, 12, Some(3), 2500)
        );
        assert_eq!(old.served_model.as_deref(), Some("up-m"));
        assert_eq!(
            old.trace_id.map(|t| t.to_string()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!((old.unit.as_deref(), old.units), (None, 0));
        assert_eq!(new.error_code.as_deref(), Some("budget_exceeded"));
        assert!(new.usage_estimated);
        assert_eq!(new.fallback_from.as_deref(), Some("x"));
        // New rows follow the moved ones; the view answers plain SQL as the table did.
        let mut b = Batch::default();
        b.add(
            &mut LedgerEntry {
                trace: TraceRow {
                    ts: 3000,
                    key_id: Some("key_a".into()),
                    endpoint: "chat.completions".into(),
                    status: 200,
                    ..TraceRow::default()
                },
                keep_trace: true,
                ..LedgerEntry::default()
            },
            100,
        );
        s.write_batch(&b).unwrap();
        let ids: Vec<i64> = s
            .traces(Some("key_a"), 10, None)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![10, 9, 7]);
        drop(s);
        let db = rusqlite::Connection::open(&path).unwrap();
        let (n, kind): (i64, String) = db
            .query_row(
                "SELECT (SELECT COUNT(*) FROM traces WHERE status = 200),
                        (SELECT type FROM sqlite_master WHERE name = 'traces')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((n, kind.as_str()), (2, "view"));
        // Opening again changes nothing.
        drop(db);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.traces(Some("key_a"), 10, None).unwrap().len(), 3);
    }

    #[test]
    fn a_file_with_trace_log_rows_is_moved_into_trace_pages_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.db");
        {
            // `trace_log` and its view as the release before trace pages created them.
            let db = rusqlite::Connection::open(&path).unwrap();
            db.execute_batch(
                "CREATE TABLE trace_log (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL,
                    key_id TEXT, row TEXT NOT NULL);
                 CREATE INDEX trace_log_key ON trace_log (key_id, id);
                 CREATE VIEW traces AS SELECT id, ts, key_id,
                    json_extract(row, '$[0]') AS endpoint,
                    json_extract(row, '$[1]') AS requested_model,
                    json_extract(row, '$[2]') AS served_model,
                    json_extract(row, '$[3]') AS provider,
                    json_extract(row, '$[4]') AS status,
                    json_extract(row, '$[5]') AS error_code,
                    json_extract(row, '$[6]') AS latency_ms,
                    json_extract(row, '$[7]') AS ttfb_ms,
                    json_extract(row, '$[8]') AS prompt_tokens,
                    json_extract(row, '$[9]') AS completion_tokens,
                    json_extract(row, '$[10]') AS cost_nanos,
                    json_extract(row, '$[11]') AS usage_estimated,
                    json_extract(row, '$[12]') AS fallback_from,
                    json_extract(row, '$[13]') AS trace_id,
                    json_extract(row, '$[14]') AS unit,
                    json_extract(row, '$[15]') AS units
                 FROM trace_log;
                 INSERT INTO trace_log VALUES (3, 1000, 'key_a',
                    '[\"chat.completions\",\"m\",\"up-m\",\"p\",200,null,12,3,11,5,2500,0,null,\"0af7651916cd43dd8448eb211c80319c\",\"token\",0]');
                 INSERT INTO trace_log VALUES (4, 1001, NULL,
                    '[\"chat.completions\",null,null,null,401,\"invalid_api_key\",1,null,0,0,0,0,null,null,null,0]');
                 INSERT INTO trace_log VALUES (6, 1002, 'key_a',
                    '[\"messages\",\"m\",null,null,402,\"budget_exceeded\",1,null,0,0,0,1,\"x\",null,\"image\",2]');",
            )
            .unwrap();
            // A run longer than a page, of another key.
            let mut insert = db
                .prepare("INSERT INTO trace_log VALUES (?1, ?2, 'key_b', ?3)")
                .unwrap();
            for id in 10..610i64 {
                let row = format!(
                    "[\"chat.completions\",\"m\",\"m\",\"p\",200,null,{id},1,1,1,{id},0,null,null,\"token\",0]"
                );
                insert
                    .execute(rusqlite::params![id, 2000 + id, row])
                    .unwrap();
            }
        }
        let mut s = Store::open(&path).unwrap();
        let a = s.traces(Some("key_a"), 10, None).unwrap();
        assert_eq!(a.iter().map(|t| t.id).collect::<Vec<_>>(), vec![6, 3]);
        let (new, old) = (&a[0], &a[1]);
        assert_eq!(
            (
                old.ts,
                old.status,
                old.latency_ms,
                old.ttfb_ms,
                old.cost.get()
            ),
            (1000, 200, 12, Some(3), 2500)
        );
        assert_eq!(old.served_model.as_deref(), Some("up-m"));
        assert_eq!(
            old.trace_id.map(|t| t.to_string()).as_deref(),
            Some("0af7651916cd43dd8448eb211c80319c")
        );
        assert_eq!((new.unit.as_deref(), new.units), (Some("image"), 2));
        assert_eq!(new.error_code.as_deref(), Some("budget_exceeded"));
        assert!(new.usage_estimated);
        assert_eq!(new.fallback_from.as_deref(), Some("x"));
        let b = s.traces(Some("key_b"), 1_000, None).unwrap();
        assert_eq!(
            b.iter().map(|t| t.id).collect::<Vec<_>>(),
            (10..610).rev().collect::<Vec<_>>()
        );
        assert!(b
            .iter()
            .all(|t| t.latency_ms == t.id && t.ts == 2000 + t.id));
        // Paging back from the middle of a page.
        let page = s.traces(Some("key_b"), 3, Some(300)).unwrap();
        assert_eq!(
            page.iter().map(|t| t.id).collect::<Vec<_>>(),
            vec![299, 298, 297]
        );
        // New traces follow the moved ones.
        s.write_batch(&Batch::of([LedgerEntry {
            trace: TraceRow {
                ts: 5000,
                key_id: Some("key_a".into()),
                endpoint: "chat.completions".into(),
                status: 200,
                ..TraceRow::default()
            },
            keep_trace: true,
            ..LedgerEntry::default()
        }]))
        .unwrap();
        let ids: Vec<i64> = s
            .traces(Some("key_a"), 10, None)
            .unwrap()
            .iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, vec![610, 6, 3]);
        drop(s);
        let db = rusqlite::Connection::open(&path).unwrap();
        let (n, anonymous, pages, log): (i64, i64, i64, i64) = db
            .query_row(
                "SELECT (SELECT COUNT(*) FROM traces),
                        (SELECT COUNT(*) FROM traces WHERE key_id IS NULL AND id = 4),
                        (SELECT COUNT(*) FROM trace_page),
                        (SELECT COUNT(*) FROM sqlite_master WHERE name LIKE 'trace_log%')",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        // key_a's 3 and 6 are not consecutive: two pages; key_b's 600 in 256 + 256 + 88.
        assert_eq!((n, anonymous, pages, log), (604, 1, 1 + 2 + 3 + 1, 0));
        // `SELECT *` gives the old table's columns, in its order.
        let columns: Vec<String> = db
            .prepare("SELECT name FROM pragma_table_info('traces')")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(
            columns.join(","),
            "id,ts,key_id,endpoint,requested_model,served_model,provider,status,error_code,\
             latency_ms,ttfb_ms,prompt_tokens,completion_tokens,cost_nanos,usage_estimated,\
             fallback_from,trace_id,unit,units"
        );
        drop(db);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.traces(None, 1_000, None).unwrap().len(), 604);
    }

    #[test]
    fn a_key_with_many_pages_reads_newest_first_and_prunes_inside_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let entry = |i: i64, key: &str| LedgerEntry {
            trace: TraceRow {
                ts: 10_000 + i,
                key_id: Some(key.into()),
                endpoint: "chat".into(),
                served_model: Some("m".into()),
                status: 200,
                latency_ms: 1,
                cost: Nanos::new(i + 1),
                ..TraceRow::default()
            },
            admitted: true,
            counted: true,
            keep_trace: true,
            journal_id: None,
            span: None,
        };
        // Two keys interleaved, 600 traces each: three pages per key.
        let batch =
            Batch::of((0..1_200).map(|i| entry(i, if i % 2 == 0 { "key_a" } else { "key_b" })));
        s.write_batch(&batch).unwrap();
        let a = s.traces(Some("key_a"), 1_000, None).unwrap();
        assert_eq!(a.len(), 600);
        assert!(a.windows(2).all(|w| w[0].id > w[1].id && w[0].ts > w[1].ts));
        // Paging back: each page of 100 starts below the last id of the one before.
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = s.traces(Some("key_a"), 100, before).unwrap();
            let Some(last) = page.last() else { break };
            before = Some(last.id);
            seen.extend(page.iter().map(|t| t.ts));
        }
        assert_eq!(seen, a.iter().map(|t| t.ts).collect::<Vec<_>>());
        // The hour window reads the newest charges only, across pages.
        let charges = s.recent_charges("key_b", 10_000 + 1_000).unwrap();
        assert_eq!(charges.len(), 101, "ends at 11000, 11002, ... 11200");
        assert!(charges.iter().all(|(at, _)| *at >= 11_000));
        assert_eq!(
            s.spend_by_key(&crate::clock::month_label(crate::clock::month_index(
                10_000
            )))
            .unwrap()["key_b"][0]
                .spent,
            Nanos::new((1..=1_200).filter(|c| c % 2 == 0).sum())
        );
        // key_a's first page (ts 10000..10510) is cut inside: its first 100 go.
        assert_eq!(s.prune_traces(10_200).unwrap(), 100);
        let a = s.traces(Some("key_a"), 1_000, None).unwrap();
        assert_eq!(a.len(), 500);
        assert_eq!(a.last().map(|t| t.ts), Some(10_200));
        assert_eq!(s.traces(Some("key_b"), 1_000, None).unwrap().len(), 600);
        let all = s.traces(None, 2_000, None).unwrap();
        assert_eq!(all.len(), 1_100);
        assert!(
            all.windows(2).all(|w| w[0].ts > w[1].ts),
            "all keys by time"
        );
        // Ids are kept: every trace still has the id it was listed with.
        let a_ids: Vec<i64> = a.iter().map(|t| t.id).collect();
        let again: Vec<i64> = all
            .iter()
            .filter(|t| t.key_id.as_deref() == Some("key_a"))
            .map(|t| t.id)
            .collect();
        assert_eq!(a_ids, again);
        assert_eq!(s.integrity_check().unwrap(), "ok");
    }

    #[test]
    fn paging_every_keys_traces_shows_each_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let entry = |i: i64| LedgerEntry {
            trace: TraceRow {
                ts: 10_000 + i,
                key_id: Some(["key_a", "key_b", "key_c"][i as usize % 3].into()),
                endpoint: "chat".into(),
                status: 200,
                ..TraceRow::default()
            },
            admitted: true,
            counted: true,
            keep_trace: true,
            journal_id: None,
            span: None,
        };
        // Three keys interleaved in time, in two commits: each commit numbers one key's
        // traces together, so ids do not follow time across keys.
        s.write_batch(&Batch::of((0..40).map(entry))).unwrap();
        s.write_batch(&Batch::of((40..70).map(entry))).unwrap();
        let mut seen = Vec::new();
        let mut before = None;
        for _ in 0..20 {
            let page = s.traces(None, 7, before).unwrap();
            assert!(
                page.windows(2).all(|w| w[0].ts > w[1].ts),
                "a page is by time"
            );
            seen.extend(page.iter().map(|t| t.ts));
            match next_before(&page, 7) {
                Some(b) => before = Some(b),
                None => break,
            }
        }
        seen.sort_unstable();
        assert_eq!(
            seen,
            (10_000..10_070).collect::<Vec<_>>(),
            "each trace once"
        );
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
            span: None,
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
            span: None,
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

    #[test]
    fn a_process_handing_over_leaves_settled_rows_that_are_never_charged_twice() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(&dir.path().join("x.db")).unwrap();
        let ts = crate::clock::days_from_civil(2026, 11, 26) * crate::clock::MS_PER_DAY;
        let row = |id| JournalRow {
            id,
            ts,
            key_id: Arc::from("key_h"),
            endpoint: "chat.completions",
            requested_model: Arc::from("m"),
            served_model: Arc::from("m"),
            prompt_tokens: 100,
            completion_tokens: 50,
            cost: Nanos::new(7_000),
        };
        let mut batch = Batch::default();
        batch.open(row(1));
        batch.open(row(2));
        s.write_batch(&batch).unwrap();
        // The process hands over; request 1 then finishes at its real cost.
        s.set_handing_over(true);
        let done = LedgerEntry {
            trace: TraceRow {
                ts,
                key_id: Some(Arc::from("key_h")),
                served_model: Some(Arc::from("m")),
                prompt_tokens: 10,
                completion_tokens: 5,
                cost: Nanos::new(4_500),
                ..TraceRow::default()
            },
            admitted: true,
            counted: true,
            journal_id: Some(1),
            ..LedgerEntry::default()
        };
        s.write_batch(&Batch::of([done])).unwrap();
        let rows = s.foreign_journal(0).unwrap();
        assert_eq!(rows.len(), 2, "the settled row stays for the successor");
        let settled = rows.iter().find(|r| r.id == 1).unwrap();
        assert_eq!(settled.settled, 1);
        assert_eq!(
            (
                settled.prompt_tokens,
                settled.completion_tokens,
                settled.cost
            ),
            (10, 5, Nanos::new(4_500))
        );
        // The owner is gone: only the open row is an orphan; the settled one was booked.
        assert_eq!(s.charge_orphans(|_| false).unwrap(), 1);
        let spend = &s.spend_by_key("2026-11").unwrap()["key_h"];
        assert_eq!((spend[0].spent, spend[0].requests), (Nanos::new(11_500), 2));
        assert_eq!(s.requests_by_key("2026-11-26").unwrap()["key_h"], 2);
        s.forget_handovers(|_| false).unwrap();
        assert!(s.foreign_journal(0).unwrap().is_empty());
    }
}
