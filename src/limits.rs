//! Per-key request windows (rolling minute, UTC day), in-flight slots, the hard-budget
//! reserve/settle ledger with this month's spend per model, and the runaway-agent brakes
//! ([`brakes`]) of keys that have them.
//!
//! State lives on the key's own entry, so one key's limits never depend on how many other
//! keys exist (no shared sketch, no hashing, no collisions). Each key has one small mutex,
//! held for a few comparisons; only requests of the same key ever contend on it.
//!
//! Time only moves forward here: the rolling minute runs on the monotonic clock, and the
//! day and month counters roll only to a later day or month, never back. A request whose
//! clock reading is older than the key's state cannot reset this month's spend.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

pub mod brakes;
mod handover;
pub mod store;

use crate::clock::{day_index, month_index, Now, MS_PER_DAY};
use crate::error::GateError;
use crate::money::Nanos;
use brakes::{Brakes, Refusal};

const WINDOW_MS: i64 = 60_000;

/// Longest wait for a key's just-ended responses to be booked (see
/// [`KeyCounters::settled`]): by `/v1/usage`, and by an admission refused while one is not.
pub const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// The limits that apply to one admission, copied from the key record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    pub budget: Option<Nanos>,
    pub hard_budget: bool,
    pub max_inflight: Option<u32>,
    /// Spend cap over any rolling 60 minutes, reservations included (SPEC §7).
    pub max_usd_per_hour: Option<Nanos>,
    /// Identical requests (endpoint, model, body) admitted per rolling 60 s.
    pub loop_limit: Option<u32>,
}

impl Limits {
    /// Whether the key has a runaway-agent brake (only those pay for one).
    pub fn has_brakes(&self) -> bool {
        self.max_usd_per_hour.is_some() || self.loop_limit.is_some()
    }

    /// Whether this is a hard monthly budget: admission holds an upper bound against it.
    pub fn has_hard_budget(&self) -> bool {
        self.hard_budget && self.budget.is_some()
    }
}

/// Whether a hard budget bounds a key's spend: its own (`limits`), or one of a level above
/// it, which binds the key as its own would (SPEC §7): its requests hold their upper bound,
/// and pause while spend cannot be recorded.
pub fn hard_capped(limits: &Limits, uplines: &[Upline]) -> bool {
    limits.has_hard_budget() || uplines.iter().any(|u| u.limits.has_hard_budget())
}

/// Whether a cap holds a request to its reservation: a hard budget (`hard_capped`, already
/// worked out by the caller) or the key's own `max_usd_per_hour`, which counts reservations
/// too (SPEC §7; a brake is the key's alone: admission holds no level's). Under either, what
/// the reservation bounded is what is sent and charged (a form's late `n`, a fallback's
/// body, a reported duration).
pub fn reservation_binds(limits: &Limits, hard_capped: bool) -> bool {
    hard_capped || limits.max_usd_per_hour.is_some()
}

impl From<Refusal> for GateError {
    fn from(r: Refusal) -> GateError {
        match r {
            Refusal::SpendRate {
                spend,
                cap,
                retry_after_secs,
            } => GateError::SpendRateExceeded {
                spend,
                cap,
                retry_after_secs,
            },
            Refusal::Loop {
                limit,
                retry_after_secs,
            } => GateError::LoopDetected {
                limit,
                retry_after_secs,
            },
        }
    }
}

/// Live counters of one key.
#[derive(Debug, Default)]
pub struct KeyCounters {
    state: Mutex<CounterState>,
    /// Requests whose response has ended but whose settlement is still running, so a
    /// `/v1/usage` asked right after a response can wait for it (see `proxy`).
    finishing: AtomicU32,
    /// How many such settlements ever ended: a wait for those that had begun by a moment
    /// (see [`KeyCounters::settled_since`]) does not wait for later ones.
    finishings_ended: AtomicU64,
}

/// Spend of one model in the key's current month.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelTally {
    pub model: Arc<str>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub spent: Nanos,
}

/// Requests in the rolling minute and the UTC day, checked against `rpm` and `rpd`.
#[derive(Debug, Default)]
struct RateWindow {
    /// Admission times (monotonic ms) inside the rolling minute, oldest first; never longer
    /// than `rpm` (and empty for a key without one).
    minute: VecDeque<i64>,
    day: i64,
    day_count: u32,
}

impl RateWindow {
    /// Drops what left the minute; starts a later day (never an earlier one).
    fn roll(&mut self, now: Now) {
        while self
            .minute
            .front()
            .is_some_and(|&t| t <= now.mono - WINDOW_MS)
        {
            self.minute.pop_front();
        }
        let day = day_index(now.wall);
        if day > self.day {
            self.day = day;
            self.day_count = 0;
        }
    }

    /// Seconds until the oldest admission leaves the minute.
    fn reset_secs(&self, now: Now) -> Option<u64> {
        self.minute
            .front()
            .map(|&t| secs_until(now.mono, t + WINDOW_MS))
    }

    /// Per-minute then per-day; nothing is consumed here.
    fn check(&self, now: Now, limits: &Limits) -> Result<(), GateError> {
        if let Some(rpm) = limits.rpm {
            if self.minute.len() as u32 >= rpm {
                return Err(GateError::RateLimited {
                    limit: rpm,
                    retry_after_secs: self.reset_secs(now).unwrap_or(1),
                });
            }
        }
        if let Some(rpd) = limits.rpd {
            if self.day_count >= rpd {
                let next_day = (day_index(now.wall) + 1) * MS_PER_DAY;
                return Err(GateError::DailyRateLimited {
                    limit: rpd,
                    retry_after_secs: secs_until(now.wall, next_day),
                });
            }
        }
        Ok(())
    }

    /// Consumes one request of the minute and the day.
    fn count(&mut self, now: Now, limits: &Limits) {
        if let Some(rpm) = limits.rpm {
            if self.minute.len() as u32 >= rpm {
                self.minute.pop_front();
            }
            self.minute.push_back(now.mono);
        }
        self.day_count = self.day_count.saturating_add(1);
    }
}

#[derive(Debug, Default)]
struct CounterState {
    /// Model requests.
    requests: RateWindow,
    month: i64,
    /// Settled spend of `month`.
    spent: Nanos,
    /// Open reservations of requests in flight.
    reserved: Nanos,
    /// Settled spend of `month`, and open reservations, of the keys below this one in its
    /// tree of minted keys: they count against this key's budget too (SPEC §7).
    tree_spent: Nanos,
    tree_reserved: Nanos,
    /// Admitted model requests not settled yet.
    inflight: u32,
    by_model: Vec<ModelTally>,
    /// `/v1/usage` calls, limited by the same rpm and rpd but counted apart, so the
    /// figures they report are model requests only.
    usage_calls: RateWindow,
    /// Child keys minted through `/v1/keys` in the rolling minute (SPEC §7).
    mints: RateWindow,
    /// Admissions in the current monotonic minute, for reporting keys without an `rpm`
    /// (their rolling window is not kept, so it costs no memory).
    report_minute: i64,
    report_count: u32,
    /// Admissions in the monotonic minute before `report_minute`, if it was the one just
    /// before (else 0): with `report_count`, what seeds the rolling window of an `rpm` added.
    report_prev_count: u32,
    /// The rolling window (`requests.minute`) is kept: the limits it was last counted or
    /// checked under had an `rpm`. See [`CounterState::keep_minute`].
    minute_kept: bool,
    /// The last standing a shared store (Redis) answered for this key, for the rate-limit
    /// headers of answers that admit nothing (asking the store again would cost a round trip).
    shared_standing: Option<Standing>,
    /// The hour's spend and the loop table, made on the first admission of a key with one of
    /// those limits (`None`, one word, for every other key).
    brakes: Option<Box<Brakes>>,
}

/// What an admitted request reports back in its rate-limit headers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Standing {
    pub rpm: Option<u32>,
    /// Requests still admissible in the rolling minute.
    pub remaining: Option<u32>,
    /// Seconds until the window frees a slot (0 if one is free).
    pub reset_secs: u64,
    /// Soft budget reached: add the warning header.
    pub budget_warning: bool,
}

impl Standing {
    /// The tighter of two rolling minutes (the key's and its group's): the rate-limit
    /// headers describe the one that refuses first (SPEC §2: the slots left before a 429).
    pub fn narrow_to(&mut self, other: &Standing) {
        let left = |s: &Standing| s.remaining.unwrap_or(u32::MAX);
        if other.rpm.is_some() && left(other) < left(self) {
            self.rpm = other.rpm;
            self.remaining = other.remaining;
            self.reset_secs = other.reset_secs;
        }
    }
}

/// A hard-budget hold and an in-flight slot. Must go back to [`KeyCounters::settle`] on every
/// outcome.
#[must_use = "a reservation must be settled, or the budget and the in-flight slot stay held"]
#[derive(Debug)]
pub struct Reservation {
    held: Nanos,
    /// Held against this node's hour window (`max_usd_per_hour`); a shared store keeps its
    /// own (zero here).
    hour_held: Nanos,
    month: i64,
    /// The hold's id in a shared store (Redis), if it was taken there; `None` for this
    /// node's own counters (single node, or a fallback while the shared store is down).
    shared: Option<u64>,
    /// The shared store's clock at the decision: the cluster books the request's cost (and
    /// its day) at this time, not at a node's own clock reading.
    decided_at: Option<i64>,
    /// The levels above the key this hold was also taken at (its parents, its group), on
    /// this node's counters; empty for a lone key (no allocation).
    uplines: Vec<(Level, Arc<KeyCounters>)>,
}

/// A level above a key that a request also counts against (SPEC §7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// A key that minted this one (or one of its ancestors): its budget bounds its tree.
    Parent,
    /// The key's group: budget and rpm over the sum of its keys.
    Group,
}

/// One level's limits and live counters, as an admission needs them.
#[derive(Debug, Clone)]
pub struct Upline {
    pub level: Level,
    /// The parent key's id or the group's name (the refusal names it; Redis keys use it).
    pub id: Arc<str>,
    pub limits: Limits,
    pub counters: Arc<KeyCounters>,
}

impl Reservation {
    /// A hold taken in a shared store, which alone can release it.
    pub fn in_shared_store(held: Nanos, month: i64, id: u64, decided_at: i64) -> Reservation {
        Reservation {
            held,
            hour_held: Nanos::ZERO,
            month,
            shared: Some(id),
            decided_at: Some(decided_at),
            uplines: Vec::new(),
        }
    }

    /// The shared store's clock (unix ms) when it admitted the request, if it did.
    pub fn decided_at(&self) -> Option<i64> {
        self.decided_at
    }

    /// The shared store's id of this hold; `None` if this node's counters hold it.
    pub fn shared_id(&self) -> Option<u64> {
        self.shared
    }

    /// The amount held against the budget (zero for keys without a hard budget).
    pub fn held(&self) -> Nanos {
        self.held
    }

    /// The calendar month (index) the request was admitted in; its cost belongs there.
    pub fn month(&self) -> i64 {
        self.month
    }
}

/// What a finished request costs, booked by [`KeyCounters::settle`].
#[derive(Debug, Clone, Copy)]
pub struct Charge<'a> {
    pub model: &'a Arc<str>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: Nanos,
}

/// Snapshot for `GET /v1/usage`.
#[derive(Debug, Clone, Default)]
pub struct CounterView {
    pub month: i64,
    pub requests_this_minute: u32,
    pub requests_today: u32,
    pub spent: Nanos,
    pub reserved: Nanos,
    pub inflight: u32,
    pub by_model: Vec<ModelTally>,
    /// This month's spend and open holds of the keys below this one (minted keys).
    pub tree_spent: Nanos,
    pub tree_reserved: Nanos,
}

impl CounterState {
    fn roll(&mut self, now: Now) {
        self.requests.roll(now);
        let month = month_index(now.wall);
        if month > self.month {
            self.month = month;
            self.spent = Nanos::ZERO;
            self.tree_spent = Nanos::ZERO;
            self.by_model.clear();
        }
    }

    /// What a hard budget at this level is measured against: this month's spend and open
    /// holds, its own and its tree's.
    fn committed(&self) -> Nanos {
        self.spent + self.reserved + self.tree_spent + self.tree_reserved
    }

    /// Books a settled cost to this month's figures (the tally of its model included).
    fn book(&mut self, c: &Charge<'_>) {
        self.spent += c.cost;
        let tally = match self.by_model.iter().position(|t| t.model == *c.model) {
            Some(i) => &mut self.by_model[i],
            None => {
                self.by_model.push(ModelTally {
                    model: c.model.clone(),
                    requests: 0,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                    spent: Nanos::ZERO,
                });
                let last = self.by_model.len() - 1;
                &mut self.by_model[last]
            }
        };
        tally.requests += 1;
        tally.prompt_tokens = tally.prompt_tokens.saturating_add(c.prompt_tokens);
        tally.completion_tokens = tally.completion_tokens.saturating_add(c.completion_tokens);
        tally.spent += c.cost;
    }

    fn standing(&self, now: Now, limits: &Limits) -> Standing {
        let used = self.requests.minute.len() as u32;
        let (remaining, reset_secs) = match limits.rpm {
            Some(rpm) => {
                let remaining = rpm.saturating_sub(used);
                let reset = if remaining > 0 {
                    0
                } else {
                    self.requests.reset_secs(now).unwrap_or(0)
                };
                (Some(remaining), reset)
            }
            None => (None, 0),
        };
        Standing {
            rpm: limits.rpm,
            remaining,
            reset_secs,
            budget_warning: limits
                .budget
                .is_some_and(|cap| !limits.hard_budget && self.spent >= cap),
        }
    }

    /// Consumes one model request of the minute and the day.
    fn count_request(&mut self, now: Now, limits: &Limits) {
        self.keep_minute(now, limits.rpm);
        self.requests.count(now, limits);
        let minute = now.mono.div_euclid(WINDOW_MS);
        if self.report_minute != minute {
            self.report_prev_count = if self.report_minute == minute - 1 {
                self.report_count
            } else {
                0
            };
            self.report_minute = minute;
            self.report_count = 0;
        }
        self.report_count = self.report_count.saturating_add(1);
    }

    /// Keeps the rolling window in step with the limits' `rpm`. Without one no admission
    /// times are kept (a busy key would hold thousands), only counts per monotonic minute;
    /// so a key or group that gains an `rpm` has its window seeded from those counts, each
    /// admission at the latest time it may have been made (the minute before's at that
    /// minute's end, this minute's now). The new limit then never admits more than `rpm` in
    /// any rolling 60 s; it may refuse a little longer than an exact window would, once.
    fn keep_minute(&mut self, now: Now, rpm: Option<u32>) {
        let Some(rpm) = rpm else {
            if std::mem::replace(&mut self.minute_kept, false) {
                // Counted in the report counts too: seeded again from them if an rpm returns.
                self.requests.minute.clear();
            }
            return;
        };
        if std::mem::replace(&mut self.minute_kept, true) {
            return;
        }
        let minute = now.mono.div_euclid(WINDOW_MS);
        let (this, before) = match self.report_minute {
            m if m == minute => (self.report_count, self.report_prev_count),
            m if m == minute - 1 => (0, self.report_count),
            _ => (0, 0),
        };
        // Only the latest `rpm` matter (the window never holds more); oldest first.
        let end_of_before = minute * WINDOW_MS - 1;
        let this = this.min(rpm);
        let before = if end_of_before > now.mono - WINDOW_MS {
            before.min(rpm - this)
        } else {
            0
        };
        let window = &mut self.requests.minute;
        window.extend(std::iter::repeat_n(end_of_before, before as usize));
        window.extend(std::iter::repeat_n(now.mono, this as usize));
    }
}

/// Whole seconds from `now` until `at`, rounded up, at least 1.
fn secs_until(now: i64, at: i64) -> u64 {
    (at.saturating_sub(now).saturating_add(999) / 1000).max(1) as u64
}

impl KeyCounters {
    /// Counters restored from the store at start-up: today's request count and this month's
    /// spend per model.
    pub fn restored(now_wall: i64, requests_today: u32, this_month: Vec<ModelTally>) -> Self {
        KeyCounters {
            state: Mutex::new(CounterState {
                requests: RateWindow {
                    day: day_index(now_wall),
                    day_count: requests_today,
                    ..RateWindow::default()
                },
                month: month_index(now_wall),
                spent: this_month.iter().map(|t| t.spent).sum(),
                by_model: this_month,
                ..CounterState::default()
            }),
            finishing: AtomicU32::new(0),
            finishings_ended: AtomicU64::new(0),
        }
    }

    /// Books the charges of the last hour (unix ms when each request ended, cost; from the
    /// traces) into the hour window of a key with `max_usd_per_hour`, so a restart does not
    /// forget what the key spent in the hour. Wall times map onto the monotonic clock the
    /// window runs on, as that far before `now`.
    pub fn seed_hour(&self, now: Now, charges: &[(i64, Nanos)]) {
        let mut s = self.lock();
        let b = s.brakes.get_or_insert_with(Box::default);
        for &(at, cost) in charges {
            let ago = now.wall.saturating_sub(at).max(0);
            b.spend.book(now.mono.saturating_sub(ago), cost);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CounterState> {
        // A poisoned lock only means another request panicked mid-update of plain integers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a model request: checks budget, per-minute, per-day and in-flight limits, and
    /// commits all of them only if all pass, so a rejected request consumes nothing.
    /// `bound` is the request's upper-bound cost; hard-budget keys hold it until settled.
    pub fn admit(
        &self,
        now: Now,
        limits: &Limits,
        bound: Nanos,
    ) -> Result<(Standing, Reservation), GateError> {
        self.admit_with(now, limits, bound, &[], None)
    }

    /// [`KeyCounters::admit`] with everything SPEC §2 and §7 check, in SPEC §2's order: the
    /// key's budget, the hard budgets (and rpm) of the levels above it, the runaway-agent
    /// brakes (hour spend, loop), per-minute, per-day, in-flight; all under their locks at
    /// once, and all taken only if all pass. `uplines`: the key's parents (each one's budget
    /// counts its whole tree) and its group. Locks are taken child first, parents upward,
    /// the group last: every admission takes them in that one order, so two can never wait
    /// on each other. `digest` is the request's [`brakes::request_digest`], given only for a
    /// key with a `loop_limit`.
    pub fn admit_with(
        &self,
        now: Now,
        limits: &Limits,
        bound: Nanos,
        uplines: &[Upline],
        digest: Option<u128>,
    ) -> Result<(Standing, Reservation), GateError> {
        let bound = bound.max(Nanos::ZERO);
        let mut s = self.lock();
        s.roll(now);
        let hard_here = limits.has_hard_budget();
        if let (Some(cap), true) = (limits.budget, hard_here) {
            let committed = s.committed();
            if committed + bound > cap {
                return Err(GateError::BudgetExceeded {
                    spend: committed,
                    cap,
                });
            }
        }
        let mut above = Vec::with_capacity(uplines.len());
        let mut hard_above = false;
        // A soft cap above the key that its tree or group has reached: the warning header.
        let mut soft_reached = false;
        for u in uplines {
            let mut g = u.counters.lock();
            g.roll(now);
            if let (Some(cap), false) = (u.limits.budget, u.limits.hard_budget) {
                soft_reached |= g.spent + g.tree_spent >= cap;
            }
            if let (Some(cap), true) = (u.limits.budget, u.limits.hard_budget) {
                hard_above = true;
                let committed = g.committed();
                if committed + bound > cap {
                    return Err(GateError::GroupBudgetExceeded {
                        owner: match u.level {
                            Level::Parent => format!("parent key '{}'", u.id),
                            Level::Group => format!("group '{}'", u.id),
                        },
                        spend: committed,
                        cap,
                    });
                }
            }
            if u.level == Level::Group {
                g.keep_minute(now, u.limits.rpm);
                g.requests.check(now, &u.limits)?;
            }
            above.push(g);
        }
        let hour_held = if limits.has_brakes() {
            let b = s.brakes.get_or_insert_with(Box::default);
            if let Some(cap) = limits.max_usd_per_hour {
                b.spend.check(now.mono, cap, bound)?;
            }
            if let (Some(limit), Some(d)) = (limits.loop_limit, digest) {
                b.loops.check(now.mono, limit, d)?;
            }
            limits.max_usd_per_hour.map_or(Nanos::ZERO, |_| bound)
        } else {
            Nanos::ZERO
        };
        s.keep_minute(now, limits.rpm);
        s.requests.check(now, limits)?;
        if let Some(max) = limits.max_inflight {
            if s.inflight >= max {
                return Err(GateError::ConcurrencyLimited { limit: max });
            }
        }
        // The bound is held wherever a hard cap may need it: at every level, so each one's
        // figure stays the sum of what is open below it.
        let held = if hard_here || hard_above {
            bound
        } else {
            Nanos::ZERO
        };
        // A group's rolling minute, when it has an rpm: the headers name it if it refuses first.
        let mut group_minute = None;
        for (u, g) in uplines.iter().zip(above.iter_mut()) {
            match u.level {
                Level::Parent => g.tree_reserved += held,
                Level::Group => {
                    g.reserved += held;
                    g.count_request(now, &u.limits);
                    if u.limits.rpm.is_some() {
                        group_minute = Some(g.standing(now, &u.limits));
                    }
                }
            }
        }
        drop(above);
        // Every check passed: consume all of them.
        if let Some(b) = s.brakes.as_deref_mut() {
            b.spend.reserved += hour_held;
            if let (Some(_), Some(d)) = (limits.loop_limit, digest) {
                b.loops.count(now.mono, d);
            }
        }
        s.count_request(now, limits);
        s.reserved += held;
        s.inflight += 1;
        let mut standing = s.standing(now, limits);
        standing.budget_warning |= soft_reached;
        if let Some(group) = &group_minute {
            standing.narrow_to(group);
        }
        Ok((
            standing,
            Reservation {
                held,
                hour_held,
                month: s.month,
                shared: None,
                decided_at: None,
                uplines: uplines
                    .iter()
                    .map(|u| (u.level, u.counters.clone()))
                    .collect(),
            },
        ))
    }

    /// Admits a `/v1/usage` call: limited by the key's rpm and rpd like a model request,
    /// but counted apart (the usage figures count model requests only).
    pub fn admit_usage_call(&self, now: Now, limits: &Limits) -> Result<Standing, GateError> {
        let mut s = self.lock();
        s.roll(now);
        s.usage_calls.roll(now);
        s.usage_calls.check(now, limits)?;
        s.usage_calls.count(now, limits);
        Ok(s.standing(now, limits))
    }

    /// Counts one child key minted by this key, at most `per_minute` in a rolling minute
    /// (429 `rate_limit_exceeded` with the time until a slot frees).
    pub fn admit_mint(&self, now: Now, per_minute: u32) -> Result<(), GateError> {
        let limits = Limits {
            rpm: Some(per_minute),
            ..Limits::default()
        };
        let mut s = self.lock();
        s.mints.roll(now);
        s.mints.check(now, &limits)?;
        s.mints.count(now, &limits);
        Ok(())
    }

    /// An admission the shared store (Redis) decided: remembers its standing, and counts it
    /// in this node's own minute and day, the key's and its group's, as a local admission
    /// would. Those counters decide only while Redis cannot be asked (`on_error`); counted
    /// here, they start from what this node admitted, not from zero, so a node never admits
    /// more than `rpm` in a rolling minute or `rpd` in a day on its own (N nodes: N times).
    pub fn note_shared_admission(
        &self,
        now: Now,
        limits: &Limits,
        uplines: &[Upline],
        standing: Standing,
    ) {
        {
            let mut s = self.lock();
            s.roll(now);
            s.count_request(now, limits);
            s.shared_standing = Some(standing);
        }
        for u in uplines.iter().filter(|u| u.level == Level::Group) {
            let mut g = u.counters.lock();
            g.roll(now);
            g.count_request(now, &u.limits);
        }
    }

    /// The last standing the shared store answered; a fresh one (nothing used) if none.
    pub fn shared_standing(&self, limits: &Limits) -> Standing {
        self.lock().shared_standing.unwrap_or(Standing {
            rpm: limits.rpm,
            remaining: limits.rpm,
            reset_secs: 0,
            budget_warning: false,
        })
    }

    /// Headers for a request that was rejected before admission (nothing consumed).
    pub fn standing(&self, now: Now, limits: &Limits) -> Standing {
        let mut s = self.lock();
        s.roll(now);
        s.keep_minute(now, limits.rpm);
        s.standing(now, limits)
    }

    /// Releases a reservation and its in-flight slot, and books the real cost to the month
    /// the request was admitted in. A cost of an earlier month than the key's current one is
    /// only in the ledger (this month's figures are not touched).
    pub fn settle(&self, reservation: Reservation, charge: Option<Charge<'_>>) {
        let month = reservation.month;
        let held = reservation.held;
        // Levels above first, one lock at a time (no order needed when only one is held).
        for (level, counters) in &reservation.uplines {
            let mut g = counters.lock();
            let booked = charge.as_ref().filter(|_| g.month == month);
            match level {
                Level::Parent => {
                    g.tree_reserved -= held;
                    if let Some(c) = booked {
                        g.tree_spent += c.cost;
                    }
                }
                Level::Group => {
                    g.reserved -= held;
                    if let Some(c) = booked {
                        g.book(c);
                    }
                }
            }
        }
        let mut s = self.lock();
        s.reserved -= held;
        s.inflight = s.inflight.saturating_sub(1);
        // The hour window books the cost when it is known, whatever month it belongs to.
        if let Some(b) = s.brakes.as_deref_mut() {
            b.spend.reserved -= reservation.hour_held;
            if let Some(c) = &charge {
                b.spend.book(crate::clock::mono_ms(), c.cost);
            }
        }
        let Some(c) = charge else {
            return;
        };
        if s.month != month {
            return;
        }
        s.book(&c);
    }

    /// Books a cost settled in the shared store (Redis) into this node's own figures for the
    /// month the request was admitted in (nothing held here to release), so that a fallback
    /// to them while Redis is down starts from what this node admitted through it too.
    pub fn book_settled_elsewhere(&self, month: i64, charge: &Charge<'_>) {
        let mut s = self.lock();
        if s.month == month {
            s.book(charge);
        }
    }

    /// This month's spend of the keys below this one, restored from the ledger.
    pub fn with_tree_spent(self, spent: Nanos) -> Self {
        self.lock().tree_spent = spent;
        self
    }

    /// Replaces this month's settled spend (a group whose keys changed: the sum of its keys
    /// now), keeping the holds of requests in flight.
    pub fn reseed(&self, now: Now, tallies: Vec<ModelTally>) {
        let mut s = self.lock();
        s.roll(now);
        s.spent = tallies.iter().map(|t| t.spent).sum();
        s.by_model = tallies;
    }

    /// A response ended; its settlement follows shortly (see [`KeyCounters::finishing`]).
    pub fn finishing_started(&self) {
        self.finishing.fetch_add(1, Ordering::AcqRel);
    }

    pub fn finishing_ended(&self) {
        self.finishings_ended.fetch_add(1, Ordering::AcqRel);
        self.finishing.fetch_sub(1, Ordering::AcqRel);
    }

    /// Requests whose response ended but whose cost is not booked yet.
    pub fn finishing(&self) -> u32 {
        self.finishing.load(Ordering::Acquire)
    }

    /// Waits (without blocking a thread) until every request whose response already ended
    /// is booked, for at most `max`: a client asking for its usage right after a response
    /// sees that request. Usually returns at once, else within microseconds.
    pub async fn settled(&self, max: std::time::Duration) {
        let deadline = tokio::time::Instant::now() + max;
        while self.finishing() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Waits, as [`KeyCounters::settled`] does, for as many settlements to end as were
    /// running when called, not for responses that end meanwhile: a busy key whose
    /// responses keep ending is not held for the whole `max`.
    pub async fn settled_since(&self, max: std::time::Duration) {
        let target = self.finishings_ended.load(Ordering::Acquire) + u64::from(self.finishing());
        let deadline = tokio::time::Instant::now() + max;
        while self.finishings_ended.load(Ordering::Acquire) < target
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Current counts. `requests_this_minute` is the rolling-minute count for keys with an
    /// `rpm`, and the count in the current minute for keys without one.
    pub fn view(&self, now: Now, limits: &Limits) -> CounterView {
        let mut s = self.lock();
        s.roll(now);
        s.keep_minute(now, limits.rpm);
        let this_minute = match limits.rpm {
            Some(_) => s.requests.minute.len() as u32,
            None if s.report_minute == now.mono.div_euclid(WINDOW_MS) => s.report_count,
            None => 0,
        };
        CounterView {
            month: s.month,
            requests_this_minute: this_minute,
            requests_today: s.requests.day_count,
            spent: s.spent,
            reserved: s.reserved,
            inflight: s.inflight,
            by_model: s.by_model.clone(),
            tree_spent: s.tree_spent,
            tree_reserved: s.tree_reserved,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{days_from_civil, MS_PER_DAY};

    fn t0() -> i64 {
        days_from_civil(2026, 11, 26) * MS_PER_DAY + 12 * 3_600_000
    }

    fn at(ms: i64) -> Now {
        Now::at(ms)
    }

    fn fresh(now: i64) -> KeyCounters {
        KeyCounters::restored(now, 0, Vec::new())
    }

    fn spent_before(now: i64, nanos: i64) -> KeyCounters {
        let tally = ModelTally {
            model: Arc::from("m"),
            requests: 1,
            prompt_tokens: 0,
            completion_tokens: 0,
            spent: Nanos::new(nanos),
        };
        KeyCounters::restored(now, 0, vec![tally])
    }

    fn rpm(n: u32) -> Limits {
        Limits {
            rpm: Some(n),
            ..Limits::default()
        }
    }

    fn hard(cap: i64) -> Limits {
        Limits {
            budget: Some(Nanos::new(cap)),
            hard_budget: true,
            ..Limits::default()
        }
    }

    fn charge(model: &Arc<str>, cost: i64) -> Option<Charge<'_>> {
        Some(Charge {
            model,
            prompt_tokens: 1,
            completion_tokens: 1,
            cost: Nanos::new(cost),
        })
    }

    fn admit_ok(c: &KeyCounters, now: Now, l: &Limits, est: i64) -> Standing {
        let (standing, r) = c.admit(now, l, Nanos::new(est)).unwrap();
        c.settle(r, None);
        standing
    }

    #[test]
    fn rolling_minute_admits_exactly_rpm_and_retry_after_is_accurate() {
        let c = fresh(t0());
        let l = rpm(3);
        for i in 0..3 {
            let s = admit_ok(&c, at(t0() + i * 1000), &l, 0);
            assert_eq!(s.remaining, Some(2 - i as u32));
        }
        let err = c.admit(at(t0() + 2500), &l, Nanos::ZERO).unwrap_err();
        assert_eq!(err.code(), "rate_limit_exceeded");
        // The first admission (t0) leaves the window at t0 + 60 s: 57.5 s from now, rounded up.
        assert_eq!(err.retry_after(), Some(58));
        assert_eq!(c.standing(at(t0() + 2500), &l).reset_secs, 58);
        // Still full one millisecond before the slot frees, admitted right after.
        assert!(c.admit(at(t0() + 59_999), &l, Nanos::ZERO).is_err());
        let retry_at = t0() + 2500 + 58_000;
        let (_, r) = c.admit(at(retry_at), &l, Nanos::ZERO).unwrap();
        c.settle(r, None);
        assert!(c.admit(at(retry_at), &l, Nanos::ZERO).is_err());
    }

    /// An rpm added to a key that had none: the admissions of the last minute (kept only as
    /// counts per minute) still count, each at the latest time it may have been made.
    #[test]
    fn an_rpm_added_counts_the_minute_already_admitted() {
        let m = t0(); // a minute's start
        let c = fresh(m);
        let none = Limits::default();
        for t in [m + 50_000, m + 50_000, m + 65_000, m + 65_000] {
            admit_ok(&c, at(t), &none, 0);
        }
        let l = rpm(3);
        let err = c.admit(at(m + 70_000), &l, Nanos::ZERO).unwrap_err();
        assert_eq!(err.code(), "rate_limit_exceeded");
        // The two of the minute before are taken at its end (m + 59.999 s): out at m + 120 s.
        assert_eq!(err.retry_after(), Some(50));
        assert_eq!(c.view(at(m + 70_000), &l).requests_this_minute, 3);
        assert!(c.admit(at(m + 119_998), &l, Nanos::ZERO).is_err());
        admit_ok(&c, at(m + 120_000), &l, 0);
        // Now exact again: the two of m + 65 s (taken at m + 70 s) and the new one.
        assert!(c.admit(at(m + 129_999), &l, Nanos::ZERO).is_err());
        admit_ok(&c, at(m + 130_000), &l, 0);

        // Removed and added again: what was admitted meanwhile counts as well.
        admit_ok(&c, at(m + 200_000), &none, 0);
        admit_ok(&c, at(m + 201_000), &none, 0);
        admit_ok(&c, at(m + 202_000), &none, 0);
        assert!(c.admit(at(m + 203_000), &l, Nanos::ZERO).is_err());
        // A key whose rpm was kept all along is not seeded twice.
        let k = fresh(m);
        for i in 0..2 {
            admit_ok(&k, at(m + i * 1000), &l, 0);
        }
        assert_eq!(k.view(at(m + 2000), &l).requests_this_minute, 2);
        admit_ok(&k, at(m + 2000), &l, 0);
    }

    #[test]
    fn the_minute_runs_on_the_monotonic_clock_whatever_the_wall_clock_does() {
        let c = fresh(t0());
        let l = rpm(2);
        // The wall clock jumps an hour forward between the admissions: the window does not.
        admit_ok(
            &c,
            Now {
                wall: t0(),
                mono: 0,
            },
            &l,
            0,
        );
        admit_ok(
            &c,
            Now {
                wall: t0() + 3_600_000,
                mono: 10,
            },
            &l,
            0,
        );
        let now = Now {
            wall: t0() + 7_200_000,
            mono: 20,
        };
        assert_eq!(
            c.admit(now, &l, Nanos::ZERO).unwrap_err().code(),
            "rate_limit_exceeded"
        );
        // And a wall clock stepped back does not reopen it either.
        let back = Now {
            wall: t0() - 3_600_000,
            mono: 30,
        };
        assert!(c.admit(back, &l, Nanos::ZERO).is_err());
        assert!(c
            .admit(
                Now {
                    wall: t0(),
                    mono: 60_001
                },
                &l,
                Nanos::ZERO
            )
            .is_ok());
    }

    #[test]
    fn daily_limit_resets_at_utc_midnight_and_rejections_consume_nothing() {
        let c = fresh(t0());
        let l = Limits {
            rpd: Some(2),
            ..Limits::default()
        };
        admit_ok(&c, at(t0()), &l, 0);
        admit_ok(&c, at(t0()), &l, 0);
        for _ in 0..5 {
            let err = c.admit(at(t0()), &l, Nanos::ZERO).unwrap_err();
            assert_eq!(err.code(), "daily_rate_limit_exceeded");
            assert_eq!(err.retry_after(), Some(12 * 3600));
        }
        assert_eq!(c.view(at(t0()), &Limits::default()).requests_today, 2);
        let tomorrow = (day_index(t0()) + 1) * MS_PER_DAY;
        assert!(c.admit(at(tomorrow), &l, Nanos::ZERO).is_ok());
    }

    #[test]
    fn counters_never_roll_backwards() {
        let end_nov = days_from_civil(2026, 12, 1) * MS_PER_DAY - 1_000;
        let dec = end_nov + 2_000;
        let c = fresh(dec);
        let l = Limits {
            rpd: Some(5),
            ..hard(1_000)
        };
        let m: Arc<str> = Arc::from("m");
        let (_, r) = c.admit(at(dec), &l, Nanos::new(400)).unwrap();
        c.settle(r, charge(&m, 400));
        // A reading from last month (a body trickled across midnight) neither resets
        // December's spend nor today's count.
        let (_, r) = c.admit(at(end_nov), &l, Nanos::new(400)).unwrap();
        let v = c.view(at(end_nov), &Limits::default());
        assert_eq!((v.spent, v.requests_today), (Nanos::new(400), 2));
        assert_eq!(
            c.admit(at(end_nov), &l, Nanos::new(400))
                .unwrap_err()
                .code(),
            "budget_exceeded"
        );
        c.settle(r, charge(&m, 400));
        assert_eq!(c.view(at(dec), &Limits::default()).spent, Nanos::new(800));
    }

    #[test]
    fn restored_daily_count_is_enforced() {
        let c = KeyCounters::restored(t0(), 2, Vec::new());
        let l = Limits {
            rpd: Some(2),
            ..Limits::default()
        };
        assert_eq!(
            c.admit(at(t0()), &l, Nanos::ZERO).unwrap_err().code(),
            "daily_rate_limit_exceeded"
        );
    }

    #[test]
    fn hard_budget_counts_open_reservations_and_settles_to_real_cost() {
        let c = spent_before(t0(), 600);
        let l = hard(1_000);
        let m: Arc<str> = Arc::from("m");
        let (_, r1) = c.admit(at(t0()), &l, Nanos::new(300)).unwrap();
        let err = c.admit(at(t0()), &l, Nanos::new(300)).unwrap_err();
        assert_eq!(
            err,
            GateError::BudgetExceeded {
                spend: Nanos::new(900),
                cap: Nanos::new(1_000)
            }
        );
        c.settle(r1, charge(&m, 100));
        let v = c.view(at(t0()), &Limits::default());
        assert_eq!((v.spent, v.reserved), (Nanos::new(700), Nanos::ZERO));
        assert_eq!(v.by_model[0].spent, Nanos::new(700));
        assert_eq!(v.by_model[0].requests, 2);
        let (_, r2) = c.admit(at(t0()), &l, Nanos::new(300)).unwrap();
        c.settle(r2, None);
    }

    #[test]
    fn a_saturated_bound_is_refused_not_wrapped() {
        let c = fresh(t0());
        let err = c.admit(at(t0()), &hard(1_000), Nanos::MAX).unwrap_err();
        assert_eq!(err.code(), "budget_exceeded");
        assert_eq!(c.view(at(t0()), &Limits::default()).reserved, Nanos::ZERO);
    }

    #[test]
    fn rejected_budget_does_not_consume_rate_quota() {
        let c = spent_before(t0(), 1_000);
        let l = Limits {
            rpm: Some(1),
            rpd: Some(1),
            max_inflight: Some(1),
            ..hard(1_000)
        };
        assert_eq!(
            c.admit(at(t0()), &l, Nanos::new(1)).unwrap_err().code(),
            "budget_exceeded"
        );
        let v = c.view(at(t0()), &Limits::default());
        assert_eq!(
            (v.requests_this_minute, v.requests_today, v.inflight),
            (0, 0, 0)
        );
    }

    #[test]
    fn max_inflight_caps_open_requests_and_settle_releases_the_slot() {
        let c = fresh(t0());
        let l = Limits {
            max_inflight: Some(2),
            rpd: Some(10),
            ..Limits::default()
        };
        let (_, a) = c.admit(at(t0()), &l, Nanos::ZERO).unwrap();
        let (_, b) = c.admit(at(t0()), &l, Nanos::ZERO).unwrap();
        let err = c.admit(at(t0()), &l, Nanos::ZERO).unwrap_err();
        assert_eq!(err.code(), "concurrency_limit_exceeded");
        assert_eq!(err.retry_after(), Some(1));
        assert_eq!(
            c.view(at(t0()), &l).requests_today,
            2,
            "refusal consumed nothing"
        );
        c.settle(a, None);
        let (_, d) = c.admit(at(t0()), &l, Nanos::ZERO).unwrap();
        c.settle(b, None);
        c.settle(d, None);
        assert_eq!(c.view(at(t0()), &l).inflight, 0);
    }

    #[test]
    fn usage_calls_are_limited_by_rpm_and_rpd_but_counted_apart() {
        let c = fresh(t0());
        let l = Limits {
            rpm: Some(2),
            rpd: Some(3),
            ..Limits::default()
        };
        c.admit_usage_call(at(t0()), &l).unwrap();
        c.admit_usage_call(at(t0()), &l).unwrap();
        assert_eq!(
            c.admit_usage_call(at(t0()), &l).unwrap_err().code(),
            "rate_limit_exceeded"
        );
        let v = c.view(at(t0()), &l);
        assert_eq!((v.requests_this_minute, v.requests_today), (0, 0));
        admit_ok(&c, at(t0()), &l, 0);
        c.admit_usage_call(at(t0() + 61_000), &l).unwrap();
        assert_eq!(
            c.admit_usage_call(at(t0() + 122_000), &l)
                .unwrap_err()
                .code(),
            "daily_rate_limit_exceeded"
        );
    }

    #[test]
    fn soft_budget_warns_once_reached_and_never_blocks() {
        let c = spent_before(t0(), 999);
        let l = Limits {
            budget: Some(Nanos::new(1_000)),
            hard_budget: false,
            ..Limits::default()
        };
        let m: Arc<str> = Arc::from("m");
        let (s, r) = c.admit(at(t0()), &l, Nanos::new(1_000_000)).unwrap();
        assert!(!s.budget_warning);
        c.settle(r, charge(&m, 5));
        let (s, r) = c.admit(at(t0()), &l, Nanos::new(1_000_000)).unwrap();
        assert!(s.budget_warning);
        c.settle(r, None);
    }

    #[test]
    fn budget_resets_on_the_first_of_the_month() {
        let end_nov = days_from_civil(2026, 12, 1) * MS_PER_DAY - 1;
        let c = spent_before(end_nov, 1_000);
        let l = hard(1_000);
        let m: Arc<str> = Arc::from("m");
        assert!(c.admit(at(end_nov), &l, Nanos::new(1)).is_err());
        let (_, r) = c.admit(at(end_nov + 1), &l, Nanos::new(1)).unwrap();
        c.settle(r, charge(&m, 1));
        assert_eq!(
            c.view(at(end_nov + 1), &Limits::default()).spent,
            Nanos::new(1)
        );
    }

    #[test]
    fn a_request_settled_after_rollover_is_booked_to_its_own_month() {
        let end_nov = days_from_civil(2026, 12, 1) * MS_PER_DAY - 10;
        let c = fresh(end_nov);
        let l = hard(1_000);
        let m: Arc<str> = Arc::from("m");
        let (_, r) = c.admit(at(end_nov), &l, Nanos::new(500)).unwrap();
        assert_eq!(r.month(), month_index(end_nov));
        // December's first request rolls the key over while November's is still open.
        let (_, dec) = c.admit(at(end_nov + 20), &l, Nanos::new(100)).unwrap();
        c.settle(dec, charge(&m, 100));
        c.settle(r, charge(&m, 400));
        let v = c.view(at(end_nov + 20), &Limits::default());
        assert_eq!((v.spent, v.reserved), (Nanos::new(100), Nanos::ZERO));
    }
}
