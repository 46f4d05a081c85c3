//! The proxy listener's edge (SPEC §6 `server:`): the first request head on a connection
//! must be complete within `header_timeout_ms` in total, and `max_connections` caps open
//! connections with a 503 `too_many_connections`.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const TOKEN: &str = "edge-admin-token";

fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = gw.admin_call("GET", "/metrics", None).text();
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How a connection ended while the client was trickling its head.
#[derive(Debug, PartialEq)]
enum Ended {
    /// The gateway closed it (EOF or reset) this long after connect.
    Closed(Duration),
    /// Still open when the test gave up.
    StillOpen,
}

/// Sends `prefix`, then one more byte of a never-ending header every 200 ms, until the
/// gateway closes the connection (or `give_up` passes).
fn trickle(gw: &Gateway, prefix: &[u8], give_up: Duration) -> Ended {
    trickle_on(
        TcpStream::connect(gw.addr).expect("connect"),
        prefix,
        give_up,
    )
}

/// [`trickle`] on a connection already open (after requests answered on it, say).
fn trickle_on(mut s: TcpStream, prefix: &[u8], give_up: Duration) -> Ended {
    let started = Instant::now();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    if s.write_all(prefix).is_err() {
        return Ended::Closed(started.elapsed());
    }
    let mut buf = [0u8; 1024];
    while started.elapsed() < give_up {
        // The read doubles as the 200 ms pause between bytes.
        match s.read(&mut buf) {
            Ok(0) => return Ended::Closed(started.elapsed()),
            Ok(n) => panic!(
                "no answer expected to a head that never ends, got {:?}",
                String::from_utf8_lossy(&buf[..n])
            ),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return Ended::Closed(started.elapsed()),
        }
        if s.write_all(b"a").is_err() {
            return Ended::Closed(started.elapsed());
        }
    }
    Ended::StillOpen
}

fn assert_cut_near(ended: Ended, deadline: Duration) {
    match ended {
        Ended::Closed(after) => {
            assert!(
                after >= deadline.mul_f32(0.8),
                "closed after {after:?}, before the {deadline:?} deadline"
            );
            // No upper bound is timed: a deadline per read (not in total) would never trip
            // with a byte every 200 ms, and the connection would still be open at `give_up`.
        }
        Ended::StillOpen => panic!("the connection is still open past its head deadline"),
    }
}

#[test]
fn a_trickled_first_head_is_cut_at_header_timeout_in_total() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("header_timeout_ms: 1000")
        .start();
    let deadline = Duration::from_millis(1000);

    // A byte every 200 ms never trips Pingora's per-read timeout (60 s); the total does.
    let head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: ";
    assert_cut_near(trickle(&gw, head, Duration::from_secs(15)), deadline);
    // So does a connection that sends nothing, or only part of the request line.
    assert_cut_near(trickle(&gw, b"", Duration::from_secs(15)), deadline);
    assert_cut_near(trickle(&gw, b"GE", Duration::from_secs(15)), deadline);

    // The gateway serves on: a normal request right after.
    assert_eq!(gw.get("/health", "").status, 200);
}

/// Every head must be whole within `header_timeout_ms`, not only a connection's first (an
/// audit held a kept-alive connection open for minutes, one byte of its second head every
/// second after a first request), and on the admin listener too.
#[test]
fn a_trickled_later_head_on_a_kept_alive_connection_and_an_admin_head_are_cut_too() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .admin(TOKEN)
        .server("header_timeout_ms: 1000")
        .start();
    let deadline = Duration::from_millis(1000);
    let head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Slow: ";
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..2 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .unwrap();
        let r = read_response(s.try_clone().unwrap()).expect("a kept-alive answer");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    assert_cut_near(trickle_on(s, head, Duration::from_secs(15)), deadline);

    let admin = gw.admin_addr.expect("admin listener");
    let s = TcpStream::connect(admin).expect("connect to admin");
    assert_cut_near(trickle_on(s, head, Duration::from_secs(15)), deadline);
    // And an admin connection's later head (Pingora's own wait there is 60 s).
    let mut s = TcpStream::connect(admin).expect("connect to admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request =
        format!("GET /metrics HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
    s.write_all(request.as_bytes()).unwrap();
    let r = read_response(s.try_clone().unwrap()).expect("a kept-alive admin answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_cut_near(trickle_on(s, head, Duration::from_secs(15)), deadline);
    // Both serve on.
    assert_eq!(gw.get("/health", "").status, 200);
    assert_eq!(gw.admin_call("GET", "/metrics", None).status, 200);
}

#[test]
fn a_slow_head_that_completes_within_the_deadline_is_served() {
    let mock = mock();
    // The head takes about 1 s; the deadline leaves 4 s of slack for a loaded machine.
    let gw = GatewayBuilder::new(&mock)
        .server("header_timeout_ms: 5000")
        .start();
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n";
    for piece in head.chunks(head.len() / 4 + 1) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(250));
    }
    let r = read_response(s).expect("response");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// The keep-alive wait for the next head is one of Pingora's timeouts (held in place by the
/// vendored timeout crate, vendor/README.md): it fires, and the idle connection is closed.
#[test]
fn an_idle_kept_alive_connection_is_closed_when_its_keep_alive_wait_ends() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("header_timeout_ms: 1000")
        .start();
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let r = read_response(s.try_clone().unwrap()).expect("the response");
    assert_eq!(r.status, 200, "{}", r.text());
    // Then nothing: the next read ends when the gateway closes the connection.
    let idle_from = Instant::now();
    let mut buf = [0u8; 256];
    match s.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("{n} unexpected bytes on an idle connection"),
        Err(e) => panic!("the idle connection was not closed: {e}"),
    }
    // Closed by the keep-alive wait (1 s), not at once nor much later.
    let idle = idle_from.elapsed();
    assert!(
        idle >= Duration::from_millis(500) && idle < Duration::from_secs(5),
        "closed after {idle:?}"
    );
}

#[test]
fn kept_alive_requests_after_the_first_are_not_bound_by_the_first_head_deadline() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("header_timeout_ms: 2000")
        .start();
    let started = Instant::now();
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
        .unwrap();
    let r = read_response(s.try_clone().unwrap()).expect("first response");
    assert_eq!(r.status, 200);

    // Idle (less than the keep-alive wait), then a second head trickled in pieces that ends
    // well after the first head's deadline would have passed.
    std::thread::sleep(Duration::from_millis(1200));
    let head = b"GET /health HTTP/1.1\r\nHost: gw\r\nX-Second: yes\r\n\r\n";
    for piece in head.chunks(head.len() / 4 + 1) {
        s.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(started.elapsed() > Duration::from_millis(2000));
    let r = read_response(s.try_clone().unwrap()).expect("second response");
    assert_eq!(r.status, 200, "{}", r.text());

    // And a third, at once.
    s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(s).expect("third response").status, 200);
}

#[test]
fn connections_over_max_connections_get_503_too_many_connections_until_one_closes() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .admin(TOKEN)
        .server("max_connections: 3")
        .start();
    // The harness's own health checks have closed.
    wait_for(Duration::from_secs(5), "no open connections", || {
        (metric(&gw, "spidergate_connections_open") == 0).then_some(())
    });

    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(gw.addr).expect("connect"))
        .collect();
    wait_for(Duration::from_secs(5), "three open connections", || {
        (metric(&gw, "spidergate_connections_open") == 3).then_some(())
    });

    let r = http(gw.addr, "GET", "/health", &[], b"").expect("an answer over the cap");
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "too_many_connections");
    assert_eq!(r.json()["error"]["type"], "api_error");
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some("too_many_connections")
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("connection"), Some("close"));
    assert_eq!(metric(&gw, "spidergate_connections_refused_total"), 1);

    // One closes: its slot is free again.
    drop(idle.pop());
    wait_for(
        Duration::from_secs(5),
        "the closed connection's slot",
        || (metric(&gw, "spidergate_connections_open") == 2).then_some(()),
    );
    let r = http(gw.addr, "GET", "/health", &[], b"").expect("served");
    assert_eq!(r.status, 200, "{}", r.text());

    // The idle ones still hold their slots: the cap holds.
    wait_for(
        Duration::from_secs(5),
        "the served connection to close",
        || (metric(&gw, "spidergate_connections_open") == 2).then_some(()),
    );
    let full: Vec<TcpStream> = vec![TcpStream::connect(gw.addr).expect("connect")];
    wait_for(Duration::from_secs(5), "three open connections", || {
        (metric(&gw, "spidergate_connections_open") == 3).then_some(())
    });
    let r = http(gw.addr, "GET", "/health", &[], b"").expect("an answer over the cap");
    assert_eq!(r.code(), "too_many_connections");
    assert_eq!(metric(&gw, "spidergate_connections_refused_total"), 2);
    drop(full);
    drop(idle);
}

#[test]
fn a_kept_alive_connection_holds_its_slot_across_requests() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .admin(TOKEN)
        .server("max_connections: 1")
        .start();
    wait_for(Duration::from_secs(5), "no open connections", || {
        (metric(&gw, "spidergate_connections_open") == 0).then_some(())
    });
    let mut s = TcpStream::connect(gw.addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    for _ in 0..3 {
        s.write_all(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            .unwrap();
        let r = read_response(s.try_clone().unwrap()).expect("kept-alive response");
        assert_eq!(r.status, 200);
        // Between requests the connection is still counted, once.
        assert_eq!(metric(&gw, "spidergate_connections_open"), 1);
        let other = http(gw.addr, "GET", "/health", &[], b"").expect("an answer over the cap");
        assert_eq!(other.code(), "too_many_connections");
    }
    drop(s);
    wait_for(Duration::from_secs(5), "the slot back", || {
        (metric(&gw, "spidergate_connections_open") == 0).then_some(())
    });
    assert_eq!(gw.get("/health", "").status, 200);
}
