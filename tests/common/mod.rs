//! Test harness: the real `spidergate` binary on a free loopback port, a temp config and
//! SQLite file, and the in-process mock provider. Each test states a scenario from SPEC.md.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
pub use spidergate_mock::MockProvider;

pub mod cluster;
pub mod pg;
pub mod redis;
pub mod tls;

pub const BIN: &str = env!("CARGO_BIN_EXE_spidergate");

/// `scripts/test.sh` installs Redis and PostgreSQL and sets `SPIDERGATE_REQUIRE_SERVICES`:
/// there a missing server fails the test instead of skipping it.
pub fn services_required() {
    if std::env::var_os("SPIDERGATE_REQUIRE_SERVICES").is_some() {
        panic!("Redis and PostgreSQL are required here (SPIDERGATE_REQUIRE_SERVICES is set)");
    }
}

/// A free loopback port for a listener that a gateway binds later, never one this process
/// handed out before (a gateway whose proxy and admin listeners got the same one would answer
/// proxy requests from the admin API).
///
/// Taken below the kernel's ephemeral range (32768–60999 by default), where the port another
/// test process just released (`bind(0)` hands those out again) and the source port of an
/// outgoing connection never land: either could take the port before the gateway binds it,
/// and the test would then talk to another process. Each test process walks the range from
/// its own place (from its pid and the clock), checking each port free by binding it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let seed = std::process::id().wrapping_mul(7_919) ^ nanos;
    let _ = NEXT.compare_exchange(u32::MAX, seed % SPAN, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

/// Polls `f` every 20 ms until it returns `Some`, or panics after `timeout`.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `error.code` of an error body.
    pub fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads a response head; returns status and headers.
pub fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    Ok((status, read_header_lines(r)?))
}

/// Reads a head's header lines, after its first line, through the blank line that ends
/// them; names lower-cased. A stream that ends before that blank line is an error.
pub fn read_header_lines(r: &mut impl BufRead) -> std::io::Result<Vec<(String, String)>> {
    let mut line = String::new();
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok(headers)
}

/// The value of header `name` (lower-case) in headers read by [`read_header_lines`].
pub fn header_of<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

pub fn read_body(r: &mut impl BufRead, headers: &[(String, String)]) -> std::io::Result<Vec<u8>> {
    let get = |n: &str| header_of(headers, n);
    let mut body = Vec::new();
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            if n == 0 {
                let mut crlf = String::new();
                r.read_line(&mut crlf)?;
                break;
            }
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            body.extend_from_slice(&chunk[..n]);
        }
    } else if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(body)
}

/// A whole HTTP/1.1 response for [`canned_upstream`]: `status` (with its reason, "200 OK"),
/// `content_type` and `body`, framed by `Content-Length`.
pub fn http_reply(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An upstream that answers every request with `reply` (a whole HTTP/1.1 response, head and
/// body, as bytes), after reading the request's head and body; connections are kept, unless
/// the reply's head says `Connection: close` (then its body ends where the connection does).
/// For answers the mock does not give (a body with bytes after its JSON, another API's
/// stream).
pub fn canned_upstream(reply: Vec<u8>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind canned upstream");
    let addr = listener.local_addr().expect("addr");
    let closes = reply
        .windows(b"\r\nConnection: close\r\n".len())
        .any(|w| w == b"\r\nConnection: close\r\n");
    let reply = std::sync::Arc::new(reply);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let reply = reply.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().expect("clone"));
                let mut conn = conn;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let Ok(headers) = read_header_lines(&mut reader) else {
                        return;
                    };
                    if read_body(&mut reader, &headers).is_err() || conn.write_all(&reply).is_err()
                    {
                        return;
                    }
                    if closes {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// Sends one HTTP/1.1 request on a fresh connection and reads the whole response.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let stream = send_request(addr, method, path, headers, body)?;
    let mut r = BufReader::new(stream);
    let (status, headers) = read_head(&mut r)?;
    let body = read_body(&mut r, &headers)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// Sends a request and returns the open connection (for streaming and hang-up tests).
pub fn send_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    let mut has_len = false;
    for (k, v) in headers {
        has_len |=
            k.eq_ignore_ascii_case("content-length") || k.eq_ignore_ascii_case("transfer-encoding");
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !has_len && (method == "POST" || !body.is_empty()) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    Ok(stream)
}

/// A kept-alive client connection: one request after another on the same socket.
pub struct KeptAlive {
    addr: SocketAddr,
    reader: BufReader<TcpStream>,
}

impl KeptAlive {
    pub fn open(addr: SocketAddr) -> std::io::Result<KeptAlive> {
        let stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(KeptAlive {
            addr,
            reader: BufReader::new(stream),
        })
    }

    /// Sends one request (keep-alive) and reads its whole response.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
        let stream = self.reader.get_mut();
        stream.write_all(head.as_bytes())?;
        stream.write_all(body)?;
        let (status, headers) = read_head(&mut self.reader)?;
        let body = read_body(&mut self.reader, &headers)?;
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

/// Status, headers and the reader positioned at the body.
pub type StreamHead = (u16, Vec<(String, String)>, BufReader<TcpStream>);

/// Reads the response head of an open streamed response, leaving the body unread.
pub fn read_stream_head(stream: TcpStream) -> std::io::Result<StreamHead> {
    let mut r = BufReader::new(stream);
    let (status, headers) = read_head(&mut r)?;
    Ok((status, headers, r))
}

/// Reads the whole response of a request sent with `send_request` (for trickled bodies).
pub fn read_response(stream: TcpStream) -> std::io::Result<Response> {
    let mut r = BufReader::new(stream);
    let (status, headers) = read_head(&mut r)?;
    let body = read_body(&mut r, &headers)?;
    Ok(Response {
        status,
        headers,
        body,
    })
}

/// One row of the `traces` table.
#[derive(Debug, Clone)]
pub struct TraceRec {
    pub ts: i64,
    pub endpoint: String,
    pub status: i64,
    pub error_code: Option<String>,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cost_nanos: i64,
    pub usage_estimated: bool,
    pub fallback_from: Option<String>,
    pub requested_model: Option<String>,
    pub served_model: Option<String>,
    /// The unit charged (`token`, `image`, `char`, `ms`) and how many.
    pub unit: Option<String>,
    pub units: i64,
}

/// Takes SQLite's write lock on `db` and holds it until the returned connection is dropped
/// (or `ROLLBACK` is run on it): every other writer then waits for its busy timeout and fails.
pub fn hold_write_lock(db: &std::path::Path) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(db).expect("open db for locking");
    conn.busy_timeout(Duration::from_secs(30))
        .expect("busy timeout");
    conn.execute_batch("BEGIN EXCLUSIVE")
        .expect("BEGIN EXCLUSIVE");
    conn
}

/// Reads lines until the first SSE `data:` line; returns it.
pub fn read_first_event(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    while !line.starts_with("data:") {
        line.clear();
        let n = reader.read_line(&mut line).expect("read stream");
        assert!(n > 0, "stream ended before its first event");
    }
    line
}

pub struct Key {
    pub id: String,
    pub secret: String,
}

impl Key {
    pub fn bearer(&self) -> String {
        format!("Bearer {}", self.secret)
    }
}

/// Builder for a gateway with a temp config and database.
pub struct GatewayBuilder {
    env: Vec<(String, String)>,
    upstream: String,
    top: Vec<String>,
    server: Vec<String>,
    models: Option<String>,
    providers: Vec<String>,
    admin: Option<(u16, String)>,
    /// `tls_ca_file` of the two mock providers (`mock`, `mock-anthropic`).
    ca_file: Option<PathBuf>,
    /// The agent listener speaks TLS (`tls`): `start` waits for it to accept, not for a
    /// plain `/health`.
    tls: bool,
}

pub const MODELS: &str = r#"
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: gpt-4o
    provider: mock
    upstream_id: gpt-4o-2024-08-06
    input_usd_per_mtok: 2.5
    output_usd_per_mtok: 10
  - id: llama-3.1-8b-instant
    provider: mock
    upstream_id: meta-llama/llama-3.1-8b-instant
    input_usd_per_mtok: 0
    output_usd_per_mtok: 0
    free: true
  - id: dead-model
    provider: dead
    input_usd_per_mtok: 1
    output_usd_per_mtok: 1
aliases:
  spideriq/fast: [llama-3.1-8b-instant, gpt-4o-mini]
  spideriq/failover: [dead-model, gpt-4o-mini]
"#;

/// [`MODELS`] with an embeddings model (`endpoint: embeddings`, gpt-4o-mini's input price,
/// upstream id `text-embedding-3-small-upstream`): a chat model does not serve
/// `/v1/embeddings` (SPEC §3).
pub fn models_with_embeddings() -> String {
    MODELS.replacen(
        "aliases:",
        "  - id: text-embedding-3-small
    provider: mock
    upstream_id: text-embedding-3-small-upstream
    endpoint: embeddings
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0
aliases:",
        1,
    )
}

impl GatewayBuilder {
    pub fn new(mock: &MockProvider) -> Self {
        GatewayBuilder {
            env: Vec::new(),
            upstream: mock.base_url(),
            top: Vec::new(),
            server: Vec::new(),
            models: None,
            providers: Vec::new(),
            admin: None,
            ca_file: None,
            tls: false,
        }
    }

    /// The agent listener serves TLS (HTTP/1.1 or HTTP/2 by ALPN) with this certificate
    /// chain and key (PEM files).
    pub fn tls(mut self, cert_file: &std::path::Path, key_file: &std::path::Path) -> Self {
        self.top.push(format!(
            "tls:\n  cert_file: \"{}\"\n  key_file: \"{}\"",
            cert_file.display(),
            key_file.display()
        ));
        self.tls = true;
        self
    }

    /// The mock serves TLS with a certificate from this CA (PEM file): the two mock
    /// providers trust it through `tls_ca_file`.
    pub fn provider_ca(mut self, ca_file: &std::path::Path) -> Self {
        self.ca_file = Some(ca_file.to_path_buf());
        self
    }

    /// One more provider, as YAML lines under `providers:` (starting with `- name: ...`,
    /// indented by the builder). `{mock}` is replaced by the mock's root URL (no `/v1`).
    pub fn provider(mut self, yaml: &str) -> Self {
        let root = self.upstream.trim_end_matches("/v1").to_string();
        self.providers.push(yaml.replace("{mock}", &root));
        self
    }

    /// Enables the admin listener on a free port, with `token` as the admin bearer token.
    /// `Gateway::admin_addr` is then set, and `start` waits until it answers.
    pub fn admin(mut self, token: &str) -> Self {
        let port = free_port();
        self.top.push(format!(
            "admin:\n  listen: \"127.0.0.1:{port}\"\n  token_env: SG_TEST_ADMIN_TOKEN"
        ));
        self.env
            .push(("SG_TEST_ADMIN_TOKEN".to_string(), token.to_string()));
        self.admin = Some((port, token.to_string()));
        self
    }

    /// A top-level YAML line, e.g. `max_body_bytes: 1024`.
    pub fn top(mut self, line: &str) -> Self {
        self.top.push(line.to_string());
        self
    }

    /// An environment variable for the gateway process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_string(), value.to_string()));
        self
    }

    /// A `server:` setting, e.g. `read_timeout_ms: 300`.
    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.to_string());
        self
    }

    pub fn models(mut self, yaml: &str) -> Self {
        self.models = Some(yaml.to_string());
        self
    }

    pub fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let db = dir.path().join("data/spidergate.db");
        let mut yaml = format!(
            "listen: \"127.0.0.1:{port}\"\ndatabase: \"{}\"\n",
            db.display()
        );
        for l in &self.top {
            yaml.push_str(l);
            yaml.push('\n');
        }
        let ca = self
            .ca_file
            .as_ref()
            .map(|f| format!("    tls_ca_file: \"{}\"\n", f.display()))
            .unwrap_or_default();
        yaml.push_str(&format!(
            "providers:\n  - name: mock\n    kind: openai\n    base_url: \"{}\"\n    api_key_env: MOCK_PROVIDER_KEY\n{ca}  - name: dead\n    kind: openai\n    base_url: \"http://127.0.0.1:1/v1\"\n  - name: mock-anthropic\n    kind: anthropic\n    base_url: \"{}\"\n    api_key_env: MOCK_ANTHROPIC_KEY\n{ca}",
            self.upstream,
            self.upstream.trim_end_matches("/v1"),
        ));
        for p in &self.providers {
            for (i, line) in p.trim().lines().enumerate() {
                let indent = if i == 0 { "  " } else { "    " };
                yaml.push_str(&format!("{indent}{}\n", line.trim()));
            }
        }
        yaml.push_str(self.models.as_deref().unwrap_or(MODELS));
        yaml.push_str("server:\n");
        let defaults = [
            "flush_interval_ms: 100",
            "reload_interval_ms: 100",
            "shutdown_grace_s: 5",
            // Tests poll for keys to go live with their secrets before a reload lands; the
            // flood shield has its own test (which sets this back to the default).
            "auth_failures_per_minute: 1000000",
        ];
        let key_of = |l: &str| l.split(':').next().unwrap_or("").trim().to_string();
        // The old name of the shutdown grace still works; a test that sets either wins.
        let same_setting = |a: &str, b: &str| {
            let grace = ["shutdown_grace_s", "shutdown_timeout_secs"];
            a == b || (grace.contains(&a) && grace.contains(&b))
        };
        for d in defaults {
            if !self
                .server
                .iter()
                .any(|l| same_setting(&key_of(l), &key_of(d)))
            {
                yaml.push_str(&format!("  {d}\n"));
            }
        }
        for l in &self.server {
            yaml.push_str(&format!("  {l}\n"));
        }
        // Each gateway's own upgrade socket (`Gateway::upgrade`), not one under the cwd.
        if !self.server.iter().any(|l| key_of(l) == "upgrade_sock") {
            let sock = dir.path().join("upgrade.sock");
            yaml.push_str(&format!("  upgrade_sock: \"{}\"\n", sock.display()));
        }
        let config = dir.path().join("spidergate.yaml");
        std::fs::write(&config, yaml).expect("write config");
        let mut gw = Gateway {
            admin_addr: self
                .admin
                .as_ref()
                .map(|(port, _)| SocketAddr::from(([127, 0, 0, 1], *port))),
            admin_token: self.admin.as_ref().map(|(_, t)| t.clone()),
            env: self.env.clone(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log: dir.path().join("gateway.log"),
            dir,
            config,
            db,
            child: None,
            tls: self.tls,
        };
        gw.spawn();
        gw
    }
}

pub const PROVIDER_KEY: &str = "sk-provider-secret-123";
/// The key of the default `mock-anthropic` provider (`kind: anthropic`, the mock's root URL).
pub const ANTHROPIC_PROVIDER_KEY: &str = "sk-ant-provider-secret-456";

pub struct Gateway {
    env: Vec<(String, String)>,
    /// The admin listener, when the builder enabled it with `admin(token)`.
    pub admin_addr: Option<SocketAddr>,
    admin_token: Option<String>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
    pub addr: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
    tls: bool,
}

impl Gateway {
    /// Starts `spidergate serve` and waits for `/health` (for a TLS listener, until it
    /// accepts a connection).
    pub fn spawn(&mut self) {
        let child = self.start_serve(&[]);
        self.child = Some(child);
        let addr = self.addr;
        let log = self.log.clone();
        let tls = self.tls;
        let child = self.child.as_mut().expect("child");
        wait_for(Duration::from_secs(30), "gateway /health", || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "gateway exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            if tls {
                return TcpStream::connect(addr).ok().map(|_| ());
            }
            http(addr, "GET", "/health", &[], b"")
                .ok()
                .filter(|r| r.status == 200)
                .map(|_| ())
        });
        if let Some(admin) = self.admin_addr {
            wait_for(Duration::from_secs(10), "admin listener", || {
                http(admin, "GET", "/metrics", &[], b"").ok()
            });
        }
    }

    /// `spidergate serve` (plus `extra` arguments) on this gateway's config, logging to its
    /// log file, with the mock providers' keys.
    fn start_serve(&self, extra: &[&str]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .args(extra)
            .env("MOCK_PROVIDER_KEY", PROVIDER_KEY)
            .env("MOCK_ANTHROPIC_KEY", ANTHROPIC_PROVIDER_KEY)
            // The builder's `env("RUST_LOG", ..)` overrides this default.
            .env("RUST_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn the gateway")
    }

    /// Pingora's zero-downtime upgrade: starts `serve --upgrade` on the same config, waits
    /// until it announced its relay socket and waits for the listening sockets, then sends
    /// SIGQUIT to the running gateway. The new process becomes this gateway; the old one is
    /// returned (it finishes its requests and exits on its own: see [`wait_exit`]).
    pub fn upgrade(&mut self) -> Child {
        let sock = self.dir.path().join("upgrade.sock");
        let _ = std::fs::remove_file(&sock);
        let new = self.start_serve(&["--upgrade"]);
        let relay = self
            .dir
            .path()
            .join(format!("upgrade.sock.relay.{}", new.id()));
        wait_for(
            Duration::from_secs(30),
            "the new process to wait for the sockets",
            || (relay.exists() && sock.exists()).then_some(()),
        );
        let old = self.child.replace(new).expect("running");
        Command::new("kill")
            .arg("-QUIT")
            .arg(old.id().to_string())
            .status()
            .expect("kill");
        old
    }

    /// True while the gateway process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// A call to the admin API with the admin token (the builder must have enabled it).
    pub fn admin_call(&self, method: &str, path: &str, body: Option<&Value>) -> Response {
        let addr = self.admin_addr.expect("admin listener enabled");
        let bearer = format!("Bearer {}", self.admin_token.as_deref().unwrap_or(""));
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        http(
            addr,
            method,
            path,
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .expect("admin call")
    }

    /// One sample of `/metrics` (admin listener) by its full name, labels included.
    pub fn metric(&self, name: &str) -> Option<u64> {
        let r = self.admin_call("GET", "/metrics", None);
        assert_eq!(r.status, 200, "/metrics: {}", r.text());
        metric_value(&r.text(), name)
    }

    /// Waits until no proxy request is in flight and the ledger has committed every
    /// finished one (`spidergate_requests_in_flight` 0, `spidergate_requests_finished_total`
    /// = `spidergate_ledger_committed_total`, read from one `/metrics` page). After it, a
    /// spend or trace row that is not there will not arrive later. Needs the admin listener.
    pub fn wait_ledger_quiescent(&self) {
        wait_for(Duration::from_secs(10), "ledger quiescence", || {
            let r = self.admin_call("GET", "/metrics", None);
            let text = r.text();
            let get = |n| metric_value(&text, n).unwrap_or_else(|| panic!("no {n} in {text}"));
            let quiet = get("spidergate_requests_in_flight") == 0
                && get("spidergate_requests_finished_total")
                    == get("spidergate_ledger_committed_total");
            quiet.then_some(())
        });
    }

    /// Waits until this cluster node has completed `rounds` more ledger sweeps (each one
    /// writes its heartbeat and charges what stopped nodes left open) than it had at the call.
    pub fn wait_sweeps(&self, rounds: u64) {
        let at = self
            .metric("spidergate_ledger_sweeps_total")
            .expect("sweeps");
        wait_for(Duration::from_secs(15), "ledger sweeps", || {
            (self.metric("spidergate_ledger_sweeps_total")? >= at + rounds).then_some(())
        });
    }

    /// Sets (or replaces) an environment variable for the next `spawn`/`restart`.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    /// A read connection to the gateway's SQLite file (WAL: it never blocks the gateway).
    pub fn db(&self) -> rusqlite::Connection {
        let conn = rusqlite::Connection::open(&self.db).expect("open gateway db");
        conn.busy_timeout(Duration::from_secs(10))
            .expect("busy timeout");
        conn
    }

    /// `SELECT` returning one integer (NULL reads as 0).
    pub fn query_i64(&self, sql: &str, params: impl rusqlite::Params) -> i64 {
        self.db()
            .query_row(sql, params, |r| r.get::<_, Option<i64>>(0))
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .unwrap_or(0)
    }

    /// Rows of the `traces` table for one key, oldest first.
    pub fn trace_rows(&self, key_id: &str) -> Vec<TraceRec> {
        let conn = self.db();
        let mut stmt = conn
            .prepare(
                "SELECT ts, endpoint, status, error_code, prompt_tokens, completion_tokens,
                        cost_nanos, usage_estimated, fallback_from, served_model, unit,
                        COALESCE(units, 0), requested_model
                 FROM traces WHERE key_id = ?1 ORDER BY id",
            )
            .expect("prepare traces");
        let rows = stmt
            .query_map([key_id], |r| {
                Ok(TraceRec {
                    ts: r.get(0)?,
                    endpoint: r.get(1)?,
                    status: r.get(2)?,
                    error_code: r.get(3)?,
                    prompt_tokens: r.get(4)?,
                    completion_tokens: r.get(5)?,
                    cost_nanos: r.get(6)?,
                    usage_estimated: r.get(7)?,
                    fallback_from: r.get(8)?,
                    served_model: r.get(9)?,
                    unit: r.get(10)?,
                    units: r.get(11)?,
                    requested_model: r.get(12)?,
                })
            })
            .expect("query traces");
        rows.map(|r| r.expect("trace row")).collect()
    }

    /// The key's model-request traces (not usage or catalog calls), oldest first.
    pub fn model_traces(&self, key_id: &str) -> Vec<TraceRec> {
        self.trace_rows(key_id)
            .into_iter()
            .filter(|t| t.endpoint == "chat.completions" || t.endpoint == "embeddings")
            .collect()
    }

    /// `(month, requests, cost_nanos)` of the key's `spend` rows, summed over models.
    pub fn spend_rows(&self, key_id: &str) -> Vec<(String, i64, i64)> {
        let conn = self.db();
        let mut stmt = conn
            .prepare(
                "SELECT month, SUM(requests), SUM(cost_nanos) FROM spend
                 WHERE key_id = ?1 GROUP BY month ORDER BY month",
            )
            .expect("prepare spend");
        let rows = stmt
            .query_map([key_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query spend");
        rows.map(|r| r.expect("spend row")).collect()
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Sends SIGHUP (re-read the config) without waiting.
    pub fn signal_hup(&self) {
        let pid = self.pid();
        Command::new("kill")
            .arg("-HUP")
            .arg(pid.to_string())
            .status()
            .expect("kill");
    }

    /// Sends SIGTERM without waiting.
    pub fn signal_term(&self) {
        let pid = self.pid();
        Command::new("kill")
            .arg("-TERM")
            .arg(pid.to_string())
            .status()
            .expect("kill");
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal_term();
        let mut child = self.child.take().expect("running");
        wait_for(Duration::from_secs(30), "gateway exit", || {
            child.try_wait().ok().flatten()
        })
    }

    /// SIGKILL: no chance to flush.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("kill -9");
        let _ = child.wait();
    }

    pub fn restart(&mut self) {
        self.terminate();
        self.spawn();
    }

    /// Runs the CLI on this gateway's config, with the gateway's extra environment (so a
    /// faked clock such as `SPIDERGATE_CLOCK_OFFSET_MS` applies to both).
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("run cli")
    }

    pub fn cli_json(&self, args: &[&str]) -> Value {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("cli json")
    }

    /// `keys create --name NAME <args> --json`, then waits until the gateway knows the key.
    pub fn create_key(&self, args: &[&str]) -> Key {
        let mut all = vec!["keys", "create", "--name", "test-agent", "--json"];
        all.extend_from_slice(args);
        let v = self.cli_json(&all);
        let key = Key {
            id: v["id"].as_str().expect("id").to_string(),
            secret: v["secret"].as_str().expect("secret").to_string(),
        };
        self.wait_key_live(&key);
        key
    }

    /// Waits until the gateway stops answering 401 invalid_api_key for this key.
    pub fn wait_key_live(&self, key: &Key) {
        let bearer = key.bearer();
        wait_for(Duration::from_secs(5), "key hot reload", || {
            let r = self.get("/v1/usage", &bearer);
            (r.status != 401 || r.code() != "invalid_api_key").then_some(())
        });
    }

    pub fn get(&self, path: &str, bearer: &str) -> Response {
        let headers: Vec<(&str, &str)> = if bearer.is_empty() {
            vec![]
        } else {
            vec![("Authorization", bearer)]
        };
        http(self.addr, "GET", path, &headers, b"").expect("GET")
    }

    pub fn post(&self, path: &str, bearer: &str, body: &[u8], extra: &[(&str, &str)]) -> Response {
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        if !bearer.is_empty() {
            headers.push(("Authorization", bearer));
        }
        headers.extend_from_slice(extra);
        http(self.addr, "POST", path, &headers, body).expect("POST")
    }

    pub fn chat(&self, key: &Key, model: &str) -> Response {
        self.chat_with(key, model, &[])
    }

    pub fn chat_with(&self, key: &Key, model: &str, extra: &[(&str, &str)]) -> Response {
        let body =
            serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hello"}]});
        self.post(
            "/v1/chat/completions",
            &key.bearer(),
            body.to_string().as_bytes(),
            extra,
        )
    }

    /// Starts a streamed chat request and reads its response head; the body stays unread.
    pub fn open_stream(&self, key: &Key, body: &Value, extra: &[(&str, &str)]) -> StreamHead {
        let bearer = key.bearer();
        let mut headers = vec![("Authorization", bearer.as_str())];
        headers.extend_from_slice(extra);
        let stream = send_request(
            self.addr,
            "POST",
            "/v1/chat/completions",
            &headers,
            body.to_string().as_bytes(),
        )
        .expect("send");
        read_stream_head(stream).expect("response head")
    }

    pub fn store(&self) -> spidergate::store::Store {
        spidergate::store::Store::open(&self.db).expect("open store")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/v1/usage` for a key (flushes the ledger first).
    pub fn usage(&self, key: &Key) -> Value {
        let r = self.get("/v1/usage", &key.bearer());
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("--- gateway log (last 40 lines) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits for a gateway process to exit (after SIGQUIT: its grace period); returns its status.
pub fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    wait_for(timeout, "the gateway process to exit", || {
        child.try_wait().ok().flatten()
    })
}

/// The value of sample `name` (exact, labels included) in a Prometheus text page.
pub fn metric_value(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

pub fn mock() -> MockProvider {
    MockProvider::start_background("127.0.0.1:0").expect("mock provider")
}

/// Lower-case hex SHA-256 of `bytes` (the mock names an uploaded file by it).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
