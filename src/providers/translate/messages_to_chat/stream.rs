//! OpenAI `chat.completion.chunk` SSE -> Anthropic Messages SSE, event by event.
//!
//! The first chunk opens the message (`message_start`). Text goes into a text block, each
//! tool call into its own `tool_use` block (`input_json_delta` pieces). Anthropic blocks do
//! not interleave, while OpenAI may interleave parallel tool calls by `index`: the first
//! tool call streams live, and anything arriving while it is open (other calls, later text)
//! is held and written as whole blocks after it, when the choice finishes. OpenAI's usage
//! chunk comes after `finish_reason`, so `message_delta` (stop reason and usage) waits for
//! it, or for `[DONE]`, or for the end of the stream; then `message_stop`. An error event
//! from the upstream becomes Anthropic's `error` event and ends the message.
//!
//! Output depends only on the SSE events (the framer is split-invariant), so any split of
//! the input gives the same bytes. Events are serialized straight into `out`.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::from_chat_response::error_message;
use super::{stop_reason, UsageOut};
use crate::providers::openai_usage::usage_from_json;
use crate::providers::sse::{SseEvent, SseFramer};
use crate::usage::Usage;

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    choices: Vec<ChunkChoice<'a>>,
    #[serde(default, borrow)]
    usage: Option<&'a RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: u32,
    #[serde(default, borrow)]
    delta: Option<ChunkDelta<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

/// A JSON string, borrowed from the chunk unless it has escapes.
#[derive(Deserialize)]
struct Text<'a>(#[serde(borrow)] Cow<'a, str>);

/// A part of a delta's `content` given as a list (Mistral's and other OpenAI-compatible
/// servers'): its `text` is the answer's text; its `thinking` counts as output only.
#[derive(Deserialize)]
struct ContentPart<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ChunkDelta<'a> {
    /// A string, or a list of [`ContentPart`]s (read in `delta`).
    #[serde(default, borrow)]
    content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    /// Reasoning text of some OpenAI-compatible servers: not returned (thinking was not
    /// asked for), but counted as output for the estimate of a broken stream.
    #[serde(default, borrow)]
    reasoning_content: Option<&'a RawValue>,
    #[serde(default, borrow)]
    reasoning: Option<&'a RawValue>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallDelta<'a> {
    #[serde(default)]
    index: Option<u32>,
    #[serde(default, borrow)]
    id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// One Anthropic stream event; `type` is also the SSE `event:` name.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: StartMessage<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: Block<'a>,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta,
        usage: DeltaUsage,
    },
    MessageStop,
    Error {
        error: ErrorBody<'a>,
    },
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
            Event::Error { .. } => "error",
        }
    }
}

#[derive(Serialize)]
struct StartMessage<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: [Empty; 0],
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'static str>,
    usage: UsageOut,
}

/// Serializes as `{}`.
#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: &'static str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Empty,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Serialize)]
struct StopDelta {
    stop_reason: &'static str,
    stop_sequence: Option<&'static str>,
}

/// The full usage once reported, else only the `output_tokens` Anthropic requires.
#[derive(Serialize)]
#[serde(untagged)]
enum DeltaUsage {
    Reported(UsageOut),
    Unknown { output_tokens: u64 },
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

fn emit(out: &mut Vec<u8>, event: &Event<'_>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(event.name().as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Writing these types to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, event);
    out.extend_from_slice(b"\n\n");
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Nothing from the upstream yet.
    #[default]
    Waiting,
    /// `message_start` written; blocks may be open.
    Streaming,
    /// The choice finished: blocks closed, `message_delta` waits for the usage.
    Finished,
    /// `message_stop` (or an error event) written; nothing more goes out.
    Ended,
}

/// The block currently open on the client's side.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Open {
    #[default]
    None,
    Text {
        block: u32,
    },
    /// `tool`: position in `tools`.
    Tool {
        tool: usize,
        block: u32,
    },
}

/// A tool call seen in the stream, by OpenAI's `index`.
struct ToolCall {
    index: u32,
    id: String,
    name: String,
    /// Arguments held while another block was open (empty for the live call).
    held_args: String,
}

/// Content that arrived while a tool block was open, in order of arrival.
enum Held {
    Text(String),
    /// Position in `tools`.
    Tool(usize),
}

/// OpenAI chat SSE -> Anthropic Messages SSE, chunk by chunk.
#[derive(Default)]
pub struct StreamTranslator {
    framer: SseFramer,
    phase: Phase,
    open: Open,
    /// Anthropic's index for the next content block.
    next_block: u32,
    tools: Vec<ToolCall>,
    held: Vec<Held>,
    stop_reason: Option<&'static str>,
    usage: Option<Usage>,
    content_bytes: u64,
}

impl StreamTranslator {
    pub fn new() -> StreamTranslator {
        StreamTranslator::default()
    }

    /// Appends the translation of `chunk` to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let mut framer = std::mem::take(&mut self.framer);
        framer.feed(chunk, &mut |e: SseEvent<'_>| self.event(e.data, out));
        self.framer = framer;
    }

    /// End of the upstream stream: appends whatever is still owed (`message_stop`). A
    /// stream that ended with `[DONE]` before any chunk gets nothing more; one that ended
    /// before its first chunk, or whose choice was still streaming (no
    /// `finish_reason`, no `[DONE]`) was cut short: it ends with Anthropic's `error` event,
    /// as the other direction ends a cut stream with an error, not with a stop that makes
    /// it look whole (a tool call cut mid-arguments would read as a call with `{}`).
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let mut framer = std::mem::take(&mut self.framer);
        framer.finish(&mut |e: SseEvent<'_>| self.event(e.data, out));
        self.framer = framer;
        // Cut before its end, or before its first chunk (a client that got its 200 head
        // still gets an answer its SDK raises on, not a connection cut mid-body).
        if matches!(self.phase, Phase::Streaming | Phase::Waiting) {
            let error = ErrorBody {
                kind: "api_error",
                message: "The upstream stream ended before the message was complete.",
            };
            emit(out, &Event::Error { error });
            self.phase = Phase::Ended;
            return;
        }
        self.end(out);
    }

    /// The usage the upstream reported (the latest usage chunk), normalized.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Bytes of generated text, refusal, reasoning and tool arguments seen so far.
    pub fn content_bytes(&self) -> u64 {
        self.content_bytes
    }

    fn event(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if data.trim_ascii() == b"[DONE]" {
            self.end(out);
            return;
        }
        let Ok(chunk) = serde_json::from_slice::<Chunk<'_>>(data) else {
            return; // not a chunk: nothing a client could use
        };
        if chunk.error.is_some() {
            self.error(data, out);
            return;
        }
        let reported = chunk.usage.is_some_and(|u| u.get() != "null");
        if reported {
            if let Some(u) = usage_from_json(data) {
                self.usage = Some(u);
            }
        }
        if self.phase == Phase::Ended {
            return;
        }
        if self.phase == Phase::Waiting {
            self.start(&chunk, out);
        }
        // One choice is asked for; any other is not part of this message.
        for choice in chunk.choices.iter().filter(|c| c.index == 0) {
            if let Some(delta) = &choice.delta {
                self.delta(delta, out);
            }
            if let Some(reason) = &choice.finish_reason {
                self.finish_choice(Some(reason), out);
            }
        }
        if self.phase == Phase::Finished && reported {
            self.end(out);
        }
    }

    fn start(&mut self, chunk: &Chunk<'_>, out: &mut Vec<u8>) {
        let id = format!("msg_{}", chunk.id.as_deref().unwrap_or_default());
        let message = StartMessage {
            id: &id,
            kind: "message",
            role: "assistant",
            model: chunk.model.as_deref().unwrap_or_default(),
            content: [],
            stop_reason: None,
            stop_sequence: None,
            usage: UsageOut::from_usage(&self.usage.unwrap_or_default()),
        };
        emit(out, &Event::MessageStart { message });
        self.phase = Phase::Streaming;
    }

    fn delta(&mut self, delta: &ChunkDelta<'_>, out: &mut Vec<u8>) {
        for reasoning in [delta.reasoning_content, delta.reasoning]
            .into_iter()
            .flatten()
        {
            self.count(reasoning.get().len());
        }
        if self.phase != Phase::Streaming {
            return; // after the choice finished nothing more belongs to the message
        }
        if let Some(content) = delta.content {
            let raw = content.get();
            if raw.starts_with('"') {
                // Borrowed unless escaped: no allocation a chunk.
                if let Ok(Text(text)) = serde_json::from_str::<Text<'_>>(raw) {
                    self.text(&text, out);
                }
            } else if raw.starts_with('[') {
                for part in serde_json::from_str::<Vec<ContentPart<'_>>>(raw).unwrap_or_default() {
                    if let Some(text) = &part.text {
                        self.text(text, out);
                    }
                    if let Some(thinking) = part.thinking {
                        self.count(thinking.get().len());
                    }
                }
            }
        }
        if let Some(refusal) = &delta.refusal {
            self.text(refusal, out);
        }
        for (pos, call) in delta.tool_calls.iter().flatten().enumerate() {
            let index = call
                .index
                .unwrap_or_else(|| u32::try_from(pos).unwrap_or(u32::MAX));
            let function = call.function.as_ref();
            self.tool_call(
                index,
                call.id.as_deref(),
                function.and_then(|f| f.name.as_deref()),
                function.and_then(|f| f.arguments.as_deref()).unwrap_or(""),
                out,
            );
        }
    }

    fn count(&mut self, bytes: usize) {
        self.content_bytes = self.content_bytes.saturating_add(bytes as u64);
    }

    fn next_block(&mut self) -> u32 {
        let block = self.next_block;
        self.next_block = self.next_block.saturating_add(1);
        block
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        self.count(text.len());
        self.write_text(text, out);
    }

    /// Text into the open text block (opening one if none is open), or held while a tool
    /// block is open.
    fn write_text(&mut self, text: &str, out: &mut Vec<u8>) {
        if text.is_empty() {
            return;
        }
        let block = match self.open {
            Open::Text { block } => block,
            Open::None => {
                let block = self.next_block();
                let content_block = Block::Text { text: "" };
                emit(
                    out,
                    &Event::ContentBlockStart {
                        index: block,
                        content_block,
                    },
                );
                self.open = Open::Text { block };
                block
            }
            Open::Tool { .. } => {
                match self.held.last_mut() {
                    Some(Held::Text(held)) => held.push_str(text),
                    _ => self.held.push(Held::Text(text.to_owned())),
                }
                return;
            }
        };
        let delta = BlockDelta::TextDelta { text };
        emit(
            out,
            &Event::ContentBlockDelta {
                index: block,
                delta,
            },
        );
    }

    fn tool_call(
        &mut self,
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        arguments: &str,
        out: &mut Vec<u8>,
    ) {
        self.count(arguments.len());
        // Some OpenAI-compatible servers give every call index 0; a new id is a new call.
        let known = self
            .tools
            .iter()
            .rposition(|t| t.index == index)
            .filter(|&k| {
                let seen = &self.tools[k].id;
                id.is_none_or(|id| id.is_empty() || seen.is_empty() || seen == id)
            });
        let tool = match known {
            Some(tool) => {
                // A held call may learn its id and name late; a live one already sent them.
                let t = &mut self.tools[tool];
                if t.id.is_empty() {
                    t.id = id.unwrap_or_default().to_owned();
                }
                let late_name = t.name.is_empty().then_some(name).flatten();
                if let Some(name) = late_name {
                    t.name = name.to_owned();
                    // Output the provider bills, as the arguments are; counted once (some
                    // servers repeat the name on every delta).
                    self.count(name.len());
                }
                tool
            }
            None => {
                self.count(name.map_or(0, str::len));
                self.new_tool_call(index, id, name, out)
            }
        };
        if arguments.is_empty() {
            return;
        }
        match self.open {
            Open::Tool { tool: live, block } if live == tool => {
                let delta = BlockDelta::InputJsonDelta {
                    partial_json: arguments,
                };
                emit(
                    out,
                    &Event::ContentBlockDelta {
                        index: block,
                        delta,
                    },
                );
            }
            _ => self.tools[tool].held_args.push_str(arguments),
        }
    }

    /// A call seen for the first time: it streams live unless another call is open.
    fn new_tool_call(
        &mut self,
        index: u32,
        id: Option<&str>,
        name: Option<&str>,
        out: &mut Vec<u8>,
    ) -> usize {
        let tool = self.tools.len();
        self.tools.push(ToolCall {
            index,
            id: id.unwrap_or_default().to_owned(),
            name: name.unwrap_or_default().to_owned(),
            held_args: String::new(),
        });
        match self.open {
            Open::Tool { .. } => self.held.push(Held::Tool(tool)),
            Open::Text { block } => {
                emit(out, &Event::ContentBlockStop { index: block });
                self.open_tool(tool, out);
            }
            Open::None => self.open_tool(tool, out),
        }
        tool
    }

    fn open_tool(&mut self, tool: usize, out: &mut Vec<u8>) {
        let block = self.next_block();
        let t = &self.tools[tool];
        let fallback;
        let id = if t.id.is_empty() {
            fallback = format!("toolu_{}", t.index);
            &fallback
        } else {
            &t.id
        };
        let content_block = Block::ToolUse {
            id,
            name: &t.name,
            input: Empty {},
        };
        emit(
            out,
            &Event::ContentBlockStart {
                index: block,
                content_block,
            },
        );
        self.open = Open::Tool { tool, block };
    }

    /// The choice ended: close the open block, write what was held, and keep the stop
    /// reason for `message_delta`.
    fn finish_choice(&mut self, finish_reason: Option<&str>, out: &mut Vec<u8>) {
        if self.phase != Phase::Streaming {
            return;
        }
        self.close_block(out);
        for held in std::mem::take(&mut self.held) {
            match held {
                Held::Text(text) => self.write_text(&text, out),
                Held::Tool(tool) => {
                    self.open_tool(tool, out);
                    let args = std::mem::take(&mut self.tools[tool].held_args);
                    if let Open::Tool { block, .. } = self.open {
                        if !args.is_empty() {
                            let delta = BlockDelta::InputJsonDelta {
                                partial_json: &args,
                            };
                            emit(
                                out,
                                &Event::ContentBlockDelta {
                                    index: block,
                                    delta,
                                },
                            );
                        }
                    }
                }
            }
            self.close_block(out);
        }
        self.stop_reason = Some(match finish_reason {
            Some(reason) => stop_reason(Some(reason)),
            None if self.tools.is_empty() => "end_turn",
            None => "tool_use",
        });
        self.phase = Phase::Finished;
    }

    fn close_block(&mut self, out: &mut Vec<u8>) {
        match std::mem::take(&mut self.open) {
            Open::None => {}
            Open::Text { block } | Open::Tool { block, .. } => {
                emit(out, &Event::ContentBlockStop { index: block });
            }
        }
    }

    /// `[DONE]`, the usage after the finish, or the end of the stream: `message_delta` and
    /// `message_stop`, once.
    fn end(&mut self, out: &mut Vec<u8>) {
        match self.phase {
            Phase::Waiting => {
                self.phase = Phase::Ended;
                return;
            }
            Phase::Streaming => self.finish_choice(None, out),
            Phase::Finished => {}
            Phase::Ended => return,
        }
        let usage = match &self.usage {
            Some(u) => DeltaUsage::Reported(UsageOut::from_usage(u)),
            None => DeltaUsage::Unknown { output_tokens: 0 },
        };
        let delta = StopDelta {
            stop_reason: self.stop_reason.unwrap_or("end_turn"),
            stop_sequence: None,
        };
        emit(out, &Event::MessageDelta { delta, usage });
        emit(out, &Event::MessageStop);
        self.phase = Phase::Ended;
    }

    /// An error event from the upstream: Anthropic's `error` event, and the message ends
    /// there (as an Anthropic stream does).
    fn error(&mut self, data: &[u8], out: &mut Vec<u8>) {
        if self.phase == Phase::Ended {
            return;
        }
        let message = serde_json::from_slice(data)
            .ok()
            .and_then(|v| error_message(&v));
        let error = ErrorBody {
            kind: "api_error",
            message: message
                .as_deref()
                .unwrap_or("the upstream model failed mid-stream"),
        };
        emit(out, &Event::Error { error });
        self.phase = Phase::Ended;
    }
}
