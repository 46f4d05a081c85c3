//! OpenAI chat request -> Anthropic Messages request (the field table is in the parent
//! module's doc).

use serde_json::{json, Map, Value};

use crate::error::GateError;

type Result<T> = std::result::Result<T, GateError>;

/// OpenAI chat request body -> Anthropic Messages request body for `upstream_model`.
/// `output_cap` is Anthropic's required `max_tokens`: the output the reservation allowed
/// for (the larger client field capped at the model's maximum, or that maximum).
pub fn request(body: &[u8], upstream_model: &str, output_cap: u64) -> Result<Vec<u8>> {
    let req: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the body is not a JSON object ({e})")))?;
    let mut out = Map::new();
    out.insert("model".into(), upstream_model.into());
    let mut max_tokens: Option<u64> = None;
    let mut user = None;
    let mut safety_identifier = None;
    let mut tools = None;
    let mut tool_choice = None;
    let mut parallel_tool_calls = true;
    let mut messages = None;

    for (key, value) in &req {
        if value.is_null() {
            continue;
        }
        let key = key.as_str();
        match key {
            "model" => {}
            "messages" => messages = Some(value),
            "max_tokens" | "max_completion_tokens" => {
                let n = value
                    .as_u64()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid(format!("`{key}` must be a positive integer")))?;
                max_tokens = Some(max_tokens.map_or(n, |m| m.max(n)));
            }
            "temperature" => {
                let t = number(key, value)?;
                if !(0.0..=1.0).contains(&t) {
                    return Err(invalid(format!(
                        "`temperature` {t} is outside 0..1, the range of Anthropic models"
                    )));
                }
                out.insert("temperature".into(), value.clone());
            }
            "top_p" => {
                number(key, value)?;
                out.insert("top_p".into(), value.clone());
            }
            "stop" => {
                let stops = match value {
                    Value::String(_) => vec![value.clone()],
                    Value::Array(a) if a.iter().all(Value::is_string) => a.clone(),
                    _ => return Err(invalid("`stop` must be a string or an array of strings")),
                };
                if !stops.is_empty() {
                    out.insert("stop_sequences".into(), Value::Array(stops));
                }
            }
            "stream" => {
                let stream = value
                    .as_bool()
                    .ok_or_else(|| invalid("`stream` must be a boolean"))?;
                out.insert("stream".into(), stream.into());
            }
            "stream_options" => {
                if !value.is_object() {
                    return Err(invalid("`stream_options` must be an object"));
                }
            }
            "user" => user = Some(string(key, value)?),
            "safety_identifier" => safety_identifier = Some(string(key, value)?),
            "tools" => tools = Some(value),
            "tool_choice" => tool_choice = Some(value),
            "parallel_tool_calls" => {
                parallel_tool_calls = value
                    .as_bool()
                    .ok_or_else(|| invalid("`parallel_tool_calls` must be a boolean"))?;
            }
            "n" => {
                if value.as_u64() != Some(1) {
                    return Err(invalid(
                        "`n` must be 1: an Anthropic model returns one choice per request",
                    ));
                }
            }
            "logprobs" => {
                if value != &Value::Bool(false) {
                    return Err(invalid("`logprobs` is not available from Anthropic models"));
                }
            }
            "top_logprobs" => {
                if value.as_u64() != Some(0) {
                    return Err(invalid(
                        "`top_logprobs` is not available from Anthropic models",
                    ));
                }
            }
            "presence_penalty" | "frequency_penalty" => {
                if number(key, value)? != 0.0 {
                    return Err(invalid(format!(
                        "`{key}` has no Anthropic equivalent; only 0 is accepted"
                    )));
                }
            }
            "logit_bias" => {
                if !value.as_object().is_some_and(Map::is_empty) {
                    return Err(invalid("`logit_bias` has no Anthropic equivalent"));
                }
            }
            "seed" => {
                return Err(invalid(
                    "`seed` has no Anthropic equivalent (no seeded sampling)",
                ))
            }
            "response_format" => {
                if value.get("type").and_then(Value::as_str) != Some("text") {
                    return Err(invalid(
                        "`response_format` other than `text` (JSON mode, JSON schema) is not supported for Anthropic models",
                    ));
                }
            }
            "reasoning_effort" | "verbosity" => {
                return Err(invalid(format!(
                    "`{key}` has no faithful Anthropic equivalent"
                )))
            }
            "modalities" => {
                let text_only = value
                    .as_array()
                    .is_some_and(|a| a.iter().all(|m| m.as_str() == Some("text")));
                if !text_only {
                    return Err(invalid("`modalities`: Anthropic models only produce text"));
                }
            }
            "audio" => return Err(invalid("`audio`: Anthropic models only produce text")),
            "service_tier" => {
                if !matches!(value.as_str(), Some("auto" | "default")) {
                    return Err(invalid(
                        "`service_tier`: only `auto` and `default` can be served by Anthropic",
                    ));
                }
            }
            "store" => {
                if value != &Value::Bool(false) {
                    return Err(invalid(
                        "`store`: completions cannot be stored with an Anthropic model",
                    ));
                }
            }
            // Advisory only: they never change the answer (see the module's table).
            "metadata" | "prediction" | "prompt_cache_key" | "prompt_cache_retention" => {}
            "functions" | "function_call" => {
                return Err(invalid(format!(
                "`{key}` (legacy function calling) is not supported; use `tools` and `tool_choice`"
            )))
            }
            other => {
                return Err(invalid(format!(
                    "`{other}` is not supported for Anthropic models"
                )))
            }
        }
    }

    let (system, turns) = match messages {
        Some(Value::Array(m)) => translate_messages(m)?,
        _ => return Err(invalid("`messages` must be an array")),
    };
    if turns.is_empty() {
        return Err(invalid(
            "`messages` needs at least one user, assistant or tool message",
        ));
    }
    // What the reservation allowed for; never more than the client asked.
    out.insert(
        "max_tokens".into(),
        max_tokens.map_or(output_cap, |m| m.min(output_cap)).into(),
    );
    if let Some(system) = system {
        out.insert("system".into(), system);
    }
    out.insert("messages".into(), Value::Array(turns));

    let tools = match tools {
        Some(Value::Array(t)) => t
            .iter()
            .enumerate()
            .map(|(i, t)| tool(i, t))
            .collect::<Result<Vec<_>>>()?,
        Some(_) => return Err(invalid("`tools` must be an array")),
        None => Vec::new(),
    };
    let choice = match tool_choice {
        Some(c) => Some(translate_tool_choice(c)?),
        None => None,
    };
    if tools.is_empty() {
        // No tool can be called: `auto` and `none` say nothing more; a forced call cannot be.
        if choice
            .as_ref()
            .is_some_and(|c| c["type"] != "auto" && c["type"] != "none")
        {
            return Err(invalid(
                "`tool_choice` forces a tool call but `tools` is empty",
            ));
        }
    } else {
        out.insert("tools".into(), Value::Array(tools));
        let mut choice = choice;
        if !parallel_tool_calls {
            let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
            if c["type"] != "none" {
                c["disable_parallel_tool_use"] = true.into();
            }
        }
        if let Some(c) = choice {
            out.insert("tool_choice".into(), c);
        }
    }
    if let Some(id) = safety_identifier.or(user) {
        out.insert("metadata".into(), json!({ "user_id": id }));
    }
    serde_json::to_vec(&Value::Object(out)).map_err(|e| invalid(e.to_string()))
}

fn invalid(why: impl Into<String>) -> GateError {
    GateError::InvalidRequest(why.into())
}

fn number(key: &str, value: &Value) -> Result<f64> {
    value
        .as_f64()
        .ok_or_else(|| invalid(format!("`{key}` must be a number")))
}

fn string<'a>(key: &str, value: &'a Value) -> Result<&'a str> {
    value
        .as_str()
        .ok_or_else(|| invalid(format!("`{key}` must be a string")))
}

/// Refuses a member of `obj` outside `known` (nulls count as absent), naming its path.
fn only_keys(path: &str, obj: &Map<String, Value>, known: &[&str]) -> Result<()> {
    match obj
        .iter()
        .find(|(k, v)| !v.is_null() && !known.contains(&k.as_str()))
    {
        Some((k, _)) => Err(invalid(format!(
            "`{path}.{k}` is not supported for Anthropic models"
        ))),
        None => Ok(()),
    }
}

fn object<'a>(path: &str, value: &'a Value) -> Result<&'a Map<String, Value>> {
    value
        .as_object()
        .ok_or_else(|| invalid(format!("`{path}` must be an object")))
}

/// Anthropic turns, merged so that roles alternate.
#[derive(Default)]
struct Turns {
    system: Vec<Value>,
    /// A single plain-string system message stays a string.
    system_is_plain: bool,
    turns: Vec<(&'static str, Vec<Value>)>,
}

impl Turns {
    fn push(&mut self, role: &'static str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        match self.turns.last_mut() {
            Some((last, prev)) if *last == role => prev.extend(blocks),
            _ => self.turns.push((role, blocks)),
        }
    }
}

fn translate_messages(messages: &[Value]) -> Result<(Option<Value>, Vec<Value>)> {
    let mut t = Turns::default();
    for (i, m) in messages.iter().enumerate() {
        let path = format!("messages[{i}]");
        let m = object(&path, m)?;
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").filter(|c| !c.is_null());
        match role {
            "system" | "developer" => {
                only_keys(&path, m, &["role", "content"])?;
                let plain = matches!(content, Some(Value::String(_)));
                let blocks = content_blocks(&path, content, Allow::Text)?;
                if !blocks.is_empty() {
                    t.system_is_plain = t.system.is_empty() && plain;
                    t.system.extend(blocks);
                }
            }
            "user" => {
                only_keys(&path, m, &["role", "content"])?;
                let blocks = content_blocks(&path, content, Allow::TextAndImages)?;
                t.push("user", blocks);
            }
            "assistant" => {
                only_keys(
                    &path,
                    m,
                    &[
                        "role",
                        "content",
                        "refusal",
                        "tool_calls",
                        "reasoning_content",
                        "annotations",
                    ],
                )?;
                let mut blocks = content_blocks(&path, content, Allow::TextAndRefusal)?;
                if let Some(r) = m.get("refusal").and_then(Value::as_str) {
                    if !r.is_empty() {
                        blocks.push(json!({"type": "text", "text": r}));
                    }
                }
                match m.get("tool_calls") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(calls)) => {
                        for (j, call) in calls.iter().enumerate() {
                            blocks.push(tool_use(&format!("{path}.tool_calls[{j}]"), call)?);
                        }
                    }
                    Some(_) => {
                        return Err(invalid(format!("`{path}.tool_calls` must be an array")))
                    }
                }
                t.push("assistant", blocks);
            }
            "tool" => {
                only_keys(&path, m, &["role", "content", "tool_call_id", "name"])?;
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("`{path}.tool_call_id` must be a string")))?;
                let mut result = json!({"type": "tool_result", "tool_use_id": id});
                match content {
                    Some(Value::String(s)) if s.is_empty() => {}
                    Some(Value::String(s)) => result["content"] = s.as_str().into(),
                    _ => {
                        let blocks = content_blocks(&path, content, Allow::Text)?;
                        if !blocks.is_empty() {
                            result["content"] = Value::Array(blocks);
                        }
                    }
                }
                t.push("user", vec![result]);
            }
            "function" => {
                return Err(invalid(format!(
                    "`{path}.role`: legacy `function` messages are not supported; use `tool`"
                )))
            }
            other => {
                return Err(invalid(format!(
                    "`{path}.role` {other:?} is not a chat role"
                )))
            }
        }
    }
    let system = match t.system.len() {
        0 => None,
        1 if t.system_is_plain => t.system.pop().map(|mut b| b["text"].take()),
        _ => Some(Value::Array(t.system)),
    };
    let turns = t
        .turns
        .into_iter()
        .map(|(role, blocks)| json!({"role": role, "content": blocks}))
        .collect();
    Ok((system, turns))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Allow {
    Text,
    TextAndImages,
    TextAndRefusal,
}

/// A message's `content` (string or parts) as Anthropic blocks; empty text is skipped.
fn content_blocks(path: &str, content: Option<&Value>, allow: Allow) -> Result<Vec<Value>> {
    let parts = match content {
        None => return Ok(Vec::new()),
        Some(Value::String(s)) if s.is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => return Ok(vec![json!({"type": "text", "text": s})]),
        Some(Value::Array(parts)) => parts,
        Some(_) => {
            return Err(invalid(format!(
                "`{path}.content` must be a string or an array of parts"
            )))
        }
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for (k, part) in parts.iter().enumerate() {
        let path = format!("{path}.content[{k}]");
        let p = object(&path, part)?;
        let kind = p.get("type").and_then(Value::as_str).unwrap_or("");
        match (kind, allow) {
            ("text", _) => {
                only_keys(&path, p, &["type", "text"])?;
                let text = p
                    .get("text")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("`{path}.text` must be a string")))?;
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
            }
            ("refusal", Allow::TextAndRefusal) => {
                only_keys(&path, p, &["type", "refusal"])?;
                let text = p
                    .get("refusal")
                    .and_then(Value::as_str)
                    .ok_or_else(|| invalid(format!("`{path}.refusal` must be a string")))?;
                if !text.is_empty() {
                    blocks.push(json!({"type": "text", "text": text}));
                }
            }
            ("image_url", Allow::TextAndImages) => {
                only_keys(&path, p, &["type", "image_url"])?;
                blocks.push(image(&path, p.get("image_url"))?);
            }
            ("input_audio", _) => {
                return Err(invalid(format!(
                    "`{path}`: audio input is not supported for Anthropic models"
                )))
            }
            ("file", _) => {
                return Err(invalid(format!(
                    "`{path}`: file parts are not supported for Anthropic models"
                )))
            }
            (other, _) => {
                return Err(invalid(format!(
                    "`{path}.type` {other:?} is not supported in this message"
                )))
            }
        }
    }
    Ok(blocks)
}

/// The image types Anthropic accepts.
const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

fn image(path: &str, image_url: Option<&Value>) -> Result<Value> {
    let url = match image_url {
        Some(Value::String(url)) => url.as_str(),
        Some(Value::Object(o)) => {
            only_keys(&format!("{path}.image_url"), o, &["url", "detail"])?;
            o.get("url").and_then(Value::as_str).unwrap_or("")
        }
        _ => "",
    };
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| invalid(format!("`{path}.image_url.url` is not a valid data URL")))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| invalid(format!("`{path}.image_url.url`: data URLs must be base64")))?;
        if !IMAGE_TYPES.contains(&media_type) {
            return Err(invalid(format!(
                "`{path}.image_url.url`: image type {media_type:?} is not one of {}",
                IMAGE_TYPES.join(", ")
            )));
        }
        return Ok(json!({
            "type": "image",
            "source": {"type": "base64", "media_type": media_type, "data": data},
        }));
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(invalid(format!(
        "`{path}.image_url.url` must be a data: URL or an http(s) URL"
    )))
}

fn tool_use(path: &str, call: &Value) -> Result<Value> {
    let c = object(path, call)?;
    only_keys(path, c, &["id", "type", "function"])?;
    if let Some(kind) = c.get("type").and_then(Value::as_str) {
        if kind != "function" {
            return Err(invalid(format!(
                "`{path}.type` {kind:?}: only function tool calls are supported"
            )));
        }
    }
    let id = c
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("`{path}.id` must be a string")))?;
    let f = object(
        &format!("{path}.function"),
        c.get("function").unwrap_or(&Value::Null),
    )?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("`{path}.function.name` must be a string")))?;
    let arguments = f.get("arguments").and_then(Value::as_str).unwrap_or("");
    let input = if arguments.trim().is_empty() {
        json!({})
    } else {
        match serde_json::from_str::<Value>(arguments) {
            Ok(v @ Value::Object(_)) => v,
            Ok(_) => {
                return Err(invalid(format!(
                    "`{path}.function.arguments` must encode a JSON object"
                )))
            }
            Err(e) => {
                return Err(invalid(format!(
                    "`{path}.function.arguments` is not valid JSON ({e})"
                )))
            }
        }
    };
    Ok(json!({"type": "tool_use", "id": id, "name": name, "input": input}))
}

fn tool(i: usize, t: &Value) -> Result<Value> {
    let path = format!("tools[{i}]");
    let t = object(&path, t)?;
    let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "function" {
        return Err(invalid(format!(
            "`{path}.type` {kind:?}: only function tools are supported"
        )));
    }
    only_keys(&path, t, &["type", "function"])?;
    let fpath = format!("{path}.function");
    let f = object(&fpath, t.get("function").unwrap_or(&Value::Null))?;
    only_keys(&fpath, f, &["name", "description", "parameters", "strict"])?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("`{fpath}.name` must be a string")))?;
    let schema = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => return Err(invalid(format!("`{fpath}.parameters` must be an object"))),
    };
    let mut out = json!({"name": name, "input_schema": schema});
    if let Some(d) = f.get("description").filter(|d| !d.is_null()) {
        out["description"] = string(&format!("{fpath}.description"), d)?.into();
    }
    match f.get("strict") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => out["strict"] = true.into(),
        Some(_) => return Err(invalid(format!("`{fpath}.strict` must be a boolean"))),
    }
    Ok(out)
}

fn translate_tool_choice(c: &Value) -> Result<Value> {
    match c {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(json!({"type": "auto"})),
            "required" => Ok(json!({"type": "any"})),
            "none" => Ok(json!({"type": "none"})),
            other => Err(invalid(format!(
                "`tool_choice` {other:?} is not a tool choice"
            ))),
        },
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| invalid("`tool_choice.function.name` must be a string"))?;
            Ok(json!({"type": "tool", "name": name}))
        }
        _ => Err(invalid(
            "`tool_choice`: only `auto`, `none`, `required` and a named function are supported",
        )),
    }
}
