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

    /// Whether `addr` is past its limit already, without counting anything.
    pub fn over_limit(&self, addr: &IpAddr) -> bool {
        self.failures.observe(addr, 0) > self.limit
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

/// An address or a network (`10.0.0.0/8`, `2001:db8::/32`, `127.0.0.1`): the load balancers
/// whose `X-Forwarded-For` is believed (`server.trusted_proxies`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    pub fn parse(s: &str) -> Option<IpNet> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    pub fn contains(&self, ip: &IpAddr) -> bool {
        fn masked(bits: u128, prefix: u8, width: u8) -> u128 {
            if prefix == 0 {
                0
            } else {
                bits >> (width - prefix)
            }
        }
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                masked(u32::from(net).into(), self.prefix, 32)
                    == masked(u32::from(*ip).into(), self.prefix, 32)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                masked(u128::from(net), self.prefix, 128)
                    == masked(u128::from(*ip), self.prefix, 128)
            }
            _ => false,
        }
    }
}

/// The client's address for the per-address limiter. The connection's peer, unless that
/// peer is a trusted proxy: then the right-most `X-Forwarded-For` entry that is not itself
/// a trusted proxy (entries to its left are the client's own word, so they are ignored).
/// A trusted peer that sends no usable header is taken as the client.
pub fn client_ip(peer: IpAddr, forwarded_for: Option<&[u8]>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let Some(header) = forwarded_for.and_then(|h| std::str::from_utf8(h).ok()) else {
        return peer;
    };
    for entry in header.rsplit(',') {
        let entry = entry.trim();
        // `1.2.3.4`, `[2001:db8::1]:443` and `1.2.3.4:5678` all occur in the wild.
        let bare = entry
            .strip_prefix('[')
            .and_then(|e| e.split_once(']'))
            .map(|(a, _)| a)
            .unwrap_or(entry);
        let ip = bare.parse::<IpAddr>().ok().or_else(|| {
            bare.rsplit_once(':')
                .and_then(|(a, _)| a.parse::<std::net::Ipv4Addr>().ok())
                .map(IpAddr::V4)
        });
        match ip {
            Some(ip) if is_trusted(&ip) => continue,
            Some(ip) => return ip,
            // Garbage in the chain: stop believing it at that point.
            None => return peer,
        }
    }
    peer
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| IpNet::parse(s).unwrap()).collect()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn networks_parse_and_contain() {
        let n = IpNet::parse("10.0.0.0/8").unwrap();
        assert!(n.contains(&ip("10.200.1.1")));
        assert!(!n.contains(&ip("11.0.0.1")));
        assert!(!n.contains(&ip("::1")));
        assert!(IpNet::parse("127.0.0.1")
            .unwrap()
            .contains(&ip("127.0.0.1")));
        assert!(IpNet::parse("2001:db8::/32")
            .unwrap()
            .contains(&ip("2001:db8:1::5")));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(&ip("8.8.8.8")));
        for bad in ["10.0.0.0/33", "nope", "10.0.0.0/x", "::/129"] {
            assert_eq!(IpNet::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_peers() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = Some(&b"203.0.113.7"[..]);
        // An untrusted peer cannot choose its address.
        assert_eq!(
            client_ip(ip("198.51.100.2"), h, &trusted),
            ip("198.51.100.2")
        );
        // A trusted balancer names the client.
        assert_eq!(client_ip(ip("10.0.0.5"), h, &trusted), ip("203.0.113.7"));
        // The right-most untrusted entry wins: the client cannot spoof by prepending.
        let chain = Some(&b"1.1.1.1, 203.0.113.7, 10.0.0.9"[..]);
        assert_eq!(
            client_ip(ip("10.0.0.5"), chain, &trusted),
            ip("203.0.113.7")
        );
        // Ports and brackets.
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some(&b"203.0.113.7:5555"[..]), &trusted),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some(&b"[2001:db8::7]:443"[..]), &trusted),
            ip("2001:db8::7")
        );
        // No header, or garbage: the balancer itself.
        assert_eq!(client_ip(ip("10.0.0.5"), None, &trusted), ip("10.0.0.5"));
        assert_eq!(
            client_ip(ip("10.0.0.5"), Some(&b"junk"[..]), &trusted),
            ip("10.0.0.5")
        );
        // No trusted proxies configured: never believed.
        assert_eq!(client_ip(ip("10.0.0.5"), h, &[]), ip("10.0.0.5"));
    }
}
