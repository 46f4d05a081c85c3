//! OpenAI's `POST .../chat/completions` (plain and SSE, text or a tool call) and
//! `POST .../embeddings`. The plain text reply is the benchmarks' hot path: hand-built JSON.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use crate::billing::Api;
use crate::json::{push_id, push_json_str, push_u64, push_usage, unix_now};
use crate::knobs::{Knobs, OutputFields, Tokens, TOOL_ARGUMENTS};
use crate::reply::{Reply, Sent, Shape, DEFAULT_MODEL, REPLY_TEXT, STREAM_TOKEN};
use crate::wire::HeadFlags;

const EMBEDDING_DIMS: usize = 8;
const CHAT_ID_PREFIX: &str = "chatcmpl-mock-";
const CALL_ID_PREFIX: &str = "call_mock_";

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    // The fields `x-mock-completion-tokens: max` reads, kept raw (no allocation) so any
    // JSON value parses; they are only interpreted when that knob is on.
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct EmbeddingRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    input: serde_json::Value,
}

impl Reply<'_> {
    pub(crate) async fn chat(&mut self, knobs: &Knobs, flags: HeadFlags, body: &[u8]) -> Sent {
        let request: ChatRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(Shape::OpenAi, flags).await,
        };
        let model = if request.model.is_empty() {
            DEFAULT_MODEL
        } else {
            &request.model
        };
        let output = OutputFields {
            max_tokens: request.max_tokens,
            max_completion_tokens: request.max_completion_tokens,
            n: request.n,
        };
        let tokens = knobs.tokens(body, Some(&output), Api::OpenAi);
        if knobs.over_window(&tokens) {
            let message = "prompt is too long: more input tokens than the model's context window";
            return self.error(Shape::OpenAi, 400, flags, message).await;
        }
        if request.stream == Some(true) {
            let include_usage = request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
            return self
                .chat_stream(knobs, flags, model, include_usage, &tokens)
                .await;
        }
        let (conn_id, request_no) = (self.conn_id, self.request_no);
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"id":"#);
        push_id(json, CHAT_ID_PREFIX, conn_id, request_no);
        json.extend_from_slice(br#","object":"chat.completion","created":"#);
        push_u64(json, unix_now());
        json.extend_from_slice(br#","model":"#);
        push_json_str(json, model);
        json.extend_from_slice(
            br#","choices":[{"index":0,"message":{"role":"assistant","content":"#,
        );
        let finish = match &knobs.tool_call {
            None => {
                push_json_str(json, REPLY_TEXT);
                "stop"
            }
            Some(name) => {
                json.extend_from_slice(br#"null,"tool_calls":[{"id":"#);
                push_id(json, CALL_ID_PREFIX, conn_id, request_no);
                json.extend_from_slice(br#","type":"function","function":{"name":"#);
                push_json_str(json, name);
                json.extend_from_slice(br#","arguments":"#);
                push_json_str(json, TOOL_ARGUMENTS);
                json.extend_from_slice(b"}}]");
                "tool_calls"
            }
        };
        json.extend_from_slice(br#"},"logprobs":null,"finish_reason":""#);
        json.extend_from_slice(finish.as_bytes());
        json.extend_from_slice(br#""}]"#);
        if !knobs.no_usage {
            json.push(b',');
            push_usage(json, &tokens);
        }
        json.push(b'}');
        let usage = (!knobs.no_usage).then(|| tokens.served_openai());
        self.send_json(200, flags, knobs, usage).await
    }

    async fn chat_stream(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        model: &str,
        include_usage: bool,
        tokens: &Tokens,
    ) -> Sent {
        self.start_stream(flags).await?;
        let finish = match &knobs.tool_call {
            None => {
                for i in 0..knobs.chunks {
                    self.pace(knobs, i).await?;
                    self.chunk_prefix(model);
                    self.json
                        .extend_from_slice(br#","choices":[{"index":0,"delta":{"content":"#);
                    push_json_str(self.json, STREAM_TOKEN);
                    self.json
                        .extend_from_slice(br#"},"finish_reason":null}],"usage":null}"#);
                    self.send_event(None).await?;
                }
                "stop"
            }
            Some(name) => {
                // The call's id and name first, then the arguments piece by piece.
                self.chunk_prefix(model);
                self.json.extend_from_slice(
                    br#","choices":[{"index":0,"delta":{"role":"assistant","content":null,"tool_calls":[{"index":0,"id":"#,
                );
                push_id(self.json, CALL_ID_PREFIX, self.conn_id, self.request_no);
                self.json
                    .extend_from_slice(br#","type":"function","function":{"name":"#);
                push_json_str(self.json, name);
                self.json.extend_from_slice(
                    br#","arguments":""}}]},"finish_reason":null}],"usage":null}"#,
                );
                self.send_event(None).await?;
                for (i, piece) in knobs.argument_pieces().into_iter().enumerate() {
                    self.pace(knobs, i as u64).await?;
                    self.chunk_prefix(model);
                    self.json.extend_from_slice(
                        br#","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":{"arguments":"#,
                    );
                    push_json_str(self.json, piece);
                    self.json
                        .extend_from_slice(br#"}}]},"finish_reason":null}],"usage":null}"#);
                    self.send_event(None).await?;
                }
                "tool_calls"
            }
        };
        if knobs.break_after.is_some() {
            return Err(());
        }
        if knobs.chunk_delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(knobs.chunk_delay_ms)).await;
        }
        self.chunk_prefix(model);
        self.json
            .extend_from_slice(br#","choices":[{"index":0,"delta":{},"finish_reason":""#);
        self.json.extend_from_slice(finish.as_bytes());
        self.json.extend_from_slice(br#""}],"usage":null}"#);
        self.send_event(None).await?;
        if include_usage && !knobs.no_usage {
            self.chunk_prefix(model);
            self.json.extend_from_slice(br#","choices":[],"#);
            push_usage(self.json, tokens);
            self.json.push(b'}');
            self.shared.add_usage(tokens.served_openai());
            self.send_event(None).await?;
        }
        self.json.clear();
        self.json.extend_from_slice(b"[DONE]");
        self.send_event(None).await?;
        self.end_stream().await
    }

    /// Before stream content chunk `i`: `Err` where `x-mock-break-after` cuts, else the
    /// `x-mock-hold` gate (before chunk 2) and the `x-mock-chunk-delay-ms` pause.
    pub(crate) async fn pace(&mut self, knobs: &Knobs, i: u64) -> Sent {
        if knobs.breaks_at(i) {
            return Err(());
        }
        if let (1, Some(gate)) = (i, knobs.hold.as_deref()) {
            // Chunk 1 is on the wire before the wait: the client can read it meanwhile.
            tokio::io::AsyncWriteExt::flush(&mut self.stream)
                .await
                .map_err(|_| ())?;
            self.shared.hold(gate).await;
        }
        if let Some(delay) = knobs.chunk_delay(i) {
            tokio::time::sleep(delay).await;
        }
        Ok(())
    }

    /// `{"id":...,"object":"chat.completion.chunk","created":...,"model":...` into `json`.
    fn chunk_prefix(&mut self, model: &str) {
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"id":"#);
        push_id(json, CHAT_ID_PREFIX, self.conn_id, self.request_no);
        json.extend_from_slice(br#","object":"chat.completion.chunk","created":"#);
        push_u64(json, unix_now());
        json.extend_from_slice(br#","model":"#);
        push_json_str(json, model);
    }

    pub(crate) async fn embeddings(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        body: &[u8],
    ) -> Sent {
        let request: EmbeddingRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(Shape::OpenAi, flags).await,
        };
        let model = if request.model.is_empty() {
            "mock-embedding"
        } else {
            &request.model
        };
        // A string, a token array (one input), or an array of strings / token arrays.
        let inputs: &[serde_json::Value] = match &request.input {
            serde_json::Value::Array(items) if !items.iter().all(serde_json::Value::is_number) => {
                items
            }
            single => std::slice::from_ref(single),
        };
        let tokens = knobs.tokens(body, None, Api::OpenAi);
        let prompt = tokens.fresh_input;
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"object":"list","data":["#);
        for (index, input) in inputs.iter().enumerate() {
            if index > 0 {
                json.push(b',');
            }
            json.extend_from_slice(br#"{"object":"embedding","index":"#);
            push_u64(json, index as u64);
            json.extend_from_slice(br#","embedding":["#);
            let digest = match input {
                serde_json::Value::String(text) => Sha256::digest(text.as_bytes()),
                other => Sha256::digest(other.to_string().as_bytes()),
            };
            for dim in 0..EMBEDDING_DIMS {
                if dim > 0 {
                    json.push(b',');
                }
                let hi = digest[2 * dim];
                let lo = digest[2 * dim + 1];
                if hi & 0x80 != 0 {
                    json.push(b'-');
                }
                json.extend_from_slice(b"0.");
                let fraction = u16::from_be_bytes([hi & 0x7f, lo]) % 10_000;
                let start = json.len();
                push_u64(json, u64::from(fraction) + 10_000);
                json.remove(start); // drop the leading 1: zero-padded 4 digits
            }
            json.extend_from_slice(b"]}");
        }
        json.extend_from_slice(br#"],"model":"#);
        push_json_str(json, model);
        if !knobs.no_usage {
            json.extend_from_slice(br#","usage":{"prompt_tokens":"#);
            push_u64(json, prompt);
            json.extend_from_slice(br#","total_tokens":"#);
            push_u64(json, prompt);
            json.push(b'}');
        }
        json.push(b'}');
        let usage = (!knobs.no_usage).then_some(crate::Served {
            prompt,
            ..crate::Served::default()
        });
        self.send_json(200, flags, knobs, usage).await
    }
}
