//! The audit log (SPEC §5 `spidergate audit`, `GET /admin/audit`): every management change,
//! through each door (CLI, admin API, dashboard, price import, SIGHUP reload), with door,
//! actor, action, before and after, newest first, and never a secret.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const ADMIN_TOKEN: &str = "admin-token-audit-0123";

fn entries(gw: &Gateway) -> Vec<Value> {
    let v = gw.admin_call("GET", "/admin/audit?limit=100", None).json();
    v["data"].as_array().cloned().unwrap_or_default()
}

/// Nothing in the log is a secret: no key secret, no admin token, no provider key, no hash.
fn assert_no_secret(log: &str, secrets: &[&str]) {
    for s in secrets.iter().chain([&ADMIN_TOKEN, &PROVIDER_KEY]) {
        assert!(!log.contains(s), "{s} is in the audit log: {log}");
    }
    assert!(
        !log.contains("token_hash") && !log.contains("spideriq_pat_"),
        "{log}"
    );
}

#[test]
fn every_cli_change_is_recorded_with_its_user_before_and_after() {
    let m = mock();
    let gw = GatewayBuilder::new(&m).admin(ADMIN_TOKEN).start();
    let key = gw.create_key(&["--rpm", "10"]);
    let id = key.id.as_str();
    let out = gw.cli(&["keys", "update", id, "--rpm", "20"]);
    assert!(out.status.success());
    let rotated = gw.cli_json(&["keys", "rotate", id, "--json"]);
    let out = gw.cli(&["keys", "revoke", id]);
    assert!(out.status.success());
    // Revoking again changes nothing and records nothing.
    assert!(gw.cli(&["keys", "revoke", id]).status.success());

    let log = gw.cli_json(&["audit", "--json"]);
    let rows = log.as_array().unwrap();
    let actions: Vec<&str> = rows.iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        ["key.revoke", "key.rotate", "key.update", "key.create"],
        "newest first"
    );
    for e in rows {
        assert_eq!(e["door"], "cli");
        assert!(e["actor"].as_str().unwrap().starts_with("user "), "{e}");
        assert_eq!(e["target"], id);
    }
    let update = &rows[2];
    assert_eq!(update["before"]["rpm"], 10);
    assert_eq!(update["after"]["rpm"], 20);
    assert!(rows[3]["before"].is_null());
    assert_eq!(rows[3]["after"]["id"], id);
    assert!(rows[0]["before"]["revoked_at"].is_null());
    assert!(rows[0]["after"]["revoked_at"].is_string());
    let text = log.to_string();
    assert_no_secret(&text, &[&key.secret, rotated["secret"].as_str().unwrap()]);

    // The human listing and --limit.
    let out = gw.cli(&["audit", "--limit", "1"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing.contains("key.revoke") && !listing.contains("key.create"),
        "{listing}"
    );
    // A limit outside 1..=10000 is an error naming the flag, as the admin API's is a 400;
    // so is the traces listing's.
    for args in [
        ["audit", "--limit", "0"],
        ["audit", "--limit", "10001"],
        ["traces", "--limit", "0"],
    ] {
        let out = gw.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--limit"), "{args:?}: {err}");
    }
    // The same log through the admin API.
    assert_eq!(entries(&gw).len(), 4);
}

#[test]
fn admin_api_and_dashboard_changes_name_their_door_and_token_fingerprint() {
    let m = mock();
    let gw = GatewayBuilder::new(&m).admin(ADMIN_TOKEN).start();
    let created = gw
        .admin_call(
            "POST",
            "/admin/keys",
            Some(&json!({"name": "api-made", "rpm": 5})),
        )
        .json();
    let id = created["id"].as_str().unwrap().to_string();
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{id}"),
        Some(&json!({"rpd": 100})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let rotated = gw
        .admin_call(
            "POST",
            &format!("/admin/keys/{id}/rotate"),
            Some(&json!({})),
        )
        .json();
    // The dashboard calls the same API and says so in its door header.
    let addr = gw.admin_addr.unwrap();
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    let r = http(
        addr,
        "POST",
        &format!("/admin/keys/{id}/revoke"),
        &[
            ("Authorization", &bearer),
            ("X-SpiderGate-Door", "dashboard"),
            ("Content-Type", "application/json"),
        ],
        b"{}",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());

    let rows = entries(&gw);
    let seen: Vec<(String, String)> = rows
        .iter()
        .map(|e| {
            (
                e["door"].as_str().unwrap().to_string(),
                e["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("dashboard".to_string(), "key.revoke".to_string()),
            ("admin_api".to_string(), "key.rotate".to_string()),
            ("admin_api".to_string(), "key.update".to_string()),
            ("admin_api".to_string(), "key.create".to_string()),
        ]
    );
    let actor = rows[0]["actor"].as_str().unwrap();
    assert!(actor.starts_with("admin token sha256:"), "{actor}");
    assert!(
        rows.iter().all(|e| e["actor"] == actor),
        "one token, one fingerprint"
    );
    assert_eq!(rows[2]["before"]["rpd"], Value::Null);
    assert_eq!(rows[2]["after"]["rpd"], 100);
    let text = Value::Array(rows).to_string();
    assert_no_secret(
        &text,
        &[
            created["secret"].as_str().unwrap(),
            rotated["secret"].as_str().unwrap(),
        ],
    );
    // Paging back.
    let page = gw.admin_call("GET", "/admin/audit?limit=2", None).json();
    let before = page["next_before"].as_i64().expect("next_before");
    let older = gw
        .admin_call(
            "GET",
            &format!("/admin/audit?limit=2&before={before}"),
            None,
        )
        .json();
    assert_eq!(older["data"][0]["action"], "key.update");
    // The audit log needs the admin token.
    let r = http(addr, "GET", "/admin/audit", &[], b"").unwrap();
    assert_eq!(r.status, 401);
}

#[test]
fn price_imports_and_config_reloads_are_recorded() {
    let m = mock();
    let gw = GatewayBuilder::new(&m).admin(ADMIN_TOKEN).start();
    let map = gw.dir.path().join("prices.json");
    std::fs::write(
        &map,
        r#"{"gpt-4o-mini": {"input_cost_per_token": 2e-07, "output_cost_per_token": 8e-07,
            "max_input_tokens": 128000, "litellm_provider": "openai"}}"#,
    )
    .unwrap();
    let out = gw.cli(&["prices", "import", map.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.signal_hup();
    let reload = wait_for(Duration::from_secs(20), "reload recorded", || {
        entries(&gw)
            .into_iter()
            .find(|e| e["action"] == "config.reload")
    });
    assert_eq!(reload["door"], "signal");
    assert!(reload["actor"].as_str().unwrap().starts_with("SIGHUP"));
    assert_eq!(
        reload["before"]["models"]["gpt-4o-mini"]["input_usd_per_mtok"],
        0.15
    );
    assert_eq!(
        reload["after"]["models"]["gpt-4o-mini"]["input_usd_per_mtok"],
        0.2
    );
    assert_eq!(
        reload["after"]["models"]["gpt-4o-mini"]["context_window_tokens"],
        128000
    );
    let import = entries(&gw)
        .into_iter()
        .find(|e| e["action"] == "prices.import")
        .expect("import recorded");
    assert_eq!(import["door"], "cli");
    assert_eq!(import["target"], gw.config.display().to_string());
    let after = import["after"].as_array().unwrap();
    assert!(after.iter().any(|c| c["model"] == "gpt-4o-mini"
        && c["field"] == "input_usd_per_mtok"
        && c["value"] == "0.2"));

    // A reload that fails is recorded with its reason, and the old config stays.
    let key = gw.create_key(&[]);
    let text = std::fs::read_to_string(&gw.config).unwrap();
    std::fs::write(
        &gw.config,
        text.replace("provider: mock\n", "provider: nope\n"),
    )
    .unwrap();
    gw.signal_hup();
    let failed = wait_for(Duration::from_secs(20), "failed reload recorded", || {
        entries(&gw)
            .into_iter()
            .find(|e| e["action"] == "config.reload_failed")
    });
    assert!(
        failed["after"]["error"]
            .as_str()
            .unwrap()
            .contains("no provider named"),
        "{failed}"
    );
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
}
