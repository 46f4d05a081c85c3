//! Upstream first-byte and idle-between-chunks timeouts kept apart: Pingora's one per-read
//! timeout takes the longer of the two, and a per-attempt watchdog enforces the shorter one.
//!
//! The fork applies `peer.options.read_timeout` to every upstream read, head and body alike,
//! so on its own it is at once the first-byte and the idle timeout. When
//! `server.first_byte_timeout_ms` and `server.idle_timeout_ms` are equal (the default) that
//! is exactly right and nothing here runs: no task, no allocation, no syscall. When they
//! differ, the read timeout is the longer one and a [`Watchdog`] watches the phase of the
//! shorter one:
//! - first byte shorter: armed when the request body goes upstream, disarmed by the response
//!   head;
//! - idle shorter: armed by the first body chunk, its deadline pushed forward by every chunk
//!   (one atomic store), disarmed by the last one. The wait between the head and the first
//!   chunk (a model thinking before its first token) keeps the longer first-byte timeout.
//!
//! When it fires, it shuts the upstream socket down, so Pingora's pending read fails and the
//! request ends as a timeout (504 `upstream_timeout`, or a broken stream once the answer
//! began).
//!
//! Why it can never touch a connection that serves another request:
//! - The watchdog shuts down only after winning `ARMED -> FIRED`; the request disarms with
//!   `ARMED -> CANCELLED`. One of the two compare-exchanges wins.
//! - Pingora returns an upstream connection to its pool only after every response task went
//!   through the hooks, so after the hook that disarms (head, or the chunk that ends the body)
//!   returned `Ok`. That hook returns an error when its disarm lost to the watchdog, and an
//!   error makes Pingora drop the connection instead of pooling it.
//! - The watchdog owns a duplicate of the socket's descriptor: when Pingora drops (and closes)
//!   the connection first, the number cannot be reused under the watchdog for another socket.
//!
//! Only HTTP/1 peers get a watchdog: an HTTP/2 connection carries other requests' streams.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::Tuning;

const ARMED: u8 = 0;
const CANCELLED: u8 = 1;
const FIRED: u8 = 2;

/// The two upstream read timeouts, and which of them needs a watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTimeouts {
    pub first_byte: Duration,
    pub idle: Duration,
}

/// The phase a watchdog guards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// From the request going upstream to the response head.
    FirstByte,
    /// Between body chunks, after the first one.
    Idle,
}

impl ReadTimeouts {
    pub fn of(tuning: &Tuning) -> Self {
        ReadTimeouts {
            first_byte: tuning.first_byte_timeout,
            idle: tuning.idle_timeout,
        }
    }

    /// Pingora's per-read timeout: the longer of the two.
    pub fn per_read(&self) -> Duration {
        self.first_byte.max(self.idle)
    }

    /// The phase whose (shorter) timeout the watchdog enforces; none when they are equal.
    pub fn watched(&self) -> Option<(Phase, Duration)> {
        match self.first_byte.cmp(&self.idle) {
            std::cmp::Ordering::Equal => None,
            std::cmp::Ordering::Less => Some((Phase::FirstByte, self.first_byte)),
            std::cmp::Ordering::Greater => Some((Phase::Idle, self.idle)),
        }
    }
}

/// The watchdog fired before the request could disarm it: the attempt timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fired;

/// The watchdog state of one request: the current attempt's upstream socket and its
/// watchdog, if one is armed. Lives in the request context; all calls are cheap no-ops when
/// the timeouts are equal.
#[derive(Default)]
pub struct UpstreamWatch {
    /// The current attempt's HTTP/1 upstream socket, valid while the attempt's hooks run.
    fd: Option<RawFd>,
    dog: Option<Watchdog>,
    /// A watchdog of this attempt fired.
    fired: bool,
}

impl UpstreamWatch {
    /// `connected_to_upstream`: a new attempt's connection. Ends any previous attempt.
    pub fn connected(&mut self, fd: RawFd, http1: bool) {
        self.end_attempt();
        self.fired = false;
        self.fd = http1.then_some(fd);
    }

    /// The request (its body) goes upstream: arms the first-byte watchdog if that phase is
    /// the watched one.
    pub fn request_sent(&mut self, timeouts: ReadTimeouts) {
        if let Some((Phase::FirstByte, timeout)) = timeouts.watched() {
            self.arm(Phase::FirstByte, timeout);
        }
    }

    /// The response head arrived: disarms the first-byte watchdog. `Err` when it fired
    /// first: the hook must fail so the connection is not pooled.
    pub fn head_arrived(&mut self) -> Result<(), Fired> {
        match self.dog.take() {
            Some(dog) if dog.phase == Phase::FirstByte => self.disarm(dog),
            other => {
                self.dog = other;
                Ok(())
            }
        }
    }

    /// A body chunk arrived: arms the idle watchdog at the first chunk, pushes its deadline
    /// forward at the next ones and disarms it at the last. `Err` when it fired first.
    pub fn chunk_arrived(
        &mut self,
        timeouts: ReadTimeouts,
        end_of_stream: bool,
    ) -> Result<(), Fired> {
        let Some((Phase::Idle, timeout)) = timeouts.watched() else {
            return Ok(());
        };
        if end_of_stream {
            return match self.dog.take() {
                Some(dog) => self.disarm(dog),
                None if self.fired => Err(Fired),
                None => Ok(()),
            };
        }
        match &self.dog {
            Some(dog) => dog.rearm(),
            None if self.fired => return Err(Fired),
            None => self.arm(Phase::Idle, timeout),
        }
        Ok(())
    }

    /// The attempt is over (an error, the final answer, logging): disarms any watchdog and
    /// forgets the socket. True when a watchdog of this attempt fired.
    pub fn end_attempt(&mut self) -> bool {
        if let Some(dog) = self.dog.take() {
            let _ = self.disarm(dog);
        }
        self.fd = None;
        self.fired
    }

    fn arm(&mut self, phase: Phase, timeout: Duration) {
        let Some(fd) = self.fd else {
            return;
        };
        if self.dog.is_none() {
            self.dog = Watchdog::spawn(fd, phase, timeout);
        }
    }

    fn disarm(&mut self, dog: Watchdog) -> Result<(), Fired> {
        let r = dog.cancel();
        self.fired |= r.is_err();
        r
    }
}

/// State shared by a request and its watchdog task.
struct Shared {
    state: AtomicU8,
    /// Deadline, in ms after `origin`.
    deadline_ms: AtomicU64,
    origin: Instant,
    /// Wakes the task when the request disarms it, so it ends (and closes its descriptor)
    /// at once rather than at the deadline.
    stop: Notify,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }
}

/// The request's handle on one watchdog task. Dropping it disarms the watchdog.
struct Watchdog {
    shared: Arc<Shared>,
    phase: Phase,
    timeout_ms: u64,
}

impl Watchdog {
    /// Starts a watchdog on a duplicate of `fd`; `None` (no watchdog, Pingora's longer read
    /// timeout still applies) when there is no runtime or no descriptor left.
    fn spawn(fd: RawFd, phase: Phase, timeout: Duration) -> Option<Watchdog> {
        let runtime = tokio::runtime::Handle::try_current().ok()?;
        // SAFETY: `fd` is the socket of the attempt whose hook is running: Pingora keeps the
        // connection open at least until that hook returns.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        let socket = match borrowed.try_clone_to_owned() {
            Ok(s) => s,
            Err(e) => {
                log::warn!("upstream watchdog not armed: {e}");
                return None;
            }
        };
        let timeout_ms = timeout.as_millis() as u64;
        let shared = Arc::new(Shared {
            state: AtomicU8::new(ARMED),
            deadline_ms: AtomicU64::new(timeout_ms),
            origin: Instant::now(),
            stop: Notify::new(),
        });
        runtime.spawn(watch(shared.clone(), socket, phase, timeout_ms));
        Some(Watchdog {
            shared,
            phase,
            timeout_ms,
        })
    }

    /// Moves the deadline to `timeout` from now: one clock read and one atomic store.
    fn rearm(&self) {
        let deadline = self.shared.now_ms() + self.timeout_ms;
        self.shared
            .deadline_ms
            .fetch_max(deadline, Ordering::Release);
    }

    /// `Ok` when the watchdog can no longer fire; `Err` when it already did.
    fn cancel(&self) -> Result<(), Fired> {
        let r = self.shared.state.compare_exchange(
            ARMED,
            CANCELLED,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.shared.stop.notify_one();
        match r {
            Ok(_) | Err(CANCELLED) => Ok(()),
            Err(_) => Err(Fired),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.cancel();
    }
}

/// The watchdog task: sleeps to the deadline, re-reads it (chunks push it forward), and
/// past it shuts the socket down, unless the request disarmed it first.
async fn watch(shared: Arc<Shared>, socket: OwnedFd, phase: Phase, timeout_ms: u64) {
    loop {
        let deadline = shared.deadline_ms.load(Ordering::Acquire);
        tokio::select! {
            biased;
            _ = shared.stop.notified() => return,
            _ = tokio::time::sleep_until(shared.origin + Duration::from_millis(deadline)) => {}
        }
        if shared.state.load(Ordering::Acquire) != ARMED {
            return;
        }
        let now = shared.now_ms();
        if now < shared.deadline_ms.load(Ordering::Acquire) {
            continue;
        }
        if phase == Phase::Idle && unread_input(&socket) {
            // The upstream sent bytes the gateway has not taken yet (a slow client holds
            // the pipe back): the upstream is not idle.
            shared
                .deadline_ms
                .fetch_max(now + timeout_ms, Ordering::Release);
            continue;
        }
        if shared
            .state
            .compare_exchange(ARMED, FIRED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            // SAFETY: a plain syscall on a descriptor this task owns.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        return;
    }
}

/// Whether the socket holds received bytes (or an end of stream) not read yet.
fn unread_input(socket: &OwnedFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer on the stack; MSG_PEEK leaves the data in the socket and
    // MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    fn ms(first_byte: u64, idle: u64) -> ReadTimeouts {
        ReadTimeouts {
            first_byte: Duration::from_millis(first_byte),
            idle: Duration::from_millis(idle),
        }
    }

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (b, _) = l.accept().unwrap();
        (a, b)
    }

    /// Whether the socket was shut down: a read returns end of stream at once.
    fn is_shut(s: &TcpStream) -> bool {
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        matches!((&*s).read(&mut [0u8; 16]), Ok(0))
    }

    /// Waits for the watchdog to shut `s` (it and this test share one runtime thread: after
    /// a fixed sleep this test may well run before the watchdog's own expired timer does).
    /// Bounded, so a watchdog that never fires fails the test instead of hanging it.
    async fn shut_by_the_watchdog(s: &TcpStream) -> bool {
        for _ in 0..500 {
            if is_shut(s) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[test]
    fn equal_timeouts_need_no_watchdog() {
        assert_eq!(ms(300, 300).watched(), None);
        assert_eq!(
            ms(300, 900).watched(),
            Some((Phase::FirstByte, Duration::from_millis(300)))
        );
        assert_eq!(
            ms(900, 300).watched(),
            Some((Phase::Idle, Duration::from_millis(300)))
        );
        assert_eq!(ms(900, 300).per_read(), Duration::from_millis(900));
    }

    #[tokio::test]
    async fn equal_timeouts_spawn_nothing() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        w.connected(a.as_raw_fd(), true);
        w.request_sent(ms(300, 300));
        assert!(w.chunk_arrived(ms(300, 300), false).is_ok());
        assert!(w.dog.is_none());
    }

    #[tokio::test]
    async fn first_byte_fires_and_the_head_then_fails() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        w.connected(a.as_raw_fd(), true);
        w.request_sent(ms(50, 5_000));
        assert!(shut_by_the_watchdog(&a).await);
        assert_eq!(w.head_arrived(), Err(Fired));
        assert!(w.end_attempt());
    }

    #[tokio::test]
    async fn a_head_in_time_disarms_for_good() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        w.connected(a.as_raw_fd(), true);
        w.request_sent(ms(50, 5_000));
        assert_eq!(w.head_arrived(), Ok(()));
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!is_shut(&a));
        assert!(!w.end_attempt());
    }

    #[tokio::test]
    async fn chunks_keep_the_idle_watchdog_away() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        let t = ms(5_000, 100);
        w.connected(a.as_raw_fd(), true);
        for _ in 0..6 {
            assert_eq!(w.chunk_arrived(t, false), Ok(()));
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(w.chunk_arrived(t, true), Ok(()));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!is_shut(&a));
    }

    #[tokio::test]
    async fn an_idle_gap_fires() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        let t = ms(5_000, 50);
        w.connected(a.as_raw_fd(), true);
        assert_eq!(w.chunk_arrived(t, false), Ok(()));
        assert!(shut_by_the_watchdog(&a).await);
        assert_eq!(w.chunk_arrived(t, true), Err(Fired));
    }

    #[tokio::test]
    async fn unread_bytes_are_not_idleness() {
        let (a, mut b) = pair();
        let mut w = UpstreamWatch::default();
        let t = ms(5_000, 50);
        w.connected(a.as_raw_fd(), true);
        assert_eq!(w.chunk_arrived(t, false), Ok(()));
        b.write_all(b"data").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(w.chunk_arrived(t, true), Ok(()));
    }

    #[tokio::test]
    async fn http2_and_ended_attempts_get_no_watchdog() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        w.connected(a.as_raw_fd(), false);
        w.request_sent(ms(50, 5_000));
        assert!(w.dog.is_none());
        w.connected(a.as_raw_fd(), true);
        w.end_attempt();
        w.request_sent(ms(50, 5_000));
        assert!(w.dog.is_none());
    }

    #[tokio::test]
    async fn a_dropped_watch_never_fires() {
        let (a, _b) = pair();
        let mut w = UpstreamWatch::default();
        w.connected(a.as_raw_fd(), true);
        w.request_sent(ms(50, 5_000));
        drop(w);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(!is_shut(&a));
    }
}
