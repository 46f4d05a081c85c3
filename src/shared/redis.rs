//! Live per-key limits shared by a cluster of gateway nodes, in Redis (or Valkey).
//!
//! The same semantics as [`crate::limits::KeyCounters`], with the state in one Redis so every
//! node sees it: each admission is one Lua script (`admit.lua`) that checks budget, the
//! runaway-agent brakes (`max_usd_per_hour`, `loop_limit`), rpm, rpd and in-flight and
//! commits all of them or nothing; each settlement is one more (`settle.lua`). Alone, each is
//! one EVALSHA (one round trip); the admissions and settlements that wait while calls are in
//! flight (two at most) go together in the next one (`batch.lua`, see `Core::submit`),
//! decided in order exactly as one by one. The scripts read Redis' own `TIME` for the
//! minute, the day and the month, so nodes with skewed clocks agree.
//!
//! # Data model
//!
//! Every key carries the hash tag `{sg}`, so all of it lives in one slot and the multi-key
//! scripts are valid on Redis Cluster too (the scripts build the day and month key names
//! from `TIME`, which Redis allows for keys of the script's own slot). `P` is
//! `{sg}:k:<key_id>`:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:min` | ZSET | model admissions in the rolling minute (member = reservation, score = ms); keys with an `rpm` only |
//! | `P:rmin:<minute>` | string | model admissions in this clock minute, for keys without an `rpm` (usage report only) |
//! | `P:day:<day>` | string | model requests of the UTC day; expires after 2 days |
//! | `P:mon:<month>` | HASH | `seeded`, `spent`, and per model `n:`/`p:`/`c:`/`s:<model>` (requests, prompt and completion tokens, spend); expires 40 days after the month |
//! | `P:live` | HASH | `reserved` (open holds), `inflight` (open requests) |
//! | `P:umin`, `P:uday:<day>` | ZSET, string | `/v1/usage` calls, counted apart |
//! | `P:hr` | HASH | keys with `max_usd_per_hour` only: `r` (open hour holds) and per clock minute `<minute>` → settled spend; expires 2 h after its last write |
//! | `P:lp:<digest>` | HASH | keys with `loop_limit` only: per clock second `<second>` → admissions of that request (32 hex digits of its digest); expires 62 s after its last admission |
//! | `P:hr:l`, `P:lp:<digest>:l` | HASH | beside each: per bucket, `<ms of its latest entry>:<its value then>` (Redis' clock); a bucket counts until an hour (a minute) after it, so no `Retry-After` exceeds the window; a bucket without one, or whose value moved since (an older version's write), counts until its end plus the window |
//! | `{sg}:res` | HASH | reservation `<node>:<res_id>` → `held|estimate|month|key_id|levels` (levels: `p<prefix>`/`g<prefix>` of the parents and group it was also held at, space-separated), plus `|h<hour hold>` for a key with `max_usd_per_hour`; and one field `~pad: ...` that is no reservation (see `PAD` in `lua/common.lua`) |
//! | `P:mon:<month>` `tree`, `P:live` `treserved` | fields | the month's spend and the open holds of the keys below `P` in its tree of minted keys (SPEC §7) |
//! | `{sg}:g:<group>:mon:<month>`, `:live`, `:min` | HASH, HASH, ZSET | a group's month (as a key's), holds, and rolling minute (SPEC §7) |
//! | `{sg}:resx` | ZSET | reservation → expiry (ms), for [`RedisLimits::reap`] and the sweep at the start of every admission (the first 64 due, of any key); and the pad, at +inf |
//! | `{sg}:node:<node>` | SET | the node's open reservations, for [`RedisLimits::heartbeat`] |
//!
//! Day = `floor(ms / 86_400_000)`, month = `year * 12 + month - 1` ([`crate::clock`]).
//!
//! A month hash exists once seeded, even with zero spend: `admit` answers
//! [`Admit::NeedSeed`] until [`RedisLimits::seed`] wrote the ledger's figures, and nothing
//! else ever creates it (a settlement after Redis lost its data only releases the hold).
//!
//! A reservation whose node stops heart-beating expires, and the next `reap` (any node) or
//! `admit` (of any key) charges its estimate, an upper bound, to its month under the
//! model `(orphaned)` (fields `n:(orphaned)`, `s:(orphaned)`) and frees its slot. Keys
//! without a hard budget hold 0 but are charged the same estimate, as the ledger's journal
//! charges them, so Redis' month figure and the ledger agree.
//!
//! Lua numbers are doubles: money comparisons are exact below 2^53 nano-USD (9 million USD);
//! stored sums use `HINCRBY` on the exact decimal strings and saturate at `i64::MAX`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::Sentinel;
use redis::{Cmd, ErrorKind, Pipeline, RedisFuture, Script, Value};

use crate::clock::{month_start_ms, MS_PER_DAY};
use crate::config::RedisUrl;
use crate::error::GateError;
use crate::limits::{Charge, CounterView, Level, Limits, ModelTally, Standing, Upline};
use crate::money::Nanos;

use super::resp;

/// A month hash outlives its month by this much, so late settlements still find it.
const MONTH_GRACE_MS: i64 = 40 * MS_PER_DAY;
/// Expired reservations reaped per script call, so one call never blocks Redis for long.
const REAP_BATCH: i64 = 256;
/// Consecutive timeouts after which the connection is presumed hung (a paused Redis, a
/// silent partition, a failover to another address) and replaced: the connection manager
/// only reconnects on errors it sees, and a timeout is none.
const TIMEOUTS_BEFORE_RECONNECT: u32 = 3;

/// `batch.lua` with what it calls (`admit.lua` and `settle.lua` as functions): it defines
/// `batch` and runs nothing.
macro_rules! batch_body {
    () => {
        concat!(
            include_str!("lua/common.lua"),
            "local function admit_one(KEYS, ARGV, now_ms)\n",
            include_str!("lua/admit.lua"),
            "\nend\nlocal function settle_one(KEYS, ARGV)\n",
            include_str!("lua/settle.lua"),
            "\nend\n",
            include_str!("lua/batch.lua"),
            "\n"
        )
    };
}

macro_rules! lua {
    ($file:literal) => {
        concat!(
            include_str!("lua/common.lua"),
            include_str!(concat!("lua/", $file))
        )
    };
}

/// Shared limits are unreachable or broken: connection refused, timeout, script error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedError {
    Unavailable(String),
}

impl fmt::Display for SharedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SharedError::Unavailable(why) => write!(f, "shared limits unavailable: {why}"),
        }
    }
}

impl std::error::Error for SharedError {}

impl From<redis::RedisError> for SharedError {
    fn from(e: redis::RedisError) -> Self {
        SharedError::Unavailable(e.to_string())
    }
}

impl From<std::io::Error> for SharedError {
    fn from(e: std::io::Error) -> Self {
        SharedError::Unavailable(e.to_string())
    }
}

/// The outcome of [`RedisLimits::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admit {
    /// Admitted and counted; `month` (Redis' clock) is the month its cost belongs to, and
    /// `at_ms` Redis' clock at the decision (the time the ledger books the request at).
    Admitted {
        standing: Standing,
        month: i64,
        at_ms: i64,
    },
    /// Refused; nothing was consumed.
    Rejected(GateError),
    /// This key's month is not in Redis yet: read it from the ledger, [`RedisLimits::seed`]
    /// it, and admit again.
    /// `level` 0 is the key; `i` the `i`-th level above it (SPEC §7).
    NeedSeed { month: i64, day: i64, level: usize },
}

/// What [`RedisLimits::settle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// The hold was open: released, and the charge booked.
    Open,
    /// The hold had expired and was charged at its estimate (an upper bound): nothing more.
    Reaped,
    /// Redis lost the hold (a restart without persistence): the charge is booked to the
    /// admission's month all the same, if that month is in Redis.
    Lost,
}

/// A Lua script: its SHA1 (computed once) and its source for the NOSCRIPT fallback; and,
/// for `batch.lua`, the same code as a Redis function.
struct Lua {
    script: Script,
    code: &'static str,
    function: Option<Function>,
}

/// A script loaded as a Redis function library (`FUNCTION LOAD`, Redis 7): its top level
/// runs once, at load, instead of at every call. Library and function are named after the
/// code's hash, so nodes of two versions (a rolling upgrade) each call their own.
struct Function {
    name: String,
    library: String,
}

impl Lua {
    fn new(code: &'static str) -> Self {
        Lua {
            script: Script::new(code),
            code,
            function: None,
        }
    }

    /// `code` (the script) that is also the function `entry` of `library`.
    fn in_library(code: &'static str, library: &Library, entry: &str) -> Self {
        Lua {
            function: Some(Function {
                name: library.function(entry),
                library: library.text.clone(),
            }),
            ..Lua::new(code)
        }
    }

    /// `EVALSHA <sha> <numkeys>`; the caller appends keys and arguments. One `Cmd` buffer,
    /// no per-argument allocations (unlike `ScriptInvocation`).
    fn call(&self, keys: usize) -> Cmd {
        let mut cmd = Cmd::with_capacity(3, 64);
        cmd.arg("EVALSHA").arg(self.script.get_hash()).arg(keys);
        cmd
    }

    /// A batch driver's call: `FCALL <name> <numkeys>` when the script is a function too
    /// and `functions` says Redis has them, else `EVALSHA <sha> <numkeys>`, with room for
    /// `ops` operations' arguments ([`OP_BYTES`] each), so appending them does not grow the
    /// buffer again and again.
    fn head(&self, keys: usize, ops: usize, functions: bool) -> resp::Args {
        let mut cmd = resp::Args::with_capacity(64 + ops * OP_BYTES);
        match &self.function {
            Some(f) if functions => cmd.arg("FCALL").arg(&f.name),
            _ => cmd.arg("EVALSHA").arg(self.script.get_hash()),
        };
        cmd.arg(keys);
        cmd
    }

    /// `cmd` (an FCALL of this script's function) as an EVALSHA of its script.
    fn as_script_call(&self, cmd: &Cmd) -> Cmd {
        let mut out = Cmd::new();
        out.arg("EVALSHA").arg(self.script.get_hash());
        for a in cmd.args_iter().skip(2) {
            if let redis::Arg::Simple(b) = a {
                out.arg(b);
            }
        }
        out
    }
}

/// A function library: `body` (which defines functions and runs nothing) with `entries`
/// registered, each `(entry, call)` as the function `spidergate_<entry>_<hash>` that
/// returns the Lua expression `call` of its `keys` and `args`. The library is named after
/// the hash of all of it, so two versions' libraries never share a name.
struct Library {
    hash: String,
    text: String,
}

impl Library {
    fn new(body: &str, entries: &[(&str, &str)]) -> Self {
        let calls: String = entries.iter().map(|(e, c)| format!("{e}: {c}\n")).collect();
        let hash = Script::new(&format!("{body}\n{calls}")).get_hash()[..16].to_owned();
        let mut text = format!("#!lua name=spidergate_{hash}\n{body}\n");
        for (entry, call) in entries {
            text += &format!(
                "redis.register_function('spidergate_{entry}_{hash}', \
                 function(keys, args) return {call} end)\n"
            );
        }
        Library { hash, text }
    }

    fn function(&self, entry: &str) -> String {
        format!("spidergate_{entry}_{}", self.hash)
    }
}

/// Why Redis refused an FCALL (before running any of it), and what the node does about it.
#[derive(Debug, PartialEq, Eq)]
enum FcallFailure {
    /// Redis does not have the library (a fresh or flushed Redis, a failover to a replica
    /// that never had it): load it and call again.
    NotLoaded,
    /// Redis has no functions at all (before 7.0), or this connection's user may not call or
    /// load them: the script, from now on.
    NoFunctions,
    /// Out of memory: a function without flags is refused whole, where the same code as a
    /// script (compatibility mode) is refused only at a first write that takes memory, so
    /// settlements, which free memory, still run. This batch as the script.
    NotNow,
}

impl FcallFailure {
    fn of(e: &redis::RedisError) -> Option<FcallFailure> {
        FcallFailure::of_reply(e.code(), &e.to_string())
    }

    /// From an error reply's code (its first word) and text.
    fn of_reply(code: Option<&str>, text: &str) -> Option<FcallFailure> {
        match code {
            // An ACL user allowed scripts but not FCALL or FUNCTION LOAD (never a command a
            // script ran: those come back as ERR).
            Some("NOPERM") if text.contains("'fcall'") || text.contains("'function") => {
                Some(FcallFailure::NoFunctions)
            }
            Some("OOM") => Some(FcallFailure::NotNow),
            Some("ERR") if text.contains("Function not found") => Some(FcallFailure::NotLoaded),
            Some("ERR") if text.contains("unknown command") => Some(FcallFailure::NoFunctions),
            _ => None,
        }
    }
}

struct Scripts {
    admit: Lua,
    settle: Lua,
    /// Admissions and settlements, many per call (`batch.lua` around `admit.lua` and
    /// `settle.lua`), when more than one is waiting.
    batch: Lua,
    usage: Lua,
    seed: Lua,
    view: Lua,
    heartbeat: Lua,
    reap: Lua,
}

/// Where Redis is, from `shared_state.redis_url_env`:
/// - `redis://[:password@]host:port[/db]` (or `rediss://`, `redis+unix://`): one server;
/// - `redis+sentinel://host:port[,host:port…]/<master name>`: the master that Sentinel names,
///   asked again whenever the connection is replaced (after a failover);
/// - `redis+cluster://host:port[,host:port…]`: a Redis Cluster (every SpiderGate key is in
///   the one slot of `{sg}`, so one shard holds them).
enum Target {
    Single(redis::Client),
    Sentinel {
        sentinel: Box<Sentinel>,
        master: String,
    },
    Cluster(ClusterClient),
}

impl Target {
    fn parse(url: &str) -> Result<Target, SharedError> {
        Ok(
            match RedisUrl::parse(url).map_err(SharedError::Unavailable)? {
                RedisUrl::Single(url) => Target::Single(redis::Client::open(url)?),
                RedisUrl::Sentinel { hosts, master } => Target::Sentinel {
                    sentinel: Box::new(Sentinel::build(hosts)?),
                    master,
                },
                RedisUrl::Cluster { hosts } => Target::Cluster(ClusterClient::new(hosts)?),
            },
        )
    }
}

/// A connection to whichever [`Target`] is configured; cheap to clone.
// Unboxed on purpose: each call clones the connection, and a box would allocate per call.
#[allow(clippy::large_enum_variant)]
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Live per-key limits of a cluster, in Redis. One per node; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct RedisLimits {
    /// Shared with the task that sends batches (see `Core::submit`).
    core: Arc<Core>,
}

/// What a node's calls to Redis share: the connection, the scripts, the batch queue.
struct Core {
    /// Behind the connect lock: Sentinel lookups need `&mut`.
    target: tokio::sync::Mutex<Target>,
    config: ConnectionManagerConfig,
    /// One connection per Tokio runtime that calls (`None`: called outside any), each made
    /// on that runtime's first call, so the gateway starts while Redis is down; all dropped
    /// when one looks hung. Per runtime because a connection's reader and writer run as a
    /// task on the runtime that made it: the proxy's worker calling through a connection the
    /// background upkeep made (its own runtime, its own thread) crossed threads twice a
    /// round trip, and on a node pinned to one core each crossing is a context switch
    /// (`benches/cluster_compare.sh`: the upkeep thread took 16% of the node's CPU under
    /// load). So a node holds a connection for each runtime that calls: the proxy's workers,
    /// the background upkeep, the admin listener.
    conns: ArcSwap<Vec<(Option<tokio::runtime::Id>, Conn)>>,
    /// The batches' own connections ([`resp::Connection`]), where the target is one server
    /// the lean connection can reach: a batch driver takes one (of its runtime, for the
    /// reason above) for each call and gives it back after a whole reply.
    lean: Option<resp::Address>,
    lean_pool: std::sync::Mutex<Vec<(Option<tokio::runtime::Id>, resp::Connection)>>,
    node: u64,
    node_key: String,
    ttl_ms: i64,
    cmd_timeout: Duration,
    scripts: Scripts,
    /// Batches go as FCALLs of `batch.lua`'s function library ([`Function`]): set unless
    /// the target is a Redis Cluster (redis-rs 0.27 routes an FCALL by the function's name,
    /// not its key), cleared for good when Redis will not run or load them for this node
    /// (before 7.0, an ACL without them, a refused load).
    functions: AtomicBool,
    round_trips: AtomicU64,
    timeouts: AtomicU32,
    /// Makes each `/v1/usage` call's window member unique across the cluster.
    usage_seq: AtomicU64,
    /// Calls whose reply was lost, so whether Redis ran them is unknown; the next heartbeat
    /// settles them. Touched only on failures and by the heartbeat.
    unsure: std::sync::Mutex<Unsure>,
    /// Admissions and settlements waiting for the next batch (group commit, see
    /// [`RedisLimits::submit`]).
    queue: std::sync::Mutex<Queue>,
}

/// Room made per operation in a command: the bytes of a lone key's admission (the longest
/// common one) as RESP, with margin.
const OP_BYTES: usize = 200;

/// Operations carried per batch at most; more wait for the next one.
const MAX_BATCH: usize = 128;

/// One admission or settlement for `batch.lua`: its kind, and its keys then arguments as
/// `admit.lua` / `settle.lua` take them.
struct Op {
    kind: Kind,
    /// The reservation it admits or settles.
    res_id: u64,
    keys: usize,
    /// Its keys then arguments, as written for `admit.lua` / `settle.lua`.
    args: resp::Args,
    /// In a batch, sent in `batch.lua`'s short form ('A', 'S': without what every operation
    /// of the batch shares); an admission with levels or brakes is sent whole ('a').
    short: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Admit,
    Settle,
}

struct Queued {
    op: Op,
    tx: Reply,
}

/// Where an operation's reply goes.
type Reply = tokio::sync::oneshot::Sender<Result<Ints, Failed>>;

/// A caller's wait for its reply. A caller that goes away while it waits (its request
/// cancelled) drops this: a reply already delivered but not read would otherwise be lost
/// with it, and with it an admission's hold, which the node's heartbeat keeps alive. So the
/// drop closes the channel first (from then on the sender sees the caller gone, and
/// [`Core::answer`] handles the reply), then takes what came before.
struct Waiting<'a> {
    core: &'a Core,
    kind: Kind,
    res_id: u64,
    rx: tokio::sync::oneshot::Receiver<Result<Ints, Failed>>,
    /// The caller read the reply (or learnt the sender was gone).
    taken: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.taken {
            return;
        }
        self.rx.close();
        if let Ok(reply) = self.rx.try_recv() {
            self.core.unread(self.kind, self.res_id, reply);
        }
    }
}

/// Operations waiting, and how many tasks send them.
#[derive(Default)]
struct Queue {
    ops: Vec<Queued>,
    drivers: usize,
}

/// Batches in flight at once per node, each sent by its own task over its own connection,
/// so Redis may run two calls in either order. An operation that depends on another's reply
/// (a settlement on its admission, a client's next request on its last response's
/// settlement) is queued only after that reply came, so after Redis ran it. A settlement
/// sent after a response that did not end whole can be overtaken by the client's retry: the
/// retry then sees the hold still taken (a refusal, never an overshoot), and waits for it
/// as finishing work (`admission::admit`). A second call lets the operations that queue
/// while one call is out leave before it returns.
const MAX_DRIVERS: usize = 2;

/// The task that sends batches. Should it be dropped (its runtime shutting down), the
/// operations on their way are answered as lost replies (they may have run), those still
/// waiting as failures, and the next caller starts a new task.
struct Driver {
    core: Arc<Core>,
    waiting: Vec<(Reply, Kind, u64)>,
    /// Stopped because nothing waited (the queue was marked idle then): nothing to answer,
    /// and the queue may already be another task's.
    finished: bool,
}

impl Drop for Driver {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let lost = |maybe_ran| Failed {
            error: SharedError::Unavailable("batch abandoned".into()),
            maybe_ran,
        };
        for (tx, kind, res_id) in self.waiting.drain(..) {
            self.core.answer(tx, kind, res_id, Err(lost(true)));
        }
        let queued = {
            let mut q = self.core.queue();
            q.drivers -= 1;
            // Another task still sends what waits.
            if q.drivers > 0 {
                return;
            }
            std::mem::take(&mut q.ops)
        };
        for Queued { tx, .. } in queued {
            let _ = tx.send(Err(lost(false)));
        }
    }
}

impl Driver {
    /// Sends batches until no operation waits.
    async fn run(mut self) {
        loop {
            let ops: Vec<Queued> = {
                let mut q = self.core.queue();
                if q.ops.is_empty() {
                    q.drivers -= 1;
                    self.finished = true;
                    break;
                }
                let n = q.ops.len().min(MAX_BATCH);
                q.ops.drain(..n).collect()
            };
            self.send(ops).await;
        }
    }

    /// Sends `ops` (those whose caller is still there) as one call and answers each: alone,
    /// `admit.lua` or `settle.lua`; together, `batch.lua`. Each as a function of the one
    /// library where Redis runs functions, else as a script.
    async fn send(&mut self, ops: Vec<Queued>) {
        let core = self.core.clone();
        // Its caller is gone before it was sent (its request ended): not sent at all.
        let ops: Vec<Queued> = ops.into_iter().filter(|q| !q.tx.is_closed()).collect();
        let functions = core.functions.load(Ordering::Relaxed);
        let (lua, cmd) = match ops.as_slice() {
            [] => return,
            // Alone: the operation's own code, which is cheaper for one than a batch.
            [one] => {
                let lua = match one.op.kind {
                    Kind::Admit => &core.scripts.admit,
                    Kind::Settle => &core.scripts.settle,
                };
                (lua, alone_call(lua, &one.op, functions))
            }
            _ => {
                let lua = &core.scripts.batch;
                let ops = ops.iter().map(|q| &q.op);
                (lua, batch_call(lua, ops, core.node, core.ttl_ms, functions))
            }
        };
        self.waiting = ops
            .into_iter()
            .map(|Queued { op, tx }| (tx, op.kind, op.res_id))
            .collect();
        let reply = core.call(lua, &cmd).await;
        let waiting = std::mem::take(&mut self.waiting);
        let replies: Result<Vec<Ints>, Failed> = reply.and_then(|r| {
            let parsed = if waiting.len() == 1 {
                Ints::of(&r).map(|one| vec![one])
            } else {
                Ints::of_batch(&r, waiting.len())
            };
            parsed.ok_or(Failed {
                error: unavailable("batch"),
                maybe_ran: true,
            })
        });
        match replies {
            Ok(replies) => {
                for ((tx, kind, res_id), r) in waiting.into_iter().zip(replies) {
                    core.answer(tx, kind, res_id, Ok(r));
                }
            }
            Err(f) => {
                for (tx, kind, res_id) in waiting {
                    core.answer(tx, kind, res_id, Err(f.clone()));
                }
            }
        }
    }
}

/// One operation's call of its own script: its keys and arguments as they are.
fn alone_call(lua: &Lua, op: &Op, functions: bool) -> resp::Args {
    let mut cmd = lua.head(op.keys, 1, functions);
    cmd.append_all(&op.args);
    cmd
}

/// A call of `batch.lua` (`lua`) carrying `ops`, as its header describes: the node and the
/// ttl once, then each operation in its short form where it has one (runs of its arguments
/// copied as they were written: not the node nor the ttl, nor an admission's key prefix),
/// else whole.
fn batch_call<'a>(
    lua: &Lua,
    ops: impl ExactSizeIterator<Item = &'a Op>,
    node: u64,
    ttl_ms: i64,
    functions: bool,
) -> resp::Args {
    let mut cmd = lua.head(1, ops.len(), functions);
    cmd.arg("{sg}:res").arg(node).arg(ttl_ms);
    for op in ops {
        match (op.kind, op.short) {
            // key_prefix key_id node res_id rpm rpd cap hard max_inflight held ttl estimate
            (Kind::Admit, true) => {
                cmd.arg("A");
                cmd.append(&op.args, 1..2);
                cmd.append(&op.args, 3..10);
                cmd.append(&op.args, 11..12);
            }
            // key_prefix node res_id has_charge model prompt completion cost month
            (Kind::Settle, _) => {
                cmd.arg("S");
                cmd.append(&op.args, 0..1);
                cmd.append(&op.args, 2..9);
            }
            (Kind::Admit, false) => {
                let n = op.args.len();
                cmd.arg("a").arg(op.keys).arg(n.saturating_sub(op.keys));
                cmd.append_all(&op.args);
            }
        }
    }
    cmd
}

/// One admission's or settlement's reply: its integers in order (a settlement's is one, an
/// admission's at most seven; see `admit.lua`). Plain integers, not `Value`s: a batch's replies
/// arrive as one string (`batch.lua`), which is parsed here in one pass where the client's
/// parser costs about a thousand instructions per integer of a nested array.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Ints {
    len: u8,
    v: [i64; 7],
}

impl Ints {
    fn push(&mut self, n: i64) -> Option<()> {
        *self.v.get_mut(usize::from(self.len))? = n;
        self.len += 1;
        Some(())
    }

    /// The `i`-th integer.
    fn get(&self, i: usize) -> Option<i64> {
        self.v[..usize::from(self.len)].get(i).copied()
    }

    /// A script's own reply (`admit.lua`, `settle.lua`): an integer or an array of them.
    fn of(v: &Value) -> Option<Ints> {
        let mut out = Ints::default();
        match v {
            Value::Array(a) if !a.is_empty() => {
                for x in a {
                    out.push(int(x)?)?;
                }
            }
            Value::Array(_) => return None,
            v => out.push(int(v)?)?,
        }
        Some(out)
    }

    /// `batch.lua`'s reply: one string, the operations' replies separated by `;`, each one's
    /// integers by `,` (`1,24311,5,0,0,1765000000000;1;...`); exactly `n` of them.
    fn of_batch(v: &Value, n: usize) -> Option<Vec<Ints>> {
        let Value::BulkString(b) = v else {
            return None;
        };
        let mut out = Vec::with_capacity(n);
        for op in b.split(|&c| c == b';') {
            let mut ints = Ints::default();
            for x in op.split(|&c| c == b',') {
                ints.push(lua_number(x)?)?;
            }
            out.push(ints);
        }
        (out.len() == n).then_some(out)
    }
}

/// A Lua number as the script wrote it (`tostring`, or `%.0f` past 1e14): an integer, or
/// otherwise truncated and saturated as Redis converts a Lua number to an integer reply.
fn lua_number(s: &[u8]) -> Option<i64> {
    if let Some(n) = resp::decimal(s) {
        return Some(n);
    }
    let s = std::str::from_utf8(s).ok()?;
    let f: f64 = s.parse().ok()?;
    // `as` truncates toward zero and saturates at the ends; NaN is not a number here.
    (!f.is_nan()).then_some(f as i64)
}

/// A failed call, and whether Redis may have run it anyway (it was sent, the answer lost).
#[derive(Clone)]
struct Failed {
    error: SharedError,
    maybe_ran: bool,
}

impl From<Failed> for SharedError {
    fn from(f: Failed) -> Self {
        f.error
    }
}

/// Ids in doubt kept for the next heartbeat at most; beyond, Redis has been unreachable
/// for long and the ids are dropped rather than grow without bound.
const MAX_UNSURE: usize = 100_000;

/// Reservations of this node in doubt after a failed call (see `heartbeat.lua`).
#[derive(Debug, Default)]
struct Unsure {
    /// Admissions that failed: the caller did not forward them, so they are released free.
    admits: Vec<u64>,
    /// Settlements that failed: left to expire and be charged at their estimate.
    settles: Vec<u64>,
}

impl Unsure {
    fn push_admit(&mut self, res_id: u64) {
        if self.admits.len() < MAX_UNSURE {
            self.admits.push(res_id);
        }
    }

    fn push_settle(&mut self, res_id: u64) {
        if self.settles.len() < MAX_UNSURE {
            self.settles.push(res_id);
        }
    }
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLimits")
            .field("node", &self.node)
            .field("ttl_ms", &self.ttl_ms)
            .field("cmd_timeout", &self.cmd_timeout)
            .finish_non_exhaustive()
    }
}

/// Whether a refused `FUNCTION LOAD` only says the library is there already (another node
/// loaded it in between): as good as loaded.
fn already_loaded(refusal: &str) -> bool {
    refusal.contains("already exists")
}

/// Whether `cmd` calls a function (FCALL), not a script.
fn is_fcall(cmd: &Cmd) -> bool {
    matches!(cmd.args_iter().next(), Some(redis::Arg::Simple(b"FCALL")))
}

/// [`is_fcall`] of a batch driver's call.
fn calls_function(cmd: &resp::Args) -> bool {
    cmd.iter().next() == Some(b"FCALL")
}

/// The Tokio runtime this runs on (`None`: outside any), which a connection belongs to.
fn current_runtime() -> Option<tokio::runtime::Id> {
    tokio::runtime::Handle::try_current().ok().map(|h| h.id())
}

/// `-1` for an absent limit (the scripts' "none").
fn opt(v: Option<u32>) -> i64 {
    v.map_or(-1, i64::from)
}

/// `{sg}:k:<key_id>`: the one key name an admission formats.
/// The Redis prefix of a level above a key: a parent key's own, or `{sg}:g:<name>`.
pub fn level_prefix(u: &Upline) -> String {
    match u.level {
        Level::Parent => key_prefix(&u.id),
        Level::Group => format!("{{sg}}:g:{}", u.id),
    }
}

fn key_prefix(key_id: &str) -> String {
    let mut p = String::with_capacity(7 + key_id.len());
    p.push_str("{sg}:k:");
    p.push_str(key_id);
    p
}

fn unavailable(what: &str) -> SharedError {
    SharedError::Unavailable(format!("unexpected reply to {what}"))
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

fn text(v: &Value) -> Option<&str> {
    match v {
        Value::BulkString(b) => std::str::from_utf8(b).ok(),
        Value::SimpleString(s) => Some(s),
        _ => None,
    }
}

fn items<'a>(v: &'a Value, what: &str) -> Result<&'a [Value], SharedError> {
    match v {
        Value::Array(a) if !a.is_empty() => Ok(a),
        _ => Err(unavailable(what)),
    }
}

/// The `i`-th integer of an admission's or settlement's reply.
fn nth(a: &Ints, i: usize, what: &str) -> Result<i64, SharedError> {
    a.get(i).ok_or_else(|| unavailable(what))
}

/// The `i`-th integer of a script's reply.
fn at(a: &[Value], i: usize, what: &str) -> Result<i64, SharedError> {
    a.get(i).and_then(int).ok_or_else(|| unavailable(what))
}

fn standing(limits: &Limits, remaining: i64, reset: i64, warning: i64) -> Standing {
    Standing {
        rpm: limits.rpm,
        remaining: limits
            .rpm
            .map(|_| u32::try_from(remaining.max(0)).unwrap_or(u32::MAX)),
        reset_secs: reset.max(0) as u64,
        budget_warning: warning == 1,
    }
}

/// Token counts travel as i64 (what `HINCRBY` takes); nobody reaches the clamp.
fn tokens(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Core {
    /// Parses the URL only: no connection is made until the first command, so a gateway
    /// starts (and later recovers) while Redis is down. `node` must be unique in the cluster;
    /// `reservation_ttl` is how long a reservation outlives its node's last heartbeat;
    /// `cmd_timeout` bounds every call, connecting included.
    pub fn new(
        url: &str,
        node: u64,
        reservation_ttl: Duration,
        cmd_timeout: Duration,
    ) -> Result<Self, SharedError> {
        let target = Target::parse(url)?;
        let functions = !matches!(target, Target::Cluster(_));
        let lean = match &target {
            Target::Single(client) => resp::Address::of(client.get_connection_info()),
            _ => None,
        };
        // Fail fast and let the next command retry, rather than queue every request behind
        // a long reconnect back-off while Redis is down.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(cmd_timeout)
            .set_number_of_retries(1)
            .set_factor(10)
            .set_max_delay(100);
        // One library: batches, and a decision sent alone (cheaper there than as its own
        // script, which defines every helper of common.lua anew at each call).
        let library = Library::new(
            batch_body!(),
            &[
                ("batch", "batch(args)"),
                ("admit", "admit_one(keys, args, now_ms)"),
                ("settle", "settle_one(keys, args)"),
            ],
        );
        Ok(Core {
            target: tokio::sync::Mutex::new(target),
            config,
            conns: ArcSwap::default(),
            lean,
            lean_pool: std::sync::Mutex::default(),
            node,
            node_key: format!("{{sg}}:node:{node}"),
            ttl_ms: i64::try_from(reservation_ttl.as_millis()).unwrap_or(i64::MAX),
            cmd_timeout,
            scripts: Scripts {
                admit: Lua::in_library(lua!("admit.lua"), &library, "admit"),
                settle: Lua::in_library(lua!("settle.lua"), &library, "settle"),
                batch: Lua::in_library(
                    concat!(batch_body!(), "return batch(ARGV)\n"),
                    &library,
                    "batch",
                ),
                usage: Lua::new(lua!("usage.lua")),
                seed: Lua::new(lua!("seed.lua")),
                view: Lua::new(lua!("view.lua")),
                heartbeat: Lua::new(lua!("heartbeat.lua")),
                reap: Lua::new(lua!("reap.lua")),
            },
            functions: AtomicBool::new(functions),
            round_trips: AtomicU64::new(0),
            timeouts: AtomicU32::new(0),
            usage_seq: AtomicU64::new(0),
            unsure: std::sync::Mutex::new(Unsure::default()),
            queue: std::sync::Mutex::new(Queue::default()),
        })
    }

    /// Commands sent to Redis so far (each one round trip), for the benchmark.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.node
    }

    fn unsure(&self) -> std::sync::MutexGuard<'_, Unsure> {
        // Poisoned only if a push panicked; the ids are plain integers.
        self.unsure.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared connection, made on first use. The manager reconnects by itself after
    /// errors; cloning it is a few reference counts.
    async fn connection(&self) -> Result<Conn, redis::RedisError> {
        match self.made_connection() {
            Some(c) => Ok(c),
            // Boxed: connecting (Sentinel, cluster discovery) is a future of kilobytes, and
            // inlined it would be copied with every admission's and settlement's future.
            None => Box::pin(self.connect()).await,
        }
    }

    /// This runtime's connection, if it was made.
    fn made_connection(&self) -> Option<Conn> {
        let runtime = current_runtime();
        self.conns
            .load()
            .iter()
            .find(|(rt, _)| *rt == runtime)
            .map(|(_, c)| c.clone())
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        // One connection attempt at a time; the others wait for it (within their timeout).
        let mut target = self.target.lock().await;
        if let Some(c) = self.made_connection() {
            return Ok(c);
        }
        let c = match &mut *target {
            Target::Single(client) => Conn::Single(
                ConnectionManager::new_with_config(client.clone(), self.config.clone()).await?,
            ),
            Target::Sentinel { sentinel, master } => {
                // Asked on every new connection, so a failover is followed.
                let client = sentinel.async_master_for(master, None).await?;
                Conn::Single(ConnectionManager::new_with_config(client, self.config.clone()).await?)
            }
            Target::Cluster(cluster) => Conn::Cluster(cluster.get_async_connection().await?),
        };
        let runtime = current_runtime();
        let mut conns = Vec::clone(&self.conns.load());
        conns.push((runtime, c.clone()));
        self.conns.store(Arc::new(conns));
        Ok(c)
    }

    /// Drops the connections, so the next call connects anew (and asks Sentinel again).
    pub fn reconnect(&self) {
        self.conns.store(Arc::default());
        self.lean_pool().clear();
    }

    fn lean_pool(
        &self,
    ) -> std::sync::MutexGuard<'_, Vec<(Option<tokio::runtime::Id>, resp::Connection)>> {
        // Poisoned only if a push panicked; the pool is a plain list.
        self.lean_pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A batch's call ([`Core::eval`]'s contract) over a lean connection where there is one
    /// (see [`resp`]): one write, one reply read and parsed in place; a script Redis lost is
    /// loaded and called again. An FCALL Redis refused before running it (its library
    /// missing, functions refused) goes again through [`Core::eval`], which handles it.
    async fn call(&self, lua: &Lua, cmd: &resp::Args) -> Result<Value, Failed> {
        let Some(address) = &self.lean else {
            return self.eval(lua, &cmd.to_cmd()).await;
        };
        let runtime = current_runtime();
        let pooled = {
            let mut pool = self.lean_pool();
            let i = pool.iter().position(|(rt, _)| *rt == runtime);
            i.map(|i| pool.swap_remove(i).1)
                .filter(|c| !c.looks_closed())
        };
        let sent = AtomicBool::new(false);
        let result = self
            .bounded(async {
                let mut conn = match pooled {
                    Some(c) => c,
                    None => resp::Connection::open(address).await?,
                };
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                sent.store(true, Ordering::Relaxed);
                let mut reply = conn.call_args(cmd).await?;
                // Redis lost its script cache (a restart, a failover, SCRIPT FLUSH): the
                // script did not run; load it and call again, as `eval` does.
                if matches!(&reply, resp::Reply::Error(e) if resp::Reply::error_code(e) == "NOSCRIPT")
                {
                    self.round_trips.fetch_add(2, Ordering::Relaxed);
                    let load = [&b"SCRIPT"[..], b"LOAD", lua.code.as_bytes()];
                    if let resp::Reply::Error(e) = conn.call(3, load.into_iter()).await? {
                        return Err(std::io::Error::other(e));
                    }
                    reply = conn.call_args(cmd).await?;
                }
                // Redis lost the function library (the same events, or FUNCTION FLUSH): the
                // call did not run; load the library and call again, as `eval` does. A load
                // refused for another reason than the library being there already (another
                // node loaded it in between) leaves the refusal to `eval` below, which
                // decides what this Redis can run.
                if let (Some(f), resp::Reply::Error(e)) = (&lua.function, &reply) {
                    let code = resp::Reply::error_code(e);
                    if calls_function(cmd)
                        && FcallFailure::of_reply(Some(code), e) == Some(FcallFailure::NotLoaded)
                    {
                        self.round_trips.fetch_add(1, Ordering::Relaxed);
                        let load = [&b"FUNCTION"[..], b"LOAD", f.library.as_bytes()];
                        let loaded = match conn.call(3, load.into_iter()).await? {
                            resp::Reply::Value(_) => true,
                            resp::Reply::Error(le) => already_loaded(&le),
                        };
                        if loaded {
                            self.round_trips.fetch_add(1, Ordering::Relaxed);
                            reply = conn.call_args(cmd).await?;
                        }
                    }
                }
                Ok::<_, std::io::Error>((conn, reply))
            })
            .await;
        let (conn, reply) = result.map_err(|error| {
            // The others in the pool were most likely cut off the same way (Redis restarted,
            // a failover): new ones for the next calls.
            self.lean_pool().clear();
            Failed {
                error,
                maybe_ran: sent.load(Ordering::Relaxed),
            }
        })?;
        self.lean_pool().push((runtime, conn));
        match reply {
            resp::Reply::Value(v) => Ok(v),
            resp::Reply::Error(text) => {
                // An FCALL Redis refused before running it: `eval` loads the library or
                // turns to the script (once per Redis that lost its library, or for good).
                let code = resp::Reply::error_code(&text);
                if calls_function(cmd) && FcallFailure::of_reply(Some(code), &text).is_some() {
                    return self.eval(lua, &cmd.to_cmd()).await;
                }
                Err(Failed {
                    error: SharedError::Unavailable(text),
                    maybe_ran: true,
                })
            }
        }
    }

    /// Runs one script call within `cmd_timeout`: EVALSHA (or FCALL), and only if Redis lost
    /// its script cache or function library (a restart, a failover), SCRIPT LOAD (or
    /// FUNCTION LOAD) and the call again. An FCALL that Redis refused before running it for
    /// good (before 7.0, an ACL without functions, a refused load) goes again as EVALSHA, and
    /// every batch after it; one refused for lack of memory goes as EVALSHA this once.
    async fn eval(&self, lua: &Lua, cmd: &Cmd) -> Result<Value, Failed> {
        let sent = AtomicBool::new(false);
        let result = self
            .bounded(async {
                let mut con = self.connection().await?;
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                sent.store(true, Ordering::Relaxed);
                let first = cmd.query_async::<Value>(&mut con).await;
                // An FCALL that Redis refused before running it: load the library and call
                // again, or send the same batch as the script (from now on, where Redis
                // will not run functions for this node). Only an FCALL: a script that failed
                // may have run in part, and is never sent again.
                // `None`: send this batch as the script instead.
                let first = match (&lua.function, first) {
                    (Some(f), Err(e)) if is_fcall(cmd) => match FcallFailure::of(&e) {
                        Some(FcallFailure::NotLoaded) => {
                            self.round_trips.fetch_add(1, Ordering::Relaxed);
                            let loaded = redis::cmd("FUNCTION")
                                .arg("LOAD")
                                .arg(&f.library)
                                .exec_async(&mut con)
                                .await;
                            match loaded {
                                // Another node may have loaded it in between: as good.
                                Err(le) if !already_loaded(&le.to_string()) => {
                                    if FcallFailure::of(&le) != Some(FcallFailure::NotNow) {
                                        self.no_functions(&le);
                                    }
                                    None
                                }
                                _ => {
                                    self.round_trips.fetch_add(1, Ordering::Relaxed);
                                    Some(cmd.query_async::<Value>(&mut con).await)
                                }
                            }
                        }
                        Some(FcallFailure::NoFunctions) => {
                            self.no_functions(&e);
                            None
                        }
                        Some(FcallFailure::NotNow) => None,
                        None => Some(Err(e)),
                    },
                    (_, first) => Some(first),
                };
                let fallback;
                let (cmd, first) = match first {
                    Some(first) => (cmd, first),
                    None => {
                        self.round_trips.fetch_add(1, Ordering::Relaxed);
                        fallback = lua.as_script_call(cmd);
                        (&fallback, fallback.query_async::<Value>(&mut con).await)
                    }
                };
                match first {
                    Err(e) if e.kind() == ErrorKind::NoScriptError => {
                        self.round_trips.fetch_add(2, Ordering::Relaxed);
                        redis::cmd("SCRIPT")
                            .arg("LOAD")
                            .arg(lua.code)
                            .exec_async(&mut con)
                            .await?;
                        cmd.query_async::<Value>(&mut con).await
                    }
                    other => other,
                }
            })
            .await;
        result.map_err(|error| Failed {
            error,
            maybe_ran: sent.load(Ordering::Relaxed),
        })
    }

    /// Batches go as scripts from now on (`why`: Redis' refusal of FCALL or FUNCTION LOAD).
    fn no_functions(&self, why: &redis::RedisError) {
        if self.functions.swap(false, Ordering::Relaxed) {
            log::warn!("Redis does not run this node's functions ({why}): batches go as scripts");
        }
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        // Poisoned only if a push panicked; the queue stays consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs one admission or settlement in the next batch (group commit). Up to
    /// [`MAX_DRIVERS`] tasks send the batches: one starts when an operation finds fewer
    /// running, sends what waits, and, while the calls are in flight, the operations that
    /// come meanwhile queue; the first task back sends all of them in one call, and a task
    /// stops when none waits. One request alone still
    /// costs one round trip; under load, many share one, and Redis runs the script's set-up,
    /// `TIME`, the key look-ups and the network work once for all of them. The call runs in
    /// that task, not in a caller's future, so a caller that goes away (its request
    /// cancelled) never fails the others' operations.
    async fn submit(self: &Arc<Self>, op: Op) -> Result<Ints, Failed> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waiting = Waiting {
            core: self,
            kind: op.kind,
            res_id: op.res_id,
            rx,
            taken: false,
        };
        let start = {
            let mut q = self.queue();
            q.ops.push(Queued { op, tx });
            let start = q.drivers < MAX_DRIVERS;
            q.drivers += usize::from(start);
            start
        };
        if start {
            let driver = Driver {
                core: self.clone(),
                waiting: Vec::new(),
                finished: false,
            };
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(driver.run());
                }
                // Polled outside a Tokio runtime: sent from here (boxed: the driver's future
                // is large, and inlined it would be copied with every caller's).
                Err(_) => Box::pin(driver.run()).await,
            }
        }
        let reply = (&mut waiting.rx).await;
        waiting.taken = true;
        reply.unwrap_or_else(|_| {
            Err(Failed {
                error: unavailable("batch"),
                maybe_ran: true,
            })
        })
    }

    /// Gives an operation its reply; see [`Core::unread`] if its caller is gone.
    fn answer(&self, tx: Reply, kind: Kind, res_id: u64, reply: Result<Ints, Failed>) {
        if let Err(reply) = tx.send(reply) {
            self.unread(kind, res_id, reply);
        }
    }

    /// A reply its caller never read (it went away before or after the reply came): what
    /// the caller would have done with a lost reply is done here. An admission that may
    /// have taken a hold is released by the next heartbeat; a settlement that may not have
    /// run is left to expire.
    fn unread(&self, kind: Kind, res_id: u64, reply: Result<Ints, Failed>) {
        match (kind, reply) {
            (Kind::Admit, Err(f)) if f.maybe_ran => self.unsure().push_admit(res_id),
            (Kind::Admit, Ok(a)) if a.get(0) == Some(1) => self.unsure().push_admit(res_id),
            (Kind::Settle, Err(f)) if f.maybe_ran => self.unsure().push_settle(res_id),
            _ => {}
        }
    }

    /// Bounds a call by `cmd_timeout`, so a dead or hung Redis fails fast.
    async fn bounded<T, E>(
        &self,
        call: impl std::future::Future<Output = Result<T, E>>,
    ) -> Result<T, SharedError>
    where
        SharedError: From<E>,
    {
        match tokio::time::timeout(self.cmd_timeout, call).await {
            Ok(Ok(v)) => {
                self.timeouts.store(0, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                if self.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_BEFORE_RECONNECT {
                    self.timeouts.store(0, Ordering::Relaxed);
                    self.reconnect();
                }
                Err(SharedError::Unavailable(format!(
                    "no answer within {} ms",
                    self.cmd_timeout.as_millis()
                )))
            }
        }
    }

    /// An admission's operation: its keys and arguments as `admit.lua` takes them.
    fn admit_op(
        &self,
        key_id: &str,
        limits: &Limits,
        uplines: &[Upline],
        estimate: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Op {
        let hard_cap = |l: &Limits| l.budget.filter(|_| l.hard_budget).map(Nanos::get);
        // The hold: the bound wherever a hard cap may need it (the key's, or any level's).
        // An estimate above every cap is refused whatever it is: clamping it just past the
        // largest keeps saturated bounds (Nanos::MAX) inside what the script compares exactly.
        let largest = std::iter::once(hard_cap(limits))
            .chain(uplines.iter().map(|u| hard_cap(&u.limits)))
            .flatten()
            .max();
        let held = largest.map_or(0, |c| estimate.get().clamp(0, c.saturating_add(1)));
        let cap = limits.budget.map_or(-1, Nanos::get);
        let mut cmd = resp::Args::with_capacity(OP_BYTES + 64 * uplines.len());
        cmd.arg(key_prefix(key_id));
        for u in uplines {
            cmd.arg(level_prefix(u));
        }
        cmd.arg(key_id)
            .arg(self.node)
            .arg(res_id)
            .arg(opt(limits.rpm))
            .arg(opt(limits.rpd))
            .arg(cap)
            .arg(u8::from(limits.hard_budget))
            .arg(opt(limits.max_inflight))
            .arg(held)
            .arg(self.ttl_ms)
            .arg(estimate.get().max(0));
        // The brakes (ARGV 12..15) travel for keys that have them, and as placeholders when
        // levels above the key follow them (ARGV 16.., see `admit.lua`).
        if limits.has_brakes() || !uplines.is_empty() {
            let hour_cap = limits.max_usd_per_hour.map_or(-1, Nanos::get);
            // An estimate above the hour cap is refused whatever it is (clamped, as above).
            let hour_bound = limits.max_usd_per_hour.map_or(0, |cap| {
                estimate.get().clamp(0, cap.get().saturating_add(1))
            });
            cmd.arg(hour_cap).arg(hour_bound);
            match (limits.loop_limit, digest) {
                (Some(n), Some(d)) => cmd.arg(n).arg(format!("{d:032x}")),
                _ => cmd.arg(-1).arg(""),
            };
        }
        for u in uplines {
            cmd.arg(match u.level {
                Level::Parent => "p",
                Level::Group => "g",
            })
            // A soft cap travels as -2 - cap: the script only warns with it.
            .arg(match (hard_cap(&u.limits), u.limits.budget) {
                (Some(c), _) => c,
                (None, Some(soft)) => -2 - soft.get(),
                (None, None) => -1,
            })
            .arg(opt(u.limits.rpm.filter(|_| u.level == Level::Group)));
        }
        Op {
            kind: Kind::Admit,
            res_id,
            keys: 1 + uplines.len(),
            args: cmd,
            short: uplines.is_empty() && !limits.has_brakes(),
        }
    }

    /// Admits a model request (one round trip, or a share of one under load): checks the
    /// hard budget, the hour's spend (`max_usd_per_hour`), the loop count of `digest`
    /// (`loop_limit`; given only for keys
    /// with one), the rolling minute, the UTC day and the in-flight cap, and commits all of
    /// them only if all pass. Keys without the brakes send none of their arguments. Admitted
    /// requests hold `estimate` (hard-budget keys, and the hour of capped keys) and an
    /// in-flight slot under reservation
    /// `res_id` (unique among this node's open reservations) until [`RedisLimits::settle`],
    /// or until the reservation expires without a heartbeat and is reaped. On `Err` the
    /// request must not be forwarded under this admission; if Redis ran it anyway (only the
    /// reply was lost), the next [`RedisLimits::heartbeat`] releases it.
    pub async fn admit(
        self: &Arc<Self>,
        key_id: &str,
        limits: &Limits,
        uplines: &[Upline],
        estimate: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Result<Admit, SharedError> {
        let op = self.admit_op(key_id, limits, uplines, estimate, digest, res_id);
        let cap = limits.budget.map_or(-1, Nanos::get);
        let reply = match self.submit(op).await {
            Ok(reply) => reply,
            Err(f) => {
                // The script may still have run (only the reply was lost): the heartbeat
                // releases the reservation if it exists.
                if f.maybe_ran {
                    self.unsure().push_admit(res_id);
                }
                return Err(f.error);
            }
        };
        let a = &reply;
        let what = "admit";
        Ok(match nth(a, 0, what)? {
            0 => Admit::NeedSeed {
                month: nth(a, 1, what)?,
                day: nth(a, 2, what)?,
                level: nth(a, 3, what)?.max(0) as usize,
            },
            1 => Admit::Admitted {
                month: nth(a, 1, what)?,
                at_ms: nth(a, 5, what)?,
                standing: {
                    let mut s =
                        standing(limits, nth(a, 2, what)?, nth(a, 3, what)?, nth(a, 4, what)?);
                    // A group's rolling minute that refuses first (admit.lua's 7th figure).
                    if let Some(group_rpm) = a.get(6) {
                        s.rpm = Some(u32::try_from(group_rpm.max(0)).unwrap_or(u32::MAX));
                        s.remaining =
                            Some(u32::try_from(nth(a, 2, what)?.max(0)).unwrap_or(u32::MAX));
                    }
                    s
                },
            },
            2 => Admit::Rejected(GateError::BudgetExceeded {
                spend: Nanos::new(nth(a, 1, what)?) + Nanos::new(nth(a, 2, what)?),
                cap: Nanos::new(cap),
            }),
            3 => Admit::Rejected(GateError::RateLimited {
                limit: limits.rpm.unwrap_or(0),
                retry_after_secs: nth(a, 1, what)?.max(1) as u64,
            }),
            4 => Admit::Rejected(GateError::DailyRateLimited {
                limit: limits.rpd.unwrap_or(0),
                retry_after_secs: nth(a, 1, what)?.max(1) as u64,
            }),
            5 => Admit::Rejected(GateError::ConcurrencyLimited {
                limit: limits.max_inflight.unwrap_or(0),
            }),
            6 => Admit::Rejected(GateError::SpendRateExceeded {
                spend: Nanos::new(nth(a, 1, what)?),
                cap: limits.max_usd_per_hour.unwrap_or(Nanos::ZERO),
                retry_after_secs: nth(a, 2, what)?.max(1) as u64,
            }),
            7 => Admit::Rejected(GateError::LoopDetected {
                limit: limits.loop_limit.unwrap_or(0),
                retry_after_secs: nth(a, 1, what)?.max(1) as u64,
            }),
            8 => {
                let level = nth(a, 2, what)?.max(1) as usize;
                let u = uplines.get(level - 1).ok_or_else(|| unavailable(what))?;
                Admit::Rejected(GateError::GroupBudgetExceeded {
                    owner: match u.level {
                        Level::Parent => format!("parent key '{}'", u.id),
                        Level::Group => format!("group '{}'", u.id),
                    },
                    spend: Nanos::new(nth(a, 1, what)?),
                    cap: u.limits.budget.unwrap_or(Nanos::ZERO),
                })
            }
            9 => Admit::Rejected(GateError::RateLimited {
                limit: nth(a, 2, what)?.max(0) as u32,
                retry_after_secs: nth(a, 1, what)?.max(1) as u64,
            }),
            _ => return Err(unavailable(what)),
        })
    }

    /// Admits a `/v1/usage` call (one round trip): limited by the key's rpm and rpd like a
    /// model request, but counted apart, so usage figures count model requests only.
    pub async fn admit_usage_call(
        &self,
        key_id: &str,
        limits: &Limits,
    ) -> Result<Result<Standing, GateError>, SharedError> {
        let seq = self.usage_seq.fetch_add(1, Ordering::Relaxed);
        let member = format!("u{}:{seq}", self.node);
        let mut cmd = self.scripts.usage.call(1);
        cmd.arg(key_prefix(key_id))
            .arg(member)
            .arg(opt(limits.rpm))
            .arg(opt(limits.rpd))
            .arg(limits.budget.map_or(-1, Nanos::get))
            .arg(u8::from(limits.hard_budget));
        let reply = self.eval(&self.scripts.usage, &cmd).await?;
        let what = "usage call";
        let a = items(&reply, what)?;
        Ok(match at(a, 0, what)? {
            1 => Ok(standing(
                limits,
                at(a, 1, what)?,
                at(a, 2, what)?,
                at(a, 3, what)?,
            )),
            3 => Err(GateError::RateLimited {
                limit: limits.rpm.unwrap_or(0),
                retry_after_secs: at(a, 1, what)?.max(1) as u64,
            }),
            4 => Err(GateError::DailyRateLimited {
                limit: limits.rpd.unwrap_or(0),
                retry_after_secs: at(a, 1, what)?.max(1) as u64,
            }),
            _ => return Err(unavailable(what)),
        })
    }

    /// A settlement's operation: its key and arguments as `settle.lua` takes them.
    fn settle_op(&self, key_id: &str, res_id: u64, month: i64, charge: Option<Charge<'_>>) -> Op {
        let mut cmd = resp::Args::with_capacity(OP_BYTES);
        cmd.arg(key_prefix(key_id)).arg(self.node).arg(res_id);
        match charge {
            Some(c) => cmd
                .arg(1)
                .arg(&**c.model)
                .arg(tokens(c.prompt_tokens))
                .arg(tokens(c.completion_tokens))
                .arg(c.cost.get()),
            None => cmd.arg(0).arg("").arg(0).arg(0).arg(0),
        };
        cmd.arg(month);
        Op {
            kind: Kind::Settle,
            res_id,
            keys: 1,
            args: cmd,
            short: true,
        }
    }

    /// Settles reservation `res_id` of this node (one round trip, or a share of one under
    /// load): releases its hold and
    /// in-flight slot and books `charge` to the month it was admitted in (if that month is
    /// in Redis; never creating it). `Ok(false)`: the reservation was already reaped and its
    /// estimate charged, so nothing more is.
    pub async fn settle(
        self: &Arc<Self>,
        key_id: &str,
        res_id: u64,
        month: i64,
        charge: Option<Charge<'_>>,
    ) -> Result<Settled, SharedError> {
        let op = self.settle_op(key_id, res_id, month, charge);
        let reply = match self.submit(op).await {
            Ok(reply) => reply,
            Err(f) => {
                // If it did not run, the reservation must not stay open forever on this
                // node's heartbeat: it expires and is charged at its estimate instead.
                if f.maybe_ran {
                    self.unsure().push_settle(res_id);
                }
                return Err(f.error);
            }
        };
        Ok(match nth(&reply, 0, "settle")? {
            0 => Settled::Reaped,
            2 => Settled::Lost,
            _ => Settled::Open,
        })
    }

    /// Seeds `month` of a key from the ledger: its spend per model and `day`'s request
    /// count. Written only if the month is still absent, so of two concurrent seeders the
    /// second is a no-op (never additive).
    /// Seeds a key with no keys below it (see [`RedisLimits::seed_at`]).
    pub async fn seed(
        &self,
        key_id: &str,
        month: i64,
        day: i64,
        this_month: &[ModelTally],
        requests_today: u32,
    ) -> Result<(), SharedError> {
        let prefix = key_prefix(key_id);
        self.seed_at(&prefix, month, day, this_month, requests_today, Nanos::ZERO)
            .await
    }

    /// `prefix`: a key's (`{sg}:k:<id>`) or a level's ([`level_prefix`]); `tree`: the
    /// month's spend of the keys below a key (zero for a group).
    #[allow(clippy::too_many_arguments)] // the figures of one month, each its own
    pub async fn seed_at(
        &self,
        prefix: &str,
        month: i64,
        day: i64,
        this_month: &[ModelTally],
        requests_today: u32,
        tree: Nanos,
    ) -> Result<(), SharedError> {
        let spent: Nanos = this_month.iter().map(|t| t.spent).sum();
        let mut cmd = self.scripts.seed.call(1);
        cmd.arg(prefix)
            .arg(month)
            .arg(day)
            .arg(requests_today)
            .arg(month_start_ms(month + 1).saturating_add(MONTH_GRACE_MS))
            .arg(spent.get())
            .arg(tree.get());
        for t in this_month {
            cmd.arg(&*t.model)
                .arg(tokens(t.requests))
                .arg(tokens(t.prompt_tokens))
                .arg(tokens(t.completion_tokens))
                .arg(t.spent.get());
        }
        self.eval(&self.scripts.seed, &cmd).await?;
        Ok(())
    }

    /// The key's counters for `/v1/usage` (one round trip); `None` while its month is not
    /// seeded. `requests_this_minute` is the rolling minute for keys with an `rpm`, else
    /// the current clock minute, as in-process.
    pub async fn view(
        &self,
        key_id: &str,
        limits: &Limits,
    ) -> Result<Option<CounterView>, SharedError> {
        let mut cmd = self.scripts.view.call(1);
        cmd.arg(key_prefix(key_id))
            .arg(u8::from(limits.rpm.is_some()));
        let reply = self.eval(&self.scripts.view, &cmd).await?;
        let what = "view";
        let a = items(&reply, what)?;
        if at(a, 0, what)? == 0 {
            return Ok(None);
        }
        let count = |i| at(a, i, what).map(|n| u32::try_from(n.max(0)).unwrap_or(u32::MAX));
        let mut view = CounterView {
            month: at(a, 1, what)?,
            requests_this_minute: count(2)?,
            requests_today: count(3)?,
            spent: Nanos::ZERO,
            reserved: Nanos::new(at(a, 4, what)?),
            inflight: count(5)?,
            ..CounterView::default()
        };
        let fields = match a.get(6) {
            Some(Value::Array(f)) => f.as_slice(),
            _ => return Err(unavailable(what)),
        };
        let mut by_model: BTreeMap<&str, ModelTally> = BTreeMap::new();
        for pair in fields.chunks_exact(2) {
            let (Some(field), Some(n)) = (text(&pair[0]), int(&pair[1])) else {
                continue;
            };
            if field == "spent" {
                view.spent = Nanos::new(n);
                continue;
            }
            if field == "tree" {
                view.tree_spent = Nanos::new(n);
                continue;
            }
            let Some((kind, model)) = field.split_once(':') else {
                continue; // `seeded`
            };
            let t = by_model.entry(model).or_insert_with(|| ModelTally {
                model: Arc::from(model),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                spent: Nanos::ZERO,
            });
            let n_u = u64::try_from(n).unwrap_or(0);
            match kind {
                "n" => t.requests = n_u,
                "p" => t.prompt_tokens = n_u,
                "c" => t.completion_tokens = n_u,
                "s" => t.spent = Nanos::new(n),
                _ => {}
            }
        }
        view.by_model = by_model.into_values().collect();
        Ok(Some(view))
    }

    /// Pushes the expiry of every open reservation of this node to now + the reservation
    /// TTL (one round trip). Run it every TTL/3, so a live node never loses one. It first
    /// settles the calls whose reply was lost: a failed admission is released (if it ran),
    /// a failed settlement is left to expire and be reaped at its estimate.
    pub async fn heartbeat(&self) -> Result<(), SharedError> {
        let unsure = std::mem::take(&mut *self.unsure());
        let mut cmd = self.scripts.heartbeat.call(1);
        cmd.arg(&self.node_key)
            .arg(self.ttl_ms)
            .arg(self.node)
            .arg(unsure.admits.len())
            .arg(&unsure.admits)
            .arg(&unsure.settles);
        if let Err(f) = self.eval(&self.scripts.heartbeat, &cmd).await {
            let mut now = self.unsure();
            unsure.admits.into_iter().for_each(|id| now.push_admit(id));
            unsure
                .settles
                .into_iter()
                .for_each(|id| now.push_settle(id));
            return Err(f.error);
        }
        Ok(())
    }

    /// Reaps every expired reservation of any node (a node that died or lost Redis for
    /// longer than the TTL): releases its hold and slot and charges its estimate to its
    /// month under the model `(orphaned)`. Returns how many; one round trip per 256.
    pub async fn reap(&self) -> Result<u64, SharedError> {
        let mut total = 0;
        loop {
            let mut cmd = self.scripts.reap.call(1);
            cmd.arg("{sg}:resx").arg(REAP_BATCH);
            let reply = self.eval(&self.scripts.reap, &cmd).await?;
            let n = int(&reply).ok_or_else(|| unavailable("reap"))?;
            total += n.max(0) as u64;
            if n < REAP_BATCH {
                return Ok(total);
            }
        }
    }

    /// One PING, for health checks and start-up logs.
    pub async fn ping(&self) -> Result<(), SharedError> {
        self.bounded(async {
            let mut con = self.connection().await?;
            self.round_trips.fetch_add(1, Ordering::Relaxed);
            redis::cmd("PING").exec_async(&mut con).await
        })
        .await
    }
}

/// The node's door to Redis; each method is the one of the same name on the shared part
/// (documented there, on `Core`).
impl RedisLimits {
    /// Parses the URL only: no connection is made until the first command, so a gateway
    /// starts (and later recovers) while Redis is down. `node` must be unique in the cluster;
    /// `reservation_ttl` is how long a reservation outlives its node's last heartbeat;
    /// `cmd_timeout` bounds every call, connecting included.
    pub fn new(
        url: &str,
        node: u64,
        reservation_ttl: Duration,
        cmd_timeout: Duration,
    ) -> Result<Self, SharedError> {
        Ok(RedisLimits {
            core: Arc::new(Core::new(url, node, reservation_ttl, cmd_timeout)?),
        })
    }

    /// Calls sent to Redis so far (each one round trip), for the benchmark.
    pub fn round_trips(&self) -> u64 {
        self.core.round_trips()
    }

    /// This node's id.
    pub fn node(&self) -> u64 {
        self.core.node()
    }

    /// Drops the connection, so the next call connects anew (and asks Sentinel again).
    pub fn reconnect(&self) {
        self.core.reconnect()
    }

    /// Admits a model request: all checks and the hold in one step, or nothing (see
    /// `Core::admit`). One round trip alone; a share of one under load.
    pub async fn admit(
        &self,
        key_id: &str,
        limits: &Limits,
        uplines: &[Upline],
        estimate: Nanos,
        digest: Option<u128>,
        res_id: u64,
    ) -> Result<Admit, SharedError> {
        self.core
            .admit(key_id, limits, uplines, estimate, digest, res_id)
            .await
    }

    /// Admits a `/v1/usage` call (one round trip): limited by the key's rpm and rpd, counted
    /// apart.
    pub async fn admit_usage_call(
        &self,
        key_id: &str,
        limits: &Limits,
    ) -> Result<Result<Standing, GateError>, SharedError> {
        self.core.admit_usage_call(key_id, limits).await
    }

    /// Settles reservation `res_id` of this node: releases its hold and slot and books
    /// `charge` to `month` (see `Core::settle`). One round trip alone; a share of one under
    /// load.
    pub async fn settle(
        &self,
        key_id: &str,
        res_id: u64,
        month: i64,
        charge: Option<Charge<'_>>,
    ) -> Result<Settled, SharedError> {
        self.core.settle(key_id, res_id, month, charge).await
    }

    /// Seeds `month` of a key with no keys below it from the ledger, once (never additive).
    pub async fn seed(
        &self,
        key_id: &str,
        month: i64,
        day: i64,
        this_month: &[ModelTally],
        requests_today: u32,
    ) -> Result<(), SharedError> {
        self.core
            .seed(key_id, month, day, this_month, requests_today)
            .await
    }

    /// Seeds `month` of a key or a level ([`level_prefix`]), once (never additive).
    #[allow(clippy::too_many_arguments)] // the figures of one month, each its own
    pub async fn seed_at(
        &self,
        prefix: &str,
        month: i64,
        day: i64,
        this_month: &[ModelTally],
        requests_today: u32,
        tree: Nanos,
    ) -> Result<(), SharedError> {
        self.core
            .seed_at(prefix, month, day, this_month, requests_today, tree)
            .await
    }

    /// The key's counters for `/v1/usage` (one round trip); `None` while its month is not
    /// seeded.
    pub async fn view(
        &self,
        key_id: &str,
        limits: &Limits,
    ) -> Result<Option<CounterView>, SharedError> {
        self.core.view(key_id, limits).await
    }

    /// Renews this node's holds and settles the calls whose reply was lost (one round trip).
    pub async fn heartbeat(&self) -> Result<(), SharedError> {
        self.core.heartbeat().await
    }

    /// Reaps every expired reservation of any node, charging each at its estimate.
    pub async fn reap(&self) -> Result<u64, SharedError> {
        self.core.reap().await
    }

    /// One PING, for health checks and start-up logs.
    pub async fn ping(&self) -> Result<(), SharedError> {
        self.core.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_one_server_sentinel_and_cluster_urls() {
        assert!(matches!(
            Target::parse("redis://127.0.0.1:6379/0"),
            Ok(Target::Single(_))
        ));
        assert!(matches!(
            Target::parse("redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster"),
            Ok(Target::Sentinel { ref master, .. }) if master == "mymaster"
        ));
        assert!(matches!(
            Target::parse("redis+cluster://10.0.0.1:6379,10.0.0.2:6379"),
            Ok(Target::Cluster(_))
        ));
        assert!(Target::parse("redis+sentinel://10.0.0.1:26379").is_err());
        assert!(Target::parse("redis+sentinel://10.0.0.1:26379/").is_err());
        assert!(Target::parse("http://10.0.0.1").is_err());
    }

    fn words(args: &resp::Args) -> Vec<String> {
        args.iter()
            .map(|a| String::from_utf8(a.to_vec()).unwrap())
            .collect()
    }

    /// The calls a batch driver sends carry what `batch.lua`, `admit.lua` and `settle.lua`
    /// read, in their order: each operation's short form picks runs of the arguments it was
    /// built with, so a change to a builder's order shows here.
    #[test]
    fn batch_and_lone_calls_carry_each_operation_as_the_scripts_read_it() {
        let core = Core::new(
            "redis://127.0.0.1:1/0",
            7,
            Duration::from_secs(30),
            Duration::from_secs(1),
        )
        .unwrap();
        let limits = Limits {
            rpm: Some(60),
            budget: Some(Nanos::new(5_000)),
            hard_budget: true,
            max_inflight: Some(4),
            ..Limits::default()
        };
        let admit = core.admit_op("k1", &limits, &[], Nanos::new(1_200), None, 11);
        let model: Arc<str> = Arc::from("gpt-x");
        let charge = Charge {
            model: &model,
            prompt_tokens: 3,
            completion_tokens: 4,
            cost: Nanos::new(900),
        };
        let settle = core.settle_op("k1", 11, 24311, Some(charge));
        let group = Upline {
            level: Level::Group,
            id: Arc::from("team"),
            limits: Limits {
                rpm: Some(9),
                budget: Some(Nanos::new(70_000)),
                hard_budget: true,
                ..Limits::default()
            },
            counters: Arc::default(),
        };
        let grouped = core.admit_op("k2", &limits, &[group], Nanos::new(1_200), None, 12);
        let unsettled = core.settle_op("k2", 12, 24311, None);
        assert!(admit.short && !grouped.short);

        let batch = batch_call(
            &core.scripts.batch,
            [&admit, &settle, &grouped, &unsettled].into_iter(),
            7,
            30_000,
            true,
        );
        let mut want = vec![
            "FCALL",
            core.scripts.batch.function.as_ref().unwrap().name.as_str(),
        ];
        want.extend(["1", "{sg}:res", "7", "30000"]);
        // 'A' key_id res_id rpm rpd cap hard max_inflight held estimate
        want.extend([
            "A", "k1", "11", "60", "-1", "5000", "1", "4", "1200", "1200",
        ]);
        // 'S' key_prefix res_id has_charge model prompt completion cost month
        want.extend([
            "S",
            "{sg}:k:k1",
            "11",
            "1",
            "gpt-x",
            "3",
            "4",
            "900",
            "24311",
        ]);
        // 'a' key count, argument count, then admit.lua's keys and arguments, whole: the
        // brakes' placeholders, then the group's kind, hard cap and rpm.
        want.extend([
            "a",
            "2",
            "18",
            "{sg}:k:k2",
            "{sg}:g:team",
            "k2",
            "7",
            "12",
            "60",
            "-1",
        ]);
        want.extend([
            "5000", "1", "4", "1200", "30000", "1200", "-1", "0", "-1", "", "g",
        ]);
        want.extend(["70000", "9"]);
        want.extend(["S", "{sg}:k:k2", "12", "0", "", "0", "0", "0", "24311"]);
        assert_eq!(words(&batch), want);
        assert_eq!(batch.len(), want.len());
        assert!(calls_function(&batch));

        // Alone, as a script: admit.lua's keys and arguments as they were built.
        let alone = alone_call(&core.scripts.admit, &admit, false);
        let sha = core.scripts.admit.script.get_hash().to_string();
        let mut want = vec![
            "EVALSHA",
            sha.as_str(),
            "1",
            "{sg}:k:k1",
            "k1",
            "7",
            "11",
            "60",
        ];
        want.extend(["-1", "5000", "1", "4", "1200", "30000", "1200"]);
        assert_eq!(words(&alone), want);
        assert!(!calls_function(&alone));
        // The client's own connection gets the same command.
        let cmd: Vec<Vec<u8>> = alone
            .to_cmd()
            .args_iter()
            .map(|a| match a {
                redis::Arg::Simple(b) => b.to_vec(),
                redis::Arg::Cursor => panic!("no cursor"),
            })
            .collect();
        assert_eq!(
            cmd,
            want.iter()
                .map(|w| w.as_bytes().to_vec())
                .collect::<Vec<_>>()
        );
    }

    #[test]
    fn a_batch_reply_is_read_operation_by_operation_and_refused_if_it_does_not_fit() {
        let batch = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let ints = |v: &[i64]| {
            let mut i = Ints::default();
            for n in v {
                i.push(*n).unwrap();
            }
            i
        };
        assert_eq!(
            Ints::of_batch(
                &batch("1,24311,5,0,0,1765000000000;1;2,1000000000000000000,0"),
                3
            ),
            Some(vec![
                ints(&[1, 24311, 5, 0, 0, 1_765_000_000_000]),
                ints(&[1]),
                ints(&[2, 1_000_000_000_000_000_000, 0]),
            ])
        );
        // As Redis converts a Lua number: truncated, saturated.
        assert_eq!(lua_number(b"1e+18"), Some(1_000_000_000_000_000_000));
        assert_eq!(lua_number(b"9223372036854775808"), Some(i64::MAX));
        assert_eq!(lua_number(b"-2.5"), Some(-2));
        assert_eq!(lua_number(b"nan"), None);
        // Seven integers: an admission whose group's minute names the headers.
        assert_eq!(
            Ints::of_batch(&batch("1,24311,2,0,0,1765000000000,3"), 1),
            Some(vec![ints(&[1, 24311, 2, 0, 0, 1_765_000_000_000, 3])])
        );
        // Not the number of operations sent, eight integers, an empty figure, an array.
        assert_eq!(Ints::of_batch(&batch("1;1"), 3), None);
        assert_eq!(Ints::of_batch(&batch("1,2,3,4,5,6,7,8"), 1), None);
        assert_eq!(Ints::of_batch(&batch("1,,2;1"), 2), None);
        assert_eq!(Ints::of_batch(&Value::Array(vec![Value::Int(1)]), 1), None);
        // A script's own reply, alone.
        assert_eq!(Ints::of(&Value::Int(2)), Some(ints(&[2])));
        assert_eq!(
            Ints::of(&Value::Array(vec![Value::Int(3), Value::Int(12)])),
            Some(ints(&[3, 12]))
        );
        assert_eq!(Ints::of(&Value::Array(vec![])), None);
        assert_eq!(ints(&[5]).get(1), None);
    }
}
