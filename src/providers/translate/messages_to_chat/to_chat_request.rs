//! Anthropic Messages request -> OpenAI chat request. Every field is mapped, dropped for a
//! stated reason, or refused with 400 `invalid_request` naming its path.
//!
//! | Messages field | chat request |
//! |---|---|
//! | `model` | replaced by the upstream model id |
//! | `system` (string or text blocks) | a leading `system` message; blocks joined with a blank line |
//! | `messages[].content` string / `text` blocks | `content` string (one block) or text parts |
//! | `image` block, `base64` / `url` source | `image_url` part, a `data:` URL / the URL |
//! | assistant `tool_use` blocks | `tool_calls`, `input` serialized as the `arguments` string |
//! | user `tool_result` blocks | `role:"tool"` messages before the turn's other content; text blocks joined with `\n`; `is_error: true` prefixes `Error: ` (OpenAI has no error flag, so the model reads it in the text) |
//! | assistant `thinking` / `redacted_thinking` blocks | dropped: earlier turns' reasoning, which Anthropic itself leaves out of the context, and OpenAI has no field for |
//! | `cache_control` (anywhere), `citations` on text blocks | dropped: caching hints and output annotations; neither changes what the model generates |
//! | `tools[]` (custom) | `function` tools: `input_schema` -> `parameters`, `strict` kept |
//! | `tool_choice` auto / any / tool / none | `auto` / `required` / `{"type":"function",...}` / `none` (auto and none dropped without tools) |
//! | `tool_choice.disable_parallel_tool_use: true` | `parallel_tool_calls: false` |
//! | `max_tokens` (the model's cap when absent) | `max_completion_tokens`: OpenAI's current name, the only one its reasoning models take |
//! | `temperature`, `top_p` | same names |
//! | `stop_sequences` | `stop` (at most 4) |
//! | `stream: true` | `stream` + `stream_options.include_usage` |
//! | `metadata.user_id` | `user` |
//! | `thinking: {"type":"disabled"}` or `{"type":"adaptive"}` | nothing: adaptive thinking lets the model decide whether to think, and one that answers without thinking is one of its answers |
//! | `messages[]` with `role: "system"` (Claude Code's mid-conversation system beta) | a `system` message at that place; text blocks joined with a blank line |
//! | `output_config.effort` | dropped: how hard to think, a hint that changes no format (Claude Code always sends it) |
//! | `context_management` | dropped: Anthropic's server-side clearing of old tool results when a context grows long; the model gets the whole conversation, which is what is sent, reserved and billed |
//!
//! Refused: `top_k`, extended thinking (`{"type":"enabled"}`), `output_config` other than
//! `effort` (a `format`), server tools (`web_search_*`, `bash_*`, `computer_*`,
//! ...), `document` blocks (PDFs), images inside a `tool_result`, `file` image sources, more
//! than 4 stop sequences, a final assistant message (prefill: OpenAI answers it with a new
//! message instead of continuing it), and any field not in the table.

use serde_json::{Map, Value};

use crate::error::GateError;

type Object = Map<String, Value>;

/// The Messages fields this translation knows; any other top-level field is refused.
const TOP_LEVEL: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
    "output_config",
    "context_management",
];

/// OpenAI rejects a `stop` list longer than this.
const MAX_STOP_SEQUENCES: usize = 4;

/// Anthropic Messages request body -> OpenAI chat request body for `upstream_model`. A
/// stream asks for `stream_options.include_usage`, so usage always arrives.
/// `max_completion_tokens` is the client's `max_tokens` lowered to `output_cap`, the output
/// the reservation allowed for.
pub fn request(body: &[u8], upstream_model: &str, output_cap: u64) -> Result<Vec<u8>, GateError> {
    let mut top = match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(top)) => top,
        Ok(_) => return Err(refuse("the request body must be a JSON object")),
        Err(e) => return Err(refuse(format!("the request body is not valid JSON: {e}"))),
    };
    if let Some(key) = top.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
        return Err(refuse(format!(
            "{key}: not supported when the model behind is OpenAI-compatible"
        )));
    }
    let mut out = Object::new();
    out.insert("model".into(), upstream_model.into());

    let mut messages = Vec::new();
    if let Some(system) = field(&mut top, "system") {
        if let Some(text) = system_text(system)? {
            messages.push(message("system", Value::String(text)));
        }
    }
    let Some(Value::Array(turns)) = field(&mut top, "messages") else {
        return Err(refuse("messages: required, an array of messages"));
    };
    if turns
        .last()
        .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
    {
        return Err(refuse(
            "messages: a final assistant message (prefill) cannot be continued by an \
             OpenAI-compatible model",
        ));
    }
    for (i, turn) in turns.into_iter().enumerate() {
        push_turn(turn, i, &mut messages)?;
    }
    out.insert("messages".into(), Value::Array(messages));

    match field(&mut top, "max_tokens") {
        Some(Value::Number(n)) if n.as_u64().is_some_and(|n| n >= 1) => {
            let n = n.as_u64().map_or(output_cap, |n| n.min(output_cap));
            out.insert("max_completion_tokens".into(), n.into());
        }
        Some(_) => return Err(refuse("max_tokens: must be a positive integer")),
        // Anthropic requires it; the gateway inserts the model's cap, as it does for an
        // Anthropic model, so what goes upstream is what was reserved for (SPEC §2).
        None => {
            out.insert("max_completion_tokens".into(), output_cap.into());
        }
    }
    for name in ["temperature", "top_p"] {
        match field(&mut top, name) {
            Some(v @ Value::Number(_)) => {
                out.insert(name.into(), v);
            }
            Some(_) => return Err(refuse(format!("{name}: must be a number"))),
            None => {}
        }
    }
    if field(&mut top, "top_k").is_some() {
        return Err(refuse(
            "top_k: OpenAI-compatible models have no top_k sampling; use top_p",
        ));
    }
    if let Some(stop) = field(&mut top, "stop_sequences") {
        stop_sequences(stop, &mut out)?;
    }
    match field(&mut top, "stream") {
        Some(Value::Bool(true)) => {
            out.insert("stream".into(), Value::Bool(true));
            let mut options = Object::new();
            options.insert("include_usage".into(), Value::Bool(true));
            out.insert("stream_options".into(), Value::Object(options));
        }
        Some(Value::Bool(false)) | None => {}
        Some(_) => return Err(refuse("stream: must be a boolean")),
    }
    if let Some(metadata) = field(&mut top, "metadata") {
        if let Some(user) = metadata_user(metadata)? {
            out.insert("user".into(), Value::String(user));
        }
    }
    if let Some(thinking) = field(&mut top, "thinking") {
        if !matches!(
            thinking.get("type").and_then(Value::as_str),
            Some("disabled" | "adaptive")
        ) {
            return Err(refuse(
                "thinking: extended thinking is not available on an OpenAI-compatible model; \
                 omit it or set {\"type\":\"disabled\"} or {\"type\":\"adaptive\"}",
            ));
        }
    }
    if let Some(config) = field(&mut top, "output_config") {
        let Value::Object(config) = config else {
            return Err(refuse("output_config: must be an object"));
        };
        if let Some(key) = config.keys().find(|k| k.as_str() != "effort") {
            return Err(refuse(format!(
                "output_config.{key}: not supported when the model behind is OpenAI-compatible"
            )));
        }
    }
    // Dropped (the module's table): what the model is sent is the whole conversation.
    field(&mut top, "context_management");
    let has_tools = match field(&mut top, "tools") {
        Some(tools) => push_tools(tools, &mut out)?,
        None => false,
    };
    if let Some(choice) = field(&mut top, "tool_choice") {
        tool_choice(choice, has_tools, &mut out)?;
    }
    serde_json::to_vec(&Value::Object(out))
        .map_err(|e| refuse(format!("the request could not be encoded: {e}")))
}

fn refuse(message: impl Into<String>) -> GateError {
    GateError::InvalidRequest(message.into())
}

/// Takes a field out of an object; JSON `null` counts as absent.
fn field(obj: &mut Object, name: &str) -> Option<Value> {
    obj.remove(name).filter(|v| !v.is_null())
}

fn message(role: &str, content: Value) -> Value {
    let mut m = Object::new();
    m.insert("role".into(), role.into());
    m.insert("content".into(), content);
    Value::Object(m)
}

fn text_part(text: String) -> Value {
    let mut part = Object::new();
    part.insert("type".into(), "text".into());
    part.insert("text".into(), Value::String(text));
    Value::Object(part)
}

/// A block as an object whose every field is one of `allowed`, else a refusal naming it.
fn block(value: Value, allowed: &[&str], path: &str) -> Result<Object, GateError> {
    let Value::Object(obj) = value else {
        return Err(refuse(format!("{path}: must be an object")));
    };
    if let Some(key) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(refuse(format!(
            "{path}.{key}: not supported when the model behind is OpenAI-compatible"
        )));
    }
    Ok(obj)
}

fn string(obj: &mut Object, name: &str, path: &str) -> Result<String, GateError> {
    match obj.remove(name) {
        Some(Value::String(s)) => Ok(s),
        _ => Err(refuse(format!("{path}.{name}: required, a string"))),
    }
}

/// The text of a `text` block (its `cache_control` and `citations` are dropped).
fn text_block(obj: Value, path: &str) -> Result<String, GateError> {
    let mut obj = block(obj, &["type", "text", "cache_control", "citations"], path)?;
    string(&mut obj, "text", path)
}

fn block_type(value: &Value) -> &str {
    value.get("type").and_then(Value::as_str).unwrap_or("")
}

/// `system` as one string: a string as it is, text blocks joined with a blank line.
fn system_text(system: Value) -> Result<Option<String>, GateError> {
    match system {
        Value::String(s) if s.is_empty() => Ok(None),
        Value::String(s) => Ok(Some(s)),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, b) in blocks.into_iter().enumerate() {
                let path = format!("system[{j}]");
                if block_type(&b) != "text" {
                    return Err(refuse(format!("{path}: only text blocks are supported")));
                }
                texts.push(text_block(b, &path)?);
            }
            Ok((!texts.is_empty()).then(|| texts.join("\n\n")))
        }
        _ => Err(refuse(
            "system: must be a string or an array of text blocks",
        )),
    }
}

/// One Messages turn -> one or more chat messages, appended to `out`.
fn push_turn(turn: Value, i: usize, out: &mut Vec<Value>) -> Result<(), GateError> {
    let path = format!("messages[{i}]");
    let mut turn = block(turn, &["role", "content"], &path)?;
    let role = string(&mut turn, "role", &path)?;
    if role == "system" {
        // Mid-conversation system text: a system message where it stands.
        let content = turn.remove("content").unwrap_or(Value::Null);
        if let Some(text) = system_text(content).map_err(|_| {
            refuse(format!(
                "{path}.content: must be a string or an array of text blocks"
            ))
        })? {
            out.push(message("system", Value::String(text)));
        }
        return Ok(());
    }
    if role != "user" && role != "assistant" {
        return Err(refuse(format!(
            "{path}.role: must be \"user\", \"assistant\" or \"system\""
        )));
    }
    let blocks = match turn.remove("content") {
        Some(Value::String(s)) => {
            out.push(message(&role, Value::String(s)));
            return Ok(());
        }
        Some(Value::Array(blocks)) => blocks,
        _ => {
            return Err(refuse(format!(
                "{path}.content: required, a string or an array of blocks"
            )))
        }
    };
    if role == "user" {
        push_user(blocks, &path, out)
    } else {
        push_assistant(blocks, &path, out)
    }
}

/// Content parts as the chat API wants them: a lone text part as a plain string.
fn content(mut parts: Vec<Value>) -> Value {
    if parts.len() == 1 && block_type(&parts[0]) == "text" {
        if let Some(Value::String(text)) = parts[0].get_mut("text").map(Value::take) {
            return Value::String(text);
        }
    }
    Value::Array(parts)
}

/// A user turn: its tool results first, as `tool` messages, then one user message with
/// the rest (if any).
fn push_user(blocks: Vec<Value>, path: &str, out: &mut Vec<Value>) -> Result<(), GateError> {
    let mut parts = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match block_type(&b) {
            "text" => parts.push(text_part(text_block(b, &path)?)),
            "image" => parts.push(image_part(b, &path)?),
            "tool_result" => out.push(tool_message(b, &path)?),
            "document" => {
                return Err(refuse(format!(
                    "{path}: document blocks (PDFs) cannot be sent to an OpenAI-compatible model"
                )))
            }
            other => {
                return Err(refuse(format!(
                    "{path}.type: \"{other}\" blocks are not supported in a user message"
                )))
            }
        }
    }
    if !parts.is_empty() {
        out.push(message("user", content(parts)));
    }
    Ok(())
}

fn image_part(b: Value, path: &str) -> Result<Value, GateError> {
    let mut obj = block(b, &["type", "source", "cache_control"], path)?;
    let path = format!("{path}.source");
    let source = obj.remove("source").unwrap_or(Value::Null);
    let url = match block_type(&source) {
        "base64" => {
            let mut source = block(source, &["type", "media_type", "data"], &path)?;
            let media_type = string(&mut source, "media_type", &path)?;
            let data = string(&mut source, "data", &path)?;
            format!("data:{media_type};base64,{data}")
        }
        "url" => string(&mut block(source, &["type", "url"], &path)?, "url", &path)?,
        other => {
            return Err(refuse(format!(
                "{path}.type: \"{other}\" image sources are not supported; use base64 or url"
            )))
        }
    };
    let mut image_url = Object::new();
    image_url.insert("url".into(), Value::String(url));
    let mut part = Object::new();
    part.insert("type".into(), "image_url".into());
    part.insert("image_url".into(), Value::Object(image_url));
    Ok(Value::Object(part))
}

/// A `tool_result` block -> a `tool` message whose content is the result's text.
fn tool_message(b: Value, path: &str) -> Result<Value, GateError> {
    let mut obj = block(
        b,
        &[
            "type",
            "tool_use_id",
            "content",
            "is_error",
            "cache_control",
        ],
        path,
    )?;
    let id = string(&mut obj, "tool_use_id", path)?;
    let mut text = match field(&mut obj, "content") {
        None => String::new(),
        Some(Value::String(s)) => s,
        Some(Value::Array(blocks)) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (k, b) in blocks.into_iter().enumerate() {
                let path = format!("{path}.content[{k}]");
                match block_type(&b) {
                    "text" => texts.push(text_block(b, &path)?),
                    other => {
                        return Err(refuse(format!(
                            "{path}: \"{other}\" blocks in a tool result cannot be sent to an \
                             OpenAI-compatible model (tool messages carry text only)"
                        )))
                    }
                }
            }
            texts.join("\n")
        }
        Some(_) => {
            return Err(refuse(format!(
                "{path}.content: must be a string or an array of blocks"
            )))
        }
    };
    match field(&mut obj, "is_error") {
        Some(Value::Bool(true)) => text.insert_str(0, "Error: "),
        Some(Value::Bool(false)) | None => {}
        Some(_) => return Err(refuse(format!("{path}.is_error: must be a boolean"))),
    }
    let mut m = Object::new();
    m.insert("role".into(), "tool".into());
    m.insert("tool_call_id".into(), Value::String(id));
    m.insert("content".into(), Value::String(text));
    Ok(Value::Object(m))
}

/// An assistant turn: text as content, `tool_use` blocks as `tool_calls`.
fn push_assistant(blocks: Vec<Value>, path: &str, out: &mut Vec<Value>) -> Result<(), GateError> {
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, b) in blocks.into_iter().enumerate() {
        let path = format!("{path}.content[{j}]");
        match block_type(&b) {
            "text" => parts.push(text_part(text_block(b, &path)?)),
            "tool_use" => calls.push(tool_call(b, &path)?),
            // Earlier reasoning: Anthropic drops it from the context too.
            "thinking" | "redacted_thinking" => {}
            other => {
                return Err(refuse(format!(
                    "{path}.type: \"{other}\" blocks are not supported in an assistant message"
                )))
            }
        }
    }
    let text = match (parts.is_empty(), calls.is_empty()) {
        (true, false) => Value::Null,
        (true, true) => Value::String(String::new()),
        (false, _) => content(parts),
    };
    let mut m = Object::new();
    m.insert("role".into(), "assistant".into());
    m.insert("content".into(), text);
    if !calls.is_empty() {
        m.insert("tool_calls".into(), Value::Array(calls));
    }
    out.push(Value::Object(m));
    Ok(())
}

fn tool_call(b: Value, path: &str) -> Result<Value, GateError> {
    let mut obj = block(b, &["type", "id", "name", "input", "cache_control"], path)?;
    let id = string(&mut obj, "id", path)?;
    let name = string(&mut obj, "name", path)?;
    let input = obj
        .remove("input")
        .unwrap_or_else(|| Value::Object(Object::new()));
    let mut function = Object::new();
    function.insert("name".into(), Value::String(name));
    function.insert("arguments".into(), Value::String(input.to_string()));
    let mut call = Object::new();
    call.insert("id".into(), Value::String(id));
    call.insert("type".into(), "function".into());
    call.insert("function".into(), Value::Object(function));
    Ok(Value::Object(call))
}

fn stop_sequences(stop: Value, out: &mut Object) -> Result<(), GateError> {
    let list = match stop {
        Value::Array(list) if list.iter().all(Value::is_string) => list,
        _ => return Err(refuse("stop_sequences: must be an array of strings")),
    };
    if list.len() > MAX_STOP_SEQUENCES {
        return Err(refuse(format!(
            "stop_sequences: {} given; OpenAI-compatible models take at most {MAX_STOP_SEQUENCES}",
            list.len()
        )));
    }
    if !list.is_empty() {
        out.insert("stop".into(), Value::Array(list));
    }
    Ok(())
}

fn metadata_user(metadata: Value) -> Result<Option<String>, GateError> {
    let mut obj = block(metadata, &["user_id"], "metadata")?;
    match field(&mut obj, "user_id") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(refuse("metadata.user_id: must be a string")),
    }
}

/// `tools` -> function tools. Returns whether any tool was given.
fn push_tools(tools: Value, out: &mut Object) -> Result<bool, GateError> {
    let Value::Array(tools) = tools else {
        return Err(refuse("tools: must be an array"));
    };
    let mut functions = Vec::with_capacity(tools.len());
    for (i, tool) in tools.into_iter().enumerate() {
        let path = format!("tools[{i}]");
        match tool.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(kind) => {
                return Err(refuse(format!(
                    "{path}.type: \"{kind}\" is an Anthropic server tool; an \
                     OpenAI-compatible model cannot run it"
                )))
            }
        }
        let allowed = [
            "type",
            "name",
            "description",
            "input_schema",
            "cache_control",
            "strict",
        ];
        let mut tool = block(tool, &allowed, &path)?;
        let mut function = Object::new();
        let name = string(&mut tool, "name", &path)?;
        function.insert("name".into(), Value::String(name));
        for (from, to) in [
            ("description", "description"),
            ("input_schema", "parameters"),
            ("strict", "strict"),
        ] {
            if let Some(v) = field(&mut tool, from) {
                function.insert(to.into(), v);
            }
        }
        functions.push(function_value(function));
    }
    if functions.is_empty() {
        return Ok(false); // OpenAI refuses an empty `tools` list
    }
    out.insert("tools".into(), Value::Array(functions));
    Ok(true)
}

/// `{"type":"function","function":{...}}`, the shape of a tool and of a forced choice.
fn function_value(function: Object) -> Value {
    let mut f = Object::new();
    f.insert("type".into(), "function".into());
    f.insert("function".into(), Value::Object(function));
    Value::Object(f)
}

fn tool_choice(choice: Value, has_tools: bool, out: &mut Object) -> Result<(), GateError> {
    let mut obj = block(
        choice,
        &["type", "name", "disable_parallel_tool_use"],
        "tool_choice",
    )?;
    let kind = string(&mut obj, "type", "tool_choice")?;
    let mapped = match kind.as_str() {
        "auto" => Value::from("auto"),
        "none" => Value::from("none"),
        "any" => Value::from("required"),
        "tool" => {
            let mut function = Object::new();
            let name = string(&mut obj, "name", "tool_choice")?;
            function.insert("name".into(), Value::String(name));
            function_value(function)
        }
        other => {
            return Err(refuse(format!(
                "tool_choice.type: \"{other}\" is not one of auto, any, tool, none"
            )))
        }
    };
    let serial = match field(&mut obj, "disable_parallel_tool_use") {
        Some(Value::Bool(b)) => b,
        None => false,
        Some(_) => {
            return Err(refuse(
                "tool_choice.disable_parallel_tool_use: must be a boolean",
            ))
        }
    };
    if !has_tools {
        // OpenAI refuses tool_choice and parallel_tool_calls without tools; auto and none
        // mean the same as no choice then.
        return match kind.as_str() {
            "auto" | "none" => Ok(()),
            _ => Err(refuse(format!(
                "tool_choice: \"{kind}\" needs at least one tool in tools"
            ))),
        };
    }
    out.insert("tool_choice".into(), mapped);
    if serial {
        out.insert("parallel_tool_calls".into(), Value::Bool(false));
    }
    Ok(())
}
