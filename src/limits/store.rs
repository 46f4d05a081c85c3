//! Where a key's live limits are kept, behind one trait: this process ([`InProcess`], one
//! node) or a store the nodes of a cluster share (`shared::SharedLimits`, on Redis).
//!
//! The request path talks to a [`crate::shared::Limiter`], which is one or the other; the
//! admission code is written against [`LimitStore`] and does not know which.

use std::future::Future;
use std::sync::Arc;

use crate::clock::Now;
use crate::error::GateError;
use crate::keys::KeyEntry;
use crate::limits::{Charge, CounterView, Reservation, Standing, Upline};
use crate::money::Nanos;

/// Live limits of every key: admission (all checks and the hold, in one atomic step),
/// settlement, and what `/v1/usage` reports.
pub trait LimitStore {
    /// Checks the hard budget, the rolling minute, the UTC day and the in-flight cap, and
    /// takes all of them only if all pass (a rejection consumes nothing). `bound` is the
    /// request's upper-bound cost, held against a hard budget until settled; `res_id`
    /// names the hold (the admission journal's id).
    /// `uplines`: the levels above the key (its parents, its group) that are checked and
    /// held in the same step (SPEC §7); empty for a lone key.
    fn admit(
        &self,
        key: &Arc<KeyEntry>,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        res_id: u64,
    ) -> impl Future<Output = Result<(Standing, Reservation), GateError>> + Send;

    /// A `/v1/usage` call: limited by the key's rpm and rpd, counted apart.
    fn admit_usage_call(
        &self,
        key: &Arc<KeyEntry>,
        now: Now,
    ) -> impl Future<Output = Result<Standing, GateError>> + Send;

    /// Rate-limit headers for an answer that admitted nothing. Never waits.
    fn standing(&self, key: &KeyEntry, now: Now) -> Standing;

    /// Releases the hold and in-flight slot and books the cost, on every outcome. Never
    /// waits (it runs from `Drop` too): a store across the network settles in a task. When
    /// `finishing` is set, the key's `finishing` count drops once the cost is booked, so a
    /// `/v1/usage` asked right after a response waits for it.
    fn settle(
        &self,
        key: &Arc<KeyEntry>,
        reservation: Reservation,
        charge: Option<Charge<'_>>,
        finishing: bool,
    );

    /// Counts and this month's spend for `/v1/usage`.
    fn view(&self, key: &Arc<KeyEntry>, now: Now) -> impl Future<Output = CounterView> + Send;
}

/// The limits of one node: each key's counters live on its own entry (`limits::KeyCounters`),
/// behind a small per-key mutex. No I/O; every method is ready at once.
#[derive(Debug, Default, Clone, Copy)]
pub struct InProcess;

impl InProcess {
    pub fn admit_now(
        key: &KeyEntry,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
    ) -> Result<(Standing, Reservation), GateError> {
        key.counters.admit_with(now, &key.limits, bound, uplines)
    }

    pub fn settle_now(
        key: &KeyEntry,
        reservation: Reservation,
        charge: Option<Charge<'_>>,
        finishing: bool,
    ) {
        key.counters.settle(reservation, charge);
        if finishing {
            key.counters.finishing_ended();
        }
    }
}

impl LimitStore for InProcess {
    fn admit(
        &self,
        key: &Arc<KeyEntry>,
        uplines: &[Upline],
        now: Now,
        bound: Nanos,
        _res_id: u64,
    ) -> impl Future<Output = Result<(Standing, Reservation), GateError>> + Send {
        std::future::ready(Self::admit_now(key, uplines, now, bound))
    }

    fn admit_usage_call(
        &self,
        key: &Arc<KeyEntry>,
        now: Now,
    ) -> impl Future<Output = Result<Standing, GateError>> + Send {
        std::future::ready(key.counters.admit_usage_call(now, &key.limits))
    }

    fn standing(&self, key: &KeyEntry, now: Now) -> Standing {
        key.counters.standing(now, &key.limits)
    }

    fn settle(
        &self,
        key: &Arc<KeyEntry>,
        reservation: Reservation,
        charge: Option<Charge<'_>>,
        finishing: bool,
    ) {
        Self::settle_now(key, reservation, charge, finishing);
    }

    fn view(&self, key: &Arc<KeyEntry>, now: Now) -> impl Future<Output = CounterView> + Send {
        std::future::ready(key.counters.view(now, &key.limits))
    }
}
