//! SPEC §7 "Alerts": budget thresholds and brake refusals recorded in an outbox in the
//! ledger's own transaction, delivered to a real local webhook receiver that checks the
//! HMAC signature itself, retried with the same id, listed by `GET /admin/alerts`, and
//! never in a request's way.

mod common;

use std::borrow::Cow;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pg::PgServer;
use common::{mock, wait_for, Gateway, GatewayBuilder, Key};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use spidergate::alerts::AlertRules;
use spidergate::clock::{days_from_civil, MS_PER_DAY};
use spidergate::keys::token;
use spidergate::keys::{BudgetMode, KeyRecord};
use spidergate::money::Nanos;
use spidergate::store::{Batch, GroupRecord, LedgerEntry, Store, StoreLocation, TraceRow};

const SECRET: &str = "whsec-test-7f3a";
const ADMIN: &str = "admin-token-alerts";
const WAIT: Duration = Duration::from_secs(20);

/// One POST the receiver got.
#[derive(Debug, Clone)]
struct Received {
    body: Vec<u8>,
    json: Value,
    /// The signature header matched our own HMAC-SHA256 of the body with `SECRET`.
    signature_ok: bool,
    content_type: Option<String>,
    /// What the receiver answered (0: it never answered).
    answered: u16,
}

#[derive(Default)]
struct ReceiverState {
    /// Answer 500 while set.
    failing: bool,
    /// Read the request and never answer while set.
    hanging: bool,
    got: Vec<Received>,
    held: Vec<TcpStream>,
}

/// A webhook receiver on 127.0.0.1:0.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    state: Arc<Mutex<ReceiverState>>,
}

fn hmac_hex(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Receiver {
    fn start() -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let r = Receiver {
            addr: listener.local_addr().unwrap(),
            state: Arc::default(),
        };
        let state = r.state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let state = state.clone();
                std::thread::spawn(move || serve(conn, &state));
            }
        });
        r
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/spidergate", self.addr)
    }

    fn set(&self, f: impl FnOnce(&mut ReceiverState)) {
        f(&mut self.state.lock().unwrap());
    }

    fn got(&self) -> Vec<Received> {
        self.state.lock().unwrap().got.clone()
    }

    /// The payloads answered 2xx, in order.
    fn accepted(&self) -> Vec<Value> {
        self.got()
            .into_iter()
            .filter(|r| (200..300).contains(&r.answered))
            .map(|r| r.json)
            .collect()
    }
}

fn serve(conn: TcpStream, state: &Mutex<ReceiverState>) {
    let mut r = BufReader::new(conn.try_clone().unwrap());
    let mut headers = Vec::new();
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert!(
        line.starts_with("POST /hooks/spidergate HTTP/1.1"),
        "{line}"
    );
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    let len: usize = get("content-length").unwrap().parse().unwrap();
    let mut body = vec![0; len];
    r.read_exact(&mut body).unwrap();
    let expected = format!("sha256={}", hmac_hex(SECRET, &body));
    let mut s = state.lock().unwrap();
    let answered = if s.hanging {
        0
    } else if s.failing {
        500
    } else {
        200
    };
    s.got.push(Received {
        json: serde_json::from_slice(&body).unwrap(),
        signature_ok: get("x-spidergate-signature").as_deref() == Some(expected.as_str()),
        content_type: get("content-type"),
        body,
        answered,
    });
    let mut conn = conn;
    match answered {
        0 => s.held.push(conn),
        200 => conn
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .unwrap(),
        _ => conn
            .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n")
            .unwrap(),
    }
}

/// One cent per ten tokens: prompt and completion at 1000 USD per million tokens
/// (0.001 USD, 1,000,000 nano-dollars a token), so each request's cost is exact.
const MODELS: &str = r#"
models:
  - id: m1
    provider: mock
    input_usd_per_mtok: 1000
    output_usd_per_mtok: 1000
    max_output_tokens: 100
"#;

fn gateway(receiver: &Receiver, thresholds: &str, extra: &[&str]) -> Gateway {
    let m = mock();
    let gw = builder(&m, receiver, thresholds, extra).start();
    // The mock lives as long as the test process needs it.
    std::mem::forget(m);
    gw
}

/// A gateway with the test model, the admin API and `alerts` to `receiver`.
fn builder(
    m: &common::MockProvider,
    receiver: &Receiver,
    thresholds: &str,
    extra: &[&str],
) -> GatewayBuilder {
    let mut alerts = format!(
        "alerts:\n  webhooks:\n    - url: \"{}\"\n      secret_env: SG_TEST_WEBHOOK_SECRET\n  budget_thresholds: {thresholds}\n  retry_base_ms: 100\n  poll_ms: 50",
        receiver.url()
    );
    for e in extra {
        alerts.push_str(&format!("\n  {e}"));
    }
    GatewayBuilder::new(m)
        .models(MODELS)
        .admin(ADMIN)
        .env("SG_TEST_WEBHOOK_SECRET", SECRET)
        .top(&alerts)
}

/// A chat request reporting exactly `prompt` + `completion` tokens (0.001 USD each).
fn spend(gw: &Gateway, key: &Key, prompt: u32, completion: u32) {
    let (p, c) = (prompt.to_string(), completion.to_string());
    let r = gw.chat_with(
        key,
        "m1",
        &[
            ("x-mock-prompt-tokens", &p),
            ("x-mock-completion-tokens", &c),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
}

fn alerts_list(gw: &Gateway) -> Vec<Value> {
    let r = gw.admin_call("GET", "/admin/alerts?limit=100", None);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["data"].as_array().unwrap().clone()
}

/// Waits until every listed delivery is delivered and there are `n` of them.
fn wait_delivered(gw: &Gateway, n: usize) -> Vec<Value> {
    wait_for(WAIT, "deliveries delivered", || {
        let list = alerts_list(gw);
        (list.len() == n && list.iter().all(|d| d["state"] == "delivered")).then_some(list)
    })
}

fn threshold_of(v: &Value) -> f64 {
    v["threshold"].as_f64().unwrap()
}

#[test]
fn each_threshold_is_delivered_once_signed_with_exact_figures_and_survives_a_restart() {
    let receiver = Receiver::start();
    let mut gw = gateway(&receiver, "[0.5, 0.8, 1.0]", &[]);
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);

    // $0.60 of a $1 budget: 50 % crossed, 80 % not.
    spend(&gw, &key, 550, 50);
    wait_for(WAIT, "the 50% alert", || {
        (receiver.accepted().len() == 1).then_some(())
    });
    // $0.85: 80 % crossed.
    spend(&gw, &key, 200, 50);
    wait_for(WAIT, "the 80% alert", || {
        (receiver.accepted().len() == 2).then_some(())
    });
    gw.wait_ledger_quiescent();
    assert_eq!(gw.spend_rows(&key.id)[0].2, 850_000_000, "exact spend");
    let listed = wait_delivered(&gw, 2);

    let got = receiver.got();
    assert_eq!(got.len(), 2, "one POST per threshold: {got:?}");
    for r in &got {
        assert!(r.signature_ok, "signature verifies: {r:?}");
        assert_eq!(r.content_type.as_deref(), Some("application/json"));
    }
    let month = &gw.usage(&key)["month"];
    let (first, second) = (&got[0].json, &got[1].json);
    assert_eq!(first["event"], "budget.threshold");
    assert_eq!(first["key_id"], key.id.as_str());
    assert_eq!(first["name"], "test-agent");
    assert_eq!(first["threshold"], 0.5);
    assert_eq!(first["spend_usd"], 0.6);
    assert_eq!(first["budget_usd"], 1.0);
    assert_eq!(&first["month"], month);
    assert_eq!(second["threshold"], 0.8);
    assert_eq!(second["spend_usd"], 0.85);
    assert_eq!(second["budget_usd"], 1.0);
    let id = first["id"].as_str().unwrap();
    assert!(id.starts_with("alrt_"), "{id}");
    assert_ne!(first["id"], second["id"]);
    // The list: newest first, the payload's id, state and attempts.
    assert_eq!(listed[0]["id"], second["id"]);
    assert_eq!(listed[1]["id"], first["id"]);
    for d in &listed {
        assert_eq!(d["event"], "budget.threshold");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["key_id"], key.id.as_str());
        assert_eq!(d["webhook"], receiver.url().as_str());
        assert_eq!(&d["month"], month);
    }
    assert_eq!(threshold_of(&listed[0]), 0.8);
    assert_eq!(gw.metric("spidergate_alerts_sent_total"), Some(2));
    assert_eq!(gw.metric("spidergate_alerts_failed_total"), Some(0));

    // A restart, and more spend above both thresholds: neither fires again.
    gw.restart();
    spend(&gw, &key, 40, 10);
    gw.wait_ledger_quiescent();
    assert_eq!(gw.spend_rows(&key.id)[0].2, 900_000_000);
    assert_eq!(alerts_list(&gw).len(), 2, "nothing new after the restart");
    // Crossing 100 % after the restart fires that one threshold, once.
    spend(&gw, &key, 100, 0);
    let listed = wait_delivered(&gw, 3);
    assert_eq!(threshold_of(&listed[0]), 1.0);
    let accepted = receiver.accepted();
    assert_eq!(accepted.len(), 3, "{accepted:?}");
    assert_eq!(accepted[2]["threshold"], 1.0);
    assert_eq!(accepted[2]["spend_usd"], 1.0);
    assert_eq!(receiver.got().len(), 3, "the first two were not sent again");
}

#[test]
fn a_failing_webhook_is_retried_with_the_same_id_until_it_succeeds() {
    let receiver = Receiver::start();
    receiver.set(|s| s.failing = true);
    let gw = gateway(&receiver, "[0.5]", &[]);
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);
    spend(&gw, &key, 500, 100);

    // Failing: the delivery stays pending, its attempts and last error listed.
    let pending = wait_for(WAIT, "two failed attempts", || {
        let list = alerts_list(&gw);
        let d = list.first()?.clone();
        (d["attempts"].as_u64()? >= 2).then_some(d)
    });
    assert_eq!(pending["state"], "pending");
    assert_eq!(pending["last_error"], "HTTP 500");
    assert!(pending["next_attempt_at"].is_string());

    receiver.set(|s| s.failing = false);
    let listed = wait_delivered(&gw, 1);
    let got = receiver.got();
    let tries = got.len();
    assert!(tries >= 3, "{got:?}");
    assert_eq!(listed[0]["attempts"].as_u64(), Some(tries as u64));
    assert!(listed[0]["delivered_at"].is_string());
    // Every attempt carried the same bytes: the same id, signed the same way.
    for r in &got {
        assert_eq!(r.body, got[0].body);
        assert!(r.signature_ok);
    }
    assert_eq!(got[0].json["id"], listed[0]["id"]);
    assert_eq!(
        got.iter().filter(|r| r.answered == 200).count(),
        1,
        "{got:?}"
    );
    assert_eq!(gw.metric("spidergate_alerts_sent_total"), Some(1));
    assert_eq!(
        gw.metric("spidergate_alerts_failed_total"),
        Some(tries as u64 - 1)
    );
    wait_for(WAIT, "pending gauge back to 0", || {
        (gw.metric("spidergate_alerts_pending")? == 0).then_some(())
    });
}

#[test]
fn a_hanging_webhook_never_delays_requests() {
    let receiver = Receiver::start();
    receiver.set(|s| s.hanging = true);
    let gw = gateway(
        &receiver,
        "[0.1, 0.2, 0.3, 0.4, 0.5]",
        &["timeout_ms: 60000"],
    );
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);
    spend(&gw, &key, 100, 50);
    // The worker is now stuck in a POST that will not be answered for a minute.
    wait_for(WAIT, "the webhook holding a delivery", || {
        (!receiver.got().is_empty()).then_some(())
    });
    // Requests, and the alerts they raise, go on regardless.
    for _ in 0..8 {
        spend(&gw, &key, 50, 0);
    }
    gw.wait_ledger_quiescent();
    assert_eq!(gw.spend_rows(&key.id)[0].2, 550_000_000);
    let list = alerts_list(&gw);
    assert_eq!(list.len(), 5, "every threshold recorded: {list:?}");
    assert!(list.iter().all(|d| d["state"] == "pending"), "{list:?}");
    // Attempts run side by side, four at most to one webhook: the fifth waits.
    wait_for(WAIT, "four attempts held by the webhook", || {
        (receiver.got().len() == 4).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        receiver.got().len(),
        4,
        "no fifth attempt to the hung webhook"
    );
}

#[test]
fn a_hanging_webhook_holds_up_no_delivery_to_another() {
    let hung = Receiver::start();
    hung.set(|s| s.hanging = true);
    let healthy = Receiver::start();
    let m = mock();
    let hook = |r: &Receiver| {
        format!(
            "    - url: \"{}\"\n      secret_env: SG_TEST_WEBHOOK_SECRET\n",
            r.url()
        )
    };
    let alerts = format!(
        "alerts:\n  webhooks:\n{}{}  budget_thresholds: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]\n  retry_base_ms: 100\n  poll_ms: 50\n  timeout_ms: 60000",
        hook(&hung),
        hook(&healthy)
    );
    let gw = GatewayBuilder::new(&m)
        .models(MODELS)
        .admin(ADMIN)
        .env("SG_TEST_WEBHOOK_SECRET", SECRET)
        .top(&alerts)
        .start();
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);
    // 0.6 USD at once: six thresholds, each to both webhooks.
    spend(&gw, &key, 600, 0);
    // The hung webhook holds four attempts for a minute; the other gets all six meanwhile.
    let got = wait_for(WAIT, "six deliveries to the healthy webhook", || {
        let got = healthy.accepted();
        (got.len() == 6).then_some(got)
    });
    let mut thresholds: Vec<f64> = got.iter().map(threshold_of).collect();
    thresholds.sort_by(f64::total_cmp);
    assert_eq!(thresholds, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]);
    wait_for(WAIT, "four attempts held by the hung webhook", || {
        (hung.got().len() == 4).then_some(())
    });
    let list = alerts_list(&gw);
    assert_eq!(list.len(), 12, "{list:?}");
    let delivered = list.iter().filter(|d| d["state"] == "delivered").count();
    assert_eq!(delivered, 6, "{list:?}");
    drop(gw);
    std::mem::forget(m);
}

#[test]
fn nodes_sharing_postgres_record_and_send_each_threshold_once() {
    let Some(pg) = PgServer::start() else { return };
    let url = pg.create_db("alerts_cluster");
    let receiver = Receiver::start();
    let m = mock();
    let nodes: Vec<Gateway> = (0..2)
        .map(|_| {
            builder(&m, &receiver, "[0.5, 0.8, 1.0]", &[])
                .top("shared_state:\n  postgres_url_env: SG_TEST_PG")
                .env("SG_TEST_PG", &url)
                .start()
        })
        .collect();
    let key = nodes[0].create_key(&["--budget", "1", "--budget-mode", "soft"]);
    nodes[1].wait_key_live(&key);
    // Half of each step's spend through each node: both ledgers see every crossing, and both
    // workers poll the one outbox.
    for (tokens, expected) in [(300, 1), (125, 2), (75, 3)] {
        spend(&nodes[0], &key, tokens, 0);
        spend(&nodes[1], &key, tokens, 0);
        for n in &nodes {
            n.wait_ledger_quiescent();
        }
        wait_delivered(&nodes[1], expected);
    }
    assert_eq!(
        nodes[0].admin_call("GET", "/admin/alerts", None).json()["data"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    let got = receiver.got();
    let thresholds: Vec<f64> = got
        .iter()
        .map(|r| r.json["threshold"].as_f64().unwrap())
        .collect();
    assert_eq!(thresholds, vec![0.5, 0.8, 1.0], "each sent once: {got:?}");
    assert!(got.iter().all(|r| r.signature_ok && r.answered == 200));
    let sent: u64 = nodes
        .iter()
        .map(|n| n.metric("spidergate_alerts_sent_total").unwrap())
        .sum();
    assert_eq!(sent, 3);
}

#[test]
fn a_group_crossing_a_threshold_alerts_once_with_the_group_named() {
    let receiver = Receiver::start();
    let gw = gateway(&receiver, "[0.5, 0.8]", &[]);
    let out = gw.cli(&[
        "groups",
        "create",
        "team-a",
        "--budget",
        "1",
        "--budget-mode",
        "soft",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = gw.create_key(&["--group", "team-a"]);
    let b = gw.create_key(&["--group", "team-a"]);
    // 0.30 + 0.30 of the group's $1: 50 %; neither key has a budget of its own.
    spend(&gw, &a, 300, 0);
    spend(&gw, &b, 300, 0);
    let listed = wait_delivered(&gw, 1);
    assert_eq!(listed[0]["group"], "team-a");
    assert_eq!(listed[0]["subject_kind"], "group");
    let got = receiver.accepted();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["event"], "budget.threshold");
    assert_eq!(got[0]["group"], "team-a");
    assert_eq!(got[0]["name"], "team-a");
    assert!(got[0].get("key_id").is_none());
    assert_eq!(got[0]["threshold"], 0.5);
    assert_eq!(got[0]["spend_usd"], 0.6);
    assert_eq!(got[0]["budget_usd"], 1.0);
    // More spend below 80 %: nothing new.
    spend(&gw, &a, 100, 0);
    gw.wait_ledger_quiescent();
    assert_eq!(alerts_list(&gw).len(), 1);
}

// ---- store level: both backends ----

fn record(id: &str, budget_usd: Option<i64>) -> KeyRecord {
    let t = token::mint().unwrap();
    KeyRecord {
        id: id.into(),
        name: format!("{id}-name"),
        prefix: t.prefix,
        token_hash: t.hash,
        scopes: vec!["gate:chat".into()],
        rpm: None,
        rpd: None,
        budget: budget_usd.map(|usd| Nanos::new(usd * 1_000_000_000)),
        budget_mode: BudgetMode::Soft,
        max_inflight: None,
        previous_hash: None,
        previous_valid_until: None,
        rotated_at: None,
        allowed_models: vec![],
        free_only: false,
        client_id: None,
        created_at: 1,
        expires_at: i64::MAX,
        revoked_at: None,
        last_used_at: None,
        group: None,
        parent_id: None,
        max_usd_per_hour: None,
        loop_limit: None,
    }
}

const HOUR: i64 = 3_600_000;

fn at(hour: i64, minute: i64) -> i64 {
    days_from_civil(2026, 12, 5) * MS_PER_DAY + hour * HOUR + minute * 60_000
}

fn spent(ts: i64, key: &str, usd_cents: i64) -> LedgerEntry {
    LedgerEntry {
        trace: TraceRow {
            ts,
            key_id: Some(key.into()),
            endpoint: "chat.completions".into(),
            served_model: Some("m1".into()),
            status: 200,
            cost: Nanos::new(usd_cents * 10_000_000),
            ..TraceRow::default()
        },
        admitted: true,
        counted: true,
        keep_trace: true,
        journal_id: None,
        span: None,
    }
}

fn refused(ts: i64, key: &str, code: &'static str) -> LedgerEntry {
    LedgerEntry {
        trace: TraceRow {
            ts,
            key_id: Some(key.into()),
            endpoint: "chat.completions".into(),
            status: 429,
            error_code: Some(Cow::Borrowed(code)),
            ..TraceRow::default()
        },
        admitted: false,
        counted: false,
        keep_trace: true,
        journal_id: None,
        span: None,
    }
}

fn rules(thresholds: &[u32]) -> Arc<AlertRules> {
    Arc::new(AlertRules {
        thresholds_ppm: thresholds.to_vec(),
        webhooks: vec!["http://127.0.0.1:9/a".into(), "http://127.0.0.1:9/b".into()],
    })
}

fn writer(loc: &StoreLocation, thresholds: &[u32]) -> Store {
    let mut s = Store::open_at(loc).unwrap();
    s.set_alert_rules(Some(rules(thresholds)));
    s
}

/// `(event, subject, period, threshold_ppm, payload)` of each alert (one per alert, not
/// per webhook), oldest first.
fn alerts_of(s: &Store) -> Vec<(String, String, String, i64, Value)> {
    let rows = s.alert_deliveries(1000, None).unwrap();
    let mut out: Vec<_> = rows
        .iter()
        .rev()
        .filter(|d| d.webhook.ends_with("/a"))
        .map(|d| {
            (
                d.event.clone(),
                d.subject.clone(),
                d.period.clone(),
                d.threshold_ppm,
                serde_json::from_str(&d.payload).unwrap(),
            )
        })
        .collect();
    out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1 && a.2 == b.2 && a.3 == b.3);
    assert_eq!(rows.len(), out.len() * 2, "one delivery per webhook");
    out
}

fn locations(pg: Option<&PgServer>, name: &str, dir: &tempfile::TempDir) -> Vec<StoreLocation> {
    let mut out = vec![StoreLocation::Sqlite(dir.path().join(format!("{name}.db")))];
    if let Some(pg) = pg {
        out.push(StoreLocation::Postgres(pg.create_db(name)));
    }
    out
}

#[test]
fn store_records_brake_alerts_once_per_key_and_hour_and_budget_thresholds_once() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for loc in locations(pg.as_ref(), "alerts_brakes", &dir) {
        let mut s = writer(&loc, &[500_000, 800_000]);
        s.insert_key(&record("key_b", Some(1))).unwrap();
        s.insert_key(&record("key_free", None)).unwrap();
        s.write_batch(&Batch::of([
            refused(at(3, 1), "key_b", "loop_detected"),
            refused(at(3, 2), "key_b", "loop_detected"),
            refused(at(3, 3), "key_b", "spend_rate_exceeded"),
            refused(at(3, 4), "key_b", "rate_limit_exceeded"),
            refused(at(4, 0), "key_b", "loop_detected"),
            refused(at(3, 5), "key_free", "spend_rate_exceeded"),
        ]))
        .unwrap();
        // Later in the same hour, from a second handle (another process or node): nothing new.
        let mut other = writer(&loc, &[500_000, 800_000]);
        other
            .write_batch(&Batch::of([refused(at(3, 59), "key_b", "loop_detected")]))
            .unwrap();
        let got = alerts_of(&s);
        let events: Vec<(&str, &str, &str)> = got
            .iter()
            .map(|(e, k, p, _, _)| (e.as_str(), k.as_str(), p.as_str()))
            .collect();
        let mut want = vec![
            ("key.loop", "key_b", "2026-12-05T03"),
            ("key.spend_rate", "key_b", "2026-12-05T03"),
            ("key.loop", "key_b", "2026-12-05T04"),
            ("key.spend_rate", "key_free", "2026-12-05T03"),
        ];
        let mut sorted = events.clone();
        sorted.sort();
        want.sort();
        assert_eq!(sorted, want, "{loc:?}");
        let loop3 = &got
            .iter()
            .find(|a| a.0 == "key.loop" && a.2.ends_with("T03"))
            .unwrap()
            .4;
        assert_eq!(loop3["key_id"], "key_b");
        assert_eq!(loop3["name"], "key_b-name");
        assert_eq!(loop3["month"], "2026-12");
        assert_eq!(loop3["budget_usd"], 1.0);
        assert!(loop3["id"].as_str().unwrap().starts_with("alrt_"));

        // Budget thresholds: 0.40 (none), then 0.55 (50 %), then 0.70 from the other
        // handle (50 % again: nothing), then 0.81 (80 %).
        let n = got.len();
        s.write_batch(&Batch::of([spent(at(5, 0), "key_b", 40)]))
            .unwrap();
        assert_eq!(alerts_of(&s).len(), n, "{loc:?}");
        s.write_batch(&Batch::of([spent(at(5, 1), "key_b", 15)]))
            .unwrap();
        other
            .write_batch(&Batch::of([spent(at(5, 2), "key_b", 15)]))
            .unwrap();
        s.write_batch(&Batch::of([
            spent(at(5, 3), "key_b", 11),
            spent(at(5, 3), "key_free", 500),
        ]))
        .unwrap();
        let got = alerts_of(&s);
        let budget: Vec<_> = got.iter().filter(|a| a.0 == "budget.threshold").collect();
        assert_eq!(budget.len(), 2, "{loc:?}: {budget:?}");
        assert_eq!((budget[0].3, budget[1].3), (500_000, 800_000));
        assert_eq!(budget[0].4["spend_usd"], 0.55);
        assert_eq!(budget[1].4["spend_usd"], 0.81);
        assert_eq!(budget[1].4["month"], "2026-12");
        // Without rules nothing is recorded.
        let mut off = Store::open_at(&loc).unwrap();
        off.write_batch(&Batch::of([refused(at(7, 0), "key_b", "loop_detected")]))
            .unwrap();
        assert_eq!(alerts_of(&s).len(), got.len());
    }
}

/// SPEC §7: a child's spend counts against its parent's budget, so it crosses the parent's
/// thresholds (and its grandparent's) with the tree's spend in the payload; a key without
/// a budget of its own raises none.
#[test]
fn a_childs_spend_crosses_its_ancestors_thresholds() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for loc in locations(pg.as_ref(), "alerts_tree", &dir) {
        let mut s = writer(&loc, &[500_000, 800_000]);
        s.insert_key(&record("key_root", Some(2))).unwrap();
        let mut parent = record("key_parent", Some(1));
        parent.parent_id = Some("key_root".into());
        s.insert_key(&parent).unwrap();
        let mut child = record("key_child", None);
        child.parent_id = Some("key_parent".into());
        s.insert_key(&child).unwrap();
        // The parent's own 0.20, then the child's 0.40: the tree is at 0.60 of the
        // parent's $1 (50 %) and 0.60 of the root's $2 (nothing).
        s.write_batch(&Batch::of([spent(at(5, 0), "key_parent", 20)]))
            .unwrap();
        s.write_batch(&Batch::of([spent(at(5, 1), "key_child", 40)]))
            .unwrap();
        let got = alerts_of(&s);
        let subjects: Vec<(&str, i64)> = got.iter().map(|a| (a.1.as_str(), a.3)).collect();
        assert_eq!(subjects, [("key_parent", 500_000)], "{loc:?}");
        assert_eq!(got[0].4["spend_usd"], 0.6, "{loc:?}");
        assert_eq!(got[0].4["budget_usd"], 1.0, "{loc:?}");
        // The child's 0.60 more: the parent's 80 % (1.20 of $1), and the root's 50 % (1.20
        // of $2).
        s.write_batch(&Batch::of([spent(at(5, 2), "key_child", 60)]))
            .unwrap();
        let mut subjects: Vec<(String, i64)> =
            alerts_of(&s).iter().map(|a| (a.1.clone(), a.3)).collect();
        subjects.sort();
        assert_eq!(
            subjects,
            [
                ("key_parent".to_string(), 500_000),
                ("key_parent".to_string(), 800_000),
                ("key_root".to_string(), 500_000)
            ],
            "{loc:?}"
        );
    }
}

#[test]
fn store_claims_hand_each_delivery_to_one_worker_at_a_time() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for loc in locations(pg.as_ref(), "alerts_claims", &dir) {
        let mut s = writer(&loc, &[500_000]);
        for i in 0..5 {
            s.insert_key(&record(&format!("key_{i}"), Some(1))).unwrap();
        }
        s.write_batch(&Batch::of(
            (0..5).map(|i| spent(at(1, 0), &format!("key_{i}"), 60)),
        ))
        .unwrap();
        assert_eq!(s.pending_deliveries().unwrap(), 10);
        // Deliveries are due from the (real) time they were recorded.
        let now = spidergate::clock::now_ms() + 1_000;
        let mut a = Store::open_at(&loc).unwrap();
        let mut b = Store::open_at(&loc).unwrap();
        let first = a.claim_deliveries(now, 6, now + 60_000, &[]).unwrap();
        let second = b.claim_deliveries(now, 6, now + 60_000, &[]).unwrap();
        assert_eq!((first.len(), second.len()), (6, 4), "{loc:?}");
        assert!(first.iter().all(|d| second.iter().all(|e| e.id != d.id)));
        assert!(
            b.claim_deliveries(now, 6, now + 60_000, &[])
                .unwrap()
                .is_empty(),
            "leased"
        );
        // A lease that ran out (its worker died) is taken again; a webhook skipped (its
        // attempts in flight are at the limit) is not.
        let later = now + 60_001;
        let hooks: std::collections::BTreeSet<String> =
            first.iter().map(|d| d.webhook.clone()).collect();
        let skipped = hooks.first().unwrap().as_str();
        let others = b
            .claim_deliveries(later, 20, later + 1000, &[skipped])
            .unwrap();
        assert!(!others.is_empty() && others.iter().all(|d| d.webhook != skipped));
        assert_eq!(
            others.len()
                + b.claim_deliveries(later, 20, later + 1000, &[])
                    .unwrap()
                    .len(),
            10
        );
    }
}

#[test]
fn store_group_thresholds_sum_the_member_keys() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    for loc in locations(pg.as_ref(), "alerts_groups", &dir) {
        let mut setup = Store::open_at(&loc).unwrap();
        for (name, budget) in [
            ("team", Some(Nanos::new(1_000_000_000))),
            ("nobudget", None),
        ] {
            setup
                .insert_group(&GroupRecord {
                    name: name.into(),
                    budget,
                    budget_mode: BudgetMode::Hard,
                    rpm: None,
                    created_at: 1,
                })
                .unwrap();
        }
        for (id, budget, group) in [
            ("key_g1", None, "team"),
            ("key_g2", Some(10), "team"),
            ("key_solo", None, "nobudget"),
        ] {
            let mut k = record(id, budget);
            k.group = Some(group.into());
            setup.insert_key(&k).unwrap();
        }
        drop(setup);
        let mut s = writer(&loc, &[500_000, 800_000]);
        // 0.30 + 0.30 = 0.60 of the group's $1: 50 %; key_g2's own $10 budget: nothing.
        s.write_batch(&Batch::of([
            spent(at(2, 0), "key_g1", 30),
            spent(at(2, 0), "key_g2", 30),
        ]))
        .unwrap();
        s.write_batch(&Batch::of([spent(at(2, 1), "key_solo", 500)]))
            .unwrap();
        let got = alerts_of(&s);
        assert_eq!(got.len(), 1, "{loc:?}: {got:?}");
        let (event, subject, period, ppm, payload) = &got[0];
        assert_eq!(
            (event.as_str(), subject.as_str(), period.as_str(), *ppm),
            ("budget.threshold", "team", "2026-12", 500_000)
        );
        assert_eq!(payload["group"], "team");
        assert_eq!(payload["name"], "team");
        assert!(payload.get("key_id").is_none());
        assert_eq!(payload["spend_usd"], 0.6);
        assert_eq!(payload["budget_usd"], 1.0);
        // 0.25 more from one member: 0.85, 80 %.
        s.write_batch(&Batch::of([spent(at(2, 2), "key_g2", 25)]))
            .unwrap();
        let got = alerts_of(&s);
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].3, 800_000);
        assert_eq!(got[1].4["spend_usd"], 0.85);
    }
}

#[test]
fn a_sighup_reload_changes_the_thresholds_and_check_config_needs_the_secret() {
    let receiver = Receiver::start();
    let gw = gateway(&receiver, "[0.9]", &[]);
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "soft"]);
    spend(&gw, &key, 600, 0);
    gw.wait_ledger_quiescent();
    assert!(alerts_list(&gw).is_empty(), "0.6 is below 0.9");

    let text = std::fs::read_to_string(&gw.config).unwrap();
    let edited = text.replace("budget_thresholds: [0.9]", "budget_thresholds: [0.5, 0.9]");
    assert_ne!(text, edited);
    std::fs::write(&gw.config, &edited).unwrap();
    gw.signal_hup();
    wait_for(WAIT, "the reload", || {
        (gw.metric("spidergate_config_reloads_total")? >= 1).then_some(())
    });
    // The new threshold was already passed: the key's next charge records it.
    spend(&gw, &key, 10, 0);
    let listed = wait_delivered(&gw, 1);
    assert_eq!(threshold_of(&listed[0]), 0.5);
    assert_eq!(receiver.accepted()[0]["spend_usd"], 0.61);

    // The webhook's secret must be in the environment: check-config names the field.
    let out = std::process::Command::new(common::BIN)
        .arg("--config")
        .arg(&gw.config)
        .arg("check-config")
        .env_remove("SG_TEST_WEBHOOK_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(
            "alerts.webhooks[0].secret_env: environment variable SG_TEST_WEBHOOK_SECRET is not set"
        ),
        "{err}"
    );
}

/// End to end through the brakes: a key's loop refusals and spend-rate refusals each send one
/// alert per hour (`key.loop`, `key.spend_rate`), however many refusals there are.
#[test]
fn brake_refusals_send_one_alert_per_key_and_hour() {
    let receiver = Receiver::start();
    let gw = gateway(&receiver, "[1.0]", &[]);
    let looping = gw.create_key(&["--loop-limit", "1"]);
    // The first passes; every repeat within the minute is refused.
    for i in 0..4 {
        let r = gw.chat(&looping, "m1");
        let want = if i == 0 { 200 } else { 429 };
        assert_eq!(r.status, want, "{}", r.text());
        if i > 0 {
            assert_eq!(r.code(), "loop_detected");
        }
    }
    // A spend rate too small for even one request's bound.
    let burning = gw.create_key(&["--max-usd-per-hour", "0.000001"]);
    for _ in 0..3 {
        let r = gw.chat(&burning, "m1");
        assert_eq!((r.status, r.code().as_str()), (429, "spend_rate_exceeded"));
    }
    gw.wait_ledger_quiescent();
    let list = wait_delivered(&gw, 2);
    let mut events: Vec<(String, String)> = list
        .iter()
        .map(|d| {
            (
                d["event"].as_str().unwrap().to_string(),
                d["key_id"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    events.sort();
    let mut want = vec![
        ("key.loop".to_string(), looping.id.clone()),
        ("key.spend_rate".to_string(), burning.id.clone()),
    ];
    want.sort();
    assert_eq!(events, want);
    let got = receiver.accepted();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(receiver.got().iter().all(|r| r.signature_ok));
}
