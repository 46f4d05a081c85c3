//! Fleets (SPEC §7) across three nodes sharing PostgreSQL and Redis: a group's and a
//! parent's hard caps hold under concurrency spread over every node (one Lua admission
//! touches every level), a group's rpm counts across nodes, and a revoked parent's
//! grandchild is refused on every node.
//!
//! Skipped, loudly, only when Redis or PostgreSQL is not installed (and failed instead under
//! `SPIDERGATE_REQUIRE_SERVICES=1`, as `scripts/test.sh` runs it).

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::json;

/// The mock bills 10 prompt + 5 completion tokens per request by default.
const DEFAULT_COST: i64 = 10 * IN + 5 * OUT;

fn body() -> Vec<u8> {
    json!({"model": "gpt-4o-mini", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})
        .to_string()
        .into_bytes()
}

fn billed(c: &Cluster) -> i64 {
    let (prompt, completion) = c.mock.served_usage();
    prompt as i64 * IN + completion as i64 * OUT
}

/// `n` requests at once, request `i` with `keys[i % len]` on node `i % 3`; the refusals'
/// "status code" strings.
fn burst(c: &Cluster, keys: &[&Key], n: usize) -> (usize, Vec<String>) {
    let body = body();
    let out: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (key, body) = (keys[i % keys.len()], &body);
                let node = &c.nodes[i % c.nodes.len()];
                s.spawn(move || {
                    let r = node.post(
                        "/v1/chat/completions",
                        &key.bearer(),
                        body,
                        &[("x-mock-delay-ms", "100")],
                    );
                    let code = if r.status == 200 {
                        String::new()
                    } else {
                        r.code()
                    };
                    (r.status, code)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = out.iter().filter(|(s, _)| *s == 200).count();
    let refused = out
        .iter()
        .filter(|(s, _)| *s != 200)
        .map(|(s, c)| format!("{s} {c}"))
        .collect();
    (ok, refused)
}

/// Mints a child through `node` and waits until every node knows it.
fn mint(c: &Cluster, node: usize, parent: &Key, body: serde_json::Value) -> Key {
    let r = c.nodes[node].post(
        "/v1/keys",
        &parent.bearer(),
        body.to_string().as_bytes(),
        &[],
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let key = Key {
        id: v["id"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
    };
    for n in &c.nodes {
        n.wait_key_live(&key);
    }
    key
}

/// About 10 s on the shared 2-core box: Redis, PostgreSQL and three gateway nodes start, then
/// five bursts of 24 requests across the nodes drive the group to its cap.
#[test]
fn a_group_cap_holds_across_three_nodes() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let cap = 18 * DEFAULT_COST;
    c.nodes[0].cli_json(&[
        "groups",
        "create",
        "fleet",
        "--budget",
        &format!("{:.9}", cap as f64 / 1e9),
        "--budget-mode",
        "hard",
        "--rpm",
        "1000",
        "--json",
    ]);
    let keys: Vec<Key> = (0..3)
        .map(|_| c.create_key(&["--group", "fleet"]))
        .collect();
    let refs: Vec<&Key> = keys.iter().collect();
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..5 {
        let (a, r) = burst(&c, &refs, 24);
        ok += a;
        refused.extend(r);
    }
    let upstream = billed(&c);
    assert!(
        upstream <= cap,
        "provider billed {upstream} > group cap {cap}"
    );
    assert_eq!(upstream, ok as i64 * DEFAULT_COST);
    assert!(!refused.is_empty(), "the bursts must reach the cap");
    assert!(
        refused.iter().all(|r| r == "402 group_budget_exceeded"),
        "{refused:?}"
    );
    // The ledger and the admin API agree with the provider.
    let spent = wait_for(Duration::from_secs(5), "ledger commit", || {
        let total: i64 = keys.iter().map(|k| c.ledger_spend(k)).sum();
        (total == upstream).then_some(total)
    });
    let g = c.nodes[2]
        .admin_call("GET", "/admin/groups/fleet", None)
        .json();
    assert_eq!(g["spend_nanodollars"], spent);
    // Every hold taken at the group was given back (none leaks past its request).
    let held = c.redis_cli(&["HGET", "{sg}:g:fleet:live", "reserved"]);
    assert!(
        matches!(held.trim(), "" | "0"),
        "group still holds {held:?}"
    );
}

#[test]
fn a_group_rpm_counts_requests_on_every_node() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    c.nodes[1].cli_json(&["groups", "create", "slow", "--rpm", "4", "--json"]);
    let a = c.create_key(&["--group", "slow"]);
    // Its own rpm is looser than the group's.
    let b = c.create_key(&["--group", "slow", "--rpm", "10"]);
    let mut ok = 0;
    for i in 0..12 {
        let key = if i % 2 == 0 { &a } else { &b };
        let r = c.any().chat(key, "gpt-4o-mini");
        match r.status {
            200 => {
                ok += 1;
                // The group's window refuses first: the headers describe it (SPEC §2).
                assert_eq!(r.header("x-ratelimit-limit-requests"), Some("4"), "{i}");
                let left = (4 - ok).to_string();
                assert_eq!(
                    r.header("x-ratelimit-remaining-requests"),
                    Some(left.as_str()),
                    "{i}"
                );
            }
            429 => assert_eq!(r.code(), "rate_limit_exceeded"),
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!(ok, 4, "rpm 4 over the group, across three nodes");
}

#[test]
fn a_parent_cap_bounds_its_tree_across_nodes_and_revocation_reaches_every_node() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let cap = 15 * DEFAULT_COST;
    let parent = c.create_key(&[
        "--scopes",
        "gate:chat,gate:usage,gate:keys",
        "--budget",
        &format!("{:.9}", cap as f64 / 1e9),
        "--budget-mode",
        "hard",
    ]);
    let child = mint(
        &c,
        1,
        &parent,
        json!({"name": "child", "scopes": ["gate:chat", "gate:usage", "gate:keys"]}),
    );
    let grandchild = mint(&c, 2, &child, json!({"name": "grandchild"}));
    let mut ok = 0;
    let mut refused = Vec::new();
    for _ in 0..4 {
        let (a, r) = burst(&c, &[&parent, &child, &grandchild], 24);
        ok += a;
        refused.extend(r);
    }
    let upstream = billed(&c);
    assert!(
        upstream <= cap,
        "provider billed {upstream} > tree cap {cap}"
    );
    assert_eq!(upstream, ok as i64 * DEFAULT_COST);
    assert!(!refused.is_empty());
    for r in &refused {
        assert!(
            r == "402 group_budget_exceeded" || r == "402 budget_exceeded",
            "{refused:?}"
        );
    }
    // Every hold taken at the root for its tree was given back.
    let held = c.redis_cli(&["HGET", &format!("{{sg}}:k:{}:live", parent.id), "treserved"]);
    assert!(
        matches!(held.trim(), "" | "0"),
        "the root still holds {held:?}"
    );
    // Every node shows the root's spend as its budget counts it: its own and its tree's.
    for n in &c.nodes {
        let u = n.usage(&parent);
        let own = u["spend_nanodollars"].as_i64().unwrap();
        let below = u["tree_spend_nanodollars"].as_i64().unwrap();
        assert_eq!(own + below, upstream, "{u}");
    }
    // Revoked on node 0: the grandchild is refused on every node.
    let r = c.nodes[0].post(
        &format!("/v1/keys/{}/revoke", child.id),
        &parent.bearer(),
        b"",
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    for n in &c.nodes {
        wait_for(Duration::from_secs(5), "grandchild refused", || {
            let r = n.chat(&grandchild, "gpt-4o-mini");
            (r.status == 401 && r.code() == "token_revoked").then_some(())
        });
    }
}

#[test]
fn a_soft_group_budget_warns_on_every_node() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let cap = 2 * DEFAULT_COST;
    c.nodes[0].cli_json(&[
        "groups",
        "create",
        "soft-fleet",
        "--budget",
        &format!("{:.9}", cap as f64 / 1e9),
        "--budget-mode",
        "soft",
        "--json",
    ]);
    let key = c.create_key(&["--group", "soft-fleet"]);
    for node in &c.nodes[..2] {
        let r = node.chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-spidergate-budget-warning"), None);
    }
    // Settled in Redis by the time the response ended (SPEC: usage right after a response).
    wait_for(Duration::from_secs(5), "settled", || {
        (c.usage_on(0, &key)["requests_in_flight"] == 0).then_some(())
    });
    let r = c.nodes[2].chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200);
    assert!(r.header("x-spidergate-budget-warning").is_some());
}
