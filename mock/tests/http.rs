//! HTTP/1.1 framing and connection behaviour: keep-alive, chunked bodies, limits, knobs that
//! act on the connection, start and stop.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{mock, Client};
use serde_json::{json, Value};
use spidergate_mock::MockProvider;
use tokio::net::TcpStream;

#[tokio::test]
async fn drop_closes_without_a_response_and_leak_adds_account_headers() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let resp = client
        .chat(&[("x-mock-leak-headers", "1")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("openai-organization"), Some("org-leak"));
    assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("5000"));
    assert_eq!(resp.header("set-cookie"), Some("a=b"));
    let resp = client
        .chat(
            &[("x-mock-leak-headers", "1")],
            json!({"model": "m", "stream": true}),
        )
        .await;
    assert!(resp.complete);
    assert_eq!(resp.header("openai-project"), Some("proj_leak"));
    client
        .send(
            b"POST /v1/chat/completions HTTP/1.1\r\nx-mock-drop: 1\r\ncontent-length: 2\r\n\r\n{}",
        )
        .await;
    assert!(client.closed().await, "dropped without a response");
    assert_eq!(mock.requests().len(), 3, "the dropped request was read");
}

#[tokio::test]
async fn delay_knob_delays_the_head() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let started = Instant::now();
    let resp = client
        .chat(&[("x-mock-delay-ms", "150")], json!({"model": "m"}))
        .await;
    assert_eq!(resp.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn chunked_request_body_is_decoded() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let body = br#"{"model":"chunky","messages":[{"role":"user","content":"hello there"}]}"#;
    let mut raw = b"POST /api/gate/v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
    for piece in body.chunks(7) {
        raw.extend_from_slice(format!("{:X};ext=1\r\n", piece.len()).as_bytes());
        raw.extend_from_slice(piece);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\nx-trailer: yes\r\n\r\n");
    // Dribble it in small writes so the decoder has to wait mid-line and mid-chunk.
    for piece in raw.chunks(5) {
        client.send(piece).await;
        tokio::task::yield_now().await;
    }
    let resp = client.read_response().await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "chunky");
    assert_eq!(mock.requests()[0].body, body);
    // The connection is still usable afterwards.
    let resp = client.chat(&[], json!({"model": "after"})).await;
    assert_eq!(resp.json()["model"], "after");
}

#[tokio::test]
async fn keep_alive_serves_many_requests_and_honours_close() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let first = client.chat(&[], json!({"model": "one"})).await;
    let second = client
        .chat(&[], json!({"model": "two", "stream": true}))
        .await;
    assert_eq!(first.json()["model"], "one");
    assert!(second.complete);
    assert_ne!(first.json()["id"], Value::Null);
    let third = client
        .chat(&[("connection", "close")], json!({"model": "three"}))
        .await;
    assert_eq!(third.header("connection"), Some("close"));
    assert_eq!(third.json()["model"], "three");
    assert!(client.closed().await);
    assert_eq!(mock.requests().len(), 3);
}

#[tokio::test]
async fn one_mib_body_is_recorded_byte_exact() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    let filler: String = (0..(1 << 20))
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let body =
        json!({"model": "big", "messages": [{"role": "user", "content": filler}]}).to_string();
    let resp = client
        .post(
            "/v1/chat/completions",
            &[("expect", "100-continue")],
            body.as_bytes(),
        )
        .await;
    // The client above does not wait for 100 Continue; it must not confuse the reply.
    let resp = if resp.status == 100 {
        client.read_response().await
    } else {
        resp
    };
    assert_eq!(resp.status, 200);
    assert_eq!(resp.json()["model"], "big");
    let recorded = mock.requests();
    assert_eq!(recorded[0].body.len(), body.len());
    assert!(recorded[0].body == body.as_bytes());
}

#[tokio::test]
async fn malformed_requests_get_400_and_close() {
    let mock = mock().await;
    let mut client = Client::connect(&mock).await;
    client.send(b"THIS IS NOT HTTP\r\n\r\n").await;
    let resp = client.read_response().await;
    assert_eq!(resp.status, 400);
    assert_eq!(resp.json()["error"]["code"], "invalid_request");
    assert!(client.closed().await);

    let mut client = Client::connect(&mock).await;
    client
        .send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
        .await;
    assert_eq!(client.read_response().await.status, 400);
    assert!(client.closed().await);

    let mut client = Client::connect(&mock).await;
    client
        .send(b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
        .await;
    assert_eq!(client.read_response().await.status, 400);

    let mut client = Client::connect(&mock).await;
    let resp = client.post("/v1/chat/completions", &[], b"{not json").await;
    assert_eq!(resp.status, 400);

    let mut client = Client::connect(&mock).await;
    client
        .send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n")
        .await;
    assert_eq!(client.read_response().await.status, 413);
}

#[tokio::test]
async fn recording_can_be_turned_off() {
    let mock = mock().await;
    mock.set_recording(false);
    let mut client = Client::connect(&mock).await;
    client.chat(&[], json!({"model": "m"})).await;
    assert!(mock.requests().is_empty());
    assert_eq!(mock.served_usage(), (10, 5));
}

#[tokio::test]
async fn dropping_the_provider_stops_it() {
    let mock = mock().await;
    let addr = mock.addr();
    let mut client = Client::connect(&mock).await;
    drop(mock);
    assert!(client.closed().await);
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn start_background_serves_blocking_clients() {
    use std::io::{Read, Write};
    let mock = MockProvider::start_background("127.0.0.1:0").unwrap();
    let mut stream = std::net::TcpStream::connect(mock.addr()).unwrap();
    let body = br#"{"model":"sync"}"#;
    write!(
        stream,
        "POST /v1/chat/completions HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(body).unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
    assert!(reply.contains(r#""model":"sync""#));
    assert_eq!(mock.requests().len(), 1);
}
