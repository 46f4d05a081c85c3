//! Runaway-agent brakes (SPEC §2 table, §7): `max_usd_per_hour` answers 429
//! `spend_rate_exceeded` and `loop_limit` answers 429 `loop_detected`, each with an accurate
//! `Retry-After`; a refused request consumes nothing; every door sets and shows both.
//!
//! The windows run on the gateway's monotonic clock, which `SPIDERGATE_TEST_CLOCK=1` lets a
//! test move forward (`POST /admin/test/advance-clock`): no real hour or minute is waited.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// gpt-4o-mini (tests/common MODELS): 0.15 USD per Mtok in = 150 nano-USD per prompt token,
/// 0.60 out = 600 per completion token.
const PROMPT_NANOS: i64 = 150;
const COMPLETION_NANOS: i64 = 600;
/// The completion cap every request here sends.
const MAX_TOKENS: i64 = 20;

fn body(text: &str) -> Vec<u8> {
    json!({
        "model": "gpt-4o-mini",
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": text}],
    })
    .to_string()
    .into_bytes()
}

/// The request's upper-bound cost as SPEC §2 defines it for a plain chat body: every prompt
/// token is at least one byte, output at most `max_tokens`.
fn bound(body: &[u8]) -> i64 {
    body.len() as i64 * PROMPT_NANOS + MAX_TOKENS * COMPLETION_NANOS
}

/// The mock reports 10 prompt + 5 completion tokens unless told otherwise.
const DEFAULT_COST: i64 = 10 * PROMPT_NANOS + 5 * COMPLETION_NANOS;

fn send(gw: &Gateway, key: &Key, body: &[u8], extra: &[(&str, &str)]) -> Response {
    gw.post("/v1/chat/completions", &key.bearer(), body, extra)
}

fn retry_after(r: &Response) -> u64 {
    r.header("retry-after")
        .expect("a 429 carries Retry-After")
        .parse()
        .expect("whole seconds")
}

fn advance(gw: &Gateway, ms: u64) {
    let r = gw.admin_call("POST", &format!("/admin/test/advance-clock?ms={ms}"), None);
    assert_eq!(r.status, 200, "{}", r.text());
}

fn usd(nanos: i64) -> String {
    format!("{}.{:09}", nanos / 1_000_000_000, nanos % 1_000_000_000)
}

fn brakes_gateway(mock: &MockProvider) -> Gateway {
    GatewayBuilder::new(mock)
        .env("SPIDERGATE_TEST_CLOCK", "1")
        .admin("brakes-admin")
        .start()
}

/// Requests admitted and spend booked for the key, as `/v1/usage` and the ledger say.
fn consumed(gw: &Gateway, key: &Key) -> (Value, Value, Vec<(String, i64, i64)>) {
    gw.wait_ledger_quiescent();
    let u = gw.usage(key);
    (
        u["requests_today"].clone(),
        u["spend_nanodollars"].clone(),
        gw.spend_rows(&key.id),
    )
}

#[test]
fn spend_rate_refuses_once_held_and_spent_would_pass_the_cap_and_retry_after_is_exact() {
    let mock = mock();
    let gw = brakes_gateway(&mock);
    let b = body("hello");
    // Room for the bound plus two and a half settled requests: exactly three are admitted
    // (before the n-th admission n - 1 have settled, and n - 1 charges + the bound must fit).
    let cap = bound(&b) + 2 * DEFAULT_COST + DEFAULT_COST / 2;
    // A soft monthly budget (far from reached): the hour cap applies all the same.
    let key = gw.create_key(&[
        "--max-usd-per-hour",
        &usd(cap),
        "--budget",
        "100",
        "--budget-mode",
        "soft",
        "--rpm",
        "1000",
    ]);
    // The window's clock starts at the first booking, after this instant: the bound below
    // holds however slow the machine is.
    let first_sent = Instant::now();
    for i in 0..3 {
        let r = send(&gw, &key, &b, &[]);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    let refused_at = Instant::now();
    let r = send(&gw, &key, &b, &[]);
    assert_eq!((r.status, r.code().as_str()), (429, "spend_rate_exceeded"));
    assert_eq!(r.json()["error"]["type"], "requests");
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some("spend_rate_exceeded")
    );
    let retry = retry_after(&r);
    // All three charges were booked within the last moments; the first leaves the window
    // an hour after it was booked (SPEC §7: a rolling 60 minutes), never later.
    let waited = first_sent.elapsed().as_secs() + 1;
    assert!(
        (3600 - waited..=3600).contains(&retry),
        "Retry-After {retry} s"
    );
    // A refusal consumed nothing: the same answer again, and the counts did not move.
    let before = consumed(&gw, &key);
    assert_eq!(before.0, 3, "requests_today");
    assert_eq!(before.1, 3 * DEFAULT_COST, "spend");
    for _ in 0..3 {
        let r = send(&gw, &key, &b, &[]);
        assert_eq!(r.code(), "spend_rate_exceeded");
    }
    assert_eq!(consumed(&gw, &key), before);
    // Each refusal left a normal trace row with its code (the alert outbox watches these).
    let refusals = gw
        .trace_rows(&key.id)
        .into_iter()
        .filter(|t| t.error_code.as_deref() == Some("spend_rate_exceeded"))
        .inspect(|t| assert_eq!(t.status, 429))
        .count();
    assert_eq!(refusals, 4);

    // Two seconds before the Retry-After (on the gateway's clock) it is still refused, and
    // says so; at the Retry-After the request is admitted.
    let probe_sent = Instant::now();
    advance(&gw, (retry - 2) * 1000);
    let r = send(&gw, &key, &b, &[]);
    if probe_sent.duration_since(refused_at) < Duration::from_secs(1) {
        // Less than a second of real time passed since the refusal, so the gateway's clock
        // is still before the moment it named.
        assert_eq!(r.code(), "spend_rate_exceeded", "{}", r.text());
        assert!(retry_after(&r) <= 2, "{}", retry_after(&r));
    }
    advance(&gw, 2000);
    let r = send(&gw, &key, &b, &[]);
    assert_eq!(r.status, 200, "retry after {retry} s: {}", r.text());
}

#[test]
fn concurrent_requests_never_bill_more_than_the_hourly_cap() {
    let mock = mock();
    let gw = brakes_gateway(&mock);
    let b = body("a concurrent agent");
    // The mock bills the worst case the bound allows: every body byte a prompt token, every
    // allowed output token produced, so each admitted request costs exactly its hold.
    let worst = [
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-completion-tokens", "max"),
    ];
    let cap = 7 * bound(&b) + bound(&b) / 2;
    let key = gw.create_key(&["--max-usd-per-hour", &usd(cap)]);
    let ok = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..3 {
                    let r = send(&gw, &key, &b, &worst);
                    match r.status {
                        200 => {
                            ok.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        }
                        429 => assert_eq!(r.code(), "spend_rate_exceeded"),
                        s => panic!("unexpected {s}: {}", r.text()),
                    }
                }
            });
        }
    });
    gw.wait_ledger_quiescent();
    let billed: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
    let admitted = ok.into_inner() as i64;
    assert!(billed <= cap, "billed {billed} > hourly cap {cap}");
    // No hold outlived its request: exactly as many as fit were admitted.
    assert_eq!(admitted, 7, "billed {billed}, cap {cap}");
    assert_eq!(billed, 7 * bound(&b));
}

#[test]
fn loop_limit_refuses_the_same_request_past_n_per_minute_and_refusals_do_not_count() {
    let mock = mock();
    let gw = brakes_gateway(&mock);
    let key = gw.create_key(&["--loop-limit", "3", "--rpm", "100", "--rpd", "100"]);
    let same = body("are we there yet?");
    let first_sent = Instant::now();
    for i in 0..3 {
        let r = send(&gw, &key, &same, &[]);
        assert_eq!(r.status, 200, "identical request {i}: {}", r.text());
    }
    let r = send(&gw, &key, &same, &[]);
    assert_eq!((r.status, r.code().as_str()), (429, "loop_detected"));
    assert_eq!(r.json()["error"]["type"], "requests");
    let retry = retry_after(&r);
    let waited = first_sent.elapsed().as_secs() + 1;
    // The first leaves the window 60 s after it was admitted (SPEC §2: in 60 s), never later.
    assert!((60 - waited..=60).contains(&retry), "Retry-After {retry} s");

    // One byte different is another request.
    let other = body("are we there yet!");
    assert_eq!(send(&gw, &key, &other, &[]).status, 200);
    // The same body on another endpoint is another request too.
    let r = gw.post("/v1/embeddings", &key.bearer(), &same, &[]);
    assert_ne!(r.code(), "loop_detected", "{}", r.text());

    // Refusals consume nothing: no rpm or rpd slot, no spend.
    let before = consumed(&gw, &key);
    for _ in 0..5 {
        assert_eq!(send(&gw, &key, &same, &[]).code(), "loop_detected");
    }
    let after = consumed(&gw, &key);
    assert_eq!(after, before);
    let u = gw.usage(&key);
    assert_eq!(u["requests_this_minute"], before.0, "{u}");
    let loops = gw
        .trace_rows(&key.id)
        .into_iter()
        .filter(|t| t.error_code.as_deref() == Some("loop_detected"))
        .inspect(|t| assert_eq!(t.status, 429))
        .count();
    assert_eq!(loops, 6);

    // At the Retry-After the oldest admission has left, and the refusals since (had they
    // counted) would still fill the window: the request passes.
    advance(&gw, retry * 1000);
    let r = send(&gw, &key, &same, &[]);
    assert_eq!(r.status, 200, "retry after {retry} s: {}", r.text());
    // A whole window later the request passes three times again, and no more.
    advance(&gw, 61_000);
    for i in 0..3 {
        let r = send(&gw, &key, &same, &[]);
        assert_eq!(r.status, 200, "after the window, {i}: {}", r.text());
    }
    assert_eq!(send(&gw, &key, &same, &[]).code(), "loop_detected");
}

#[test]
fn a_request_refused_for_another_reason_takes_no_brake() {
    let mock = mock();
    let gw = brakes_gateway(&mock);
    let b = body("once");
    // rpm 1: the second request is refused by rpm, after the brakes passed it; it must not
    // have taken a loop count or an hour hold.
    let key = gw.create_key(&[
        "--loop-limit",
        "1",
        "--max-usd-per-hour",
        &usd(bound(&b) + DEFAULT_COST),
        "--rpm",
        "1",
    ]);
    assert_eq!(send(&gw, &key, &body("first"), &[]).status, 200);
    let r = send(&gw, &key, &b, &[]);
    assert_eq!(r.code(), "rate_limit_exceeded");
    advance(&gw, retry_after(&r) * 1000);
    // Not a loop (the refused one did not count) and the hour has room (it held nothing).
    let r = send(&gw, &key, &b, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // A request the budget refuses (402 comes first) takes neither brake either.
    let poor = gw.create_key(&["--budget", "0", "--loop-limit", "1"]);
    assert_eq!(send(&gw, &poor, &b, &[]).code(), "budget_exceeded");
    gw.cli_json(&["keys", "update", &poor.id, "--budget", "none", "--json"]);
    wait_for(Duration::from_secs(5), "budget removed", || {
        (send(&gw, &poor, &b, &[]).status == 200).then_some(())
    });
}

#[test]
fn every_door_sets_shows_and_audits_the_brakes() {
    let mock = mock();
    let gw = brakes_gateway(&mock);
    // CLI.
    let v = gw.cli_json(&[
        "keys",
        "create",
        "--name",
        "cli",
        "--max-usd-per-hour",
        "2.5",
        "--loop-limit",
        "5",
        "--json",
    ]);
    assert_eq!(
        (v["max_usd_per_hour"].as_f64(), v["loop_limit"].as_u64()),
        (Some(2.5), Some(5))
    );
    let id = v["id"].as_str().unwrap().to_string();
    let v = gw.cli_json(&["keys", "update", &id, "--loop-limit", "none", "--json"]);
    assert!(v["loop_limit"].is_null(), "{v}");
    assert_eq!(v["max_usd_per_hour"], 2.5);
    let v = gw.cli_json(&["keys", "show", &id, "--json"]);
    assert_eq!(
        (v["max_usd_per_hour"].as_f64(), v["loop_limit"].clone()),
        (Some(2.5), Value::Null)
    );
    let list = gw.cli_json(&["keys", "list", "--json"]);
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == id.as_str() && k["max_usd_per_hour"] == 2.5));
    let out = gw.cli(&["keys", "create", "--name", "x", "--loop-limit", "0"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--loop-limit"));
    let out = gw.cli(&["keys", "create", "--name", "x", "--max-usd-per-hour=-1"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-usd-per-hour"));

    // Admin API.
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "api", "max_usd_per_hour": 0.75, "loop_limit": 2})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let api_id = created["id"].as_str().unwrap().to_string();
    assert_eq!(
        (
            created["max_usd_per_hour"].as_f64(),
            created["loop_limit"].as_u64()
        ),
        (Some(0.75), Some(2))
    );
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{api_id}"),
        Some(&json!({"max_usd_per_hour": null, "loop_limit": 4})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.admin_call("GET", &format!("/admin/keys/{api_id}"), None);
    let shown = r.json();
    assert!(shown["max_usd_per_hour"].is_null(), "{shown}");
    assert_eq!(shown["loop_limit"], 4);
    for (field, bad) in [
        ("loop_limit", json!(-3)),
        ("max_usd_per_hour", json!("lots")),
        ("max_usd_per_hour", json!(0)),
    ] {
        let r = gw.admin_call(
            "POST",
            "/admin/keys",
            Some(&json!({"name": "bad", field: bad})),
        );
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert!(r.text().contains(field), "{field}: {}", r.text());
    }

    // The audit log records the change with both fields, before and after.
    let r = gw.admin_call("GET", "/admin/audit?limit=50", None);
    let text = r.text();
    let audit: Value = serde_json::from_str(&text).unwrap();
    let entries = audit["data"].as_array().cloned().unwrap_or_default();
    let patch = entries
        .iter()
        .find(|e| e["action"] == "key.update" && e["target"] == api_id.as_str())
        .unwrap_or_else(|| panic!("no audit entry for the patch: {text}"));
    assert_eq!(patch["before"]["loop_limit"], 2, "{patch}");
    assert_eq!(patch["after"]["loop_limit"], 4, "{patch}");
    assert_eq!(patch["before"]["max_usd_per_hour"], 0.75, "{patch}");
    assert!(patch["after"]["max_usd_per_hour"].is_null(), "{patch}");

    // And the gateway enforces what the API set, once the key reloaded (within a second).
    let key = Key {
        id: api_id,
        secret: created["secret"].as_str().unwrap().to_string(),
    };
    wait_for(Duration::from_secs(5), "loop_limit 4 live", || {
        (gw.usage(&key)["loop_limit"] == 4).then_some(())
    });
    let b = body("loop via the api");
    for i in 0..4 {
        assert_eq!(send(&gw, &key, &b, &[]).status, 200, "request {i}");
    }
    assert_eq!(send(&gw, &key, &b, &[]).code(), "loop_detected");
}

#[test]
fn a_restart_does_not_forget_the_hour_of_spend() {
    let mock = mock();
    let mut gw = brakes_gateway(&mock);
    let b = body("before the restart");
    let cap = bound(&b) + 2 * DEFAULT_COST + DEFAULT_COST / 2;
    let key = gw.create_key(&["--max-usd-per-hour", &usd(cap)]);
    let first_sent = Instant::now();
    for i in 0..3 {
        assert_eq!(send(&gw, &key, &b, &[]).status, 200, "request {i}");
    }
    assert_eq!(send(&gw, &key, &b, &[]).code(), "spend_rate_exceeded");
    gw.restart();
    // The hour comes back from the traces: still refused, with the same horizon.
    let r = send(&gw, &key, &b, &[]);
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "spend_rate_exceeded"),
        "{}",
        r.text()
    );
    let retry = retry_after(&r);
    let waited = first_sent.elapsed().as_secs() + 1;
    assert!(
        (3600 - waited..=3600).contains(&retry),
        "Retry-After {retry} s"
    );
    // And it leaves on time.
    advance(&gw, retry * 1000);
    assert_eq!(send(&gw, &key, &b, &[]).status, 200);
}

/// A client that sends one request after another, each on a new connection as soon as the
/// last answer arrived, is never refused for a hold or a slot of a response that already
/// ended (SPEC §2: holds are for requests in flight). The hour cap fits exactly `ROUNDS` of
/// these requests and `max_inflight` is 1, so the previous request's hold or slot, still
/// there when the next one is decided, would refuse it. (On a kept-alive connection the next
/// request is read only after the last one's logging phase, so the race needs new ones.)
#[test]
fn a_sequential_client_is_never_refused_for_a_response_that_already_ended() {
    const ROUNDS: i64 = 100;
    let mock = mock();
    let gw = brakes_gateway(&mock);
    let b = body("one after another");
    let key = gw.create_key(&[
        "--max-usd-per-hour",
        &usd(bound(&b) + (ROUNDS - 1) * DEFAULT_COST),
        "--max-inflight",
        "1",
    ]);
    let refused: Vec<_> = (0..ROUNDS)
        .map(|i| (i, send(&gw, &key, &b, &[])))
        .filter(|(_, r)| r.status != 200)
        .map(|(i, r)| (i, r.status, r.code()))
        .collect();
    assert!(refused.is_empty(), "refused: {refused:?}");
    // The cap is exact: the next one does not fit.
    assert_eq!(send(&gw, &key, &b, &[]).code(), "spend_rate_exceeded");
}
