//! HTTP/1.1 framing: connections, request heads and bodies (Content-Length or chunked),
//! keep-alive, and the response head. Routes and bodies are `reply`'s business.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::json::push_openai_error;
use crate::knobs::{apply_knob, Knobs};
use crate::numbers::{parse_chunk_size, parse_decimal, trim};
use crate::reply::Reply;
use crate::wire::{push_head, Head, HeadFlags, Io, Method};
use crate::{RecordedRequest, Shared};

/// Largest request body accepted (either framing); larger gets 413 and the connection closes.
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Largest request head (request line plus headers); larger gets 431.
const MAX_HEAD_BYTES: usize = 64 << 10;
const MAX_HEADERS: usize = 96;
/// Longest chunk-size or trailer line in a chunked request body.
const MAX_LINE_BYTES: usize = 4096;
const MAX_TRAILERS: usize = 64;
/// Read buffers above this are shrunk back after the request that grew them.
const KEEP_BUF_BYTES: usize = 1 << 20;
const READ_RESERVE: usize = 16 << 10;

/// `tcp_fd`: the connection's socket when it is plain TCP, whose count of data segments
/// received tells how many carried each recorded request.
pub(crate) async fn serve_connection<S: Io>(
    mut stream: S,
    shared: Arc<Shared>,
    id: u64,
    tcp_fd: Option<std::os::fd::RawFd>,
) {
    let mut conn = Conn {
        id,
        tcp_fd,
        segments_seen: Some(0),
        served: 0,
        buf: Vec::with_capacity(READ_RESERVE),
        body: Vec::new(),
        out: Vec::with_capacity(1024),
        json: Vec::with_capacity(1024),
        path: String::new(),
    };
    while conn.serve_one(&mut stream, &shared).await {}
}

/// Per-connection state; every buffer is reused across the requests of the connection.
struct Conn {
    id: u64,
    tcp_fd: Option<std::os::fd::RawFd>,
    /// The data segments counted when the last request was read; `None` when that request
    /// was not recorded (and so not counted).
    segments_seen: Option<u64>,
    served: u64,
    /// Raw bytes read from the socket and not yet consumed.
    buf: Vec<u8>,
    /// A de-chunked request body.
    body: Vec<u8>,
    /// The bytes of the next socket write.
    out: Vec<u8>,
    /// A JSON document being built.
    json: Vec<u8>,
    path: String,
}

/// Why a request ended the connection early.
enum Abort {
    /// The peer went away (EOF or I/O error): just close.
    Closed,
    /// Reply with this status and an error body, then close.
    Reject(u16),
}

enum BodyAt {
    /// `buf[start..end]`; the request ends at `end`.
    InBuf { start: usize, end: usize },
    /// De-chunked into `Conn::body`; the request ends at `buf[consumed]`.
    Decoded { consumed: usize },
}

impl Conn {
    /// Serve one request; `true` when the connection stays open for the next.
    async fn serve_one(&mut self, stream: &mut dyn Io, shared: &Shared) -> bool {
        let head = match self.read_head(stream, shared).await {
            Ok(Some(head)) => head,
            Ok(None) | Err(Abort::Closed) => return false,
            Err(Abort::Reject(status)) => {
                reject(stream, &mut self.out, status).await;
                return false;
            }
        };
        let body_at = match self.read_body(stream, &head).await {
            Ok(at) => at,
            Err(Abort::Closed) => return false,
            Err(Abort::Reject(status)) => {
                reject(stream, &mut self.out, status).await;
                return false;
            }
        };
        // Counted when the request is whole, only while recording (a system call): what
        // came since the previous request carried this one (nothing else arrives between).
        let data_segments = match (self.tcp_fd, head.recorded.is_some()) {
            (Some(fd), true) => {
                let now = crate::wire::data_segments_in(fd);
                let carried = self
                    .segments_seen
                    .zip(now)
                    .map(|(was, now)| now - was.min(now));
                self.segments_seen = now;
                carried
            }
            _ => {
                self.segments_seen = None;
                None
            }
        };
        let (body, consumed): (&[u8], usize) = match body_at {
            BodyAt::InBuf { start, end } => (&self.buf[start..end], end),
            BodyAt::Decoded { consumed } => (&self.body, consumed),
        };
        if let Some((method, headers)) = &head.recorded {
            shared.record(RecordedRequest {
                method: method.clone(),
                path: self.path.clone(),
                headers: headers.clone(),
                body: body.to_vec(),
                data_segments,
            });
        }
        if head.knobs.drop {
            if head.knobs.delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(head.knobs.delay_ms)).await;
            }
            return false;
        }
        self.served += 1;
        let mut reply = Reply {
            stream,
            out: &mut self.out,
            json: &mut self.json,
            shared,
            close: !head.keep_alive,
            conn_id: self.id,
            request_no: self.served,
        };
        let kept = reply.respond(&head, &self.path, body).await.is_ok() && head.keep_alive;
        if consumed >= self.buf.len() {
            self.buf.clear();
        } else {
            self.buf.drain(..consumed);
        }
        if self.buf.capacity() > KEEP_BUF_BYTES && self.buf.len() < READ_RESERVE {
            self.buf.shrink_to(READ_RESERVE);
        }
        if self.body.capacity() > KEEP_BUF_BYTES {
            self.body = Vec::new();
        }
        if !kept {
            let _ = stream.shutdown().await;
        }
        kept
    }

    /// `Ok(None)`: the peer closed the connection between requests.
    /// Reads one request head. Recording and key rejection are read as each parse is
    /// tried, so a switch made while the connection idled applies to its next request.
    async fn read_head(
        &mut self,
        stream: &mut dyn Io,
        shared: &Shared,
    ) -> Result<Option<Head>, Abort> {
        loop {
            if !self.buf.is_empty() {
                let (record, want_key) = (shared.recording(), shared.rejecting());
                if let Some(head) = parse_head(&self.buf, &mut self.path, record, want_key)? {
                    return Ok(Some(head));
                }
                if self.buf.len() > MAX_HEAD_BYTES {
                    return Err(Abort::Reject(431));
                }
            }
            reserve_for_read(&mut self.buf);
            match stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return Ok(None),
                Ok(_) => {}
            }
        }
    }

    async fn read_body(&mut self, stream: &mut dyn Io, head: &Head) -> Result<BodyAt, Abort> {
        if head.chunked {
            if head.expect_continue && self.buf.len() == head.head_len {
                send_continue(stream).await?;
            }
            self.body.clear();
            let consumed =
                read_chunked(stream, &mut self.buf, head.head_len, &mut self.body).await?;
            return Ok(BodyAt::Decoded { consumed });
        }
        let start = head.head_len;
        let end = start + head.content_length.unwrap_or(0);
        if self.buf.len() < end {
            if head.expect_continue {
                send_continue(stream).await?;
            }
            self.buf.reserve(end - self.buf.len());
            while self.buf.len() < end {
                fill(stream, &mut self.buf).await?;
            }
        }
        Ok(BodyAt::InBuf { start, end })
    }
}

async fn send_continue(stream: &mut dyn Io) -> Result<(), Abort> {
    stream
        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        .await
        .map_err(|_| Abort::Closed)
}

fn reserve_for_read(buf: &mut Vec<u8>) {
    if buf.capacity() - buf.len() < READ_RESERVE / 4 {
        buf.reserve(READ_RESERVE);
    }
}

/// Read at least one more byte into `buf`; EOF and errors become `Abort::Closed`.
async fn fill(stream: &mut dyn Io, buf: &mut Vec<u8>) -> Result<(), Abort> {
    reserve_for_read(buf);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Abort::Closed),
        Ok(_) => Ok(()),
    }
}

/// Parse a request head from the start of `buf`. `Ok(None)`: incomplete so far.
fn parse_head(
    buf: &[u8],
    path: &mut String,
    record: bool,
    want_key: bool,
) -> Result<Option<Head>, Abort> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Abort::Reject(431)),
        Err(_) => return Err(Abort::Reject(400)),
    };
    let method_str = req.method.unwrap_or("");
    let method = match method_str {
        "GET" => Method::Get,
        "POST" => Method::Post,
        _ => Method::Other,
    };
    path.clear();
    path.push_str(req.path.unwrap_or("/"));
    let mut head = Head {
        method,
        head_len,
        content_length: None,
        chunked: false,
        expect_continue: false,
        keep_alive: req.version == Some(1),
        knobs: Knobs::default(),
        has_credentials: false,
        provider_key: None,
        recorded: None,
    };
    let mut bearer: Option<&[u8]> = None;
    let mut saw_transfer_encoding = false;
    for header in req.headers.iter() {
        let name = header.name;
        let value = trim(header.value);
        if name.eq_ignore_ascii_case("content-length") {
            let len = parse_decimal(value).ok_or(Abort::Reject(400))?;
            if head.content_length.is_some_and(|prev| prev != len) {
                return Err(Abort::Reject(400));
            }
            if len > MAX_BODY_BYTES {
                return Err(Abort::Reject(413));
            }
            head.content_length = Some(len);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Only plain `chunked` is understood; anything else cannot be framed safely.
            if saw_transfer_encoding || !value.eq_ignore_ascii_case(b"chunked") {
                return Err(Abort::Reject(400));
            }
            saw_transfer_encoding = true;
            head.chunked = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(|&b| b == b',') {
                let token = trim(token);
                if token.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                    break;
                }
                if token.eq_ignore_ascii_case(b"keep-alive") {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("x-api-key") {
            head.has_credentials = true;
            if want_key {
                head.provider_key = Some(String::from_utf8_lossy(value).into_owned());
            }
        } else if name.eq_ignore_ascii_case("authorization") {
            bearer = value
                .strip_prefix(b"Bearer ")
                .or_else(|| value.strip_prefix(b"bearer "))
                .map(trim)
                .filter(|token| !token.is_empty());
            head.has_credentials |= bearer.is_some();
        } else if name.eq_ignore_ascii_case("expect") {
            head.expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        } else if name.len() > 7 && name.as_bytes()[..7].eq_ignore_ascii_case(b"x-mock-") {
            apply_knob(&mut head.knobs, &name[7..], value);
        }
    }
    if head.chunked && head.content_length.is_some() {
        // Both framings at once is the classic request-smuggling shape.
        return Err(Abort::Reject(400));
    }
    if want_key && head.provider_key.is_none() {
        head.provider_key = bearer.map(|b| String::from_utf8_lossy(b).into_owned());
    }
    if record {
        let headers = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        head.recorded = Some((method_str.to_owned(), headers));
    }
    Ok(Some(head))
}

/// Decode a chunked body that starts at `buf[pos]` into `body`, reading as needed. Consumed
/// bytes are dropped from `buf` on the way, so a large body is never held twice; returns
/// where the request ends in `buf`.
async fn read_chunked(
    stream: &mut dyn Io,
    buf: &mut Vec<u8>,
    mut pos: usize,
    body: &mut Vec<u8>,
) -> Result<usize, Abort> {
    loop {
        let line_end = find_line(stream, buf, &mut pos).await?;
        let size = parse_chunk_size(&buf[pos..line_end]).ok_or(Abort::Reject(400))?;
        pos = line_end + 2;
        if size == 0 {
            for _ in 0..=MAX_TRAILERS {
                let line_end = find_line(stream, buf, &mut pos).await?;
                let empty = line_end == pos;
                pos = line_end + 2;
                if empty {
                    return Ok(pos);
                }
            }
            return Err(Abort::Reject(400));
        }
        if body.len().saturating_add(size) > MAX_BODY_BYTES {
            return Err(Abort::Reject(413));
        }
        body.reserve(size);
        let mut remaining = size;
        loop {
            let take = (buf.len() - pos).min(remaining);
            body.extend_from_slice(&buf[pos..pos + take]);
            pos += take;
            remaining -= take;
            if remaining == 0 {
                break;
            }
            buf.clear();
            pos = 0;
            fill(stream, buf).await?;
        }
        while buf.len() < pos + 2 {
            compact(buf, &mut pos);
            fill(stream, buf).await?;
        }
        if &buf[pos..pos + 2] != b"\r\n" {
            return Err(Abort::Reject(400));
        }
        pos += 2;
    }
}

/// Index in `buf` of the CR of the next CRLF at or after `*pos` (which compaction may move).
async fn find_line(
    stream: &mut dyn Io,
    buf: &mut Vec<u8>,
    pos: &mut usize,
) -> Result<usize, Abort> {
    loop {
        if let Some(i) = memchr::memmem::find(&buf[*pos..], b"\r\n") {
            return Ok(*pos + i);
        }
        if buf.len() - *pos > MAX_LINE_BYTES {
            return Err(Abort::Reject(400));
        }
        compact(buf, pos);
        fill(stream, buf).await?;
    }
}

fn compact(buf: &mut Vec<u8>, pos: &mut usize) {
    if *pos > 0 {
        buf.drain(..*pos);
        *pos = 0;
    }
}

/// Answer a request that cannot be framed or is too large, then let the caller close.
async fn reject(stream: &mut dyn Io, out: &mut Vec<u8>, status: u16) {
    let (message, code) = match status {
        413 => ("request body too large", "request_too_large"),
        431 => ("request head too large", "invalid_request"),
        _ => ("malformed HTTP request", "invalid_request"),
    };
    let mut json = Vec::with_capacity(160);
    push_openai_error(&mut json, message, "invalid_request_error", code);
    out.clear();
    let flags = HeadFlags {
        close: true,
        ..HeadFlags::default()
    };
    push_head(out, status, b"application/json", Some(json.len()), flags);
    out.extend_from_slice(&json);
    let _ = stream.write_all(out).await;
    let _ = stream.shutdown().await;
}
