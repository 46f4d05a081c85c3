//! Anthropic's Messages API, `POST /v1/messages`: plain and streamed (`message_start` ...
//! `message_stop`), text or a `tool_use` block, with the real API's minimal validation.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::billing::Api;
use crate::json::id;
use crate::knobs::{Knobs, OutputFields, Tokens};
use crate::reply::{Reply, Sent, Shape, DEFAULT_MODEL, REPLY_TEXT, STREAM_TOKEN};
use crate::wire::HeadFlags;
use crate::Served;

#[derive(Deserialize)]
struct MessagesRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    messages: Option<&'a RawValue>,
}

/// `usage` as Anthropic reports it: `input_tokens` excludes the cached tokens.
fn usage(tokens: &Tokens, output: u64) -> Value {
    json!({
        "input_tokens": tokens.fresh_input,
        "cache_creation_input_tokens": tokens.cache_write,
        "cache_read_input_tokens": tokens.cache_read,
        "output_tokens": output,
    })
}

impl Reply<'_> {
    pub(crate) async fn messages(&mut self, knobs: &Knobs, flags: HeadFlags, body: &[u8]) -> Sent {
        let request: MessagesRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(Shape::Anthropic, flags).await,
        };
        let missing = if request.max_tokens.is_none() {
            Some("max_tokens: Field required")
        } else if request.messages.is_none() {
            Some("messages: Field required")
        } else {
            None
        };
        if let Some(message) = missing {
            return self.error(Shape::Anthropic, 400, flags, message).await;
        }
        let model = if request.model.is_empty() {
            DEFAULT_MODEL
        } else {
            &request.model
        };
        let output = OutputFields {
            max_tokens: request.max_tokens,
            ..OutputFields::default()
        };
        let tokens = knobs.tokens(body, Some(&output), Api::Anthropic);
        if knobs.over_window(&tokens) {
            let message = "prompt is too long: more input tokens than the model's context window";
            return self.error(Shape::Anthropic, 400, flags, message).await;
        }
        let message_id = id("msg_mock_", self.conn_id, self.request_no);
        let tool_id = id("toolu_mock_", self.conn_id, self.request_no);
        if request.stream == Some(true) {
            return self
                .messages_stream(knobs, flags, model, (&message_id, &tool_id), &tokens)
                .await;
        }
        let (content, stop_reason) = match &knobs.tool_call {
            None => (json!([{"type": "text", "text": REPLY_TEXT}]), "end_turn"),
            Some(name) => (
                json!([{"type": "tool_use", "id": tool_id, "name": name, "input": {"city": "Paris"}}]),
                "tool_use",
            ),
        };
        let mut message = json!({
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
        });
        if !knobs.no_usage {
            message["usage"] = usage(&tokens, tokens.output);
        }
        self.set_json(&message);
        let served = (!knobs.no_usage).then(|| tokens.served_anthropic());
        self.send_json(200, flags, knobs, served).await
    }

    async fn messages_stream(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        model: &str,
        (message_id, tool_id): (&str, &str),
        tokens: &Tokens,
    ) -> Sent {
        self.start_stream(flags).await?;
        let mut message = json!({
            "id": message_id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
        });
        if !knobs.no_usage {
            message["usage"] = usage(tokens, 1);
            // The input side is reported here; the output side in `message_delta`.
            self.shared.add_usage(Served {
                completion: 0,
                ..tokens.served_anthropic()
            });
        }
        let start = json!({"type": "message_start", "message": message});
        self.send_value_event("message_start", &start).await?;
        let block = match &knobs.tool_call {
            None => json!({"type": "text", "text": ""}),
            Some(name) => json!({"type": "tool_use", "id": tool_id, "name": name, "input": {}}),
        };
        let e = json!({"type": "content_block_start", "index": 0, "content_block": block});
        self.send_value_event("content_block_start", &e).await?;
        self.send_value_event("ping", &json!({"type": "ping"}))
            .await?;
        let (deltas, stop_reason): (Vec<Value>, &str) = match &knobs.tool_call {
            None => (
                (0..knobs.chunks)
                    .map(|_| json!({"type": "text_delta", "text": STREAM_TOKEN}))
                    .collect(),
                "end_turn",
            ),
            Some(_) => (
                knobs
                    .argument_pieces()
                    .into_iter()
                    .map(|piece| json!({"type": "input_json_delta", "partial_json": piece}))
                    .collect(),
                "tool_use",
            ),
        };
        for (i, delta) in deltas.into_iter().enumerate() {
            self.pace(knobs, i as u64).await?;
            let e = json!({"type": "content_block_delta", "index": 0, "delta": delta});
            self.send_value_event("content_block_delta", &e).await?;
        }
        if knobs.break_after.is_some() {
            return Err(());
        }
        if knobs.chunk_delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(knobs.chunk_delay_ms)).await;
        }
        let e = json!({"type": "content_block_stop", "index": 0});
        self.send_value_event("content_block_stop", &e).await?;
        let mut delta = json!({
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
        });
        if !knobs.no_usage {
            delta["usage"] = json!({"output_tokens": tokens.output});
            self.shared.add_usage(Served {
                completion: tokens.output,
                ..Served::default()
            });
        }
        self.send_value_event("message_delta", &delta).await?;
        self.send_value_event("message_stop", &json!({"type": "message_stop"}))
            .await?;
        self.end_stream().await
    }
}
