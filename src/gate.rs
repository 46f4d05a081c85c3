//! Shared gateway state: the hot-swapped snapshot (routes and keys), ledger, metrics, and
//! the reloads that rebuild the snapshot.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::clock::{day_index, day_label, month_index, month_label, now_ms};
use crate::config::Config;
use crate::keys::KeySet;
use crate::ledger::SpendLedger;
use crate::limits::KeyCounters;
use crate::metrics::Metrics;
use crate::shield::{AuthShield, Sampler};
use crate::snapshot::{Routes, Snapshot};
use crate::store::{Store, StoreError};

/// Unauthenticated requests traced per second, across the gateway (a flood of bad tokens
/// is counted in metrics, and cannot grow the database faster than this).
pub const UNAUTHENTICATED_TRACES_PER_SEC: u64 = 10;

pub struct Gate {
    /// Routes and keys, swapped whole (see `snapshot`).
    snapshot: ArcSwap<Snapshot>,
    /// Serializes reloads (key changes, admin changes, SIGHUP), so one never swaps back what
    /// another just built. Never taken on the request path.
    reload_lock: Mutex<()>,
    /// The config file, re-read on SIGHUP.
    config_path: PathBuf,
    /// `keys_version` of the store the current snapshot was built from.
    loaded_version: AtomicI64,
    pub ledger: SpendLedger,
    pub metrics: Metrics,
    /// Requests between `new_ctx` and the end of `logging`.
    inflight: AtomicUsize,
    /// Set on SIGTERM: new requests are refused while in-flight ones finish.
    pub draining: AtomicBool,
    /// Failed authentications per client address (pre-auth flood shield).
    pub auth_shield: AuthShield,
    /// Traces of unauthenticated requests kept per second; the rest are only counted.
    pub unauthenticated_traces: Sampler,
    /// Connection for reads off the request path (usage, admin); used from blocking threads.
    reader: Mutex<Option<Store>>,
}

impl Gate {
    /// Builds the state and loads every key. Fails if the store or a provider address is bad.
    pub fn new(config: Config) -> Result<Gate, String> {
        let config_path = config.path.clone();
        let routes = Routes::build(config)?;
        let config = &routes.config;
        let ledger = SpendLedger::new(
            config.database.clone(),
            config.tuning.flush_interval,
            config.tuning.trace_retention_days,
            config.tuning.ledger_max_backlog,
        );
        let gate = Gate {
            auth_shield: AuthShield::new(config.tuning.auth_failures_per_minute),
            unauthenticated_traces: Sampler::new(UNAUTHENTICATED_TRACES_PER_SEC),
            snapshot: ArcSwap::from_pointee(Snapshot {
                routes: Arc::new(routes),
                keys: Arc::new(KeySet::default()),
            }),
            reload_lock: Mutex::new(()),
            config_path,
            loaded_version: AtomicI64::new(-1),
            ledger,
            metrics: Metrics::default(),
            reader: Mutex::new(None),
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        };
        let mut store = gate.open_store().map_err(|e| format!("database: {e}"))?;
        // Before keys (and their month's spend) are loaded: a crash never makes a request free.
        let orphans = store
            .charge_orphans(process_is_live)
            .map_err(|e| format!("database: charging orphaned admissions: {e}"))?;
        if orphans > 0 {
            log::warn!(
                "charged {orphans} requests left open by an unclean stop at their upper-bound cost"
            );
        }
        gate.reload_from(&store)
            .map_err(|e| format!("database: {e}"))?;
        Ok(gate)
    }

    /// The current routes and keys. The request path takes one per request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The current config's routes (catalog, providers, settings).
    pub fn routes(&self) -> Arc<Routes> {
        self.snapshot.load().routes.clone()
    }

    /// The current key set.
    pub fn keys(&self) -> Arc<KeySet> {
        self.snapshot.load().keys.clone()
    }

    pub fn open_store(&self) -> Result<Store, StoreError> {
        Store::open(&self.routes().config.database)
    }

    /// Counts a request as in flight, until [`Gate::request_ended`] (its context's drop).
    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    pub fn request_ended(&self) {
        self.inflight.fetch_sub(1, Ordering::Relaxed);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Relaxed)
    }

    /// Runs `f` with the shared read connection (blocking: call from a blocking thread).
    pub fn with_reader<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut guard = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(self.open_store()?);
        }
        match guard.as_mut() {
            Some(store) => f(store),
            None => Err(StoreError::InvalidQuery),
        }
    }

    /// Rebuilds the key snapshot if the store's keys changed since the last load.
    /// Returns whether a reload happened.
    pub fn reload_if_changed(&self, store: &Store) -> Result<bool, StoreError> {
        let version = store.keys_version()?;
        if version == self.loaded_version.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.reload_from(store)?;
        Ok(true)
    }

    /// Rebuilds the key set from the store against the current routes.
    pub fn reload_from(&self, store: &Store) -> Result<(), StoreError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let routes = self.routes();
        self.swap_in(store, routes)
    }

    /// Re-reads the config file (SIGHUP), validates it exactly as `check-config` does, and
    /// swaps it in with the keys rebuilt against it; keys' live counters carry over, and
    /// requests in flight finish on the snapshot they started with. Settings that only apply
    /// at start (listeners, database, threads) keep their running values, with a warning.
    /// On any error the running config stays and the error (with its field path) is returned.
    pub fn reload_config(&self) -> Result<(), String> {
        let mut config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        config.load_provider_keys();
        let running = self.routes();
        for (what, changed) in [
            ("listen", config.listen != running.config.listen),
            ("database", config.database != running.config.database),
            (
                "admin.listen",
                config.admin.as_ref().map(|a| &a.listen)
                    != running.config.admin.as_ref().map(|a| &a.listen),
            ),
            (
                "server.threads",
                config.tuning.threads != running.config.tuning.threads,
            ),
        ] {
            if changed {
                log::warn!("config reload: {what} changed; it takes effect at the next restart");
            }
        }
        config.listen = running.config.listen.clone();
        config.database = running.config.database.clone();
        config.admin = running.config.admin.clone();
        config.tuning.threads = running.config.tuning.threads;
        let routes = Arc::new(Routes::build(config)?);
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let store = self.open_store().map_err(|e| format!("database: {e}"))?;
        self.swap_in(&store, routes)
            .map_err(|e| format!("database: {e}"))
    }

    /// Builds the key set against `routes` and swaps both in as one snapshot. Live counters
    /// carry over; keys new to this process get their month-to-date spend and today's count
    /// from the ledger. Call with `reload_lock` held.
    fn swap_in(&self, store: &Store, routes: Arc<Routes>) -> Result<(), StoreError> {
        let version = store.keys_version()?;
        let records = store.all_keys()?;
        let previous = self.keys();
        let now = now_ms();
        let needs_restore = records.iter().any(|r| previous.by_id(&r.id).is_none());
        let (mut spend, today) = if needs_restore {
            (
                store.spend_by_key(&month_label(month_index(now)))?,
                store.requests_by_key(&day_label(day_index(now)))?,
            )
        } else {
            Default::default()
        };
        let set = KeySet::build(records, &routes.catalog, Some(&previous), |r| {
            KeyCounters::restored(
                now,
                today.get(&r.id).copied().unwrap_or(0),
                spend.remove(&r.id).unwrap_or_default(),
            )
        });
        self.metrics.set_keys_loaded(set.len());
        self.snapshot.store(Arc::new(Snapshot {
            routes,
            keys: Arc::new(set),
        }));
        self.loaded_version.store(version, Ordering::Release);
        Ok(())
    }
}

/// Whether the process that journaled an admission still runs (another gateway that handed
/// its sockets to this one with `--upgrade`, still finishing its requests). This process's
/// own pid, left by an earlier process that crashed, counts as gone.
pub fn process_is_live(pid: i64) -> bool {
    pid > 0
        && pid != i64::from(std::process::id())
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
}
