//! Every address a provider's host name resolves to, resolved again in the background so a
//! provider that moves behind its CDN stays reachable without a restart.
//!
//! The request path never waits for DNS: it loads the current list (one `ArcSwap` load) and
//! starts at the next address round-robin (one relaxed atomic add, skipped when there is
//! only one address). A refused or timed-out connect moves the attempt to another address
//! and sets the failed one aside for [`SET_ASIDE_MS`], so a host whose IPv6 address is
//! unreachable does not cost every other request a failed connect. A lookup that fails or
//! returns nothing keeps the old list.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;

/// How long an address that refused a connection is passed over (unless all are).
pub const SET_ASIDE_MS: i64 = 10_000;
/// Addresses beyond this many are never used (one bit each in [`Tried`]).
const MAX_ADDRS: usize = 64;

pub struct ProviderAddrs {
    /// What is resolved: the provider's host, or the egress proxy's when it tunnels.
    host: String,
    port: u16,
    current: ArcSwap<AddrList>,
    /// Round-robin cursor, shared by every request.
    next: AtomicUsize,
}

struct AddrList {
    addrs: Vec<SocketAddr>,
    /// Per address: wall-clock ms until which it is passed over.
    set_aside_until: Vec<AtomicI64>,
}

impl AddrList {
    fn new(addrs: Vec<SocketAddr>) -> AddrList {
        let set_aside_until = addrs.iter().map(|_| AtomicI64::new(0)).collect();
        AddrList {
            addrs,
            set_aside_until,
        }
    }
}

/// The addresses one attempt already tried, by index in the list.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tried(u64);

impl Tried {
    fn has(self, i: usize) -> bool {
        self.0 & (1 << i) != 0
    }
}

/// The result of a background lookup that changed something.
#[derive(Debug, PartialEq, Eq)]
pub struct Change {
    pub before: Vec<SocketAddr>,
    pub after: Vec<SocketAddr>,
}

impl ProviderAddrs {
    /// Resolves `host:port` now (start-up, reload, `check-config`).
    pub fn resolve(host: &str, port: u16) -> std::io::Result<ProviderAddrs> {
        let addrs = lookup(host, port)?;
        Ok(Self::with(host, port, addrs))
    }

    /// Like [`ProviderAddrs::resolve`], but a host that does not resolve now (DNS down at
    /// start-up, a provider this network cannot see yet) starts with no address: its
    /// requests fail to connect until a background lookup finds one. The error is returned
    /// beside it, for a warning.
    pub fn resolve_or_wait(host: &str, port: u16) -> (ProviderAddrs, Option<std::io::Error>) {
        match lookup(host, port) {
            Ok(addrs) => (Self::with(host, port, addrs), None),
            Err(e) => (Self::with(host, port, Vec::new()), Some(e)),
        }
    }

    fn with(host: &str, port: u16, addrs: Vec<SocketAddr>) -> ProviderAddrs {
        ProviderAddrs {
            host: host.to_owned(),
            port,
            current: ArcSwap::from_pointee(AddrList::new(addrs)),
            next: AtomicUsize::new(0),
        }
    }

    /// The host name this list follows.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The addresses in use now.
    pub fn current(&self) -> Vec<SocketAddr> {
        self.current.load().addrs.clone()
    }

    /// A starting point for one attempt: requests take turns over the addresses.
    pub fn start(&self) -> usize {
        if self.current.load().addrs.len() > 1 {
            self.next.fetch_add(1, Relaxed)
        } else {
            0
        }
    }

    /// The address an attempt that began at `start` connects to next: the first one from
    /// there that it has not tried and that is not set aside; if every untried one is set
    /// aside, the first untried one. `None` once every address was tried.
    pub fn pick(&self, start: usize, tried: Tried, now_ms: i64) -> Option<(usize, SocketAddr)> {
        let list = self.current.load();
        let n = list.addrs.len().min(MAX_ADDRS);
        if n == 0 {
            return None;
        }
        let order = (0..n)
            .map(|k| start.wrapping_add(k) % n)
            .filter(|&i| !tried.has(i));
        let mut first_untried = None;
        for i in order {
            first_untried.get_or_insert(i);
            if list.set_aside_until[i].load(Relaxed) <= now_ms {
                return Some((i, list.addrs[i]));
            }
        }
        first_untried.map(|i| (i, list.addrs[i]))
    }

    /// Address `i` (from [`ProviderAddrs::pick`]) refused a connection: pass it over for a
    /// while, and remember the attempt tried it. Whether another address is left to try.
    pub fn failed(&self, i: usize, addr: SocketAddr, tried: &mut Tried, now_ms: i64) -> bool {
        let list = self.current.load();
        // The list may have been swapped since the pick; only the same address is set aside.
        if list.addrs.get(i) == Some(&addr) {
            list.set_aside_until[i].store(now_ms + SET_ASIDE_MS, Relaxed);
        }
        if i < MAX_ADDRS {
            tried.0 |= 1 << i;
        }
        let n = list.addrs.len().min(MAX_ADDRS);
        (0..n).any(|j| !tried.has(j))
    }

    /// How many addresses there are now.
    pub fn len(&self) -> usize {
        self.current.load().addrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Looks the host up again (blocking: call from a blocking thread) and swaps the new
    /// list in if it differs. `Err` keeps the old list.
    pub fn refresh(&self) -> std::io::Result<Option<Change>> {
        let after = lookup(&self.host, self.port)?;
        Ok(self.swap_if_changed(after))
    }

    fn swap_if_changed(&self, after: Vec<SocketAddr>) -> Option<Change> {
        let before = self.current.load();
        if before.addrs == after {
            return None;
        }
        let change = Change {
            before: before.addrs.clone(),
            after: after.clone(),
        };
        self.current.store(Arc::new(AddrList::new(after)));
        Some(change)
    }
}

/// Every address of `host:port`, sorted and without duplicates, so that two lookups
/// compare equal whatever order the resolver returned them in.
fn lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(std::io::Error::other(format!(
            "{host} resolves to no address"
        )));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn three() -> ProviderAddrs {
        let a = ProviderAddrs::resolve("127.0.0.1", 1).unwrap();
        a.swap_if_changed(vec![
            addr("127.0.0.2:1"),
            addr("127.0.0.3:1"),
            addr("127.0.0.4:1"),
        ]);
        a
    }

    #[test]
    fn an_ip_literal_resolves_to_itself() {
        let a = ProviderAddrs::resolve("127.0.0.1", 443).unwrap();
        assert_eq!(a.current(), vec![addr("127.0.0.1:443")]);
        assert_eq!(a.start(), 0);
        assert_eq!(
            a.pick(0, Tried::default(), 0),
            Some((0, addr("127.0.0.1:443")))
        );
        let mut tried = Tried::default();
        assert!(!a.failed(0, addr("127.0.0.1:443"), &mut tried, 0));
        assert_eq!(a.pick(0, tried, 0), None);
    }

    #[test]
    fn attempts_take_turns_over_every_address() {
        let a = three();
        let mut firsts: Vec<_> = (0..3)
            .map(|_| a.pick(a.start(), Tried::default(), 0).unwrap().1)
            .collect();
        firsts.sort();
        firsts.dedup();
        assert_eq!(firsts.len(), 3, "three attempts used three addresses");
    }

    #[test]
    fn a_refused_address_is_left_for_the_others_then_tried_again_later() {
        let a = three();
        let now = 1_000;
        let mut tried = Tried::default();
        let (i, first) = a.pick(0, tried, now).unwrap();
        assert!(a.failed(i, first, &mut tried, now));
        let (j, second) = a.pick(0, tried, now).unwrap();
        assert_ne!(first, second);
        // Later attempts pass over the refused address while it is set aside...
        for start in 0..6 {
            let (_, got) = a.pick(start, Tried::default(), now + 1).unwrap();
            assert_ne!(got, first, "start {start}");
        }
        // ...and use it again once that time is over.
        let later = now + SET_ASIDE_MS;
        assert!((0..3).any(|s| a.pick(s, Tried::default(), later).unwrap().1 == first));
        // Every address tried: nothing left.
        assert!(a.failed(j, second, &mut tried, now));
        let (k, third) = a.pick(0, tried, now).unwrap();
        assert!(!a.failed(k, third, &mut tried, now));
        assert_eq!(a.pick(0, tried, now), None);
    }

    #[test]
    fn when_every_address_is_set_aside_one_is_still_tried() {
        let a = three();
        for (i, ad) in a.current().into_iter().enumerate() {
            a.failed(i, ad, &mut Tried::default(), 0);
        }
        assert!(a.pick(0, Tried::default(), 1).is_some());
    }

    #[test]
    fn only_a_different_list_is_a_change() {
        let a = ProviderAddrs::resolve("127.0.0.1", 1).unwrap();
        assert_eq!(a.swap_if_changed(vec![addr("127.0.0.1:1")]), None);
        let change = a.swap_if_changed(vec![addr("127.0.0.9:1")]).unwrap();
        assert_eq!(change.before, vec![addr("127.0.0.1:1")]);
        assert_eq!(change.after, vec![addr("127.0.0.9:1")]);
        assert_eq!(a.current(), vec![addr("127.0.0.9:1")]);
    }

    #[test]
    fn a_host_that_does_not_resolve_yet_starts_empty() {
        let (a, e) = ProviderAddrs::resolve_or_wait("no-such-host.invalid", 443);
        assert!(e.is_some());
        assert!(a.is_empty());
        assert_eq!(a.pick(a.start(), Tried::default(), 0), None);
    }

    #[test]
    fn a_failed_lookup_keeps_the_old_list() {
        let broken = ProviderAddrs {
            host: "no-such-host.invalid".into(),
            port: 1,
            current: ArcSwap::from_pointee(AddrList::new(vec![addr("127.0.0.5:1")])),
            next: AtomicUsize::new(0),
        };
        assert!(broken.refresh().is_err());
        assert_eq!(broken.current(), vec![addr("127.0.0.5:1")]);
    }
}
