//! Attacks on the cluster mode's promises (docs/cluster.md, SPEC §2): three gateway
//! processes sharing a real PostgreSQL and a real Redis, driven through the request shapes,
//! hang-ups, outages, hangs and crashes that break naive shared limits.
//!
//! Each test owns its PostgreSQL server (some stop and restart it) and its Redis. Skipped,
//! loudly, only when Redis or PostgreSQL is not installed.

mod common;

use std::io::{BufRead, Read};
use std::time::Duration;

use common::cluster::*;
use common::*;
use serde_json::{json, Value};

/// Sends a chat request on a fresh connection, without reading the answer.
fn send_chat(
    node: &Gateway,
    key: &Key,
    body: &[u8],
    extra: &[(&str, &str)],
) -> std::net::TcpStream {
    let bearer = key.bearer();
    let mut headers = vec![
        ("Authorization", bearer.as_str()),
        ("Content-Type", "application/json"),
    ];
    headers.extend_from_slice(extra);
    send_request(node.addr, "POST", "/v1/chat/completions", &headers, body).expect("send")
}

fn at_provider(c: &Cluster, n: usize) {
    wait_for(Duration::from_secs(5), "requests at the provider", || {
        (c.mock
            .requests()
            .iter()
            .filter(|r| r.path.ends_with("/chat/completions"))
            .count()
            >= n)
            .then_some(())
    });
}

fn health(node: &Gateway) -> (u16, Value) {
    let r = node.get("/health", "");
    (r.status, r.json())
}

// ---------------------------------------------------------------------------------------
// Streams

/// A streamed chat through a node, with `include_usage`: the settled spend is exactly the
/// usage the upstream reported, the same on every node and in the ledger, and the client
/// gets the usage chunk it asked for.
#[test]
fn a_streamed_chat_settles_the_reported_usage_exactly_on_every_node() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&[
        "--budget",
        "5",
        "--budget-mode",
        "hard",
        "--max-inflight",
        "1",
    ]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 400,
        "stream_options": {"include_usage": true},
        "messages": [{"role": "user", "content": "tell me a story"}]});
    let (status, _, mut reader) = c.nodes[1].open_stream(
        &key,
        &body,
        &[
            ("x-mock-prompt-tokens", "120"),
            ("x-mock-completion-tokens", "70"),
            ("x-mock-chunks", "5"),
        ],
    );
    assert_eq!(status, 200);
    let mut text = String::new();
    reader.read_to_string(&mut text).expect("read the stream");
    assert!(text.contains("[DONE]"), "{text}");
    assert!(
        text.contains("\"prompt_tokens\":120"),
        "the client asked for usage: {text}"
    );
    let expected = 120 * IN + 70 * OUT;
    for n in 0..3 {
        let u = wait_for(Duration::from_secs(5), "settled stream", || {
            let u = c.usage_on(n, &key);
            (u["requests_in_flight"] == 0).then_some(u)
        });
        assert_eq!(nanos(&u), expected, "node {n}: {u}");
        assert_eq!(u["reserved_usd"], 0.0, "node {n}: {u}");
        assert_eq!(u["by_model"]["gpt-4o-mini"]["prompt_tokens"], 120, "{u}");
        assert_eq!(u["by_model"]["gpt-4o-mini"]["completion_tokens"], 70, "{u}");
    }
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == expected).then_some(())
    });
    // The in-flight slot is free on another node.
    assert_eq!(c.nodes[2].chat(&key, "gpt-4o-mini").status, 200);
}

/// A client that hangs up mid-stream on one node: charged once (an estimate, never zero),
/// the same figure in Redis and in the ledger, one trace, and its slot free on every node.
#[test]
fn a_client_hanging_up_mid_stream_is_charged_once_and_frees_its_slot_everywhere() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&[
        "--budget",
        "5",
        "--budget-mode",
        "hard",
        "--max-inflight",
        "1",
    ]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 500,
        "messages": [{"role": "user", "content": "tell me a long story"}]});
    let (status, _, mut reader) = c.nodes[0].open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "60"), ("x-mock-chunk-delay-ms", "50")],
    );
    assert_eq!(status, 200);
    read_first_event(&mut reader);
    // While it streams, its slot is taken on the other nodes.
    let r = c.nodes[1].chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 429, "{}", r.text());
    assert_eq!(r.code(), "concurrency_limit_exceeded");
    drop(reader);

    let u = wait_for(Duration::from_secs(10), "the hang-up settled", || {
        let u = c.usage_on(2, &key);
        (u["requests_in_flight"] == 0 && nanos(&u) > 0).then_some(u)
    });
    let charged = nanos(&u);
    assert_eq!(u["reserved_usd"], 0.0, "{u}");
    assert_eq!(u["by_model"]["gpt-4o-mini"]["requests"], 1, "{u}");
    let traces = wait_for(Duration::from_secs(5), "the trace", || {
        let t: Vec<_> = c
            .ledger_traces(&key)
            .into_iter()
            .filter(|(code, _)| code.as_deref() != Some("concurrency_limit_exceeded"))
            .collect();
        (!t.is_empty()).then_some(t)
    });
    assert_eq!(traces.len(), 1, "one trace: {traces:?}");
    assert_eq!(traces[0].0.as_deref(), Some("client_closed"));
    assert_eq!(traces[0].1, charged, "ledger and Redis agree");
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == charged).then_some(())
    });
    for n in 0..3 {
        assert_eq!(nanos(&c.usage_on(n, &key)), charged, "node {n}");
    }
    // Free on every node (one at a time: max_inflight is 1; each settle is awaited, the
    // race with the next admission is its own test below).
    for n in 0..3 {
        let r = c.nodes[n].chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "node {n}: {}", r.text());
        wait_for(Duration::from_secs(5), "settled", || {
            (c.usage_on(n, &key)["requests_in_flight"] == 0).then_some(())
        });
    }
}

/// A client that sends its requests one after another (never two at once) through a
/// balancer that alternates nodes must never be refused for concurrency on a key with
/// `max_inflight: 1`: the previous request's slot is free once its response has ended.
#[test]
fn sequential_requests_alternating_nodes_never_exceed_max_inflight_one() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--max-inflight", "1"]);
    let mut refused = Vec::new();
    for i in 0..30 {
        let r = c.nodes[i % 3].chat(&key, "gpt-4o-mini");
        if r.status != 200 {
            refused.push((i, r.status, r.code()));
        }
    }
    assert!(
        refused.is_empty(),
        "sequential requests refused (the previous one's slot was still held): {refused:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Redis: data loss, hangs

/// Redis loses its data while a request is in flight; the next call re-seeds the month from
/// the ledger (which does not have the in-flight request yet). When that request ends, its
/// cost must reach Redis' figure: docs/cluster.md says the budget can be overshot only
/// "until those requests end". Afterwards `/v1/usage` must agree with the ledger.
#[test]
fn redis_data_loss_mid_request_keeps_that_requests_cost_once_it_ends() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    let small = c.nodes[1].chat_with(
        &key,
        "gpt-4o-mini",
        &[
            ("x-mock-prompt-tokens", "10"),
            ("x-mock-completion-tokens", "10"),
        ],
    );
    assert_eq!(small.status, 200, "{}", small.text());
    let before = 10 * IN + 10 * OUT;
    wait_for(
        Duration::from_secs(5),
        "first request in the ledger",
        || (c.ledger_spend(&key) == before).then_some(()),
    );

    c.mock.clear();
    let slow = send_chat(
        &c.nodes[0],
        &key,
        &chat_body(900),
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "800"),
            ("x-mock-delay-ms", "2000"),
        ],
    );
    at_provider(&c, 1);
    c.redis_data_loss();
    // Another node's call re-seeds the month from the ledger.
    let reseeded = nanos(&c.usage_on(2, &key));
    assert_eq!(reseeded, before, "re-seeded from the ledger");

    let r = read_response(slow).expect("slow response");
    assert_eq!(r.status, 200, "{}", r.text());
    let total = before + 1000 * IN + 800 * OUT;
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == total).then_some(())
    });
    let u = wait_for(Duration::from_secs(5), "settled", || {
        let u = c.usage_on(1, &key);
        (u["requests_in_flight"] == 0).then_some(u)
    });
    assert_eq!(
        nanos(&u),
        total,
        "the request in flight during the data loss is missing from Redis' month for good \
         (ledger has {total}): {u}"
    );
}

/// A hard-budget request refused 503 `limits_unavailable` because Redis hung (the admission
/// script was sent; Redis runs it when it wakes) must consume nothing: SPEC §2, "a request
/// that is rejected for any reason consumes neither quota nor budget".
#[test]
fn a_request_refused_while_redis_hangs_consumes_no_daily_quota() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--budget", "5", "--budget-mode", "hard", "--rpd", "1"]);
    c.redis.pause();
    let r = c.nodes[0].chat(&key, "gpt-4o-mini");
    c.redis.resume();
    assert_eq!(r.status, 503, "{}", r.text());
    assert_eq!(r.code(), "limits_unavailable");
    // Each node notices Redis again with its next heartbeat (a heartbeat during the pause
    // marked it unreachable too); node 1's also releases what the lost admission took.
    for (i, node) in c.nodes.iter().enumerate() {
        wait_for(
            Duration::from_secs(10),
            &format!("Redis back on node {i}"),
            || (health(node).1["redis"] == "ok").then_some(()),
        );
    }
    // (No /v1/usage here: with rpd=1 usage calls have their own daily limit, which
    // create_key spent.) The lost admission is released by a heartbeat after Redis is back:
    // wait for that event in Redis itself (no open hold left), not for a fixed time.
    let counted = wait_for(
        Duration::from_secs(10),
        "the lost admission released",
        || {
            // Reservations only: not the pad that keeps the hash a hash table (`~...`).
            let open = c
                .redis_cli(&["HKEYS", "{sg}:res"])
                .lines()
                .filter(|f| !f.is_empty() && !f.starts_with('~'))
                .count();
            let days = c.redis_cli(&["KEYS", &format!("{{sg}}:k:{}:day:*", key.id)]);
            let counted: Vec<String> = days
                .lines()
                .filter(|l| !l.is_empty())
                .map(|k| c.redis_cli(&["GET", k]).trim().to_string())
                .collect();
            let released = open == 0 && counted.iter().all(|n| n == "0");
            released.then_some(counted)
        },
    );
    let r = c.nodes[1].chat(&key, "gpt-4o-mini");
    assert_eq!(
        r.status,
        200,
        "rpd=1 and nothing was served yet (day count in Redis {counted:?}): {}",
        r.text()
    );
}

/// A key's month that cannot be seeded (PostgreSQL down) is decided locally for that key
/// alone: Redis stays in charge of every other key (the shared rpm still holds), and the
/// node does not report Redis as unreachable.
#[test]
fn a_failed_seed_does_not_take_other_keys_off_the_shared_limits() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let limited = c.create_key(&["--rpm", "1"]);
    let fresh = c.create_key(&[]);
    assert_eq!(c.nodes[1].chat(&limited, "gpt-4o-mini").status, 200);
    // `fresh` has no month in Redis (as for a key first used after a data loss).
    let keys = c.redis_cli(&["KEYS", &format!("{{sg}}:k:{}:mon:*", fresh.id)]);
    let month_key = keys.lines().next().expect("fresh's month hash").to_string();
    c.redis_cli(&["DEL", &month_key]);
    c.pg.stop();
    for round in 0..3 {
        let _ = c.nodes[0].chat(&fresh, "gpt-4o-mini");
        let r = c.nodes[0].chat(&limited, "gpt-4o-mini");
        assert_eq!(
            r.status,
            429,
            "round {round}: rpm=1 across the cluster, already used: {}",
            r.text()
        );
        assert_eq!(r.code(), "rate_limit_exceeded");
        assert_eq!(health(&c.nodes[0]).1["redis"], "ok", "round {round}");
    }
    c.pg.start_again();
}

/// Redis restarted empty while every node is idle, then a burst: the re-seed happens once
/// per key (never additive), whichever nodes race to do it.
#[test]
fn a_reseed_raced_by_three_nodes_is_written_once() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    for n in 0..3 {
        let r = c.nodes[n].chat_with(
            &key,
            "gpt-4o-mini",
            &[
                ("x-mock-prompt-tokens", "100"),
                ("x-mock-completion-tokens", "100"),
            ],
        );
        assert_eq!(r.status, 200);
    }
    let per = 100 * IN + 100 * OUT;
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == 3 * per).then_some(())
    });
    c.redis_data_loss();
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..12)
            .map(|i| {
                let c = &c;
                let key = &key;
                s.spawn(move || {
                    c.nodes[i % 3]
                        .chat_with(
                            key,
                            "gpt-4o-mini",
                            &[
                                ("x-mock-prompt-tokens", "100"),
                                ("x-mock-completion-tokens", "100"),
                            ],
                        )
                        .status
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    let u = wait_for(Duration::from_secs(5), "settled", || {
        let u = c.usage_on(0, &key);
        (u["requests_in_flight"] == 0).then_some(u)
    });
    assert_eq!(nanos(&u), 15 * per, "seeded once, then 12 more: {u}");
    assert_eq!(u["by_model"]["gpt-4o-mini"]["requests"], 15, "{u}");
}

// ---------------------------------------------------------------------------------------
// PostgreSQL: outages and a node cut off from it

/// PostgreSQL stops while the cluster is idle: `/health` must say so (`postgres` failing)
/// without waiting for traffic, as docs/cluster.md's `/health` promises, so a balancer or
/// an operator sees it.
#[test]
fn postgres_down_shows_in_health_without_traffic() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    c.pg.stop();
    // Each node's ledger heartbeats PostgreSQL every second: the next one fails, with no
    // request sent.
    let h = wait_for(
        Duration::from_secs(10),
        "postgres failing in /health",
        || {
            let (_, h) = health(&c.nodes[0]);
            (h["postgres"] == "failing").then_some(h)
        },
    );
    c.pg.start_again();
    assert_eq!(h["postgres"], "failing", "{h}");
}

/// PostgreSQL down: hard-budget keys get 503 `ledger_unavailable` (once the ledger cannot
/// write), other keys are served and their spend is kept; PostgreSQL back: every node
/// recovers without a restart and the backlog reaches the ledger.
#[test]
fn postgres_outage_pauses_hard_budgets_and_recovers_without_a_restart() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let hard = c.create_key(&["--budget", "5", "--budget-mode", "hard"]);
    let soft = c.create_key(&[]);
    for n in 0..3 {
        assert_eq!(c.nodes[n].chat(&hard, "gpt-4o-mini").status, 200);
    }
    let cost = 10 * IN + 5 * OUT;
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&hard) == 3 * cost).then_some(())
    });

    c.pg.stop();
    for n in 0..3 {
        let r = c.nodes[n].chat(&soft, "gpt-4o-mini");
        assert_eq!(r.status, 200, "node {n}: {}", r.text());
    }
    // Until a node's ledger has failed a commit it still admits them (how soon it should
    // notice is `postgres_down_shows_in_health_without_traffic`).
    let mut served = 0;
    for n in 0..3 {
        let r = wait_for(Duration::from_secs(5), "hard budget paused", || {
            let r = c.nodes[n].chat(&hard, "gpt-4o-mini");
            if r.status == 200 {
                served += 1;
            }
            (r.status == 503).then_some(r)
        });
        assert_eq!(r.code(), "ledger_unavailable", "node {n}");
        let (status, h) = health(&c.nodes[n]);
        assert_eq!(status, 503, "node {n}: {h}");
        assert_eq!(h["postgres"], "failing", "node {n}: {h}");
    }
    // A hard key refused meanwhile consumed nothing; Redis still has the three requests.
    let u = c.usage_on(0, &hard);
    assert_eq!(nanos(&u), (3 + served) * cost, "{u}");

    c.pg.start_again();
    for n in 0..3 {
        wait_for(Duration::from_secs(10), "node healthy again", || {
            let (s, h) = health(&c.nodes[n]);
            (s == 200 && h["postgres"] == "ok").then_some(())
        });
        let r = c.nodes[n].chat(&hard, "gpt-4o-mini");
        assert_eq!(r.status, 200, "node {n} after recovery: {}", r.text());
    }
    wait_for(Duration::from_secs(10), "backlog committed", || {
        (c.ledger_spend(&soft) == 3 * cost && c.ledger_spend(&hard) == (6 + served) * cost)
            .then_some(())
    });
    assert_eq!(nanos(&c.usage_on(2, &hard)), (6 + served) * cost);
}

/// A live node cut off from PostgreSQL for longer than `reservation_ttl_ms` (its ledger
/// heartbeat stalls; Redis is fine) has its open journal rows charged at their upper bound
/// by another node. When its request then ends, its real cost must not be booked on top:
/// charged exactly once, at the estimate, and never below what Redis shows.
/// About 10 s: three nodes start, the request is held 4 s at the provider (it must outlive
/// the 1 s TTL and another node's orphan sweep), then every node sweeps twice more.
#[test]
fn a_node_whose_ledger_heartbeat_stalls_is_not_charged_twice() {
    let Some(c) = Cluster::start("closed", 1_000) else {
        return;
    };
    let key = c.create_key(&[]);
    let slow = send_chat(
        &c.nodes[0],
        &key,
        &chat_body(300),
        &[
            ("x-mock-prompt-tokens", "100"),
            ("x-mock-completion-tokens", "50"),
            ("x-mock-delay-ms", "4000"),
        ],
    );
    at_provider(&c, 1);
    let (owner, estimate): (i64, i64) = wait_for(Duration::from_secs(5), "journaled", || {
        c.pg()
            .query_opt(
                "SELECT owner, cost_nanos FROM inflight WHERE key_id = $1",
                &[&key.id],
            )
            .ok()
            .flatten()
            .map(|r| (r.get(0), r.get(1)))
    });
    // Node 1's ledger cannot write its heartbeat (a lock stands in for a slow link).
    let mut locker = c.pg();
    let mut tx = locker.transaction().expect("begin");
    tx.query("SELECT 1 FROM nodes WHERE owner = $1 FOR UPDATE", &[&owner])
        .expect("lock node 1's heartbeat row");
    wait_for(
        Duration::from_secs(5),
        "orphan charged by another node",
        || {
            let n: i64 = c
                .pg()
                .query_one(
                    "SELECT COUNT(*) FROM inflight WHERE key_id = $1",
                    &[&key.id],
                )
                .unwrap()
                .get(0);
            (n == 0).then_some(())
        },
    );
    tx.commit().expect("release");
    let r = read_response(slow).expect("slow response");
    assert_eq!(r.status, 200, "{}", r.text());
    let real = 100 * IN + 50 * OUT;
    let redis = wait_for(Duration::from_secs(5), "settled in Redis", || {
        let u = c.usage_on(1, &key);
        (u["requests_in_flight"] == 0).then_some(nanos(&u))
    });
    assert_eq!(
        redis, real,
        "Redis settled the live request at its real cost"
    );
    // Node 1's ledger has committed the finished request, and every node has swept again
    // since: a second charge, by either path, would be in the ledger now.
    for n in &c.nodes {
        n.wait_ledger_quiescent();
        n.wait_sweeps(2);
    }
    let ledger = c.ledger_spend(&key);
    let traces = c.ledger_traces(&key);
    // Charged once, at its upper bound: the sweep booked the estimate while node 1 could
    // not reach PostgreSQL, and the finished request adds nothing to it. Redis, whose hold
    // stayed open, has the real cost: the ledger may show more than Redis, never less
    // (docs/cluster.md, "PostgreSQL unreachable").
    assert_eq!(
        ledger, estimate,
        "charged once, at the estimate; Redis has {redis}; traces {traces:?}"
    );
    assert!(ledger >= redis, "ledger {ledger} < Redis {redis}");
    assert_eq!(
        traces.len(),
        2,
        "the orphan's trace and the request's own: {traces:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Shutdown

/// A node stopped with SIGTERM mid-request drains it and settles it in Redis before it
/// exits: right after the exit, the slot is free and the spend is the real cost (not an
/// estimate left to expire after `reservation_ttl_ms`).
#[test]
fn a_sigterm_drained_node_settles_in_redis_before_it_exits() {
    let Some(mut c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&[
        "--budget",
        "5",
        "--budget-mode",
        "hard",
        "--max-inflight",
        "1",
    ]);
    let slow = send_chat(
        &c.nodes[0],
        &key,
        &chat_body(300),
        &[
            ("x-mock-prompt-tokens", "100"),
            ("x-mock-completion-tokens", "50"),
            ("x-mock-delay-ms", "1500"),
        ],
    );
    at_provider(&c, 1);
    let reader = std::thread::spawn(move || read_response(slow));
    let status = c.nodes[0].terminate();
    assert!(status.success(), "clean exit: {status:?}");
    let r = reader.join().unwrap().expect("drained response");
    assert_eq!(r.status, 200, "{}", r.text());
    let u = c.usage_on(1, &key);
    assert_eq!(u["requests_in_flight"], 0, "slot left taken: {u}");
    assert_eq!(u["reserved_usd"], 0.0, "hold left open: {u}");
    assert_eq!(nanos(&u), 100 * IN + 50 * OUT, "{u}");
    let r = c.nodes[2].chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
    // The ledger holds the drained request at its real cost and this one at the mock's
    // default usage (10 + 5), once node 2 has committed it (not whenever it happens to).
    c.nodes[2].wait_ledger_quiescent();
    assert_eq!(
        c.ledger_spend(&key),
        100 * IN + 50 * OUT + 10 * IN + 5 * OUT
    );
}

// ---------------------------------------------------------------------------------------
// Usage calls, other doors

/// `/v1/usage` calls are limited by the key's rpm across the cluster, counted apart from
/// model requests: once one node refuses a usage call, every node does, while model
/// requests keep their own window.
#[test]
fn usage_calls_share_one_window_across_nodes_apart_from_model_requests() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    // create_key already made about one usage call per node.
    let key = c.create_key(&["--rpm", "5"]);
    for n in 0..2 {
        assert_eq!(c.nodes[n].chat(&key, "gpt-4o-mini").status, 200);
    }
    let bearer = key.bearer();
    let mut ok = 0;
    let mut first_refusal = None;
    for i in 0..9 {
        let r = c.nodes[i % 3].get("/v1/usage", &bearer);
        match r.status {
            200 => {
                ok += 1;
                assert_eq!(r.json()["requests_this_minute"], 2, "{}", r.text());
            }
            429 => {
                assert_eq!(r.code(), "rate_limit_exceeded");
                let retry: u64 = r
                    .header("retry-after")
                    .expect("Retry-After")
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&retry));
                first_refusal.get_or_insert(i);
            }
            s => panic!("unexpected {s}: {}", r.text()),
        }
    }
    let first = first_refusal.expect("usage calls are limited");
    assert!(ok <= 2, "at most rpm - 3 more usage calls, got {ok}");
    for n in 0..3 {
        let r = c.nodes[n].get("/v1/usage", &bearer);
        assert_eq!(
            r.status,
            429,
            "node {n} after refusal {first}: {}",
            r.text()
        );
    }
    // Model requests: 3 more fit (5 - 2), then 429 on any node.
    for n in 0..3 {
        let r = c.nodes[n].chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200, "model request {n}: {}", r.text());
    }
    let r = c.nodes[0].chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 429, "{}", r.text());
}

/// `/v1/messages` with the key in `x-api-key` (Anthropic SDKs, Claude Code) on a cluster:
/// the same shared rpm and spend, and errors in Anthropic's shape.
#[test]
fn x_api_key_on_messages_shares_the_cluster_limits() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&["--rpm", "4"]);
    let body = json!({"model": "gpt-4o-mini", "max_tokens": 50,
        "messages": [{"role": "user", "content": "hi"}]})
    .to_string();
    let call = |n: usize| {
        http(
            c.nodes[n].addr,
            "POST",
            "/v1/messages",
            &[
                ("x-api-key", key.secret.as_str()),
                ("anthropic-version", "2023-06-01"),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        )
        .expect("POST /v1/messages")
    };
    for n in 0..4 {
        let r = call(n % 3);
        assert_eq!(r.status, 200, "call {n}: {}", r.text());
    }
    let r = call(1);
    assert_eq!(r.status, 429, "{}", r.text());
    let v = r.json();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some("rate_limit_exceeded")
    );
    // Usage calls have their own window of 4; create_key used 3 of it.
    let u = c.usage_on(2, &key);
    assert_eq!(u["by_model"]["gpt-4o-mini"]["requests"], 4, "{u}");
    assert_eq!(nanos(&u), 4 * (10 * IN + 5 * OUT), "{u}");
}

/// Right after a response ends on one node, `/v1/usage` on another node already counts it
/// (SPEC: "/v1/usage identical on every node"; a client that alternates nodes behind a
/// balancer must not see its last request missing).
#[test]
fn usage_on_another_node_right_after_a_response_counts_it() {
    let Some(c) = Cluster::start("closed", 30_000) else {
        return;
    };
    let key = c.create_key(&[]);
    let cost = 10 * IN + 5 * OUT;
    let mut misses = Vec::new();
    for i in 0..15 {
        let r = c.nodes[i % 3].chat(&key, "gpt-4o-mini");
        assert_eq!(r.status, 200);
        let u = c.usage_on((i + 1) % 3, &key);
        if nanos(&u) != (i as i64 + 1) * cost {
            misses.push((
                i,
                u["spend_nanodollars"].clone(),
                u["requests_today"].clone(),
            ));
        }
    }
    assert!(
        misses.is_empty(),
        "usage read right after a response on another node missed it: {misses:?}"
    );
}

// ---------------------------------------------------------------------------------------
// Crashes and clocks

/// A node SIGKILLed in the middle of a stream (response head and chunks already sent): its
/// hold is charged once at its estimate in Redis and in the ledger, and the key's slot comes
/// back on the surviving nodes.
#[test]
fn a_node_killed_mid_stream_is_charged_its_estimate_once() {
    let Some(mut c) = Cluster::start("closed", 1_000) else {
        return;
    };
    let key = c.create_key(&[
        "--budget",
        "5",
        "--budget-mode",
        "hard",
        "--max-inflight",
        "1",
    ]);
    let body = json!({"model": "gpt-4o-mini", "stream": true, "max_tokens": 200,
        "messages": [{"role": "user", "content": "a long story"}]});
    let (status, _, mut reader) = c.nodes[0].open_stream(
        &key,
        &body,
        &[("x-mock-chunks", "200"), ("x-mock-chunk-delay-ms", "50")],
    );
    assert_eq!(status, 200);
    read_first_event(&mut reader);
    let estimate: i64 = wait_for(Duration::from_secs(5), "journaled", || {
        c.pg()
            .query_opt(
                "SELECT cost_nanos FROM inflight WHERE key_id = $1",
                &[&key.id],
            )
            .ok()
            .flatten()
            .map(|r| r.get(0))
    });
    c.nodes[0].kill9();
    let mut rest = Vec::new();
    let _ = reader.read_until(0, &mut rest);
    let u = wait_for(Duration::from_secs(10), "hold reaped", || {
        let u = c.usage_on(1, &key);
        (u["requests_in_flight"] == 0).then_some(u)
    });
    assert_eq!(nanos(&u), estimate, "{u}");
    wait_for(Duration::from_secs(10), "journal charged", || {
        (c.ledger_spend(&key) == estimate).then_some(())
    });
    // Once: the surviving nodes have each swept twice more (every sweep charges whatever a
    // stopped node left open), and nothing was added.
    for n in &c.nodes[1..] {
        n.wait_sweeps(2);
    }
    assert_eq!(c.ledger_spend(&key), estimate);
    assert_eq!(nanos(&c.usage_on(2, &key)), estimate);
    let r = c.nodes[2].chat(&key, "gpt-4o-mini");
    assert_eq!(r.status, 200, "{}", r.text());
}

/// A node whose clock runs days ahead (into next month) books spend in the ledger's month
/// by its own clock while Redis counts it in Redis' month. docs/cluster.md: clock skew "does
/// not change limits: every window, day, month and hold expiry is Redis' clock". After Redis
/// loses its data, the month is re-seeded from the ledger and must still hold that spend.
#[test]
fn a_node_with_a_skewed_clock_books_spend_in_the_month_redis_admitted_it() {
    // 35 days: another calendar month whatever today is (the key lives 90 days).
    let offset = (35 * 86_400_000i64).to_string();
    let Some(c) = Cluster::start_with(
        "closed",
        30_000,
        &[(0, "SPIDERGATE_CLOCK_OFFSET_MS", offset.as_str())],
    ) else {
        return;
    };
    // Created on an unskewed node.
    let key = c.nodes[1].create_key(&["--budget", "5", "--budget-mode", "hard", "--ttl", "90d"]);
    c.nodes[0].wait_key_live(&key);
    c.nodes[2].wait_key_live(&key);
    let r = c.nodes[0].chat_with(
        &key,
        "gpt-4o-mini",
        &[
            ("x-mock-prompt-tokens", "1000"),
            ("x-mock-completion-tokens", "1000"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let cost = 1000 * IN + 1000 * OUT;
    let month = c.usage_on(1, &key)["month"]
        .as_str()
        .expect("month")
        .to_string();
    wait_for(Duration::from_secs(5), "ledger commit", || {
        (c.ledger_spend(&key) == cost).then_some(())
    });
    let months: Vec<String> = c
        .pg()
        .query("SELECT month FROM spend WHERE key_id = $1", &[&key.id])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.redis_data_loss();
    let after = nanos(&c.usage_on(1, &key));
    assert_eq!(
        after, cost,
        "Redis counted it in {month}; the ledger booked it in {months:?}; re-seeded {month} lost it"
    );
}
