//! Header work, built once: the gateway's own headers, what never goes upstream, and what
//! never comes back from it.

use std::sync::LazyLock;

use bytes::Bytes;
use http::header::{ACCEPT_ENCODING, AUTHORIZATION, CONTENT_LENGTH, HOST};
use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_error::Result;
use pingora_http::{RequestHeader, ResponseHeader};

use crate::keys::token::{TOKEN_LEN, TOKEN_PREFIX};
use crate::limits::Standing;
use crate::providers::ProviderKind;
use crate::snapshot::ProviderHeaders;
use crate::telemetry::context::TRACEPARENT;

/// `X-SpiderGate-Error-Code` of an upstream's own error response passed through.
pub(super) const UPSTREAM_STATUS: &str = "upstream_status";

/// A request header's value. The name is a `HeaderName` (a `&str` would be parsed again on
/// every lookup).
pub(super) fn header_bytes<'a>(req: &'a RequestHeader, name: &HeaderName) -> Option<&'a [u8]> {
    req.headers.get(name).map(|v| v.as_bytes())
}

/// Client headers that never go upstream: credentials of any kind (the provider's own key
/// replaces the agent's token) and framing the gateway handles itself (the body is already
/// read, so an upstream `100 Continue` would only reach the client a second time).
/// A response header the gateway writes: its name, and the start of its line as
/// [`HeadLines`] writes it (`name: `), so a line costs one copy for both.
pub(super) struct OwnHeader {
    pub(super) name: HeaderName,
    line: &'static [u8],
}

/// An [`OwnHeader`] from its (lower-case) name.
macro_rules! own_header {
    ($name:literal) => {
        OwnHeader {
            name: HeaderName::from_static($name),
            line: concat!($name, ": ").as_bytes(),
        }
    };
}

pub(super) static STRIPPED_HEADERS: [HeaderName; 8] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
    http::header::TRANSFER_ENCODING,
    http::header::EXPECT,
];
pub(super) static ERROR_CODE: OwnHeader = own_header!("x-spidergate-error-code");

/// Whether a client header is one of [`STRIPPED_HEADERS`]. A match on the name's text:
/// comparing each client header with each of the eight `HeaderName`s cost ~1k instructions
/// a request (`benches/instr.py`).
fn is_stripped(name: &str) -> bool {
    matches!(
        name,
        "x-api-key"
            | "api-key"
            | "openai-organization"
            | "openai-project"
            | "proxy-authorization"
            | "cookie"
            | "transfer-encoding"
            | "expect"
    )
}

/// What one pass over the client's header names found, so the rewrite removes or looks up
/// only what is there (each `remove` or `contains_key` hashes the name again).
#[derive(Debug, Default, PartialEq, Eq)]
struct ClientHeaders {
    stripped: bool,
    anthropic_version: bool,
    anthropic_beta: bool,
    /// A header other than the credentials above carries an agent token.
    token_elsewhere: bool,
}

impl ClientHeaders {
    fn scan(h: &HeaderMap) -> Self {
        let mut found = ClientHeaders::default();
        for (name, value) in h {
            match name.as_str() {
                "anthropic-version" => found.anthropic_version = true,
                "anthropic-beta" => found.anthropic_beta = true,
                // Replaced or removed by the rewrite whatever it holds.
                "authorization" => continue,
                other if is_stripped(other) => {
                    found.stripped = true;
                    continue;
                }
                _ => {}
            }
            found.token_elsewhere |= holds_token(value);
        }
        found
    }
}

/// A header value holding an agent token (`spideriq_pat_…`), whatever the header's name:
/// an agent that sends its key in a header of its own (`x-goog-api-key`, a custom one) must
/// not have it forwarded (SPEC §2: the upstream never sees the agent's token). Only values
/// long enough to hold one are searched.
fn holds_token(value: &HeaderValue) -> bool {
    static FINDER: LazyLock<memchr::memmem::Finder<'static>> =
        LazyLock::new(|| memchr::memmem::Finder::new(TOKEN_PREFIX.as_bytes()));
    let v = value.as_bytes();
    v.len() >= TOKEN_LEN && FINDER.find(v).is_some()
}

/// The client headers the request path reads beside its credentials, found in one pass
/// over the head. Each `HeaderMap::get` hashes the name it looks for (~200 instructions, a
/// hit or a miss, counted by `benches/instr.py`), and these are usually absent. A name's
/// first value is the one kept, as `get` returns it.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct ClientHead<'a> {
    pub traceparent: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
    expect: Option<&'a HeaderValue>,
}

impl<'a> ClientHead<'a> {
    pub(super) fn scan(h: &'a HeaderMap) -> Self {
        let mut found = ClientHead::default();
        for (name, value) in h {
            // `HeaderName` equality: a standard name compares as a number, no hashing.
            let slot = if name == CONTENT_LENGTH {
                &mut found.content_length
            } else if name == http::header::EXPECT {
                &mut found.expect
            } else if *name == TRACEPARENT {
                &mut found.traceparent
            } else {
                continue;
            };
            slot.get_or_insert(value);
        }
        found
    }

    /// What the body read needs to know before it starts.
    pub(super) fn framing(&self) -> BodyFraming {
        BodyFraming {
            declared: self
                .content_length
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                .and_then(|v| v.trim().parse::<u64>().ok()),
            expects_continue: self
                .expect
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue")),
        }
    }
}

/// The request's `Content-Length`, if it has one, and whether the client waits for `100
/// Continue` before it sends the body.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct BodyFraming {
    pub declared: Option<u64>,
    pub expects_continue: bool,
}

impl BodyFraming {
    pub(super) fn of(h: &HeaderMap) -> Self {
        ClientHead::scan(h).framing()
    }
}

/// Whether an upstream response header reveals the operator's provider account or its
/// limits (SPEC §2): the gateway's own `X-RateLimit-*` are the only ones a client sees.
pub(super) fn is_account_header(name: &HeaderName) -> bool {
    is_account_name(name.as_str())
}

#[inline]
fn is_account_name(n: &str) -> bool {
    // Every such name starts with one of these letters; most headers are ruled out by it.
    if !matches!(n.as_bytes().first(), Some(b'x' | b'a' | b'o' | b's')) {
        return false;
    }
    n.starts_with("x-ratelimit-")
        // The gateway's own names: only the gateway speaks them to the agent (an upstream,
        // or a gateway chained behind this one, must not say a call failed or a budget ran
        // out).
        || n.starts_with("x-spidergate-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("openai-organization")
        || n.starts_with("openai-project")
        || n == "anthropic-organization-id"
        || n == "set-cookie"
        || n == "set-cookie2"
}

/// What the response path reads from the upstream's head, found in one pass over it (each
/// `HeaderMap::get` hashes the name it looks for).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct UpstreamHead {
    /// `Content-Type: text/event-stream`.
    pub sse: bool,
    /// `Content-Length: 0`.
    pub zero_length: bool,
    /// A `Content-Length`, of any value.
    pub content_length: bool,
    /// `Transfer-Encoding` ending in `chunked` (a provider's stream comes so).
    pub chunked: bool,
    /// An account header ([`is_account_header`]) is there to strip.
    pub account_headers: bool,
    /// `Retry-After`.
    pub retry_after: bool,
    /// A `Retry-After` that is not a whole number of seconds of at least 1 (`0`, `1.5`, an
    /// HTTP-date, text): on a 429 it is rewritten ([`retry_after_secs`]), since SPEC §2
    /// promises agents whole seconds, at least 1.
    pub retry_after_odd: bool,
    /// A name the gateway writes itself ([`is_gateway_name`]).
    pub gateway_names: bool,
    /// A `Content-Encoding` other than `identity`, though the gateway asked for it: the
    /// usage in such a body cannot be read as it passes.
    pub encoded: bool,
}

impl UpstreamHead {
    pub(super) fn scan(h: &HeaderMap) -> Self {
        let mut found = UpstreamHead::default();
        let (mut content_type, mut content_length) = (false, false);
        for (name, value) in h {
            // The first value of each, as `get` would give.
            if name == http::header::CONTENT_TYPE {
                if !std::mem::replace(&mut content_type, true) {
                    found.sse = value.as_bytes().starts_with(b"text/event-stream");
                }
            } else if name == CONTENT_LENGTH {
                if !std::mem::replace(&mut content_length, true) {
                    found.zero_length = value.as_bytes() == b"0";
                }
            } else if name == http::header::TRANSFER_ENCODING {
                found.chunked = value.as_bytes().ends_with(b"chunked");
            } else if name == http::header::RETRY_AFTER {
                found.retry_after = true;
                found.retry_after_odd |= !is_whole_secs(value.as_bytes());
            } else if name == http::header::CONTENT_ENCODING {
                found.encoded |= !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"identity");
            } else {
                // The name's text once (a standard name's is a lookup), both questions on it.
                let n = name.as_str();
                found.account_headers |= is_account_name(n);
                found.gateway_names |= is_gateway_name(n);
            }
        }
        found.content_length = content_length;
        found
    }
}

/// The longest `Retry-After` passed on: a day. A longer one is cut to it, however written.
const MAX_RETRY_AFTER_SECS: u64 = 86_400;

/// Whole seconds, at least 1 and at most [`MAX_RETRY_AFTER_SECS`], as SPEC §2 has
/// `Retry-After` (`1`, `30`; not `0`, `01`, `1.5`).
fn is_whole_secs(v: &[u8]) -> bool {
    // At most 5 digits (86,400 has 5), so the value cannot overflow while it is read.
    matches!(v.first(), Some(b'1'..=b'9'))
        && v.len() <= 5
        && v.iter().all(u8::is_ascii_digit)
        && v.iter().fold(0, |n, d| n * 10 + u64::from(d - b'0')) <= MAX_RETRY_AFTER_SECS
}

/// An upstream's odd `Retry-After` as whole seconds, at least 1, and at most a day: a
/// number is rounded up, an HTTP-date (RFC 9110) counted from `now_ms`, and anything
/// unreadable is 1 (retry soon, as the gateway answers a 429 that came without one).
fn retry_after_secs(v: &[u8], now_ms: i64) -> u64 {
    const MAX: f64 = MAX_RETRY_AFTER_SECS as f64;
    let Ok(text) = std::str::from_utf8(v).map(str::trim) else {
        return 1;
    };
    if let Ok(n) = text.parse::<f64>() {
        // `inf` (`1e400`) is a long wait, cut to the day; NaN says nothing.
        return if n.is_nan() {
            1
        } else {
            n.ceil().clamp(1.0, MAX) as u64
        };
    }
    match httpdate::parse_http_date(text) {
        Ok(at) => {
            let at_ms = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            (((at_ms - now_ms) as f64 / 1000.0).ceil()).clamp(1.0, MAX) as u64
        }
        Err(_) => 1,
    }
}

/// Whether the gateway writes a header of this name on the answers it passes on.
fn is_gateway_name(name: &str) -> bool {
    let n = name.as_bytes();
    // The first letter rules out most names without a comparison (one for every header).
    match n.first() {
        Some(b'x') => n.starts_with(b"x-spidergate-"),
        Some(b't') => n == TRACEPARENT.as_str().as_bytes(),
        _ => false,
    }
}

/// An interim head (`103 Early Hints`) passes undecorated, but without the upstream's
/// account headers and the gateway's names, as a final head would.
pub(super) fn strip_interim_head(resp: &mut ResponseHeader) -> Result<()> {
    if !UpstreamHead::scan(&resp.headers).account_headers {
        return Ok(());
    }
    edit_headers(resp, |h| {
        strip_account_headers(h);
        Ok(())
    })
}

/// Drops the upstream's account headers (one pass, once [`UpstreamHead`] saw one).
fn strip_account_headers(h: &mut HeaderMap) {
    let names: Vec<HeaderName> = h.keys().filter(|n| is_account_header(n)).cloned().collect();
    for n in &names {
        h.remove(n);
    }
}

/// Edits a response head's header map directly, outside Pingora's case map.
///
/// Pingora keeps a second map beside the headers with each name's original case, and every
/// insert through it parses the name again, allocates it and inserts into both maps (~1.8k
/// instructions a header, counted by `benches/instr.py`). The head the agent gets is
/// rewritten here as plain `http` parts instead: a static `HeaderName` clones for free and
/// goes into one map. The price is the case of names on the wire: standard names are still
/// title-cased by Pingora, every other name is sent lower-case (HTTP/1.1 names are
/// case-insensitive, HTTP/2 sends them lower-case anyway).
pub(super) fn edit_headers<T>(
    resp: &mut ResponseHeader,
    edit: impl FnOnce(&mut HeaderMap) -> Result<T>,
) -> Result<T> {
    // The reason phrase lives beside the parts; only a non-standard one needs keeping.
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let empty = ResponseHeader::from(http::Response::new(()).into_parts().0);
    let mut parts = http::response::Parts::from(std::mem::replace(resp, empty));
    let edited = edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    if reason.is_some() {
        resp.set_reason_phrase(reason.as_deref())?;
    }
    edited
}

/// The limit and remaining count of a key without `rpm`: the largest `u32`, so clients that
/// read these headers as numbers (OpenAI's always are) keep working; it was the word
/// `unlimited`.
pub(super) static UNLIMITED: HeaderValue = HeaderValue::from_static("4294967295");

/// The response headers the gateway sets (static names: a clone copies no bytes).
static LIMIT_REQUESTS: OwnHeader = own_header!("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: OwnHeader = own_header!("x-ratelimit-remaining-requests");
static RATE_RESET: OwnHeader = own_header!("x-ratelimit-reset");
static BUDGET_WARNING: OwnHeader = own_header!("x-spidergate-budget-warning");
static FALLBACK_FROM: OwnHeader = own_header!("x-spidergate-fallback-from");
static SERVED_MODEL: OwnHeader = own_header!("x-spidergate-model");
static RETRY_AFTER: OwnHeader = own_header!("retry-after");
/// `telemetry::context::TRACEPARENT` as a response header (the tests hold the two equal).
static TRACEPARENT_OUT: OwnHeader = own_header!("traceparent");
pub(super) static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// Header values of the numbers below this are formatted once and shared (a clone is a
/// reference count), so the common case formats nothing per response.
const SHARED_NUMBERS: u64 = 4096;

/// `n` as a header value, without formatting or allocating when it is small.
pub(super) fn number_value(n: u64) -> HeaderValue {
    static SMALL: once_cell::sync::Lazy<Box<[HeaderValue]>> =
        once_cell::sync::Lazy::new(|| (0..SHARED_NUMBERS).map(HeaderValue::from).collect());
    match SMALL.get(n as usize) {
        Some(v) => v.clone(),
        None => formatted_value(n),
    }
}

/// Bytes of the per-thread buffer the larger numbers' values are cut from. A value keeps its
/// buffer alive until it is dropped, so a long-lived response pins at most this much.
const NUMBER_SLAB_BYTES: usize = 512;

/// The most digits a u64 has.
const U64_DIGITS: usize = 20;

thread_local! {
    static NUMBER_SLAB: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

/// `n` formatted on the stack and copied into a per-thread buffer that the values share:
/// one allocation per ~50 numbers. `HeaderValue::from(u64)` allocates one for each (a
/// key's rpm of 100M and its remaining count are two a response).
fn formatted_value(n: u64) -> HeaderValue {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    let bytes = NUMBER_SLAB.with(|slab| {
        let mut slab = slab.borrow_mut();
        if slab.capacity() < U64_DIGITS {
            *slab = bytes::BytesMut::with_capacity(NUMBER_SLAB_BYTES);
        }
        slab.extend_from_slice(digits);
        slab.split().freeze()
    });
    // Digits are always a valid value; the fallback only keeps this free of a panic path.
    HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| HeaderValue::from(n))
}

thread_local! {
    /// The last rate limit given a value on this thread, and that value.
    static LAST_LIMIT: std::cell::RefCell<Option<(u64, HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// A key's rate limit as a header value. The limit is the same on every response of a key,
/// so the value of the last one is kept and shared (a clone is a reference count) rather
/// than formatted again.
fn limit_value(limit: u64) -> HeaderValue {
    if limit < SHARED_NUMBERS {
        return number_value(limit);
    }
    LAST_LIMIT.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((n, v)) if *n == limit => v.clone(),
            _ => {
                let v = number_value(limit);
                *last = Some((limit, v.clone()));
                v
            }
        }
    })
}

pub(super) fn add_standing_headers(sink: &mut impl HeaderSink, s: &Standing) {
    match (s.rpm, s.remaining) {
        (Some(limit), Some(remaining)) => {
            sink.add_limit(&LIMIT_REQUESTS, limit.into());
            sink.add_number(&REMAINING_REQUESTS, remaining.into());
        }
        _ => {
            sink.add(&LIMIT_REQUESTS, &UNLIMITED);
            sink.add(&REMAINING_REQUESTS, &UNLIMITED);
        }
    }
    sink.add_number(&RATE_RESET, s.reset_secs);
    if s.budget_warning {
        sink.add(
            &BUDGET_WARNING,
            &HeaderValue::from_static("monthly budget reached (soft limit)"),
        );
    }
}

/// Where the gateway's own response headers go: a head's map, or [`HeadLines`].
pub(super) trait HeaderSink {
    /// Sets `name` (a map replaces a value it has; lines are only ever added to).
    fn add(&mut self, name: &OwnHeader, value: &HeaderValue);

    /// `n` as the value.
    fn add_number(&mut self, name: &OwnHeader, n: u64) {
        self.add(name, &number_value(n));
    }

    /// A rate limit as the value: the same on every response of a key.
    fn add_limit(&mut self, name: &OwnHeader, n: u64) {
        self.add(name, &limit_value(n));
    }
}

impl HeaderSink for HeaderMap {
    fn add(&mut self, name: &OwnHeader, value: &HeaderValue) {
        self.insert(name.name.clone(), value.clone());
    }
}

/// Header lines (`name: value` CRLF, names lower-case) written after an HTTP/1 response's
/// own (`SessionV1::set_response_head_extra` in the vendored core). Inserting into the
/// head's map hashes each name (~250 instructions a header) and grows a map sized for the
/// upstream's headers (~700); the lines are copied. They are cut from a per-thread buffer,
/// like [`number_value`]'s digits: one allocation per many responses.
pub(super) struct HeadLines<'a>(&'a mut bytes::BytesMut);

/// Bytes of the per-thread buffer [`HeadLines`] are cut from.
const HEAD_LINES_SLAB_BYTES: usize = 4096;

/// Room one response's lines need at most, but for long model names (which grow it).
const HEAD_LINES_ROOM: usize = 512;

thread_local! {
    static HEAD_LINES_SLAB: std::cell::RefCell<bytes::BytesMut> =
        std::cell::RefCell::new(bytes::BytesMut::new());
}

impl HeadLines<'_> {
    /// The lines `write` adds, as one buffer cut from this thread's slab.
    pub(super) fn write(write: impl FnOnce(&mut HeadLines<'_>)) -> Bytes {
        HEAD_LINES_SLAB.with(|slab| {
            let mut slab = slab.borrow_mut();
            if slab.capacity() < HEAD_LINES_ROOM {
                *slab = bytes::BytesMut::with_capacity(HEAD_LINES_SLAB_BYTES);
            }
            write(&mut HeadLines(&mut slab));
            slab.split().freeze()
        })
    }

    fn line(&mut self, name: &OwnHeader, value: &[u8]) {
        let b = &mut *self.0;
        b.extend_from_slice(name.line);
        b.extend_from_slice(value);
        b.extend_from_slice(b"\r\n");
    }
}

impl HeaderSink for HeadLines<'_> {
    fn add(&mut self, name: &OwnHeader, value: &HeaderValue) {
        self.line(name, value.as_bytes());
    }

    fn add_number(&mut self, name: &OwnHeader, n: u64) {
        let mut digits = itoa::Buffer::new();
        self.line(name, digits.format(n).as_bytes());
    }

    fn add_limit(&mut self, name: &OwnHeader, n: u64) {
        self.add_number(name, n);
    }
}

/// The size of a request head as sent: request line and every header line.
pub(super) fn head_size(req: &RequestHeader) -> usize {
    let target = req.uri.path_and_query().map_or(1, |p| p.as_str().len());
    let line = req.method.as_str().len() + target + 12;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

static ANTHROPIC_VERSION: HeaderName = HeaderName::from_static("anthropic-version");
static ANTHROPIC_BETA: HeaderName = HeaderName::from_static("anthropic-beta");

/// The request as the provider gets it: its path, its own key (the agent's token and every
/// other credential are removed), its `Host`, the rewritten body's length, and no
/// compression (usage is parsed from the response bytes). An OpenAI-kind provider gets the
/// key as a bearer token; Anthropic as `x-api-key`, with `anthropic-version` (the client's,
/// else the configured one) and the client's `anthropic-beta`. The provider's work is a
/// child of the gateway's span: `traceparent`, when given, replaces the agent's.
///
/// Edited as plain `http` parts, like the response head (see [`edit_headers`]): the names
/// reach the provider lower-case (or title-cased, the standard ones).
pub(super) fn rewrite_upstream_request(
    req: &mut RequestHeader,
    provider: &ProviderHeaders,
    key: Option<&HeaderValue>,
    uri: &http::Uri,
    body_len: usize,
    traceparent: Option<&HeaderValue>,
) -> Result<()> {
    let end_stream = req.send_end_stream();
    let empty = RequestHeader::from(http::Request::new(()).into_parts().0);
    let mut parts = http::request::Parts::from(std::mem::replace(req, empty));
    parts.uri = uri.clone();
    let h = &mut parts.headers;
    // One pass over the client's headers; removal only if needed.
    let client = ClientHeaders::scan(h);
    if client.stripped {
        for name in &STRIPPED_HEADERS {
            h.remove(name);
        }
    }
    if client.token_elsewhere {
        let holding: Vec<HeaderName> = h
            .iter()
            .filter(|(name, value)| **name != AUTHORIZATION && holds_token(value))
            .map(|(name, _)| name.clone())
            .collect();
        for name in holding {
            h.remove(name);
        }
    }
    match provider.kind {
        ProviderKind::OpenAi => {
            match key {
                Some(k) => {
                    h.insert(AUTHORIZATION, k.clone());
                }
                None => {
                    h.remove(AUTHORIZATION);
                }
            }
            if client.anthropic_version || client.anthropic_beta {
                h.remove(&ANTHROPIC_VERSION);
                h.remove(&ANTHROPIC_BETA);
            }
        }
        ProviderKind::Anthropic => {
            h.remove(AUTHORIZATION);
            if let Some(k) = key {
                h.insert(X_API_KEY.clone(), k.clone());
            }
            if !client.anthropic_version {
                h.insert(
                    ANTHROPIC_VERSION.clone(),
                    provider.anthropic_version.clone(),
                );
            }
            if client.anthropic_beta {
                drop_pricing_betas(h)?;
            }
        }
    }
    h.insert(HOST, provider.host.clone());
    h.insert(CONTENT_LENGTH, number_value(body_len as u64));
    h.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
    if let Some(tp) = traceparent {
        h.insert(TRACEPARENT.clone(), tp.clone());
    }
    *req = RequestHeader::from(parts);
    if let Some(end_stream) = end_stream {
        req.set_send_end_stream(end_stream);
    }
    Ok(())
}

/// `anthropic-beta` features that change what a request may cost beyond what the gateway
/// priced: the 1M-token context window (input past 200k tokens at a higher price) and long
/// output. They are dropped, every other beta passes.
const PRICING_BETAS: [&str; 2] = ["context-1m-", "output-128k-"];

fn is_pricing_beta(beta: &str) -> bool {
    PRICING_BETAS.iter().any(|p| beta.starts_with(p))
}

/// Removes the [`PRICING_BETAS`] from every `anthropic-beta` header (a comma-separated list).
fn drop_pricing_betas(h: &mut HeaderMap) -> Result<()> {
    let values: Vec<&HeaderValue> = h.get_all(&ANTHROPIC_BETA).iter().collect();
    let affected = values.iter().any(|v| {
        v.to_str()
            .map_or(true, |v| v.split(',').any(|b| is_pricing_beta(b.trim())))
    });
    if !affected {
        return Ok(());
    }
    let kept: Vec<String> = values
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|b| !b.is_empty() && !is_pricing_beta(b))
        .map(str::to_owned)
        .collect();
    h.remove(&ANTHROPIC_BETA);
    if !kept.is_empty() {
        let joined = HeaderValue::from_str(&kept.join(",")).map_err(|_| {
            pingora_error::Error::explain(pingora_error::ErrorType::InternalError, "anthropic-beta")
        })?;
        h.insert(ANTHROPIC_BETA.clone(), joined);
    }
    Ok(())
}

/// How the answer's framing changes when the gateway rewrites its body (see
/// `RequestCtx::observe_response_head`); applied with the rest of the decoration, in the
/// same edit of the header map.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reframe {
    /// The body's length changes (a stripped usage event, a translation): no
    /// `Content-Length`, chunked instead. Pingora chose the framing before this hook
    /// (chunked only for an answer that came without a length): without a length or
    /// chunking, the answer would be delimited by closing the connection, and every request
    /// would need a new one.
    pub resized: bool,
    /// The body is translated to the client's shape, errors too: always JSON.
    pub json: bool,
}

/// What the gateway adds to an answer's head beside its framing.
pub(super) struct Decoration<'a> {
    pub standing: &'a Standing,
    /// The model that failed first, when another one served.
    pub fallback_from: Option<&'a HeaderValue>,
    /// The model that served.
    pub served: Option<&'a HeaderValue>,
    pub traceparent: Option<&'a HeaderValue>,
}

impl Decoration<'_> {
    /// How many headers [`Self::add_to`] adds at most.
    fn count(&self, status: u16) -> usize {
        3 + usize::from(self.standing.budget_warning)
            + usize::from(status >= 400)
            + usize::from(status == 429)
            + usize::from(self.fallback_from.is_some())
            + usize::from(self.served.is_some())
            + usize::from(self.traceparent.is_some())
    }

    /// The rate-limit headers and those that apply: the error code of an upstream error,
    /// `Retry-After` on a 429 that came without one (SPEC §2), which model served (and
    /// which one failed first), the trace context.
    fn add_to(&self, sink: &mut impl HeaderSink, status: u16, has_retry_after: bool) {
        add_standing_headers(sink, self.standing);
        if status >= 400 {
            sink.add(&ERROR_CODE, &HeaderValue::from_static(UPSTREAM_STATUS));
        }
        if status == 429 && !has_retry_after {
            sink.add(&RETRY_AFTER, &HeaderValue::from_static("1"));
        }
        if let Some(from) = self.fallback_from {
            sink.add(&FALLBACK_FROM, from);
        }
        if let Some(model) = self.served {
            sink.add(&SERVED_MODEL, model);
        }
        if let Some(tp) = self.traceparent {
            sink.add(&TRACEPARENT_OUT, tp);
        }
    }
}

/// The response head as the agent gets it: the upstream's account headers dropped, the
/// gateway's headers ([`Decoration`]) added, and the framing of a rewritten body.
///
/// `as_lines` (an HTTP/1 client): the gateway's headers are returned as header lines, to be
/// written after the head's own ([`HeadLines`]), instead of going into its map; the map is
/// then edited only where the framing changes or the upstream sent something to drop. Not
/// when the upstream sent a name the gateway writes (`x-spidergate-*`, `traceparent`):
/// those are replaced in the map, as an insert does, so no name goes out twice.
pub(super) fn decorate_response(
    resp: &mut ResponseHeader,
    decoration: &Decoration<'_>,
    upstream: UpstreamHead,
    reframe: Reframe,
    as_lines: bool,
) -> Result<Option<Bytes>> {
    let status = resp.status.as_u16();
    // A rewritten body's framing: no length, chunked. A provider's stream is framed so
    // already, and its head is then left as it is.
    let drop_length = reframe.resized && upstream.content_length;
    let chunked = reframe.resized && !upstream.chunked && !matches!(status, 100..=199 | 204 | 304);
    let as_lines = as_lines && !upstream.gateway_names;
    let odd_retry_after = status == 429 && upstream.retry_after_odd;
    if !as_lines
        || upstream.account_headers
        || drop_length
        || chunked
        || reframe.json
        || odd_retry_after
    {
        edit_headers(resp, |h| {
            if !as_lines {
                // Room for them at once: the upstream's head is parsed into a map sized for
                // its own headers, and growing it insert by insert cost more
                // (`benches/instr.py`: this phase 3.78k -> 3.62k a request).
                h.reserve(decoration.count(status) + usize::from(chunked));
            }
            if upstream.account_headers {
                strip_account_headers(h);
            }
            if drop_length {
                h.remove(CONTENT_LENGTH);
            }
            if odd_retry_after {
                let secs = h.get(http::header::RETRY_AFTER).map_or(1, |v| {
                    retry_after_secs(v.as_bytes(), crate::clock::now_ms())
                });
                h.insert(http::header::RETRY_AFTER, number_value(secs));
            }
            if chunked {
                h.insert(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
            if reframe.json {
                h.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
            if !as_lines {
                decoration.add_to(h, status, upstream.retry_after);
            }
            Ok(())
        })?;
    }
    if !as_lines {
        return Ok(None);
    }
    Ok(Some(HeadLines::write(|lines| {
        decoration.add_to(lines, status, upstream.retry_after);
    })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_own_header_line_starts_with_its_name() {
        for h in [
            &ERROR_CODE,
            &LIMIT_REQUESTS,
            &REMAINING_REQUESTS,
            &RATE_RESET,
            &BUDGET_WARNING,
            &FALLBACK_FROM,
            &SERVED_MODEL,
            &RETRY_AFTER,
            &TRACEPARENT_OUT,
        ] {
            assert_eq!(h.line, format!("{}: ", h.name).as_bytes());
        }
        assert_eq!(TRACEPARENT_OUT.name, TRACEPARENT);
        assert_eq!(RETRY_AFTER.name, http::header::RETRY_AFTER);
        let lines = HeadLines::write(|l| {
            l.add_number(&RATE_RESET, 7);
            l.add(&SERVED_MODEL, &HeaderValue::from_static("m-1"));
        });
        assert_eq!(
            &lines[..],
            b"x-ratelimit-reset: 7\r\nx-spidergate-model: m-1\r\n"
        );
    }

    /// The decoration of an upstream answer without account headers, fallback, served
    /// model or trace context.
    fn decorate_plain(resp: &mut ResponseHeader) {
        let standing = standing();
        let lines = decorate_response(
            resp,
            &plain(&standing),
            UpstreamHead::scan(&resp.headers),
            Reframe::default(),
            false,
        )
        .unwrap();
        assert!(lines.is_none(), "into the map");
    }

    fn plain(standing: &Standing) -> Decoration<'_> {
        Decoration {
            standing,
            fallback_from: None,
            served: None,
            traceparent: None,
        }
    }

    fn standing() -> Standing {
        Standing {
            rpm: Some(7),
            remaining: Some(6),
            reset_secs: 0,
            budget_warning: false,
        }
    }

    proptest::proptest! {
        #[test]
        fn a_number_value_reads_as_the_number_formatted(n in proptest::prelude::any::<u64>()) {
            let v = number_value(n);
            proptest::prop_assert_eq!(v.to_str().unwrap(), n.to_string());
            proptest::prop_assert_eq!(v, HeaderValue::from(n));
        }

        #[test]
        fn a_limit_value_reads_as_the_limit_formatted(a in proptest::prelude::any::<u64>(), b in proptest::prelude::any::<u64>()) {
            // The same limit twice (kept), then another (replaced), then the first again.
            for n in [a, a, b, a] {
                let v = limit_value(n);
                proptest::prop_assert_eq!(v.to_str().unwrap(), n.to_string());
            }
        }
    }

    #[test]
    fn number_values_stay_right_across_many_buffers() {
        // Enough values to use up several per-thread buffers; each keeps its own digits.
        let numbers: Vec<u64> = (0..2_000u64)
            .map(|i| i * 7_919 + 4_096)
            .chain([u64::MAX, 4_096, 4_095, 100_000_000, 99_999_999])
            .collect();
        let values: Vec<HeaderValue> = numbers.iter().map(|&n| number_value(n)).collect();
        for (n, v) in numbers.iter().zip(&values) {
            assert_eq!(v.to_str().unwrap(), n.to_string());
        }
    }

    /// SPEC §2: only the gateway says a call failed or a budget is reached; an upstream's
    /// own `X-SpiderGate-*` never reaches the agent, on a success or an error, over the
    /// map or the header lines.
    #[test]
    fn an_upstreams_gateway_headers_never_reach_the_agent() {
        for (status, as_lines) in [(200, false), (200, true), (500, false), (500, true)] {
            let mut resp = ResponseHeader::build(status, None).unwrap();
            for (k, v) in [
                ("x-spidergate-error-code", "spoofed"),
                ("x-spidergate-budget-warning", "spoofed"),
                ("X-SpiderGate-Whatever", "spoofed"),
                ("x-request-id", "req_1"),
            ] {
                resp.append_header(k, v).unwrap();
            }
            let upstream = UpstreamHead::scan(&resp.headers);
            let standing = standing();
            let lines = decorate_response(
                &mut resp,
                &plain(&standing),
                upstream,
                Reframe::default(),
                as_lines,
            )
            .unwrap()
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
            .unwrap_or_default();
            let h = &resp.headers;
            assert!(h.get("x-spidergate-budget-warning").is_none(), "{status}");
            assert!(h.get("x-spidergate-whatever").is_none(), "{status}");
            assert!(!lines.contains("spoofed"), "{lines}");
            let code: Vec<_> = h.get_all("x-spidergate-error-code").iter().collect();
            if status == 200 {
                assert!(code.is_empty(), "{code:?}");
                assert!(!lines
                    .to_ascii_lowercase()
                    .contains("x-spidergate-error-code"));
            } else {
                assert!(code.iter().all(|v| *v != "spoofed"), "{code:?}");
            }
            assert_eq!(h.get("x-request-id").unwrap(), "req_1");
        }
    }

    /// SPEC §2: a 429's `Retry-After` is whole seconds, at least 1, whatever the upstream
    /// sent; a well-formed one passes as it is.
    #[test]
    fn an_upstream_429s_retry_after_is_whole_seconds_at_least_one() {
        let now = crate::clock::now_ms();
        let in_90s = httpdate::fmt_http_date(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis((now + 90_000) as u64),
        );
        for (sent, want, status) in [
            ("7", "7", 429),
            ("0", "1", 429),
            ("1.5", "2", 429),
            ("-3", "1", 429),
            ("abc", "1", 429),
            ("99999999999", "86400", 429),
            ("9999999999", "86400", 429),
            ("86401", "86400", 429),
            ("86400", "86400", 429),
            ("1e400", "86400", 429),
            (in_90s.as_str(), "90", 429),
            ("0", "0", 503),
        ] {
            let mut resp = ResponseHeader::build(status, None).unwrap();
            resp.append_header("retry-after", sent).unwrap();
            let upstream = UpstreamHead::scan(&resp.headers);
            let standing = standing();
            for as_lines in [false, true] {
                let mut r = resp.clone();
                decorate_response(
                    &mut r,
                    &plain(&standing),
                    upstream,
                    Reframe::default(),
                    as_lines,
                )
                .unwrap();
                let got: Vec<_> = r.headers.get_all("retry-after").iter().collect();
                // An HTTP-date is counted when the head is decorated: a second may pass.
                let ok = got.len() == 1 && (got[0] == want || (want == "90" && got[0] == "89"));
                assert!(ok, "{sent} ({status}): {got:?}");
            }
        }
    }

    #[test]
    fn the_upstream_account_headers_never_reach_the_agent() {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for (k, v) in [
            ("openai-organization", "org-1"),
            ("openai-project", "proj_1"),
            ("anthropic-organization-id", "a"),
            ("set-cookie", "a=b"),
            ("x-ratelimit-limit-requests", "5000"),
            ("x-ratelimit-remaining-tokens", "9"),
            ("anthropic-ratelimit-requests-limit", "50"),
            ("x-request-id", "req_1"),
        ] {
            resp.append_header(k, v).unwrap();
        }
        let served = HeaderValue::from_static("gpt-4o-mini");
        let upstream = UpstreamHead::scan(&resp.headers);
        assert!(upstream.account_headers);
        let standing = standing();
        let decoration = Decoration {
            served: Some(&served),
            ..plain(&standing)
        };
        decorate_response(&mut resp, &decoration, upstream, Reframe::default(), false).unwrap();
        let h = &resp.headers;
        for gone in [
            "openai-organization",
            "openai-project",
            "anthropic-organization-id",
            "set-cookie",
            "x-ratelimit-remaining-tokens",
            "anthropic-ratelimit-requests-limit",
        ] {
            assert!(h.get(gone).is_none(), "{gone} leaked");
        }
        let limits: Vec<_> = h.get_all("x-ratelimit-limit-requests").iter().collect();
        assert_eq!(limits, vec!["7"], "only the gateway's own");
        assert_eq!(h.get("x-request-id").unwrap(), "req_1");
        assert_eq!(h.get("x-spidergate-model").unwrap(), "gpt-4o-mini");
        assert!(h.get("x-spidergate-error-code").is_none());
    }

    #[test]
    fn the_edit_keeps_status_a_custom_reason_and_every_other_header() {
        let mut resp = ResponseHeader::build(429, None).unwrap();
        resp.set_reason_phrase(Some("Slow Down")).unwrap();
        resp.append_header("X-Request-Id", "req_1").unwrap();
        resp.append_header("vary", "a").unwrap();
        resp.append_header("vary", "b").unwrap();
        decorate_plain(&mut resp);
        assert_eq!(resp.status.as_u16(), 429);
        assert_eq!(resp.get_reason_phrase(), Some("Slow Down"));
        let vary: Vec<_> = resp.headers.get_all("vary").iter().collect();
        assert_eq!(vary, vec!["a", "b"]);
        let mut wire = Vec::new();
        resp.header_to_h1_wire(&mut wire);
        let wire = String::from_utf8(wire).unwrap();
        assert!(wire.contains("x-request-id: req_1\r\n"), "{wire}");
        assert!(
            wire.contains("x-ratelimit-remaining-requests: 6\r\n"),
            "{wire}"
        );
        assert!(
            wire.contains("x-spidergate-error-code: upstream_status\r\n"),
            "{wire}"
        );
    }

    #[test]
    fn for_an_http1_client_the_gateways_headers_are_lines_and_the_map_is_left_alone() {
        let mut resp = ResponseHeader::build(429, None).unwrap();
        resp.append_header("X-Request-Id", "req_1").unwrap();
        let standing = Standing {
            rpm: Some(100_000_000),
            remaining: Some(99_999_999),
            reset_secs: 42,
            budget_warning: true,
        };
        let served = HeaderValue::from_static("gpt-4o-mini");
        let tp = HeaderValue::from_static("00-aa-bb-01");
        let decoration = Decoration {
            served: Some(&served),
            traceparent: Some(&tp),
            ..plain(&standing)
        };
        let upstream = UpstreamHead::scan(&resp.headers);
        let lines = decorate_response(&mut resp, &decoration, upstream, Reframe::default(), true)
            .unwrap()
            .expect("lines");
        assert_eq!(
            std::str::from_utf8(&lines).unwrap(),
            "x-ratelimit-limit-requests: 100000000\r\n\
             x-ratelimit-remaining-requests: 99999999\r\n\
             x-ratelimit-reset: 42\r\n\
             x-spidergate-budget-warning: monthly budget reached (soft limit)\r\n\
             x-spidergate-error-code: upstream_status\r\n\
             retry-after: 1\r\n\
             x-spidergate-model: gpt-4o-mini\r\n\
             traceparent: 00-aa-bb-01\r\n"
        );
        assert_eq!(resp.headers.len(), 1, "nothing added to the map");
        assert!(
            resp.has_case(),
            "not rebuilt: the upstream's names keep their case"
        );
        // The framing changes and the upstream's account headers still go through the map;
        // an upstream `Retry-After` is kept, not repeated.
        resp.append_header("x-ratelimit-limit-requests", "5000")
            .unwrap();
        resp.append_header("retry-after", "7").unwrap();
        resp.append_header("content-length", "10").unwrap();
        let upstream = UpstreamHead::scan(&resp.headers);
        let reframe = Reframe {
            resized: true,
            json: false,
        };
        let lines = decorate_response(&mut resp, &decoration, upstream, reframe, true)
            .unwrap()
            .expect("lines");
        let lines = std::str::from_utf8(&lines).unwrap();
        assert!(!lines.contains("retry-after"), "{lines}");
        let h = &resp.headers;
        assert!(h.get("x-ratelimit-limit-requests").is_none());
        assert!(h.get("content-length").is_none());
        assert_eq!(h.get("transfer-encoding").unwrap(), "chunked");
        assert_eq!(h.get("retry-after").unwrap(), "7");
        // A provider's stream, chunked and without a length, keeps its head as it came.
        let mut stream = ResponseHeader::build(200, None).unwrap();
        stream
            .append_header("Content-Type", "text/event-stream")
            .unwrap();
        stream
            .append_header("Transfer-Encoding", "chunked")
            .unwrap();
        let upstream = UpstreamHead::scan(&stream.headers);
        assert!(upstream.chunked && !upstream.content_length);
        let lines = decorate_response(&mut stream, &decoration, upstream, reframe, true).unwrap();
        assert!(lines.is_some());
        assert!(stream.has_case(), "not rebuilt");
        let te: Vec<_> = stream.headers.get_all("transfer-encoding").iter().collect();
        assert_eq!(te, vec!["chunked"]);
        // An upstream that sends a name the gateway writes: into the map, replaced there.
        resp.append_header("x-spidergate-model", "upstream")
            .unwrap();
        let upstream = UpstreamHead::scan(&resp.headers);
        assert!(upstream.gateway_names);
        let lines =
            decorate_response(&mut resp, &decoration, upstream, Reframe::default(), true).unwrap();
        assert!(lines.is_none());
        let models: Vec<_> = resp.headers.get_all("x-spidergate-model").iter().collect();
        assert_eq!(models, vec!["gpt-4o-mini"]);
    }

    #[test]
    fn an_upstream_error_carries_the_error_code_header() {
        let mut resp = ResponseHeader::build(500, None).unwrap();
        decorate_plain(&mut resp);
        assert_eq!(
            resp.headers.get("x-spidergate-error-code").unwrap(),
            UPSTREAM_STATUS
        );
    }

    #[test]
    fn the_agent_credentials_are_replaced_by_the_providers() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer spideriq_pat_x"),
            ("x-api-key", "k"),
            ("cookie", "c"),
            ("host", "evil"),
            ("expect", "100-continue"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::OpenAi,
            host: HeaderValue::from_static("api.example.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let key = HeaderValue::from_static("Bearer sk-up");
        let uri = http::Uri::from_static("/v1/chat/completions");
        rewrite_upstream_request(&mut req, &provider, Some(&key), &uri, 42, None).unwrap();
        let h = &req.headers;
        assert_eq!(h.get("authorization").unwrap(), "Bearer sk-up");
        assert_eq!(h.get("host").unwrap(), "api.example.com");
        assert_eq!(h.get("content-length").unwrap(), "42");
        for gone in ["x-api-key", "cookie", "expect"] {
            assert!(h.get(gone).is_none(), "{gone} went upstream");
        }
    }

    #[test]
    fn one_pass_over_a_client_head_reads_what_lookups_would() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("Content-Length", " 120 "),
            ("content-length", "999"),
            ("Expect", "100-Continue"),
            ("traceparent", "00-aa-bb-01"),
            ("x-other", "1"),
        ] {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_static(v),
            );
        }
        let head = ClientHead::scan(&h);
        assert_eq!(head.traceparent, h.get(&TRACEPARENT));
        assert_eq!(
            head.framing(),
            BodyFraming {
                declared: Some(120),
                expects_continue: true
            },
            "the first Content-Length, as `get` gives it"
        );
        assert_eq!(BodyFraming::of(&HeaderMap::new()), BodyFraming::default());
        let mut odd = HeaderMap::new();
        odd.insert(CONTENT_LENGTH, HeaderValue::from_static("12a"));
        odd.insert(http::header::EXPECT, HeaderValue::from_static("200-ok"));
        assert_eq!(BodyFraming::of(&odd), BodyFraming::default());
    }

    #[test]
    fn one_pass_over_an_upstream_head_finds_streams_empty_bodies_and_account_headers() {
        let scan = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, HeaderValue::from_static(v));
            }
            UpstreamHead::scan(&h)
        };
        assert_eq!(scan(&[]), UpstreamHead::default());
        let head = scan(&[
            ("content-type", "text/event-stream; charset=utf-8"),
            ("content-type", "application/json"),
            ("content-length", "0"),
            ("x-request-id", "r"),
        ]);
        assert!(head.sse && head.zero_length && !head.account_headers);
        let head = scan(&[
            ("content-type", "application/json"),
            ("content-length", "10"),
            ("openai-organization", "org"),
        ]);
        assert!(!head.sse && !head.zero_length && head.account_headers);
        assert!(head.content_length && !head.chunked && !head.retry_after);
        assert!(!head.gateway_names);
        assert!(scan(&[("set-cookie", "a=b")]).account_headers);
        let head = scan(&[
            ("transfer-encoding", "chunked"),
            ("retry-after", "3"),
            ("traceparent", "00-aa-bb-01"),
        ]);
        assert!(head.chunked && !head.content_length && head.retry_after);
        assert!(head.gateway_names && !head.account_headers && !head.retry_after_odd);
        assert!(scan(&[("retry-after", "0")]).retry_after_odd);
        assert!(scan(&[("x-spidergate-model", "m")]).account_headers);
        assert!(!scan(&[("transfer-encoding", "gzip")]).chunked);
        for ours in [
            "x-spidergate-model",
            "x-spidergate-budget-warning",
            "traceparent",
        ] {
            assert!(scan(&[(ours, "v")]).gateway_names, "{ours}");
        }
        for theirs in ["x-spidergate", "tracestate", "x-request-id", "server"] {
            assert!(!scan(&[(theirs, "v")]).gateway_names, "{theirs}");
        }
    }

    #[test]
    fn account_headers_are_told_from_the_rest() {
        for account in [
            "x-ratelimit-limit-tokens",
            "anthropic-ratelimit-requests-limit",
            "openai-organization",
            "openai-project",
            "anthropic-organization-id",
            "set-cookie",
            "set-cookie2",
        ] {
            assert!(
                is_account_header(&HeaderName::from_static(account)),
                "{account}"
            );
        }
        for other in [
            "x-request-id",
            "anthropic-version",
            "openai-version",
            "server",
            "content-type",
            "date",
            "via",
        ] {
            assert!(
                !is_account_header(&HeaderName::from_static(other)),
                "{other}"
            );
        }
    }

    #[test]
    fn the_stripped_names_are_exactly_the_stripped_headers() {
        for name in &STRIPPED_HEADERS {
            assert!(is_stripped(name.as_str()), "{name}");
        }
        for other in [
            "authorization",
            "host",
            "content-type",
            "content-length",
            "x-api-key2",
            "api-keys",
            "anthropic-version",
            "anthropic-beta",
            "x-request-id",
        ] {
            assert!(!is_stripped(other), "{other}");
        }
    }

    #[test]
    fn one_pass_finds_what_the_rewrite_must_remove_or_keep() {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        h.insert(HOST, HeaderValue::from_static("gw"));
        assert_eq!(ClientHeaders::scan(&h), ClientHeaders::default());
        h.insert(http::header::COOKIE, HeaderValue::from_static("c"));
        h.insert(ANTHROPIC_BETA.clone(), HeaderValue::from_static("b"));
        assert_eq!(
            ClientHeaders::scan(&h),
            ClientHeaders {
                stripped: true,
                anthropic_version: false,
                anthropic_beta: true,
                token_elsewhere: false,
            }
        );
        h.insert(ANTHROPIC_VERSION.clone(), HeaderValue::from_static("v"));
        assert!(ClientHeaders::scan(&h).anthropic_version);
    }

    #[test]
    fn an_openai_provider_never_gets_the_clients_anthropic_headers() {
        let mut req = RequestHeader::build("POST", b"/v1/chat/completions", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer spideriq_pat_x"),
            ("anthropic-version", "2023-06-01"),
            ("anthropic-beta", "tools-2024-04-04"),
            ("x-request-id", "r1"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::OpenAi,
            host: HeaderValue::from_static("api.example.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let uri = http::Uri::from_static("/v1/chat/completions");
        rewrite_upstream_request(&mut req, &provider, None, &uri, 1, None).unwrap();
        let h = &req.headers;
        for gone in ["authorization", "anthropic-version", "anthropic-beta"] {
            assert!(h.get(gone).is_none(), "{gone} went upstream");
        }
        assert_eq!(h.get("x-request-id").unwrap(), "r1");
    }

    #[test]
    fn anthropic_pricing_betas_are_dropped_and_a_clients_version_kept() {
        let mut req = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        for (k, v) in [
            ("anthropic-version", "2024-01-01"),
            ("anthropic-beta", "context-1m-2025-08-07, tools-2024-04-04"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::Anthropic,
            host: HeaderValue::from_static("api.anthropic.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let uri = http::Uri::from_static("/v1/messages");
        rewrite_upstream_request(&mut req, &provider, None, &uri, 1, None).unwrap();
        let h = &req.headers;
        assert_eq!(h.get("anthropic-version").unwrap(), "2024-01-01");
        assert_eq!(h.get("anthropic-beta").unwrap(), "tools-2024-04-04");
    }

    #[test]
    fn anthropic_gets_its_key_as_x_api_key_with_a_version() {
        let mut req = RequestHeader::build("POST", b"/v1/messages", None).unwrap();
        for (k, v) in [
            ("authorization", "Bearer spideriq_pat_x"),
            ("x-api-key", "spideriq_pat_y"),
            ("anthropic-beta", "tools-2024-04-04"),
        ] {
            req.append_header(k, v).unwrap();
        }
        let provider = ProviderHeaders {
            kind: ProviderKind::Anthropic,
            host: HeaderValue::from_static("api.anthropic.com"),
            anthropic_version: HeaderValue::from_static("2023-06-01"),
        };
        let key = HeaderValue::from_static("sk-ant-up");
        let uri = http::Uri::from_static("/v1/messages");
        rewrite_upstream_request(&mut req, &provider, Some(&key), &uri, 7, None).unwrap();
        let h = &req.headers;
        assert_eq!(
            h.get_all("x-api-key").iter().collect::<Vec<_>>(),
            vec!["sk-ant-up"]
        );
        assert!(h.get("authorization").is_none());
        assert_eq!(h.get("anthropic-version").unwrap(), "2023-06-01");
        assert_eq!(h.get("anthropic-beta").unwrap(), "tools-2024-04-04");
    }
}
