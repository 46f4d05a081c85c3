//! OpenAI chat completions, embeddings and models: plain, streamed, and the usage knobs.
#![allow(clippy::unwrap_used)]

mod common;

use common::{mock, Client};
use serde_json::{json, Value};

/// `x-mock-completion-tokens: max` never reports more than this.
const MAX_MODE_CAP: u64 = 1_000_000_000;
const EMBEDDING_DIMS: usize = 8;

#[tokio::test]
async fn plain_chat_echoes_model_and_reports_default_usage() {
    let mock = mock().await;
    assert_eq!(
        mock.base_url(),
        format!("http://127.0.0.1:{}/v1", mock.addr().port())
    );
    let mut client = Client::connect(&mock).await;
    let body = json!({"model": "gpt-\"4o\"", "messages": [{"role": "user", "content": "hi"}]});
    let resp = client
        .chat(&[("authorization", "Bearer sk-up")], body.clone())
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("application/json"));
    let json = resp.json();
    assert_eq!(json["object"], "chat.completion");
    assert_eq!(json["model"], "gpt-\"4o\"");
    assert_eq!(json["choices"][0]["message"]["role"], "assistant");
    assert_eq!(json["choices"][0]["finish_reason"], "stop");
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
    );
    assert_eq!(mock.served_usage(), (10, 5));

    let recorded = mock.requests();
    assert_eq!(recorded.len(), 1);
    assert_eq!(recorded[0].method, "POST");
    assert_eq!(recorded[0].path, "/v1/chat/completions");
    assert_eq!(recorded[0].header("Authorization"), Some("Bearer sk-up"));
    assert_eq!(recorded[0].json(), Some(body));

    mock.clear();
    assert!(mock.requests().is_empty());
    assert_eq!(mock.served_usage(), (0, 0));
}

#[tokio::test]
async fn usage_knobs_and_no_usage() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let knobs = [
        ("x-mock-prompt-tokens", "123"),
        ("x-mock-completion-tokens", "45"),
    ];
    let resp = client.chat(&knobs, json!({"model": "m"})).await;
    assert_eq!(resp.json()["usage"]["total_tokens"], 168);
    let resp = client
        .chat(&[("X-Mock-No-Usage", "1")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 200);
    assert!(resp.json().get("usage").is_none());
    assert_eq!(mock.served_usage(), (123, 45));
}

#[tokio::test]
async fn bytes_and_max_billing_modes() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let knobs = [
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-completion-tokens", "max"),
    ];
    let cases = [
        (json!({"model": "m"}), 16),
        (json!({"model": "m", "max_tokens": 7}), 7),
        (
            json!({"model": "m", "max_tokens": 3, "max_completion_tokens": 9, "n": 2}),
            18,
        ),
        (
            json!({"model": "m", "max_completion_tokens": 40, "max_tokens": 1}),
            40,
        ),
        (json!({"model": "m", "max_tokens": 10, "n": 8}), 80),
        (json!({"model": "m", "max_tokens": u64::MAX}), MAX_MODE_CAP),
        (
            json!({"model": "m", "max_tokens": 1e30, "n": 3}),
            MAX_MODE_CAP,
        ),
        (json!({"model": "m", "max_tokens": 2.5}), 2),
    ];
    let mut expected = (0, 0);
    for (body, completion) in cases {
        let len = body.to_string().len() as u64;
        let resp = client.chat(&knobs, body.clone()).await;
        assert_eq!(resp.json()["usage"]["prompt_tokens"], len, "{body}");
        assert_eq!(
            resp.json()["usage"]["completion_tokens"],
            completion,
            "{body}"
        );
        expected.0 += len;
        expected.1 += completion;
    }
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5, "n": 3});
    let len = body.to_string().len() as u64;
    let resp = client.chat(&knobs, body).await;
    let usage: Value = serde_json::from_str(&resp.events()[4]).unwrap();
    assert_eq!(usage["usage"]["prompt_tokens"], len);
    assert_eq!(usage["usage"]["completion_tokens"], 15);
    assert_eq!(mock.served_usage(), (expected.0 + len, expected.1 + 15));
}

#[tokio::test]
async fn stream_without_include_usage_has_no_usage_chunk() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(&[], json!({"model": "m1", "stream": true}))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-type"), Some("text/event-stream"));
    assert!(resp.complete);
    let events = resp.events();
    assert_eq!(events.len(), 3 + 1 + 1, "{events:?}");
    assert_eq!(resp.chunks.len(), events.len(), "one event per HTTP chunk");
    for event in &events[..3] {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert_eq!(chunk["object"], "chat.completion.chunk");
        assert_eq!(chunk["model"], "m1");
        assert_eq!(chunk["choices"][0]["delta"]["content"], "tok ");
        assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
        assert_eq!(chunk["usage"], Value::Null);
    }
    let last: Value = serde_json::from_str(&events[3]).unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(events[4], "[DONE]");
    assert_eq!(mock.served_usage(), (0, 0));
}

#[tokio::test]
async fn stream_with_include_usage_ends_with_usage_chunk() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let knobs = [
        ("x-mock-chunks", "5"),
        ("x-mock-prompt-tokens", "7"),
        ("x-mock-completion-tokens", "9"),
        ("x-mock-chunk-delay-ms", "1"),
    ];
    let body = json!({"model": "m2", "stream": true, "stream_options": {"include_usage": true}});
    let resp = client.chat(&knobs, body).await;
    assert!(resp.complete);
    let events = resp.events();
    assert_eq!(events.len(), 5 + 1 + 1 + 1, "{events:?}");
    let usage: Value = serde_json::from_str(&events[6]).unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["model"], "m2");
    assert_eq!(
        usage["usage"],
        json!({"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16})
    );
    assert_eq!(events[7], "[DONE]");
    assert_eq!(mock.served_usage(), (7, 9));
}

#[tokio::test]
async fn embeddings_one_vector_per_input() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let body = json!({"model": "emb", "input": ["a", "b"]}).to_string();
    let resp = client.post("/v1/embeddings", &[], body.as_bytes()).await;
    assert_eq!(resp.status, 200);
    let json = resp.json();
    assert_eq!(json["object"], "list");
    assert_eq!(json["model"], "emb");
    let data = json["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert_eq!(data[1]["index"], 1);
    assert_eq!(
        data[0]["embedding"].as_array().unwrap().len(),
        EMBEDDING_DIMS
    );
    assert_ne!(data[0]["embedding"], data[1]["embedding"]);
    assert_eq!(
        json["usage"],
        json!({"prompt_tokens": 10, "total_tokens": 10})
    );

    let body = json!({"model": "emb", "input": "just one"}).to_string();
    let resp = client.post("/v1/embeddings", &[], body.as_bytes()).await;
    assert_eq!(resp.json()["data"].as_array().unwrap().len(), 1);
    assert_eq!(mock.served_usage(), (20, 0));
}

#[tokio::test]
async fn models_list() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    client
        .send(b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n")
        .await;
    let resp = client.read_response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["object"], "list");
    assert_eq!(resp.json()["data"][0]["object"], "model");
}

#[tokio::test]
async fn status_knob_returns_openai_error_and_keeps_connection() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(&[("x-mock-status", "503")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 503);
    assert_eq!(
        resp.json(),
        json!({"error": {"message": "mock error", "type": "server_error", "code": "mock_error", "param": null}})
    );
    let resp = client
        .chat(
            &[("x-mock-status", "429")],
            json!({"model": "m", "stream": true}),
        )
        .await;
    assert_eq!(resp.status, 429);
    assert_eq!(resp.json()["error"]["code"], "rate_limit_exceeded");
    assert_eq!(mock.served_usage(), (0, 0));
    let resp = client.chat(&[], json!({"model": "m"})).await;
    assert_eq!(resp.status, 200);
}

#[tokio::test]
async fn break_after_cuts_streams_and_bodies() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
    let resp = client.chat(&[("x-mock-break-after", "2")], body).await;
    assert_eq!(resp.status, 200);
    assert!(!resp.complete, "no terminating chunk");
    assert_eq!(resp.events().len(), 2);
    assert!(!resp
        .events()
        .iter()
        .any(|e| e.contains("usage\":{") || e == "[DONE]"));

    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(&[("x-mock-break-after", "0")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 200);
    assert!(!resp.complete);
    let promised: usize = resp.header("content-length").unwrap().parse().unwrap();
    assert_eq!(resp.body.len(), promised / 2);
    assert_eq!(mock.served_usage(), (0, 0));
}
