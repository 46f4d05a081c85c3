//! Shared gateway state: the hot-swapped snapshot (routes and keys), ledger, metrics, and
//! the reloads that rebuild the snapshot.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::clock::Now;
use crate::clock::{day_index, day_label, mono_ms, month_index, month_label, now_ms};
use crate::config::Config;
use crate::keys::{KeyEntry, KeySet};
use crate::ledger::{ClusterNode, SpendLedger};
use crate::limits::store::InProcess;
use crate::limits::store::LimitStore;
use crate::limits::{KeyCounters, ModelTally};
use crate::listen_tls::ListenerCerts;
use crate::metrics::Metrics;
use crate::money::Nanos;
use crate::shared::{Limiter, SharedLimits};
use crate::shield::{AuthShield, Sampler};
use crate::snapshot::{Routes, Snapshot};
use crate::store::{Store, StoreError};
use crate::telemetry::SpanQueue;
use std::collections::HashMap;

/// Unauthenticated requests traced per second, across the gateway, from addresses within
/// their failed-authentication limit (each adds at most `auth_failures_per_minute` of them a
/// minute): every one of them is traced (SPEC §4) unless bad tokens come from many
/// addresses at once faster than this.
pub const UNAUTHENTICATED_TRACES_PER_SEC: u64 = 200;

/// Refusals of addresses past their failed-authentication limit traced per second (a flood
/// of bad tokens is counted in metrics, and cannot grow the database faster than this).
pub const FLOOD_TRACES_PER_SEC: u64 = 10;

/// Above this many changed keys, one full read of the keys is cheaper than a lookup each.
const BULK_CHANGE: usize = 1_000;

/// How the change log names a group (its triggers write `'*group:' || name`).
const GROUP_CHANGE_MARK: &str = "*group:";

pub struct Gate {
    /// Routes and keys, swapped whole (see `snapshot`).
    snapshot: ArcSwap<Snapshot>,
    /// Serializes reloads (key changes, admin changes, SIGHUP), so one never swaps back what
    /// another just built. On the request path only behind an unknown token's key check
    /// ([`Gate::catch_up_keys`]), whose wait is bounded.
    reload_lock: Mutex<()>,
    /// The config file, re-read on SIGHUP.
    config_path: PathBuf,
    /// The change-log position the current key set includes.
    loaded_change: AtomicI64,
    pub ledger: SpendLedger,
    /// The alert delivery worker (`alerts`), started with the ledger writer.
    pub alerts: crate::alerts::deliver::Dispatcher,
    /// Live per-key limits: this node's counters, or Redis shared by the cluster.
    pub limits: Limiter,
    /// This gateway as a node of a cluster (`shared_state`), `None` on its own.
    pub node: Option<ClusterNode>,
    pub metrics: Metrics,
    /// Requests between `new_ctx` and the end of `logging`.
    inflight: AtomicUsize,
    /// Set on SIGTERM: new requests are refused while in-flight ones finish.
    pub draining: AtomicBool,
    /// Set on SIGQUIT (a `serve --upgrade` took the sockets): every answer closes its
    /// connection, so clients reconnect to the new process while this one finishes.
    pub handing_over: AtomicBool,
    /// Failed authentications per client address (pre-auth flood shield).
    pub auth_shield: AuthShield,
    /// Traces of unauthenticated requests kept per second; the rest are only counted.
    pub unauthenticated_traces: Sampler,
    /// Samples the refusals of a flood of bad tokens ([`FLOOD_TRACES_PER_SEC`]).
    pub flood_traces: Sampler,
    /// The certificates the listeners serve (`tls`, `admin.tls`), swapped by SIGHUP.
    pub listener_certs: ListenerCerts,
    /// `telemetry` is set: model calls get a span of the gateway's in a W3C trace. Fixed at
    /// start (the exporter is per process).
    pub trace_context: bool,
    /// A binary upgrade, this process on either side of it (`handover`).
    pub handover: crate::handover::state::Handover,
    /// When the last on-demand key check began (see [`Gate::catch_up_keys`]); held by the
    /// check's blocking task while it runs, so the requests that wait for it share it, and a
    /// caller that stops waiting never lets a second check start beside it.
    key_catch_up: Arc<tokio::sync::Mutex<Option<Instant>>>,
    /// The store handle those checks use, opened on the first.
    catch_up_store: Mutex<Option<Store>>,
}

/// On-demand key checks begin at most this often, however many unknown tokens arrive (a
/// check is one read of the change log's end: a cached statement on SQLite, a query on
/// PostgreSQL). Short: the CLI makes a key in a few milliseconds, and a caller that arrives
/// within it waits for the next check rather than be refused.
pub const KEY_CATCH_UP_GAP: Duration = Duration::from_millis(1);
/// The gap for a caller from an address past its failed-authentication limit: it may share
/// any check, but starts one at most this often, so a flood of made-up tokens costs the store
/// at most 200 reads a second, and each of its requests waits a few milliseconds for its
/// 429 (a new key from that address still works from its first request, a moment later).
pub const FLOODED_CATCH_UP_GAP: Duration = Duration::from_millis(5);
/// The longest an unknown token's request waits for a key check (a store that is locked or
/// unreachable); then it is answered as before, 401.
pub const KEY_CATCH_UP_WAIT: Duration = Duration::from_millis(250);

impl Gate {
    /// Builds the state and loads every key. Fails if the store or a provider address is bad.
    pub fn new(config: Config) -> Result<Gate, String> {
        let config_path = config.path.clone();
        let listener_certs = ListenerCerts::load(&config, now_ms() / 1000)?;
        let routes = Routes::build(config)?;
        for w in &routes.warnings {
            log::warn!("{w}");
        }
        let config = &routes.config;
        let node = config.shared_state.as_ref().map(|s| ClusterNode {
            owner: random_owner(),
            ttl: s.reservation_ttl,
        });
        let limits = match (&config.shared_state, node) {
            (Some(s), Some(n)) if s.redis_url.is_some() => Limiter::Shared(Arc::new(
                SharedLimits::new(s, n.owner as u64, config.store_location())?,
            )),
            _ => Limiter::InProcess(InProcess),
        };
        let trace_context = config.telemetry.is_some();
        let ledger = SpendLedger::new(
            config.store_location(),
            node,
            config.tuning.flush_interval,
            config.tuning.trace_retention_days,
            config.tuning.ledger_max_backlog,
            config.telemetry.as_ref().and_then(SpanQueue::new),
        );
        ledger.set_alerts(config.alerts.clone());
        let gate = Gate {
            auth_shield: AuthShield::new(config.tuning.auth_failures_per_minute),
            unauthenticated_traces: Sampler::new(UNAUTHENTICATED_TRACES_PER_SEC),
            flood_traces: Sampler::new(FLOOD_TRACES_PER_SEC),
            listener_certs,
            snapshot: ArcSwap::from_pointee(Snapshot {
                routes: Arc::new(routes),
                keys: Arc::new(KeySet::default()),
            }),
            reload_lock: Mutex::new(()),
            config_path,
            loaded_change: AtomicI64::new(-1),
            ledger,
            alerts: Default::default(),
            limits,
            node,
            metrics: Metrics::default(),
            inflight: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            handing_over: AtomicBool::new(false),
            trace_context,
            handover: Default::default(),
            key_catch_up: Arc::new(tokio::sync::Mutex::new(None)),
            catch_up_store: Mutex::new(None),
        };
        let mut store = gate.open_store().map_err(|e| format!("database: {e}"))?;
        // Days and months count from no earlier than the last trace recorded (a clock set
        // back must not start a day or a month that ended again, from zero).
        let latest = store
            .latest_trace_ms()
            .map_err(|e| format!("database: {e}"))?
            .unwrap_or(0);
        if latest > now_ms() + 1_000 {
            log::warn!(
                "the wall clock reads {}, before the last trace recorded ({}): days and months \
                 count from that until the clock passes it",
                crate::clock::rfc3339(now_ms()),
                crate::clock::rfc3339(latest)
            );
        }
        crate::clock::raise_wall_floor(latest);
        // Another process that is running (an upgrade's predecessor). Not this one: rows under
        // this process id were left by an earlier process that had it (a container's gateway
        // is pid 1 at every start), since this one has written nothing yet.
        let own = crate::owner::own();
        let other_live = |o: i64| o != own && crate::owner::is_live(o);
        // Before keys (and their month's spend) are loaded: a crash never makes a request free.
        let orphans = match node {
            None => store.charge_orphans(other_live),
            // Other nodes' admissions are theirs while their heartbeat is fresh.
            Some(n) => store
                .live_owners(now_ms() - n.ttl.as_millis() as i64)
                .and_then(|live| store.charge_orphans(|o| live.contains(&o))),
        }
        .map_err(|e| format!("database: charging orphaned admissions: {e}"))?;
        if orphans > 0 {
            log::warn!(
                "charged {orphans} requests left open by an unclean stop at their upper-bound cost"
            );
        }
        // The rolling minutes a process that stopped cleanly saved (SPEC §2: at most `rpm`
        // in any rolling 60 s, across a restart too); a live predecessor's are taken at its
        // hand-over instead (`handover::adopt`).
        let mut left_minutes = Vec::new();
        if node.is_none() {
            left_minutes = store
                .left_minutes(other_live)
                .map_err(|e| format!("database: {e}"))?;
            store
                .forget_handovers(other_live)
                .map_err(|e| format!("database: {e}"))?;
        }
        gate.reload_from(&store)
            .map_err(|e| format!("database: {e}"))?;
        // Known to CLI changes from the start: one made before this process's first poll
        // waits for that poll (`key_sync`), not for nobody.
        store
            .note_keys_applied(crate::owner::own(), gate.loaded_change())
            .map_err(|e| format!("database: {e}"))?;
        if !left_minutes.is_empty() {
            log::info!(
                "counting {} admissions of the last minute before the restart",
                left_minutes.len()
            );
            crate::handover::state::seed_minutes(&gate.keys(), Now::read(), left_minutes);
        }
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

    /// A token no key in the snapshot has: applies the store's key changes now instead of at
    /// the next poll, so a key made by another process (the CLI) works from its first
    /// request. A check begins at most every `gap` ([`KEY_CATCH_UP_GAP`], or
    /// [`FLOODED_CATCH_UP_GAP`]) after the last one and one at a time; a caller that arrives
    /// while one runs, or within the gap, waits for the next. Returns once a check that began
    /// after the caller arrived has ended (the snapshot is then as fresh as the store), false
    /// if it failed. Callers bound the wait ([`KEY_CATCH_UP_WAIT`]).
    pub async fn catch_up_keys(self: &Arc<Self>, gap: Duration) -> bool {
        let arrived = Instant::now();
        loop {
            let mut last = self.key_catch_up.clone().lock_owned().await;
            match *last {
                // Began after this caller arrived and is done (its lock is free).
                Some(began) if began >= arrived => return true,
                Some(began) if began.elapsed() < gap => {
                    drop(last);
                    tokio::time::sleep_until((began + gap).into()).await;
                    continue;
                }
                _ => {}
            }
            *last = Some(Instant::now());
            let gate = self.clone();
            // The lock goes with the task: held until the check ends, even if this caller
            // stops waiting.
            return tokio::task::spawn_blocking(move || {
                let _running = last;
                gate.check_key_changes()
            })
            .await
            .unwrap_or(false);
        }
    }

    /// One on-demand key check (see [`Gate::catch_up_keys`]), on a blocking thread.
    fn check_key_changes(&self) -> bool {
        let mut slot = self
            .catch_up_store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            match self.open_store() {
                Ok(s) => *slot = Some(s),
                Err(e) => {
                    log::debug!("key check: cannot open the store: {e}");
                    return false;
                }
            }
        }
        let Some(store) = slot.as_ref() else {
            return false;
        };
        match self.reload_if_changed(store) {
            Ok(n) => {
                if n > 0 {
                    log::info!("keys: {n} changes applied on demand");
                }
                true
            }
            Err(e) => {
                // The poll logs the store's failures; this one is on every unknown token.
                log::debug!("key check failed, keeping the last snapshot: {e}");
                *slot = None;
                false
            }
        }
    }

    pub fn open_store(&self) -> Result<Store, StoreError> {
        Store::open_at(&self.routes().config.store_location())
    }

    /// A key's live usage report, from a blocking thread (the admin API): this node's
    /// counters, or one Redis read for a cluster.
    pub fn live_usage_blocking(&self, key: &Arc<KeyEntry>) -> serde_json::Value {
        let now = Now::read();
        let view = match (&self.limits, tokio::runtime::Handle::try_current()) {
            (Limiter::Shared(_), Ok(rt)) => rt.block_on(self.limits.view(key, now)),
            _ => key.counters.view(now, &key.limits),
        };
        crate::report::live_usage(key, &view, now.wall)
    }

    /// Counts a request as in flight, until [`Gate::request_ended`] (its context's drop).
    pub fn request_started(&self) {
        self.inflight.fetch_add(1, Ordering::Relaxed);
    }

    /// Release (the same `lock xadd` as relaxed on x86): a reader that sees the count drop
    /// also sees this request's ledger entry counted as finished.
    pub fn request_ended(&self) {
        self.inflight.fetch_sub(1, Ordering::Release);
    }

    pub fn inflight(&self) -> usize {
        self.inflight.load(Ordering::Acquire)
    }

    /// The key-change position the live snapshot has applied (-1 before the first load).
    pub fn loaded_change(&self) -> i64 {
        self.loaded_change.load(Ordering::Acquire)
    }

    /// Applies the keys changed in the store since the last load: N changes cost O(N) (the
    /// change log names them; see `keys::set`). Falls back to a full reload when the log
    /// was pruned past what this process has. Returns how many keys changed.
    pub fn reload_if_changed(&self, store: &Store) -> Result<usize, StoreError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = self.loaded_change.load(Ordering::Acquire);
        let changes = store.key_changes_since(loaded)?;
        // A pruned log, or a bulk change (one read of every key beats that many lookups):
        // reload in full.
        // A group changed ('*group:<name>' in the log): rebuilt in full (groups are few and
        // change rarely; the keys' live counters carry over).
        let changes =
            changes.filter(|(_, ids)| !ids.iter().any(|id| id.starts_with(GROUP_CHANGE_MARK)));
        let Some((newest, ids)) = changes.filter(|(_, ids)| ids.len() <= BULK_CHANGE) else {
            let routes = self.routes();
            self.swap_in(store, routes, true)?;
            return Ok(self.keys().len());
        };
        if ids.is_empty() {
            return Ok(0);
        }
        let mut changed = Vec::with_capacity(ids.len());
        let mut removed = Vec::new();
        for id in ids {
            match store.get_key(&id)? {
                Some(k) => changed.push(k),
                None => removed.push(id),
            }
        }
        let count = changed.len() + removed.len();
        let current = self.snapshot();
        let now = now_ms();
        // Groups a key joined or left: their spend is the sum of their keys' again.
        let regrouped: Vec<String> = changed
            .iter()
            .filter_map(|k| {
                let old = current.keys.by_id(&k.id).and_then(|e| e.group.clone());
                (old.as_deref() != k.group.as_deref()).then(|| {
                    old.map(|g| g.to_string())
                        .into_iter()
                        .chain(k.group.clone())
                })
            })
            .flatten()
            .collect();
        let keys = current
            .keys
            .apply(changed, &removed, &current.routes.catalog, |r| {
                restored_counters(store, &r.id, now)
            });
        for name in &regrouped {
            crate::fleet::reseed_group(&keys, name, Now::read());
        }
        self.metrics.key_changes_applied(count);
        self.metrics.set_keys_loaded(keys.len());
        self.snapshot.store(Arc::new(Snapshot {
            routes: current.routes.clone(),
            keys: Arc::new(keys),
        }));
        self.loaded_change.store(newest, Ordering::Release);
        Ok(count)
    }

    /// Rebuilds the key set from the store against the current routes.
    pub fn reload_from(&self, store: &Store) -> Result<(), StoreError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let routes = self.routes();
        self.swap_in(store, routes, true)
    }

    /// Rebuilds the key set with every counter read from the ledger again (none carried
    /// over): a process started with `--upgrade`, once its predecessor committed, before it
    /// serves anything.
    pub fn reload_fresh(&self, store: &Store) -> Result<(), StoreError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let routes = self.routes();
        self.swap_in(store, routes, false)
    }

    /// Re-reads the config file (SIGHUP), validates it exactly as `check-config` does, and
    /// swaps it in with the keys rebuilt against it; keys' live counters carry over, and
    /// requests in flight finish on the snapshot they started with. Settings that only apply
    /// at start (listeners, database, threads) keep their running values, with a warning.
    /// On any error the running config stays and the error (with its field path) is returned.
    pub fn reload_config(&self) -> Result<(), String> {
        let before = self.config_summary();
        let result = self.reload_config_file();
        // Recorded in the audit log either way: what the reload changed, or why it did not.
        if let Ok(mut store) = self.open_store() {
            let (action, after) = match &result {
                Ok(()) => ("config.reload", self.config_summary()),
                Err(e) => ("config.reload_failed", serde_json::json!({ "error": e })),
            };
            crate::audit::record(
                &mut store,
                &crate::audit::Actor::signal("SIGHUP"),
                action,
                &self.config_path.display().to_string(),
                Some(before),
                Some(after),
                now_ms(),
            );
        }
        result
    }

    /// What a config reload may change, for the audit log: each model's prices and limits,
    /// the providers and the aliases (no provider keys: only the names of their variables).
    fn config_summary(&self) -> serde_json::Value {
        let routes = self.routes();
        let c = &routes.config;
        let models: serde_json::Map<String, serde_json::Value> = c
            .models
            .iter()
            .map(|m| {
                (
                    m.id.clone(),
                    serde_json::json!({
                        "provider": c.providers[m.provider].name,
                        "upstream_id": m.upstream_id,
                        "input_usd_per_mtok": m.input_price.usd_per_mtok(),
                        "output_usd_per_mtok": m.output_price.usd_per_mtok(),
                        "max_output_tokens": m.max_output_tokens,
                        "context_window_tokens": m.context_window_tokens,
                    }),
                )
            })
            .collect();
        serde_json::json!({
            "providers": c.providers.iter().map(|p| &p.name).collect::<Vec<_>>(),
            "models": models,
            "aliases": c.aliases.keys().collect::<Vec<_>>(),
        })
    }

    fn reload_config_file(&self) -> Result<(), String> {
        let mut config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        config.load_provider_keys();
        crate::providers::mask::know_provider_keys_of(&config);
        // Certificate files are re-read first and swapped in only if the whole reload holds.
        let certs = self.listener_certs.prepare(&config, now_ms() / 1000)?;
        let running = self.routes();
        for (what, changed) in [
            ("listen", config.listen != running.config.listen),
            ("database", config.database != running.config.database),
            (
                "shared_state",
                format!("{:?}", config.shared_state)
                    != format!("{:?}", running.config.shared_state),
            ),
            (
                "admin.listen",
                config.admin.as_ref().map(|a| &a.listen)
                    != running.config.admin.as_ref().map(|a| &a.listen),
            ),
            (
                "server.threads",
                config.tuning.threads != running.config.tuning.threads,
            ),
            ("telemetry", config.telemetry != running.config.telemetry),
        ] {
            if changed {
                log::warn!("config reload: {what} changed; it takes effect at the next restart");
            }
        }
        config.listen = running.config.listen.clone();
        config.database = running.config.database.clone();
        config.shared_state = running.config.shared_state.clone();
        // The admin listener stays where it is; its token is read at every call, so a new
        // `token_env` applies to the next one.
        let token_env = config.admin.as_ref().map(|a| a.token_env.clone());
        config.admin = running.config.admin.clone();
        let mut unset_token_env = None;
        if let (Some(admin), Some(env)) = (config.admin.as_mut(), token_env) {
            if admin.token_env != env && crate::config::admin_token_from_env(&env).is_none() {
                unset_token_env = Some(env.clone());
            }
            admin.token_env = env;
        }
        config.tuning.threads = running.config.tuning.threads;
        // The exporter and the request path's trace-context switch are fixed at start.
        config.telemetry = running.config.telemetry.clone();
        let alerts = config.alerts.clone();
        let routes = Arc::new(Routes::build(config)?);
        for w in routes.warnings.iter().chain(&certs.warnings) {
            log::warn!("config reload: {w}");
        }
        let _guard = self.reload_lock.lock().unwrap_or_else(|e| e.into_inner());
        let store = self.open_store().map_err(|e| format!("database: {e}"))?;
        self.swap_in(&store, routes, true)
            .map_err(|e| format!("database: {e}"))?;
        certs.apply();
        if let Some(env) = unset_token_env {
            log::warn!("config reload: ${env} is not set: the admin API refuses every call");
        }
        // New thresholds and webhooks apply from the ledger's next commit and the delivery
        // worker's next round.
        self.ledger.set_alerts(alerts);
        Ok(())
    }

    /// Builds the key set against `routes` and swaps both in as one snapshot. Live counters
    /// carry over; keys new to this process get their month-to-date spend and today's count
    /// from the ledger (all keys, unless `carry`). Call with `reload_lock` held.
    fn swap_in(&self, store: &Store, routes: Arc<Routes>, carry: bool) -> Result<(), StoreError> {
        let version = store.last_key_change()?;
        let count = store.key_count()?;
        let previous = if carry {
            self.keys()
        } else {
            Arc::new(KeySet::default())
        };
        let now = now_ms();
        // Keys new to this process start from the ledger: read whole when many keys are new
        // (start-up), else one key at a time for the few the snapshot lacks.
        let month = month_label(month_index(now));
        let day = day_label(day_index(now));
        let read_ledger = || -> Result<_, StoreError> {
            Ok((store.spend_by_key(&month)?, store.requests_by_key(&day)?))
        };
        let mut ledger = if count.saturating_sub(previous.len()) > BULK_CHANGE {
            Some(read_ledger()?)
        } else {
            None
        };
        // This month's spend of every key's minted keys (SPEC §7), for keys new to this
        // process: their budget counts it too.
        let parents = store.key_parents()?;
        // Looked up once per key: a set, not a scan of every minted key per key.
        let has_children: std::collections::HashSet<&str> =
            parents.iter().map(|(_, p)| p.as_str()).collect();
        let tree_spend = |id: &str, spend: Option<&HashMap<String, Vec<ModelTally>>>| {
            if !has_children.contains(id) {
                return Nanos::ZERO;
            }
            match spend {
                Some(all) => crate::fleet::tree_total(id, &parents, all),
                None => store.tree_spend(id, &month).unwrap_or_else(|e| {
                    log::warn!("key {id}: cannot read its tree's spend, starting from zero: {e}");
                    Nanos::ZERO
                }),
            }
        };
        let mut singles = 0;
        let mut builder = KeySet::builder(count, &routes.catalog, Some(&previous));
        // Counters of a key new to this process, from the ledger.
        let mut new_counters = |id: &str| -> Option<KeyCounters> {
            if ledger.is_none() && singles >= BULK_CHANGE {
                match read_ledger() {
                    Ok(whole) => ledger = Some(whole),
                    Err(e) => log::warn!("reading the ledger for new keys: {e}"),
                }
            }
            let Some((spend, today)) = ledger.as_mut() else {
                singles += 1;
                let tree = tree_spend(id, None);
                return Some(restored_counters(store, id, now).with_tree_spent(tree));
            };
            let tree = tree_spend(id, Some(spend));
            let today = today.get(id).copied();
            // A tree's sum reads its descendants' rows, so they stay while any key has one;
            // else each key's rows are moved out, not copied (a million keys at start-up).
            let spend = if parents.is_empty() {
                spend.remove(id)
            } else {
                spend.get(id).cloned()
            };
            // Nothing in the ledger: the counters are made on first use.
            (today.is_some() || spend.is_some() || tree > Nanos::ZERO).then(|| {
                KeyCounters::restored(now, today.unwrap_or(0), spend.unwrap_or_default())
                    .with_tree_spent(tree)
            })
        };
        // The hour window counts up to 61 minutes back (limits::brakes).
        let hour_ago = now - 3_660_000;
        store.for_each_key_row(|row| {
            let hourly = row.limits.max_usd_per_hour.is_some();
            builder.add(row, |id| {
                let counters = new_counters(id);
                if !hourly {
                    return counters;
                }
                // A key with an hourly cap, new to this process (a restart): its last hour
                // of spend comes back from the traces.
                match store.recent_charges(id, hour_ago) {
                    Ok(charges) if !charges.is_empty() => {
                        let c =
                            counters.unwrap_or_else(|| KeyCounters::restored(now, 0, Vec::new()));
                        c.seed_hour(
                            Now {
                                wall: now,
                                mono: mono_ms(),
                            },
                            &charges,
                        );
                        Some(c)
                    }
                    Ok(_) => counters,
                    Err(e) => {
                        log::warn!("key {id}: cannot read its last hour of spend: {e}");
                        counters
                    }
                }
            })
        })?;
        let groups =
            crate::fleet::Groups::build(&store.all_groups()?, Some(previous.groups()), |g| {
                let spend = store.group_spend(&g.name, &month).unwrap_or_else(|e| {
                    log::warn!(
                        "group {}: cannot read its spend, starting from zero: {e}",
                        g.name
                    );
                    Vec::new()
                });
                let tallies = spend.into_iter().map(ModelTally::from).collect();
                KeyCounters::restored(now, 0, tallies)
            });
        let set = builder.finish().with_groups(Arc::new(groups));
        self.metrics.set_keys_loaded(set.len());
        self.snapshot.store(Arc::new(Snapshot {
            routes,
            keys: Arc::new(set),
        }));
        self.loaded_change.store(version, Ordering::Release);
        Ok(())
    }
}

/// A random positive id for this process as a cluster node (journal owner, Redis holds).
fn random_owner() -> i64 {
    let mut b = [0u8; 8];
    // No entropy is a broken machine; the clock still tells two starts apart.
    if getrandom::getrandom(&mut b).is_err() {
        b = now_ms().to_le_bytes();
    }
    (i64::from_le_bytes(b) & i64::MAX).max(1)
}

/// Counters for a key new to this process: this month's spend per model and today's count
/// from the ledger (a missing row or a read error starts from zero, logged).
fn restored_counters(store: &Store, id: &str, now: i64) -> KeyCounters {
    let month = month_label(month_index(now));
    let spend = store
        .spend_for_key(id, &month)
        .map(|rows| {
            rows.into_iter()
                .map(crate::limits::ModelTally::from)
                .collect()
        })
        .unwrap_or_else(|e| {
            log::warn!("key {id}: cannot read its spend, starting from zero: {e}");
            Vec::new()
        });
    let today = store
        .requests_on(id, &day_label(day_index(now)))
        .unwrap_or(0);
    KeyCounters::restored(now, today, spend)
}
