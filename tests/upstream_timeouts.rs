//! SPEC: upstream connect, first-byte and idle-between-chunks timeouts, kept separate, so a
//! slow stream is not cut while it is still producing; and a timeout never hurts a pooled
//! connection that serves another request.

mod common;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

fn stream_body() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "stream": true,
        "messages": [{"role": "user", "content": "hello"}],
    })
}

/// A streamed answer read to its end (the gateway closes the connection after it).
struct Streamed {
    status: u16,
    raw: String,
    /// Content events (not the finish, usage or `[DONE]` events).
    content_events: usize,
    /// `data: [DONE]` and the terminating zero-length chunk both arrived.
    complete: bool,
}

fn stream(gw: &Gateway, key: &Key, extra: &[(&str, &str)]) -> Streamed {
    let (status, _headers, mut reader) = gw.open_stream(key, &stream_body(), extra);
    let mut bytes = Vec::new();
    // A cut stream ends with a reset or a close: whatever arrived before counts.
    let _ = reader.read_to_end(&mut bytes);
    let raw = String::from_utf8_lossy(&bytes).into_owned();
    let content_events = raw
        .lines()
        .filter(|l| l.starts_with("data:") && l.contains(r#""delta":{"content""#))
        .count();
    let complete = raw.contains("data: [DONE]") && raw.ends_with("0\r\n\r\n");
    Streamed {
        status,
        raw,
        content_events,
        complete,
    }
}

/// The trace of the key's `n`-th model request (1-based), once it is written.
fn nth_trace(gw: &Gateway, key: &Key, n: usize) -> TraceRec {
    wait_for(Duration::from_secs(10), "the request's trace", || {
        gw.model_traces(&key.id).into_iter().nth(n - 1)
    })
}

/// `(connection, request number on it)` of the first mock chat completion id in `text`.
fn mock_conn_request(text: &str) -> (u64, u64) {
    let rest = text
        .split_once("chatcmpl-mock-")
        .unwrap_or_else(|| panic!("no mock id in {text}"))
        .1;
    let id: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '-')
        .collect();
    let (conn, no) = id.split_once('-').expect("conn-request");
    (conn.parse().expect("conn"), no.parse().expect("request no"))
}

#[test]
fn a_short_first_byte_timeout_cuts_a_late_head_but_not_a_slow_stream() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("first_byte_timeout_ms: 300")
        .server("idle_timeout_ms: 60000")
        .start();
    let key = gw.create_key(&[]);

    // The mock would answer 200 after 30 s; the only timeout below that is the 300 ms
    // first-byte one, so a 504 is that timeout (not the idle one, not the mock). It did not
    // fire early: the lower bound is the contract, no upper bound is timed.
    let t0 = Instant::now();
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "30000")]);
    let took = t0.elapsed();
    assert_eq!(
        (r.status, r.code().as_str()),
        (504, "upstream_timeout"),
        "{}",
        r.text()
    );
    assert!(
        took >= Duration::from_millis(250),
        "answered after {took:?}, before the 300 ms first-byte timeout"
    );
    let t = nth_trace(&gw, &key, 1);
    assert_eq!(
        (t.status, t.error_code.as_deref()),
        (504, Some("upstream_timeout"))
    );
    assert!(
        t.usage_estimated && t.prompt_tokens > 0,
        "charged its prompt: {t:?}"
    );

    // The head comes at once; 400 ms gaps between chunks exceed the first-byte timeout
    // but not the idle one.
    let t0 = Instant::now();
    let s = stream(
        &gw,
        &key,
        &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "400")],
    );
    assert!(t0.elapsed() >= Duration::from_millis(1_200));
    assert_eq!(s.status, 200, "{}", s.raw);
    assert!(s.complete, "the stream completed: {}", s.raw);
    assert_eq!(s.content_events, 3, "{}", s.raw);
    let t = nth_trace(&gw, &key, 2);
    assert_eq!((t.status, t.error_code.as_deref()), (200, None), "{t:?}");
    assert!(!t.usage_estimated, "{t:?}");
}

#[test]
fn a_short_idle_timeout_cuts_a_stalled_stream_but_not_a_late_head() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("first_byte_timeout_ms: 5000")
        .server("idle_timeout_ms: 300")
        .start();
    let key = gw.create_key(&[]);

    // A model that thinks for a second before it answers is not idle.
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "1000")]);
    assert_eq!(r.status, 200, "{}", r.text());
    let s = stream(
        &gw,
        &key,
        &[("x-mock-delay-ms", "1000"), ("x-mock-chunks", "2")],
    );
    assert!(s.complete && s.content_events == 2, "{}", s.raw);

    // Chunks 100 ms apart for about a second: each one pushes the idle deadline on.
    let s = stream(
        &gw,
        &key,
        &[("x-mock-chunks", "10"), ("x-mock-chunk-delay-ms", "100")],
    );
    assert!(s.complete, "a producing stream is not cut: {}", s.raw);
    assert_eq!(s.content_events, 10, "{}", s.raw);

    // A stall after the first chunk that only the test can end (the mock holds chunk 2
    // until released): the stream ends while the mock still holds it, so the gateway's idle
    // timeout cut it (the first-byte one is 5 s and covers only the head).
    let s = stream(
        &gw,
        &key,
        &[("x-mock-chunks", "3"), ("x-mock-hold", "stall")],
    );
    assert_eq!(s.status, 200);
    assert!(!s.complete, "the stalled stream was cut: {}", s.raw);
    assert_eq!(s.content_events, 1, "{}", s.raw);
    // The mock reaches its gate right after sending chunk 1 and stays there until released.
    wait_for(Duration::from_secs(10), "the mock still holding", || {
        (mock.held("stall") == 1).then_some(())
    });
    mock.release("stall");
    let t = nth_trace(&gw, &key, 4);
    assert_eq!(
        (t.status, t.error_code.as_deref()),
        (200, Some("upstream_stream_broken")),
        "{t:?}"
    );
    assert!(
        t.usage_estimated && t.completion_tokens > 0 && t.cost_nanos > 0,
        "charged at an estimate: {t:?}"
    );
}

/// A quick request with a plain answer: it arms (and disarms) the first-byte watchdog.
fn quick_chat(gw: &Gateway, key: &Key) -> (u64, u64) {
    let r = gw.chat(key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "a quick request failed: {}", r.text());
    mock_conn_request(&r.text())
}

/// A quick stream of a few chunks: it arms, re-arms and disarms the idle watchdog.
fn quick_stream(gw: &Gateway, key: &Key) -> (u64, u64) {
    let s = stream(
        gw,
        key,
        &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "5")],
    );
    assert!(s.complete, "a quick stream failed: {}", s.raw);
    mock_conn_request(&s.raw)
}

/// Fires the watchdog a few times while quick requests run on pooled upstream connections,
/// then a burst: every quick request succeeds, and pooled connections did serve some.
fn no_collateral_kills(
    gw: &Gateway,
    quick: fn(&Gateway, &Key) -> (u64, u64),
    fire: fn(&Gateway, &Key),
) {
    let key = gw.create_key(&[]);
    let firing = AtomicBool::new(true);
    let mut served = Vec::new();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let mut served = Vec::new();
                    while firing.load(Ordering::Relaxed) {
                        served.push(quick(gw, &key));
                    }
                    served
                })
            })
            .collect();
        for _ in 0..4 {
            fire(gw, &key);
        }
        firing.store(false, Ordering::Relaxed);
        for w in workers {
            served.extend(w.join().expect("worker"));
        }
    });
    // Right after the last firing, a burst on whatever the pool holds, spread over more
    // than the watchdog's timeout.
    let until = Instant::now() + Duration::from_millis(600);
    while Instant::now() < until {
        served.push(quick(gw, &key));
    }
    assert!(
        served.iter().any(|&(_, no)| no > 1),
        "pooled upstream connections were reused"
    );
}

#[test]
fn a_fired_first_byte_watchdog_harms_no_other_request() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("first_byte_timeout_ms: 200")
        .server("idle_timeout_ms: 5000")
        .start();
    no_collateral_kills(&gw, quick_chat, |gw, key| {
        let r = gw.chat_with(key, "gpt-4o-mini", &[("x-mock-delay-ms", "600")]);
        assert_eq!((r.status, r.code().as_str()), (504, "upstream_timeout"));
    });
}

#[test]
fn a_fired_idle_watchdog_harms_no_other_request() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("first_byte_timeout_ms: 5000")
        .server("idle_timeout_ms: 200")
        .start();
    no_collateral_kills(&gw, quick_stream, |gw, key| {
        let s = stream(
            gw,
            key,
            &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "600")],
        );
        assert!(!s.complete, "{}", s.raw);
    });
}

#[test]
fn read_timeout_ms_still_sets_both() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .server("read_timeout_ms: 300")
        .start();
    let key = gw.create_key(&[]);
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-delay-ms", "1000")]);
    assert_eq!((r.status, r.code().as_str()), (504, "upstream_timeout"));
    let s = stream(
        &gw,
        &key,
        &[("x-mock-chunks", "3"), ("x-mock-chunk-delay-ms", "1000")],
    );
    assert!(!s.complete && s.content_events == 1, "{}", s.raw);
}
