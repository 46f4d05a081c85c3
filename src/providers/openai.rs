//! OpenAI wire format: the request fields the gateway reads, and the body rewrite it forwards.
//!
//! Only the top-level fields the gateway needs are read (`model`, `stream`, `stream_options`,
//! `n`, the output bounds, and the fields that bring hidden input); everything else is
//! checked and skipped without building values, by [`json_scan`] (serde where the scanner
//! gives up), and media parts are counted by a byte scan. The rewrite splices byte ranges of the original body, so
//! messages are copied once and never re-serialized.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GateError;

use super::hidden::{Hidden, RawHidden};
use super::json_scan;

/// The top-level fields a request is read for, as serde reads them: borrowed raw values,
/// `null` read as absent (serde's `Option`), a field named twice refused. The fields the
/// gateway writes over (`stream_options` and the output caps) keep a `null` as its text, so
/// the rewrite replaces it in place rather than adding the key a second time.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    stream_options: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "keep_null")]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
    /// The Responses API's output bound.
    #[serde(borrow, default, deserialize_with = "keep_null")]
    max_output_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    tools: Option<&'a RawValue>,
    #[serde(borrow, default)]
    background: Option<&'a RawValue>,
    /// Chat's Predicted Outputs (see [`RequestFields::prediction_tokens`]).
    #[serde(borrow, default)]
    prediction: Option<&'a RawValue>,
    /// The Responses API's input items (see [`stored_item_refs`]).
    #[serde(borrow, default)]
    input: Option<&'a RawValue>,
    // Stored context and server-side fields (see `hidden`), in `HIDDEN_FIELDS`' order.
    #[serde(borrow, default)]
    previous_response_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    conversation: Option<&'a RawValue>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    mcp_servers: Option<&'a RawValue>,
    #[serde(borrow, default)]
    container: Option<&'a RawValue>,
    #[serde(borrow, default)]
    web_search_options: Option<&'a RawValue>,
}

/// A present field's raw value, `null` included (see [`Fields`]).
fn keep_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

/// The stored-context and server-side fields `hidden` judges.
const HIDDEN_FIELDS: [&str; 6] = [
    "previous_response_id",
    "conversation",
    "prompt",
    "mcp_servers",
    "container",
    "web_search_options",
];

/// [`Fields`] as text: each value's exact JSON text, however it was found.
#[derive(Debug, Default, PartialEq, Eq)]
struct Top<'a> {
    model: Option<&'a str>,
    stream: Option<bool>,
    stream_options: Option<&'a str>,
    max_tokens: Option<&'a str>,
    max_completion_tokens: Option<&'a str>,
    n: Option<&'a str>,
    max_output_tokens: Option<&'a str>,
    tools: Option<&'a str>,
    background: Option<&'a str>,
    prediction: Option<&'a str>,
    input: Option<&'a str>,
    hidden: [Option<&'a str>; 6],
}

impl<'a> From<Fields<'a>> for Top<'a> {
    fn from(f: Fields<'a>) -> Top<'a> {
        let get = |r: Option<&'a RawValue>| r.map(RawValue::get);
        Top {
            model: get(f.model),
            stream: f.stream,
            stream_options: get(f.stream_options),
            max_tokens: get(f.max_tokens),
            max_completion_tokens: get(f.max_completion_tokens),
            n: get(f.n),
            max_output_tokens: get(f.max_output_tokens),
            tools: get(f.tools),
            background: get(f.background),
            prediction: get(f.prediction),
            input: get(f.input),
            hidden: [
                f.previous_response_id,
                f.conversation,
                f.prompt,
                f.mcp_servers,
                f.container,
                f.web_search_options,
            ]
            .map(get),
        }
    }
}

impl<'a> Top<'a> {
    /// Serde's reading: the judge of every body, and its error message.
    fn by_serde(body: &'a [u8]) -> Result<Top<'a>, GateError> {
        json_object(body)?;
        let fields: Fields<'a> = serde_json::from_slice(body)
            .map_err(|e| GateError::InvalidRequest(format!("body is not valid JSON: {e}")))?;
        Ok(fields.into())
    }

    /// The same reading by [`json_scan`], several times cheaper; `None` for any body it
    /// leaves to serde (see there), and for one whose fields serde would refuse: a field
    /// named twice, a `stream` that is not a boolean.
    #[inline(always)]
    fn by_scan(text: &'a str) -> Option<Top<'a>> {
        let mut top = Top::default();
        let mut seen = 0u32;
        json_scan::members(text, |key, value| {
            let (bit, slot) = match key {
                "stream" => {
                    if seen & 1 != 0 {
                        return false;
                    }
                    seen |= 1;
                    top.stream = match value {
                        "true" => Some(true),
                        "false" => Some(false),
                        "null" => None,
                        _ => return false,
                    };
                    return true;
                }
                "model" => (1, &mut top.model),
                "stream_options" => (2, &mut top.stream_options),
                "max_tokens" => (3, &mut top.max_tokens),
                "max_completion_tokens" => (4, &mut top.max_completion_tokens),
                "n" => (5, &mut top.n),
                "max_output_tokens" => (6, &mut top.max_output_tokens),
                "tools" => (7, &mut top.tools),
                "background" => (8, &mut top.background),
                "prediction" => (15, &mut top.prediction),
                "input" => (16, &mut top.input),
                _ => match HIDDEN_FIELDS.iter().position(|f| *f == key) {
                    Some(i) => (9 + i, &mut top.hidden[i]),
                    None => return true,
                },
            };
            if seen & (1 << bit) != 0 {
                return false;
            }
            seen |= 1 << bit;
            // The fields the rewrite writes over keep a `null` (as serde's reading does).
            let written_over = matches!(bit, 2 | 3 | 4 | 6);
            *slot = (written_over || value != "null").then_some(value);
            true
        })?;
        Some(top)
    }

    /// The scanner's reading where it gives one, else serde's. JSON is UTF-8 (RFC 8259):
    /// the scanner reads bytes, so a body that is not is refused first, as serde would.
    #[inline(always)]
    fn read(body: &'a [u8]) -> Result<Top<'a>, GateError> {
        let Ok(text) = std::str::from_utf8(body) else {
            return Err(GateError::InvalidRequest(
                "the body is not JSON: it is not UTF-8".into(),
            ));
        };
        match Top::by_scan(text) {
            Some(top) => Ok(top),
            None => Top::by_serde(body),
        }
    }
}

/// 400 `invalid_request` unless `json` (a body, or a value in one) is a JSON object. serde's
/// derived reading of a struct also takes an array, field by field in order: `["gpt-4o"]`
/// would name a model, and go upstream as a body the reading never judged.
fn json_object(json: &[u8]) -> Result<(), GateError> {
    match json
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
    {
        Some(b'{') => Ok(()),
        _ => Err(GateError::InvalidRequest(
            "the request body must be a JSON object".into(),
        )),
    }
}

/// OpenAI's own ceiling for `n`.
pub const MAX_CHOICES: u64 = 128;

/// Reads an optional non-negative integer field; 400 for anything else (a float, a negative,
/// a string, a number beyond u64), so no value can slip past the reservation unpriced.
fn count_field(raw: Option<&str>, name: &str) -> Result<Option<u64>, GateError> {
    match raw {
        None | Some("null") => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            GateError::InvalidRequest(format!("'{name}' must be a non-negative integer"))
        }),
    }
}

/// The `type` of an image, audio or file part in OpenAI's chat and Responses shapes and in
/// Anthropic's. Every such part carries its `type` (the APIs require it).
const MEDIA_TYPES: [&str; 8] = [
    "image_url",
    "input_image",
    "input_audio",
    "input_file",
    "file",
    "image",
    "document",
    // A computer-use call's output: a screenshot, by URL or file id.
    "computer_screenshot",
];

/// Parts whose input the body does not show: files (by id, URL or inline PDF, whose pages
/// are billed as text and images), documents, and references to stored items.
const FILE_TYPES: [&str; 4] = ["input_file", "file", "document", "item_reference"];

/// Words without which a body holds no media part, built once: a `memmem::find` per call
/// would build its searcher on every request. A part is an object with a `type` key, so a
/// body with neither a literal `"type"` nor a `\u` escape (which could spell one) has none,
/// and one with `"type"` still needs a media word.
static TYPE_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"type\""));
static AUDIO_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"audio\""));
static ESCAPE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\\u"));
static MEDIA_WORDS: std::sync::LazyLock<[memchr::memmem::Finder<'static>; 5]> =
    std::sync::LazyLock::new(|| {
        [
            &b"image"[..],
            b"audio",
            b"file",
            b"document",
            b"item_reference",
        ]
        .map(memchr::memmem::Finder::new)
    });

/// Items of a Responses `input` that the provider loads from storage by their id, beyond the
/// typed `item_reference` (a file type, counted with the parts): OpenAI's schema makes an item
/// reference's `type` optional, so `{"id": "msg_…"}` (or a `null` type) is one too, and a
/// reasoning item passed back by id without its `encrypted_content` is read from storage.
/// Inputs that mention no `"id"` (nor a `\u` escape, which could spell one) have none.
fn stored_item_refs(input: &str) -> u64 {
    #[derive(Deserialize)]
    struct Item<'a> {
        #[serde(borrow, default, rename = "type")]
        kind: Option<&'a RawValue>,
        #[serde(borrow, default)]
        id: Option<&'a RawValue>,
        #[serde(borrow, default)]
        encrypted_content: Option<&'a RawValue>,
    }
    static ID_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
        std::sync::LazyLock::new(|| memchr::memmem::Finder::new(b"\"id\""));
    let bytes = input.as_bytes();
    if !input.starts_with('[') || (ID_KEY.find(bytes).is_none() && ESCAPE.find(bytes).is_none()) {
        return 0;
    }
    // An input serde cannot read as items (a key given twice, say) is read one item: a
    // provider may read it another way, and one reference is bounded like many.
    let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(input) else {
        return 1;
    };
    let stored = |raw: &&&RawValue| {
        // An object only: serde's derived reading would take an array field by field.
        if !raw.get().starts_with('{') {
            return false;
        }
        let Ok(item) = serde_json::from_str::<Item<'_>>(raw.get()) else {
            return true;
        };
        match (item.id, item.kind.map(RawValue::get)) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(_), Some(kind)) => kind == "\"reasoning\"" && item.encrypted_content.is_none(),
        }
    };
    items.iter().filter(stored).count() as u64
}

/// Image, audio and file parts of a body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Parts {
    /// Parts whose `type` is one of [`MEDIA_TYPES`].
    pub media: u64,
    /// Parts whose `type` is one of [`FILE_TYPES`].
    pub files: u64,
}

/// The number of image, audio and file parts anywhere in a body (0 for one the walk cannot
/// read, which `parse_request` refuses).
pub fn count_media_parts(body: &[u8]) -> u64 {
    count_parts(body).map_or(0, |p| p.media)
}

/// The image, audio and file parts anywhere in a body: objects whose `type` is one of
/// [`MEDIA_TYPES`] or [`FILE_TYPES`], at any depth (tool results may hold images too), and a
/// chat message's earlier audio reply by `id` (`"audio": {"id": …}`, fed back as audio
/// tokens). Most bodies mention no media word and use no `\u` escape, and are answered by a
/// byte scan; the rest are walked with serde, which decodes escapes, so `"\u0074ype"` cannot
/// hide a part. The walk builds no values. It is stricter than the scan that accepted the
/// body: a lone surrogate escape or a number past f64 stops it, and a stopped walk would have
/// missed every part after that value, so such a body is 400.
pub fn count_parts(body: &[u8]) -> Result<Parts, GateError> {
    let maybe_media = ESCAPE.find(body).is_some()
        || AUDIO_KEY.find(body).is_some()
        || (TYPE_KEY.find(body).is_some() && MEDIA_WORDS.iter().any(|f| f.find(body).is_some()));
    if !maybe_media {
        return Ok(Parts::default());
    }
    let mut parts = Parts::default();
    let mut de = serde_json::Deserializer::from_slice(body);
    serde::de::DeserializeSeed::deserialize(MediaWalk(&mut parts), &mut de).map_err(|e| {
        GateError::InvalidRequest(format!("the body holds a value that cannot be read: {e}"))
    })?;
    Ok(parts)
}

/// What [`MediaWalk`] yields for an object with an `id` key (strings yield [`names`]).
const ID_OBJECT: u8 = 4;

/// What a string value names, as a `type`: bit 0 a media type, bit 1 a file type.
fn names(v: &str) -> u8 {
    u8::from(MEDIA_TYPES.contains(&v)) | (u8::from(FILE_TYPES.contains(&v)) << 1)
}

/// Walks one JSON value, counting media parts; yields what the value names if it is a
/// string (so the enclosing object can tell whether its `type` is a part's).
struct MediaWalk<'c>(&'c mut Parts);

impl<'de> serde::de::DeserializeSeed<'de> for MediaWalk<'_> {
    type Value = u8;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<u8, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for MediaWalk<'_> {
    type Value = u8;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<u8, E> {
        Ok(names(v))
    }

    fn visit_bool<E>(self, _: bool) -> Result<u8, E> {
        Ok(0)
    }

    fn visit_i64<E>(self, _: i64) -> Result<u8, E> {
        Ok(0)
    }

    fn visit_u64<E>(self, _: u64) -> Result<u8, E> {
        Ok(0)
    }

    fn visit_f64<E>(self, _: f64) -> Result<u8, E> {
        Ok(0)
    }

    fn visit_unit<E>(self) -> Result<u8, E> {
        Ok(0)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<u8, A::Error> {
        while seq.next_element_seed(MediaWalk(&mut *self.0))?.is_some() {}
        Ok(0)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<u8, A::Error> {
        let (mut kind, mut has_id) = (0, false);
        while let Some(key) = map.next_key_seed(WalkKey)? {
            let named = map.next_value_seed(MediaWalk(&mut *self.0))?;
            match key {
                Some(Key::Type) => kind |= named & 3,
                // A chat message's earlier audio reply, by id: audio the body does not hold.
                Some(Key::Audio) if named & ID_OBJECT != 0 => self.0.files += 1,
                Some(Key::Id) => has_id = true,
                _ => {}
            }
        }
        self.0.media += u64::from(kind & 1);
        self.0.files += u64::from(kind >> 1);
        Ok(if has_id { ID_OBJECT } else { 0 })
    }
}

/// The object keys the walk reads.
#[derive(Clone, Copy)]
enum Key {
    Type,
    Audio,
    Id,
}

/// An object key, escapes decoded: one of [`Key`], else `None`.
struct WalkKey;

impl<'de> serde::de::DeserializeSeed<'de> for WalkKey {
    type Value = Option<Key>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Option<Key>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> serde::de::Visitor<'de> for WalkKey {
    type Value = Option<Key>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E>(self, v: &str) -> Result<Option<Key>, E> {
        Ok(match v {
            "type" => Some(Key::Type),
            "audio" => Some(Key::Audio),
            "id" => Some(Key::Id),
            _ => None,
        })
    }
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What the gateway needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFields {
    /// Shared: the trace and the admission journal take it without copying.
    pub model: std::sync::Arc<str>,
    pub stream: bool,
    /// The client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    /// The largest of `max_completion_tokens`, `max_tokens` (chat, Messages) and
    /// `max_output_tokens` (Responses): a provider may honour any of them.
    pub max_output_tokens: Option<u64>,
    /// Choices requested (`n`), 1 when absent.
    pub choices: u64,
    /// Chat's Predicted Outputs: the provider bills the predicted tokens it rejects as
    /// completion tokens, and nothing says `max_completion_tokens` bounds them, so the
    /// reservation adds the prediction's bytes (a token is at least a byte) to each choice's
    /// output. 0 without a `prediction`.
    pub prediction_tokens: u64,
    /// Upper bound of image, audio and file parts.
    pub media_parts: u64,
    /// What a multi-modal model charges by, as the request sets it: images asked for
    /// (`n`) or the speech input's characters (Unicode code points). 0 for chat.
    pub units: u64,
    /// What the provider bills beyond the body.
    pub hidden: Hidden,
    /// Byte range of the `model` value (with its quotes) in the body.
    model_span: Range<usize>,
    /// Byte range of the `stream_options` value, if present.
    stream_options_span: Option<Range<usize>>,
    /// Byte ranges and values of the output-bounding fields present: `max_tokens`,
    /// `max_completion_tokens`, `max_output_tokens` (the cap is written over them).
    output_spans: [Option<(Range<usize>, Option<u64>)>; 3],
}

/// Where `raw`, a slice of `body`, lies in it.
fn span_of(body: &[u8], raw: &str) -> Range<usize> {
    let start = raw.as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.len()
}

/// The body's `model`, raw (for its span) and decoded: 400 `invalid_request` when it is
/// missing or not a string.
fn string_model(raw: Option<&str>) -> Result<(&str, Cow<'_, str>), GateError> {
    let raw =
        raw.ok_or_else(|| GateError::InvalidRequest("missing string field 'model'".into()))?;
    let text = raw;
    // The common case: serde has checked the value is JSON, so a string without escapes
    // is exactly the text between its quotes.
    if let Some(plain) = text.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        if !plain.contains('\\') {
            return Ok((raw, Cow::Borrowed(plain)));
        }
    }
    let model = serde_json::from_str(text)
        .map_err(|_| GateError::InvalidRequest("'model' must be a string".into()))?;
    Ok((raw, model))
}

/// The string `model` a JSON body names, if it names one: for the trace of a body refused
/// for one of its other fields (SPEC §4: a trace names the model requested).
pub fn named_model(body: &[u8]) -> Option<String> {
    let top = Top::read(body).ok()?;
    string_model(top.model).ok().map(|(_, m)| m.into_owned())
}

/// Parses the fields the gateway needs. 400 `invalid_request` unless the body is a JSON
/// object with a string `model`.
pub fn parse_request(body: &[u8]) -> Result<RequestFields, GateError> {
    let fields = Top::read(body)?;
    let (raw_model, model) = string_model(fields.model)?;
    let stream = fields.stream.unwrap_or(false);
    let client_wants_usage = match fields.stream_options {
        Some(raw) if raw != "null" => {
            let not_object =
                || GateError::InvalidRequest("'stream_options' must be an object".into());
            json_object(raw.as_bytes()).map_err(|_| not_object())?;
            let opts: StreamOptions = serde_json::from_str(raw).map_err(|_| not_object())?;
            opts.include_usage.unwrap_or(false)
        }
        _ => false,
    };
    let max_tokens = count_field(fields.max_tokens, "max_tokens")?;
    let max_completion = count_field(fields.max_completion_tokens, "max_completion_tokens")?;
    let max_output = count_field(fields.max_output_tokens, "max_output_tokens")?;
    let choices = count_field(fields.n, "n")?.unwrap_or(1);
    if !(1..=MAX_CHOICES).contains(&choices) {
        return Err(GateError::InvalidRequest(format!(
            "'n' must be between 1 and {MAX_CHOICES}"
        )));
    }
    let parts = count_parts(body)?;
    let stored_items = fields.input.map_or(0, stored_item_refs);
    let mut raw = RawHidden {
        tools: fields.tools,
        background: fields.background,
        ..RawHidden::default()
    };
    for (name, value) in HIDDEN_FIELDS.iter().zip(fields.hidden) {
        if let Some(v) = value {
            raw.offer(name, v);
        }
    }
    let spanned = |raw: Option<&str>, value: Option<u64>| raw.map(|r| (span_of(body, r), value));
    Ok(RequestFields {
        output_spans: [
            spanned(fields.max_tokens, max_tokens),
            spanned(fields.max_completion_tokens, max_completion),
            spanned(fields.max_output_tokens, max_output),
        ],
        hidden: Hidden::read(&raw, parts.files + stored_items),
        model_span: span_of(body, raw_model),
        stream_options_span: fields.stream_options.map(|r| span_of(body, r)),
        model: std::sync::Arc::from(model.as_ref()),
        stream,
        client_wants_usage,
        max_output_tokens: max_tokens.max(max_completion).max(max_output),
        choices,
        prediction_tokens: fields.prediction.map_or(0, |p| p.len() as u64),
        media_parts: parts.media,
        units: 0,
    })
}

impl RequestFields {
    /// The fields of a multipart form: its `model` (at `model_span`, unquoted) and units.
    pub fn for_form(
        model: &str,
        model_span: Range<usize>,
        units: u64,
        media_parts: u64,
    ) -> RequestFields {
        RequestFields {
            output_spans: [None, None, None],
            hidden: Hidden::default(),
            model_span,
            stream_options_span: None,
            model: std::sync::Arc::from(model),
            stream: false,
            client_wants_usage: false,
            max_output_tokens: None,
            choices: 1,
            prediction_tokens: 0,
            media_parts,
            units,
        }
    }

    /// Where the `model` value lies in the body.
    pub fn model_span(&self) -> Range<usize> {
        self.model_span.clone()
    }

    /// The body's `model` value was replaced in place ([`super::multipart::splice_span`]):
    /// it now lies at `span`.
    pub fn set_model_span(&mut self, span: Range<usize>) {
        self.model_span = span;
    }
}

/// The fields of a multi-modal JSON request (`/images/generations`, `/audio/speech`).
#[derive(Deserialize)]
struct MediaFields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    n: Option<&'a RawValue>,
    /// Speech: the text to speak.
    input: Option<Cow<'a, str>>,
}

/// What a multi-modal request is charged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MediaKind {
    /// `n` images (default 1; a number or a numeric string).
    Images,
    /// The characters of `input`.
    Speech,
}

/// Parses a multi-modal JSON body: a string `model`, and `n` (images, 1..=128) or a string
/// `input` (speech). 400 `invalid_request` otherwise. Prompts are not stored context here.
pub fn parse_media_request(body: &[u8], kind: MediaKind) -> Result<RequestFields, GateError> {
    // serde reads the bytes of a field it skips without checking them: JSON is UTF-8 (RFC
    // 8259), so a body that is not is refused here as on chat.
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(GateError::InvalidRequest(
            "the body is not JSON: it is not UTF-8".into(),
        ));
    };
    json_object(body)?;
    let fields: MediaFields<'_> = serde_json::from_str(text)
        .map_err(|e| GateError::InvalidRequest(format!("body is not valid JSON: {e}")))?;
    let (raw_model, model) = string_model(fields.model.map(RawValue::get))?;
    let units = match kind {
        MediaKind::Images => {
            let n = match fields.n.map(RawValue::get) {
                None | Some("null") => 1,
                Some(v) => images_n(v.trim_matches('"'))?,
            };
            n
        }
        MediaKind::Speech => {
            let input = fields
                .input
                .ok_or_else(|| GateError::InvalidRequest("missing string field 'input'".into()))?;
            input.chars().count() as u64
        }
    };
    Ok(RequestFields {
        output_spans: [None, None, None],
        hidden: Hidden::default(),
        model_span: span_of(body, raw_model),
        stream_options_span: None,
        model: std::sync::Arc::from(model.as_ref()),
        stream: false,
        client_wants_usage: false,
        max_output_tokens: None,
        choices: 1,
        prediction_tokens: 0,
        media_parts: 0,
        units,
    })
}

/// The images asked for: `n` as a number or a form's string, 1..=MAX_CHOICES.
pub fn images_n(v: &str) -> Result<u64, GateError> {
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_CHOICES).contains(&n) => Ok(n),
        _ => Err(GateError::InvalidRequest(format!(
            "'n' must be an integer between 1 and {MAX_CHOICES}"
        ))),
    }
}

/// Which output-bounding fields a provider's route reads, and the one the gateway inserts
/// when the body has none of them (SPEC §2: what goes upstream is what was reserved for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapField {
    /// Chat completions read `max_tokens` and `max_completion_tokens`; the current name is
    /// inserted (OpenAI's reasoning models take no other).
    Chat,
    /// The Responses API reads `max_output_tokens`.
    Responses,
    /// Anthropic's Messages API reads `max_tokens`.
    Messages,
}

impl CapField {
    /// Indexes into `RequestFields::output_spans`.
    fn reads(self) -> &'static [usize] {
        match self {
            CapField::Chat => &[0, 1],
            CapField::Responses => &[2],
            CapField::Messages => &[0],
        }
    }

    fn inserted(self) -> &'static str {
        match self {
            CapField::Chat => "max_completion_tokens",
            CapField::Responses => "max_output_tokens",
            CapField::Messages => "max_tokens",
        }
    }
}

/// One replacement in [`rewrite_body`].
enum Edit<'a> {
    Text(Cow<'a, str>),
    /// A value written as a JSON string (quoted, escaped where needed).
    JsonString(&'a str),
    /// A number, written in place (no `String` of its own).
    Number(u64),
    /// A member added at the object's end: `,"name":number`.
    Member(&'static str, u64),
}

impl Edit<'_> {
    /// An upper bound of the bytes [`Edit::write`] appends (escapes aside, which grow the
    /// buffer once).
    fn len(&self) -> usize {
        /// The most digits a u64 has.
        const U64_DIGITS: usize = 20;
        match self {
            Edit::Text(t) => t.len(),
            Edit::JsonString(s) => s.len() + 2,
            Edit::Number(_) => U64_DIGITS,
            Edit::Member(name, _) => name.len() + 4 + U64_DIGITS,
        }
    }

    fn write(&self, out: &mut BytesMut) {
        match self {
            Edit::Text(t) => out.extend_from_slice(t.as_bytes()),
            Edit::Number(n) => out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes()),
            Edit::Member(name, n) => {
                out.extend_from_slice(b",\"");
                out.extend_from_slice(name.as_bytes());
                out.extend_from_slice(b"\":");
                out.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes());
            }
            Edit::JsonString(s) if !s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) => {
                out.extend_from_slice(b"\"");
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(b"\"");
            }
            Edit::JsonString(s) => {
                let quoted = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into());
                out.extend_from_slice(quoted.as_bytes());
            }
        }
    }
}

/// The client's `stream_options` (`raw`, its JSON text) with `include_usage` on: its other
/// members (`include_obfuscation`, ...) go upstream as the client sent them. A `null` (or
/// anything that is not an object) becomes `{"include_usage":true}`.
fn usage_on(raw: &[u8]) -> String {
    const ON: &str = r#"{"include_usage":true"#;
    let Ok(members) = serde_json::from_slice::<std::collections::BTreeMap<String, &RawValue>>(raw)
    else {
        return format!("{ON}}}");
    };
    let mut out = String::from(ON);
    for (name, value) in members.iter().filter(|(name, _)| *name != "include_usage") {
        out.push(',');
        out.push_str(&serde_json::to_string(name).unwrap_or_default());
        out.push(':');
        out.push_str(value.get());
    }
    out.push('}');
    out
}

/// The body to send upstream: `model` replaced by `upstream_id`; for chat streams
/// (`chat_stream_usage`) `stream_options.include_usage` forced on so the usage chunk always
/// arrives; and with `cap`, every output field the route reads lowered to at most the cap
/// the reservation used (inserted when the body has none). Returns the original bytes (no
/// copy) when nothing changes.
pub fn rewrite_body(
    body: &Bytes,
    fields: &RequestFields,
    upstream_id: &str,
    chat_stream_usage: bool,
    cap: Option<(CapField, u64)>,
) -> Bytes {
    // Edits as (range to replace, replacement), applied in body order; at most five (the
    // model, stream options, three output fields), so they live on the stack.
    let mut edits: smallvec::SmallVec<[(Range<usize>, Edit<'_>); 5]> = smallvec::SmallVec::new();
    if upstream_id != &*fields.model {
        edits.push((fields.model_span.clone(), Edit::JsonString(upstream_id)));
    }
    // Insertions go before the object's closing brace (the last non-space byte).
    let end = body
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .unwrap_or(body.len().saturating_sub(1));
    let need_usage = chat_stream_usage && fields.stream && !fields.client_wants_usage;
    if need_usage {
        match &fields.stream_options_span {
            Some(span) => edits.push((
                span.clone(),
                Edit::Text(usage_on(&body[span.clone()]).into()),
            )),
            None => edits.push((
                end..end,
                Edit::Text(r#","stream_options":{"include_usage":true}"#.into()),
            )),
        }
    }
    if let Some((field, cap)) = cap {
        let mut present = false;
        for &i in field.reads() {
            if let Some((span, value)) = &fields.output_spans[i] {
                present = true;
                if value.is_none_or(|v| v > cap) {
                    edits.push((span.clone(), Edit::Number(cap)));
                }
            }
        }
        if !present {
            edits.push((end..end, Edit::Member(field.inserted(), cap)));
        }
    }
    if edits.is_empty() {
        return body.clone();
    }
    edits.sort_by_key(|(r, _)| r.start);
    let extra: usize = edits.iter().map(|(_, e)| e.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, with) in &edits {
        out.extend_from_slice(&body[at..range.start]);
        with.write(&mut out);
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn parses_only_what_it_needs() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"gpt-4o-mini","max_tokens":7}"#;
        let f = parse_request(body).unwrap();
        assert_eq!(&*f.model, "gpt-4o-mini");
        assert!(!f.stream);
        assert_eq!(f.max_output_tokens, Some(7));
    }

    #[test]
    fn output_bound_is_the_larger_token_field_and_counts_choices() {
        let f =
            parse_request(br#"{"model":"m","max_completion_tokens":1,"max_tokens":16000,"n":8}"#)
                .unwrap();
        assert_eq!((f.max_output_tokens, f.choices), (Some(16000), 8));
        let f = parse_request(br#"{"model":"m","max_tokens":18446744073709551615}"#).unwrap();
        assert_eq!(f.max_output_tokens, Some(u64::MAX));
        let f = parse_request(br#"{"model":"m","max_tokens":null}"#).unwrap();
        assert_eq!((f.max_output_tokens, f.choices), (None, 1));
    }

    #[test]
    fn unpriceable_token_counts_are_refused() {
        for body in [
            &br#"{"model":"m","max_tokens":1.5}"#[..],
            br#"{"model":"m","max_tokens":-1}"#,
            br#"{"model":"m","max_tokens":1e30}"#,
            br#"{"model":"m","max_tokens":18446744073709551616}"#,
            br#"{"model":"m","max_completion_tokens":"10"}"#,
            br#"{"model":"m","n":0}"#,
            br#"{"model":"m","n":129}"#,
            br#"{"model":"m","n":2.0}"#,
        ] {
            let err = parse_request(body).unwrap_err();
            assert_eq!(
                err.code(),
                "invalid_request",
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    /// A second black-box attack round: values a lenient reading takes and a strict one
    /// does not (a lone surrogate, a number past f64, a key given twice) hid every part
    /// after them, a server tool, or a stored item; a chat message's audio by id and a
    /// computer-use screenshot were not seen at all. Each is now 400 or bounded.
    #[test]
    fn input_the_body_does_not_show_cannot_hide_behind_a_value_serde_refuses() {
        let read = |body: &str| parse_request(body.as_bytes());
        for body in [
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"\ud800"},{"type":"file","file":{"file_id":"f"}}]}]}"#,
            r#"{"model":"m","tools":[{"type":"function","parameters":{"maximum":1e400}}],"input":[{"type":"input_file","file_id":"f"}]}"#,
        ] {
            assert!(
                matches!(read(body), Err(GateError::InvalidRequest(_))),
                "{body}"
            );
        }
        // The same body without the bad value: read, the part seen.
        let f = read(r#"{"model":"m","tools":[{"type":"function","parameters":{"maximum":1e300}}],"input":[{"type":"input_file","file_id":"f"}]}"#).unwrap();
        assert!(f.hidden.unseen_input.is_some());
        for (body, unseen, server) in [
            // A tool whose `type` is given twice: a server tool to a last-wins parser.
            (
                r#"{"model":"m","tools":[{"type":"custom","type":"web_search_20250305"}]}"#,
                false,
                true,
            ),
            (r#"{"model":"m","tools":null}"#, false, false),
            // An input item whose `id` is given twice.
            (
                r#"{"model":"m","input":[{"id":"msg_1","id":"msg_1"}]}"#,
                true,
                false,
            ),
            // A chat message's earlier audio reply, by id.
            (
                r#"{"model":"m","messages":[{"role":"assistant","audio":{"id":"audio_1"}}]}"#,
                true,
                false,
            ),
            (
                r#"{"model":"m","audio":{"voice":"alloy","format":"wav"},"messages":[]}"#,
                false,
                false,
            ),
        ] {
            let f = read(body).unwrap_or_else(|e| panic!("{body}: {e:?}"));
            assert_eq!(f.hidden.unseen_input.is_some(), unseen, "{body}");
            assert_eq!(f.hidden.server_tool.is_some(), server, "{body}");
        }
        let f = read(r#"{"model":"m","input":[{"type":"computer_call_output","call_id":"c","output":{"type":"computer_screenshot","file_id":"f"}}]}"#).unwrap();
        assert_eq!(f.media_parts, 1);
    }

    #[test]
    fn media_parts_are_counted_once_each_at_any_depth_never_from_text() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"text","text":"describe \"image_url\" and a file"},
            {"type":"image_url","image_url":{"url":"https://x/a.png"}},
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]},
            {"role":"user","content":[{"type":"tool_result","content":[
                {"type":"image","source":{"type":"base64","data":""}}]}]}]}"#;
        let f = parse_request(body).unwrap();
        assert_eq!(f.media_parts, 3);
        assert_eq!(count_media_parts(br#"{"model":"m","messages":[]}"#), 0);
        assert_eq!(count_media_parts(br#"{"content":"an image of a file"}"#), 0);
        assert_eq!(
            count_media_parts(br#"{"type":"text","text":"image"}"#),
            0,
            "a media word in a text part is not a part"
        );
    }

    #[test]
    fn escapes_cannot_hide_a_media_part() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":[
            {"\u0074ype":"image\u005furl","image\u005furl":{"url":"https://x/a.png"}},
            {"type":"\u0069nput_file","file_id":"f"}]}]}"#;
        assert_eq!(parse_request(body).unwrap().media_parts, 2);
    }

    #[test]
    fn rejects_bodies_without_a_string_model() {
        for body in [
            &b"not json"[..],
            b"{}",
            br#"{"model":3}"#,
            b"[1]",
            br#"{"model":"x""#,
        ] {
            assert_eq!(parse_request(body).unwrap_err().code(), "invalid_request");
        }
    }

    #[test]
    fn rewrite_replaces_the_model_and_keeps_everything_else() {
        let body = Bytes::from_static(
            br#"{"model":"fast","messages":[{"role":"user","content":"model"}]}"#,
        );
        let f = parse_request(&body).unwrap();
        let out = rewrite_body(&body, &f, "meta/llama-3.1", true, None);
        let v = json(&out);
        assert_eq!(v["model"], "meta/llama-3.1");
        assert_eq!(v["messages"][0]["content"], "model");
        assert_eq!(
            rewrite_body(&body, &f, "fast", true, None),
            body,
            "unchanged body is not copied"
        );
    }

    #[test]
    fn streams_always_ask_for_usage() {
        let body = Bytes::from_static(b"{\"model\":\"m\",\"stream\":true}\n");
        let f = parse_request(&body).unwrap();
        assert!(!f.client_wants_usage);
        let v = json(&rewrite_body(&body, &f, "m", true, None));
        assert_eq!(v["stream_options"]["include_usage"], true);

        let body = Bytes::from_static(
            br#"{"stream_options":{"include_usage":false},"model":"m","stream":true}"#,
        );
        let f = parse_request(&body).unwrap();
        let v = json(&rewrite_body(&body, &f, "up", true, None));
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "up");

        // The client's other options go upstream as sent.
        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_obfuscation":false,"x\u0079":[1, {"a":null}]}}"#,
        );
        let f = parse_request(&body).unwrap();
        assert!(!f.client_wants_usage);
        let v = json(&rewrite_body(&body, &f, "m", true, None));
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"include_usage": true, "include_obfuscation": false, "xy": [1, {"a": null}]})
        );

        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let f = parse_request(&body).unwrap();
        assert!(f.client_wants_usage);
        assert_eq!(rewrite_body(&body, &f, "m", true, None), body);
    }

    /// How many times `"key":` occurs in a body (a key written twice counts twice).
    fn key_count(b: &Bytes, key: &str) -> usize {
        let pat = format!("\"{key}\":");
        b.windows(pat.len())
            .filter(|w| *w == pat.as_bytes())
            .count()
    }

    #[test]
    fn a_null_cap_or_stream_options_is_written_over_not_added_twice() {
        // Through the scanner and through serde (a key with an escape sends a body to serde).
        for tail in ["", r#","\u0078":1"#] {
            for (field, cap_field, cap) in [
                ("max_completion_tokens", CapField::Chat, 1000),
                ("max_tokens", CapField::Messages, 1000),
                ("max_output_tokens", CapField::Responses, 1000),
            ] {
                let text = format!(r#"{{"model":"m","{field}":null,"stream":true{tail}}}"#);
                let body = Bytes::from(text);
                let f = parse_request(&body).unwrap();
                assert_eq!(f.max_output_tokens, None);
                let out = rewrite_body(&body, &f, "m", false, Some((cap_field, cap)));
                assert_eq!(key_count(&out, field), 1, "{out:?}");
                assert_eq!(json(&out)[field], cap, "{out:?}");
            }
            let text = format!(r#"{{"model":"m","stream":true,"stream_options":null{tail}}}"#);
            let body = Bytes::from(text);
            let f = parse_request(&body).unwrap();
            assert!(!f.client_wants_usage);
            let out = rewrite_body(&body, &f, "m", true, None);
            assert_eq!(key_count(&out, "stream_options"), 1, "{out:?}");
            assert_eq!(json(&out)["stream_options"]["include_usage"], true);
        }
    }

    #[test]
    fn the_reserved_output_cap_is_written_over_or_inserted() {
        let cap = |body: &'static [u8], field: CapField, cap: u64| {
            let body = Bytes::from_static(body);
            let f = parse_request(&body).unwrap();
            json(&rewrite_body(&body, &f, "m", false, Some((field, cap))))
        };
        let v = cap(br#"{"model":"m","messages":[]}"#, CapField::Chat, 64);
        assert_eq!(v["max_completion_tokens"], 64);
        let v = cap(
            br#"{"model":"m","max_tokens":10,"max_completion_tokens":9000}"#,
            CapField::Chat,
            1000,
        );
        assert_eq!(
            (
                v["max_tokens"].as_u64(),
                v["max_completion_tokens"].as_u64()
            ),
            (Some(10), Some(1000))
        );
        let v = cap(br#"{"model":"m","max_tokens":null}"#, CapField::Messages, 5);
        assert_eq!(v["max_tokens"], 5);
        // A Responses body whose only bound is a field the API does not read.
        let v = cap(
            br#"{"model":"m","max_tokens":7,"input":"x"}"#,
            CapField::Responses,
            7,
        );
        assert_eq!(
            (v["max_output_tokens"].as_u64(), v["max_tokens"].as_u64()),
            (Some(7), Some(7))
        );
        let body = Bytes::from_static(br#"{"model":"m","max_output_tokens":3}"#);
        let f = parse_request(&body).unwrap();
        assert_eq!(
            rewrite_body(&body, &f, "m", false, Some((CapField::Responses, 3))),
            body
        );
    }

    /// Pieces of request bodies, the tricky ones among them: every field read, twice
    /// sometimes, `null`s, escapes (in keys too), numbers in every JSON form and some not,
    /// non-booleans for `stream`, nesting, non-ASCII and control bytes.
    fn body_piece() -> impl Strategy<Value = String> {
        prop::sample::select(vec![
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            " ",
            "\n\t",
            "\"model\"",
            "\"stream\"",
            "\"stream_options\"",
            "\"max_tokens\"",
            "\"max_completion_tokens\"",
            "\"n\"",
            "\"max_output_tokens\"",
            "\"tools\"",
            "\"background\"",
            "\"prompt\"",
            "\"conversation\"",
            "\"messages\"",
            "\"mod\\u0065l\"",
            "\"gpt-4o\"",
            "\"a\\\"b\\u00e9\\n\"",
            "\"\u{e9}\"",
            "\"\u{1}\"",
            "\"\\x\"",
            "null",
            "true",
            // Past the scanner's short-string loop, with an escape and a control byte.
            "\"0123456789012345678901234567890123456789\\\"0123456789012345678901234567890123456789\"",
            "\"0123456789012345678901234567890123456789\u{1f}\"",
            "false",
            "tru",
            "0",
            "7",
            "-1",
            "01",
            "1.5",
            "1e3",
            "1.",
            "-",
            "18446744073709551616",
            "{\"include_usage\":true}",
            "[{\"type\":\"function\"}]",
            "\u{0}",
            "\u{ff}",
        ])
        .prop_map(str::to_string)
    }

    /// A member list of an object: `"key": value` pairs from the pieces.
    fn member() -> impl Strategy<Value = String> {
        // Mostly well-formed pairs (so the scanner reads many bodies whole), some mangled.
        (
            body_piece(),
            body_piece(),
            prop::option::weighted(0.15, body_piece()),
        )
            .prop_map(|(k, v, junk)| {
                let key = if k.starts_with('"') {
                    k
                } else {
                    format!("\"{k}\"")
                };
                format!("{key}:{v}{}", junk.unwrap_or_default())
            })
    }

    proptest::proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        /// Wherever the scanner reads a body, serde reads it too and finds the same fields;
        /// so `parse_request`, which takes the scanner's reading when there is one, answers
        /// every body exactly as serde alone would.
        #[test]
        fn the_scanner_reads_every_body_as_serde_does(
            members in prop::collection::vec(member(), 0..6),
            junk in prop::collection::vec(body_piece(), 0..3),
            mangle in 0usize..4,
        ) {
            let mut body = format!("{{{}}}", members.join(","));
            match mangle {
                1 => body.push_str(&junk.concat()),
                2 => body = format!("{}{}", junk.concat(), body),
                _ => {}
            }
            let bytes = body.as_bytes();
            if let Some(top) = Top::by_scan(&body) {
                let serde = Top::by_serde(bytes);
                prop_assert!(serde.is_ok(), "scanner read {body:?}, serde refused it: {serde:?}");
                prop_assert_eq!(top, serde.unwrap());
            }
        }

        /// Valid bodies with the fields read in any order, values of every kind: the scanner
        /// reads nearly all of them (the fast path is the common path) and as serde does.
        #[test]
        fn the_scanner_reads_valid_bodies(
            fields in prop::collection::vec((0usize..10, 0usize..6), 0..8),
            space in prop::sample::select(vec!["", " ", "\n  ", "\t"]),
        ) {
            const NAMES: [&str; 10] = ["model", "stream", "n", "max_tokens", "tools", "prompt",
                "messages", "prediction", "stream_options", "metadata"];
            const VALUES: [&str; 6] = ["\"m-1\"", "true", "3", "null",
                "[{\"role\":\"user\",\"content\":\"hi \\\"there\\\"\"}]", "{\"include_usage\":false}"];
            let mut seen = std::collections::HashSet::new();
            let members: Vec<String> = fields
                .into_iter()
                .filter(|(k, _)| seen.insert(*k))
                .map(|(k, v)| format!("\"{}\"{space}:{space}{}", NAMES[k], VALUES[v]))
                .collect();
            let body = format!("{space}{{{space}{}{space}}}{space}", members.join(&format!(",{space}")));
            let serde = Top::by_serde(body.as_bytes());
            let scan = Top::by_scan(&body);
            // Only a `stream` that is not a boolean is left to serde (which refuses it).
            if serde.is_ok() {
                prop_assert_eq!(scan, Some(serde.unwrap()));
            } else {
                prop_assert_eq!(scan, None);
            }
        }
    }

    #[test]
    fn a_plain_chat_body_is_read_by_the_scanner() {
        let body = r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}],"max_tokens":10,"stream":true}"#;
        let top = Top::by_scan(body).expect("the scanner reads a plain chat body");
        assert_eq!(top.model, Some("\"gpt-4o\""));
        assert_eq!(top.max_tokens, Some("10"));
        assert_eq!(top.stream, Some(true));
        // Twice-named fields and escaped keys are serde's to judge.
        assert_eq!(Top::by_scan(r#"{"model":"a","model":"b"}"#), None);
        assert!(Top::by_serde(br#"{"model":"a","model":"b"}"#).is_err());
        assert_eq!(Top::by_scan(r#"{"mod\u0065l":"a"}"#), None);
        assert_eq!(
            Top::by_serde(br#"{"mod\u0065l":"a"}"#).unwrap().model,
            Some("\"a\"")
        );
    }
}
