//! Three gateway processes sharing a real PostgreSQL (keys, ledger, traces) and a real Redis
//! (live limits), with requests spread round-robin: SPEC's limits hold across nodes.
//!
//! Skipped, loudly, only when Redis or PostgreSQL is not installed (`scripts/install-deps.sh`
//! installs both).

mod common;

use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::json;

#[test]
fn rpm_admits_exactly_ten_across_three_nodes() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--rpm", "10"]);
    c.mock.clear();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..30 {
        let r = c.any().chat(&key, "gpt-4o-mini");
        match r.status {
            200 => ok += 1,
            429 => {
                assert_eq!(r.code(), "rate_limit_exceeded", "{}", r.text());
                let retry: u64 = r
                    .header("retry-after")
                    .expect("Retry-After")
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry), "Retry-After {retry}");
                limited += 1;
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    assert_eq!((ok, limited), (10, 20), "rpm=10 over three nodes");
    let upstream = c
        .mock
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/chat/completions"))
        .count();
    assert_eq!(upstream, 10, "only admitted requests reach the provider");
}

#[test]
fn rpd_survives_a_restart_of_every_node() {
    let Some(mut c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--rpd", "5"]);
    for _ in 0..3 {
        assert_eq!(c.any().chat(&key, "gpt-4o-mini").status, 200);
    }
    for n in &mut c.nodes {
        n.restart();
    }
    for _ in 0..2 {
        let r = c.any().chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for _ in 0..3 {
        let r = c.any().chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.code(), "daily_rate_limit_exceeded");
    }
}

#[test]
fn a_hard_budget_is_never_overshot_by_sixty_concurrent_requests_across_nodes() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    // Each request is billed exactly its upper bound (prompt = its bytes, completion = its
    // max_tokens), and held long enough that all sixty overlap: the budget fits 20.
    let body = chat_body(200);
    let per_request = body.len() as i64 * 150 + 200 * 600;
    let cap_nanos = per_request * 20 + per_request / 2;
    let cap_usd = format!("{:.9}", cap_nanos as f64 / 1e9);
    let key = c.create_key(&["--budget", &cap_usd, "--budget-mode", "hard"]);
    let statuses: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..60)
            .map(|i| {
                let c = &c;
                let key = &key;
                let body = &body;
                s.spawn(move || {
                    let r = c.nodes[i % 3].post(
                        "/v1/chat/completions",
                        &key.bearer(),
                        body,
                        &[
                            ("x-mock-prompt-tokens", "bytes"),
                            ("x-mock-completion-tokens", "max"),
                            ("x-mock-delay-ms", "300"),
                        ],
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
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count() as i64;
    let refused = statuses
        .iter()
        .filter(|(s, code)| *s == 402 && code == "budget_exceeded")
        .count() as i64;
    assert_eq!(ok + refused, 60, "{statuses:?}");
    assert!(ok >= 1 && refused >= 1, "{statuses:?}");
    let usage = wait_for(Duration::from_secs(5), "settled spend", || {
        let u = c.usage_on(1, &key);
        (u["requests_in_flight"] == 0).then_some(u)
    });
    let billed = nanos(&usage);
    assert!(billed <= cap_nanos, "billed {billed} > cap {cap_nanos}");
    assert_eq!(
        billed,
        ok * per_request,
        "every admitted request billed its bound"
    );
    assert_eq!(ok, 20, "the budget fits exactly 20: {statuses:?}");
    let ledger = wait_for(Duration::from_secs(5), "ledger commit", || {
        let l = c.ledger_spend(&key);
        (l == billed).then_some(l)
    });
    assert!(ledger <= cap_nanos);
}

#[test]
fn key_changes_through_one_node_reach_every_node_within_a_second() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    // Each node applies changes at its next reload poll (`server.reload_interval_ms`, at
    // most 1 s by validation); the test checks that every node gets there without a
    // restart, and times nothing (the deadline only stops a hang).
    let within_a_second = |what: &str, check: &dyn Fn(&Gateway) -> bool| {
        for n in &c.nodes {
            wait_for(Duration::from_secs(10), what, || check(n).then_some(()));
        }
    };

    // Created through node 3's admin API: usable on all three.
    let created = c.nodes[2].admin_call(
        "POST",
        "/admin/keys",
        Some(&json!({"name": "made-on-3", "rpm": 100})),
    );
    assert!(
        created.status == 200 || created.status == 201,
        "{}",
        created.text()
    );
    let v = created.json();
    let key = Key {
        id: v["id"].as_str().unwrap().to_string(),
        secret: v["secret"].as_str().unwrap().to_string(),
    };
    within_a_second("created key live", &|n| {
        n.chat(&key, "gpt-4o-mini").status == 200
    });

    // Updated through node 1's CLI: its allow-list applies on all three.
    let out = c.nodes[0].cli(&["keys", "update", &key.id, "--models", "gpt-4o"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    within_a_second("allow-list applied", &|n| {
        let r = n.chat(&key, "gpt-4o-mini");
        r.status == 403 && r.code() == "model_not_allowed"
    });

    // Revoked through node 2's admin API: refused on all three.
    let r = c.nodes[1].admin_call("POST", &format!("/admin/keys/{}/revoke", key.id), None);
    assert_eq!(r.status, 200, "{}", r.text());
    within_a_second("revocation", &|n| {
        let r = n.chat(&key, "gpt-4o");
        r.status == 401 && r.code() == "token_revoked"
    });
}

#[test]
fn a_node_killed_mid_request_has_its_hold_charged_at_the_estimate() {
    let Some(mut c) = Cluster::start("closed", 1_000) else {
        return;
    };
    // A hard-budget key (its estimate is held) and a key without a budget (nothing held):
    // both are charged the estimate when their node dies, in Redis and in the ledger alike.
    let hard = c.create_key(&[
        "--budget",
        "5",
        "--budget-mode",
        "hard",
        "--max-inflight",
        "1",
    ]);
    let open = c.create_key(&["--max-inflight", "1"]);
    let body = chat_body(300);
    // Slow requests on node 1, which dies while the provider works on them.
    let addr = c.nodes[0].addr;
    let slow: Vec<_> = [&hard, &open]
        .iter()
        .map(|k| {
            let bearer = k.bearer();
            send_request(
                addr,
                "POST",
                "/v1/chat/completions",
                &[
                    ("Authorization", bearer.as_str()),
                    ("x-mock-delay-ms", "20000"),
                ],
                &body,
            )
            .expect("send")
        })
        .collect();
    wait_for(Duration::from_secs(5), "requests at the provider", || {
        (c.mock.requests().len() == 2).then_some(())
    });
    // The admission journal reaches PostgreSQL within a flush interval.
    let journaled = |key: &Key| -> i64 {
        wait_for(Duration::from_secs(5), "journaled admission", || {
            c.pg()
                .query_opt(
                    "SELECT cost_nanos FROM inflight WHERE key_id = $1",
                    &[&key.id],
                )
                .ok()
                .flatten()
                .map(|r| r.get(0))
        })
    };
    let estimates = [journaled(&hard), journaled(&open)];
    assert!(estimates.iter().all(|&e| e > 0), "{estimates:?}");
    // Meanwhile their in-flight slots are taken on every node.
    for key in [&hard, &open] {
        let r = c.nodes[1].chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 429, "{}", r.text());
        assert_eq!(r.code(), "concurrency_limit_exceeded");
    }

    c.nodes[0].kill9();
    drop(slow);
    for (key, estimate) in [&hard, &open].into_iter().zip(estimates) {
        // Redis: the hold expires and is charged at its estimate; the slot is free again.
        let usage = wait_for(Duration::from_secs(10), "hold reaped", || {
            let u = c.usage_on(1, key);
            (nanos(&u) == estimate && u["requests_in_flight"] == 0).then_some(u)
        });
        assert_eq!(nanos(&usage), estimate);
        // PostgreSQL: another node charges the dead node's journal at the same estimate.
        wait_for(Duration::from_secs(10), "journal charged", || {
            (c.ledger_spend(key) == estimate).then_some(())
        });
        let left: i64 = c
            .pg()
            .query_one(
                "SELECT COUNT(*) FROM inflight WHERE key_id = $1",
                &[&key.id],
            )
            .unwrap()
            .get(0);
        assert_eq!(left, 0, "the orphan is charged once and removed");
        // And the key is served again, by the surviving nodes.
        let r = c.nodes[2].chat(key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

#[test]
fn redis_down_pauses_hard_budgets_when_closed_and_recovers_without_a_restart() {
    let Some(mut c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let hard = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    let open = c.create_key(&["--rpm", "1000"]);
    assert_eq!(c.any().chat(&hard, "gpt-4o-mini").status, 200);
    let before = nanos(&c.usage_on(0, &hard));
    assert!(before > 0);

    c.redis.stop();
    for i in 0..3 {
        let r = c.nodes[i].chat(&hard, "gpt-4o-mini");
        assert_eq!(r.status, 503, "{}", r.text());
        assert_eq!(r.code(), "limits_unavailable");
        assert_eq!(
            r.header("x-spidergate-error-code"),
            Some("limits_unavailable")
        );
        // Keys without a hard budget are served on this node's own limits.
        assert_eq!(c.nodes[i].chat(&open, "gpt-4o-mini").status, 200);
    }
    let health = c.nodes[0].get("/health", "");
    assert_eq!(health.status, 200);
    let h = health.json();
    assert_eq!(h["redis"], "unreachable", "{h}");
    assert_eq!(h["postgres"], "ok", "{h}");
    let metrics = c.nodes[0].admin_call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("spidergate_shared_limits_up 0"),
        "{metrics}"
    );

    // Back, empty (no persistence): served again without a restart, and this month's
    // spend is seeded from the ledger, not lost.
    c.redis.restart();
    let r = wait_for(Duration::from_secs(5), "recovery", || {
        let r = c.nodes[1].chat(&hard, "gpt-4o-mini");
        (r.status == 200).then_some(r)
    });
    assert_eq!(r.status, 200);
    let after = wait_for(Duration::from_secs(5), "seeded spend", || {
        let u = c.usage_on(2, &hard);
        (nanos(&u) > before).then_some(nanos(&u))
    });
    assert!(
        after > before,
        "spend before the outage is kept: {before} -> {after}"
    );
    // Node 0 learns that Redis is back with its next heartbeat (node 1 above had a request).
    wait_for(Duration::from_secs(5), "node 0 sees Redis again", || {
        (c.nodes[0].get("/health", "").json()["redis"] == "ok").then_some(())
    });
}

/// While Redis is down a node decides on its own counters. Those counted what the node
/// admitted through Redis, so it never admits more than `rpm` in a rolling minute or `rpd`
/// in a day on its own (N nodes: N times). A black-box audit found them starting from zero:
/// a key at its limits got `rpm` more at once.
#[test]
fn a_node_that_loses_redis_keeps_counting_what_it_admitted() {
    let Some(mut c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let minute = c.create_key(&["--rpm", "3"]);
    let day = c.create_key(&["--rpd", "2"]);
    let open = c.create_key(&[]);
    for _ in 0..3 {
        assert_eq!(c.nodes[0].chat(&minute, "gpt-4o-mini").status, 200);
    }
    assert_eq!(c.nodes[0].chat(&minute, "gpt-4o-mini").status, 429);
    for _ in 0..2 {
        assert_eq!(c.nodes[0].chat(&day, "gpt-4o-mini").status, 200);
    }

    c.redis.stop();
    // The node is on its own counters: a key with no limits is served.
    assert_eq!(c.nodes[0].chat(&open, "gpt-4o-mini").status, 200);
    for _ in 0..3 {
        let r = c.nodes[0].chat(&minute, "gpt-4o-mini");
        assert_eq!(
            (r.status, r.code().as_str()),
            (429, "rate_limit_exceeded"),
            "{}",
            r.text()
        );
        let r = c.nodes[0].chat(&day, "gpt-4o-mini");
        assert_eq!(
            (r.status, r.code().as_str()),
            (429, "daily_rate_limit_exceeded"),
            "{}",
            r.text()
        );
    }
    let metrics = c.nodes[0].admin_call("GET", "/metrics", None).text();
    assert!(
        metrics.contains("spidergate_shared_limits_up 0"),
        "{metrics}"
    );
}

/// `on_error: local` and a hard budget across a Redis outage (a black-box audit billed 160%
/// of the cap through one node). The node's fallback decides from what it admitted through
/// Redis too, not from its start-up figures; and what it admitted on its own is booked into
/// Redis' month once Redis answers, so the cluster's next decisions and `/v1/usage` count it.
#[test]
fn an_outage_under_local_fallback_never_overshoots_a_hard_budget() {
    let Some(c) = Cluster::start("local", 30_000) else {
        return;
    };
    let (body, bound) = brake_body("an outage");
    // Billed exactly its bound: the worst case a reservation allows.
    let prompt = (body.len() as i64).to_string();
    let billed = [
        ("x-mock-prompt-tokens", prompt.as_str()),
        ("x-mock-completion-tokens", "20"),
    ];
    let cap = bound * 11 / 2;
    let budget = format!("{}", cap as f64 / 1e9);
    let key = c.create_key(&["--budget", &budget, "--budget-mode", "hard"]);
    let send = |n: usize| c.nodes[n].post("/v1/chat/completions", &key.bearer(), &body, &billed);
    for _ in 0..3 {
        let r = send(0);
        assert_eq!(r.status, 200, "{}", r.text());
    }
    wait_for(Duration::from_secs(10), "the ledger", || {
        (c.ledger_spend(&key) == 3 * bound).then_some(())
    });

    c.redis.pause();
    // On its own counters, node 0 knows the 3 it admitted through Redis: 2 more fit in 5.5.
    let outage: Vec<u16> = (0..3).map(|_| send(0).status).collect();
    c.redis.resume();
    assert_eq!(
        outage,
        [200, 200, 402],
        "fallback admissions on a 5.5-request cap"
    );

    // Back: Redis' month gets the outage's 2 (node 0 books them within its upkeep tick), so
    // every node refuses the next one and reports the spend the ledger has.
    let spent = wait_for(
        Duration::from_secs(10),
        "the outage's spend in Redis",
        || {
            let u = c.usage_on(1, &key);
            (nanos(&u) == 5 * bound).then_some(u)
        },
    );
    assert_eq!(spent["by_model"]["gpt-4o-mini"]["requests"], 5, "{spent}");
    for n in 0..3 {
        let r = send(n);
        assert_eq!(
            (r.status, r.code().as_str()),
            (402, "budget_exceeded"),
            "node {n}: {}",
            r.text()
        );
    }
    wait_for(Duration::from_secs(10), "the ledger", || {
        (c.ledger_spend(&key) == 5 * bound).then_some(())
    });
    assert!(c.ledger_spend(&key) <= cap);
}

#[test]
fn local_fallback_serves_every_key_and_counts_the_fallbacks() {
    let Some(mut c) = Cluster::start("local", 30_000) else {
        return;
    };
    let hard = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    c.redis.stop();
    let r = c.nodes[0].chat(&hard, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    let metrics = c.nodes[0].admin_call("GET", "/metrics", None).text();
    let fallbacks: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("spidergate_limits_fallback_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("fallback counter");
    assert!(fallbacks >= 1, "{metrics}");
}

#[test]
fn usage_is_the_same_on_every_node() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    for i in 0..6 {
        let r = c.nodes[i % 3].chat_with(
            &key,
            "gpt-4o-mini",
            &[
                ("x-mock-prompt-tokens", "100"),
                ("x-mock-completion-tokens", "50"),
            ],
        );
        assert_eq!(r.status, 200, "{}", r.text());
    }
    // 6 × (100 × 150 + 50 × 600) nano-USD.
    let expected = 6 * (100 * 150 + 50 * 600);
    for n in 0..3 {
        let u = c.usage_on(n, &key);
        assert_eq!(nanos(&u), expected, "node {n}: {u}");
        assert_eq!(u["by_model"]["gpt-4o-mini"]["requests"], 6, "node {n}: {u}");
        assert_eq!(u["requests_today"], 6, "node {n}: {u}");
        // The admin API (and the dashboard on it) reads the same shared figures.
        let admin = c.nodes[n].admin_call("GET", &format!("/admin/keys/{}/usage", key.id), None);
        assert_eq!(admin.status, 200, "node {n}: {}", admin.text());
        assert_eq!(nanos(&admin.json()), expected, "node {n}: {}", admin.text());
        let list = c.nodes[n]
            .admin_call("GET", "/admin/keys?usage=true", None)
            .json();
        let listed = list["data"]
            .as_array()
            .and_then(|d| d.iter().find(|k| k["id"] == key.id.as_str()))
            .cloned()
            .unwrap_or_default();
        assert_eq!(nanos(&listed["usage"]), expected, "node {n}: {list}");
    }
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == expected).then_some(())
    });
}

/// A gpt-4o-mini chat body with `text` as its message and a 20-token output cap, and its
/// upper-bound cost (a prompt token per body byte, 20 completion tokens).
fn brake_body(text: &str) -> (Vec<u8>, i64) {
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 20,
                      "messages": [{"role": "user", "content": text}]})
    .to_string()
    .into_bytes();
    let bound = body.len() as i64 * IN + 20 * OUT;
    (body, bound)
}

fn retry_after(r: &Response) -> u64 {
    r.header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds")
}

#[test]
fn max_usd_per_hour_holds_across_nodes_with_reservations_included() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    // Two nodes, alternating; each request billed exactly its bound (the worst case).
    let (body, bound) = brake_body("a runaway agent");
    let worst = [
        ("x-mock-prompt-tokens", "bytes"),
        ("x-mock-completion-tokens", "max"),
    ];
    let cap = 3 * bound + bound / 2;
    let cap_usd = format!("{}.{:09}", cap / 1_000_000_000, cap % 1_000_000_000);
    let key = c.create_key(&["--max-usd-per-hour", &cap_usd, "--rpm", "1000"]);
    // The window's clock starts at the first booking, after this instant: the bound below
    // holds however slow the machine is.
    let first_sent = std::time::Instant::now();
    for i in 0..3 {
        let r = c.nodes[i % 2].post("/v1/chat/completions", &key.bearer(), &body, &worst);
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }
    for i in 0..4 {
        let r = c.nodes[i % 2].post("/v1/chat/completions", &key.bearer(), &body, &worst);
        assert_eq!(
            (r.status, r.code().as_str()),
            (429, "spend_rate_exceeded"),
            "node {}",
            i % 2
        );
        // The first charge leaves the window an hour after it was booked, never later.
        let retry = retry_after(&r);
        let waited = first_sent.elapsed().as_secs() + 1;
        assert!(
            (3600 - waited..=3600).contains(&retry),
            "Retry-After {retry}"
        );
    }
    // The refusals consumed nothing on either node: three requests, three bounds.
    let usage = wait_for(Duration::from_secs(5), "settled", || {
        let u = c.usage_on(1, &key);
        (u["requests_in_flight"] == 0).then_some(u)
    });
    assert_eq!(usage["requests_today"], 3);
    assert_eq!(nanos(&usage), 3 * bound);

    // Concurrent requests on both nodes of a fresh key: the hour's billed spend never
    // passes the cap, because every admission holds its bound until it settles.
    let fresh = c.create_key(&["--max-usd-per-hour", &cap_usd]);
    let ok: usize = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|i| {
                let (c, fresh, body) = (&c, &fresh, &body);
                s.spawn(move || {
                    let mut headers = worst.to_vec();
                    headers.push(("x-mock-delay-ms", "200"));
                    let r = c.nodes[i % 2].post(
                        "/v1/chat/completions",
                        &fresh.bearer(),
                        body,
                        &headers,
                    );
                    match r.status {
                        200 => 1,
                        429 => {
                            assert_eq!(r.code(), "spend_rate_exceeded");
                            0
                        }
                        s => panic!("unexpected {s}: {}", r.text()),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let billed = wait_for(Duration::from_secs(5), "ledger", || {
        let u = c.usage_on(0, &fresh);
        (u["requests_in_flight"] == 0).then(|| nanos(&u))
    });
    assert!(billed <= cap, "billed {billed} > cap {cap}");
    assert_eq!((ok, billed), (3, 3 * bound));
    // Each refusal left a trace with its code, on whichever node refused it.
    let traced = wait_for(Duration::from_secs(5), "traces", || {
        let n = c
            .ledger_traces(&fresh)
            .iter()
            .filter(|(code, _)| code.as_deref() == Some("spend_rate_exceeded"))
            .count();
        (n == 12 - ok).then_some(n)
    });
    assert_eq!(traced, 9);
}

#[test]
fn loop_limit_counts_the_same_request_across_nodes_and_refusals_consume_nothing() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    // rpm 5: if a refused request took a slot, the last distinct requests would be refused.
    let key = c.create_key(&["--loop-limit", "2", "--rpm", "5"]);
    let (same, _) = brake_body("are we there yet?");
    let first_sent = std::time::Instant::now();
    for i in 0..2 {
        let r = c.nodes[i % 2].post("/v1/chat/completions", &key.bearer(), &same, &[]);
        assert_eq!(r.status, 200, "identical request {i}: {}", r.text());
    }
    for i in 0..4 {
        let r = c.nodes[i % 2].post("/v1/chat/completions", &key.bearer(), &same, &[]);
        assert_eq!((r.status, r.code().as_str()), (429, "loop_detected"));
        let retry = retry_after(&r);
        let waited = first_sent.elapsed().as_secs() + 1;
        assert!((60 - waited..=60).contains(&retry), "Retry-After {retry}");
    }
    // One byte different is another request, on either node; the refusals above took no
    // rpm slot, so three more distinct requests fill the minute exactly.
    for (i, text) in [
        "are we there yet!",
        "are we there yet?!",
        "are we there, yet?",
    ]
    .iter()
    .enumerate()
    {
        let (other, _) = brake_body(text);
        let r = c.nodes[i % 2].post("/v1/chat/completions", &key.bearer(), &other, &[]);
        assert_eq!(r.status, 200, "{text}: {}", r.text());
    }
    let (sixth, _) = brake_body("something else");
    assert_eq!(
        c.nodes[1]
            .post("/v1/chat/completions", &key.bearer(), &sixth, &[])
            .code(),
        "rate_limit_exceeded"
    );
    let usage = c.usage_on(0, &key);
    assert_eq!(usage["requests_today"], 5, "{usage}");
}
