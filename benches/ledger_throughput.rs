//! How many ledger entries per second the `SpendLedger` writer commits to a real SQLite file.
//!
//! `cargo bench --bench ledger_throughput [-- --entries N]`
//!
//! Records N realistic entries (about 1000 keys, 3 models, mostly admitted) as fast as one
//! thread can, then waits for `flush_blocking`; the clock runs from the first `record` to the
//! end of the flush. Afterwards it reopens the database and checks that every trace, every
//! admitted request and every nano-dollar landed, so the figure cannot come from dropped work.
//! If `target/bench/gateway_rps.txt` exists (written by `benches/wrk_compare.sh`) it also
//! prints entries/s divided by the gateway's measured requests/s; the bar is 5x.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use spidergate::clock::{day_index, day_label, month_index, month_label, now_ms};
use spidergate::ledger::SpendLedger;
use spidergate::money::Nanos;
use spidergate::store::{LedgerEntry, Store, TraceRow};

const KEYS: usize = 1000;
const MODELS: [(&str, &str, i64, i64); 3] = [
    // id, provider, nano-dollars per prompt token, per completion token
    ("gpt-4o-mini", "mock", 150, 600),
    ("gpt-4o", "mock", 2500, 10_000),
    ("llama-3.1-8b-instant", "mock", 0, 0),
];
const BAR: f64 = 5.0;

/// Small deterministic PRNG (xorshift64*), so runs are comparable.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

struct Expected {
    traces: u64,
    admitted: u64,
    cost_nanos: i64,
}

fn make_entries(n: usize, now: i64) -> (Vec<LedgerEntry>, Expected) {
    let key_ids: Vec<String> = (0..KEYS).map(|i| format!("key_{i:016x}")).collect();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut exp = Expected {
        traces: 0,
        admitted: 0,
        cost_nanos: 0,
    };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let key = &key_ids[rng.below(KEYS as u64) as usize];
        let (model, provider, pin, pout) = MODELS[rng.below(3) as usize];
        // ~95% admitted and served; the rest rejected (429/402/403) with no spend.
        let admitted = rng.below(100) < 95;
        let (status, error_code, prompt, completion) = if admitted {
            (200u16, None, 8 + rng.below(2000), 1 + rng.below(800))
        } else {
            let codes = [
                (429, "rate_limit_exceeded"),
                (402, "budget_exceeded"),
                (403, "model_not_allowed"),
            ];
            let (s, c) = codes[rng.below(3) as usize];
            (s, Some(c.to_string()), 0, 0)
        };
        let cost = if admitted {
            pin * prompt as i64 + pout * completion as i64
        } else {
            0
        };
        let trace = TraceRow {
            id: 0,
            ts: now + i as i64 / 50,
            key_id: Some(key.as_str().into()),
            endpoint: "chat.completions".into(),
            requested_model: Some(model.into()),
            served_model: admitted.then(|| model.into()),
            provider: admitted.then(|| provider.into()),
            status,
            error_code: error_code.map(Into::into),
            latency_ms: 20 + rng.below(3000) as i64,
            ttfb_ms: admitted.then(|| 5 + rng.below(500) as i64),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost: Nanos::new(cost),
            usage_estimated: admitted && rng.below(50) == 0,
            fallback_from: None,
            trace_id: None,
            unit: Some("token".into()),
            units: 0,
        };
        exp.traces += 1;
        if admitted {
            exp.admitted += 1;
            exp.cost_nanos += cost;
        }
        out.push(LedgerEntry {
            trace,
            admitted,
            counted: admitted,
            journal_id: None,
            keep_trace: true,
            span: None,
        });
    }
    (out, exp)
}

fn verify(db: &Path, now: i64, exp: &Expected) -> Result<(), String> {
    let store = Store::open(db).map_err(|e| e.to_string())?;
    let month = month_label(month_index(now));
    let day = day_label(day_index(now));
    let spend: i64 = store
        .spend_by_key(&month)
        .map_err(|e| e.to_string())?
        .values()
        .flatten()
        .map(|t| t.spent.get())
        .sum();
    let requests: u64 = store
        .requests_by_key(&day)
        .map_err(|e| e.to_string())?
        .values()
        .map(|&r| r as u64)
        .sum();
    drop(store);
    let conn = rusqlite::Connection::open(db).map_err(|e| e.to_string())?;
    let traces: i64 = conn
        .query_row("SELECT COUNT(*) FROM traces", [], |r| r.get(0))
        .map_err(|e| e.to_string())?;
    println!(
        "verify: traces {traces} (want {}), admitted requests {requests} (want {}), \
         spend {spend} nano-USD (want {})",
        exp.traces, exp.admitted, exp.cost_nanos
    );
    if traces as u64 != exp.traces || requests != exp.admitted || spend != exp.cost_nanos {
        return Err("the database does not hold what was recorded".into());
    }
    Ok(())
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() {
    // `cargo bench` passes `--bench`; libtest-style filters are ignored.
    let n: usize = arg("--entries")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let db: PathBuf = dir.path().join("ledger.db");
    let now = now_ms();
    let (entries, exp) = make_entries(n, now);

    let ledger = SpendLedger::new(
        spidergate::store::StoreLocation::Sqlite(db.clone()),
        None,
        Duration::from_millis(500),
        30,
        usize::MAX,
        None,
    );
    ledger.start().expect("start the ledger writer");
    let t0 = Instant::now();
    for e in entries {
        ledger.record(e);
    }
    let queued = t0.elapsed();
    assert!(ledger.flush_blocking(), "flush did not complete");
    let elapsed = t0.elapsed();
    drop(ledger);

    let rate = n as f64 / elapsed.as_secs_f64();
    println!(
        "ledger_throughput: {n} entries ({KEYS} keys, {} models) committed in {:.3} s \
         (queued in {:.3} s) => {:.0} entries/s",
        MODELS.len(),
        elapsed.as_secs_f64(),
        queued.as_secs_f64(),
        rate
    );
    if let Err(e) = verify(&db, now, &exp) {
        eprintln!("ledger_throughput: FAIL: {e}");
        std::process::exit(1);
    }

    let rps_file = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench/gateway_rps.txt");
    match std::fs::read_to_string(&rps_file)
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|r| *r > 0.0)
    {
        Some(rps) => {
            let ratio = rate / rps;
            println!(
                "ledger entries/s / gateway rps = {rate:.0} / {rps:.0} = {ratio:.2}x (bar >= {BAR}x): {}",
                if ratio >= BAR { "PASS" } else { "FAIL" }
            );
        }
        None => println!(
            "no {} yet: run benches/wrk_compare.sh first to compare against the gateway's rps",
            rps_file.display()
        ),
    }
}
