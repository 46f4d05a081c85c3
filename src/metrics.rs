//! Prometheus counters: plain atomics, labelled by endpoint and the low-cardinality error code.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::egress::ConnectFailure;
use crate::ledger::LedgerHealth;
use crate::money::Nanos;

/// Every `error.code` the gateway emits, plus `ok` and `upstream_status` (an upstream's own
/// error response passed through).
pub const OUTCOMES: [&str; 30] = [
    "ok",
    "upstream_status",
    "invalid_api_key",
    "token_expired",
    "token_revoked",
    "insufficient_scope",
    "invalid_request",
    "request_too_large",
    "model_not_found",
    "model_not_allowed",
    "budget_exceeded",
    "rate_limit_exceeded",
    "daily_rate_limit_exceeded",
    "upstream_error",
    "upstream_timeout",
    "not_found",
    "shutting_down",
    "concurrency_limit_exceeded",
    "ledger_unavailable",
    "method_not_allowed",
    "client_closed",
    "upstream_stream_broken",
    "interrupted",
    "upstream_rate_limited",
    "request_header_too_large",
    "request_timeout",
    "group_budget_exceeded",
    "spend_rate_exceeded",
    "loop_detected",
    "limits_unavailable",
];

const LATENCY_BUCKETS_MS: [u64; 10] = [5, 10, 25, 50, 100, 250, 500, 1_000, 5_000, 30_000];

#[derive(Default)]
pub struct Metrics {
    outcomes: [AtomicU64; OUTCOMES.len()],
    other: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    cost_nanos: AtomicU64,
    estimated_usage: AtomicU64,
    fallbacks: AtomicU64,
    provider_key_refusals: AtomicU64,
    provider_keys_exhausted: AtomicU64,
    auth_failures: AtomicU64,
    config_reloads: AtomicU64,
    key_changes_applied: AtomicU64,
    config_reload_failures: AtomicU64,
    keys_loaded: AtomicU64,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_MS.len()],
    latency_count: AtomicU64,
    latency_sum_ms: AtomicU64,
    connections_open: AtomicU64,
    connections_refused: AtomicU64,
    /// By `ConnectFailure::ALL` index.
    connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    dns_changes: AtomicU64,
    dns_failures: AtomicU64,
    upstream_connections: AtomicU64,
}

impl Metrics {
    pub fn outcome(&self, code: &str) {
        match OUTCOMES.iter().position(|c| *c == code) {
            Some(i) => self.outcomes[i].fetch_add(1, Relaxed),
            None => self.other.fetch_add(1, Relaxed),
        };
    }

    pub fn usage(&self, prompt: u64, completion: u64, cost: Nanos, estimated: bool) {
        self.prompt_tokens.fetch_add(prompt, Relaxed);
        self.completion_tokens.fetch_add(completion, Relaxed);
        self.cost_nanos.fetch_add(cost.get().max(0) as u64, Relaxed);
        if estimated {
            self.estimated_usage.fetch_add(1, Relaxed);
        }
    }

    /// A missing, malformed, unknown, expired or revoked token (401, or 429 past the flood
    /// shield).
    pub fn auth_failure(&self) {
        self.auth_failures.fetch_add(1, Relaxed);
    }

    /// Keys changed in the store and applied to the live snapshot incrementally.
    pub fn key_changes_applied(&self, n: usize) {
        self.key_changes_applied.fetch_add(n as u64, Relaxed);
    }

    /// A SIGHUP config reload that was applied (`true`) or refused (`false`).
    pub fn config_reload(&self, applied: bool) {
        let counter = if applied {
            &self.config_reloads
        } else {
            &self.config_reload_failures
        };
        counter.fetch_add(1, Relaxed);
    }

    pub fn fallback(&self) {
        self.fallbacks.fetch_add(1, Relaxed);
    }

    /// A provider answered 401 or 429 to one of its pool's keys (the key rests).
    pub fn provider_key_refused(&self) {
        self.provider_key_refusals.fetch_add(1, Relaxed);
    }

    /// An attempt found every key of its provider resting.
    pub fn provider_keys_exhausted(&self) {
        self.provider_keys_exhausted.fetch_add(1, Relaxed);
    }

    /// One atomic add per bucket hit (buckets are made cumulative when rendered).
    pub fn latency(&self, ms: u64) {
        if let Some(i) = LATENCY_BUCKETS_MS.iter().position(|b| ms <= *b) {
            self.latency_buckets[i].fetch_add(1, Relaxed);
        }
        self.latency_count.fetch_add(1, Relaxed);
        self.latency_sum_ms.fetch_add(ms, Relaxed);
    }

    /// A connection was accepted on the proxy listener; returns how many are open with it.
    pub fn connection_opened(&self) -> u64 {
        self.connections_open.fetch_add(1, Relaxed) + 1
    }

    pub fn connection_closed(&self) {
        self.connections_open.fetch_sub(1, Relaxed);
    }

    /// A connection over `server.max_connections` got 503 `too_many_connections`.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Relaxed);
    }

    /// An attempt could not connect to its provider (TCP, TLS or the egress tunnel).
    pub fn connect_failure(&self, why: ConnectFailure) {
        if let Some(i) = ConnectFailure::ALL.iter().position(|f| *f == why) {
            self.connect_failures[i].fetch_add(1, Relaxed);
        }
    }

    /// A background lookup changed a provider's addresses (`true`) or failed (`false`).
    pub fn dns_refresh(&self, changed: bool) {
        let counter = if changed {
            &self.dns_changes
        } else {
            &self.dns_failures
        };
        counter.fetch_add(1, Relaxed);
    }

    /// A new upstream connection (TCP, plus its TLS handshake for https providers) was
    /// opened rather than taken from the pool.
    pub fn upstream_connection(&self) {
        self.upstream_connections.fetch_add(1, Relaxed);
    }

    pub fn set_keys_loaded(&self, n: usize) {
        self.keys_loaded.store(n as u64, Relaxed);
    }

    /// Prometheus text exposition format, with the ledger writer's health.
    pub fn render(&self, ledger: &LedgerHealth) -> String {
        let mut s = String::with_capacity(2048);
        s.push_str("# HELP spidergate_requests_total Requests by outcome (error.code, or ok).\n");
        s.push_str("# TYPE spidergate_requests_total counter\n");
        for (i, code) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                s,
                "spidergate_requests_total{{outcome=\"{code}\"}} {}",
                self.outcomes[i].load(Relaxed)
            );
        }
        let _ = writeln!(
            s,
            "spidergate_requests_total{{outcome=\"other\"}} {}",
            self.other.load(Relaxed)
        );
        let counters = [
            (
                "spidergate_prompt_tokens_total",
                "Prompt tokens charged.",
                &self.prompt_tokens,
            ),
            (
                "spidergate_completion_tokens_total",
                "Completion tokens charged.",
                &self.completion_tokens,
            ),
            (
                "spidergate_spend_nanodollars_total",
                "Spend charged, in nano-dollars.",
                &self.cost_nanos,
            ),
            (
                "spidergate_estimated_usage_total",
                "Requests charged an estimate (usage never arrived).",
                &self.estimated_usage,
            ),
            (
                "spidergate_fallbacks_total",
                "Requests served by a fallback model.",
                &self.fallbacks,
            ),
            (
                "spidergate_provider_key_refusals_total",
                "Provider answers 401 or 429 that put a pool key to rest.",
                &self.provider_key_refusals,
            ),
            (
                "spidergate_provider_keys_exhausted_total",
                "Attempts that found every key of their provider resting.",
                &self.provider_keys_exhausted,
            ),
            (
                "spidergate_auth_failures_total",
                "Failed authentications (401, or 429 past the per-address shield).",
                &self.auth_failures,
            ),
            (
                "spidergate_key_changes_applied_total",
                "Key changes applied to the live snapshot (each costs O(1), not a full reload).",
                &self.key_changes_applied,
            ),
            (
                "spidergate_config_reloads_total",
                "SIGHUP config reloads applied.",
                &self.config_reloads,
            ),
            (
                "spidergate_config_reload_failures_total",
                "SIGHUP config reloads refused (the running config stayed).",
                &self.config_reload_failures,
            ),
            (
                "spidergate_connections_refused_total",
                "Connections over server.max_connections, answered 503 too_many_connections.",
                &self.connections_refused,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        s.push_str("# HELP spidergate_upstream_connect_failures_total Attempts that could not connect to their provider, by reason (tls: handshake or certificate verification).\n# TYPE spidergate_upstream_connect_failures_total counter\n");
        for (i, why) in ConnectFailure::ALL.iter().enumerate() {
            let _ = writeln!(
                s,
                "spidergate_upstream_connect_failures_total{{reason=\"{}\"}} {}",
                why.label(),
                self.connect_failures[i].load(Relaxed)
            );
        }
        let egress_rows = [
            (
                "spidergate_upstream_connections_opened_total",
                "New upstream connections (with their TLS handshake for https providers); the rest reused a pooled one.",
                &self.upstream_connections,
            ),
            (
                "spidergate_dns_changes_total",
                "Background lookups that changed a provider's addresses.",
                &self.dns_changes,
            ),
            (
                "spidergate_dns_failures_total",
                "Background lookups that failed (the old addresses stayed in use).",
                &self.dns_failures,
            ),
        ];
        for (name, help, v) in egress_rows {
            let _ = writeln!(
                s,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                v.load(Relaxed)
            );
        }
        let ledger_rows = [
            (
                "spidergate_ledger_failing",
                "gauge",
                "1 while ledger commits fail (hard-budget keys get 503 ledger_unavailable).",
                u64::from(ledger.failing()),
            ),
            (
                "spidergate_ledger_backlog_traces",
                "gauge",
                "Trace rows waiting for a commit.",
                ledger.backlog(),
            ),
            (
                "spidergate_ledger_failed_commits_total",
                "counter",
                "Ledger commits that failed and were retried.",
                ledger.failed_commits(),
            ),
            (
                "spidergate_ledger_dropped_traces_total",
                "counter",
                "Trace rows dropped while the backlog was full (spend is never dropped).",
                ledger.dropped_traces(),
            ),
            (
                "spidergate_requests_finished_total",
                "counter",
                "Requests whose spend and trace went to the ledger writer.",
                ledger.finished(),
            ),
            (
                "spidergate_ledger_committed_total",
                "counter",
                "Finished requests the ledger has committed (equal to spidergate_requests_finished_total when nothing waits).",
                ledger.committed(),
            ),
            (
                "spidergate_ledger_sweeps_total",
                "counter",
                "Cluster upkeep rounds: heartbeat written and stopped nodes' open requests charged (cluster nodes only).",
                ledger.sweeps(),
            ),
        ];
        for (name, kind, help, v) in ledger_rows {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        s.push_str("# HELP spidergate_ledger_commit_seconds Ledger commits that wrote something, by duration (draining the queue and the transaction, on the writer thread).\n");
        s.push_str("# TYPE spidergate_ledger_commit_seconds histogram\n");
        let mut cumulative = 0;
        for (n, b) in ledger
            .commit_buckets()
            .iter()
            .zip(crate::ledger::COMMIT_BUCKETS_US)
        {
            cumulative += n;
            let _ = writeln!(
                s,
                "spidergate_ledger_commit_seconds_bucket{{le=\"{}\"}} {cumulative}",
                b as f64 / 1e6
            );
        }
        let commits = ledger.commits();
        let _ = writeln!(
            s,
            "spidergate_ledger_commit_seconds_bucket{{le=\"+Inf\"}} {commits}\nspidergate_ledger_commit_seconds_sum {}\nspidergate_ledger_commit_seconds_count {commits}",
            ledger.commit_us_sum() as f64 / 1e6
        );
        let _ = writeln!(
            s,
            "# HELP spidergate_keys_loaded Keys in the live snapshot.\n# TYPE spidergate_keys_loaded gauge\nspidergate_keys_loaded {}",
            self.keys_loaded.load(Relaxed)
        );
        let _ = writeln!(
            s,
            "# HELP spidergate_connections_open Client connections open on the proxy listener.\n# TYPE spidergate_connections_open gauge\nspidergate_connections_open {}",
            self.connections_open.load(Relaxed)
        );
        s.push_str("# HELP spidergate_request_duration_ms Latency of admitted requests.\n");
        s.push_str("# TYPE spidergate_request_duration_ms histogram\n");
        let mut cumulative = 0;
        for (i, b) in LATENCY_BUCKETS_MS.iter().enumerate() {
            cumulative += self.latency_buckets[i].load(Relaxed);
            let _ = writeln!(
                s,
                "spidergate_request_duration_ms_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = self.latency_count.load(Relaxed);
        let _ = writeln!(
            s,
            "spidergate_request_duration_ms_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            s,
            "spidergate_request_duration_ms_sum {}",
            self.latency_sum_ms.load(Relaxed)
        );
        let _ = writeln!(s, "spidergate_request_duration_ms_count {count}");
        s
    }
}

/// `spidergate_requests_in_flight`: proxy requests started and not yet finished.
pub fn render_in_flight(in_flight: usize) -> String {
    format!(
        "# HELP spidergate_requests_in_flight Proxy requests started and not yet finished.\n# TYPE spidergate_requests_in_flight gauge\nspidergate_requests_in_flight {in_flight}\n"
    )
}

/// Per provider key: whether it is usable now and its consecutive refusals, labelled by the
/// provider and the environment variable's name (never the key).
pub fn render_provider_keys(s: &mut String, routes: &crate::snapshot::Routes, now_ms: i64) {
    s.push_str("# HELP spidergate_provider_key_up 1 when the provider key is usable, 0 while it rests after a 401 or 429.\n# TYPE spidergate_provider_key_up gauge\n");
    let mut strikes = String::new();
    for (p, pool) in routes.provider_keys.iter().enumerate() {
        let provider = &routes.provider_names[p];
        for (i, key) in pool.keys().iter().enumerate() {
            let (up, failures) = pool.health(i, now_ms);
            let _ = writeln!(
                s,
                "spidergate_provider_key_up{{provider=\"{provider}\",key_env=\"{}\"}} {}",
                key.env,
                u8::from(up)
            );
            let _ = writeln!(
                strikes,
                "spidergate_provider_key_consecutive_failures{{provider=\"{provider}\",key_env=\"{}\"}} {failures}",
                key.env
            );
        }
    }
    s.push_str("# HELP spidergate_provider_key_consecutive_failures Refusals (401/429) of the key since its last success.\n# TYPE spidergate_provider_key_consecutive_failures gauge\n");
    s.push_str(&strikes);
}

/// The shared limits store (Redis) of a cluster node: reachability, fallbacks, and the
/// holds and settlements it is looking after.
pub fn render_shared(s: &mut String, shared: &crate::shared::SharedLimits) {
    let h = &shared.health;
    let rows = [
        (
            "spidergate_shared_limits_up",
            "gauge",
            "1 while Redis answers; 0 while on_error applies.",
            u64::from(h.redis_up.load(Relaxed)),
        ),
        (
            "spidergate_limits_fallback_total",
            "counter",
            "Admissions decided by this node's own counters because Redis was unreachable (warning: limits are per node meanwhile).",
            h.fallbacks.load(Relaxed),
        ),
        (
            "spidergate_limits_unavailable_total",
            "counter",
            "Hard-budget requests refused with 503 limits_unavailable (on_error: closed).",
            h.refused.load(Relaxed),
        ),
        (
            "spidergate_reservations_reaped_total",
            "counter",
            "Holds of stopped nodes that this node charged at their estimate.",
            h.reaped.load(Relaxed),
        ),
        (
            "spidergate_settlements_pending",
            "gauge",
            "Settlements waiting for Redis to answer again.",
            h.unsettled.load(Relaxed),
        ),
        (
            "spidergate_late_settlements_total",
            "counter",
            "Requests that finished after their hold had expired (charged at the estimate).",
            h.late_settles.load(Relaxed),
        ),
        (
            "spidergate_redis_commands_total",
            "counter",
            "Commands sent to Redis (about two per admitted request).",
            shared.redis().round_trips(),
        ),
    ];
    for (name, kind, help, v) in rows {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}

/// The OTLP span exporter (`telemetry.otlp_endpoint`): spans sent, dropped at the bounded
/// queue, and lost in failed exports. All zero when nothing is exported.
pub fn render_spans(s: &mut String, stats: Option<&crate::telemetry::SpanStats>) {
    let (exported, dropped, failed) =
        stats.map_or((0, 0, 0), |st| (st.exported(), st.dropped(), st.failed()));
    for (name, help, v) in [
        (
            "spidergate_otlp_spans_exported_total",
            "Spans the OpenTelemetry collector accepted.",
            exported,
        ),
        (
            "spidergate_otlp_spans_dropped_total",
            "Spans dropped because the export queue was full (a slow or absent collector).",
            dropped,
        ),
        (
            "spidergate_otlp_spans_failed_total",
            "Spans lost in exports the collector refused or never answered.",
            failed,
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    }
}

/// Alert deliveries (`alerts`): sent, failed attempts, given up, and pending in the outbox.
pub fn render_alerts(s: &mut String, stats: &crate::alerts::deliver::AlertStats) {
    for (name, kind, help, v) in [
        (
            "spidergate_alerts_sent_total",
            "counter",
            "Alert deliveries a webhook accepted (2xx).",
            stats.sent(),
        ),
        (
            "spidergate_alerts_failed_total",
            "counter",
            "Alert delivery attempts that failed (non-2xx, timeout, no connection); each is retried with backoff.",
            stats.failed_attempts(),
        ),
        (
            "spidergate_alerts_given_up_total",
            "counter",
            "Alert deliveries given up after the retry period (state failed).",
            stats.given_up(),
        ),
        (
            "spidergate_alerts_pending",
            "gauge",
            "Alert deliveries waiting in the outbox (every node's), as of the worker's last count.",
            stats.pending(),
        ),
    ] {
        let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::OUTCOMES;
    use crate::error::GateError;
    use crate::money::Nanos;

    /// `/metrics` counts each `error.code` under its own label (none falls into `other`):
    /// one error of every kind, its code among the outcomes. The match keeps this list whole:
    /// a new kind of error does not compile here until it is added.
    #[test]
    fn every_error_code_has_its_own_outcome() {
        let n = Nanos::ZERO;
        let all = [
            GateError::InvalidApiKey,
            GateError::TokenExpired,
            GateError::TokenRevoked,
            GateError::InsufficientScope("s"),
            GateError::InvalidRequest(String::new()),
            GateError::InvalidField {
                field: "f".into(),
                message: String::new(),
            },
            GateError::RequestTooLarge(1),
            GateError::HeaderTooLarge(1),
            GateError::RequestTimeout,
            GateError::ModelNotFound(String::new()),
            GateError::ModelNotAllowed(String::new()),
            GateError::BudgetExceeded { spend: n, cap: n },
            GateError::GroupBudgetExceeded {
                owner: String::new(),
                spend: n,
                cap: n,
            },
            GateError::SpendRateExceeded {
                spend: n,
                cap: n,
                retry_after_secs: 1,
            },
            GateError::LoopDetected {
                limit: 1,
                retry_after_secs: 1,
            },
            GateError::RateLimited {
                limit: 1,
                retry_after_secs: 1,
            },
            GateError::DailyRateLimited {
                limit: 1,
                retry_after_secs: 1,
            },
            GateError::ConcurrencyLimited { limit: 1 },
            GateError::AuthFlood {
                retry_after_secs: 1,
            },
            GateError::LedgerUnavailable,
            GateError::LimitsUnavailable,
            GateError::ProviderKeysResting {
                retry_after_secs: 1,
            },
            GateError::UpstreamError(String::new()),
            GateError::UpstreamTimeout,
            GateError::NotFound,
            GateError::Missing(String::new()),
            GateError::BeyondParent {
                field: None,
                message: String::new(),
            },
            GateError::MethodNotAllowed { allow: "GET" },
            GateError::ShuttingDown,
        ];
        for e in &all {
            // Exhaustive: a variant missing from `all` above fails to compile here.
            match e {
                GateError::InvalidApiKey
                | GateError::TokenExpired
                | GateError::TokenRevoked
                | GateError::InsufficientScope(_)
                | GateError::InvalidRequest(_)
                | GateError::InvalidField { .. }
                | GateError::RequestTooLarge(_)
                | GateError::HeaderTooLarge(_)
                | GateError::RequestTimeout
                | GateError::ModelNotFound(_)
                | GateError::ModelNotAllowed(_)
                | GateError::BudgetExceeded { .. }
                | GateError::GroupBudgetExceeded { .. }
                | GateError::SpendRateExceeded { .. }
                | GateError::LoopDetected { .. }
                | GateError::RateLimited { .. }
                | GateError::DailyRateLimited { .. }
                | GateError::ConcurrencyLimited { .. }
                | GateError::AuthFlood { .. }
                | GateError::LedgerUnavailable
                | GateError::LimitsUnavailable
                | GateError::ProviderKeysResting { .. }
                | GateError::UpstreamError(_)
                | GateError::UpstreamTimeout
                | GateError::NotFound
                | GateError::Missing(_)
                | GateError::BeyondParent { .. }
                | GateError::MethodNotAllowed { .. }
                | GateError::ShuttingDown => {}
            }
            assert!(OUTCOMES.contains(&e.code()), "{} counts as other", e.code());
        }
    }
}
