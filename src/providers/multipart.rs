//! `multipart/form-data` bodies (`/images/edits`, `/audio/transcriptions`,
//! `/audio/translations`): boundary scanning with `memchr::memmem`, finding only the small
//! text parts the gateway needs (`model`, `n`, `response_format`). File parts are never
//! copied or decoded; the upstream body is the client's with the `model` value replaced.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use memchr::memmem;

use crate::error::GateError;

use super::audio::AudioScan;

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
    /// Parts that carry a file (a `filename` parameter) or are named `image`, `image[]` or
    /// `mask`: an image edit's inputs, whose tokens their bytes do not bound.
    pub media_parts: u64,
}

/// 400 for a part the gateway reads given twice (which one the upstream takes is its own).
fn given_twice(name: &str) -> GateError {
    GateError::InvalidRequest(format!("'{name}' is given twice"))
}

fn bad(why: &str) -> GateError {
    GateError::InvalidRequest(format!("malformed multipart body: {why}"))
}

/// The boundary of a `multipart/form-data` content type; 400 for any other type, and for a
/// type that names its boundary twice: the gateway and the upstream must read one form, and
/// parsers differ on which of two they take (Starlette takes the last).
pub fn boundary(content_type: Option<&[u8]>) -> Result<Vec<u8>, GateError> {
    let ct = content_type
        .and_then(|v| std::str::from_utf8(v).ok())
        .ok_or_else(|| bad("Content-Type must be multipart/form-data"))?;
    let mut params = ct.split(';');
    let mime = params.next().unwrap_or("").trim();
    if !mime.eq_ignore_ascii_case("multipart/form-data") {
        return Err(bad("Content-Type must be multipart/form-data"));
    }
    let mut boundaries = params
        .filter_map(|p| p.split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("boundary"));
    let b = boundaries
        .next()
        .map(|(_, v)| v.trim().trim_matches('"'))
        .filter(|b| !b.is_empty() && b.len() <= 70)
        .ok_or_else(|| bad("no boundary"))?;
    if boundaries.next().is_some() {
        return Err(bad("the boundary is given twice"));
    }
    Ok(b.as_bytes().to_vec())
}

/// Scans a whole form: every part must be delimited by the boundary, have a head ending in
/// an empty line and a `Content-Disposition: form-data; name=...`, and the body must end
/// with the closing delimiter. 400 `invalid_request` otherwise, or without a `model` part.
pub fn parse(body: &[u8], boundary: &[u8]) -> Result<Form, GateError> {
    let mut scan = FormScanner::new(boundary);
    // In pieces, so nothing but a head or a text value is ever copied.
    for piece in body.chunks(64 * 1024) {
        scan.feed(piece)?;
    }
    scan.finish()?;
    Ok(scan.form)
}

/// A part's head longer than this is refused (the whole head is kept until it ends).
const MAX_HEAD: usize = 16 * 1024;
/// A `model`, `n` or `response_format` value longer than this is refused.
const MAX_TEXT: usize = 16 * 1024;

/// Where a [`FormScanner`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Before the first delimiter (a preamble may come first).
    Start,
    /// Just after a delimiter: `--` closes the form, CRLF opens a part's head.
    Next,
    Head,
    /// A part's value, from body offset `start`.
    Value {
        part: Part,
        start: usize,
    },
    /// After the closing delimiter: an epilogue, ignored.
    Closed,
}

/// The parts the gateway reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Model,
    N,
    ResponseFormat,
    File,
    Other,
}

/// How much of a piece is joined with the bytes kept from the last one before the rest
/// is scanned where it lies: more than a delimiter (at most 74 bytes) and its CRLF.
const JOIN_BYTES: usize = 4096;

/// The checks and reads of [`parse`], over a body that arrives in pieces: what is kept
/// between pieces is at most a part's head, one of the few text values read, or the last
/// bytes of a file part that may begin a delimiter. File parts are scanned for the
/// delimiter and, for `file`, walked for their audio duration ([`AudioScan`]); never held.
#[derive(Debug, Clone)]
pub struct FormScanner {
    delim: Vec<u8>,
    finder: memmem::Finder<'static>,
    state: Scan,
    /// Bytes not yet consumed, from body offset `buf_at`.
    buf: Vec<u8>,
    buf_at: usize,
    form: Form,
    has_model: bool,
    audio: Option<AudioScan>,
}

impl FormScanner {
    pub fn new(boundary: &[u8]) -> FormScanner {
        let mut delim = Vec::with_capacity(boundary.len() + 4);
        delim.extend_from_slice(b"\r\n--");
        delim.extend_from_slice(boundary);
        FormScanner {
            finder: memmem::Finder::new(&delim).into_owned(),
            delim,
            state: Scan::Start,
            buf: Vec::new(),
            buf_at: 0,
            form: Form {
                model: String::new(),
                model_span: 0..0,
                n: None,
                response_format: None,
                audio_ms: None,
                media_parts: 0,
            },
            has_model: false,
            audio: None,
        }
    }

    /// The form's next bytes. `Err` as soon as they show the form malformed.
    pub fn feed(&mut self, piece: &[u8]) -> Result<(), GateError> {
        if self.state == Scan::Closed {
            return Ok(());
        }
        if self.buf.is_empty() {
            // Most pieces of a file part: scanned where they lie, nothing kept.
            let used = self.scan(piece, false)?;
            self.buf.extend_from_slice(&piece[used..]);
            self.buf_at += used;
            return Ok(());
        }
        // Bytes kept from the last piece (often a lone CR that may begin a delimiter) are
        // joined with the start of this one only: once they are consumed, the rest is
        // scanned where it lies, not copied (a piece is 64 KiB; the kept bytes, a few).
        let (head, tail) = piece.split_at(piece.len().min(JOIN_BYTES));
        self.feed_kept(head)?;
        if tail.is_empty() {
            Ok(())
        } else if self.buf.is_empty() {
            self.feed(tail)
        } else {
            self.feed_kept(tail)
        }
    }

    /// `piece` after the bytes kept in `buf`.
    fn feed_kept(&mut self, piece: &[u8]) -> Result<(), GateError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(piece);
        let used = self.scan(&buf, false)?;
        buf.drain(..used);
        self.buf = buf;
        self.buf_at += used;
        Ok(())
    }

    /// The body ended: `Err` unless the form closed, with a `model`.
    pub fn finish(&mut self) -> Result<(), GateError> {
        if self.state != Scan::Closed {
            let buf = std::mem::take(&mut self.buf);
            let used = self.scan(&buf, true)?;
            self.buf_at += used;
        }
        match self.state {
            Scan::Closed => {}
            Scan::Start => return Err(bad("no boundary")),
            Scan::Next => return Err(bad("a boundary is not followed by CRLF")),
            Scan::Head => return Err(bad("a part's headers do not end")),
            Scan::Value { .. } => return Err(bad("no closing boundary")),
        }
        if !self.has_model || self.form.model.is_empty() {
            return Err(GateError::InvalidRequest(
                "missing string field 'model'".into(),
            ));
        }
        Ok(())
    }

    /// The fields read so far (all of them after [`FormScanner::finish`]).
    pub fn form(&self) -> &Form {
        &self.form
    }

    /// Whether the bytes so far end inside a file or an unread part (or after the form):
    /// not in a part's head nor in a text value that the gateway reads, so no field read
    /// later can have begun already.
    pub fn between_fields(&self) -> bool {
        matches!(
            self.state,
            Scan::Value {
                part: Part::File | Part::Other,
                ..
            } | Scan::Closed
        )
    }

    /// Whether a non-empty `model` part has been read whole.
    pub fn has_model(&self) -> bool {
        self.has_model && !self.form.model.is_empty()
    }

    /// Whether a large form's opening can end here: its `model` is read, no field the
    /// gateway reads has begun ([`FormScanner::between_fields`]), and a `file` part under
    /// way has shown what its head can bound ([`AudioScan::head_settled`]).
    pub fn opening_complete(&self) -> bool {
        self.has_model()
            && self.between_fields()
            && match (self.state, &self.audio) {
                (
                    Scan::Value {
                        part: Part::File, ..
                    },
                    Some(a),
                ) => a.head_settled(),
                _ => true,
            }
    }

    /// A bound on the audio of the `file` part before the body's end, for a body of at
    /// most `body_len` bytes: the bound of a file part already whole, else what a WAV
    /// header that has arrived allows (see [`AudioScan::wav_bound_within`]).
    pub fn audio_bound_within(&self, body_len: usize) -> Option<u64> {
        match (self.state, &self.audio) {
            (
                Scan::Value {
                    part: Part::File,
                    start,
                },
                Some(a),
            ) => a.wav_bound_within(body_len.saturating_sub(start) as u64),
            _ => self.form.audio_ms,
        }
    }

    /// How many of the last bytes of `data` may begin a delimiter that the next bytes end.
    fn partial_delim(&self, data: &[u8]) -> usize {
        let from = data.len().saturating_sub(self.delim.len() - 1);
        (from..data.len())
            .find(|&i| data[i] == b'\r' && self.delim.starts_with(&data[i..]))
            .map_or(0, |i| data.len() - i)
    }

    /// Scans `data` (the body from offset `buf_at`) as far as it can; returns the bytes
    /// consumed. `last`: no more bytes follow.
    fn scan(&mut self, data: &[u8], last: bool) -> Result<usize, GateError> {
        let dl = self.delim.len();
        let mut at = 0;
        loop {
            let rest = &data[at..];
            match self.state {
                Scan::Closed => return Ok(data.len()),
                Scan::Start => {
                    // The first delimiter may open the body (no preamble CRLF before it).
                    let open = &self.delim[2..];
                    let opening = self.buf_at + at == 0;
                    if opening && rest.len() < open.len() && open.starts_with(rest) && !last {
                        return Ok(at);
                    }
                    if opening && rest.starts_with(open) {
                        at += open.len();
                    } else if let Some(i) = self.finder.find(rest) {
                        at += i + dl;
                    } else if last {
                        return Err(bad("no boundary"));
                    } else {
                        // The preamble is dropped but for what may begin a delimiter.
                        return Ok(at + rest.len() - self.partial_delim(rest));
                    }
                    self.state = Scan::Next;
                }
                Scan::Next => {
                    if rest.len() < 2 && !last {
                        return Ok(at);
                    }
                    if rest.starts_with(b"--") {
                        self.state = Scan::Closed;
                        return Ok(data.len());
                    }
                    if !rest.starts_with(b"\r\n") {
                        return Err(bad("a boundary is not followed by CRLF"));
                    }
                    at += 2;
                    self.state = Scan::Head;
                }
                Scan::Head => {
                    let Some(head_len) = memmem::find(rest, b"\r\n\r\n") else {
                        if last {
                            return Err(bad("a part's headers do not end"));
                        }
                        if rest.len() > MAX_HEAD {
                            return Err(bad("a part's headers are too long"));
                        }
                        return Ok(at);
                    };
                    let head = &rest[..head_len];
                    let d = disposition(head)?;
                    let part = match d.name {
                        b"model" => Part::Model,
                        b"n" => Part::N,
                        b"response_format" => Part::ResponseFormat,
                        b"file" => Part::File,
                        _ => Part::Other,
                    };
                    if is_media_part(&d) {
                        self.form.media_parts += 1;
                    }
                    at += head_len + 4;
                    if part == Part::File {
                        // The upstream transcribes one file; the duration bound is that
                        // file's.
                        if self.audio.is_some() {
                            return Err(given_twice("file"));
                        }
                        self.audio = Some(AudioScan::default());
                    }
                    self.state = Scan::Value {
                        part,
                        start: self.buf_at + at,
                    };
                }
                Scan::Value { part, start } => {
                    let Some(end) = self.finder.find(rest) else {
                        if last {
                            return Err(bad("no closing boundary"));
                        }
                        if matches!(part, Part::File | Part::Other) {
                            // All but what may begin a delimiter is value.
                            let value = rest.len() - self.partial_delim(rest);
                            if let (Part::File, Some(a)) = (part, &mut self.audio) {
                                a.feed(&rest[..value]);
                            }
                            return Ok(at + value);
                        }
                        if rest.len() > MAX_TEXT {
                            return Err(bad("a text field is too long"));
                        }
                        return Ok(at);
                    };
                    let value = &rest[..end];
                    let text = || {
                        std::str::from_utf8(value)
                            .map(|s| s.trim().to_string())
                            .map_err(|_| bad("a text field is not UTF-8"))
                    };
                    match part {
                        Part::Model => {
                            if self.has_model {
                                return Err(given_twice("model"));
                            }
                            self.has_model = true;
                            self.form.model = text()?;
                            self.form.model_span = start..start + end;
                        }
                        // Read once: a second value could be the one the upstream takes.
                        Part::N if self.form.n.is_some() => return Err(given_twice("n")),
                        Part::N => self.form.n = Some(text()?),
                        Part::ResponseFormat if self.form.response_format.is_some() => {
                            return Err(given_twice("response_format"))
                        }
                        Part::ResponseFormat => self.form.response_format = Some(text()?),
                        Part::File => {
                            if let Some(a) = &mut self.audio {
                                a.feed(value);
                                self.form.audio_ms = a.finish();
                            }
                        }
                        Part::Other => {}
                    }
                    at += end + dl;
                    self.state = Scan::Next;
                }
            }
        }
    }
}

/// What a part's `Content-Disposition: form-data` header says.
#[derive(Debug, PartialEq, Eq)]
struct Disposition<'a> {
    name: &'a [u8],
    /// A `filename` (or `filename*`) parameter: the part carries a file.
    filename: bool,
}

/// A byte of an HTTP token (RFC 9110 `tchar`).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn skip_ows(v: &[u8], mut i: usize) -> usize {
    while matches!(v.get(i), Some(b' ' | b'\t')) {
        i += 1;
    }
    i
}

/// Reads a part's `Content-Disposition` strictly: one such header, of type `form-data`,
/// whose parameters are tokens or quoted strings, none given twice, and a `name` in plain
/// form. Anything a parser could read two ways is 400: the gateway bounds and allow-lists
/// the form it reads, so the upstream must read that same form (RFC 7578 forbids `name*`;
/// Werkzeug and Starlette take the last of two `name`s, the gateway would take one).
/// A quoted string ends at its first unescaped quote; a backslash escapes the next byte
/// (as python-multipart and Go read it), and is refused in a `name`, which never needs one.
fn disposition(head: &[u8]) -> Result<Disposition<'_>, GateError> {
    let mut found = None;
    for line in head.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // A folded line (RFC 9112 obsoletes it) or one that is no header: parsers differ.
        let Some(colon) = memchr::memchr(b':', line).filter(|_| !line.starts_with(b" ")) else {
            return Err(bad("a part has a header line that is not `name: value`"));
        };
        if line.starts_with(b"\t") {
            return Err(bad("a part has a header line that is not `name: value`"));
        }
        if line[..colon]
            .trim_ascii()
            .eq_ignore_ascii_case(b"content-disposition")
        {
            if found.is_some() {
                return Err(bad("a part has two Content-Disposition headers"));
            }
            found = Some(&line[colon + 1..]);
        }
    }
    let v = found.ok_or_else(|| bad("a part has no form-data name"))?;
    let unclear = || bad("a part's Content-Disposition cannot be read one way only");
    let mut i = skip_ows(v, 0);
    let kind_end = i + v[i..].iter().take_while(|b| is_tchar(**b)).count();
    if !v[i..kind_end].eq_ignore_ascii_case(b"form-data") {
        return Err(bad("a part's Content-Disposition is not form-data"));
    }
    i = kind_end;
    let mut seen: Vec<&[u8]> = Vec::new();
    let (mut name, mut filename) = (None, false);
    loop {
        i = skip_ows(v, i);
        match v.get(i) {
            None => break,
            Some(b';') => i = skip_ows(v, i + 1),
            Some(_) => return Err(unclear()),
        }
        if i == v.len() {
            break;
        }
        let key_end = i + v[i..].iter().take_while(|b| is_tchar(**b)).count();
        let key = &v[i..key_end];
        i = skip_ows(v, key_end);
        if key.is_empty() || v.get(i) != Some(&b'=') {
            return Err(unclear());
        }
        i = skip_ows(v, i + 1);
        let (value, escaped) = if v.get(i) == Some(&b'"') {
            let start = i + 1;
            let mut j = start;
            let mut escaped = false;
            loop {
                match v.get(j) {
                    None => return Err(unclear()),
                    Some(b'"') => break,
                    Some(b'\\') => {
                        escaped = true;
                        j += 2;
                    }
                    Some(_) => j += 1,
                }
            }
            i = j + 1;
            (&v[start..j], escaped)
        } else {
            let end = i + v[i..].iter().take_while(|b| is_tchar(**b)).count();
            let value = &v[i..end];
            i = end;
            (value, false)
        };
        if seen.iter().any(|k| k.eq_ignore_ascii_case(key)) {
            return Err(bad("a Content-Disposition parameter is given twice"));
        }
        seen.push(key);
        if key.eq_ignore_ascii_case(b"name") {
            if escaped || value.is_empty() {
                return Err(unclear());
            }
            name = Some(value);
        } else if key.eq_ignore_ascii_case(b"name*") {
            return Err(unclear());
        } else if key.eq_ignore_ascii_case(b"filename") || key.eq_ignore_ascii_case(b"filename*") {
            filename = true;
        }
    }
    let name = name.ok_or_else(|| bad("a part has no form-data name"))?;
    Ok(Disposition { name, filename })
}

/// Whether a part carries a file: a `filename` parameter (`filename*` too), or the name of
/// an image edit's input (`image`, `image[]`, `mask`; a client need not name the file).
fn is_media_part(d: &Disposition<'_>) -> bool {
    d.filename || matches!(d.name, b"image" | b"image[]" | b"mask")
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

    /// A form with a part headed `head` (and a model part first).
    fn headed(head: &str) -> Vec<u8> {
        let mut b = form(&[("model", None, b"m")]);
        b.truncate(b.len() - b"--XyZ--\r\n".len());
        b.extend_from_slice(format!("--XyZ\r\n{head}\r\n\r\n10\r\n--XyZ--\r\n").as_bytes());
        b
    }

    /// What the gateway reads of a form, the upstream must read too: a part whose head a
    /// parser could read another way (a second `name`, a `name*`, two dispositions, a
    /// folded or nameless line, an unclosed quote) is 400, as is a Content-Type with two
    /// boundaries (a black-box audit smuggled `n=10` and another model past the bound).
    #[test]
    fn a_part_head_or_boundary_that_reads_two_ways_is_refused() {
        let refused = [
            r#"Content-Disposition: form-data; name="x"; name="n""#,
            r#"Content-Disposition: form-data; name="x"; NAME="n""#,
            r#"Content-Disposition: form-data; name*=UTF-8''n"#,
            r#"Content-Disposition: form-data; name="x"; name*=UTF-8''n"#,
            "Content-Disposition: form-data; name=\"x\"\r\nContent-Disposition: form-data; name=\"n\"",
            "Content-Disposition: form-data; name=\"x\";\r\n name=\"n\"",
            "Content-Disposition: form-data; name=\"x\";\r\n\tname=\"n\"",
            "Content-Disposition: form-data; name=\"x\"\r\nname=\"n\"",
            r#"Content-Disposition: form-data; name="n\"x""#,
            r#"Content-Disposition: form-data; name="n"#,
            r#"Content-Disposition: form-data; name="x" name="n""#,
            r#"Content-Disposition: attachment; name="n""#,
            r#"Content-Disposition: form-data; filename="a.wav"; filename="b.wav"; name="f""#,
            r#"Content-Disposition: form-data"#,
        ];
        for head in refused {
            let r = parse(&headed(head), b"XyZ");
            assert!(
                matches!(r, Err(GateError::InvalidRequest(_))),
                "{head:?}: {r:?}"
            );
        }
        // The plain forms still read, unquoted tokens and escaped filenames included.
        for (head, n) in [
            (r#"Content-Disposition: form-data; name="n""#, Some("10")),
            ("Content-Disposition: form-data; name=n", Some("10")),
            ("content-disposition:form-data;name=\"n\" ; ", Some("10")),
            (
                r#"Content-Disposition: form-data; name="x"; filename="a\"; name=\"n""#,
                None,
            ),
            (
                r#"Content-Disposition: form-data; name="x"; filename*=UTF-8''a.png"#,
                None,
            ),
        ] {
            let f = parse(&headed(head), b"XyZ").unwrap_or_else(|e| panic!("{head:?}: {e:?}"));
            assert_eq!(f.n.as_deref(), n, "{head:?}");
        }
        for ct in [
            &b"multipart/form-data; boundary=XyZ; boundary=Other"[..],
            b"multipart/form-data; boundary=XyZ; BOUNDARY=\"Other\"",
        ] {
            assert!(
                boundary(Some(ct)).is_err(),
                "{:?}",
                String::from_utf8_lossy(ct)
            );
        }
        assert_eq!(
            boundary(Some(b"multipart/form-data; boundary=\"XyZ\"")).unwrap(),
            b"XyZ"
        );
    }

    /// Where, fed byte by byte, a large form's opening may end: not before its `model` is
    /// read, not inside a field the gateway reads, not before a file shows its head.
    #[test]
    fn the_opening_is_complete_after_the_model_and_the_head_of_a_file() {
        let complete_at = |body: &[u8]| {
            let mut scan = FormScanner::new(b"XyZ");
            (1..=body.len()).find(|&i| {
                scan.feed(&body[i - 1..i]).unwrap();
                scan.opening_complete()
            })
        };
        let mp3 = [0xFFu8; 40];
        let body = form(&[
            ("model", None, b"whisper-1"),
            ("n", None, b"2"),
            ("file", Some("a.mp3"), &mp3),
        ]);
        let file_at = body.windows(2).position(|w| w == [0xFF, 0xFF]).unwrap();
        assert_eq!(complete_at(&body), Some(file_at + 12), "12 bytes: no WAV");
        // Any other part after the model is no field the gateway reads: it may end there.
        let body = form(&[("model", None, b"whisper-1"), ("prompt", None, b"hello")]);
        let prompt_at = body.windows(5).position(|w| w == b"hello").unwrap();
        assert_eq!(complete_at(&body), Some(prompt_at));
        // A file before the model: held up to the model, and past its value.
        let body = form(&[("file", Some("a.mp3"), &mp3), ("model", None, b"m")]);
        let model_end = body.windows(3).position(|w| w == b"m\r\n").unwrap() + 1;
        assert!(complete_at(&body).is_some_and(|i| i > model_end));
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

    /// `body` fed in pieces cut at `cuts`: the same form, or an error, as read whole.
    fn in_pieces(body: &[u8], cuts: &[usize]) -> Result<Form, String> {
        let mut scan = FormScanner::new(b"XyZ");
        let mut prev = 0;
        for &c in cuts.iter().chain([&body.len()]) {
            let c = c.clamp(prev, body.len());
            scan.feed(&body[prev..c]).map_err(|e| e.to_string())?;
            prev = c;
        }
        scan.finish().map_err(|e| e.to_string())?;
        Ok(scan.form().clone())
    }

    proptest::proptest! {
        #[test]
        fn a_form_in_pieces_reads_as_the_whole(
            which in 0usize..8,
            mut cuts in proptest::collection::vec(0usize..3000, 0..10),
        ) {
            let mut mp3 = vec![0xFF, 0xFB, 0x90, 0x00];
            mp3.resize(417, 0x55);
            let mp3 = mp3.repeat(5);
            let audio: Vec<u8> = b"\r\n--XyZ".iter().copied().cycle().take(700).collect();
            let good = form(&[
                ("model", None, b"whisper-1"),
                ("n", None, b"2"),
                ("file", Some("a.mp3"), &mp3),
                ("response_format", None, b"text"),
            ]);
            let bodies: Vec<Vec<u8>> = vec![
                good.clone(),
                [b"preamble\r\n".as_slice(), &good].concat(),
                good[..good.len() - 9].to_vec(),
                form(&[("file", Some("a"), &audio), ("model", None, b"m")]),
                form(&[("model", None, b"m"), ("model", None, b"m")]),
                form(&[("file", Some("a"), &audio)]),
                b"--XyZ\r\nContent-Type: x\r\n\r\nv\r\n--XyZ--".to_vec(),
                b"--XyZ--".to_vec(),
            ];
            let body = &bodies[which];
            cuts.sort_unstable();
            let whole = parse(body, b"XyZ").map_err(|e| e.to_string());
            proptest::prop_assert_eq!(in_pieces(body, &cuts), whole);
        }
    }

    proptest::proptest! {
        /// Pieces longer than the bytes joined with what the last one left (a file that
        /// opens the delimiter again and again, cut anywhere): the same form as the whole.
        #[test]
        fn a_large_form_in_pieces_reads_as_the_whole(
            mut cuts in proptest::collection::vec(0usize..40_000, 0..8),
            truncate in proptest::bool::ANY,
        ) {
            let delim = b"\r\n--XyZ";
            let mut file = Vec::new();
            for i in 0..3000 {
                file.extend_from_slice(&delim[..1 + i % (delim.len() - 1)]);
                file.push(0);
            }
            let mut body = form(&[
                ("model", None, b"whisper-1"),
                ("file", Some("a.mp3"), &file),
                ("response_format", None, b"text"),
            ]);
            if truncate {
                body.truncate(body.len() - 9);
            }
            cuts.sort_unstable();
            let whole = parse(&body, b"XyZ").map_err(|e| e.to_string());
            proptest::prop_assert_eq!(in_pieces(&body, &cuts), whole);
        }
    }

    #[test]
    fn an_opening_that_ends_inside_a_read_field_is_not_between_fields() {
        let body = form(&[
            ("model", None, b"whisper-1"),
            ("n", None, b"22"),
            ("file", Some("a.mp3"), &[7u8; 100]),
        ]);
        let n_value = body.windows(6).position(|w| w == b"\r\n\r\n22").unwrap() + 5;
        let file_value = body.windows(10).position(|w| w == b"audio/mpeg").unwrap() + 20;
        for (cut, between) in [(n_value, false), (n_value - 20, false), (file_value, true)] {
            let mut scan = FormScanner::new(b"XyZ");
            scan.feed(&body[..cut]).unwrap();
            assert_eq!(scan.between_fields(), between, "cut at {cut}");
            assert!(scan.has_model());
        }
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
