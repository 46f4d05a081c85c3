//! Fleets (SPEC §7) on one node: group budgets and rpm over many keys, child keys minted by
//! agents through `/v1/keys` within their parent's scopes, models and expiry, a parent's
//! hard cap bounding its whole tree, and revocation reaching every descendant.
//!
//! Money is computed from the literal prices of `gpt-4o-mini` (150 n$ per prompt token, 600
//! per completion token) and what the mock upstream says it billed, never from the gateway.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PROMPT_NANOS: i64 = 150;
const COMPLETION_NANOS: i64 = 600;
/// The mock bills 10 prompt + 5 completion tokens per request by default.
const DEFAULT_COST: i64 = 10 * PROMPT_NANOS + 5 * COMPLETION_NANOS;

const ADMIN: &str = "fleet-admin";

fn billed(mock: &MockProvider) -> i64 {
    let (prompt, completion) = mock.served_usage();
    prompt as i64 * PROMPT_NANOS + completion as i64 * COMPLETION_NANOS
}

fn chat_body() -> Vec<u8> {
    json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

/// `POST /v1/keys` with the parent's key.
fn mint(gw: &Gateway, parent: &Key, body: Value) -> Response {
    gw.post(
        "/v1/keys",
        &parent.bearer(),
        body.to_string().as_bytes(),
        &[],
    )
}

fn minted(gw: &Gateway, parent: &Key, body: Value) -> Key {
    let r = mint(gw, parent, body);
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    Key {
        id: v["id"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
    }
}

/// Fires `n` requests at once, spread over `keys`; returns (admitted, refusals by code).
fn burst(gw: &Arc<Gateway>, keys: &[Arc<Key>], n: usize) -> (usize, Vec<String>) {
    let admitted = Arc::new(AtomicUsize::new(0));
    let refused = Arc::new(std::sync::Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (gw, key, admitted, refused) = (
                gw.clone(),
                keys[i % keys.len()].clone(),
                admitted.clone(),
                refused.clone(),
            );
            std::thread::spawn(move || {
                let r = gw.post(
                    "/v1/chat/completions",
                    &key.bearer(),
                    &chat_body(),
                    &[("x-mock-delay-ms", "100")],
                );
                match r.status {
                    200 => {
                        admitted.fetch_add(1, Ordering::SeqCst);
                    }
                    _ => refused
                        .lock()
                        .unwrap()
                        .push(format!("{} {}", r.status, r.code())),
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let refused = refused.lock().unwrap().clone();
    (admitted.load(Ordering::SeqCst), refused)
}

#[test]
fn a_hard_group_cap_is_never_overshot_by_its_keys_together() {
    let mock = mock();
    let gw = Arc::new(GatewayBuilder::new(&mock).admin(ADMIN).start());
    // Room for 20 requests at their real cost, far fewer at their upper bound.
    let cap = 20 * DEFAULT_COST;
    let g = gw.cli_json(&[
        "groups",
        "create",
        "team-a",
        "--budget",
        &format!("{}", cap as f64 / 1e9),
        "--budget-mode",
        "hard",
        "--json",
    ]);
    assert_eq!(g["name"], "team-a");
    assert_eq!(g["budget_mode"], "hard");
    let keys: Vec<Arc<Key>> = (0..4)
        .map(|_| Arc::new(gw.create_key(&["--group", "team-a"])))
        .collect();
    let mut refusals = Vec::new();
    let mut admitted = 0;
    for _ in 0..6 {
        let (a, r) = burst(&gw, &keys, 24);
        admitted += a;
        refusals.extend(r);
    }
    let upstream = billed(&mock);
    assert!(
        upstream <= cap,
        "provider billed {upstream} n$ > group cap {cap}"
    );
    assert_eq!(upstream, admitted as i64 * DEFAULT_COST);
    assert!(!refusals.is_empty(), "the bursts must reach the cap");
    assert!(
        refusals.iter().all(|r| r == "402 group_budget_exceeded"),
        "{refusals:?}"
    );
    // The 402 states the group's spend against its cap.
    let r = gw.post("/v1/chat/completions", &keys[0].bearer(), &chat_body(), &[]);
    if r.status == 402 {
        let msg = r.json()["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains("team-a") && msg.contains("cap"), "{msg}");
    }
    // The group's figures are the sum of its keys', per model.
    gw.wait_ledger_quiescent();
    let view = gw.admin_call("GET", "/admin/groups/team-a", None);
    assert_eq!(view.status, 200, "{}", view.text());
    let v = view.json();
    let spent = billed(&mock);
    assert_eq!(v["spend_nanodollars"], spent);
    assert_eq!(v["by_model"]["gpt-4o-mini"]["spend_nanodollars"], spent);
    assert_eq!(v["budget_usd"], cap as f64 / 1e9);
    let mut ids: Vec<String> = v["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    ids.sort();
    let mut expected: Vec<String> = keys.iter().map(|k| k.id.clone()).collect();
    expected.sort();
    assert_eq!(ids, expected);
    let by_keys: i64 = keys
        .iter()
        .map(|k| gw.usage(k)["spend_nanodollars"].as_i64().unwrap())
        .sum();
    assert_eq!(by_keys, spent);
}

#[test]
fn group_rpm_counts_the_sum_of_its_keys_and_refusals_cost_nothing() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let r = gw.admin_call(
        "POST",
        "/admin/groups",
        Some(&json!({"name": "burst", "rpm": 3})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let a = gw.create_key(&["--group", "burst"]);
    // Its own rpm is looser than the group's.
    let b = gw.create_key(&["--group", "burst", "--rpm", "10"]);
    let lone = gw.create_key(&[]);
    for (i, key) in [&a, &b, &a].into_iter().enumerate() {
        let r = gw.chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 200);
        // The group's window refuses first: the headers of every answer describe it
        // (SPEC §2: the slots left before a 429), whatever the key's own rpm.
        let left = (2 - i).to_string();
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"), "{i}");
        assert_eq!(
            r.header("x-ratelimit-remaining-requests"),
            Some(left.as_str())
        );
        let reset: u64 = r.header("x-ratelimit-reset").unwrap().parse().unwrap();
        assert!(
            if i < 2 {
                reset == 0
            } else {
                (1..=60).contains(&reset)
            },
            "{i}: reset {reset}"
        );
    }
    let r = gw.chat(&b, "gpt-4o-mini");
    assert_eq!((r.status, r.code().as_str()), (429, "rate_limit_exceeded"));
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    // The rate-limit headers describe the group's window that refused, not the key's own
    // (which has no rpm): none left until the reset.
    assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(
        r.header("x-ratelimit-reset"),
        Some(retry.to_string().as_str())
    );
    // The refusal took nothing from the key.
    assert_eq!(gw.usage(&b)["requests_today"], 1);
    // A key outside the group is not limited by it.
    assert_eq!(gw.chat(&lone, "gpt-4o-mini").status, 200);
}

#[test]
fn groups_through_cli_and_admin_api_and_keys_joining_them() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    // Unknown group: 400 naming the field, no key made.
    let r = gw.admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "x", "group": "nope"})),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert_eq!(r.json()["error"]["param"], "group");
    // Bad names and limits are refused.
    for body in [
        json!({"name": "has space"}),
        json!({"name": "ok", "rpm": 0}),
        json!({"name": "ok", "budget_usd": -1}),
        json!({"name": "ok", "budget_mode": "maybe"}),
    ] {
        let r = gw.admin_call("POST", "/admin/groups", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
    }
    let r = gw.admin_call(
        "POST",
        "/admin/groups",
        Some(&json!({"name": "ops", "budget_usd": 5, "budget_mode": "soft", "rpm": 100})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let r = gw.admin_call("POST", "/admin/groups", Some(&json!({"name": "ops"})));
    assert_eq!(r.status, 409);
    let key = gw.create_key(&["--group", "ops"]);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    let shown = gw.cli_json(&["groups", "show", "ops", "--json"]);
    assert_eq!(shown["budget_usd"], 5.0);
    assert_eq!(shown["budget_mode"], "soft");
    assert_eq!(shown["rpm"], 100);
    assert_eq!(shown["keys"], json!([key.id]));
    let k = gw
        .admin_call("GET", &format!("/admin/keys/{}", key.id), None)
        .json();
    assert_eq!(k["group"], "ops");
    // PATCH changes limits; list shows every group.
    let r = gw.admin_call(
        "PATCH",
        "/admin/groups/ops",
        Some(&json!({"rpm": null, "budget_mode": "hard"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["rpm"], Value::Null);
    // The name is the group's id: a rename is refused, naming the field; the same name is
    // no change.
    let r = gw.admin_call(
        "PATCH",
        "/admin/groups/ops",
        Some(&json!({"name": "renamed"})),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert_eq!(r.json()["error"]["param"], "name");
    let r = gw.admin_call("PATCH", "/admin/groups/ops", Some(&json!({"name": "ops"})));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        gw.admin_call("GET", "/admin/groups/renamed", None).status,
        404
    );
    let list = gw.cli_json(&["groups", "list", "--json"]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Leaving the group through the CLI; deleting it keeps its keys.
    gw.cli_json(&["keys", "update", &key.id, "--group", "none", "--json"]);
    let k = gw
        .admin_call("GET", &format!("/admin/keys/{}", key.id), None)
        .json();
    assert_eq!(k["group"], Value::Null);
    gw.cli_json(&["keys", "update", &key.id, "--group", "ops", "--json"]);
    let r = gw.admin_call("DELETE", "/admin/groups/ops", None);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(gw.admin_call("GET", "/admin/groups/ops", None).status, 404);
    let k = gw
        .admin_call("GET", &format!("/admin/keys/{}", key.id), None)
        .json();
    assert_eq!(k["group"], Value::Null);
    assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    // Every change is in the audit log.
    let audit = gw.admin_call("GET", "/admin/audit?limit=100", None).json();
    let actions: Vec<&str> = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for a in ["group.create", "group.update", "group.delete"] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
}

#[test]
fn an_agent_mints_lists_and_revokes_child_keys_within_its_own_rights() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let parent = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:usage,gate:keys",
        "--models",
        "gpt-4o-mini,spideriq/fast",
        "--ttl",
        "2d",
    ]);
    let plain = gw.create_key(&[]);
    // A key without gate:keys cannot mint.
    let r = mint(&gw, &plain, json!({"name": "x"}));
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));

    let child = minted(&gw, &parent, json!({"name": "sub-agent", "rpm": 10}));
    let v = gw
        .admin_call("GET", &format!("/admin/keys/{}", child.id), None)
        .json();
    assert_eq!(v["parent_id"], parent.id.as_str());
    assert_eq!(v["rpm"], 10);
    // Defaults within the parent: its models, the default scopes it holds, its expiry.
    assert_eq!(v["allowed_models"], json!(["gpt-4o-mini", "spideriq/fast"]));
    assert_eq!(v["scopes"], json!(["gate:chat", "gate:usage"]));
    let parent_view = gw
        .admin_call("GET", &format!("/admin/keys/{}", parent.id), None)
        .json();
    assert!(v["expires_at"].as_str() <= parent_view["expires_at"].as_str());
    // The child works at once.
    assert_eq!(gw.chat(&child, "gpt-4o-mini").status, 200);
    assert_eq!(gw.chat(&child, "gpt-4o").status, 403);

    // Beyond the parent: scopes 403, models and expiry 400 naming the field.
    for (body, status, code) in [
        (
            json!({"name": "c", "scopes": ["gate:chat", "gate:models"]}),
            403,
            "insufficient_scope",
        ),
        (json!({"name": "c", "scopes": ["gate:keys"]}), 201, ""),
        (
            json!({"name": "c", "allowed_models": ["gpt-4o"]}),
            400,
            "invalid_request",
        ),
        (json!({"name": "c", "ttl": "3d"}), 400, "invalid_request"),
        // The parent's own TTL, asked after it: cut to the parent's expiry.
        (json!({"name": "c", "ttl": "2d"}), 201, ""),
        (
            json!({"name": "c", "group": "g"}),
            403,
            "insufficient_scope",
        ),
        (json!({"name": ""}), 400, "invalid_request"),
    ] {
        let r = mint(&gw, &parent, body.clone());
        assert_eq!(r.status, status, "{body}: {}", r.text());
        if status != 201 {
            assert_eq!(r.code(), code, "{body}");
        } else if body.get("ttl").is_some() {
            assert_eq!(r.json()["expires_at"], parent_view["expires_at"]);
        }
        // A 400 names its field in `error.param`, as the admin API's do.
        if body.get("ttl").is_some() && status == 400 {
            assert_eq!(r.json()["error"]["param"], "ttl", "{}", r.text());
        }
        if body.get("allowed_models").is_some() {
            assert_eq!(r.json()["error"]["param"], "allowed_models", "{}", r.text());
        }
        if body["name"] == "" {
            assert_eq!(r.json()["error"]["param"], "name", "{}", r.text());
        }
    }
    // A child without gate:keys cannot mint; one with it asked and held can.
    let r = mint(&gw, &child, json!({"name": "grandchild"}));
    assert_eq!(r.status, 403);

    // The parent lists its descendants only, and revokes only them.
    let listed = gw.get("/v1/keys", &parent.bearer());
    assert_eq!(listed.status, 200, "{}", listed.text());
    let ids: Vec<String> = listed.json()["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&child.id));
    assert!(
        listed.text().find("secret").is_none(),
        "no secret in a listing"
    );
    let r = gw.post(
        &format!("/v1/keys/{}/revoke", plain.id),
        &parent.bearer(),
        b"",
        &[],
    );
    assert_eq!(r.status, 404, "another key is not the parent's to revoke");
    assert_eq!(r.code(), "not_found");
    let message = r.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains(&plain.id) && message.contains("descendants"),
        "{message}"
    );
    assert_eq!(gw.chat(&plain, "gpt-4o-mini").status, 200);
    let r = gw.post(
        &format!("/v1/keys/{}/revoke", child.id),
        &parent.bearer(),
        b"",
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = gw.chat(&child, "gpt-4o-mini");
    assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
    // The audit log names the agent's door.
    let audit = gw.admin_call("GET", "/admin/audit?limit=100", None).json();
    assert!(audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["door"] == "agent_api" && e["action"] == "key.create"));
}

#[test]
fn a_parents_hard_cap_bounds_its_whole_tree_under_concurrency() {
    let mock = mock();
    let gw = Arc::new(GatewayBuilder::new(&mock).admin(ADMIN).start());
    let cap = 16 * DEFAULT_COST;
    let parent = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:usage,gate:keys",
        "--budget",
        &format!("{}", cap as f64 / 1e9),
        "--budget-mode",
        "hard",
    ]);
    let child = minted(
        &gw,
        &parent,
        json!({"name": "child", "scopes": ["gate:chat", "gate:usage", "gate:keys"]}),
    );
    let grandchild = minted(&gw, &child, json!({"name": "grandchild"}));
    let tree = vec![
        Arc::new(Key {
            id: parent.id.clone(),
            secret: parent.secret.clone(),
        }),
        Arc::new(child),
        Arc::new(grandchild),
    ];
    let mut admitted = 0;
    let mut refusals = Vec::new();
    for _ in 0..5 {
        let (a, r) = burst(&gw, &tree, 24);
        admitted += a;
        refusals.extend(r);
    }
    let upstream = billed(&mock);
    assert!(
        upstream <= cap,
        "provider billed {upstream} n$ > parent cap {cap}"
    );
    assert_eq!(upstream, admitted as i64 * DEFAULT_COST);
    assert!(!refusals.is_empty());
    for r in &refusals {
        assert!(
            r == "402 group_budget_exceeded" || r == "402 budget_exceeded",
            "{refusals:?}"
        );
    }
    // Once full, the descendants get group_budget_exceeded and the parent budget_exceeded.
    let r = gw.post("/v1/chat/completions", &tree[2].bearer(), &chat_body(), &[]);
    if r.status == 402 {
        assert_eq!(r.code(), "group_budget_exceeded");
        let r = gw.post("/v1/chat/completions", &tree[0].bearer(), &chat_body(), &[]);
        assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    }
    // The cap still holds for the tree after a restart (spend restored from the ledger).
    let before = billed(&mock);
    let mut gw = Arc::try_unwrap(gw).ok().expect("one owner");
    gw.restart();
    for key in &tree {
        gw.post("/v1/chat/completions", &key.bearer(), &chat_body(), &[]);
    }
    let after = billed(&mock);
    assert!(
        after <= cap,
        "after a restart the tree billed {after} > cap {cap}"
    );
    assert!(after >= before);

    // Every door shows the spend the parent's budget is measured against: its own and its
    // tree's (the keys below it), which together are what the provider billed.
    let own = |v: &Value| v["spend_nanodollars"].as_i64().unwrap();
    let below = |v: &Value| v["tree_spend_nanodollars"].as_i64().unwrap();
    gw.wait_ledger_quiescent();
    let live = gw.usage(&tree[0]);
    assert_eq!(own(&live) + below(&live), after, "{live}");
    assert!(below(&live) > 0, "{live}");
    let child_live = gw.usage(&tree[1]);
    assert_eq!(below(&child_live), own(&gw.usage(&tree[2])), "{child_live}");
    let admin = gw
        .admin_call("GET", &format!("/admin/keys/{}/usage", parent.id), None)
        .json();
    assert_eq!(
        (own(&admin), below(&admin)),
        (own(&live), below(&live)),
        "{admin}"
    );
    let cli = gw.cli_json(&["usage", &parent.id, "--json"]);
    assert_eq!(
        (own(&cli), below(&cli)),
        (own(&live), below(&live)),
        "{cli}"
    );
}

#[test]
fn revoking_a_parent_reaches_its_grandchild_and_depth_is_bounded() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let scopes = json!(["gate:chat", "gate:usage", "gate:keys"]);
    let root = gw.create_key(&["--scopes", "gate:chat,gate:usage,gate:keys"]);
    let mut chain = vec![root];
    for depth in 1..=4 {
        let next = minted(
            &gw,
            chain.last().unwrap(),
            json!({"name": format!("depth-{depth}"), "scopes": scopes}),
        );
        chain.push(next);
    }
    // A fifth generation is refused, naming why.
    let r = mint(&gw, chain.last().unwrap(), json!({"name": "too-deep"}));
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    for k in &chain {
        assert_eq!(gw.chat(k, "gpt-4o-mini").status, 200);
    }
    // Revoked through the CLI (a separate process): the gateway learns it by polling.
    gw.cli_json(&["keys", "revoke", &chain[1].id, "--json"]);
    wait_for(Duration::from_secs(5), "grandchild refused", || {
        let r = gw.chat(&chain[3], "gpt-4o-mini");
        (r.status == 401).then_some(())
    });
    for k in &chain[1..] {
        let r = gw.chat(k, "gpt-4o-mini");
        assert_eq!((r.status, r.code().as_str()), (401, "token_revoked"));
        let v = gw
            .admin_call("GET", &format!("/admin/keys/{}", k.id), None)
            .json();
        assert_eq!(
            v["status"], "revoked",
            "descendants are revoked in the store too"
        );
    }
    assert_eq!(gw.chat(&chain[0], "gpt-4o-mini").status, 200);
    // Each key the revocation reached is a change in the audit log (SPEC §5), with its
    // state before and after.
    let log = gw.admin_call("GET", "/admin/audit?limit=100", None).json();
    let revoked: Vec<&Value> = log["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter(|e| e["action"] == "key.revoke")
        .collect();
    let mut targets: Vec<&str> = revoked
        .iter()
        .filter_map(|e| e["target"].as_str())
        .collect();
    targets.sort_unstable();
    let mut want: Vec<&str> = chain[1..].iter().map(|k| k.id.as_str()).collect();
    want.sort_unstable();
    assert_eq!(targets, want);
    for e in revoked {
        assert!(e["before"]["revoked_at"].is_null(), "{e}");
        assert!(e["after"]["revoked_at"].is_string(), "{e}");
    }
}

#[test]
fn a_soft_group_budget_warns_its_keys_once_reached_and_keeps_serving() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    // Two requests' worth: the third request sees the group's spend at its cap.
    let cap = 2 * DEFAULT_COST;
    gw.cli_json(&[
        "groups",
        "create",
        "soft-team",
        "--budget",
        &format!("{:.9}", cap as f64 / 1e9),
        "--budget-mode",
        "soft",
        "--json",
    ]);
    let a = gw.create_key(&["--group", "soft-team"]);
    let b = gw.create_key(&["--group", "soft-team"]);
    for key in [&a, &b] {
        let r = gw.chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-spidergate-budget-warning"), None);
    }
    for key in [&a, &b] {
        let r = gw.chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "a soft cap never refuses");
        assert!(
            r.header("x-spidergate-budget-warning").is_some(),
            "the group reached its soft cap"
        );
    }
    assert_eq!(billed(&mock), 4 * DEFAULT_COST);
}

/// SPEC §7: a child never exceeds its parent, whatever door changes either. An operator's
/// change that would widen a child past its parent is refused naming the field, and a
/// parent narrowed after it minted narrows its children at the next request.
#[test]
fn a_child_stays_within_its_parent_when_either_is_changed() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let parent = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:keys",
        "--models",
        "gpt-4o-mini",
        "--ttl",
        "2h",
    ]);
    let child = minted(&gw, &parent, json!({"name": "child"}));
    let path = format!("/admin/keys/{}", child.id);
    for (body, status, param) in [
        (
            json!({"allowed_models": ["gpt-4o"]}),
            400,
            Some("allowed_models"),
        ),
        (json!({"allowed_models": []}), 400, Some("allowed_models")),
        (json!({"ttl": "90d"}), 400, Some("ttl")),
        (
            json!({"scopes": ["gate:chat", "gate:models"]}),
            403,
            Some("scopes"),
        ),
    ] {
        let r = gw.admin_call("PATCH", &path, Some(&body));
        assert_eq!(r.status, status, "{body}: {}", r.text());
        if let Some(p) = param {
            assert_eq!(r.json()["error"]["param"], p, "{body}");
        }
        let kind = if status == 403 {
            "permission_error"
        } else {
            "invalid_request_error"
        };
        assert_eq!(r.json()["error"]["type"], kind, "{body}");
    }
    let out = gw.cli(&["keys", "update", &child.id, "--models", "gpt-4o"]);
    assert_eq!(out.status.code(), Some(1), "the CLI refuses it too");
    // Nothing of it was applied: the child still cannot reach past its parent.
    assert_eq!(gw.chat(&child, "gpt-4o-mini").status, 200);
    let r = gw.chat(&child, "gpt-4o");
    assert_eq!((r.status, r.code().as_str()), (403, "model_not_allowed"));
    // Narrowing within the parent is fine.
    let r = gw.admin_call("PATCH", &path, Some(&json!({"ttl": "1h"})));
    assert_eq!(r.status, 200, "{}", r.text());

    // A parent narrowed after minting: its child loses what the parent lost.
    let wide = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:models,gate:keys",
        "--models",
        "gpt-4o-mini,gpt-4o",
    ]);
    let kid = minted(&gw, &wide, json!({"name": "kid"}));
    assert_eq!(gw.chat(&kid, "gpt-4o").status, 200);
    assert_eq!(gw.get("/v1/models", &kid.bearer()).status, 200);
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", wide.id),
        Some(&json!({"allowed_models": ["gpt-4o-mini"], "scopes": ["gate:chat", "gate:keys"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for(
        Duration::from_secs(5),
        "the narrowed parent to apply",
        || (gw.chat(&kid, "gpt-4o").status == 403).then_some(()),
    );
    let r = gw.chat(&kid, "gpt-4o");
    assert_eq!((r.status, r.code().as_str()), (403, "model_not_allowed"));
    let r = gw.get("/v1/models", &kid.bearer());
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
    assert_eq!(gw.chat(&kid, "gpt-4o-mini").status, 200);
    // ... and every door shows the child as it is enforced: narrowed in the store too.
    let shown = gw.cli_json(&["keys", "show", &kid.id, "--json"]);
    assert_eq!(shown["allowed_models"], json!(["gpt-4o-mini"]), "{shown}");
    assert_eq!(shown["scopes"], json!(["gate:chat"]), "{shown}");

    // Expiring a key expires its descendants (SPEC §7): a parent's expiry brought forward
    // brings its child's and grandchild's with it, in the store and every view.
    let elder = gw.create_key(&["--scopes", "gate:chat,gate:keys", "--ttl", "90d"]);
    let son = minted(
        &gw,
        &elder,
        json!({"name": "son", "scopes": ["gate:chat", "gate:keys"]}),
    );
    let grandson = minted(&gw, &son, json!({"name": "grandson"}));
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", elder.id),
        Some(&json!({"ttl": "1h", "free_only": true})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let elder_ends = r.json()["expires_at"].as_str().unwrap().to_string();
    for k in [&son, &grandson] {
        let v = gw
            .admin_call("GET", &format!("/admin/keys/{}", k.id), None)
            .json();
        assert_eq!(v["expires_at"], elder_ends.as_str(), "{v}");
        assert_eq!(v["free_only"], true, "{v}");
    }
    // Minting under a free-only key: left out, `free_only` is the parent's; asked off, it
    // is refused naming the field, as the same change to a child is (never silently on).
    let r = mint(&gw, &son, json!({"name": "paid", "free_only": false}));
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert_eq!(r.json()["error"]["param"], "free_only", "{}", r.text());
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", grandson.id),
        Some(&json!({"free_only": false})),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "free_only", "{}", r.text());
    let r = mint(&gw, &son, json!({"name": "free"}));
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["free_only"], true, "{}", r.text());

    // A child stays in its parent's group: an operator cannot move it out (its spend would
    // leave the group's budget), and moving the parent moves its tree.
    let r = gw.admin_call(
        "POST",
        "/admin/groups",
        Some(&json!({"name": "team", "budget_usd": 5, "budget_mode": "hard"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let lead = gw.create_key(&["--scopes", "gate:chat,gate:keys", "--group", "team"]);
    let member = minted(&gw, &lead, json!({"name": "member"}));
    let member_path = format!("/admin/keys/{}", member.id);
    assert_eq!(
        gw.admin_call("GET", &member_path, None).json()["group"],
        "team"
    );
    let r = gw.admin_call("PATCH", &member_path, Some(&json!({"group": null})));
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.json()["error"]["param"], "group");
    let out = gw.cli(&["keys", "update", &member.id, "--group", "none"]);
    assert_eq!(out.status.code(), Some(1), "the CLI refuses it too");
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", lead.id),
        Some(&json!({"group": null})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        gw.admin_call("GET", &member_path, None).json()["group"],
        Value::Null
    );

    // A mint that reaches past the parent names the field it asked for (SPEC §7).
    for (body, param) in [
        (json!({"name": "x", "scopes": ["gate:models"]}), "scopes"),
        (json!({"name": "x", "group": "team"}), "group"),
    ] {
        let r = mint(&gw, &lead, body.clone());
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "insufficient_scope"),
            "{body}"
        );
        assert_eq!(r.json()["error"]["param"], param, "{body}");
    }
    let r = mint(&gw, &lead, json!({"name": "x", "scopes": []}));
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert_eq!(r.json()["error"]["param"], "scopes");
}

/// An rpm given to a key or a group that had none counts what it admitted in the minute
/// before (SPEC §2: at most `rpm` in any rolling 60 s; such a key keeps no admission times,
/// only counts per minute).
#[test]
fn an_rpm_added_to_a_key_or_group_counts_the_minute_already_admitted() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let key = gw.create_key(&[]);
    for _ in 0..4 {
        assert_eq!(gw.chat(&key, "gpt-4o-mini").status, 200);
    }
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", key.id),
        Some(&json!({"rpm": 2})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = wait_for(Duration::from_secs(5), "the rpm to apply", || {
        let r = gw.chat(&key, "gpt-4o-mini");
        (r.header("x-ratelimit-limit-requests") == Some("2")).then_some(r)
    });
    assert_eq!((r.status, r.code().as_str()), (429, "rate_limit_exceeded"));
    assert!(r.header("retry-after").is_some());

    let r = gw.admin_call("POST", "/admin/groups", Some(&json!({"name": "late"})));
    assert_eq!(r.status, 201, "{}", r.text());
    let a = gw.create_key(&["--group", "late"]);
    let b = gw.create_key(&["--group", "late"]);
    for k in [&a, &b] {
        assert_eq!(gw.chat(k, "gpt-4o-mini").status, 200);
    }
    let out = gw.cli(&["groups", "update", "late", "--rpm", "1"]);
    assert!(out.status.success(), "{out:?}");
    let r = wait_for(Duration::from_secs(5), "the group's rpm to apply", || {
        let r = gw.chat(&a, "gpt-4o-mini");
        (r.status != 200 || r.header("x-ratelimit-limit-requests") == Some("1")).then_some(r)
    });
    assert_eq!((r.status, r.code().as_str()), (429, "rate_limit_exceeded"));
}

/// Mints racing a change to their parent (SPEC §7: a child joins its parent's group, and
/// revoking a key revokes its descendants). A change's own pass over the parent's keys
/// lists them before a mint in flight has stored its key, so each mint reads its parent
/// again once stored: every child handed out ends in the group its parent joined, and none
/// stays active under a revoked parent, in the store and every view.
#[test]
fn keys_minted_while_their_parent_changes_end_within_it() {
    let mock = mock();
    let gw = Arc::new(GatewayBuilder::new(&mock).admin(ADMIN).start());
    let r = gw.admin_call(
        "POST",
        "/admin/groups",
        Some(&json!({"name": "capped", "budget_usd": 0.000001, "budget_mode": "hard"})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // Rounds of 40 mints with the parent's change in the middle of them; the race shows in
    // most rounds without the second read, so three give it every chance.
    for round in 0..3 {
        let parent = Arc::new(gw.create_key(&["--scopes", "gate:chat,gate:keys"]));
        let spawn_mints = |tag: &'static str| -> Vec<std::thread::JoinHandle<Option<String>>> {
            (0..40)
                .map(|i| {
                    let (gw, parent) = (gw.clone(), parent.clone());
                    std::thread::spawn(move || {
                        let r = mint(&gw, &parent, json!({"name": format!("{tag}{round}-{i}")}));
                        (r.status == 201).then(|| r.json()["id"].as_str().unwrap().to_string())
                    })
                })
                .collect()
        };
        let mints = spawn_mints("g");
        std::thread::sleep(Duration::from_millis(15));
        let r = gw.admin_call(
            "PATCH",
            &format!("/admin/keys/{}", parent.id),
            Some(&json!({"group": "capped"})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let children: Vec<String> = mints
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        for id in &children {
            let v = gw
                .admin_call("GET", &format!("/admin/keys/{id}"), None)
                .json();
            assert_eq!(
                v["group"], "capped",
                "round {round}: a child outside the group: {v}"
            );
        }

        let mints = spawn_mints("r");
        std::thread::sleep(Duration::from_millis(15));
        let r = gw.admin_call("POST", &format!("/admin/keys/{}/revoke", parent.id), None);
        assert_eq!(r.status, 200, "{}", r.text());
        let revoked_children: Vec<String> = mints
            .into_iter()
            .filter_map(|t| t.join().unwrap())
            .collect();
        for id in &revoked_children {
            let v = gw
                .admin_call("GET", &format!("/admin/keys/{id}"), None)
                .json();
            assert_eq!(
                v["status"], "revoked",
                "round {round}: active under a revoked parent: {v}"
            );
        }
    }
}

/// The catalog a child sees is what its whole line may call (SPEC §3: a key sees only what
/// it may call; §7: a child never exceeds its parent): a parent narrowed after minting, past
/// everything its child's own list names (the store then leaves the child's list as it is),
/// takes those models out of the child's `/v1/models`, `/v1/models/{id}` and `/v1/aliases`
/// too, as admission refuses them.
#[test]
fn a_childs_catalog_is_narrowed_by_every_key_above_it() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock).admin(ADMIN).start();
    let parent = gw.create_key(&[
        "--scopes",
        "gate:chat,gate:models,gate:keys",
        "--models",
        "gpt-4o-mini,gpt-4o",
    ]);
    let child = minted(
        &gw,
        &parent,
        json!({"name": "kid", "allowed_models": ["gpt-4o-mini"], "scopes": ["gate:chat", "gate:models", "gate:keys"]}),
    );
    let grandchild = minted(&gw, &child, json!({"name": "grandkid"}));
    let ids = |k: &Key, path: &str| -> Vec<String> {
        let r = gw.get(path, &k.bearer());
        assert_eq!(r.status, 200, "{}", r.text());
        r.json()["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["id"].as_str().unwrap().to_string())
            .collect()
    };
    for k in [&child, &grandchild] {
        assert_eq!(ids(k, "/v1/models"), ["gpt-4o-mini"]);
        assert_eq!(
            ids(k, "/v1/aliases"),
            ["spideriq/failover", "spideriq/fast"]
        );
    }
    let r = gw.admin_call(
        "PATCH",
        &format!("/admin/keys/{}", parent.id),
        Some(&json!({"allowed_models": ["gpt-4o"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for(
        Duration::from_secs(5),
        "the narrowed parent to apply",
        || (gw.chat(&child, "gpt-4o-mini").status == 403).then_some(()),
    );
    for k in [&child, &grandchild] {
        let r = gw.chat(k, "gpt-4o-mini");
        assert_eq!((r.status, r.code().as_str()), (403, "model_not_allowed"));
        assert!(ids(k, "/v1/models").is_empty());
        assert!(ids(k, "/v1/aliases").is_empty());
        for path in ["/v1/models/gpt-4o-mini", "/v1/models/spideriq/fast"] {
            let r = gw.get(path, &k.bearer());
            assert_eq!(
                (r.status, r.code().as_str()),
                (404, "model_not_found"),
                "{path}"
            );
        }
    }
    // The parent itself sees what it may call.
    assert_eq!(ids(&parent, "/v1/models"), ["gpt-4o"]);
}
