//! The PostgreSQL backend: connections from a process-wide pool per URL, the numbered
//! migrations under `migrations/postgres`, the key change log and node heartbeats; keys in
//! `keys`, the ledger in `ledger`.
//!
//! The `postgres` client is blocking and runs its own small Tokio runtime: it must only be
//! used, and dropped, off the async worker threads (see `discard`). Only parameterised SQL.

mod alerts;
mod audit;
mod groups;
mod keys;
mod ledger;

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use once_cell::sync::Lazy;
use postgres::{Client, GenericClient, NoTls, Statement};

use super::{Result, StoreError};

/// How long opening a connection may take before the store reports PostgreSQL unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A pooled connection is checked with one round trip before reuse, within this.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle connections kept per URL; more are closed on return.
const POOL_MAX_IDLE: usize = 8;
/// Serializes migrations across every node (transaction-scoped advisory lock; "SGmi").
const MIGRATION_LOCK: i64 = 0x5347_6d69;
/// Taken by the key change trigger ("SGkc"); must equal the constant in 0001_init.sql.
#[cfg(test)]
const KEY_CHANGE_LOCK: i64 = 0x5347_6b63;

/// Numbered migrations, applied in order, each once (recorded in `schema_migrations`).
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "0001_init",
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "0002_trace_id",
        include_str!("../../../migrations/postgres/0002_trace_id.sql"),
    ),
    (
        3,
        "0003_audit",
        include_str!("../../../migrations/postgres/0003_audit.sql"),
    ),
    (
        4,
        "0004_fleet_groups",
        include_str!("../../../migrations/postgres/0004_fleet_groups.sql"),
    ),
    (
        5,
        "0005_brakes",
        include_str!("../../../migrations/postgres/0005_brakes.sql"),
    ),
    (
        6,
        "0006_alerts",
        include_str!("../../../migrations/postgres/0006_alerts.sql"),
    ),
    (
        7,
        "0007_trace_unit",
        include_str!("../../../migrations/postgres/0007_trace_unit.sql"),
    ),
];

/// One connection and the statements prepared on it (a prepared statement saves a round
/// trip per call, which matters for the 250 ms key poll and every ledger commit).
struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Conn {
    fn new(client: Client) -> Conn {
        Conn {
            client,
            prepared: HashMap::new(),
        }
    }
}

/// Returns `sql` prepared on the connection behind `client` (a `Client` or a `Transaction`
/// on it), from the cache when it was prepared before.
fn prepared(
    cache: &mut HashMap<&'static str, Statement>,
    client: &mut impl GenericClient,
    sql: &'static str,
) -> Result<Statement> {
    if let Some(s) = cache.get(sql) {
        return Ok(s.clone());
    }
    let s = client.prepare(sql)?;
    cache.insert(sql, s.clone());
    Ok(s)
}

#[derive(Default)]
struct Pool {
    idle: Vec<Conn>,
    /// Migrations were checked by this process for this URL.
    migrated: bool,
}

static POOLS: Lazy<Mutex<HashMap<String, Pool>>> = Lazy::new(Mutex::default);

fn pools() -> std::sync::MutexGuard<'static, HashMap<String, Pool>> {
    // A panic while holding the lock leaves a valid map: keep using it.
    POOLS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes a connection. Closing blocks on the client's own runtime, which panics on an
/// async worker thread (a `Store` dropped in an async task): there it is closed on a
/// short-lived thread instead.
fn discard(conn: Conn) {
    if tokio::runtime::Handle::try_current().is_ok() {
        let spawned = std::thread::Builder::new()
            .name("spidergate-pg-close".into())
            .spawn(move || drop(conn));
        if let Err(e) = spawned {
            log::warn!("cannot close a PostgreSQL connection off the async threads: {e}");
        }
    } else {
        drop(conn);
    }
}

/// Host, port and database of a URL, for error messages (never the password).
fn describe(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("(default)");
    format!("{host}:{port}/{db}")
}

fn connect(url: &str) -> Result<Client> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e| StoreError::Connect(format!("bad PostgreSQL URL: {e}")))?;
    config
        .connect_timeout(CONNECT_TIMEOUT)
        // A server that vanishes (host down, partition) fails calls within seconds instead
        // of hanging the ledger writer on a dead socket.
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .tcp_user_timeout(Duration::from_secs(15));
    if config.get_application_name().is_none() {
        config.application_name("spidergate");
    }
    // The idempotent schema statements (`IF NOT EXISTS`) would each send a NOTICE that the
    // client logs at INFO, in every CLI command's output.
    if config.get_options().is_none() {
        config.options("-c client_min_messages=warning");
    }
    config.connect(NoTls).map_err(|e| {
        StoreError::Connect(format!(
            "cannot connect to PostgreSQL at {}: {e}",
            describe(&config)
        ))
    })
}

/// Applies pending migrations in one transaction holding `MIGRATION_LOCK`, so nodes that
/// start at once apply each migration exactly once (the others wait, then find it done).
fn migrate(client: &mut Client) -> Result<()> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version    BIGINT PRIMARY KEY,
            name       TEXT NOT NULL,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )?;
    let done = tx
        .query("SELECT version FROM schema_migrations", &[])?
        .iter()
        .map(|r| r.try_get::<_, i64>(0))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .map_err(|e| StoreError::Other(format!("PostgreSQL migration {name}: {e}")))?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[version, name],
        )?;
    }
    if let Some(newer) = done.iter().filter(|v| **v > MIGRATIONS.len() as i64).max() {
        log::warn!(
            "the PostgreSQL schema is at migration {newer}, newer than this build knows; \
             running anyway"
        );
    }
    tx.commit()?;
    Ok(())
}

/// A PostgreSQL store handle: one connection, taken from the pool at open and returned on
/// drop. The connection sits in a `RefCell` because the client needs `&mut` even to read,
/// while `Store`'s reads take `&self` (a `Store` is used by one thread at a time).
pub(super) struct Postgres {
    url: String,
    conn: RefCell<Option<Conn>>,
}

impl Postgres {
    pub(super) fn open(url: &str) -> Result<Postgres> {
        let (pooled, migrated) = {
            let mut pools = pools();
            let pool = pools.entry(url.to_owned()).or_default();
            (pool.idle.pop(), pool.migrated)
        };
        let mut conn = match pooled {
            // An idle connection may have been closed by the server meanwhile.
            Some(mut c) => match c.client.is_valid(VALIDATE_TIMEOUT) {
                Ok(()) => c,
                Err(_) => {
                    discard(c);
                    Conn::new(connect(url)?)
                }
            },
            None => Conn::new(connect(url)?),
        };
        if !migrated {
            if let Err(e) = migrate(&mut conn.client) {
                discard(conn);
                return Err(e);
            }
            pools().entry(url.to_owned()).or_default().migrated = true;
        }
        Ok(Postgres {
            url: url.to_owned(),
            conn: RefCell::new(Some(conn)),
        })
    }

    /// Runs `f` on the connection, reconnecting first if the last one broke (a long-lived
    /// store, like the ledger writer's, recovers once the server is back).
    fn with<T>(&self, f: impl FnOnce(&mut Conn) -> Result<T>) -> Result<T> {
        let mut slot = self.conn.try_borrow_mut().map_err(|_| {
            StoreError::Other("store used again from inside one of its own callbacks".into())
        })?;
        let conn = match slot.take() {
            Some(c) if !c.client.is_closed() => slot.insert(c),
            broken => {
                if let Some(c) = broken {
                    discard(c);
                }
                slot.insert(Conn::new(connect(&self.url)?))
            }
        };
        f(conn)
    }

    /// Runs `f` in one transaction (READ COMMITTED; the statements themselves lock what they
    /// change), committing if it returns `Ok`. Dropping an uncommitted transaction rolls
    /// it back.
    fn write<T>(
        &mut self,
        f: impl FnOnce(
            &mut postgres::Transaction<'_>,
            &mut HashMap<&'static str, Statement>,
        ) -> Result<T>,
    ) -> Result<T> {
        self.with(|conn| {
            let mut tx = conn.client.transaction()?;
            let out = f(&mut tx, &mut conn.prepared)?;
            tx.commit()?;
            Ok(out)
        })
    }

    /// One statement outside an explicit transaction, prepared once per connection.
    fn query(
        &self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>> {
        self.with(|conn| {
            let stmt = prepared(&mut conn.prepared, &mut conn.client, sql)?;
            Ok(conn.client.query(&stmt, params)?)
        })
    }

    fn execute(
        &self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        self.with(|conn| {
            let stmt = prepared(&mut conn.prepared, &mut conn.client, sql)?;
            Ok(conn.client.execute(&stmt, params)?)
        })
    }

    /// The first column of the first row of a query that always returns one row.
    fn scalar<T: for<'a> postgres::types::FromSql<'a>>(
        &self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<T> {
        let rows = self.query(sql, params)?;
        let row = rows
            .first()
            .ok_or_else(|| StoreError::Other(format!("no row from: {sql}")))?;
        Ok(row.try_get(0)?)
    }

    pub fn keys_version(&self) -> Result<i64> {
        self.scalar("SELECT v FROM meta WHERE k = 'keys_version'", &[])
    }

    pub fn last_key_change(&self) -> Result<i64> {
        self.scalar("SELECT COALESCE(MAX(seq), 0) FROM key_changes", &[])
    }

    pub fn key_changes_since(&self, seq: i64) -> Result<Option<(i64, Vec<String>)>> {
        // One statement, one snapshot: the oldest entry and the changes agree even while
        // another node prunes. The trigger's advisory lock makes seqs visible in order, so
        // nothing below the newest seq read can still appear later.
        let rows = self.query(
            "SELECT o.oldest, c.seq, c.key_id
             FROM (SELECT MIN(seq) AS oldest FROM key_changes) o
             LEFT JOIN (SELECT MAX(seq) AS seq, key_id FROM key_changes
                        WHERE seq > $1 GROUP BY key_id) c ON true",
            &[&seq],
        )?;
        let mut newest = seq;
        let mut ids = Vec::with_capacity(rows.len());
        for r in &rows {
            let oldest: Option<i64> = r.try_get(0)?;
            if oldest.is_some_and(|o| o > seq + 1) {
                return Ok(None);
            }
            if let (Some(s), Some(id)) = (r.try_get::<_, Option<i64>>(1)?, r.try_get(2)?) {
                newest = newest.max(s);
                ids.push(id);
            }
        }
        Ok(Some((newest, ids)))
    }

    pub fn prune_key_changes(&mut self, keep: i64) -> Result<usize> {
        let n = self.execute(
            "DELETE FROM key_changes WHERE seq <= (SELECT MAX(seq) FROM key_changes) - $1",
            &[&keep],
        )?;
        Ok(n as usize)
    }

    /// The newest `ts` among the newest traces (by id: the clock may have gone back while
    /// they were written, so a few are read, never the whole table).
    pub fn latest_trace_ms(&self) -> Result<Option<i64>> {
        self.scalar(
            "SELECT MAX(ts) FROM (SELECT ts FROM traces ORDER BY id DESC LIMIT 256) t",
            &[],
        )
    }

    pub fn integrity_check(&self) -> Result<String> {
        // PostgreSQL checks its own pages; a round trip proves the store answers.
        self.scalar::<i32>("SELECT 1", &[])?;
        Ok("ok".into())
    }

    pub fn heartbeat(&mut self, owner: i64, now_ms: i64) -> Result<()> {
        self.execute(
            "INSERT INTO nodes (owner, seen_at) VALUES ($1, $2)
             ON CONFLICT (owner) DO UPDATE SET seen_at = GREATEST(nodes.seen_at, excluded.seen_at)",
            &[&owner, &now_ms],
        )?;
        Ok(())
    }

    pub fn live_owners(&self, seen_since_ms: i64) -> Result<Vec<i64>> {
        self.query(
            "SELECT owner FROM nodes WHERE seen_at >= $1 ORDER BY owner",
            &[&seen_since_ms],
        )?
        .iter()
        .map(|r| Ok(r.try_get(0)?))
        .collect()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let Some(conn) = self.conn.get_mut().take() else {
            return;
        };
        if conn.client.is_closed() {
            return discard(conn);
        }
        let mut pools = pools();
        let pool = pools.entry(self.url.clone()).or_default();
        if pool.idle.len() < POOL_MAX_IDLE {
            pool.idle.push(conn);
            return;
        }
        drop(pools);
        discard(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trigger_takes_the_key_change_lock() {
        let sql = MIGRATIONS[0].2;
        assert!(sql.contains(&format!("pg_advisory_xact_lock({KEY_CHANGE_LOCK})")));
        assert_ne!(KEY_CHANGE_LOCK, MIGRATION_LOCK);
    }

    #[test]
    fn migrations_are_numbered_in_order() {
        for (i, (version, name, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version, i as i64 + 1);
            assert!(name.starts_with(&format!("{version:04}_")));
        }
    }

    #[test]
    fn a_bad_url_or_a_closed_port_fails_with_the_server_named() {
        // A closed port is refused at once; a silent host is bounded by CONNECT_TIMEOUT, a
        // setting. No stopwatch here: nextest's terminate-after stops a hang.
        let e = connect("postgres://u:secret@127.0.0.1:1/db")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("127.0.0.1:1/db"), "{e}");
        assert!(!e.contains("secret"), "{e}");
        assert!(connect("not a url at all ===").is_err());
    }
}
