//! `multipart/form-data` bodies (`/images/edits`, `/audio/transcriptions`,
//! `/audio/translations`): boundary scanning with `memchr::memmem`, finding only the small
//! text parts the gateway needs (`model`, `n`, `response_format`). File parts are never
//! copied or decoded; the upstream body is the client's with the `model` value replaced.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use crate::error::GateError;

/// The parts of a form the gateway reads, as byte ranges of their values in the body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Form {
    pub model: String,
    /// Where the `model` value lies in the body (replaced on the way upstream).
    pub model_span: Range<usize>,
    pub n: Option<String>,
    pub response_format: Option<String>,
    /// A bound on the `file` part's audio duration (ms), where its container gives one
    /// ([`crate::providers::audio`]).
    pub audio_ms: Option<u64>,
}

fn bad(why: &str) -> GateError {
    GateError::InvalidRequest(format!("malformed multipart body: {why}"))
}

/// The boundary of a `multipart/form-data` content type; 400 for any other type.
pub fn boundary(content_type: Option<&[u8]>) -> Result<Vec<u8>, GateError> {
    let ct = content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or_else(|| bad("Content-Type must be multipart/form-data"))?;
    let mut params = ct.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(bad("Content-Type must be multipart/form-data"));
    }
    let b = params
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"))
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| bad("no boundary"))?;
    Ok(b.as_bytes().to_vec())
}

/// Scans a whole form: every part must be delimited by the boundary, have a head ending in
/// an empty line and a `Content-Disposition: form-data; name=...`, and the body must end
/// with the closing delimiter. 400 `invalid_request` otherwise, or without a `model` part.
pub fn parse(body: &[u8], boundary: &[u8]) -> Result<Form, GateError> {
    let mut delim = Vec::with_capacity(boundary.len() + 4);
    delim.extend_from_slice(b"\r\n--");
    delim.extend_from_slice(boundary);
    let finder = memmem::Finder::new(&delim);
    // The first delimiter may open the body (no preamble CRLF before it).
    let mut at = if body.starts_with(&delim[2..]) {
        delim.len() - 2
    } else {
        finder.find(body).ok_or_else(|| bad("no boundary"))? + delim.len()
    };
    let mut form = Form {
        model: String::new(),
        model_span: 0..0,
        n: None,
        response_format: None,
        audio_ms: None,
    };
    let mut has_model = false;
    loop {
        let rest = &body[at..];
        if rest.starts_with(b"--") {
            break; // closing delimiter; an epilogue may follow
        }
        if !rest.starts_with(b"\r\n") {
            return Err(bad("a boundary is not followed by CRLF"));
        }
        let start = at + 2;
        let head_len = memmem::find(&body[start..], b"\r\n\r\n")
            .ok_or_else(|| bad("a part's headers do not end"))?;
        let head = &body[start..start + head_len];
        let value_start = start + head_len + 4;
        let value_len = finder
            .find(&body[value_start..])
            .ok_or_else(|| bad("no closing boundary"))?;
        let value = value_start..value_start + value_len;
        let name = part_name(head).ok_or_else(|| bad("a part has no form-data name"))?;
        let text = || {
            std::str::from_utf8(&body[value.clone()])
                .map(|s| s.trim().to_string())
                .map_err(|_| bad("a text field is not UTF-8"))
        };
        match name {
            b"model" => {
                if has_model {
                    return Err(GateError::InvalidRequest("'model' is given twice".into()));
                }
                has_model = true;
                form.model = text()?;
                form.model_span = value.clone();
            }
            b"n" => form.n = Some(text()?),
            b"response_format" => form.response_format = Some(text()?),
            b"file" => form.audio_ms = super::audio::duration_bound_ms(&body[value.clone()]),
            _ => {}
        }
        at = value.end + delim.len();
    }
    if !has_model || form.model.is_empty() {
        return Err(GateError::InvalidRequest(
            "missing string field 'model'".into(),
        ));
    }
    Ok(form)
}

/// The `name` of a part's `Content-Disposition: form-data` header.
fn part_name(head: &[u8]) -> Option<&[u8]> {
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = memchr::memchr(b':', line) else {
            continue;
        };
        if !line[..colon].eq_ignore_ascii_case(b"content-disposition") {
            continue;
        }
        let value = &line[colon + 1..];
        let i = memmem::find(value, b"name=\"")? + b"name=\"".len();
        // `filename="..."` also ends in `name="`: take the first bare `name=`.
        let before = value[..i - b"name=\"".len()].last();
        if before.is_some_and(|b| b.is_ascii_alphabetic()) {
            let rest = &value[i..];
            return part_name_after(rest);
        }
        let end = memchr::memchr(b'"', &value[i..])?;
        return Some(&value[i..i + end]);
    }
    None
}

/// `name="..."` after a `filename="...` match: the next bare one.
fn part_name_after(rest: &[u8]) -> Option<&[u8]> {
    let mut from = 0;
    while let Some(j) = memmem::find(&rest[from..], b"name=\"") {
        let k = from + j;
        let bare = k == 0 || !rest[k - 1].is_ascii_alphabetic();
        let s = k + b"name=\"".len();
        if bare {
            let end = memchr::memchr(b'"', &rest[s..])?;
            return Some(&rest[s..s + end]);
        }
        from = s;
    }
    None
}

/// The body with the `model` value replaced by `upstream_id`; every other byte as sent.
pub fn rewrite_model(body: &Bytes, form: &Form, upstream_id: &str) -> Bytes {
    rewrite_span(body, form.model_span.clone(), upstream_id)
}

/// The body with the bytes at `span` replaced by `upstream_id` (no copy when equal).
pub fn rewrite_span(body: &Bytes, span: Range<usize>, upstream_id: &str) -> Bytes {
    if body.get(span.clone()) == Some(upstream_id.as_bytes()) {
        return body.clone();
    }
    let (Some(head), Some(tail)) = (body.get(..span.start), body.get(span.end..)) else {
        return body.clone();
    };
    let mut out = BytesMut::with_capacity(body.len() + upstream_id.len());
    out.extend_from_slice(head);
    out.extend_from_slice(upstream_id.as_bytes());
    out.extend_from_slice(tail);
    out.freeze()
}

/// Room left after a request body as it is read ([`SPLICE_HEADROOM`] bytes), so a longer
/// `upstream_id` fits in [`splice_span`] without moving the body to a larger buffer.
pub const SPLICE_HEADROOM: usize = 256;

/// Replaces the bytes at `span` with `upstream_id` in `body` itself, when `body` is the only
/// reference to its buffer (the request body as read) and has room for the difference: the
/// tail moves by the length difference, and an upload is held once, not twice. Otherwise
/// the body is copied once, as [`rewrite_span`] does. Returns where the value now lies.
pub fn splice_span(body: &mut Bytes, span: Range<usize>, upstream_id: &str) -> Range<usize> {
    let id = upstream_id.as_bytes();
    let new_span = span.start..span.start + id.len();
    if body.get(span.clone()) == Some(id) {
        return span;
    }
    if body.get(span.clone()).is_none() {
        return span;
    }
    let mut buf = match std::mem::take(body).try_into_mut() {
        Ok(buf) if buf.capacity() - buf.len() >= id.len().saturating_sub(span.len()) => buf,
        Ok(buf) => {
            *body = rewrite_span(&buf.freeze(), span, upstream_id);
            return new_span;
        }
        Err(shared) => {
            *body = rewrite_span(&shared, span, upstream_id);
            return new_span;
        }
    };
    let len = buf.len();
    if id.len() > span.len() {
        buf.resize(len + id.len() - span.len(), 0);
        buf.copy_within(span.end..len, new_span.end);
    } else {
        buf.copy_within(span.end..len, new_span.end);
        buf.truncate(len - (span.len() - id.len()));
    }
    buf[new_span.clone()].copy_from_slice(id);
    *body = buf.freeze();
    new_span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
        let mut b = Vec::new();
        for (name, file, value) in parts {
            b.extend_from_slice(b"--XyZ\r\nContent-Disposition: form-data; name=\"");
            b.extend_from_slice(name.as_bytes());
            b.push(b'"');
            if let Some(f) = file {
                b.extend_from_slice(
                    format!("; filename=\"{f}\"\r\nContent-Type: audio/mpeg").as_bytes(),
                );
            }
            b.extend_from_slice(b"\r\n\r\n");
            b.extend_from_slice(value);
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(b"--XyZ--\r\n");
        b
    }

    #[test]
    fn finds_the_model_and_rewrites_only_it() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(5000).collect();
        let body = Bytes::from(form(&[
            ("file", Some("a.mp3"), &audio),
            ("model", None, b"whisper-1"),
            ("response_format", None, b"verbose_json"),
        ]));
        let f = parse(&body, b"XyZ").unwrap();
        assert_eq!(f.model, "whisper-1");
        assert_eq!(f.response_format.as_deref(), Some("verbose_json"));
        let out = rewrite_model(&body, &f, "whisper-large");
        let want = form(&[
            ("file", Some("a.mp3"), &audio),
            ("model", None, b"whisper-large"),
            ("response_format", None, b"verbose_json"),
        ]);
        assert_eq!(&out[..], &want[..]);
    }

    #[test]
    fn malformed_forms_are_400() {
        let good = form(&[("model", None, b"m"), ("n", None, b"2")]);
        assert_eq!(parse(&good, b"XyZ").unwrap().n.as_deref(), Some("2"));
        for bad in [
            &good[..good.len() - 9], // no closing delimiter
            b"garbage".as_slice(),   // no boundary at all
            b"--XyZ\r\nno-end-of-headers".as_slice(),
            b"--XyZ\r\nContent-Type: x\r\n\r\nv\r\n--XyZ--".as_slice(), // no name
        ] {
            assert!(
                parse(bad, b"XyZ").is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let no_model = form(&[("file", Some("a"), b"x")]);
        assert!(parse(&no_model, b"XyZ").is_err());
        assert!(boundary(Some(b"application/json")).is_err());
        assert_eq!(
            boundary(Some(b"multipart/form-data; boundary=\"XyZ\"")).unwrap(),
            b"XyZ"
        );
    }

    #[test]
    fn a_unique_body_is_spliced_in_place_and_a_shared_one_copied() {
        let audio: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let raw = form(&[
            ("model", None, b"whisper-1"),
            ("file", Some("a.mp3"), &audio),
        ]);
        let f = parse(&raw, b"XyZ").unwrap();
        for id in ["whisper-large-v3-upstream", "w"] {
            let want = form(&[
                ("model", None, id.as_bytes()),
                ("file", Some("a.mp3"), &audio),
            ]);
            let mut read = bytes::BytesMut::with_capacity(raw.len() + SPLICE_HEADROOM);
            read.extend_from_slice(&raw);
            let mut body = read.freeze();
            let at = body.as_ptr();
            let span = splice_span(&mut body, f.model_span.clone(), id);
            assert_eq!(&body[..], &want[..], "{id}");
            assert_eq!(body.as_ptr(), at, "spliced where it was read: {id}");
            assert_eq!(&body[span.clone()], id.as_bytes());
            // Spliced again from the new span (a fallback to another model).
            let back = splice_span(&mut body, span, "whisper-1");
            assert_eq!((&body[..], &body[back]), (&raw[..], &b"whisper-1"[..]));
        }
        // Shared with another reference: copied, the other one unchanged.
        let mut body = Bytes::from(raw.clone());
        let other = body.clone();
        splice_span(&mut body, f.model_span.clone(), "whisper-large");
        assert_eq!(&other[..], &raw[..]);
        assert_eq!(
            &body[..],
            &form(&[
                ("model", None, b"whisper-large"),
                ("file", Some("a.mp3"), &audio)
            ])[..]
        );
    }
}
