//! Live per-key limits of a cluster in Redis (SPEC §2, §6 `shared_state`): several
//! `RedisLimits` ("nodes") against one real redis-server.

mod common;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis::RedisServer;
use spidergate::clock::{day_index, month_index, now_ms, MS_PER_DAY};
use spidergate::error::GateError;
use spidergate::limits::{Charge, CounterView, Limits, ModelTally, Standing};
use spidergate::money::Nanos;
use spidergate::shared::redis::{Admit, RedisLimits, Settled, SharedError};

macro_rules! redis_or_skip {
    () => {
        match RedisServer::start() {
            Some(r) => r,
            None => return,
        }
    };
}

fn node(r: &RedisServer, id: u64, ttl: Duration) -> Arc<RedisLimits> {
    Arc::new(RedisLimits::new(&r.url(), id, ttl, Duration::from_secs(2)).unwrap())
}

fn hard(cap: i64) -> Limits {
    Limits {
        budget: Some(Nanos::new(cap)),
        hard_budget: true,
        ..Limits::default()
    }
}

fn tally(model: &str, requests: u64, spent: i64) -> ModelTally {
    ModelTally {
        model: Arc::from(model),
        requests,
        prompt_tokens: requests * 10,
        completion_tokens: requests * 20,
        spent: Nanos::new(spent),
    }
}

/// Seeds the key's month empty (if it needs it), as the gateway does from an empty ledger.
async fn seed_empty(l: &RedisLimits, key: &str) {
    seed_with(l, key, &[], 0).await;
}

async fn seed_with(l: &RedisLimits, key: &str, this_month: &[ModelTally], today: u32) {
    let now = now_ms();
    l.seed(key, month_index(now), day_index(now), this_month, today)
        .await
        .unwrap();
}

/// Admits, seeding an empty month first if Redis asks for it.
async fn admit(l: &RedisLimits, key: &str, limits: &Limits, est: i64, res: u64) -> Admit {
    match l
        .admit(key, limits, &[], Nanos::new(est), None, res)
        .await
        .unwrap()
    {
        Admit::NeedSeed { .. } => {
            seed_empty(l, key).await;
            l.admit(key, limits, &[], Nanos::new(est), None, res)
                .await
                .unwrap()
        }
        other => other,
    }
}

fn admitted(a: &Admit) -> Standing {
    match a {
        Admit::Admitted { standing, .. } => *standing,
        other => panic!("expected admission, got {other:?}"),
    }
}

fn rejected(a: Admit) -> GateError {
    match a {
        Admit::Rejected(e) => e,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

async fn view(l: &RedisLimits, key: &str) -> CounterView {
    l.view(key, &Limits::default())
        .await
        .unwrap()
        .expect("month seeded")
}

fn charge(model: &Arc<str>, cost: i64) -> Option<Charge<'_>> {
    Some(Charge {
        model,
        prompt_tokens: 10,
        completion_tokens: 20,
        cost: Nanos::new(cost),
    })
}

/// Runs a raw command against the server, behind the gateway's back.
async fn raw(r: &RedisServer, cmd: &mut redis::Cmd) -> redis::Value {
    let client = redis::Client::open(r.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    cmd.query_async(&mut con).await.unwrap()
}

/// Commands that clients sent to Redis, as Redis itself sees them: `redis-cli MONITOR` prints
/// every command a client sends (those a script runs show as `[.. lua]` and are not counted),
/// an oracle independent of the gateway's own round-trip counter. Counting between two
/// markers (`ECHO` from a separate `redis-cli`) needs no sleep: the monitor prints them in
/// order.
struct RedisMonitor {
    port: u16,
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    marks: u64,
}

impl RedisMonitor {
    fn start(r: &RedisServer) -> RedisMonitor {
        let mut child = std::process::Command::new("redis-cli")
            .args(["-p", &r.port().to_string(), "MONITOR"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-cli MONITOR");
        let out = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(out).map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // MONITOR answers OK once it is registered: every later command shows.
        let ok = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("MONITOR answers");
        assert_eq!(ok, "OK");
        let mut m = RedisMonitor {
            port: r.port(),
            child,
            lines,
            marks: 0,
        };
        m.commands_since_mark();
        m
    }

    /// Client commands seen since the previous mark (the marks themselves not counted).
    fn commands_since_mark(&mut self) -> u64 {
        self.marks += 1;
        let mark = format!("sg-mark-{}", self.marks);
        let out = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "ECHO", &mark])
            .output()
            .expect("redis-cli ECHO");
        assert!(out.status.success());
        let quoted = format!("\"ECHO\" \"{mark}\"");
        let mut n = 0;
        loop {
            let line = self
                .lines
                .recv_timeout(Duration::from_secs(10))
                .expect("MONITOR shows the mark");
            if line.contains(&quoted) {
                return n;
            }
            if line.contains(" lua] ") || line.contains("\"ECHO\" \"sg-mark-") {
                continue;
            }
            n += 1;
        }
    }
}

impl Drop for RedisMonitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A small deterministic generator (no rand crate in the tree).
struct Rng(u64);

impl Rng {
    fn next(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rpm_is_exact_across_three_nodes_hammering_concurrently() {
    let r = redis_or_skip!();
    let nodes: Vec<_> = (1..=3)
        .map(|id| node(&r, id, Duration::from_secs(30)))
        .collect();
    seed_empty(&nodes[0], "k").await;
    let limits = Limits {
        rpm: Some(20),
        ..Limits::default()
    };
    let mut tasks = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        for res in 0..40u64 {
            let n = n.clone();
            tasks.push(tokio::spawn(async move {
                let a = n
                    .admit("k", &limits, &[], Nanos::ZERO, None, res)
                    .await
                    .unwrap();
                if matches!(a, Admit::Admitted { .. }) {
                    assert_eq!(
                        Settled::Open,
                        n.settle("k", res, month_index(now_ms()), None)
                            .await
                            .unwrap()
                    );
                }
                (i, a)
            }));
        }
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.unwrap().1 {
            Admit::Admitted { .. } => ok += 1,
            Admit::Rejected(GateError::RateLimited {
                limit,
                retry_after_secs,
            }) => {
                assert_eq!(limit, 20);
                assert!((1..=60).contains(&retry_after_secs), "{retry_after_secs}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(ok, 20, "exactly rpm admitted across the cluster");
    let v = nodes[2].view("k", &limits).await.unwrap().unwrap();
    assert_eq!((v.requests_this_minute, v.requests_today), (20, 20));
    assert_eq!((v.inflight, v.reserved), (0, Nanos::ZERO));
    // The window is full for every node, with an accurate Retry-After (the oldest admission
    // leaves 60 s after it was made, i.e. in 59-60 s).
    for n in &nodes {
        let e = rejected(
            n.admit("k", &limits, &[], Nanos::ZERO, None, 999)
                .await
                .unwrap(),
        );
        assert!(matches!(e.retry_after(), Some(59..=60)), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standing_counts_down_the_rolling_minute() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let limits = Limits {
        rpm: Some(3),
        ..Limits::default()
    };
    for (res, left) in [(1, 2), (2, 1)] {
        let s = admitted(&admit(&l, "k", &limits, 0, res).await);
        assert_eq!((s.rpm, s.remaining, s.reset_secs), (Some(3), Some(left), 0));
    }
    let s = admitted(&admit(&l, "k", &limits, 0, 3).await);
    assert_eq!(s.remaining, Some(0));
    assert!((59..=60).contains(&s.reset_secs), "{s:?}");
    let e = rejected(admit(&l, "k", &limits, 0, 4).await);
    assert_eq!(e.code(), "rate_limit_exceeded");
    assert_eq!(e.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_requests_consume_nothing() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));

    // Budget first: a spent key is refused before any rate quota is touched.
    seed_with(&l, "spent", &[tally("m", 1, 1_000)], 0).await;
    let strict = Limits {
        rpm: Some(1),
        rpd: Some(1),
        max_inflight: Some(1),
        ..hard(1_000)
    };
    let e = rejected(admit(&l, "spent", &strict, 1, 1).await);
    assert_eq!(
        e,
        GateError::BudgetExceeded {
            spend: Nanos::new(1_000),
            cap: Nanos::new(1_000)
        }
    );
    let v = view(&l, "spent").await;
    assert_eq!(
        (
            v.requests_this_minute,
            v.requests_today,
            v.inflight,
            v.reserved
        ),
        (0, 0, 0, Nanos::ZERO)
    );

    // Per day, with Retry-After until the next UTC midnight.
    let daily = Limits {
        rpd: Some(2),
        ..Limits::default()
    };
    for res in 1..=2 {
        admitted(&admit(&l, "day", &daily, 0, res).await);
        assert_eq!(
            Settled::Open,
            l.settle("day", res, month_index(now_ms()), None)
                .await
                .unwrap()
        );
    }
    for res in 3..8 {
        let e = rejected(admit(&l, "day", &daily, 0, res).await);
        assert_eq!(e.code(), "daily_rate_limit_exceeded");
        let until_midnight = ((day_index(now_ms()) + 1) * MS_PER_DAY - now_ms()) / 1000;
        let got = e.retry_after().unwrap() as i64;
        assert!(
            (got - until_midnight).abs() <= 2,
            "{got} vs {until_midnight}"
        );
    }
    assert_eq!(view(&l, "day").await.requests_today, 2);

    // In flight: one over is refused, and the refusal counts nowhere.
    let conc = Limits {
        max_inflight: Some(1),
        rpd: Some(10),
        ..Limits::default()
    };
    admitted(&admit(&l, "conc", &conc, 0, 1).await);
    let e = rejected(admit(&l, "conc", &conc, 0, 2).await);
    assert_eq!(e, GateError::ConcurrencyLimited { limit: 1 });
    assert_eq!(e.retry_after(), Some(1));
    let v = view(&l, "conc").await;
    assert_eq!((v.requests_today, v.inflight), (1, 1));
    assert_eq!(
        Settled::Open,
        l.settle("conc", 1, month_index(now_ms()), None)
            .await
            .unwrap()
    );
    admitted(&admit(&l, "conc", &conc, 0, 3).await);

    // A saturated estimate is refused, not wrapped.
    let e = rejected(admit(&l, "big", &hard(1_000), i64::MAX, 1).await);
    assert_eq!(e.code(), "budget_exceeded");
    assert_eq!(view(&l, "big").await.reserved, Nanos::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hard_budget_is_never_overshot_by_sixty_concurrent_admits_on_three_nodes() {
    let r = redis_or_skip!();
    let nodes: Vec<_> = (1..=3)
        .map(|id| node(&r, id, Duration::from_secs(30)))
        .collect();
    const CAP: i64 = 2_000_000;
    seed_with(&nodes[0], "k", &[tally("m", 1, 100_000)], 0).await;
    let charged = Arc::new(AtomicI64::new(100_000));
    let next_res = Arc::new(AtomicU64::new(0));
    let model: Arc<str> = Arc::from("m");
    let mut tasks = Vec::new();
    for t in 0..60u64 {
        let n = nodes[(t % 3) as usize].clone();
        let (charged, next_res, model) = (charged.clone(), next_res.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (t + 1));
            let mut refused = 0;
            while refused < 3 {
                let est = 10_000 + rng.next(90_000) as i64;
                let res = next_res.fetch_add(1, Ordering::Relaxed);
                match n
                    .admit("k", &hard(CAP), &[], Nanos::new(est), None, res)
                    .await
                    .unwrap()
                {
                    Admit::Admitted { .. } => {
                        tokio::time::sleep(Duration::from_millis(rng.next(5))).await;
                        let cost = est * rng.next(101) as i64 / 100;
                        assert_eq!(
                            Settled::Open,
                            n.settle("k", res, month_index(now_ms()), charge(&model, cost))
                                .await
                                .unwrap()
                        );
                        charged.fetch_add(cost, Ordering::Relaxed);
                    }
                    Admit::Rejected(GateError::BudgetExceeded { spend, cap }) => {
                        assert!(spend.get() <= CAP && cap.get() == CAP, "{spend} {cap}");
                        refused += 1;
                    }
                    other => panic!("{other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let v = view(&nodes[1], "k").await;
    assert_eq!(v.spent.get(), charged.load(Ordering::Relaxed));
    assert!(v.spent.get() <= CAP, "overshot: {} > {CAP}", v.spent);
    assert!(
        v.spent.get() > CAP - 100_000,
        "the budget was used up: {}",
        v.spent
    );
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));
    let m = &v.by_model[0];
    assert_eq!((&*m.model, m.spent), ("m", v.spent));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_month_is_seeded_once_and_never_additively() {
    let r = redis_or_skip!();
    let (a, b) = (
        node(&r, 1, Duration::from_secs(30)),
        node(&r, 2, Duration::from_secs(30)),
    );
    let limits = Limits {
        rpd: Some(100),
        ..hard(10_000)
    };
    let now = now_ms();
    let need = a
        .admit("k", &limits, &[], Nanos::new(1), None, 1)
        .await
        .unwrap();
    assert_eq!(
        need,
        Admit::NeedSeed {
            month: month_index(now),
            day: day_index(now),
            level: 0
        }
    );
    assert!(a.view("k", &limits).await.unwrap().is_none());
    // Two nodes race to seed from the ledger: exactly one wins, whole.
    let seed_a = [tally("m1", 3, 300), tally("m2", 1, 50)];
    let seed_b = [tally("m1", 9, 999)];
    let (ra, rb) = tokio::join!(
        a.seed("k", month_index(now), day_index(now), &seed_a, 4),
        b.seed("k", month_index(now), day_index(now), &seed_b, 7),
    );
    ra.unwrap();
    rb.unwrap();
    let v = view(&a, "k").await;
    let won_a = v.spent == Nanos::new(350);
    if won_a {
        assert_eq!(v.by_model, seed_a.to_vec());
        assert_eq!(v.requests_today, 4);
    } else {
        assert_eq!(v.spent, Nanos::new(999), "not additive");
        assert_eq!(v.by_model, seed_b.to_vec());
        assert_eq!(v.requests_today, 7);
    }
    // A late seeder changes nothing.
    seed_with(&b, "k", &[tally("m1", 1, 1)], 99).await;
    let again = view(&a, "k").await;
    assert_eq!(
        (again.spent, again.requests_today),
        (v.spent, v.requests_today)
    );
    let m = admitted(
        &a.admit("k", &limits, &[], Nanos::new(1), None, 1)
            .await
            .unwrap(),
    );
    assert_eq!(m.rpm, None);
    assert_eq!(view(&b, "k").await.requests_today, v.requests_today + 1);
}

/// Redis restarted without its data while a request was open, and another node re-seeded
/// the month from the ledger (which this request is not in yet: its entry follows its
/// settlement): the request's cost is booked when it ends, not lost for the month.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hold_lost_with_redis_data_still_books_its_cost_into_a_reseeded_month() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let model: Arc<str> = Arc::from("m");
    let month = match admit(&l, "k", &hard(10_000), 500, 1).await {
        Admit::Admitted { month, .. } => month,
        other => panic!("{other:?}"),
    };
    raw(&r, &mut redis::cmd("FLUSHALL")).await;
    seed_with(&l, "k", &[tally("m", 2, 300)], 2).await;
    assert_eq!(
        l.settle("k", 1, month, charge(&model, 120)).await.unwrap(),
        Settled::Lost
    );
    let v = view(&l, "k").await;
    assert_eq!(
        v.spent,
        Nanos::new(420),
        "the seed's 300 plus this request's 120"
    );
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));
    // A reaped hold, by contrast, is not charged again when its request ends late.
    let late = node(&r, 2, Duration::from_millis(100));
    admitted(&admit(&late, "k", &hard(10_000), 700, 1).await);
    reaps(&l, 1).await;
    assert_eq!(
        late.settle("k", 1, month, charge(&model, 50))
            .await
            .unwrap(),
        Settled::Reaped
    );
    assert_eq!(view(&l, "k").await.spent, Nanos::new(1_120));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settle_after_data_loss_does_not_create_the_month() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let model: Arc<str> = Arc::from("m");
    admitted(&admit(&l, "k", &hard(1_000), 100, 1).await);
    admitted(&admit(&l, "k", &hard(1_000), 100, 2).await);

    // The month alone vanished (evicted): the settlement releases, books nothing, and the
    // month stays absent so the next admission asks for a seed from the ledger.
    let month = format!("{{sg}}:k:k:mon:{}", month_index(now_ms()));
    raw(&r, redis::cmd("DEL").arg(&month)).await;
    assert_eq!(
        Settled::Open,
        l.settle("k", 1, month_index(now_ms()), charge(&model, 60))
            .await
            .unwrap()
    );
    assert!(l.view("k", &Limits::default()).await.unwrap().is_none());
    assert_eq!(
        raw(&r, redis::cmd("EXISTS").arg(&month)).await,
        redis::Value::Int(0)
    );

    // Everything vanished (a restart without persistence): the reservation is gone too.
    raw(&r, &mut redis::cmd("FLUSHALL")).await;
    assert_eq!(
        l.settle("k", 2, month_index(now_ms()), charge(&model, 60))
            .await
            .unwrap(),
        Settled::Lost
    );
    assert!(l.view("k", &Limits::default()).await.unwrap().is_none());
    assert!(matches!(
        l.admit("k", &hard(1_000), &[], Nanos::new(1), None, 3)
            .await
            .unwrap(),
        Admit::NeedSeed { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_nodes_reservation_is_charged_at_its_estimate_and_a_live_one_is_kept() {
    let r = redis_or_skip!();
    // The dead node's TTL is short; the live node's is longer than any pause a loaded machine
    // puts between two of its heartbeats (every 50 ms), so only a missing heartbeat loses it.
    let ttl = Duration::from_millis(300);
    let live_ttl = Duration::from_millis(800);
    let limits = Limits {
        max_inflight: Some(2),
        ..hard(10_000)
    };
    let model: Arc<str> = Arc::from("m");
    let reaper = node(&r, 3, Duration::from_secs(30));
    seed_empty(&reaper, "k").await;

    // Node 1 admits and dies without settling.
    let dead = node(&r, 1, ttl);
    admitted(&admit(&dead, "k", &limits, 700, 1).await);
    drop(dead);

    // Node 2 is alive: its heartbeat keeps a reservation open well past the TTL.
    let live = node(&r, 2, live_ttl);
    admitted(&admit(&live, "k", &limits, 500, 1).await);
    let beating = {
        let live = live.clone();
        tokio::spawn(async move {
            loop {
                live.heartbeat().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Reap for two of the live node's TTLs: the dead reservation goes, the live one stays.
    let start = Instant::now();
    let mut reaped = 0;
    while start.elapsed() < 2 * live_ttl {
        reaped += reaper.reap().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(reaped, 1, "only the dead node's reservation");
    let v = view(&reaper, "k").await;
    assert_eq!(v.spent, Nanos::new(700), "charged at its estimate");
    assert_eq!((v.reserved, v.inflight), (Nanos::new(500), 1));
    // An admission of the same key sweeps the key's own expiry index: the heartbeat kept the
    // live reservation's entry there fresh too, so it is not reaped either.
    admitted(&admit(&reaper, "k", &limits, 100, 9).await);
    let v2 = view(&reaper, "k").await;
    assert_eq!(
        v2.spent,
        Nanos::new(700),
        "the live reservation was reaped by the sweep"
    );
    assert_eq!((v2.reserved, v2.inflight), (Nanos::new(600), 2));
    reaper
        .settle("k", 9, month_index(now_ms()), None)
        .await
        .unwrap();
    let orphan = v
        .by_model
        .iter()
        .find(|t| &*t.model == "(orphaned)")
        .unwrap();
    assert_eq!((orphan.requests, orphan.spent), (1, Nanos::new(700)));

    assert_eq!(
        Settled::Open,
        live.settle("k", 1, month_index(now_ms()), charge(&model, 200))
            .await
            .unwrap()
    );
    beating.abort();
    let v = view(&reaper, "k").await;
    assert_eq!(v.spent, Nanos::new(900));
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));

    // A node that went silent past the TTL finds its reservation reaped: settle says so
    // and charges nothing more (the estimate, an upper bound, was charged).
    let late = node(&r, 4, Duration::from_millis(200));
    admitted(&admit(&late, "k", &limits, 300, 1).await);
    reaps(&reaper, 1).await;
    assert_eq!(
        late.settle("k", 1, month_index(now_ms()), charge(&model, 100))
            .await
            .unwrap(),
        Settled::Reaped
    );
    assert_eq!(view(&reaper, "k").await.spent, Nanos::new(1_200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn settlements_book_exact_sums_past_what_a_lua_number_holds_and_saturate_at_the_top() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let open = Limits::default();
    // Forty settlements of an odd cost at once, in batches, from just below 2^53 to past
    // it, where a Lua number holds only even integers: the batch sums them as Lua numbers
    // but books them with Redis' integers, so every one is booked exactly.
    let near = (1i64 << 53) - 50;
    seed_with(&l, "k", &[tally("m", 1, near)], 0).await;
    let trips = burst_of(&l, "k", 1, 40, open, 7).await;
    assert!(trips < 80, "the operations shared batches");
    let v = view(&l, "k").await;
    assert_eq!(v.spent, Nanos::new(near + 280));
    let m = v.by_model.iter().find(|t| &*t.model == "m").unwrap();
    assert_eq!(
        (m.requests, m.prompt_tokens, m.completion_tokens, m.spent),
        (41, 410, 820, Nanos::new(near + 280))
    );
    // At the top, it saturates as `Nanos` does, never wraps.
    seed_with(&l, "top", &[tally("m", 1, i64::MAX - 5)], 0).await;
    let model: Arc<str> = Arc::from("m");
    admitted(&admit(&l, "top", &open, 100, 41).await);
    l.settle("top", 41, month_index(now_ms()), charge(&model, 100))
        .await
        .unwrap();
    assert_eq!(view(&l, "top").await.spent, Nanos::new(i64::MAX));
}

/// What Redis answers to `cmd`, as text (a string, or an integer written out).
async fn text(r: &RedisServer, cmd: &mut redis::Cmd) -> String {
    redis::from_redis_value(&raw(r, cmd).await).unwrap()
}

/// How Redis stores the reservations' hash and expiry index.
async fn encodings(r: &RedisServer) -> (String, String) {
    let of = |key: &str| redis::cmd("OBJECT").arg("ENCODING").arg(key).to_owned();
    (
        text(r, &mut of("{sg}:res")).await,
        text(r, &mut of("{sg}:resx")).await,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reservations_stay_in_hash_tables_and_their_pad_is_never_reaped_nor_charged() {
    let r = redis_or_skip!();
    let ttl = Duration::from_millis(200);
    let l = node(&r, 1, ttl);
    let model: Arc<str> = Arc::from("m");
    // The seed puts the pad in: with a few reservations open, Redis would otherwise keep
    // both as listpacks, walked entry by entry on every access.
    seed_empty(&l, "k").await;
    for res in 1..=3 {
        admitted(&admit(&l, "k", &hard(10_000), 100, res).await);
    }
    let want = ("hashtable".to_string(), "skiplist".to_string());
    assert_eq!(encodings(&r).await, want);
    for res in 1..=3 {
        assert_eq!(
            l.settle("k", res, month_index(now_ms()), charge(&model, 40))
                .await
                .unwrap(),
            Settled::Open
        );
    }
    // Every reservation settled: the pad alone is left, so the hash never empties (an
    // empty hash is deleted, and a new one would start as a listpack again).
    let fields: Vec<String> =
        redis::from_redis_value(&raw(&r, redis::cmd("HKEYS").arg("{sg}:res")).await).unwrap();
    assert_eq!(fields.len(), 1, "{fields:?}");
    assert!(fields[0].starts_with('~'), "{fields:?}");
    // Lost with the data (a FLUSHALL, a key deleted by hand): the next heartbeat puts it back.
    raw(&r, redis::cmd("DEL").arg("{sg}:res").arg("{sg}:resx")).await;
    l.heartbeat().await.unwrap();
    assert_eq!(encodings(&r).await, want);
    // Never due (its score is +inf) and no reservation: long past every TTL, nothing is
    // reaped and nothing but the three settlements is charged.
    tokio::time::sleep(3 * ttl).await;
    let reaper = node(&r, 2, Duration::from_secs(30));
    assert_eq!(reaper.reap().await.unwrap(), 0);
    admitted(&admit(&reaper, "k", &hard(10_000), 100, 1).await);
    let v = view(&reaper, "k").await;
    assert_eq!(v.spent, Nanos::new(120));
    assert!(
        v.by_model.iter().all(|t| &*t.model != "(orphaned)"),
        "{:?}",
        v.by_model
    );
    assert_eq!((v.reserved, v.inflight), (Nanos::new(100), 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reaps_the_keys_own_expired_reservations_first() {
    let r = redis_or_skip!();
    let limits = Limits {
        max_inflight: Some(1),
        ..Limits::default()
    };
    let dead = node(&r, 1, Duration::from_millis(200));
    admitted(&admit(&dead, "k", &limits, 0, 1).await);
    drop(dead);
    let other = node(&r, 2, Duration::from_secs(30));
    let e = rejected(admit(&other, "k", &limits, 0, 1).await);
    assert_eq!(e.code(), "concurrency_limit_exceeded");
    // No reap runs: once the dead node's TTL passes (on Redis' clock), the admission itself
    // frees its slot. A refusal consumes nothing, so poll until then. No budget, no charge.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match admit(&other, "k", &limits, 0, 2).await {
            a @ Admit::Admitted { .. } => {
                admitted(&a);
                break;
            }
            Admit::Rejected(e) if e.code() == "concurrency_limit_exceeded" => {
                assert!(
                    Instant::now() < deadline,
                    "the dead node's slot was never freed"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => panic!("{other:?}"),
        }
    }
    let v = view(&other, "k").await;
    assert_eq!((v.inflight, v.spent), (1, Nanos::ZERO));
    assert!(v.by_model.is_empty());
}

/// The sweep at the start of an admission takes every key's expired holds (the first 64
/// due), not only the admitted key's: a dead node's hold on one key is released and charged
/// at its estimate by an admission of another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_reaps_other_keys_expired_reservations_too() {
    let r = redis_or_skip!();
    let limits = Limits {
        max_inflight: Some(1),
        ..Limits::default()
    };
    let dead = node(&r, 1, Duration::from_millis(200));
    seed_empty(&dead, "a").await;
    admitted(&admit(&dead, "a", &limits, 700, 1).await);
    drop(dead);
    let other = node(&r, 2, Duration::from_secs(30));
    assert_eq!(view(&other, "a").await.inflight, 1);
    // No reap runs: admissions of "b" only. Once the dead node's TTL passes on Redis' clock,
    // one of them releases "a"'s hold and charges its estimate.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut res = 10;
    while view(&other, "a").await.inflight != 0 {
        assert!(
            Instant::now() < deadline,
            "the dead node's hold was never reaped"
        );
        admitted(&admit(&other, "b", &limits, 0, res).await);
        assert_eq!(
            Settled::Open,
            other
                .settle("b", res, month_index(now_ms()), None)
                .await
                .unwrap()
        );
        res += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = view(&other, "a").await;
    assert_eq!(v.spent, Nanos::new(700));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_calls_are_limited_by_rpm_and_rpd_but_counted_apart() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    let limits = Limits {
        rpm: Some(2),
        rpd: Some(3),
        ..Limits::default()
    };
    for _ in 0..2 {
        let s = l.admit_usage_call("k", &limits).await.unwrap().unwrap();
        // The headers report the model-request window, which usage calls do not touch.
        assert_eq!(s.remaining, Some(2));
    }
    let e = l.admit_usage_call("k", &limits).await.unwrap().unwrap_err();
    assert_eq!(e.code(), "rate_limit_exceeded");
    assert!(matches!(e.retry_after(), Some(59..=60)));
    let v = l.view("k", &limits).await.unwrap().unwrap();
    assert_eq!((v.requests_this_minute, v.requests_today), (0, 0));
    // Model requests have their own quota.
    let s = admitted(&admit(&l, "k", &limits, 0, 1).await);
    assert_eq!(s.remaining, Some(1));
    let v = l.view("k", &limits).await.unwrap().unwrap();
    assert_eq!((v.requests_this_minute, v.requests_today), (1, 1));

    let daily = Limits {
        rpd: Some(2),
        ..Limits::default()
    };
    for _ in 0..2 {
        l.admit_usage_call("d", &daily).await.unwrap().unwrap();
    }
    let e = l.admit_usage_call("d", &daily).await.unwrap().unwrap_err();
    assert_eq!(e.code(), "daily_rate_limit_exceeded");
    admitted(&admit(&l, "d", &daily, 0, 1).await);
    admitted(&admit(&l, "d", &daily, 0, 2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soft_budget_warns_once_reached_and_never_holds() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    seed_with(&l, "k", &[tally("m", 1, 999)], 0).await;
    let soft = Limits {
        budget: Some(Nanos::new(1_000)),
        hard_budget: false,
        ..Limits::default()
    };
    let model: Arc<str> = Arc::from("m");
    let s = admitted(
        &l.admit("k", &soft, &[], Nanos::new(1_000_000), None, 1)
            .await
            .unwrap(),
    );
    assert!(!s.budget_warning);
    assert_eq!(view(&l, "k").await.reserved, Nanos::ZERO);
    assert_eq!(
        Settled::Open,
        l.settle("k", 1, month_index(now_ms()), charge(&model, 5))
            .await
            .unwrap()
    );
    let s = admitted(
        &l.admit("k", &soft, &[], Nanos::new(1_000_000), None, 2)
            .await
            .unwrap(),
    );
    assert!(s.budget_warning);
    assert!(
        l.admit_usage_call("k", &soft)
            .await
            .unwrap()
            .unwrap()
            .budget_warning
    );
    let v = view(&l, "k").await;
    assert_eq!(v.by_model[0].requests, 2);
    assert_eq!(v.by_model[0].prompt_tokens, 20);
}

/// The call answered (Redis stopped or hung: the 300 ms command timeout answers instead of
/// Redis; a missing timeout would hang here until nextest's terminate-after) with the error
/// the gateway turns into 503 `limits_unavailable`. Its speed is not timed.
fn assert_unavailable<T: std::fmt::Debug>(r: Result<T, SharedError>) {
    let e = r.unwrap_err();
    assert!(
        e.to_string().starts_with("shared limits unavailable"),
        "{e}"
    );
}

/// Reaps on `l` until `n` reservations were reaped (their TTL passes on Redis' clock), and
/// checks no more than `n` were: the wait ends when the event happens, not after a guess.
async fn reaps(l: &RedisLimits, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut reaped = 0;
    while reaped < n {
        assert!(Instant::now() < deadline, "reaped {reaped} of {n} in 10 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
        reaped += l.reap().await.unwrap();
    }
    assert_eq!(reaped, n);
}

/// Polls until the node answers again, without recreating it.
async fn recovers(l: &RedisLimits) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if l.ping().await.is_ok() {
            return;
        }
        assert!(Instant::now() < deadline, "did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_fails_fast_and_the_node_recovers_when_it_is_back() {
    let mut r = redis_or_skip!();
    r.stop();
    // Created while Redis is down: no error until a call needs it.
    let l = RedisLimits::new(
        &r.url(),
        1,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .unwrap();
    assert_unavailable(
        l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, 1)
            .await,
    );
    r.restart();
    recovers(&l).await;
    seed_empty(&l, "k").await;
    admitted(
        &l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, 2)
            .await
            .unwrap(),
    );

    // Killed while connected: fails fast, and after a restart (empty, scripts flushed) asks
    // for a seed again.
    r.stop();
    assert_unavailable(
        l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, 3)
            .await,
    );
    assert_unavailable(l.settle("k", 2, month_index(now_ms()), None).await);
    r.restart();
    recovers(&l).await;
    assert!(matches!(
        l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, 4)
            .await
            .unwrap(),
        Admit::NeedSeed { .. }
    ));

    // Hung (SIGSTOP): connections stay open, nothing answers; the timeout answers instead.
    r.pause();
    for res in 5..9 {
        assert_unavailable(
            l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, res)
                .await,
        );
    }
    r.resume();
    recovers(&l).await;
    seed_empty(&l, "k").await;
    admitted(
        &l.admit("k", &Limits::default(), &[], Nanos::ZERO, None, 9)
            .await
            .unwrap(),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_round_trip_per_admit_and_per_settle() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let limits = Limits {
        rpm: Some(100),
        rpd: Some(100),
        max_inflight: Some(10),
        ..hard(1_000_000)
    };
    let model: Arc<str> = Arc::from("m");
    // Loads the scripts (a fresh Redis answers NOSCRIPT once per script).
    admitted(&admit(&l, "k", &limits, 100, 1).await);
    assert_eq!(
        Settled::Open,
        l.settle("k", 1, month_index(now_ms()), charge(&model, 10))
            .await
            .unwrap()
    );

    let mut monitor = RedisMonitor::start(&r);
    for res in 2..12 {
        monitor.commands_since_mark();
        admitted(
            &l.admit("k", &limits, &[], Nanos::new(100), None, res)
                .await
                .unwrap(),
        );
        assert_eq!(monitor.commands_since_mark(), 1, "admit");
        monitor.commands_since_mark();
        assert_eq!(
            Settled::Open,
            l.settle("k", res, month_index(now_ms()), charge(&model, 10))
                .await
                .unwrap()
        );
        assert_eq!(monitor.commands_since_mark(), 1, "settle");
    }

    // A Redis that lost its scripts and functions (a restart without persistence) costs one
    // load and a retry, once: a decision alone goes as a function of the library, which
    // FUNCTION LOAD gives back.
    raw(&r, redis::cmd("SCRIPT").arg("FLUSH")).await;
    raw(&r, redis::cmd("FUNCTION").arg("FLUSH")).await;
    monitor.commands_since_mark();
    admitted(
        &l.admit("k", &limits, &[], Nanos::new(100), None, 20)
            .await
            .unwrap(),
    );
    assert_eq!(monitor.commands_since_mark(), 3);
    monitor.commands_since_mark();
    admitted(
        &l.admit("k", &limits, &[], Nanos::new(100), None, 21)
            .await
            .unwrap(),
    );
    assert_eq!(monitor.commands_since_mark(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_calendar_agrees_with_clock_rs() {
    let r = redis_or_skip!();
    let code = concat!(
        include_str!("../src/shared/lua/common.lua"),
        "local out = {} for i = 1, #ARGV do out[i] = month_of_day(tonumber(ARGV[i])) end return out"
    );
    // Every day from 1900 to 2200, month ends, leap days and centuries included.
    let days: Vec<i64> = (-25_567..84_000).collect();
    for chunk in days.chunks(8_000) {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(code).arg(0).arg(chunk);
        let got: Vec<i64> = redis::from_redis_value(&raw(&r, &mut cmd).await).unwrap();
        let want: Vec<i64> = chunk.iter().map(|d| month_index(d * MS_PER_DAY)).collect();
        assert_eq!(got, want);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admission_whose_reply_was_lost_is_released_by_the_next_heartbeat() {
    let r = redis_or_skip!();
    let l = RedisLimits::new(
        &r.url(),
        1,
        Duration::from_secs(30),
        Duration::from_millis(300),
    )
    .unwrap();
    let limits = Limits {
        max_inflight: Some(1),
        rpm: Some(10),
        rpd: Some(10),
        ..hard(1_000)
    };
    seed_empty(&l, "k").await;
    // Redis knows the script (else it would answer NOSCRIPT, not run it).
    admitted(
        &l.admit("k", &limits, &[], Nanos::new(400), None, 0)
            .await
            .unwrap(),
    );
    assert_eq!(
        Settled::Open,
        l.settle("k", 0, month_index(now_ms()), None).await.unwrap()
    );
    // Redis hangs with the admission in its socket: the caller gets an error (and does not
    // forward the request), but Redis runs the script once it wakes up.
    r.pause();
    assert_unavailable(l.admit("k", &limits, &[], Nanos::new(400), None, 1).await);
    r.resume();
    let v = view(&l, "k").await;
    assert_eq!((v.inflight, v.reserved), (1, Nanos::new(400)));
    // The heartbeat settles the doubt: released, nothing charged.
    l.heartbeat().await.unwrap();
    let v = view(&l, "k").await;
    assert_eq!(
        (v.inflight, v.reserved, v.spent),
        (0, Nanos::ZERO, Nanos::ZERO)
    );
    // ... and the refused request's minute and day are given back (SPEC §2: a refused
    // request consumes no quota): only the first admission counts.
    let v = l.view("k", &limits).await.unwrap().unwrap();
    assert_eq!((v.requests_this_minute, v.requests_today), (1, 1));
    admitted(
        &l.admit("k", &limits, &[], Nanos::new(400), None, 2)
            .await
            .unwrap(),
    );
}

/// `max_usd_per_hour` in Redis: an admission holds its bound against the hour, settlement
/// replaces the hold with the real cost, and a dead node's hold is released when reaped and
/// its estimate (an upper bound) booked to the hour in its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hour_window_holds_bounds_settles_real_costs_and_reaps_dead_holds() {
    let r = redis_or_skip!();
    let limits = Limits {
        max_usd_per_hour: Some(Nanos::new(1_000)),
        ..Limits::default()
    };
    let model: Arc<str> = Arc::from("m");
    let live = node(&r, 2, Duration::from_secs(30));
    admitted(&admit(&live, "k", &limits, 600, 1).await);
    // 600 held: 401 more does not fit, 400 does.
    let e = rejected(admit(&live, "k", &limits, 401, 2).await);
    assert_eq!(e.code(), "spend_rate_exceeded");
    assert_eq!(e.retry_after(), Some(1), "only an open hold is in the way");
    // Settled at 100: the hold is gone, the cost stays for the hour.
    assert_eq!(
        Settled::Open,
        live.settle("k", 1, month_index(now_ms()), charge(&model, 100))
            .await
            .unwrap()
    );
    admitted(&admit(&live, "k", &limits, 900, 3).await);
    // 100 settled and 900 held: the hold may settle, for less, at any moment.
    let e = rejected(admit(&live, "k", &limits, 1, 4).await);
    assert_eq!(e.retry_after(), Some(1), "only the open hold is in the way");
    // A bound the settled 100 alone keeps out: it leaves the window an hour after it was
    // booked, never later.
    let e = rejected(admit(&live, "k", &limits, 950, 5).await);
    let retry = e.retry_after().unwrap();
    assert!((3599..=3600).contains(&retry), "Retry-After {retry}");
    assert_eq!(
        Settled::Open,
        live.settle("k", 3, month_index(now_ms()), None)
            .await
            .unwrap()
    );

    // A node dies holding 500; once reaped, its estimate counts (100 + 500), not its hold.
    let dead = node(&r, 1, Duration::from_millis(200));
    admitted(&admit(&dead, "k", &limits, 500, 1).await);
    drop(dead);
    reaps(&live, 1).await;
    admitted(&admit(&live, "k", &limits, 400, 5).await);
    rejected(admit(&live, "k", &limits, 1, 6).await);
    live.settle("k", 5, month_index(now_ms()), None)
        .await
        .unwrap();
    admitted(&admit(&live, "k", &limits, 400, 7).await);
}

/// `loop_limit` in Redis: per digest, refusals count nothing, other digests are apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_counts_are_per_digest_and_refusals_count_nothing() {
    let r = redis_or_skip!();
    let limits = Limits {
        loop_limit: Some(2),
        rpm: Some(3),
        ..Limits::default()
    };
    let (a, b) = (Some(0xA_u128), Some(0xB_u128));
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    for res in 1..=2 {
        admitted(
            &l.admit("k", &limits, &[], Nanos::ZERO, a, res)
                .await
                .unwrap(),
        );
    }
    for res in 3..=5 {
        let e = rejected(
            l.admit("k", &limits, &[], Nanos::ZERO, a, res)
                .await
                .unwrap(),
        );
        assert_eq!(e.code(), "loop_detected");
        assert!((59..=60).contains(&e.retry_after().unwrap()), "{e:?}");
    }
    // The refusals took no rpm slot: the third slot is still free, for another request.
    admitted(&l.admit("k", &limits, &[], Nanos::ZERO, b, 6).await.unwrap());
    let e = rejected(l.admit("k", &limits, &[], Nanos::ZERO, b, 7).await.unwrap());
    assert_eq!(e.code(), "rate_limit_exceeded");
}

/// A loop bucket counts until 60 s after its latest admission, which this version records
/// beside it with the bucket's value then. A bucket an older version added to (in a rolling
/// upgrade; older versions record nothing) no longer matches its record: it counts until the
/// end of its second plus 60 s, as older versions count it, so no admission of it leaves
/// early. Set up behind the gateway's back: a bucket of the second a minute ago, its record
/// at that second's start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_bucket_an_older_version_added_to_counts_until_its_second_ends() {
    let r = redis_or_skip!();
    let limits = Limits {
        loop_limit: Some(2),
        ..Limits::default()
    };
    let digest = 0xC0FFEE_u128;
    let hash = format!("{{sg}}:k:k:lp:{digest:032x}");
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    // Redis' clock, early in a second (so the admission below lands in the same second).
    let now_ms = loop {
        let redis::Value::Array(t) = raw(&r, &mut redis::cmd("TIME")).await else {
            panic!("TIME")
        };
        let int = |v: &redis::Value| match v {
            redis::Value::BulkString(b) => std::str::from_utf8(b).unwrap().parse::<i64>().unwrap(),
            other => panic!("{other:?}"),
        };
        let ms = int(&t[0]) * 1000 + int(&t[1]) / 1000;
        if ms % 1000 < 700 {
            break ms;
        }
        tokio::time::sleep(Duration::from_millis(350)).await;
    };
    let old_second = now_ms / 1000 - 60;
    for (recorded, res, outcome) in [("2", 1, "admitted"), ("1", 2, "refused")] {
        raw(&r, redis::cmd("DEL").arg(&hash).arg(format!("{hash}:l"))).await;
        raw(&r, redis::cmd("HSET").arg(&hash).arg(old_second).arg(2)).await;
        // Two admissions; recorded at the start of their second: by the record they left
        // the window a moment ago.
        raw(
            &r,
            redis::cmd("HSET")
                .arg(format!("{hash}:l"))
                .arg(old_second)
                .arg(format!("{}:{recorded}", old_second * 1000)),
        )
        .await;
        let a = l
            .admit("k", &limits, &[], Nanos::ZERO, Some(digest), res)
            .await
            .unwrap();
        match outcome {
            // The record matches the bucket: both left 60 s after it.
            "admitted" => {
                admitted(&a);
            }
            // The bucket holds one more than its record (an older node's): counted until its
            // second's end + 60 s, which is still ahead.
            _ => {
                let e = rejected(a);
                assert_eq!(e.code(), "loop_detected");
                assert_eq!(e.retry_after(), Some(1), "{e:?}");
            }
        }
    }
}

/// The hour hold rides in the reservation's record; a live node's heartbeat must still find
/// the key in it, so a long request of a capped key is never reaped while its node lives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_nodes_hold_on_a_capped_key_survives_its_ttl() {
    let r = redis_or_skip!();
    let limits = Limits {
        max_usd_per_hour: Some(Nanos::new(1_000)),
        loop_limit: Some(5),
        ..Limits::default()
    };
    // A TTL longer than any pause a loaded machine puts between two heartbeats (every 50 ms).
    let ttl = Duration::from_millis(600);
    let live = node(&r, 1, ttl);
    admitted(&admit(&live, "k", &limits, 600, 1).await);
    let beating = {
        let live = live.clone();
        tokio::spawn(async move {
            loop {
                live.heartbeat().await.unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // Time itself is the stimulus here: two TTLs pass (a lower bound, whatever the load).
    tokio::time::sleep(2 * ttl).await;
    // Both the key's own sweep (inside admit) and the global reap leave it open.
    let other = node(&r, 2, Duration::from_secs(30));
    let e = rejected(admit(&other, "k", &limits, 500, 1).await);
    assert_eq!(e.code(), "spend_rate_exceeded");
    assert_eq!(other.reap().await.unwrap(), 0);
    assert_eq!(view(&other, "k").await.inflight, 1);
    beating.abort();
}

/// Admits `n` requests of `key` at once (so they share batches), then settles them at once:
/// every one admitted and settled, each booked its 40. The node's round trips it took.
async fn burst(l: &Arc<RedisLimits>, key: &'static str, from: u64, n: u64) -> u64 {
    let limits = Limits {
        rpm: Some(10_000),
        max_inflight: Some(1_000),
        ..hard(1_000_000_000)
    };
    burst_of(l, key, from, n, limits, 40).await
}

/// [`burst`] with the key's `limits` and each request's `cost`.
async fn burst_of(
    l: &Arc<RedisLimits>,
    key: &'static str,
    from: u64,
    n: u64,
    limits: Limits,
    cost: i64,
) -> u64 {
    let before = l.round_trips();
    let start = Arc::new(tokio::sync::Barrier::new(n as usize));
    let mut tasks = Vec::new();
    for res in from..from + n {
        let (l, start) = (l.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            admitted(&admit(&l, key, &limits, 100, res).await);
            let model: Arc<str> = Arc::from("m");
            let c = charge(&model, cost);
            l.settle(key, res, month_index(now_ms()), c).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Settled::Open);
    }
    l.round_trips() - before
}

/// `INFO commandstats`' call count of `command` (lower case).
async fn calls_of(r: &RedisServer, command: &str) -> u64 {
    let info: String =
        redis::from_redis_value(&raw(r, redis::cmd("INFO").arg("commandstats")).await).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// Batches run as a Redis function: `batch.lua` loaded once as a library, so a call does
/// not define every one of its functions anew. A Redis that lost the library (flushed, or a
/// failover to a server that never had it) gets it again from the next batch; a user whose
/// ACL allows scripts but not functions, and a Redis without functions (before 7.0; here
/// FCALL renamed away), run the same batches as a script, and so does a Redis out of memory
/// (which refuses a function whole, but runs the settlements of a script). Every operation
/// is decided and booked the same way on all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_run_as_a_function_where_redis_has_them_and_as_a_script_where_not() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    let libraries = |r: &RedisServer| {
        let url = r.url();
        async move {
            let client = redis::Client::open(url).unwrap();
            let mut con = client.get_multiplexed_async_connection().await.unwrap();
            let list: redis::Value = redis::cmd("FUNCTION")
                .arg("LIST")
                .query_async(&mut con)
                .await
                .unwrap();
            format!("{list:?}").matches("spidergate_").count()
        }
    };
    let trips = burst(&l, "k", 0, 60).await;
    assert!(
        trips < 120,
        "{trips} round trips for 120 operations: none batched"
    );
    let fcalls = calls_of(&r, "fcall").await;
    assert!(fcalls > 0, "no batch ran as a function");
    // One library, three functions in it (batches, and an admission or a settlement alone).
    assert_eq!(libraries(&r).await, 4);

    // Flushed: the next batch loads it again, and every operation still goes through.
    raw(&r, redis::cmd("FUNCTION").arg("FLUSH")).await;
    assert_eq!(libraries(&r).await, 0);
    burst(&l, "k", 100, 60).await;
    assert_eq!(libraries(&r).await, 4);
    assert!(calls_of(&r, "fcall").await > fcalls);
    let v = view(&l, "k").await;
    assert_eq!(v.spent, Nanos::new(40 * 120));
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));

    // A user that may run scripts but not functions (ACL): batches as scripts.
    raw(
        &r,
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg("scripts-only")
            .arg("on")
            .arg(">pw")
            .arg("~*")
            .arg("&*")
            .arg("+@all")
            .arg("-fcall")
            .arg("-function"),
    )
    .await;
    let url = r.url().replace("redis://", "redis://scripts-only:pw@");
    let l = Arc::new(
        RedisLimits::new(&url, 2, Duration::from_secs(30), Duration::from_secs(2)).unwrap(),
    );
    let (fcalls, evalshas) = (calls_of(&r, "fcall").await, calls_of(&r, "evalsha").await);
    let trips = burst(&l, "k", 200, 60).await;
    assert!(
        trips < 120,
        "{trips} round trips for 120 operations: none batched"
    );
    assert_eq!(calls_of(&r, "fcall").await, fcalls);
    assert!(calls_of(&r, "evalsha").await > evalshas);
    assert_eq!(view(&l, "k").await.spent, Nanos::new(40 * 180));

    // Out of memory: Redis refuses a function whole, but runs settlements as a script (they
    // free memory), so the node sends those batches as the script.
    let l = node(&r, 3, Duration::from_secs(30));
    let limits = Limits {
        max_inflight: Some(1_000),
        ..hard(1_000_000_000)
    };
    for res in 300..340 {
        admitted(&admit(&l, "k", &limits, 100, res).await);
    }
    raw(
        &r,
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("1"),
    )
    .await;
    let (fcalls, evalshas) = (calls_of(&r, "fcall").await, calls_of(&r, "evalsha").await);
    let start = Arc::new(tokio::sync::Barrier::new(40));
    let mut tasks = Vec::new();
    for res in 300..340u64 {
        let (l, start) = (l.clone(), start.clone());
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let model: Arc<str> = Arc::from("m");
            l.settle("k", res, month_index(now_ms()), charge(&model, 40))
                .await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Ok(Settled::Open));
    }
    raw(
        &r,
        redis::cmd("CONFIG").arg("SET").arg("maxmemory").arg("0"),
    )
    .await;
    assert_eq!(calls_of(&r, "fcall").await, fcalls);
    assert!(calls_of(&r, "evalsha").await >= evalshas + 2);
    let v = view(&l, "k").await;
    assert_eq!(v.spent, Nanos::new(40 * 220));
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));

    // A Redis without FCALL: batches as scripts, from the first.
    let Some(old) = RedisServer::start_with(&["--rename-command", "FCALL", ""]) else {
        return;
    };
    let l = node(&old, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    let trips = burst(&l, "k", 0, 60).await;
    assert!(
        trips < 120,
        "{trips} round trips for 120 operations: none batched"
    );
    burst(&l, "k", 100, 60).await;
    assert_eq!(calls_of(&old, "fcall").await, 0);
    assert!(calls_of(&old, "evalsha").await > 0);
    let v = view(&l, "k").await;
    assert_eq!(v.spent, Nanos::new(40 * 120));
    assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0));
}

/// Under load a node sends the admissions and settlements that wait for Redis together, in
/// one script call (`batch.lua`). Many callers at once on one node, some of them on a key
/// with a brake (run one by one inside the batch), some on a lone key with a hard budget, an
/// rpm and an in-flight cap (decided from figures the batch reads once): every limit is
/// still exact, and the calls were fewer than the operations.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_admissions_share_round_trips_and_every_limit_stays_exact() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "lone").await;
    seed_empty(&l, "braked").await;
    // 30 holds of 100 fit the budget; the rpm (100) and the in-flight cap (35) do not bind
    // before it.
    let lone = Limits {
        rpm: Some(100),
        rpd: Some(1_000),
        max_inflight: Some(35),
        ..hard(3_000)
    };
    // The hour cap admits 12 bounds of 100.
    let braked = Limits {
        max_usd_per_hour: Some(Nanos::new(1_200)),
        rpm: Some(1_000),
        ..Limits::default()
    };
    let model: Arc<str> = Arc::from("m");
    let before = l.round_trips();
    let start = Arc::new(tokio::sync::Barrier::new(160));
    let mut tasks = Vec::new();
    for res in 0..160u64 {
        let (l, start) = (l.clone(), start.clone());
        let (key, limits) = if res % 4 == 0 {
            ("braked", braked)
        } else {
            ("lone", lone)
        };
        tasks.push(tokio::spawn(async move {
            start.wait().await;
            let a = l
                .admit(key, &limits, &[], Nanos::new(100), None, res)
                .await
                .unwrap();
            (key, res, a)
        }));
    }
    let mut admitted_ids = Vec::new();
    for t in tasks {
        let (key, res, a) = t.await.unwrap();
        match a {
            Admit::Admitted { .. } => admitted_ids.push((key, res)),
            Admit::Rejected(e) => assert_eq!(
                e.code(),
                if key == "lone" {
                    "budget_exceeded"
                } else {
                    "spend_rate_exceeded"
                }
            ),
            other => panic!("{other:?}"),
        }
    }
    let count = |k: &str| admitted_ids.iter().filter(|(key, _)| *key == k).count();
    assert_eq!((count("lone"), count("braked")), (30, 12));
    let lone_view = view(&l, "lone").await;
    assert_eq!(
        (lone_view.reserved, lone_view.inflight),
        (Nanos::new(3_000), 30)
    );
    // Settled all at once too: each books its real cost and gives its hold back.
    let mut tasks = Vec::new();
    for (key, res) in admitted_ids {
        let (l, model) = (l.clone(), model.clone());
        tasks.push(tokio::spawn(async move {
            let c = charge(&model, 40);
            l.settle(key, res, month_index(now_ms()), c).await.unwrap()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), Settled::Open);
    }
    let calls = l.round_trips() - before;
    assert!(
        calls < 160 + 42,
        "{calls} calls for 202 operations: none shared a round trip"
    );
    for (key, n) in [("lone", 30), ("braked", 12)] {
        let v = l.view(key, &lone).await.unwrap().unwrap();
        assert_eq!(v.spent, Nanos::new(40 * n), "{key}");
        assert_eq!((v.reserved, v.inflight), (Nanos::ZERO, 0), "{key}");
        assert_eq!(
            (v.requests_this_minute, v.requests_today),
            (n as u32, n as u32)
        );
        let m = v.by_model.iter().find(|t| &*t.model == "m").unwrap();
        assert_eq!((m.requests, m.prompt_tokens), (n as u64, 10 * n as u64));
    }
    // The budget freed by the settlements is there again, exactly: 3000 - 30 × 40 = 1800,
    // so 18 holds of 100.
    let mut more = 0;
    for res in 1_000..1_040u64 {
        match l
            .admit("lone", &lone, &[], Nanos::new(100), None, res)
            .await
            .unwrap()
        {
            Admit::Admitted { .. } => more += 1,
            Admit::Rejected(e) => assert_eq!(e.code(), "budget_exceeded"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(more, 18);
}

/// One operation of a test batch: kind, key, arguments, the reservation an admission opens.
type BatchOp = (
    &'static str,
    String,
    Vec<String>,
    Option<(i64, i64, &'static str)>,
);

/// A script's reply as its integers: an integer, or an array of them.
fn ints_of(v: &redis::Value) -> Vec<i64> {
    match v {
        redis::Value::Array(a) => a
            .iter()
            .map(|x| redis::from_redis_value::<i64>(x).unwrap())
            .collect(),
        v => vec![redis::from_redis_value::<i64>(v).unwrap()],
    }
}

/// `batch.lua`'s reply, one string: the operations' replies separated by `;`, each one's
/// integers by `,`, every one written in full (never with an exponent).
fn batch_ints(s: &str) -> Vec<Vec<i64>> {
    s.split(';')
        .map(|op| {
            op.split(',')
                .map(|n| n.parse().unwrap_or_else(|e| panic!("{n:?} in {s:?}: {e}")))
                .collect()
        })
        .collect()
}

/// `batch.lua` decides every operation exactly as `admit.lua` and `settle.lua` one by one
/// would: the same replies and the same Redis contents, key for key, over random batches of
/// admissions (some with brakes, some of an unseeded key) and settlements (some of reaped
/// or unknown reservations), on a clock both servers read from a key the test sets; the
/// batches sent as the script and as the function in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_decides_exactly_as_one_by_one() {
    let (Some(one), Some(batched)) = (RedisServer::start(), RedisServer::start()) else {
        return;
    };
    let fake = |s: String| s.replace("redis.call('TIME')", "{redis.call('GET', 'clock'), '0'}");
    let common = include_str!("../src/shared/lua/common.lua");
    let admit_lua = fake(format!(
        "{common}{}",
        include_str!("../src/shared/lua/admit.lua")
    ));
    let settle_lua = fake(format!(
        "{common}{}",
        include_str!("../src/shared/lua/settle.lua")
    ));
    let seed_lua = fake(format!(
        "{common}{}",
        include_str!("../src/shared/lua/seed.lua")
    ));
    let batch_body = fake(format!(
        "{common}local function admit_one(KEYS, ARGV, now_ms)\n{}\nend\nlocal function settle_one(KEYS, ARGV)\n{}\nend\n{}\n",
        include_str!("../src/shared/lua/admit.lua"),
        include_str!("../src/shared/lua/settle.lua"),
        include_str!("../src/shared/lua/batch.lua")
    ));
    // The batch both ways a node sends it: as a script, and as a function of a library (whose
    // locals outlive each call: the rounds alternate, so a value one call left behind would
    // show in the next).
    let batch_lua = format!("{batch_body}return batch(ARGV)\n");
    let library = format!(
        "#!lua name=sgtest\n{batch_body}\n\
         redis.register_function('sgtest_batch', function(_, args) return batch(args) end)\n"
    );
    let con = |r: &RedisServer| {
        let url = r.url();
        async move {
            redis::Client::open(url)
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap()
        }
    };
    let (mut a, mut b) = (con(&one).await, con(&batched).await);
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(&library)
        .query_async(&mut b)
        .await
        .unwrap();
    let mut secs: i64 = 1_764_900_000;
    let day = secs * 1_000 / MS_PER_DAY;
    let month = month_index(secs * 1_000);
    for c in [&mut a, &mut b] {
        let _: () = redis::cmd("SET")
            .arg("clock")
            .arg(secs)
            .query_async(c)
            .await
            .unwrap();
        // "k3" is never seeded: its admissions answer NeedSeed. "k5" has spent far more
        // than a double holds exactly (its refusals carry figures of 19 digits).
        for k in ["k1", "k2", "k4", "k5"] {
            let spent: i64 = if k == "k5" {
                999_999_999_999_999_999
            } else {
                1_000
            };
            let _: i64 = redis::cmd("EVAL")
                .arg(&seed_lua)
                .arg(1)
                .arg(format!("{{sg}}:k:{k}"))
                .arg(month)
                .arg(day)
                .arg(2)
                .arg(9_999_999_999_999i64)
                .arg(spent)
                .arg(0)
                .query_async(c)
                .await
                .unwrap();
        }
    }
    // rpm, rpd, cap, hard, max_inflight per key.
    let limits = |k: &str| -> [i64; 5] {
        match k {
            "k1" => [8, 400, 400_000, 1, 4],
            "k2" => [-1, 150, 50_000, 0, -1],
            "k3" => [5, 5, -1, 0, -1],
            "k4" => [30, 700, 900_000, 1, 6],
            _ => [-1, 60, 30_000, 1, -1],
        }
    };
    let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let mut open: Vec<(i64, i64, &str)> = Vec::new();
    let mut res_id = 1;
    let mut kinds = std::collections::BTreeMap::new();
    for round in 0..250 {
        // One batch of one node: (kind, key, args, the reservation an admission opens).
        let node = 1 + next(2) as i64;
        let ttl = if next(3) == 0 { 2_000 } else { 30_000 };
        let mut ops: Vec<BatchOp> = Vec::new();
        let mut settleable: Vec<_> = open.iter().filter(|o| o.0 == node).copied().collect();
        for _ in 0..1 + next(12) {
            let roll = next(100);
            if !settleable.is_empty() && roll < 45 {
                let (node, res, k) = settleable.remove(next(settleable.len() as u64) as usize);
                open.retain(|o| *o != (node, res, k));
                let charged = next(5) != 0;
                let model = if next(2) == 0 { "m1" } else { "m2" };
                let args = vec![
                    node.to_string(),
                    res.to_string(),
                    i64::from(charged).to_string(),
                    if charged { model } else { "" }.to_string(),
                    next(100).to_string(),
                    next(100).to_string(),
                    if charged { next(900) } else { 0 }.to_string(),
                    month.to_string(),
                ];
                ops.push(("s", format!("{{sg}}:k:{k}"), args, None));
            } else if roll < 50 {
                // A reservation Redis never had (lost with its data).
                let args = [node.to_string(), "1000000".into()]
                    .into_iter()
                    .chain(["1", "m1", "1", "1", "5"].map(String::from))
                    .chain([month.to_string()])
                    .collect();
                ops.push(("s", "{sg}:k:k1".into(), args, None));
            } else {
                let k = ["k1", "k2", "k4", "k4", "k5", "k3"]
                    [next(if roll < 55 { 6 } else { 5 }) as usize];
                let [rpm, rpd, cap, hard, mi] = limits(k);
                let mut held = if hard == 1 { next(3_000) as i64 } else { 0 };
                if next(40) == 0 {
                    // Too long for a double: decided one by one inside the batch.
                    held += 10_000_000_000_000_000;
                }
                let mut args: Vec<String> = [rpm, rpd, cap, hard, mi, held, ttl, held]
                    .iter()
                    .map(|n| n.to_string())
                    .collect();
                args.splice(0..0, [k.to_string(), node.to_string(), res_id.to_string()]);
                if next(7) == 0 {
                    // The brakes' placeholders: the one-by-one path inside the batch.
                    args.extend(["-1", "0", "-1", ""].map(String::from));
                }
                ops.push(("a", format!("{{sg}}:k:{k}"), args, Some((node, res_id, k))));
                res_id += 1;
            }
        }
        let mut one_by_one = Vec::new();
        for (kind, key, args, _) in &ops {
            let code = if *kind == "a" {
                &admit_lua
            } else {
                &settle_lua
            };
            let v: redis::Value = redis::cmd("EVAL")
                .arg(code)
                .arg(1)
                .arg(key)
                .arg(args)
                .query_async(&mut a)
                .await
                .unwrap();
            one_by_one.push(ints_of(&v));
        }
        // The batch, as `RedisLimits` sends it: the node and ttl once, then each operation in
        // its short form ('A': an admission without levels or brakes, mostly; 'S') or whole.
        let mut cmd = if round % 2 == 0 {
            let mut c = redis::cmd("EVAL");
            c.arg(&batch_lua);
            c
        } else {
            let mut c = redis::cmd("FCALL");
            c.arg("sgtest_batch");
            c
        };
        cmd.arg(1).arg("{sg}:res").arg(node).arg(ttl);
        for (kind, key, args, _) in &ops {
            match (*kind, args.len()) {
                ("a", 11) if next(5) != 0 => {
                    cmd.arg("A").arg(&args[0]).arg(&args[2..9]).arg(&args[10]);
                }
                ("a", _) => {
                    cmd.arg("a").arg(1).arg(args.len()).arg(key).arg(args);
                }
                _ => {
                    cmd.arg("S").arg(key).arg(&args[1..]);
                }
            }
        }
        let together: String = cmd.query_async(&mut b).await.unwrap();
        assert_eq!(one_by_one, batch_ints(&together), "{ops:?}");
        for ((kind, _, _, tag), v) in ops.iter().zip(&one_by_one) {
            let first = if *kind == "a" { v[0] } else { 10 + v[0] };
            *kinds.entry((*kind, first)).or_insert(0) += 1;
            if let (Some(t), 1) = (tag, first) {
                open.push(*t);
            }
        }
        secs += [0, 0, 1, 3, 8, 20][next(6) as usize] + if next(30) == 0 { 61 } else { 0 };
        for c in [&mut a, &mut b] {
            let _: () = redis::cmd("SET")
                .arg("clock")
                .arg(secs)
                .query_async(c)
                .await
                .unwrap();
        }
    }
    // Every outcome came up: admitted, seed needed, budget, rpm, rpd, in-flight; settled
    // open, reaped, lost.
    for want in [
        ("a", 1),
        ("a", 0),
        ("a", 2),
        ("a", 3),
        ("a", 4),
        ("a", 5),
        ("s", 11),
        ("s", 10),
        ("s", 12),
    ] {
        assert!(
            kinds.contains_key(&want),
            "{want:?} never happened: {kinds:?}"
        );
    }
    // The same contents, key for key (expiry times aside).
    async fn dump(c: &mut redis::aio::MultiplexedConnection) -> Vec<(String, String)> {
        let mut keys: Vec<String> = redis::cmd("KEYS").arg("*").query_async(c).await.unwrap();
        keys.sort();
        let mut out = Vec::new();
        for k in keys {
            let t: String = redis::cmd("TYPE").arg(&k).query_async(c).await.unwrap();
            let v: redis::Value = match t.as_str() {
                "string" => redis::cmd("GET").arg(&k).query_async(c).await.unwrap(),
                "hash" => {
                    let mut h: Vec<(String, String)> =
                        redis::cmd("HGETALL").arg(&k).query_async(c).await.unwrap();
                    h.sort();
                    out.push((k, format!("{h:?}")));
                    continue;
                }
                "zset" => redis::cmd("ZRANGE")
                    .arg(&k)
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES")
                    .query_async(c)
                    .await
                    .unwrap(),
                _ => {
                    let mut m: Vec<String> =
                        redis::cmd("SMEMBERS").arg(&k).query_async(c).await.unwrap();
                    m.sort();
                    out.push((k, format!("{m:?}")));
                    continue;
                }
            };
            out.push((k, format!("{v:?}")));
        }
        out
    }
    let (da, db) = (dump(&mut a).await, dump(&mut b).await);
    assert!(da.len() > 20, "{da:?}");
    assert_eq!(da, db);
}

/// The batches of a node are sent by their own task, so a caller that goes away (its request
/// cancelled while it waits for Redis) fails no other caller's operation; an admission it
/// left behind that Redis took is released by the next heartbeat (it was never forwarded).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_caller_that_goes_away_fails_no_other_and_its_admission_is_released() {
    let r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    seed_empty(&l, "k").await;
    let limits = Limits {
        max_inflight: Some(1_000),
        ..hard(1_000_000)
    };
    let (mut kept, mut gone) = (Vec::new(), Vec::new());
    for res in 0..120u64 {
        let l = l.clone();
        let t = tokio::spawn(async move {
            l.admit("k", &limits, &[], Nanos::new(100), None, res)
                .await
                .unwrap()
        });
        if res % 2 == 0 {
            gone.push(t);
        } else {
            kept.push(t);
        }
    }
    for t in &gone {
        t.abort();
    }
    for t in kept {
        admitted(&t.await.unwrap());
    }
    // An aborted caller that had its answer before the abort holds its admission.
    let mut finished = 0;
    for t in gone {
        if let Ok(a) = t.await {
            admitted(&a);
            finished += 1;
        }
    }
    assert_eq!(
        l.settle("k", 999_999, month_index(now_ms()), None)
            .await
            .unwrap(),
        Settled::Lost
    );
    // A later call returning does not mean every earlier one was answered: two calls can be
    // out at once, and the other may still be on its way back. An admission whose answer
    // reaches no caller is released by the first heartbeat after that answer came; so
    // heartbeats until the figures settle, which must be exactly the callers' admissions,
    // and never fewer.
    let expected = 60 + finished;
    let mut v = view(&l, "k").await;
    for _ in 0..50 {
        l.heartbeat().await.unwrap();
        v = view(&l, "k").await;
        assert!(
            v.inflight >= expected,
            "{} released beyond the callers'",
            v.inflight
        );
        if v.inflight == expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(v.inflight, expected);
    assert_eq!(v.reserved, Nanos::new(100 * i64::from(expected)));
    assert_eq!(v.requests_today, expected);
}

/// The batches' lean connections (`shared::resp`) connect as the URL says, like the client's
/// own: its user and password (the default user may only PING) and its database. A
/// request alone and a concurrent burst (both go through the lean connections) are
/// decided, and their keys are in database 3, not 0.
#[tokio::test]
async fn the_urls_user_password_and_database_hold_for_every_connection() {
    let Some(r) = RedisServer::start_with(&[
        "--user", "default", "on", "nopass", "+ping", "--user", "agent", "on", ">s3cret", "~*",
        "&*", "+@all",
    ]) else {
        return;
    };
    let url = format!("redis://agent:s3cret@127.0.0.1:{}/3", r.port());
    let l = Arc::new(
        RedisLimits::new(&url, 1, Duration::from_secs(60), Duration::from_secs(2)).unwrap(),
    );
    let limits = Limits {
        rpm: Some(1_000),
        ..hard(1_000_000)
    };
    admitted(&admit(&l, "k-auth", &limits, 10, 1).await);
    let model: Arc<str> = Arc::from("m");
    l.settle("k-auth", 1, month_index(now_ms()), charge(&model, 7))
        .await
        .unwrap();
    let burst: Vec<_> = (0..40u64)
        .map(|i| {
            let l = l.clone();
            let model = model.clone();
            tokio::spawn(async move {
                let a = admit(&l, "k-auth", &limits, 10, 100 + i).await;
                let Admit::Admitted { month, .. } = a else {
                    panic!("expected admission, got {a:?}");
                };
                l.settle("k-auth", 100 + i, month, charge(&model, 7))
                    .await
                    .unwrap();
            })
        })
        .collect();
    for b in burst {
        b.await.unwrap();
    }
    let v = view(&l, "k-auth").await;
    assert_eq!(
        (v.spent, v.reserved, v.inflight),
        (Nanos::new(41 * 7), Nanos::ZERO, 0)
    );
    let dbsize = |db: &str| {
        let out = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &r.port().to_string(),
                "--user",
                "agent",
                "--pass",
                "s3cret",
            ])
            .args(["--no-auth-warning", "-n", db, "DBSIZE"])
            .output()
            .expect("redis-cli");
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        text.parse::<u64>()
            .unwrap_or_else(|_| panic!("DBSIZE: {text:?}"))
    };
    assert!(dbsize("3") > 0, "the keys are in database 3");
    assert_eq!(dbsize("0"), 0, "nothing in database 0");
}

/// Connections Redis has accepted so far (`INFO stats`), read with `redis-cli` (which is one).
fn connections_received(r: &RedisServer) -> u64 {
    let out = std::process::Command::new("redis-cli")
        .args(["-p", &r.port().to_string(), "INFO", "stats"])
        .output()
        .expect("redis-cli");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    text.lines()
        .find_map(|l| l.strip_prefix("total_connections_received:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("INFO stats: {text}"))
}

/// The batches' lean connections are kept: sequential admissions and settlements make no
/// new connection. One left idle while Redis restarted is replaced before a call is lost on
/// it (the first admission after the restart is decided, not failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lean_connections_are_kept_and_one_closed_while_idle_is_replaced() {
    let mut r = redis_or_skip!();
    let l = node(&r, 1, Duration::from_secs(30));
    let limits = hard(1_000_000);
    let model: Arc<str> = Arc::from("m");
    admitted(&admit(&l, "k", &limits, 10, 1).await);
    l.settle("k", 1, month_index(now_ms()), charge(&model, 1))
        .await
        .unwrap();
    let before = connections_received(&r);
    for res in 2..22 {
        admitted(&admit(&l, "k", &limits, 10, res).await);
        l.settle("k", res, month_index(now_ms()), charge(&model, 1))
            .await
            .unwrap();
    }
    // The second `redis-cli` is the one new connection.
    assert_eq!(
        connections_received(&r) - before,
        1,
        "a connection per call"
    );

    r.stop();
    r.restart();
    recovers(&l).await;
    // The runtime sees the old connections' close.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after_restart = l.admit("k", &limits, &[], Nanos::new(10), None, 30).await;
    assert!(
        matches!(after_restart, Ok(Admit::NeedSeed { .. })),
        "{after_restart:?}"
    );
}
