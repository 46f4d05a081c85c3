//! One model call as an OpenTelemetry span, built on the ledger side from the same finished
//! record that feeds the ledger: GenAI semantic-convention attributes plus SpiderGate's own,
//! never the agent's secret, prompt or completion.

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use opentelemetry::trace::{Event, SpanContext, SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use serde::Deserialize;

use crate::providers::ProviderKind;
use crate::store::TraceRow;

use super::TraceContext;

/// What the request path hands over for a span, besides the trace row: cheap to make (a
/// copied context and a reference-counted body), only when the call has a gateway span.
#[derive(Debug, Clone)]
pub struct SpanSeed {
    pub ctx: TraceContext,
    /// When the request reached the gateway (ms since the epoch).
    pub started_ms: i64,
    /// `gen_ai.operation.name`: `chat` or `embeddings`.
    pub operation: &'static str,
    /// Kind of the provider that served, for `gen_ai.provider.name`.
    pub provider_kind: Option<ProviderKind>,
    /// The agent's request body: only its sampling parameters are read, on the ledger side.
    pub body: Bytes,
}

/// The request parameters the GenAI conventions name. Any other field (the prompt, tools,
/// ...) is skipped by the parser and never held.
#[derive(Deserialize, Default)]
struct Params {
    temperature: Option<serde_json::Value>,
    top_p: Option<serde_json::Value>,
    top_k: Option<serde_json::Value>,
    max_tokens: Option<serde_json::Value>,
    max_completion_tokens: Option<serde_json::Value>,
    max_output_tokens: Option<serde_json::Value>,
    frequency_penalty: Option<serde_json::Value>,
    presence_penalty: Option<serde_json::Value>,
    seed: Option<serde_json::Value>,
    n: Option<serde_json::Value>,
    stop: Option<serde_json::Value>,
    stop_sequences: Option<serde_json::Value>,
    stream: Option<serde_json::Value>,
    encoding_format: Option<serde_json::Value>,
}

fn scope() -> InstrumentationScope {
    static SCOPE: OnceLock<InstrumentationScope> = OnceLock::new();
    SCOPE
        .get_or_init(|| {
            InstrumentationScope::builder("spidergate")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build()
        })
        .clone()
}

fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

/// The span of one finished model call.
pub fn build(t: &TraceRow, seed: SpanSeed) -> SpanData {
    let request_model = t.requested_model.as_deref().unwrap_or("");
    let name = if request_model.is_empty() {
        Cow::Borrowed(seed.operation)
    } else {
        Cow::Owned(format!("{} {request_model}", seed.operation))
    };
    let start = at_ms(seed.started_ms);
    let end = start + Duration::from_millis(t.latency_ms.max(0) as u64);
    let mut attrs = Vec::with_capacity(24);
    attrs.push(KeyValue::new("gen_ai.operation.name", seed.operation));
    if let Some(kind) = seed.provider_kind {
        attrs.push(KeyValue::new(
            "gen_ai.provider.name",
            match kind {
                ProviderKind::OpenAi => "openai",
                ProviderKind::Anthropic => "anthropic",
            },
        ));
    }
    if let Some(m) = &t.requested_model {
        attrs.push(KeyValue::new("gen_ai.request.model", m.to_string()));
    }
    if let Some(m) = &t.served_model {
        attrs.push(KeyValue::new("gen_ai.response.model", m.to_string()));
    }
    attrs.push(KeyValue::new(
        "gen_ai.usage.input_tokens",
        clamp(t.prompt_tokens),
    ));
    attrs.push(KeyValue::new(
        "gen_ai.usage.output_tokens",
        clamp(t.completion_tokens),
    ));
    request_params(&seed.body, &mut attrs);
    attrs.push(KeyValue::new(
        "http.response.status_code",
        i64::from(t.status),
    ));
    if let Some(key) = &t.key_id {
        attrs.push(KeyValue::new("spidergate.key_id", key.to_string()));
    }
    attrs.push(KeyValue::new("spidergate.endpoint", t.endpoint.to_string()));
    if let Some(p) = &t.provider {
        attrs.push(KeyValue::new("spidergate.provider", p.to_string()));
    }
    attrs.push(KeyValue::new("spidergate.cost_usd", t.cost.as_usd()));
    if t.usage_estimated {
        attrs.push(KeyValue::new("spidergate.usage_estimated", true));
    }
    if let Some(code) = &t.error_code {
        attrs.push(KeyValue::new("spidergate.error_code", code.to_string()));
        attrs.push(KeyValue::new("error.type", code.to_string()));
    } else if t.status >= 400 {
        attrs.push(KeyValue::new("error.type", t.status.to_string()));
    }
    if let Some(f) = &t.fallback_from {
        attrs.push(KeyValue::new("spidergate.fallback_from", f.to_string()));
    }
    let mut events = SpanEvents::default();
    if let Some(ttfb) = t.ttfb_ms {
        // The first bytes of the answer reached the gateway: the time to first token.
        attrs.push(KeyValue::new("spidergate.time_to_first_token_ms", ttfb));
        events.events.push(Event::new(
            "gen_ai.first_token",
            start + Duration::from_millis(ttfb.max(0) as u64),
            vec![],
            0,
        ));
    }
    let status = match (&t.error_code, t.status) {
        (Some(code), _) => Status::error(code.to_string()),
        (None, s) if s >= 400 => Status::error(format!("status {s}")),
        (None, _) => Status::Ok,
    };
    let state = seed
        .ctx
        .state
        .as_ref()
        .and_then(|v| v.to_str().ok())
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    SpanData {
        span_context: SpanContext::new(
            seed.ctx.trace_id,
            seed.ctx.span_id,
            seed.ctx.flags,
            false,
            state,
        ),
        parent_span_id: seed.ctx.parent,
        parent_span_is_remote: seed.ctx.parent != SpanId::INVALID,
        span_kind: SpanKind::Client,
        name,
        start_time: start,
        end_time: end,
        attributes: attrs,
        dropped_attributes_count: 0,
        events,
        links: SpanLinks::default(),
        status,
        instrumentation_scope: scope(),
    }
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `gen_ai.request.*` from the agent's body, where present and well-typed.
fn request_params(body: &[u8], attrs: &mut Vec<KeyValue>) {
    let Ok(p) = serde_json::from_slice::<Params>(body) else {
        return;
    };
    let float = |v: &Option<serde_json::Value>| v.as_ref().and_then(serde_json::Value::as_f64);
    let int = |v: &Option<serde_json::Value>| v.as_ref().and_then(serde_json::Value::as_i64);
    for (key, v) in [
        ("gen_ai.request.temperature", float(&p.temperature)),
        ("gen_ai.request.top_p", float(&p.top_p)),
        ("gen_ai.request.top_k", float(&p.top_k)),
        (
            "gen_ai.request.frequency_penalty",
            float(&p.frequency_penalty),
        ),
        (
            "gen_ai.request.presence_penalty",
            float(&p.presence_penalty),
        ),
    ] {
        if let Some(v) = v {
            attrs.push(KeyValue::new(key, v));
        }
    }
    let max_tokens = int(&p.max_tokens)
        .or(int(&p.max_completion_tokens))
        .or(int(&p.max_output_tokens));
    for (key, v) in [
        ("gen_ai.request.max_tokens", max_tokens),
        ("gen_ai.request.seed", int(&p.seed)),
        ("gen_ai.request.choice.count", int(&p.n)),
    ] {
        if let Some(v) = v {
            attrs.push(KeyValue::new(key, v));
        }
    }
    if let Some(stream) = p.stream.as_ref().and_then(serde_json::Value::as_bool) {
        attrs.push(KeyValue::new("gen_ai.request.stream", stream));
    }
    if let Some(f) = p.encoding_format.as_ref().and_then(|v| v.as_str()) {
        attrs.push(KeyValue::new(
            "gen_ai.request.encoding_formats",
            Value::Array(Array::String(vec![StringValue::from(f.to_string())])),
        ));
    }
    let stops: Vec<StringValue> = match p.stop.or(p.stop_sequences) {
        Some(serde_json::Value::String(s)) => vec![s.into()],
        Some(serde_json::Value::Array(a)) => a
            .into_iter()
            .filter_map(|v| match v {
                serde_json::Value::String(s) => Some(s.into()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if !stops.is_empty() {
        attrs.push(KeyValue::new(
            "gen_ai.request.stop_sequences",
            Value::Array(Array::String(stops)),
        ));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use opentelemetry::trace::{TraceFlags, TraceId};

    use super::*;
    use crate::money::Nanos;

    fn seed(body: &str) -> SpanSeed {
        SpanSeed {
            ctx: TraceContext {
                trace_id: TraceId::from_bytes([7; 16]),
                span_id: SpanId::from_bytes([2; 8]),
                parent: SpanId::from_bytes([1; 8]),
                flags: TraceFlags::SAMPLED,
                state: None,
            },
            started_ms: 1_700_000_000_000,
            operation: "chat",
            provider_kind: Some(ProviderKind::OpenAi),
            body: Bytes::from(body.to_string()),
        }
    }

    fn attr<'a>(s: &'a SpanData, key: &str) -> Option<&'a Value> {
        s.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    #[test]
    fn a_call_becomes_a_genai_span_without_its_prompt() {
        let t = TraceRow {
            key_id: Some(Arc::from("key_1")),
            endpoint: "chat.completions".into(),
            requested_model: Some(Arc::from("fast")),
            served_model: Some(Arc::from("gpt-4o-mini")),
            provider: Some(Arc::from("openai")),
            status: 200,
            latency_ms: 120,
            ttfb_ms: Some(40),
            prompt_tokens: 12,
            completion_tokens: 5,
            cost: Nanos::new(1_500),
            ..TraceRow::default()
        };
        let body = r#"{"model":"fast","messages":[{"role":"user","content":"SECRET PROMPT"}],
            "temperature":0.2,"max_tokens":64,"stop":["END"],"top_p":1}"#;
        let s = build(&t, seed(body));
        assert_eq!(s.name, "chat fast");
        assert_eq!(s.span_kind, SpanKind::Client);
        assert_eq!(s.parent_span_id, SpanId::from_bytes([1; 8]));
        assert_eq!(s.status, Status::Ok);
        assert_eq!(
            attr(&s, "gen_ai.provider.name"),
            Some(&Value::from("openai"))
        );
        assert_eq!(
            attr(&s, "gen_ai.response.model").map(|v| v.as_str()),
            Some("gpt-4o-mini".into())
        );
        assert_eq!(attr(&s, "gen_ai.usage.input_tokens"), Some(&Value::I64(12)));
        assert_eq!(attr(&s, "gen_ai.request.max_tokens"), Some(&Value::I64(64)));
        assert_eq!(
            attr(&s, "gen_ai.request.temperature"),
            Some(&Value::F64(0.2))
        );
        assert_eq!(
            attr(&s, "spidergate.time_to_first_token_ms"),
            Some(&Value::I64(40))
        );
        assert_eq!(s.events.len(), 1);
        for kv in &s.attributes {
            assert!(!kv.value.as_str().contains("SECRET"), "{kv:?}");
        }
    }

    #[test]
    fn an_error_outcome_sets_the_status_and_code() {
        let t = TraceRow {
            endpoint: "chat.completions".into(),
            status: 429,
            error_code: Some("rate_limit_exceeded".into()),
            ..TraceRow::default()
        };
        let s = build(&t, seed("not json"));
        assert_eq!(s.status, Status::error("rate_limit_exceeded"));
        assert_eq!(
            attr(&s, "spidergate.error_code").map(|v| v.as_str()),
            Some("rate_limit_exceeded".into())
        );
        assert!(attr(&s, "gen_ai.request.temperature").is_none());
    }
}
