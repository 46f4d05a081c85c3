//! One response: routing, the checks every route shares (rejected keys, Anthropic's
//! authentication, `x-mock-status`), error bodies in the route's shape, and the writers.

use std::time::Duration;

use crate::wire::Io;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::json::{push_hex, push_model, push_openai_error};
use crate::wire::{push_head, Head, HeadFlags, Method};
use crate::{Served, Shared};

pub(crate) const DEFAULT_MODEL: &str = "mock-model";
/// The text of every plain (non-streamed) reply.
pub(crate) const REPLY_TEXT: &str = "Hello from the SpiderGate mock provider.";
/// The text of every stream content chunk.
pub(crate) const STREAM_TOKEN: &str = "tok ";

/// Writes one response. `Err(())`: the connection must close now (write failed or a
/// `x-mock-break-after` break).
pub(crate) struct Reply<'a> {
    pub(crate) stream: &'a mut dyn Io,
    pub(crate) out: &'a mut Vec<u8>,
    /// The JSON document being built.
    pub(crate) json: &'a mut Vec<u8>,
    pub(crate) shared: &'a Shared,
    pub(crate) close: bool,
    pub(crate) conn_id: u64,
    pub(crate) request_no: u64,
}

pub(crate) type Sent = Result<(), ()>;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Chat,
    Responses,
    Embeddings,
    Messages,
    CountTokens,
    Images,
    ImageEdits,
    Speech,
    Transcription,
    Models,
    Model(&'a str),
    Health,
    Unknown,
}

/// Which API's error shape a route answers with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    OpenAi,
    Anthropic,
}

impl<'a> Route<'a> {
    fn of(method: Method, target: &'a str) -> Route<'a> {
        let path = match memchr::memchr(b'?', target.as_bytes()) {
            Some(i) => &target[..i],
            None => target,
        };
        let path = path.strip_suffix('/').unwrap_or(path);
        match method {
            Method::Post if path.ends_with("/chat/completions") => Route::Chat,
            Method::Post if path.ends_with("/responses") => Route::Responses,
            Method::Post if path.ends_with("/embeddings") => Route::Embeddings,
            Method::Post if path.ends_with("/messages") => Route::Messages,
            Method::Post if path.ends_with("/messages/count_tokens") => Route::CountTokens,
            Method::Post if path.ends_with("/images/generations") => Route::Images,
            Method::Post if path.ends_with("/audio/speech") => Route::Speech,
            Method::Post if path.ends_with("/images/edits") => Route::ImageEdits,
            Method::Post
                if path.ends_with("/audio/transcriptions")
                    || path.ends_with("/audio/translations") =>
            {
                Route::Transcription
            }
            Method::Get if path.ends_with("/models") => Route::Models,
            Method::Get if path.contains("/models/") => {
                Route::Model(path.rsplit('/').next().unwrap_or(DEFAULT_MODEL))
            }
            Method::Get if path == "/health" => Route::Health,
            _ => Route::Unknown,
        }
    }

    fn shape(self) -> Shape {
        match self {
            Route::Messages | Route::CountTokens => Shape::Anthropic,
            Route::Chat
            | Route::Images
            | Route::ImageEdits
            | Route::Speech
            | Route::Transcription
            | Route::Responses
            | Route::Embeddings
            | Route::Models
            | Route::Model(_)
            | Route::Health
            | Route::Unknown => Shape::OpenAi,
        }
    }
}

/// Anthropic's `error.type` for an HTTP status.
fn anthropic_error_type(status: u16) -> &'static str {
    match status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        500..=599 => "api_error",
        _ => "invalid_request_error",
    }
}

impl Reply<'_> {
    pub(crate) async fn respond(&mut self, head: &Head, target: &str, body: &[u8]) -> Sent {
        let knobs = &head.knobs;
        if knobs.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
        }
        let route = Route::of(head.method, target);
        let shape = route.shape();
        let flags = self.flags(head);
        let rejection = head
            .provider_key
            .as_deref()
            .and_then(|key| self.shared.rejection_for(key));
        if let Some(rejection) = rejection {
            // A 401 echoes the key it got, as some providers do: the gateway must mask it.
            let echoed;
            let (message, kind, code) = match rejection.status {
                401 => {
                    echoed = format!(
                        "Incorrect API key provided: {} (mock)",
                        head.provider_key.as_deref().unwrap_or_default()
                    );
                    (echoed.as_str(), "invalid_request_error", "invalid_api_key")
                }
                429 => (
                    "Rate limit reached for requests (mock)",
                    "requests",
                    "rate_limit_exceeded",
                ),
                _ => (
                    "mock rejection of this provider key",
                    "server_error",
                    "mock_error",
                ),
            };
            let flags = HeadFlags {
                retry_after: rejection.retry_after_secs,
                ..flags
            };
            self.error_body(shape, message, kind, code, rejection.status);
            return self.send_json(rejection.status, flags, knobs, None).await;
        }
        if shape == Shape::Anthropic && !head.has_credentials {
            return self
                .error(shape, 401, flags, "x-api-key header is required")
                .await;
        }
        if knobs.too_large {
            // OpenAI: 429 naming the organization, while the key has capacity; Anthropic: 413.
            let status = if shape == Shape::Anthropic { 413 } else { 429 };
            let message = "Request too large for gpt-4o in organization org-AbC123xyz on tokens per min (TPM): Limit 30000, Requested 450000. Project proj_Xyz789abc, key sk-proj-abcdef12345.";
            let flags = HeadFlags {
                capacity: true,
                ..flags
            };
            self.error_body(shape, message, "tokens", "rate_limit_exceeded", status);
            return self.send_json(status, flags, knobs, None).await;
        }
        if let Some(status) = knobs.status_for(body) {
            let code = if status == 429 {
                "rate_limit_exceeded"
            } else {
                "mock_error"
            };
            self.error_body(shape, "mock error", "server_error", code, status);
            if knobs.empty_error {
                self.json.clear();
            }
            return self.send_json(status, flags, knobs, None).await;
        }
        match route {
            Route::Chat => self.chat(knobs, flags, body).await,
            Route::Responses => self.responses(knobs, flags, body).await,
            Route::Embeddings => self.embeddings(knobs, flags, body).await,
            Route::Messages => self.messages(knobs, flags, body).await,
            Route::CountTokens => self.count_tokens(knobs, flags, body).await,
            Route::Images => self.images(knobs, flags, body).await,
            Route::Speech => self.speech(knobs, flags, body).await,
            Route::ImageEdits => self.image_edits(knobs, flags, body).await,
            Route::Transcription => self.transcription(knobs, flags, body).await,
            Route::Models => {
                self.json.clear();
                self.json.extend_from_slice(br#"{"object":"list","data":["#);
                for (i, id) in [DEFAULT_MODEL, "mock-embedding"].iter().enumerate() {
                    if i > 0 {
                        self.json.push(b',');
                    }
                    push_model(self.json, id);
                }
                self.json.extend_from_slice(b"]}");
                self.send_json(200, flags, knobs, None).await
            }
            Route::Model(id) => {
                self.json.clear();
                push_model(self.json, id);
                self.send_json(200, flags, knobs, None).await
            }
            Route::Health => {
                self.json.clear();
                self.json.extend_from_slice(br#"{"status":"ok"}"#);
                self.send_json(200, flags, knobs, None).await
            }
            Route::Unknown => {
                self.json.clear();
                push_openai_error(
                    self.json,
                    "unknown route",
                    "invalid_request_error",
                    "not_found",
                );
                self.send_json(404, flags, knobs, None).await
            }
        }
    }

    fn flags(&self, head: &Head) -> HeadFlags {
        HeadFlags {
            close: self.close,
            leak: head.knobs.leak_headers,
            gateway: head.knobs.gateway_headers,
            early_hints: head.knobs.early_hints,
            retry_after: None,
            capacity: false,
        }
    }

    /// An error body into `json`: OpenAI's with `kind` and `code`, or Anthropic's with the
    /// type of `status`.
    fn error_body(&mut self, shape: Shape, message: &str, kind: &str, code: &str, status: u16) {
        self.json.clear();
        match shape {
            Shape::OpenAi => push_openai_error(self.json, message, kind, code),
            Shape::Anthropic => {
                let body = serde_json::json!({
                    "type": "error",
                    "error": {"type": anthropic_error_type(status), "message": message},
                    "request_id": crate::json::id("req_mock_", self.conn_id, self.request_no),
                });
                self.set_json(&body);
            }
        }
    }

    /// A client error (400 `invalid_request_error`, 401 `authentication_error`, ...) in the
    /// route's shape.
    pub(crate) async fn error(
        &mut self,
        shape: Shape,
        status: u16,
        flags: HeadFlags,
        message: &str,
    ) -> Sent {
        let (kind, code) = match status {
            401 => ("invalid_request_error", "invalid_api_key"),
            _ => ("invalid_request_error", "invalid_request"),
        };
        self.error_body(shape, message, kind, code, status);
        self.write_json(status, flags).await
    }

    pub(crate) async fn bad_json(&mut self, shape: Shape, flags: HeadFlags) -> Sent {
        self.error(
            shape,
            400,
            flags,
            "request body is not valid JSON for this endpoint",
        )
        .await
    }

    /// `value` as the JSON document in `json`.
    pub(crate) fn set_json(&mut self, value: &Value) {
        self.json.clear();
        // Writing a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *self.json, value);
    }

    /// Send `json` as the whole body; `usage` is what it reports, counted just before the
    /// write unless `x-mock-break-after` cuts the body in half (usage is at its end).
    pub(crate) async fn send_json(
        &mut self,
        status: u16,
        flags: HeadFlags,
        knobs: &crate::knobs::Knobs,
        usage: Option<Served>,
    ) -> Sent {
        if knobs.break_after.is_some() {
            self.out.clear();
            push_head(
                self.out,
                status,
                b"application/json",
                Some(self.json.len()),
                flags,
            );
            self.out
                .extend_from_slice(&self.json[..self.json.len() / 2]);
            let _ = self.write_out().await;
            return Err(());
        }
        if let Some(served) = usage {
            self.shared.add_usage(served);
        }
        if knobs.gzip {
            use std::io::Write as _;
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            let body = gz
                .write_all(self.json)
                .and_then(|()| gz.finish())
                .unwrap_or_default();
            self.out.clear();
            push_head(
                self.out,
                status,
                b"application/json",
                Some(body.len()),
                flags,
            );
            // Before the blank line that ends the head.
            let end = self.out.len() - 2;
            self.out
                .splice(end..end, b"content-encoding: gzip\r\n".iter().copied());
            self.out.extend_from_slice(&body);
            return self.write_out().await;
        }
        self.write_json(status, flags).await
    }

    /// Send `json` as the whole body, no knobs applied.
    async fn write_json(&mut self, status: u16, flags: HeadFlags) -> Sent {
        self.out.clear();
        push_head(
            self.out,
            status,
            b"application/json",
            Some(self.json.len()),
            flags,
        );
        self.out.extend_from_slice(self.json);
        self.write_out().await
    }

    /// The head of an SSE response (chunked).
    pub(crate) async fn start_stream(&mut self, flags: HeadFlags) -> Sent {
        self.out.clear();
        push_head(self.out, 200, b"text/event-stream", None, flags);
        self.write_out().await
    }

    /// The terminating zero-length chunk.
    pub(crate) async fn end_stream(&mut self) -> Sent {
        self.out.clear();
        self.out.extend_from_slice(b"0\r\n\r\n");
        self.write_out().await
    }

    /// One SSE event (`data: <json>\n\n`, after `event: NAME\n` when named) as one HTTP
    /// chunk, in one write.
    pub(crate) async fn send_event(&mut self, event: Option<&str>) -> Sent {
        let event_len = event.map_or(0, |name| b"event: ".len() + name.len() + 1);
        let len = event_len + b"data: ".len() + self.json.len() + b"\n\n".len();
        self.out.clear();
        push_hex(self.out, len);
        self.out.extend_from_slice(b"\r\n");
        if let Some(name) = event {
            self.out.extend_from_slice(b"event: ");
            self.out.extend_from_slice(name.as_bytes());
            self.out.push(b'\n');
        }
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(self.json);
        self.out.extend_from_slice(b"\n\n\r\n");
        self.write_out().await
    }

    /// `value` as one named SSE event.
    pub(crate) async fn send_value_event(&mut self, event: &str, value: &Value) -> Sent {
        self.set_json(value);
        self.send_event(Some(event)).await
    }

    /// Writes `out` as it is (a head or a chunk built by the caller).
    pub(crate) async fn write_raw(&mut self) -> Sent {
        self.write_out().await
    }

    async fn write_out(&mut self) -> Sent {
        self.stream.write_all(self.out).await.map_err(|_| ())
    }
}
