//! State the nodes of a cluster share (`shared_state`): live limits in Redis, with this
//! node's own counters as the fallback `on_error` allows, and the [`Limiter`] the request
//! path uses, which is either this or the in-process store.
//!
//! What is shared, what stays local, and why a hard budget cannot be overshot:
//! `docs/cluster.md`.

pub mod redis;
mod resp;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::{day_label, month_label, Now};
use crate::config::{OnError, SharedState};
use crate::error::GateError;
use crate::keys::KeyEntry;
use crate::limits::store::{InProcess, LimitStore};
use crate::limits::{Charge, CounterView, ModelTally, Reservation, Standing, Upline};
use crate::money::Nanos;
use crate::store::{Store, StoreLocation};

use self::redis::{Admit, RedisLimits, Settled, SharedError};

/// The live limits the request path uses: this node's, or the cluster's.
pub enum Limiter {
    InProcess(InProcess),
    Shared(Arc<SharedLimits>),
}

impl Limiter {
    pub fn shared(&self) -> Option<&Arc<SharedLimits>> {
        match self {
            Limiter::Shared(s) => Some(s),
            Limiter::InProcess(_) => None,
        }
    }
}

impl LimitStore for Limiter {
    // Borrows `self` and `key` (the future lives no longer than the request's hook): no
    // reference count is touched per request. The Redis path is boxed: its future is ~7 KB
    // and, inlined, it would make every request's `request_filter` future (which Pingora's
    // `async_trait` boxes, copying its whole size) that large on one node too.
    async fn admit(
        &self,
        key: &Arc<KeyEntry>,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Result<(Standing, Reservation), GateError> {
        match self {
            Limiter::InProcess(_) => InProcess::admit_now(key, uplines, now, bound, digest),
            Limiter::Shared(s) => Box::pin(s.admit(key, uplines, now, bound, digest, res_id)).await,
        }
    }

    async fn admit_usage_call(&self, key: &Arc<KeyEntry>, now: Now) -> Result<Standing, GateError> {
        match self {
            Limiter::InProcess(_) => key.counters.admit_usage_call(now, &key.limits),
            Limiter::Shared(s) => Box::pin(s.admit_usage_call(key, now)).await,
        }
    }

    fn standing(&self, key: &KeyEntry, now: Now) -> Standing {
        match self {
            Limiter::InProcess(l) => l.standing(key, now),
            Limiter::Shared(_) => key.counters.shared_standing(&key.limits),
        }
    }

    fn settle(
        &self,
        key: &Arc<KeyEntry>,
        reservation: Reservation,
        charge: Option<Charge<'_>>,
        finishing: bool,
    ) {
        match (self, reservation.shared_id()) {
            (Limiter::Shared(s), Some(id)) => s.settle(key, &reservation, id, charge, finishing),
            (Limiter::Shared(s), None) => {
                // A fallback admission (Redis was down): its cost goes to Redis' month too.
                s.book_fallback(key, reservation.month(), charge.as_ref());
                InProcess::settle_now(key, reservation, charge, finishing);
            }
            // Taken by this node's counters (one node): released there.
            _ => InProcess::settle_now(key, reservation, charge, finishing),
        }
    }

    async fn view(&self, key: &Arc<KeyEntry>, now: Now) -> CounterView {
        match self {
            Limiter::InProcess(_) => key.counters.view(now, &key.limits),
            Limiter::Shared(s) => Box::pin(s.view(key, now)).await,
        }
    }
}

/// A settlement Redis did not take (it was down): retried by [`SharedLimits::run`] until
/// it is, so the node's heartbeat never keeps a finished request's hold alive.
struct Unsettled {
    key_id: Arc<str>,
    res_id: u64,
    /// The admission's month (Redis' clock), where the cost belongs.
    month: i64,
    charge: Option<OwnedCharge>,
    /// The cost of an admission this node decided on its own counters while Redis was
    /// down ([`SharedLimits::book_fallback`]): no hold of it is in Redis.
    fallback: bool,
}

#[derive(Clone)]
struct OwnedCharge {
    model: Arc<str>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cost: Nanos,
}

impl OwnedCharge {
    fn of(c: &Charge<'_>) -> OwnedCharge {
        OwnedCharge {
            model: c.model.clone(),
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            cost: c.cost,
        }
    }

    fn as_charge(&self) -> Charge<'_> {
        Charge {
            model: &self.model,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            cost: self.cost,
        }
    }
}

/// Why a shared admission could not be decided in Redis.
enum Failure {
    /// Redis did not answer: the circuit opens, `on_error` applies until it answers again.
    Redis(SharedError),
    /// The ledger (PostgreSQL) could not be read to seed a key's month.
    Ledger(String),
}

/// Counters of the shared store's health, for `/metrics` and `/health`.
#[derive(Debug, Default)]
pub struct SharedHealth {
    /// Redis answered the last call.
    pub redis_up: AtomicBool,
    /// Admissions decided by this node's counters because Redis was unreachable.
    pub fallbacks: AtomicU64,
    /// Hard-budget requests refused with `limits_unavailable`.
    pub refused: AtomicU64,
    /// Holds of crashed nodes charged at their estimate by this node's sweeps.
    pub reaped: AtomicU64,
    /// Settlements waiting for Redis to come back.
    pub unsettled: AtomicU64,
    /// Settlements whose hold had already expired and been charged at its estimate.
    pub late_settles: AtomicU64,
    /// Settlement tasks running now (a draining node waits for them before it exits).
    pub settling: AtomicU64,
}

/// Live limits in Redis, shared by every node; this node's counters stand in while Redis is
/// unreachable, as `on_error` says.
pub struct SharedLimits {
    redis: RedisLimits,
    on_error: OnError,
    ttl: Duration,
    /// Where this month's spend is read from when Redis has no state for a key yet.
    store: StoreLocation,
    pub health: SharedHealth,
    unsettled: Mutex<Vec<Unsettled>>,
    /// Ids for fallback costs booked into Redis (high bit set: never a journal id, so never
    /// an open hold's).
    fallback_ids: AtomicU64,
}

/// The first id of [`SharedLimits::fallback_ids`].
const FALLBACK_IDS: u64 = 1 << 63;

impl SharedLimits {
    pub fn new(cfg: &SharedState, node: u64, store: StoreLocation) -> Result<SharedLimits, String> {
        let url = cfg
            .redis_url
            .as_deref()
            .ok_or("shared_state: live limits need redis_url_env")?;
        let redis = RedisLimits::new(url, node, cfg.reservation_ttl, cfg.timeout)
            .map_err(|e| format!("shared_state.redis_url_env: {e}"))?;
        let health = SharedHealth::default();
        health.redis_up.store(true, Ordering::Relaxed);
        Ok(SharedLimits {
            redis,
            on_error: cfg.on_error,
            ttl: cfg.reservation_ttl,
            store,
            health,
            unsettled: Mutex::new(Vec::new()),
            fallback_ids: AtomicU64::new(FALLBACK_IDS),
        })
    }

    pub fn redis(&self) -> &RedisLimits {
        &self.redis
    }

    /// Settlements on their way to Redis.
    pub fn settling(&self) -> u64 {
        self.health.settling.load(Ordering::Acquire)
    }

    pub fn redis_up(&self) -> bool {
        self.health.redis_up.load(Ordering::Relaxed)
    }

    fn mark(&self, up: bool, what: &str, err: Option<&SharedError>) {
        // A read first: on the request path the flag almost never changes, and a plain load
        // keeps its cache line shared between cores.
        if self.health.redis_up.load(Ordering::Relaxed) == up {
            return;
        }
        let was = self.health.redis_up.swap(up, Ordering::Relaxed);
        match (was, up, err) {
            (true, false, Some(e)) => log::error!(
                "shared limits: Redis unreachable during {what}, on_error={:?} applies until it answers: {e}",
                self.on_error
            ),
            (false, true, _) => log::warn!("shared limits: Redis answers again"),
            _ => {}
        }
    }

    /// The decision when Redis cannot be asked: hard-budget keys pause under `closed` (no
    /// node may spend a budget the others cannot see); otherwise this node's counters.
    fn fallback(
        &self,
        key: &KeyEntry,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        digest: Option<u128>,
    ) -> Result<(Standing, Reservation), GateError> {
        if self.on_error == OnError::Closed && crate::limits::hard_capped(&key.limits, uplines) {
            self.health.refused.fetch_add(1, Ordering::Relaxed);
            return Err(GateError::LimitsUnavailable);
        }
        self.health.fallbacks.fetch_add(1, Ordering::Relaxed);
        InProcess::admit_now(key, uplines, now, bound, digest)
    }

    async fn admit(
        &self,
        key: &Arc<KeyEntry>,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Result<(Standing, Reservation), GateError> {
        // Known down: no round trip (and no timeout) per request; the upkeep loop notices
        // within a second when Redis answers again.
        if !self.redis_up() {
            return self.fallback(key, uplines, now, bound, digest);
        }
        match self
            .admit_in_redis(key, uplines, now, bound, digest, res_id)
            .await
        {
            Ok(decision) => {
                self.mark(true, "admission", None);
                decision
            }
            Err(Failure::Redis(e)) => {
                self.mark(false, "admission", Some(&e));
                self.fallback(key, uplines, now, bound, digest)
            }
            // Redis answers; only this key's month could not be read from the ledger. Decided
            // as if Redis were down, for this request alone (the circuit stays closed).
            Err(Failure::Ledger(e)) => {
                log::debug!("key {}: cannot seed its month from the ledger: {e}", key.id);
                self.fallback(key, uplines, now, bound, digest)
            }
        }
    }

    async fn admit_in_redis(
        &self,
        key: &Arc<KeyEntry>,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Result<Result<(Standing, Reservation), GateError>, Failure> {
        // At most one seed per level per call: a second NeedSeed for the same level means
        // the seed did not stick.
        let mut seeded = Vec::new();
        for _ in 0..uplines.len() + 2 {
            match self
                .redis
                .admit(&key.id, &key.limits, uplines, bound, digest, res_id)
                .await
                .map_err(Failure::Redis)?
            {
                Admit::Admitted {
                    standing,
                    month,
                    at_ms,
                } => {
                    key.counters
                        .note_shared_admission(now, &key.limits, uplines, standing);
                    let held = if crate::limits::hard_capped(&key.limits, uplines) {
                        bound.max(Nanos::ZERO)
                    } else {
                        Nanos::ZERO
                    };
                    return Ok(Ok((
                        standing,
                        Reservation::in_shared_store(held, month, res_id, at_ms),
                    )));
                }
                Admit::Rejected(e) => return Ok(Err(e)),
                Admit::NeedSeed { month, day, level } if !seeded.contains(&level) => {
                    seeded.push(level);
                    // Boxed: once a month per key, and a future of kilobytes (the ledger
                    // read) that would otherwise be copied with every admission's.
                    match level.checked_sub(1).and_then(|i| uplines.get(i)) {
                        None => Box::pin(self.seed(&key.id, month, day)).await?,
                        Some(u) => Box::pin(self.seed_level(u, month, day)).await?,
                    }
                }
                Admit::NeedSeed { .. } => break,
            }
        }
        Err(Failure::Redis(SharedError::Unavailable(
            "this month's state could not be seeded".into(),
        )))
    }

    /// Writes a key's month (spend per model, and its minted keys' spend) and today's count
    /// from the ledger into Redis, once: Redis keeps the first seed and ignores later ones,
    /// so a seed is never added twice.
    async fn seed(&self, key_id: &Arc<str>, month: i64, day: i64) -> Result<(), Failure> {
        let store = self.store.clone();
        let id = key_id.clone();
        let read = tokio::task::spawn_blocking(
            move || -> Result<(Vec<ModelTally>, u32, Nanos), String> {
                let store = Store::open_at(&store).map_err(|e| e.to_string())?;
                let label = month_label(month);
                let rows = store
                    .spend_for_key(&id, &label)
                    .map_err(|e| e.to_string())?;
                let today = store
                    .requests_on(&id, &day_label(day))
                    .map_err(|e| e.to_string())?;
                let tree = store.tree_spend(&id, &label).map_err(|e| e.to_string())?;
                let tallies = rows.into_iter().map(ModelTally::from).collect();
                Ok((tallies, today, tree))
            },
        )
        .await
        .map_err(|e| Failure::Ledger(format!("seed task: {e}")))?
        .map_err(Failure::Ledger)?;
        let prefix = format!("{{sg}}:k:{key_id}");
        self.redis
            .seed_at(&prefix, month, day, &read.0, read.1, read.2)
            .await
            .map_err(Failure::Redis)
    }

    /// Seeds a level above a key: a parent as a key, a group with its keys' spend.
    async fn seed_level(&self, u: &Upline, month: i64, day: i64) -> Result<(), Failure> {
        if u.level == crate::limits::Level::Parent {
            return self.seed(&u.id, month, day).await;
        }
        let store = self.store.clone();
        let name = u.id.clone();
        let rows = tokio::task::spawn_blocking(move || -> Result<Vec<ModelTally>, String> {
            let store = Store::open_at(&store).map_err(|e| e.to_string())?;
            let rows = store
                .group_spend(&name, &month_label(month))
                .map_err(|e| e.to_string())?;
            Ok(rows.into_iter().map(ModelTally::from).collect())
        })
        .await
        .map_err(|e| Failure::Ledger(format!("seed task: {e}")))?
        .map_err(Failure::Ledger)?;
        self.redis
            .seed_at(&redis::level_prefix(u), month, day, &rows, 0, Nanos::ZERO)
            .await
            .map_err(Failure::Redis)
    }

    async fn admit_usage_call(&self, key: &Arc<KeyEntry>, now: Now) -> Result<Standing, GateError> {
        if !self.redis_up() {
            return key.counters.admit_usage_call(now, &key.limits);
        }
        match self.redis.admit_usage_call(&key.id, &key.limits).await {
            Ok(decision) => {
                self.mark(true, "usage call", None);
                decision
            }
            Err(e) => {
                self.mark(false, "usage call", Some(&e));
                key.counters.admit_usage_call(now, &key.limits)
            }
        }
    }

    /// Settles in a task (never waits): from `Drop`, or a request that ended without a
    /// complete response.
    fn settle(
        self: &Arc<Self>,
        key: &Arc<KeyEntry>,
        reservation: &Reservation,
        res_id: u64,
        charge: Option<Charge<'_>>,
        finishing: bool,
    ) {
        // This node's own figures count what it admitted through Redis too: should Redis
        // go down, its fallback decides from them, not from what it admitted on its own.
        if let Some(c) = &charge {
            key.counters.book_settled_elsewhere(reservation.month(), c);
        }
        let job = Unsettled {
            key_id: key.id.clone(),
            res_id,
            month: reservation.month(),
            charge: charge.as_ref().map(OwnedCharge::of),
            fallback: false,
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // Outside the runtime (shutdown): the heartbeat stops with the process, so the
            // hold expires and is charged at its estimate by another node.
            self.queue_unsettled(job);
            if finishing {
                key.counters.finishing_ended();
            }
            return;
        };
        let this = self.clone();
        let key = key.clone();
        self.health.settling.fetch_add(1, Ordering::AcqRel);
        rt.spawn(async move {
            this.settle_job(job).await;
            this.health.settling.fetch_sub(1, Ordering::AcqRel);
            if finishing {
                key.counters.finishing_ended();
            }
        });
    }

    /// The cost of an admission decided on this node's counters while Redis was down, queued
    /// for Redis' month: the settlement script books a charge whose hold it never had into
    /// the month as it is (it never creates one). Without it, once Redis answers again, its
    /// figures would miss the outage's spend: a hard budget overshot by what the outage
    /// admitted, `/v1/usage` and the soft-budget warning short of the ledger. Only the key's
    /// own month: the levels above it (group, parents) do not get it (README: not covered).
    fn book_fallback(&self, key: &KeyEntry, month: i64, charge: Option<&Charge<'_>>) {
        let Some(charge) = charge.filter(|c| c.cost > Nanos::ZERO) else {
            return;
        };
        self.queue_unsettled(Unsettled {
            key_id: key.id.clone(),
            res_id: self.fallback_ids.fetch_add(1, Ordering::Relaxed),
            month,
            charge: Some(OwnedCharge::of(charge)),
            fallback: true,
        });
    }

    /// Settles now, waiting for Redis' answer (one round trip): at the end of a response,
    /// before its last bytes go out, so the next request of the client, on any node, finds
    /// this one settled (its in-flight slot free, its cost in `/v1/usage`).
    pub async fn settle_now(
        &self,
        key: &KeyEntry,
        reservation: Reservation,
        charge: Option<Charge<'_>>,
    ) {
        let Some(res_id) = reservation.shared_id() else {
            // Taken by this node's counters (a fallback): released there, its cost queued
            // for Redis.
            self.book_fallback(key, reservation.month(), charge.as_ref());
            InProcess::settle_now(key, reservation, charge, false);
            return;
        };
        if let Some(c) = &charge {
            key.counters.book_settled_elsewhere(reservation.month(), c);
        }
        self.settle_job(Unsettled {
            key_id: key.id.clone(),
            res_id,
            month: reservation.month(),
            charge: charge.as_ref().map(OwnedCharge::of),
            fallback: false,
        })
        .await;
    }

    async fn settle_job(&self, job: Unsettled) {
        if !self.redis_up() {
            self.queue_unsettled(job);
            return;
        }
        let charge = job.charge.as_ref().map(OwnedCharge::as_charge);
        match self
            .redis
            .settle(&job.key_id, job.res_id, job.month, charge)
            .await
        {
            Ok(Settled::Open) => self.mark(true, "settlement", None),
            Ok(Settled::Lost) if job.fallback => {
                self.mark(true, "settlement", None);
                log::debug!("key {}: a fallback admission's cost booked", job.key_id);
            }
            Ok(Settled::Lost) => {
                self.mark(true, "settlement", None);
                log::warn!(
                    "key {}: Redis had lost a hold (restarted without its data); the request's cost is booked all the same",
                    job.key_id
                );
            }
            Ok(Settled::Reaped) => {
                self.mark(true, "settlement", None);
                self.health.late_settles.fetch_add(1, Ordering::Relaxed);
                log::warn!(
                    "key {}: a hold expired before its request finished; it was charged at its estimate",
                    job.key_id
                );
            }
            Err(e) => {
                self.mark(false, "settlement", Some(&e));
                self.queue_unsettled(job);
            }
        }
    }

    fn queue_unsettled(&self, job: Unsettled) {
        let mut q = self.unsettled.lock().unwrap_or_else(|e| e.into_inner());
        q.push(job);
        self.health
            .unsettled
            .store(q.len() as u64, Ordering::Relaxed);
    }

    async fn view(&self, key: &Arc<KeyEntry>, now: Now) -> CounterView {
        for attempt in 0..2 {
            if !self.redis_up() {
                break;
            }
            match self.redis.view(&key.id, &key.limits).await {
                Ok(Some(v)) => return v,
                Ok(None) if attempt == 0 => {
                    // Nothing in Redis for this month yet: seed, then read.
                    let (month, day) = (
                        crate::clock::month_index(now.wall),
                        crate::clock::day_index(now.wall),
                    );
                    if self.seed(&key.id, month, day).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    self.mark(false, "usage view", Some(&e));
                    break;
                }
            }
        }
        // Redis unreachable: this node's view, the best it has.
        key.counters.view(now, &key.limits)
    }

    /// Background upkeep, every second (or third of the reservation TTL, if shorter): renews
    /// this node's holds, charges stopped nodes' expired ones at their estimate, retries
    /// queued settlements, and notices when Redis answers again (with no traffic to tell).
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let tick = (self.ttl / 3).min(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(tick) => {}
            }
            self.upkeep().await;
        }
    }

    async fn upkeep(&self) {
        // The heartbeat is the probe: it is what must succeed for this node's holds to live.
        if let Err(e) = self.redis.heartbeat().await {
            self.mark(false, "heartbeat", Some(&e));
            // The next probe connects anew: behind Sentinel, to whichever master it names now.
            self.redis.reconnect();
            return;
        }
        self.mark(true, "heartbeat", None);
        match self.redis.reap().await {
            Ok(n) if n > 0 => {
                self.health.reaped.fetch_add(n, Ordering::Relaxed);
                log::warn!("shared limits: charged {n} holds of stopped nodes at their estimate");
            }
            Ok(_) => {}
            Err(e) => self.mark(false, "reap", Some(&e)),
        }
        let queued = std::mem::take(&mut *self.unsettled.lock().unwrap_or_else(|e| e.into_inner()));
        self.health.unsettled.store(0, Ordering::Relaxed);
        for job in queued {
            self.settle_job(job).await;
        }
    }
}
