//! Cold start with many keys: mints N keys (default 1,000,000) into a fresh SQLite file, then
//! starts the release gateway on it and times start -> first `/health` 200, and reads the
//! gateway's RSS once it serves. Goal: under 3 s for 1,000,000 keys.
//!
//! Run: `cargo bench --bench cold_start [-- --keys 1000000] [--db PATH] [--runs 3]`
//!
//! `--db PATH` keeps the minted database at PATH and reuses it on later runs when it
//! already holds N keys (minting 1,000,000 keys takes about a minute). `--runs R` starts
//! the gateway R times on the same database and prints each run.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_spidergate");

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn healthy(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn main() {
    let n: usize = arg("--keys")
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = arg("--runs").and_then(|s| s.parse().ok()).unwrap_or(1);
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let db = arg("--db").map_or_else(|| dir.path().join("keys.db"), std::path::PathBuf::from);
    let config = dir.path().join("gw.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"127.0.0.1:{port}\"\ndatabase: \"{}\"\nproviders:\n  - name: p\n    kind: openai\n    base_url: \"http://127.0.0.1:9/v1\"\nmodels:\n  - id: m\n    provider: p\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\nserver:\n  threads: 1\n",
            db.display()
        ),
    )
    .expect("config");
    let cfg = spidergate::config::Config::load(&config).expect("load config");
    let catalog = spidergate::catalog::Catalog::new(&cfg);
    let t = Instant::now();
    let now = spidergate::clock::now_ms();
    let mut store = spidergate::store::Store::open(&db).expect("open");
    let held = store.key_count().expect("count keys");
    if held == n {
        println!("reusing {} with {n} keys", db.display());
    } else {
        assert_eq!(held, 0, "{} holds {held} keys, not {n}", db.display());
        mint_into(&mut store, &catalog, n, now);
        println!(
            "minted and stored {n} keys in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    drop(store);
    for _ in 0..runs {
        start_once(&config, port, n);
    }
}

fn mint_into(
    store: &mut spidergate::store::Store,
    catalog: &spidergate::catalog::Catalog,
    n: usize,
    now: i64,
) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(100_000) {
        let records: Vec<_> = chunk
            .iter()
            .map(|i| {
                let spec = spidergate::manage::KeySpec {
                    name: format!("agent-{i}"),
                    rpm: Some(60),
                    budget_usd: Some(10.0),
                    ..Default::default()
                };
                spidergate::manage::mint(catalog, spec, now)
                    .expect("mint")
                    .0
            })
            .collect();
        store.insert_keys(&records).expect("insert");
    }
}

/// Starts the gateway, waits for its first `/health` 200, reads its RSS, stops it.
fn start_once(config: &std::path::Path, port: u16, n: usize) {
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn gateway");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !healthy(port) {
        assert!(Instant::now() < deadline, "gateway did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    let rss = rss_mb(child.id());
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
    println!(
        "cold start with {n} keys: serving after {:.2} s (goal < 3 s: {}); RSS {rss:.0} MB ({:.0} bytes per key)",
        ready.as_secs_f64(),
        if ready < Duration::from_secs(3) { "PASS" } else { "FAIL" },
        rss * 1024.0 * 1024.0 / n as f64
    );
}
