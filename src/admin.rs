//! Admin HTTP API on its own listener (`admin.listen`), bearer = the admin token: the same key
//! operations as the CLI, usage, traces and Prometheus metrics, over the same SQLite store.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use http::Response;
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::clock::{month_index, now_ms, parse_month, Now};
use crate::gate::Gate;
use crate::keys::{parse_ttl, BudgetMode};
use crate::manage::{self, NewKey};
use crate::money::Nanos;
use crate::report;
use crate::store::{KeyPatch, Store};

/// Largest admin request body (key specs are tiny).
const MAX_ADMIN_BODY: usize = 64 * 1024;

pub struct AdminApp {
    gate: Arc<Gate>,
    /// `Bearer <token>`; `None` when the token variable is unset (every call is refused).
    expected: Option<String>,
}

/// An admin API answer: status and JSON (or text) body.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
}

impl Reply {
    fn json(status: u16, v: Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: v.to_string().into_bytes(),
        }
    }

    fn error(status: u16, code: &str, message: impl Into<String>) -> Reply {
        let kind = match status {
            401 => "authentication_error",
            404 | 400 | 405 | 413 => "invalid_request_error",
            _ => "api_error",
        };
        Reply::json(
            status,
            json!({"error": {"message": message.into(), "type": kind, "code": code, "param": null}}),
        )
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
        .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2F", "/")))
        .collect()
}

/// Reads an optional limit field: absent -> `None`, `null` -> `Some(None)` (unlimited).
fn limit_field(v: &Value, field: &str) -> Result<Option<Option<u32>>, String> {
    match v.get(field) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(n) => match n.as_u64().and_then(|n| u32::try_from(n).ok()) {
            Some(0) | None => Err(format!("{field} must be a positive integer or null")),
            Some(n) => Ok(Some(Some(n))),
        },
    }
}

fn budget_field(v: &Value) -> Result<Option<Option<Nanos>>, String> {
    match v.get("monthly_budget_usd") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(n) => match n.as_f64() {
            Some(usd) => manage::budget(usd).map(|n| Some(Some(n))),
            None => Err("monthly_budget_usd must be a number or null".into()),
        },
    }
}

/// `client_id`: a string, or null to clear it; anything else is refused (a number must not
/// silently clear the field).
fn client_id_field(v: &Value) -> Result<Option<Option<String>>, String> {
    match v.get("client_id") {
        None => Ok(None),
        Some(Value::Null) => Ok(Some(None)),
        Some(Value::String(s)) => Ok(Some(Some(s.clone()))),
        Some(_) => Err("client_id must be a string or null".into()),
    }
}

fn string_list(v: &Value, field: &str) -> Result<Option<Vec<String>>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| format!("{field} must be a list of strings"))
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(format!("{field} must be a list of strings")),
    }
}

fn budget_mode_field(v: &Value) -> Result<Option<BudgetMode>, String> {
    match v.get("budget_mode") {
        None | Some(Value::Null) => Ok(None),
        Some(m) => m
            .as_str()
            .and_then(BudgetMode::parse)
            .map(Some)
            .ok_or_else(|| "budget_mode must be \"soft\" or \"hard\"".into()),
    }
}

fn ttl_field(v: &Value) -> Result<Option<i64>, String> {
    match v.get("ttl") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => parse_ttl(s).map(Some),
        Some(_) => Err("ttl must be a string such as \"30d\"".into()),
    }
}

fn bool_field(v: &Value, field: &str) -> Result<Option<bool>, String> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("{field} must be true or false")),
    }
}

fn new_key(v: &Value) -> Result<NewKey, String> {
    Ok(NewKey {
        name: v
            .get("name")
            .and_then(Value::as_str)
            .ok_or("name is required")?
            .to_string(),
        rpm: limit_field(v, "rpm")?.flatten(),
        rpd: limit_field(v, "rpd")?.flatten(),
        budget: budget_field(v)?.flatten(),
        budget_mode: budget_mode_field(v)?,
        max_inflight: limit_field(v, "max_inflight")?.flatten(),
        allowed_models: string_list(v, "allowed_models")?.unwrap_or_default(),
        free_only: bool_field(v, "free_only")?.unwrap_or(false),
        scopes: string_list(v, "scopes")?,
        ttl_secs: ttl_field(v)?,
        client_id: client_id_field(v)?.flatten(),
    })
}

fn key_patch(v: &Value, now: i64) -> Result<KeyPatch, String> {
    Ok(KeyPatch {
        name: v.get("name").and_then(Value::as_str).map(str::to_string),
        scopes: string_list(v, "scopes")?,
        rpm: limit_field(v, "rpm")?,
        rpd: limit_field(v, "rpd")?,
        budget: budget_field(v)?,
        budget_mode: budget_mode_field(v)?,
        max_inflight: limit_field(v, "max_inflight")?,
        allowed_models: string_list(v, "allowed_models")?,
        free_only: bool_field(v, "free_only")?,
        client_id: client_id_field(v)?,
        expires_at: ttl_field(v)?.map(|secs| now + secs * 1000),
    })
}

impl AdminApp {
    pub fn new(gate: Arc<Gate>, token_env: &str) -> AdminApp {
        let expected = std::env::var(token_env)
            .ok()
            .filter(|t| !t.is_empty())
            .map(|t| format!("Bearer {t}"));
        if expected.is_none() {
            log::warn!("${token_env} is not set: the admin API refuses every call");
        }
        AdminApp { gate, expected }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let given = session
            .req_header()
            .headers
            .get("authorization")
            .map(|v| v.as_bytes());
        match (&self.expected, given) {
            (Some(expected), Some(given)) => same(expected.as_bytes(), given),
            _ => false,
        }
    }

    /// Routes one request. Store work runs on a blocking thread.
    async fn route(&self, session: &mut ServerSession) -> Reply {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = query_map(session.req_header().uri.query());
        if !self.authorized(session) {
            return Reply::error(401, "unauthorized", "Missing or wrong admin token.");
        }
        if path == "/metrics" && method == http::Method::GET {
            return Reply {
                status: 200,
                content_type: "text/plain; version=0.0.4",
                body: self
                    .gate
                    .metrics
                    .render(self.gate.ledger.health())
                    .into_bytes(),
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
        if let ["admin", "keys", id, "usage"] = segments
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .as_slice()
        {
            // As `/v1/usage`: include a request whose response just ended.
            let live = gate.keys.load().by_id(id).cloned();
            if let Some(key) = live {
                key.counters.settled(crate::proxy::SETTLE_WAIT).await;
            }
        }
        let joined = tokio::task::spawn_blocking(move || {
            let seg: Vec<&str> = segments.iter().map(String::as_str).collect();
            handle(&gate, &method, &seg, &query, &body)
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
) -> Reply {
    let now = now_ms();
    let mut store = match gate.open_store() {
        Ok(s) => s,
        Err(e) => return Reply::error(500, "store_error", format!("database: {e}")),
    };
    let bad = |msg: String| Reply::error(400, "invalid_request", msg);
    let not_found = |id: &str| Reply::error(404, "not_found", format!("no key with id \"{id}\""));
    let reload = |store: &Store| {
        if let Err(e) = gate.reload_from(store) {
            log::warn!("admin: reload after a change failed: {e}");
        }
    };
    let store_err = |e: rusqlite::Error| Reply::error(500, "store_error", format!("database: {e}"));
    use http::Method;
    match (method, seg) {
        (&Method::GET, ["admin", "keys"]) => {
            let all = query.get("all").is_some_and(|v| v != "false");
            match store.all_keys() {
                Ok(keys) => {
                    let data: Vec<Value> = keys
                        .iter()
                        .filter(|k| all || k.status(now) == "active")
                        .map(|k| report::key_json(k, now))
                        .collect();
                    Reply::json(200, json!({"object": "list", "data": data}))
                }
                Err(e) => store_err(e),
            }
        }
        (&Method::POST, ["admin", "keys"]) => {
            let v = match parse_json(body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let req = match new_key(&v) {
                Ok(r) => r,
                Err(e) => return bad(e),
            };
            match manage::create_key(&mut store, &gate.catalog, req, now) {
                Ok((record, secret)) => {
                    reload(&store);
                    let mut out = report::key_json(&record, now);
                    out["secret"] = json!(secret);
                    Reply::json(201, out)
                }
                Err(e) => bad(e),
            }
        }
        (&Method::GET, ["admin", "keys", id]) => match store.get_key(id) {
            Ok(Some(k)) => Reply::json(200, report::key_json(&k, now)),
            Ok(None) => not_found(id),
            Err(e) => store_err(e),
        },
        (&Method::PATCH, ["admin", "keys", id]) => {
            let v = match parse_json(body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let patch = match key_patch(&v, now) {
                Ok(p) => p,
                Err(e) => return bad(e),
            };
            if let Some(models) = &patch.allowed_models {
                if let Err(e) = manage::check_models(&gate.catalog, models) {
                    return bad(e);
                }
            }
            match store.update_key(id, &patch) {
                Ok(Some(k)) => {
                    reload(&store);
                    Reply::json(200, report::key_json(&k, now))
                }
                Ok(None) => not_found(id),
                Err(e) => store_err(e),
            }
        }
        (&Method::POST, ["admin", "keys", id, "revoke"]) => match store.revoke_key(id, now) {
            Ok(Some(k)) => {
                reload(&store);
                Reply::json(200, report::key_json(&k, now))
            }
            Ok(None) => not_found(id),
            Err(e) => store_err(e),
        },
        (&Method::GET, ["admin", "keys", id, "usage"]) => {
            let month = match query.get("month") {
                Some(m) => match parse_month(m) {
                    Some(m) => m,
                    None => return bad(format!("month must be YYYY-MM, got \"{m}\"")),
                },
                None => month_index(now),
            };
            let live = gate.keys.load().by_id(id).cloned();
            let result = match live {
                Some(entry) if month == month_index(now) => {
                    Ok(report::live_usage(&entry, Now::read()))
                }
                _ => match store.get_key(id) {
                    Ok(Some(k)) => report::stored_usage(&store, &k, month, now),
                    Ok(None) => return not_found(id),
                    Err(e) => Err(e),
                },
            };
            match result {
                Ok(v) => Reply::json(200, v),
                Err(e) => store_err(e),
            }
        }
        (&Method::GET, ["admin", "traces"]) => {
            gate.ledger.flush_blocking();
            let limit = query
                .get("limit")
                .and_then(|l| l.parse::<u32>().ok())
                .unwrap_or(50)
                .min(10_000);
            match store.traces(query.get("key").map(String::as_str), limit) {
                Ok(rows) => {
                    let data: Vec<Value> = rows.iter().map(report::trace_json).collect();
                    Reply::json(200, json!({"object": "list", "data": data}))
                }
                Err(e) => store_err(e),
            }
        }
        (_, ["admin", ..]) => Reply::error(404, "not_found", "Unknown admin endpoint."),
        _ => Reply::error(404, "not_found", "Unknown endpoint."),
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let reply = self.route(session).await;
        Response::builder()
            .status(reply.status)
            .header("content-type", reply.content_type)
            .header("content-length", reply.body.len())
            .header("cache-control", "no-store")
            .body(reply.body)
            .unwrap_or_else(|_| Response::new(Vec::new()))
    }
}
