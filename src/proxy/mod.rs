//! The Pingora `ProxyHttp` implementation: thin hooks over the plain functions in
//! `admission`, `providers`, `usage` and `ledger`, and over the request context (`ctx`).

mod ctx;
mod headers;
mod io;
mod minting;
mod upload;
mod watchdog;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, Session};

use crate::admission::{self, Endpoint};
use crate::clock::{now_ms, Now};
use crate::egress::ConnectFailure;
use crate::error::GateError;
use crate::gate::Gate;
use crate::keys::token::{redact_secrets, TokenHash};
use crate::keys::KeyEntry;
use crate::limits::store::LimitStore;
use crate::providers;
use crate::providers::pool::{key_has_capacity, retry_after_ms, AllResting};
use crate::report;
use crate::shield::SHIELD_WINDOW;
use crate::store::JournalRow;
use crate::telemetry::context::TRACEPARENT;
use crate::telemetry::TraceContext;

pub use ctx::RequestCtx;
use ctx::{AddressTry, Relay, CLIENT_CLOSED, STREAM_BROKEN};
use headers::*;
use io::{read_body, read_form_opening, send_json};
use upload::Upload;
use watchdog::{ReadTimeouts, UpstreamWatch};

use crate::limits::SETTLE_WAIT;

/// A request refused before authentication (draining, an oversized head) is still traced
/// under the key its token names (SPEC §4), as a revoked token's refusal is.
fn note_refused_key(session: &Session, ctx: &mut RequestCtx) {
    let req = session.req_header();
    ctx.refused_key = admission::refused_key(
        header_bytes(req, &http::header::AUTHORIZATION),
        || header_bytes(req, &headers::X_API_KEY),
        &ctx.snap.keys,
    )
    .map(|k| k.id.clone());
}

/// How long an idle upstream connection stays in the pool.
const UPSTREAM_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

pub struct GateProxy {
    gate: Arc<Gate>,
}

impl GateProxy {
    pub fn new(gate: Arc<Gate>) -> Self {
        GateProxy { gate }
    }
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
        let mut standing = match (&ctx.standing, &ctx.key) {
            (Some(s), _) => Some(*s),
            (None, Some(k)) => Some(self.gate.limits.standing(k, Now::read())),
            (None, None) => None,
        };
        // A per-minute refusal by another window than the key's own (its group's): the
        // headers describe the window that refused, so none is left until it frees a slot.
        if let (
            Some(s),
            GateError::RateLimited {
                limit,
                retry_after_secs,
            },
        ) = (&mut standing, &err)
        {
            s.rpm = Some(*limit);
            s.remaining = Some(0);
            s.reset_secs = *retry_after_secs;
        }
        let body = providers::error_body(ctx.endpoint, &err);
        send_json(
            session,
            err.status(),
            body,
            standing.as_ref(),
            Some(&err),
            ctx.traceparent.as_ref(),
        )
        .await?;
        // A body too slow is not waited for again.
        if !matches!(err, GateError::RequestTimeout) {
            drain_h2_rest(session).await;
        }
        Ok(true)
    }

    /// Refuses an upload read only to its opening: the answer, then the rest of the body
    /// read and dropped, so a client that sends its whole body before reading (most do)
    /// reads the answer instead of a reset, with `Connection: close` too (Pingora drains
    /// only a connection it keeps). The client is authenticated; its body is within
    /// `max_body_bytes`, and each read within Pingora's read timeout.
    async fn reject_upload(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: GateError,
    ) -> Result<bool> {
        self.reject(session, ctx, err).await?;
        if session.drain_request_body().await.is_err() {
            session.set_keepalive(None);
        }
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
            (None, Some(k)) => Some(self.gate.limits.standing(k, Now::read())),
            (None, None) => None,
        };
        send_json(session, 200, body, standing.as_ref(), None, None).await?;
        Ok(true)
    }

    /// The decision on a model request, taken once its body has arrived: the clock and the
    /// key are read again now (a slow upload must not carry an old month, or a key revoked
    /// meanwhile), then body, model, budget and limits are checked and the admission is
    /// journaled.
    async fn admit(
        &self,
        ctx: &mut RequestCtx,
        hash: &TokenHash,
        content_type: Option<&[u8]>,
    ) -> std::result::Result<(), GateError> {
        let now = Now::read();
        // The decision uses the snapshot of now; the rest of the request keeps it.
        ctx.snap = self.gate.snapshot();
        // Borrowed from the context, not cloned (each `Arc` clone and drop is two atomic
        // read-modify-writes): what is set below are other fields.
        let routes = &*ctx.snap.routes;
        let key = &*ctx
            .key
            .insert(admission::lookup(&ctx.snap.keys, hash, now.wall)?);
        if self.gate.ledger.health().failing()
            && crate::fleet::hard_capped(&ctx.snap.keys, key, now.wall)
        {
            return Err(GateError::LedgerUnavailable);
        }
        let tuning = &routes.config.tuning;
        let overheads = admission::Overheads::of(tuning);
        let journal_id = self.gate.ledger.journal_id();
        let head = ctx.upload.as_ref().map(|u| admission::FormHead {
            form: u.scanner().form(),
            body_len: u.body_len(),
            audio_ms: u.scanner().audio_bound_within(u.body_len()),
        });
        // `requested_model`: named in the trace even when the request is refused (SPEC §4).
        let mut adm = admission::admit(
            &self.gate.limits,
            &routes.catalog,
            &ctx.snap.keys,
            key,
            ctx.endpoint,
            &mut ctx.body,
            content_type,
            head,
            &mut ctx.requested_model,
            now,
            overheads,
            journal_id as u64,
        )
        .await?;
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
        ctx.plan = Some(adm.plan);
        // Moved, not cloned: the admission's copy is read nowhere after this (a clone of a
        // body built from a vector allocates a shared header and counts references).
        ctx.upstream_body = Some(std::mem::take(&mut adm.upstream_body));
        let binds = adm.reservation_binds;
        ctx.admission = Some(Box::new(adm));
        if let Some(u) = &mut ctx.upload {
            u.admitted(binds);
        }
        Ok(())
    }

    /// `/v1/messages/count_tokens` on an OpenAI-kind model: the gateway's own prompt bound
    /// (what the reservation would count), marked `X-SpiderGate-Estimated: true`. Free; the
    /// admission counted it in rpm and rpd.
    async fn count_tokens_estimate(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<bool> {
        let tokens = ctx.admission.as_ref().map_or(0, |a| a.bound.prompt_tokens);
        let body = Bytes::from(serde_json::json!({ "input_tokens": tokens }).to_string());
        ctx.status = 200;
        let mut resp = ResponseHeader::build(200, Some(6))?;
        resp.insert_header("content-type", "application/json")?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("x-spidergate-estimated", "true")?;
        if let Some(adm) = &ctx.admission {
            let served = ctx
                .current_model()
                .map(|m| &ctx.snap.routes.model_headers[m]);
            let decoration = Decoration {
                standing: &adm.standing,
                fallback_from: None,
                served,
                traceparent: None,
            };
            decorate_response(
                &mut resp,
                &decoration,
                UpstreamHead::default(),
                Reframe::default(),
                false,
            )?;
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        ctx.response_started = true;
        ctx.response_ended();
        Ok(true)
    }

    /// The client's address as the flood shield counts it (behind a trusted proxy, the one
    /// it forwarded for).
    fn shield_addr(&self, session: &Session) -> Option<std::net::IpAddr> {
        let trusted = &self.gate.routes().config.tuning.trusted_proxies;
        session.client_addr().and_then(|a| a.as_inet()).map(|a| {
            let forwarded = session.req_header().headers.get("x-forwarded-for");
            crate::shield::client_ip(a.ip(), forwarded.map(|v| v.as_bytes()), trusted)
        })
    }

    /// Whether the client's address is past its failed-authentication limit already.
    fn over_shield_limit(&self, session: &Session) -> bool {
        self.shield_addr(session)
            .is_some_and(|ip| self.gate.auth_shield.over_limit(&ip))
    }

    /// A failed authentication: counted per client address, and past the address's limit
    /// answered 429 instead of 401 (valid keys never get here).
    fn shield(&self, session: &Session, err: GateError) -> GateError {
        self.gate.metrics.auth_failure();
        let addr = self.shield_addr(session);
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
        let redis_up = self.gate.limits.shared().map(|s| s.redis_up());
        let mut body = serde_json::json!({
            "status": if ledger.failing() || redis_up == Some(false) { "degraded" } else { "ok" },
            "ledger": if ledger.failing() { "failing" } else { "ok" },
        });
        if ledger.failing() {
            body["ledger_backlog"] = ledger.backlog().into();
        }
        // Each shared dependency of a cluster node, by name.
        let shared_state = ctx.snap.routes.config.shared_state.as_ref();
        if shared_state.is_some_and(|s| s.postgres_url.is_some()) {
            body["postgres"] = if ledger.failing() { "failing" } else { "ok" }.into();
        }
        if let Some(up) = redis_up {
            body["redis"] = if up { "ok" } else { "unreachable" }.into();
        }
        // Only a ledger that cannot write stops this node serving (every node shares Redis,
        // so moving traffic would not help; `on_error` decides what Redis' absence means).
        let status = if ledger.failing() { 503 } else { 200 };
        ctx.status = status;
        let mut resp = ResponseHeader::build(status, Some(2))?;
        resp.insert_header("content-type", "application/json")?;
        let body = Bytes::from(body.to_string());
        resp.insert_header("content-length", body.len().to_string())?;
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(true)
    }

    /// Catalog, usage and health: answered by the gateway itself. Callers box its future
    /// (~7 KB with the cluster's usage read): inline, it would size every model request's
    /// `request_filter` future, which Pingora boxes and copies whole per request.
    async fn serve_local(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        model_id: &str,
    ) -> Result<bool> {
        // The catalog and usage are read, never written: only GET (and HEAD) reach them.
        let read_only = matches!(
            ctx.endpoint,
            Endpoint::Models | Endpoint::Model | Endpoint::Aliases | Endpoint::Usage
        );
        let method = &session.req_header().method;
        if read_only && method != http::Method::GET && method != http::Method::HEAD {
            let err = GateError::MethodNotAllowed { allow: "GET, HEAD" };
            return self.reject(session, ctx, err).await;
        }
        let routes = ctx.snap.routes.clone();
        let catalog = &routes.catalog;
        let keys = ctx.snap.keys.clone();
        // The key and the keys above it: a child sees what its whole line may call. A line
        // broken above it since authentication (which refuses it) is refused as there.
        let lineage: Vec<&KeyEntry> = match ctx.key.as_deref() {
            None => Vec::new(),
            Some(k) => match crate::fleet::ancestors(&keys, k, Now::read().wall) {
                Ok(up) => std::iter::once(k)
                    .chain(up.into_iter().map(|a| &**a))
                    .collect(),
                Err(_) => return self.reject(session, ctx, GateError::TokenRevoked).await,
            },
        };
        let body = match ctx.endpoint {
            Endpoint::Models => report::models_list(catalog, &lineage),
            Endpoint::Aliases => report::aliases_list(catalog, &lineage),
            Endpoint::Model => {
                // The id asked for is the trace's requested model (SPEC §4), found or not;
                // a secret in its place is not repeated (SPEC §1).
                let asked = redact_secrets(model_id);
                ctx.requested_model = Some(Arc::from(asked.as_ref()));
                match report::model_object(catalog, &lineage, &asked) {
                    Some(b) => b,
                    None => {
                        let err = GateError::ModelNotFound(asked.into_owned());
                        return self.reject(session, ctx, err).await;
                    }
                }
            }
            Endpoint::Keys | Endpoint::KeyRevoke => {
                return self.serve_keys(session, ctx, model_id).await;
            }
            Endpoint::Usage => {
                let Some(key) = ctx.key.clone() else {
                    return self.reject(session, ctx, GateError::InvalidApiKey).await;
                };
                match self.gate.limits.admit_usage_call(&key, Now::read()).await {
                    Ok(standing) => ctx.standing = Some(standing),
                    Err(e) => return self.reject(session, ctx, e).await,
                }
                key.counters.settled(SETTLE_WAIT).await;
                self.gate.ledger.nudge();
                let now = Now::read();
                let live = self.gate.limits.view(&key, now).await;
                report::live_usage(&key, &live, now.wall)
                    .to_string()
                    .into_bytes()
            }
            _ => return self.reject(session, ctx, GateError::NotFound).await,
        };
        self.answer(session, ctx, body).await
    }

    /// Moves to the next model of the chain that can take this request, if one is left and
    /// nothing reached the client. A model whose format the request cannot be translated
    /// into is skipped.
    fn try_fallback(&self, ctx: &mut RequestCtx) -> bool {
        let Some(adm) = &ctx.admission else {
            return false;
        };
        if ctx.response_started {
            return false;
        }
        // An upload whose body began to flow cannot be sent again.
        if ctx.upload.as_ref().is_some_and(|u| !u.can_resend()) {
            return false;
        }
        let rest_len = ctx.upload.as_ref().map_or(0, |u| u.rest_len());
        let catalog = &ctx.snap.routes.catalog;
        let binds = adm.reservation_binds;
        let next = (ctx.attempt + 1..adm.chain.len()).find_map(|i| {
            let m = adm.chain.get(i)?;
            let (plan, body) =
                admission::upstream_body(catalog, ctx.endpoint, m, &ctx.body, &adm.fields).ok()?;
            // The reservation bounded the prompt by the bytes it knew of; a body that would
            // bill more than that is not sent under a cap that holds it (a hard budget, the
            // key's `max_usd_per_hour`).
            if binds && (body.len() + rest_len) as u64 > adm.bound.prompt_tokens {
                return None;
            }
            Some((i, plan, body))
        });
        let Some((i, plan, body)) = next else {
            return false;
        };
        if ctx.fallback_from.is_none() {
            ctx.fallback_from = adm.chain.get(0);
        }
        ctx.attempt = i;
        ctx.address = AddressTry::default();
        ctx.plan = Some(plan);
        ctx.upstream_body = Some(body);
        ctx.upstream_status = None;
        ctx.sent_upstream = false;
        ctx.pool_key = None;
        self.gate.metrics.fallback();
        true
    }
}

impl GateProxy {
    /// Reads the opening of a form of `len` bytes under the body deadline, scanning it as
    /// it arrives ([`upload`]). The whole form when its `model` came late, or names an
    /// alias that may fall back: it is then held as a small one is. `Err`: 400 or 408 to
    /// send.
    async fn read_upload_opening(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        framing: BodyFraming,
        content_type: Option<&[u8]>,
        len: u64,
    ) -> Result<std::result::Result<(), GateError>> {
        let boundary = match providers::multipart::boundary(content_type) {
            Ok(b) => b,
            Err(e) => return Ok(Err(e)),
        };
        let mut scanner = providers::multipart::FormScanner::new(&boundary);
        let deadline = ctx.snap.routes.config.tuning.body_timeout;
        // A key with a loop limit hashes a fixed stretch of the opening (the same bytes
        // however the body arrived), so the opening is read that far.
        let loop_prefix = if ctx
            .key
            .as_ref()
            .is_some_and(|k| k.limits.loop_limit.is_some())
        {
            crate::limits::brakes::UPLOAD_LOOP_PREFIX
        } else {
            0
        };
        // SPEC §2: a model that fails before any byte reached the client falls back to the
        // next of its alias; a form streamed upstream could not be sent again, so a form
        // naming an alias of more than one model is held whole, as a small one is.
        let routes = ctx.snap.routes.clone();
        let may_fall_back = |model: &str| {
            routes
                .catalog
                .alias_chain(model)
                .is_some_and(|c| c.len() > 1)
        };
        let read = with_deadline(
            deadline,
            read_form_opening(session, framing, &mut scanner, loop_prefix, may_fall_back),
        )
        .await;
        let opening = match read.unwrap_or(Ok(Err(GateError::RequestTimeout)))? {
            Ok(o) => o,
            Err(e) => return Ok(Err(e)),
        };
        if !opening.whole {
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            ctx.upload = Some(Box::new(Upload::new(
                scanner,
                len,
                opening.bytes.len(),
                opening.replayed,
                ctx.endpoint == Endpoint::ImagesEdits,
            )));
        }
        ctx.body = opening.bytes;
        Ok(Ok(()))
    }

    /// Every key of the attempt's provider rests: the next model of the chain if one can
    /// take the request, else 429 with the time until the first key wakes.
    fn all_keys_resting(&self, ctx: &mut RequestCtx, resting: AllResting) -> Box<Error> {
        self.gate.metrics.provider_keys_exhausted();
        let mut e = Error::explain(ErrorType::ConnectError, "every provider key is resting");
        if self.try_fallback(ctx) {
            e.set_retry(true);
        } else {
            ctx.sent_upstream = false;
            ctx.pending_error = Some(GateError::ProviderKeysResting {
                retry_after_secs: (resting.wake_in_ms as u64).div_ceil(1000).max(1),
            });
        }
        e
    }

    /// A 401 or 429 from the provider rests the key the attempt carried (not a 429 that
    /// concerns only the request, nor a 400 or 413); true when another
    /// key of the same provider is ready, so the same model is tried again with it (the
    /// provider did no work on a refused request). A success clears the key's back-off.
    fn rest_refused_key(&self, resp: &ResponseHeader, ctx: &mut RequestCtx, status: u16) -> bool {
        let (Some(m), Some(k)) = (ctx.current_model(), ctx.pool_key) else {
            return false;
        };
        let routes = &ctx.snap.routes;
        let pool = &routes.provider_keys[routes.catalog.models()[m].provider];
        // A lone key never rests: with nothing to rotate to, resting would only turn the
        // provider's answer for one model into a refusal for all of them.
        if pool.keys().len() < 2 {
            return false;
        }
        if status != 401 && status != 429 {
            if (200..300).contains(&status) {
                pool.succeeded(k);
            }
            return false;
        }
        // A 429 about the request alone (too large for the key's per-minute tokens): the key
        // is fine, and another key would refuse the same request.
        if status == 429 && key_has_capacity(&resp.headers) {
            return false;
        }
        let now = now_ms();
        let retry_after = retry_after_ms(resp.headers.get("retry-after").map(|v| v.as_bytes()));
        pool.rest(k, now, retry_after);
        self.gate.metrics.provider_key_refused();
        if ctx.response_started || !pool.other_ready(k, now) {
            return false;
        }
        if ctx.upload.as_ref().is_some_and(|u| !u.can_resend()) {
            return false;
        }
        ctx.retry_same_model = true;
        ctx.upstream_status = None;
        ctx.sent_upstream = false;
        ctx.pool_key = None;
        true
    }
}

#[async_trait]
impl ProxyHttp for GateProxy {
    /// Boxed: Pingora keeps the context inline in the future it boxes and moves for every
    /// request (copying a ~740-byte context more than once costs more than one allocation).
    type CTX = Box<RequestCtx>;

    fn new_ctx(&self) -> Box<RequestCtx> {
        self.gate.request_started();
        Box::new(RequestCtx {
            gate: self.gate.clone(),
            snap: self.gate.snapshot(),
            started: Instant::now(),
            started_ms: now_ms(),
            endpoint: Endpoint::Unknown,
            key: None,
            refused_key: None,
            standing: None,
            admission: None,
            journal_id: None,
            body: Bytes::new(),
            upstream_body: None,
            requested_model: None,
            upload: None,
            attempt: 0,
            fallback_from: None,
            fallback_status: None,
            retry_same_model: false,
            address: AddressTry::default(),
            plan: None,
            pool_key: None,
            pending_error: None,
            sent_upstream: false,
            status: 0,
            upstream_status: None,
            encoded_body: false,
            error_code: None,
            response_started: false,
            open_ended_body: false,
            response_complete: false,
            finishing: false,
            finished: false,
            usage_at_end: None,
            ttfb_ms: None,
            codec: None,
            response_bytes: 0,
            upstream_watch: UpstreamWatch::default(),
            trace: None,
            traceparent: None,
            relay: None,
            client_gone: false,
        })
    }

    /// Request phase: route, authenticate, authorize, read + parse the body, admit.
    /// `Ok(true)`: the response (an answer or a rejection) is already written.
    async fn request_filter(
        &self,
        session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<bool> {
        let (endpoint, model_id) = {
            let (endpoint, id) = admission::route(session.req_header().uri.path());
            // Only `GET /v1/models/{id}` and `/v1/keys/{id}/revoke` need the rest of the path:
            // no copy otherwise. Decoded: SDKs escape an id's `/` (`spideriq%2Ffast`).
            (
                endpoint,
                matches!(endpoint, Endpoint::Model | Endpoint::KeyRevoke)
                    .then(|| crate::percent::decode_segment(id).into_owned()),
            )
        };
        let model_id = model_id.as_deref().unwrap_or("");
        ctx.endpoint = endpoint;
        let mut framing = BodyFraming::default();
        if endpoint.is_model_call() {
            let headers = &session.req_header().headers;
            let head = ClientHead::scan(headers);
            framing = head.framing();
            // Off, this allocates nothing (see `TraceContext`).
            ctx.trace =
                TraceContext::continuing(head.traceparent, headers, self.gate.trace_context);
            ctx.traceparent = ctx.trace.as_ref().and_then(TraceContext::traceparent);
        }
        if self
            .gate
            .draining
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            // SIGTERM: finish what is in flight, refuse the rest (health too, so load
            // balancers stop sending).
            session.set_keepalive(None);
            note_refused_key(session, ctx);
            return self.reject(session, ctx, GateError::ShuttingDown).await;
        }
        let tuning = &ctx.snap.routes.config.tuning;
        if client_head_size(session) > tuning.max_header_bytes {
            session.set_keepalive(None);
            let err = GateError::HeaderTooLarge(tuning.max_header_bytes);
            note_refused_key(session, ctx);
            return self.reject(session, ctx, err).await;
        }
        // How long a kept-alive connection may idle before its next request head; none once
        // the sockets were handed to a new process (the client reconnects there).
        if self
            .gate
            .handing_over
            .load(std::sync::atomic::Ordering::Relaxed)
            || session.is_process_shutting_down()
        {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(tuning.header_timeout.as_secs().max(1)));
        }
        if endpoint == Endpoint::Health {
            return self.health(session, ctx).await;
        }
        // Started with `--upgrade`: nothing is decided before the old process handed over.
        self.gate.handover.until_adopted().await;
        // Handed over to a new process (`serve --upgrade`): it decides and books this one.
        if let Some(path) = self.gate.handover.relay() {
            ctx.relay = Some(Relay::new(path, false));
            return Ok(false);
        }
        let req = session.req_header();
        let authorization = header_bytes(req, &http::header::AUTHORIZATION);
        // `x-api-key` is looked up only where `Authorization` holds no agent key.
        let x_api_key = || header_bytes(req, &headers::X_API_KEY);
        let anonymous_catalog = ctx.snap.routes.config.public_catalog
            && authorization.is_none()
            && matches!(
                endpoint,
                Endpoint::Models | Endpoint::Model | Endpoint::Aliases
            )
            && x_api_key().is_none();
        if anonymous_catalog {
            return Box::pin(self.serve_local(session, ctx, model_id)).await;
        }
        // Alive when the request arrived (its context's clock reading); the admission checks
        // again at its own moment, after the body.
        let mut authenticated =
            admission::authenticate(authorization, x_api_key, &ctx.snap.keys, ctx.started_ms);
        // A well-formed token no key has: perhaps a key made a moment ago by another door (the
        // CLI writes the store; the poll would see it within `reload_interval_ms`). Checks are
        // shared, one at a time, whatever the number of callers; none waits longer than
        // `KEY_CATCH_UP_WAIT`. Looked for even from an address past its failed-authentication
        // limit, since a valid key is never refused by that limit (SPEC §2) and a new one is
        // valid from its first request; but such an address starts a check at most every
        // `FLOODED_CATCH_UP_GAP`, so its flood adds at most 200 store reads a second.
        if matches!(authenticated, Err(GateError::InvalidApiKey))
            && admission::has_agent_token(authorization, x_api_key)
        {
            let gap = if self.over_shield_limit(session) {
                crate::gate::FLOODED_CATCH_UP_GAP
            } else {
                crate::gate::KEY_CATCH_UP_GAP
            };
            // Boxed: this path is rare, and inline its future would size every request's.
            let wait = crate::gate::KEY_CATCH_UP_WAIT;
            let _ = Box::pin(tokio::time::timeout(wait, self.gate.catch_up_keys(gap))).await;
            // Whatever this caller's wait gave: a check that ended meanwhile may have brought
            // the key.
            let fresh = self.gate.snapshot();
            if !Arc::ptr_eq(&fresh, &ctx.snap) {
                ctx.snap = fresh;
                authenticated = admission::authenticate(
                    authorization,
                    x_api_key,
                    &ctx.snap.keys,
                    ctx.started_ms,
                );
            }
        }
        let hash = match authenticated {
            Ok((hash, key)) => {
                ctx.key = Some(key);
                hash
            }
            Err(e) => {
                if matches!(e, GateError::TokenRevoked | GateError::TokenExpired) {
                    ctx.refused_key =
                        admission::refused_key(authorization, x_api_key, &ctx.snap.keys)
                            .map(|k| k.id.clone());
                }
                let e = self.shield(session, e);
                return self.reject(session, ctx, e).await;
            }
        };
        let key = ctx
            .key
            .clone()
            .ok_or_else(|| Error::new(ErrorType::InternalError))?;
        if endpoint.is_unknown() {
            return self.reject(session, ctx, GateError::NotFound).await;
        }
        let scoped = admission::check_tree_scope(&ctx.snap.keys, &key, endpoint, now_ms);
        if let Err(e) = scoped {
            return self.reject(session, ctx, e).await;
        }
        if !endpoint.is_model_call() {
            return Box::pin(self.serve_local(session, ctx, model_id)).await;
        }
        if session.req_header().method != http::Method::POST {
            let err = GateError::MethodNotAllowed { allow: "POST" };
            return self.reject(session, ctx, err).await;
        }
        let max_body = ctx.snap.routes.config.max_body_bytes;
        let tuning = &ctx.snap.routes.config.tuning;
        let deadline = tuning.body_timeout;
        let hold = tuning.multipart_hold_bytes;
        let form = endpoint.takes_form();
        // Two Content-Types name two boundaries, and which one the upstream reads is its
        // own: the form it reads must be the one admitted.
        if form
            && session
                .req_header()
                .headers
                .get_all(http::header::CONTENT_TYPE)
                .iter()
                .nth(1)
                .is_some()
        {
            let err = GateError::InvalidRequest(
                "malformed multipart body: Content-Type is given twice".into(),
            );
            return self.reject(session, ctx, err).await;
        }
        // Multipart bodies need their boundary (copied only for those endpoints).
        let content_type = form
            .then(|| {
                header_bytes(session.req_header(), &http::header::CONTENT_TYPE).map(<[u8]>::to_vec)
            })
            .flatten();
        // A large form goes upstream as it arrives, once its opening is read and admitted.
        let declared = framing
            .declared
            .filter(|&n| form && n > hold && n <= max_body);
        if let Some(len) = declared {
            match self
                .read_upload_opening(session, ctx, framing, content_type.as_deref(), len)
                .await?
            {
                Ok(()) => {}
                // A body too slow is not waited for again.
                Err(e @ GateError::RequestTimeout) => {
                    session.set_keepalive(None);
                    return self.reject(session, ctx, e).await;
                }
                Err(e) => return self.reject_upload(session, ctx, e).await,
            }
        } else {
            let read = with_deadline(deadline, read_body(session, framing, max_body)).await;
            let body = match read.unwrap_or(Ok(Err(GateError::RequestTimeout)))? {
                Ok(b) => b,
                Err(e) => {
                    // The rest of the body is unread: this connection cannot be reused.
                    session.set_keepalive(None);
                    return self.reject(session, ctx, e).await;
                }
            };
            ctx.body = body;
        }
        // The old process of an upgrade stops admitting once it hands over; an admission
        // under way finishes (and is journaled) before it does.
        let _admitting = match self.gate.handover.begin_admission() {
            Ok(guard) => guard,
            Err(path) => {
                ctx.relay = Some(Relay::new(path, true));
                return Ok(false);
            }
        };
        match self.admit(ctx, &hash, content_type.as_deref()).await {
            Ok(()) if ctx.plan.is_some_and(providers::Plan::answered_locally) => {
                self.count_tokens_estimate(session, ctx).await
            }
            Ok(()) => Ok(false),
            Err(e) if ctx.upload.is_some() => self.reject_upload(session, ctx, e).await,
            Err(e) => self.reject(session, ctx, e).await,
        }
    }

    /// The provider of the model at the current position of the chain.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Box<HttpPeer>> {
        if let Some(relay) = &ctx.relay {
            return relay.peer().await;
        }
        let m = ctx
            .current_model()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no admitted model"))?;
        let pidx = ctx.snap.routes.catalog.models()[m].provider;
        // One clock reading for the key and the address picked together: the admission's for
        // the first attempt (moments ago), a new one for a retry or a fallback.
        let now = match &ctx.admission {
            Some(adm) if ctx.attempt == 0 && ctx.address.start.is_none() => adm.admitted_at,
            _ => now_ms(),
        };
        match ctx.snap.routes.provider_keys[pidx].pick(now) {
            Ok(key) => ctx.pool_key = key,
            Err(resting) => return Err(self.all_keys_resting(ctx, resting)),
        }
        let start = match ctx.address.start {
            Some(start) => start,
            None => {
                let start = ctx.snap.routes.provider_links[pidx].addrs.start();
                ctx.address.start = Some(start);
                start
            }
        };
        let routes = &ctx.snap.routes;
        let provider = &routes.catalog.providers()[pidx];
        let link = &routes.provider_links[pidx];
        let Some((i, addr)) = link.addrs.pick(start, ctx.address.tried, now) else {
            // The host does not resolve (yet): nothing to connect to; the next model if any.
            log::warn!(
                "provider {}: {} resolves to no address",
                routes.provider_names[pidx],
                link.addrs.host()
            );
            self.gate.metrics.connect_failure(ConnectFailure::Other);
            let mut e = Error::explain(ErrorType::ConnectError, "provider host does not resolve");
            e.set_retry(self.try_fallback(ctx));
            return Err(e);
        };
        ctx.address.current = Some((i, addr));
        // SNI (and with it certificate name checks) for TLS; plain HTTP peers skip the
        // allocation.
        let sni = if provider.tls {
            provider.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, provider.tls, sni);
        if let Some(ca) = &link.ca {
            peer.options.ca = Some(ca.certs.clone());
            // Connections verified against another bundle (before a reload) are not reused.
            peer.group_key = ca.fingerprint;
        }
        if let Some(tunnel) = &link.tunnel {
            peer.options.custom_l4 = Some(tunnel.clone());
        }
        let t = &routes.config.tuning;
        peer.options.connection_timeout = Some(t.connect_timeout);
        // Per read, head and body alike: the longer of the two; a watchdog enforces the other.
        peer.options.read_timeout = Some(ReadTimeouts::of(t).per_read());
        // A request is never re-sent on a pooled connection that turns out dead (it may
        // have reached the provider), so do not keep connections long enough for most
        // providers' keep-alive to expire under us.
        peer.options.idle_timeout = Some(UPSTREAM_IDLE_TIMEOUT);
        // The request's head and its body (already read, its length known) in one write:
        // one segment and one wake-up of the provider instead of two (vendor/README.md).
        peer.options.h1_coalesce_request_head = true;
        Ok(Box::new(peer))
    }

    /// Connected (or reused) upstream: the watchdog, if the timeouts need one, watches this
    /// socket. An HTTP/2 connection (shared with other requests) is never watched.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        peer: &HttpPeer,
        fd: std::os::unix::io::RawFd,
        _digest: Option<&Digest>,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        if !reused {
            self.gate.metrics.upstream_connection();
        }
        let http1 = peer.options.alpn.get_max_http_version() == 1;
        ctx.upstream_watch.connected(fd, http1);
        Ok(())
    }

    /// Rewrites the request for the provider: its path, `Host`, its own key (the agent's token
    /// never leaves the gateway) and the new body length.
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        if let Some(upload) = &mut ctx.upload {
            upload.attempt();
        }
        if ctx.relay.is_some() {
            return Ok(()); // as the client sent it
        }
        let (Some(m), Some(plan), Some(body_len)) =
            (ctx.current_model(), ctx.plan, ctx.upstream_len())
        else {
            return Err(Error::explain(
                ErrorType::InternalError,
                "no admitted model",
            ));
        };
        let routes = &ctx.snap.routes;
        let p = routes.catalog.models()[m].provider;
        let key = ctx.pool_key.map(|k| &routes.provider_keys[p].get(k).header);
        let uri = routes.upstream_uri(p, plan.route());
        // `tracestate` passes as sent, but for a trace the gateway started in place of an
        // invalid `traceparent`: W3C Trace Context discards its state with it.
        rewrite_upstream_request(
            req,
            &routes.provider_headers[p],
            key,
            uri,
            body_len,
            ctx.traceparent.as_ref(),
        )?;
        if ctx
            .trace
            .as_ref()
            .is_some_and(|t| t.has_span() && t.state.is_none())
        {
            req.remove_header(&crate::telemetry::context::TRACESTATE);
        }
        // From here the request may reach the provider, which may then work on it.
        ctx.sent_upstream = true;
        Ok(())
    }

    /// Emits the rewritten body. The body was read whole in `request_filter`; the Pingora fork
    /// then calls this once with `end_of_stream` so the buffered body can be sent, whatever its
    /// size (upstream Pingora 0.9 would replay only 64 KiB: cloudflare/pingora#349, #575).
    /// An upload ([`upload`]) was read only to its opening: this is called for each later
    /// piece, which is scanned, and sent after the rewritten opening for the first one; `Err`
    /// for a piece that shows the form malformed (it is not sent).
    ///
    /// Once a non-streamed request is on its way, a client that hangs up no longer aborts
    /// it: the answer is read to its end (within the upstream timeouts) for its usage, and
    /// that is what is charged (see `response_filter`).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        if let Some(relay) = &mut ctx.relay {
            // Read here already: sent whole (else Pingora streams the client's body on);
            // the opening of an upload goes ahead of the rest, which streams on.
            if relay.preread && ctx.upload.is_none() {
                *body = end_of_stream.then(|| ctx.body.clone());
            } else if relay.preread && !std::mem::replace(&mut relay.opening_sent, true) {
                // Replayed by Pingora (as the client sent it, which the successor needs),
                // else it goes in front of the first piece.
                if !ctx.upload.as_ref().is_some_and(|u| u.replayed()) {
                    *body = Some(concat(&ctx.body, body.take()));
                }
            }
            return Ok(());
        }
        let Some(stream) = ctx.admission.as_ref().map(|a| a.fields.stream) else {
            return Ok(());
        };
        if let Some(upload) = &mut ctx.upload {
            if upload.is_replay() {
                // Pingora's replay of the opening as read: the rewritten one goes instead.
                *body = ctx.upstream_body.clone();
                return Ok(());
            }
            let replayed = upload.replayed();
            let piece = body.as_deref().unwrap_or_default();
            match upload.pass(piece, end_of_stream) {
                Ok(false) => {}
                Ok(true) => {
                    // The first piece after the opening: the opening is never sent again
                    // (`Upload::can_resend`), so nothing keeps it. Unless Pingora replayed
                    // it, it goes ahead of this piece.
                    let opening = ctx.take_opening();
                    if !replayed {
                        *body = Some(concat(&opening, body.take()));
                    }
                }
                Err(e) => {
                    // Not sent: the upstream holds a form cut short, and the connection
                    // to it is closed. The client is told why.
                    log::info!("upload cut short upstream: {e}");
                    ctx.pending_error = Some(e);
                    return Err(Error::explain(
                        ErrorType::InvalidHTTPHeader,
                        "malformed multipart body",
                    ));
                }
            }
            if end_of_stream {
                let timeouts = ReadTimeouts::of(&ctx.snap.routes.config.tuning);
                ctx.upstream_watch.request_sent(timeouts);
                if !stream {
                    session.set_abort_on_close(false);
                }
            }
            return Ok(());
        }
        *body = if end_of_stream {
            let timeouts = ReadTimeouts::of(&ctx.snap.routes.config.tuning);
            ctx.upstream_watch.request_sent(timeouts);
            if !stream {
                session.set_abort_on_close(false);
            }
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
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status < 200 {
            return Ok(());
        }
        ctx.upstream_watch.head_arrived().map_err(watchdog_fired)?;
        ctx.upstream_status = Some(status);
        if self.rest_refused_key(resp, ctx, status) {
            let mut e = Error::explain(
                ErrorType::HTTPStatus(status),
                "provider key refused; retrying with another key",
            );
            e.set_retry(true);
            return Err(e);
        }
        let retryable = status == 429 || status >= 500;
        // Moves to the next model of the chain that can take the request now; where none
        // can (the chain's end, an upload whose body flowed, a model a hard budget did not
        // reserve for), this answer passes as it is (SPEC §2: "after any fallback").
        if retryable && !ctx.response_started && self.try_fallback(ctx) {
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

    /// Upstream body chunk: feeds the idle watchdog. `Err` when it fired before the stream
    /// ended (the connection must not be pooled).
    async fn upstream_response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Option<std::time::Duration>> {
        let timeouts = ReadTimeouts::of(&ctx.snap.routes.config.tuning);
        ctx.upstream_watch
            .chunk_arrived(timeouts, end_of_stream)
            .map_err(watchdog_fired)?;
        Ok(None)
    }

    /// Response head to the client: rate-limit, budget and fallback headers; stream detection.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<()> {
        // An interim head (`103 Early Hints`) passes as it is: the answer has not started,
        // and the decoration belongs on the final head (lines set here would wait for it
        // beside the final head's own).
        if resp.status.is_informational() {
            return headers::strip_interim_head(resp);
        }
        ctx.response_started = true;
        ctx.status = resp.status.as_u16();
        ctx.ttfb_ms = Some(ctx.started.elapsed().as_millis() as i64);
        if ctx.relay.is_some() {
            return Ok(());
        }
        if ctx.admission.is_none() {
            if let Some(tp) = &ctx.traceparent {
                resp.insert_header(TRACEPARENT.clone(), tp.clone())?;
            }
            return Ok(());
        }
        let head = UpstreamHead::scan(&resp.headers);
        ctx.encoded_body = head.encoded;
        // The codec first: a body it rewrites changes the framing the decoration writes.
        let reframe = ctx.observe_response_head(head.sse);
        ctx.open_ended_body = reframe.resized || !head.content_length;
        // An answer its head says is empty (`Content-Length: 0`, a 204 or 304) gets no body
        // call: it has ended here, and is not traced as cut short by the client.
        if matches!(ctx.status, 204 | 304) || head.zero_length {
            ctx.response_ended();
        }
        let Some(adm) = &ctx.admission else {
            return Ok(());
        };
        let names = &ctx.snap.routes.model_headers;
        let served = ctx.current_model();
        let decoration = Decoration {
            standing: &adm.standing,
            fallback_from: ctx
                .fallback_from
                .filter(|&f| Some(f) != served)
                .map(|m| &names[m]),
            served: served.map(|m| &names[m]),
            traceparent: ctx.traceparent.as_ref(),
        };
        // An HTTP/1 client gets the gateway's headers as lines after the head's own.
        let h1 = session.as_http1_mut();
        let lines = decorate_response(resp, &decoration, head, reframe, h1.is_some())?;
        if let (Some(h1), Some(lines)) = (h1, lines) {
            h1.set_response_head_extra(lines);
        }
        // The client hung up while the upstream worked (a non-streamed request, which is
        // not aborted then): the answer is read for its usage, not sent.
        if session.as_http1().is_some_and(|s| s.is_half_closed()) {
            ctx.client_gone = true;
            ctx.status = 499;
            ctx.error_code = Some(CLIENT_CLOSED);
        }
        Ok(())
    }

    /// Response body to the client: usage parsing, synchronous and non-blocking.
    async fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Box<RequestCtx>,
    ) -> Result<Option<std::time::Duration>> {
        if ctx.admission.is_none() {
            return Ok(None);
        }
        ctx.filter_response_body(body, end_of_stream);
        if ctx.client_gone {
            *body = None;
        }
        if end_of_stream {
            ctx.response_ended();
            if let Some(shared) = self.gate.limits.shared() {
                // Boxed: this hook's future is boxed and copied at every body chunk, so
                // the cluster's ~7 KB settlement future must not live inline in it.
                Box::pin(ctx.settle_before_the_end(shared)).await;
            }
        }
        Ok(None)
    }

    /// Connection to the provider failed: fall back to the next model if one is left.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Box<RequestCtx>,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(relay) = &ctx.relay {
            log::warn!("upgrade: cannot relay to {}: {e}", relay.path.display());
            return e;
        }
        // Nothing reached the provider: this attempt costs nothing.
        ctx.sent_upstream = false;
        ctx.end_upstream_attempt();
        let failure = ConnectFailure::of(&e);
        self.gate.metrics.connect_failure(failure);
        let provider = ctx.current_model().map(|m| {
            let routes = &ctx.snap.routes;
            (
                routes.catalog.models()[m].provider,
                &routes.provider_names[routes.catalog.models()[m].provider],
            )
        });
        if let Some((_, name)) = provider {
            log::warn!(
                "provider {name}: cannot connect ({}) to {peer}: {e}",
                failure.label()
            );
        }
        // Another address of the same host before another model.
        if let (Some((p, _)), Some((i, addr))) = (provider, ctx.address.current.take()) {
            if failure.try_another_address() {
                let addrs = &ctx.snap.routes.provider_links[p].addrs;
                if addrs.failed(i, addr, &mut ctx.address.tried, now_ms()) {
                    e.set_retry(true);
                    return e;
                }
            }
        }
        let retry = self.try_fallback(ctx);
        e.set_retry(retry);
        e
    }

    /// Error after connecting: a fallback status from `upstream_response_filter` (which moved
    /// the context to the next model already) retries there. Anything else is final: once a POST was written upstream it is never sent
    /// again to the same model (the provider may be generating it), and a timeout or a
    /// broken connection is not a fallback condition (SPEC §2); the attempt is charged.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        _session: &mut Session,
        e: Box<Error>,
        ctx: &mut Box<RequestCtx>,
        client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer} (reused: {client_reused})"));
        ctx.end_upstream_attempt();
        let retry = !ctx.response_started
            && (std::mem::take(&mut ctx.retry_same_model) || ctx.fallback_status.take().is_some());
        e.set_retry(retry);
        e
    }

    /// Final error: map to 502/504 with an OpenAI-shaped body, unless the response already
    /// began (then the connection is just closed) or the client is gone.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut Box<RequestCtx>,
    ) -> FailToProxy {
        ctx.end_upstream_attempt();
        let gate_err = ctx
            .pending_error
            .take()
            .or_else(|| GateError::from_proxy(e));
        if ctx.response_started {
            let upstream_broke = !matches!(e.esource(), ErrorSource::Downstream);
            ctx.error_code = Some(if upstream_broke {
                STREAM_BROKEN
            } else {
                CLIENT_CLOSED
            });
            // A stream the upstream broke off ends for the client with an error in its API's
            // shape, not a connection cut mid-body (which SDKs report as a transport failure,
            // and which reads like a network fault rather than the provider's).
            let tail = upstream_broke && !ctx.client_gone && ctx.open_ended_body;
            if let Some(tail) = ctx
                .codec
                .as_mut()
                .filter(|_| tail)
                .and_then(|c| c.cut_tail())
            {
                let _ = session.write_response_body(Some(tail), true).await;
            }
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
        let body = providers::error_body(ctx.endpoint, &err);
        let traceparent = ctx.traceparent.as_ref();
        // The connection is not reused after this answer (below): it says so, so that a
        // client does not send its next request into a closing socket.
        session.set_keepalive(None);
        let _ = send_json(
            session,
            err.status(),
            body,
            standing.as_ref(),
            Some(&err),
            traceparent,
        )
        .await;
        // An upload stopped as malformed: the rest of its body is read and dropped after
        // the answer, so a client still sending reads the 400 instead of a reset. Over
        // HTTP/2 any other unread rest is too, within bounds (see `drain_h2_rest`).
        if ctx.upload.as_ref().is_some_and(|u| u.malformed()) {
            let _ = session.drain_request_body().await;
        } else {
            drain_h2_rest(session).await;
        }
        FailToProxy {
            error_code: err.status(),
            can_reuse_downstream: false,
        }
    }

    /// Last phase, on every outcome: settle the reservation, record spend and the trace.
    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Box<RequestCtx>) {
        ctx.upstream_watch.end_attempt();
        if e.is_some() && ctx.error_code.is_none() && ctx.response_started {
            ctx.error_code = Some(STREAM_BROKEN);
        }
        ctx.finish();
    }
}

/// Most bytes of a refused HTTP/2 request's unread body read and dropped after the answer.
const H2_DRAIN_BYTES: usize = 4 << 20;
/// Longest wait for them.
const H2_DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(3);

/// After an answer written before the request body was read whole, on an HTTP/2 stream:
/// the rest of the body is read and dropped, up to `H2_DRAIN_BYTES` and `H2_DRAIN_TIME`.
/// Pingora's h2 session, dropped with its request half still open, makes the h2 crate
/// follow the answer with `RST_STREAM(NO_ERROR)`, and the unread body keeps the stream's
/// flow-control window shut: a client that sends its whole body before reading (httpx)
/// waits for window forever, and curl reports the reset as a framing error instead of
/// the answer. Read to its end, the stream closes cleanly. HTTP/1.1 is left as it was
/// (Pingora drains a kept-alive connection's body itself); a body already read whole
/// costs one check.
async fn drain_h2_rest(session: &mut Session) {
    if !session.is_http2() || session.is_body_done() {
        return;
    }
    let drain = async {
        let mut left = H2_DRAIN_BYTES;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            left = left.saturating_sub(chunk.len());
            if left == 0 || session.is_body_done() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(H2_DRAIN_TIME, drain).await;
}

/// `opening` followed by `piece` (one copy of both; none without a piece).
fn concat(opening: &Bytes, piece: Option<Bytes>) -> Bytes {
    match piece {
        Some(piece) if !piece.is_empty() => {
            let mut b = bytes::BytesMut::with_capacity(opening.len() + piece.len());
            b.extend_from_slice(opening);
            b.extend_from_slice(&piece);
            b.freeze()
        }
        _ => opening.clone(),
    }
}

/// Runs a body read under the body deadline. Most bodies arrive with their head: polled
/// once, the read is then done and no timer is armed (registering one costs more than the
/// rest of the read). Still pending, it goes on under the deadline; a pending poll
/// registered the task's own waker, so nothing is lost by polling it again inside it.
async fn with_deadline<F: std::future::Future>(
    deadline: std::time::Duration,
    read: F,
) -> std::result::Result<F::Output, tokio::time::error::Elapsed> {
    let mut reading = std::pin::pin!(read);
    let first = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::future::Future::poll(reading.as_mut(), cx))
    })
    .await;
    match first {
        std::task::Poll::Ready(done) => Ok(done),
        std::task::Poll::Pending => tokio::time::timeout(deadline, reading).await,
    }
}

/// The request head's size: as read, for HTTP/1 (Pingora keeps the head's bytes: no walk
/// over the headers); as the headers add up, for HTTP/2.
fn client_head_size(session: &Session) -> usize {
    match session.as_downstream().as_http1() {
        Some(h1) => h1.get_headers_raw_bytes().len(),
        None => head_size(session.req_header()),
    }
}

/// The error a hook returns when the attempt's watchdog fired first: a read timeout.
fn watchdog_fired(_: watchdog::Fired) -> Box<Error> {
    Error::explain(ErrorType::ReadTimedout, "upstream watchdog fired").into_up()
}
