//! Three gateway processes sharing a real PostgreSQL (keys, ledger, traces) and a real Redis
//! (live limits), for the cluster tests. Each `Cluster` owns its PostgreSQL server and its
//! Redis, so a test may stop and restart either.
#![allow(dead_code)]

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

use super::pg::PgServer;
use super::redis::RedisServer;
use super::{free_port, mock, Gateway, GatewayBuilder, Key, MockProvider};

const ADMIN: &str = "cluster-admin-token";

/// gpt-4o-mini: 0.15 USD / Mtok in, 0.60 USD / Mtok out, in nano-USD per token.
pub const IN: i64 = 150;
pub const OUT: i64 = 600;

pub struct Cluster {
    pub nodes: Vec<Gateway>,
    pub mock: MockProvider,
    pub redis: RedisServer,
    pub pg: PgServer,
    pub pg_url: String,
    next: AtomicUsize,
}

impl Cluster {
    /// Redis, PostgreSQL with a fresh database and three nodes; `None` (after a loud
    /// message) only when Redis or PostgreSQL is not installed.
    pub fn start(on_error: &str, reservation_ttl_ms: u64) -> Option<Cluster> {
        Self::start_with(on_error, reservation_ttl_ms, &[])
    }

    /// Like [`Cluster::start`], with extra environment for node `i` (`(i, name, value)`).
    pub fn start_with(
        on_error: &str,
        reservation_ttl_ms: u64,
        env: &[(usize, &str, &str)],
    ) -> Option<Cluster> {
        let redis = RedisServer::start()?;
        let pg = PgServer::start()?;
        let pg_url = pg.create_db(&format!("sg_{}", free_port()));
        let mock = mock();
        // A Redis command may wait 2 s (the default 250 ms), so a loaded 2-core machine
        // (Redis descheduled for a moment) does not turn into `on_error`: the tests that
        // want Redis gone stop or pause it, and only wait longer for the refusal.
        let shared = format!(
            "shared_state:\n  postgres_url_env: SG_TEST_PG\n  redis_url_env: SG_TEST_REDIS\n  on_error: {on_error}\n  reservation_ttl_ms: {reservation_ttl_ms}\n  timeout_ms: 2000"
        );
        let nodes = (0..3)
            .map(|i| {
                let mut b = GatewayBuilder::new(&mock)
                    .admin(ADMIN)
                    .top(&shared)
                    .env("SG_TEST_PG", &pg_url)
                    .env("SG_TEST_REDIS", &redis.url());
                for (_, k, v) in env.iter().filter(|(n, _, _)| *n == i) {
                    b = b.env(k, v);
                }
                b.start()
            })
            .collect();
        Some(Cluster {
            nodes,
            mock,
            redis,
            pg,
            pg_url,
            next: AtomicUsize::new(0),
        })
    }

    /// The next node, round-robin (as the balancer in front of them does).
    pub fn any(&self) -> &Gateway {
        &self.nodes[self.next.fetch_add(1, Ordering::Relaxed) % self.nodes.len()]
    }

    /// Creates a key through node 1 and waits until every node knows it.
    pub fn create_key(&self, args: &[&str]) -> Key {
        let key = self.nodes[0].create_key(args);
        for n in &self.nodes[1..] {
            n.wait_key_live(&key);
        }
        key
    }

    pub fn pg(&self) -> postgres::Client {
        postgres::Client::connect(&self.pg_url, postgres::NoTls).expect("connect to PostgreSQL")
    }

    /// Spend booked in the PostgreSQL ledger for a key (all months), in nano-USD.
    pub fn ledger_spend(&self, key: &Key) -> i64 {
        self.pg()
            .query_one(
                "SELECT COALESCE(SUM(cost_nanos), 0)::BIGINT FROM spend WHERE key_id = $1",
                &[&key.id],
            )
            .expect("spend")
            .get(0)
    }

    /// Traces of a key's model requests in PostgreSQL: (error_code, cost_nanos).
    pub fn ledger_traces(&self, key: &Key) -> Vec<(Option<String>, i64)> {
        self.pg()
            .query(
                "SELECT error_code, cost_nanos FROM traces
                 WHERE key_id = $1 AND endpoint NOT IN ('usage', 'models', 'model', 'aliases')
                 ORDER BY id",
                &[&key.id],
            )
            .expect("traces")
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    }

    /// `/v1/usage` for a key on node `node`.
    pub fn usage_on(&self, node: usize, key: &Key) -> Value {
        self.nodes[node].usage(key)
    }

    /// One Redis command through `redis-cli`; its output.
    pub fn redis_cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.redis.port().to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        assert!(out.status.success(), "redis-cli {args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Redis loses its data, as a restart without persistence does (state and scripts).
    pub fn redis_data_loss(&self) {
        self.redis_cli(&["FLUSHALL"]);
        self.redis_cli(&["SCRIPT", "FLUSH"]);
    }
}

/// A gpt-4o-mini chat body asking for `max_tokens`.
pub fn chat_body(max_tokens: u32) -> Vec<u8> {
    json!({"model": "gpt-4o-mini", "max_tokens": max_tokens,
           "messages": [{"role": "user", "content": "hello"}]})
    .to_string()
    .into_bytes()
}

/// `spend_nanodollars` of a `/v1/usage` answer.
pub fn nanos(v: &Value) -> i64 {
    v["spend_nanodollars"].as_i64().expect("spend_nanodollars")
}
