//! Hostile and unlucky clients (SPEC §2, §4; issue 7): no request shape, timing or fault lets
//! spend past a hard cap, and every request the upstream may have worked on is charged.
//!
//! "Billed" is what the mock provider reported as usage (`MockProvider::served_usage`, or the
//! usage a response carried) priced at 0.15 / 0.60 USD per Mtok: 150 nano-dollars per prompt
//! token and 600 per completion token. With `x-mock-prompt-tokens: bytes` and
//! `x-mock-completion-tokens: max` the mock bills the worst case a request allows.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use spidergate::clock::{month_index, month_label, month_start_ms, now_ms};

const PROMPT_NANOS: i64 = 150;
const COMPLETION_NANOS: i64 = 600;

fn cost(prompt: u64, completion: u64) -> i64 {
    (prompt as i64)
        .saturating_mul(PROMPT_NANOS)
        .saturating_add((completion as i64).saturating_mul(COMPLETION_NANOS))
}

/// What the mock billed so far, in nano-dollars.
fn billed(mock: &MockProvider) -> i64 {
    let (p, c) = mock.served_usage();
    cost(p, c)
}

/// Every paid model costs the same per token, so the mock's total prices with one pair.
const MODELS: &str = r#"
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: tiny-out
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 64
  - id: big-out
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 32000
  - id: no-max
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
  - id: also-paid
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
  - id: dead-model
    provider: dead
    input_usd_per_mtok: 1
    output_usd_per_mtok: 1
aliases:
  hostile/paid-chain: [gpt-4o-mini, also-paid]
  hostile/failover: [dead-model, gpt-4o-mini]
"#;

/// The mock bills everything the request allows.
const WORST_CASE_BILLING: [(&str, &str); 2] = [
    ("x-mock-prompt-tokens", "bytes"),
    ("x-mock-completion-tokens", "max"),
];

fn gateway(mock: &MockProvider) -> GatewayBuilder {
    GatewayBuilder::new(mock).models(MODELS)
}

/// One chat request on a fresh connection; transport errors become `Err` (a gateway that
/// panics or drops the connection must fail the test with a clear message, not hang it).
fn send_chat(
    addr: SocketAddr,
    bearer: &str,
    body: &str,
    extra: &[(&str, &str)],
) -> Result<Response, String> {
    let mut headers = vec![
        ("Authorization", bearer),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    http(
        addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.as_bytes(),
    )
    .map_err(|e| format!("transport error: {e}"))
}

fn user_body(model: &str, extra: Value) -> String {
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            b.insert(k.clone(), v.clone());
        }
    }
    body.to_string()
}

/// `error.code` of a JSON error body, or "" for anything else.
fn code_of(r: &Response) -> String {
    serde_json::from_slice::<Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// Every error response names its code in `X-SpiderGate-Error-Code`; for the gateway's own
/// errors it is the body's `error.code`.
fn assert_error_code_header(r: &Response, what: &str) {
    assert!(
        r.status >= 400,
        "{what}: expected an error, got {}",
        r.status
    );
    let header = r.header("x-spidergate-error-code").unwrap_or_else(|| {
        panic!(
            "{what}: {} without X-SpiderGate-Error-Code; headers {:?}",
            r.status, r.headers
        )
    });
    let code = code_of(r);
    assert!(!header.is_empty(), "{what}: empty X-SpiderGate-Error-Code");
    if !code.is_empty() {
        assert_eq!(header, code, "{what}: header vs body error.code");
    }
}

/// Usage `(prompt, completion)` of a 200 response: the JSON body's, or a stream's final
/// usage chunk.
fn response_usage(r: &Response) -> Option<(u64, u64)> {
    let usage_of = |v: &Value| {
        let u = &v["usage"];
        Some((
            u["prompt_tokens"].as_u64()?,
            u["completion_tokens"].as_u64()?,
        ))
    };
    if r.header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream"))
    {
        r.text()
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v["usage"].is_object())
            .and_then(|v| usage_of(&v))
    } else {
        serde_json::from_slice::<Value>(&r.body)
            .ok()
            .and_then(|v| usage_of(&v))
    }
}

// ---------------------------------------------------------------------------------------------
// 1-4. The reservation is a true upper bound.
// ---------------------------------------------------------------------------------------------

#[test]
fn huge_max_tokens_under_concurrency_never_overshoot_a_hard_cap() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let cap: i64 = 500_000;
    let key = Arc::new(gw.create_key(&["--budget", "0.0005", "--budget-mode", "hard"]));
    // 2^63+7, 10^17, 2^64-1, 4*10^18, as the exact JSON integers a client can send.
    let huge = [
        "9223372036854775815",
        "100000000000000000",
        "18446744073709551615",
        "4000000000000000000",
    ];
    mock.clear();
    let addr = gw.addr;
    let threads: Vec<_> = (0..20)
        .map(|i| {
            let key = key.clone();
            let body = format!(
                r#"{{"model":"gpt-4o-mini","max_tokens":{},"messages":[{{"role":"user","content":"hi"}}]}}"#,
                huge[i % huge.len()]
            );
            std::thread::spawn(move || {
                let mut extra = WORST_CASE_BILLING.to_vec();
                extra.push(("x-mock-delay-ms", "3000"));
                send_chat(addr, &key.bearer(), &body, &extra).map(|r| (r.status, code_of(&r)))
            })
        })
        .collect();
    let outcomes: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    for (i, outcome) in outcomes.iter().enumerate() {
        match outcome {
            Ok((200, _)) => {}
            Ok((402, code)) => assert_eq!(code, "budget_exceeded", "request {i}"),
            Ok((400, code)) => assert_eq!(code, "invalid_request", "request {i}"),
            other => panic!("request {i} (max_tokens {}): {other:?}", huge[i % 4]),
        }
    }
    let billed = billed(&mock);
    assert!(
        billed <= cap,
        "the mock billed {billed} nanos against a {cap} cap; outcomes {outcomes:?}"
    );

    // Any u64 is capped at the model's maximum, so it is priced (never wraps): a key that can
    // afford the model's maximum output is served.
    let roomy = gw.create_key(&["--budget", "10", "--budget-mode", "hard"]);
    for v in huge {
        let body = format!(
            r#"{{"model":"gpt-4o-mini","max_tokens":{v},"max_completion_tokens":{v},"messages":[]}}"#
        );
        let r = send_chat(gw.addr, &roomy.bearer(), &body, &[]).expect("roomy");
        assert_eq!(r.status, 200, "max_tokens {v} on a roomy key: {}", r.text());
    }
    // ...and one that cannot afford 1000 output tokens (600,000 nanos) is refused.
    let tight = gw.create_key(&["--budget", "0.0005", "--budget-mode", "hard"]);
    let r = send_chat(
        gw.addr,
        &tight.bearer(),
        &user_body("gpt-4o-mini", json!({"max_tokens": u64::MAX})),
        &[],
    )
    .expect("tight");
    assert_eq!((r.status, code_of(&r).as_str()), (402, "budget_exceeded"));
}

#[test]
fn token_fields_that_cannot_be_priced_are_400() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&["--budget", "100", "--budget-mode", "hard"]);
    mock.clear();
    let bad = [
        r#""max_tokens":1.5"#,
        r#""max_tokens":-1"#,
        r#""max_tokens":1e30"#,
        r#""max_tokens":"10""#,
        r#""max_completion_tokens":2.5"#,
        r#""max_completion_tokens":-7"#,
        r#""max_completion_tokens":"10""#,
        r#""n":0"#,
        r#""n":129"#,
        r#""n":1.5"#,
        r#""n":-1"#,
        r#""n":"2""#,
        r#""n":100000000000000000000"#,
    ];
    for field in bad {
        let body = format!(r#"{{"model":"gpt-4o-mini",{field},"messages":[]}}"#);
        let r = send_chat(gw.addr, &key.bearer(), &body, &[]).expect("send");
        assert_eq!(
            (r.status, code_of(&r).as_str()),
            (400, "invalid_request"),
            "{field}: {}",
            r.text()
        );
    }
    assert!(
        mock.requests().is_empty(),
        "nothing unpriceable was forwarded"
    );
    for field in [
        r#""n":1"#,
        r#""n":128"#,
        r#""max_tokens":0"#,
        r#""max_tokens":5,"n":3"#,
    ] {
        let body = format!(r#"{{"model":"gpt-4o-mini",{field},"messages":[]}}"#);
        let r = send_chat(gw.addr, &key.bearer(), &body, &[]).expect("send");
        assert_eq!(r.status, 200, "{field}: {}", r.text());
    }
    assert_eq!(mock.requests().len(), 4, "only the priceable ones went out");
}

#[test]
fn n_choices_are_reserved_for_every_choice() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let cap: i64 = 500_000;
    let key = Arc::new(gw.create_key(&["--budget", "0.0005", "--budget-mode", "hard"]));
    let body = user_body("gpt-4o-mini", json!({"n": 8, "max_tokens": 10}));
    mock.clear();
    let addr = gw.addr;
    let threads: Vec<_> = (0..24)
        .map(|_| {
            let (key, body) = (key.clone(), body.clone());
            std::thread::spawn(move || {
                let mut extra = WORST_CASE_BILLING.to_vec();
                extra.push(("x-mock-delay-ms", "1000"));
                send_chat(addr, &key.bearer(), &body, &extra).map(|r| r.status)
            })
        })
        .collect();
    let mut statuses: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    // Then one at a time until refused.
    for _ in 0..30 {
        let r = send_chat(addr, &key.bearer(), &body, &WORST_CASE_BILLING).map(|r| r.status);
        let done = r == Ok(402);
        statuses.push(r);
        if done {
            break;
        }
    }
    assert!(
        statuses.iter().all(|s| matches!(s, Ok(200) | Ok(402))),
        "{statuses:?}"
    );
    assert!(statuses.contains(&Ok(402)), "the cap was never reached");
    assert!(statuses.contains(&Ok(200)));
    let billed = billed(&mock);
    assert!(
        billed <= cap,
        "n=8 x max_tokens=10: the mock billed {billed} nanos against a {cap} cap"
    );
}

#[test]
fn the_larger_of_the_two_max_token_fields_is_reserved_and_the_default_bound_is_large() {
    let mock = mock();
    let gw = gateway(&mock).start();
    // 100,000 nanos: a short prompt and one output token (about 15,000) fit, 16,000 output
    // tokens (9,600,000) do not.
    let key = gw.create_key(&["--budget", "0.0001", "--budget-mode", "hard"]);
    mock.clear();
    for fields in [
        json!({"max_completion_tokens": 1, "max_tokens": 16000}),
        json!({"max_tokens": 1, "max_completion_tokens": 16000}),
    ] {
        let r = send_chat(
            gw.addr,
            &key.bearer(),
            &user_body("big-out", fields.clone()),
            &WORST_CASE_BILLING,
        )
        .unwrap();
        assert_eq!(
            (r.status, code_of(&r).as_str()),
            (402, "budget_exceeded"),
            "{fields} must be reserved for 16000 output tokens: {}",
            r.text()
        );
    }
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("big-out", json!({"max_completion_tokens": 1})),
        &WORST_CASE_BILLING,
    )
    .unwrap();
    assert_eq!(r.status, 200, "one output token fits: {}", r.text());
    assert!(billed(&mock) <= 100_000);

    // A model without max_output_tokens is bounded by default_max_output_tokens (131072):
    // 78,643,200 nanos of output, above this 50,000,000 cap (16,384 would fit under it).
    let key = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    let r = send_chat(gw.addr, &key.bearer(), &user_body("no-max", json!({})), &[]).unwrap();
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (402, "budget_exceeded"),
        "no max_tokens on a model without max_output_tokens: {}",
        r.text()
    );
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("gpt-4o-mini", json!({})),
        &[],
    )
    .unwrap();
    assert_eq!(
        r.status,
        200,
        "the model's own max (1000) fits: {}",
        r.text()
    );
}

#[test]
fn media_parts_are_reserved_at_the_per_part_bound() {
    let mock = mock();
    let gw = gateway(&mock).server("media_part_tokens: 2000").start();
    // 500,000 nanos. One part: 2000 x 150 = 300,000 + the body bytes + 64 output tokens
    // (38,400) fits; three or four parts do not.
    let key = gw.create_key(&["--budget", "0.0005", "--budget-mode", "hard"]);
    let image =
        json!({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}});
    let audio =
        json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}});
    let file = json!({"type": "file", "file": {"file_id": "file-abc"}});
    let text = json!({"type": "text", "text": "what is this?"});
    let body = |parts: Vec<Value>| {
        json!({"model": "tiny-out", "messages": [{"role": "user", "content": parts}]}).to_string()
    };
    mock.clear();
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &body(vec![text.clone(), image.clone()]),
        &WORST_CASE_BILLING,
    )
    .unwrap();
    assert_eq!(r.status, 200, "one image fits: {}", r.text());
    for (what, parts) in [
        (
            "four images",
            vec![
                text.clone(),
                image.clone(),
                image.clone(),
                image.clone(),
                image.clone(),
            ],
        ),
        (
            "image + audio + image",
            vec![text.clone(), image.clone(), audio.clone(), image.clone()],
        ),
        ("two images", vec![image.clone(), image.clone()]),
    ] {
        let r = send_chat(gw.addr, &key.bearer(), &body(parts), &WORST_CASE_BILLING).unwrap();
        assert_eq!(
            (r.status, code_of(&r).as_str()),
            (402, "budget_exceeded"),
            "{what}: each part is bounded by media_part_tokens: {}",
            r.text()
        );
    }
    // A file by id is billed for pages the body does not show: without the model's
    // `context_window_tokens` nothing bounds it, so a hard-budget key cannot send it (issue 16).
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &body(vec![text.clone(), file.clone()]),
        &WORST_CASE_BILLING,
    )
    .unwrap();
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert_eq!(mock.requests().len(), 1, "only the affordable one went out");
    assert!(billed(&mock) <= 500_000);
}

// ---------------------------------------------------------------------------------------------
// 5. Trickled bodies: admission happens when the body is complete.
// ---------------------------------------------------------------------------------------------

/// Sleeps until the wall clock reaches `ms` (unix ms).
fn sleep_until(ms: i64) {
    let left = ms - now_ms();
    if left > 0 {
        std::thread::sleep(Duration::from_millis(left as u64));
    }
}

/// A gateway started again with its clock set back across a month's (and a day's) first
/// moment: the month and the day it already counted must not start over from zero (SPEC
/// §2: counters never roll backwards). Days and months count from the last trace recorded
/// until the clock passes it.
#[test]
fn a_clock_set_back_across_a_restart_rolls_no_day_or_month_back() {
    let mock = mock();
    let real = now_ms();
    let next = month_index(real) + 1;
    // The gateway's clock reads 20 s into the next month.
    let ahead = month_start_ms(next) + 20_000 - real;
    let mut gw = gateway(&mock)
        .env("SPIDERGATE_CLOCK_OFFSET_MS", &ahead.to_string())
        .start();
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "hard", "--rpd", "3"]);
    for _ in 0..3 {
        assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    }
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "daily_rate_limit_exceeded")
    );
    let before = gw.usage(&key);
    assert_eq!(before["month"], month_label(next), "{before}");
    assert!(gw.terminate().success());
    // Set back a minute: the clock now reads 40 s before that month (and day) began.
    gw.set_env("SPIDERGATE_CLOCK_OFFSET_MS", &(ahead - 60_000).to_string());
    gw.spawn();
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "daily_rate_limit_exceeded"),
        "the day's count started over: {}",
        r.text()
    );
    let after = gw.usage(&key);
    assert_eq!(after["month"], month_label(next), "{after}");
    assert_eq!(after["requests_today"], before["requests_today"], "{after}");
    assert_eq!(
        after["spend_nanodollars"], before["spend_nanodollars"],
        "{after}"
    );
    let months: Vec<String> = gw
        .db()
        .prepare("SELECT DISTINCT month FROM spend WHERE key_id = ?1")
        .unwrap()
        .query_map([&key.id], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(
        months,
        [month_label(next)],
        "no spend booked in a month that had ended"
    );
}

#[test]
fn a_body_trickled_across_a_month_boundary_is_admitted_when_it_completes() {
    // Fake the clock so the gateway's next month starts 3 s (real) after it is started; a
    // start (and key creation) that leaves less than 1.5 s starts again on a fresh offset.
    // The test waits only for the faked boundary to pass, not 15 s of margin.
    let mock = mock();
    let (gw, key, boundary, next) = (0..5)
        .find_map(|_| {
            let real_start = now_ms();
            let next = month_index(real_start) + 1;
            let boundary = real_start + 3_000;
            let offset = month_start_ms(next) - boundary;
            let gw = gateway(&mock)
                .env("SPIDERGATE_CLOCK_OFFSET_MS", &offset.to_string())
                .start();
            let key = gw.create_key(&["--budget", "1", "--budget-mode", "hard", "--ttl", "90d"]);
            (now_ms() < boundary - 1_500).then_some((gw, key, boundary, next))
        })
        .expect("five starts each left less than 1.5 s before the faked boundary");
    let (old_month, new_month) = (month_label(next - 1), month_label(next));

    // Before the new month: A sends its head and the first bytes of its body.
    let body_a = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"trickled across the month boundary"}]}"#;
    let len_a = body_a.len().to_string();
    let bearer = key.bearer();
    let head_a = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
        ("Content-Length", len_a.as_str()),
        ("x-mock-prompt-tokens", "100"),
        ("x-mock-completion-tokens", "10"),
    ];
    let mut a = send_request(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &head_a,
        &body_a[..10],
    )
    .expect("open A");
    a.write_all(&body_a[10..30]).unwrap();
    a.write_all(&body_a[30..50]).unwrap();
    assert!(
        now_ms() < boundary - 500,
        "A's head went out too close to the boundary"
    );

    // B: a whole request in the new month, finished before A.
    sleep_until(boundary + 500);
    let b = send_chat(
        gw.addr,
        &bearer,
        &user_body("gpt-4o-mini", json!({})),
        &[
            ("x-mock-prompt-tokens", "1"),
            ("x-mock-completion-tokens", "1"),
        ],
    )
    .unwrap();
    assert_eq!(b.status, 200, "{}", b.text());

    // A completes now, in the new month, after B.
    a.write_all(&body_a[50..70]).unwrap();
    a.write_all(&body_a[70..]).unwrap();
    let a = read_response(a).expect("A's response");
    assert_eq!(a.status, 200, "{}", a.text());

    let (cost_a, cost_b) = (cost(100, 10), cost(1, 1));
    let rows = wait_for(Duration::from_secs(10), "spend rows of A and B", || {
        let rows = gw.spend_rows(&key.id);
        (rows.iter().map(|r| r.1).sum::<i64>() >= 2).then_some(rows)
    });
    assert_eq!(
        rows,
        vec![(new_month.clone(), 2, cost_a + cost_b)],
        "A completed in {new_month} (it started in {old_month}): both belong to the new month"
    );
    let usage = gw.usage(&key);
    assert_eq!(usage["month"], new_month.as_str());
    assert_eq!(
        usage["spend_nanodollars"],
        cost_a + cost_b,
        "B's spend in the new month survived A's settlement"
    );
}

#[test]
fn a_key_revoked_while_its_body_uploads_is_refused_when_the_body_completes() {
    let mock = mock();
    let gw = gateway(&mock).admin("hostile-admin-token").start();
    let doomed = gw.create_key(&[]);
    let body = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"revoked-during-upload"}]}"#;
    let len = body.len().to_string();
    let bearer = doomed.bearer();
    let head = [
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
        ("Content-Length", len.as_str()),
    ];
    let mut upload = send_request(gw.addr, "POST", "/v1/chat/completions", &head, &body[..10])
        .expect("open the upload");
    upload.write_all(&body[10..40]).unwrap();
    // The gateway has read the head (the request is in flight) before the key is revoked.
    wait_for(Duration::from_secs(10), "the upload in flight", || {
        (gw.metric("spidergate_requests_in_flight") == Some(1)).then_some(())
    });
    // Revoked while the body is still uploading.
    gw.cli_json(&["keys", "revoke", &doomed.id, "--json"]);
    wait_for(Duration::from_secs(5), "the revocation to go live", || {
        let u = gw.get("/v1/usage", &bearer);
        (u.status == 401).then_some(())
    });
    upload.write_all(&body[40..]).unwrap();
    let r = read_response(upload).expect("response");
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (401, "token_revoked"),
        "a key revoked during the upload: {}",
        r.text()
    );
    assert!(
        mock.requests().is_empty(),
        "the revoked key's request reached the upstream"
    );
}

// ---------------------------------------------------------------------------------------------
// 6. The upstream may have worked: charged, estimated, never re-sent.
// ---------------------------------------------------------------------------------------------

/// Waits for the key's model traces to number `n`; returns them.
fn wait_traces(gw: &Gateway, key: &Key, n: usize, what: &str) -> Vec<TraceRec> {
    wait_for(Duration::from_secs(20), what, || {
        let t = gw.model_traces(&key.id);
        (t.len() >= n).then_some(t)
    })
}

/// The key's month spend in the `spend` table, once it is positive.
fn wait_spend(gw: &Gateway, key: &Key) -> i64 {
    wait_for(Duration::from_secs(10), "a spend row", || {
        let s: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
        (s > 0).then_some(s)
    })
}

fn assert_charged_estimate(t: &TraceRec, what: &str) {
    assert!(
        t.usage_estimated,
        "{what}: trace not marked as estimated: {t:?}"
    );
    assert!(t.cost_nanos > 0, "{what}: charged nothing: {t:?}");
    assert!(t.prompt_tokens >= 1, "{what}: no prompt estimate: {t:?}");
}

/// SPEC §2: an estimate is never below what the provider bills. The gateway asks for
/// `identity`; an answer compressed anyway (a proxy in front of a provider) hides its usage
/// from the gateway, not from the provider's bill: a black-box audit saw 13x less charged.
/// It is charged its reservation, marked estimated, and reaches the client as sent.
#[test]
fn a_compressed_answer_is_charged_its_reservation() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("gpt-4o-mini", json!({"max_tokens": 900})),
        &[("x-mock-gzip", "1"), ("x-mock-completion-tokens", "3")],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    assert_eq!(r.body.get(..2), Some(&[0x1f, 0x8b][..]), "gzip bytes");
    let t = wait_traces(&gw, &key, 1, "the trace");
    assert_charged_estimate(&t[0], "a compressed answer");
    // Not the ~150 bytes that passed: the body's usage could say up to 900.
    assert_eq!(
        t[0].completion_tokens, 900,
        "the reservation's output: {t:?}"
    );
}

/// Sends a chat request, waits until the mock has it, and hangs up before the answer.
fn hang_up_while_the_upstream_works(
    gw: &Gateway,
    mock: &MockProvider,
    key: &Key,
    extra: &[(&str, &str)],
) {
    let body = user_body("gpt-4o-mini", json!({}));
    let bearer = key.bearer();
    let mut headers = vec![("Authorization", bearer.as_str())];
    headers.extend_from_slice(extra);
    let stream = send_request(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &headers,
        body.as_bytes(),
    )
    .unwrap();
    wait_for(Duration::from_secs(10), "the upstream to get it", || {
        (mock.requests().len() == 1).then_some(())
    });
    drop(stream); // hang up while the upstream works
}

#[test]
fn a_client_that_hangs_up_before_the_response_head_is_charged_the_answers_usage() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    // The answer comes after the client left: the gateway reads it to its end anyway.
    hang_up_while_the_upstream_works(
        &gw,
        &mock,
        &key,
        &[
            ("x-mock-delay-ms", "3000"),
            ("x-mock-prompt-tokens", "11"),
            ("x-mock-completion-tokens", "7"),
        ],
    );

    let t = wait_traces(&gw, &key, 1, "the trace of the abandoned request");
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(t[0].status, 499, "{:?}", t[0]);
    assert_eq!(t[0].error_code.as_deref(), Some("client_closed"));
    assert!(!t[0].usage_estimated, "the answer's own usage: {:?}", t[0]);
    assert_eq!((t[0].prompt_tokens, t[0].completion_tokens), (11, 7));
    assert_eq!(t[0].cost_nanos, 11 * PROMPT_NANOS + 7 * COMPLETION_NANOS);
    assert_eq!(
        wait_spend(&gw, &key),
        11 * PROMPT_NANOS + 7 * COMPLETION_NANOS
    );
    assert_eq!(
        billed(&mock),
        t[0].cost_nanos,
        "charged what the provider billed"
    );
    assert_eq!(mock.requests().len(), 1, "sent once");
}

#[test]
fn an_abandoned_answer_that_never_comes_is_charged_at_its_reservation() {
    let mock = mock();
    let gw = gateway(&mock).server("read_timeout_ms: 500").start();
    let key = gw.create_key(&[]);
    mock.clear();
    hang_up_while_the_upstream_works(&gw, &mock, &key, &[("x-mock-delay-ms", "5000")]);

    let t = wait_traces(&gw, &key, 1, "the trace of the abandoned request");
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        t[0].error_code.as_deref(),
        Some("upstream_timeout"),
        "{:?}",
        t[0]
    );
    assert_charged_estimate(&t[0], "abandoned, then timed out");
    // The reservation: the output bound (max_output_tokens 1000) plus the prompt's bound
    // (a token per byte of the body).
    let body = user_body("gpt-4o-mini", json!({}));
    assert_eq!(t[0].completion_tokens, 1000, "{:?}", t[0]);
    assert!(t[0].prompt_tokens >= body.len() as i64, "{:?}", t[0]);
    assert_eq!(
        t[0].cost_nanos,
        t[0].prompt_tokens * PROMPT_NANOS + 1000 * COMPLETION_NANOS
    );
    assert_eq!(wait_spend(&gw, &key), t[0].cost_nanos);
}

#[test]
fn an_upstream_read_timeout_is_charged_and_not_retried_on_the_next_model() {
    let mock = mock();
    let gw = gateway(&mock).server("read_timeout_ms: 500").start();
    let key = gw.create_key(&[]);
    // Fallback still happens where the upstream cannot have worked: a connect error...
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("hostile/failover", json!({})),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-fallback-from"), Some("dead-model"));
    // ...or a 5xx status.
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("hostile/paid-chain", json!({})),
        &[
            ("x-mock-status", "503"),
            ("x-mock-status-model", "gpt-4o-mini"),
        ],
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-fallback-from"), Some("gpt-4o-mini"));

    mock.clear();
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("hostile/paid-chain", json!({})),
        &[("x-mock-delay-ms", "2000")],
    )
    .unwrap();
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (504, "upstream_timeout"),
        "{}",
        r.text()
    );
    let models: Vec<Value> = mock
        .requests()
        .iter()
        .map(|q| q.json().unwrap()["model"].clone())
        .collect();
    assert_eq!(
        models,
        vec![json!("gpt-4o-mini")],
        "the request was sent upstream exactly once, with no fallback after the timeout"
    );
    let t = wait_for(
        Duration::from_secs(20),
        "the timed-out request's trace",
        || {
            gw.model_traces(&key.id)
                .into_iter()
                .find(|t| t.status == 504)
        },
    );
    let timed_out = &t;
    assert_eq!(timed_out.status, 504, "{timed_out:?}");
    assert_eq!(timed_out.error_code.as_deref(), Some("upstream_timeout"));
    assert_eq!(timed_out.fallback_from, None);
    assert_charged_estimate(timed_out, "read timeout after sending");
    assert!(wait_spend(&gw, &key) >= timed_out.cost_nanos);
    assert_error_code_header(&r, "504");
}

#[test]
fn a_pooled_connection_that_breaks_after_sending_is_charged_and_not_resent() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    // Warm-up: leaves a pooled keep-alive connection to the mock.
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("gpt-4o-mini", json!({})),
        &[],
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let before: i64 = wait_for(Duration::from_secs(10), "warm-up spend", || {
        let t = gw.model_traces(&key.id);
        (t.len() == 1).then(|| t[0].cost_nanos)
    });
    mock.clear();
    let r = send_chat(
        gw.addr,
        &key.bearer(),
        &user_body("gpt-4o-mini", json!({"max_tokens": 5})),
        &[("x-mock-drop", "1")],
    )
    .unwrap();
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (502, "upstream_error"),
        "{}",
        r.text()
    );
    assert_eq!(
        mock.requests().len(),
        1,
        "the same POST was sent to the same model again"
    );
    // The connection closes after such an answer, and the answer says so: a client that
    // believed `keep-alive` sent its next request into the closing socket (a black-box
    // audit saw the OpenAI SDK fail 2 of 30 requests so). Asked on a kept-alive connection.
    let body = user_body("gpt-4o-mini", json!({"max_tokens": 5}));
    let mut conn = std::net::TcpStream::connect(gw.addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        conn,
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nAuthorization: {}\r\nx-mock-drop: 1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        key.bearer(),
        body.len()
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = conn.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 502"), "{answer}");
    let head = answer.split("\r\n\r\n").next().unwrap_or("");
    assert!(head.contains("\r\nconnection: close"), "{head}");
    let t = wait_traces(&gw, &key, 3, "the broken requests' traces");
    assert_eq!(t.len(), 3, "{t:?}");
    for broken in &t[1..] {
        assert_eq!(broken.status, 502);
        assert_charged_estimate(broken, "connection broke after the request was sent");
    }
    let all = before + t[1].cost_nanos + t[2].cost_nanos;
    wait_for(Duration::from_secs(10), "spend of all three", || {
        let s: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
        (s == all).then_some(())
    });
    assert_error_code_header(&r, "502");
}

// ---------------------------------------------------------------------------------------------
// 7. SIGTERM and SIGKILL.
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_cuts_a_long_stream_after_the_grace_and_charges_it() {
    let mock = mock();
    let mut gw = gateway(&mock).server("shutdown_grace_s: 2").start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "a 60 s story"}]});
    let (status, _, mut reader) = gw.open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "60"), ("x-mock-hold", "story")],
    );
    assert_eq!(status, 200);
    read_first_event(&mut reader);
    // The mock holds the rest of the story until the test releases it, which it never does
    // before the exit: a gateway that waited for the stream would never exit (`terminate`
    // would time out). No stopwatch on the grace.
    let exit = gw.terminate();
    assert!(exit.success(), "clean exit: {exit:?}");
    // The mock reaches its gate right after sending chunk 1 and stays there until released.
    wait_for(Duration::from_secs(10), "the stream still held", || {
        (mock.held("story") == 1).then_some(())
    });
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    assert!(
        !String::from_utf8_lossy(&rest).contains("[DONE]"),
        "the stream was cut"
    );
    // The process is gone: the database holds what it flushed.
    let t = gw.model_traces(&key.id);
    assert_eq!(t.len(), 1, "one trace for the cut stream: {t:?}");
    assert_charged_estimate(&t[0], "stream cut by shutdown");
    let spend: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
    assert_eq!(spend, t[0].cost_nanos);
}

#[test]
fn sigkill_with_requests_in_flight_charges_every_orphan_on_restart() {
    let mock = mock();
    let mut gw = gateway(&mock).start();
    let hard = Arc::new(gw.create_key(&["--budget", "10", "--budget-mode", "hard"]));
    let open = Arc::new(gw.create_key(&[]));
    let body = user_body("gpt-4o-mini", json!({}));
    mock.clear();
    let addr = gw.addr;
    let threads: Vec<_> = (0..5)
        .map(|i| {
            let key = if i < 3 { hard.clone() } else { open.clone() };
            let body = body.clone();
            std::thread::spawn(move || {
                let _ = send_chat(addr, &key.bearer(), &body, &[("x-mock-delay-ms", "10000")]);
            })
        })
        .collect();
    wait_for(
        Duration::from_secs(10),
        "5 requests at the upstream",
        || (mock.requests().len() == 5).then_some(()),
    );
    // Admissions are journaled by the batched writer: wait until the journal (the `inflight`
    // table) holds all five, as the crash must find them.
    wait_for(Duration::from_secs(10), "5 admissions journaled", || {
        (gw.query_i64("SELECT COUNT(*) FROM inflight", []) == 5).then_some(())
    });
    gw.kill9();
    for t in threads {
        t.join().unwrap();
    }
    gw.spawn();

    // The prompt bound is the bytes the provider received (the forwarded body carries the
    // inserted output cap, so it is longer than the client's).
    let received = mock
        .requests()
        .iter()
        .map(|r| r.body.len())
        .max()
        .unwrap_or(0);
    let prompt_bound = body.len().max(received) as i64 * PROMPT_NANOS;
    let reservation_bound = prompt_bound + 1000 * COMPLETION_NANOS;
    for (key, n) in [(&hard, 3), (&open, 2)] {
        let t = wait_for(Duration::from_secs(20), "orphans charged", || {
            let t = gw.model_traces(&key.id);
            (t.len() >= n).then_some(t)
        });
        assert_eq!(t.len(), n, "one trace per orphan: {t:?}");
        for trace in &t {
            assert_eq!(trace.error_code.as_deref(), Some("orphaned"), "{trace:?}");
            assert_charged_estimate(trace, "orphan");
            assert!(
                trace.cost_nanos <= reservation_bound,
                "charged above the reservation bound {reservation_bound}: {trace:?}"
            );
        }
        let sum: i64 = t.iter().map(|t| t.cost_nanos).sum();
        let usage = gw.usage(key);
        assert_eq!(usage["spend_nanodollars"], sum, "month spend = the orphans");
        assert!(sum > 0);
    }
}

/// After a crash or a reboot the dead gateway's pid may name another process (a container's
/// gateway is pid 1 at every start; on a host, pid 2 is `kthreadd`). Its open admissions
/// must still be charged at the next start, not taken for a live predecessor's and left
/// free: the journal's owner says which process, not only which pid.
#[test]
fn a_crashed_gateways_pid_taken_by_another_process_does_not_make_its_requests_free() {
    let mock = mock();
    let mut gw = gateway(&mock).start();
    let key = gw.create_key(&["--budget", "10", "--budget-mode", "hard"]);
    let body = user_body("gpt-4o-mini", json!({}));
    mock.clear();
    let (addr, bearer) = (gw.addr, key.bearer());
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (body, bearer) = (body.clone(), bearer.clone());
            std::thread::spawn(move || {
                let _ = send_chat(addr, &bearer, &body, &[("x-mock-delay-ms", "10000")]);
            })
        })
        .collect();
    wait_for(Duration::from_secs(10), "3 admissions journaled", || {
        (gw.query_i64("SELECT COUNT(*) FROM inflight", []) == 3).then_some(())
    });
    gw.kill9();
    for t in threads {
        t.join().unwrap();
    }
    // The dead gateway's pid now names another process: its rows keep what identified the
    // writer (whatever the owner holds above the pid) and get the live process's pid.
    let mut other = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let conn = rusqlite::Connection::open(&gw.db).unwrap();
    let pid_bits = (1i64 << 22) - 1;
    conn.execute(
        "UPDATE inflight SET owner = (owner & ~?1) | ?2",
        rusqlite::params![pid_bits, i64::from(other.id())],
    )
    .unwrap();
    drop(conn);
    gw.spawn();
    let t = wait_for(Duration::from_secs(20), "orphans charged", || {
        let t = gw.model_traces(&key.id);
        (t.len() >= 3).then_some(t)
    });
    let _ = other.kill();
    let _ = other.wait();
    assert_eq!(t.len(), 3, "one trace per orphan: {t:?}");
    for trace in &t {
        assert_eq!(trace.error_code.as_deref(), Some("orphaned"), "{trace:?}");
        assert_charged_estimate(trace, "orphan");
    }
    let sum: i64 = t.iter().map(|t| t.cost_nanos).sum();
    assert_eq!(
        gw.usage(&key)["spend_nanodollars"],
        sum,
        "month spend = the orphans"
    );
    assert_eq!(gw.query_i64("SELECT COUNT(*) FROM inflight", []), 0);
}

// ---------------------------------------------------------------------------------------------
// 8. A flood of bad tokens.
// ---------------------------------------------------------------------------------------------

/// SPEC §4: every request leaves a trace, a bad token's too. A burst of them from an address
/// within its failed-authentication limit is traced one each; only a flood's refusals are
/// sampled.
#[test]
fn bad_tokens_below_the_flood_limit_each_leave_a_trace() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let before = gw.query_i64("SELECT COUNT(*) FROM traces WHERE key_id IS NULL", []);
    let body = user_body("gpt-4o-mini", json!({}));
    for i in 0..40 {
        let bearer = format!("Bearer spideriq_pat_{:032x}", 0xbad0_0000_u64 + i);
        let r = send_chat(gw.addr, &bearer, &body, &[]).unwrap();
        assert_eq!((r.status, r.code().as_str()), (401, "invalid_api_key"));
    }
    // A valid key's request after them: the ledger has written theirs by the time it has this.
    let key = gw.create_key(&[]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    wait_for(Duration::from_secs(20), "the ledger to catch up", || {
        (!gw.model_traces(&key.id).is_empty()).then_some(())
    });
    let after = gw.query_i64("SELECT COUNT(*) FROM traces WHERE key_id IS NULL", []);
    assert_eq!(after - before, 40, "one trace per bad token");
}

#[test]
fn ten_thousand_bad_tokens_from_one_address_are_shed_and_valid_keys_still_work() {
    let mock = mock();
    mock.set_recording(false);
    let gw = Arc::new(
        gateway(&mock)
            .server("auth_failures_per_minute: 60")
            .admin("hostile-admin-token")
            .start(),
    );
    let valid = Arc::new(gw.create_key(&[]));
    const TOTAL: usize = 10_000;
    const THREADS: usize = 4;
    let sent = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let flooders: Vec<_> = (0..THREADS)
        .map(|t| {
            let (gw, sent) = (gw.clone(), sent.clone());
            std::thread::spawn(move || {
                let mut counts = (0usize, 0usize, Vec::<String>::new());
                for i in (t..TOTAL).step_by(THREADS) {
                    let bearer = format!("Bearer spideriq_pat_{i:032x}");
                    let r = http(
                        gw.addr,
                        "POST",
                        "/v1/chat/completions",
                        &[("Authorization", &bearer)],
                        br#"{"model":"gpt-4o-mini","messages":[]}"#,
                    );
                    sent.fetch_add(1, Ordering::Relaxed);
                    match r {
                        Ok(r) if r.status == 401 && code_of(&r) == "invalid_api_key" => {
                            counts.0 += 1
                        }
                        Ok(r) if r.status == 429 && code_of(&r) == "rate_limit_exceeded" => {
                            let retry = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
                            let tagged =
                                r.header("x-spidergate-error-code") == Some("rate_limit_exceeded");
                            if (retry.unwrap_or(0) < 1 || !tagged) && counts.2.len() < 5 {
                                counts.2.push(format!(
                                    "429 without Retry-After or X-SpiderGate-Error-Code: {:?}",
                                    r.headers
                                ));
                            }
                            counts.1 += 1
                        }
                        Ok(r) if counts.2.len() < 5 => {
                            counts.2.push(format!("{} {}", r.status, r.text()))
                        }
                        Err(e) if counts.2.len() < 5 => counts.2.push(format!("transport: {e}")),
                        _ => {}
                    }
                }
                counts
            })
        })
        .collect();
    // A valid key from the same address, in the middle of the flood; and a key the CLI
    // makes then, used at once (before the gateway's poll could have seen it): the address
    // is past its limit, and still neither is refused by it (SPEC §2).
    let middle = {
        let (gw, valid, sent) = (gw.clone(), valid.clone(), sent.clone());
        std::thread::spawn(move || {
            wait_for(
                Duration::from_secs(120),
                "the flood to be under way",
                || (sent.load(Ordering::Relaxed) >= TOTAL / 3).then_some(()),
            );
            let known = gw.chat(&valid, "gpt-4o-mini");
            let v = gw.cli_json(&["keys", "create", "--name", "mid-flood", "--json"]);
            let new = Key {
                id: v["id"].as_str().unwrap().to_string(),
                secret: v["secret"].as_str().unwrap().to_string(),
            };
            let first = gw.chat(&new, "gpt-4o-mini");
            ((known.status, known.text()), (first.status, first.text()))
        })
    };
    let (mut n401, mut n429, mut odd) = (0, 0, Vec::new());
    for f in flooders {
        let (a, b, c) = f.join().unwrap();
        n401 += a;
        n429 += b;
        odd.extend(c);
    }
    let flood_secs = started.elapsed().as_secs();
    let minutes = flood_secs / 60 + 1;
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
    assert_eq!(n401 + n429, TOTAL);
    assert!(
        n401 >= 1 && n401 as u64 <= 60 * (minutes + 1),
        "{n401} bad tokens got 401 in {minutes} minute(s) at 60 per minute; {n429} got 429"
    );
    let (known, new) = middle.join().unwrap();
    assert_eq!(known.0, 200, "valid key during the flood: {}", known.1);
    assert_eq!(
        new.0, 200,
        "a key made during the flood, its first request: {}",
        new.1
    );
    let after = gw.chat(&valid, "gpt-4o-mini");
    assert_eq!(after.status, 200, "valid key right after: {}", after.text());

    // The valid key's traces were written after the flood's: the flood's are all in.
    wait_for(Duration::from_secs(20), "the ledger to catch up", || {
        (gw.model_traces(&valid.id).len() >= 2).then_some(())
    });
    let anonymous = gw.query_i64("SELECT COUNT(*) FROM traces WHERE key_id IS NULL", []);
    // The address's first `auth_failures_per_minute` 401s, then its 429s sampled at about
    // 10 per second: generous slack, still far below one per bad token.
    let bound = 500 + 20 * flood_secs as i64;
    assert!(
        anonymous < bound.min(TOTAL as i64 / 5),
        "{anonymous} anonymous traces for {TOTAL} bad tokens in {flood_secs} s: the flood grows the database"
    );
    let failures = wait_for(Duration::from_secs(10), "auth failures in /metrics", || {
        let text = gw.admin_call("GET", "/metrics", None).text();
        let n: f64 = text
            .lines()
            .filter(|l| l.starts_with("spidergate_auth_failures_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (n >= TOTAL as f64).then_some(n)
    });
    assert!(failures >= TOTAL as f64);
}

// ---------------------------------------------------------------------------------------------
// 9. Concurrency limit, header hygiene, error codes, an unwritable ledger, key fields.
// ---------------------------------------------------------------------------------------------

/// Starts a request held `delay_ms` at the upstream; returns its thread.
fn slow_request(
    gw: &Arc<Gateway>,
    key: &Arc<Key>,
    delay_ms: u64,
) -> std::thread::JoinHandle<Result<u16, String>> {
    let (gw, key) = (gw.clone(), key.clone());
    std::thread::spawn(move || {
        send_chat(
            gw.addr,
            &key.bearer(),
            &user_body("gpt-4o-mini", json!({})),
            &[("x-mock-delay-ms", &delay_ms.to_string())],
        )
        .map(|r| r.status)
    })
}

/// Two requests in flight take both slots; a third is refused; both finish with 200.
fn assert_exactly_two_slots(gw: &Arc<Gateway>, mock: &MockProvider, key: &Arc<Key>) {
    mock.clear();
    let held = [slow_request(gw, key, 1500), slow_request(gw, key, 1500)];
    wait_for(Duration::from_secs(10), "two requests in flight", || {
        (mock.requests().len() == 2).then_some(())
    });
    let r = gw.chat(key, "gpt-4o-mini");
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (429, "concurrency_limit_exceeded"),
        "{}",
        r.text()
    );
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_error_code_header(&r, "concurrency 429");
    for h in held {
        assert_eq!(h.join().unwrap(), Ok(200));
    }
}

#[test]
fn max_inflight_refuses_one_over_and_releases_slots_on_every_outcome() {
    let mock = mock();
    let gw = Arc::new(gateway(&mock).admin("hostile-admin-token").start());
    let key = Arc::new(gw.create_key(&["--max-inflight", "2"]));
    assert_exactly_two_slots(&gw, &mock, &key);
    assert_eq!(gw.usage(&key)["max_inflight"], 2);

    // Errors release their slot...
    for _ in 0..3 {
        let r = gw.chat_with(&key, "gpt-4o-mini", &[("x-mock-status", "500")]);
        assert_eq!(r.status, 500);
    }
    assert_eq!(gw.chat(&key, "no-such-model").status, 404);
    // ...and so do clients that hang up, before the head and mid-stream. A request whose
    // client left before the head keeps its slot until its answer is read (the provider is
    // still working on it), then frees it.
    let client_closed = || {
        gw.model_traces(&key.id)
            .iter()
            .filter(|t| t.error_code.as_deref() == Some("client_closed"))
            .count()
    };
    for i in 0..2 {
        mock.clear();
        let s = send_request(
            gw.addr,
            "POST",
            "/v1/chat/completions",
            &[("Authorization", &key.bearer()), ("x-mock-delay-ms", "500")],
            user_body("gpt-4o-mini", json!({})).as_bytes(),
        )
        .unwrap();
        wait_for(Duration::from_secs(10), "upstream got it", || {
            (mock.requests().len() == 1).then_some(())
        });
        drop(s);
        wait_for(Duration::from_secs(10), "the abandoned answer read", || {
            (client_closed() > i).then_some(())
        });
    }
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": []});
    let (status, _, mut reader) = gw.open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "30"), ("x-mock-chunk-delay-ms", "100")],
    );
    assert_eq!(status, 200);
    read_first_event(&mut reader);
    drop(reader);
    wait_for(Duration::from_secs(20), "the hang-ups to finish", || {
        let closed = gw
            .model_traces(&key.id)
            .iter()
            .filter(|t| t.error_code.as_deref() == Some("client_closed"))
            .count();
        (closed >= 3).then_some(())
    });
    // Nothing leaked: exactly two slots again.
    assert_exactly_two_slots(&gw, &mock, &key);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);

    // The admin API reads and writes the field.
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "one-at-a-time", "max_inflight": 1})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_string();
    let got = gw
        .admin_call("GET", &format!("/admin/keys/{id}"), None)
        .json();
    assert_eq!(got["max_inflight"], 1);
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(&json!({"max_inflight": 3})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = gw
        .admin_call("GET", &format!("/admin/keys/{id}"), None)
        .json();
    assert_eq!(got["max_inflight"], 3);
    let shown = gw.cli_json(&["keys", "show", &id, "--json"]);
    assert_eq!(shown["max_inflight"], 3);
}

const LEAKED: [&str; 5] = [
    "openai-organization",
    "openai-project",
    "anthropic-organization-id",
    "set-cookie",
    "x-ratelimit-remaining-tokens",
];

fn assert_no_account_headers(headers: &[(String, String)], what: &str) {
    for h in LEAKED {
        assert!(
            !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(h)),
            "{what}: upstream header {h} reached the client: {headers:?}"
        );
    }
    let limits: Vec<&str> = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("x-ratelimit-limit-requests"))
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(
        limits,
        vec!["50"],
        "{what}: only the gateway's X-RateLimit-Limit-Requests (the key's rpm)"
    );
}

#[test]
fn upstream_account_headers_never_reach_the_agent() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&["--rpm", "50"]);
    let leak = [("x-mock-leak-headers", "1")];
    let r = gw.chat_with(&key, "gpt-4o-mini", &leak);
    assert_eq!(r.status, 200);
    assert_no_account_headers(&r.headers, "plain");

    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string();
    let r = send_chat(gw.addr, &key.bearer(), &body, &leak).unwrap();
    assert_eq!(r.status, 200);
    assert!(r.text().contains("[DONE]"));
    assert_no_account_headers(&r.headers, "stream");

    let r = gw.chat_with(
        &key,
        "gpt-4o-mini",
        &[("x-mock-leak-headers", "1"), ("x-mock-status", "500")],
    );
    assert_eq!(r.status, 500, "passed through");
    assert_no_account_headers(&r.headers, "upstream error");
}

/// Every value the response carries under `name`.
fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The gateway's own headers go out once each, with the gateway's values, whatever the
/// upstream's head holds: an HTTP/1 client gets them as lines written after the head's own
/// (the vendored core's `set_response_head_extra`), which must never repeat a name the
/// upstream sent (its rate limits, its `x-spidergate-*` when it is a SpiderGate itself, its
/// `traceparent`).
#[test]
fn the_gateways_own_headers_go_out_once_with_its_values_whatever_the_upstream_sends() {
    let mock = mock();
    let gw = gateway(&mock)
        .top("telemetry:\n  otlp_endpoint: \"http://127.0.0.1:9\"")
        .start();
    let key = gw.create_key(&["--rpm", "50"]);
    let agent_tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let stream = json!({"model": "gpt-4o-mini", "stream": true, "messages": []}).to_string();
    let mut remaining = Vec::new();
    for upstream in [
        &[][..],
        &[("x-mock-leak-headers", "1")][..],
        &[("x-mock-gateway-headers", "1")][..],
        &[
            ("x-mock-gateway-headers", "1"),
            ("x-mock-leak-headers", "1"),
        ][..],
    ] {
        for status in [None, Some("500"), Some("429")] {
            for streamed in [false, true] {
                let what = format!("upstream {upstream:?}, status {status:?}, stream {streamed}");
                let mut extra = vec![("traceparent", agent_tp)];
                extra.extend_from_slice(upstream);
                if let Some(s) = status {
                    extra.push(("x-mock-status", s));
                }
                let r = if streamed {
                    send_chat(gw.addr, &key.bearer(), &stream, &extra).unwrap()
                } else {
                    gw.chat_with(&key, "gpt-4o-mini", &extra)
                };
                let h = &r.headers;
                assert_eq!(r.status.to_string(), status.unwrap_or("200"), "{what}");
                assert_eq!(values(h, "x-ratelimit-limit-requests"), ["50"], "{what}");
                let left = values(h, "x-ratelimit-remaining-requests");
                assert_eq!(left.len(), 1, "{what}: {h:?}");
                remaining.push(left[0].parse::<u32>().unwrap());
                assert_eq!(values(h, "x-ratelimit-reset").len(), 1, "{what}: {h:?}");
                assert_eq!(values(h, "x-spidergate-model"), ["gpt-4o-mini"], "{what}");
                let tp = values(h, "traceparent");
                assert_eq!(tp.len(), 1, "{what}: {h:?}");
                assert!(
                    tp[0].starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
                    "{what}: the agent's trace, not the upstream's: {tp:?}"
                );
                let code = values(h, "x-spidergate-error-code");
                match status {
                    // Only the gateway says a call failed: an upstream's own code is dropped.
                    None => assert!(code.is_empty(), "{what}: {code:?}"),
                    Some(_) => assert_eq!(code, ["upstream_status"], "{what}"),
                }
                if status == Some("429") {
                    assert_eq!(values(h, "retry-after").len(), 1, "{what}: {h:?}");
                }
                assert_no_account_headers(h, &what);
            }
        }
    }
    // Each answer told the key's own count, one request fewer each time.
    let expected: Vec<u32> = (0..remaining.len() as u32).map(|i| 49 - i).collect();
    assert_eq!(remaining, expected);
}

/// An interim `103 Early Hints` head passes through undecorated, and the final head gets
/// the gateway's headers once: lines set for the 103 would otherwise wait for the final
/// head and go out beside its own (twice, when that head takes the map path because the
/// upstream named one of the gateway's headers).
#[test]
fn an_early_hints_head_passes_undecorated_and_the_final_head_is_decorated_once() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&["--rpm", "50"]);
    let body = user_body("gpt-4o-mini", json!({}));
    let bearer = key.bearer();
    for upstream in [
        &[][..],
        &[("x-mock-gateway-headers", "1")][..],
        &[
            ("x-mock-gateway-headers", "1"),
            ("x-mock-leak-headers", "1"),
        ][..],
    ] {
        let mut extra = vec![
            ("x-mock-early-hints", "1"),
            ("content-type", "application/json"),
        ];
        extra.extend_from_slice(upstream);
        extra.push(("authorization", &bearer));
        let stream = send_request(
            gw.addr,
            "POST",
            "/v1/chat/completions",
            &extra,
            body.as_bytes(),
        )
        .unwrap();
        let mut r = std::io::BufReader::new(stream);
        let (first, interim) = read_head(&mut r).unwrap();
        assert_eq!(first, 103, "the early hints reach the client first");
        assert!(
            values(&interim, "link").len() == 1
                && values(&interim, "x-ratelimit-limit-requests").is_empty()
                && values(&interim, "x-spidergate-model").is_empty(),
            "{interim:?}"
        );
        // Nor the upstream's account headers or its own use of the gateway's names.
        for name in LEAKED.iter().chain(&[
            "x-ratelimit-limit-requests",
            "x-spidergate-error-code",
            "x-spidergate-model",
        ]) {
            assert!(values(&interim, name).is_empty(), "{name}: {interim:?}");
        }
        let (status, h) = read_head(&mut r).unwrap();
        assert_eq!(status, 200, "{upstream:?}");
        assert_eq!(values(&h, "x-ratelimit-limit-requests"), ["50"], "{h:?}");
        assert_eq!(
            values(&h, "x-ratelimit-remaining-requests").len(),
            1,
            "{h:?}"
        );
        assert_eq!(values(&h, "x-ratelimit-reset").len(), 1, "{h:?}");
        assert_eq!(values(&h, "x-spidergate-model"), ["gpt-4o-mini"], "{h:?}");
        let answer = read_body(&mut r, &h).unwrap();
        assert!(String::from_utf8_lossy(&answer).contains("chat.completion"));
    }
}

#[test]
fn every_error_response_carries_its_code_in_a_header() {
    let mock = mock();
    let gw = gateway(&mock)
        .top("max_body_bytes: 2048")
        .server("read_timeout_ms: 500")
        .start();
    let plain = gw.create_key(&[]);
    let body = user_body("gpt-4o-mini", json!({}));
    let mut cases: Vec<(&str, Response)> = vec![
        (
            "no token",
            gw.post("/v1/chat/completions", "", body.as_bytes(), &[]),
        ),
        (
            "unknown token",
            gw.post(
                "/v1/chat/completions",
                "Bearer spideriq_pat_0123456789abcdef0123456789abcdef",
                body.as_bytes(),
                &[],
            ),
        ),
        (
            "not JSON",
            gw.post("/v1/chat/completions", &plain.bearer(), b"{", &[]),
        ),
        (
            "too large",
            gw.post(
                "/v1/chat/completions",
                &plain.bearer(),
                &vec![b' '; 4096],
                &[],
            ),
        ),
        ("unknown model", gw.chat(&plain, "gpt-9")),
        ("upstream unreachable", gw.chat(&plain, "dead-model")),
        (
            "upstream timeout",
            gw.chat_with(&plain, "gpt-4o-mini", &[("x-mock-delay-ms", "2000")]),
        ),
        (
            "wrong method",
            gw.get("/v1/chat/completions", &plain.bearer()),
        ),
        ("unknown path", gw.get("/v1/nope", &plain.bearer())),
    ];
    let scoped = gw.create_key(&["--scopes", "gate:models,gate:usage"]);
    cases.push(("insufficient scope", gw.chat(&scoped, "gpt-4o-mini")));
    let allow = gw.create_key(&["--models", "also-paid"]);
    cases.push(("model not allowed", gw.chat(&allow, "gpt-4o-mini")));
    let broke = gw.create_key(&["--budget", "0.000001", "--budget-mode", "hard"]);
    cases.push(("budget", gw.chat(&broke, "gpt-4o-mini")));
    let rpm = gw.create_key(&["--rpm", "1"]);
    let limited = (0..3)
        .map(|_| gw.chat(&rpm, "gpt-4o-mini"))
        .find(|r| r.status == 429)
        .expect("rpm 1 reached");
    cases.push(("rpm", limited));
    let rpd = gw.create_key(&["--rpd", "1"]);
    let limited = (0..3)
        .map(|_| gw.chat(&rpd, "gpt-4o-mini"))
        .find(|r| r.status == 429)
        .expect("rpd 1 reached");
    cases.push(("rpd", limited));
    let revoked = gw.create_key(&[]);
    gw.cli_json(&["keys", "revoke", &revoked.id, "--json"]);
    let r = wait_for(Duration::from_secs(5), "revocation live", || {
        let r = gw.chat(&revoked, "gpt-4o-mini");
        (r.status == 401).then_some(r)
    });
    cases.push(("revoked", r));
    for (what, r) in &cases {
        assert_error_code_header(r, what);
    }
    let expected = [
        ("no token", 401, "invalid_api_key"),
        ("not JSON", 400, "invalid_request"),
        ("too large", 413, "request_too_large"),
        ("unknown model", 404, "model_not_found"),
        ("upstream unreachable", 502, "upstream_error"),
        ("upstream timeout", 504, "upstream_timeout"),
        ("insufficient scope", 403, "insufficient_scope"),
        ("model not allowed", 403, "model_not_allowed"),
        ("budget", 402, "budget_exceeded"),
        ("revoked", 401, "token_revoked"),
    ];
    for (what, status, code) in expected {
        let r = &cases.iter().find(|c| c.0 == what).unwrap().1;
        assert_eq!((r.status, code_of(r).as_str()), (status, code), "{what}");
    }
    // An upstream's own error status, passed through, carries the header too.
    let r = gw.chat_with(&plain, "gpt-4o-mini", &[("x-mock-status", "503")]);
    assert_eq!(r.status, 503);
    assert!(
        r.header("x-spidergate-error-code")
            .is_some_and(|v| !v.is_empty()),
        "passed-through 503 without X-SpiderGate-Error-Code: {:?}",
        r.headers
    );
}

/// Over 10 s by design: the ledger's commits fail only once SQLite's busy timeout (10 s, the
/// production setting under test) has passed on the held write lock.
#[test]
fn a_ledger_that_cannot_write_stops_hard_keys_only_and_loses_nothing() {
    let mock = mock();
    mock.set_recording(false);
    let gw = gateway(&mock).start();
    let hard = gw.create_key(&["--budget", "1", "--budget-mode", "hard"]);
    let soft = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);
    let open = gw.create_key(&[]);
    // No budget of its own, but a hard group budget binds it as its own would (SPEC §7).
    let out = gw.cli(&[
        "groups",
        "create",
        "capped",
        "--budget",
        "5",
        "--budget-mode",
        "hard",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grouped = gw.create_key(&["--group", "capped"]);
    // Minted by a hard-budget key, with no budget of its own: the parent's binds it.
    let parent = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:keys",
        "--budget",
        "5",
        "--budget-mode",
        "hard",
    ]);
    let r = gw.post(
        "/v1/keys",
        &parent.bearer(),
        br#"{"name":"sub-agent"}"#,
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.json()["budget_usd"].is_null(), "{}", r.text());
    let child = Key {
        id: r.json()["id"].as_str().unwrap().into(),
        secret: r.json()["secret"].as_str().unwrap().into(),
    };
    let mut served = [0i64; 5]; // hard, soft, open, grouped, child
    for (i, key) in [&hard, &soft, &open, &grouped, &child]
        .into_iter()
        .enumerate()
    {
        assert_eq!(gw.chat(key, "gpt-4o-mini").status, 200);
        served[i] += 1;
    }
    let health = gw.get("/health", "");
    assert_eq!(health.status, 200);

    let lock = hold_write_lock(&gw.db);
    // Keep the ledger writing until its commits fail (busy timeout 10 s).
    let down = wait_for(
        Duration::from_secs(60),
        "/health to report the ledger",
        || {
            for (i, key) in [&soft, &open].into_iter().enumerate() {
                let r = gw.chat(key, "gpt-4o-mini");
                assert_eq!(r.status, 200, "soft/no-budget keys keep working");
                served[i + 1] += 1;
            }
            let h = gw.get("/health", "");
            if h.status == 503 {
                return Some(h);
            }
            std::thread::sleep(Duration::from_millis(300));
            None
        },
    );
    let ledger = down.json()["ledger"].clone();
    assert!(
        !ledger.is_null() && ledger != "ok",
        "/health 503 names the ledger: {}",
        down.text()
    );
    for key in [&hard, &grouped, &child] {
        let r = gw.chat(key, "gpt-4o-mini");
        assert_eq!(
            (r.status, code_of(&r).as_str()),
            (503, "ledger_unavailable"),
            "{}",
            r.text()
        );
        assert_error_code_header(&r, "ledger 503");
    }
    for (i, key) in [&soft, &open].into_iter().enumerate() {
        let r = gw.chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "served while the ledger is down");
        served[i + 1] += 1;
    }

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    wait_for(Duration::from_secs(30), "/health 200 again", || {
        (gw.get("/health", "").status == 200).then_some(())
    });
    wait_for(Duration::from_secs(10), "hard keys served again", || {
        (gw.chat(&hard, "gpt-4o-mini").status == 200).then_some(())
    });
    served[0] += 1;
    for (i, key) in [(3, &grouped), (4, &child)] {
        assert_eq!(gw.chat(key, "gpt-4o-mini").status, 200);
        served[i] += 1;
    }
    for (i, key) in [&hard, &soft, &open, &grouped, &child]
        .into_iter()
        .enumerate()
    {
        let booked = wait_for(Duration::from_secs(30), "every request booked", || {
            let n: i64 = gw.spend_rows(&key.id).iter().map(|r| r.1).sum();
            (n >= served[i]).then_some(n)
        });
        assert_eq!(booked, served[i], "key {i}: spend rows vs requests served");
    }
}

#[test]
fn scopes_are_stored_as_a_list() {
    let mock = mock();
    let gw = gateway(&mock).admin("hostile-admin-token").start();
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "comma", "scopes": ["x,gate:chat"]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let key = Key {
        id: r.json()["id"].as_str().unwrap().into(),
        secret: r.json()["secret"].as_str().unwrap().into(),
    };
    let got = gw
        .admin_call("GET", &format!("/admin/keys/{}", key.id), None)
        .json();
    assert_eq!(got["scopes"], json!(["x,gate:chat"]));
    let shown = gw.cli_json(&["keys", "show", &key.id, "--json"]);
    assert_eq!(shown["scopes"], json!(["x,gate:chat"]));
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (403, "insufficient_scope"),
        "\"x,gate:chat\" is one unknown scope, not gate:chat"
    );
}

#[test]
fn a_non_string_client_id_is_refused_and_changes_nothing() {
    let mock = mock();
    let gw = gateway(&mock).admin("hostile-admin-token").start();
    let count = |gw: &Gateway| {
        gw.admin_call("GET", "/admin/keys?all=true", None).json()["data"]
            .as_array()
            .unwrap()
            .len()
    };
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "numeric", "client_id": 5})),
    );
    assert_eq!(
        (r.status, code_of(&r).as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert_eq!(count(&gw), 0, "no key was made");
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "ws", "client_id": "ws-1"})),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["id"].as_str().unwrap().to_string();
    for bad in [
        json!(5),
        json!(["ws-2"]),
        json!({"id": "ws-2"}),
        json!(true),
    ] {
        let r = gw.admin_call(
            "PATCH",
            &format!("/admin/keys/{id}"),
            Some(&json!({"client_id": bad, "rpm": 7})),
        );
        assert_eq!(r.status, 400, "client_id {bad}: {}", r.text());
    }
    let got = gw
        .admin_call("GET", &format!("/admin/keys/{id}"), None)
        .json();
    assert_eq!(got["client_id"], "ws-1");
    assert!(got["rpm"].is_null(), "a refused PATCH changes nothing");
}

#[test]
fn concurrent_cli_and_admin_patches_of_different_fields_are_never_lost() {
    let mock = mock();
    let gw = Arc::new(gateway(&mock).admin("hostile-admin-token").start());
    let key = gw.create_key(&["--rpm", "1", "--rpd", "1"]);
    // The CLI raises rpm step by step while the admin API raises rpd step by step. Each field
    // only ever grows, unless a patch of the other field wrote back a stale copy of it.
    const CLI_STEPS: u32 = 20;
    const ADMIN_STEPS: u32 = 40;
    let done = Arc::new(AtomicUsize::new(0));
    let cli = {
        let (gw, id, done) = (gw.clone(), key.id.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 1..=CLI_STEPS {
                let out = gw.cli(&["keys", "update", &id, "--rpm", &(100 + i).to_string()]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            done.fetch_add(1, Ordering::SeqCst);
        })
    };
    let admin = {
        let (gw, id, done) = (gw.clone(), key.id.clone(), done.clone());
        std::thread::spawn(move || {
            for i in 1..=ADMIN_STEPS {
                let r = gw.admin_call(
                    "PATCH",
                    &format!("/admin/keys/{id}"),
                    Some(&json!({ "rpd": 200 + i })),
                );
                assert_eq!(r.status, 200, "{}", r.text());
            }
            done.fetch_add(1, Ordering::SeqCst);
        })
    };
    // Watch the stored row while both doors write.
    let db = gw.db();
    let read = || -> (i64, i64) {
        db.query_row(
            "SELECT COALESCE(rpm, 0), COALESCE(rpd, 0) FROM keys WHERE id = ?1",
            [&key.id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("read key row")
    };
    let mut last = read();
    let mut went_back = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while done.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
        let now = read();
        if now.0 < last.0 || now.1 < last.1 {
            went_back.push((last, now));
        }
        last = now;
        std::thread::sleep(Duration::from_millis(1));
    }
    cli.join().unwrap();
    admin.join().unwrap();
    assert!(
        went_back.is_empty(),
        "(rpm, rpd) went back: a patch of one field rewrote the other from a stale read: {went_back:?}"
    );
    let got = gw
        .admin_call("GET", &format!("/admin/keys/{}", key.id), None)
        .json();
    assert_eq!(
        (got["rpm"].clone(), got["rpd"].clone()),
        (json!(100 + CLI_STEPS), json!(200 + ADMIN_STEPS)),
        "both doors' last values are present"
    );
}

// ---------------------------------------------------------------------------------------------
// 10. Property: for random request shapes, billed <= cap on every hard-budget key.
// ---------------------------------------------------------------------------------------------

/// SplitMix64: a fixed seed gives the same requests on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A random request body within what the model allows: the mock (billing `max`) then
/// reports at most what the request allows, as a real provider would.
fn random_body(rng: &mut Rng) -> String {
    let (model, model_max) = if rng.chance(50) {
        ("tiny-out", 64)
    } else {
        ("gpt-4o-mini", 1000)
    };
    let mut parts = vec![json!({"type": "text", "text": "describe"})];
    for _ in 0..rng.range(0, 3) {
        parts.push(match rng.range(0, 2) {
            0 => json!({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
            1 => {
                json!({"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}})
            }
            _ => json!({"type": "file", "file": {"file_id": "file-1"}}),
        });
    }
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": parts}]});
    if rng.chance(60) {
        body["max_tokens"] = json!(rng.range(0, model_max));
    }
    if rng.chance(40) {
        body["max_completion_tokens"] = json!(rng.range(0, model_max));
    }
    if rng.chance(50) {
        body["n"] = json!(rng.range(1, 4));
    }
    if rng.chance(40) {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

#[test]
fn property_random_request_shapes_never_bill_past_a_hard_cap() {
    let mock = mock();
    mock.set_recording(false);
    let gw = Arc::new(gateway(&mock).server("media_part_tokens: 500").start());
    let caps = [
        ("0.0002", 200_000i64),
        ("0.0003", 300_000),
        ("0.0005", 500_000),
        ("0.0008", 800_000),
    ];
    let keys: Arc<Vec<Key>> = Arc::new(
        caps.iter()
            .map(|(usd, _)| gw.create_key(&["--budget", usd, "--budget-mode", "hard"]))
            .collect(),
    );
    let mut rng = Rng(0x5EED_0007);
    let requests: Vec<(usize, String, u64)> = (0..200)
        .map(|_| {
            let key = rng.range(0, caps.len() as u64 - 1) as usize;
            let body = random_body(&mut rng);
            (key, body, rng.range(0, 150))
        })
        .collect();
    let requests = Arc::new(requests);
    const WORKERS: usize = 8;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (gw, keys, requests) = (gw.clone(), keys.clone(), requests.clone());
            std::thread::spawn(move || {
                let mut seen = Vec::new();
                for (key, body, delay) in requests.iter().skip(w).step_by(WORKERS) {
                    let mut extra = WORST_CASE_BILLING.to_vec();
                    let delay = delay.to_string();
                    extra.push(("x-mock-delay-ms", &delay));
                    let r = send_chat(gw.addr, &keys[*key].bearer(), body, &extra);
                    seen.push((*key, body.clone(), r));
                }
                seen
            })
        })
        .collect();
    let mut billed_by_key = [0i64; 4];
    let (mut ok, mut refused) = (0, 0);
    for w in workers {
        for (key, body, r) in w.join().unwrap() {
            let r = r.unwrap_or_else(|e| panic!("{body}: {e}"));
            match r.status {
                200 => {
                    let (p, c) = response_usage(&r)
                        .unwrap_or_else(|| panic!("200 without usage for {body}: {}", r.text()));
                    billed_by_key[key] += cost(p, c);
                    ok += 1;
                }
                402 => {
                    assert_eq!(code_of(&r), "budget_exceeded", "{body}");
                    refused += 1;
                }
                // A file part needs a context window to bound it (issue 16).
                400 if body.contains("file_id") => {
                    assert_eq!(code_of(&r), "invalid_request", "{body}");
                }
                s => panic!("{body}: unexpected {s} {}", r.text()),
            }
        }
    }
    assert_eq!(
        billed_by_key.iter().sum::<i64>(),
        billed(&mock),
        "the responses carried everything the mock billed"
    );
    for (i, (usd, cap)) in caps.iter().enumerate() {
        assert!(
            billed_by_key[i] <= *cap,
            "key {i} (cap ${usd}): billed {} nanos > cap {cap}",
            billed_by_key[i]
        );
    }
    assert!(
        ok > 0 && refused > 0,
        "{ok} served, {refused} refused: both must happen"
    );
}

#[test]
fn a_client_that_hangs_up_mid_body_is_traced_as_client_closed_and_charged_nothing() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let body = user_body("gpt-4o-mini", json!({}));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    // Half of the body it announces, then gone.
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        key.bearer(),
        body.len() * 2
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    drop(s);
    let t = wait_for(Duration::from_secs(10), "the hang-up's trace", || {
        Some(gw.model_traces(&key.id)).filter(|t| !t.is_empty())
    });
    assert_eq!(t.len(), 1, "{t:?}");
    // The client's doing, not the upstream's: nothing reached it, nothing is charged.
    assert_eq!(
        (t[0].status, t[0].error_code.as_deref()),
        (499, Some("client_closed")),
        "{t:?}"
    );
    assert_eq!(t[0].cost_nanos, 0);
    assert!(mock.requests().is_empty());
}

/// An upstream error whose body is empty (`Content-Length: 0`) has ended at its head: it
/// is traced as the upstream's error (`upstream_status`), not as a client that hung up
/// (a black-box audit saw `client_closed` while the client waited for it).
#[test]
fn an_empty_upstream_error_is_traced_as_the_upstreams() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let r = gw.chat_with(
        &key,
        "gpt-4o-mini",
        &[("x-mock-status", "429"), ("x-mock-empty-error", "1")],
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.header("x-spidergate-error-code"), Some("upstream_status"));
    let t = wait_for(Duration::from_secs(10), "its trace", || {
        Some(gw.model_traces(&key.id)).filter(|t| !t.is_empty())
    });
    assert_eq!(
        (t.len(), t[0].status, t[0].error_code.as_deref()),
        (1, 429, Some("upstream_status")),
        "{t:?}"
    );
    // The upstream refused it: nothing is charged, as for an error with a body.
    assert_eq!(t[0].cost_nanos, 0, "{t:?}");
}

/// Broken chunked framing is the client's error, answered (400 `invalid_request`, traced
/// so), not a hang-up: a black-box audit saw the connection closed unanswered and the trace
/// say `client_closed` while the client waited.
#[test]
fn a_malformed_chunked_body_is_answered_400() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let body = user_body("gpt-4o-mini", json!({}));
    let mut s = std::net::TcpStream::connect(gw.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
         zz\r\n{body}\r\n0\r\n\r\n",
        key.bearer(),
    );
    s.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("x-spidergate-error-code: invalid_request"),
        "{answer}"
    );
    let t = wait_for(Duration::from_secs(10), "its trace", || {
        Some(gw.model_traces(&key.id)).filter(|t| !t.is_empty())
    });
    assert_eq!(
        (t.len(), t[0].status, t[0].error_code.as_deref()),
        (1, 400, Some("invalid_request")),
        "{t:?}"
    );
    assert!(mock.requests().is_empty());
}

/// SPEC §2: a body that is not JSON gets 400 `invalid_request`, and JSON is UTF-8: bytes
/// that are not (read as they are by the field scanner) are refused on every surface
/// before anything goes upstream.
#[test]
fn a_body_that_is_not_utf8_is_not_json_on_any_surface() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    let mut chat = br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":""#.to_vec();
    chat.extend_from_slice(b"\xff\xfe\"}]}");
    let mut responses = br#"{"model":"gpt-4o-mini","input":""#.to_vec();
    responses.extend_from_slice(b"\xc0\xaf\"}");
    for (path, body) in [
        ("/v1/chat/completions", &chat),
        ("/v1/responses", &responses),
    ] {
        let r = gw.post(path, &key.bearer(), body, &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{path}: {}",
            r.text()
        );
    }
    assert!(mock.requests().is_empty());
}

/// SPEC §2: money never overflows or wraps, and §4: it is kept in integers. An upstream
/// reporting usage whose cost saturates, twice on one key and model, leaves the spend at
/// the largest amount, still an integer the usage commands read.
#[test]
fn spend_saturates_in_the_store_and_stays_readable() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .admin("admin-token-saturation-0123")
        .start();
    let key = gw.create_key(&[]);
    // 2^53 output tokens at 0.60 USD a million: 5.4e18 nano-USD, twice past i64.
    for _ in 0..2 {
        let r = gw.chat_with(
            &key,
            "gpt-4o-mini",
            &[("x-mock-completion-tokens", "9007199254740992")],
        );
        assert_eq!(r.status, 200, "{}", r.text());
        // Each in a commit of its own: the second adds to the stored row.
        gw.wait_ledger_quiescent();
    }
    let out = gw.cli(&["usage", &key.id, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("usage json");
    assert!(!v.to_string().contains("e+"), "no float amount: {v}");
    assert_eq!(gw.usage(&key)["spend_nanodollars"], i64::MAX);
}
