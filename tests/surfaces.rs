//! No way past a hard cap on any surface (SPEC §2, §4; issue 16): input the body does not
//! show (stored context, server-side tools, files, the tool-use system prompt, pricing betas),
//! the output cap written upstream on every route and translation, and streams cut before
//! their final usage event.
//!
//! "Billed" is what the mock provider reported as usage (`MockProvider::served_usage`). With
//! `x-mock-prompt-tokens: bytes` the mock bills the body's bytes plus what the real APIs add
//! beyond it (see the mock's `billing` module), independently of the gateway's own bound.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// OpenAI-kind models at 0.15 / 0.60 USD per Mtok (150 / 600 nanos per token), and an
/// Anthropic one at 3 / 15 (3,000 / 15,000 nanos per token).
const MODELS: &str = r#"
models:
  - id: resp-bounded
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
    context_window_tokens: 60000
  - id: resp-open
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: claude
    provider: mock-anthropic
    upstream_id: claude-sonnet-4-5
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    max_output_tokens: 64
"#;

const OPENAI_NANOS: (i64, i64) = (150, 600);
const CLAUDE_NANOS: (i64, i64) = (3_000, 15_000);

fn billed(mock: &MockProvider, (input, output): (i64, i64)) -> i64 {
    let (p, c) = mock.served_usage();
    p as i64 * input + c as i64 * output
}

fn gateway(mock: &MockProvider) -> GatewayBuilder {
    GatewayBuilder::new(mock).models(MODELS)
}

fn post(
    addr: SocketAddr,
    path: &str,
    bearer: &str,
    body: &Value,
    extra: &[(&str, &str)],
) -> Response {
    let mut headers = vec![
        ("Authorization", bearer),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    http(addr, "POST", path, &headers, body.to_string().as_bytes()).expect("transport")
}

/// `n` copies of one request at once; returns every (status, code).
fn concurrently(
    addr: SocketAddr,
    n: usize,
    path: &'static str,
    bearer: String,
    body: Value,
    extra: &'static [(&'static str, &'static str)],
) -> Vec<(u16, String)> {
    let body = Arc::new(body);
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let (bearer, body) = (bearer.clone(), body.clone());
            std::thread::spawn(move || {
                let r = post(addr, path, &bearer, &body, extra);
                (
                    r.status,
                    r.header("x-spidergate-error-code")
                        .unwrap_or("")
                        .to_string(),
                )
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn wait_traces(gw: &Gateway, key: &Key, n: usize) -> Vec<TraceRec> {
    wait_for(Duration::from_secs(20), "traces", || {
        let t: Vec<TraceRec> = gw
            .trace_rows(&key.id)
            .into_iter()
            .filter(|t| t.served_model.is_some())
            .collect();
        (t.len() >= n).then_some(t)
    })
}

// ---------------------------------------------------------------------------------------------
// Input the body does not show.
// ---------------------------------------------------------------------------------------------

const STORED: &[(&str, &str)] = &[
    ("x-mock-prompt-tokens", "bytes"),
    ("x-mock-completion-tokens", "max"),
    ("x-mock-stored-tokens", "50000"),
    ("x-mock-context-window", "60000"),
    ("x-mock-delay-ms", "1500"),
];

#[test]
fn stored_context_is_bounded_by_the_context_window_and_refused_without_one() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let cap = 50_000_000i64; // $0.05
    let hard = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    let body =
        json!({"model": "resp-bounded", "previous_response_id": "resp_earlier", "input": "go on"});
    mock.clear();
    let outcomes = concurrently(gw.addr, 20, "/v1/responses", hard.bearer(), body, STORED);
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    for (status, code) in &outcomes {
        assert!(
            *status == 200 || (*status == 402 && code == "budget_exceeded"),
            "{outcomes:?}"
        );
    }
    let billed = billed(&mock, OPENAI_NANOS);
    assert!(served >= 1, "{outcomes:?}");
    assert!(
        billed <= cap,
        "the provider billed {billed} nanos against a {cap} cap ({served} served)"
    );

    // Without a context window the stored context has no bound: refused, naming the field,
    // before anything reaches the provider.
    mock.clear();
    let body = json!({"model": "resp-open", "previous_response_id": "resp_earlier", "input": "x"});
    for field in ["previous_response_id", "conversation", "prompt"] {
        let mut body = body.clone();
        if field != "previous_response_id" {
            body.as_object_mut().unwrap().remove("previous_response_id");
            body[field] = json!({"id": "stored_1"});
        }
        let r = post(gw.addr, "/v1/responses", &hard.bearer(), &body, &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{field}"
        );
        assert!(r.text().contains(field), "names {field}: {}", r.text());
    }
    let r = post(
        gw.addr,
        "/v1/chat/completions",
        &hard.bearer(),
        &json!({"model": "resp-open", "messages": [{"role": "user", "content": [
            {"type": "file", "file": {"file_id": "file-abc"}}]}]}),
        &[],
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "a file by id"
    );
    assert!(mock.requests().is_empty(), "nothing reached the provider");

    // A key without a hard budget is served as before.
    let open = gw.create_key(&[]);
    let r = post(gw.addr, "/v1/responses", &open.bearer(), &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

/// OpenAI's schema makes an item reference's `type` optional: `{"id": "msg_…"}` loads a
/// stored item as `{"type": "item_reference", …}` does, and so does a reasoning item passed
/// back by id without its `encrypted_content`. A black-box audit billed $4 against a $2 cap
/// with the untyped form. Each is stored context: bounded by the context window, refused
/// without one; items whose content is in the body are not.
#[test]
fn untyped_and_reasoning_item_references_are_stored_context() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let hard = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    mock.clear();
    for item in [
        json!({"id": "msg_1"}),
        json!({"type": null, "id": "msg_1"}),
        json!({"type": "reasoning", "id": "rs_1", "summary": []}),
        json!({"type": "item_reference", "id": "msg_1"}),
    ] {
        let body = json!({"model": "resp-open", "input": [
            {"role": "user", "content": "go on"}, item]});
        let r = post(gw.addr, "/v1/responses", &hard.bearer(), &body, &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{body}: {}",
            r.text()
        );
        // With a context window it is reserved: 60,000 tokens at $0.15/Mtok fit $0.05.
        let body = json!({"model": "resp-bounded", "input": [item]});
        // (STORED without its delay, which the concurrent test needs.)
        let r = post(
            gw.addr,
            "/v1/responses",
            &hard.bearer(),
            &body,
            &STORED[..4],
        );
        assert_eq!(r.status, 200, "{body}: {}", r.text());
    }
    assert_eq!(
        mock.requests().len(),
        4,
        "only the bounded ones reached the provider"
    );
    // Items that carry their content: no stored context.
    mock.clear();
    let body = json!({"model": "resp-open", "input": [
        {"type": "message", "id": "msg_1", "role": "assistant",
         "content": [{"type": "output_text", "text": "hi"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "gAAAA"},
        {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "ok"}]});
    let r = post(gw.addr, "/v1/responses", &hard.bearer(), &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.requests().len(), 1);
}

#[test]
fn server_side_tools_are_refused_for_hard_budget_keys_on_both_apis() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let hard = gw.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    mock.clear();
    let cases = [
        (
            "/v1/responses",
            json!({"model": "resp-bounded", "input": "news?", "tools": [{"type": "web_search"}]}),
            "tools[0]",
        ),
        (
            "/v1/responses",
            json!({"model": "resp-bounded", "input": "x", "tools": [
                {"type": "function", "name": "f", "parameters": {}},
                {"type": "mcp", "server_label": "s", "server_url": "https://mcp.example"}]}),
            "tools[1]",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "resp-bounded", "messages": [], "web_search_options": {}}),
            "web_search_options",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}),
            "tools[0]",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                   "tools": [{"type": "code_execution_20250825", "name": "code_execution"}]}),
            "tools[0]",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}],
                   "mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "m"}]}),
            "mcp_servers",
        ),
    ];
    for (path, body, field) in &cases {
        let r = post(gw.addr, path, &hard.bearer(), body, &[]);
        assert_eq!(r.status, 400, "{path} {field}: {}", r.text());
        assert_eq!(r.header("x-spidergate-error-code"), Some("invalid_request"));
        assert!(r.text().contains(field), "names {field}: {}", r.text());
        if *path == "/v1/messages" {
            assert_eq!(r.json()["error"]["type"], "invalid_request_error");
        }
    }
    assert!(mock.requests().is_empty(), "nothing reached the provider");

    let open = gw.create_key(&[]);
    let (path, body, _) = &cases[0];
    let r = post(gw.addr, path, &open.bearer(), body, &[]);
    assert_eq!(r.status, 200, "a key without a hard budget: {}", r.text());
}

#[test]
fn the_tool_prompt_is_reserved_so_tiny_tool_requests_stay_under_the_cap() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let cap = 5_000_000i64; // $0.005
    let key = gw.create_key(&["--budget", "0.005", "--budget-mode", "hard"]);
    let body = json!({"model": "claude", "max_tokens": 10,
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"name": "f", "input_schema": {"type": "object"}}]});
    const BILLING: &[(&str, &str)] = &[
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-completion-tokens", "max"),
        ("x-mock-delay-ms", "1500"),
    ];
    mock.clear();
    let outcomes = concurrently(gw.addr, 20, "/v1/messages", key.bearer(), body, BILLING);
    let served = outcomes.iter().filter(|(s, _)| *s == 200).count();
    let billed = billed(&mock, CLAUDE_NANOS);
    assert!(served >= 1, "{outcomes:?}");
    assert!(
        billed <= cap,
        "the provider billed {billed} nanos (its tool prompt included) against a {cap} cap ({served} served)"
    );
}

#[test]
fn pricing_betas_never_reach_the_provider_and_the_others_do() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    mock.clear();
    let body = json!({"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]});
    let r = post(
        gw.addr,
        "/v1/messages",
        &key.bearer(),
        &body,
        &[(
            "anthropic-beta",
            "context-1m-2025-08-07, prompt-caching-2024-07-31,output-128k-2025-02-19",
        )],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        gw.addr,
        "/v1/messages",
        &key.bearer(),
        &body,
        &[("anthropic-beta", "context-1m-2025-08-07")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let sent: Vec<Option<String>> = mock
        .requests()
        .iter()
        .map(|q| q.header("anthropic-beta").map(str::to_string))
        .collect();
    assert_eq!(sent, vec![Some("prompt-caching-2024-07-31".into()), None]);
}

// ---------------------------------------------------------------------------------------------
// What goes upstream is what was reserved for.
// ---------------------------------------------------------------------------------------------

#[test]
fn the_reserved_output_cap_is_written_upstream_on_every_route_and_translation() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let user = json!([{"role": "user", "content": "hi"}]);
    let cases = [
        // (path, body, field the provider reads, value it must carry)
        (
            "/v1/chat/completions",
            json!({"model": "resp-bounded", "messages": user}),
            "max_completion_tokens",
            1000,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "resp-bounded", "messages": user, "max_tokens": 1_000_000_000_000u64}),
            "max_tokens",
            1000,
        ),
        (
            "/v1/chat/completions",
            json!({"model": "resp-bounded", "messages": user, "max_completion_tokens": 7}),
            "max_completion_tokens",
            7,
        ),
        (
            "/v1/responses",
            json!({"model": "resp-bounded", "input": "hi"}),
            "max_output_tokens",
            1000,
        ),
        (
            "/v1/responses",
            json!({"model": "resp-bounded", "input": "hi", "max_output_tokens": 50000}),
            "max_output_tokens",
            1000,
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "messages": user, "max_tokens": 100000}),
            "max_tokens",
            64,
        ),
        // Chat on an Anthropic model, and Messages on an OpenAI-kind model.
        (
            "/v1/chat/completions",
            json!({"model": "claude", "messages": user}),
            "max_tokens",
            64,
        ),
        (
            "/v1/messages",
            json!({"model": "resp-bounded", "messages": user, "max_tokens": 99999}),
            "max_completion_tokens",
            1000,
        ),
    ];
    for (path, body, field, want) in &cases {
        mock.clear();
        let r = post(gw.addr, path, &key.bearer(), body, &[]);
        assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
        let sent = mock.requests()[0].json().unwrap();
        assert_eq!(sent[field], json!(want), "{path} {body}: sent {sent}");
    }
}

// ---------------------------------------------------------------------------------------------
// Cut streams.
// ---------------------------------------------------------------------------------------------

/// A stream the upstream breaks off mid-body ends for the client with an error in its own
/// API's shape, on a cleanly ended body, whatever the surface or translation: not a
/// connection cut mid-body, which SDKs report as a transport failure. Nothing that reads as a
/// whole answer (`[DONE]`, `message_stop`, `response.completed`) is made up.
#[test]
fn a_stream_the_upstream_breaks_off_ends_with_an_error_in_the_clients_shape() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let key = gw.create_key(&[]);
    let user = json!([{"role": "user", "content": "hi"}]);
    let chat_error = "data: {\"error\":";
    let messages_error =
        "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\"";
    for (path, body, error, whole) in [
        (
            "/v1/chat/completions",
            json!({"model": "resp-open", "stream": true, "messages": user}),
            chat_error,
            "[DONE]",
        ),
        (
            "/v1/chat/completions",
            json!({"model": "claude", "max_tokens": 60, "stream": true, "messages": user}),
            chat_error,
            "[DONE]",
        ),
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 60, "stream": true, "messages": user}),
            messages_error,
            "message_stop",
        ),
        (
            "/v1/messages",
            json!({"model": "resp-open", "max_tokens": 60, "stream": true, "messages": user}),
            messages_error,
            "message_stop",
        ),
        (
            "/v1/responses",
            json!({"model": "resp-open", "stream": true, "input": "hi"}),
            "event: error\ndata: {\"type\":\"error\",\"code\":\"upstream_stream_broken\"",
            "response.completed",
        ),
    ] {
        // Mid-stream, and before its first event (the client has its 200 head already).
        for after in ["3", "0"] {
            let bearer = key.bearer();
            let headers = [
                ("Authorization", bearer.as_str()),
                ("x-mock-chunks", "10"),
                ("x-mock-break-after", after),
            ];
            let stream = send_request(gw.addr, "POST", path, &headers, body.to_string().as_bytes())
                .expect("send");
            let r = read_response(stream).unwrap_or_else(|e| {
                panic!("{path} {body} after {after}: the body was cut, not ended: {e}")
            });
            assert_eq!(r.status, 200, "{path} {body}");
            let text = r.text();
            assert!(
                text.contains(error),
                "{path} {body} after {after}: no error event: {text}"
            );
            assert!(!text.contains(whole), "{path} {body}: made whole: {text}");
            assert_eq!(text.matches(error).count(), 1, "{path} {body}: {text}");
        }
    }
    let t = wait_traces(&gw, &key, 10);
    for trace in &t {
        assert_eq!(
            trace.error_code.as_deref(),
            Some("upstream_stream_broken"),
            "{trace:?}"
        );
        assert!(trace.usage_estimated, "{trace:?}");
    }
}

#[test]
fn a_messages_stream_cut_before_its_usage_is_charged_its_prompt_and_delivered_output() {
    let mock = mock();
    let gw = gateway(&mock).start();
    let cut: &[(&str, &str)] = &[
        ("x-mock-prompt-tokens", "500"),
        ("x-mock-chunks", "10"),
        ("x-mock-break-after", "3"),
    ];
    let user = json!([{"role": "user", "content": "hi"}]);
    // Native Messages, and a chat stream translated from an Anthropic model.
    for (path, body) in [
        (
            "/v1/messages",
            json!({"model": "claude", "max_tokens": 60, "stream": true, "messages": user}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "claude", "max_tokens": 60, "stream": true, "messages": user}),
        ),
    ] {
        let key = gw.create_key(&[]);
        mock.clear();
        let bearer = key.bearer();
        let mut headers = vec![("Authorization", bearer.as_str())];
        headers.extend_from_slice(cut);
        let stream = send_request(gw.addr, "POST", path, &headers, body.to_string().as_bytes())
            .expect("send");
        let (status, _, mut rest) = read_stream_head(stream).expect("head");
        assert_eq!(status, 200, "{path}");
        // The stream breaks: read what arrives until the connection closes.
        let _ = std::io::Read::read_to_end(&mut rest, &mut Vec::new());
        let t = wait_traces(&gw, &key, 1);
        let t = &t[0];
        assert!(t.usage_estimated, "{path}: not marked estimated: {t:?}");
        assert_eq!(
            t.prompt_tokens, 500,
            "{path}: the prompt message_start reported: {t:?}"
        );
        // Three deltas of "tok " were delivered: at least one token each, never just the
        // `output_tokens: 1` of message_start.
        assert!(t.completion_tokens >= 3, "{path}: {t:?}");
        assert!(
            t.completion_tokens <= 60,
            "{path}: within the reservation: {t:?}"
        );
        let (input, output) = CLAUDE_NANOS;
        assert!(
            t.cost_nanos >= 500 * input + 3 * output,
            "{path}: charged below the provider's bill: {t:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Shared provider keys, and what agents see of the provider's account.
// ---------------------------------------------------------------------------------------------

const POOL_K1: &str = "sk-pool-one-1111111111";
const POOL_K2: &str = "sk-pool-two-2222222222";

#[test]
fn request_too_large_never_rests_a_pooled_key_and_its_body_is_masked() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .provider("- name: pooled\n  kind: openai\n  base_url: \"{mock}/v1\"\n  api_key_envs: [SG_POOL_K1, SG_POOL_K2]")
        .models("models:\n  - id: pool-model\n    provider: pooled\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 2\n    max_output_tokens: 1000\n")
        .env("SG_POOL_K1", POOL_K1)
        .env("SG_POOL_K2", POOL_K2)
        .start();
    let attacker = gw.create_key(&[]);
    let other = gw.create_key(&[]);
    let body = json!({"model": "pool-model", "messages": [{"role": "user", "content": "hi"}]});
    mock.clear();
    for _ in 0..6 {
        let r = post(
            gw.addr,
            "/v1/chat/completions",
            &attacker.bearer(),
            &body,
            &[("x-mock-too-large", "1")],
        );
        assert_eq!(r.status, 429, "{}", r.text());
        let e = &r.json()["error"];
        assert_eq!(
            e["code"], "rate_limit_exceeded",
            "status, type and code kept"
        );
        assert_eq!(e["type"], "tokens");
        let message = e["message"].as_str().unwrap_or("");
        for secret in ["AbC123xyz", "Xyz789abc", "abcdef12345"] {
            assert!(!message.contains(secret), "account id leaked: {message}");
        }
        assert!(message.contains("org-*"), "{message}");
    }
    assert_eq!(mock.requests().len(), 6, "never retried on the other key");
    // Both keys still serve everyone else.
    mock.clear();
    for _ in 0..4 {
        let r = post(gw.addr, "/v1/chat/completions", &other.bearer(), &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let keys: std::collections::BTreeSet<String> = mock
        .requests()
        .iter()
        .filter_map(|q| q.provider_key().map(str::to_string))
        .collect();
    assert_eq!(keys.len(), 2, "both pooled keys in use: {keys:?}");
}

// ---------------------------------------------------------------------------------------------
// Random request shapes on every surface at once.
// ---------------------------------------------------------------------------------------------

/// Every token-priced surface's models at one price (0.15 / 0.60 USD per Mtok), so what the
/// provider billed is the mock's token counts times literal prices, whichever surface served
/// it; images at 0.0002 USD each (200,000 nanos) and speech at 1 USD per million characters
/// (1,000 nanos a character), billed from the images and characters the mock served.
const SAME_PRICE: &str = r#"
models:
  - id: chat-a
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 2000
  - id: claude-a
    provider: mock-anthropic
    upstream_id: claude-sonnet-4-5
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 2000
  - id: img-a
    provider: mock
    endpoint: images
    usd_per_image: 0.0002
  - id: tts-a
    provider: mock
    endpoint: speech
    usd_per_mchar: 1
"#;

const IMAGE_NANOS: i64 = 200_000;
const CHAR_NANOS: i64 = 1_000;

/// A small deterministic generator (xorshift64*): the same shapes on every run, and a
/// failing seed can be replayed.
struct Shapes(u64);

impl Shapes {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// One request: its path and body, on chat completions, the Responses API or
    /// Messages, in either model's format (translated where the surface and the model's
    /// provider differ), with random output caps (or none), `n`, tools, streaming and text;
    /// or an image generation (`n` 1 to 4, a number or a string) or speech (any text).
    fn request(&mut self) -> (&'static str, Value) {
        match self.below(6) {
            0 => {
                let n = 1 + self.below(4);
                let n = if self.below(2) == 0 {
                    json!(n)
                } else {
                    json!(n.to_string())
                };
                return (
                    "/v1/images/generations",
                    json!({"model": "img-a", "prompt": "a gate", "n": n}),
                );
            }
            1 => {
                let text = "grüße ".repeat(1 + self.below(400) as usize);
                return (
                    "/v1/audio/speech",
                    json!({"model": "tts-a", "voice": "alloy", "input": text}),
                );
            }
            _ => {}
        }
        let model = if self.below(2) == 0 {
            "chat-a"
        } else {
            "claude-a"
        };
        let text = "word ".repeat(1 + self.below(400) as usize);
        let cap = match self.below(4) {
            0 => None,
            1 => Some(1 + self.below(50)),
            2 => Some(1 + self.below(5_000)),
            _ => Some(100_000 + self.below(1_000_000)),
        };
        let stream = self.below(2) == 0;
        let tools = self.below(3) == 0;
        match self.below(3) {
            0 => {
                let mut b = json!({"model": model, "stream": stream,
                    "messages": [{"role": "user", "content": text}]});
                if let Some(c) = cap {
                    b[if self.below(2) == 0 {
                        "max_tokens"
                    } else {
                        "max_completion_tokens"
                    }] = c.into();
                }
                if model == "chat-a" {
                    b["n"] = (1 + self.below(3)).into();
                }
                if tools {
                    b["tools"] = json!([{"type": "function", "function": {"name": "f",
                        "parameters": {"type": "object"}}}]);
                }
                ("/v1/chat/completions", b)
            }
            1 if model == "chat-a" => {
                let mut b = json!({"model": model, "stream": stream, "input": text});
                if let Some(c) = cap {
                    b["max_output_tokens"] = c.into();
                }
                ("/v1/responses", b)
            }
            _ => {
                let mut b = json!({"model": model, "stream": stream,
                    "max_tokens": cap.unwrap_or(1 + self.below(3_000)),
                    "messages": [{"role": "user", "content": text}]});
                if tools {
                    b["tools"] = json!([{"name": "f", "input_schema": {"type": "object"}}]);
                }
                ("/v1/messages", b)
            }
        }
    }
}

/// SPEC §2: the reservation is a true upper bound for every request shape an endpoint
/// accepts. Random shapes across chat completions, the Responses API and Messages (native
/// and translated, streamed or not, `n`, tools, any output cap), image generations (`n`)
/// and speech, sent 24 at a time against one hard cap, while the mock bills each as the
/// provider would at worst (every body byte a token plus the tool prompt, the whole output
/// cap, every image and character served): what the provider billed never passes the cap.
#[test]
fn random_shapes_on_every_surface_at_once_never_bill_past_the_cap() {
    const BILLING: &[(&str, &str)] = &[
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-completion-tokens", "max"),
        ("x-mock-delay-ms", "200"),
    ];
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).models(SAME_PRICE).start();
    let cap = 3_000_000i64; // $0.003
    let key = gw.create_key(&["--budget", "0.003", "--budget-mode", "hard"]);
    let mut shapes = Shapes(0x005e_ed0f_5a9e_u64);
    mock.clear();
    // One image request and one speech request first, so both surfaces are billed whatever
    // the races below admit: 2 x 200,000 + 60 x 1,000 nanos of the cap.
    let bearer = key.bearer();
    let image = json!({"model": "img-a", "prompt": "a gate", "n": "2"});
    let speech = json!({"model": "tts-a", "voice": "alloy", "input": "grüße ".repeat(10)});
    for (path, body) in [
        ("/v1/images/generations", image),
        ("/v1/audio/speech", speech),
    ] {
        let r = post(gw.addr, path, &bearer, &body, BILLING);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!((mock.served_images(), mock.served_speech_chars()), (2, 60));
    let (mut served, mut refused) = (0, 0);
    for _round in 0..6 {
        let threads: Vec<_> = (0..24)
            .map(|_| {
                let (path, body) = shapes.request();
                let (addr, bearer) = (gw.addr, key.bearer());
                std::thread::spawn(move || {
                    let r = post(addr, path, &bearer, &body, BILLING);
                    (
                        path,
                        r.status,
                        r.header("x-spidergate-error-code").map(str::to_string),
                    )
                })
            })
            .collect();
        for t in threads {
            let (path, status, code) = t.join().unwrap();
            match (status, code.as_deref()) {
                (200, _) => served += 1,
                (402, Some("budget_exceeded")) => refused += 1,
                // A shape the gateway cannot bound or translate is refused up front.
                (400, Some("invalid_request")) => {}
                other => panic!("{path}: unexpected {other:?}"),
            }
        }
    }
    let billed = billed(&mock, OPENAI_NANOS)
        + mock.served_images() as i64 * IMAGE_NANOS
        + mock.served_speech_chars() as i64 * CHAR_NANOS;
    assert!(
        served >= 1 && refused >= 1,
        "served {served}, refused {refused}"
    );
    assert!(
        billed <= cap,
        "the provider billed {billed} nanos against a {cap} cap ({served} served)"
    );
}
