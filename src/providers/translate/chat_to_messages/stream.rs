//! Anthropic's Messages SSE -> OpenAI `chat.completion.chunk` SSE, event by event.
//!
//! Each chunk is written straight into the caller's buffer: a prefix holding `id`, `object`,
//! `created` and `model` is built once at `message_start`, then only the `choices` differ.
//! The output depends only on the sequence of upstream events, which [`SseFramer`] yields
//! identically for any split of the input, and `created` is fixed at construction.

use std::borrow::Cow;

use serde::Deserialize;

use super::response::{finish_reason, now_secs, openai_error, usage_json, ErrorDetail};
use crate::providers::anthropic::AnthropicUsage;
use crate::providers::sse::{SseEvent, SseFramer};
use crate::usage::Usage;

#[derive(Deserialize)]
struct Event<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    message: Option<StartMessage<'a>>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default, borrow)]
    content_block: Option<StartBlock<'a>>,
    #[serde(default, borrow)]
    delta: Option<Delta<'a>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
    #[serde(default, borrow)]
    error: Option<ErrorDetail<'a>>,
}

#[derive(Deserialize)]
struct StartMessage<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct StartBlock<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    /// A `redacted_thinking` block's data (no OpenAI form, but billed).
    #[serde(default, borrow)]
    data: Option<Cow<'a, str>>,
}

/// A `content_block_delta`'s or a `message_delta`'s `delta`.
#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(rename = "type", default, borrow)]
    kind: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

/// A `tool_use` block being streamed: its Anthropic block index, its OpenAI tool-call index,
/// and whether any argument text went out yet.
struct OpenTool {
    block: u64,
    call: u32,
    sent_arguments: bool,
}

/// Where the stream stands.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    #[default]
    Open,
    /// The finish chunk went out (`message_delta` with a stop reason).
    Finished,
    /// `message_stop` or an `error` event: `[DONE]` or the error went out, nothing follows.
    Closed,
}

/// Anthropic SSE -> OpenAI `chat.completion.chunk` SSE, chunk by chunk.
#[derive(Default)]
pub struct StreamTranslator {
    framer: SseFramer,
    include_usage: bool,
    created: i64,
    /// `data: {"id":…,"object":"chat.completion.chunk","created":…,"model":…,"choices":`
    prefix: Vec<u8>,
    usage: AnthropicUsage,
    /// A `message_delta` carried usage: the output count is final.
    final_usage: bool,
    content_bytes: u64,
    tools: Vec<OpenTool>,
    next_call: u32,
    phase: Phase,
}

impl StreamTranslator {
    /// `include_usage`: the client asked for the usage chunk (`stream_options`).
    pub fn new(include_usage: bool) -> StreamTranslator {
        StreamTranslator {
            include_usage,
            created: now_secs(),
            ..StreamTranslator::default()
        }
    }

    /// A translator with a fixed `created`, so tests can compare two runs byte for byte.
    #[cfg(test)]
    pub(super) fn with_created(include_usage: bool, created: i64) -> StreamTranslator {
        StreamTranslator {
            include_usage,
            created,
            ..StreamTranslator::default()
        }
    }

    /// Appends the translation of `chunk` to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut framer = std::mem::take(&mut self.framer);
        framer.feed(chunk, &mut |e| self.event(e, out));
        self.framer = framer;
    }

    /// End of the upstream stream: appends whatever is still owed. After `message_stop` that
    /// is nothing (`[DONE]` went out with it); after a stop reason but no `message_stop`, the
    /// usage chunk and `[DONE]`; a stream cut short of its stop reason gets an error event
    /// instead of `[DONE]`, so the client does not take a truncated answer for a whole one.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut framer = std::mem::take(&mut self.framer);
        framer.finish(&mut |e| self.event(e, out));
        self.framer = framer;
        match self.phase {
            Phase::Closed => {}
            // Only `message_stop` is missing: the answer and its stop reason are whole.
            Phase::Finished => self.close(out),
            Phase::Open => {
                self.phase = Phase::Closed;
                let detail = ErrorDetail {
                    kind: Some(Cow::Borrowed("api_error")),
                    message: Some(Cow::Borrowed(
                        "The upstream stream ended before the message was complete.",
                    )),
                };
                write_error(out, &detail);
            }
        }
    }

    /// The usage reported so far (each field's latest value), in the gateway's normal form.
    pub fn partial_usage(&self) -> Option<Usage> {
        self.usage.normalize()
    }

    /// The usage once final (a `message_delta` reported it); None before: `message_start`'s
    /// `output_tokens` counts nothing generated yet.
    pub fn usage(&self) -> Option<Usage> {
        self.partial_usage().filter(|_| self.final_usage)
    }

    /// Bytes of generated text, reasoning and tool arguments seen so far.
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    fn event(&mut self, e: SseEvent<'_>, out: &mut Vec<u8>) {
        if self.phase == Phase::Closed {
            return;
        }
        let Ok(ev) = serde_json::from_slice::<Event<'_>>(e.data) else {
            return;
        };
        match ev.kind.as_ref() {
            "message_start" => self.message_start(ev.message.as_ref(), out),
            "content_block_start" => {
                if let (Some(index), Some(block)) = (ev.index, &ev.content_block) {
                    self.block_start(index, block, out);
                }
            }
            "content_block_delta" => {
                if let (Some(index), Some(delta)) = (ev.index, &ev.delta) {
                    self.block_delta(index, delta, out);
                }
            }
            "content_block_stop" => {
                if let Some(index) = ev.index {
                    self.block_stop(index, out);
                }
            }
            "message_delta" => {
                if let Some(u) = &ev.usage {
                    self.usage.update(u);
                    self.final_usage = true;
                }
                let stop = ev.delta.as_ref().and_then(|d| d.stop_reason.as_deref());
                if let Some(stop) = stop {
                    self.finish_chunk(finish_reason(stop), out);
                }
            }
            "message_stop" => {
                self.finish_chunk("stop", out);
                self.close(out);
            }
            "error" => {
                let detail = ev.error.unwrap_or(ErrorDetail {
                    kind: None,
                    message: None,
                });
                write_error(out, &detail);
                self.phase = Phase::Closed;
            }
            // ping and event types added later.
            _ => {}
        }
    }

    fn message_start(&mut self, message: Option<&StartMessage<'_>>, out: &mut Vec<u8>) {
        if let Some(u) = message.and_then(|m| m.usage.as_ref()) {
            self.usage.update(u);
        }
        if !self.prefix.is_empty() {
            return; // a repeated message_start: the role went out already
        }
        let id = message.and_then(|m| m.id.as_deref()).unwrap_or("");
        let model = message.and_then(|m| m.model.as_deref()).unwrap_or("");
        self.build_prefix(id, model);
        self.delta_chunk(out, |out| {
            out.extend_from_slice(br#""role":"assistant","content":"""#)
        });
    }

    fn block_start(&mut self, index: u64, block: &StartBlock<'_>, out: &mut Vec<u8>) {
        match block.kind.as_ref() {
            "text" => {
                if let Some(text) = block.text.as_deref().filter(|t| !t.is_empty()) {
                    self.content(b"content", text, out);
                }
            }
            "thinking" => {
                if let Some(text) = block.thinking.as_deref().filter(|t| !t.is_empty()) {
                    self.content(b"reasoning_content", text, out);
                }
            }
            "tool_use" => {
                let call = self.next_call;
                self.next_call = self.next_call.saturating_add(1);
                self.tools.push(OpenTool {
                    block: index,
                    call,
                    sent_arguments: false,
                });
                let id = block.id.as_deref().unwrap_or("");
                let name = block.name.as_deref().unwrap_or("");
                // The name is output the provider bills: counted for a stream cut after it.
                self.content_bytes = self.content_bytes.saturating_add(name.len() as u64);
                self.delta_chunk(out, |out| {
                    out.extend_from_slice(br#""tool_calls":[{"index":"#);
                    push_json(out, &call);
                    out.extend_from_slice(br#","id":"#);
                    push_json(out, id);
                    out.extend_from_slice(br#","type":"function","function":{"name":"#);
                    push_json(out, name);
                    out.extend_from_slice(br#","arguments":""}}]"#);
                });
            }
            // redacted_thinking and server-tool blocks have no OpenAI form; what they carry
            // is billed all the same.
            _ => {
                let data = block.data.as_deref().map_or(0, str::len) as u64;
                let name = block.name.as_deref().map_or(0, str::len) as u64;
                self.content_bytes = self.content_bytes.saturating_add(data + name);
            }
        }
    }

    fn block_delta(&mut self, index: u64, delta: &Delta<'_>, out: &mut Vec<u8>) {
        match delta.kind.as_deref() {
            Some("text_delta") => {
                if let Some(text) = delta.text.as_deref().filter(|t| !t.is_empty()) {
                    self.content(b"content", text, out);
                }
            }
            Some("thinking_delta") => {
                if let Some(text) = delta.thinking.as_deref().filter(|t| !t.is_empty()) {
                    self.content(b"reasoning_content", text, out);
                }
            }
            Some("input_json_delta") => {
                let Some(json) = delta.partial_json.as_deref().filter(|t| !t.is_empty()) else {
                    return;
                };
                let Some(tool) = self.tools.iter_mut().find(|t| t.block == index) else {
                    return;
                };
                tool.sent_arguments = true;
                let call = tool.call;
                self.content_bytes = self.content_bytes.saturating_add(json.len() as u64);
                self.arguments_chunk(call, json, out);
            }
            // signature_delta, citations_delta: nothing to show.
            _ => {}
        }
    }

    fn block_stop(&mut self, index: u64, out: &mut Vec<u8>) {
        let Some(at) = self.tools.iter().position(|t| t.block == index) else {
            return;
        };
        let tool = self.tools.swap_remove(at);
        if !tool.sent_arguments {
            // A call without arguments: OpenAI clients parse `arguments`, so give them `{}`.
            self.arguments_chunk(tool.call, "{}", out);
        }
    }

    /// A text-like delta under `field` (`content` or `reasoning_content`).
    fn content(&mut self, field: &[u8], text: &str, out: &mut Vec<u8>) {
        self.content_bytes = self.content_bytes.saturating_add(text.len() as u64);
        self.delta_chunk(out, |out| {
            out.push(b'"');
            out.extend_from_slice(field);
            out.extend_from_slice(b"\":");
            push_json(out, text);
        });
    }

    fn arguments_chunk(&mut self, call: u32, arguments: &str, out: &mut Vec<u8>) {
        self.delta_chunk(out, |out| {
            out.extend_from_slice(br#""tool_calls":[{"index":"#);
            push_json(out, &call);
            out.extend_from_slice(br#","function":{"arguments":"#);
            push_json(out, arguments);
            out.extend_from_slice(b"}}]");
        });
    }

    /// The usage chunk if the client asked for it, then `[DONE]`.
    fn close(&mut self, out: &mut Vec<u8>) {
        if self.include_usage {
            let usage = self.usage.normalize().unwrap_or_default();
            self.ensure_prefix();
            out.extend_from_slice(&self.prefix);
            out.extend_from_slice(b"[],\"usage\":");
            push_json(out, &usage_json(&usage));
            out.extend_from_slice(b"}\n\n");
        }
        out.extend_from_slice(b"data: [DONE]\n\n");
        self.phase = Phase::Closed;
    }

    /// The chunk with the finish reason and an empty delta, once.
    fn finish_chunk(&mut self, reason: &str, out: &mut Vec<u8>) {
        if self.phase != Phase::Open {
            return;
        }
        self.phase = Phase::Finished;
        self.ensure_prefix();
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(br#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"#);
        push_json(out, reason);
        out.extend_from_slice(b"}]}\n\n");
    }

    /// One chunk whose `choices[0].delta` members are written by `members`.
    fn delta_chunk(&mut self, out: &mut Vec<u8>, members: impl FnOnce(&mut Vec<u8>)) {
        self.ensure_prefix();
        out.extend_from_slice(&self.prefix);
        out.extend_from_slice(br#"[{"index":0,"delta":{"#);
        members(out);
        out.extend_from_slice(br#"},"logprobs":null,"finish_reason":null}]}"#);
        out.extend_from_slice(b"\n\n");
    }

    /// Events before `message_start` (a non-conforming upstream) still get well-formed chunks.
    fn ensure_prefix(&mut self) {
        if self.prefix.is_empty() {
            self.build_prefix("", "");
        }
    }

    fn build_prefix(&mut self, id: &str, model: &str) {
        let p = &mut self.prefix;
        p.clear();
        p.extend_from_slice(br#"data: {"id":"#);
        push_json(p, id);
        p.extend_from_slice(br#","object":"chat.completion.chunk","created":"#);
        push_json(p, &self.created);
        p.extend_from_slice(br#","model":"#);
        push_json(p, model);
        p.extend_from_slice(br#","choices":"#);
    }
}

fn write_error(out: &mut Vec<u8>, detail: &ErrorDetail<'_>) {
    out.extend_from_slice(b"data: ");
    // A mid-stream error is a server-side one: 500 picks the fallback type if none is given.
    push_json(out, &openai_error(500, Some(detail)));
    out.extend_from_slice(b"\n\n");
}

/// Serializing into a `Vec` cannot fail for these types (strings, numbers, `Value`s).
fn push_json<T: serde::Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    let _ = serde_json::to_writer(&mut *out, value);
}
