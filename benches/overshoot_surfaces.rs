//! Overshoot per surface (issue 16): for each surface, one hard-budget key and 50 concurrent
//! hostile requests at once (a burst held at the provider so they all overlap), on one
//! gateway and on three (PostgreSQL + Redis, requests spread round-robin). Prints one
//! Markdown table of billed / cap per surface, one node and three.
//!
//! "Billed" is what the provider would bill, computed without the gateway: the mock's own
//! token counts (`x-mock-prompt-tokens: bytes` bills every body byte plus what the real APIs
//! add beyond the body: stored context, the tool-use system prompt; `x-mock-completion-tokens:
//! max` bills the whole output cap, `n` times) at the literal prices below; for a cut stream,
//! the input the mock reported plus one output token per delta the client received; images
//! returned times 0.04 USD; the characters of a speech input at 15 USD per million; a
//! transcription's audio at the mock's 16,000 bytes a second and 0.006 USD a minute.
//!
//! Run: `cargo bench --bench overshoot_surfaces` (release gateway binary, in-process mock;
//! Redis and PostgreSQL as `scripts/install-deps.sh` installs them).

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use common::pg::PgServer;
use common::redis::RedisServer;
use common::{free_port, http, read_stream_head, send_request, GatewayBuilder, Key, MockProvider};
use serde_json::{json, Value};

const CONCURRENCY: usize = 50;

/// Literal prices: OpenAI-kind models 0.15 / 0.60 USD per Mtok, Claude 3 / 15, images 0.04
/// USD each, speech 15 USD per million characters, transcriptions 0.006 USD a minute.
const MODELS: &str = r#"
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: resp-bounded
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
    context_window_tokens: 60000
  - id: claude
    provider: mock-anthropic
    upstream_id: claude-sonnet-4-5
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    max_output_tokens: 64
  - id: img
    provider: mock
    endpoint: images
    usd_per_image: 0.04
  - id: tts
    provider: mock
    endpoint: speech
    usd_per_mchar: 15
  - id: whisper
    provider: mock
    endpoint: transcriptions
    usd_per_minute: 0.006
"#;

const OPENAI_NANOS: (i64, i64) = (150, 600);
const CLAUDE_NANOS: (i64, i64) = (3_000, 15_000);
const IMAGE_NANOS: i64 = 40_000_000;
const CHAR_NANOS: i64 = 15_000;
/// 0.006 USD a minute = 100 nano-USD a millisecond.
const AUDIO_MS_NANOS: i64 = 100;
const AUDIO_BYTES_PER_SECOND: i64 = 16_000;

/// What the provider bills for one surface's burst: from the mock's counters after it, and
/// from each 200 the client read.
#[derive(Clone, Copy)]
enum Bill {
    /// The mock's token counts at these (input, output) nano-USD per token.
    Tokens((i64, i64)),
    /// The mock's input count, plus one output token per streamed delta the client read.
    CutStream((i64, i64)),
    /// Images in each answer's `data`.
    Images,
    /// Characters of the input of each request served.
    Speech(usize),
    /// Audio in each file served (bytes at the mock's byte rate).
    Audio(usize),
}

struct Surface {
    name: &'static str,
    path: &'static str,
    cap_usd: &'static str,
    /// The body (JSON) or a `multipart/form-data` body.
    body: Body,
    headers: &'static [(&'static str, &'static str)],
    bill: Bill,
}

enum Body {
    Json(Value),
    Form(Vec<u8>),
}

const WORST: &[(&str, &str)] = &[
    ("x-mock-prompt-tokens", "bytes"),
    ("x-mock-completion-tokens", "max"),
    ("x-mock-delay-ms", "500"),
];
const STORED: &[(&str, &str)] = &[
    ("x-mock-prompt-tokens", "bytes"),
    ("x-mock-completion-tokens", "max"),
    ("x-mock-stored-tokens", "50000"),
    ("x-mock-context-window", "60000"),
    ("x-mock-delay-ms", "500"),
];
const CUT: &[(&str, &str)] = &[
    ("x-mock-prompt-tokens", "bytes"),
    ("x-mock-chunks", "60"),
    ("x-mock-break-after", "40"),
    ("x-mock-chunk-delay-ms", "5"),
];
const SLOW: &[(&str, &str)] = &[("x-mock-delay-ms", "500")];

const BOUNDARY: &str = "sgBenchBoundary0c8d";

fn form(fields: &[(&str, &str)], file: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    b.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.mp3\"\r\nContent-Type: application/octet-stream\r\n\r\n")
            .as_bytes(),
    );
    b.extend_from_slice(file);
    b.extend_from_slice(format!("\r\n--{BOUNDARY}--\r\n").as_bytes());
    b
}

fn surfaces() -> Vec<Surface> {
    let user = |s: &str| json!([{"role": "user", "content": s}]);
    let function =
        json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let anthropic_tool = json!([{"name": "f", "input_schema": {"type": "object"}}]);
    let speech_input = "say this ".repeat(455); // 4,095 characters
                                                // 1.6 MB of "MP3": 100 s to the mock; a format that reports no duration.
    let audio = vec![0x55u8; 1_600_000];
    vec![
        Surface {
            name: "chat completions (n = 4, tools, no output cap)",
            path: "/v1/chat/completions",
            cap_usd: "0.01",
            body: Body::Json(
                json!({"model": "gpt-4o-mini", "n": 4, "messages": user("write an essay"),
                "tools": function}),
            ),
            headers: WORST,
            bill: Bill::Tokens(OPENAI_NANOS),
        },
        Surface {
            name: "Responses, previous_response_id (50k stored tokens)",
            path: "/v1/responses",
            cap_usd: "0.05",
            body: Body::Json(
                json!({"model": "resp-bounded", "previous_response_id": "resp_earlier",
                "input": "go on"}),
            ),
            headers: STORED,
            bill: Bill::Tokens(OPENAI_NANOS),
        },
        Surface {
            name: "Responses, server tool (web_search)",
            path: "/v1/responses",
            cap_usd: "0.05",
            body: Body::Json(json!({"model": "resp-bounded", "input": "news?",
                "tools": [{"type": "web_search"}]})),
            headers: WORST,
            bill: Bill::Tokens(OPENAI_NANOS),
        },
        Surface {
            name: "Messages, server tool (web_search)",
            path: "/v1/messages",
            cap_usd: "0.25",
            body: Body::Json(
                json!({"model": "claude", "max_tokens": 64, "messages": user("news?"),
                "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 5}]}),
            ),
            headers: WORST,
            bill: Bill::Tokens(CLAUDE_NANOS),
        },
        Surface {
            name: "Messages native, tools (hidden tool prompt)",
            path: "/v1/messages",
            cap_usd: "0.005",
            body: Body::Json(
                json!({"model": "claude", "max_tokens": 10, "messages": user("hi"),
                "tools": anthropic_tool}),
            ),
            headers: WORST,
            bill: Bill::Tokens(CLAUDE_NANOS),
        },
        Surface {
            name: "chat -> Messages (translated), tools",
            path: "/v1/chat/completions",
            cap_usd: "0.005",
            body: Body::Json(
                json!({"model": "claude", "max_tokens": 10, "messages": user("hi"),
                "tools": function}),
            ),
            headers: WORST,
            bill: Bill::Tokens(CLAUDE_NANOS),
        },
        Surface {
            name: "Messages -> chat (translated), tools",
            path: "/v1/messages",
            cap_usd: "0.005",
            body: Body::Json(
                json!({"model": "gpt-4o-mini", "max_tokens": 1000, "messages": user("hi"),
                "tools": anthropic_tool}),
            ),
            headers: WORST,
            bill: Bill::Tokens(OPENAI_NANOS),
        },
        Surface {
            name: "Messages stream cut before its usage (native)",
            path: "/v1/messages",
            cap_usd: "0.01",
            body: Body::Json(json!({"model": "claude", "max_tokens": 64, "stream": true,
                "messages": user("stream please")})),
            headers: CUT,
            bill: Bill::CutStream(CLAUDE_NANOS),
        },
        Surface {
            name: "chat stream cut before its usage (translated to Messages)",
            path: "/v1/chat/completions",
            cap_usd: "0.01",
            body: Body::Json(json!({"model": "claude", "max_tokens": 64, "stream": true,
                "messages": user("stream please")})),
            headers: CUT,
            bill: Bill::CutStream(CLAUDE_NANOS),
        },
        Surface {
            name: "images (n = 3)",
            path: "/v1/images/generations",
            cap_usd: "0.50",
            body: Body::Json(json!({"model": "img", "prompt": "a spider", "n": 3})),
            headers: SLOW,
            bill: Bill::Images,
        },
        Surface {
            name: "speech (4,095 characters)",
            path: "/v1/audio/speech",
            cap_usd: "0.25",
            body: Body::Json(json!({"model": "tts", "voice": "alloy", "input": speech_input})),
            headers: SLOW,
            bill: Bill::Speech(speech_input.chars().count()),
        },
        Surface {
            name: "transcriptions (100 s file, no duration reported)",
            path: "/v1/audio/transcriptions",
            cap_usd: "0.25",
            body: Body::Form(form(
                &[("model", "whisper"), ("response_format", "text")],
                &audio,
            )),
            headers: SLOW,
            bill: Bill::Audio(audio.len()),
        },
    ]
}

fn usd_to_nanos(usd: &str) -> i64 {
    (usd.parse::<f64>().expect("cap") * 1e9).round() as i64
}

/// One burst's outcome.
struct Outcome {
    served: usize,
    refused_402: usize,
    refused_400: usize,
    other: Vec<String>,
    billed: i64,
    cap: i64,
}

fn burst(nodes: &[SocketAddr], mock: &MockProvider, key: &Key, s: &Surface) -> Outcome {
    mock.clear();
    let bearer = key.bearer();
    let (body, content_type) = match &s.body {
        Body::Json(v) => (
            Arc::new(v.to_string().into_bytes()),
            "application/json".to_string(),
        ),
        Body::Form(b) => (
            Arc::new(b.clone()),
            format!("multipart/form-data; boundary={BOUNDARY}"),
        ),
    };
    let start = Arc::new(std::sync::Barrier::new(CONCURRENCY));
    let threads: Vec<_> = (0..CONCURRENCY)
        .map(|i| {
            let addr = nodes[i % nodes.len()];
            let (bearer, body, content_type, start) = (
                bearer.clone(),
                body.clone(),
                content_type.clone(),
                start.clone(),
            );
            let (path, extra) = (s.path, s.headers);
            let cut = matches!(s.bill, Bill::CutStream(_));
            std::thread::spawn(move || {
                let mut headers = vec![
                    ("Authorization", bearer.as_str()),
                    ("Content-Type", content_type.as_str()),
                ];
                headers.extend_from_slice(extra);
                start.wait();
                if cut {
                    read_cut(addr, path, &headers, &body)
                } else {
                    http(addr, "POST", path, &headers, &body).map(|r| (r.status, r))
                }
            })
        })
        .collect();
    let replies: Vec<_> = threads
        .into_iter()
        .map(|t| t.join().expect("client"))
        .collect();
    let mut out = Outcome {
        served: 0,
        refused_402: 0,
        refused_400: 0,
        other: Vec::new(),
        billed: 0,
        cap: usd_to_nanos(s.cap_usd),
    };
    let mut deltas = 0i64;
    for r in &replies {
        match r {
            Ok((200, r)) => {
                out.served += 1;
                match s.bill {
                    Bill::Images => {
                        let n = r.json()["data"].as_array().map_or(0, Vec::len);
                        out.billed += n as i64 * IMAGE_NANOS;
                    }
                    Bill::Speech(chars) => out.billed += chars as i64 * CHAR_NANOS,
                    Bill::Audio(bytes) => {
                        out.billed += bytes as i64 * 1000 / AUDIO_BYTES_PER_SECOND * AUDIO_MS_NANOS
                    }
                    Bill::CutStream(_) => deltas += r.text().matches("tok ").count() as i64,
                    Bill::Tokens(_) => {}
                }
            }
            Ok((402, _)) => out.refused_402 += 1,
            Ok((400, _)) => out.refused_400 += 1,
            Ok((status, r)) => out.other.push(format!("{status} {}", r.text())),
            Err(e) => out.other.push(format!("transport: {e}")),
        }
    }
    let (prompt, completion) = mock.served_usage();
    match s.bill {
        Bill::Tokens((i, o)) => out.billed += prompt as i64 * i + completion as i64 * o,
        Bill::CutStream((i, o)) => out.billed += prompt as i64 * i + deltas * o,
        _ => {}
    }
    out
}

/// A streamed request whose stream may end abruptly: its status, and every byte that arrived
/// (the body as sent, chunk framing included) until the connection closed.
fn read_cut(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, common::Response)> {
    let stream = send_request(addr, "POST", path, headers, body)?;
    let (status, headers, mut rest) = read_stream_head(stream)?;
    let mut body = Vec::new();
    // A cut stream ends in an error or a short read: what arrived still counts.
    let _ = rest.read_to_end(&mut body);
    Ok((
        status,
        common::Response {
            status,
            headers,
            body,
        },
    ))
}

struct Fixture {
    nodes: Vec<common::Gateway>,
    _services: Option<(RedisServer, PgServer)>,
}

fn one_node(mock: &MockProvider) -> Fixture {
    let gw = GatewayBuilder::new(mock)
        .models(MODELS)
        .server("max_audio_seconds: 600")
        .start();
    Fixture {
        nodes: vec![gw],
        _services: None,
    }
}

fn three_nodes(mock: &MockProvider) -> Fixture {
    let redis = RedisServer::start().expect("Redis (scripts/install-deps.sh)");
    let pg = PgServer::start().expect("PostgreSQL (scripts/install-deps.sh)");
    let pg_url = pg.create_db(&format!("sg_overshoot_{}", free_port()));
    let shared = "shared_state:\n  postgres_url_env: SG_BENCH_PG\n  redis_url_env: SG_BENCH_REDIS\n  on_error: closed\n  reservation_ttl_ms: 30000";
    let nodes = (0..3)
        .map(|_| {
            GatewayBuilder::new(mock)
                .models(MODELS)
                .server("max_audio_seconds: 600")
                .top(shared)
                .env("SG_BENCH_PG", &pg_url)
                .env("SG_BENCH_REDIS", &redis.url())
                .start()
        })
        .collect();
    Fixture {
        nodes,
        _services: Some((redis, pg)),
    }
}

/// Runs every surface on a fixture; one outcome per surface.
fn run(fixture: &Fixture, mock: &MockProvider, label: &str) -> Vec<Outcome> {
    let addrs: Vec<SocketAddr> = fixture.nodes.iter().map(|n| n.addr).collect();
    surfaces()
        .iter()
        .map(|s| {
            let key = fixture.nodes[0].create_key(&["--budget", s.cap_usd, "--budget-mode", "hard"]);
            for n in &fixture.nodes[1..] {
                n.wait_key_live(&key);
            }
            let o = burst(&addrs, mock, &key, s);
            eprintln!(
                "{label}: {}: {} served, {} refused 402, {} refused 400, billed {} of {} nano-USD{}",
                s.name,
                o.served,
                o.refused_402,
                o.refused_400,
                o.billed,
                o.cap,
                if o.other.is_empty() {
                    String::new()
                } else {
                    format!("; other: {:?}", &o.other[..o.other.len().min(3)])
                }
            );
            o
        })
        .collect()
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing: run only when
    // benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mock = common::mock();
    mock.set_recording(false);
    let single = {
        let f = one_node(&mock);
        run(&f, &mock, "1 node")
    };
    let cluster = {
        let f = three_nodes(&mock);
        run(&f, &mock, "3 nodes")
    };
    println!(
        "\n| surface ({CONCURRENCY} concurrent requests, one hard cap) | cap (USD) | 1 node: served / refused | 1 node: billed / cap | 3 nodes: served / refused | 3 nodes: billed / cap |"
    );
    println!("|---|---|---|---|---|---|");
    let mut worst = 0.0f64;
    for ((s, a), b) in surfaces().iter().zip(&single).zip(&cluster) {
        let ratio = |o: &Outcome| o.billed as f64 / o.cap as f64;
        worst = worst.max(ratio(a)).max(ratio(b));
        let counts = |o: &Outcome| {
            let refused = o.refused_402 + o.refused_400;
            let kind = if o.refused_400 > 0 { " (400)" } else { "" };
            let other = if o.other.is_empty() {
                String::new()
            } else {
                format!(", {} other", o.other.len())
            };
            format!("{} / {refused}{kind}{other}", o.served)
        };
        println!(
            "| {} | {} | {} | {:.3} | {} | {:.3} |",
            s.name,
            s.cap_usd,
            counts(a),
            ratio(a),
            counts(b),
            ratio(b)
        );
    }
    println!(
        "\nlargest billed/cap: {worst:.3} (must be <= 1.000): {}",
        if worst <= 1.0 { "PASS" } else { "FAIL" }
    );
}
