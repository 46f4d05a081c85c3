//! Anthropic's Messages API on `POST /v1/messages`: plain, streamed, tool use, cache usage,
//! errors in Anthropic's shape and the real API's minimal validation.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mock, Client, Response};
use serde_json::{json, Value};

const KEY: (&str, &str) = ("x-api-key", "sk-ant-provider");

fn request(extra: Value) -> Value {
    let mut body = json!({
        "model": "claude-test",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "hi"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

async fn messages(client: &mut Client, headers: &[(&str, &str)], body: Value) -> Response {
    client
        .post("/v1/messages", headers, body.to_string().as_bytes())
        .await
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

#[tokio::test]
async fn plain_message_with_cache_usage_and_recorded_headers() {
    let mock = mock().await;
    assert_eq!(mock.anthropic_base_url(), format!("http://{}", mock.addr()));
    let mut client = Client::connect(&mock).await;
    let headers = [
        KEY,
        ("anthropic-version", "2023-06-01"),
        ("x-mock-prompt-tokens", "100"),
        ("x-mock-cache-read-tokens", "30"),
        ("x-mock-cache-write-tokens", "20"),
        ("x-mock-completion-tokens", "7"),
    ];
    let resp = messages(&mut client, &headers, request(json!({}))).await;
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert!(json["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(json["type"], "message");
    assert_eq!(json["role"], "assistant");
    assert_eq!(json["model"], "claude-test");
    assert_eq!(json["content"][0]["type"], "text");
    assert!(!json["content"][0]["text"].as_str().unwrap().is_empty());
    assert_eq!(json["stop_reason"], "end_turn");
    assert_eq!(json["stop_sequence"], Value::Null);
    assert_eq!(
        json["usage"],
        json!({"input_tokens": 100, "output_tokens": 7, "cache_creation_input_tokens": 20, "cache_read_input_tokens": 30})
    );
    assert_eq!(mock.served_usage(), (150, 7));
    assert_eq!(mock.served_cache(), (30, 20));
    let recorded = &mock.requests()[0];
    assert_eq!(recorded.path, "/v1/messages");
    assert_eq!(recorded.provider_key(), Some("sk-ant-provider"));
    assert_eq!(recorded.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(recorded.header("authorization"), None);
}

#[tokio::test]
async fn streamed_message_has_anthropic_events_and_cumulative_usage() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [
        KEY,
        ("x-mock-chunks", "4"),
        ("x-mock-prompt-tokens", "12"),
        ("x-mock-cache-read-tokens", "3"),
        ("x-mock-completion-tokens", "9"),
    ];
    let resp = messages(&mut client, &headers, request(json!({"stream": true}))).await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.complete);
    let events = resp.named_events();
    assert_eq!(
        names(&events),
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
        ]
    );
    for (name, data) in &events {
        assert_eq!(
            data["type"],
            name.as_str(),
            "data.type repeats the event name"
        );
    }
    let start = &events[0].1["message"];
    assert_eq!(start["model"], "claude-test");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(
        start["usage"],
        json!({"input_tokens": 12, "output_tokens": 1, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 3})
    );
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events[3..7]
        .iter()
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "text_delta");
            d["delta"]["text"].as_str().unwrap()
        })
        .collect();
    assert_eq!(text, "tok tok tok tok ");
    assert_eq!(
        events[8].1,
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 9}})
    );
    assert_eq!(mock.served_usage(), (15, 9));
    assert_eq!(mock.served_cache(), (3, 0));
}

#[tokio::test]
async fn tool_call_plain_and_streamed() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [KEY, ("x-mock-tool-call", "get_weather")];
    let resp = messages(&mut client, &headers, request(json!({}))).await;
    let json = resp.json();
    assert_eq!(json["stop_reason"], "tool_use");
    let block = &json["content"][0];
    assert_eq!(block["type"], "tool_use");
    assert!(block["id"].as_str().unwrap().starts_with("toolu_"));
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({"city": "Paris"}));

    let headers = [
        KEY,
        ("x-mock-tool-call", "get_weather"),
        ("x-mock-chunks", "5"),
    ];
    let resp = messages(&mut client, &headers, request(json!({"stream": true}))).await;
    let events = resp.named_events();
    let block = &events[1].1["content_block"];
    assert_eq!(block["type"], "tool_use");
    assert_eq!(block["name"], "get_weather");
    assert_eq!(block["input"], json!({}));
    let pieces: Vec<&str> = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, d)| {
            assert_eq!(d["delta"]["type"], "input_json_delta");
            d["delta"]["partial_json"].as_str().unwrap()
        })
        .collect();
    assert_eq!(pieces.len(), 5);
    let input: Value = serde_json::from_str(&pieces.concat()).unwrap();
    assert_eq!(input, json!({"city": "Paris"}));
    let delta = events.iter().find(|(n, _)| n == "message_delta").unwrap();
    assert_eq!(delta.1["delta"]["stop_reason"], "tool_use");
}

#[tokio::test]
async fn validation_and_errors_use_anthropic_shape() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = messages(&mut client, &[], request(json!({}))).await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.json()["type"], "error");
    assert_eq!(resp.json()["error"]["type"], "authentication_error");
    // A bearer token counts as credentials (the anthropic Python SDK sends its key so).
    let bearer = [("authorization", "Bearer sk-ant-provider")];
    let resp = messages(&mut client, &bearer, request(json!({}))).await;
    assert_eq!(resp.status, 200);

    let resp = messages(
        &mut client,
        &[KEY],
        json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");
    assert!(resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("max_tokens"));
    let resp = messages(&mut client, &[KEY], json!({"model": "m", "max_tokens": 5})).await;
    assert_eq!(resp.status, 400);
    assert!(resp.json()["error"]["message"]
        .as_str()
        .unwrap()
        .contains("messages"));
    let resp = client.post("/v1/messages", &[KEY], b"{nope").await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["type"], "invalid_request_error");

    for (status, kind) in [
        ("429", "rate_limit_error"),
        ("500", "api_error"),
        ("529", "overloaded_error"),
        ("403", "permission_error"),
        ("402", "billing_error"),
    ] {
        let headers = [KEY, ("x-mock-status", status), ("x-mock-leak-headers", "1")];
        let resp = messages(&mut client, &headers, request(json!({"stream": true}))).await;
        assert_eq!(resp.status.to_string(), status);
        assert_eq!(resp.json()["type"], "error");
        assert_eq!(resp.json()["error"]["type"], kind);
        assert_eq!(resp.header("anthropic-organization-id"), Some("leak"));
    }
    assert_eq!(
        mock.served_usage(),
        (10, 5),
        "only the bearer request reported usage"
    );
}

#[tokio::test]
async fn knobs_cut_delay_and_silence_streams() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [KEY, ("x-mock-break-after", "2"), ("x-mock-chunks", "5")];
    let resp = messages(&mut client, &headers, request(json!({"stream": true}))).await;
    assert!(!resp.complete);
    let events = resp.named_events();
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta"
        ]
    );
    assert_eq!(
        mock.served_usage(),
        (10, 0),
        "input reported in message_start only"
    );

    let mut client = Client::connect(&mock).await;
    let headers = [
        KEY,
        ("x-mock-no-usage", "1"),
        ("x-mock-chunk-delay-ms", "5"),
    ];
    let resp = messages(&mut client, &headers, request(json!({"stream": true}))).await;
    assert!(resp.complete);
    let events = resp.named_events();
    assert_eq!(events[0].1["message"].get("usage"), None);
    assert_eq!(events[events.len() - 2].1.get("usage"), None);
    let resp = messages(
        &mut client,
        &[KEY, ("x-mock-no-usage", "1")],
        request(json!({})),
    )
    .await;
    assert_eq!(resp.json().get("usage"), None);

    let headers = [KEY, ("x-mock-completion-tokens", "max")];
    let resp = messages(&mut client, &headers, request(json!({"max_tokens": 321}))).await;
    assert_eq!(resp.json()["usage"]["output_tokens"], 321);

    let headers = [
        KEY,
        ("x-mock-status", "503"),
        ("x-mock-status-model", "other"),
    ];
    let resp = messages(&mut client, &headers, request(json!({}))).await;
    assert_eq!(resp.status, 200, "status-model names another model");
}

/// `x-mock-prompt-tokens: bytes` bills what the body does not show, as Anthropic documents:
/// a request with `tools` pays the tool-use system prompt (346 tokens with `tool_choice`
/// auto or none given, 313 with any/tool), on the wire and in `served_usage`.
#[tokio::test]
async fn bytes_mode_bills_the_tool_use_system_prompt_beyond_the_body() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [KEY, ("x-mock-prompt-tokens", "bytes")];
    let tools = json!([{"name": "get_weather", "input_schema": {"type": "object"}}]);
    let cases = [
        (request(json!({})), 0),
        (request(json!({"tools": tools})), 346),
        (
            request(json!({"tools": tools, "tool_choice": {"type": "any"}})),
            313,
        ),
    ];
    let mut billed = 0;
    for (body, hidden) in cases {
        let len = body.to_string().len() as u64;
        let resp = messages(&mut client, &headers, body.clone()).await;
        assert_eq!(resp.status, 200, "{body}");
        assert_eq!(resp.json()["usage"]["input_tokens"], len + hidden, "{body}");
        billed += len + hidden;
    }
    assert_eq!(mock.served_usage().0, billed);
}
