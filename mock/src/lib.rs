//! A fast mock OpenAI-compatible provider for the quickstart, the tests and the benchmarks.
//!
//! A hand-rolled HTTP/1.1 server (keep-alive, Content-Length or chunked request bodies up to
//! 64 MiB) that answers `.../chat/completions` (plain or SSE), `.../embeddings` and
//! `.../models`. Behaviour is steered per request by `x-mock-*` headers, which the gateway
//! forwards from its client:
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-prompt-tokens: N` / `x-mock-completion-tokens: M` | usage reported (default 10 / 5) |
//! | `x-mock-prompt-tokens: bytes` | prompt tokens reported = the request body's length in bytes (a worst case: every token at least one byte) |
//! | `x-mock-completion-tokens: max` | completion tokens reported = `n` x the larger of `max_tokens` / `max_completion_tokens` in the body (neither: 16; no `n`: 1), capped at 1,000,000,000: everything the request allows |
//! | `x-mock-status: S` | reply S with an OpenAI error body (`code` is `rate_limit_exceeded` for 429, else `mock_error`) |
//! | `x-mock-status-model: M` | apply `x-mock-status` only to requests whose body names model `M` |
//! | `x-mock-delay-ms: N` | wait N ms before the response head |
//! | `x-mock-chunks: N` | content chunks in a stream (default 3) |
//! | `x-mock-chunk-delay-ms: N` | wait N ms before every stream chunk after the first content chunk |
//! | `x-mock-break-after: N` | stream: close the connection after N content chunks; plain: close after the head and half the body |
//! | `x-mock-no-usage: 1` | never report usage |
//! | `x-mock-drop: 1` | read the whole request (after `x-mock-delay-ms`), then close the connection without any response |
//! | `x-mock-leak-headers: 1` | add provider-account headers to the response (plain, SSE and errors): `openai-organization: org-leak`, `openai-project: proj_leak`, `anthropic-organization-id: leak`, `set-cookie: a=b`, `x-ratelimit-limit-requests: 5000`, `x-ratelimit-remaining-tokens: 99` |
//!
//! The hot path (a plain chat request with default knobs) reuses per-connection buffers,
//! parses the body without copying and formats the reply without `format!`. The only shared
//! state it touches is two relaxed atomic counters and, when recording is on, one mutex.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

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

const DEFAULT_PROMPT_TOKENS: u64 = 10;
const DEFAULT_COMPLETION_TOKENS: u64 = 5;
const DEFAULT_CHUNKS: u64 = 3;
/// `x-mock-completion-tokens: max` for a request that sets no output bound.
const MAX_MODE_DEFAULT_OUTPUT: u64 = 16;
/// `x-mock-completion-tokens: max` never reports more than this.
const MAX_MODE_CAP: u64 = 1_000_000_000;
/// Headers `x-mock-leak-headers` adds: what a real provider says about the operator's account.
const LEAK_HEADERS: &[u8] = b"\r\nopenai-organization: org-leak\r\nopenai-project: proj_leak\r\nanthropic-organization-id: leak\r\nset-cookie: a=b\r\nx-ratelimit-limit-requests: 5000\r\nx-ratelimit-remaining-tokens: 99";
/// Caps `x-mock-chunks` so a typo cannot stream forever.
const MAX_CHUNKS: u64 = 1_000_000;
const DEFAULT_MODEL: &str = "mock-model";
const REPLY_TEXT: &str = "Hello from the SpiderGate mock provider.";
const STREAM_TOKEN: &str = "tok ";
const EMBEDDING_DIMS: usize = 8;

/// A running mock provider. Clones share one server, which stops (listener closed, open
/// connections aborted) when the last clone is dropped.
#[derive(Clone)]
pub struct MockProvider {
    shared: Arc<Shared>,
    addr: SocketAddr,
    _stop: Arc<watch::Sender<()>>,
}

impl std::fmt::Debug for MockProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockProvider")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// One request as the mock received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent, query string included.
    pub path: String,
    /// Header names lowercased, in arrival order.
    pub headers: Vec<(String, String)>,
    /// The body after de-chunking, byte for byte.
    pub body: Vec<u8>,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }
}

struct Shared {
    recording: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
}

impl Shared {
    fn requests(&self) -> MutexGuard<'_, Vec<RecordedRequest>> {
        // A panic while holding this lock cannot leave the Vec half-updated; keep going.
        match self.requests.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn add_usage(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.fetch_add(prompt, Ordering::Relaxed);
        if completion > 0 {
            self.completion_tokens
                .fetch_add(completion, Ordering::Relaxed);
        }
    }
}

impl MockProvider {
    /// Bind to `addr` (e.g. `"127.0.0.1:0"`) and serve in a background task on the current
    /// tokio runtime. Recording is on.
    pub async fn start(addr: &str) -> std::io::Result<MockProvider> {
        Self::bind(addr, true).await
    }

    /// Like [`MockProvider::start`], but serves from its own two-thread runtime on a std
    /// thread, for tests that are not async. The thread ends when the provider is dropped.
    pub fn start_background(addr: &str) -> std::io::Result<MockProvider> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-provider")
            .enable_all()
            .build()?;
        let provider = runtime.block_on(Self::bind(addr, true))?;
        let mut stopped = provider._stop.subscribe();
        std::thread::Builder::new()
            .name("mock-provider".into())
            .spawn(move || {
                // Resolves with Err once the last MockProvider clone drops the sender.
                let _ = runtime.block_on(stopped.changed());
            })?;
        Ok(provider)
    }

    async fn bind(addr: &str, recording: bool) -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            recording: AtomicBool::new(recording),
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
        });
        let (stop, stopped) = watch::channel(());
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped));
        Ok(MockProvider {
            shared,
            addr,
            _stop: Arc::new(stop),
        })
    }

    /// The bound address (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT/v1`, ready for a provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every request received since start or the last [`MockProvider::clear`], in order.
    /// A request is recorded before its response is sent.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.requests().clone()
    }

    /// Forget the recorded requests and reset [`MockProvider::served_usage`] to zero.
    pub fn clear(&self) {
        self.shared.requests().clear();
        self.shared.prompt_tokens.store(0, Ordering::Relaxed);
        self.shared.completion_tokens.store(0, Ordering::Relaxed);
    }

    /// (prompt, completion) tokens summed over every usage object this mock actually sent,
    /// in a JSON body or a stream's usage chunk. Counted just before the bytes are written,
    /// so a client that has read the usage always finds it counted here.
    pub fn served_usage(&self) -> (u64, u64) {
        (
            self.shared.prompt_tokens.load(Ordering::Relaxed),
            self.shared.completion_tokens.load(Ordering::Relaxed),
        )
    }

    /// Turn request recording on or off (on after `start`, off under `run_blocking`).
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }
}

/// Serve on `listen` forever from a multi-thread runtime with one worker per core, with
/// recording off. For `spidergate mock-provider --listen ADDR`.
pub fn run_blocking(listen: &str) -> std::io::Result<()> {
    run_blocking_with_threads(listen, 0)
}

/// [`run_blocking`] with `threads` runtime workers (0: one per core). Benchmarks that run
/// the gateway and the load generator on the same machine want only a few.
pub fn run_blocking_with_threads(listen: &str, threads: usize) -> std::io::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("mock-provider");
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = builder.build()?;
    runtime.block_on(async {
        let provider = MockProvider::bind(listen, false).await?;
        let _ = writeln!(
            std::io::stderr(),
            "mock OpenAI-compatible provider listening; base_url: {}",
            provider.base_url()
        );
        std::future::pending::<()>().await;
        drop(provider);
        Ok(())
    })
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stopped: watch::Receiver<()>) {
    // Owning the connection tasks here means returning (on stop) aborts them all.
    let mut connections = JoinSet::new();
    let mut next_id: u64 = 0;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                next_id += 1;
                connections.spawn(serve_connection(stream, Arc::clone(&shared), next_id));
                while connections.try_join_next().is_some() {}
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}

async fn serve_connection(mut stream: TcpStream, shared: Arc<Shared>, id: u64) {
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        id,
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Post,
    Other,
}

struct Knobs {
    prompt_tokens: u64,
    completion_tokens: u64,
    status: Option<u16>,
    delay_ms: u64,
    chunks: u64,
    chunk_delay_ms: u64,
    break_after: Option<u64>,
    no_usage: bool,
    /// `x-mock-status` applies only to requests for this model (fallback tests).
    status_model: Option<Vec<u8>>,
    /// `x-mock-prompt-tokens: bytes`: report the body length as prompt tokens.
    prompt_from_body: bool,
    /// `x-mock-completion-tokens: max`: report everything the request allows.
    completion_from_max: bool,
    /// `x-mock-drop: 1`: close without answering.
    drop: bool,
    /// `x-mock-leak-headers: 1`: add provider-account headers to the response.
    leak_headers: bool,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            prompt_tokens: DEFAULT_PROMPT_TOKENS,
            completion_tokens: DEFAULT_COMPLETION_TOKENS,
            status: None,
            delay_ms: 0,
            chunks: DEFAULT_CHUNKS,
            chunk_delay_ms: 0,
            break_after: None,
            no_usage: false,
            status_model: None,
            prompt_from_body: false,
            completion_from_max: false,
            drop: false,
            leak_headers: false,
        }
    }
}

struct Head {
    method: Method,
    head_len: usize,
    content_length: Option<usize>,
    chunked: bool,
    expect_continue: bool,
    keep_alive: bool,
    knobs: Knobs,
    /// Method and headers, only when recording.
    recorded: Option<(String, Vec<(String, String)>)>,
}

enum BodyAt {
    /// `buf[start..end]`; the request ends at `end`.
    InBuf { start: usize, end: usize },
    /// De-chunked into `Conn::body`; the request ends at `buf[consumed]`.
    Decoded { consumed: usize },
}

impl Conn {
    /// Serve one request; `true` when the connection stays open for the next.
    async fn serve_one(&mut self, stream: &mut TcpStream, shared: &Shared) -> bool {
        let record = shared.recording.load(Ordering::Relaxed);
        let head = match self.read_head(stream, record).await {
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
        let (body, consumed): (&[u8], usize) = match body_at {
            BodyAt::InBuf { start, end } => (&self.buf[start..end], end),
            BodyAt::Decoded { consumed } => (&self.body, consumed),
        };
        if let Some((method, headers)) = head.recorded {
            shared.requests().push(RecordedRequest {
                method,
                path: self.path.clone(),
                headers,
                body: body.to_vec(),
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
        let kept = reply
            .respond(head.method, &self.path, &head.knobs, body)
            .await
            .is_ok()
            && head.keep_alive;
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
    async fn read_head(
        &mut self,
        stream: &mut TcpStream,
        record: bool,
    ) -> Result<Option<Head>, Abort> {
        loop {
            if !self.buf.is_empty() {
                if let Some(head) = parse_head(&self.buf, &mut self.path, record)? {
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

    async fn read_body(&mut self, stream: &mut TcpStream, head: &Head) -> Result<BodyAt, Abort> {
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

async fn send_continue(stream: &mut TcpStream) -> Result<(), Abort> {
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
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), Abort> {
    reserve_for_read(buf);
    match stream.read_buf(buf).await {
        Ok(0) | Err(_) => Err(Abort::Closed),
        Ok(_) => Ok(()),
    }
}

/// Parse a request head from the start of `buf`. `Ok(None)`: incomplete so far.
fn parse_head(buf: &[u8], path: &mut String, record: bool) -> Result<Option<Head>, Abort> {
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
        recorded: None,
    };
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

/// Unparseable knob values are ignored, leaving the default.
fn apply_knob(knobs: &mut Knobs, knob: &str, value: &[u8]) {
    let number = parse_decimal(value).map(|n| n as u64);
    let knob = knob.as_bytes();
    if knob.eq_ignore_ascii_case(b"prompt-tokens") {
        knobs.prompt_from_body = value.eq_ignore_ascii_case(b"bytes");
        knobs.prompt_tokens = number.unwrap_or(knobs.prompt_tokens);
    } else if knob.eq_ignore_ascii_case(b"completion-tokens") {
        knobs.completion_from_max = value.eq_ignore_ascii_case(b"max");
        knobs.completion_tokens = number.unwrap_or(knobs.completion_tokens);
    } else if knob.eq_ignore_ascii_case(b"status") {
        knobs.status = number
            .filter(|s| (200..=599).contains(s))
            .and_then(|s| u16::try_from(s).ok());
    } else if knob.eq_ignore_ascii_case(b"delay-ms") {
        knobs.delay_ms = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"chunks") {
        knobs.chunks = number.unwrap_or(DEFAULT_CHUNKS).min(MAX_CHUNKS);
    } else if knob.eq_ignore_ascii_case(b"chunk-delay-ms") {
        knobs.chunk_delay_ms = number.unwrap_or(0);
    } else if knob.eq_ignore_ascii_case(b"break-after") {
        knobs.break_after = number;
    } else if knob.eq_ignore_ascii_case(b"status-model") {
        let mut quoted = Vec::with_capacity(value.len() + 2);
        quoted.push(b'"');
        quoted.extend_from_slice(value);
        quoted.push(b'"');
        knobs.status_model = Some(quoted);
    } else if knob.eq_ignore_ascii_case(b"no-usage") {
        knobs.no_usage = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"drop") {
        knobs.drop = truthy(value);
    } else if knob.eq_ignore_ascii_case(b"leak-headers") {
        knobs.leak_headers = truthy(value);
    }
}

fn truthy(value: &[u8]) -> bool {
    !(value.is_empty() || value == b"0" || value.eq_ignore_ascii_case(b"false"))
}

/// A token count from a JSON number of any shape: integers as they are (saturating at
/// `u64::MAX`), other finite non-negative numbers truncated; anything else is `None`.
fn lenient_count(raw: Option<&RawValue>) -> Option<u64> {
    let text = raw?.get();
    if let Ok(n) = text.parse::<u64>() {
        return Some(n);
    }
    match serde_json::from_str::<f64>(text) {
        // `as` saturates: 1e30 becomes u64::MAX.
        Ok(f) if f.is_finite() && f >= 0.0 => Some(f as u64),
        _ => None,
    }
}

impl Knobs {
    /// (prompt, completion) tokens this request is billed, after the `bytes` / `max` modes.
    fn usage(&self, body: &[u8], output: Option<&OutputFields<'_>>) -> (u64, u64) {
        let prompt = if self.prompt_from_body {
            body.len() as u64
        } else {
            self.prompt_tokens
        };
        let completion = match output {
            Some(o) if self.completion_from_max => {
                let per_choice = match (
                    lenient_count(o.max_tokens),
                    lenient_count(o.max_completion_tokens),
                ) {
                    (None, None) => MAX_MODE_DEFAULT_OUTPUT,
                    (a, b) => a.unwrap_or(0).max(b.unwrap_or(0)),
                };
                let n = lenient_count(o.n).unwrap_or(1);
                n.saturating_mul(per_choice).min(MAX_MODE_CAP)
            }
            _ => self.completion_tokens,
        };
        (prompt, completion)
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Strict unsigned decimal (no sign, no spaces inside), at most 18 digits.
fn parse_decimal(s: &[u8]) -> Option<usize> {
    if s.is_empty() || s.len() > 18 {
        return None;
    }
    let mut n: usize = 0;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add(usize::from(b - b'0'))?;
    }
    Some(n)
}

/// The size on a chunk-size line, ignoring chunk extensions.
fn parse_chunk_size(line: &[u8]) -> Option<usize> {
    let digits = match memchr::memchr(b';', line) {
        Some(i) => &line[..i],
        None => line,
    };
    let digits = trim(digits);
    if digits.is_empty() || digits.len() > 15 {
        return None;
    }
    let mut n: usize = 0;
    for &b in digits {
        let d = char::from(b).to_digit(16)?;
        n = n.checked_mul(16)?.checked_add(d as usize)?;
    }
    Some(n)
}

/// Decode a chunked body that starts at `buf[pos]` into `body`, reading as needed. Consumed
/// bytes are dropped from `buf` on the way, so a large body is never held twice; returns
/// where the request ends in `buf`.
async fn read_chunked(
    stream: &mut TcpStream,
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
    stream: &mut TcpStream,
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
async fn reject(stream: &mut TcpStream, out: &mut Vec<u8>, status: u16) {
    let (message, code) = match status {
        413 => ("request body too large", "request_too_large"),
        431 => ("request head too large", "invalid_request"),
        _ => ("malformed HTTP request", "invalid_request"),
    };
    let mut json = Vec::with_capacity(160);
    push_error(&mut json, message, "invalid_request_error", code);
    out.clear();
    push_head(
        out,
        status,
        b"application/json",
        Some(json.len()),
        true,
        false,
    );
    out.extend_from_slice(&json);
    let _ = stream.write_all(out).await;
    let _ = stream.shutdown().await;
}

#[derive(Deserialize)]
struct ChatRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    // The fields `x-mock-completion-tokens: max` reads, kept raw (no allocation) so any
    // JSON value parses; they are only interpreted when that knob is on.
    #[serde(borrow, default)]
    max_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    max_completion_tokens: Option<&'a RawValue>,
    #[serde(borrow, default)]
    n: Option<&'a RawValue>,
}

/// The output-bounding fields of a chat request.
struct OutputFields<'a> {
    max_tokens: Option<&'a RawValue>,
    max_completion_tokens: Option<&'a RawValue>,
    n: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: Option<bool>,
}

#[derive(Deserialize)]
struct EmbeddingRequest<'a> {
    #[serde(borrow, default)]
    model: Cow<'a, str>,
    #[serde(default)]
    input: serde_json::Value,
}

/// Writes one response. `Err(())`: the connection must close now (write failed or a
/// `x-mock-break-after` break).
struct Reply<'a> {
    stream: &'a mut TcpStream,
    out: &'a mut Vec<u8>,
    json: &'a mut Vec<u8>,
    shared: &'a Shared,
    close: bool,
    conn_id: u64,
    request_no: u64,
}

type Sent = Result<(), ()>;

impl Reply<'_> {
    async fn respond(&mut self, method: Method, target: &str, knobs: &Knobs, body: &[u8]) -> Sent {
        if knobs.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(knobs.delay_ms)).await;
        }
        let status_applies = knobs
            .status_model
            .as_deref()
            .is_none_or(|m| memchr::memmem::find(body, m).is_some());
        if let Some(status) = knobs.status.filter(|&s| s != 200 && status_applies) {
            let code = if status == 429 {
                "rate_limit_exceeded"
            } else {
                "mock_error"
            };
            self.json.clear();
            push_error(self.json, "mock error", "server_error", code);
            return self.send_json(status, knobs, None).await;
        }
        let path = match memchr::memchr(b'?', target.as_bytes()) {
            Some(i) => &target[..i],
            None => target,
        };
        let path = path.strip_suffix('/').unwrap_or(path);
        match method {
            Method::Post if path.ends_with("/chat/completions") => self.chat(knobs, body).await,
            Method::Post if path.ends_with("/embeddings") => self.embeddings(knobs, body).await,
            Method::Get if path.ends_with("/models") => {
                self.json.clear();
                self.json.extend_from_slice(br#"{"object":"list","data":["#);
                for (i, id) in [DEFAULT_MODEL, "mock-embedding"].iter().enumerate() {
                    if i > 0 {
                        self.json.push(b',');
                    }
                    push_model(self.json, id);
                }
                self.json.extend_from_slice(b"]}");
                self.send_json(200, knobs, None).await
            }
            Method::Get if path.contains("/models/") => {
                let id = path.rsplit('/').next().unwrap_or(DEFAULT_MODEL);
                self.json.clear();
                push_model(self.json, id);
                self.send_json(200, knobs, None).await
            }
            Method::Get if path == "/health" => {
                self.json.clear();
                self.json.extend_from_slice(br#"{"status":"ok"}"#);
                self.send_json(200, knobs, None).await
            }
            _ => {
                self.json.clear();
                push_error(
                    self.json,
                    "unknown route",
                    "invalid_request_error",
                    "not_found",
                );
                self.send_json(404, knobs, None).await
            }
        }
    }

    async fn chat(&mut self, knobs: &Knobs, body: &[u8]) -> Sent {
        let request: ChatRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(knobs).await,
        };
        let model = if request.model.is_empty() {
            DEFAULT_MODEL
        } else {
            &request.model
        };
        let output = OutputFields {
            max_tokens: request.max_tokens,
            max_completion_tokens: request.max_completion_tokens,
            n: request.n,
        };
        let (prompt, completion) = knobs.usage(body, Some(&output));
        if request.stream == Some(true) {
            let include_usage = request
                .stream_options
                .and_then(|o| o.include_usage)
                .unwrap_or(false);
            return self
                .chat_stream(knobs, model, include_usage, (prompt, completion))
                .await;
        }
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"id":"#);
        push_completion_id(json, self.conn_id, self.request_no);
        json.extend_from_slice(br#","object":"chat.completion","created":"#);
        push_u64(json, unix_now());
        json.extend_from_slice(br#","model":"#);
        push_json_str(json, model);
        json.extend_from_slice(
            br#","choices":[{"index":0,"message":{"role":"assistant","content":"#,
        );
        push_json_str(json, REPLY_TEXT);
        json.extend_from_slice(br#"},"logprobs":null,"finish_reason":"stop"}]"#);
        if !knobs.no_usage {
            json.extend_from_slice(b",");
            push_usage(json, prompt, completion);
        }
        json.push(b'}');
        let usage = (!knobs.no_usage).then_some((prompt, completion));
        self.send_json(200, knobs, usage).await
    }

    async fn chat_stream(
        &mut self,
        knobs: &Knobs,
        model: &str,
        include_usage: bool,
        (prompt, completion): (u64, u64),
    ) -> Sent {
        self.out.clear();
        push_head(
            self.out,
            200,
            b"text/event-stream",
            None,
            self.close,
            knobs.leak_headers,
        );
        self.write_out().await?;
        for i in 0..knobs.chunks {
            if knobs.break_after.is_some_and(|n| i >= n) {
                return Err(());
            }
            if i > 0 && knobs.chunk_delay_ms > 0 {
                tokio::time::sleep(Duration::from_millis(knobs.chunk_delay_ms)).await;
            }
            self.chunk_prefix(model);
            self.json
                .extend_from_slice(br#","choices":[{"index":0,"delta":{"content":"#);
            push_json_str(self.json, STREAM_TOKEN);
            self.json
                .extend_from_slice(br#"},"finish_reason":null}],"usage":null}"#);
            self.send_event().await?;
        }
        if knobs.break_after.is_some() {
            return Err(());
        }
        if knobs.chunk_delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(knobs.chunk_delay_ms)).await;
        }
        self.chunk_prefix(model);
        self.json.extend_from_slice(
            br#","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}"#,
        );
        self.send_event().await?;
        if include_usage && !knobs.no_usage {
            self.chunk_prefix(model);
            self.json.extend_from_slice(br#","choices":[],"#);
            push_usage(self.json, prompt, completion);
            self.json.push(b'}');
            self.shared.add_usage(prompt, completion);
            self.send_event().await?;
        }
        self.json.clear();
        self.json.extend_from_slice(b"[DONE]");
        self.send_event().await?;
        self.out.clear();
        self.out.extend_from_slice(b"0\r\n\r\n");
        self.write_out().await
    }

    /// `{"id":...,"object":"chat.completion.chunk","created":...,"model":...` into `json`.
    fn chunk_prefix(&mut self, model: &str) {
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"id":"#);
        push_completion_id(json, self.conn_id, self.request_no);
        json.extend_from_slice(br#","object":"chat.completion.chunk","created":"#);
        push_u64(json, unix_now());
        json.extend_from_slice(br#","model":"#);
        push_json_str(json, model);
    }

    async fn embeddings(&mut self, knobs: &Knobs, body: &[u8]) -> Sent {
        let request: EmbeddingRequest<'_> = match serde_json::from_slice(body) {
            Ok(request) => request,
            Err(_) => return self.bad_json(knobs).await,
        };
        let model = if request.model.is_empty() {
            "mock-embedding"
        } else {
            &request.model
        };
        // A string, a token array (one input), or an array of strings / token arrays.
        let inputs: &[serde_json::Value] = match &request.input {
            serde_json::Value::Array(items) if !items.iter().all(serde_json::Value::is_number) => {
                items
            }
            single => std::slice::from_ref(single),
        };
        let (prompt, _) = knobs.usage(body, None);
        let json = &mut *self.json;
        json.clear();
        json.extend_from_slice(br#"{"object":"list","data":["#);
        for (index, input) in inputs.iter().enumerate() {
            if index > 0 {
                json.push(b',');
            }
            json.extend_from_slice(br#"{"object":"embedding","index":"#);
            push_u64(json, index as u64);
            json.extend_from_slice(br#","embedding":["#);
            let digest = match input {
                serde_json::Value::String(text) => Sha256::digest(text.as_bytes()),
                other => Sha256::digest(other.to_string().as_bytes()),
            };
            for dim in 0..EMBEDDING_DIMS {
                if dim > 0 {
                    json.push(b',');
                }
                let hi = digest[2 * dim];
                let lo = digest[2 * dim + 1];
                if hi & 0x80 != 0 {
                    json.push(b'-');
                }
                json.extend_from_slice(b"0.");
                let fraction = u16::from_be_bytes([hi & 0x7f, lo]) % 10_000;
                let start = json.len();
                push_u64(json, u64::from(fraction) + 10_000);
                json.remove(start); // drop the leading 1: zero-padded 4 digits
            }
            json.extend_from_slice(b"]}");
        }
        json.extend_from_slice(br#"],"model":"#);
        push_json_str(json, model);
        if !knobs.no_usage {
            json.extend_from_slice(br#","usage":{"prompt_tokens":"#);
            push_u64(json, prompt);
            json.extend_from_slice(br#","total_tokens":"#);
            push_u64(json, prompt);
            json.push(b'}');
        }
        json.push(b'}');
        let usage = (!knobs.no_usage).then_some((prompt, 0));
        self.send_json(200, knobs, usage).await
    }

    async fn bad_json(&mut self, knobs: &Knobs) -> Sent {
        self.json.clear();
        push_error(
            self.json,
            "request body is not valid JSON for this endpoint",
            "invalid_request_error",
            "invalid_request",
        );
        self.send_json(400, knobs, None).await
    }

    /// Send `self.json` as the whole body; `usage` is what it reports, counted just before
    /// the write unless `x-mock-break-after` cuts the body in half (usage is at its end).
    async fn send_json(&mut self, status: u16, knobs: &Knobs, usage: Option<(u64, u64)>) -> Sent {
        self.out.clear();
        push_head(
            self.out,
            status,
            b"application/json",
            Some(self.json.len()),
            self.close,
            knobs.leak_headers,
        );
        if knobs.break_after.is_some() {
            self.out
                .extend_from_slice(&self.json[..self.json.len() / 2]);
            let _ = self.write_out().await;
            return Err(());
        }
        if let Some((prompt, completion)) = usage {
            self.shared.add_usage(prompt, completion);
        }
        self.out.extend_from_slice(self.json);
        self.write_out().await
    }

    /// One SSE event (`data: <json>\n\n`) as one HTTP chunk, in one write.
    async fn send_event(&mut self) -> Sent {
        let len = b"data: ".len() + self.json.len() + b"\n\n".len();
        self.out.clear();
        push_hex(self.out, len);
        self.out.extend_from_slice(b"\r\ndata: ");
        self.out.extend_from_slice(self.json);
        self.out.extend_from_slice(b"\n\n\r\n");
        self.write_out().await
    }

    async fn write_out(&mut self) -> Sent {
        self.stream.write_all(self.out).await.map_err(|_| ())
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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

/// Status line and headers; `content_length: None` means a chunked body.
fn push_head(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &[u8],
    content_length: Option<usize>,
    close: bool,
    leak: bool,
) {
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
    if close {
        out.extend_from_slice(b"\r\nconnection: close");
    }
    if leak {
        out.extend_from_slice(LEAK_HEADERS);
    }
    out.extend_from_slice(b"\r\n\r\n");
}

fn push_error(json: &mut Vec<u8>, message: &str, kind: &str, code: &str) {
    json.extend_from_slice(br#"{"error":{"message":"#);
    push_json_str(json, message);
    json.extend_from_slice(br#","type":"#);
    push_json_str(json, kind);
    json.extend_from_slice(br#","code":"#);
    push_json_str(json, code);
    json.extend_from_slice(br#","param":null}}"#);
}

fn push_model(json: &mut Vec<u8>, id: &str) {
    json.extend_from_slice(br#"{"id":"#);
    push_json_str(json, id);
    json.extend_from_slice(
        br#","object":"model","created":1700000000,"owned_by":"spidergate-mock"}"#,
    );
}

fn push_usage(json: &mut Vec<u8>, prompt: u64, completion: u64) {
    json.extend_from_slice(br#""usage":{"prompt_tokens":"#);
    push_u64(json, prompt);
    json.extend_from_slice(br#","completion_tokens":"#);
    push_u64(json, completion);
    json.extend_from_slice(br#","total_tokens":"#);
    push_u64(json, prompt.saturating_add(completion));
    json.push(b'}');
}

fn push_completion_id(json: &mut Vec<u8>, conn_id: u64, request_no: u64) {
    json.extend_from_slice(b"\"chatcmpl-mock-");
    push_u64(json, conn_id);
    json.push(b'-');
    push_u64(json, request_no);
    json.push(b'"');
}

fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fn push_hex(out: &mut Vec<u8>, mut n: usize) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

/// `s` as a quoted JSON string.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0..=0x1f => b"",
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..i]);
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::{json, Value};
    use std::time::Instant;

    /// A raw HTTP/1.1 client over one TCP connection, so tests see exactly what the mock sent.
    struct Client {
        stream: TcpStream,
        buf: Vec<u8>,
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        /// The body ended as its framing said (false: the connection closed early).
        complete: bool,
        /// For chunked bodies, each chunk's payload as received.
        chunks: Vec<Vec<u8>>,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn json(&self) -> Value {
            serde_json::from_slice(&self.body).unwrap()
        }

        /// The `data:` payloads of an SSE body, in order.
        fn events(&self) -> Vec<String> {
            String::from_utf8(self.body.clone())
                .unwrap()
                .split("\n\n")
                .filter(|e| !e.is_empty())
                .map(|e| e.strip_prefix("data: ").unwrap().to_owned())
                .collect()
        }
    }

    impl Client {
        async fn connect(mock: &MockProvider) -> Client {
            Client {
                stream: TcpStream::connect(mock.addr()).await.unwrap(),
                buf: Vec::new(),
            }
        }

        async fn send(&mut self, raw: &[u8]) {
            self.stream.write_all(raw).await.unwrap();
        }

        async fn post(&mut self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
            let mut raw = format!(
                "POST {path} HTTP/1.1\r\nhost: mock\r\ncontent-type: application/json\r\ncontent-length: {}\r\n",
                body.len()
            );
            for (name, value) in headers {
                raw.push_str(&format!("{name}: {value}\r\n"));
            }
            raw.push_str("\r\n");
            let mut raw = raw.into_bytes();
            raw.extend_from_slice(body);
            self.send(&raw).await;
            self.read_response().await
        }

        async fn chat(&mut self, headers: &[(&str, &str)], body: Value) -> Response {
            self.post("/v1/chat/completions", headers, body.to_string().as_bytes())
                .await
        }

        /// false on EOF.
        async fn fill(&mut self) -> bool {
            let mut tmp = [0u8; 65536];
            match self.stream.read(&mut tmp).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    true
                }
            }
        }

        async fn line(&mut self) -> Option<Vec<u8>> {
            loop {
                if let Some(i) = memchr::memmem::find(&self.buf, b"\r\n") {
                    let line = self.buf[..i].to_vec();
                    self.buf.drain(..i + 2);
                    return Some(line);
                }
                if !self.fill().await {
                    return None;
                }
            }
        }

        async fn read_response(&mut self) -> Response {
            let (status, headers, head_len) = loop {
                let mut parsed = [httparse::EMPTY_HEADER; 32];
                let mut response = httparse::Response::new(&mut parsed);
                if let httparse::Status::Complete(n) = response.parse(&self.buf).unwrap() {
                    let headers = response
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_ascii_lowercase(),
                                String::from_utf8(h.value.to_vec()).unwrap(),
                            )
                        })
                        .collect::<Vec<_>>();
                    break (response.code.unwrap(), headers, n);
                }
                assert!(
                    self.fill().await,
                    "connection closed before the response head"
                );
            };
            self.buf.drain(..head_len);
            let mut resp = Response {
                status,
                headers,
                body: Vec::new(),
                complete: false,
                chunks: Vec::new(),
            };
            if let Some(len) = resp.header("content-length") {
                let len: usize = len.parse().unwrap();
                while self.buf.len() < len {
                    if !self.fill().await {
                        resp.body = std::mem::take(&mut self.buf);
                        return resp;
                    }
                }
                resp.body = self.buf.drain(..len).collect();
                resp.complete = true;
            } else if resp.header("transfer-encoding") == Some("chunked") {
                loop {
                    let Some(line) = self.line().await else {
                        return resp;
                    };
                    let size =
                        usize::from_str_radix(std::str::from_utf8(&line).unwrap(), 16).unwrap();
                    while self.buf.len() < size + 2 {
                        if !self.fill().await {
                            return resp;
                        }
                    }
                    let chunk: Vec<u8> = self.buf.drain(..size).collect();
                    assert_eq!(self.buf.drain(..2).collect::<Vec<_>>(), b"\r\n");
                    if size == 0 {
                        resp.complete = true;
                        return resp;
                    }
                    resp.body.extend_from_slice(&chunk);
                    resp.chunks.push(chunk);
                }
            }
            resp
        }

        /// True when the server has closed the connection (EOF with nothing more sent).
        async fn closed(&mut self) -> bool {
            let mut tmp = [0u8; 16];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut tmp)).await,
                Ok(Ok(0)) | Ok(Err(_))
            )
        }
    }

    async fn mock() -> MockProvider {
        MockProvider::start("127.0.0.1:0").await.unwrap()
    }

    #[tokio::test]
    async fn plain_chat_echoes_model_and_reports_default_usage() {
        let mock = mock().await;
        assert_eq!(
            mock.base_url(),
            format!("http://127.0.0.1:{}/v1", mock.addr().port())
        );
        let mut client = Client::connect(&mock).await;
        let body = json!({"model": "gpt-\"4o\"", "messages": [{"role": "user", "content": "hi"}]});
        let resp = client
            .chat(&[("authorization", "Bearer sk-up")], body.clone())
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let json = resp.json();
        assert_eq!(json["object"], "chat.completion");
        assert_eq!(json["model"], "gpt-\"4o\"");
        assert_eq!(json["choices"][0]["message"]["role"], "assistant");
        assert_eq!(json["choices"][0]["finish_reason"], "stop");
        assert_eq!(
            json["usage"],
            json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15})
        );
        assert_eq!(mock.served_usage(), (10, 5));

        let recorded = mock.requests();
        assert_eq!(recorded.len(), 1);
        assert_eq!(recorded[0].method, "POST");
        assert_eq!(recorded[0].path, "/v1/chat/completions");
        assert_eq!(recorded[0].header("Authorization"), Some("Bearer sk-up"));
        assert_eq!(recorded[0].json(), Some(body));

        mock.clear();
        assert!(mock.requests().is_empty());
        assert_eq!(mock.served_usage(), (0, 0));
    }

    #[tokio::test]
    async fn usage_knobs_and_no_usage() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let knobs = [
            ("x-mock-prompt-tokens", "123"),
            ("x-mock-completion-tokens", "45"),
        ];
        let resp = client.chat(&knobs, json!({"model": "m"})).await;
        assert_eq!(resp.json()["usage"]["total_tokens"], 168);
        let resp = client
            .chat(&[("X-Mock-No-Usage", "1")], json!({"model": "m"}))
            .await;
        assert_eq!(resp.status, 200);
        assert!(resp.json().get("usage").is_none());
        assert_eq!(mock.served_usage(), (123, 45));
    }

    #[tokio::test]
    async fn bytes_and_max_billing_modes() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let knobs = [
            ("x-mock-prompt-tokens", "bytes"),
            ("x-mock-completion-tokens", "max"),
        ];
        let cases = [
            (json!({"model": "m"}), 16),
            (json!({"model": "m", "max_tokens": 7}), 7),
            (
                json!({"model": "m", "max_tokens": 3, "max_completion_tokens": 9, "n": 2}),
                18,
            ),
            (
                json!({"model": "m", "max_completion_tokens": 40, "max_tokens": 1}),
                40,
            ),
            (json!({"model": "m", "max_tokens": 10, "n": 8}), 80),
            (json!({"model": "m", "max_tokens": u64::MAX}), MAX_MODE_CAP),
            (
                json!({"model": "m", "max_tokens": 1e30, "n": 3}),
                MAX_MODE_CAP,
            ),
            (json!({"model": "m", "max_tokens": 2.5}), 2),
        ];
        let mut expected = (0, 0);
        for (body, completion) in cases {
            let len = body.to_string().len() as u64;
            let resp = client.chat(&knobs, body.clone()).await;
            assert_eq!(resp.json()["usage"]["prompt_tokens"], len, "{body}");
            assert_eq!(
                resp.json()["usage"]["completion_tokens"],
                completion,
                "{body}"
            );
            expected.0 += len;
            expected.1 += completion;
        }
        let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}, "max_tokens": 5, "n": 3});
        let len = body.to_string().len() as u64;
        let resp = client.chat(&knobs, body).await;
        let usage: Value = serde_json::from_str(&resp.events()[4]).unwrap();
        assert_eq!(usage["usage"]["prompt_tokens"], len);
        assert_eq!(usage["usage"]["completion_tokens"], 15);
        assert_eq!(mock.served_usage(), (expected.0 + len, expected.1 + 15));
    }

    #[tokio::test]
    async fn drop_closes_without_a_response_and_leak_adds_account_headers() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let resp = client
            .chat(&[("x-mock-leak-headers", "1")], json!({"model": "m"}))
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("openai-organization"), Some("org-leak"));
        assert_eq!(resp.header("x-ratelimit-limit-requests"), Some("5000"));
        assert_eq!(resp.header("set-cookie"), Some("a=b"));
        let resp = client
            .chat(
                &[("x-mock-leak-headers", "1")],
                json!({"model": "m", "stream": true}),
            )
            .await;
        assert!(resp.complete);
        assert_eq!(resp.header("openai-project"), Some("proj_leak"));
        client
            .send(b"POST /v1/chat/completions HTTP/1.1\r\nx-mock-drop: 1\r\ncontent-length: 2\r\n\r\n{}")
            .await;
        assert!(client.closed().await, "dropped without a response");
        assert_eq!(mock.requests().len(), 3, "the dropped request was read");
    }

    #[tokio::test]
    async fn stream_without_include_usage_has_no_usage_chunk() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let resp = client
            .chat(&[], json!({"model": "m1", "stream": true}))
            .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        assert!(resp.complete);
        let events = resp.events();
        assert_eq!(events.len(), 3 + 1 + 1, "{events:?}");
        assert_eq!(resp.chunks.len(), events.len(), "one event per HTTP chunk");
        for event in &events[..3] {
            let chunk: Value = serde_json::from_str(event).unwrap();
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "m1");
            assert_eq!(chunk["choices"][0]["delta"]["content"], "tok ");
            assert_eq!(chunk["choices"][0]["finish_reason"], Value::Null);
            assert_eq!(chunk["usage"], Value::Null);
        }
        let last: Value = serde_json::from_str(&events[3]).unwrap();
        assert_eq!(last["choices"][0]["finish_reason"], "stop");
        assert_eq!(events[4], "[DONE]");
        assert_eq!(mock.served_usage(), (0, 0));
    }

    #[tokio::test]
    async fn stream_with_include_usage_ends_with_usage_chunk() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let knobs = [
            ("x-mock-chunks", "5"),
            ("x-mock-prompt-tokens", "7"),
            ("x-mock-completion-tokens", "9"),
            ("x-mock-chunk-delay-ms", "1"),
        ];
        let body =
            json!({"model": "m2", "stream": true, "stream_options": {"include_usage": true}});
        let resp = client.chat(&knobs, body).await;
        assert!(resp.complete);
        let events = resp.events();
        assert_eq!(events.len(), 5 + 1 + 1 + 1, "{events:?}");
        let usage: Value = serde_json::from_str(&events[6]).unwrap();
        assert_eq!(usage["choices"], json!([]));
        assert_eq!(usage["model"], "m2");
        assert_eq!(
            usage["usage"],
            json!({"prompt_tokens": 7, "completion_tokens": 9, "total_tokens": 16})
        );
        assert_eq!(events[7], "[DONE]");
        assert_eq!(mock.served_usage(), (7, 9));
    }

    #[tokio::test]
    async fn embeddings_one_vector_per_input() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let body = json!({"model": "emb", "input": ["a", "b"]}).to_string();
        let resp = client.post("/v1/embeddings", &[], body.as_bytes()).await;
        assert_eq!(resp.status, 200);
        let json = resp.json();
        assert_eq!(json["object"], "list");
        assert_eq!(json["model"], "emb");
        let data = json["data"].as_array().unwrap();
        assert_eq!(data.len(), 2);
        assert_eq!(data[1]["index"], 1);
        assert_eq!(
            data[0]["embedding"].as_array().unwrap().len(),
            EMBEDDING_DIMS
        );
        assert_ne!(data[0]["embedding"], data[1]["embedding"]);
        assert_eq!(
            json["usage"],
            json!({"prompt_tokens": 10, "total_tokens": 10})
        );

        let body = json!({"model": "emb", "input": "just one"}).to_string();
        let resp = client.post("/v1/embeddings", &[], body.as_bytes()).await;
        assert_eq!(resp.json()["data"].as_array().unwrap().len(), 1);
        assert_eq!(mock.served_usage(), (20, 0));
    }

    #[tokio::test]
    async fn models_list() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        client
            .send(b"GET /v1/models HTTP/1.1\r\nhost: mock\r\n\r\n")
            .await;
        let resp = client.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["object"], "list");
        assert_eq!(resp.json()["data"][0]["object"], "model");
    }

    #[tokio::test]
    async fn status_knob_returns_openai_error_and_keeps_connection() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let resp = client
            .chat(&[("x-mock-status", "503")], json!({"model": "m"}))
            .await;
        assert_eq!(resp.status, 503);
        assert_eq!(
            resp.json(),
            json!({"error": {"message": "mock error", "type": "server_error", "code": "mock_error", "param": null}})
        );
        let resp = client
            .chat(
                &[("x-mock-status", "429")],
                json!({"model": "m", "stream": true}),
            )
            .await;
        assert_eq!(resp.status, 429);
        assert_eq!(resp.json()["error"]["code"], "rate_limit_exceeded");
        assert_eq!(mock.served_usage(), (0, 0));
        let resp = client.chat(&[], json!({"model": "m"})).await;
        assert_eq!(resp.status, 200);
    }

    #[tokio::test]
    async fn delay_knob_delays_the_head() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let started = Instant::now();
        let resp = client
            .chat(&[("x-mock-delay-ms", "150")], json!({"model": "m"}))
            .await;
        assert_eq!(resp.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(150));
    }

    #[tokio::test]
    async fn break_after_cuts_streams_and_bodies() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let body = json!({"model": "m", "stream": true, "stream_options": {"include_usage": true}});
        let resp = client.chat(&[("x-mock-break-after", "2")], body).await;
        assert_eq!(resp.status, 200);
        assert!(!resp.complete, "no terminating chunk");
        assert_eq!(resp.events().len(), 2);
        assert!(!resp
            .events()
            .iter()
            .any(|e| e.contains("usage\":{") || e == "[DONE]"));

        let mut client = Client::connect(&mock).await;
        let resp = client
            .chat(&[("x-mock-break-after", "0")], json!({"model": "m"}))
            .await;
        assert_eq!(resp.status, 200);
        assert!(!resp.complete);
        let promised: usize = resp.header("content-length").unwrap().parse().unwrap();
        assert_eq!(resp.body.len(), promised / 2);
        assert_eq!(mock.served_usage(), (0, 0));
    }

    #[tokio::test]
    async fn chunked_request_body_is_decoded() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let body = br#"{"model":"chunky","messages":[{"role":"user","content":"hello there"}]}"#;
        let mut raw = b"POST /api/gate/v1/chat/completions HTTP/1.1\r\nhost: mock\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        for piece in body.chunks(7) {
            raw.extend_from_slice(format!("{:X};ext=1\r\n", piece.len()).as_bytes());
            raw.extend_from_slice(piece);
            raw.extend_from_slice(b"\r\n");
        }
        raw.extend_from_slice(b"0\r\nx-trailer: yes\r\n\r\n");
        // Dribble it in small writes so the decoder has to wait mid-line and mid-chunk.
        for piece in raw.chunks(5) {
            client.send(piece).await;
            tokio::task::yield_now().await;
        }
        let resp = client.read_response().await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["model"], "chunky");
        assert_eq!(mock.requests()[0].body, body);
        // The connection is still usable afterwards.
        let resp = client.chat(&[], json!({"model": "after"})).await;
        assert_eq!(resp.json()["model"], "after");
    }

    #[tokio::test]
    async fn keep_alive_serves_many_requests_and_honours_close() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let first = client.chat(&[], json!({"model": "one"})).await;
        let second = client
            .chat(&[], json!({"model": "two", "stream": true}))
            .await;
        assert_eq!(first.json()["model"], "one");
        assert!(second.complete);
        assert_ne!(first.json()["id"], Value::Null);
        let third = client
            .chat(&[("connection", "close")], json!({"model": "three"}))
            .await;
        assert_eq!(third.header("connection"), Some("close"));
        assert_eq!(third.json()["model"], "three");
        assert!(client.closed().await);
        assert_eq!(mock.requests().len(), 3);
    }

    #[tokio::test]
    async fn one_mib_body_is_recorded_byte_exact() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        let filler: String = (0..(1 << 20))
            .map(|i| char::from(b'a' + (i % 26) as u8))
            .collect();
        let body =
            json!({"model": "big", "messages": [{"role": "user", "content": filler}]}).to_string();
        let resp = client
            .post(
                "/v1/chat/completions",
                &[("expect", "100-continue")],
                body.as_bytes(),
            )
            .await;
        // The client above does not wait for 100 Continue; it must not confuse the reply.
        let resp = if resp.status == 100 {
            client.read_response().await
        } else {
            resp
        };
        assert_eq!(resp.status, 200);
        assert_eq!(resp.json()["model"], "big");
        let recorded = mock.requests();
        assert_eq!(recorded[0].body.len(), body.len());
        assert!(recorded[0].body == body.as_bytes());
    }

    #[tokio::test]
    async fn malformed_requests_get_400_and_close() {
        let mock = mock().await;
        let mut client = Client::connect(&mock).await;
        client.send(b"THIS IS NOT HTTP\r\n\r\n").await;
        let resp = client.read_response().await;
        assert_eq!(resp.status, 400);
        assert_eq!(resp.json()["error"]["code"], "invalid_request");
        assert!(client.closed().await);

        let mut client = Client::connect(&mock).await;
        client
            .send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n")
            .await;
        assert_eq!(client.read_response().await.status, 400);
        assert!(client.closed().await);

        let mut client = Client::connect(&mock).await;
        client
            .send(b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n")
            .await;
        assert_eq!(client.read_response().await.status, 400);

        let mut client = Client::connect(&mock).await;
        let resp = client.post("/v1/chat/completions", &[], b"{not json").await;
        assert_eq!(resp.status, 400);

        let mut client = Client::connect(&mock).await;
        client
            .send(b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: 99999999999\r\n\r\n")
            .await;
        assert_eq!(client.read_response().await.status, 413);
    }

    #[tokio::test]
    async fn recording_can_be_turned_off() {
        let mock = mock().await;
        mock.set_recording(false);
        let mut client = Client::connect(&mock).await;
        client.chat(&[], json!({"model": "m"})).await;
        assert!(mock.requests().is_empty());
        assert_eq!(mock.served_usage(), (10, 5));
    }

    #[tokio::test]
    async fn dropping_the_provider_stops_it() {
        let mock = mock().await;
        let addr = mock.addr();
        let mut client = Client::connect(&mock).await;
        drop(mock);
        assert!(client.closed().await);
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "listener still open");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[test]
    fn start_background_serves_blocking_clients() {
        use std::io::{Read, Write};
        let mock = MockProvider::start_background("127.0.0.1:0").unwrap();
        let mut stream = std::net::TcpStream::connect(mock.addr()).unwrap();
        let body = br#"{"model":"sync"}"#;
        write!(
            stream,
            "POST /v1/chat/completions HTTP/1.1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        stream.write_all(body).unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200 OK\r\n"), "{reply}");
        assert!(reply.contains(r#""model":"sync""#));
        assert_eq!(mock.requests().len(), 1);
    }

    #[test]
    fn json_strings_are_escaped() {
        let mut out = Vec::new();
        push_json_str(&mut out, "a\"b\\c\nd\u{1}é");
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\nd\u{1}é");
        let mut n = Vec::new();
        push_u64(&mut n, u64::MAX);
        assert_eq!(n, u64::MAX.to_string().as_bytes());
        let mut h = Vec::new();
        push_hex(&mut h, 0x1abc);
        assert_eq!(h, b"1abc");
        assert_eq!(parse_chunk_size(b"1A ; foo=bar"), Some(26));
        assert_eq!(parse_chunk_size(b""), None);
        assert_eq!(parse_decimal(b"12x"), None);
    }
}
