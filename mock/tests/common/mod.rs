//! A raw HTTP/1.1 client over one TCP connection, so tests see exactly what the mock sent.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use serde_json::Value;
use spidergate_mock::MockProvider;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The body ended as its framing said (false: the connection closed early).
    pub complete: bool,
    /// For chunked bodies, each chunk's payload as received.
    pub chunks: Vec<Vec<u8>>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    /// The `data:` payloads of an SSE body, in order.
    pub fn events(&self) -> Vec<String> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
            .collect()
    }
}

impl Response {
    /// The `(event, data)` pairs of an SSE body with named events, in order.
    pub fn named_events(&self) -> Vec<(String, Value)> {
        String::from_utf8(self.body.clone())
            .unwrap()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| {
                let (event, data) = e.split_once('\n').unwrap();
                let event = event.strip_prefix("event: ").unwrap().to_owned();
                let data = data.strip_prefix("data: ").unwrap();
                (event, serde_json::from_str(data).unwrap())
            })
            .collect()
    }
}

impl Client {
    pub async fn connect(mock: &MockProvider) -> Client {
        Client {
            stream: TcpStream::connect(mock.addr()).await.unwrap(),
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).await.unwrap();
    }

    pub async fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut raw = format!(
            "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            raw.push_str(&format!("{name}: {value}\r\n"));
        }
        raw.push_str("\r\n");
        let mut raw = raw.into_bytes();
        raw.extend_from_slice(body);
        self.send(&raw).await;
        self.read_response().await
    }

    pub async fn chat(&mut self, headers: &[(&str, &str)], body: Value) -> Response {
        self.post("/v1/chat/completions", headers, body.to_string().as_bytes())
            .await
    }

    /// false on EOF.
    pub async fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.stream.read(&mut tmp).await {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
        }
    }

    pub async fn line(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = memchr::memmem::find(&self.buf, b"\r\n") {
                let line = self.buf[..i].to_vec();
                self.buf.drain(..i + 2);
                return Some(line);
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    pub async fn read_response(&mut self) -> Response {
        let (status, headers, head_len) = loop {
            let mut parsed = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut parsed);
            if let httparse::Status::Complete(n) = response.parse(&self.buf).unwrap() {
                let headers = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8(h.value.to_vec()).unwrap(),
                        )
                    })
                    .collect::<Vec<_>>();
                break (response.code.unwrap(), headers, n);
            }
            assert!(
                self.fill().await,
                "connection closed before the response head"
            );
        };
        self.buf.drain(..head_len);
        let mut resp = Response {
            status,
            headers,
            body: Vec::new(),
            complete: false,
            chunks: Vec::new(),
        };
        if let Some(len) = resp.header("content-length") {
            let len: usize = len.parse().unwrap();
            while self.buf.len() < len {
                if !self.fill().await {
                    resp.body = std::mem::take(&mut self.buf);
                    return resp;
                }
            }
            resp.body = self.buf.drain(..len).collect();
            resp.complete = true;
        } else if resp.header("transfer-encoding") == Some("chunked") {
            loop {
                let Some(line) = self.line().await else {
                    return resp;
                };
                let size = usize::from_str_radix(std::str::from_utf8(&line).unwrap(), 16).unwrap();
                while self.buf.len() < size + 2 {
                    if !self.fill().await {
                        return resp;
                    }
                }
                let chunk: Vec<u8> = self.buf.drain(..size).collect();
                assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
                if size == 0 {
                    resp.complete = true;
                    return resp;
                }
                resp.body.extend_from_slice(&chunk);
                resp.chunks.push(chunk);
            }
        }
        resp
    }

    /// True when the server has closed the connection (EOF with nothing more sent).
    pub async fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 16];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut tmp)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

pub async fn mock() -> MockProvider {
    MockProvider::start("127.0.0.1:0").await.unwrap()
}
