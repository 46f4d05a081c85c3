//! Runaway-agent brakes of one key (SPEC §7): spend over a rolling hour (`max_usd_per_hour`,
//! reservations included) and the same request repeated within a rolling minute
//! (`loop_limit`).
//!
//! Both are fixed-size, allocated once per key on the first admission that needs them, so a
//! key without these limits pays nothing, and one with them allocates nothing per request in
//! the steady state. Both windows run on the monotonic clock, like the rolling minute.
//!
//! Granularity, the same here and in the cluster's Lua (`admit.lua`): spend settled in clock
//! minute `m` counts until the END of minute `m + 60`, and an admission in clock second `s`
//! counts until the end of second `s + 60`. Everything is thus counted for at least the full
//! 60 minutes (60 s) the contract names, and at most one bucket longer: never less, so no
//! rolling window ever holds more than the cap, and a `Retry-After` computed from the same
//! buckets is exact (a retry then fits, one second earlier it does not).

use siphasher::sip128::{Hasher128, SipHasher13};
use std::hash::Hasher;

use crate::money::Nanos;

const MS_PER_MIN: i64 = 60_000;
/// The spend window: spend settled at `t` counts until `t` + 60 minutes.
pub const HOUR_MINUTES: i64 = 60;
const HOUR_MS: i64 = HOUR_MINUTES * MS_PER_MIN;
/// The loop window: an admission at `t` counts until `t` + 60 s.
pub const LOOP_SECONDS: i64 = 60;
pub(super) const LOOP_MS: i64 = LOOP_SECONDS * 1000;
/// Ring sizes: a power of two above the 61 buckets that can count at once.
const SPEND_SLOTS: usize = 64;
const LOOP_SLOTS: usize = 64;
/// Distinct requests remembered per key. A loop repeats, so the least recently seen entry is
/// the one evicted: a looping request is only forgotten if more than this many other
/// distinct bodies arrive between two of its repeats, which is no longer a tight loop. At
/// 280 bytes an entry, this bounds a key's table at under 18 KiB.
pub const LOOP_ENTRIES: usize = 64;

/// How much of a large form's opening (a form decided as it arrives) its loop digest
/// covers, with its length: a key with a `loop_limit` reads at least this much of it before
/// the decision, so the same upload always hashes the same bytes, however they arrived.
pub const UPLOAD_LOOP_PREFIX: usize = 64 * 1024;

/// Digest of one request for loop detection: SipHash-1-3 (128 bits, fixed keys) over the
/// endpoint, the requested model and the body bytes. Fixed keys and a specified algorithm,
/// so every node of a cluster computes the same digest; the body itself is never kept.
///
/// `whole_len`: the whole body's length when `body` is only its opening (a large form
/// decided as it arrives), so uploads that open alike but differ in length differ here.
pub fn request_digest(endpoint: &str, model: &str, body: &[u8], whole_len: Option<usize>) -> u128 {
    let mut h = SipHasher13::new_with_keys(0x5370_6964_6572_4761, 0x7465_4c6f_6f70_4b31);
    // Lengths first, so no two (endpoint, model, body) splits hash the same bytes.
    h.write_u64(endpoint.len() as u64);
    h.write(endpoint.as_bytes());
    h.write_u64(model.len() as u64);
    h.write(model.as_bytes());
    if let Some(len) = whole_len {
        h.write_u64(len as u64);
    }
    h.write(body);
    h.finish128().as_u128()
}

/// Whole seconds from `now` until `at` (ms), rounded up, at least 1.
fn secs_until(now: i64, at: i64) -> u64 {
    (at.saturating_sub(now).saturating_add(999) / 1000).max(1) as u64
}

/// Why the brakes refused a request; the caller turns it into a `GateError`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Spend in the hour (settled and held) and the cap.
    SpendRate {
        spend: Nanos,
        cap: Nanos,
        retry_after_secs: u64,
    },
    Loop {
        limit: u32,
        retry_after_secs: u64,
    },
}

/// A key's brakes. Boxed on the key's counters only once the key has one of the limits.
#[derive(Debug, Default)]
pub struct Brakes {
    pub spend: SpendWindow,
    pub loops: LoopTable,
}

/// Settled spend per clock minute over the last hour, plus what open requests hold. A
/// minute's spend counts until an hour after the latest booking in it: never less than an
/// hour for any of its bookings (so the cap holds over every rolling hour), and a refusal's
/// `Retry-After` is never above 3600 s.
#[derive(Debug)]
pub struct SpendWindow {
    /// The minute each slot holds (slot = minute mod 64); a slot of another minute is empty.
    minutes: [i64; SPEND_SLOTS],
    spent: [Nanos; SPEND_SLOTS],
    /// When the slot's minute was last booked (ms).
    latest: [i64; SPEND_SLOTS],
    /// Upper-bound costs of admitted requests not settled yet.
    pub reserved: Nanos,
}

impl Default for SpendWindow {
    fn default() -> Self {
        SpendWindow {
            minutes: [i64::MIN; SPEND_SLOTS],
            spent: [Nanos::ZERO; SPEND_SLOTS],
            latest: [i64::MIN; SPEND_SLOTS],
            reserved: Nanos::ZERO,
        }
    }
}

impl SpendWindow {
    /// Settled spend of minute `m` still in the window at `now_ms`, and when it leaves.
    fn at(&self, m: i64, now_ms: i64) -> Option<(Nanos, i64)> {
        let i = m.rem_euclid(SPEND_SLOTS as i64) as usize;
        let leaves = self.latest[i].saturating_add(HOUR_MS);
        (self.minutes[i] == m && leaves > now_ms).then_some((self.spent[i], leaves))
    }

    /// Settled spend still in the window at `now_ms`. A minute before the last 61 cannot be
    /// (its latest booking was over an hour ago).
    pub fn settled(&self, now_ms: i64) -> Nanos {
        let cur = now_ms.div_euclid(MS_PER_MIN);
        (cur - HOUR_MINUTES..=cur)
            .filter_map(|m| self.at(m, now_ms))
            .map(|(spent, _)| spent)
            .sum()
    }

    /// Whether `bound` more fits under `cap` at `now_ms`; else when it will (the minute whose
    /// leaving frees enough), or in 1 s when only open holds are in the way (they settle as
    /// requests finish), or in an hour when the bound alone exceeds the cap.
    pub fn check(&self, now_ms: i64, cap: Nanos, bound: Nanos) -> Result<(), Refusal> {
        let settled = self.settled(now_ms);
        let committed = settled + self.reserved;
        if committed + bound <= cap {
            return Ok(());
        }
        let refuse = |retry_after_secs| Refusal::SpendRate {
            spend: committed,
            cap,
            retry_after_secs,
        };
        if bound > cap {
            return Err(refuse(secs_until(0, HOUR_MINUTES * MS_PER_MIN)));
        }
        // The earliest a retry can be admitted: open holds may settle (for less) at any
        // moment, so they are not waited out; settled spend leaves the window on its clock.
        // Holds alone in the way: a second.
        if settled + bound <= cap {
            return Err(refuse(1));
        }
        let cur = now_ms.div_euclid(MS_PER_MIN);
        let mut left = settled;
        for m in cur - HOUR_MINUTES..=cur {
            let Some((s, leaves)) = self.at(m, now_ms).filter(|(s, _)| *s != Nanos::ZERO) else {
                continue;
            };
            left -= s;
            if left + bound <= cap {
                return Err(refuse(secs_until(now_ms, leaves)));
            }
        }
        Err(refuse(1))
    }

    /// Books settled spend to the minute of `now_ms`.
    pub fn book(&mut self, now_ms: i64, cost: Nanos) {
        let cur = now_ms.div_euclid(MS_PER_MIN);
        let i = cur.rem_euclid(SPEND_SLOTS as i64) as usize;
        if self.minutes[i] != cur {
            self.minutes[i] = cur;
            self.spent[i] = Nanos::ZERO;
            self.latest[i] = i64::MIN;
        }
        self.spent[i] += cost.max(Nanos::ZERO);
        self.latest[i] = self.latest[i].max(now_ms);
    }
}

/// Admissions of one distinct request, per clock second of the last minute. A second's
/// admissions count until 60 s after the latest of them: never less than 60 s for any (so
/// no more than the limit pass in any rolling minute), and a refusal's `Retry-After` is
/// never above 60 s.
#[derive(Debug, Clone)]
struct LoopEntry {
    digest: u128,
    /// The newest second counted; slot `s mod 64` holds second `s` for `s` in
    /// `(newest - 64, newest]`.
    newest: i64,
    counts: [u16; LOOP_SLOTS],
    /// The millisecond, within its second, of each slot's latest admission.
    latest: [u16; LOOP_SLOTS],
}

impl LoopEntry {
    /// Admissions of second `s` still in the window at `now_ms`, and when they leave.
    fn at(&self, s: i64, now_ms: i64) -> Option<(u32, i64)> {
        if s > self.newest || s <= self.newest - LOOP_SLOTS as i64 {
            return None;
        }
        let i = s.rem_euclid(LOOP_SLOTS as i64) as usize;
        let leaves = s * 1000 + i64::from(self.latest[i]) + LOOP_MS;
        (self.counts[i] > 0 && leaves > now_ms).then_some((u32::from(self.counts[i]), leaves))
    }

    /// The seconds that may hold admissions in the window at `now_ms` (any counted after it
    /// included: another request may have read the clock later and been admitted first).
    fn seconds(&self, now_ms: i64) -> std::ops::RangeInclusive<i64> {
        let now_s = now_ms.div_euclid(1000);
        now_s - LOOP_SECONDS..=self.newest.max(now_s)
    }

    /// Admissions in the window at `now_ms`.
    fn count(&self, now_ms: i64) -> u32 {
        self.seconds(now_ms)
            .filter_map(|s| self.at(s, now_ms))
            .map(|(n, _)| n)
            .sum()
    }

    fn add(&mut self, now_ms: i64) {
        let now_s = now_ms.div_euclid(1000);
        if now_s > self.newest {
            // Clear the seconds between the newest counted and now (at most the ring).
            let from = self.newest.max(now_s - LOOP_SLOTS as i64) + 1;
            for s in from..=now_s {
                let i = s.rem_euclid(LOOP_SLOTS as i64) as usize;
                self.counts[i] = 0;
                self.latest[i] = 0;
            }
            self.newest = now_s;
        }
        // An admission whose clock read is older than `newest` lands in its own second if
        // the ring still holds it, else in the oldest one it holds (later, so conservative).
        let s = now_s.max(self.newest - LOOP_SLOTS as i64 + 1);
        let i = s.rem_euclid(LOOP_SLOTS as i64) as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
        if s == now_s {
            // 0..=999: fits.
            let ms = now_ms.rem_euclid(1000) as u16;
            self.latest[i] = self.latest[i].max(ms);
        }
    }
}

/// The key's recently seen requests, at most [`LOOP_ENTRIES`].
#[derive(Debug, Default)]
pub struct LoopTable {
    entries: Vec<LoopEntry>,
}

impl LoopTable {
    fn find(&self, digest: u128) -> Option<usize> {
        self.entries.iter().position(|e| e.digest == digest)
    }

    /// Whether one more of `digest` is within `limit` at `now_ms`; else when the oldest
    /// admission that must leave for it to fit leaves the window.
    pub fn check(&self, now_ms: i64, limit: u32, digest: u128) -> Result<(), Refusal> {
        let Some(e) = self.find(digest).map(|i| &self.entries[i]) else {
            return Ok(());
        };
        let n = e.count(now_ms);
        if n < limit {
            return Ok(());
        }
        let mut left = n;
        for (count, leaves) in e.seconds(now_ms).filter_map(|s| e.at(s, now_ms)) {
            left -= count;
            if left < limit {
                return Err(Refusal::Loop {
                    limit,
                    retry_after_secs: secs_until(now_ms, leaves),
                });
            }
        }
        Err(Refusal::Loop {
            limit,
            retry_after_secs: 1,
        })
    }

    /// Every admission still in the window at `now_ms`, as (digest, ms): each at the latest
    /// admission of its second, the time the window counts it until (for a successor,
    /// which counts them again with [`LoopTable::count`] in time order: the same figures).
    pub fn admissions(&self, now_ms: i64) -> Vec<(u128, i64)> {
        let mut out = Vec::new();
        for e in &self.entries {
            for (count, leaves) in e.seconds(now_ms).filter_map(|s| e.at(s, now_ms)) {
                out.extend(std::iter::repeat_n(
                    (e.digest, leaves - LOOP_MS),
                    count as usize,
                ));
            }
        }
        out
    }

    /// Counts one admission of `digest`, reusing the entry of a request no longer in the
    /// window, else the least recently seen one, once the table is full.
    pub fn count(&mut self, now_ms: i64, digest: u128) {
        if let Some(i) = self.find(digest) {
            self.entries[i].add(now_ms);
            return;
        }
        let fresh = LoopEntry {
            digest,
            newest: now_ms.div_euclid(1000),
            counts: [0; LOOP_SLOTS],
            latest: [0; LOOP_SLOTS],
        };
        let i = if self.entries.len() < LOOP_ENTRIES {
            self.entries.push(fresh);
            self.entries.len() - 1
        } else {
            let oldest = self
                .entries
                .iter()
                .enumerate()
                .min_by_key(|(_, e)| e.newest)
                .map_or(0, |(i, _)| i);
            self.entries[oldest] = fresh;
            oldest
        };
        self.entries[i].add(now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_000_000_000_000 / MS_PER_MIN * MS_PER_MIN;

    #[test]
    fn spend_leaves_the_window_an_hour_after_its_minutes_latest_booking() {
        let mut w = SpendWindow::default();
        let cap = Nanos::new(1_000);
        w.book(T0 + 10_000, Nanos::new(300));
        w.book(T0 + 30_000, Nanos::new(400));
        w.book(T0 + 5 * MS_PER_MIN, Nanos::new(200));
        assert!(w.check(T0 + 6 * MS_PER_MIN, cap, Nanos::new(100)).is_ok());
        let now = T0 + 10 * MS_PER_MIN + 500;
        let Err(Refusal::SpendRate {
            retry_after_secs, ..
        }) = w.check(now, cap, Nanos::new(200))
        else {
            panic!("over the cap")
        };
        // The first minute's 700 leaves an hour after its latest booking (T0 + 30 s): never
        // before an hour for either booking, and never more than an hour after the refusal.
        let leaves = T0 + 30_000 + HOUR_MS;
        assert_eq!(retry_after_secs, ((leaves - now) as u64).div_ceil(1000));
        assert!(retry_after_secs <= 3600);
        assert!(w.check(leaves - 1, cap, Nanos::new(200)).is_err());
        assert!(w.check(leaves, cap, Nanos::new(200)).is_ok());
        // 1,000 would need the second minute gone too.
        let Err(Refusal::SpendRate {
            retry_after_secs, ..
        }) = w.check(now, cap, Nanos::new(1_000))
        else {
            panic!()
        };
        assert_eq!(
            retry_after_secs,
            ((T0 + 5 * MS_PER_MIN + HOUR_MS - now) as u64).div_ceil(1000)
        );
    }

    /// Refused a moment after the spend that fills the cap, the retry is at most an hour away
    /// and admitted then, wherever in its minute the spend fell.
    #[test]
    fn spend_rate_retry_after_is_at_most_an_hour_and_exact() {
        for offset in [0, 1, 500, 59_998, 59_999] {
            let mut w = SpendWindow::default();
            let cap = Nanos::new(1_000);
            let booked = T0 + offset;
            w.book(booked, Nanos::new(1_000));
            let now = booked + 1;
            let Err(Refusal::SpendRate {
                retry_after_secs, ..
            }) = w.check(now, cap, Nanos::new(1))
            else {
                panic!("over the cap")
            };
            assert_eq!(retry_after_secs, 3600, "booked at +{offset} ms");
            let retry = now + retry_after_secs as i64 * 1000;
            assert!(w.check(retry, cap, Nanos::new(1)).is_ok());
            assert!(w.check(booked + HOUR_MS - 1, cap, Nanos::new(1)).is_err());
        }
    }

    /// Settled spend and open holds both in the way: the retry is when it could be admitted,
    /// not an hour on (the holds settle, for less than they held, as their requests end).
    #[test]
    fn a_retry_after_waits_out_settled_spend_and_not_open_holds() {
        let mut w = SpendWindow::default();
        let cap = Nanos::new(1_000);
        w.book(T0, Nanos::new(200));
        w.reserved = Nanos::new(700);
        let now = T0 + 5_000;
        // The holds alone are in the way: retry in a second.
        let Err(Refusal::SpendRate {
            retry_after_secs, ..
        }) = w.check(now, cap, Nanos::new(200))
        else {
            panic!("over the cap with the holds")
        };
        assert_eq!(retry_after_secs, 1);
        // Settled spend in the way too: when it leaves, whatever the holds.
        let Err(Refusal::SpendRate {
            retry_after_secs, ..
        }) = w.check(now, cap, Nanos::new(900))
        else {
            panic!("over the cap")
        };
        assert_eq!(retry_after_secs, (HOUR_MS - 5_000) as u64 / 1000);
        w.reserved = Nanos::ZERO;
        assert!(w
            .check(now + retry_after_secs as i64 * 1000, cap, Nanos::new(900))
            .is_ok());
    }

    #[test]
    fn open_holds_count_and_a_bound_above_the_cap_never_fits() {
        let w = SpendWindow {
            reserved: Nanos::new(900),
            ..SpendWindow::default()
        };
        let cap = Nanos::new(1_000);
        assert!(w.check(T0, cap, Nanos::new(100)).is_ok());
        assert!(matches!(
            w.check(T0, cap, Nanos::new(101)),
            Err(Refusal::SpendRate {
                retry_after_secs: 1,
                ..
            })
        ));
        assert!(matches!(
            w.check(T0, cap, Nanos::new(1_001)),
            Err(Refusal::SpendRate {
                retry_after_secs: 3600,
                ..
            })
        ));
    }

    #[test]
    fn loops_count_per_digest_in_a_rolling_minute() {
        let mut t = LoopTable::default();
        let (a, b) = (
            request_digest("x", "m", b"a", None),
            request_digest("x", "m", b"b", None),
        );
        for i in 0..3 {
            assert!(t.check(T0 + i * 10_000, 3, a).is_ok());
            t.count(T0 + i * 10_000, a);
        }
        assert!(t.check(T0 + 25_000, 3, b).is_ok());
        let Err(Refusal::Loop {
            retry_after_secs, ..
        }) = t.check(T0 + 25_000, 3, a)
        else {
            panic!("fourth within the minute")
        };
        // The first (at T0) leaves at T0 + 60 s.
        assert_eq!(retry_after_secs, 35);
        assert!(t.check(T0 + 59_999, 3, a).is_err());
        assert!(t.check(T0 + 60_000, 3, a).is_ok());
    }

    /// Refused a moment after the admissions that filled the limit, the retry is at most 60 s
    /// away and admitted then, wherever in its second the first admission fell; never earlier.
    #[test]
    fn loop_retry_after_is_at_most_a_minute_and_exact() {
        let d = request_digest("x", "m", b"a", None);
        for offset in [0, 1, 500, 998, 999] {
            let mut t = LoopTable::default();
            let first = T0 + offset;
            t.count(first, d);
            t.count(first + 1, d);
            let now = first + 2;
            let Err(Refusal::Loop {
                retry_after_secs, ..
            }) = t.check(now, 2, d)
            else {
                panic!("a third within the minute")
            };
            assert!(
                retry_after_secs <= 60,
                "{retry_after_secs} s at +{offset} ms"
            );
            let retry = now + retry_after_secs as i64 * 1000;
            assert!(t.check(retry, 2, d).is_ok(), "at +{offset} ms");
            // Never earlier: the first counts for a full 60 s.
            assert!(t.check(first + LOOP_MS - 1, 2, d).is_err());
        }
    }

    #[test]
    fn the_table_is_bounded_and_evicts_the_least_recently_seen() {
        let mut t = LoopTable::default();
        let hot = request_digest("x", "m", b"hot", None);
        for i in 0..(LOOP_ENTRIES as i64 * 3) {
            t.count(T0 + i * 1000, hot);
            t.count(
                T0 + i * 1000,
                request_digest("x", "m", &i.to_le_bytes(), None),
            );
        }
        assert_eq!(t.entries.len(), LOOP_ENTRIES);
        assert!(t.find(hot).is_some(), "a request that repeats is kept");
    }

    #[test]
    fn digests_separate_endpoint_model_and_body() {
        let d = request_digest("chat.completions", "m", b"{}", None);
        assert_ne!(d, request_digest("embeddings", "m", b"{}", None));
        assert_ne!(d, request_digest("chat.completions", "n", b"{}", None));
        assert_ne!(d, request_digest("chat.completions", "m", b"{ }", None));
        assert_eq!(d, request_digest("chat.completions", "m", b"{}", None));
        // An opening: its bytes in uploads of other lengths are other requests.
        let opening = request_digest("audio.transcriptions", "w", b"--b", Some(2_000_000));
        assert_ne!(
            opening,
            request_digest("audio.transcriptions", "w", b"--b", Some(3_000_000))
        );
        assert_ne!(
            opening,
            request_digest("audio.transcriptions", "w", b"--b", None)
        );
        assert_eq!(
            opening,
            request_digest("audio.transcriptions", "w", b"--b", Some(2_000_000))
        );
    }
}
