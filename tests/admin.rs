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
    // Every error response names its code in the header too (SPEC §2), the admin API's too.
    assert_eq!(r.header("x-spidergate-error-code"), Some("unauthorized"));
    // The scheme's name is case-insensitive (RFC 9110); the token is not.
    for (value, status) in [
        (format!("bearer {ADMIN_TOKEN}"), 200),
        (format!("BEARER {ADMIN_TOKEN}"), 200),
        (format!("Bearer {}", ADMIN_TOKEN.to_uppercase()), 401),
        (format!("Basic {ADMIN_TOKEN}"), 401),
    ] {
        let r = http(
            admin,
            "GET",
            "/admin/keys",
            &[("Authorization", &value)],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, status, "{value}");
    }

    // A field the API does not have (a misspelt limit) makes no key: 400 naming it.
    let r = call(
        admin,
        "POST",
        "/admin/keys",
        Some(json!({"name": "typo", "rmp": 2})),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert_eq!(r.json()["error"]["param"], "rmp");
    let listed = call(admin, "GET", "/admin/keys", None).json();
    assert!(!listed.to_string().contains("\"typo\""), "{listed}");

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
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some(r.code().as_str()),
        "{}",
        r.text()
    );
    let r = call(admin, "GET", "/admin/keys/key_nope", None);
    assert_eq!(r.status, 404);
    assert_eq!(r.header("x-spidergate-error-code"), Some(r.code().as_str()));
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
    let one = call(admin, "GET", "/admin/traces?limit=1", None).json();
    assert_eq!(one["data"].as_array().unwrap().len(), 1);
    // A page size or cursor that is not one is 400 naming it, on every listing (as on keys).
    for path in [
        "/admin/traces?limit=abc",
        "/admin/traces?limit=0",
        "/admin/traces?limit=10001",
        "/admin/traces?before=x",
        "/admin/audit?limit=-1",
        "/admin/alerts?limit=0",
        "/admin/keys?limit=0",
    ] {
        let r = call(admin, "GET", path, None);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{path}"
        );
        let param = if path.contains("before") {
            "before"
        } else {
            "limit"
        };
        assert_eq!(r.json()["error"]["param"], param, "{path}");
    }

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

    // Every ledger commit that wrote something is counted, by duration: the requests above
    // were committed (the usage calls asked for it), so at least one.
    let text = wait_for(Duration::from_secs(5), "a ledger commit", || {
        let text = call(admin, "GET", "/metrics", None).text();
        (metric_value(&text, "spidergate_ledger_commit_seconds_count")? >= 1).then_some(text)
    });
    let commits = metric_value(&text, "spidergate_ledger_commit_seconds_count");
    assert_eq!(
        metric_value(
            &text,
            "spidergate_ledger_commit_seconds_bucket{le=\"+Inf\"}"
        ),
        commits,
        "{text}"
    );
    assert!(text.contains("# TYPE spidergate_ledger_commit_seconds histogram"));
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
        // HEAD: the same head, no body.
        let stream = send_request(admin, "HEAD", path, &[], b"").unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let (status, headers) = read_head(&mut reader).unwrap();
        let header = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(status, 200, "HEAD {path}");
        assert_eq!(header("content-security-policy").as_deref(), Some(csp));
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
    let (gw, admin) = admin_gateway(&mock);
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
        // An empty lifetime is not one (SPEC §1: outside 1h..90d, no key), and an empty
        // scope list is not "the defaults": leaving the field out is.
        (json!({"name": "a", "ttl": ""}), "ttl"),
        (json!({"name": "a", "ttl": "  "}), "ttl"),
        (json!({"name": "a", "scopes": []}), "scopes"),
    ] {
        let r = call(admin, "POST", "/admin/keys", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.json()["error"]["param"], field, "{body}");
    }
    let all = call(admin, "GET", "/admin/keys?all=true", None).json();
    assert_eq!(all["data"].as_array().unwrap().len(), 0);
    // The same through the CLI, and on a change.
    let out = gw.cli(&["keys", "create", "--name", "a", "--scopes", ""]);
    assert_eq!(out.status.code(), Some(1), "--scopes \"\" makes no key");
    let key = gw.create_key(&[]);
    let r = call(
        admin,
        "PATCH",
        &format!("/admin/keys/{}", key.id),
        Some(json!({"ttl": ""})),
    );
    assert_eq!(
        (r.status, r.json()["error"]["param"].clone()),
        (400, json!("ttl"))
    );
    let all = call(admin, "GET", "/admin/keys?all=true", None).json();
    assert_eq!(all["data"].as_array().unwrap().len(), 1);
}

/// SPEC §5: the keys view stays responsive with 10,000 keys because the admin API pages and
/// searches: `limit`, `offset` and `q` (id, name, prefix or group, any case), with `total`.
#[test]
fn the_key_list_pages_and_searches_on_the_server() {
    let mock = mock();
    let (gw, admin) = admin_gateway(&mock);
    let config = spidergate::config::Config::load(&gw.config).unwrap();
    let catalog = spidergate::catalog::Catalog::new(&config);
    let now = spidergate::clock::now_ms();
    let records: Vec<_> = (0..10_000)
        .map(|i| {
            let spec = spidergate::manage::KeySpec {
                name: format!("bulk-{i:05}"),
                ..Default::default()
            };
            let mut k = spidergate::manage::mint(&catalog, spec, now).unwrap().0;
            k.created_at = now - 10_000 + i; // bulk-09999 is the newest
            k
        })
        .collect();
    let needle = records[4_242].clone();
    gw.store().insert_keys(&records).unwrap();

    let get = |path: &str| {
        let r = call(admin, "GET", path, None);
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        r.json()
    };
    let names = |v: &Value| -> Vec<String> {
        v["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["name"].as_str().unwrap().to_string())
            .collect()
    };
    let page = get("/admin/keys?limit=50&offset=0&all=true&usage=true");
    assert_eq!(page["total"], 10_000);
    assert_eq!(page["data"].as_array().unwrap().len(), 50);
    assert_eq!(names(&page)[0], "bulk-09999", "newest first");
    assert!(
        page["data"][0]["usage"]["spend_usd"].is_number(),
        "usage on the page"
    );
    let next = get("/admin/keys?limit=50&offset=50&all=true");
    assert_eq!(names(&next)[0], "bulk-09949");
    let tail = get("/admin/keys?limit=50&offset=9990&all=true");
    assert_eq!(
        (tail["total"].as_u64(), names(&tail).len()),
        (Some(10_000), 10)
    );
    assert_eq!(names(&tail).last().unwrap(), "bulk-00000");

    // q: the name in another case (URL-encoded), the id, the prefix; a miss is empty.
    let by_name = get("/admin/keys?limit=50&q=BULK-04242");
    assert_eq!(
        (by_name["total"].as_u64(), names(&by_name)),
        (Some(1), vec!["bulk-04242".to_string()])
    );
    let by_id = get(&format!("/admin/keys?limit=5&q={}", needle.id));
    assert_eq!(by_id["data"][0]["id"], needle.id.as_str());
    // Room for every other match: a prefix of four decimal digits (one in six) is also in
    // the names of up to ~20 bulk keys, which may list before the needle.
    let by_prefix = get(&format!("/admin/keys?limit=100&q={}", needle.prefix));
    assert!(by_prefix["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|k| k["id"] == needle.id.as_str()));
    let spaced = get("/admin/keys?limit=5&q=bulk-0424%32");
    assert_eq!(spaced["total"], 1, "percent-decoded");
    assert_eq!(get("/admin/keys?limit=5&q=no+such+key")["total"], 0);
    let many = get("/admin/keys?limit=20&q=bulk-042");
    assert_eq!(
        (many["total"].as_u64(), names(&many).len()),
        (Some(100), 20)
    );

    // Groups and children: q finds a group's keys; parent= lists a key's children.
    let r = call(
        admin,
        "POST",
        "/admin/groups",
        Some(json!({"name": "Research-Fleet"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = call(
        admin,
        "PATCH",
        &format!("/admin/keys/{}", needle.id),
        Some(json!({"group": "Research-Fleet"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let in_group = get("/admin/keys?limit=10&q=research-fleet");
    assert_eq!(
        (
            in_group["total"].as_u64(),
            in_group["data"][0]["group"].as_str()
        ),
        (Some(1), Some("Research-Fleet"))
    );
    assert_eq!(get("/admin/keys?group=Research-Fleet")["total"], 1);
    assert_eq!(
        get(&format!("/admin/keys?parent={}&all=true", needle.id))["total"],
        0
    );

    // Without paging parameters the list is what it was: every active key.
    let plain = get("/admin/keys");
    assert_eq!(plain["data"].as_array().unwrap().len(), 10_000);
    assert_eq!(plain["total"], 10_000);

    // Bad parameters are refused and named.
    for (q, param) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("offset=-1", "offset"),
        ("status=gone", "status"),
    ] {
        let r = call(admin, "GET", &format!("/admin/keys?{q}"), None);
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["error"]["param"], param, "{q}");
    }
}
