//! The response side of an attempt: one codec per answer, chosen from the attempt's
//! [`Plan`], the status and whether the answer is a stream. A codec either observes (the
//! bytes pass unchanged, usage is read as they go) or translates (the bytes are rewritten
//! into the client's format). Either way it yields the usage the provider reported.

use std::ops::Range;

use bytes::{Bytes, BytesMut};

use crate::providers::openai_usage::{usage_from_json, without, Forward, SseUsageParser};
use crate::usage::Usage;

use super::mask::mask_account_ids;
use super::sse::SseObserver;
use super::translate::{chat_to_messages, messages_to_chat};
use super::{anthropic, responses, transcription, Plan};

/// Non-streamed answers larger than this are not kept for usage (charged an estimate
/// instead), so a huge response cannot balloon memory.
pub const MAX_JSON_RESPONSE: usize = 8 * 1024 * 1024;
/// A translated JSON answer is held whole; past this it is passed on untranslated.
pub const MAX_TRANSLATED_RESPONSE: usize = 64 * 1024 * 1024;

/// A non-streamed body kept whole. The usual one-chunk body is held by reference count (no
/// copy); only a body split across chunks is joined.
#[derive(Default)]
pub struct ResponseBody {
    first: Bytes,
    joined: Option<Vec<u8>>,
}

impl ResponseBody {
    /// Adds a chunk; false once the body exceeds `max` (the caller then drops it).
    pub fn push(&mut self, chunk: &Bytes, max: usize) -> bool {
        match &mut self.joined {
            Some(v) => v.extend_from_slice(chunk),
            None if self.first.is_empty() => self.first = chunk.clone(),
            None => {
                let mut v = Vec::with_capacity(self.first.len() + chunk.len());
                v.extend_from_slice(&self.first);
                v.extend_from_slice(chunk);
                self.joined = Some(v);
            }
        }
        self.len() <= max
    }

    pub fn len(&self) -> usize {
        self.joined.as_ref().map_or(self.first.len(), Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn bytes(&self) -> &[u8] {
        self.joined.as_deref().unwrap_or(&self.first)
    }

    fn into_bytes(self) -> Bytes {
        match self.joined {
            Some(v) => Bytes::from(v),
            None => self.first,
        }
    }
}

/// Which usage a whole JSON answer carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonFormat {
    /// Chat completions, embeddings, responses: `usage.prompt_tokens` or `input_tokens`.
    OpenAi,
    Anthropic,
    /// `/images/generations`: the images in `data`, and `usage` where the model reports it.
    Images,
    /// A transcription or translation: `duration` (seconds; `verbose_json`) or
    /// `usage.seconds` in ms, or token `usage` where the model reports it.
    Transcription,
}

impl JsonFormat {
    fn usage(self, body: &[u8]) -> Option<Usage> {
        match self {
            JsonFormat::OpenAi => usage_from_json(body),
            JsonFormat::Anthropic => anthropic::usage_from_json(body),
            JsonFormat::Images => images_usage(body),
            JsonFormat::Transcription => transcription::usage(body),
        }
    }

    /// The longest body kept for its usage: an images answer carries its images inline.
    fn max_kept(self) -> usize {
        match self {
            JsonFormat::Images => MAX_TRANSLATED_RESPONSE,
            JsonFormat::OpenAi | JsonFormat::Anthropic | JsonFormat::Transcription => {
                MAX_JSON_RESPONSE
            }
        }
    }
}

/// An images answer: `units` = the images in `data`, tokens from `usage` if reported.
pub fn images_usage(body: &[u8]) -> Option<Usage> {
    #[derive(serde::Deserialize)]
    struct Images {
        data: Vec<serde::de::IgnoredAny>,
    }
    let images: Images = serde_json::from_slice(body).ok()?;
    let mut usage = usage_from_json(body).unwrap_or_default();
    usage.units = images.data.len() as u64;
    Some(usage)
}

pub enum ResponseCodec {
    /// An upstream error passed through: held to its end (errors are small) so account
    /// identifiers split across chunks are masked too; past `MAX_JSON_RESPONSE` it is masked
    /// chunk by chunk.
    Error(Option<ResponseBody>),
    /// A whole JSON answer, kept for its usage (dropped past `MAX_JSON_RESPONSE`).
    Json(Option<ResponseBody>, JsonFormat),
    /// An OpenAI chat stream: usage read as it passes; the usage event the gateway asked
    /// for on the client's behalf is cut out.
    ChatSse(SseUsageParser),
    AnthropicSse(anthropic::SseUsage),
    ResponsesSse(responses::SseUsage),
    /// A streamed transcription (`stream=true`): usage from `transcript.text.done`.
    TranscriptionSse(transcription::SseUsage),
    /// A whole answer held until its end, then translated (a success or an error body).
    Translate {
        body: Option<ResponseBody>,
        plan: Plan,
        status: u16,
    },
    ChatFromMessagesSse(Box<chat_to_messages::StreamTranslator>, Vec<u8>),
    MessagesFromChatSse(Box<messages_to_chat::StreamTranslator>, Vec<u8>),
    /// Bytes passed on as they come, no usage in them (speech audio: charged by its input).
    Passthrough,
}

impl ResponseCodec {
    /// The codec for an answer's head. `client_wants_usage`: a chat client asked for the
    /// usage chunk itself. Returns whether the body's length changes (the caller then drops
    /// `content-length`, and the answer goes chunked).
    pub fn for_head(
        plan: Plan,
        status: u16,
        is_sse: bool,
        stream: bool,
        client_wants_usage: bool,
    ) -> (ResponseCodec, bool) {
        let ok = (200..300).contains(&status);
        if plan.translates() {
            return match (is_sse && ok, plan) {
                (true, Plan::ChatViaMessages) => (
                    ResponseCodec::ChatFromMessagesSse(
                        Box::new(chat_to_messages::StreamTranslator::new(client_wants_usage)),
                        Vec::new(),
                    ),
                    true,
                ),
                (true, _) => (
                    ResponseCodec::MessagesFromChatSse(
                        Box::new(messages_to_chat::StreamTranslator::new()),
                        Vec::new(),
                    ),
                    true,
                ),
                (false, _) => (
                    ResponseCodec::Translate {
                        body: Some(ResponseBody::default()),
                        plan,
                        status,
                    },
                    true,
                ),
            };
        }
        // An error is held and masked whatever its type: one sent as an event stream may
        // echo a provider key too.
        if !ok {
            return (ResponseCodec::Error(Some(ResponseBody::default())), false);
        }
        if is_sse {
            return match plan {
                Plan::Messages => (
                    ResponseCodec::AnthropicSse(anthropic::SseUsage::new()),
                    false,
                ),
                Plan::Responses => (
                    ResponseCodec::ResponsesSse(responses::SseUsage::new()),
                    false,
                ),
                Plan::Transcriptions | Plan::Translations => (
                    ResponseCodec::TranscriptionSse(transcription::SseUsage::new()),
                    false,
                ),
                _ => {
                    let strip = stream && !client_wants_usage;
                    (ResponseCodec::ChatSse(SseUsageParser::new(strip)), strip)
                }
            };
        }
        let format = match plan {
            Plan::Messages | Plan::CountTokens => JsonFormat::Anthropic,
            Plan::Images | Plan::ImagesEdits => JsonFormat::Images,
            Plan::Transcriptions | Plan::Translations => JsonFormat::Transcription,
            Plan::Speech => return (ResponseCodec::Passthrough, false),
            _ => JsonFormat::OpenAi,
        };
        (
            ResponseCodec::Json(Some(ResponseBody::default()), format),
            false,
        )
    }

    /// One chunk on its way to the client, rewritten in place where the codec translates.
    pub fn filter(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        match self {
            ResponseCodec::Error(held) => filter_error(held, body, end_of_stream),
            ResponseCodec::Passthrough => {}
            ResponseCodec::Json(kept, format) => {
                if let (Some(buf), Some(chunk)) = (kept.as_mut(), body.as_ref()) {
                    if !buf.push(chunk, format.max_kept()) {
                        *kept = None;
                    }
                }
            }
            ResponseCodec::ChatSse(parser) => filter_chat_sse(parser, body, end_of_stream),
            ResponseCodec::AnthropicSse(p) => observe(p, body, end_of_stream),
            ResponseCodec::ResponsesSse(p) => observe(p, body, end_of_stream),
            ResponseCodec::TranscriptionSse(p) => observe(p, body, end_of_stream),
            ResponseCodec::Translate {
                body: held,
                plan,
                status,
            } => {
                let Some(buf) = held.as_mut() else {
                    return; // too large to translate: passed on as it came
                };
                if let Some(chunk) = body.take() {
                    if !buf.push(&chunk, MAX_TRANSLATED_RESPONSE) {
                        *body = held.take().map(ResponseBody::into_bytes);
                        return;
                    }
                }
                if end_of_stream {
                    *body = Some(translate_whole(*plan, *status, buf.bytes()).into());
                }
            }
            ResponseCodec::ChatFromMessagesSse(t, out) => {
                translate_stream(&mut **t, out, body, end_of_stream)
            }
            ResponseCodec::MessagesFromChatSse(t, out) => {
                translate_stream(&mut **t, out, body, end_of_stream)
            }
        }
    }

    /// The usage the provider reported. A whole body counts only once it is `complete`.
    pub fn usage(&self, complete: bool) -> Option<Usage> {
        match self {
            ResponseCodec::Error(_) | ResponseCodec::Passthrough => None,
            ResponseCodec::Json(kept, format) => {
                kept.as_ref().filter(|_| complete)?;
                let bytes = kept.as_ref()?.bytes();
                // Read as the client reads it: a byte-order mark or a lone surrogate escape
                // mended (`mend_json`), only when the plain read failed.
                format
                    .usage(bytes)
                    .or_else(|| format.usage(&mend_json(bytes)?))
            }
            ResponseCodec::ChatSse(p) => p.usage(),
            ResponseCodec::AnthropicSse(p) => p.usage(),
            ResponseCodec::ResponsesSse(p) => p.usage(),
            ResponseCodec::TranscriptionSse(p) => p.usage(),
            ResponseCodec::Translate { body, plan, status } => {
                if !complete || !(200..300).contains(status) {
                    return None;
                }
                let bytes = body.as_ref()?.bytes();
                let read = |b: &[u8]| match plan {
                    Plan::ChatViaMessages => anthropic::usage_from_json(b),
                    _ => usage_from_json(b),
                };
                read(bytes).or_else(|| read(&mend_json(bytes)?))
            }
            ResponseCodec::ChatFromMessagesSse(t, _) => t.usage(),
            ResponseCodec::MessagesFromChatSse(t, _) => t.usage(),
        }
    }

    /// What a stream reported before it was cut, final or not (Anthropic's `message_start`
    /// gives the input side); the final usage where [`ResponseCodec::usage`] has it.
    pub fn partial_usage(&self) -> Option<Usage> {
        match self {
            ResponseCodec::AnthropicSse(p) => p.partial_usage(),
            ResponseCodec::ChatFromMessagesSse(t, _) => t.partial_usage(),
            other => other.usage(false),
        }
    }

    /// Whether the answer is one JSON body (its usage is known only at its end).
    pub fn is_whole_body(&self) -> bool {
        matches!(
            self,
            ResponseCodec::Json(..) | ResponseCodec::Translate { .. }
        )
    }

    /// The end of an event stream the upstream broke off mid-body (a reset, a read timeout),
    /// for the client to read in its own API's shape instead of a connection cut mid-body,
    /// which SDKs report as a transport failure: what a translation still owes (its error
    /// event when the message was not complete), or the client API's error event. `None` for
    /// a stream that had ended, and for bodies that are not event streams. A native stream's
    /// tail starts with a blank line, which ends an event the upstream left half-sent (SSE
    /// ignores blank lines between events).
    pub fn cut_tail(&mut self) -> Option<Bytes> {
        /// What a translation still owes at the end of its upstream stream.
        fn owed(t: &mut impl StreamTranslate, out: &mut Vec<u8>) -> Option<Bytes> {
            t.finish(out);
            (!out.is_empty()).then(|| Bytes::from(std::mem::take(out)))
        }
        let tail = match self {
            ResponseCodec::ChatFromMessagesSse(t, out) => return owed(&mut **t, out),
            ResponseCodec::MessagesFromChatSse(t, out) => return owed(&mut **t, out),
            ResponseCodec::ChatSse(p) if !p.done() => CUT_CHAT_TAIL,
            ResponseCodec::AnthropicSse(p) if !p.done() => CUT_MESSAGES_TAIL,
            ResponseCodec::ResponsesSse(p) if !p.done() => CUT_RESPONSES_TAIL,
            _ => return None,
        };
        Some(Bytes::from_static(tail))
    }

    /// For a stream, the bytes of generated text seen so far (an estimate's basis when it
    /// breaks before its usage); None for whole bodies.
    pub fn stream_text_bytes(&self) -> Option<u64> {
        match self {
            ResponseCodec::ChatSse(p) => Some(p.content_bytes()),
            ResponseCodec::AnthropicSse(p) => Some(p.content_bytes()),
            ResponseCodec::ResponsesSse(p) => Some(p.content_bytes()),
            ResponseCodec::TranscriptionSse(p) => Some(p.content_bytes()),
            ResponseCodec::ChatFromMessagesSse(t, _) => Some(t.content_bytes()),
            ResponseCodec::MessagesFromChatSse(t, _) => Some(t.content_bytes()),
            _ => None,
        }
    }
}

/// [`ResponseCodec::cut_tail`] of a chat stream: OpenAI's mid-stream error chunk (the SDKs
/// raise `APIError` on a chunk with an `error`).
const CUT_CHAT_TAIL: &[u8] = b"\n\ndata: {\"error\":{\"message\":\"The upstream stream broke before the answer was complete.\",\"type\":\"api_error\",\"code\":\"upstream_stream_broken\",\"param\":null}}\n\n";
/// Of a Messages stream: Anthropic's `error` event (the SDK raises on it).
const CUT_MESSAGES_TAIL: &[u8] = b"\n\nevent: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"api_error\",\"message\":\"The upstream stream broke before the message was complete.\"}}\n\n";
/// Of a Responses stream: its `error` event.
const CUT_RESPONSES_TAIL: &[u8] = b"\n\nevent: error\ndata: {\"type\":\"error\",\"code\":\"upstream_stream_broken\",\"message\":\"The upstream stream broke before the response was complete.\",\"param\":null}\n\n";

/// An upstream error body: held whole, then passed on with account identifiers masked (its
/// length unchanged). One too large to hold goes on chunk by chunk, masked likewise.
fn filter_error(held: &mut Option<ResponseBody>, body: &mut Option<Bytes>, end_of_stream: bool) {
    let Some(buf) = held.as_mut() else {
        if let Some(chunk) = body.take() {
            let mut v = chunk.to_vec();
            *body = Some(if mask_account_ids(&mut v) {
                v.into()
            } else {
                chunk
            });
        }
        return;
    };
    if let Some(chunk) = body.take() {
        if !buf.push(&chunk, MAX_JSON_RESPONSE) {
            let mut v = held.take().map(|b| b.bytes().to_vec()).unwrap_or_default();
            mask_account_ids(&mut v);
            *body = Some(v.into());
            return;
        }
    }
    if end_of_stream {
        let mut v = buf.bytes().to_vec();
        mask_account_ids(&mut v);
        *body = Some(v.into());
    }
}

/// A stream passed on unchanged while an observer reads its usage.
fn observe(p: &mut impl SseObserver, body: &Option<Bytes>, end_of_stream: bool) {
    if let Some(chunk) = body.as_ref() {
        p.feed(chunk);
    }
    if end_of_stream {
        p.finish();
    }
}

/// The two stream translators, one way of driving them.
trait StreamTranslate {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>);
    fn finish(&mut self, out: &mut Vec<u8>);
}

impl StreamTranslate for chat_to_messages::StreamTranslator {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        chat_to_messages::StreamTranslator::feed(self, chunk, out);
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        chat_to_messages::StreamTranslator::finish(self, out);
    }
}

impl StreamTranslate for messages_to_chat::StreamTranslator {
    fn feed(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        messages_to_chat::StreamTranslator::feed(self, chunk, out);
    }
    fn finish(&mut self, out: &mut Vec<u8>) {
        messages_to_chat::StreamTranslator::finish(self, out);
    }
}

/// One upstream chunk replaced by its translation (`out` is reused across chunks).
fn translate_stream(
    t: &mut impl StreamTranslate,
    out: &mut Vec<u8>,
    body: &mut Option<Bytes>,
    end_of_stream: bool,
) {
    if let Some(chunk) = body.as_ref() {
        t.feed(chunk, out);
    }
    if end_of_stream {
        t.finish(out);
    }
    *body = (!out.is_empty()).then(|| Bytes::copy_from_slice(out));
    out.clear();
}

/// A held answer in the client's format: a success translated, an error put in the client's
/// error shape. A success that is not what the provider documents is passed on as it came.
fn translate_whole(plan: Plan, status: u16, bytes: &[u8]) -> Vec<u8> {
    let ok = (200..300).contains(&status);
    let translate = |bytes: &[u8]| match (plan, ok) {
        (Plan::ChatViaMessages, true) => chat_to_messages::response_json(bytes),
        (Plan::ChatViaMessages, false) => Some(chat_to_messages::error_json(status, bytes)),
        (_, true) => messages_to_chat::response_json(bytes),
        (_, false) => Some(messages_to_chat::error_json(status, bytes)),
    };
    // An answer JSON parsers refuse for a provider's slip (a lone surrogate escape, a
    // byte-order mark) is translated with U+FFFD in their place, not passed on in the other
    // API's shape, which the client's SDK would read as an empty answer.
    let translated = translate(bytes).or_else(|| mend_json(bytes).and_then(|m| translate(&m)));
    let mut out = translated.unwrap_or_else(|| bytes.to_vec());
    if !ok {
        mask_account_ids(&mut out);
    }
    out
}

/// `body` without a leading byte-order mark and with every lone surrogate escape (`\\ud83d`
/// not followed by its low half, or a low half alone) replaced by `\\ufffd`; `None` when
/// there was neither.
fn mend_json(body: &[u8]) -> Option<Vec<u8>> {
    const BOM: &[u8] = b"\xEF\xBB\xBF";
    fn escape_at(b: &[u8], i: usize) -> Option<u16> {
        let hex = b.get(i..i + 6).filter(|h| h.starts_with(b"\\u"))?;
        u16::from_str_radix(std::str::from_utf8(&hex[2..]).ok()?, 16).ok()
    }
    let mut out = body.strip_prefix(BOM).unwrap_or(body).to_vec();
    let mut mended = out.len() != body.len();
    let mut i = 0;
    while let Some(at) = out.get(i..).and_then(|rest| memchr::memchr(b'\\', rest)) {
        i += at;
        match escape_at(&out, i) {
            Some(0xD800..=0xDBFF)
                if escape_at(&out, i + 6).is_some_and(|lo| (0xDC00..=0xDFFF).contains(&lo)) =>
            {
                i += 12;
            }
            Some(0xD800..=0xDFFF) => {
                out[i..i + 6].copy_from_slice(b"\\ufffd");
                mended = true;
                i += 6;
            }
            Some(_) => i += 6,
            // Any other escape is two bytes (`\\\\` among them, so its second is no start).
            None => i += 2,
        }
    }
    mended.then_some(out)
}

/// `chunk` without `hole`. The chunk Pingora hands over is this filter's alone, so the tail
/// is moved over the hole in place (a few bytes: the usage event comes last but for
/// `[DONE]`); a shared chunk is copied.
fn cut_out(chunk: Bytes, hole: Range<usize>) -> Bytes {
    match chunk.try_into_mut() {
        Ok(mut bytes) => {
            let len = bytes.len();
            bytes.copy_within(hole.end.., hole.start);
            bytes.truncate(len - hole.len());
            bytes.freeze()
        }
        Err(chunk) => Bytes::from(without(&chunk, hole)),
    }
}

/// The chat stream observer: forwards the chunk, or the parts of it that are not the usage
/// event the gateway injected.
fn filter_chat_sse(parser: &mut SseUsageParser, body: &mut Option<Bytes>, end_of_stream: bool) {
    if let Some(chunk) = body.take() {
        *body = match parser.feed(&chunk) {
            Forward::Unchanged => Some(chunk),
            Forward::Range(r) => Some(chunk.slice(r)),
            Forward::Without(hole) => Some(cut_out(chunk, hole)),
            Forward::Owned(v) => Some(Bytes::from(v)),
            Forward::Nothing => None,
        };
    }
    if end_of_stream {
        if let Forward::Owned(tail) = parser.finish() {
            *body = Some(match body.take() {
                Some(b) => {
                    let mut joined = BytesMut::with_capacity(b.len() + tail.len());
                    joined.extend_from_slice(&b);
                    joined.extend_from_slice(&tail);
                    joined.freeze()
                }
                None => Bytes::from(tail),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lone_surrogates_and_a_byte_order_mark_are_mended_and_nothing_else_is_touched() {
        let mend = |b: &[u8]| mend_json(b).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            mend(br#"{"a":"x\ud83d"}"#).as_deref(),
            Some(r#"{"a":"x\ufffd"}"#)
        );
        assert_eq!(
            mend(br#"{"a":"\udc00y"}"#).as_deref(),
            Some(r#"{"a":"\ufffdy"}"#)
        );
        assert_eq!(
            mend(b"\xEF\xBB\xBF{\"a\":1}").as_deref(),
            Some(r#"{"a":1}"#)
        );
        // A whole pair, an escaped backslash before `ud83d`, and other escapes stay.
        for whole in [
            &br#"{"a":"\ud83d\ude00"}"#[..],
            br#"{"a":"\\ud83d"}"#,
            br#"{"a":"\n\"\u0041"}"#,
            br#"{"a":"ends with \\"}"#,
            b"\\",
        ] {
            assert_eq!(mend(whole), None, "{}", String::from_utf8_lossy(whole));
        }
        // A translated answer with a lone surrogate reads as a Messages answer.
        let chat = br#"{"id":"x","object":"chat.completion","model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"ab\ud83d"},"finish_reason":"stop"}],"usage":{"prompt_tokens":1,"completion_tokens":2}}"#;
        let out: serde_json::Value =
            serde_json::from_slice(&translate_whole(Plan::MessagesViaChat, 200, chat)).unwrap();
        assert_eq!(out["type"], "message");
        assert_eq!(out["content"][0]["text"], "ab\u{fffd}");
    }

    #[test]
    fn a_usage_event_is_cut_out_of_the_middle_of_a_chunk_owned_or_shared() {
        let usage =
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":3}}\n\n";
        let stream = format!("data: {{\"choices\":[]}}\n\n{usage}data: [DONE]\n\n");
        let kept = b"data: {\"choices\":[]}\n\ndata: [DONE]\n\n";
        let owned = Bytes::from(stream.clone().into_bytes());
        let shared = Bytes::from(stream.into_bytes());
        let other_holder = shared.clone();
        for chunk in [owned, shared] {
            let (mut c, resized) = ResponseCodec::for_head(Plan::Chat, 200, true, true, false);
            assert!(resized);
            let mut body = Some(chunk);
            c.filter(&mut body, true);
            assert_eq!(body.as_deref(), Some(&kept[..]));
            assert_eq!(c.usage(false), Some(Usage::new(2, 3)));
        }
        assert!(
            other_holder.starts_with(b"data: {\"choices\":[]}\n\ndata: {"),
            "a shared chunk is not edited"
        );
    }

    /// An error sent as an event stream is held and masked like any error: an upstream may
    /// echo the operator's key in it whatever its type (SPEC §2).
    #[test]
    fn an_error_sent_as_an_event_stream_is_masked() {
        let body = "data: {\"error\":{\"message\":\"Incorrect API key provided: sk-abcdef1234567890\"}}\n\n";
        for plan in [Plan::Chat, Plan::Messages, Plan::Responses] {
            let (mut c, _) = ResponseCodec::for_head(plan, 401, true, true, false);
            let mut chunk = Some(Bytes::from(body));
            c.filter(&mut chunk, true);
            let out = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
            assert_eq!(out.len(), body.len());
            assert!(!out.contains("abcdef1234567890"), "{plan:?}: {out}");
            assert!(out.contains("sk-****************"), "{plan:?}: {out}");
        }
    }

    #[test]
    fn a_pass_through_chat_stream_keeps_its_length_unless_usage_is_stripped() {
        assert!(!ResponseCodec::for_head(Plan::Chat, 200, true, true, true).1);
        assert!(ResponseCodec::for_head(Plan::Chat, 200, true, true, false).1);
        assert!(!ResponseCodec::for_head(Plan::Messages, 200, true, true, false).1);
        assert!(ResponseCodec::for_head(Plan::ChatViaMessages, 400, false, false, false).1);
    }

    #[test]
    fn a_whole_body_counts_once_complete_and_errors_pass() {
        let (mut c, _) = ResponseCodec::for_head(Plan::Messages, 200, false, false, false);
        let body = br#"{"type":"message","usage":{"input_tokens":3,"cache_read_input_tokens":4,"output_tokens":5}}"#;
        let mut chunk = Some(Bytes::from_static(body));
        c.filter(&mut chunk, true);
        assert_eq!(chunk.as_deref(), Some(&body[..]), "observed, not changed");
        assert_eq!(c.usage(false), None);
        let u = c.usage(true).unwrap();
        assert_eq!(
            (u.prompt_tokens, u.cache_read_tokens, u.completion_tokens),
            (7, 4, 5)
        );
        let (mut c, _) = ResponseCodec::for_head(Plan::Chat, 500, false, false, false);
        let mut first = Some(Bytes::from_static(b"{\"error\":{\"message\":\"org-"));
        c.filter(&mut first, false);
        assert_eq!(first, None, "held to its end");
        let mut last = Some(Bytes::from_static(b"abc123 busy\",\"code\":\"x\"}}"));
        c.filter(&mut last, true);
        assert_eq!(
            last.as_deref(),
            Some(&b"{\"error\":{\"message\":\"org-****** busy\",\"code\":\"x\"}}"[..])
        );
    }

    #[test]
    fn a_translated_body_is_held_to_its_end() {
        let (mut c, _) = ResponseCodec::for_head(Plan::ChatViaMessages, 200, false, false, false);
        let mut first = Some(Bytes::from_static(b"{\"type\":\"mess"));
        c.filter(&mut first, false);
        assert_eq!(first, None, "nothing forwarded before the end");
    }
}
