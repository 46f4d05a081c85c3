//! The HTTP/1.1 wire as the mock speaks it: the request head it parsed (read by the replies)
//! and the response heads it writes.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::json::push_u64;
use crate::knobs::Knobs;

/// A client connection: plain TCP, or TLS over it.
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The TCP segments with data the socket `fd` has received (`TCP_INFO`'s
/// `tcpi_data_segs_in`, Linux 4.6 and later); `None` where it cannot be read.
pub(crate) fn data_segments_in(fd: std::os::fd::RawFd) -> Option<u64> {
    // SAFETY: `tcp_info` is plain old data; getsockopt writes at most `len` bytes into it
    // and reports how many it wrote, which is checked to cover the field read.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_data_segs_in) + 4;
    (rc == 0 && len as usize >= needed).then_some(u64::from(info.tcpi_data_segs_in))
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Method {
    Get,
    Post,
    Other,
}

pub(crate) struct Head {
    pub(crate) method: Method,
    pub(crate) head_len: usize,
    pub(crate) content_length: Option<usize>,
    pub(crate) chunked: bool,
    pub(crate) expect_continue: bool,
    pub(crate) keep_alive: bool,
    pub(crate) knobs: Knobs,
    /// An `x-api-key` header or a bearer token arrived (Anthropic's SDKs send either).
    pub(crate) has_credentials: bool,
    /// `x-api-key`, else the bearer token; only while some key is rejected.
    pub(crate) provider_key: Option<String>,
    /// Method and headers, only when recording.
    pub(crate) recorded: Option<(String, Vec<(String, String)>)>,
}

/// Headers `x-mock-leak-headers` adds: what a real provider says about the operator's account.
const LEAK_HEADERS: &[u8] = b"\r\nopenai-organization: org-leak\r\nopenai-project: proj_leak\r\nanthropic-organization-id: leak\r\nset-cookie: a=b\r\nx-ratelimit-limit-requests: 5000\r\nx-ratelimit-remaining-tokens: 99";

/// Headers `x-mock-gateway-headers` adds: names the gateway writes on its answers, as an
/// upstream that is itself a SpiderGate (or a hostile one) would send them.
const GATEWAY_HEADERS: &[u8] = b"\r\nx-spidergate-model: upstream-model\r\nx-spidergate-error-code: upstream-code\r\ntraceparent: 00-11111111111111111111111111111111-2222222222222222-01";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        402 => "Payment Required",
        403 => "Forbidden",
        404 => "Not Found",
        408 => "Request Timeout",
        409 => "Conflict",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Mock Status",
    }
}

/// The response-head options beyond status, type and length.
#[derive(Clone, Copy, Default)]
pub(crate) struct HeadFlags {
    /// Add `connection: close`.
    pub(crate) close: bool,
    /// `x-mock-leak-headers`: add [`LEAK_HEADERS`].
    pub(crate) leak: bool,
    /// `x-mock-gateway-headers`: add [`GATEWAY_HEADERS`].
    pub(crate) gateway: bool,
    /// `x-mock-early-hints`: a `103 Early Hints` head first.
    pub(crate) early_hints: bool,
    /// Add `retry-after: N`.
    pub(crate) retry_after: Option<u64>,
    /// Add rate-limit headers saying the key has requests and tokens left.
    pub(crate) capacity: bool,
}

/// A key with capacity left, as OpenAI and Anthropic report it on every response.
const CAPACITY_HEADERS: &[u8] = b"\r\nx-ratelimit-limit-requests: 500\r\nx-ratelimit-remaining-requests: 499\r\nx-ratelimit-limit-tokens: 30000\r\nx-ratelimit-remaining-tokens: 30000\r\nanthropic-ratelimit-requests-remaining: 49\r\nanthropic-ratelimit-tokens-remaining: 30000";

/// Status line and headers; `content_length: None` means a chunked body.
pub(crate) fn push_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &[u8],
    content_length: Option<usize>,
    flags: HeadFlags,
) {
    if flags.early_hints {
        out.extend_from_slice(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload");
        // The interim head carries them too: the gateway must drop them there as well.
        if flags.leak {
            out.extend_from_slice(LEAK_HEADERS);
        }
        if flags.gateway {
            out.extend_from_slice(GATEWAY_HEADERS);
        }
        out.extend_from_slice(b"\r\n\r\n");
    }
    out.extend_from_slice(b"HTTP/1.1 ");
    push_u64(out, u64::from(status));
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\ncontent-type: ");
    out.extend_from_slice(content_type);
    match content_length {
        Some(len) => {
            out.extend_from_slice(b"\r\ncontent-length: ");
            push_u64(out, len as u64);
        }
        None => out.extend_from_slice(b"\r\ncache-control: no-cache\r\ntransfer-encoding: chunked"),
    }
    if flags.close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    if let Some(secs) = flags.retry_after {
        out.extend_from_slice(b"\r\nretry-after: ");
        push_u64(out, secs);
    }
    if flags.leak {
        out.extend_from_slice(LEAK_HEADERS);
    }
    if flags.gateway {
        out.extend_from_slice(GATEWAY_HEADERS);
    }
    if flags.capacity {
        out.extend_from_slice(CAPACITY_HEADERS);
    }
    out.extend_from_slice(b"\r\n\r\n");
}
