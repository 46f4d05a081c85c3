//! Per-request state across Pingora's phases, and its one way out: `finish` settles the
//! reservation, books the cost and records the trace exactly once, whether `logging` runs
//! or the request's task is dropped (a shutdown past its grace, a panic).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use pingora_http::ResponseHeader;

use crate::admission::{Admission, Endpoint};
use crate::gate::Gate;
use crate::keys::KeyEntry;
use crate::limits::{Charge, Standing};
use crate::money::Nanos;
use crate::snapshot::Snapshot;
use crate::store::{LedgerEntry, TraceRow};
use crate::usage::{usage_from_json, Forward, SseUsageParser, Usage};

use super::headers::UPSTREAM_STATUS;

use super::io::ResponseBody;

/// Error codes recorded in traces for outcomes that are not gateway rejections.
pub(super) const CLIENT_CLOSED: &str = "client_closed";
pub(super) const STREAM_BROKEN: &str = "upstream_stream_broken";
/// The request's task was dropped before it finished (shutdown past its grace, a panic).
pub(super) const INTERRUPTED: &str = "interrupted";

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
    /// Rate-limit standing for the headers of any authenticated response.
    pub(super) standing: Option<Standing>,
    pub(super) admission: Option<Admission>,
    /// The admission's journal row, closed by this request's ledger entry.
    pub(super) journal_id: Option<i64>,
    /// The request body as received.
    pub(super) body: Bytes,
    /// The body for the current attempt (model rewritten).
    pub(super) upstream_body: Option<Bytes>,
    /// Index into the admission's chain of the model being tried.
    pub(super) attempt: usize,
    /// First model of the chain, once a fallback happened.
    pub(super) fallback_from: Option<usize>,
    /// An upstream status that triggers a fallback was seen; the error carries it to retry.
    pub(super) fallback_status: Option<u16>,
    /// The current attempt's request went to the upstream, which may be working on it from
    /// now on: it is charged even if no response comes back.
    pub(super) sent_upstream: bool,
    /// Final status sent (or being sent) to the client.
    pub(super) status: u16,
    /// Upstream's own status, when it answered.
    pub(super) upstream_status: Option<u16>,
    pub(super) error_code: Option<&'static str>,
    pub(super) response_started: bool,
    pub(super) response_complete: bool,
    /// `finishing_started` was called on the key's counters (see `KeyCounters::finishing`).
    pub(super) finishing: bool,
    pub(super) finished: bool,
    pub(super) ttfb_ms: Option<i64>,
    pub(super) sse: Option<SseUsageParser>,
    pub(super) json_buf: Option<ResponseBody>,
    pub(super) response_bytes: u64,
}

impl RequestCtx {
    pub(super) fn current_model(&self) -> Option<usize> {
        self.admission.as_ref()?.chain.get(self.attempt)
    }

    /// The response head: a stream gets the SSE usage parser (hiding the usage chunk the
    /// gateway asked for on the client's behalf), a successful JSON body is kept for its
    /// usage. Stripping changes the length, so a stripped stream goes chunked.
    pub(super) fn observe_response_head(&mut self, resp: &mut ResponseHeader) {
        let Some(adm) = &self.admission else {
            return;
        };
        let is_sse = resp
            .headers
            .get("content-type")
            .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
        if is_sse {
            let strip = adm.fields.stream && !adm.fields.client_wants_usage;
            if strip {
                resp.remove_header("content-length");
            }
            self.sse = Some(SseUsageParser::new(strip));
        } else if (200..300).contains(&self.status) {
            self.json_buf = Some(ResponseBody::default());
        }
    }

    /// One chunk of the response on its way to the client: usage is parsed as it passes
    /// (synchronously, never blocking), and a stream's injected usage event is cut out.
    pub(super) fn filter_response_body(&mut self, body: &mut Option<Bytes>, end_of_stream: bool) {
        if let Some(chunk) = body.as_ref() {
            self.response_bytes += chunk.len() as u64;
        }
        if let Some(parser) = self.sse.as_mut() {
            if let Some(chunk) = body.take() {
                *body = match parser.feed(&chunk) {
                    Forward::Unchanged => Some(chunk),
                    Forward::Range(r) => Some(chunk.slice(r)),
                    Forward::Owned(v) => Some(Bytes::from(v)),
                    Forward::Nothing => None,
                };
            }
            if end_of_stream {
                if let Forward::Owned(tail) = parser.finish() {
                    *body = Some(match body.take() {
                        Some(b) => {
                            let mut joined = BytesMut::with_capacity(b.len() + tail.len());
                            joined.extend_from_slice(&b);
                            joined.extend_from_slice(&tail);
                            joined.freeze()
                        }
                        None => Bytes::from(tail),
                    });
                }
            }
        } else if let (Some(buf), Some(chunk)) = (self.json_buf.as_mut(), body.as_ref()) {
            if !buf.push(chunk) {
                self.json_buf = None;
            }
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

    /// Final usage of an admitted request and whether it is an estimate: reported usage
    /// where it arrived; else, whenever the upstream may have worked (a successful response
    /// that lost its usage, or a request sent upstream with no response head back: a client
    /// hang-up, a timeout, a break), an estimate of at least the prompt; else zero (the
    /// upstream refused it with an error status, or was never reached).
    pub(super) fn final_usage(&self) -> (Usage, bool) {
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
            Usage::new(prompt, completion),
            true,
        )
    }

    /// Settles the reservation, books the cost and records the trace, exactly once, on
    /// every outcome: called by `logging`, or by `Drop` if the request never got there.
    pub(super) fn finish(&mut self) {
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
