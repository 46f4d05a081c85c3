//! Per-request state across Pingora's phases, and its one way out: `finish` settles the
//! reservation, books the cost and records the trace exactly once, whether `logging` runs
//! or the request's task is dropped (a shutdown past its grace, a panic).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::admission::{reservation_bound, Admission, Endpoint, Overheads};
use crate::egress::addrs::Tried;
use crate::error::GateError;
use crate::gate::Gate;
use crate::keys::KeyEntry;
use crate::limits::store::LimitStore;
use crate::limits::{Charge, Standing};
use crate::money::Nanos;
use crate::providers::codec::ResponseCodec;
use crate::providers::Plan;
use crate::shared::SharedLimits;
use crate::snapshot::{Routes, Snapshot};
use crate::store::{LedgerEntry, TraceRow};
use crate::telemetry::{SpanSeed, TraceContext};
use crate::usage::Usage;

use super::headers::{Reframe, UPSTREAM_STATUS};
use super::watchdog::UpstreamWatch;

/// Error codes recorded in traces for outcomes that are not gateway rejections.
pub(super) const CLIENT_CLOSED: &str = "client_closed";
pub(super) const STREAM_BROKEN: &str = "upstream_stream_broken";
/// The request's task was dropped before it finished (shutdown past its grace, a panic).
pub(super) const INTERRUPTED: &str = "interrupted";

/// Which of its provider's addresses an attempt uses: it starts where the round-robin put
/// it and moves to the next address after a refused or timed-out connect.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct AddressTry {
    pub(super) start: Option<usize>,
    pub(super) tried: Tried,
    /// The address being connected to (index in the list, address).
    pub(super) current: Option<(usize, std::net::SocketAddr)>,
}

/// Per-request state shared across the phases. Dropping it unfinished (a shutdown past its
/// grace cancels the task, or a panic) still settles and records the request.
pub struct RequestCtx {
    pub(super) gate: Arc<Gate>,
    /// Routes and keys as of this request's start (replaced once, at admission): indexes
    /// into its catalog stay valid whatever reloads happen meanwhile.
    pub(super) snap: Arc<Snapshot>,
    pub(super) started: Instant,
    pub(super) started_ms: i64,
    pub(super) endpoint: Endpoint,
    pub(super) key: Option<Arc<KeyEntry>>,
    /// The key of a token refused as revoked or expired: its trace names it.
    pub(super) refused_key: Option<Arc<str>>,
    /// Rate-limit standing for the headers of any authenticated response.
    pub(super) standing: Option<Standing>,
    /// Boxed: this context lives inline in the request's future, which Pingora boxes and
    /// moves whole per request; the admission is ~470 bytes.
    pub(super) admission: Option<Box<Admission>>,
    /// The admission's journal row, closed by this request's ledger entry.
    pub(super) journal_id: Option<i64>,
    /// The model the body named, once read: the trace of a request refused after that
    /// (not allowed, over budget, rate-limited) still names it.
    pub(super) requested_model: Option<Arc<str>>,
    /// The request body as received.
    pub(super) body: Bytes,
    /// The body for the current attempt (model rewritten); the opening of an upload.
    pub(super) upstream_body: Option<Bytes>,
    /// A large form forwarded as it arrives (`body` is then its opening, as admitted).
    pub(super) upload: Option<Box<super::upload::Upload>>,
    /// Index into the admission's chain of the model being tried.
    pub(super) attempt: usize,
    /// First model of the chain, once a fallback happened.
    pub(super) fallback_from: Option<usize>,
    /// An upstream status that triggers a fallback was seen; the error carries it to retry.
    pub(super) fallback_status: Option<u16>,
    /// The provider refused the attempt's pool key (401/429) and another key is ready:
    /// the same model is tried again.
    pub(super) retry_same_model: bool,
    /// Which of the provider's addresses the current attempt connects to.
    pub(super) address: AddressTry,
    /// How the current attempt reaches its provider.
    pub(super) plan: Option<Plan>,
    /// The provider key (index into its pool) the current attempt carries.
    pub(super) pool_key: Option<usize>,
    /// A gateway error decided during proxying (every provider key resting), answered by
    /// `fail_to_proxy` instead of the generic mapping.
    pub(super) pending_error: Option<GateError>,
    /// The current attempt's request went to the upstream, which may be working on it from
    /// now on: it is charged even if no response comes back.
    pub(super) sent_upstream: bool,
    /// Final status sent (or being sent) to the client.
    pub(super) status: u16,
    /// Upstream's own status, when it answered.
    pub(super) upstream_status: Option<u16>,
    /// The upstream's body came compressed though `identity` was asked for (a proxy in
    /// front of the provider, say): its usage cannot be read, so it is charged at the
    /// reservation (SPEC §2: an estimate is never below what the provider bills).
    pub(super) encoded_body: bool,
    pub(super) error_code: Option<&'static str>,
    pub(super) response_started: bool,
    /// The answer's body goes to the client without a fixed length (chunked, or to the
    /// connection's end): bytes may be added to it, a cut stream's error event.
    pub(super) open_ended_body: bool,
    pub(super) response_complete: bool,
    /// `finishing_started` was called on the key's counters (see `KeyCounters::finishing`).
    pub(super) finishing: bool,
    pub(super) finished: bool,
    /// The usage a cluster's settlement charged at the end of the response: the ledger
    /// books the same figures, and they are read from the answer once.
    pub(super) usage_at_end: Option<(Usage, bool)>,
    pub(super) ttfb_ms: Option<i64>,
    /// Reads (and where it translates, rewrites) the answer of the attempt that responded.
    pub(super) codec: Option<ResponseCodec>,
    pub(super) response_bytes: u64,
    /// The current attempt's upstream socket and its first-byte or idle watchdog, if any.
    pub(super) upstream_watch: UpstreamWatch,
    /// The W3C trace of a model call: continued from the agent or started here (telemetry
    /// on), or just the agent's trace id (off).
    pub(super) trace: Option<TraceContext>,
    /// `traceparent` naming the gateway's span, for the upstream and the agent (telemetry on).
    pub(super) traceparent: Option<http::HeaderValue>,
    /// This process handed over to a new one (`serve --upgrade`): the request goes there as
    /// the client sent it, and is decided, booked and traced there.
    pub(super) relay: Option<Relay>,
    /// The client hung up before the answer's head, which is read for its usage anyway.
    pub(super) client_gone: bool,
}

/// Where a relayed request goes: the successor's relay socket.
pub(super) struct Relay {
    pub(super) path: std::path::PathBuf,
    /// The body was read here already (it is sent from `body`); else Pingora streams it.
    pub(super) preread: bool,
    /// The opening of an upload read here went to the successor ahead of the rest.
    pub(super) opening_sent: bool,
}

impl Relay {
    pub(super) fn new(path: &std::path::Path, preread: bool) -> Relay {
        Relay {
            path: path.to_path_buf(),
            preread,
            opening_sent: false,
        }
    }

    /// The successor's relay socket, once it listens there (its listeners start right
    /// after it received the sockets; until then the path is a placeholder file).
    pub(super) async fn peer(
        &self,
    ) -> pingora_error::Result<Box<pingora_core::upstreams::peer::HttpPeer>> {
        use std::os::unix::fs::FileTypeExt;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::metadata(&self.path).is_ok_and(|m| m.file_type().is_socket())
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let path = self.path.to_string_lossy();
        Ok(Box::new(pingora_core::upstreams::peer::HttpPeer::new_uds(
            &path,
            false,
            String::new(),
        )?))
    }
}

impl RequestCtx {
    pub(super) fn current_model(&self) -> Option<usize> {
        self.admission.as_ref()?.chain.get(self.attempt)
    }

    /// The response head: picks the codec for the answer. A codec that changes the
    /// body's length (a stripped usage event, a translation) makes the answer chunked.
    pub(super) fn observe_response_head(&mut self, is_sse: bool) -> Reframe {
        let (Some(adm), Some(plan)) = (&self.admission, self.plan) else {
            return Reframe::default();
        };
        let (codec, resized) = ResponseCodec::for_head(
            plan,
            self.status,
            is_sse,
            adm.fields.stream,
            adm.fields.client_wants_usage,
        );
        self.codec = Some(codec);
        Reframe {
            resized,
            // Errors come back in the client's shape too, always as JSON.
            json: plan.translates() && !is_sse,
        }
    }

    /// One chunk of the response on its way to the client: usage is read as it passes
    /// (synchronously, never blocking); the codec may rewrite the chunk.
    pub(super) fn filter_response_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if let Some(chunk) = body.as_ref() {
            self.response_bytes += chunk.len() as u64;
        }
        if let Some(codec) = self.codec.as_mut() {
            codec.filter(body, end_of_stream);
        }
    }

    /// The current attempt is over: disarms its watchdog. If the watchdog fired before any
    /// answer began, the failure is answered as a timeout (504), whatever broke the read.
    pub(super) fn end_upstream_attempt(&mut self) {
        if self.upstream_watch.end_attempt() && !self.response_started {
            self.pending_error.get_or_insert(GateError::UpstreamTimeout);
        }
    }

    /// Marks the response as complete, once: a `/v1/usage` asked from now on waits for this
    /// request's settlement.
    pub(super) fn response_ended(&mut self) {
        self.response_complete = true;
        if !self.finishing {
            if let (Some(key), true) = (&self.key, self.admission.is_some()) {
                key.counters.finishing_started();
                self.finishing = true;
            }
        }
    }

    /// Final usage of an admitted request and whether it is an estimate (SPEC §4: never
    /// below what the provider bills). Reported usage where it arrived. Else, whenever the
    /// upstream may have worked: a request sent with no response head back (a client
    /// hang-up, a timeout, a break), a whole body cut short, a body compressed against the
    /// gateway's `identity`, a `background` run that returned before its work, or a whole
    /// body whose usage could not be read, is charged at its reservation on the model that
    /// served; a
    /// stream cut before its final usage event is charged for the prompt (as reported, else
    /// its bound) and one token per byte of output delivered so far, within the reservation.
    /// Else zero (the upstream refused it with an error status, or was never reached).
    pub(super) fn final_usage(&self) -> (Usage, bool) {
        if self.endpoint == Endpoint::CountTokens {
            return (Usage::default(), false); // free (SPEC §3)
        }
        let codec = self.codec.as_ref();
        let reported = codec.and_then(|c| c.usage(self.response_complete));
        // A media answer prices itself only with what its model is priced in: token usage
        // on a token-priced model, or units (the images returned, a reported duration) on
        // a unit-priced one. Else its bound below, never zero: a transcription in text, srt
        // or vtt; a token-priced image model that reported no tokens; a unit-priced image or
        // speech model whose stream reported tokens only (gpt-image-1's and
        // gpt-4o-mini-tts's `stream: true` events count no images or characters).
        let unpriced = reported.is_some_and(|u| {
            if !self.endpoint.is_media() {
                return false;
            }
            let Some(m) = self.current_model() else {
                return false;
            };
            let catalog = &self.snap.routes.catalog;
            let tokens = u.prompt_tokens > 0 || u.completion_tokens > 0;
            // A JSON images answer counts what it returned, none included (SPEC §4: per
            // image returned); a stream's count is only what it reported.
            let images_json = matches!(
                self.endpoint,
                Endpoint::ImagesGenerations | Endpoint::ImagesEdits
            ) && codec.is_some_and(ResponseCodec::is_whole_body);
            let units = u.units > 0 || images_json;
            !(tokens && catalog.has_token_price(m) || units && catalog.has_unit_price(m))
        });
        if let Some(u) = reported.filter(|_| !unpriced) {
            return self.priced_units(u);
        }
        let upstream_ok = self
            .upstream_status
            .is_some_and(|s| (200..300).contains(&s));
        // A form cut short (the client hung up, or it was malformed) never reached the
        // upstream whole: without an answer, it did no work.
        let unanswered = self.sent_upstream
            && self.upstream_status.is_none()
            && self.upload.as_ref().is_none_or(|u| u.complete());
        if !upstream_ok && !unanswered {
            return (Usage::default(), false);
        }
        if let Some(u) = self.media_usage() {
            return u;
        }
        let (prompt_bound, completion_bound) = self.served_bound();
        let background = self
            .admission
            .as_ref()
            .is_some_and(|a| a.fields.hidden.background);
        // A whole body (not an event stream) without usage it could read, cut short or whole
        // (trailing bytes after the JSON, no `usage`, an empty body): its bytes bound nothing
        // of what was billed (a reasoning model's hidden tokens), so its reservation.
        let whole_body = codec.is_some_and(ResponseCodec::is_whole_body);
        if unanswered || background || whole_body || self.encoded_body {
            return (Usage::new(prompt_bound, completion_bound), true);
        }
        let partial = codec.and_then(ResponseCodec::partial_usage);
        let delivered = codec
            .and_then(ResponseCodec::stream_text_bytes)
            .unwrap_or(self.response_bytes);
        let completion = match self.endpoint {
            Endpoint::Embeddings | Endpoint::CountTokens => 0,
            _ => delivered
                .max(partial.map_or(0, |u| u.completion_tokens))
                .min(completion_bound)
                .max(1),
        };
        let mut usage = partial
            .filter(|u| u.prompt_tokens > 0)
            .unwrap_or(Usage::new(prompt_bound, 0));
        usage.completion_tokens = completion;
        (usage, true)
    }

    /// Reported usage as charged, and whether that is an estimate: where a model reports
    /// tokens and has token prices, the token prices apply instead of its unit price (SPEC
    /// §4); units held to the reservation's bound (below) are marked estimated.
    fn priced_units(&self, mut usage: Usage) -> (Usage, bool) {
        let tokens = usage.prompt_tokens > 0 || usage.completion_tokens > 0;
        let token_priced = self
            .current_model()
            .is_some_and(|m| self.snap.routes.catalog.has_token_price(m));
        if tokens && token_priced {
            usage.units = 0;
        }
        // What the upstream reports is charged (SPEC §4: the images returned, the reported
        // duration); past the reservation's bound only where no cap holds the request to it.
        // Under a hard budget or a `max_usd_per_hour` the bound is what the cap was checked
        // against (SPEC §2: never overshot): a file whose length the gateway cannot read
        // (FLAC, M4A, OGG, WebM) was reserved `server.max_audio_seconds`, and an upstream
        // that returns more images than `n` was reserved `n`.
        if usage.units > 0 && self.endpoint.is_media() {
            let binds = self.admission.as_ref().is_some_and(|a| a.reservation_binds);
            let bound = self.units_bound();
            if binds && usage.units > bound {
                log::warn!(
                    "{}: the upstream reported {} units past the {bound} reserved; a capped key is charged the reservation",
                    self.endpoint.label(),
                    usage.units
                );
                usage.units = bound;
                return (usage, true);
            }
        }
        (usage, false)
    }

    /// The most units the reservation allowed (`admission::bound_units`).
    fn units_bound(&self) -> u64 {
        let Some(adm) = &self.admission else {
            return 0;
        };
        let overheads = Overheads::of(&self.snap.routes.config.tuning);
        crate::admission::bound_units(self.endpoint, &adm.fields, overheads)
    }

    /// A multi-modal answer without usage it prices itself with, that the upstream may have
    /// worked on. A unit-priced model is charged units: speech its input's characters (what
    /// the provider bills; estimated if the audio was cut), images the images asked for,
    /// transcriptions the duration read from the file, else the duration bound (both
    /// estimated). A model priced only in tokens is charged its token bound, estimated; a
    /// transcription stream cut before its usage, the prompt bound and one token per byte of
    /// text delivered so far (SPEC §4).
    fn media_usage(&self) -> Option<(Usage, bool)> {
        if !self.endpoint.is_media() {
            return None;
        }
        let mut units = self.units_bound();
        // A form forwarded as it arrived: the duration its whole file showed, if it did.
        if let Some(ms) = self.upload.as_ref().and_then(|u| u.audio_ms()) {
            units = units.min(ms);
        }
        let unit_priced = self
            .current_model()
            .is_some_and(|m| self.snap.routes.catalog.has_unit_price(m));
        if unit_priced {
            let estimated = self.endpoint != Endpoint::Speech || !self.response_complete;
            let usage = Usage {
                units,
                ..Usage::default()
            };
            return Some((usage, estimated));
        }
        let (prompt, mut completion) = self.served_bound();
        if matches!(
            self.endpoint,
            Endpoint::Transcriptions | Endpoint::Translations
        ) {
            let delivered = self
                .codec
                .as_ref()
                .and_then(ResponseCodec::stream_text_bytes);
            completion = delivered.map_or(completion, |d| d.min(completion).max(1));
        }
        let usage = Usage {
            units,
            ..Usage::new(prompt, completion)
        };
        Some((usage, true))
    }

    /// The reservation's (prompt, completion) bound on the model that served, for the body
    /// it was sent: the forwarded body where it is longer than the client's (an inserted
    /// cap or `stream_options`, a longer upstream id, a translation), as the provider bills
    /// what it receives.
    fn served_bound(&self) -> (u64, u64) {
        let sent = self.body_len().max(self.upstream_len().unwrap_or(0));
        let (Some(adm), Some(m)) = (&self.admission, self.current_model()) else {
            return ((sent as u64).max(1), 0);
        };
        let routes = &self.snap.routes;
        let tuning = &routes.config.tuning;
        let overheads = Overheads::of(tuning);
        let only = adm.chain.filtered(|x| x == m);
        let b = reservation_bound(
            &routes.catalog,
            &only,
            self.endpoint,
            &adm.fields,
            sent,
            overheads,
        );
        (b.prompt_tokens.max(1), b.completion_tokens)
    }

    /// The client's body length: more than `body` for a form forwarded as it arrives.
    pub(super) fn body_len(&self) -> usize {
        self.upload
            .as_ref()
            .map_or(self.body.len(), |u| u.body_len())
    }

    /// The rewritten opening of an upload as its body starts to flow, with every other
    /// reference to its buffer dropped (the client's opening may share it; the admission
    /// handed its copy over at admission): it goes upstream in front of the first piece, or,
    /// replayed by Pingora already, is let go. Nothing reads them after that: an upload
    /// whose body flowed is not sent again, so no later attempt needs a body or its length.
    pub(super) fn take_opening(&mut self) -> Bytes {
        self.body = Bytes::new();
        self.upstream_body.take().unwrap_or_default()
    }

    /// The current attempt's upstream body length.
    pub(super) fn upstream_len(&self) -> Option<usize> {
        let body = self.upstream_body.as_ref()?;
        Some(body.len() + self.upload.as_ref().map_or(0, |u| u.rest_len()))
    }

    /// A complete response of a request a shared store (Redis) admitted: settles it now,
    /// waiting for the store, before the response's last bytes go out, so the client's next
    /// request on any node finds it settled. `finish` then books the same usage in the ledger.
    pub(super) async fn settle_before_the_end(&mut self, shared: &SharedLimits) {
        let shared_hold = self
            .admission
            .as_ref()
            .and_then(|a| a.reservation.as_ref())
            .is_some_and(|r| r.shared_id().is_some());
        let (Some(key), true) = (self.key.clone(), shared_hold) else {
            return;
        };
        let Some(reservation) = self.admission.as_mut().and_then(|a| a.reservation.take()) else {
            return;
        };
        let routes = self.snap.routes.clone();
        let served = self.current_model();
        let (usage, estimated) = self.final_usage();
        self.usage_at_end = Some((usage, estimated));
        let cost = served.map_or(Nanos::ZERO, |m| routes.catalog.cost(m, &usage));
        let charge = charge_of(&routes, served, &usage, cost);
        shared.settle_now(&key, reservation, charge).await;
    }

    /// Settles the reservation, books the cost and records the trace, exactly once, on
    /// every outcome: called by `logging`, or by `Drop` if the request never got there.
    pub(super) fn finish(&mut self) {
        if std::mem::replace(&mut self.finished, true)
            || self.endpoint == Endpoint::Health
            || self.relay.is_some()
        {
            return;
        }
        if self.response_started && !self.response_complete && self.error_code.is_none() {
            self.error_code = Some(CLIENT_CLOSED);
        }
        // Borrowed, not cloned (an `Arc` clone and its drop are two atomic read-modify-writes):
        // the fields taken below are others.
        let gate = &*self.gate;
        let routes = &*self.snap.routes;
        let latency_ms = self.started.elapsed().as_millis() as i64;
        let served = self.current_model();
        let (usage, estimated) = match &self.admission {
            Some(_) => self
                .usage_at_end
                .take()
                .unwrap_or_else(|| self.final_usage()),
            None => (Usage::default(), false),
        };
        let cost = served.map_or(Nanos::ZERO, |m| routes.catalog.cost(m, &usage));
        let admitted = self.admission.is_some();
        let mut requested_model = self.requested_model.take();
        let mut ts = self.started_ms;
        let mut reservation = None;
        if let Some(adm) = self.admission.take() {
            ts = adm.admitted_at;
            requested_model = Some(adm.fields.model);
            // `None` if settled already, at the end of the response.
            reservation = adm.reservation;
        }
        // An upstream error passed through is traced with the code its response carried
        // (`X-SpiderGate-Error-Code: upstream_status`).
        let error_code = self
            .error_code
            .or((self.status >= 400).then_some(UPSTREAM_STATUS));
        let outcome = error_code.unwrap_or("ok");
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
        // Unauthenticated: an address past its failed-authentication limit is refused as a
        // flood (429 `rate_limit_exceeded` with no key), whose traces are sampled; the rest
        // are all kept up to a gateway-wide rate.
        let keep_trace = self.key.is_some()
            || self.refused_key.is_some()
            || if self.error_code == Some("rate_limit_exceeded") {
                gate.flood_traces.allow(self.started_ms)
            } else {
                gate.unauthenticated_traces.allow(self.started_ms)
            };
        let model = |m: usize| routes.model_names[m].clone();
        let trace = TraceRow {
            id: 0,
            ts,
            key_id: self
                .key
                .as_ref()
                .map(|k| k.id.clone())
                .or(self.refused_key.take()),
            endpoint: self.endpoint.label().into(),
            requested_model,
            served_model: served.filter(|_| admitted).map(model),
            provider: served
                .filter(|_| admitted)
                .map(|m| routes.provider_names[routes.catalog.models()[m].provider].clone()),
            status: self.status,
            error_code: error_code.map(Cow::Borrowed),
            latency_ms,
            ttfb_ms: self.ttfb_ms,
            prompt_tokens: usage.prompt_tokens,
            completion_tokens: usage.completion_tokens,
            cost,
            usage_estimated: estimated,
            fallback_from: self.fallback_from.map(model),
            trace_id: self.trace.as_ref().map(|t| t.trace_id),
            unit: charged_unit(&routes.catalog, served, &usage, cost),
            units: usage.units,
        };
        // Only a call with a sampled gateway span (telemetry on) pays for a seed; the span
        // itself is built by the ledger writer.
        let span = match self.trace.take() {
            Some(ctx) if ctx.has_span() && ctx.flags.is_sampled() && keep_trace => {
                Some(Box::new(SpanSeed {
                    ctx,
                    started_ms: self.started_ms,
                    operation: match self.endpoint {
                        Endpoint::Embeddings => "embeddings",
                        Endpoint::ImagesGenerations
                        | Endpoint::ImagesEdits
                        | Endpoint::Speech
                        | Endpoint::Transcriptions
                        | Endpoint::Translations => "generate_content",
                        _ => "chat",
                    },
                    // A refused call names the provider its model would have gone to (the
                    // GenAI conventions require `gen_ai.provider.name`); one naming no known
                    // model or alias names none.
                    provider_kind: served
                        .filter(|_| admitted)
                        .or_else(|| {
                            let named = trace.requested_model.as_deref()?;
                            match routes.catalog.target(named)? {
                                crate::catalog::Target::Model(m) => Some(m),
                                crate::catalog::Target::Alias(a) => {
                                    routes.catalog.alias_models(a).first().copied()
                                }
                            }
                        })
                        .map(|m| routes.catalog.provider_of(m).kind),
                    body: self.body.clone(),
                }))
            }
            _ => None,
        };
        gate.ledger.record(LedgerEntry {
            trace,
            admitted,
            counted: admitted,
            journal_id: self.journal_id,
            keep_trace,
            span,
        });
        // Settled only now, with the entry queued: a `/v1/usage` waiting on the settlement
        // may nudge the writer. The limiter ends the key's `finishing` once the cost is booked
        // (at once here, or after the round trip to a shared store).
        match (reservation, &self.key) {
            (Some(r), Some(key)) => {
                let charge = charge_of(routes, served, &usage, cost);
                // A response that did not end whole is settled now, in a cluster by a task
                // that may reach Redis after the client's next request: counted as
                // finishing, so a refusal that its hold or slot could cause waits for it
                // (`admission::admit`), as for a response that ended.
                if !self.finishing {
                    key.counters.finishing_started();
                }
                gate.limits.settle(key, r, charge, true);
            }
            (None, Some(key)) if self.finishing => key.counters.finishing_ended(),
            _ => {}
        }
    }
}

/// What a request is charged on the model that served it (none if no model was reached).
fn charge_of<'r>(
    routes: &'r Routes,
    served: Option<usize>,
    usage: &Usage,
    cost: Nanos,
) -> Option<Charge<'r>> {
    served.map(|m| Charge {
        model: &routes.model_names[m],
        prompt_tokens: usage.prompt_tokens,
        completion_tokens: usage.completion_tokens,
        cost,
    })
}

impl Drop for RequestCtx {
    fn drop(&mut self) {
        if !self.finished {
            if self.error_code.is_none() {
                self.error_code = Some(INTERRUPTED);
            }
            self.finish();
        }
        // The body's buffer serves the next upload on this thread once nothing holds it.
        self.upstream_body = None;
        super::io::recycle_body(std::mem::take(&mut self.body));
        // Last: a SIGTERM drain that sees zero in flight finds every entry queued.
        self.gate.request_ended();
    }
}

/// The unit a request's cost was charged in, for its trace: the model's multi-modal unit
/// when units were charged, else `token`; `None` when nothing was.
fn charged_unit(
    catalog: &crate::catalog::Catalog,
    served: Option<usize>,
    usage: &Usage,
    cost: Nanos,
) -> Option<Cow<'static, str>> {
    let m = served?;
    let unit = catalog.models()[m].unit_price.map(|p| p.unit.label());
    match unit {
        Some(unit) if usage.units > 0 => Some(Cow::Borrowed(unit)),
        _ if cost > Nanos::ZERO || usage.prompt_tokens > 0 || usage.completion_tokens > 0 => {
            Some(Cow::Borrowed("token"))
        }
        _ => None,
    }
}
