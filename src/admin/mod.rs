//! Admin HTTP API on its own listener (`admin.listen`), bearer = the admin token: the same key
//! operations as the CLI, usage, traces and Prometheus metrics, over the same SQLite store.

mod dashboard;
pub mod fields;

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::audit::Actor;
use crate::clock::{day_label, days_from_civil, month_index, month_label, now_ms, parse_month};
use crate::gate::Gate;
use crate::keys::KeyRecord;
use crate::manage::{KeyError, KeyService};
use crate::report;
use crate::store::{KeyFilter, KeyStatus, Store};

/// Largest admin request body (key specs are tiny).
const MAX_ADMIN_BODY: usize = 64 * 1024;

/// Most keys one page of `GET /admin/keys?limit=N` holds.
const MAX_KEY_PAGE: u32 = 1000;

pub struct AdminApp {
    gate: Arc<Gate>,
}

/// An admin API answer: status and JSON (or text) body.
#[derive(Debug)]
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// A dashboard page or asset (served with the dashboard's security headers).
    page: bool,
    location: Option<&'static str>,
    /// An error's code, also sent as `X-SpiderGate-Error-Code` (SPEC §2).
    error_code: Option<String>,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
            page: false,
            location: None,
            error_code: None,
        }
    }

    fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        Reply::error_on(status, code, message, None)
    }

    /// An error in the gateway's shape; `param` names the field it is about.
    fn error_on(status: u16, code: &str, message: impl Into<String>, param: Option<&str>) -> Reply {
        let kind = match status {
            401 => "authentication_error",
            403 => "permission_error",
            404 | 400 | 405 | 409 | 413 => "invalid_request_error",
            _ => "api_error",
        };
        Reply {
            error_code: Some(code.to_owned()),
            ..Reply::json(
                status,
                json!({"error": {"message": message.into(), "type": kind, "code": code, "param": param}}),
            )
        }
    }

    /// A key service refusal.
    fn key_error(e: KeyError) -> Reply {
        if let KeyError::Store(inner) = &e {
            log::error!("admin: key store error: {inner}");
        }
        Reply::error_on(e.status(), e.code(), e.to_string(), e.field())
    }
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn query_map(query: Option<&str>) -> HashMap<String, String> {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| !k.is_empty())
        .map(|(k, v)| (k.to_string(), form_decode(v)))
        .collect()
}

/// A query value as `application/x-www-form-urlencoded` encodes it (`+` is a space, `%XX`
/// a byte); a malformed escape stays as written, and bytes that are not UTF-8 become U+FFFD.
fn form_decode(v: &str) -> String {
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The admin key list's paging and filters (`limit`, `offset`, `q`, `status`, `parent`,
/// `group`); `None` when none is given, so callers of the plain list keep its answer.
fn key_filter(query: &HashMap<String, String>) -> Result<Option<KeyFilter>, Reply> {
    const PARAMS: [&str; 6] = ["limit", "offset", "q", "status", "parent", "group"];
    if !PARAMS.iter().any(|p| query.contains_key(*p)) {
        return Ok(None);
    }
    let limit = limit_param(query, MAX_KEY_PAGE)?;
    let offset = match query.get("offset").filter(|v| !v.is_empty()) {
        Some(v) => v
            .parse::<u32>()
            .map_err(|_| bad_param("offset", "a non-negative integer"))?,
        None => 0,
    };
    let all = query.get("all").is_some_and(|v| v != "false");
    let status = match query.get("status").map(String::as_str) {
        None | Some("") => (!all).then_some(KeyStatus::Active),
        Some("all") => None,
        Some(s) => Some(
            KeyStatus::parse(s)
                .ok_or_else(|| bad_param("status", "one of all, active, expired, revoked"))?,
        ),
    };
    let text = |p: &str| query.get(p).filter(|v| !v.is_empty()).cloned();
    Ok(Some(KeyFilter {
        q: text("q"),
        status,
        parent: text("parent"),
        group: text("group"),
        limit,
        offset,
    }))
}

impl AdminApp {
    pub fn new(gate: Arc<Gate>, token_env: &str) -> AdminApp {
        if crate::config::admin_token_from_env(token_env).is_none() {
            log::warn!("${token_env} is not set: the admin API refuses every call");
        }
        AdminApp { gate }
    }

    /// Whether the call carries the admin token: the value of the environment variable the
    /// running config's `admin.token_env` names (read at each call, so a SIGHUP that names
    /// another applies to the next one).
    fn authorized(&self, session: &ServerSession) -> bool {
        let routes = self.gate.routes();
        let expected = routes
            .config
            .admin
            .as_ref()
            .and_then(|a| crate::config::admin_token_from_env(&a.token_env));
        let given = session
            .req_header()
            .headers
            .get("authorization")
            .map(|v| v.as_bytes());
        match (expected, given.and_then(crate::keys::token::bearer)) {
            (Some(expected), Some(given)) => same(expected.as_bytes(), given),
            _ => false,
        }
    }

    /// Routes one request. Store work runs on a blocking thread.
    async fn route(&self, session: &mut ServerSession) -> Reply {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = query_map(session.req_header().uri.query());
        // The dashboard's pages are public (they hold no data); the API calls they make
        // carry the admin token the user signs in with. A HEAD gets a GET's head (Pingora
        // sends no body for it).
        if method == http::Method::GET || method == http::Method::HEAD {
            if let Some(a) = dashboard::asset(&path) {
                return Reply {
                    status: a.status,
                    content_type: a.content_type,
                    body: a.body.to_vec(),
                    page: true,
                    location: a.location,
                    error_code: None,
                };
            }
        }
        if !self.authorized(session) {
            return Reply::error(401, "unauthorized", "Missing or wrong admin token.");
        }
        if path == "/metrics" && method == http::Method::GET {
            return Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: {
                    // In flight first: read before the ledger's counters, a zero here means
                    // every request it counted has reached `finished` below.
                    let mut text = crate::metrics::render_in_flight(self.gate.inflight());
                    text.push_str(&self.gate.metrics.render(self.gate.ledger.health()));
                    let routes = &self.gate.snapshot().routes;
                    crate::metrics::render_provider_keys(&mut text, routes, crate::clock::now_ms());
                    crate::metrics::render_spans(&mut text, self.gate.ledger.span_stats());
                    crate::metrics::render_alerts(&mut text, self.gate.alerts.stats());
                    if let Some(shared) = self.gate.limits.shared() {
                        crate::metrics::render_shared(&mut text, shared);
                    }
                    self.gate.listener_certs.render_metrics(&mut text);
                    text.into_bytes()
                },
                page: false,
                location: None,
                error_code: None,
            };
        }
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(reply) => return reply,
        };
        let segments: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(str::to_string)
            .collect();
        let gate = self.gate.clone();
        // Who is acting, for the audit log: the token's fingerprint, and the dashboard when
        // its own pages make the call (they say so in a header of their own).
        let actor = {
            let h = &session.req_header().headers;
            let bearer = h.get("authorization").map(|v| v.as_bytes()).unwrap_or(b"");
            let dashboard = h
                .get("x-spidergate-door")
                .is_some_and(|v| v.as_bytes() == b"dashboard");
            Actor::admin(bearer, dashboard)
        };
        if let ["admin", "keys", id, "usage"] = segments
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            // As `/v1/usage`: include a request whose response just ended.
            let live = gate.keys().by_id(id).cloned();
            if let Some(key) = live {
                key.counters.settled(crate::limits::SETTLE_WAIT).await;
            }
        }
        let joined = tokio::task::spawn_blocking(move || {
            let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
            handle(&gate, &method, &seg, &query, &body, actor)
        })
        .await;
        joined.unwrap_or_else(|_| Reply::error(500, "internal_error", "admin handler failed"))
    }
}

async fn read_body(session: &mut ServerSession) -> Result<Bytes, Reply> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                if body.len() + chunk.len() > MAX_ADMIN_BODY {
                    return Err(Reply::error(413, "request_too_large", "Body too large."));
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return Ok(Bytes::from(body)),
            Err(_) => {
                return Err(Reply::error(
                    400,
                    "invalid_request",
                    "Could not read the body.",
                ))
            }
        }
    }
}

fn parse_json(body: &[u8]) -> Result<Value, Reply> {
    let v: Value = serde_json::from_slice(if body.is_empty() { b"{}" } else { body })
        .map_err(|e| Reply::error(400, "invalid_request", format!("body is not JSON: {e}")))?;
    if v.is_object() {
        Ok(v)
    } else {
        Err(Reply::error(
            400,
            "invalid_request",
            "body must be a JSON object",
        ))
    }
}

/// The blocking half: every store call, then an immediate snapshot reload after a change.
fn handle(
    gate: &Gate,
    method: &http::Method,
    seg: &[&str],
    query: &HashMap<String, String>,
    body: &[u8],
    actor: Actor,
) -> Reply {
    let now = now_ms();
    let mut store = match gate.open_store() {
        Ok(s) => s,
        Err(e) => return Reply::error(500, "store_error", format!("database: {e}")),
    };
    // The change is live at once: apply it (incrementally) before answering.
    let reload = |store: &Store| {
        if let Err(e) = gate.reload_if_changed(store) {
            log::warn!("admin: reload after a change failed: {e}");
        }
    };
    let body_json = || parse_json(body);
    use http::Method;
    let result: Result<Reply, Reply> = (|| {
        let routes = gate.routes();
        let mut keys = KeyService::new(&mut store, &routes.catalog, actor);
        match (method, seg) {
            (&Method::GET, ["admin", "info"]) => Ok(Reply::json(200, info_json(gate))),
            (&Method::GET, ["admin", "audit"]) => {
                let (limit, before) = page(query)?;
                let rows = keys.audit_log(limit, before).map_err(Reply::key_error)?;
                let data: Vec<Value> = rows.iter().map(crate::audit::entry_json).collect();
                let next = (rows.len() == limit as usize)
                    .then(|| rows.last().map(|e| e.id))
                    .flatten();
                Ok(Reply::json(
                    200,
                    json!({"object": "list", "data": data, "next_before": next}),
                ))
            }
            // Tests only (SPIDERGATE_TEST_CLOCK=1): a rolling window passes without a real wait.
            (&Method::POST, ["admin", "test", "advance-clock"])
                if crate::clock::test_clock_enabled() =>
            {
                let ms = query.get("ms").and_then(|v| v.parse::<i64>().ok());
                match ms {
                    Some(ms) if crate::clock::advance_mono(ms) => {
                        Ok(Reply::json(200, json!({"advanced_ms": ms})))
                    }
                    _ => Err(Reply::error(
                        400,
                        "invalid_request",
                        "ms must be a non-negative integer",
                    )),
                }
            }
            (&Method::GET, ["admin", "keys"]) => {
                let all = query.get("all").is_some_and(|v| v != "false");
                let with_usage = query.get("usage").is_some_and(|v| v != "false");
                let json_of = |k: &KeyRecord| {
                    let mut v = report::key_json(k, now);
                    if with_usage {
                        v["usage"] = live_usage_json(gate, k);
                    }
                    v
                };
                match key_filter(query)? {
                    // Paged or filtered: one page from the store, and the count of matches.
                    Some(filter) => {
                        let page = keys.page(&filter, now).map_err(Reply::key_error)?;
                        let data: Vec<Value> = page.keys.iter().map(json_of).collect();
                        Ok(Reply::json(
                            200,
                            json!({"object": "list", "data": data, "total": page.total,
                                   "limit": filter.limit, "offset": filter.offset}),
                        ))
                    }
                    None => {
                        let list = keys.list(all, now).map_err(Reply::key_error)?;
                        let data: Vec<Value> = list.iter().map(json_of).collect();
                        let total = data.len();
                        Ok(Reply::json(
                            200,
                            json!({"object": "list", "data": data, "total": total}),
                        ))
                    }
                }
            }
            (&Method::POST, ["admin", "keys"]) => {
                let spec = fields::key_spec(&body_json()?).map_err(Reply::key_error)?;
                let (record, secret) = keys.create(spec, now).map_err(Reply::key_error)?;
                let mut out = report::key_json(&record, now);
                out["secret"] = json!(secret);
                Ok(Reply::json(201, out))
            }
            (&Method::GET, ["admin", "keys", id]) => {
                let k = keys.get(id).map_err(Reply::key_error)?;
                Ok(Reply::json(200, report::key_json(&k, now)))
            }
            (&Method::PATCH, ["admin", "keys", id]) => {
                let changes = fields::key_changes(&body_json()?).map_err(Reply::key_error)?;
                let k = keys.update(id, changes, now).map_err(Reply::key_error)?;
                Ok(Reply::json(200, report::key_json(&k, now)))
            }
            (&Method::POST, ["admin", "keys", id, "rotate"]) => {
                let grace = fields::grace(&body_json()?).map_err(Reply::key_error)?;
                let (k, secret) = keys
                    .rotate(id, grace.as_deref(), now)
                    .map_err(Reply::key_error)?;
                let mut out = report::key_json(&k, now);
                out["secret"] = json!(secret);
                Ok(Reply::json(200, out))
            }
            (&Method::POST, ["admin", "keys", id, "revoke"]) => {
                let k = keys.revoke(id, now).map_err(Reply::key_error)?;
                Ok(Reply::json(200, report::key_json(&k, now)))
            }
            (&Method::GET, ["admin", "keys", id, "usage"]) => {
                let month = month_param(query, now)?;
                let live = gate.keys().by_id(id).cloned();
                match live {
                    Some(entry) if month == month_index(now) => {
                        Ok(Reply::json(200, gate.live_usage_blocking(&entry)))
                    }
                    _ => {
                        let k = keys.get(id).map_err(Reply::key_error)?;
                        report::stored_usage(&store, &k, month, now)
                            .map(|v| Reply::json(200, v))
                            .map_err(|e| Reply::key_error(KeyError::Store(e)))
                    }
                }
            }
            (&Method::GET, ["admin", "groups"]) => {
                let groups = keys.list_groups().map_err(Reply::key_error)?;
                let data = groups
                    .iter()
                    .map(|g| group_report(gate, &keys, g, now))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Reply::json(200, json!({"object": "list", "data": data})))
            }
            (&Method::POST, ["admin", "groups"]) => {
                let spec = fields::group_spec(&body_json()?).map_err(Reply::key_error)?;
                let g = keys.create_group(spec, now).map_err(Reply::key_error)?;
                Ok(Reply::json(201, group_report(gate, &keys, &g, now)?))
            }
            (&Method::GET, ["admin", "groups", name]) => {
                let g = keys.get_group(name).map_err(Reply::key_error)?;
                Ok(Reply::json(200, group_report(gate, &keys, &g, now)?))
            }
            (&Method::PATCH, ["admin", "groups", name]) => {
                let body = body_json()?;
                // The name is the group's id (keys name their group by it): not changed here.
                if body.get("name").is_some_and(|n| n.as_str() != Some(*name)) {
                    return Err(Reply::error_on(
                        400,
                        "invalid_request",
                        "a group's name cannot be changed (create a group, move its keys)",
                        Some("name"),
                    ));
                }
                let changes = fields::group_changes(&body).map_err(Reply::key_error)?;
                let g = keys
                    .update_group(name, changes, now)
                    .map_err(Reply::key_error)?;
                Ok(Reply::json(200, group_report(gate, &keys, &g, now)?))
            }
            (&Method::DELETE, ["admin", "groups", name]) => {
                keys.delete_group(name, now).map_err(Reply::key_error)?;
                Ok(Reply::json(200, json!({"name": name, "deleted": true})))
            }
            (&Method::GET, ["admin", "traces"]) => {
                gate.ledger.flush_blocking();
                let (limit, before) = page(query)?;
                let rows = keys
                    .traces(query.get("key").map(String::as_str), limit, before)
                    .map_err(Reply::key_error)?;
                // A full page may have older rows behind it.
                let next_before = crate::store::next_before(&rows, limit);
                let data: Vec<Value> = rows.iter().map(report::trace_json).collect();
                Ok(Reply::json(
                    200,
                    json!({"object": "list", "data": data, "next_before": next_before}),
                ))
            }
            (&Method::GET, ["admin", "alerts"]) => {
                // Alerts raised by requests just finished are in the outbox once this returns.
                gate.ledger.flush_blocking();
                let (limit, before) = page(query)?;
                let rows = store
                    .alert_deliveries(limit, before)
                    .map_err(|e| Reply::key_error(KeyError::Store(e)))?;
                let next_before = (rows.len() == limit as usize)
                    .then(|| rows.last().map(|d| d.delivery_id))
                    .flatten();
                let data: Vec<Value> = rows.iter().map(delivery_json).collect();
                Ok(Reply::json(
                    200,
                    json!({"object": "list", "data": data, "next_before": next_before}),
                ))
            }
            (&Method::GET, ["admin", "usage", "daily"]) => {
                let month = month_param(query, now)?;
                let key = query
                    .get("key")
                    .map(String::as_str)
                    .filter(|k| !k.is_empty());
                if let Some(id) = key {
                    keys.get(id).map_err(Reply::key_error)?;
                }
                gate.ledger.flush_blocking();
                let rows = store
                    .daily_spend(&month_label(month), key)
                    .map_err(|e| Reply::key_error(KeyError::Store(e)))?;
                Ok(Reply::json(200, daily_json(month, &rows)))
            }
            (_, ["admin", ..]) => Err(Reply::error(404, "not_found", "Unknown admin endpoint.")),
            _ => Err(Reply::error(404, "not_found", "Unknown endpoint.")),
        }
    })();
    let reply = result.unwrap_or_else(|r| r);
    // Any successful change is live at once: rebuild the snapshot now.
    if *method != Method::GET && reply.status < 300 {
        reload(&store);
    }
    reply
}

/// A group with this month's spend: this node's live counters on a single node (every
/// settled request is in them), else (a cluster, or a group this node has not loaded yet)
/// the ledger, flushed first.
fn group_report(
    gate: &Gate,
    keys: &KeyService<'_>,
    g: &crate::store::GroupRecord,
    now: i64,
) -> Result<Value, Reply> {
    let members = keys.group_members(&g.name).map_err(Reply::key_error)?;
    let month = month_index(now);
    let live = gate.keys().groups().get(&g.name).cloned();
    let (rows, reserved) = match live {
        Some(entry) if gate.limits.shared().is_none() => {
            let view = entry
                .counters
                .view(crate::clock::Now::read(), &entry.limits);
            (view.by_model, view.reserved)
        }
        _ => {
            gate.ledger.flush_blocking();
            let rows = keys
                .group_spend(&g.name, &month_label(month))
                .map_err(Reply::key_error)?;
            (rows, crate::money::Nanos::ZERO)
        }
    };
    Ok(report::group_json(g, month, &rows, reserved, &members))
}

/// 400 `invalid_request` naming a query parameter that is not what it must be.
fn bad_param(param: &str, what: &str) -> Reply {
    Reply::error_on(
        400,
        "invalid_request",
        format!("{param} must be {what}"),
        Some(param),
    )
}

/// `?limit=N`, an integer from 1 to `max`; `None` when absent or empty.
fn limit_param(query: &HashMap<String, String>, max: u32) -> Result<Option<u32>, Reply> {
    query
        .get("limit")
        .filter(|v| !v.is_empty())
        .map(|v| {
            v.parse::<u32>()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| bad_param("limit", &format!("an integer from 1 to {max}")))
        })
        .transpose()
}

/// `?limit=N&before=ID` of a listing: 50 by default, 1 to 10,000; anything else is 400
/// naming the parameter, as the keys listing answers.
fn page(query: &HashMap<String, String>) -> Result<(u32, Option<i64>), Reply> {
    let limit = limit_param(query, 10_000)?.unwrap_or(50);
    let before = match query.get("before").filter(|v| !v.is_empty()) {
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| bad_param("before", "an integer (a row id)"))?,
        ),
        None => None,
    };
    Ok((limit, before))
}

fn month_param(query: &HashMap<String, String>, now: i64) -> Result<i64, Reply> {
    match query.get("month").filter(|m| !m.is_empty()) {
        Some(m) => parse_month(m).ok_or_else(|| {
            Reply::error_on(
                400,
                "invalid_request",
                format!("month must be YYYY-MM, got \"{m}\""),
                Some("month"),
            )
        }),
        None => Ok(month_index(now)),
    }
}

/// One alert delivery as `GET /admin/alerts` lists it: `id` is the alert's idempotency id
/// (the payload's `id`, the same for every webhook and every retry).
fn delivery_json(d: &crate::store::DeliveryRow) -> Value {
    use crate::clock::rfc3339;
    let budget = d.event == crate::alerts::BUDGET_THRESHOLD;
    let mut v = json!({
        "id": d.alert_id,
        "delivery_id": d.delivery_id,
        "event": d.event,
        "state": d.state,
        "attempts": d.attempts,
        "subject_kind": d.subject_kind,
        "subject": d.subject,
        "threshold": budget.then(|| d.threshold_ppm as f64 / 1e6),
        // Budget alerts are per month; brake alerts per UTC hour (YYYY-MM-DDTHH).
        "month": d.period.get(..7),
        "period": d.period,
        "webhook": d.webhook,
        "last_error": d.last_error,
        "created_at": rfc3339(d.created_at),
        "next_attempt_at": (d.state == "pending").then(|| rfc3339(d.next_attempt_at)),
        "delivered_at": d.delivered_at.map(rfc3339),
        "payload": serde_json::from_str::<Value>(&d.payload).unwrap_or(Value::Null),
    });
    let field = if d.subject_kind == "group" {
        "group"
    } else {
        "key_id"
    };
    v[field] = json!(d.subject);
    v
}

/// What the dashboard needs from the config: where agents connect, and the model names.
fn info_json(gate: &Gate) -> Value {
    let routes = gate.routes();
    let models: Vec<Value> = routes
        .catalog
        .models()
        .iter()
        .map(|m| json!({"id": m.id, "free": m.free, "endpoint": m.family.label()}))
        .collect();
    json!({
        "public_url": routes.config.public_url,
        "models": models,
        "aliases": routes.catalog.alias_names(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// A key's month-to-date standing from the gateway's live counters (zero for a key the
/// snapshot does not hold yet).
fn live_usage_json(gate: &Gate, k: &KeyRecord) -> Value {
    match gate.keys().by_id(&k.id) {
        Some(entry) => gate.live_usage_blocking(entry),
        None => json!({"month": month_label(month_index(now_ms())), "spend_usd": 0.0,
                       "by_model": {}, "requests_today": 0, "requests_this_minute": 0}),
    }
}

/// Spend per day of the month by model: every day of the month, one USD figure per model.
fn daily_json(month: i64, rows: &[(String, String, crate::money::Nanos)]) -> Value {
    let first = days_from_civil(month.div_euclid(12), month.rem_euclid(12) as u32 + 1, 1);
    let next = month + 1;
    let last = days_from_civil(next.div_euclid(12), next.rem_euclid(12) as u32 + 1, 1);
    let days: Vec<String> = (first..last).map(day_label).collect();
    let mut series: serde_json::Map<String, Value> = serde_json::Map::new();
    for (day, model, cost) in rows {
        let Some(i) = days.iter().position(|d| d == day) else {
            continue;
        };
        let entry = series
            .entry(model.clone())
            .or_insert_with(|| json!(vec![0.0; days.len()]));
        if let Some(slot) = entry.get_mut(i) {
            *slot = json!(slot.as_f64().unwrap_or(0.0) + cost.as_usd());
        }
    }
    json!({"month": month_label(month), "days": days, "series": series})
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The next head of a kept-alive admin connection: awaited, and once begun read whole,
        // within `header_timeout_ms` as on the agents' listener (Pingora's default is 60 s;
        // none while shutting down is left as it is).
        if session.get_keepalive().is_some() {
            let wait = self.gate.routes().config.tuning.header_timeout;
            session.set_keepalive(Some(wait.as_secs().max(1)));
        }
        let reply = self.route(session).await;
        let mut builder = Response::builder()
            .status(reply.status)
            .header("content-type", reply.content_type)
            .header("content-length", reply.body.len())
            .header("cache-control", "no-store")
            .header("x-content-type-options", "nosniff")
            .header("x-frame-options", "DENY")
            .header("referrer-policy", "no-referrer");
        if reply.page {
            builder = builder.header("content-security-policy", dashboard::CSP);
        }
        if let Some(location) = reply.location {
            builder = builder.header("location", location);
        }
        if let Some(code) = &reply.error_code {
            builder = builder.header("x-spidergate-error-code", code.as_str());
        }
        builder
            .body(reply.body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_form_decoded() {
        let q = query_map(Some("q=Research+Agent%2F1&key=key_%3Aa&bad=%zz%4"));
        assert_eq!(q["q"], "Research Agent/1");
        assert_eq!(q["key"], "key_:a");
        assert_eq!(q["bad"], "%zz%4");
    }

    #[test]
    fn paging_parameters_are_checked_and_named() {
        let q = |s: &str| key_filter(&query_map(Some(s)));
        assert!(
            q("all=true").unwrap().is_none(),
            "the plain list stays as it was"
        );
        let f = q("limit=50&offset=100&q=abc").unwrap().unwrap();
        assert_eq!(
            (f.limit, f.offset, f.q.as_deref()),
            (Some(50), 100, Some("abc"))
        );
        assert_eq!(
            f.status,
            Some(KeyStatus::Active),
            "without all, active keys only"
        );
        let f = q("limit=5&all=true").unwrap().unwrap();
        assert_eq!(f.status, None);
        for bad in [
            "limit=0",
            "limit=1001",
            "limit=x",
            "offset=-1",
            "status=gone",
        ] {
            let r = q(bad).expect_err(bad);
            assert_eq!(r.status, 400, "{bad}");
        }
    }
}
