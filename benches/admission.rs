//! The whole request-phase decision (token shape, SHA-256, snapshot lookup, expiry, scope,
//! body parse, model resolution, allow-list, budget reservation, rpm/rpd) with 1, 10,000 and
//! 1,000,000 keys loaded. Prints each size's time as a ratio to the 1-key case: it must be
//! flat, because a key's state lives on its own entry (no shared structure grows with N).
//!
//! Run: `cargo bench --bench admission`

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion};
use spidergate::admission::{admit, authenticate, check_scope, Endpoint, Overheads};
use spidergate::catalog::Catalog;
use spidergate::clock::now_ms;
use spidergate::clock::Now;
use spidergate::config::Config;
use spidergate::keys::KeySet;
use spidergate::limits::store::InProcess;
use spidergate::limits::KeyCounters;
use spidergate::manage::{mint, KeySpec};

const SIZES: [usize; 3] = [1, 10_000, 1_000_000];

fn catalog() -> Catalog {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/spidergate.yaml");
    Catalog::new(&Config::load(&path).expect("conf/spidergate.yaml"))
}

/// Length of `Bearer spideriq_pat_` + 32 hex characters.
const HEADER_LEN: usize = 7 + 45;

/// A snapshot of `n` keys with every control set, and their `Authorization` values laid out
/// back to back (a request's header arrives hot in the packet buffer; reading it must not
/// add a cache miss the gateway would not have).
fn keyset(catalog: &Catalog, n: usize) -> (KeySet, Vec<u8>) {
    let now = now_ms();
    let mut records = Vec::with_capacity(n);
    let mut headers = Vec::with_capacity(n * HEADER_LEN);
    for i in 0..n {
        let req = KeySpec {
            name: format!("agent-{i}"),
            rpm: Some(1_000),
            rpd: Some(1_000_000_000),
            budget_usd: Some(1e9),
            allowed_models: vec!["spideriq/fast".into(), "gpt-4o".into()],
            ..KeySpec::default()
        };
        let (record, secret) = mint(catalog, req, now).expect("mint");
        records.push(record);
        headers.extend_from_slice(format!("Bearer {secret}").as_bytes());
    }
    let set = KeySet::build(records, catalog, None, |_| {
        KeyCounters::restored(now, 0, Vec::new())
    });
    (set, headers)
}

fn bench(c: &mut Criterion, catalog: &Catalog) {
    let body = Bytes::from_static(
        br#"{"model":"spideriq/fast","messages":[{"role":"system","content":"You are a helpful agent."},{"role":"user","content":"Summarise the last three tickets in one line each."}],"max_tokens":256,"temperature":0.2}"#,
    );
    let mut group = c.benchmark_group("admission");
    group
        .sample_size(40)
        .measurement_time(Duration::from_secs(4));
    for n in SIZES {
        let (keys, headers) = keyset(catalog, n);
        let mut i: usize = 0;
        // A synthetic clock 61 ms per request: no key ever exceeds 1,000 per minute, so every
        // iteration takes the admitting path (the 1-key case keeps a full rolling window).
        let mut now = now_ms();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                // Keys are found by hash, so walking the headers in order still visits the
                // snapshot's entries in a scattered order, as real traffic does.
                i = (i + 1) % n;
                now += 61;
                let header = &headers[i * HEADER_LEN..(i + 1) * HEADER_LEN];
                let (_, key) = authenticate(Some(header), || None, &keys, now).expect("auth");
                check_scope(&key, Endpoint::ChatCompletions).expect("scope");
                // The in-process store is ready at once: block_on never parks.
                let mut requested = None;
                let adm = rt
                    .block_on(admit(
                        &InProcess,
                        catalog,
                        &keys,
                        &key,
                        Endpoint::ChatCompletions,
                        &mut body.clone(),
                        None,
                        None,
                        &mut requested,
                        Now::at(now),
                        Overheads {
                            media_part_tokens: 25_000,
                            tool_prompt_tokens: 1_000,
                            max_audio_ms: 7_200_000,
                        },
                        0,
                    ))
                    .expect("admit");
                if let Some(r) = adm.reservation {
                    key.counters.settle(r, None);
                }
                black_box(adm.chain)
            })
        });
    }
    group.finish();
}

/// Reads criterion's mean estimate (ns) for one size.
fn mean_ns(n: usize) -> Option<f64> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("target/criterion/admission/{n}/new/estimates.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["mean"]["point_estimate"].as_f64()
}

fn main() {
    let catalog = catalog();
    let mut c = Criterion::default().configure_from_args();
    bench(&mut c, &catalog);
    c.final_summary();
    let Some(base) = mean_ns(1) else { return };
    println!("\nadmission decision, mean time as a ratio to 1 key loaded:");
    for n in SIZES {
        if let Some(ns) = mean_ns(n) {
            println!("  {n:>9} keys: {ns:>8.0} ns  ratio {:.2}", ns / base);
        }
    }
}
