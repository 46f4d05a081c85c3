//! A whole Anthropic Messages response or error -> OpenAI's `chat.completion` or error body,
//! and the mappings the stream shares with them (stop reasons, usage, error types).

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::providers::anthropic::{self, AnthropicUsage};
use crate::usage::Usage;

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    content: Vec<Block<'a>>,
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct Block<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    input: Option<&'a RawValue>,
}

/// A whole Anthropic Messages response -> an OpenAI `chat.completion`. None if the body is
/// not a Messages response.
pub fn response_json(body: &[u8]) -> Option<Vec<u8>> {
    let m: Message<'_> = serde_json::from_slice(body).ok()?;
    if m.kind != "message" {
        return None;
    }
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for b in &m.content {
        match b.kind.as_ref() {
            "text" => text.push_str(b.text.as_deref().unwrap_or("")),
            "thinking" => reasoning.push_str(b.thinking.as_deref().unwrap_or("")),
            "tool_use" => tool_calls.push(json!({
                "id": b.id.as_deref().unwrap_or(""),
                "type": "function",
                "function": {
                    "name": b.name.as_deref().unwrap_or(""),
                    "arguments": b.input.map_or("{}", RawValue::get),
                },
            })),
            // redacted_thinking, server tools: no OpenAI form (module doc).
            _ => {}
        }
    }
    let has_text = m.content.iter().any(|b| b.kind == "text");
    let mut message = json!({
        "role": "assistant",
        "content": if has_text { Value::String(text) } else { Value::Null },
        "refusal": null,
    });
    if !reasoning.is_empty() {
        message["reasoning_content"] = reasoning.into();
    }
    if !tool_calls.is_empty() {
        message["tool_calls"] = Value::Array(tool_calls);
    }
    let mut out = json!({
        "id": m.id.as_deref().unwrap_or(""),
        "object": "chat.completion",
        "created": now_secs(),
        "model": m.model.as_deref().unwrap_or(""),
        "choices": [{
            "index": 0,
            "message": message,
            "logprobs": null,
            "finish_reason": m.stop_reason.as_deref().map(finish_reason),
        }],
    });
    if let Some(u) = m.usage.and_then(|u| u.normalize()) {
        out["usage"] = usage_json(&u);
    }
    serde_json::to_vec(&out).ok()
}

/// Seconds since the epoch, for `created`.
pub(super) fn now_secs() -> i64 {
    crate::clock::now_ms().div_euclid(1000)
}

/// Anthropic `stop_reason` -> OpenAI `finish_reason`.
pub(super) fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        // end_turn, stop_sequence, pause_turn and any newer reason.
        _ => "stop",
    }
}

/// OpenAI's usage object; every input token is in `prompt_tokens`.
pub(super) fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens.saturating_add(u.completion_tokens),
        "prompt_tokens_details": {"cached_tokens": u.cache_read_tokens},
    })
}

#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: ErrorDetail<'a>,
}

/// Anthropic's `error` object.
#[derive(Deserialize)]
pub(super) struct ErrorDetail<'a> {
    #[serde(rename = "type", default, borrow)]
    pub kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub message: Option<Cow<'a, str>>,
}

/// An Anthropic error body (any status) -> OpenAI's error shape.
pub fn error_json(status: u16, body: &[u8]) -> Vec<u8> {
    let detail = serde_json::from_slice::<ErrorBody<'_>>(body)
        .ok()
        .map(|b| b.error);
    openai_error(status, detail.as_ref())
        .to_string()
        .into_bytes()
}

/// `{"error":{"message","type","code","param":null}}`. `code` keeps Anthropic's error type
/// (so `overloaded_error` stays distinguishable); `type` is OpenAI's word for the class.
pub(super) fn openai_error(status: u16, detail: Option<&ErrorDetail<'_>>) -> Value {
    let code = detail
        .and_then(|d| d.kind.as_deref())
        .unwrap_or_else(|| anthropic::error_type(status));
    let message = match detail.and_then(|d| d.message.as_deref()) {
        Some(m) => Cow::Borrowed(m),
        None => Cow::Owned(format!(
            "The upstream model returned an error (HTTP {status})."
        )),
    };
    json!({
        "error": {
            "message": message,
            "type": openai_error_type(code),
            "code": code,
            "param": null,
        }
    })
}

/// Anthropic error type -> OpenAI `error.type`, in the words `GateError` uses.
fn openai_error_type(anthropic_type: &str) -> &'static str {
    match anthropic_type {
        "authentication_error" => "authentication_error",
        "permission_error" => "permission_error",
        "billing_error" => "insufficient_quota",
        "rate_limit_error" => "requests",
        "invalid_request_error" | "not_found_error" | "request_too_large" => {
            "invalid_request_error"
        }
        // api_error, overloaded_error, timeout_error and anything newer.
        _ => "api_error",
    }
}
