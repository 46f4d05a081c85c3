//! OpenTelemetry (SPEC §4, §6 `telemetry`): every model call becomes a GenAI span sent over
//! OTLP/HTTP protobuf, in the agent's W3C trace (agent → gateway → upstream), never carrying
//! the secret or the prompt; a collector that is down or stuck never touches a request.
//!
//! The collector here is a small OTLP/HTTP receiver that decodes each export with the
//! official protobuf definitions (`opentelemetry-proto`).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::{status::StatusCode, Span};
use prost::Message;
use serde_json::json;

const AGENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const AGENT_SPAN: &str = "00f067aa0ba902b7";
const PROMPT_CANARY: &str = "PROMPT-canary-7f3a";

/// What the receiver got: decoded spans with their resource's `service.name`, and every
/// raw export body (to search for what must never be there).
#[derive(Default)]
struct Received {
    spans: Vec<(String, Span)>,
    raw: Vec<Vec<u8>>,
    paths: Vec<String>,
    content_types: Vec<String>,
}

struct Collector {
    addr: SocketAddr,
    got: Arc<Mutex<Received>>,
}

impl Collector {
    /// A receiver that answers each export 200 (`hang`: accepts and never answers).
    fn start(hang: bool) -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let got = Arc::new(Mutex::new(Received::default()));
        let shared = got.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let got = shared.clone();
                std::thread::spawn(move || serve(conn, &got, hang));
            }
        });
        Collector { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.got.lock().unwrap().spans.clone()
    }

    /// Waits for a span whose `spidergate.key_id` is `key`.
    fn span_of(&self, key: &str) -> (String, Span) {
        wait_for(Duration::from_secs(20), "span exported", || {
            self.spans()
                .into_iter()
                .find(|(_, s)| attr(s, "spidergate.key_id").as_deref() == Some(key))
        })
    }
}

fn serve(conn: TcpStream, got: &Mutex<Received>, hang: bool) {
    let mut reader = BufReader::new(conn.try_clone().expect("clone"));
    let mut conn = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let Ok(headers) = read_header_lines(&mut reader) else {
            return;
        };
        let len: usize = header_of(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if hang {
            // Never answers: the exporter waits for its timeout.
            std::thread::sleep(Duration::from_secs(3600));
            return;
        }
        let req = ExportTraceServiceRequest::decode(body.as_slice()).expect("OTLP protobuf");
        {
            let mut g = got.lock().unwrap();
            g.paths.push(path);
            g.content_types.push(
                header_of(&headers, "content-type")
                    .unwrap_or_default()
                    .to_string(),
            );
            g.raw.push(body);
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .as_ref()
                    .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                    .and_then(|kv| kv.value.as_ref())
                    .and_then(|v| match &v.value {
                        Some(AnyValue::StringValue(s)) => Some(s.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    for span in ss.spans {
                        g.spans.push((service.clone(), span));
                    }
                }
            }
        }
        let answer = ExportTraceServiceRequest::default().encode_to_vec();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: {}\r\n\r\n",
            answer.len()
        );
        if conn.write_all(head.as_bytes()).is_err() || conn.write_all(&answer).is_err() {
            return;
        }
    }
}

/// An attribute as text (numbers and booleans printed).
fn attr(s: &Span, key: &str) -> Option<String> {
    let v = s
        .attributes
        .iter()
        .find(|kv| kv.key == key)?
        .value
        .as_ref()?;
    match v.value.as_ref()? {
        AnyValue::StringValue(x) => Some(x.clone()),
        AnyValue::IntValue(x) => Some(x.to_string()),
        AnyValue::DoubleValue(x) => Some(x.to_string()),
        AnyValue::BoolValue(x) => Some(x.to_string()),
        AnyValue::ArrayValue(a) => Some(format!("{:?}", a.values)),
        other => Some(format!("{other:?}")),
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn gateway(collector: Option<&Collector>, extra: &[&str]) -> (MockProvider, Gateway) {
    let m = mock();
    let mut b = GatewayBuilder::new(&m).admin("admin-secret-t");
    if let Some(c) = collector {
        let mut t = format!(
            "telemetry:\n  otlp_endpoint: \"{}\"\n  service_name: sg-test",
            c.url()
        );
        for l in extra {
            t.push_str(&format!("\n  {l}"));
        }
        b = b.top(&t);
    }
    (m, b.start())
}

fn chat_body(model: &str) -> Vec<u8> {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT_CANARY}],
        "temperature": 0.3,
        "max_tokens": 50,
        "top_p": 0.9,
    })
    .to_string()
    .into_bytes()
}

/// Parses `00-<trace>-<span>-<flags>` into (trace, span, flags).
fn traceparent(v: &str) -> (String, String, String) {
    let p: Vec<&str> = v.split('-').collect();
    assert_eq!(p.len(), 4, "traceparent {v}");
    assert_eq!(p[0], "00");
    (p[1].to_string(), p[2].to_string(), p[3].to_string())
}

fn metric(gw: &Gateway, name: &str) -> u64 {
    let text = gw.admin_call("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{name} not in /metrics"))
}

fn trace_id_in_db(gw: &Gateway, key: &str) -> Option<String> {
    wait_for(Duration::from_secs(10), "trace row", || {
        gw.db()
            .query_row(
                "SELECT trace_id FROM traces WHERE key_id = ?1 AND endpoint = 'chat.completions'
                 ORDER BY id DESC LIMIT 1",
                [key],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok()
    })
}

#[test]
fn a_call_is_one_genai_span_in_the_agents_trace_and_the_upstream_is_its_child() {
    let collector = Collector::start(false);
    let (m, gw) = gateway(Some(&collector), &[]);
    let key = gw.create_key(&[]);
    let agent_tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let r = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        &chat_body("gpt-4o-mini"),
        &[("traceparent", &agent_tp), ("tracestate", "agent=1")],
    );
    assert_eq!(r.status, 200, "{}", r.text());

    // The agent gets the gateway's span back, in its own trace.
    let (trace, gateway_span, flags) = traceparent(r.header("traceparent").expect("traceparent"));
    assert_eq!(trace, AGENT_TRACE);
    assert_ne!(gateway_span, AGENT_SPAN);
    assert_eq!(flags, "01");

    // The upstream's parent is the gateway's span, in the same trace.
    let up = m.requests().into_iter().last().expect("upstream request");
    let (up_trace, up_parent, _) = traceparent(up.header("traceparent").expect("upstream tp"));
    assert_eq!(up_trace, AGENT_TRACE);
    assert_eq!(up_parent, gateway_span);
    assert_eq!(up.header("tracestate"), Some("agent=1"));

    // An invalid `traceparent` starts the gateway's own trace, and its `tracestate` is
    // discarded with it (W3C Trace Context), not sent upstream under the new trace.
    let other = gw.create_key(&[]);
    let r = gw.post(
        "/v1/chat/completions",
        &other.bearer(),
        &chat_body("gpt-4o-mini"),
        &[
            ("traceparent", "00-not-a-trace-01"),
            ("tracestate", "agent=2"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let up = m.requests().into_iter().last().expect("upstream request");
    let (new_trace, _, _) = traceparent(up.header("traceparent").expect("upstream tp"));
    assert_ne!(new_trace, AGENT_TRACE);
    assert_eq!(up.header("tracestate"), None);

    // The exported span: agent → gateway ids, GenAI attributes, SpiderGate's own.
    let (service, span) = collector.span_of(&key.id);
    assert_eq!(service, "sg-test");
    assert_eq!(hex(&span.trace_id), AGENT_TRACE);
    assert_eq!(hex(&span.span_id), gateway_span);
    assert_eq!(hex(&span.parent_span_id), AGENT_SPAN);
    assert_eq!(span.name, "chat gpt-4o-mini");
    assert_eq!(span.kind, 3, "SPAN_KIND_CLIENT");
    assert_eq!(span.trace_state, "agent=1");
    let a = |k: &str| attr(&span, k);
    assert_eq!(a("gen_ai.operation.name").as_deref(), Some("chat"));
    assert_eq!(a("gen_ai.provider.name").as_deref(), Some("openai"));
    assert_eq!(a("gen_ai.request.model").as_deref(), Some("gpt-4o-mini"));
    assert_eq!(a("gen_ai.response.model").as_deref(), Some("gpt-4o-mini"));
    let input: u64 = a("gen_ai.usage.input_tokens").unwrap().parse().unwrap();
    let output: u64 = a("gen_ai.usage.output_tokens").unwrap().parse().unwrap();
    assert!(input > 0 && output > 0, "{input} {output}");
    assert_eq!(a("gen_ai.request.temperature").as_deref(), Some("0.3"));
    assert_eq!(a("gen_ai.request.max_tokens").as_deref(), Some("50"));
    assert_eq!(a("gen_ai.request.top_p").as_deref(), Some("0.9"));
    assert_eq!(a("spidergate.key_id"), Some(key.id.clone()));
    assert_eq!(a("spidergate.provider").as_deref(), Some("mock"));
    let cost: f64 = a("spidergate.cost_usd").unwrap().parse().unwrap();
    assert!(cost > 0.0);
    assert!(a("spidergate.error_code").is_none());
    assert!(a("spidergate.time_to_first_token_ms").is_some());
    assert!(span.events.iter().any(|e| e.name == "gen_ai.first_token"));
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Ok as i32)
    );
    assert!(span.end_time_unix_nano >= span.start_time_unix_nano);

    // Never the secret, the provider's key or the prompt, anywhere in what was sent.
    let got = collector.got.lock().unwrap();
    for body in &got.raw {
        for secret in [key.secret.as_str(), PROVIDER_KEY, PROMPT_CANARY] {
            assert!(
                !body.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{secret} was exported"
            );
        }
    }
    assert!(
        got.paths.iter().all(|p| p == "/v1/traces"),
        "{:?}",
        got.paths
    );
    assert!(got
        .content_types
        .iter()
        .all(|c| c == "application/x-protobuf"));
    drop(got);

    // The trace row records the trace id, and the admin API shows it.
    assert_eq!(trace_id_in_db(&gw, &key.id).as_deref(), Some(AGENT_TRACE));
    let traces = gw
        .admin_call(
            "GET",
            &format!("/admin/traces?key={}&limit=5", key.id),
            None,
        )
        .json();
    let rows = traces["data"].as_array().cloned().unwrap_or_default();
    assert!(
        rows.iter().any(|t| t["trace_id"] == AGENT_TRACE),
        "{traces}"
    );
}

#[test]
fn without_a_traceparent_the_gateway_starts_the_trace() {
    let collector = Collector::start(false);
    let (m, gw) = gateway(Some(&collector), &[]);
    let key = gw.create_key(&[]);
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    let (trace, span_id, flags) = traceparent(r.header("traceparent").expect("traceparent"));
    assert_eq!(flags, "01");
    assert_ne!(trace, "0".repeat(32));
    let up = m.requests().into_iter().last().expect("upstream request");
    assert_eq!(
        up.header("traceparent"),
        r.header("traceparent"),
        "the upstream's parent is the gateway's span"
    );
    let (_, span) = collector.span_of(&key.id);
    assert_eq!(hex(&span.trace_id), trace);
    assert_eq!(hex(&span.span_id), span_id);
    assert!(span.parent_span_id.is_empty(), "a root span");
    assert_eq!(trace_id_in_db(&gw, &key.id), Some(trace));
}

#[test]
fn refusals_and_fallbacks_are_spans_with_their_outcome() {
    let collector = Collector::start(false);
    let (_m, gw) = gateway(Some(&collector), &[]);
    // A refused call: unknown model.
    let key = gw.create_key(&[]);
    let r = gw.post(
        "/v1/chat/completions",
        &key.bearer(),
        &chat_body("no-such-model"),
        &[],
    );
    assert_eq!(r.status, 404);
    assert!(r.header("traceparent").is_some(), "errors carry it too");
    let (_, span) = collector.span_of(&key.id);
    assert_eq!(
        attr(&span, "spidergate.error_code").as_deref(),
        Some("model_not_found")
    );
    assert_eq!(
        span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(
        attr(&span, "gen_ai.provider.name"),
        None,
        "no model, no provider"
    );

    // A known model refused (402): its span names the provider it would have gone to.
    let key = gw.create_key(&["--budget", "0.000001", "--budget-mode", "hard"]);
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 402, "{}", r.text());
    let (_, span) = collector.span_of(&key.id);
    assert_eq!(
        attr(&span, "spidergate.error_code").as_deref(),
        Some("budget_exceeded")
    );
    assert_eq!(
        attr(&span, "gen_ai.provider.name").as_deref(),
        Some("openai")
    );

    // A fallback: the dead model first, then gpt-4o-mini.
    let key = gw.create_key(&[]);
    let r = gw.chat(&key, "spideriq/failover");
    assert_eq!(r.status, 200, "{}", r.text());
    let (_, span) = collector.span_of(&key.id);
    assert_eq!(
        attr(&span, "spidergate.fallback_from").as_deref(),
        Some("dead-model")
    );
    assert_eq!(
        attr(&span, "gen_ai.request.model").as_deref(),
        Some("spideriq/failover")
    );
    assert_eq!(
        attr(&span, "gen_ai.response.model").as_deref(),
        Some("gpt-4o-mini")
    );
}

#[test]
fn an_unreachable_collector_never_fails_a_request() {
    // Nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let m = mock();
    let gw = GatewayBuilder::new(&m)
        .admin("admin-secret-t")
        .top(&format!(
            "telemetry:\n  otlp_endpoint: \"http://{addr}\"\n  service_name: sg-test"
        ))
        .start();
    let key = gw.create_key(&[]);
    for _ in 0..20 {
        let r = gw.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.header("traceparent").is_some());
    }
    wait_for(Duration::from_secs(30), "failed exports counted", || {
        (metric(&gw, "spidergate_otlp_spans_failed_total") > 0).then_some(())
    });
    assert_eq!(metric(&gw, "spidergate_otlp_spans_exported_total"), 0);
}

#[test]
fn a_stuck_collector_fills_the_bounded_queue_and_drops_are_counted() {
    let collector = Collector::start(true);
    let (_m, gw) = gateway(
        Some(&collector),
        &["max_queue_spans: 16", "export_timeout_ms: 60000"],
    );
    let key = gw.create_key(&[]);
    let mut sent = 0;
    // The exporter is stuck on its first export; the queue holds 16 more, the rest drop.
    wait_for(Duration::from_secs(60), "dropped spans counted", || {
        for _ in 0..10 {
            let r = gw.chat(&key, "gpt-4o-mini");
            assert_eq!(r.status, 200, "{}", r.text());
            sent += 1;
        }
        (metric(&gw, "spidergate_otlp_spans_dropped_total") > 0).then_some(())
    });
    assert!(sent > 16);
    // Spend is never part of what drops.
    let usage = gw.usage(&key);
    let requests: u64 = usage["by_model"]["gpt-4o-mini"]["requests"]
        .as_u64()
        .unwrap_or(0);
    assert_eq!(requests, sent, "{usage}");
}

#[test]
fn telemetry_off_passes_the_agents_traceparent_through_and_records_its_trace_id() {
    let (m, gw) = gateway(None, &[]);
    let key = gw.create_key(&[]);
    let agent_tp = format!("00-{AGENT_TRACE}-{AGENT_SPAN}-01");
    let r = gw.chat_with(&key, "gpt-4o-mini", &[("traceparent", &agent_tp)]);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.header("traceparent").is_none(),
        "no gateway span when off"
    );
    let up = m.requests().into_iter().last().expect("upstream request");
    assert_eq!(up.header("traceparent"), Some(agent_tp.as_str()));
    assert_eq!(trace_id_in_db(&gw, &key.id).as_deref(), Some(AGENT_TRACE));
    assert_eq!(metric(&gw, "spidergate_otlp_spans_exported_total"), 0);
}

#[test]
fn a_bad_otlp_endpoint_is_a_config_error_naming_the_field() {
    let m = mock();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.yaml");
    std::fs::write(
        &cfg,
        format!(
            "listen: \"127.0.0.1:1\"\ndatabase: \"{}/db\"\nproviders:\n  - name: mock\n    kind: openai\n    base_url: \"{}\"\nmodels:\n  - id: a\n    provider: mock\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\ntelemetry:\n  otlp_endpoint: \"collector:4318\"\n",
            dir.path().display(),
            m.base_url()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("--config")
        .arg(&cfg)
        .arg("check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("telemetry.otlp_endpoint"), "{err}");
}
