//! Bodies: reading the client's request body whole (with its limit), and writing the
//! gateway's own JSON answers.

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER};
use http::HeaderValue;
use pingora_error::Result;
use pingora_http::ResponseHeader;
use pingora_proxy::Session;

use crate::error::GateError;
use crate::limits::Standing;
use crate::providers::multipart::{FormScanner, SPLICE_HEADROOM};
use crate::telemetry::context::TRACEPARENT;

use super::headers::{add_standing_headers, number_value, BodyFraming, ERROR_CODE};

/// Writes a complete JSON response (local answers and gateway errors).
pub(super) async fn send_json(
    session: &mut Session,
    status: u16,
    body: Vec<u8>,
    standing: Option<&Standing>,
    error: Option<&GateError>,
    traceparent: Option<&HeaderValue>,
) -> Result<()> {
    // Built as plain parts: no case map to keep beside the headers (see `edit_headers`).
    let (mut head, ()) = http::Response::new(()).into_parts();
    head.status = http::StatusCode::from_u16(status).map_err(|_| {
        pingora_error::Error::explain(pingora_error::ErrorType::InternalError, "status")
    })?;
    let h = &mut head.headers;
    h.reserve(8);
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CONTENT_LENGTH, number_value(body.len() as u64));
    // A refusal that no retry can turn (a key refused, over its budget, not allowed):
    // `x-should-retry: false` tells the OpenAI and Anthropic SDKs, and Claude Code, which
    // retries a 401 seven times otherwise, to stop at once.
    if matches!(status, 401..=403) {
        h.insert(SHOULD_RETRY.clone(), HeaderValue::from_static("false"));
    }
    if let Some(e) = error {
        h.insert(ERROR_CODE.name.clone(), HeaderValue::from_static(e.code()));
        if let GateError::MethodNotAllowed { allow } = e {
            h.insert(http::header::ALLOW, HeaderValue::from_static(allow));
        }
        if let Some(secs) = e.retry_after() {
            h.insert(RETRY_AFTER, number_value(secs));
        }
    }
    if let Some(s) = standing {
        add_standing_headers(h, s);
    }
    if let Some(tp) = traceparent {
        h.insert(TRACEPARENT.clone(), tp.clone());
    }
    let resp = ResponseHeader::from(head);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// The SDKs' retry hint (`x-should-retry`), sent on refusals a retry cannot turn.
static SHOULD_RETRY: http::HeaderName = http::HeaderName::from_static("x-should-retry");

thread_local! {
    /// The buffer of the last large request body read on this thread, handed to the next
    /// one: an upload reuses memory already faulted in, instead of a fresh block while the
    /// allocator still keeps the last one resident (mimalloc does not give a just-freed 10 MB
    /// block to the next allocation at once: 2.6 bodies at the peak, not 1).
    static SPARE_BODY: std::cell::RefCell<Option<BytesMut>> = const { std::cell::RefCell::new(None) };
}

/// Bodies from this size up are read into a reused buffer.
const SPARE_MIN: usize = 1 << 20;
/// A buffer larger than this is not kept for the next body.
const SPARE_MAX: usize = 64 << 20;

/// An empty buffer of at least `cap` bytes: this thread's spare when it is large enough.
fn body_buffer(cap: usize) -> BytesMut {
    if cap >= SPARE_MIN {
        if let Some(mut spare) = SPARE_BODY.with(|s| s.borrow_mut().take()) {
            if spare.capacity() >= cap {
                spare.clear();
                return spare;
            }
        }
    }
    BytesMut::with_capacity(cap)
}

/// A finished request's body: its buffer becomes this thread's spare if nothing else holds
/// it (`try_into_mut` fails while any clone is alive, so no bytes in use are ever reused).
pub(super) fn recycle_body(body: Bytes) {
    if body.len() < SPARE_MIN {
        return;
    }
    if let Ok(mut buf) = body.try_into_mut() {
        if buf.capacity() <= SPARE_MAX {
            buf.clear();
            SPARE_BODY.with(|s| *s.borrow_mut() = Some(buf));
        }
    }
}

/// A client that waits for `100 Continue` (curl does above 1 MiB) would otherwise stall
/// until its own timeout before sending the body.
async fn continue_if_expected(session: &mut Session, framing: BodyFraming) -> Result<()> {
    if framing.expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }
    Ok(())
}

/// The client's next body piece. Broken chunked framing (a chunk size that is not hex, an
/// oversized chunk extension) is the client's error and answered: 400 `invalid_request`.
/// Any other failure is the client hanging up mid-body: marked so, the request is traced
/// `client_closed`, not as an upstream error; nothing was sent upstream yet.
async fn read_client_body(
    session: &mut Session,
) -> Result<std::result::Result<Option<Bytes>, GateError>> {
    match session.read_request_body().await {
        Ok(piece) => Ok(Ok(piece)),
        // Pingora's `v1::body::INVALID_CHUNK`, by name (its module path is not public).
        Err(e) if e.etype().as_str() == "InvalidChunk" => Ok(Err(GateError::InvalidRequest(
            "the request body's chunked framing is malformed".into(),
        ))),
        Err(e) => Err(e.into_down()),
    }
}

/// The opening of a large form read before its decision ([`super::upload`]).
pub(super) struct FormOpening {
    /// The bytes read (the piece Pingora read itself, when the opening is one piece).
    pub(super) bytes: Bytes,
    /// They are the whole body: it is held and decided as a small form is.
    pub(super) whole: bool,
    /// Pingora kept the opening whole for a retry: it hands it to `request_body_filter`
    /// again ahead of the rest at each attempt, so the opening goes upstream as a piece of
    /// its own rather than copied in front of the next one.
    pub(super) replayed: bool,
}

/// Reads the opening of a form, scanning it as it arrives, until its `model` part has
/// arrived, it does not end inside a part's head or a field the gateway reads, and a file
/// under way has shown its head ([`FormScanner::opening_complete`]), and `at_least` bytes
/// have arrived, else to its end; to its end too when `hold_whole` says so of its
/// `model` (a model that may fall back). 400 as soon as the scan finds it malformed.
///
/// The opening is kept as short as that: it is held until the first piece after it went,
/// and Pingora's retry buffer (64 KiB) copies what it reads. An opening within that buffer
/// is replayed by Pingora at each attempt, so it needs no buffer of its own with room for
/// the next piece (the one allocation over 64 KiB the bare proxy never makes).
pub(super) async fn read_form_opening(
    session: &mut Session,
    framing: BodyFraming,
    scanner: &mut FormScanner,
    at_least: usize,
    hold_whole: impl Fn(&str) -> bool,
) -> Result<std::result::Result<FormOpening, GateError>> {
    continue_if_expected(session, framing).await?;
    session.enable_retry_buffering();
    let mut read = Gathered::default();
    let mut whole = true;
    let mut holding = false;
    loop {
        let chunk = match read_client_body(session).await? {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        };
        if let Err(e) = scanner.feed(&chunk) {
            return Ok(Err(e));
        }
        read.push(chunk, BytesMut::with_capacity);
        if !holding && read.len() >= at_least && scanner.opening_complete() {
            // A form for a model that may fall back is read whole (`hold_whole`), so it
            // can be sent again to the next model.
            holding = hold_whole(&scanner.form().model);
            if !holding {
                whole = session.is_body_done();
                break;
            }
        }
    }
    let bytes = read.into_bytes();
    // The retry buffer holds exactly what was read here unless it overflowed.
    let replayed = !whole && !bytes.is_empty() && !session.retry_buffer_truncated();
    Ok(Ok(FormOpening {
        bytes,
        whole,
        replayed,
    }))
}

/// Reads the whole request body, enforcing `max_body_bytes` before and while reading.
/// A body that arrives in one piece is kept without a copy. `framing` is the request's
/// ([`BodyFraming::of`] its headers).
pub(super) async fn read_body(
    session: &mut Session,
    framing: BodyFraming,
    max: u64,
) -> Result<std::result::Result<Bytes, GateError>> {
    let declared = framing.declared;
    if declared.is_some_and(|n| n > max) {
        return Ok(Err(GateError::RequestTooLarge(max)));
    }
    continue_if_expected(session, framing).await?;
    let mut read = Gathered::default();
    loop {
        let chunk = match read_client_body(session).await? {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(e) => return Ok(Err(e)),
        };
        if (read.len() + chunk.len()) as u64 > max {
            return Ok(Err(GateError::RequestTooLarge(max)));
        }
        // Headroom: a form's `model` can be replaced by a longer upstream id in place.
        read.push(chunk, |total| {
            body_buffer(declared.unwrap_or(0).max(total as u64) as usize + SPLICE_HEADROOM)
        });
        // Its framing says the body is whole: one more read would only say so, and Pingora
        // wraps every body read in its read timeout.
        if session.is_body_done() {
            break;
        }
    }
    Ok(Ok(read.into_bytes()))
}

/// A body read piece by piece: a body that comes in one piece is kept as Pingora read it;
/// at the second piece both go into one buffer (`room`, given the bytes read so far), which
/// takes the rest.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    joined: Option<BytesMut>,
    len: usize,
}

impl Gathered {
    fn push(&mut self, chunk: Bytes, room: impl FnOnce(usize) -> BytesMut) {
        self.len += chunk.len();
        match (&mut self.joined, self.first.take()) {
            (Some(b), _) => b.extend_from_slice(&chunk),
            (None, None) => self.first = Some(chunk),
            (None, Some(prev)) => {
                let mut b = room(self.len);
                b.extend_from_slice(&prev);
                b.extend_from_slice(&chunk);
                self.joined = Some(b);
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn into_bytes(self) -> Bytes {
        match (self.joined, self.first) {
            (Some(b), _) => b.freeze(),
            (None, Some(f)) => f,
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_body_no_one_holds_is_the_next_ones_buffer() {
        let mut b = body_buffer(2 << 20);
        b.resize(2 << 20, 7);
        let body = b.freeze();
        let at = body.as_ptr();
        recycle_body(body);
        let next = body_buffer(1 << 20);
        assert_eq!((next.as_ptr(), next.len()), (at, 0), "reused, emptied");
        // A body still held elsewhere is never reused.
        let mut b = next;
        b.resize(2 << 20, 7);
        let body = b.freeze();
        let held = body.clone();
        recycle_body(body);
        assert_ne!(body_buffer(1 << 20).as_ptr(), held.as_ptr());
        assert!(held.iter().all(|&x| x == 7));
        // Small bodies are left to the allocator.
        recycle_body(Bytes::from(vec![1u8; 1000]));
        assert!(SPARE_BODY.with(|s| s.borrow().is_none()));
    }
}
