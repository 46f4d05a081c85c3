//! The Pingora `ProxyHttp` implementation: glue between Pingora's phases and the plain
//! functions in `admission`, `providers`, `usage` and `ledger`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use http::{HeaderName, HeaderValue};
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::admission::{self, Admission, Endpoint};
use crate::clock::{now_ms, Now};
use crate::error::GateError;
use crate::gate::Gate;
use crate::keys::token::TokenHash;
use crate::keys::KeyEntry;
use crate::limits::{Charge, Standing};
use crate::money::Nanos;
use crate::providers::openai::rewrite_body;
use crate::report;
use crate::shield::SHIELD_WINDOW;
use crate::snapshot::Snapshot;
use crate::store::{JournalRow, LedgerEntry, TraceRow};
use crate::usage::{usage_from_json, Forward, SseUsageParser, Usage};

/// Non-streamed responses larger than this are not buffered for usage parsing (charged an
/// estimate instead), so a huge response cannot balloon memory.
const MAX_JSON_RESPONSE: usize = 8 * 1024 * 1024;

/// Longest wait of `/v1/usage` for the caller's just-finished request to be booked.
pub const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);

/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Error codes recorded in traces for outcomes that are not gateway rejections.
const CLIENT_CLOSED: &str = "client_closed";
const STREAM_BROKEN: &str = "upstream_stream_broken";
/// The request's task was dropped before it finished (shutdown past its grace, a panic).
const INTERRUPTED: &str = "interrupted";
/// `X-SpiderGate-Error-Code` of an upstream's own error response passed through.
const UPSTREAM_STATUS: &str = "upstream_status";

pub struct GateProxy {
    gate: Arc<Gate>,
}

impl GateProxy {
    pub fn new(gate: Arc<Gate>) -> Self {
        GateProxy { gate }
    }
}

/// Per-request state shared across the phases. Dropping it unfinished (a shutdown past its
/// grace cancels the task, or a panic) still settles and records the request.
pub struct RequestCtx {
    gate: Arc<Gate>,
    /// Routes and keys as of this request's start (replaced once, at admission): indexes
    /// into its catalog stay valid whatever reloads happen meanwhile.
    snap: Arc<Snapshot>,
    started: Instant,
    started_ms: i64,
    endpoint: Endpoint,
    key: Option<Arc<KeyEntry>>,
    /// Rate-limit standing for the headers of any authenticated response.
    standing: Option<Standing>,
    admission: Option<Admission>,
    /// The admission's journal row, closed by this request's ledger entry.
    journal_id: Option<i64>,
    /// The request body as received.
    body: Bytes,
    /// The body for the current attempt (model rewritten).
    upstream_body: Option<Bytes>,
    /// Index into the admission's chain of the model being tried.
    attempt: usize,
    /// First model of the chain, once a fallback happened.
    fallback_from: Option<usize>,
    /// An upstream status that triggers a fallback was seen; the error carries it to retry.
    fallback_status: Option<u16>,
    /// The current attempt's request went to the upstream, which may be working on it from
    /// now on: it is charged even if no response comes back.
    sent_upstream: bool,
    /// Final status sent (or being sent) to the client.
    status: u16,
    /// Upstream's own status, when it answered.
    upstream_status: Option<u16>,
    error_code: Option<&'static str>,
    response_started: bool,
    response_complete: bool,
    /// `finishing_started` was called on the key's counters (see `KeyCounters::finishing`).
    finishing: bool,
    finished: bool,
    ttfb_ms: Option<i64>,
    sse: Option<SseUsageParser>,
    json_buf: Option<ResponseBody>,
    response_bytes: u64,
}

/// A non-streamed response body kept for usage parsing. The usual one-chunk body is held by
/// reference count (no copy); only a body split across chunks is joined.
#[derive(Default)]
struct ResponseBody {
    first: Bytes,
    joined: Option<Vec<u8>>,
}

impl ResponseBody {
    /// Adds a chunk; false once the body exceeds `MAX_JSON_RESPONSE` (then it is dropped).
    fn push(&mut self, chunk: &Bytes) -> bool {
        match &mut self.joined {
            Some(v) => v.extend_from_slice(chunk),
            None if self.first.is_empty() => self.first = chunk.clone(),
            None => {
                let mut v = Vec::with_capacity(self.first.len() + chunk.len());
                v.extend_from_slice(&self.first);
                v.extend_from_slice(chunk);
                self.joined = Some(v);
            }
        }
        self.len() <= MAX_JSON_RESPONSE
    }

    fn len(&self) -> usize {
        self.joined.as_ref().map_or(self.first.len(), Vec::len)
    }

    fn bytes(&self) -> &[u8] {
        self.joined.as_deref().unwrap_or(&self.first)
    }
}

fn header_bytes<'a>(req: &'a RequestHeader, name: &str) -> Option<&'a [u8]> {
    req.headers.get(name).map(|v| v.as_bytes())
}

static LIMIT_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-limit-requests");
static REMAINING_REQUESTS: HeaderName = HeaderName::from_static("x-ratelimit-remaining-requests");
static RATE_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
static BUDGET_WARNING: HeaderName = HeaderName::from_static("x-spidergate-budget-warning");
/// Client headers that never go upstream: credentials of any kind (the provider's own key
/// replaces the agent's token) and framing the gateway handles itself (the body is already
/// read, so an upstream `100 Continue` would only reach the client a second time).
static STRIPPED_HEADERS: [HeaderName; 8] = [
    HeaderName::from_static("x-api-key"),
    HeaderName::from_static("api-key"),
    HeaderName::from_static("openai-organization"),
    HeaderName::from_static("openai-project"),
    http::header::PROXY_AUTHORIZATION,
    http::header::COOKIE,
    http::header::TRANSFER_ENCODING,
    http::header::EXPECT,
];
static SERVED_MODEL: HeaderName = HeaderName::from_static("x-spidergate-model");
static ERROR_CODE: HeaderName = HeaderName::from_static("x-spidergate-error-code");

/// Whether an upstream response header reveals the operator's provider account or its
/// limits (SPEC §2): the gateway's own `X-RateLimit-*` are the only ones a client sees.
fn is_account_header(name: &HeaderName) -> bool {
    let n = name.as_str();
    n.starts_with("x-ratelimit-")
        || n.starts_with("anthropic-ratelimit-")
        || n.starts_with("openai-organization")
        || n.starts_with("openai-project")
        || n == "anthropic-organization-id"
        || n == "set-cookie"
        || n == "set-cookie2"
}

/// Drops the upstream's account headers (one pass; removal only when one is present).
fn strip_account_headers(resp: &mut ResponseHeader) {
    if !resp.headers.keys().any(is_account_header) {
        return;
    }
    let names: Vec<HeaderName> = resp
        .headers
        .keys()
        .filter(|n| is_account_header(n))
        .cloned()
        .collect();
    for n in &names {
        resp.remove_header(n);
    }
}
static FALLBACK_FROM: HeaderName = HeaderName::from_static("x-spidergate-fallback-from");
static UNLIMITED: HeaderValue = HeaderValue::from_static("unlimited");

fn add_standing_headers(resp: &mut ResponseHeader, s: &Standing) -> Result<()> {
    match (s.rpm, s.remaining) {
        (Some(limit), Some(remaining)) => {
            resp.insert_header(LIMIT_REQUESTS.clone(), HeaderValue::from(limit))?;
            resp.insert_header(REMAINING_REQUESTS.clone(), HeaderValue::from(remaining))?;
        }
        _ => {
            resp.insert_header(LIMIT_REQUESTS.clone(), UNLIMITED.clone())?;
            resp.insert_header(REMAINING_REQUESTS.clone(), UNLIMITED.clone())?;
        }
    }
    resp.insert_header(RATE_RESET.clone(), HeaderValue::from(s.reset_secs))?;
    if s.budget_warning {
        resp.insert_header(
            BUDGET_WARNING.clone(),
            HeaderValue::from_static("monthly budget reached (soft limit)"),
        )?;
    }
    Ok(())
}

/// Writes a complete JSON response (local answers and gateway errors).
async fn send_json(
    session: &mut Session,
    status: u16,
    body: Vec<u8>,
    standing: Option<&Standing>,
    error: Option<&GateError>,
) -> Result<()> {
    let mut resp = ResponseHeader::build(status, Some(7))?;
    resp.insert_header("content-type", "application/json")?;
    resp.insert_header("content-length", body.len().to_string())?;
    if let Some(e) = error {
        resp.insert_header(ERROR_CODE.clone(), HeaderValue::from_static(e.code()))?;
    }
    let retry_after = error.and_then(GateError::retry_after);
    if let Some(s) = standing {
        add_standing_headers(&mut resp, s)?;
    }
    if let Some(secs) = retry_after {
        resp.insert_header("retry-after", secs.to_string())?;
    }
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::from(body)), true)
        .await
}

/// Reads the whole request body, enforcing `max_body_bytes` before and while reading.
/// A body that arrives in one piece is kept without a copy.
async fn read_body(
    session: &mut Session,
    max: u64,
) -> Result<std::result::Result<Bytes, GateError>> {
    let declared = header_bytes(session.req_header(), "content-length")
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Ok(Err(GateError::RequestTooLarge(max)));
    }
    // A client that waits for `100 Continue` (curl does above 1 MiB) would otherwise stall
    // until its own timeout before sending the body.
    let expects_continue = header_bytes(session.req_header(), "expect")
        .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        session
            .as_downstream_mut()
            .write_continue_response()
            .await?;
    }
    let mut first: Option<Bytes> = None;
    let mut buf: Option<BytesMut> = None;
    let mut total: u64 = 0;
    while let Some(chunk) = session.read_request_body().await? {
        total += chunk.len() as u64;
        if total > max {
            return Ok(Err(GateError::RequestTooLarge(max)));
        }
        match (&mut buf, first.take()) {
            (Some(b), _) => b.extend_from_slice(&chunk),
            (None, None) => first = Some(chunk),
            (None, Some(prev)) => {
                let cap = declared.unwrap_or(0).max(total) as usize;
                let mut b = BytesMut::with_capacity(cap);
                b.extend_from_slice(&prev);
                b.extend_from_slice(&chunk);
                buf = Some(b);
            }
        }
    }
    Ok(Ok(match (buf, first) {
        (Some(b), _) => b.freeze(),
        (None, Some(f)) => f,
        (None, None) => Bytes::new(),
    }))
}

impl GateProxy {
    /// Sends a gateway error, with rate-limit headers if the caller is authenticated.
    async fn reject(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GateError,
    ) -> Result<bool> {
        ctx.status = err.status();
        ctx.error_code = Some(err.code());
        let standing = match (&ctx.standing, &ctx.key) {
            (Some(s), _) => Some(*s),
            (None, Some(k)) => Some(k.counters.standing(Now::read(), &k.limits)),
            (None, None) => None,
        };
        send_json(
            session,
            err.status(),
            err.body(),
            standing.as_ref(),
            Some(&err),
        )
        .await?;
        Ok(true)
    }

    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        body: Vec<u8>,
    ) -> Result<bool> {
        ctx.status = 200;
        let standing = match (&ctx.standing, &ctx.key) {
            (Some(s), _) => Some(*s),
            (None, Some(k)) => Some(k.counters.standing(Now::read(), &k.limits)),
            (None, None) => None,
        };
        send_json(session, 200, body, standing.as_ref(), None).await?;
        Ok(true)
    }

    /// The decision on a model request, taken once its body has arrived: the clock and the
    /// key are read again now (a slow upload must not carry an old month, or a key revoked
    /// meanwhile), then body, model, budget and limits are checked and the admission is
    /// journaled.
    fn admit(&self, ctx: &mut RequestCtx, hash: &TokenHash) -> std::result::Result<(), GateError> {
        let now = Now::read();
        // The decision uses the snapshot of now; the rest of the request keeps it.
        ctx.snap = self.gate.snapshot();
        let routes = ctx.snap.routes.clone();
        let key = admission::lookup(&ctx.snap.keys, hash, now.wall)?;
        ctx.key = Some(key.clone());
        if key.limits.hard_budget
            && key.limits.budget.is_some()
            && self.gate.ledger.health().failing()
        {
            return Err(GateError::LedgerUnavailable);
        }
        let media = u64::from(routes.config.tuning.media_part_tokens);
        let adm = admission::admit(&routes.catalog, &key, ctx.endpoint, &ctx.body, now, media)?;
        let journal_id = self.gate.ledger.journal_id();
        let served = adm.chain.get(adm.bound.model).unwrap_or(0);
        self.gate.ledger.journal(JournalRow {
            id: journal_id,
            ts: adm.admitted_at,
            key_id: key.id.clone(),
            endpoint: ctx.endpoint.label(),
            requested_model: adm.fields.model.clone(),
            served_model: routes.model_names[served].clone(),
            prompt_tokens: adm.bound.prompt_tokens,
            completion_tokens: adm.bound.completion_tokens,
            cost: adm.bound.cost,
        });
        ctx.journal_id = Some(journal_id);
        ctx.standing = Some(adm.standing);
        ctx.admission = Some(adm);
        Ok(())
    }

    /// A failed authentication: counted per client address, and past the address's limit
    /// answered 429 instead of 401 (valid keys never get here).
    fn shield(&self, session: &Session, err: GateError) -> GateError {
        self.gate.metrics.auth_failure();
        let addr = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        match addr {
            Some(ip) if self.gate.auth_shield.failed(&ip) => GateError::AuthFlood {
                retry_after_secs: SHIELD_WINDOW.as_secs(),
            },
            _ => err,
        }
    }

    /// `/health`: 200 while the gateway can serve and record spend; 503 when the ledger
    /// cannot write (hard-budget keys are paused then), so a balancer can move traffic.
    async fn health(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let ledger = self.gate.ledger.health();
        if ledger.failing() {
            ctx.status = 503;
            let body = serde_json::json!({
                "status": "degraded",
                "ledger": "failing",
                "ledger_backlog": ledger.backlog(),
            });
            let mut resp = ResponseHeader::build(503, Some(2))?;
            resp.insert_header("content-type", "application/json")?;
            let body = Bytes::from(body.to_string());
            resp.insert_header("content-length", body.len().to_string())?;
            session.write_response_header(Box::new(resp), false).await?;
            session.write_response_body(Some(body), true).await?;
            return Ok(true);
        }
        self.answer(session, ctx, br#"{"status":"ok","ledger":"ok"}"#.to_vec())
            .await
    }

    /// Catalog, usage and health: answered by the gateway itself.
    async fn serve_local(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model_id: &str,
    ) -> Result<bool> {
        let routes = ctx.snap.routes.clone();
        let catalog = &routes.catalog;
        let key = ctx.key.as_deref();
        let body = match ctx.endpoint {
            Endpoint::Models => report::models_list(catalog, key),
            Endpoint::Aliases => report::aliases_list(catalog, key),
            Endpoint::Model => match report::model_object(catalog, key, model_id) {
                Some(b) => b,
                None => {
                    let err = GateError::ModelNotFound(model_id.to_string());
                    return self.reject(session, ctx, err).await;
                }
            },
            Endpoint::Usage => {
                let Some(key) = ctx.key.clone() else {
                    return self.reject(session, ctx, GateError::InvalidApiKey).await;
                };
                match key.counters.admit_usage_call(Now::read(), &key.limits) {
                    Ok(standing) => ctx.standing = Some(standing),
                    Err(e) => return self.reject(session, ctx, e).await,
                }
                key.counters.settled(SETTLE_WAIT).await;
                self.gate.ledger.nudge();
                report::live_usage(&key, Now::read())
                    .to_string()
                    .into_bytes()
            }
            _ => return self.reject(session, ctx, GateError::NotFound).await,
        };
        self.answer(session, ctx, body).await
    }

    /// Moves to the next model of the chain if one is left and nothing reached the client.
    fn try_fallback(&self, ctx: &mut RequestCtx) -> bool {
        let Some(adm) = &ctx.admission else {
            return false;
        };
        if ctx.response_started || ctx.attempt + 1 >= adm.chain.len() {
            return false;
        }
        if ctx.fallback_from.is_none() {
            ctx.fallback_from = adm.chain.get(0);
        }
        ctx.attempt += 1;
        ctx.upstream_body = None;
        ctx.upstream_status = None;
        ctx.sent_upstream = false;
        self.gate.metrics.fallback();
        true
    }
}

impl RequestCtx {
    fn current_model(&self) -> Option<usize> {
        self.admission.as_ref()?.chain.get(self.attempt)
    }

    /// Marks the response as complete, once: a `/v1/usage` asked from now on waits for this
    /// request's settlement.
    fn response_ended(&mut self) {
        self.response_complete = true;
        if !self.finishing {
            if let (Some(key), true) = (&self.key, self.admission.is_some()) {
                key.counters.finishing_started();
                self.finishing = true;
            }
        }
    }

    /// Final usage of an admitted request and whether it is an estimate: reported usage
    /// where it arrived; else, whenever the upstream may have worked (a successful response
    /// that lost its usage, or a request sent upstream with no response head back: a client
    /// hang-up, a timeout, a break), an estimate of at least the prompt; else zero (the
    /// upstream refused it with an error status, or was never reached).
    fn final_usage(&self) -> (Usage, bool) {
        let reported = match (&self.sse, &self.json_buf) {
            (Some(p), _) => p.usage(),
            (None, Some(buf)) if self.response_complete => usage_from_json(buf.bytes()),
            _ => None,
        };
        if let Some(u) = reported {
            return (u, false);
        }
        let upstream_ok = self
            .upstream_status
            .is_some_and(|s| (200..300).contains(&s));
        let unanswered = self.sent_upstream && self.upstream_status.is_none();
        if !upstream_ok && !unanswered {
            return (Usage::default(), false);
        }
        let prompt = (self.body.len() as u64).div_ceil(4).max(1);
        let completion = match (&self.sse, self.endpoint) {
            (_, Endpoint::Embeddings) => 0,
            _ if unanswered => 0,
            (Some(p), _) => p.content_bytes().div_ceil(4).max(1),
            (None, _) => self.response_bytes.div_ceil(4).max(1),
        };
        (
            Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
            },
            true,
        )
    }

    /// Settles the reservation, books the cost and records the trace, exactly once, on
    /// every outcome: called by `logging`, or by `Drop` if the request never got there.
    fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true) || self.endpoint == Endpoint::Health {
            return;
        }
        if self.response_started && !self.response_complete && self.error_code.is_none() {
            self.error_code = Some(CLIENT_CLOSED);
        }
        let gate = self.gate.clone();
        let routes = self.snap.routes.clone();
        let latency_ms = self.started.elapsed().as_millis() as i64;
        let served = self.current_model();
        let (usage, estimated) = match &self.admission {
            Some(_) => self.final_usage(),
            None => (Usage::default(), false),
        };
        let cost = served.map_or(Nanos::ZERO, |m| {
            routes
                .catalog
                .cost(m, usage.prompt_tokens, usage.completion_tokens)
        });
        let admitted = self.admission.is_some();
        let mut requested_model = None;
        let mut ts = self.started_ms;
        if let Some(adm) = self.admission.take() {
            if let Some(key) = &self.key {
                let charge = served.map(|m| Charge {
                    model: &routes.model_names[m],
                    prompt_tokens: usage.prompt_tokens,
                    completion_tokens: usage.completion_tokens,
                    cost,
                });
                key.counters.settle(adm.reservation, charge);
            }
            ts = adm.admitted_at;
            requested_model = Some(adm.fields.model);
        }
        let outcome = match self.error_code {
            Some(code) => code,
            None if self.status >= 400 => UPSTREAM_STATUS,
            None => "ok",
        };
        gate.metrics.outcome(outcome);
        if admitted {
            gate.metrics.latency(latency_ms.max(0) as u64);
            gate.metrics.usage(
                usage.prompt_tokens,
                usage.completion_tokens,
                cost,
                estimated,
            );
        }
        let keep_trace = self.key.is_some() || gate.unauthenticated_traces.allow(self.started_ms);
        let model = |m: usize| routes.model_names[m].clone();
        let trace = TraceRow {
            id: 0,
            ts,
            key_id: self.key.as_ref().map(|k| k.id.clone()),
            endpoint: self.endpoint.label().into(),
            requested_model,
            served_model: served.filter(|_| admitted).map(model),
            provider: served
                .filter(|_| admitted)
                .map(|m| routes.provider_names[routes.catalog.models()[m].provider].clone()),
            status: self.status,
            error_code: self.error_code.map(Cow::Borrowed),
            latency_ms,
            ttfb_ms: self.ttfb_ms,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost,
            usage_estimated: estimated,
            fallback_from: self.fallback_from.map(model),
        };
        gate.ledger.record(LedgerEntry {
            trace,
            admitted,
            counted: admitted,
            journal_id: self.journal_id,
            keep_trace,
        });
        // Only now, with the entry queued: a `/v1/usage` waiting on it may nudge the writer.
        if let (true, Some(key)) = (self.finishing, &self.key) {
            key.counters.finishing_ended();
        }
    }
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.finished {
            if self.error_code.is_none() {
                self.error_code = Some(INTERRUPTED);
            }
            self.finish();
        }
        // Last: a SIGTERM drain that sees zero in flight finds every entry queued.
        self.gate.request_ended();
    }
}

#[async_trait]
impl ProxyHttp for GateProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        self.gate.request_started();
        RequestCtx {
            gate: self.gate.clone(),
            snap: self.gate.snapshot(),
            started: Instant::now(),
            started_ms: now_ms(),
            endpoint: Endpoint::Unknown,
            key: None,
            standing: None,
            admission: None,
            journal_id: None,
            body: Bytes::new(),
            upstream_body: None,
            attempt: 0,
            fallback_from: None,
            fallback_status: None,
            sent_upstream: false,
            status: 0,
            upstream_status: None,
            error_code: None,
            response_started: false,
            response_complete: false,
            finishing: false,
            finished: false,
            ttfb_ms: None,
            sse: None,
            json_buf: None,
            response_bytes: 0,
        }
    }

    /// Request phase: route, authenticate, authorize, read + parse the body, admit.
    /// `Ok(true)`: the response (an answer or a rejection) is already written.
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let (endpoint, model_id) = {
            let (endpoint, id) = admission::route(session.req_header().uri.path());
            // Only `GET /v1/models/{id}` needs the rest of the path: no copy otherwise.
            (
                endpoint,
                (endpoint == Endpoint::Model).then(|| id.to_string()),
            )
        };
        let model_id = model_id.as_deref().unwrap_or("");
        ctx.endpoint = endpoint;
        if self
            .gate
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // SIGTERM: finish what is in flight, refuse the rest (health too, so load
            // balancers stop sending).
            session.set_keepalive(None);
            return self.reject(session, ctx, GateError::ShuttingDown).await;
        }
        if endpoint == Endpoint::Health {
            return self.health(session, ctx).await;
        }
        let authorization = header_bytes(session.req_header(), "authorization");
        let anonymous_catalog = ctx.snap.routes.config.public_catalog
            && authorization.is_none()
            && matches!(
                endpoint,
                Endpoint::Models | Endpoint::Model | Endpoint::Aliases
            );
        if anonymous_catalog {
            return self.serve_local(session, ctx, model_id).await;
        }
        let hash = match admission::token_hash(authorization)
            .and_then(|h| admission::lookup(&ctx.snap.keys, &h, now_ms()).map(|k| (h, k)))
        {
            Ok((hash, key)) => {
                ctx.key = Some(key);
                hash
            }
            Err(e) => {
                let e = self.shield(session, e);
                return self.reject(session, ctx, e).await;
            }
        };
        let key = ctx
            .key
            .clone()
            .ok_or_else(|| Error::new(ErrorType::InternalError))?;
        if endpoint == Endpoint::Unknown {
            return self.reject(session, ctx, GateError::NotFound).await;
        }
        if let Err(e) = admission::check_scope(&key, endpoint) {
            return self.reject(session, ctx, e).await;
        }
        if !matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Embeddings) {
            return self.serve_local(session, ctx, model_id).await;
        }
        if session.req_header().method != http::Method::POST {
            return self.reject(session, ctx, GateError::MethodNotAllowed).await;
        }
        let max_body = ctx.snap.routes.config.max_body_bytes;
        let body = match read_body(session, max_body).await? {
            Ok(b) => b,
            Err(e) => {
                // The rest of the body is unread: this connection cannot be reused.
                session.set_keepalive(None);
                return self.reject(session, ctx, e).await;
            }
        };
        ctx.body = body;
        match self.admit(ctx, &hash) {
            Ok(()) => Ok(false),
            Err(e) => self.reject(session, ctx, e).await,
        }
    }

    /// The provider of the model at the current position of the chain.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let m = ctx
            .current_model()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no admitted model"))?;
        let routes = &ctx.snap.routes;
        let pidx = routes.catalog.models()[m].provider;
        let provider = &routes.catalog.providers()[pidx];
        // SNI only matters for TLS; plain HTTP peers skip the allocation.
        let sni = if provider.tls {
            provider.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(routes.provider_addrs[pidx], provider.tls, sni);
        let t = &routes.config.tuning;
        peer.options.connection_timeout = Some(t.connect_timeout);
        peer.options.read_timeout = Some(t.read_timeout);
        // A request is never re-sent on a pooled connection that turns out dead (it may
        // have reached the provider), so do not keep connections long enough for most
        // providers' keep-alive to expire under us.
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        Ok(Box::new(peer))
    }

    /// Rewrites the request for the provider: its path, `Host`, its own key (the agent's token
    /// never leaves the gateway) and the new body length.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(m), Some(adm)) = (ctx.current_model(), ctx.admission.as_ref()) else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no admitted model",
            ));
        };
        let routes = &ctx.snap.routes;
        let model = &routes.catalog.models()[m];
        let body = rewrite_body(&ctx.body, &adm.fields, &model.upstream_id);
        let pidx = model.provider;
        let headers = &routes.provider_headers[pidx];
        req.set_uri(routes.upstream_uri(pidx, ctx.endpoint).clone());
        // One pass over the client's headers; removal (two maps in Pingora) only if needed.
        if req.headers.keys().any(|k| STRIPPED_HEADERS.contains(k)) {
            for h in &STRIPPED_HEADERS {
                req.remove_header(h);
            }
        }
        match &headers.authorization {
            Some(auth) => req.insert_header(http::header::AUTHORIZATION, auth.clone())?,
            None => {
                req.remove_header(&http::header::AUTHORIZATION);
            }
        }
        req.insert_header(http::header::HOST, headers.host.clone())?;
        req.insert_header(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()))?;
        // Usage is parsed from the response bytes: they must not be compressed.
        req.insert_header(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        )?;
        ctx.upstream_body = Some(body);
        // From here the request may reach the provider, which may then work on it.
        ctx.sent_upstream = true;
        Ok(())
    }

    /// Emits the rewritten body. The body was read whole in `request_filter`; the Pingora fork
    /// then calls this once with `end_of_stream` so the buffered body can be sent, whatever its
    /// size (upstream Pingora 0.9 would replay only 64 KiB: cloudflare/pingora#349, #575).
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if ctx.admission.is_none() {
            return Ok(());
        }
        *body = if end_of_stream {
            ctx.upstream_body.clone()
        } else {
            None
        };
        Ok(())
    }

    /// Upstream response head: a 429/5xx with models left in the chain triggers a fallback.
    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status < 200 {
            return Ok(());
        }
        ctx.upstream_status = Some(status);
        let retryable = status == 429 || status >= 500;
        let has_next = ctx
            .admission
            .as_ref()
            .is_some_and(|a| ctx.attempt + 1 < a.chain.len());
        if retryable && has_next && !ctx.response_started {
            ctx.fallback_status = Some(status);
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "upstream failed; falling back",
            );
            e.set_retry(true);
            return Err(e);
        }
        Ok(())
    }

    /// Response head to the client: rate-limit, budget and fallback headers; stream detection.
    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.response_started = true;
        ctx.status = resp.status.as_u16();
        ctx.ttfb_ms = Some(ctx.started.elapsed().as_millis() as i64);
        let Some(adm) = &ctx.admission else {
            return Ok(());
        };
        strip_account_headers(resp);
        add_standing_headers(resp, &adm.standing)?;
        if ctx.status >= 400 {
            resp.insert_header(
                ERROR_CODE.clone(),
                HeaderValue::from_static(UPSTREAM_STATUS),
            )?;
        }
        if let (Some(from), Some(m)) = (ctx.fallback_from, ctx.current_model()) {
            if from != m {
                let id = ctx.snap.routes.model_headers[from].clone();
                resp.insert_header(FALLBACK_FROM.clone(), id)?;
            }
        }
        if let Some(m) = ctx.current_model() {
            resp.insert_header(
                SERVED_MODEL.clone(),
                ctx.snap.routes.model_headers[m].clone(),
            )?;
        }
        let is_sse = resp
            .headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if is_sse {
            // The gateway asked for the usage chunk on the client's behalf: hide it unless the
            // client asked too. Stripping changes the length, so the response goes chunked.
            let strip = adm.fields.stream && !adm.fields.client_wants_usage;
            if strip {
                resp.remove_header("content-length");
            }
            ctx.sse = Some(SseUsageParser::new(strip));
        } else if (200..300).contains(&ctx.status) {
            ctx.json_buf = Some(ResponseBody::default());
        }
        Ok(())
    }

    /// Response body to the client: usage parsing, synchronous and non-blocking.
    async fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.admission.is_none() {
            return Ok(None);
        }
        if let Some(chunk) = body.as_ref() {
            ctx.response_bytes += chunk.len() as u64;
        }
        if let Some(parser) = ctx.sse.as_mut() {
            if let Some(chunk) = body.take() {
                *body = match parser.feed(&chunk) {
                    Forward::Unchanged => Some(chunk),
                    Forward::Range(r) => Some(chunk.slice(r)),
                    Forward::Owned(v) => Some(Bytes::from(v)),
                    Forward::Nothing => None,
                };
            }
            if end_of_stream {
                let tail = match parser.finish() {
                    Forward::Owned(v) => Some(Bytes::from(v)),
                    _ => None,
                };
                if let Some(tail) = tail {
                    *body = Some(match body.take() {
                        Some(b) => {
                            let mut joined = BytesMut::with_capacity(b.len() + tail.len());
                            joined.extend_from_slice(&b);
                            joined.extend_from_slice(&tail);
                            joined.freeze()
                        }
                        None => tail,
                    });
                }
            }
        } else if let (Some(buf), Some(chunk)) = (ctx.json_buf.as_mut(), body.as_ref()) {
            if !buf.push(chunk) {
                ctx.json_buf = None;
            }
        }
        if end_of_stream {
            ctx.response_ended();
        }
        Ok(None)
    }

    /// Connection to the provider failed: fall back to the next model if one is left.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Nothing reached the provider: this attempt costs nothing.
        ctx.sent_upstream = false;
        let retry = self.try_fallback(ctx);
        e.set_retry(retry);
        e
    }

    /// Error after connecting: a fallback status from `upstream_response_filter` moves to the
    /// next model. Anything else is final: once a POST was written upstream it is never sent
    /// again to the same model (the provider may be generating it), and a timeout or a
    /// broken connection is not a fallback condition (SPEC §2); the attempt is charged.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        _session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer} (reused: {client_reused})"));
        let retry =
            !ctx.response_started && ctx.fallback_status.take().is_some() && self.try_fallback(ctx);
        e.set_retry(retry);
        e
    }

    /// Final error: map to 502/504 with an OpenAI-shaped body, unless the response already
    /// began (then the connection is just closed) or the client is gone.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let timed_out = matches!(
            e.etype(),
            ErrorType::ConnectTimedout
                | ErrorType::ReadTimedout
                | ErrorType::WriteTimedout
                | ErrorType::TLSHandshakeTimedout
        );
        let gate_err = match e.esource() {
            ErrorSource::Downstream => None,
            _ if timed_out => Some(GateError::UpstreamTimeout),
            _ => Some(GateError::UpstreamError(match e.etype() {
                ErrorType::ConnectRefused | ErrorType::ConnectNoRoute | ErrorType::ConnectError => {
                    "connection failed".to_string()
                }
                ErrorType::HTTPStatus(s) => format!("status {s}"),
                _ => "connection broke before the response".to_string(),
            })),
        };
        if ctx.response_started {
            ctx.error_code = Some(match e.esource() {
                ErrorSource::Downstream => CLIENT_CLOSED,
                _ => STREAM_BROKEN,
            });
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let Some(err) = gate_err else {
            ctx.error_code = Some(CLIENT_CLOSED);
            ctx.status = 499;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        ctx.status = err.status();
        ctx.error_code = Some(err.code());
        let standing = ctx.standing;
        let _ = send_json(
            session,
            err.status(),
            err.body(),
            standing.as_ref(),
            Some(&err),
        )
        .await;
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    /// Last phase, on every outcome: settle the reservation, record spend and the trace.
    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        if e.is_some() && ctx.error_code.is_none() && ctx.response_started {
            ctx.error_code = Some(STREAM_BROKEN);
        }
        ctx.finish();
    }
}
