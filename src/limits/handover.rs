//! A binary upgrade's side of the live counters (see `crate::handover`): the rolling minute
//! a process hands to its successor, and the holds the successor takes for the admissions
//! its predecessor still has open.

use crate::clock::{day_index, month_index, Now};
use crate::money::Nanos;

use super::brakes::LOOP_MS;
use super::{KeyCounters, Level, Limits, Reservation, Upline, WINDOW_MS};

impl KeyCounters {
    /// The admissions in the rolling minute, as unix ms (for a successor).
    pub fn minute_walls(&self, now: Now) -> Vec<i64> {
        let mut s = self.lock();
        s.roll(now);
        s.requests
            .minute
            .iter()
            .map(|&t| now.wall - (now.mono - t))
            .collect()
    }

    /// Counts a predecessor's admissions (unix ms) into the rolling minute of a key or
    /// group with an `rpm`; those a minute old or more are past already.
    pub fn seed_minute(&self, now: Now, limits: &Limits, walls: &[i64]) {
        let Some(rpm) = limits.rpm else {
            return;
        };
        let mut s = self.lock();
        s.roll(now);
        s.keep_minute(now, limits.rpm);
        for &wall in walls {
            let mono = now.mono - (now.wall - wall).max(0);
            if mono > now.mono - WINDOW_MS {
                s.requests.minute.push_back(mono);
            }
        }
        s.requests.minute.make_contiguous().sort_unstable();
        while s.requests.minute.len() > rpm as usize {
            s.requests.minute.pop_front();
        }
    }

    /// The loop table's admissions still in its window, as (digest, unix ms), for a
    /// successor (`loop_limit`: SPEC §2 across an upgrade, §7).
    pub fn loop_walls(&self, now: Now) -> Vec<(u128, i64)> {
        let s = self.lock();
        s.brakes.as_deref().map_or_else(Vec::new, |b| {
            b.loops
                .admissions(now.mono)
                .into_iter()
                .map(|(digest, t)| (digest, now.wall - (now.mono - t)))
                .collect()
        })
    }

    /// Counts a predecessor's admissions of one request (`digest`, at unix ms `walls`) into
    /// the key's loop table; those a minute old or more are past already.
    pub fn seed_loops(&self, now: Now, digest: u128, walls: &mut [i64]) {
        walls.sort_unstable();
        let mut s = self.lock();
        let b = s.brakes.get_or_insert_with(Box::default);
        for &wall in walls.iter() {
            let mono = now.mono - (now.wall - wall).max(0);
            if mono > now.mono - LOOP_MS {
                b.loops.count(mono, digest);
            }
        }
    }

    /// Holds what an admission of the predecessor, still open, held there: `bound` at
    /// every level if any of them has a hard budget, and against the key's hour window if it
    /// has a `max_usd_per_hour`; an in-flight slot; and a request of today if it was admitted
    /// today. Nothing is checked: the predecessor admitted it. Settled like any reservation,
    /// with the charge the predecessor booked (which the hour window then counts).
    pub fn adopt(
        &self,
        now: Now,
        limits: &Limits,
        bound: Nanos,
        uplines: &[Upline],
        admitted_at: i64,
    ) -> Reservation {
        let held = if super::hard_capped(limits, uplines) {
            bound.max(Nanos::ZERO)
        } else {
            Nanos::ZERO
        };
        for u in uplines {
            let mut g = u.counters.lock();
            g.roll(now);
            match u.level {
                Level::Parent => g.tree_reserved += held,
                Level::Group => g.reserved += held,
            }
        }
        let hour_held = if limits.max_usd_per_hour.is_some() {
            bound.max(Nanos::ZERO)
        } else {
            Nanos::ZERO
        };
        let mut s = self.lock();
        s.roll(now);
        s.reserved += held;
        s.inflight += 1;
        if hour_held > Nanos::ZERO {
            s.brakes.get_or_insert_with(Box::default).spend.reserved += hour_held;
        }
        if day_index(admitted_at) == s.requests.day {
            s.requests.day_count = s.requests.day_count.saturating_add(1);
        }
        Reservation {
            held,
            hour_held,
            month: month_index(admitted_at),
            shared: None,
            decided_at: None,
            uplines: uplines
                .iter()
                .map(|u| (u.level, u.counters.clone()))
                .collect(),
        }
    }
}
