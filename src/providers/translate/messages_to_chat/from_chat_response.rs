//! A whole OpenAI answer -> Anthropic's: a `chat.completion` becomes a Messages response,
//! an error body becomes Anthropic's error shape.
//!
//! Decisions: `message.content` becomes one text block (first), each tool call a `tool_use`
//! block with its `arguments` parsed; arguments that are not a JSON object are kept whole
//! as `{"_raw": "<arguments>"}` (empty ones as `{}`), so the client's tool validation tells
//! the model what went wrong instead of the gateway failing the turn. A `refusal` becomes a
//! text block with `stop_reason: "refusal"`. `reasoning_content` (some OpenAI-compatible
//! servers) is not returned: thinking was not asked for, and a thinking block would need a
//! signature this gateway cannot make.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::{stop_reason, UsageOut};
use crate::providers::anthropic;
use crate::providers::openai_usage::usage_from_json;
use crate::usage::Usage;

#[derive(Deserialize)]
struct Completion {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    model: Option<String>,
    choices: Vec<Choice>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<ChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct ChoiceMessage {
    #[serde(default)]
    content: Option<Value>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    /// The legacy single call.
    #[serde(default)]
    function_call: Option<Function>,
}

#[derive(Deserialize)]
struct ToolCall {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<Function>,
}

#[derive(Deserialize)]
struct Function {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// A whole OpenAI `chat.completion` -> an Anthropic Messages response. None if the body is
/// not a chat completion.
pub fn response_json(body: &[u8]) -> Option<Vec<u8>> {
    let completion: Completion = serde_json::from_slice(body).ok()?;
    let id = completion.id.unwrap_or_default();
    let choice = completion.choices.into_iter().next();
    let finish = choice.as_ref().and_then(|c| c.finish_reason.clone());
    let message = choice.and_then(|c| c.message);

    let mut content = Vec::new();
    let mut stop = stop_reason(finish.as_deref());
    if let Some(m) = message {
        let text = m.content.map(content_text).unwrap_or_default();
        if !text.is_empty() {
            content.push(text_block(text));
        }
        if let Some(refusal) = m.refusal.filter(|r| !r.is_empty()) {
            content.push(text_block(refusal));
            stop = "refusal";
        }
        let calls = m.tool_calls.unwrap_or_default().into_iter();
        let legacy = m.function_call.map(|f| ToolCall {
            id: None,
            function: Some(f),
        });
        for (i, call) in calls.chain(legacy).enumerate() {
            content.push(tool_use_block(call, i));
        }
    }

    let usage = usage_from_json(body).unwrap_or_default();
    let mut out = Map::new();
    out.insert("id".into(), Value::String(format!("msg_{id}")));
    out.insert("type".into(), "message".into());
    out.insert("role".into(), "assistant".into());
    out.insert(
        "model".into(),
        Value::String(completion.model.unwrap_or_default()),
    );
    out.insert("content".into(), Value::Array(content));
    out.insert("stop_reason".into(), stop.into());
    out.insert("stop_sequence".into(), Value::Null);
    out.insert("usage".into(), usage_value(&usage));
    serde_json::to_vec(&Value::Object(out)).ok()
}

/// `content` as a string, or the text parts of an array joined (some OpenAI-compatible
/// servers answer with parts).
fn content_text(content: Value) -> String {
    match content {
        Value::String(s) => s,
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn text_block(text: String) -> Value {
    let mut b = Map::new();
    b.insert("type".into(), "text".into());
    b.insert("text".into(), Value::String(text));
    Value::Object(b)
}

fn tool_use_block(call: ToolCall, i: usize) -> Value {
    let (name, arguments) = match call.function {
        Some(f) => (f.name.unwrap_or_default(), f.arguments.unwrap_or_default()),
        None => (String::new(), String::new()),
    };
    let mut b = Map::new();
    b.insert("type".into(), "tool_use".into());
    b.insert(
        "id".into(),
        Value::String(call.id.unwrap_or_else(|| format!("toolu_{i}"))),
    );
    b.insert("name".into(), Value::String(name));
    b.insert("input".into(), tool_input(arguments));
    Value::Object(b)
}

/// The `arguments` string as a `tool_use` input, which must be an object.
fn tool_input(arguments: String) -> Value {
    if arguments.trim().is_empty() {
        return Value::Object(Map::new());
    }
    match serde_json::from_str::<Value>(&arguments) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let mut raw = Map::new();
            raw.insert("_raw".into(), Value::String(arguments));
            Value::Object(raw)
        }
    }
}

fn usage_value(usage: &Usage) -> Value {
    serde_json::to_value(UsageOut::from_usage(usage)).unwrap_or(Value::Null)
}

/// An OpenAI error body (any status) -> Anthropic's error shape, with Anthropic's `type`
/// for the status. The upstream's message is kept; a body that is not OpenAI's error JSON
/// gets a generic one.
pub fn error_json(status: u16, body: &[u8]) -> Vec<u8> {
    let message = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| error_message(&v));
    match message {
        Some(m) => anthropic::error_body_with(status, &m),
        None => anthropic::error_body_with(
            status,
            &format!("the upstream model answered with HTTP status {status}"),
        ),
    }
}

/// `error.message`, or the forms OpenAI-compatible servers use instead: `error` as a
/// string, a top-level `message` or `detail`.
pub(super) fn error_message(v: &Value) -> Option<String> {
    let error = v.get("error");
    [
        error.and_then(|e| e.get("message")),
        error,
        v.get("message"),
        v.get("detail"),
    ]
    .into_iter()
    .flatten()
    .find_map(|m| m.as_str().filter(|s| !s.is_empty()))
    .map(str::to_owned)
}
