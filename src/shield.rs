//! Pre-authentication defences: a per-address limit on failed authentications, and a
//! sampler that keeps a flood of unauthenticated requests from growing the trace table.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use pingora_limits::rate::Rate;

/// Failed authentications per client address over fixed one-minute windows. The sketch is
/// approximate (collisions over-count), which is fine here: it only ever turns a 401 into a
/// 429 for a caller that is already failing, and valid keys never consult it.
pub struct AuthShield {
    failures: Rate,
    limit: isize,
}

/// The window of [`AuthShield`], also the `Retry-After` it answers with.
pub const SHIELD_WINDOW: Duration = Duration::from_secs(60);

impl AuthShield {
    pub fn new(failures_per_minute: u32) -> AuthShield {
        AuthShield {
            failures: Rate::new(SHIELD_WINDOW),
            limit: failures_per_minute as isize,
        }
    }

    /// Records one failed authentication from `addr`; true once it is past its limit.
    pub fn failed(&self, addr: &IpAddr) -> bool {
        self.failures.observe(addr, 1) > self.limit
    }
}

/// Keeps at most `per_second` events a second, across all threads, without a lock: one
/// atomic word holds the current second and the count within it.
pub struct Sampler {
    slot: AtomicU64,
    per_second: u64,
}

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;

impl Sampler {
    pub fn new(per_second: u64) -> Sampler {
        Sampler {
            slot: AtomicU64::new(0),
            per_second: per_second.min(COUNT_MASK),
        }
    }

    /// Whether an event at `now_ms` is kept.
    pub fn allow(&self, now_ms: i64) -> bool {
        let second = (now_ms.max(0) as u64 / 1000) << COUNT_BITS;
        let mut cur = self.slot.load(Ordering::Relaxed);
        loop {
            let next = if cur & !COUNT_MASK == second {
                if cur & COUNT_MASK >= self.per_second {
                    return false;
                }
                cur + 1
            } else {
                second | 1
            };
            match self
                .slot
                .compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(seen) => cur = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shield_trips_past_the_limit_per_address_only() {
        let shield = AuthShield::new(3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(!(0..3).any(|_| shield.failed(&a)));
        assert!(shield.failed(&a));
        assert!(!shield.failed(&b), "another address has its own count");
    }

    #[test]
    fn the_sampler_keeps_a_fixed_number_per_second() {
        let s = Sampler::new(10);
        let kept = (0..1000).filter(|_| s.allow(5_000)).count();
        assert_eq!(kept, 10);
        assert!(s.allow(6_000), "a new second starts a new count");
    }
}
