//! Overshoot under concurrency: 50 hard-budget keys ($0.0010 each) and 200 concurrent
//! clients sending mixed requests (plain and streamed, random `max_tokens`,
//! `max_completion_tokens` and `n`) until every key is refused with 402. The mock provider
//! bills the worst case each request allows (`x-mock-prompt-tokens: bytes`,
//! `x-mock-completion-tokens: max`). Prints billed/cap per key and the maximum over keys,
//! which must be <= 1.000: a hard budget holds under concurrency.
//!
//! Run: `cargo bench --bench overshoot` (the release gateway binary, the in-process mock).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use spidergate_mock::MockProvider;

const BIN: &str = env!("CARGO_BIN_EXE_spidergate");
const KEYS: usize = 50;
const CLIENTS: usize = 200;
const CAP_USD: &str = "0.0010";
const CAP_NANOS: i64 = 1_000_000;
/// A key counts as exhausted after this many 402s.
const REFUSALS_TO_FINISH: usize = 5;
/// Upper bound on requests, so the run always ends.
const MAX_REQUESTS: usize = 50_000;
/// gpt-4o-mini and tiny-out: 0.15 / 0.60 USD per Mtok.
const PROMPT_NANOS: i64 = 150;
const COMPLETION_NANOS: i64 = 600;

const MODELS: [(&str, u64); 2] = [("gpt-4o-mini", 1000), ("tiny-out", 64)];

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no response head"))?;
    let headers = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let mut body = raw[split + 4..].to_vec();
    if headers.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || raw.len() < eol + 2 + size {
            break;
        }
        out.extend_from_slice(&raw[eol + 2..eol + 2 + size]);
        raw = &raw[(eol + 4 + size).min(raw.len())..];
    }
    out
}

/// Usage of a 200: the JSON body's, or a stream's last usage chunk.
fn usage(reply: &Reply) -> Option<(i64, i64)> {
    let of = |v: &Value| {
        Some((
            v["usage"]["prompt_tokens"].as_i64()?,
            v["usage"]["completion_tokens"].as_i64()?,
        ))
    };
    if reply.headers.contains("text/event-stream") {
        String::from_utf8_lossy(&reply.body)
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|d| serde_json::from_str::<Value>(d.trim()).ok())
            .find(|v| v["usage"].is_object())
            .and_then(|v| of(&v))
    } else {
        serde_json::from_slice::<Value>(&reply.body)
            .ok()
            .and_then(|v| of(&v))
    }
}

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// A mixed request within what the model allows (the mock then bills at most that).
fn request_body(rng: &mut Rng) -> String {
    let (model, max) = MODELS[rng.range(0, 1) as usize];
    let mut body = json!({"model": model, "messages": [{"role": "user", "content": "Summarise the ticket in one line."}]});
    if rng.range(0, 9) < 6 {
        body["max_tokens"] = json!(rng.range(1, max));
    }
    if rng.range(0, 9) < 3 {
        body["max_completion_tokens"] = json!(rng.range(1, max));
    }
    if rng.range(0, 1) == 1 {
        body["n"] = json!(rng.range(1, 4));
    }
    if rng.range(0, 1) == 1 {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    body.to_string()
}

struct Gateway {
    child: Child,
    addr: SocketAddr,
    config: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_gateway(mock: &MockProvider) -> Gateway {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = dir.path().join("spidergate.yaml");
    let yaml = format!(
        r#"listen: "127.0.0.1:{port}"
database: "{db}"
providers:
  - name: mock
    kind: openai
    base_url: "{base}"
    api_key_env: MOCK_PROVIDER_KEY
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: tiny-out
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 64
server:
  flush_interval_ms: 100
  reload_interval_ms: 100
"#,
        db = dir.path().join("data/spidergate.db").display(),
        base = mock.base_url(),
    );
    std::fs::write(&config, yaml).expect("config");
    let log = std::fs::File::create(dir.path().join("gateway.log")).expect("log");
    let child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("MOCK_PROVIDER_KEY", "sk-bench")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone().expect("log")))
        .stderr(Stdio::from(log))
        .spawn()
        .expect("spawn gateway");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let gw = Gateway {
        child,
        addr,
        config,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http(addr, "GET", "/health", &[], b"").is_ok_and(|r| r.status == 200) {
        assert!(Instant::now() < deadline, "gateway did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    gw
}

fn create_key(gw: &Gateway, i: usize) -> String {
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&gw.config)
        .args(["keys", "create", "--name", &format!("agent-{i}")])
        .args(["--budget", CAP_USD, "--budget-mode", "hard", "--json"])
        .output()
        .expect("keys create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    format!("Bearer {}", v["secret"].as_str().expect("secret"))
}

fn main() {
    // `cargo bench` passes `--bench`; a plain `cargo test --benches` passes nothing: run
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mock = MockProvider::start_background("127.0.0.1:0").expect("mock");
    mock.set_recording(false);
    let gw = start_gateway(&mock);
    let bearers: Arc<Vec<String>> = Arc::new((0..KEYS).map(|i| create_key(&gw, i)).collect());
    let last = bearers[KEYS - 1].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !http(
        gw.addr,
        "GET",
        "/v1/usage",
        &[("Authorization", &last)],
        b"",
    )
    .is_ok_and(|r| r.status == 200)
    {
        assert!(Instant::now() < deadline, "keys never went live");
        std::thread::sleep(Duration::from_millis(20));
    }

    let billed: Arc<Vec<AtomicI64>> = Arc::new((0..KEYS).map(|_| AtomicI64::new(0)).collect());
    let refusals: Arc<Vec<AtomicUsize>> =
        Arc::new((0..KEYS).map(|_| AtomicUsize::new(0)).collect());
    let sent = Arc::new(AtomicUsize::new(0));
    let served = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let addr = gw.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (bearers, billed, refusals, sent, served, errors) = (
                bearers.clone(),
                billed.clone(),
                refusals.clone(),
                sent.clone(),
                served.clone(),
                errors.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(0x0BE5_0000 + c as u64);
                loop {
                    let open: Vec<usize> = (0..KEYS)
                        .filter(|&k| refusals[k].load(Ordering::Relaxed) < REFUSALS_TO_FINISH)
                        .collect();
                    if open.is_empty() || sent.fetch_add(1, Ordering::Relaxed) >= MAX_REQUESTS {
                        return;
                    }
                    let k = open[rng.range(0, open.len() as u64 - 1) as usize];
                    let body = request_body(&mut rng);
                    let delay = rng.range(0, 50).to_string();
                    let headers = [
                        ("Authorization", bearers[k].as_str()),
                        ("Content-Type", "application/json"),
                        ("x-mock-prompt-tokens", "bytes"),
                        ("x-mock-completion-tokens", "max"),
                        ("x-mock-delay-ms", delay.as_str()),
                    ];
                    match http(
                        addr,
                        "POST",
                        "/v1/chat/completions",
                        &headers,
                        body.as_bytes(),
                    ) {
                        Ok(r) if r.status == 200 => match usage(&r) {
                            Some((p, c)) => {
                                billed[k].fetch_add(
                                    p * PROMPT_NANOS + c * COMPLETION_NANOS,
                                    Ordering::Relaxed,
                                );
                                served.fetch_add(1, Ordering::Relaxed);
                            }
                            None => {
                                errors.fetch_add(1, Ordering::Relaxed);
                            }
                        },
                        Ok(r) if r.status == 402 => {
                            refusals[k].fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            })
        })
        .collect();
    for c in clients {
        let _ = c.join();
    }
    let elapsed = started.elapsed();

    let mut max_ratio = 0.0f64;
    println!("key       billed (nano-USD)   cap (nano-USD)   billed/cap");
    for (k, b) in billed.iter().enumerate() {
        let b = b.load(Ordering::Relaxed);
        let ratio = b as f64 / CAP_NANOS as f64;
        max_ratio = max_ratio.max(ratio);
        println!("agent-{k:<3} {b:>17}   {CAP_NANOS:>14}   {ratio:>10.3}");
    }
    let (p, c) = mock.served_usage();
    let mock_billed = p as i64 * PROMPT_NANOS + c as i64 * COMPLETION_NANOS;
    let client_billed: i64 = billed.iter().map(|b| b.load(Ordering::Relaxed)).sum();
    println!(
        "{} requests in {:.1} s from {CLIENTS} clients: {} served, {} refused with 402, {} other",
        sent.load(Ordering::Relaxed).min(MAX_REQUESTS),
        elapsed.as_secs_f64(),
        served.load(Ordering::Relaxed),
        refusals
            .iter()
            .map(|r| r.load(Ordering::Relaxed))
            .sum::<usize>(),
        errors.load(Ordering::Relaxed),
    );
    println!("mock billed {mock_billed} nano-USD in total; the responses carried {client_billed}");
    let exhausted = refusals
        .iter()
        .filter(|r| r.load(Ordering::Relaxed) >= REFUSALS_TO_FINISH)
        .count();
    if exhausted < KEYS {
        println!("warning: only {exhausted} of {KEYS} keys were driven to 402 within {MAX_REQUESTS} requests");
    }
    let max_billed = billed
        .iter()
        .map(|b| b.load(Ordering::Relaxed))
        .max()
        .unwrap_or(0);
    println!(
        "overshoot under concurrency: max billed/cap over {KEYS} keys = {max_ratio:.6} \
         (max billed {max_billed} of {CAP_NANOS} nano-USD; must be <= 1.000000): {}",
        if max_billed <= CAP_NANOS {
            "PASS"
        } else {
            "FAIL"
        }
    );
}
