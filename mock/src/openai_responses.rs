//! OpenAI's Responses API, `POST .../responses`: plain and streamed (named SSE events with
//! `sequence_number`, usage in `response.completed`), text or a function call.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::billing::Api;
use crate::json::{id, unix_now};
use crate::knobs::{Knobs, OutputFields, Tokens, TOOL_ARGUMENTS};
use crate::reply::{Reply, Sent, Shape, DEFAULT_MODEL, REPLY_TEXT, STREAM_TOKEN};
use crate::wire::HeadFlags;

#[derive(Deserialize)]
struct ResponsesRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    max_output_tokens: Option<&'a RawValue>,
}

/// The ids and fixed fields of one response.
struct Ids {
    response: String,
    item: String,
    call: String,
    created_at: u64,
}

impl Ids {
    /// The response object with `status`, `output` and `usage`.
    fn response(&self, model: &str, status: &str, output: Value, usage: Value) -> Value {
        json!({
            "id": self.response,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": false,
            "error": null,
            "incomplete_details": null,
            "instructions": null,
            "max_output_tokens": null,
            "model": model,
            "output": output,
            "parallel_tool_calls": true,
            "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null},
            "service_tier": "default",
            "store": true,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": null,
            "metadata": {},
        })
    }

    /// The output item: a message with `text`, or a call of tool `tool` with `arguments`.
    fn item(&self, tool: Option<&str>, status: &str, text: &str, arguments: &str) -> Value {
        match tool {
            None => {
                let content = if status == "completed" {
                    json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
                } else {
                    json!([])
                };
                json!({"id": self.item, "type": "message", "status": status, "role": "assistant", "content": content})
            }
            Some(name) => json!({
                "id": self.item, "type": "function_call", "status": status,
                "arguments": arguments, "call_id": self.call, "name": name,
            }),
        }
    }
}

fn usage(knobs: &Knobs, tokens: &Tokens) -> Value {
    if knobs.no_usage {
        return Value::Null;
    }
    let input = tokens.all_input();
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": tokens.cache_read},
        "output_tokens": tokens.output,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input.saturating_add(tokens.output),
    })
}

impl Reply<'_> {
    pub(crate) async fn responses(&mut self, knobs: &Knobs, flags: HeadFlags, body: &[u8]) -> Sent {
        let request: ResponsesRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(Shape::OpenAi, flags).await,
        };
        let model = if request.model.is_empty() {
            DEFAULT_MODEL
        } else {
            &request.model
        };
        let output = OutputFields {
            max_tokens: request.max_output_tokens,
            ..OutputFields::default()
        };
        let tokens = knobs.tokens(body, Some(&output), Api::OpenAi);
        if knobs.over_window(&tokens) {
            let message = "prompt is too long: more input tokens than the model's context window";
            return self.error(Shape::OpenAi, 400, flags, message).await;
        }
        let (conn, no) = (self.conn_id, self.request_no);
        let tool = knobs.tool_call.as_deref();
        let ids = Ids {
            response: id("resp_mock_", conn, no),
            item: id(
                if tool.is_some() {
                    "fc_mock_"
                } else {
                    "msg_mock_"
                },
                conn,
                no,
            ),
            call: id("call_mock_", conn, no),
            created_at: unix_now(),
        };
        if request.stream == Some(true) {
            return self
                .responses_stream(knobs, flags, model, &ids, &tokens)
                .await;
        }
        let item = ids.item(tool, "completed", REPLY_TEXT, TOOL_ARGUMENTS);
        let response = ids.response(model, "completed", json!([item]), usage(knobs, &tokens));
        self.set_json(&response);
        let served = (!knobs.no_usage).then(|| tokens.served_openai());
        self.send_json(200, flags, knobs, served).await
    }

    async fn responses_stream(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        model: &str,
        ids: &Ids,
        tokens: &Tokens,
    ) -> Sent {
        let tool = knobs.tool_call.as_deref();
        let mut seq = 0u64;
        let mut event = |kind: &str, mut value: Value| {
            value["type"] = json!(kind);
            value["sequence_number"] = json!(seq);
            seq += 1;
            value
        };
        self.start_stream(flags).await?;
        let pending = ids.response(model, "in_progress", json!([]), Value::Null);
        for kind in ["response.created", "response.in_progress"] {
            let e = event(kind, json!({ "response": pending }));
            self.send_value_event(kind, &e).await?;
        }
        let kind = "response.output_item.added";
        let e = event(
            kind,
            json!({"output_index": 0, "item": ids.item(tool, "in_progress", "", "")}),
        );
        self.send_value_event(kind, &e).await?;
        let (text, arguments) = match tool {
            None => {
                let kind = "response.content_part.added";
                let part = json!({"type": "output_text", "text": "", "annotations": []});
                let e = event(
                    kind,
                    json!({"item_id": ids.item, "output_index": 0, "content_index": 0, "part": part}),
                );
                self.send_value_event(kind, &e).await?;
                for i in 0..knobs.chunks {
                    self.pace(knobs, i).await?;
                    let kind = "response.output_text.delta";
                    let e = event(
                        kind,
                        json!({"item_id": ids.item, "output_index": 0, "content_index": 0, "delta": STREAM_TOKEN, "logprobs": []}),
                    );
                    self.send_value_event(kind, &e).await?;
                }
                (STREAM_TOKEN.repeat(knobs.chunks as usize), String::new())
            }
            Some(_) => {
                for (i, piece) in knobs.argument_pieces().into_iter().enumerate() {
                    self.pace(knobs, i as u64).await?;
                    let kind = "response.function_call_arguments.delta";
                    let e = event(
                        kind,
                        json!({"item_id": ids.item, "output_index": 0, "delta": piece}),
                    );
                    self.send_value_event(kind, &e).await?;
                }
                (String::new(), TOOL_ARGUMENTS.to_owned())
            }
        };
        if knobs.break_after.is_some() {
            return Err(());
        }
        if knobs.chunk_delay_ms > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(knobs.chunk_delay_ms)).await;
        }
        match tool {
            None => {
                let kind = "response.output_text.done";
                let e = event(
                    kind,
                    json!({"item_id": ids.item, "output_index": 0, "content_index": 0, "text": text, "logprobs": []}),
                );
                self.send_value_event(kind, &e).await?;
                let kind = "response.content_part.done";
                let part = json!({"type": "output_text", "text": text, "annotations": []});
                let e = event(
                    kind,
                    json!({"item_id": ids.item, "output_index": 0, "content_index": 0, "part": part}),
                );
                self.send_value_event(kind, &e).await?;
            }
            Some(_) => {
                let kind = "response.function_call_arguments.done";
                let e = event(
                    kind,
                    json!({"item_id": ids.item, "output_index": 0, "arguments": arguments}),
                );
                self.send_value_event(kind, &e).await?;
            }
        }
        let item = ids.item(tool, "completed", &text, &arguments);
        let kind = "response.output_item.done";
        let e = event(kind, json!({"output_index": 0, "item": item}));
        self.send_value_event(kind, &e).await?;
        let kind = "response.completed";
        let done = ids.response(model, "completed", json!([item]), usage(knobs, tokens));
        let e = event(kind, json!({ "response": done }));
        if !knobs.no_usage {
            self.shared.add_usage(tokens.served_openai());
        }
        self.send_value_event(kind, &e).await?;
        self.end_stream().await
    }
}
