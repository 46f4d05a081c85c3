//! Provider keys: `reject_key` answers one key's requests with an error in the route's shape,
//! and recorded requests tell which key each used. Also OpenAI chat tool calls and cached
//! input.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mock, Client};
use serde_json::{json, Value};

#[tokio::test]
async fn rejected_key_gets_status_retry_after_and_route_shape() {
    let mock = mock().await;
    mock.reject_key("sk-bad", 429, Some(7));
    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(&[("authorization", "Bearer sk-bad")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.header("retry-after"), Some("7"));
    assert_eq!(resp.json()["error"]["code"], "rate_limit_exceeded");

    let resp = client
        .chat(
            &[("authorization", "Bearer sk-good")],
            json!({"model": "m"}),
        )
        .await;
    assert_eq!(resp.status, 200);

    let body = json!({"model": "c", "max_tokens": 5, "messages": []}).to_string();
    let resp = client
        .post("/v1/messages", &[("x-api-key", "sk-bad")], body.as_bytes())
        .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["error"]["type"], "rate_limit_error");

    mock.reject_key("sk-bad", 401, None);
    let resp = client
        .post("/v1/messages", &[("x-api-key", "sk-bad")], body.as_bytes())
        .await;
    assert_eq!(resp.status, 401);
    assert_eq!(resp.header("retry-after"), None);
    assert_eq!(resp.json()["error"]["type"], "authentication_error");

    mock.clear_rejections();
    let resp = client
        .post("/v1/messages", &[("x-api-key", "sk-bad")], body.as_bytes())
        .await;
    assert_eq!(resp.status, 200);

    let used: Vec<Option<String>> = mock
        .requests()
        .iter()
        .map(|r| r.provider_key().map(str::to_owned))
        .collect();
    let bad = Some("sk-bad".to_owned());
    assert_eq!(
        used,
        [
            bad.clone(),
            Some("sk-good".to_owned()),
            bad.clone(),
            bad.clone(),
            bad
        ]
    );
    assert_eq!(
        mock.served_usage(),
        (20, 10),
        "rejected requests report no usage"
    );
}

#[tokio::test]
async fn chat_tool_call_plain_and_streamed() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(
            &[("x-mock-tool-call", "get_weather")],
            json!({"model": "m"}),
        )
        .await;
    let choice = &resp.json()["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls");
    assert_eq!(choice["message"]["content"], Value::Null);
    let call = &choice["message"]["tool_calls"][0];
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "get_weather");
    assert_eq!(call["function"]["arguments"], r#"{"city":"Paris"}"#);

    let headers = [("x-mock-tool-call", "get_weather"), ("x-mock-chunks", "4")];
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
    let resp = client.chat(&headers, body).await;
    assert!(resp.complete);
    let events = resp.events();
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let first = &chunks[0]["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(first["function"]["name"], "get_weather");
    assert_eq!(first["function"]["arguments"], "");
    assert!(first["id"].as_str().unwrap().starts_with("call_"));
    let arguments: String = chunks[1..5]
        .iter()
        .map(|c| {
            let call = &c["choices"][0]["delta"]["tool_calls"][0];
            assert_eq!(call["index"], 0);
            call["function"]["arguments"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(arguments, r#"{"city":"Paris"}"#);
    assert_eq!(chunks[5]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(chunks[6]["usage"]["total_tokens"], 15);
}

#[tokio::test]
async fn chat_reports_cached_tokens_inside_prompt_tokens() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [
        ("x-mock-prompt-tokens", "10"),
        ("x-mock-cache-read-tokens", "40"),
        ("x-mock-cache-write-tokens", "5"),
    ];
    let resp = client.chat(&headers, json!({"model": "m"})).await;
    assert_eq!(
        resp.json()["usage"],
        json!({"prompt_tokens": 55, "completion_tokens": 5, "total_tokens": 60,
               "prompt_tokens_details": {"cached_tokens": 40}})
    );
    assert_eq!(mock.served_usage(), (55, 5));
    assert_eq!(mock.served_cache(), (40, 0), "OpenAI has no cache writes");
}
