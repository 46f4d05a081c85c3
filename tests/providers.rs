//! Providers (SPEC §2-§4, §6): Anthropic's Messages API passed through and translated both
//! ways, OpenAI's Responses API, cache pricing, fallback across provider kinds, provider key
//! pools, and the traces they leave.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// The upstream ids of the test models: the mock must see these, never the gateway's ids.
const CLAUDE_UPSTREAM: &str = "claude-sonnet-4-5-20250929";
const CLAUDE_PLAIN_UPSTREAM: &str = "claude-haiku-4-5-20251001";
const GPT_UPSTREAM: &str = "gpt-4o-2024-08-06";
const POOL_UPSTREAM: &str = "claude-pool-upstream";
/// The mock's text of every plain reply, and of every stream chunk.
const REPLY_TEXT: &str = "Hello from the SpiderGate mock provider.";
const STREAM_TOKEN: &str = "tok ";

/// Prices in nano-dollars per token (USD per million tokens x 1000): every figure below is a
/// whole number of nanos, so the expected cost is exact.
struct Prices {
    input: i64,
    output: i64,
    cache_read: i64,
    cache_write: i64,
}

/// `claude-test`: 3 / 15 USD per Mtok, cache reads 0.3, cache writes 3.75.
const CLAUDE: Prices = Prices {
    input: 3_000,
    output: 15_000,
    cache_read: 300,
    cache_write: 3_750,
};
/// `claude-plain`: 1 / 5 USD per Mtok, no cache prices (both fall back to the input price).
const CLAUDE_PLAIN: Prices = Prices {
    input: 1_000,
    output: 5_000,
    cache_read: 1_000,
    cache_write: 1_000,
};
/// `gpt-test`: 2.5 / 10 USD per Mtok, cache reads 1.25 (no cache-write price).
const GPT: Prices = Prices {
    input: 2_500,
    output: 10_000,
    cache_read: 1_250,
    cache_write: 2_500,
};
/// `pool-claude` and `pool-gpt`: 1 / 2 USD per Mtok.
const POOL: Prices = Prices {
    input: 1_000,
    output: 2_000,
    cache_read: 1_000,
    cache_write: 1_000,
};

const MODELS_YAML: &str = r#"
models:
  - id: claude-test
    provider: mock-anthropic
    upstream_id: claude-sonnet-4-5-20250929
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    cache_read_usd_per_mtok: 0.3
    cache_write_usd_per_mtok: 3.75
    max_output_tokens: 1000
  - id: claude-plain
    provider: mock-anthropic
    upstream_id: claude-haiku-4-5-20251001
    input_usd_per_mtok: 1
    output_usd_per_mtok: 5
    max_output_tokens: 1000
  - id: gpt-test
    provider: mock
    upstream_id: gpt-4o-2024-08-06
    input_usd_per_mtok: 2.5
    output_usd_per_mtok: 10
    cache_read_usd_per_mtok: 1.25
    max_output_tokens: 1000
aliases:
  claude-first: [claude-test, gpt-test]
"#;

/// The token counts the mock reports, steered by `x-mock-*` headers. `fresh` is the input
/// neither read from nor written to a cache (Anthropic's `input_tokens`).
#[derive(Clone, Copy)]
struct Tokens {
    fresh: i64,
    read: i64,
    write: i64,
    out: i64,
}

const TOKENS: Tokens = Tokens {
    fresh: 100,
    read: 1_000,
    write: 200,
    out: 20,
};

impl Tokens {
    fn headers(&self) -> Vec<(&'static str, String)> {
        vec![
            ("x-mock-prompt-tokens", self.fresh.to_string()),
            ("x-mock-cache-read-tokens", self.read.to_string()),
            ("x-mock-cache-write-tokens", self.write.to_string()),
            ("x-mock-completion-tokens", self.out.to_string()),
        ]
    }

    /// Every input token: OpenAI's `prompt_tokens`.
    fn all_input(&self) -> i64 {
        self.fresh + self.read + self.write
    }

    /// The cost when an Anthropic provider reported these tokens: each input token once, at
    /// the price of its kind.
    fn anthropic_cost(&self, p: &Prices) -> i64 {
        self.fresh * p.input
            + self.read * p.cache_read
            + self.write * p.cache_write
            + self.out * p.output
    }

    /// The cost when an OpenAI-kind provider reported these tokens: `prompt_tokens` includes
    /// `cached_tokens` (the reads); OpenAI has no cache writes, they are ordinary input.
    fn openai_cost(&self, p: &Prices) -> i64 {
        (self.fresh + self.write) * p.input + self.read * p.cache_read + self.out * p.output
    }
}

fn start(mock: &MockProvider) -> Gateway {
    GatewayBuilder::new(mock).models(MODELS_YAML).start()
}

/// `(name, value)` pairs as the `&[(&str, &str)]` the request helpers take.
fn pairs<'a>(owned: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    owned.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

/// A Messages request as the Anthropic SDKs send it.
fn messages_body(model: &str, stream: bool) -> Value {
    let mut body = json!({
        "model": model,
        "max_tokens": 256,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "hello"}],
    });
    if stream {
        body["stream"] = json!(true);
    }
    body
}

/// `POST /v1/messages` with the agent key as `x-api-key` (as the Anthropic SDKs send it).
fn post_messages(gw: &Gateway, key: &Key, body: &Value, extra: &[(&str, &str)]) -> Response {
    let mut headers = vec![("x-api-key", key.secret.as_str())];
    headers.extend_from_slice(extra);
    gw.post("/v1/messages", "", body.to_string().as_bytes(), &headers)
}

fn post_json(
    gw: &Gateway,
    path: &str,
    key: &Key,
    body: &Value,
    extra: &[(&str, &str)],
) -> Response {
    gw.post(path, &key.bearer(), body.to_string().as_bytes(), extra)
}

/// One SSE event: its `event:` name (if any) and its `data:` payload.
#[derive(Debug, Clone, PartialEq)]
struct Event {
    name: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

fn sse_events(body: &[u8]) -> Vec<Event> {
    let text = String::from_utf8_lossy(body);
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut name = None;
        let mut data = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.trim_start().to_string());
            }
        }
        if name.is_some() || !data.is_empty() {
            events.push(Event {
                name,
                data: data.join("\n"),
            });
        }
    }
    events
}

/// Replaces what differs between two answers of the mock to the same request: its ids
/// (`<prefix>_mock_<connection>-<request>`) and `created` / `created_at` timestamps.
fn mask_volatile(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(i) = rest.find("_mock_") {
        out.push_str(&rest[..i + "_mock_".len()]);
        rest = &rest[i + "_mock_".len()..];
        let end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '-'))
            .unwrap_or(rest.len());
        if end > 0 {
            out.push('N');
        }
        rest = &rest[end..];
    }
    out.push_str(rest);
    for field in ["\"created_at\":", "\"created\":"] {
        let mut masked = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(i) = rest.find(field) {
            masked.push_str(&rest[..i + field.len()]);
            rest = &rest[i + field.len()..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            masked.push('0');
            rest = &rest[end..];
        }
        masked.push_str(rest);
        out = masked;
    }
    out
}

/// Sends the request the mock recorded straight to the mock again (same path, body, key
/// and knobs): what the upstream answers, for comparison with what the client got.
fn replay_direct(mock: &MockProvider, up: &spidergate_mock::RecordedRequest) -> Response {
    let keep = |n: &str| {
        n.starts_with("x-mock-")
            || n == "x-api-key"
            || n == "authorization"
            || n == "anthropic-version"
            || n == "anthropic-beta"
            || n == "content-type"
    };
    let headers: Vec<(&str, &str)> = up
        .headers
        .iter()
        .filter(|(n, _)| keep(n))
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    http(mock.addr(), &up.method, &up.path, &headers, &up.body).expect("direct request to mock")
}

/// The text of a message `content`: a string, or the `text` of its parts.
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p["text"].as_str())
            .collect::<Vec<_>>()
            .concat(),
        _ => String::new(),
    }
}

/// Month-to-date spend of the key from the usage API (which waits for the key's requests to
/// be booked).
fn spend(gw: &Gateway, key: &Key) -> i64 {
    gw.usage(key)["spend_nanodollars"]
        .as_i64()
        .expect("spend_nanodollars")
}

/// Waits until the key's `spend` rows in the store sum to `expected` (the ledger flushes
/// every 100 ms in tests); panics with the last sum.
fn assert_stored_spend(gw: &Gateway, key: &Key, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got: i64 = gw.spend_rows(&key.id).iter().map(|r| r.2).sum();
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "stored spend of {}: expected {expected} nanos, got {got}",
            key.id
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts the charge both doors report: the usage API and the store.
fn assert_spend(gw: &Gateway, key: &Key, expected: i64) {
    assert_eq!(spend(gw, key), expected, "usage API spend_nanodollars");
    assert_stored_spend(gw, key, expected);
}

/// One row of the `traces` table, with the provider.
#[derive(Debug, Clone)]
struct Trace {
    endpoint: String,
    requested_model: Option<String>,
    served_model: Option<String>,
    provider: Option<String>,
    status: i64,
    error_code: Option<String>,
    prompt_tokens: i64,
    completion_tokens: i64,
    cost_nanos: i64,
    fallback_from: Option<String>,
}

const MODEL_ENDPOINTS: [&str; 4] = ["chat.completions", "embeddings", "responses", "messages"];

/// The key's model-request traces, oldest first, once there are at least `n`.
fn wait_traces(gw: &Gateway, key: &Key, n: usize) -> Vec<Trace> {
    wait_for(Duration::from_secs(5), "traces", || {
        let conn = gw.db();
        let mut stmt = conn
            .prepare(
                "SELECT endpoint, requested_model, served_model, provider, status, error_code,
                        prompt_tokens, completion_tokens, cost_nanos, fallback_from
                 FROM traces WHERE key_id = ?1 ORDER BY id",
            )
            .expect("prepare traces");
        let rows: Vec<Trace> = stmt
            .query_map([&key.id], |r| {
                Ok(Trace {
                    endpoint: r.get(0)?,
                    requested_model: r.get(1)?,
                    served_model: r.get(2)?,
                    provider: r.get(3)?,
                    status: r.get(4)?,
                    error_code: r.get(5)?,
                    prompt_tokens: r.get(6)?,
                    completion_tokens: r.get(7)?,
                    cost_nanos: r.get(8)?,
                    fallback_from: r.get(9)?,
                })
            })
            .expect("query traces")
            .map(|r| r.expect("trace row"))
            .filter(|t| MODEL_ENDPOINTS.contains(&t.endpoint.as_str()))
            .collect();
        (rows.len() >= n).then_some(rows)
    })
}

/// An error on `/v1/messages`: Anthropic's shape with its type, and the gateway's code.
fn assert_anthropic_error(r: &Response, status: u16, kind: &str, code: &str) {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "Anthropic error shape: {v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "error.message: {v}"
    );
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some(code),
        "X-SpiderGate-Error-Code of a {status}"
    );
}

fn assert_no_agent_token(up: &spidergate_mock::RecordedRequest, key: &Key) {
    for (name, value) in &up.headers {
        assert!(
            !value.contains(&key.secret),
            "agent token leaked upstream in header {name}"
        );
    }
    assert!(
        !String::from_utf8_lossy(&up.body).contains(&key.secret),
        "agent token leaked upstream in the body"
    );
}

fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

// ---------------------------------------------------------------------------------------
// 1-3. /v1/messages passed through to an anthropic provider
// ---------------------------------------------------------------------------------------

#[test]
fn messages_pass_through_with_the_provider_key_and_cache_prices() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();

    let body = messages_body("claude-test", false);
    let knobs = TOKENS.headers();
    let mut extra = pairs(&knobs);
    extra.push(("anthropic-beta", "prompt-caching-2024-07-31"));
    let r = post_messages(&gw, &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message");
    assert_eq!(v["content"][0]["text"], REPLY_TEXT);
    assert_eq!(v["usage"]["input_tokens"], TOKENS.fresh);
    assert_eq!(v["usage"]["cache_read_input_tokens"], TOKENS.read);
    assert_eq!(v["usage"]["cache_creation_input_tokens"], TOKENS.write);
    assert_eq!(v["usage"]["output_tokens"], TOKENS.out);

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1, "one upstream request");
    let up = &reqs[0];
    assert_eq!(path_only(&up.path), "/v1/messages");
    assert_eq!(up.header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    assert_eq!(up.header("authorization"), None, "no bearer to Anthropic");
    assert!(
        up.header("anthropic-version")
            .is_some_and(|v| !v.is_empty()),
        "anthropic-version added when the client sent none: {:?}",
        up.headers
    );
    assert_eq!(
        up.header("anthropic-beta"),
        Some("prompt-caching-2024-07-31"),
        "the client's anthropic-beta is forwarded"
    );
    assert_no_agent_token(up, &key);
    let sent = up.json().expect("json body");
    assert_eq!(
        sent["model"], CLAUDE_UPSTREAM,
        "model rewritten to upstream_id"
    );
    assert_eq!(sent["messages"], body["messages"]);
    assert_eq!(sent["system"], body["system"]);
    assert_eq!(sent["max_tokens"], 256);

    // The body passes through as the provider sent it.
    let direct = replay_direct(&mock, up);
    assert_eq!(direct.status, 200);
    assert_eq!(mask_volatile(&r.body), mask_volatile(&direct.body));

    let one = TOKENS.anthropic_cost(&CLAUDE);
    assert_eq!(one, 100 * 3_000 + 1_000 * 300 + 200 * 3_750 + 20 * 15_000);
    assert_spend(&gw, &key, one);
    let usage = gw.usage(&key);
    assert_eq!(usage["by_model"]["claude-test"]["requests"], 1);
    assert_eq!(usage["by_model"]["claude-test"]["spend_nanodollars"], one);

    // The client's own anthropic-version wins; the agent key also works as a bearer token.
    mock.clear();
    let r = post_json(
        &gw,
        "/v1/messages",
        &key,
        &body,
        &[
            ("anthropic-version", "2023-01-01"),
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "5"),
        ],
    );
    assert_eq!(r.status, 200, "bearer on /v1/messages: {}", r.text());
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].header("anthropic-version"), Some("2023-01-01"));
    assert_eq!(reqs[0].header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    assert_eq!(reqs[0].header("authorization"), None);
    assert_no_agent_token(&reqs[0], &key);
    let two = 10 * CLAUDE.input + 5 * CLAUDE.output;
    assert_spend(&gw, &key, one + two);

    // A model without cache prices charges cached tokens at its input price.
    mock.clear();
    let r = post_messages(&gw, &key, &messages_body("claude-plain", false), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        mock.requests()[0].json().expect("json")["model"],
        CLAUDE_PLAIN_UPSTREAM
    );
    let three = TOKENS.anthropic_cost(&CLAUDE_PLAIN);
    assert_eq!(three, (100 + 1_000 + 200) * 1_000 + 20 * 5_000);
    assert_spend(&gw, &key, one + two + three);

    let t = wait_traces(&gw, &key, 3);
    assert_eq!(t[0].endpoint, "messages");
    assert_eq!(t[0].cost_nanos, one);
    assert_eq!(t[0].prompt_tokens, TOKENS.all_input(), "{:?}", t[0]);
    assert_eq!(t[0].completion_tokens, TOKENS.out);
    assert_eq!(t[2].cost_nanos, three);
}

#[test]
fn messages_stream_passes_through_byte_for_byte_and_charges_its_usage_once() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();

    let knobs = TOKENS.headers();
    let mut extra = pairs(&knobs);
    extra.push(("x-mock-chunks", "4"));
    let r = post_messages(&gw, &key, &messages_body("claude-test", true), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "{:?}",
        r.headers
    );
    let events = sse_events(&r.body);
    let names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ],
        "events in order"
    );
    let text: String = events
        .iter()
        .filter(|e| e.name.as_deref() == Some("content_block_delta"))
        .map(|e| e.json()["delta"]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert_eq!(text, STREAM_TOKEN.repeat(4));

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let up = &reqs[0];
    assert_eq!(path_only(&up.path), "/v1/messages");
    assert_eq!(up.header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    let sent = up.json().expect("json");
    assert_eq!(sent["model"], CLAUDE_UPSTREAM);
    assert_eq!(sent["stream"], true);
    assert_no_agent_token(up, &key);

    // Byte for byte what the provider streams (its ids aside).
    let direct = replay_direct(&mock, up);
    assert_eq!(direct.status, 200);
    assert_eq!(mask_volatile(&r.body), mask_volatile(&direct.body));

    // Input and cache tokens from message_start, output from message_delta: once each.
    let expected = TOKENS.anthropic_cost(&CLAUDE);
    assert_spend(&gw, &key, expected);
    let t = wait_traces(&gw, &key, 1);
    assert_eq!(t.len(), 1, "{t:?}");
    assert_eq!(
        (t[0].prompt_tokens, t[0].completion_tokens, t[0].cost_nanos),
        (TOKENS.all_input(), TOKENS.out, expected),
        "{:?}",
        t[0]
    );
}

#[test]
fn messages_errors_use_anthropic_shape_with_the_error_code_header() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(MODELS_YAML)
        .top("max_body_bytes: 65536")
        .start();
    let key = gw.create_key(&[]);
    mock.clear();
    let body = messages_body("claude-test", false);

    // 401: an unknown key in x-api-key, and no key at all.
    let bad = Key {
        id: String::new(),
        secret: format!("spideriq_pat_{}", "0".repeat(32)),
    };
    let r = post_messages(&gw, &bad, &body, &[]);
    assert_anthropic_error(&r, 401, "authentication_error", "invalid_api_key");
    let r = gw.post("/v1/messages", "", body.to_string().as_bytes(), &[]);
    assert_anthropic_error(&r, 401, "authentication_error", "invalid_api_key");

    // 403: a key without gate:chat.
    let usage_only = gw.create_key(&["--scopes", "gate:usage"]);
    let r = post_messages(&gw, &usage_only, &body, &[]);
    assert_anthropic_error(&r, 403, "permission_error", "insufficient_scope");

    // 403: a model outside the key's allow-list.
    let gpt_only = gw.create_key(&["--models", "gpt-test"]);
    let r = post_messages(&gw, &gpt_only, &body, &[]);
    assert_anthropic_error(&r, 403, "permission_error", "model_not_allowed");

    // 404: an unknown model.
    let r = post_messages(&gw, &key, &messages_body("claude-nope", false), &[]);
    assert_anthropic_error(&r, 404, "not_found_error", "model_not_found");

    // 413: a body over max_body_bytes.
    let mut big = body.clone();
    big["messages"][0]["content"] = json!("x".repeat(100_000));
    let r = post_messages(&gw, &key, &big, &[]);
    assert_anthropic_error(&r, 413, "request_too_large", "request_too_large");

    // 429: the per-minute limit, with Retry-After.
    let one_rpm = gw.create_key(&["--rpm", "1"]);
    assert_eq!(post_messages(&gw, &one_rpm, &body, &[]).status, 200);
    let r = post_messages(&gw, &one_rpm, &body, &[]);
    assert_anthropic_error(&r, 429, "rate_limit_error", "rate_limit_exceeded");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After on a 429");
    assert!((1..=60).contains(&retry), "Retry-After {retry}");

    // 402: a hard budget the request cannot fit in.
    let broke = gw.create_key(&["--budget", "0.000001", "--budget-mode", "hard"]);
    let r = post_messages(&gw, &broke, &body, &[]);
    assert_anthropic_error(&r, 402, "billing_error", "budget_exceeded");

    // Only the one admitted request reached the provider.
    assert_eq!(
        mock.requests().len(),
        1,
        "rejections never reach the upstream"
    );

    // The provider's own error is passed through with its status and body.
    mock.clear();
    let r = post_messages(&gw, &key, &body, &[("x-mock-status", "400")]);
    assert_eq!(r.status, 400, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    assert!(
        r.header("x-spidergate-error-code").is_some(),
        "an upstream error carries X-SpiderGate-Error-Code: {:?}",
        r.headers
    );
    assert_eq!(mock.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------
// 4. /v1/chat/completions on an anthropic model
// ---------------------------------------------------------------------------------------

fn chat_body(model: &str) -> Value {
    json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello"}
        ],
    })
}

fn weather_tool() -> Value {
    json!([{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather of a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        }
    }])
}

/// Asserts the mock got a Messages request translated from `chat_body`.
fn assert_translated_to_messages(up: &spidergate_mock::RecordedRequest, key: &Key) -> Value {
    assert_eq!(path_only(&up.path), "/v1/messages", "routed to Anthropic");
    assert_eq!(up.header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    assert_eq!(up.header("authorization"), None);
    assert!(up.header("anthropic-version").is_some());
    assert_no_agent_token(up, key);
    let sent = up.json().expect("json");
    assert_eq!(sent["model"], CLAUDE_UPSTREAM);
    assert_eq!(
        text_of(&sent["system"]),
        "Be brief.",
        "system hoisted: {sent}"
    );
    assert_eq!(
        sent["max_tokens"], 1000,
        "max_tokens from the model's max_output_tokens: {sent}"
    );
    let msgs = sent["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 1, "{sent}");
    assert_eq!(msgs[0]["role"], "user");
    assert_eq!(text_of(&msgs[0]["content"]), "hello");
    sent
}

#[test]
fn chat_completions_on_an_anthropic_model_are_translated_plain_and_streamed() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let knobs = TOKENS.headers();
    let extra = pairs(&knobs);
    let one = TOKENS.anthropic_cost(&CLAUDE);

    // Plain.
    mock.clear();
    let r = post_json(
        &gw,
        "/v1/chat/completions",
        &key,
        &chat_body("claude-test"),
        &extra,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "chat.completion", "{v}");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], REPLY_TEXT);
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert_eq!(v["usage"]["prompt_tokens"], TOKENS.all_input(), "{v}");
    assert_eq!(v["usage"]["completion_tokens"], TOKENS.out);
    assert_eq!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"],
        TOKENS.read
    );
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = assert_translated_to_messages(&reqs[0], &key);
    assert_ne!(sent["stream"], true);
    assert_spend(&gw, &key, one);

    // Streamed, with the usage chunk asked for.
    mock.clear();
    let mut body = chat_body("claude-test");
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let r = post_json(&gw, "/v1/chat/completions", &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_events(&r.body);
    assert_eq!(
        events.last().map(|e| e.data.as_str()),
        Some("[DONE]"),
        "{}",
        r.text()
    );
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, STREAM_TOKEN.repeat(3));
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["stop"]);
    let usage: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["usage"])
        .filter(|u| u.is_object())
        .collect();
    assert_eq!(usage.len(), 1, "one usage chunk: {}", r.text());
    assert_eq!(usage[0]["prompt_tokens"], TOKENS.all_input());
    assert_eq!(usage[0]["completion_tokens"], TOKENS.out);
    assert_eq!(
        usage[0]["prompt_tokens_details"]["cached_tokens"],
        TOKENS.read
    );
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = assert_translated_to_messages(&reqs[0], &key);
    assert_eq!(sent["stream"], true);
    assert_spend(&gw, &key, 2 * one);

    // Streamed without asking for usage: no usage chunk, still charged exactly.
    mock.clear();
    body.as_object_mut()
        .expect("object")
        .remove("stream_options");
    let r = post_json(&gw, "/v1/chat/completions", &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_events(&r.body);
    assert!(
        events
            .iter()
            .filter(|e| e.data != "[DONE]")
            .all(|e| !e.json()["usage"].is_object()),
        "usage chunk only when asked: {}",
        r.text()
    );
    assert_spend(&gw, &key, 3 * one);

    let t = wait_traces(&gw, &key, 3);
    for t in &t {
        assert_eq!(t.endpoint, "chat.completions");
        assert_eq!(t.served_model.as_deref(), Some("claude-test"));
        assert_eq!(t.provider.as_deref(), Some("mock-anthropic"));
        assert_eq!(t.cost_nanos, one, "{t:?}");
    }
}

#[test]
fn chat_completions_tool_calls_are_translated_to_and_from_anthropic() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let mut body = chat_body("claude-test");
    body["tools"] = weather_tool();
    let extra = [
        ("x-mock-tool-call", "get_weather"),
        ("x-mock-prompt-tokens", "40"),
        ("x-mock-completion-tokens", "12"),
    ];
    let one = 40 * CLAUDE.input + 12 * CLAUDE.output;

    // Plain.
    mock.clear();
    let r = post_json(&gw, "/v1/chat/completions", &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert!(call["id"].as_str().is_some_and(|s| !s.is_empty()));
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().expect("arguments"))
            .expect("arguments are JSON");
    assert_eq!(args, json!({"city": "Paris"}));
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = assert_translated_to_messages(&reqs[0], &key);
    let tool = &sent["tools"][0];
    assert_eq!(tool["name"], "get_weather", "{sent}");
    assert_eq!(
        tool["input_schema"],
        body["tools"][0]["function"]["parameters"]
    );
    assert_spend(&gw, &key, one);

    // Streamed: the call's id and name first, then the arguments in pieces.
    mock.clear();
    body["stream"] = json!(true);
    let extra_stream = [extra[0], extra[1], extra[2], ("x-mock-chunks", "5")];
    let r = post_json(&gw, "/v1/chat/completions", &key, &body, &extra_stream);
    assert_eq!(r.status, 200, "{}", r.text());
    let events = sse_events(&r.body);
    assert_eq!(events.last().map(|e| e.data.as_str()), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(Event::json).collect();
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].as_array())
        .flatten()
        .collect();
    let names: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["function"]["name"].as_str())
        .collect();
    assert_eq!(names, ["get_weather"], "{}", r.text());
    assert!(calls.iter().all(|c| c["index"] == 0));
    let arguments: String = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&arguments).expect("streamed arguments are JSON"),
        json!({"city": "Paris"})
    );
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["tool_calls"]);
    assert_spend(&gw, &key, 2 * one);
}

#[test]
fn untranslatable_chat_fields_are_refused_before_the_upstream_and_cost_nothing() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let refusals = [
        ("n", json!(2)),
        ("logit_bias", json!({"50256": -100})),
        ("seed", json!(7)),
        ("response_format", json!({"type": "json_object"})),
    ];
    for (field, value) in refusals {
        let mut body = chat_body("claude-test");
        body[field] = value;
        let r = post_json(&gw, "/v1/chat/completions", &key, &body, &[]);
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert_eq!(r.code(), "invalid_request", "{field}: {}", r.text());
        assert_eq!(
            r.header("x-spidergate-error-code"),
            Some("invalid_request"),
            "{field}"
        );
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            msg.contains(field),
            "{field}: the message names the field: {msg}"
        );
    }
    assert!(
        mock.requests().is_empty(),
        "refused requests reached the upstream: {:?}",
        mock.requests().iter().map(|r| &r.path).collect::<Vec<_>>()
    );
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], 0, "{usage}");
    assert_eq!(
        usage["requests_today"], 0,
        "refusals consume no quota: {usage}"
    );
    assert_stored_spend(&gw, &key, 0);

    // The same fields are fine on an OpenAI model.
    let mut body = chat_body("gpt-test");
    body["n"] = json!(2);
    let r = post_json(&gw, "/v1/chat/completions", &key, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
}

// ---------------------------------------------------------------------------------------
// 5. /v1/messages on an openai model
// ---------------------------------------------------------------------------------------

/// Asserts the mock got a chat completion translated from `messages_body`.
fn assert_translated_to_chat(up: &spidergate_mock::RecordedRequest, key: &Key) -> Value {
    assert_eq!(
        path_only(&up.path),
        "/v1/chat/completions",
        "routed to OpenAI"
    );
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_eq!(up.header("x-api-key"), None);
    assert_eq!(up.header("anthropic-version"), None);
    assert_no_agent_token(up, key);
    let sent = up.json().expect("json");
    assert_eq!(sent["model"], GPT_UPSTREAM);
    let msgs = sent["messages"].as_array().expect("messages");
    assert_eq!(msgs.len(), 2, "{sent}");
    assert!(
        msgs[0]["role"] == "system" || msgs[0]["role"] == "developer",
        "{sent}"
    );
    assert_eq!(text_of(&msgs[0]["content"]), "Be brief.");
    assert_eq!(msgs[1]["role"], "user");
    assert_eq!(text_of(&msgs[1]["content"]), "hello");
    let max = sent["max_tokens"]
        .as_i64()
        .or(sent["max_completion_tokens"].as_i64());
    assert_eq!(max, Some(256), "{sent}");
    sent
}

#[test]
fn messages_on_an_openai_model_are_translated_plain_and_streamed() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let knobs = TOKENS.headers();
    let extra = pairs(&knobs);
    let one = TOKENS.openai_cost(&GPT);
    assert_eq!(one, (100 + 200) * 2_500 + 1_000 * 1_250 + 20 * 10_000);

    // Plain.
    mock.clear();
    let r = post_messages(&gw, &key, &messages_body("gpt-test", false), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["role"], "assistant");
    assert_eq!(v["content"][0]["type"], "text");
    assert_eq!(v["content"][0]["text"], REPLY_TEXT);
    assert_eq!(v["stop_reason"], "end_turn");
    // OpenAI's prompt_tokens include the cached reads; Anthropic's input_tokens do not.
    assert_eq!(
        v["usage"]["input_tokens"],
        TOKENS.fresh + TOKENS.write,
        "{v}"
    );
    assert_eq!(v["usage"]["cache_read_input_tokens"], TOKENS.read);
    assert_eq!(v["usage"]["output_tokens"], TOKENS.out);
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = assert_translated_to_chat(&reqs[0], &key);
    assert_ne!(sent["stream"], true);
    assert_spend(&gw, &key, one);

    // Streamed: the upstream is asked for usage; the client gets Anthropic's events.
    mock.clear();
    let r = post_messages(&gw, &key, &messages_body("gpt-test", true), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = assert_translated_to_chat(&reqs[0], &key);
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true, "{sent}");
    let events = sse_events(&r.body);
    let names: Vec<&str> = events.iter().filter_map(|e| e.name.as_deref()).collect();
    assert_eq!(names.first(), Some(&"message_start"), "{}", r.text());
    assert_eq!(names.last(), Some(&"message_stop"), "{}", r.text());
    for e in &events {
        assert_eq!(
            e.json()["type"].as_str(),
            e.name.as_deref(),
            "the event name matches its type"
        );
    }
    for expected in ["content_block_start", "content_block_stop", "message_delta"] {
        assert!(names.contains(&expected), "{expected} in {names:?}");
    }
    let text: String = events
        .iter()
        .filter(|e| e.name.as_deref() == Some("content_block_delta"))
        .filter_map(|e| e.json()["delta"]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, STREAM_TOKEN.repeat(3));
    let delta = events
        .iter()
        .find(|e| e.name.as_deref() == Some("message_delta"))
        .map(Event::json)
        .expect("message_delta");
    assert_eq!(delta["delta"]["stop_reason"], "end_turn", "{delta}");
    assert_eq!(delta["usage"]["output_tokens"], TOKENS.out, "{delta}");
    assert_spend(&gw, &key, 2 * one);

    let t = wait_traces(&gw, &key, 2);
    for t in &t {
        assert_eq!(t.endpoint, "messages");
        assert_eq!(t.served_model.as_deref(), Some("gpt-test"));
        assert_eq!(t.provider.as_deref(), Some("mock"));
        assert_eq!(t.cost_nanos, one, "{t:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 6. /v1/responses
// ---------------------------------------------------------------------------------------

#[test]
fn responses_pass_through_plain_and_streamed_with_cached_tokens_priced() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let knobs = TOKENS.headers();
    let extra = pairs(&knobs);
    let one = TOKENS.openai_cost(&GPT);
    let body = json!({"model": "gpt-test", "input": "hello", "max_output_tokens": 64});

    // Plain.
    mock.clear();
    let r = post_json(&gw, "/v1/responses", &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["object"], "response", "{v}");
    assert_eq!(v["usage"]["input_tokens"], TOKENS.all_input());
    assert_eq!(
        v["usage"]["input_tokens_details"]["cached_tokens"],
        TOKENS.read
    );
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let up = &reqs[0];
    assert_eq!(path_only(&up.path), "/v1/responses");
    assert_eq!(
        up.header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_no_agent_token(up, &key);
    let sent = up.json().expect("json");
    assert_eq!(sent["model"], GPT_UPSTREAM);
    assert_eq!(sent["input"], "hello");
    assert_eq!(sent["max_output_tokens"], 64);
    let direct = replay_direct(&mock, up);
    assert_eq!(mask_volatile(&r.body), mask_volatile(&direct.body));
    assert_spend(&gw, &key, one);

    // Streamed: passed through unchanged; usage from response.completed.
    mock.clear();
    let mut body = body;
    body["stream"] = json!(true);
    let r = post_json(&gw, "/v1/responses", &key, &body, &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let up = &reqs[0];
    assert_eq!(path_only(&up.path), "/v1/responses");
    let sent = up.json().expect("json");
    assert_eq!(sent["model"], GPT_UPSTREAM);
    assert_eq!(sent["stream"], true);
    assert!(
        sent.get("stream_options").is_none(),
        "the Responses API takes no stream_options: {sent}"
    );
    let events = sse_events(&r.body);
    assert_eq!(
        events.last().and_then(|e| e.name.as_deref()),
        Some("response.completed"),
        "{}",
        r.text()
    );
    let direct = replay_direct(&mock, up);
    assert_eq!(direct.status, 200);
    assert_eq!(mask_volatile(&r.body), mask_volatile(&direct.body));
    assert_spend(&gw, &key, 2 * one);

    let t = wait_traces(&gw, &key, 2);
    for t in &t {
        assert_eq!(t.endpoint, "responses");
        assert_eq!(t.served_model.as_deref(), Some("gpt-test"));
        assert_eq!(t.provider.as_deref(), Some("mock"));
        assert_eq!(t.prompt_tokens, TOKENS.all_input());
        assert_eq!(t.completion_tokens, TOKENS.out);
        assert_eq!(t.cost_nanos, one, "{t:?}");
    }
}

#[test]
fn responses_and_embeddings_on_an_anthropic_model_are_400() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let r = post_json(
        &gw,
        "/v1/responses",
        &key,
        &json!({"model": "claude-test", "input": "hello"}),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "invalid_request");
    assert_eq!(r.header("x-spidergate-error-code"), Some("invalid_request"));
    let r = post_json(
        &gw,
        "/v1/embeddings",
        &key,
        &json!({"model": "claude-test", "input": "hello"}),
        &[],
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.code(), "invalid_request");
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
}

// ---------------------------------------------------------------------------------------
// 7. Fallback across provider kinds
// ---------------------------------------------------------------------------------------

#[test]
fn an_alias_falls_back_from_anthropic_to_openai_through_both_shapes() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let prompt = [
        ("x-mock-prompt-tokens", "30"),
        ("x-mock-completion-tokens", "7"),
        ("x-mock-status-model", CLAUDE_UPSTREAM),
    ];
    let served_cost = 30 * GPT.input + 7 * GPT.output;

    // Chat completions: Anthropic overloaded (529).
    mock.clear();
    let mut extra = prompt.to_vec();
    extra.push(("x-mock-status", "529"));
    let r = post_json(
        &gw,
        "/v1/chat/completions",
        &key,
        &chat_body("claude-first"),
        &extra,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-fallback-from"), Some("claude-test"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["content"], REPLY_TEXT);
    let reqs = mock.requests();
    let paths: Vec<&str> = reqs.iter().map(|r| path_only(&r.path)).collect();
    assert_eq!(paths, ["/v1/messages", "/v1/chat/completions"]);
    assert_eq!(reqs[0].json().expect("json")["model"], CLAUDE_UPSTREAM);
    assert_eq!(reqs[1].json().expect("json")["model"], GPT_UPSTREAM);
    assert_eq!(
        reqs[1].header("authorization"),
        Some(format!("Bearer {PROVIDER_KEY}").as_str())
    );
    assert_spend(&gw, &key, served_cost);

    // Messages: Anthropic unavailable (503); the OpenAI model answers in Anthropic's shape.
    mock.clear();
    let mut extra = prompt.to_vec();
    extra.push(("x-mock-status", "503"));
    let r = post_messages(&gw, &key, &messages_body("claude-first", false), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-fallback-from"), Some("claude-test"));
    let v = r.json();
    assert_eq!(v["type"], "message", "{v}");
    assert_eq!(v["content"][0]["text"], REPLY_TEXT);
    let reqs = mock.requests();
    let paths: Vec<&str> = reqs.iter().map(|r| path_only(&r.path)).collect();
    assert_eq!(paths, ["/v1/messages", "/v1/chat/completions"]);
    assert_eq!(reqs[0].header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    assert_eq!(reqs[1].json().expect("json")["model"], GPT_UPSTREAM);
    assert_spend(&gw, &key, 2 * served_cost);

    // Streamed Messages fall back too, before any byte reached the client.
    mock.clear();
    let r = post_messages(&gw, &key, &messages_body("claude-first", true), &extra);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-fallback-from"), Some("claude-test"));
    let names: Vec<String> = sse_events(&r.body)
        .into_iter()
        .filter_map(|e| e.name)
        .collect();
    assert_eq!(names.first().map(String::as_str), Some("message_start"));
    assert_eq!(names.last().map(String::as_str), Some("message_stop"));
    assert_spend(&gw, &key, 3 * served_cost);

    let t = wait_traces(&gw, &key, 3);
    let endpoints: Vec<&str> = t.iter().map(|t| t.endpoint.as_str()).collect();
    assert_eq!(endpoints, ["chat.completions", "messages", "messages"]);
    for t in &t {
        assert_eq!(t.requested_model.as_deref(), Some("claude-first"), "{t:?}");
        assert_eq!(t.served_model.as_deref(), Some("gpt-test"), "{t:?}");
        assert_eq!(t.provider.as_deref(), Some("mock"), "{t:?}");
        assert_eq!(t.fallback_from.as_deref(), Some("claude-test"), "{t:?}");
        assert_eq!(t.status, 200);
        assert_eq!(t.cost_nanos, served_cost, "{t:?}");
    }
}

// ---------------------------------------------------------------------------------------
// 8. Provider key pools
// ---------------------------------------------------------------------------------------

const POOL_K1: &str = "sk-ant-pool-one-1111111111";
const POOL_K2: &str = "sk-ant-pool-two-2222222222";

fn pool_gateway(mock: &MockProvider, kind: &str) -> Gateway {
    let base = if kind == "anthropic" {
        "{mock}"
    } else {
        "{mock}/v1"
    };
    GatewayBuilder::new(mock)
        .provider(&format!(
            "- name: pooled\n  kind: {kind}\n  base_url: \"{base}\"\n  api_key_envs: [SG_POOL_K1, SG_POOL_K2]"
        ))
        .models(&format!(
            "models:\n  - id: pool-model\n    provider: pooled\n    upstream_id: {POOL_UPSTREAM}\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 2\n    max_output_tokens: 1000\n"
        ))
        .env("SG_POOL_K1", POOL_K1)
        .env("SG_POOL_K2", POOL_K2)
        .admin("admin-secret-token")
        .start()
}

/// Arms the mock's key checks before the gateway opens any connection to it: the mock
/// decides whether to read a request's provider key when it starts waiting for the request,
/// so a connection idling from before the first `reject_key` would let a rejected key
/// through. Rejecting a key nobody uses switches the checks on from the start.
fn arm_key_rejections(mock: &MockProvider) {
    mock.reject_key("sk-never-used-by-the-gateway", 401, None);
}

/// The provider keys of the mock's requests since the last clear, in order.
fn keys_seen(mock: &MockProvider) -> Vec<String> {
    mock.requests()
        .iter()
        .map(|r| r.provider_key().unwrap_or("").to_string())
        .collect()
}

fn metric_line(text: &str, name: &str, env: &str) -> Option<String> {
    let prefix = format!("{name}{{provider=\"pooled\",key_env=\"{env}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

#[test]
fn a_key_pool_rotates_rests_a_refused_key_and_reports_every_key_resting() {
    let mock = mock();
    arm_key_rejections(&mock);
    let gw = pool_gateway(&mock, "anthropic");
    let key = gw.create_key(&[]);
    let body = messages_body("pool-model", false);
    let cost = 10 * POOL.input + 5 * POOL.output;

    // Round-robin: consecutive requests use the two keys in turn.
    mock.clear();
    for _ in 0..4 {
        let r = post_messages(&gw, &key, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = keys_seen(&mock);
    assert_eq!(seen.len(), 4);
    assert!(
        seen.windows(2).all(|w| w[0] != w[1]),
        "keys alternate: {seen:?}"
    );
    assert_eq!(seen.iter().filter(|k| *k == POOL_K1).count(), 2, "{seen:?}");
    assert_eq!(seen.iter().filter(|k| *k == POOL_K2).count(), 2, "{seen:?}");
    for r in mock.requests() {
        assert_eq!(r.header("authorization"), None);
        assert_eq!(r.json().expect("json")["model"], POOL_UPSTREAM);
    }

    // K1 refused with 429 and Retry-After 30: every request still succeeds (retried on K2),
    // and K1 is not used again while it rests.
    mock.reject_key(POOL_K1, 429, Some(30));
    mock.clear();
    for i in 0..4 {
        let r = post_messages(&gw, &key, &body, &[]);
        assert_eq!(
            r.status,
            200,
            "request {i} after K1 was refused: {}",
            r.text()
        );
    }
    let seen = keys_seen(&mock);
    let k1 = seen.iter().filter(|k| *k == POOL_K1).count();
    assert_eq!(k1, 1, "K1 is tried once, then rests: {seen:?}");
    assert_eq!(seen.len(), 5, "4 answers + 1 refused attempt: {seen:?}");
    let at = seen.iter().position(|k| k == POOL_K1).expect("K1 seen");
    assert_eq!(
        seen.get(at + 1).map(String::as_str),
        Some(POOL_K2),
        "the refused request is retried on K2: {seen:?}"
    );
    // Eight answered requests, each charged once; the refused attempt costs nothing.
    assert_spend(&gw, &key, 8 * cost);

    let text = gw.admin_call("GET", "/metrics", None).text();
    assert_eq!(
        metric_line(&text, "spidergate_provider_key_up", "SG_POOL_K1").as_deref(),
        Some("0"),
        "{text}"
    );
    assert_eq!(
        metric_line(&text, "spidergate_provider_key_up", "SG_POOL_K2").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        metric_line(
            &text,
            "spidergate_provider_key_consecutive_failures",
            "SG_POOL_K1"
        )
        .as_deref(),
        Some("1"),
        "{text}"
    );
    for secret in [POOL_K1, POOL_K2, ANTHROPIC_PROVIDER_KEY, PROVIDER_KEY] {
        assert!(!text.contains(secret), "a provider key in /metrics");
    }

    // K2 refused too: once both rest, the gateway answers 429 upstream_rate_limited itself,
    // with an honest Retry-After, and sends nothing upstream.
    mock.reject_key(POOL_K2, 429, Some(30));
    mock.clear();
    let r = post_messages(&gw, &key, &body, &[]);
    assert_eq!(r.status, 429, "K2 refused: {}", r.text());
    assert_eq!(keys_seen(&mock), [POOL_K2], "K1 still rests");
    mock.clear();
    let r = post_messages(&gw, &key, &body, &[]);
    assert_anthropic_error(&r, 429, "rate_limit_error", "upstream_rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    let r = post_json(
        &gw,
        "/v1/chat/completions",
        &key,
        &chat_body("pool-model"),
        &[],
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "upstream_rate_limited");
    let retry: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After");
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    assert!(
        mock.requests().is_empty(),
        "nothing sent while every key rests"
    );
    let text = gw.admin_call("GET", "/metrics", None).text();
    assert_eq!(
        metric_line(&text, "spidergate_provider_key_up", "SG_POOL_K2").as_deref(),
        Some("0"),
        "{text}"
    );
}

#[test]
fn a_pool_key_refused_401_without_retry_after_rests_about_a_second() {
    let mock = mock();
    arm_key_rejections(&mock);
    let gw = pool_gateway(&mock, "openai");
    let key = gw.create_key(&[]);
    let body = chat_body("pool-model");

    mock.reject_key(POOL_K1, 401, None);
    mock.clear();
    for _ in 0..3 {
        let r = post_json(&gw, "/v1/chat/completions", &key, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let seen = keys_seen(&mock);
    assert_eq!(
        seen.iter().filter(|k| *k == POOL_K1).count(),
        1,
        "K1 refused once, then rests: {seen:?}"
    );
    for r in mock.requests() {
        assert_eq!(path_only(&r.path), "/v1/chat/completions");
        assert_eq!(r.header("x-api-key"), None);
    }
    let refused_at = Instant::now();

    // The first rest is 1 s: K1 is back soon after, and a success clears its strikes.
    mock.clear_rejections();
    mock.clear();
    wait_for(Duration::from_secs(5), "K1 back in rotation", || {
        let r = post_json(&gw, "/v1/chat/completions", &key, &body, &[]);
        assert_eq!(r.status, 200, "{}", r.text());
        keys_seen(&mock).iter().any(|k| k == POOL_K1).then_some(())
    });
    assert!(
        refused_at.elapsed() >= Duration::from_millis(500),
        "K1 used again after {:?}: it did not rest",
        refused_at.elapsed()
    );
    let text = gw.admin_call("GET", "/metrics", None).text();
    assert_eq!(
        metric_line(&text, "spidergate_provider_key_up", "SG_POOL_K1").as_deref(),
        Some("1"),
        "{text}"
    );
    assert_eq!(
        metric_line(
            &text,
            "spidergate_provider_key_consecutive_failures",
            "SG_POOL_K1"
        )
        .as_deref(),
        Some("0"),
        "{text}"
    );
}

#[test]
fn a_lone_provider_key_never_rests() {
    let mock = mock();
    arm_key_rejections(&mock);
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let body = messages_body("claude-test", false);
    mock.reject_key(ANTHROPIC_PROVIDER_KEY, 429, Some(30));
    for _ in 0..2 {
        let r = post_messages(&gw, &key, &body, &[]);
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.json()["type"], "error");
    }
    mock.clear_rejections();
    mock.clear();
    let r = post_messages(&gw, &key, &body, &[]);
    assert_eq!(r.status, 200, "the lone key was not parked: {}", r.text());
    assert_eq!(mock.requests().len(), 1);
}

// ---------------------------------------------------------------------------------------
// 9. Traces
// ---------------------------------------------------------------------------------------

#[test]
fn traces_name_the_messages_and_responses_endpoints_and_the_serving_provider() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(MODELS_YAML)
        .admin("admin-secret-token")
        .start();
    let key = gw.create_key(&[]);
    let r = post_messages(&gw, &key, &messages_body("claude-test", false), &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_json(
        &gw,
        "/v1/responses",
        &key,
        &json!({"model": "gpt-test", "input": "hello"}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post_messages(&gw, &key, &messages_body("claude-nope", false), &[]);
    assert_eq!(r.status, 404);

    let t = wait_traces(&gw, &key, 3);
    assert_eq!(t[0].endpoint, "messages");
    assert_eq!(t[0].served_model.as_deref(), Some("claude-test"));
    assert_eq!(t[0].provider.as_deref(), Some("mock-anthropic"));
    assert_eq!(t[1].endpoint, "responses");
    assert_eq!(t[1].served_model.as_deref(), Some("gpt-test"));
    assert_eq!(t[1].provider.as_deref(), Some("mock"));
    assert_eq!(t[2].endpoint, "messages");
    assert_eq!(
        (t[2].status, t[2].error_code.as_deref()),
        (404, Some("model_not_found"))
    );

    // The admin API shows the same.
    let v = gw
        .admin_call(
            "GET",
            &format!("/admin/traces?key={}&limit=50", key.id),
            None,
        )
        .json();
    let rows = v["data"].as_array().expect("data");
    let find = |endpoint: &str, status: i64| {
        rows.iter()
            .find(|r| r["endpoint"] == endpoint && r["status"] == status)
            .unwrap_or_else(|| panic!("no {endpoint} {status} trace in {v}"))
    };
    let m = find("messages", 200);
    assert_eq!(m["requested_model"], "claude-test");
    assert_eq!(m["served_model"], "claude-test");
    assert_eq!(m["provider"], "mock-anthropic");
    assert_eq!(m["cost_nanodollars"], 10 * CLAUDE.input + 5 * CLAUDE.output);
    let resp = find("responses", 200);
    assert_eq!(resp["served_model"], "gpt-test");
    assert_eq!(resp["provider"], "mock");
    assert_eq!(resp["cost_nanodollars"], 10 * GPT.input + 5 * GPT.output);
    let nf = find("messages", 404);
    assert_eq!(nf["error_code"], "model_not_found");
}

/// An answer whose length the gateway changes (a translation here) goes out chunked, so the
/// client's connection carries the next request: without a length or chunking it would be
/// delimited by closing the connection (and every request would need a new one).
#[test]
fn a_translated_answer_is_chunked_and_its_connection_serves_the_next_request() {
    use std::io::{BufReader, Write};
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let body = chat_body("claude-test").to_string();
    let stream = std::net::TcpStream::connect(gw.addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    for round in 0..2 {
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            key.bearer(),
            body.len()
        );
        writer.write_all(head.as_bytes()).unwrap();
        writer.write_all(body.as_bytes()).unwrap();
        let (status, headers) = common::read_head(&mut reader).unwrap();
        assert_eq!(status, 200, "round {round}");
        let framing = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
        assert_eq!(
            framing("transfer-encoding").as_deref(),
            Some("chunked"),
            "round {round}: {headers:?}"
        );
        assert_eq!(framing("content-length"), None, "round {round}");
        let answer: Value =
            serde_json::from_slice(&common::read_body(&mut reader, &headers).unwrap()).unwrap();
        assert_eq!(answer["object"], "chat.completion", "round {round}");
    }
    assert_eq!(
        mock.requests().len(),
        2,
        "both requests went up, on one client connection"
    );
}

/// SPEC §3: the agent key is accepted as `x-api-key` or as a bearer token. A client that
/// sends its key in one and something else in the other (a placeholder bearer, an SDK's
/// default) is authenticated by the key; two headers without one are 401.
#[test]
fn the_agent_key_counts_in_either_header_whatever_the_other_holds() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let body = messages_body("claude-test", false).to_string();
    let bearer = key.bearer();
    for (authorization, x_api_key, want) in [
        ("Bearer junk", key.secret.as_str(), 200),
        (bearer.as_str(), "junk", 200),
        ("Bearer junk", "junk", 401),
    ] {
        let r = gw.post(
            "/v1/messages",
            authorization,
            body.as_bytes(),
            &[("x-api-key", x_api_key)],
        );
        assert_eq!(
            r.status,
            want,
            "{authorization} / {x_api_key}: {}",
            r.text()
        );
    }
}

/// SPEC §2: key identifiers in an upstream error body are masked. A provider key with no
/// prefix the gateway knows (`gsk_`, `xai-`, `fw_`, none at all), echoed by its upstream in
/// a 401, reaches the agent masked past its first bytes, in either API shape; the status,
/// `type` and `code` stay.
#[test]
fn a_provider_key_echoed_in_an_upstream_error_is_masked_whatever_its_prefix() {
    const ODD_KEY: &str = "gsk_9f8e7d6c5b4a3928171600aa";
    let mock = mock();
    arm_key_rejections(&mock);
    let gw = GatewayBuilder::new(&mock)
        .provider("- name: odd\n  kind: openai\n  base_url: \"{mock}/v1\"\n  api_key_env: SG_ODD_KEY")
        .models("models:\n  - id: odd-model\n    provider: odd\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 2\n    max_output_tokens: 1000\n")
        .env("SG_ODD_KEY", ODD_KEY)
        .start();
    let key = gw.create_key(&[]);
    mock.reject_key(ODD_KEY, 401, None);
    let messages = json!({"model": "odd-model", "max_tokens": 5,
        "messages": [{"role": "user", "content": "hi"}]});
    for path in ["/v1/chat/completions", "/v1/messages"] {
        let r = post_json(&gw, path, &key, &messages, &[]);
        assert_eq!(r.status, 401, "{path}: {}", r.text());
        let text = r.text();
        assert!(
            text.contains("gsk_"),
            "{path}: the key's start tells which: {text}"
        );
        assert!(
            !text.contains(&ODD_KEY[4..]),
            "{path}: the key leaked: {text}"
        );
        assert_eq!(
            mock.requests()
                .last()
                .and_then(|q| q.provider_key().map(str::to_string)),
            Some(ODD_KEY.to_string()),
            "{path}: the upstream got the key (and echoed it)"
        );
    }
}

/// SPEC §2: "An estimate is never below what the provider bills." A non-streamed answer
/// whose usage cannot be read (bytes after its JSON; an empty body) is charged its
/// reservation, estimated: its bytes bound nothing of what a reasoning model bills (900
/// tokens for "hello" here). The same answer without the stray byte is charged as reported.
#[test]
fn a_whole_answer_whose_usage_cannot_be_read_is_charged_its_reservation() {
    let json = r#"{"id":"x","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],"usage":{"prompt_tokens":20,"completion_tokens":900,"total_tokens":920}}"#;
    let reply = |body: &str| http_reply("200 OK", "application/json", body);
    let upstreams = [
        ("clean", canned_upstream(reply(json))),
        // A byte-order mark: read as the client reads it, so charged as reported.
        ("bom", canned_upstream(reply(&format!("\u{feff}{json}")))),
        ("trailing", canned_upstream(reply(&format!("{json}x")))),
        ("empty", canned_upstream(reply(""))),
    ];
    let mock = mock();
    let gw = gateway_on_canned(&mock, &upstreams);
    for (name, _) in &upstreams {
        let key = gw.create_key(&[]);
        let body = json!({"model": name, "max_tokens": 1000, "messages": [{"role": "user", "content": "hi"}]});
        let r = gw.post(
            "/v1/chat/completions",
            &key.bearer(),
            body.to_string().as_bytes(),
            &[],
        );
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        let t = wait_for(Duration::from_secs(5), "trace", || {
            gw.trace_rows(&key.id)
                .into_iter()
                .find(|t| t.endpoint == "chat.completions")
        });
        if *name == "clean" || *name == "bom" {
            assert_eq!(
                (
                    t.prompt_tokens,
                    t.completion_tokens,
                    t.cost_nanos,
                    t.usage_estimated
                ),
                (20, 900, 20 * 1_000 + 900 * 2_000, false),
                "{name}"
            );
        } else {
            // The reservation: the prompt's bound and the 1,000 tokens of `max_tokens`.
            assert_eq!(t.completion_tokens, 1_000, "{name}");
            assert!(t.usage_estimated, "{name}");
            assert_eq!(
                t.cost_nanos,
                t.prompt_tokens * 1_000 + 1_000 * 2_000,
                "{name}"
            );
            assert!(t.cost_nanos > 20 * 1_000 + 900 * 2_000, "{name}");
        }
        assert_eq!(gw.usage(&key)["spend_nanodollars"], t.cost_nanos);
    }
}

/// SPEC §3: `/v1/messages` on an `openai` model is translated, streams included; §2: a
/// stream cut before its usage is charged for the output delivered so far, "whatever the
/// API shape or translation". Some OpenAI-compatible servers (Mistral's) stream `content`
/// as a list of parts: their text reaches the client, and counts when the stream is cut.
#[test]
fn a_chat_stream_with_content_as_parts_is_translated_and_counted_when_cut() {
    let chunk = |delta: &str| {
        format!(
            "data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
        )
    };
    let part = "p".repeat(200);
    let parts = [
        chunk(r#"{"role":"assistant","content":""}"#),
        chunk(&format!(
            r#"{{"content":[{{"type":"text","text":"{part}"}}]}}"#
        )),
        chunk(&format!(
            r#"{{"content":[{{"type":"thinking","thinking":[{{"type":"text","text":"{part}"}}]}},{{"type":"text","text":"{part}"}}]}}"#
        )),
    ]
    .concat();
    let whole = format!(
        "{parts}data: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{}},\"finish_reason\":\"stop\"}}]}}\n\ndata: {{\"id\":\"c1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{{\"prompt_tokens\":7,\"completion_tokens\":450,\"total_tokens\":457}}}}\n\ndata: [DONE]\n\n"
    );
    let sse = |body: &str, close: bool| {
        if close {
            format!("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n{body}")
                .into_bytes()
        } else {
            http_reply("200 OK", "text/event-stream", body)
        }
    };
    let upstreams = [
        ("whole", canned_upstream(sse(&whole, false))),
        ("cut", canned_upstream(sse(&parts, true))),
    ];
    let mock = mock();
    let gw = gateway_on_canned(&mock, &upstreams);
    for (name, _) in &upstreams {
        let key = gw.create_key(&[]);
        let body = json!({"model": name, "max_tokens": 1000, "stream": true,
                          "messages": [{"role": "user", "content": "hi"}]});
        let bearer = key.bearer();
        let stream = send_request(
            gw.addr,
            "POST",
            "/v1/messages",
            &[("Authorization", bearer.as_str())],
            body.to_string().as_bytes(),
        )
        .expect("send");
        let r = read_response(stream).expect("a whole body");
        assert_eq!(r.status, 200, "{name}");
        let text = r.text();
        // Both text parts, not the thinking.
        assert_eq!(
            text.matches(&format!("\"text_delta\",\"text\":\"{part}\""))
                .count(),
            2,
            "{name}: {text}"
        );
        let t = wait_for(Duration::from_secs(5), "trace", || {
            gw.trace_rows(&key.id)
                .into_iter()
                .find(|t| t.endpoint == "messages")
        });
        if *name == "whole" {
            assert!(text.contains("message_stop"), "{text}");
            assert_eq!((t.completion_tokens, t.usage_estimated), (450, false));
        } else {
            assert!(text.contains("event: error"), "{text}");
            // One token a byte of what was delivered: two text parts and the thinking.
            assert!(t.completion_tokens >= 600, "{t:?}");
            assert!(t.usage_estimated, "{t:?}");
        }
    }
}

/// A gateway whose models are the canned upstreams, each an `openai` provider and a model of
/// its name at 1 and 2 USD a million tokens (1,000 and 2,000 nano-USD a token).
fn gateway_on_canned(mock: &MockProvider, upstreams: &[(&str, std::net::SocketAddr)]) -> Gateway {
    let mut builder = GatewayBuilder::new(mock);
    let mut models = String::from("models:\n");
    for (name, addr) in upstreams {
        builder = builder.provider(&format!(
            "  - name: {name}\n    kind: openai\n    base_url: \"http://{addr}/v1\"\n"
        ));
        models.push_str(&format!(
            "  - id: {name}\n    provider: {name}\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 2\n    max_output_tokens: 4000\n"
        ));
    }
    builder.models(&models).start()
}
