//! Admin HTTP API (SPEC §5): the same store as the CLI, bearer = the admin token, changes
//! live in the gateway at once; usage, traces and Prometheus metrics.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "test-admin-token-123";

fn admin_gateway(mock: &MockProvider) -> (Gateway, std::net::SocketAddr) {
    let port = free_port();
    let gw = GatewayBuilder::new(mock)
        .top(&format!(
            "admin:\n  listen: \"127.0.0.1:{port}\"\n  token_env: SG_TEST_ADMIN"
        ))
        .env("SG_TEST_ADMIN", ADMIN_TOKEN)
        .start();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    wait_for(Duration::from_secs(10), "admin listener", || {
        http(addr, "GET", "/metrics", &[], b"").ok()
    });
    (gw, addr)
}

fn call(addr: std::net::SocketAddr, method: &str, path: &str, body: Option<Value>) -> Response {
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    http(
        addr,
        method,
        path,
        &[
            ("Authorization", &bearer),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    )
    .unwrap()
}

#[test]
fn admin_api_manages_keys_over_the_same_store() {
    let mock = mock();
    let (gw, admin) = admin_gateway(&mock);

    // Wrong or missing token.
    assert_eq!(
        http(admin, "GET", "/admin/keys", &[], b"").unwrap().status,
        401
    );
    let r = http(
        admin,
        "GET",
        "/admin/keys",
        &[("Authorization", "Bearer nope")],
        b"",
    )
    .unwrap();
    assert_eq!((r.status, r.code().as_str()), (401, "unauthorized"));

    // Create: the secret is shown once and works in the gateway at once.
    let r = call(
        admin,
        "POST",
        "/admin/keys",
        Some(
            json!({"name": "agent-a", "rpm": 2, "allowed_models": ["spideriq/fast"], "ttl": "7d"}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let created = r.json();
    let key = Key {
        id: created["id"].as_str().unwrap().into(),
        secret: created["secret"].as_str().unwrap().into(),
    };
    assert_eq!(created["rpm"], 2);
    assert_eq!(
        gw.chat(&key, "gpt-4o-mini").status,
        200,
        "live without waiting for the poll"
    );

    // The CLI sees it; listings never carry the secret.
    let cli = gw.cli_json(&["keys", "show", &key.id, "--json"]);
    assert_eq!(cli["name"], "agent-a");
    let list = call(admin, "GET", "/admin/keys", None);
    assert!(!list.text().contains(&key.secret[13..]));
    assert!(list.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == key.id.as_str()));
    assert_eq!(
        call(admin, "GET", &format!("/admin/keys/{}", key.id), None).json()["name"],
        "agent-a"
    );

    // Bad input gets a clear 400 and changes nothing.
    let r = call(
        admin,
        "POST",
        "/admin/keys",
        Some(json!({"name": "x", "ttl": "91d"})),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    let r = call(
        admin,
        "PATCH",
        &format!("/admin/keys/{}", key.id),
        Some(json!({"allowed_models": ["gpt-9"]})),
    );
    assert_eq!(r.status, 400);
    assert_eq!(call(admin, "GET", "/admin/keys/key_nope", None).status, 404);
    // The test clock exists only under SPIDERGATE_TEST_CLOCK=1.
    let r = call(admin, "POST", "/admin/test/advance-clock?ms=60000", None);
    assert_eq!(r.status, 404, "{}", r.text());

    // Patch: the limit applies immediately.
    let r = call(
        admin,
        "PATCH",
        &format!("/admin/keys/{}", key.id),
        Some(json!({"rpm": 1})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.chat(&key, "gpt-4o-mini");
    assert_eq!((r.status, r.code().as_str()), (429, "rate_limit_exceeded"));
    let r = call(
        admin,
        "PATCH",
        &format!("/admin/keys/{}", key.id),
        Some(json!({"rpm": null})),
    );
    assert!(r.json()["rpm"].is_null());
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);

    // Usage and traces.
    let usage = call(admin, "GET", &format!("/admin/keys/{}/usage", key.id), None).json();
    assert_eq!(usage["by_model"]["gpt-4o-mini"]["requests"], 2);
    assert_eq!(usage["spend_nanodollars"], 2 * (10 * 150 + 5 * 600));
    let traces = call(
        admin,
        "GET",
        &format!("/admin/traces?key={}&limit=2", key.id),
        None,
    )
    .json();
    let data = traces["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    assert!(data.iter().all(|t| t["key_id"] == key.id.as_str()));

    // Revoke: immediate.
    let r = call(
        admin,
        "POST",
        &format!("/admin/keys/{}/revoke", key.id),
        None,
    );
    assert_eq!(r.json()["status"], "revoked");
    assert_eq!(gw.chat(&key, "gpt-4o-mini").code(), "token_revoked");

    // Metrics (a request is counted in its logging phase, just after its response: poll).
    let text = wait_for(Duration::from_secs(5), "metrics", || {
        let r = call(admin, "GET", "/metrics", None);
        assert_eq!(r.status, 200);
        let text = r.text();
        text.contains("spidergate_requests_total{outcome=\"token_revoked\"} 1")
            .then_some(text)
    });
    assert!(
        text.contains("spidergate_requests_total{outcome=\"ok\"} 2"),
        "{text}"
    );
    assert!(text.contains("spidergate_requests_total{outcome=\"rate_limit_exceeded\"} 1"));
    assert!(text.contains("spidergate_keys_loaded 1"));
}

#[test]
fn rotation_keeps_the_id_and_the_old_secret_works_until_the_grace_ends() {
    let mock = mock();
    let (gw, admin) = admin_gateway(&mock);
    let created = call(
        admin,
        "POST",
        "/admin/keys",
        Some(json!({"name": "rotating"})),
    )
    .json();
    let id = created["id"].as_str().unwrap().to_string();
    let old = Key {
        id: id.clone(),
        secret: created["secret"].as_str().unwrap().to_string(),
    };
    let r = call(
        admin,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(json!({"grace": "8d"})),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("grace"))
    );
    let r = call(
        admin,
        "POST",
        &format!("/admin/keys/{id}/rotate"),
        Some(json!({"grace": "2s"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = r.json();
    assert_eq!(rotated["id"], id.as_str(), "same id");
    let new = Key {
        id: id.clone(),
        secret: rotated["secret"].as_str().unwrap().to_string(),
    };
    assert_ne!(new.secret, old.secret);
    assert_eq!(gw.chat(&new, "gpt-4o-mini").status, 200);
    assert_eq!(gw.chat(&old, "gpt-4o-mini").status, 200, "inside the grace");
    let after = wait_for(Duration::from_secs(10), "the grace to end", || {
        let r = gw.chat(&old, "gpt-4o-mini");
        (r.status == 401).then_some(r)
    });
    assert_eq!(after.code(), "token_revoked");
    assert_eq!(gw.chat(&new, "gpt-4o-mini").status, 200);
    // The CLI door: same rules, same outcome.
    let out = gw.cli_json(&["keys", "rotate", &id, "--grace", "0s", "--json"]);
    let newest = Key {
        id: id.clone(),
        secret: out["secret"].as_str().unwrap().to_string(),
    };
    wait_for(Duration::from_secs(5), "the CLI rotation to reload", || {
        (gw.chat(&new, "gpt-4o-mini").status == 401).then_some(())
    });
    assert_eq!(gw.chat(&newest, "gpt-4o-mini").status, 200);
    // A revoked key is not brought back by a rotation.
    call(admin, "POST", &format!("/admin/keys/{id}/revoke"), None);
    let r = call(admin, "POST", &format!("/admin/keys/{id}/rotate"), None);
    assert_eq!(r.status, 409);
}

#[test]
fn the_dashboard_is_served_with_strict_security_headers_and_no_data() {
    let mock = mock();
    let (_gw, admin) = admin_gateway(&mock);
    for path in [
        "/dashboard/gate/keys",
        "/dashboard/gate/traces",
        "/dashboard/settings/members/agents",
    ] {
        let r = http(admin, "GET", path, &[], b"").unwrap();
        assert_eq!(r.status, 200, "{path}");
        let csp = r.header("content-security-policy").unwrap_or("");
        assert!(
            csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
            "{csp}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"));
        assert_eq!(r.header("referrer-policy"), Some("no-referrer"));
        assert!(r.text().contains("/dashboard/assets/app.js"));
    }
    let r = http(admin, "GET", "/dashboard", &[], b"").unwrap();
    assert_eq!(
        (r.status, r.header("location")),
        (302, Some("/dashboard/gate/keys"))
    );
    // The API behind it still needs the token.
    assert_eq!(
        http(admin, "GET", "/admin/info", &[], b"").unwrap().status,
        401
    );
    let info = call(admin, "GET", "/admin/info", None).json();
    assert!(info["public_url"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
}

#[test]
fn invalid_fields_are_refused_with_the_field_named_and_no_key_made() {
    let mock = mock();
    let (_gw, admin) = admin_gateway(&mock);
    for (body, field) in [
        (json!({"name": "a", "rpm": -5}), "rpm"),
        (json!({"name": "a", "ttl": "100d"}), "ttl"),
        (json!({"name": ""}), "name"),
        (
            json!({"name": "a", "allowed_models": ["nope"]}),
            "allowed_models",
        ),
        (
            json!({"name": "a", "monthly_budget_usd": -1}),
            "monthly_budget_usd",
        ),
        (json!({"name": "a", "max_inflight": 0}), "max_inflight"),
    ] {
        let r = call(admin, "POST", "/admin/keys", Some(body));
        assert_eq!(r.status, 400);
        assert_eq!(r.json()["error"]["param"], field);
    }
    let all = call(admin, "GET", "/admin/keys?all=true", None).json();
    assert_eq!(all["data"].as_array().unwrap().len(), 0);
}
