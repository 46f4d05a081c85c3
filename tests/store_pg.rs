//! The store's contract on a real PostgreSQL, and the same contract on SQLite: one test
//! body per behaviour, run against both backends.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::pg::PgServer;
use spidergate::clock::{days_from_civil, month_index, month_label, MS_PER_DAY};
use spidergate::keys::token;
use spidergate::keys::{BudgetMode, KeyRecord};
use spidergate::money::Nanos;
use spidergate::store::{
    Batch, JournalRow, KeyFilter, KeyPatch, KeyStatus, LedgerEntry, Store, StoreError,
    StoreLocation, TraceRow, ORPHANED,
};

/// A fresh, empty store of each backend: SQLite in a temp dir, PostgreSQL in a new
/// database of `pg` (when PostgreSQL is installed).
fn locations(pg: Option<&PgServer>, name: &str, dir: &tempfile::TempDir) -> Vec<StoreLocation> {
    let mut out = vec![StoreLocation::Sqlite(dir.path().join(format!("{name}.db")))];
    if let Some(pg) = pg {
        out.push(StoreLocation::Postgres(pg.create_db(name)));
    }
    out
}

fn record(id: &str) -> KeyRecord {
    let t = token::mint().unwrap();
    KeyRecord {
        id: id.into(),
        name: "agent".into(),
        prefix: t.prefix,
        token_hash: t.hash,
        scopes: vec!["gate:chat".into(), "x,y".into()],
        rpm: Some(3),
        rpd: None,
        budget: Some(Nanos::new(5_000_000_000)),
        budget_mode: BudgetMode::Hard,
        max_inflight: Some(4),
        previous_hash: None,
        previous_valid_until: None,
        rotated_at: None,
        group: None,
        parent_id: None,
        allowed_models: vec!["a".into(), "b".into()],
        free_only: false,
        client_id: Some("client-1".into()),
        created_at: 1,
        expires_at: 2,
        revoked_at: None,
        last_used_at: None,
        max_usd_per_hour: Some(Nanos::new(2_500_000_000)),
        loop_limit: Some(7),
    }
}

fn day_ms(y: i64, m: u32, d: u32) -> i64 {
    days_from_civil(y, m, d) * MS_PER_DAY
}

fn entry(ts: i64, key: &str, model: &str, cost: i64) -> LedgerEntry {
    LedgerEntry {
        trace: TraceRow {
            ts,
            key_id: Some(key.into()),
            endpoint: "chat".into(),
            requested_model: Some("fast".into()),
            served_model: Some(model.into()),
            provider: Some("p".into()),
            status: 200,
            latency_ms: 12,
            ttfb_ms: Some(3),
            prompt_tokens: 10,
            completion_tokens: 5,
            cost: Nanos::new(cost),
            ..TraceRow::default()
        },
        admitted: true,
        counted: true,
        keep_trace: true,
        journal_id: None,
        span: None,
    }
}

fn keys_contract(loc: &StoreLocation) {
    let mut s = Store::open_at(loc).unwrap();
    // The audit log: appended, read newest first, paged back.
    for (i, action) in ["key.create", "key.update", "key.revoke"]
        .iter()
        .enumerate()
    {
        let e = spidergate::store::AuditEntry {
            ts: 1_000 + i as i64,
            door: "cli".into(),
            actor: "user ops".into(),
            action: action.to_string(),
            target: "key_a".into(),
            before: (i > 0).then(|| "{\"rpm\":1}".to_string()),
            after: Some("{\"rpm\":2}".into()),
            ..Default::default()
        };
        s.record_audit(&e).unwrap();
    }
    let log = s.audit(10, None).unwrap();
    assert_eq!(
        log.iter().map(|e| e.action.as_str()).collect::<Vec<_>>(),
        ["key.revoke", "key.update", "key.create"],
        "{loc:?}"
    );
    assert_eq!(log[2].before, None);
    assert_eq!(log[0].after.as_deref(), Some("{\"rpm\":2}"));
    assert_eq!(s.audit(10, Some(log[1].id)).unwrap().len(), 1);
    assert_eq!(s.key_count().unwrap(), 0);
    assert_eq!(s.last_key_change().unwrap(), 0);
    let v0 = s.keys_version().unwrap();
    s.insert_key(&record("key_a")).unwrap();
    s.insert_keys(&[record("key_b"), record("key_c")]).unwrap();
    assert!(s.keys_version().unwrap() >= v0 + 3, "{loc:?}");
    assert_eq!(s.key_count().unwrap(), 3);
    let a = s.get_key("key_a").unwrap().unwrap();
    let mut expected = record("key_a");
    expected.token_hash = a.token_hash;
    expected.prefix = a.prefix.clone();
    // KeyRecord has no PartialEq: compare every field through Debug.
    assert_eq!(format!("{a:?}"), format!("{expected:?}"));
    assert_eq!(a.scopes, vec!["gate:chat", "x,y"], "lists stay lists");
    assert!(s.get_key("key_nope").unwrap().is_none());

    // Every change is in the log, each key once, newest position last.
    let (newest, mut ids) = s.key_changes_since(0).unwrap().unwrap();
    ids.sort();
    assert_eq!(ids, vec!["key_a", "key_b", "key_c"]);
    assert_eq!(newest, s.last_key_change().unwrap());
    assert_eq!(
        s.key_changes_since(newest).unwrap().unwrap(),
        (newest, vec![])
    );

    let patch = KeyPatch {
        rpm: Some(None),
        rpd: Some(Some(100)),
        free_only: Some(true),
        client_id: Some(None),
        loop_limit: Some(None),
        max_usd_per_hour: Some(Some(Nanos::new(1_000_000_000))),
        ..KeyPatch::default()
    };
    let k = s.update_key("key_a", &patch).unwrap().unwrap();
    assert_eq!(
        (k.max_usd_per_hour, k.loop_limit),
        (Some(Nanos::new(1_000_000_000)), None)
    );
    assert_eq!(
        (k.rpm, k.rpd, k.free_only, k.client_id.clone()),
        (None, Some(100), true, None)
    );
    assert_eq!(
        format!("{:?}", s.get_key("key_a").unwrap().unwrap()),
        format!("{k:?}")
    );
    assert!(s.update_key("key_nope", &patch).unwrap().is_none());
    let (after_patch, ids) = s.key_changes_since(newest).unwrap().unwrap();
    assert_eq!(
        (ids, after_patch > newest),
        (vec!["key_a".to_string()], true)
    );

    let old_hash = k.token_hash;
    let fresh = token::mint().unwrap();
    let k = s
        .rotate_key("key_a", &fresh.hash, &fresh.prefix, 500, 400)
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            k.token_hash,
            k.previous_hash,
            k.previous_valid_until,
            k.rotated_at
        ),
        (fresh.hash, Some(old_hash), Some(500), Some(400))
    );
    assert_eq!(k.prefix, fresh.prefix);
    assert!(s
        .rotate_key("key_nope", &fresh.hash, "x", 1, 1)
        .unwrap()
        .is_none());

    let k = s.revoke_key("key_b", 77).unwrap().unwrap();
    assert_eq!(k.revoked_at, Some(77));
    let k = s.revoke_key("key_b", 99).unwrap().unwrap();
    assert_eq!(k.revoked_at, Some(77), "the first revocation time is kept");
    assert!(s.revoke_key("key_nope", 1).unwrap().is_none());

    let all = s.all_keys().unwrap();
    assert_eq!(
        all.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(),
        vec!["key_a", "key_b", "key_c"]
    );
    let mut rows = Vec::new();
    s.for_each_key_row(|r| {
        rows.push((
            r.id.to_string(),
            r.revoked,
            r.previous.map(|p| p.1),
            r.limits.rpd,
            r.limits.hard_budget,
            r.scopes.to_string(),
        ));
        // The callback may use the store (gate.rs restores counters from here).
        assert_eq!(s.requests_on(r.id, "2026-01-01").unwrap(), 0);
    })
    .unwrap();
    rows.sort();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0].0, "key_a");
    assert_eq!(
        (rows[0].2, rows[0].3, rows[0].4),
        (Some(500), Some(100), true)
    );
    assert!(
        rows[1].1 && !rows[0].1 && !rows[2].1,
        "only key_b is revoked"
    );
    assert_eq!(rows[0].5, r#"["gate:chat","x,y"]"#);

    // A pruned log no longer reaches back: the poller must reload in full.
    let last = s.last_key_change().unwrap();
    assert!(s.prune_key_changes(1).unwrap() > 0);
    assert_eq!(s.key_changes_since(0).unwrap(), None);
    assert_eq!(s.key_changes_since(last).unwrap(), Some((last, vec![])));
    assert_eq!(s.integrity_check().unwrap(), "ok");
}

/// `GET /admin/keys?limit&offset&q`: pages of the matching keys, active first and newest
/// first within a status, with the count of every match; `q` is a case-insensitive
/// substring of the id, name, prefix or group, and its wildcards are literal.
fn key_page_contract(loc: &StoreLocation) {
    let mut s = Store::open_at(loc).unwrap();
    let now = 1_000_000;
    let keys: Vec<KeyRecord> = (0..120)
        .map(|i| {
            let mut k = record(&format!("key_{i:03}"));
            k.name = format!("Agent-{i:03}");
            k.created_at = i;
            k.expires_at = if i % 10 == 9 { now - 1 } else { now + 1 };
            k.revoked_at = (i % 20 == 0).then_some(5);
            k.group = (i < 7).then(|| "Fleet_A".to_string());
            k.parent_id = (i == 3 || i == 4).then(|| "key_002".to_string());
            k
        })
        .collect();
    s.insert_keys(&keys).unwrap();
    let page = |f: KeyFilter| s.key_page(&f, now).unwrap();
    let ids =
        |p: &spidergate::store::KeyPage| p.keys.iter().map(|k| k.id.clone()).collect::<Vec<_>>();

    let all = page(KeyFilter::default());
    assert_eq!(
        (all.total, all.keys.len()),
        (120, 120),
        "{loc:?}: no limit is every key"
    );
    let first = page(KeyFilter {
        limit: Some(50),
        ..Default::default()
    });
    assert_eq!((first.total, first.keys.len()), (120, 50), "{loc:?}");
    assert_eq!(
        ids(&first)[..2],
        ["key_118", "key_117"],
        "{loc:?}: active, newest first"
    );
    let last = page(KeyFilter {
        limit: Some(50),
        offset: 100,
        ..Default::default()
    });
    assert_eq!(last.keys.len(), 20, "{loc:?}");
    // Revoked keys come last: 0, 20, 40, ... 100, newest first.
    assert_eq!(
        ids(&last)[14..],
        ["key_100", "key_080", "key_060", "key_040", "key_020", "key_000"]
    );
    let mut seen: Vec<String> = (0..3)
        .flat_map(|p| {
            ids(&page(KeyFilter {
                limit: Some(50),
                offset: p * 50,
                ..Default::default()
            }))
        })
        .collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 120, "{loc:?}: the pages cover every key once");

    let q = |text: &str| {
        page(KeyFilter {
            q: Some(text.into()),
            limit: Some(10),
            ..Default::default()
        })
    };
    assert_eq!(ids(&q("agent-042")), ["key_042"], "{loc:?}: name, any case");
    assert_eq!(ids(&q("KEY_117")), ["key_117"], "{loc:?}: id");
    assert_eq!(q("fleet_a").total, 7, "{loc:?}: group");
    let prefix = keys[55].prefix.to_uppercase();
    assert!(
        ids(&q(&prefix)).contains(&"key_055".to_string()),
        "{loc:?}: prefix"
    );
    assert_eq!(q("%").total, 0, "{loc:?}: % is literal");
    assert_eq!(
        q("t_0").total,
        0,
        "{loc:?}: _ is literal (Agent-0.. has no t_0)"
    );
    assert_eq!(q("y_00").total, 10, "{loc:?}: key_000..key_009");

    let st = |status| {
        page(KeyFilter {
            status: Some(status),
            ..Default::default()
        })
        .total
    };
    assert_eq!(st(KeyStatus::Revoked), 6, "{loc:?}");
    // i % 10 == 9 expired: 12, none of them revoked.
    assert_eq!(st(KeyStatus::Expired), 12, "{loc:?}");
    assert_eq!(st(KeyStatus::Active), 102, "{loc:?}");
    let kids = page(KeyFilter {
        parent: Some("key_002".into()),
        ..Default::default()
    });
    assert_eq!(ids(&kids), ["key_004", "key_003"], "{loc:?}");
    let group = page(KeyFilter {
        group: Some("Fleet_A".into()),
        limit: Some(3),
        ..Default::default()
    });
    assert_eq!((group.total, group.keys.len()), (7, 3), "{loc:?}");
}

fn ledger_contract(loc: &StoreLocation) {
    let mut s = Store::open_at(loc).unwrap();
    let day = day_ms(2026, 11, 26);
    let batch = Batch::of([
        entry(day + 5, "key_a", "m1", 100),
        entry(day + 6, "key_a", "m1", 250),
        entry(day + 7, "key_a", "m2", 1),
        entry(day + MS_PER_DAY + 1, "key_b", "m1", 9),
        LedgerEntry {
            admitted: false,
            counted: false,
            ..entry(day + 8, "key_a", "m1", 0)
        },
    ]);
    s.write_batch(&batch).unwrap();
    let by_key = s.spend_by_key("2026-11").unwrap();
    let mut a = by_key["key_a"].clone();
    a.sort_by(|x, y| x.model.cmp(&y.model));
    assert_eq!(
        a.iter()
            .map(|t| (t.model.to_string(), t.requests, t.prompt_tokens, t.spent))
            .collect::<Vec<_>>(),
        vec![
            ("m1".to_string(), 2, 20, Nanos::new(350)),
            ("m2".to_string(), 1, 10, Nanos::new(1))
        ]
    );
    assert_eq!(s.requests_by_key("2026-11-26").unwrap()["key_a"], 3);
    assert_eq!(s.requests_on("key_a", "2026-11-26").unwrap(), 3);
    assert_eq!(s.requests_on("key_b", "2026-11-27").unwrap(), 1);
    assert_eq!(s.requests_on("key_b", "2026-11-26").unwrap(), 0);
    let rows = s.spend_for_key("key_a", "2026-11").unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| (r.model.as_str(), r.requests, r.completion_tokens, r.cost))
            .collect::<Vec<_>>(),
        vec![("m1", 2, 10, Nanos::new(350)), ("m2", 1, 5, Nanos::new(1))]
    );
    // A second batch adds to the same rows; its request carried a W3C trace id.
    let trace_id = opentelemetry::trace::TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").ok();
    let mut traced = entry(day + 9, "key_a", "m1", 50);
    traced.trace.trace_id = trace_id;
    s.write_batch(&Batch::of([traced])).unwrap();
    assert_eq!(
        s.spend_for_key("key_a", "2026-11").unwrap()[0].cost,
        Nanos::new(400)
    );
    assert_eq!(
        s.daily_spend("2026-11", None).unwrap(),
        vec![
            ("2026-11-26".into(), "m1".into(), Nanos::new(400)),
            ("2026-11-26".into(), "m2".into(), Nanos::new(1)),
            ("2026-11-27".into(), "m1".into(), Nanos::new(9)),
        ]
    );
    assert_eq!(s.daily_spend("2026-11", Some("key_b")).unwrap().len(), 1);
    assert!(s.daily_spend("2026-10", None).unwrap().is_empty());
    let last_used = s.get_key("key_a").unwrap();
    assert!(last_used.is_none(), "spend needs no key row");

    let traces = s.traces(Some("key_a"), 10, None).unwrap();
    assert_eq!(traces.len(), 5);
    assert!(traces.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(traces[0].ts, day + 9);
    assert_eq!(
        traces[0].trace_id, trace_id,
        "{loc:?}: the trace id is kept"
    );
    assert_eq!(traces[1].trace_id, None);
    let t = &traces[0];
    assert_eq!(
        (
            t.status,
            t.latency_ms,
            t.ttfb_ms,
            t.provider.as_deref(),
            t.usage_estimated
        ),
        (200, 12, Some(3), Some("p"), false)
    );
    let page = s.traces(Some("key_a"), 2, Some(traces[1].id)).unwrap();
    assert_eq!(page, traces[2..4].to_vec());
    let all = s.traces(None, 100, None).unwrap();
    assert_eq!(all.len(), 6);
    assert!(
        all.windows(2).all(|w| w[0].ts >= w[1].ts),
        "all keys by time"
    );
    assert_eq!(s.traces(None, 1, None).unwrap().len(), 1);

    // Retention: nothing at or after the cut is deleted.
    assert_eq!(s.prune_traces(day + 7).unwrap(), 2);
    let left = s.traces(None, 100, None).unwrap();
    assert_eq!(left.len(), 4);
    assert!(left.iter().all(|t| t.ts >= day + 7));
    assert_eq!(s.prune_traces(i64::MAX).unwrap(), 4);
}

/// A large batch and many keys: one commit, every row kept in order per key.
fn big_batch_contract(loc: &StoreLocation) {
    let mut s = Store::open_at(loc).unwrap();
    let batch = Batch::of((0..700).map(|i| entry(1_000 + i, &format!("key_{}", i % 7), "m", 10)));
    s.write_batch(&batch).unwrap();
    let month = month_label(month_index(1_000));
    let spend = s.spend_by_key(&month).unwrap();
    assert_eq!(spend.len(), 7);
    assert!(spend.values().all(|v| v[0].spent == Nanos::new(1_000)));
    let k3 = s.traces(Some("key_3"), 1_000, None).unwrap();
    assert_eq!(k3.len(), 100);
    assert!(k3.windows(2).all(|w| w[0].ts > w[1].ts));
}

fn orphans_contract(loc: &StoreLocation) {
    let ts = day_ms(2026, 11, 26);
    let row = |id| JournalRow {
        id,
        ts,
        key_id: Arc::from("key_o"),
        endpoint: "chat.completions",
        requested_model: Arc::from("fast"),
        served_model: Arc::from("m"),
        prompt_tokens: 100,
        completion_tokens: 50,
        cost: Nanos::new(7_000),
    };
    let mut node1 = Store::open_at(loc).unwrap();
    node1.set_owner(1001);
    assert_eq!(node1.owner(), 1001);
    let mut node2 = Store::open_at(loc).unwrap();
    node2.set_owner(2002);
    let mut b1 = Batch::default();
    b1.open(row(1));
    b1.open(row(2));
    b1.open(row(3));
    node1.write_batch(&b1).unwrap();
    if matches!(loc, StoreLocation::Postgres(_)) {
        // Journal ids are per node: the same ids from another node are other rows.
        let mut b2 = Batch::default();
        b2.open(row(1));
        b2.open(row(9));
        node2.write_batch(&b2).unwrap();
        // Closing a journal id deletes only this node's row.
        node2
            .write_batch(&Batch::of([LedgerEntry {
                journal_id: Some(9),
                ..LedgerEntry::default()
            }]))
            .unwrap();
    } else {
        let mut b2 = Batch::default();
        b2.open(row(11));
        node2.write_batch(&b2).unwrap();
    }
    // Node 1 booked request 3; 1 and 2 were cut when it died.
    node1
        .write_batch(&Batch::of([LedgerEntry {
            journal_id: Some(3),
            ..LedgerEntry::default()
        }]))
        .unwrap();

    node1.heartbeat(1001, 1_000).unwrap();
    node2.heartbeat(2002, 5_000).unwrap();
    node2.heartbeat(2002, 4_000).unwrap();
    assert_eq!(node1.live_owners(0).unwrap(), vec![1001, 2002]);
    assert_eq!(
        node1.live_owners(4_500).unwrap(),
        vec![2002],
        "never moves back"
    );
    assert!(node1.live_owners(6_000).unwrap().is_empty());

    let live = node2.live_owners(4_500).unwrap();
    assert_eq!(node2.charge_orphans(|o| live.contains(&o)).unwrap(), 2);
    assert_eq!(
        node2.charge_orphans(|o| live.contains(&o)).unwrap(),
        0,
        "once"
    );
    let spend = &node2.spend_by_key("2026-11").unwrap()["key_o"];
    assert_eq!((spend[0].spent, spend[0].requests), (Nanos::new(14_000), 2));
    assert_eq!(node2.requests_on("key_o", "2026-11-26").unwrap(), 2);
    let traces = node2.traces(Some("key_o"), 10, None).unwrap();
    assert_eq!(traces.len(), 2);
    assert!(traces
        .iter()
        .all(|t| t.usage_estimated && t.error_code.as_deref() == Some(ORPHANED)));
    assert_eq!(
        node2.daily_spend("2026-11", Some("key_o")).unwrap()[0].2,
        Nanos::new(14_000)
    );
    // Node 2's own row survives until node 2 is gone too.
    assert_eq!(node1.charge_orphans(|_| false).unwrap(), 1);
}

/// A live node whose heartbeat stalled has its open admission charged at the estimate by
/// another node; when the request then finishes, its real cost is not booked on top (the
/// trace is still kept). A request whose journal row is still there books its real cost
/// and removes the row.
fn late_settlement_contract(loc: &StoreLocation) {
    let ts = day_ms(2026, 11, 26);
    let row = |id| JournalRow {
        id,
        ts,
        key_id: Arc::from("key_l"),
        endpoint: "chat.completions",
        requested_model: Arc::from("fast"),
        served_model: Arc::from("m"),
        prompt_tokens: 100,
        completion_tokens: 50,
        cost: Nanos::new(193_050),
    };
    let finished = |id, cost| LedgerEntry {
        journal_id: Some(id),
        ..entry(ts + 4_000, "key_l", "m", cost)
    };
    let spend = |s: &Store| {
        let rows = s.spend_for_key("key_l", "2026-11").unwrap();
        rows.iter()
            .map(|r| (r.requests, r.cost.get()))
            .collect::<Vec<_>>()
    };
    let mut node1 = Store::open_at(loc).unwrap();
    node1.set_owner(1001);
    let mut node2 = Store::open_at(loc).unwrap();
    node2.set_owner(2002);

    // Request 1 is journaled, then charged by node 2 while node 1 looks stopped.
    let mut b = Batch::default();
    b.open(row(1));
    b.open(row(2));
    node1.write_batch(&b).unwrap();
    assert_eq!(
        node2.charge_orphans(|_| true).unwrap(),
        0,
        "live owners keep their rows"
    );
    assert_eq!(node2.charge_orphans(|o| o != 1001).unwrap(), 2);
    assert_eq!(spend(&node1), vec![(2, 386_100)]);
    assert_eq!(node1.requests_on("key_l", "2026-11-26").unwrap(), 2);

    // Both finish on node 1 (one batch, with an unjournaled request of the same key and
    // model): only the unjournaled one adds to the sums; every trace is kept.
    let batch = Batch::of([
        finished(1, 45_000),
        finished(2, 46_000),
        entry(ts + 5, "key_l", "m", 1_000),
    ]);
    node1.write_batch(&batch).unwrap();
    assert_eq!(spend(&node1), vec![(3, 387_100)], "{loc:?}");
    assert_eq!(node1.requests_on("key_l", "2026-11-26").unwrap(), 3);
    assert_eq!(
        node1.daily_spend("2026-11", Some("key_l")).unwrap()[0].2,
        Nanos::new(387_100)
    );
    let traces = node1.traces(Some("key_l"), 10, None).unwrap();
    assert_eq!(traces.len(), 5, "2 orphan traces, 3 finished: {traces:?}");
    assert_eq!(
        traces
            .iter()
            .filter(|t| t.error_code.as_deref() == Some(ORPHANED))
            .count(),
        2
    );
    assert!(traces.iter().any(|t| t.cost == Nanos::new(45_000)));

    // Normal path: the row is still there, so the real cost is booked and the row removed.
    let mut b = Batch::default();
    b.open(row(3));
    node1.write_batch(&b).unwrap();
    node1
        .write_batch(&Batch::of([finished(3, 45_000)]))
        .unwrap();
    assert_eq!(spend(&node1), vec![(4, 432_100)]);
    assert_eq!(node1.requests_on("key_l", "2026-11-26").unwrap(), 4);
    assert_eq!(node2.charge_orphans(|_| false).unwrap(), 0, "row removed");
    assert_eq!(spend(&node1), vec![(4, 432_100)]);

    // An admission opened and finished within one (retried) batch was never written:
    // it books as usual.
    let mut b = Batch::default();
    b.open(row(4));
    b.add(&mut finished(4, 10_000), usize::MAX);
    node1.write_batch(&b).unwrap();
    assert_eq!(spend(&node1), vec![(5, 442_100)]);
    assert_eq!(node2.charge_orphans(|_| false).unwrap(), 0);
}

/// Model requests admitted since a time, from the traces (the CLI's rolling minute): a
/// refusal (no served model) is not one.
fn admitted_since_contract(loc: &StoreLocation) {
    let mut s = Store::open_at(loc).unwrap();
    let day = day_ms(2026, 11, 26);
    let mut refused = entry(day + 25, "key_c", "m1", 0);
    refused.trace.served_model = None;
    refused.admitted = false;
    let admitted = [
        entry(day + 20, "key_c", "m1", 1),
        entry(day + 30, "key_c", "m1", 1),
    ];
    s.write_batch(&Batch::of([
        admitted[0].clone(),
        refused,
        admitted[1].clone(),
    ]))
    .unwrap();
    assert_eq!(s.admitted_since("key_c", day + 21).unwrap(), 1);
    assert_eq!(s.admitted_since("key_c", day).unwrap(), 2);
    assert_eq!(s.admitted_since("key_c", day + 31).unwrap(), 0);
    assert_eq!(s.admitted_since("key_nope", day).unwrap(), 0);
}

/// About 10 s: seven contracts, each on SQLite and on its own PostgreSQL database, in one test
/// so that one PostgreSQL server (initdb and start, the slow part) serves them all.
#[test]
fn the_store_contract_holds_on_sqlite_and_postgres() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for (name, body) in [
        ("keys", keys_contract as fn(&StoreLocation)),
        ("key_page", key_page_contract),
        ("ledger", ledger_contract),
        ("big_batch", big_batch_contract),
        ("orphans", orphans_contract),
        ("late_settlement", late_settlement_contract),
        ("admitted_since", admitted_since_contract),
    ] {
        for loc in locations(pg.as_ref(), name, &dir) {
            eprintln!("{name} on {loc:?}");
            body(&loc);
        }
    }
}

#[test]
fn migrations_are_idempotent_and_safe_when_three_nodes_start_at_once() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_db("boot");
    let barrier = Arc::new(Barrier::new(3));
    let nodes: Vec<_> = (0..3)
        .map(|_| {
            let (url, barrier) = (url.clone(), barrier.clone());
            std::thread::spawn(move || {
                // A raw migration race: each thread opens its own client, like 3 processes.
                barrier.wait();
                Store::open_at(&StoreLocation::Postgres(url)).map(|_| ())
            })
        })
        .collect();
    for n in nodes {
        n.join().unwrap().unwrap();
    }
    for _ in 0..2 {
        let mut s = Store::open_at(&StoreLocation::Postgres(url.clone())).unwrap();
        s.insert_key(&record(&format!("key_{}", s.key_count().unwrap())))
            .unwrap();
    }
    let mut raw = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let applied: Vec<(i64, String)> = raw
        .query(
            "SELECT version, name FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        applied,
        vec![
            (1, "0001_init".to_string()),
            (2, "0002_trace_id".to_string()),
            (3, "0003_audit".to_string()),
            (4, "0004_fleet_groups".to_string()),
            (5, "0005_brakes".to_string()),
            (6, "0006_alerts".to_string()),
            (7, "0007_trace_unit".to_string())
        ]
    );
    let keys: i64 = raw
        .query_one("SELECT COUNT(*) FROM keys", &[])
        .unwrap()
        .get(0);
    assert_eq!(keys, 2);
}

/// Writers on several connections change keys while a poller follows the log the way the
/// gateway does: every change must be seen, none skipped by a seq that committed late.
fn no_change_is_ever_skipped(loc: &StoreLocation) {
    const WRITERS: usize = 4;
    const KEYS_EACH: usize = 40;
    let done = Arc::new(AtomicBool::new(false));
    let poller = {
        let (loc, done) = (loc.clone(), done.clone());
        std::thread::spawn(move || {
            let s = Store::open_at(&loc).unwrap();
            let mut seen = HashSet::new();
            // A fresh store: everything from the first change on must be seen.
            let mut at = 0;
            loop {
                let finished = done.load(Ordering::SeqCst);
                let (newest, ids) = s.key_changes_since(at).unwrap().expect("never pruned");
                seen.extend(ids);
                at = newest;
                if finished {
                    return seen;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let loc = loc.clone();
            std::thread::spawn(move || {
                let mut s = Store::open_at(&loc).unwrap();
                for i in 0..KEYS_EACH {
                    let id = format!("key_{w}_{i}");
                    s.insert_key(&record(&id)).unwrap();
                    if i % 3 == 0 {
                        s.revoke_key(&id, 5).unwrap();
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    let seen = poller.join().unwrap();
    assert_eq!(seen.len(), WRITERS * KEYS_EACH, "{loc:?}");
}

#[test]
fn concurrent_key_writers_never_make_a_poller_skip_a_change() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for loc in locations(pg.as_ref(), "race", &dir) {
        no_change_is_ever_skipped(&loc);
    }
}

#[test]
fn concurrent_patches_of_different_fields_are_both_kept() {
    let Some(pg) = PgServer::start() else { return };
    let loc = StoreLocation::Postgres(pg.create_db("patches"));
    Store::open_at(&loc)
        .unwrap()
        .insert_key(&record("key_p"))
        .unwrap();
    let workers: Vec<_> = (0..2)
        .map(|w| {
            let loc = loc.clone();
            std::thread::spawn(move || {
                let mut s = Store::open_at(&loc).unwrap();
                for i in 1..=25u32 {
                    let patch = if w == 0 {
                        KeyPatch {
                            rpm: Some(Some(i)),
                            ..KeyPatch::default()
                        }
                    } else {
                        KeyPatch {
                            rpd: Some(Some(1000 + i)),
                            ..KeyPatch::default()
                        }
                    };
                    s.update_key("key_p", &patch).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let k = Store::open_at(&loc)
        .unwrap()
        .get_key("key_p")
        .unwrap()
        .unwrap();
    assert_eq!((k.rpm, k.rpd), (Some(25), Some(1025)));
}

#[test]
fn opening_fails_fast_and_clearly_when_postgres_is_down() {
    let port = common::free_port();
    // Nothing listens on the port: the connect is refused at once, and the error says so
    // (a hang would be caught by nextest's terminate-after, .config/nextest.toml).
    let err = Store::open_at(&StoreLocation::Postgres(format!(
        "postgres://spidergate:hunter2@127.0.0.1:{port}/gw"
    )))
    .err()
    .expect("no server there");
    assert!(matches!(err, StoreError::Connect(_)), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains(&format!("127.0.0.1:{port}/gw")), "{msg}");
    assert!(!msg.contains("hunter2"), "{msg}");
}

#[test]
fn a_store_reconnects_after_its_connection_is_killed() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_db("reconnect");
    let s = Store::open_at(&StoreLocation::Postgres(url.clone())).unwrap();
    assert_eq!(s.key_count().unwrap(), 0);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = 'reconnect' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap();
    // The call that meets the dead connection may fail; the store then reconnects.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.key_count().is_err() {
        assert!(Instant::now() < deadline, "never reconnected");
    }
    // Pooled connections that died meanwhile are replaced at open.
    drop(s);
    let s = Store::open_at(&StoreLocation::Postgres(url)).unwrap();
    assert_eq!(s.key_count().unwrap(), 0);
}
