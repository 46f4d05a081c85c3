//! A fast mock LLM provider for SpiderGate's quickstart, tests and benchmarks (dev-only).
//!
//! A hand-rolled HTTP/1.1 server (keep-alive, Content-Length or chunked request bodies up to
//! 64 MiB) that speaks OpenAI's `.../chat/completions` (plain or SSE), `.../responses`
//! (plain or SSE), `.../embeddings`, `.../models`, `.../images/generations` (`b64_json`
//! images, `n` of them), `.../images/edits` (multipart), `.../audio/speech` (audio bytes,
//! chunked), `.../audio/transcriptions` and `.../audio/translations` (multipart; the text
//! names the file's SHA-256; `stream=true` answers `transcript.text.delta` events and a
//! `transcript.text.done` with usage), and Anthropic's
//! `POST /v1/messages` (plain or SSE) and `POST /v1/messages/count_tokens`. Behaviour is steered per request by `x-mock-*` headers, which the gateway
//! forwards from its client:
//!
//! | header | effect |
//! |---|---|
//! | `x-mock-prompt-tokens: N` / `x-mock-completion-tokens: M` | usage reported (default 10 / 5); Anthropic: `input_tokens` / `output_tokens` |
//! | `x-mock-prompt-tokens: bytes` | prompt tokens reported = the request body's length in bytes (a worst case: every token at least one byte), plus what the real APIs bill beyond the body: Anthropic's tool-use system prompt (346 tokens, 313 with `tool_choice` any/tool) and its client tools' definitions (bash 245, text editor 700, computer use 1,234); `x-mock-stored-tokens` (default 50,000) for each of `previous_response_id`, `conversation`, `prompt`; `x-mock-server-tool-tokens` (default 30,000) for each server-side tool and `mcp_servers` / `container` / `web_search_options`; `x-mock-file-tokens` (default 20,000) for each file, document or `item_reference` part |
//! | `x-mock-too-large: 1` | refuse as "Request too large" (OpenAI shapes 429 `rate_limit_exceeded`, naming `org-…`, `proj_…` and `sk-…` identifiers; Anthropic 413) with rate-limit headers saying the key has capacity left |
//! | `x-mock-context-window: W` | more input than W tokens is refused with 400, as a model refuses a prompt past its context window |
//! | `x-mock-completion-tokens: max` | completion tokens reported = `n` x the larger of `max_tokens` / `max_completion_tokens` (Responses: `max_output_tokens`) in the body (none: 16; no `n`: 1), capped at 1,000,000,000: everything the request allows |
//! | `x-mock-cache-read-tokens: R` / `x-mock-cache-write-tokens: W` | cached input, on top of the prompt tokens: Anthropic `cache_read_input_tokens` / `cache_creation_input_tokens` (`input_tokens` excludes them); OpenAI chat `prompt_tokens` = N+R+W with `prompt_tokens_details.cached_tokens` = R; Responses likewise with `input_tokens_details.cached_tokens` |
//! | `x-mock-tool-call: NAME` | the reply is a call of tool NAME with arguments `{"city":"Paris"}` (chat `tool_calls`, Responses `function_call`, Anthropic `tool_use`; streamed in `x-mock-chunks` argument pieces) |
//! | `x-mock-status: S` | reply S with an error body in the route's shape (OpenAI `code` is `rate_limit_exceeded` for 429, else `mock_error`; Anthropic `error.type` by status) |
//! | `x-mock-status-model: M` | apply `x-mock-status` only to requests whose body names model `M` |
//! | `x-mock-empty-error: 1` | the `x-mock-status` reply has an empty body (`Content-Length: 0`) |
//! | `x-mock-delay-ms: N` | wait N ms before the response head |
//! | `x-mock-chunks: N` | content chunks in a stream (default 3) |
//! | `x-mock-chunk-delay-ms: N` | wait N ms before every stream chunk after the first content chunk |
//! | `x-mock-hold: NAME` | stream: send content chunk 1, then hold chunk 2 (and the rest) until the test calls [`MockProvider::release`]`(NAME)`; [`MockProvider::held`] counts the streams waiting there |
//! | `x-mock-break-after: N` | stream: close the connection after N content chunks; plain: close after the head and half the body |
//! | `x-mock-no-usage: 1` | never report usage |
//! | `x-mock-image-usage: 1` | images: also report token `usage` (`x-mock-prompt-tokens` in, `x-mock-completion-tokens` out), as token-priced image models do |
//! | `x-mock-audio-usage: duration` | a streamed transcription (`stream=true`) reports `{"type":"duration","seconds":N}` (the file's seconds, rounded up: a WAV's by its header, anything else at 16,000 bytes a second) instead of token usage (`x-mock-prompt-tokens` audio tokens in, `x-mock-completion-tokens` out); a `json` one reports it too |
//! | `x-mock-audio-usage: tokens` | a `json` transcription reports token `usage`, as gpt-4o-transcribe does (a streamed one always does, unless told `duration`) |
//! | `x-mock-drop: 1` | read the whole request (after `x-mock-delay-ms`), then close the connection without any response |
//! | `x-mock-early-hints: 1` | a `103 Early Hints` head (`link: </style.css>; rel=preload`) before the answer's |
//! | `x-mock-gateway-headers: 1` | add headers named as the gateway's own (plain, SSE and errors): `x-spidergate-model: upstream-model`, `x-spidergate-error-code: upstream-code`, `traceparent: 00-1111…-2222…-01` |
//! | `x-mock-gzip: 1` | a JSON answer comes gzip-compressed (`content-encoding: gzip`), against the gateway's `accept-encoding: identity` |
//! | `x-mock-leak-headers: 1` | add provider-account headers to the response (plain, SSE and errors): `openai-organization: org-leak`, `openai-project: proj_leak`, `anthropic-organization-id: leak`, `set-cookie: a=b`, `x-ratelimit-limit-requests: 5000`, `x-ratelimit-remaining-tokens: 99` |
//!
//! Like the real API, `/v1/messages` answers 401 `authentication_error` without credentials
//! (`x-api-key`, or a bearer token as the current `anthropic` Python SDK sends) and 400
//! `invalid_request_error` without `max_tokens` or `messages`.
//! [`MockProvider::reject_key`] makes every request carrying one provider key fail.
//!
//! [`MockProvider::start_tls`] serves the same over TLS (1.2 and 1.3, ALPN `http/1.1`) with
//! a certificate the test made, and counts the handshakes that completed and failed, so a
//! test can see connection reuse and a client that refused the certificate.
//!
//! The hot path (a plain chat request with default knobs) reuses per-connection buffers,
//! parses the body without copying and formats the reply without `format!`. The only shared
//! state it touches is a few relaxed atomics and, when recording is on, one mutex.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod anthropic;
mod billing;
mod http;
mod json;
mod knobs;
mod media;
mod numbers;
mod openai_chat;
mod openai_responses;
mod reply;
mod wire;

pub use media::{audio_seconds, speech_audio, AUDIO_BYTES_PER_SECOND, PNG_B64};

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

pub use http::MAX_BODY_BYTES;

/// A running mock provider. Clones share one server, which stops (listener closed, open
/// connections aborted) when the last clone is dropped.
#[derive(Clone)]
pub struct MockProvider {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The host name in `base_url` when serving TLS (the certificate's name).
    tls_host: Option<String>,
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
    /// TCP segments with data that carried this request (the kernel's `tcpi_data_segs_in`
    /// across it), on a plain-TCP connection; `None` over TLS. Tells a request written in
    /// one piece from a head and a body written apart.
    pub data_segments: Option<u64>,
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

    /// The provider key the request carried: `x-api-key`, else the bearer token.
    pub fn provider_key(&self) -> Option<&str> {
        self.header("x-api-key").or_else(|| {
            self.header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ").or(v.strip_prefix("bearer ")))
        })
    }
}

/// A provider key the mock refuses (see [`MockProvider::reject_key`]).
#[derive(Clone)]
pub(crate) struct Rejection {
    key: String,
    pub(crate) status: u16,
    pub(crate) retry_after_secs: Option<u64>,
}

/// Tokens one usage object reported. `prompt` counts every input token, cached ones too.
#[derive(Clone, Copy, Default)]
pub(crate) struct Served {
    pub(crate) prompt: u64,
    pub(crate) completion: u64,
    pub(crate) cache_read: u64,
    pub(crate) cache_write: u64,
}

pub(crate) struct Shared {
    recording: AtomicBool,
    requests: Mutex<Vec<RecordedRequest>>,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cache_read_tokens: AtomicU64,
    cache_write_tokens: AtomicU64,
    /// Images in the `data` of image answers sent (generations and edits).
    images: AtomicU64,
    /// Input characters (Unicode code points) of speech answers sent.
    speech_chars: AtomicU64,
    /// True while `rejections` is non-empty, so the hot path skips the lock and the key copy.
    rejecting: AtomicBool,
    rejections: Mutex<Vec<Rejection>>,
    connections: AtomicU64,
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    /// `x-mock-hold` gates by name.
    gates: Mutex<HashMap<String, Gate>>,
    gate_changed: Notify,
}

/// One `x-mock-hold` gate: open for good once released.
#[derive(Default)]
struct Gate {
    open: bool,
    waiting: u64,
}

/// A certificate chain and its private key, in PEM, for [`MockProvider::start_tls`].
#[derive(Clone)]
pub struct TlsIdentity {
    pub cert_chain_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl TlsIdentity {
    /// A TLS acceptor for this identity (ring, TLS 1.2 and 1.3, ALPN `http/1.1`).
    pub fn acceptor(&self) -> std::io::Result<TlsAcceptor> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let bad = |e: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, e);
        let certs = CertificateDer::pem_slice_iter(&self.cert_chain_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate PEM: {e}")))?;
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| bad(format!("key PEM: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| bad(e.to_string()))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }

    /// Reads a chain and a key from PEM files (the binary's `--tls-cert` / `--tls-key`).
    pub fn from_files(cert: &str, key: &str) -> std::io::Result<TlsIdentity> {
        Ok(TlsIdentity {
            cert_chain_pem: std::fs::read(cert)?,
            key_pem: std::fs::read(key)?,
        })
    }
}

/// A panic while holding one of these locks cannot leave the data half-updated; keep going.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Shared {
    pub(crate) fn record(&self, request: RecordedRequest) {
        lock(&self.requests).push(request);
    }

    pub(crate) fn recording(&self) -> bool {
        self.recording.load(Ordering::Relaxed)
    }

    pub(crate) fn rejecting(&self) -> bool {
        self.rejecting.load(Ordering::Relaxed)
    }

    pub(crate) fn rejection_for(&self, key: &str) -> Option<Rejection> {
        lock(&self.rejections)
            .iter()
            .find(|r| r.key == key)
            .cloned()
    }

    /// Waits until gate `name` is open ([`MockProvider::release`]).
    pub(crate) async fn hold(&self, name: &str) {
        struct Waiting<'a>(&'a Shared, &'a str);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                if let Some(g) = lock(&self.0.gates).get_mut(self.1) {
                    g.waiting -= 1;
                }
            }
        }
        let mut registered = None;
        loop {
            let changed = self.gate_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut gates = lock(&self.gates);
                let gate = gates.entry(name.to_owned()).or_default();
                if gate.open {
                    return;
                }
                if registered.is_none() {
                    gate.waiting += 1;
                    registered = Some(Waiting(self, name));
                }
            }
            changed.await;
        }
    }

    pub(crate) fn add_media(&self, images: u64, speech_chars: u64) {
        self.images.fetch_add(images, Ordering::Relaxed);
        self.speech_chars.fetch_add(speech_chars, Ordering::Relaxed);
    }

    pub(crate) fn add_usage(&self, served: Served) {
        for (counter, n) in [
            (&self.prompt_tokens, served.prompt),
            (&self.completion_tokens, served.completion),
            (&self.cache_read_tokens, served.cache_read),
            (&self.cache_write_tokens, served.cache_write),
        ] {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }
}

impl MockProvider {
    /// Bind to `addr` (e.g. `"127.0.0.1:0"`) and serve in a background task on the current
    /// tokio runtime. Recording is on.
    pub async fn start(addr: &str) -> std::io::Result<MockProvider> {
        Self::bind(addr, true, None).await
    }

    /// Like [`MockProvider::start`], over TLS with `identity`; `host` is the name its
    /// certificate is for, used in [`MockProvider::base_url`].
    pub async fn start_tls(
        addr: &str,
        identity: &TlsIdentity,
        host: &str,
    ) -> std::io::Result<MockProvider> {
        let mut provider = Self::bind(addr, true, Some(identity.acceptor()?)).await?;
        provider.tls_host = Some(host.to_owned());
        Ok(provider)
    }

    /// [`MockProvider::start_tls`] on its own runtime, like [`MockProvider::start_background`].
    pub fn start_tls_background(
        addr: &str,
        identity: &TlsIdentity,
        host: &str,
    ) -> std::io::Result<MockProvider> {
        let acceptor = identity.acceptor()?;
        let mut provider = Self::background(addr, Some(acceptor))?;
        provider.tls_host = Some(host.to_owned());
        Ok(provider)
    }

    /// Like [`MockProvider::start`], but serves from its own two-thread runtime on a std
    /// thread, for tests that are not async. The thread ends when the provider is dropped.
    pub fn start_background(addr: &str) -> std::io::Result<MockProvider> {
        Self::background(addr, None)
    }

    fn background(addr: &str, tls: Option<TlsAcceptor>) -> std::io::Result<MockProvider> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-provider")
            .enable_all()
            .build()?;
        let provider = runtime.block_on(Self::bind(addr, true, tls))?;
        let mut stopped = provider._stop.subscribe();
        std::thread::Builder::new()
            .name("mock-provider".into())
            .spawn(move || {
                // Resolves with Err once the last MockProvider clone drops the sender.
                let _ = runtime.block_on(stopped.changed());
            })?;
        Ok(provider)
    }

    async fn bind(
        addr: &str,
        recording: bool,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<MockProvider> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            recording: AtomicBool::new(recording),
            requests: Mutex::new(Vec::new()),
            prompt_tokens: AtomicU64::new(0),
            completion_tokens: AtomicU64::new(0),
            cache_read_tokens: AtomicU64::new(0),
            cache_write_tokens: AtomicU64::new(0),
            images: AtomicU64::new(0),
            speech_chars: AtomicU64::new(0),
            rejecting: AtomicBool::new(false),
            rejections: Mutex::new(Vec::new()),
            connections: AtomicU64::new(0),
            tls_handshakes: AtomicU64::new(0),
            tls_failures: AtomicU64::new(0),
            gates: Mutex::new(HashMap::new()),
            gate_changed: Notify::new(),
        });
        let (stop, stopped) = watch::channel(());
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stopped, tls));
        Ok(MockProvider {
            shared,
            addr,
            tls_host: None,
            _stop: Arc::new(stop),
        })
    }

    /// The bound address (the real port when started on port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT/v1` (TLS: `https://HOST:PORT/v1`), ready for an `openai`
    /// provider's `base_url`.
    pub fn base_url(&self) -> String {
        format!("{}/v1", self.anthropic_base_url())
    }

    /// `http://IP:PORT` (TLS: `https://HOST:PORT`), ready for an `anthropic` provider's
    /// `base_url` (the gateway posts to `base_url` + `/v1/messages`).
    pub fn anthropic_base_url(&self) -> String {
        match &self.tls_host {
            Some(host) => format!("https://{host}:{}", self.addr.port()),
            None => format!("http://{}", self.addr),
        }
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// TLS handshakes that completed (TLS only).
    pub fn tls_handshakes(&self) -> u64 {
        self.shared.tls_handshakes.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed, for instance because the client refused the certificate.
    pub fn tls_failures(&self) -> u64 {
        self.shared.tls_failures.load(Ordering::Relaxed)
    }

    /// Every request received since start or the last [`MockProvider::clear`], in order.
    /// A request is recorded before its response is sent.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.requests).clone()
    }

    /// Forget the recorded requests and reset [`MockProvider::served_usage`] and
    /// [`MockProvider::served_cache`] to zero. Key rejections stay.
    pub fn clear(&self) {
        lock(&self.shared.requests).clear();
        for counter in [
            &self.shared.prompt_tokens,
            &self.shared.completion_tokens,
            &self.shared.cache_read_tokens,
            &self.shared.cache_write_tokens,
            &self.shared.images,
            &self.shared.speech_chars,
        ] {
            counter.store(0, Ordering::Relaxed);
        }
    }

    /// (prompt, completion) tokens summed over every usage object this mock actually sent,
    /// in a JSON body or a stream's usage event. Prompt counts every input token, cached
    /// ones too (Anthropic: `input_tokens` + both cache fields). Counted just before the
    /// bytes are written, so a client that has read the usage always finds it counted here.
    pub fn served_usage(&self) -> (u64, u64) {
        (
            self.shared.prompt_tokens.load(Ordering::Relaxed),
            self.shared.completion_tokens.load(Ordering::Relaxed),
        )
    }

    /// Images sent in image answers (what a per-image price bills), counted like
    /// [`MockProvider::served_usage`].
    pub fn served_images(&self) -> u64 {
        self.shared.images.load(Ordering::Relaxed)
    }

    /// Input characters (Unicode code points) of the speech sent (what a per-character price
    /// bills), counted just before the audio's first bytes are written.
    pub fn served_speech_chars(&self) -> u64 {
        self.shared.speech_chars.load(Ordering::Relaxed)
    }

    /// (cache read, cache write) input tokens reported, counted like
    /// [`MockProvider::served_usage`]. OpenAI shapes report reads only (`cached_tokens`);
    /// their cache writes are ordinary prompt tokens.
    pub fn served_cache(&self) -> (u64, u64) {
        (
            self.shared.cache_read_tokens.load(Ordering::Relaxed),
            self.shared.cache_write_tokens.load(Ordering::Relaxed),
        )
    }

    /// Turn request recording on or off (on after `start`, off under `run_blocking`).
    pub fn set_recording(&self, on: bool) {
        self.shared.recording.store(on, Ordering::Relaxed);
    }

    /// Answer every request that carries provider key `key` (`x-api-key: KEY` or
    /// `Authorization: Bearer KEY`) with `status` and an error body in the route's shape,
    /// plus `retry-after` when given. Replaces an earlier rejection of the same key.
    pub fn reject_key(&self, key: &str, status: u16, retry_after_secs: Option<u64>) {
        let mut rejections = lock(&self.shared.rejections);
        rejections.retain(|r| r.key != key);
        rejections.push(Rejection {
            key: key.to_owned(),
            status,
            retry_after_secs,
        });
        self.shared.rejecting.store(true, Ordering::Relaxed);
    }

    /// Opens gate `name` for good: every stream held there by `x-mock-hold: NAME` goes on,
    /// and later ones pass without stopping.
    pub fn release(&self, name: &str) {
        lock(&self.shared.gates)
            .entry(name.to_owned())
            .or_default()
            .open = true;
        self.shared.gate_changed.notify_waiters();
    }

    /// Streams waiting at gate `name` now (a stream whose client is gone still waits).
    pub fn held(&self, name: &str) -> u64 {
        lock(&self.shared.gates).get(name).map_or(0, |g| g.waiting)
    }

    /// Serve every key again.
    pub fn clear_rejections(&self) {
        let mut rejections = lock(&self.shared.rejections);
        rejections.clear();
        self.shared.rejecting.store(false, Ordering::Relaxed);
    }
}

/// Serve on `listen` forever from a multi-thread runtime with one worker per core, with
/// recording off.
pub fn run_blocking(listen: &str) -> std::io::Result<()> {
    run_blocking_with_threads(listen, 0, None)
}

/// [`run_blocking`] with `threads` runtime workers (0: one per core). Benchmarks that run
/// the gateway and the load generator on the same machine want only a few.
/// With `tls`, it serves HTTPS with that identity.
pub fn run_blocking_with_threads(
    listen: &str,
    threads: usize,
    tls: Option<TlsIdentity>,
) -> std::io::Result<()> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("mock-provider");
    if threads > 0 {
        builder.worker_threads(threads);
    }
    let runtime = builder.build()?;
    runtime.block_on(async {
        let acceptor = tls.as_ref().map(TlsIdentity::acceptor).transpose()?;
        let provider = MockProvider::bind(listen, false, acceptor).await?;
        let _ = writeln!(
            std::io::stderr(),
            "spidergate-mock listening; OpenAI base_url: {}, Anthropic base_url: {}",
            provider.base_url(),
            provider.anthropic_base_url()
        );
        std::future::pending::<()>().await;
        drop(provider);
        Ok(())
    })
}

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stopped: watch::Receiver<()>,
    tls: Option<TlsAcceptor>,
) {
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
                let _ = stream.set_nodelay(true);
                shared.connections.fetch_add(1, Ordering::Relaxed);
                let shared = Arc::clone(&shared);
                match &tls {
                    None => {
                        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
                        connections.spawn(http::serve_connection(
                            stream,
                            shared,
                            next_id,
                            Some(fd),
                        ));
                    }
                    Some(acceptor) => {
                        let accept = acceptor.accept(stream);
                        connections.spawn(async move {
                            match accept.await {
                                Ok(tls_stream) => {
                                    shared.tls_handshakes.fetch_add(1, Ordering::Relaxed);
                                    http::serve_connection(tls_stream, shared, next_id, None).await;
                                }
                                Err(_) => {
                                    shared.tls_failures.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                    }
                }
                while connections.try_join_next().is_some() {}
            }
            // Out of file descriptors and the like: back off instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
}
