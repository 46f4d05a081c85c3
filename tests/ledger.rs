//! Spend ledger, usage and traces (SPEC §4): exact accounting for plain, streamed and
//! embeddings responses, broken responses still charged, nothing lost on SIGTERM or SIGKILL.

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PROMPT_NANOS: u64 = 150;
const COMPLETION_NANOS: u64 = 600;

fn cost(prompt: u64, completion: u64) -> i64 {
    (prompt * PROMPT_NANOS + completion * COMPLETION_NANOS) as i64
}

const ADMIN: &str = "ledger-admin-token";

fn usage_headers(p: u64, c: u64) -> [(String, String); 2] {
    [
        ("x-mock-prompt-tokens".into(), p.to_string()),
        ("x-mock-completion-tokens".into(), c.to_string()),
    ]
}

fn chat(gw: &Gateway, key: &Key, body: &Value, extra: &[(String, String)]) -> Response {
    let extra: Vec<(&str, &str)> = extra
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        body.to_string().as_bytes(),
        &extra,
    )
}

/// The key's model-request traces (usage and catalog calls leave traces too; skip them).
fn traces(gw: &Gateway, key: &Key) -> Vec<Value> {
    // `/v1/usage` answers from memory and does not force a commit: wait until the ledger has
    // committed every finished request (its quiescence marker on /metrics).
    gw.wait_ledger_quiescent();
    let all = gw.cli_json(&["traces", "--key", &key.id, "--limit", "1000", "--json"]);
    all.as_array()
        .unwrap()
        .iter()
        .filter(|t| t["endpoint"] != "usage")
        .cloned()
        .collect()
}

#[test]
fn plain_responses_are_charged_exactly_what_the_upstream_reported() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]});
    let figures = [(1u64, 2u64), (1000, 0), (123_456, 7_890), (10, 5)];
    let mut expected = 0;
    for (p, c) in figures {
        let r = chat(&gw, &key, &body, &usage_headers(p, c));
        assert_eq!(r.status, 200);
        assert_eq!(r.json()["usage"]["prompt_tokens"], p);
        expected += cost(p, c);
    }
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], expected);
    let m = &usage["by_model"]["gpt-4o-mini"];
    assert_eq!(m["requests"], 4);
    assert_eq!(m["prompt_tokens"], figures.iter().map(|f| f.0).sum::<u64>());
    assert_eq!(
        m["completion_tokens"],
        figures.iter().map(|f| f.1).sum::<u64>()
    );
    assert_eq!(m["spend_nanodollars"], expected);
    for field in [
        "key_id",
        "month",
        "spend_usd",
        "by_model",
        "budget_usd",
        "budget_mode",
        "requests_this_minute",
        "requests_today",
        "rpm",
        "rpd",
        "budget_resets_at",
        "expires_at",
    ] {
        assert!(usage.get(field).is_some(), "usage lacks {field}");
    }
    assert_eq!(usage["key_id"], key.id.as_str());
    assert_eq!(usage["requests_today"], 4);
    assert_eq!(usage["requests_this_minute"], 4);
    assert!((usage["spend_usd"].as_f64().unwrap() - expected as f64 / 1e9).abs() < 1e-12);

    // The CLI reads the same ledger.
    let cli = gw.cli_json(&["usage", &key.id, "--json"]);
    assert_eq!(cli["spend_nanodollars"], expected);
    assert_eq!(cli["by_model"]["gpt-4o-mini"]["requests"], 4);
    // The CLI and the API agree on the minute too (the CLI counts it from the traces).
    assert_eq!(cli["requests_this_minute"], usage["requests_this_minute"]);
    assert_eq!(cli["requests_today"], usage["requests_today"]);
    let t = traces(&gw, &key);
    assert_eq!(t.len(), 4);
    assert_eq!(
        t.iter()
            .map(|t| t["cost_nanodollars"].as_i64().unwrap())
            .sum::<i64>(),
        expected
    );
    let first = &t[0];
    assert_eq!(first["endpoint"], "chat.completions");
    assert_eq!(first["requested_model"], "gpt-4o-mini");
    assert_eq!(first["served_model"], "gpt-4o-mini");
    assert_eq!(first["provider"], "mock");
    assert_eq!(first["status"], 200);
    assert_eq!(first["usage_estimated"], false);
    assert!(first["ttfb_ms"].is_number() && first["latency_ms"].is_number());
}

/// Reads a whole streamed response body (chunked) as text.
fn stream_text(gw: &Gateway, key: &Key, body: &Value, extra: &[(String, String)]) -> String {
    let r = chat(gw, key, body, extra);
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    r.text()
}

#[test]
fn streams_are_charged_with_and_without_the_client_asking_for_usage() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&[]);
    let plain = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "hi"}]});
    mock.clear();
    let text = stream_text(&gw, &key, &plain, &usage_headers(70, 30));
    // The gateway asked upstream for usage...
    assert_eq!(
        mock.requests()[0].json().unwrap()["stream_options"]["include_usage"],
        true
    );
    // ...and hid it from a client that did not ask; everything else arrives.
    assert!(!text.contains("\"usage\":{"), "usage chunk leaked: {text}");
    assert_eq!(text.matches("\"content\":\"tok \"").count(), 3);
    assert!(text.contains("\"finish_reason\":\"stop\""));
    assert!(text.trim_end().ends_with("data: [DONE]"));

    let asked = json!({"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_usage": true}, "messages": []});
    let text = stream_text(&gw, &key, &asked, &usage_headers(11, 22));
    assert_eq!(text.matches("\"usage\":{").count(), 1, "{text}");
    assert!(text.contains("\"prompt_tokens\":11"));

    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], cost(70, 30) + cost(11, 22));
    assert_eq!(usage["by_model"]["gpt-4o-mini"]["completion_tokens"], 52);
    assert!(traces(&gw, &key)
        .iter()
        .all(|t| t["usage_estimated"] == false));
}

#[test]
fn embeddings_are_charged_prompt_tokens() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(&models_with_embeddings())
        .admin(ADMIN)
        .start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "text-embedding-3-small", "input": ["a", "b"]}).to_string();
    for p in [7u64, 9] {
        let r = gw.post(
            "/v1/embeddings",
            &key.bearer(),
            body.as_bytes(),
            &[("x-mock-prompt-tokens", &p.to_string())],
        );
        assert_eq!(r.status, 200);
    }
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], cost(16, 0));
    let m = &usage["by_model"]["text-embedding-3-small"];
    assert_eq!(m["prompt_tokens"], 16);
    assert_eq!(m["completion_tokens"], 0);
    assert_eq!(traces(&gw, &key)[0]["endpoint"], "embeddings");
}

#[test]
fn a_client_that_hangs_up_mid_stream_leaves_one_trace_and_a_charge() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": [{"role": "user", "content": "tell me a long story"}]});
    let (status, _, mut reader) = gw.open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "40"), ("x-mock-chunk-delay-ms", "50")],
    );
    assert_eq!(status, 200);
    read_first_event(&mut reader);
    drop(reader); // hang up after the first chunk

    let t = wait_for(
        Duration::from_secs(10),
        "trace of the abandoned stream",
        || {
            let t = traces(&gw, &key);
            (!t.is_empty()).then_some(t)
        },
    );
    assert_eq!(t.len(), 1, "exactly one trace");
    assert_eq!(t[0]["error_code"], "client_closed");
    assert_eq!(t[0]["usage_estimated"], true);
    assert!(t[0]["cost_nanodollars"].as_i64().unwrap() > 0, "never zero");
    assert!(t[0]["completion_tokens"].as_u64().unwrap() >= 1);
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], t[0]["cost_nanodollars"]);
    assert_eq!(usage["by_model"]["gpt-4o-mini"]["requests"], 1);
    assert_eq!(usage["reserved_usd"], 0.0);
}

#[test]
fn an_upstream_that_breaks_mid_response_is_still_charged() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&[]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "messages": []});
    let stream = send_request(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &key.bearer()),
            ("x-mock-chunks", "5"),
            ("x-mock-break-after", "2"),
        ],
        body.to_string().as_bytes(),
    )
    .unwrap();
    let (status, _, mut reader) = read_stream_head(stream).unwrap();
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let _ = reader.read_to_end(&mut rest);
    let text = String::from_utf8_lossy(&rest);
    assert_eq!(text.matches("\"content\":\"tok \"").count(), 2, "{text}");

    let plain = json!({"model": "gpt-4o-mini", "messages": []});
    let _ = http(
        gw.addr,
        "POST",
        "/v1/chat/completions",
        &[
            ("Authorization", &key.bearer()),
            ("x-mock-break-after", "1"),
        ],
        plain.to_string().as_bytes(),
    );

    let t = wait_for(Duration::from_secs(10), "two traces", || {
        Some(traces(&gw, &key)).filter(|t| t.len() == 2)
    });
    for trace in &t {
        assert_eq!(trace["usage_estimated"], true, "{trace}");
        assert!(trace["cost_nanodollars"].as_i64().unwrap() > 0, "{trace}");
    }
    let broken_stream = t.iter().find(|t| t["status"] == 200).expect("stream trace");
    assert_eq!(broken_stream["error_code"], "upstream_stream_broken");
    // The prompt is estimated from what the provider received (a byte a token at most): the
    // forwarded body, longer than the client's by the inserted cap and `stream_options`.
    let mut by_id: Vec<&Value> = t.iter().collect();
    by_id.sort_by_key(|t| t["id"].as_i64());
    let received = mock.requests();
    assert_eq!(received.len(), 2);
    for (trace, (req, client)) in by_id.iter().zip(received.iter().zip([&body, &plain])) {
        let sent = req.body.len();
        assert!(sent > client.to_string().len(), "the gateway added fields");
        let prompt = trace["prompt_tokens"].as_u64().unwrap();
        assert!(
            prompt >= sent as u64,
            "prompt {prompt} < {sent} bytes forwarded: {trace}"
        );
    }
}

#[test]
fn rejected_requests_leave_traces_too() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&["--models", "gpt-4o"]);
    gw.chat(&key, "gpt-4o-mini");
    gw.chat(&key, "nope");
    gw.post(
        "/v1/chat/completions",
        "Bearer spideriq_pat_00000000000000000000000000000000",
        b"{}",
        &[],
    );
    // Each refusal's trace, paired as one row gives them (error code, model asked for).
    // Sorted: SPEC §4 fixes no order between two requests, and a client's next request
    // (here on a new connection) can be traced before the one it already had an answer to.
    let t = traces(&gw, &key);
    let mut refusals: Vec<(&str, &str)> = t
        .iter()
        .map(|t| {
            (
                t["error_code"].as_str().unwrap_or(""),
                t["requested_model"].as_str().unwrap_or("(none)"),
            )
        })
        .collect();
    refusals.sort_unstable();
    // Refused after the body was read: the trace still names the model asked for (SPEC §4).
    assert_eq!(
        refusals,
        vec![
            ("model_not_allowed", "gpt-4o-mini"),
            ("model_not_found", "nope")
        ]
    );
    assert!(t.iter().all(|t| t["cost_nanodollars"] == 0));
    assert!(t.iter().all(|t| t["served_model"].is_null()), "{t:?}");
    let all = gw.cli_json(&["traces", "--limit", "100", "--json"]);
    let anonymous = all
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["key_id"].is_null())
        .expect("401 trace");
    assert_eq!(anonymous["status"], 401);
    assert_eq!(anonymous["error_code"], "invalid_api_key");
    assert_eq!(
        gw.cli_json(&["traces", "--limit", "1", "--json"])
            .as_array()
            .unwrap()
            .len(),
        1
    );
    // A model read names the id asked for too, found or not.
    let reader = gw.create_key(&[]);
    assert_eq!(gw.get("/v1/models/gpt-4o", &reader.bearer()).status, 200);
    assert_eq!(gw.get("/v1/models/nope", &reader.bearer()).status, 404);
    let mut reads: Vec<(String, String)> = traces(&gw, &reader)
        .iter()
        .map(|t| {
            (
                t["requested_model"].to_string(),
                t["error_code"].to_string(),
            )
        })
        .collect();
    reads.sort_unstable();
    assert_eq!(
        reads,
        vec![
            (json!("gpt-4o").to_string(), Value::Null.to_string()),
            (
                json!("nope").to_string(),
                json!("model_not_found").to_string()
            )
        ]
    );
    // An unknown key is an error, as the admin API's 404 is.
    let out = gw.cli(&["traces", "--key", "key_nope", "--json"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no key with id"),
        "{out:?}"
    );
    // Rejections cost nothing and count nothing.
    let usage = gw.usage(&key);
    assert_eq!(
        (
            usage["spend_nanodollars"].as_i64(),
            usage["requests_today"].as_u64()
        ),
        (Some(0), Some(0))
    );
}

/// Fires `n` concurrent requests with a slow upstream; returns the join handles.
fn burst(
    addr: std::net::SocketAddr,
    key: &Arc<Key>,
    n: usize,
    delay_ms: u64,
) -> Vec<std::thread::JoinHandle<u16>> {
    (0..n)
        .map(|i| {
            let key = key.clone();
            std::thread::spawn(move || {
                let body = json!({"model": "gpt-4o-mini", "stream": i % 2 == 0, "messages": []})
                    .to_string();
                let p = (i as u64 + 1) * 3;
                let headers = [
                    ("Authorization", key.bearer()),
                    ("x-mock-prompt-tokens", p.to_string()),
                    ("x-mock-completion-tokens", "7".into()),
                    ("x-mock-delay-ms", delay_ms.to_string()),
                ];
                let headers: Vec<(&str, &str)> =
                    headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
                http(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &headers,
                    body.as_bytes(),
                )
                .map_or(0, |r| r.status)
            })
        })
        .collect()
}

fn served_cost(mock: &MockProvider) -> i64 {
    let (p, c) = mock.served_usage();
    cost(p, c)
}

#[test]
fn sigterm_flushes_everything_before_exit() {
    let mock = mock();
    let mut gw = GatewayBuilder::new(&mock)
        .admin(ADMIN)
        .server("flush_interval_ms: 1000")
        .start();
    let key = Arc::new(gw.create_key(&[]));
    mock.clear();
    let handles = burst(gw.addr, &key, 20, 300);
    // In flight: the mock holds each request 300 ms before answering.
    wait_for(Duration::from_secs(10), "the burst at the provider", || {
        (!mock.requests().is_empty()).then_some(())
    });
    gw.signal_term();
    // Draining once /health says so (it is refused 503 like every new request).
    wait_for(Duration::from_secs(10), "draining", || {
        (gw.get("/health", "").status == 503).then_some(())
    });
    // While draining, new requests are refused (and cost nothing).
    let late = gw.chat(&key, "gpt-4o-mini");
    assert_eq!((late.status, late.code().as_str()), (503, "shutting_down"));
    let status = gw.terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|s| *s == 200)
        .count();
    assert!(ok > 0);
    gw.spawn();
    let usage = gw.usage(&key);
    assert_eq!(
        usage["spend_nanodollars"],
        served_cost(&mock),
        "spend equals what the mock served"
    );
    assert_eq!(usage["requests_today"].as_u64(), Some(ok as u64));
    assert_eq!(gw.store().integrity_check().unwrap(), "ok");
    // The refusal while draining left its trace under the key (SPEC §4), charged nothing.
    let refused: Vec<Value> = traces(&gw, &key)
        .into_iter()
        .filter(|t| t["error_code"] == "shutting_down")
        .collect();
    // (The late request, and any of the burst that arrived after the drain began.)
    assert!(!refused.is_empty());
    for t in &refused {
        assert_eq!(
            (&t["status"], &t["cost_nanodollars"]),
            (&json!(503), &json!(0))
        );
    }
}

#[test]
fn sigkill_after_one_flush_interval_loses_nothing_and_corrupts_nothing() {
    let mock = mock();
    let mut gw = GatewayBuilder::new(&mock)
        .admin(ADMIN)
        .server("flush_interval_ms: 200")
        .start();
    let key = Arc::new(gw.create_key(&[]));
    mock.clear();
    let handles = burst(gw.addr, &key, 20, 0);
    let ok = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|s| *s == 200)
        .count();
    assert_eq!(ok, 20);
    // The writer's own flush (every 200 ms here) has committed all 20, then no chance to
    // flush again.
    gw.wait_ledger_quiescent();
    gw.kill9();
    assert_eq!(gw.store().integrity_check().unwrap(), "ok");
    gw.spawn();
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], served_cost(&mock));
    assert_eq!(usage["requests_today"], 20);
    assert_eq!(traces(&gw, &key).len(), 20);
}
