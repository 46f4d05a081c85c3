//! OpenAI's Responses API on `POST .../responses`: plain, streamed, function calls, cached
//! input, and the shared knobs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mock, Client, Response};
use serde_json::{json, Value};

async fn responses(client: &mut Client, headers: &[(&str, &str)], body: Value) -> Response {
    client
        .post("/v1/responses", headers, body.to_string().as_bytes())
        .await
}

#[tokio::test]
async fn plain_response_with_cached_usage() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [
        ("x-mock-prompt-tokens", "20"),
        ("x-mock-cache-read-tokens", "6"),
        ("x-mock-completion-tokens", "4"),
    ];
    let resp = responses(
        &mut client,
        &headers,
        json!({"model": "gpt-r", "input": "hi"}),
    )
    .await;
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert!(json["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(json["object"], "response");
    assert_eq!(json["status"], "completed");
    assert_eq!(json["model"], "gpt-r");
    let item = &json["output"][0];
    assert_eq!(item["type"], "message");
    assert_eq!(item["status"], "completed");
    assert_eq!(item["role"], "assistant");
    assert_eq!(item["content"][0]["type"], "output_text");
    assert_eq!(item["content"][0]["annotations"], json!([]));
    assert_eq!(
        json["usage"],
        json!({"input_tokens": 26, "input_tokens_details": {"cached_tokens": 6}, "output_tokens": 4,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 30})
    );
    assert_eq!(mock.served_usage(), (26, 4));
    assert_eq!(mock.served_cache(), (6, 0));
}

#[tokio::test]
async fn streamed_response_has_every_event_in_sequence() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let body = json!({"model": "gpt-r", "input": "hi", "stream": true});
    let resp = responses(&mut client, &[("x-mock-chunks", "2")], body).await;
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.complete);
    let events = resp.named_events();
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_text.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed"
        ]
    );
    for (i, (name, data)) in events.iter().enumerate() {
        assert_eq!(data["type"], name.as_str());
        assert_eq!(data["sequence_number"], i);
    }
    assert_eq!(events[0].1["response"]["status"], "in_progress");
    assert_eq!(events[0].1["response"]["usage"], Value::Null);
    assert_eq!(events[4].1["delta"], "tok ");
    assert_eq!(events[6].1["text"], "tok tok ");
    let done = &events[9].1["response"];
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"][0]["content"][0]["text"], "tok tok ");
    assert_eq!(done["usage"]["total_tokens"], 15);
    assert_eq!(mock.served_usage(), (10, 5));
}

#[tokio::test]
async fn function_call_plain_and_streamed() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [("x-mock-tool-call", "get_weather")];
    let resp = responses(&mut client, &headers, json!({"model": "m", "input": "hi"})).await;
    let item = &resp.json()["output"][0];
    assert_eq!(item["type"], "function_call");
    assert_eq!(item["name"], "get_weather");
    assert_eq!(item["arguments"], r#"{"city":"Paris"}"#);
    assert!(item["call_id"].as_str().unwrap().starts_with("call_"));

    let headers = [("x-mock-tool-call", "get_weather"), ("x-mock-chunks", "3")];
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let events = responses(&mut client, &headers, body).await.named_events();
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.function_call_arguments.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(deltas, r#"{"city":"Paris"}"#);
    let done = events
        .iter()
        .find(|(n, _)| n == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(done.1["arguments"], deltas);
    assert_eq!(
        events.last().unwrap().1["response"]["output"][0]["type"],
        "function_call"
    );
}

#[tokio::test]
async fn knobs_apply_to_responses() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = responses(
        &mut client,
        &[("x-mock-status", "429")],
        json!({"model": "m"}),
    )
    .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["error"]["code"], "rate_limit_exceeded");

    let headers = [("x-mock-completion-tokens", "max")];
    let body = json!({"model": "m", "input": "hi", "max_output_tokens": 77});
    let resp = responses(&mut client, &headers, body).await;
    assert_eq!(resp.json()["usage"]["output_tokens"], 77);

    let resp = responses(
        &mut client,
        &[("x-mock-no-usage", "1")],
        json!({"model": "m"}),
    )
    .await;
    assert_eq!(resp.json()["usage"], Value::Null);

    let headers = [("x-mock-break-after", "1"), ("x-mock-chunks", "3")];
    let body = json!({"model": "m", "input": "hi", "stream": true});
    let resp = responses(&mut client, &headers, body).await;
    assert!(!resp.complete);
    let events = resp.named_events();
    assert_eq!(events.last().unwrap().0, "response.output_text.delta");
    assert_eq!(events.len(), 5);
    assert_eq!(mock.served_usage(), (10, 77));
}

/// `x-mock-prompt-tokens: bytes` bills stored context the body only names
/// (`previous_response_id`: `x-mock-stored-tokens`) and server-side tools
/// (`x-mock-server-tool-tokens` each), beyond the body's bytes.
#[tokio::test]
async fn bytes_mode_bills_stored_context_and_server_tools_beyond_the_body() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let headers = [
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-stored-tokens", "5000"),
        ("x-mock-server-tool-tokens", "700"),
    ];
    let cases = [
        (json!({"model": "m", "input": "hi"}), 0),
        (
            json!({"model": "m", "input": "go on", "previous_response_id": "resp_1"}),
            5000,
        ),
        (
            json!({"model": "m", "input": "news?", "tools": [{"type": "web_search"}]}),
            700,
        ),
    ];
    for (body, hidden) in cases {
        let len = body.to_string().len() as u64;
        let resp = responses(&mut client, &headers, body.clone()).await;
        assert_eq!(resp.status, 200, "{body}");
        assert_eq!(resp.json()["usage"]["input_tokens"], len + hidden, "{body}");
    }
}
