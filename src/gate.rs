//! Shared gateway state: config, catalog, the hot-swapped key snapshot, ledger and metrics.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::admission::Endpoint;
use crate::catalog::Catalog;
use crate::clock::{day_index, day_label, month_index, month_label, now_ms};
use crate::config::Config;
use crate::keys::KeySet;
use crate::ledger::SpendLedger;
use crate::limits::KeyCounters;
use crate::metrics::Metrics;
use crate::shield::{AuthShield, Sampler};
use crate::store::{Store, StoreError};

/// Unauthenticated requests traced per second, across the gateway (a flood of bad tokens
/// is counted in metrics, and cannot grow the database faster than this).
pub const UNAUTHENTICATED_TRACES_PER_SEC: u64 = 10;

pub struct Gate {
    pub config: Config,
    pub catalog: Catalog,
    /// Resolved address of each provider, by provider index.
    pub provider_addrs: Vec<SocketAddr>,
    /// Upstream request URIs by provider: `[chat completions, embeddings]`.
    upstream_uris: Vec<[http::Uri; 2]>,
    /// Per provider, built once: `Authorization` (the provider's own key) and `Host`.
    pub provider_headers: Vec<ProviderHeaders>,
    /// Per model, its id as a header value (`X-SpiderGate-Model`, fallback header).
    pub model_headers: Vec<http::HeaderValue>,
    /// Model ids and provider names, shared into every trace without copying.
    pub model_names: Vec<Arc<str>>,
    pub provider_names: Vec<Arc<str>>,
    pub keys: ArcSwap<KeySet>,
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
        let mut provider_addrs = Vec::with_capacity(config.providers.len());
        for (i, p) in config.providers.iter().enumerate() {
            let addr = p
                .resolve()
                .map_err(|e| format!("providers[{i}].base_url: cannot resolve {}: {e}", p.host))?;
            provider_addrs.push(addr);
        }
        let mut upstream_uris = Vec::with_capacity(config.providers.len());
        for (i, p) in config.providers.iter().enumerate() {
            let uri = |suffix: &str| {
                http::Uri::try_from(format!("{}{suffix}", p.base_path))
                    .map_err(|e| format!("providers[{i}].base_url: bad path: {e}"))
            };
            upstream_uris.push([
                uri(Endpoint::ChatCompletions.upstream_suffix())?,
                uri(Endpoint::Embeddings.upstream_suffix())?,
            ]);
        }
        let mut provider_headers = Vec::with_capacity(config.providers.len());
        for (i, p) in config.providers.iter().enumerate() {
            let value = |v: &str, what: &str| {
                http::HeaderValue::from_str(v)
                    .map_err(|_| format!("providers[{i}]: {what} is not a valid header value"))
            };
            let mut authorization = match &p.authorization {
                Some(a) => Some(value(a, "the API key")?),
                None => None,
            };
            if let Some(a) = authorization.as_mut() {
                a.set_sensitive(true);
            }
            provider_headers.push(ProviderHeaders {
                authorization,
                host: value(&p.host_header, "the host")?,
            });
        }
        let mut model_headers = Vec::with_capacity(config.models.len());
        for (i, m) in config.models.iter().enumerate() {
            model_headers.push(
                http::HeaderValue::from_str(&m.id)
                    .map_err(|_| format!("models[{i}].id: not usable in a header"))?,
            );
        }
        let catalog = Catalog::new(&config);
        let ledger = SpendLedger::new(
            config.database.clone(),
            config.tuning.flush_interval,
            config.tuning.trace_retention_days,
            config.tuning.ledger_max_backlog,
        );
        let gate = Gate {
            catalog,
            provider_addrs,
            upstream_uris,
            provider_headers,
            model_headers,
            model_names: config
                .models
                .iter()
                .map(|m| Arc::from(m.id.as_str()))
                .collect(),
            provider_names: config
                .providers
                .iter()
                .map(|p| Arc::from(p.name.as_str()))
                .collect(),
            keys: ArcSwap::from_pointee(KeySet::default()),
            loaded_version: AtomicI64::new(-1),
            ledger,
            metrics: Metrics::default(),
            reader: Mutex::new(None),
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            auth_shield: AuthShield::new(config.tuning.auth_failures_per_minute),
            unauthenticated_traces: Sampler::new(UNAUTHENTICATED_TRACES_PER_SEC),
            config,
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

    pub fn open_store(&self) -> Result<Store, StoreError> {
        Store::open(&self.config.database)
    }

    /// The request URI for `endpoint` on provider `p` (precomputed: no formatting per request).
    pub fn upstream_uri(&self, p: usize, endpoint: Endpoint) -> &http::Uri {
        let i = match endpoint {
            Endpoint::Embeddings => 1,
            _ => 0,
        };
        &self.upstream_uris[p][i]
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

    /// Rebuilds the snapshot from the store. Live counters carry over; keys new to this
    /// process get their month-to-date spend and today's count from the ledger.
    pub fn reload_from(&self, store: &Store) -> Result<(), StoreError> {
        let version = store.keys_version()?;
        let records = store.all_keys()?;
        let previous = self.keys.load_full();
        let now = now_ms();
        let needs_restore = records.iter().any(|r| previous.by_id(&r.id).is_none());
        let (spend, today) = if needs_restore {
            (
                store.spend_by_key(&month_label(month_index(now)))?,
                store.requests_by_key(&day_label(day_index(now)))?,
            )
        } else {
            Default::default()
        };
        let mut spend = spend;
        let set = KeySet::build(records, &self.catalog, Some(&previous), |r| {
            KeyCounters::restored(
                now,
                today.get(&r.id).copied().unwrap_or(0),
                spend.remove(&r.id).unwrap_or_default(),
            )
        });
        self.metrics.set_keys_loaded(set.len());
        self.keys.store(Arc::new(set));
        self.loaded_version.store(version, Ordering::Release);
        Ok(())
    }
}

/// Request headers for one provider, built once at start-up.
pub struct ProviderHeaders {
    pub authorization: Option<http::HeaderValue>,
    pub host: http::HeaderValue,
}

/// Whether the process that journaled an admission still runs (another gateway that handed
/// its sockets to this one with `--upgrade`, still finishing its requests). This process's
/// own pid, left by an earlier process that crashed, counts as gone.
pub fn process_is_live(pid: i64) -> bool {
    pid > 0
        && pid != i64::from(std::process::id())
        && std::path::Path::new(&format!("/proc/{pid}")).exists()
}
