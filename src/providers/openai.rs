//! OpenAI wire format: the request fields the gateway reads, and the body rewrite it forwards.
//!
//! Only `model`, `stream`, `stream_options`, `max_tokens` and `max_completion_tokens` are
//! parsed; everything else is skipped by serde without building values. The rewrite splices
//! byte ranges of the original body, so messages are copied once and never re-serialized.

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::GateError;

#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    stream_options: Option<&'a RawValue>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

/// What the gateway needs from a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFields {
    pub model: String,
    pub stream: bool,
    /// The client asked for the usage chunk itself.
    pub client_wants_usage: bool,
    /// `max_completion_tokens`, else `max_tokens`.
    pub max_output_tokens: Option<u64>,
    /// Byte range of the `model` value (with its quotes) in the body.
    model_span: Range<usize>,
    /// Byte range of the `stream_options` value, if present.
    stream_options_span: Option<Range<usize>>,
}

fn span_of(body: &[u8], raw: &RawValue) -> Range<usize> {
    let start = raw.get().as_ptr() as usize - body.as_ptr() as usize;
    start..start + raw.get().len()
}

/// Parses the fields the gateway needs. 400 `invalid_request` unless the body is a JSON
/// object with a string `model`.
pub fn parse_request(body: &[u8]) -> Result<RequestFields, GateError> {
    let fields: Fields<'_> = serde_json::from_slice(body)
        .map_err(|e| GateError::InvalidRequest(format!("body is not valid JSON: {e}")))?;
    let raw_model = fields
        .model
        .ok_or_else(|| GateError::InvalidRequest("missing string field 'model'".into()))?;
    let model: Cow<'_, str> = serde_json::from_str(raw_model.get())
        .map_err(|_| GateError::InvalidRequest("'model' must be a string".into()))?;
    let stream = fields.stream.unwrap_or(false);
    let client_wants_usage = match fields.stream_options {
        Some(raw) if raw.get() != "null" => {
            let opts: StreamOptions = serde_json::from_str(raw.get()).map_err(|_| {
                GateError::InvalidRequest("'stream_options' must be an object".into())
            })?;
            opts.include_usage.unwrap_or(false)
        }
        _ => false,
    };
    Ok(RequestFields {
        model_span: span_of(body, raw_model),
        stream_options_span: fields.stream_options.map(|r| span_of(body, r)),
        model: model.into_owned(),
        stream,
        client_wants_usage,
        max_output_tokens: fields.max_completion_tokens.or(fields.max_tokens),
    })
}

/// The body to send upstream: `model` replaced by `upstream_id`, and for streams
/// `stream_options.include_usage` forced on so the usage chunk always arrives.
/// Returns the original bytes (no copy) when nothing changes.
pub fn rewrite_body(body: &Bytes, fields: &RequestFields, upstream_id: &str) -> Bytes {
    let model_same = upstream_id == fields.model;
    let need_usage = fields.stream && !fields.client_wants_usage;
    if model_same && !need_usage {
        return body.clone();
    }
    let quoted = serde_json::to_string(upstream_id).unwrap_or_else(|_| "\"\"".into());
    // Edits as (range to replace, replacement), applied in body order.
    let mut edits: Vec<(Range<usize>, Cow<'_, str>)> = Vec::with_capacity(2);
    edits.push((fields.model_span.clone(), Cow::Owned(quoted)));
    if need_usage {
        match &fields.stream_options_span {
            Some(span) => edits.push((span.clone(), Cow::Borrowed(r#"{"include_usage":true}"#))),
            None => {
                // Insert before the object's closing brace (the last non-space byte).
                let end = body
                    .iter()
                    .rposition(|b| !b.is_ascii_whitespace())
                    .unwrap_or(body.len().saturating_sub(1));
                edits.push((
                    end..end,
                    Cow::Borrowed(r#","stream_options":{"include_usage":true}"#),
                ));
            }
        }
    }
    edits.sort_by_key(|(r, _)| r.start);
    let extra: usize = edits.iter().map(|(_, s)| s.len()).sum();
    let mut out = BytesMut::with_capacity(body.len() + extra);
    let mut at = 0;
    for (range, with) in &edits {
        out.extend_from_slice(&body[at..range.start]);
        out.extend_from_slice(with.as_bytes());
        at = range.end;
    }
    out.extend_from_slice(&body[at..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(b: &Bytes) -> serde_json::Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn parses_only_what_it_needs() {
        let body = br#"{"messages":[{"role":"user","content":"hi \"model\": x"}],"model":"gpt-4o-mini","max_tokens":7}"#;
        let f = parse_request(body).unwrap();
        assert_eq!(f.model, "gpt-4o-mini");
        assert!(!f.stream);
        assert_eq!(f.max_output_tokens, Some(7));
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
        let out = rewrite_body(&body, &f, "meta/llama-3.1");
        let v = json(&out);
        assert_eq!(v["model"], "meta/llama-3.1");
        assert_eq!(v["messages"][0]["content"], "model");
        assert_eq!(
            rewrite_body(&body, &f, "fast"),
            body,
            "unchanged body is not copied"
        );
    }

    #[test]
    fn streams_always_ask_for_usage() {
        let body = Bytes::from_static(b"{\"model\":\"m\",\"stream\":true}\n");
        let f = parse_request(&body).unwrap();
        assert!(!f.client_wants_usage);
        let v = json(&rewrite_body(&body, &f, "m"));
        assert_eq!(v["stream_options"]["include_usage"], true);

        let body = Bytes::from_static(
            br#"{"stream_options":{"include_usage":false},"model":"m","stream":true}"#,
        );
        let f = parse_request(&body).unwrap();
        let v = json(&rewrite_body(&body, &f, "up"));
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert_eq!(v["model"], "up");

        let body = Bytes::from_static(
            br#"{"model":"m","stream":true,"stream_options":{"include_usage":true}}"#,
        );
        let f = parse_request(&body).unwrap();
        assert!(f.client_wants_usage);
        assert_eq!(rewrite_body(&body, &f, "m"), body);
    }
}
