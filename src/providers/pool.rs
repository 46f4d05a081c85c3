//! A provider's pool of API keys (`api_key_envs`): requests spread round-robin over the
//! keys, and a key the provider answered 401 or 429 rests before it is used again, for the
//! provider's `retry-after` if it sent one, else for an exponential back-off. When every
//! key rests, the caller learns how long until the first one wakes, for an honest
//! `Retry-After`.
//!
//! Lock-free: a pick is one atomic add (skipped for a single key) and one load per key
//! looked at.

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use http::HeaderValue;

/// First rest of a key without `retry-after`; doubled per consecutive failure.
const FIRST_REST_MS: i64 = 1_000;
/// The longest rest without `retry-after`.
const MAX_REST_MS: i64 = 60_000;
/// A provider's `retry-after` is honoured up to this (a day): a bogus huge value cannot
/// park a key forever.
const MAX_RETRY_AFTER_MS: i64 = 86_400_000;

pub struct PoolKey {
    /// The environment variable's name: the label on metrics (never the value).
    pub env: Arc<str>,
    /// The header value that carries the key (`Bearer <key>` or the bare key).
    pub header: HeaderValue,
    rest_until_ms: AtomicI64,
    strikes: AtomicU32,
}

#[derive(Default)]
pub struct KeyPool {
    keys: Vec<PoolKey>,
    next: AtomicUsize,
}

/// Every key rests; the first wakes in this many milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllResting {
    pub wake_in_ms: i64,
}

impl KeyPool {
    /// `keys`: (env var name, header value), in the config's order.
    pub fn new(keys: Vec<(String, HeaderValue)>) -> KeyPool {
        KeyPool {
            keys: keys
                .into_iter()
                .map(|(env, header)| PoolKey {
                    env: Arc::from(env),
                    header,
                    rest_until_ms: AtomicI64::new(0),
                    strikes: AtomicU32::new(0),
                })
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PoolKey] {
        &self.keys
    }

    pub fn get(&self, i: usize) -> &PoolKey {
        &self.keys[i]
    }

    /// The next key that is not resting, round-robin. `Ok(None)` for a provider with no key.
    pub fn pick(&self, now_ms: i64) -> Result<Option<usize>, AllResting> {
        let n = self.keys.len();
        let start = match n {
            0 => return Ok(None),
            1 => 0,
            _ => self.next.fetch_add(1, Relaxed) % n,
        };
        let mut wake = i64::MAX;
        for step in 0..n {
            let i = (start + step) % n;
            let until = self.keys[i].rest_until_ms.load(Relaxed);
            if until <= now_ms {
                return Ok(Some(i));
            }
            wake = wake.min(until - now_ms);
        }
        Err(AllResting { wake_in_ms: wake })
    }

    /// Whether some key other than `i` is usable now (a retry on the same model may help).
    pub fn other_ready(&self, i: usize, now_ms: i64) -> bool {
        self.keys
            .iter()
            .enumerate()
            .any(|(j, k)| j != i && k.rest_until_ms.load(Relaxed) <= now_ms)
    }

    /// Key `i` was refused (401 or 429): it rests for `retry_after_ms` if the provider said,
    /// else 1 s, 2 s, 4 s ... up to a minute by consecutive failures.
    pub fn rest(&self, i: usize, now_ms: i64, retry_after_ms: Option<i64>) {
        let key = &self.keys[i];
        let strikes = key.strikes.fetch_add(1, Relaxed).min(16);
        let backoff = (FIRST_REST_MS << strikes).min(MAX_REST_MS);
        let rest = retry_after_ms.map_or(backoff, |ms| ms.clamp(0, MAX_RETRY_AFTER_MS));
        key.rest_until_ms.fetch_max(now_ms + rest, Relaxed);
    }

    /// Key `i` was accepted: its back-off starts over.
    pub fn succeeded(&self, i: usize) {
        let key = &self.keys[i];
        if key.strikes.load(Relaxed) != 0 {
            key.strikes.store(0, Relaxed);
        }
    }

    /// For `/metrics`: whether key `i` is usable at `now_ms`, and its consecutive failures.
    pub fn health(&self, i: usize, now_ms: i64) -> (bool, u32) {
        let key = &self.keys[i];
        (
            key.rest_until_ms.load(Relaxed) <= now_ms,
            key.strikes.load(Relaxed),
        )
    }
}

/// `retry-after` as milliseconds: delta-seconds only (an HTTP date is treated as absent,
/// so the back-off applies).
pub fn retry_after_ms(value: Option<&[u8]>) -> Option<i64> {
    let secs: u64 = std::str::from_utf8(value?).ok()?.trim().parse().ok()?;
    Some(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX))
}

/// Whether a 429 concerns only the request (OpenAI's "Request too large ... Limit 30000,
/// Requested 450000"), not the key: the provider's own rate-limit headers on the refusal say
/// the key still has both requests and tokens left. Such a refusal must not rest a pooled
/// key (SPEC §2: one agent cannot get the provider's keys benched for everyone). Without
/// those headers the key is taken to be exhausted.
pub fn key_has_capacity(headers: &http::HeaderMap) -> bool {
    let left = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let openai = (
        left("x-ratelimit-remaining-requests"),
        left("x-ratelimit-remaining-tokens"),
    );
    let anthropic = (
        left("anthropic-ratelimit-requests-remaining"),
        left("anthropic-ratelimit-tokens-remaining")
            .or_else(|| left("anthropic-ratelimit-input-tokens-remaining")),
    );
    [openai, anthropic]
        .iter()
        .any(|&(requests, tokens)| requests.is_some_and(|r| r > 0) && tokens.is_some_and(|t| t > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(n: usize) -> KeyPool {
        KeyPool::new(
            (0..n)
                .map(|i| (format!("K{i}"), HeaderValue::from(i as u64)))
                .collect(),
        )
    }

    #[test]
    fn round_robin_over_every_key() {
        let p = pool(3);
        let picks: Vec<_> = (0..6).map(|_| p.pick(0).unwrap().unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(pool(0).pick(0), Ok(None));
    }

    #[test]
    fn a_resting_key_is_skipped_until_its_retry_after() {
        let p = pool(2);
        p.rest(0, 1_000, Some(30_000));
        for _ in 0..4 {
            assert_eq!(p.pick(1_000), Ok(Some(1)));
        }
        assert!(p.other_ready(0, 1_000));
        assert!(!p.other_ready(1, 1_000));
        p.rest(1, 1_000, None);
        assert_eq!(p.pick(1_500), Err(AllResting { wake_in_ms: 500 }));
        assert_eq!(p.pick(2_000), Ok(Some(1)));
        assert_eq!(p.pick(31_000).map(|k| k.is_some()), Ok(true));
    }

    #[test]
    fn back_off_doubles_then_caps_and_resets_on_success() {
        let p = pool(1);
        let mut rests = Vec::new();
        for _ in 0..8 {
            p.rest(0, 0, None);
            match p.pick(0) {
                Err(AllResting { wake_in_ms }) => rests.push(wake_in_ms),
                Ok(_) => panic!("must rest"),
            }
        }
        assert_eq!(
            rests,
            vec![1_000, 2_000, 4_000, 8_000, 16_000, 32_000, 60_000, 60_000]
        );
        p.succeeded(0);
        assert_eq!(p.health(0, 0), (false, 0));
        assert_eq!(p.health(0, 60_000), (true, 0));
    }

    #[test]
    fn retry_after_parses_seconds_only() {
        assert_eq!(retry_after_ms(Some(b" 7")), Some(7_000));
        assert_eq!(retry_after_ms(Some(b"Wed, 21 Oct 2015 07:28:00 GMT")), None);
        assert_eq!(retry_after_ms(None), None);
    }
}
