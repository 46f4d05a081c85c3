//! Per-key request windows (rolling minute, UTC day) and the hard-budget reserve/settle ledger.
//!
//! State lives on the key's own entry, so one key's limits never depend on how many other
//! keys exist (no shared sketch, no hashing, no collisions). Each key has one small mutex,
//! held for a few comparisons; only requests of the same key ever contend on it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

use crate::clock::{day_index, month_index, MS_PER_DAY};
use crate::error::GateError;

const WINDOW_MS: i64 = 60_000;

/// The limits that apply to one admission, copied from the key record.
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub rpd: Option<u32>,
    /// Monthly cap in nano-dollars.
    pub budget_nanos: Option<i64>,
    pub hard_budget: bool,
}

/// Live counters of one key.
#[derive(Debug, Default)]
pub struct KeyCounters {
    state: Mutex<CounterState>,
    /// Admitted requests whose ledger entry is not queued yet (see [`KeyCounters::recorded`]).
    unrecorded: AtomicU32,
}

#[derive(Debug, Default)]
struct CounterState {
    /// Admission times (ms) inside the rolling minute, oldest first; never longer than `rpm`.
    minute: VecDeque<i64>,
    day: i64,
    day_count: u32,
    month: i64,
    /// Settled spend of `month`, nano-dollars.
    spent_nanos: i64,
    /// Open reservations of requests in flight, nano-dollars.
    reserved_nanos: i64,
    /// Admissions in the current calendar minute, for reporting keys without an `rpm`
    /// (their rolling window is not kept, so it costs no memory).
    report_minute: i64,
    report_count: u32,
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

/// A hard-budget hold. Must go back to [`KeyCounters::settle`] on every outcome.
#[must_use = "a reservation must be settled, or the budget stays held"]
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    nanos: i64,
    month: i64,
}

/// Snapshot for `GET /v1/usage`.
#[derive(Debug, Clone, Copy, Default)]
pub struct CounterView {
    pub requests_this_minute: u32,
    pub requests_today: u32,
    pub spent_nanos: i64,
    pub reserved_nanos: i64,
}

impl CounterState {
    fn roll(&mut self, now: i64) {
        while self.minute.front().is_some_and(|&t| t <= now - WINDOW_MS) {
            self.minute.pop_front();
        }
        let day = day_index(now);
        if day != self.day {
            self.day = day;
            self.day_count = 0;
        }
        let month = month_index(now);
        if month != self.month {
            self.month = month;
            self.spent_nanos = 0;
        }
    }

    fn standing(&self, now: i64, limits: &Limits) -> Standing {
        let used = self.minute.len() as u32;
        let (remaining, reset_secs) = match limits.rpm {
            Some(rpm) => {
                let remaining = rpm.saturating_sub(used);
                let reset = if remaining > 0 {
                    0
                } else {
                    self.minute
                        .front()
                        .map_or(0, |&t| secs_until(now, t + WINDOW_MS))
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
                .budget_nanos
                .is_some_and(|cap| !limits.hard_budget && self.spent_nanos >= cap),
        }
    }
}

/// Whole seconds from `now` until `at`, rounded up, at least 1.
fn secs_until(now: i64, at: i64) -> u64 {
    ((at - now + 999) / 1000).max(1) as u64
}

impl KeyCounters {
    /// Counters restored from the store at start-up.
    pub fn restored(now: i64, requests_today: u32, spent_this_month_nanos: i64) -> Self {
        KeyCounters {
            state: Mutex::new(CounterState {
                minute: VecDeque::new(),
                day: day_index(now),
                day_count: requests_today,
                month: month_index(now),
                spent_nanos: spent_this_month_nanos,
                reserved_nanos: 0,
                report_minute: 0,
                report_count: 0,
            }),
            unrecorded: AtomicU32::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CounterState> {
        // A poisoned lock only means another request panicked mid-update of plain integers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks budget, then per-minute, then per-day, and commits all three only if all pass:
    /// a rejected request consumes neither quota nor budget.
    pub fn admit(
        &self,
        now: i64,
        limits: &Limits,
        estimate_nanos: i64,
    ) -> Result<(Standing, Reservation), (GateError, Standing)> {
        let mut s = self.lock();
        s.roll(now);
        let reserve = if limits.hard_budget && limits.budget_nanos.is_some() {
            estimate_nanos.max(0)
        } else {
            0
        };
        if let (Some(cap), true) = (limits.budget_nanos, limits.hard_budget) {
            if s.spent_nanos + s.reserved_nanos + reserve > cap {
                let err = GateError::BudgetExceeded {
                    spend_nanos: s.spent_nanos + s.reserved_nanos,
                    cap_nanos: cap,
                };
                return Err((err, s.standing(now, limits)));
            }
        }
        if let Some(rpm) = limits.rpm {
            if s.minute.len() as u32 >= rpm {
                let retry = s
                    .minute
                    .front()
                    .map_or(1, |&t| secs_until(now, t + WINDOW_MS));
                let err = GateError::RateLimited {
                    limit: rpm,
                    retry_after_secs: retry,
                };
                return Err((err, s.standing(now, limits)));
            }
        }
        if let Some(rpd) = limits.rpd {
            if s.day_count >= rpd {
                let next_day = (day_index(now) + 1) * MS_PER_DAY;
                let err = GateError::DailyRateLimited {
                    limit: rpd,
                    retry_after_secs: secs_until(now, next_day),
                };
                return Err((err, s.standing(now, limits)));
            }
        }
        if let Some(rpm) = limits.rpm {
            if s.minute.len() as u32 >= rpm {
                s.minute.pop_front();
            }
            s.minute.push_back(now);
        }
        s.day_count += 1;
        s.reserved_nanos += reserve;
        self.unrecorded.fetch_add(1, Ordering::Relaxed);
        let minute = now.div_euclid(WINDOW_MS);
        if s.report_minute != minute {
            s.report_minute = minute;
            s.report_count = 0;
        }
        s.report_count += 1;
        let standing = s.standing(now, limits);
        Ok((
            standing,
            Reservation {
                nanos: reserve,
                month: s.month,
            },
        ))
    }

    /// Called once an admitted request's ledger entry is queued.
    pub fn recorded(&self) {
        self.unrecorded.fetch_sub(1, Ordering::Release);
    }

    /// Admitted requests still finishing (their spend is not in the ledger queue yet).
    pub fn unrecorded(&self) -> u32 {
        self.unrecorded.load(Ordering::Acquire)
    }

    /// Headers for a request that was rejected before admission (nothing consumed).
    pub fn standing(&self, now: i64, limits: &Limits) -> Standing {
        let mut s = self.lock();
        s.roll(now);
        s.standing(now, limits)
    }

    /// Releases a reservation and books the real cost to the month the request started in.
    pub fn settle(&self, reservation: Reservation, cost_nanos: i64) {
        let mut s = self.lock();
        s.reserved_nanos -= reservation.nanos;
        if s.month == reservation.month {
            s.spent_nanos += cost_nanos;
        } else if s.month < reservation.month {
            // The key's state has not rolled into the request's month yet: roll it now.
            s.month = reservation.month;
            s.spent_nanos = cost_nanos;
        }
    }

    /// Current counts. `requests_this_minute` is the rolling-minute count for keys with an
    /// `rpm`, and the count in the current calendar minute for keys without one.
    pub fn view(&self, now: i64, limits: &Limits) -> CounterView {
        let mut s = self.lock();
        s.roll(now);
        let this_minute = match limits.rpm {
            Some(_) => s.minute.len() as u32,
            None if s.report_minute == now.div_euclid(WINDOW_MS) => s.report_count,
            None => 0,
        };
        CounterView {
            requests_this_minute: this_minute,
            requests_today: s.day_count,
            spent_nanos: s.spent_nanos,
            reserved_nanos: s.reserved_nanos,
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

    fn rpm(n: u32) -> Limits {
        Limits {
            rpm: Some(n),
            ..Limits::default()
        }
    }

    fn admit_ok(c: &KeyCounters, now: i64, l: &Limits, est: i64) -> Standing {
        let (standing, r) = c.admit(now, l, est).unwrap();
        c.settle(r, 0);
        standing
    }

    #[test]
    fn rolling_minute_admits_exactly_rpm_and_retry_after_is_accurate() {
        let c = KeyCounters::restored(t0(), 0, 0);
        let l = rpm(3);
        for i in 0..3 {
            let s = admit_ok(&c, t0() + i * 1000, &l, 0);
            assert_eq!(s.remaining, Some(2 - i as u32));
        }
        let (err, standing) = c.admit(t0() + 2500, &l, 0).unwrap_err();
        assert_eq!(err.code(), "rate_limit_exceeded");
        // The first admission (t0) leaves the window at t0 + 60 s: 57.5 s from now, rounded up.
        assert_eq!(err.retry_after(), Some(58));
        assert_eq!(standing.reset_secs, 58);
        // Still full one millisecond before the slot frees, admitted right after.
        assert!(c.admit(t0() + 59_999, &l, 0).is_err());
        let retry_at = t0() + 2500 + 58_000;
        assert!(c.admit(retry_at, &l, 0).is_ok());
        assert!(c.admit(retry_at, &l, 0).is_err());
    }

    #[test]
    fn daily_limit_resets_at_utc_midnight_and_rejections_consume_nothing() {
        let c = KeyCounters::restored(t0(), 0, 0);
        let l = Limits {
            rpd: Some(2),
            ..Limits::default()
        };
        admit_ok(&c, t0(), &l, 0);
        admit_ok(&c, t0(), &l, 0);
        for _ in 0..5 {
            let (err, _) = c.admit(t0(), &l, 0).unwrap_err();
            assert_eq!(err.code(), "daily_rate_limit_exceeded");
            assert_eq!(err.retry_after(), Some(12 * 3600));
        }
        assert_eq!(c.view(t0(), &Limits::default()).requests_today, 2);
        let tomorrow = (day_index(t0()) + 1) * MS_PER_DAY;
        assert!(c.admit(tomorrow, &l, 0).is_ok());
    }

    #[test]
    fn restored_daily_count_is_enforced() {
        let c = KeyCounters::restored(t0(), 2, 0);
        let l = Limits {
            rpd: Some(2),
            ..Limits::default()
        };
        assert_eq!(
            c.admit(t0(), &l, 0).unwrap_err().0.code(),
            "daily_rate_limit_exceeded"
        );
    }

    #[test]
    fn hard_budget_counts_open_reservations_and_settles_to_real_cost() {
        let c = KeyCounters::restored(t0(), 0, 600);
        let l = Limits {
            budget_nanos: Some(1_000),
            hard_budget: true,
            ..Limits::default()
        };
        let (_, r1) = c.admit(t0(), &l, 300).unwrap();
        let (err, _) = c.admit(t0(), &l, 300).unwrap_err();
        assert_eq!(
            err,
            GateError::BudgetExceeded {
                spend_nanos: 900,
                cap_nanos: 1_000
            }
        );
        c.settle(r1, 100);
        assert_eq!(c.view(t0(), &Limits::default()).spent_nanos, 700);
        assert_eq!(c.view(t0(), &Limits::default()).reserved_nanos, 0);
        let (_, r2) = c.admit(t0(), &l, 300).unwrap();
        c.settle(r2, 0);
    }

    #[test]
    fn rejected_budget_does_not_consume_rate_quota() {
        let c = KeyCounters::restored(t0(), 0, 1_000);
        let l = Limits {
            rpm: Some(1),
            rpd: Some(1),
            budget_nanos: Some(1_000),
            hard_budget: true,
        };
        assert_eq!(
            c.admit(t0(), &l, 1).unwrap_err().0.code(),
            "budget_exceeded"
        );
        let v = c.view(t0(), &Limits::default());
        assert_eq!((v.requests_this_minute, v.requests_today), (0, 0));
    }

    #[test]
    fn soft_budget_warns_once_reached_and_never_blocks() {
        let c = KeyCounters::restored(t0(), 0, 999);
        let l = Limits {
            budget_nanos: Some(1_000),
            hard_budget: false,
            ..Limits::default()
        };
        let (s, r) = c.admit(t0(), &l, 1_000_000).unwrap();
        assert!(!s.budget_warning);
        c.settle(r, 5);
        let (s, r) = c.admit(t0(), &l, 1_000_000).unwrap();
        assert!(s.budget_warning);
        c.settle(r, 0);
    }

    #[test]
    fn budget_resets_on_the_first_of_the_month() {
        let end_nov = days_from_civil(2026, 12, 1) * MS_PER_DAY - 1;
        let c = KeyCounters::restored(end_nov, 0, 1_000);
        let l = Limits {
            budget_nanos: Some(1_000),
            hard_budget: true,
            ..Limits::default()
        };
        assert!(c.admit(end_nov, &l, 1).is_err());
        let (_, r) = c.admit(end_nov + 1, &l, 1).unwrap();
        c.settle(r, 1);
        assert_eq!(c.view(end_nov + 1, &Limits::default()).spent_nanos, 1);
    }

    #[test]
    fn a_request_settled_after_rollover_is_booked_to_its_own_month() {
        let end_nov = days_from_civil(2026, 12, 1) * MS_PER_DAY - 10;
        let c = KeyCounters::restored(end_nov, 0, 0);
        let l = Limits {
            budget_nanos: Some(1_000),
            hard_budget: true,
            ..Limits::default()
        };
        let (_, r) = c.admit(end_nov, &l, 500).unwrap();
        assert_eq!(c.view(end_nov + 20, &Limits::default()).reserved_nanos, 500);
        c.settle(r, 400);
        let v = c.view(end_nov + 20, &Limits::default());
        assert_eq!((v.spent_nanos, v.reserved_nanos), (0, 0));
    }
}
