//! Binary upgrades on one node (SPEC §2, §5; issue 16): across `serve --upgrade` + SIGQUIT the
//! old and the new process keep every limit and budget as one process would. The new process
//! holds what the old one has open, books what the old one settles until it exits, and carries
//! the rolling minute and the day's count on; afterwards its live figures are the ledger's.
//!
//! Prices: 0.15 / 0.60 USD per Mtok, so 150 nano-dollars per prompt token and 600 per
//! completion token; the mock reports 10 prompt and 5 completion tokens unless told.

mod common;

use std::io::Read;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "upgrade-admin-token";
/// 10 prompt tokens x 150 + 5 completion tokens x 600 (the mock's default usage).
const DEFAULT_CALL_NANOS: i64 = 10 * 150 + 5 * 600;

fn gateway(mock: &MockProvider) -> Gateway {
    GatewayBuilder::new(mock).admin(ADMIN_TOKEN).start()
}

/// The key's live standing, from the admin API (not `/v1/usage`, which its rpm limits too).
fn live(gw: &Gateway, key: &Key) -> Value {
    let r = gw.admin_call("GET", &format!("/admin/keys/{}/usage", key.id), None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn nanos(usd: &Value) -> i64 {
    (usd.as_f64().unwrap_or(0.0) * 1e9).round() as i64
}

/// The key's month spend and today's request count in the ledger.
fn ledger(gw: &Gateway, key: &Key) -> (i64, i64) {
    let spend: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
    let today = gw.query_i64(
        "SELECT COALESCE(SUM(requests), 0) FROM daily_requests WHERE key_id = ?1",
        [&key.id],
    );
    (spend, today)
}

/// Waits for a line of the (shared) gateway log.
fn wait_log(gw: &Gateway, line: &str) {
    wait_for(Duration::from_secs(30), line, || {
        gw.log_text().contains(line).then_some(())
    });
}

fn held_stream_body() -> Value {
    json!({
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello"}],
        "stream": true,
        "max_tokens": 1000,
    })
}

#[test]
fn a_burst_against_a_hard_cap_that_straddles_an_upgrade_never_bills_past_it() {
    let mock = mock();
    let mut gw = gateway(&mock);
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "hard"]);
    let hold = [("x-mock-hold", "upgrade"), ("x-mock-chunks", "3")];

    // One request held at the mock tells what one reservation is.
    let (status, _, first) = gw.open_stream(&key, &held_stream_body(), &hold);
    assert_eq!(status, 200);
    let bound = nanos(&live(&gw, &key)["reserved_usd"]);
    assert!(bound > 0, "a hard-budget key holds its reservation");
    // A cap of exactly three reservations.
    let cap = 3 * bound;
    let cap_usd = format!("{}.{:09}", cap / 1_000_000_000, cap % 1_000_000_000);
    gw.cli_json(&["keys", "update", &key.id, "--budget", &cap_usd, "--json"]);
    wait_for(Duration::from_secs(10), "the new cap live", || {
        (nanos(&live(&gw, &key)["budget_usd"]) == cap).then_some(())
    });
    let (status, _, second) = gw.open_stream(&key, &held_stream_body(), &hold);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "two requests held", || {
        (mock.held("upgrade") == 2).then_some(())
    });
    // A client connection kept alive across the upgrade: its next request reaches the old
    // process, after the sockets went.
    let mut kept = KeptAlive::open(gw.addr).expect("connect");
    let bearer = key.bearer();
    let r = kept
        .send("GET", "/v1/models", &[("Authorization", &bearer)], b"")
        .expect("a request before the upgrade");
    assert_eq!(r.status, 200, "{}", r.text());

    // The upgrade, with two reservations open in the old process.
    let mut old = gw.upgrade();
    wait_log(
        &gw,
        "upgrade: holding 2 requests the old process still has open",
    );

    // The new process decides from here: a third reservation fits the cap, a fourth does not.
    let (status, _, third) = gw.open_stream(&key, &held_stream_body(), &hold);
    assert_eq!(status, 200, "the third reservation fits the cap exactly");
    let over = json!({"model": "gpt-4o-mini", "max_tokens": 1000,
                      "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let r = gw.post("/v1/chat/completions", &bearer, over.as_bytes(), &[]);
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.code(), "budget_exceeded");
    // The old process no longer decides: what reaches it goes to the new one, which refuses
    // it too (the old one's own counters would admit it: they lack the third hold).
    let r = kept
        .send(
            "POST",
            "/v1/chat/completions",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            over.as_bytes(),
        )
        .expect("a request on the kept-alive connection");
    assert_eq!(r.status, 402, "{}", r.text());
    assert_eq!(r.code(), "budget_exceeded");
    assert_eq!(
        mock.requests().len(),
        3,
        "the refused requests reached nothing"
    );

    // Everything finishes; the old process books its two and exits.
    wait_for(Duration::from_secs(10), "three requests held", || {
        (mock.held("upgrade") == 3).then_some(())
    });
    mock.release("upgrade");
    for mut s in [first, second, third] {
        let mut rest = String::new();
        s.read_to_string(&mut rest).expect("stream to its end");
        assert!(rest.contains("[DONE]"), "{rest}");
    }
    let exit = wait_exit(&mut old, Duration::from_secs(60));
    assert!(exit.success(), "the old process exits cleanly: {exit:?}");

    // Right after, the live figures are the ledger's: three calls at the mock's usage.
    gw.wait_ledger_quiescent();
    let expected = 3 * DEFAULT_CALL_NANOS;
    wait_for(Duration::from_secs(10), "live figures = the ledger", || {
        let v = live(&gw, &key);
        let (spend, today) = ledger(&gw, &key);
        let agree = v["spend_nanodollars"] == spend
            && v["requests_today"] == today
            && nanos(&v["reserved_usd"]) == 0
            && v["requests_in_flight"] == 0;
        agree.then_some((spend, today))
    });
    assert_eq!(ledger(&gw, &key), (expected, 3));
    let (p, c) = mock.served_usage();
    assert_eq!((p, c), (30, 15), "what the provider billed");
    assert!(p as i64 * 150 + c as i64 * 600 <= cap);
    let traces = gw.model_traces(&key.id);
    assert_eq!(
        traces.len(),
        5,
        "one trace each, the relayed one once: {traces:?}"
    );
    assert!(traces.iter().all(|t| !t.usage_estimated), "{traces:?}");
    assert!(
        traces
            .iter()
            .all(|t| t.error_code.as_deref() != Some("orphaned")),
        "{traces:?}"
    );
    assert_eq!(gw.query_i64("SELECT COUNT(*) FROM inflight", []), 0);
}

#[test]
fn rpm_and_rpd_counts_carry_over_an_upgrade() {
    let mock = mock();
    let mut gw = gateway(&mock);
    let per_minute = gw.create_key(&["--rpm", "3"]);
    let per_day = gw.create_key(&["--rpd", "3"]);
    for key in [&per_minute, &per_day] {
        for _ in 0..2 {
            let r = gw.chat(key, "gpt-4o-mini");
            assert_eq!(r.status, 200, "{}", r.text());
        }
    }

    let mut old = gw.upgrade();
    wait_log(
        &gw,
        "upgrade: holding 0 requests the old process still has open",
    );

    let r = gw.chat(&per_minute, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.chat(&per_minute, "gpt-4o-mini");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "rate_limit_exceeded");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=60).contains(&retry), "{retry}");

    let r = gw.chat(&per_day, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.chat(&per_day, "gpt-4o-mini");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "daily_rate_limit_exceeded");
    assert_eq!(mock.requests().len(), 6, "refused requests reached nothing");

    let exit = wait_exit(&mut old, Duration::from_secs(60));
    assert!(exit.success(), "{exit:?}");
    gw.wait_ledger_quiescent();
    for key in [&per_minute, &per_day] {
        let v = live(&gw, key);
        assert_eq!(v["requests_today"], 3, "{v}");
        assert_eq!(ledger(&gw, key), (3 * DEFAULT_CALL_NANOS, 3));
        assert_eq!(v["spend_nanodollars"], 3 * DEFAULT_CALL_NANOS);
    }
    assert_eq!(live(&gw, &per_minute)["requests_this_minute"], 3);
}

/// A chat request with `key` and the JSON text `body`.
fn post_chat(gw: &Gateway, key: &Key, body: &str) -> Response {
    gw.post("/v1/chat/completions", &key.bearer(), body.as_bytes(), &[])
}

/// A 429 with `code`.
fn assert_refused(r: &Response, code: &str) {
    assert_eq!((r.status, r.code().as_str()), (429, code), "{}", r.text());
}

#[test]
fn the_brakes_carry_over_an_upgrade() {
    let mock = mock();
    let mut gw = gateway(&mock);
    // loop_limit 1: the same request a second time within 60 s is refused.
    let looping = gw.create_key(&["--loop-limit", "1"]);
    let same = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "again"}]})
        .to_string();
    let send_same = |gw: &Gateway| post_chat(gw, &looping, &same);
    assert_eq!(send_same(&gw).status, 200);
    let r = send_same(&gw);
    assert_refused(&r, "loop_detected");
    // max_usd_per_hour: a held request's reservation (1000 output tokens at 600 nano-USD,
    // ~0.0006 USD) leaves no room for a second under 0.001 USD.
    let hourly = gw.create_key(&["--max-usd-per-hour", "0.001"]);
    let hold = [("x-mock-hold", "brakes"), ("x-mock-chunks", "3")];
    let (status, _, held) = gw.open_stream(&hourly, &held_stream_body(), &hold);
    assert_eq!(status, 200);
    let second = json!({"model": "gpt-4o-mini", "max_tokens": 1000,
                        "messages": [{"role": "user", "content": "hello"}]})
    .to_string();
    let send_second = |gw: &Gateway| post_chat(gw, &hourly, &second);
    let r = send_second(&gw);
    assert_refused(&r, "spend_rate_exceeded");

    // The upgrade, with the hourly key's request open in the old process.
    let mut old = gw.upgrade();
    wait_log(
        &gw,
        "upgrade: holding 1 requests the old process still has open",
    );
    // The new process refuses both as one process would: the loop's admission and the open
    // request's hour hold came over.
    let r = send_same(&gw);
    assert_refused(&r, "loop_detected");
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let r = send_second(&gw);
    assert_refused(&r, "spend_rate_exceeded");
    assert_eq!(
        mock.requests().len(),
        2,
        "the refused requests reached nothing"
    );

    // Once the old process books the held request, its hold gives way to its cost (4,500
    // nano-USD), and a second request fits the hour again.
    mock.release("brakes");
    let mut rest = String::new();
    let mut held = held;
    held.read_to_string(&mut rest).expect("stream to its end");
    assert!(rest.contains("[DONE]"), "{rest}");
    let exit = wait_exit(&mut old, Duration::from_secs(60));
    assert!(exit.success(), "{exit:?}");
    wait_for(Duration::from_secs(10), "the hour's hold released", || {
        (send_second(&gw).status == 200).then_some(())
    });
}

#[test]
fn two_upgrades_in_a_row_keep_one_count() {
    let mock = mock();
    let mut gw = gateway(&mock);
    let key = gw.create_key(&["--rpm", "3", "--budget", "1", "--budget-mode", "hard"]);
    let hold = [("x-mock-hold", "chain"), ("x-mock-chunks", "3")];
    let (status, _, first) = gw.open_stream(&key, &held_stream_body(), &hold);
    assert_eq!(status, 200);
    wait_for(Duration::from_secs(10), "one request held", || {
        (mock.held("chain") == 1).then_some(())
    });

    // Old -> second, with the first request still open in the old process.
    let mut first_process = gw.upgrade();
    wait_log(
        &gw,
        "upgrade: holding 1 requests the old process still has open",
    );
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    // Second -> third while the first process still finishes: the third holds its request too.
    let mut second_process = gw.upgrade();
    wait_for(
        Duration::from_secs(30),
        "the third process to decide",
        || {
            (gw.log_text()
                .matches("upgrade: holding 1 requests the old process still has open")
                .count()
                == 2)
                .then_some(())
        },
    );
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 429, "the minute counts all three: {}", r.text());
    assert_eq!(r.code(), "rate_limit_exceeded");

    mock.release("chain");
    let mut rest = String::new();
    let mut first = first;
    first.read_to_string(&mut rest).expect("stream to its end");
    for p in [&mut first_process, &mut second_process] {
        let exit = wait_exit(p, Duration::from_secs(60));
        assert!(exit.success(), "{exit:?}");
    }
    gw.wait_ledger_quiescent();
    wait_for(Duration::from_secs(10), "live figures = the ledger", || {
        let v = live(&gw, &key);
        let (spend, today) = ledger(&gw, &key);
        let agree = v["spend_nanodollars"] == spend
            && v["requests_today"] == today
            && nanos(&v["reserved_usd"]) == 0;
        agree.then_some(())
    });
    assert_eq!(ledger(&gw, &key), (3 * DEFAULT_CALL_NANOS, 3));
    assert_eq!(gw.query_i64("SELECT COUNT(*) FROM inflight", []), 0);
}

/// Issue 18: a large upload whose opening is still being read when the old process hands
/// over. The old process no longer decides: once the opening is in, it relays the request,
/// the part it read and the rest, to the new process, which admits, forwards and books it,
/// once.
#[test]
fn an_upload_mid_opening_when_the_old_process_hands_over_is_decided_and_booked_by_the_new_one() {
    const BOUNDARY: &str = "upgradeBoundary9QxZ";
    let mock = mock();
    let mut gw = GatewayBuilder::new(&mock)
        .admin(ADMIN_TOKEN)
        .models(
            "models:\n  - id: whisper\n    provider: mock\n    upstream_id: whisper-upstream\n    \
             endpoint: transcriptions\n    usd_per_minute: 0.006\n",
        )
        .server("max_audio_seconds: 600")
        .start();
    let key = gw.create_key(&[]);
    mock.clear();
    // 1.5 MB, above `server.multipart_hold_bytes`: forwarded as it arrives, once admitted.
    let file: Vec<u8> = (0..1_500_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let part = |name: &str, extra: &str| {
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{extra}\r\n\r\n")
    };
    let form = |model: &str| {
        let mut b = Vec::new();
        b.extend_from_slice(format!("{}{model}\r\n", part("model", "")).as_bytes());
        b.extend_from_slice(format!("{}verbose_json\r\n", part("response_format", "")).as_bytes());
        b.extend_from_slice(part("file", "; filename=\"a.wav\"").as_bytes());
        b.extend_from_slice(&file);
        b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
        b
    };
    let whole = form("whisper");
    let bearer = key.bearer();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let len = whole.len().to_string();
    // The head and the first bytes of the `model` value: the opening (up to the end of
    // that part and the file's head) is not in.
    let mid_model = whole
        .windows(7)
        .position(|w| w == b"whisper")
        .expect("the model value")
        + 3;
    let mut conn = send_request(
        gw.addr,
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", ct.as_str()),
            ("Content-Length", len.as_str()),
        ],
        &whole[..mid_model],
    )
    .expect("send the opening's first bytes");

    let mut old = gw.upgrade();
    wait_log(
        &gw,
        "upgrade: holding 0 requests the old process still has open",
    );
    assert!(mock.requests().is_empty(), "nothing went upstream yet");

    std::io::Write::write_all(&mut conn, &whole[mid_model..]).expect("send the rest");
    let r = read_response(conn).expect("the answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["text"],
        format!("sha256:{} bytes:1500000", sha256_hex(&file))
    );
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].body == form("whisper-upstream"),
        "the upstream got the form byte for byte but its model"
    );

    let exit = wait_exit(&mut old, Duration::from_secs(60));
    assert!(exit.success(), "the old process exits cleanly: {exit:?}");
    gw.wait_ledger_quiescent();
    // The reported 93.75 s (1,500,000 bytes at 16,000 a second) at 0.006 USD a minute, once.
    let expected = 9_375_000;
    wait_for(Duration::from_secs(10), "live figures = the ledger", || {
        let v = live(&gw, &key);
        (v["spend_nanodollars"] == expected && nanos(&v["reserved_usd"]) == 0).then_some(())
    });
    assert_eq!(ledger(&gw, &key), (expected, 1));
    let traces: Vec<_> = gw
        .trace_rows(&key.id)
        .into_iter()
        .filter(|t| t.endpoint == "audio.transcriptions")
        .collect();
    assert_eq!(
        traces.len(),
        1,
        "one trace, the relayed request's: {traces:?}"
    );
    assert_eq!((traces[0].status, traces[0].cost_nanos), (200, expected));
    assert_eq!(gw.query_i64("SELECT COUNT(*) FROM inflight", []), 0);
}
