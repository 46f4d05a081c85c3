//! The proxy listener's edge: a connection cap and a deadline on each first request head.
//!
//! `EdgeApp` wraps Pingora's `HttpProxy` as the listening service's `ServerApp`. For every
//! accepted connection it takes a slot (`server.max_connections`; over the cap the client gets
//! a fixed 503 `too_many_connections` and the connection closes) and wraps the stream in an
//! `EdgeStream`, which fails reads once `server.header_timeout_ms` has passed since accept
//! without a complete first request head. Pingora applies its own read timeout to each read
//! of a head, so a client trickling a byte now and then would otherwise hold a connection for
//! ever (slowloris). After the first head the wrapper only forwards (it cannot tell a later
//! head from a body): the keep-alive wait before later heads is `session.set_keepalive` in
//! the proxy, and the vendored core's `WHOLE_HEAD_WITHIN_TIMEOUT` (set at start-up) bounds
//! each later head as a whole by it. `HeadDeadlineApp` puts the same first-head deadline on
//! the admin listener, without the cap.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::ServerApp;
use pingora_core::protocols::raw_connect::ProxyDigest;
use pingora_core::protocols::tls::{SslDigest, TlsRef};
use pingora_core::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora_core::server::ShutdownWatch;
use pingora_proxy::HttpProxy;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::gate::Gate;
use crate::proxy::GateProxy;

/// The error code (body and `X-SpiderGate-Error-Code`) of a connection refused at the cap.
pub const TOO_MANY_CONNECTIONS: &str = "too_many_connections";

/// A refused connection is kept at most this long to send its answer and read what the
/// client already sent (closing with unread bytes resets the connection, and the client may
/// then lose the answer).
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// At most this much is read and dropped from a refused connection.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// The proxy's `ServerApp`: connection cap and first-head deadline around Pingora's HTTP proxy.
pub struct EdgeApp {
    inner: Arc<HttpProxy<GateProxy>>,
    gate: Arc<Gate>,
    /// The whole 503 answer, built once.
    refusal: Box<[u8]>,
}

impl EdgeApp {
    pub fn new(inner: HttpProxy<GateProxy>, gate: Arc<Gate>) -> Self {
        EdgeApp {
            inner: Arc::new(inner),
            gate,
            refusal: refusal_response().into_boxed_slice(),
        }
    }

    /// Answers 503 `too_many_connections` without reading the request, then closes.
    async fn refuse(&self, mut stream: Stream) {
        self.gate.metrics.connection_refused();
        let answer = async {
            stream.write_all(&self.refusal).await?;
            stream.flush().await?;
            AsyncWriteExt::shutdown(&mut stream).await?;
            let mut buf = [0u8; 4096];
            let mut drained = 0;
            while drained < REFUSAL_DRAIN_BYTES {
                match stream.read(&mut buf).await? {
                    0 => break,
                    n => drained += n,
                }
            }
            io::Result::Ok(())
        };
        // Whatever happens (timeout, reset), the connection is dropped here.
        let _ = tokio::time::timeout(REFUSAL_LINGER, answer).await;
    }
}

#[async_trait]
impl ServerApp for EdgeApp {
    /// Called by the listening service once per accepted connection. Keeps the connection
    /// (and its slot) until Pingora is done with it: Pingora's HTTP app serves every
    /// keep-alive request of the connection inside one `process_new`, and any stream it hands
    /// back for reuse goes straight back to it here, so this never returns one.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let (max, header_timeout) = {
            let routes = self.gate.routes();
            let t = &routes.config.tuning;
            (t.max_connections, t.header_timeout)
        };
        let Some(slot) = Slot::take(&self.gate, max) else {
            self.refuse(stream).await;
            return None;
        };
        let mut next: Option<Stream> = Some(Box::new(EdgeStream::new(
            stream,
            header_timeout,
            Some(slot),
        )));
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    /// After the service stops listening: Pingora wakes keep-alive connections parked on
    /// their next request head so they close.
    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// The admin listener's `ServerApp`: the same first-head deadline around its HTTP app (no
/// connection cap: `server.max_connections` counts the agents' listener only), so an admin
/// port reachable by others cannot be held open by trickled heads either.
pub struct HeadDeadlineApp<A> {
    inner: Arc<A>,
    gate: Arc<Gate>,
}

impl<A> HeadDeadlineApp<A> {
    pub fn new(inner: A, gate: Arc<Gate>) -> Self {
        HeadDeadlineApp {
            inner: Arc::new(inner),
            gate,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeadDeadlineApp<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let header_timeout = self.gate.routes().config.tuning.header_timeout;
        let mut next: Option<Stream> =
            Some(Box::new(EdgeStream::new(stream, header_timeout, None)));
        while let Some(stream) = next {
            next = self.inner.process_new(stream, shutdown).await;
        }
        None
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// One connection counted against `server.max_connections`; dropping it (when Pingora drops
/// the connection's stream, which owns it) gives the slot back.
struct Slot {
    gate: Arc<Gate>,
}

impl Slot {
    /// A slot, or `None` when `max` connections are open already (`max` 0: no cap).
    fn take(gate: &Arc<Gate>, max: usize) -> Option<Slot> {
        let open = gate.metrics.connection_opened();
        let slot = Slot { gate: gate.clone() };
        (max == 0 || open <= max as u64).then_some(slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.metrics.connection_closed();
    }
}

/// The 503 sent to a connection over the cap: OpenAI-shaped body, `Retry-After: 1`,
/// `Connection: close`.
fn refusal_response() -> Vec<u8> {
    let body = serde_json::json!({
        "error": {
            "message": "The gateway is at its connection limit; retry shortly.",
            "type": "api_error",
            "code": TOO_MANY_CONNECTIONS,
            "param": null,
        }
    })
    .to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {}\r\n\
         Retry-After: 1\r\n\
         X-SpiderGate-Error-Code: {TOO_MANY_CONNECTIONS}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Finds the end of the first request head (an empty line: `\r\n\r\n`, or bare `\n` line
/// ends as httparse accepts them) in bytes that arrive in arbitrary pieces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadScan {
    /// Nothing but (ignored) empty lines so far.
    Start,
    /// Inside a line.
    Line,
    /// Right after a line's `\n`.
    LineEnd,
    /// After a line's `\n` and then `\r`.
    LineEndCr,
    /// The head is complete.
    Done,
}

impl HeadScan {
    /// Feeds the next bytes read; true once the head is complete.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while let Some((&b, rest)) = bytes.split_first() {
            *self = match (*self, b) {
                (HeadScan::Done, _) => return true,
                (HeadScan::Start, b'\r' | b'\n') => HeadScan::Start,
                (HeadScan::LineEnd | HeadScan::LineEndCr, b'\n') => HeadScan::Done,
                (HeadScan::LineEnd, b'\r') => HeadScan::LineEndCr,
                (HeadScan::Start | HeadScan::Line | HeadScan::LineEnd | HeadScan::LineEndCr, _) => {
                    // A line with content: skip to its end in one go.
                    match memchr::memchr(b'\n', bytes) {
                        Some(i) => {
                            bytes = &bytes[i + 1..];
                            *self = HeadScan::LineEnd;
                            continue;
                        }
                        None => {
                            *self = HeadScan::Line;
                            return false;
                        }
                    }
                }
            };
            bytes = rest;
        }
        *self == HeadScan::Done
    }
}

/// Finds the end of the first request head of an HTTP/2 connection (TLS with ALPN `h2`):
/// after the 24-byte client preface, the first HEADERS or CONTINUATION frame that carries
/// END_HEADERS, payload included. Frames before it (SETTINGS, WINDOW_UPDATE, PING, ...)
/// count as waiting, so a client that only sends control frames is cut at the deadline just
/// like an HTTP/1 client trickling its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct H2Scan {
    /// Bytes still to skip: the preface, then each frame's payload.
    skip: usize,
    /// The frame header being read.
    header: [u8; 9],
    header_len: usize,
    /// The frame whose payload is being skipped ends the first head.
    last: bool,
    done: bool,
}

const H2_PREFACE_LEN: usize = 24;
const H2_HEADERS: u8 = 0x1;
const H2_CONTINUATION: u8 = 0x9;
const H2_END_HEADERS: u8 = 0x4;

impl H2Scan {
    fn new() -> Self {
        H2Scan {
            skip: H2_PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            last: false,
            done: false,
        }
    }

    /// Feeds the next bytes read; true once the first head is complete.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        while !self.done && !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                if self.skip == 0 && self.last {
                    self.done = true;
                }
                continue;
            }
            let n = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                let h = self.header;
                self.header_len = 0;
                let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
                self.last =
                    matches!(h[3], H2_HEADERS | H2_CONTINUATION) && h[4] & H2_END_HEADERS != 0;
                self.skip = len;
                if len == 0 && self.last {
                    self.done = true;
                }
            }
        }
        self.done
    }
}

/// The scanner for the connection's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scan {
    Http1(HeadScan),
    H2(H2Scan),
}

impl Scan {
    fn feed(&mut self, bytes: &[u8]) -> bool {
        match self {
            Scan::Http1(s) => s.feed(bytes),
            Scan::H2(s) => s.feed(bytes),
        }
    }
}

/// The first request head's deadline while it runs.
#[derive(Debug)]
struct HeadDeadline {
    sleep: Pin<Box<Sleep>>,
    scan: Scan,
}

/// A client connection: reads fail with `TimedOut` once the first request head has taken
/// longer than its deadline; after that head, every call forwards to the inner stream.
/// Owns the connection's `Slot`.
pub struct EdgeStream {
    inner: Stream,
    head: Option<HeadDeadline>,
    /// The agent listener's connections are counted; the admin listener's are not.
    _slot: Option<Slot>,
}

impl EdgeStream {
    fn new(inner: Stream, header_timeout: Duration, slot: Option<Slot>) -> Self {
        // TLS is done by now: ALPN says which protocol the bytes will speak.
        let scan = match inner.selected_alpn_proto() {
            Some(ALPN::H2) => Scan::H2(H2Scan::new()),
            _ => Scan::Http1(HeadScan::Start),
        };
        EdgeStream {
            inner,
            head: Some(HeadDeadline {
                sleep: Box::pin(tokio::time::sleep_until(Instant::now() + header_timeout)),
                scan,
            }),
            _slot: slot,
        }
    }
}

fn head_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the request head did not arrive within server.header_timeout_ms",
    )
}

impl AsyncRead for EdgeStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let Some(head) = this.head.as_mut() else {
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        };
        if head.sleep.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Err(head_timed_out()));
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            if head.scan.feed(&buf.filled()[before..]) {
                // The head is in: the timer goes, the wrapper only forwards from now on.
                this.head = None;
            }
        }
        polled
    }
}

impl AsyncWrite for EdgeStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for EdgeStream {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for EdgeStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for EdgeStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for EdgeStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for EdgeStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for EdgeStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for EdgeStream {
    /// Peeking (Pingora's h2c preface check) waits for bytes of the first head too, so it
    /// is bound by the same deadline.
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        match self.head.as_ref().map(|h| h.sleep.deadline()) {
            Some(deadline) => tokio::time::timeout_at(deadline, self.inner.try_peek(buf))
                .await
                .unwrap_or_else(|_| Err(head_timed_out())),
            None => self.inner.try_peek(buf).await,
        }
    }
}

impl std::fmt::Debug for EdgeStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EdgeStream")
            .field("inner", &self.inner)
            .field("head_pending", &self.head.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADS: [&[u8]; 5] = [
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET / HTTP/1.1\nHost: a\n\n",
        b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\n{}",
        b"GET / HTTP/1.1\r\n\r\n",
    ];

    /// An HTTP/2 client's first bytes: preface, SETTINGS, WINDOW_UPDATE, then a HEADERS
    /// frame of 5 bytes with END_HEADERS.
    fn h2_opening() -> (Vec<u8>, usize) {
        let mut b = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        b.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        b.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        b.extend_from_slice(&[0, 0, 5, 0x1, 0x4, 0, 0, 0, 1, 1, 2, 3, 4, 5]);
        let len = b.len();
        b.extend_from_slice(&[0, 0, 2, 0x0, 0x1, 0, 0, 0, 1, b'{', b'}']);
        (b, len)
    }

    #[test]
    fn an_h2_head_is_complete_after_its_headers_frame_however_it_is_split() {
        let (bytes, end) = h2_opening();
        for split in 0..=bytes.len() {
            let mut scan = H2Scan::new();
            let (a, b) = bytes.split_at(split);
            assert_eq!(scan.feed(a), split >= end, "split at {split}");
            assert!(scan.feed(b), "split at {split}");
        }
        let mut scan = H2Scan::new();
        let done_at = bytes
            .iter()
            .position(|b| scan.feed(std::slice::from_ref(b)));
        assert_eq!(done_at, Some(end - 1));
    }

    #[test]
    fn h2_control_frames_alone_or_headers_without_end_headers_are_not_a_head() {
        let (bytes, end) = h2_opening();
        let mut scan = H2Scan::new();
        assert!(
            !scan.feed(&bytes[..end - 14]),
            "preface, SETTINGS, WINDOW_UPDATE"
        );
        // HEADERS without END_HEADERS, then its CONTINUATION with it.
        let mut scan = H2Scan::new();
        let mut b = bytes[..end - 14].to_vec();
        b.extend_from_slice(&[0, 0, 2, 0x1, 0x0, 0, 0, 0, 1, 1, 2]);
        assert!(!scan.feed(&b));
        assert!(scan.feed(&[0, 0, 1, 0x9, 0x4, 0, 0, 0, 1, 9]));
    }

    #[test]
    fn a_head_is_complete_at_its_empty_line_however_it_is_split() {
        for head in HEADS {
            let end = head.len() - if head.ends_with(b"{}") { 2 } else { 0 };
            for split in 0..=head.len() {
                let mut scan = HeadScan::Start;
                let (a, b) = head.split_at(split);
                let first = scan.feed(a);
                assert_eq!(first, split >= end, "{head:?} split at {split}");
                assert!(scan.feed(b), "{head:?} split at {split}");
            }
            let mut scan = HeadScan::Start;
            let done_at = head.iter().position(|b| scan.feed(std::slice::from_ref(b)));
            assert_eq!(done_at, Some(end - 1), "{head:?} byte by byte");
        }
    }

    #[test]
    fn a_partial_head_or_leading_empty_lines_are_not_complete() {
        for partial in [
            &b""[..],
            b"\r\n\r\n\r\n",
            b"\n\n",
            b"GET / HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\n\r",
            b"GET / HTTP/1.1\r\nHost: a\r\r\n",
        ] {
            let mut scan = HeadScan::Start;
            assert!(!scan.feed(partial), "{partial:?}");
        }
    }

    #[test]
    fn the_refusal_is_a_complete_503_with_an_openai_error_body() {
        let raw = refusal_response();
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
        assert!(head.contains("\r\nRetry-After: 1"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains("\r\nX-SpiderGate-Error-Code: too_many_connections"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["code"], "too_many_connections");
        assert_eq!(v["error"]["type"], "api_error");
    }
}
