#!/usr/bin/env bash
# What the shared limit store costs: throughput, CPU and latency per request of gateway nodes
# whose live limits are in Redis, against nodes whose limits are in-process, for one node and
# for three nodes behind nginx round-robin, plus Redis round trips per request (at most 2: one
# admission and one settlement; under load a node batches those that wait, so fewer).
# Run through `benches/wrk_compare.sh --cluster [options]` or directly:
#
#   benches/cluster_compare.sh [--duration 10] [--rounds 3] [--connections 32]
#                              [--variants local-1,redis-1,...] [--no-c1] [--no-build] [--no-pin]
#                              [--fleet] [--keys N] [--profile DIR]
#
# --fleet: every variant's requests come from a grandchild minted through /v1/keys under the
# bench key (whose hard budget then bounds the tree), in a group with a hard budget and an
# rpm (SPEC §7): each admission also checks and holds two parents and a group, in Redis one
# Lua call touching every level. Compare with a run without it.
#
# --keys N: N keys like the bench key (a fleet of agents, one key each); wrk's requests take
# them in turn, so a batch of admissions and settlements spans several keys, each read and
# written in Redis on its own.
#
# --profile DIR: every timed load round of a one-node variant, its node is sampled by `perf
# record` (cpu-clock, 4999 Hz, all threads) into DIR/<variant>.<round>.data; compare two with
# `perf report --no-children --sort symbol -i ...` (the profile costs the node some CPU:
# read that round's figures as perturbed).
#
# GW_BIN=path/to/spidergate measures another build (the mock always comes from this tree), for
# an A/B of two builds in separate runs, each against its own same-run baseline.
#
# Variants (all running at once for the whole run, each its own fresh store; one plain-chat
# key with an rpm, an rpd, a hard budget and a max_inflight, as benches/wrk_compare.sh uses,
# so every request takes the whole admission path: in Redis that is one admission and one
# settlement, each its own script call when alone, several in one batch.lua call under load):
#   local-1     one node, SQLite, in-process limits                  (baseline of redis-1)
#   redis-1     one node, SQLite, limits in Redis (shared_state with redis_url_env only)
#   pg-1        one node, PostgreSQL, in-process limits              (baseline of pg+redis-1)
#   pg+redis-1  one node, PostgreSQL + Redis: the cluster's config on one node
#   pg-3        three nodes, PostgreSQL, per-node limits (not exact, reference), behind nginx
#   pg+redis-3  three nodes, PostgreSQL + Redis (the cluster), behind the same nginx
# The ratios isolate one thing each: redis-1/local-1 and pg+redis-1/pg-1 differ only in the
# limit store (same ledger store, same path), pg+redis-3/pg-3 the same for three nodes through
# the same nginx; pg+redis-1/local-1 is the whole cost of the cluster config on one node.
# Three nodes vs one node is not a scaling figure here: on 2 CPUs the three nodes share the
# one gateway CPU (below), so the 3-node rows show the cost of three Redis clients and of the
# balancer hop, not added capacity.
#
# Two phases, each in alternating rounds (the variant order rotates every round, --rounds >= 3):
#   load  wrk -t1 -c<connections>: rps, p50/p99, CPU per request;
#   c1    wrk -t1 -c1: the latency one request adds with nothing queued (2 loopback round
#         trips to Redis on the request's path); --no-c1 skips it.
# Per round: rps; p50/p99 (wrk --latency); gateway CPU per request (utime+stime of all the
# variant's node processes, all threads, from /proc/PID/stat, over the round, / requests);
# how busy each CPU was (/proc/stat, every process of the machine); for Redis variants the
# round trips per request (delta of spidergate_redis_commands_total summed over the nodes'
# admin /metrics, / requests; printed as is and net of the nodes' background, heartbeat and
# sweep, measured idle), the commands Redis executed per request (INFO
# total_commands_processed: those inside scripts count too) and Redis CPU per request; for
# PostgreSQL variants PostgreSQL CPU per request (postmaster and backends); for 3-node
# variants nginx CPU per request. Redis and PostgreSQL CPU come from /proc/PID/task/*/schedstat
# (ns) and are net of their idle rate (every variant's nodes keep polling them).
# Also printed: the idle rates, Redis' CPU per PING and per `EVAL "return 1"` from one client
# (redis-benchmark: this machine's floor, for scale) and INFO commandstats over the run.
# Reported: every round, then ranges (min–max, median) and per-round paired ratios, and each
# pair's node capacity: rps per busy share of the gateway CPU (Redis runs on the load CPU, so
# a Redis variant can fill that CPU first; its rps ratio then measures the load CPU). Never
# timed assertions: it exits 0 unless the set-up fails; non-2xx responses, fallbacks to local
# limits and refusals are flagged loudly.
#
# Pinning (2 CPUs): every gateway node, all threads, on the last CPU; wrk, the mock, Redis,
# PostgreSQL and nginx on CPU 0 (--no-pin lets the scheduler place them). With three nodes
# the load side (wrk + nginx + mock + Redis + PostgreSQL) can be what limits rps, so the
# 3-node ratios are read together with the CPU-per-request ratio.
#
# Private servers, fresh every run, loopback only: redis-server on a free port (--save ""
# --appendonly no, one database number per Redis variant) and a throwaway PostgreSQL
# (initdb into the run's temp dir, fsync=off, trust auth, unix socket in the temp dir, one
# database per PostgreSQL variant; as root it runs as the postgres user). Everything started
# here is stopped on exit (trap), and the temp dir removed.
set -Eeuo pipefail

DURATION=10
CONNECTIONS=32
ROUNDS=3
BUILD=1
PIN=1
C1=1
FLEET=0
KEYS=1
PROFILE_DIR=""
ALL_VARIANTS=(local-1 redis-1 pg-1 pg+redis-1 pg-3 pg+redis-3)
VARIANTS=("${ALL_VARIANTS[@]}")
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) shift ;;
    --duration) DURATION="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --variants) IFS=, read -r -a VARIANTS <<<"$2"; shift 2 ;;
    --no-c1) C1=0; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-pin) PIN=0; shift ;;
    --fleet) FLEET=1; shift ;;
    --keys) KEYS="$2"; shift 2 ;;
    --profile) PROFILE_DIR="$2"; shift 2 ;;
    -h|--help) awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for v in "${VARIANTS[@]}"; do
  case " ${ALL_VARIANTS[*]} " in *" $v "*) ;; *) echo "unknown variant: $v (one of ${ALL_VARIANTS[*]})" >&2; exit 2 ;; esac
done
[ "$ROUNDS" -ge 1 ] || { echo "--rounds must be >= 1" >&2; exit 2; }
[[ "$KEYS" =~ ^[1-9][0-9]*$ ]] || { echo "--keys must be a positive number" >&2; exit 2; }
[ "$KEYS" = 1 ] || [ "$FLEET" = 0 ] || { echo "--keys and --fleet do not go together" >&2; exit 2; }
[ "$ROUNDS" -ge 3 ] || echo "warning: fewer than 3 rounds; the ranges mean little" >&2

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LUA="$ROOT/benches/lua/chat.lua"
BIN="${GW_BIN:-$ROOT/target/release/spidergate}"
MOCK="$ROOT/target/release/spidergate-mock"
CLK_TCK="$(getconf CLK_TCK)"

need() { command -v "$1" >/dev/null 2>&1; }
pg_bindir() {
  local d
  if d=$(pg_config --bindir 2>/dev/null) && [ -x "$d/initdb" ]; then echo "$d"; return; fi
  d=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
  [ -n "$d" ] && [ -x "/usr/lib/postgresql/$d/bin/initdb" ] && echo "/usr/lib/postgresql/$d/bin"
}
uses_pg() { case "$1" in pg*) return 0 ;; *) return 1 ;; esac; }
uses_redis() { case "$1" in redis-1|pg+redis-*) return 0 ;; *) return 1 ;; esac; }
nodes_of() { case "$1" in *-3) echo 3 ;; *) echo 1 ;; esac; }
WANT_PG=0; WANT_REDIS=0; WANT_NGINX=0
for v in "${VARIANTS[@]}"; do
  uses_pg "$v" && WANT_PG=1
  uses_redis "$v" && WANT_REDIS=1
  [ "$(nodes_of "$v")" = 3 ] && WANT_NGINX=1
done

missing=()
need wrk || missing+=(wrk)
need curl || missing+=(curl)
[ "$WANT_NGINX" = 1 ] && ! need nginx && missing+=(nginx-light)
[ "$WANT_REDIS" = 1 ] && ! need redis-server && missing+=(redis-server)
[ "$WANT_PG" = 1 ] && [ -z "$(pg_bindir || true)" ] && missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && need apt-get; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null ||
    { apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null; }
fi
need wrk || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
[ "$WANT_NGINX" = 0 ] || need nginx || { echo "nginx is required for the 3-node variants" >&2; exit 1; }
[ "$WANT_REDIS" = 0 ] || need redis-server || { echo "redis-server is required" >&2; exit 1; }
PGBIN="$(pg_bindir || true)"
[ "$WANT_PG" = 0 ] || [ -n "$PGBIN" ] || { echo "PostgreSQL (initdb, pg_ctl) is required" >&2; exit 1; }
NGINX_BIN="$(command -v nginx || true)"

if [ "$BUILD" = 1 ]; then
  cargo build --release --workspace --bins --examples
fi
if [ ! -x "$BIN" ] || [ ! -x "$MOCK" ]; then echo "missing $BIN or $MOCK (build first)" >&2; exit 1; fi

TMP="$(mktemp -d -t spidergate-cluster-bench.XXXXXX)"
# The postgres user must reach its data dir and socket under it.
chmod 711 "$TMP"
PIDS=()          # stopped with SIGINT, then SIGKILL after 5 s (gateways, nginx, mock, Redis)
PG_STARTED=0
AS_PG=()
[ "$(id -u)" = 0 ] && AS_PG=(runuser -u postgres --)
as_pg() { (cd / && "${AS_PG[@]}" "$@"); }
cleanup() {
  trap - EXIT INT TERM
  local p i alive
  # SIGINT is Pingora's fast shutdown (SIGTERM waits out the graceful period); nginx with
  # master_process off and redis-server also exit on it.
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for i in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ "$PG_STARTED" = 1 ]; then
    as_pg "$PGBIN/pg_ctl" -D "$TMP/pg/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'echo "cluster_compare.sh: failed at line $LINENO" >&2' ERR
trap 'exit 130' INT
trap 'exit 143' TERM

TAKEN=" "
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 30000 ))
    case "$TAKEN" in *" $p "*) continue ;; esac
    port_busy "$p" && continue
    TAKEN+="$p "
    echo "$p"; return
  done
}
# wait_port PORT NAME [PID]: until PORT answers; with PID, that process must still run then
# (another program may have taken the port since free_port looked).
wait_port() {
  local i
  for i in $(seq 1 150); do
    if [ -n "${3:-}" ] && ! kill -0 "$3" 2>/dev/null; then break; fi
    if port_busy "$1"; then
      if [ -z "${3:-}" ] || kill -0 "$3" 2>/dev/null; then return 0; fi
      break
    fi
    sleep 0.1
  done
  echo "$2 does not listen on 127.0.0.1:$1; log:" >&2; tail -20 "$TMP/$2.log" >&2 || true; exit 1
}

PROXY_CPU=$(( $(nproc) - 1 ))
LOAD_CPU=0
PROXY_PIN=(); LOAD_PIN=()
if [ "$PIN" = 1 ] && need taskset; then
  PROXY_PIN=(taskset -c "$PROXY_CPU"); LOAD_PIN=(taskset -c "$LOAD_CPU")
fi

LOAD_BEFORE="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- the mock provider (1 thread) ---------------------------------------------------------
MOCK_PORT=$(free_port)
"${LOAD_PIN[@]}" "$MOCK" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" mock $!

# --- Redis ----------------------------------------------------------------------------
REDIS_PID=""; REDIS_PORT=""
if [ "$WANT_REDIS" = 1 ]; then
  mkdir -p "$TMP/redis"
  # A free port can be taken between the probe and the bind: a few tries.
  for attempt in 1 2 3 4 5; do
    REDIS_PORT=$(free_port)
    "${LOAD_PIN[@]}" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no \
      --dir "$TMP/redis" --daemonize no --logfile "$TMP/redis.log" >/dev/null 2>&1 &
    PIDS+=($!); REDIS_PID=$!
    for i in $(seq 1 50); do
      port_busy "$REDIS_PORT" && break
      kill -0 "$REDIS_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$REDIS_PID" 2>/dev/null && port_busy "$REDIS_PORT" && break
    [ "$attempt" = 5 ] && { echo "redis-server did not start; log:" >&2; tail -20 "$TMP/redis.log" >&2; exit 1; }
  done
fi
# One INFO field of our Redis.
redis_info() {
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'
}

# --- PostgreSQL -----------------------------------------------------------------------
PG_PID=""; PG_PORT=""
if [ "$WANT_PG" = 1 ]; then
  mkdir -p "$TMP/pg"
  [ "$(id -u)" = 0 ] && chown postgres: "$TMP/pg"
  as_pg "$PGBIN/initdb" -D "$TMP/pg/data" --auth=trust -U postgres -E UTF8 --no-locale --no-sync \
    >"$TMP/pg-initdb.log" 2>&1 || { cat "$TMP/pg-initdb.log" >&2; exit 1; }
  PG_STARTED=1
  for attempt in 1 2 3 4 5; do
    PG_PORT=$(free_port)
    # -w waits until it accepts connections. Durability is off: this measures CPU, not disks.
    if (cd / && "${LOAD_PIN[@]}" "${AS_PG[@]}" "$PGBIN/pg_ctl" -D "$TMP/pg/data" -l "$TMP/pg/server.log" -w \
      -o "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c listen_addresses=127.0.0.1 -p $PG_PORT -c unix_socket_directories=$TMP/pg -c max_connections=200" \
      start >/dev/null); then break; fi
    [ "$attempt" = 5 ] && { tail -20 "$TMP/pg/server.log" >&2; exit 1; }
  done
  PG_PID=$(head -n 1 "$TMP/pg/data/postmaster.pid")
fi

# --- the nodes ------------------------------------------------------------------------
export SPIDERGATE_BENCH_MOCK_KEY="sk-bench"
SPIDERGATE_BENCH_ADMIN_TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
export SPIDERGATE_BENCH_ADMIN_TOKEN
declare -A NODE_PIDS ADMIN_PORTS ENTRY_PORT SECRET SECRETS
# Mints the bench key (rpm, rpd, hard budget, max_inflight) as NAME with config $1; prints
# its secret (empty if it could not).
mint_key() {
  "$BIN" --config "$1" keys create --name "$2" --json \
    --rpm 100000000 --rpd 1000000000 --budget 1000000 --budget-mode hard --max-inflight 100000 \
    | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p'
}
idx=0
for v in "${VARIANTS[@]}"; do
  idx=$((idx + 1))
  n=$(nodes_of "$v")
  shared=""
  db_line="database: \"$TMP/v$idx.db\""
  if uses_pg "$v" || uses_redis "$v"; then
    shared="shared_state:"
    if uses_pg "$v"; then
      psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d postgres -c "CREATE DATABASE sg_v$idx" >/dev/null
      export "SG_BENCH_PG_URL_$idx=postgres://postgres@127.0.0.1:$PG_PORT/sg_v$idx"
      shared+=$'\n'"  postgres_url_env: SG_BENCH_PG_URL_$idx"
      db_line=""
    fi
    if uses_redis "$v"; then
      # Its own Redis database number: no variant sees another's counters.
      export "SG_BENCH_REDIS_URL_$idx=redis://127.0.0.1:$REDIS_PORT/$idx"
      shared+=$'\n'"  redis_url_env: SG_BENCH_REDIS_URL_$idx"
    fi
    shared+=$'\n'"  on_error: closed"$'\n'"  reservation_ttl_ms: 30000"$'\n'"  timeout_ms: 250"
  fi
  pids=""; aports=""
  for i in $(seq 1 "$n"); do
    port=$(free_port); aport=$(free_port)
    cfg="$TMP/v$idx-n$i.yaml"
    cat >"$cfg" <<YAML
# $v, node $i
listen: "127.0.0.1:$port"
$db_line
admin:
  listen: "127.0.0.1:$aport"
  token_env: SPIDERGATE_BENCH_ADMIN_TOKEN
$shared
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:$MOCK_PORT/v1"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
server:
  threads: 1
  upgrade_sock: "$TMP/v$idx-n$i-upgrade.sock"
YAML
    if [ "$i" = 1 ]; then
      "$BIN" --config "$cfg" check-config >/dev/null
      # The key is minted before any node starts (it also creates the schema); the other
      # nodes of a 3-node variant read it from PostgreSQL.
      SECRET[$v]="$(mint_key "$cfg" bench)"
      [ -n "${SECRET[$v]}" ] || { echo "$v: could not read the key's secret from keys create --json" >&2; exit 1; }
      # --keys N: N-1 more keys like it; wrk's requests take all N in turn.
      SECRETS[$v]="${SECRET[$v]}"
      for ((k = 2; k <= KEYS; k++)); do
        s="$(mint_key "$cfg" "bench-$k")"
        [ -n "$s" ] || { echo "$v: could not mint key $k" >&2; exit 1; }
        SECRETS[$v]+=" $s"
      done
      ENTRY_PORT[$v]=$port
    fi
    RUST_LOG=warn "${PROXY_PIN[@]}" "$BIN" --config "$cfg" serve >"$TMP/v$idx-n$i.log" 2>&1 &
    PIDS+=($!); pids+="$! "; aports+="$aport "
    # One at a time, as scripts/cluster.sh starts them.
    wait_port "$port" "v$idx-n$i" $!
  done
  NODE_PIDS[$v]="$pids"; ADMIN_PORTS[$v]="$aports"
done

# --- nginx (round-robin over each 3-node variant's nodes, as scripts/cluster.sh writes it,
# without the access log) -----------------------------------------------------------------
NGINX_PID=""
if [ "$WANT_NGINX" = 1 ]; then
  mkdir -p "$TMP/nginx"
  blocks=""
  idx=0
  for v in "${VARIANTS[@]}"; do
    idx=$((idx + 1))
    [ "$(nodes_of "$v")" = 3 ] || continue
    lb=$(free_port)
    servers=""
    for i in 1 2 3; do
      servers+="    server $(sed -n 's/^listen: "\(.*\)"$/\1/p' "$TMP/v$idx-n$i.yaml");"$'\n'
    done
    blocks+="  upstream v$idx {
$servers    keepalive 64;
    keepalive_timeout 5s;
  }
  server {
    listen 127.0.0.1:$lb;
    location / {
      proxy_pass http://v$idx;
      proxy_http_version 1.1;
      proxy_set_header Connection \"\";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
      proxy_send_timeout 300s;
      proxy_next_upstream error timeout;
    }
  }
"
    ENTRY_PORT[$v]=$lb
  done
  cat >"$TMP/nginx/nginx.conf" <<NGX
worker_processes 1;
master_process off;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  client_max_body_size 33m;
$blocks}
NGX
  "${LOAD_PIN[@]}" "$NGINX_BIN" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" -e "$TMP/nginx/error.log" \
    >"$TMP/nginx.log" 2>&1 &
  PIDS+=($!); NGINX_PID=$!
  for v in "${VARIANTS[@]}"; do
    if [ "$(nodes_of "$v")" = 3 ]; then wait_port "${ENTRY_PORT[$v]}" nginx "$NGINX_PID"; fi
  done
fi

# --- probes ---------------------------------------------------------------------------
# utime + stime of processes (all threads), in clock ticks.
cpu_ticks() {
  local p t=0 x
  for p in "$@"; do
    x=$(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")
    t=$((t + x))
  done
  echo "$t"
}
# CPU time in ns of processes (every live thread), from /proc/PID/task/*/schedstat: finer
# than clock ticks for Redis and PostgreSQL, which use a few per cent of a CPU.
ns_of() {
  local p globs=()
  for p in "$@"; do globs+=("/proc/$p/task/"*/schedstat); done
  # A thread or process can end between the glob and the read: cat then fails, which is fine.
  { cat "${globs[@]}" 2>/dev/null || true; } | awk '{ t += $1 } END { printf "%.0f\n", t }'
}
# The postmaster and its children (the gateways' backends, which live as long as their pools).
pg_ns() {
  # shellcheck disable=SC2046 # one pid per word
  ns_of "$PG_PID" $({ cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v root="$PG_PID" '{
      pid = $1; s = $0; sub(/.*\) /, "", s); split(s, f, " "); if (f[2] == root) print pid }')
}
metric_sum() { # VARIANT METRIC: the metric summed over the variant's nodes
  local v="$1" m="$2" a t=0 x
  for a in ${ADMIN_PORTS[$v]}; do
    x=$({ curl -s -m 5 -H "Authorization: Bearer $SPIDERGATE_BENCH_ADMIN_TOKEN" "http://127.0.0.1:$a/metrics" || true; } |
        awk -v m="$m" '$1 == m { print $2 }')
    [ -n "$x" ] || { echo "no $m on $v's admin port $a" >&2; exit 1; }
    t=$((t + x))
  done
  echo "$t"
}
now_ns() { date +%s%N; }
# "busy total" jiffies of CPU $1 from /proc/stat (busy = all but idle and iowait).
cpu_jiffies() { awk -v c="cpu$1" '$1 == c { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
pg_nodes() {
  local v t=0
  for v in "${VARIANTS[@]}"; do if uses_pg "$v"; then t=$((t + $(nodes_of "$v"))); fi; done
  echo "$t"
}

# --fleet: the key of every variant becomes a grandchild in a group (see the header).
if [ "$FLEET" = 1 ]; then
  idx=0
  for v in "${VARIANTS[@]}"; do
    idx=$((idx + 1))
    cfg="$TMP/v$idx-n1.yaml"
    "$BIN" --config "$cfg" groups create bench-group --budget 1000000 --budget-mode hard \
      --rpm 100000000 --json >/dev/null
    root_id="$("$BIN" --config "$cfg" keys list --json | tr -d '\n' \
      | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\(key_[0-9a-f]*\)".*/\1/p')"
    "$BIN" --config "$cfg" keys update "$root_id" --group bench-group \
      --scopes gate:chat,gate:usage,gate:keys --json >/dev/null
    sleep 1  # every node polls the store for key changes
    for depth in 1 2; do
      SECRET[$v]="$(curl -s -X POST "http://127.0.0.1:${ENTRY_PORT[$v]}/v1/keys" \
        -H "Authorization: Bearer ${SECRET[$v]}" -H 'Content-Type: application/json' \
        -d "{\"name\":\"bench-$depth\",\"rpm\":100000000,\"rpd\":1000000000,\"scopes\":[\"gate:chat\",\"gate:usage\",\"gate:keys\"]}" \
        | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
      [ -n "${SECRET[$v]}" ] || { echo "--fleet: $v could not mint the depth-$depth key" >&2; exit 1; }
    done
  done
  sleep 1  # the minted keys reach every node of the 3-node variants
  echo "fleet: every variant's key is a grandchild in a group"
fi

# Smoke test: every variant answers 200 with a completion (this also seeds each Redis
# variant's month and day from its store).
BODY='{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
for v in "${VARIANTS[@]}"; do
  for k in 1 2 3; do
    code=$(curl -s -o "$TMP/smoke" -w '%{http_code}' -X POST "http://127.0.0.1:${ENTRY_PORT[$v]}/v1/chat/completions" \
      -H "Authorization: Bearer ${SECRET[$v]}" -H 'Content-Type: application/json' -d "$BODY" || true)
    [ "$code" = 200 ] || { echo "smoke test: $v answered $code: $(head -c 300 "$TMP/smoke")" >&2; exit 1; }
  done
  if uses_redis "$v"; then
    [ "$(metric_sum "$v" spidergate_shared_limits_up)" = "$(nodes_of "$v")" ] ||
      { echo "smoke test: $v has a node without Redis (spidergate_shared_limits_up)" >&2; exit 1; }
  fi
done

# Background, measured idle: Redis commands per second per node (heartbeat, hold renewals,
# sweep), and CPU per second of Redis and PostgreSQL with every node idle; the CPU rates are
# subtracted from each round's Redis and PostgreSQL CPU (idle variants keep polling them).
IDLE_S=8
declare -A BG_BEFORE
for v in "${VARIANTS[@]}"; do
  if uses_redis "$v"; then BG_BEFORE[$v]=$(metric_sum "$v" spidergate_redis_commands_total); fi
done
r0=0; p0=0; s0=0
if [ -n "$REDIS_PID" ]; then r0=$(ns_of "$REDIS_PID"); s0=$(redis_info stats total_commands_processed); fi
if [ -n "$PG_PID" ]; then p0=$(pg_ns); fi
t0=$(now_ns)
sleep "$IDLE_S"
t1=$(now_ns)
BG_RATE=0; bg_nodes=0; bg_cmds=0
for v in "${VARIANTS[@]}"; do
  if uses_redis "$v"; then
    bg_cmds=$((bg_cmds + $(metric_sum "$v" spidergate_redis_commands_total) - BG_BEFORE[$v]))
    bg_nodes=$((bg_nodes + $(nodes_of "$v")))
  fi
done
# ns of CPU per ns of wall time
IDLE_REDIS_RATE=0; IDLE_PG_RATE=0; IDLE_REDIS=""; IDLE_PG=""; FLOOR=""
if [ "$bg_nodes" -gt 0 ]; then
  BG_RATE=$(awk -v c="$bg_cmds" -v n="$bg_nodes" -v dt="$((t1 - t0))" 'BEGIN { printf "%.2f", c / n / (dt / 1e9) }')
  IDLE_REDIS_RATE=$(awk -v d="$(( $(ns_of "$REDIS_PID") - r0 ))" -v dt="$((t1 - t0))" 'BEGIN { printf "%.6f", d / dt }')
  IDLE_REDIS=$(awk -v r="$IDLE_REDIS_RATE" -v dt="$((t1 - t0))" -v c="$(( $(redis_info stats total_commands_processed) - s0 - 1 ))" \
    'BEGIN { printf "Redis idle: %.2f ms CPU/s, %.1f commands/s executed", r * 1000, c / (dt / 1e9) }')
  # This machine's floor, for scale: Redis CPU per PING and per trivial script call from one
  # client (no pipelining), as each node's one connection sends them at c1.
  redis_floor() {
    local n=20000 a b
    a=$(ns_of "$REDIS_PID")
    "${LOAD_PIN[@]}" redis-benchmark -h 127.0.0.1 -p "$REDIS_PORT" -c 1 -n "$n" -q "$@" >/dev/null
    b=$(ns_of "$REDIS_PID")
    awk -v d="$((b - a))" -v n="$n" 'BEGIN { printf "%.1f", d / 1000 / n }'
  }
  FLOOR="Redis CPU per call from one client, for scale: PING $(redis_floor PING) us, EVAL 'return 1' $(redis_floor EVAL "return 1" 0) us"
  # Per-command figures from here on (INFO commandstats, printed at the end).
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" CONFIG RESETSTAT >/dev/null
fi
if [ -n "$PG_PID" ]; then
  IDLE_PG_RATE=$(awk -v d="$(( $(pg_ns) - p0 ))" -v dt="$((t1 - t0))" 'BEGIN { printf "%.6f", d / dt }')
  IDLE_PG=$(awk -v r="$IDLE_PG_RATE" 'BEGIN { printf "PostgreSQL idle: %.2f ms CPU/s", r * 1000 }')
fi

RESULTS="$TMP/results.tsv"
WARMUPS="$TMP/warmups.tsv"
: >"$RESULTS"; : >"$WARMUPS"

# run_round PHASE VARIANT ROUND DURATION CONNECTIONS
# Appends to $RESULTS (warm-ups to $WARMUPS): phase variant round rps gw_us/req p50_us p99_us
#   errors requests rt/req redis_cmds/req redis_us/req pg_us/req nginx_us/req fallbacks
#   rt/req_net_of_background load_cpu_busy% gateway_cpu_busy%
# (rt/req and redis_cmds/req are -1 for variants without Redis; Redis and PostgreSQL CPU are
# net of their idle rate over the round's wall time.)
run_round() {
  local phase="$1" v="$2" round="$3" dur="$4" conns="$5" out line p redis=0
  local g0 g1 c0=0 c1=0 s0=0 s1=0 r0=0 r1=0 p0=0 p1=0 n0=0 n1=0 f0=0 f1=0 t0 t1
  local lb0 lt0 pb0 pt0 lb1 lt1 pb1 pt1
  uses_redis "$v" && redis=1
  if [ "$redis" = 1 ]; then
    c0=$(metric_sum "$v" spidergate_redis_commands_total)
    f0=$(( $(metric_sum "$v" spidergate_limits_fallback_total) + $(metric_sum "$v" spidergate_limits_unavailable_total) ))
    s0=$(redis_info stats total_commands_processed); r0=$(ns_of "$REDIS_PID")
  fi
  if uses_pg "$v"; then p0=$(pg_ns); fi
  if [ "$(nodes_of "$v")" = 3 ]; then n0=$(cpu_ticks "$NGINX_PID"); fi
  # shellcheck disable=SC2086 # the variant's pids, one word each
  g0=$(cpu_ticks ${NODE_PIDS[$v]})
  read -r lb0 lt0 <<<"$(cpu_jiffies "$LOAD_CPU")"; read -r pb0 pt0 <<<"$(cpu_jiffies "$PROXY_CPU")"
  local record_pid=""
  if [ -n "$PROFILE_DIR" ] && [ "$phase" = load ] && [ "$round" != warmup ] && [ "$(nodes_of "$v")" = 1 ]; then
    mkdir -p "$PROFILE_DIR"
    # shellcheck disable=SC2086 # one pid
    perf record -q -e cpu-clock -F 4999 -p ${NODE_PIDS[$v]} -o "$PROFILE_DIR/$v.$round.data" -- sleep "$dur" >/dev/null 2>&1 &
    record_pid=$!
  fi
  t0=$(now_ns)
  out=$(SG_SECRET="${SECRET[$v]}" SG_SECRETS="$([ "$KEYS" -gt 1 ] && echo "${SECRETS[$v]}")" SG_STREAM=0 SG_API=chat "${LOAD_PIN[@]}" wrk -t1 -c"$conns" -d"${dur}s" --latency \
        -s "$LUA" "http://127.0.0.1:${ENTRY_PORT[$v]}" 2>&1 || true)
  t1=$(now_ns)
  [ -z "$record_pid" ] || wait "$record_pid" 2>/dev/null || true
  read -r lb1 lt1 <<<"$(cpu_jiffies "$LOAD_CPU")"; read -r pb1 pt1 <<<"$(cpu_jiffies "$PROXY_CPU")"
  # shellcheck disable=SC2086
  g1=$(cpu_ticks ${NODE_PIDS[$v]})
  # shellcheck disable=SC2086
  for p in ${NODE_PIDS[$v]} $REDIS_PID $NGINX_PID; do
    kill -0 "$p" 2>/dev/null || { echo "process $p ($v) is gone; wrk said:" >&2; printf '%s\n' "$out" >&2; exit 1; }
  done
  if [ "$redis" = 1 ]; then
    r1=$(ns_of "$REDIS_PID"); s1=$(redis_info stats total_commands_processed)
    c1=$(metric_sum "$v" spidergate_redis_commands_total)
    f1=$(( $(metric_sum "$v" spidergate_limits_fallback_total) + $(metric_sum "$v" spidergate_limits_unavailable_total) ))
  fi
  if uses_pg "$v"; then p1=$(pg_ns); fi
  if [ "$(nodes_of "$v")" = 3 ]; then n1=$(cpu_ticks "$NGINX_PID"); fi
  line=$(printf '%s\n' "$out" | grep '^WRK_RESULT' || true)
  if [ -z "$line" ]; then echo "wrk produced no result for $v:" >&2; printf '%s\n' "$out" >&2; exit 1; fi
  if [ "$round" != warmup ]; then
    if printf '%s\n' "$out" | grep -q 'Non-2xx'; then
      echo "!!!!!!!! WARNING: $v ($phase, round $round) had non-2xx responses: $(printf '%s\n' "$out" | grep 'Non-2xx') !!!!!!!!" >&2
    fi
    if printf '%s\n' "$out" | grep -q 'Socket errors'; then
      echo "!!! warning: $v ($phase, round $round): $(printf '%s\n' "$out" | grep 'Socket errors')" >&2
    fi
  fi
  # s1 - s0 counts the first INFO call itself: minus one.
  printf '%s\n' "$line" | awk -v ph="$phase" -v v="$v" -v r="$round" -v hz="$CLK_TCK" -v redis="$redis" \
      -v g="$((g1 - g0))" -v c="$((c1 - c0))" -v s="$((s1 - s0 - 1))" -v ng="$((n1 - n0))" -v fb="$((f1 - f0))" \
      -v rd="$((r1 - r0))" -v pg="$((p1 - p0))" -v dt="$((t1 - t0))" -v ir="$IDLE_REDIS_RATE" -v ip="$IDLE_PG_RATE" \
      -v bg="$BG_RATE" -v nodes="$(nodes_of "$v")" \
      -v lb="$((lb1 - lb0))" -v lt="$((lt1 - lt0))" -v pb="$((pb1 - pb0))" -v pt="$((pt1 - pt0))" '{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      n = f["requests"]; rps = n / (f["duration_us"] / 1e6)
      tick = n > 0 ? 1e6 / hz / n : 0
      rt = (redis && n > 0) ? c / n : -1
      sc = (redis && n > 0) ? s / n : -1
      rus = (redis && n > 0) ? (rd - ir * dt) / 1000 / n : 0
      pus = (pg != 0 && n > 0) ? (pg - ip * dt) / 1000 / n : 0
      rtn = (redis && n > 0) ? (c - bg * nodes * dt / 1e9) / n : -1
      printf "%s\t%s\t%s\t%.0f\t%.2f\t%d\t%d\t%d\t%d\t%.3f\t%.3f\t%.2f\t%.2f\t%.2f\t%d\t%.3f\t%.0f\t%.0f\n", ph, v, r, rps, g * tick,
        f["p50_us"], f["p99_us"], f["non2xx"] + f["connect"] + f["read"] + f["write"] + f["timeout"], n,
        rt, sc, rus, pus, ng * tick, fb, rtn, (lt > 0 ? 100 * lb / lt : 0), (pt > 0 ? 100 * pb / pt : 0)
    }' >>"$([ "$round" = warmup ] && echo "$WARMUPS" || echo "$RESULTS")"
}

PHASES=(load)
[ "$C1" = 1 ] && PHASES+=(c1)
conns_of() { [ "$1" = c1 ] && echo 1 || echo "$CONNECTIONS"; }

echo "== benches/wrk_compare.sh --cluster: $(date -u +%FT%TZ), tree $(git describe --always --dirty 2>/dev/null || echo '?'), $(nproc) CPUs, CLK_TCK $CLK_TCK"
echo "gateway: $BIN, built $(date -u -r "$BIN" +%FT%TZ)"
echo "load average before: $LOAD_BEFORE"
if [ ${#PROXY_PIN[@]} -gt 0 ]; then
  echo "pinning: gateway nodes (all threads) on CPU $PROXY_CPU; wrk, mock, Redis, PostgreSQL, nginx on CPU $LOAD_CPU"
else
  echo "pinning: none (--no-pin)"
fi
echo "variants: ${VARIANTS[*]}; phases: load = wrk -t1 -c$CONNECTIONS$([ "$C1" = 1 ] && echo ", c1 = wrk -t1 -c1"); ${DURATION}s x $ROUNDS alternating rounds each"
echo "servers: $([ -n "$REDIS_PID" ] && redis-server --version | awk '{ print $1, $3 }') $([ -n "$PG_PID" ] && "$PGBIN/postgres" --version) $([ -n "$NGINX_PID" ] && "$NGINX_BIN" -v 2>&1 | sed 's/.*: //')"
if [ "$bg_nodes" -gt 0 ]; then
  echo "background, every node idle ${IDLE_S}s: $BG_RATE Redis round trips/s per node (heartbeat, renewals, sweep); $IDLE_REDIS"
fi
if [ -n "$FLOOR" ]; then echo "$FLOOR"; fi
if [ -n "$IDLE_PG" ]; then echo "$IDLE_PG ($(pg_nodes) idle PostgreSQL nodes: key_changes polls, heartbeats, ledger)"; fi
echo "Redis and PostgreSQL CPU per request below are net of these idle rates"

for phase in "${PHASES[@]}"; do
  for v in "${VARIANTS[@]}"; do run_round "$phase" "$v" warmup 2 "$(conns_of "$phase")"; done
  nv=${#VARIANTS[@]}
  for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round so no variant always runs first or last.
    for k in $(seq 0 $((nv - 1))); do
      v=${VARIANTS[$(( (k + r - 1) % nv ))]}
      run_round "$phase" "$v" "$r" "$DURATION" "$(conns_of "$phase")"
      printf '  %s %-4s round %s %-11s done\n' "$(date +%T)" "$phase" "$r" "$v" >&2
    done
  done
done
LOAD_AFTER="$(cut -d' ' -f1-3 /proc/loadavg)"

# --- report -------------------------------------------------------------------------------
col() { awk -F'\t' -v ph="$1" -v v="$2" -v c="$3" '$1 == ph && $2 == v { print $c }' "$RESULTS"; }
# "min–max (median)" of numbers on stdin, printed with format $1.
range() {
  sort -g | awk -v fmt="$1" '{ a[NR] = $1 } END {
      if (NR == 0) { print "-"; exit }
      m = (NR % 2) ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2
      printf fmt "–" fmt " (" fmt ")\n", a[1], a[NR], m }'
}
# Per-round paired ratios NUM/BASE of column C in phase PH (round r of one against round r of
# the other, which ran next to it).
paired() { paste <(col "$1" "$2" "$4") <(col "$1" "$3" "$4") | awk '$2 > 0 { print $1 / $2 }'; }
paired_diff() { paste <(col "$1" "$2" "$4") <(col "$1" "$3" "$4") | awk '{ print $1 - $2 }'; }
has() { case " ${VARIANTS[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

echo
echo "load average after: $LOAD_AFTER"
for phase in "${PHASES[@]}"; do
  echo
  if [ "$phase" = load ]; then echo "== load: plain chat, wrk -t1 -c$CONNECTIONS, every round =="; else echo "== c1: plain chat, wrk -t1 -c1 (nothing queued), every round =="; fi
  printf '%-11s %-5s %7s %9s %7s %7s %6s %6s %8s %8s %8s %8s %8s\n' variant round rps "gw_us/req" p50_ms p99_ms errors "rt/req" "cmds/req" "redis_us" "pg_us" "nginx_us" "cpu0/1%"
  echo "(gw_us/req: CPU of the variant's nodes; rt/req: Redis round trips of its nodes; cmds/req: commands"
  echo " Redis executed, those inside scripts included; redis_us, pg_us, nginx_us: CPU of those servers, all per request;"
  echo " cpu0/1%: how busy the load CPU and the gateway CPU were, all processes of the machine included)"
  for v in "${VARIANTS[@]}"; do
    awk -F'\t' -v ph="$phase" -v v="$v" '$1 == ph && $2 == v {
        rt = $10 < 0 ? "-" : sprintf("%.3f", $10); sc = $11 < 0 ? "-" : sprintf("%.2f", $11)
        rd = $10 < 0 ? "-" : sprintf("%.1f", $12); pg = ($13 == 0 && v !~ /^pg/) ? "-" : sprintf("%.1f", $13)
        ng = v ~ /-3$/ ? sprintf("%.1f", $14) : "-"
        printf "%-11s %-5s %7d %9.1f %7.2f %7.2f %6d %6s %8s %8s %8s %8s %4d/%-3d\n", $2, $3, $4, $5, $6 / 1000, $7 / 1000, $8, rt, sc, rd, pg, ng, $17, $18 }' "$RESULTS"
  done
  echo
  echo "-- ranges over $ROUNDS rounds: min–max (median) --"
  printf '%-11s %-24s %-22s %-22s %-22s\n' variant rps "gateway us/req" "p50 ms" "p99 ms"
  for v in "${VARIANTS[@]}"; do
    printf '%-11s %-24s %-22s %-22s %-22s\n' "$v" "$(col "$phase" "$v" 4 | range %.0f)" "$(col "$phase" "$v" 5 | range %.1f)" \
      "$(col "$phase" "$v" 6 | awk '{ print $1 / 1000 }' | range %.2f)" "$(col "$phase" "$v" 7 | awk '{ print $1 / 1000 }' | range %.2f)"
  done
  for v in "${VARIANTS[@]}"; do
    if uses_redis "$v"; then
      printf '%-11s Redis round trips/req %s (net of background %s), commands executed/req %s, Redis CPU us/req %s\n' "$v" \
        "$(col "$phase" "$v" 10 | range %.3f)" "$(col "$phase" "$v" 16 | range %.3f)" "$(col "$phase" "$v" 11 | range %.2f)" "$(col "$phase" "$v" 12 | range %.1f)"
    fi
  done
  for v in "${VARIANTS[@]}"; do
    uses_pg "$v" && printf '%-11s PostgreSQL CPU us/req %s\n' "$v" "$(col "$phase" "$v" 13 | range %.1f)"
  done
  for v in "${VARIANTS[@]}"; do
    [ "$(nodes_of "$v")" = 3 ] && printf '%-11s nginx CPU us/req %s\n' "$v" "$(col "$phase" "$v" 14 | range %.1f)"
  done
  echo
  echo "-- ratios, paired per round: min–max (median) --"
  printf '%-24s %-22s %-22s %-22s %-22s %-22s\n' "variant / baseline" rps "gateway CPU/req" "gw+Redis CPU/req" p50 p99
  for pair in "redis-1 local-1" "pg+redis-1 pg-1" "pg+redis-1 local-1" "pg-1 local-1" "pg+redis-3 pg-3"; do
    read -r a b <<<"$pair"
    if ! has "$a" || ! has "$b"; then continue; fi
    # Gateway + Redis server CPU per request: what moving the limits out costs in all.
    tot=$(paste <(col "$phase" "$a" 5) <(col "$phase" "$a" 12) <(col "$phase" "$b" 5) <(col "$phase" "$b" 12) |
      awk -v ra="$(uses_redis "$a" && echo 1 || echo 0)" -v rb="$(uses_redis "$b" && echo 1 || echo 0)" \
        '{ x = $1 + (ra ? $2 : 0); y = $3 + (rb ? $4 : 0); if (y > 0) print x / y }' | range %.3f)
    printf '%-24s %-22s %-22s %-22s %-22s %-22s\n' "$a / $b" "$(paired "$phase" "$a" "$b" 4 | range %.3f)" \
      "$(paired "$phase" "$a" "$b" 5 | range %.3f)" "$tot" "$(paired "$phase" "$a" "$b" 6 | range %.3f)" "$(paired "$phase" "$a" "$b" 7 | range %.3f)"
  done
  # With Redis on the load CPU (two cores: the gateway's and everything else's), a Redis
  # variant can saturate the load CPU before the gateway's: its rps ratio then measures the
  # load CPU. The node's own capacity is its rps per busy share of the gateway CPU.
  echo
  echo "-- node capacity, paired per round: rps / gateway-CPU busy share, min–max (median) --"
  echo "(what the node would serve with its core full; the rps ratio above is bound by the load CPU"
  echo " when that is near 100 % busy, cpu0 in the table of every round)"
  printf '%-24s %-22s %-22s\n' "variant / baseline" "capacity" "load CPU busy %"
  for pair in "redis-1 local-1" "pg+redis-1 pg-1" "pg+redis-1 local-1" "pg-1 local-1" "pg+redis-3 pg-3"; do
    read -r a b <<<"$pair"
    if ! has "$a" || ! has "$b"; then continue; fi
    cap=$(paste <(col "$phase" "$a" 4) <(col "$phase" "$a" 18) <(col "$phase" "$b" 4) <(col "$phase" "$b" 18) |
      awk '$2 > 0 && $3 > 0 && $4 > 0 { print ($1 / $2) / ($3 / $4) }' | range %.3f)
    printf '%-24s %-22s %-22s\n' "$a / $b" "$cap" "$(col "$phase" "$a" 17 | range %.0f) / $(col "$phase" "$b" 17 | range %.0f)"
  done
  if [ "$phase" = c1 ]; then
    echo
    echo "-- added latency at c1, paired per round, us: min–max (median) --"
    for pair in "redis-1 local-1" "pg+redis-1 pg-1" "pg+redis-1 local-1" "pg+redis-3 pg-3"; do
      read -r a b <<<"$pair"
      if ! has "$a" || ! has "$b"; then continue; fi
      printf '%-24s p50 %-26s p99 %s\n' "$a - $b" "$(paired_diff c1 "$a" "$b" 6 | range %+.0f)" "$(paired_diff c1 "$a" "$b" 7 | range %+.0f)"
    done
  fi
done

echo
if [ "$bg_nodes" -gt 0 ]; then
  rts=$(awk -F'\t' '$10 >= 0 { print $10 }' "$RESULTS")
  # Net of the background measured idle (per node, times the round's nodes and length).
  echo "redis round trips per request: $(printf '%s\n' "$rts" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.3f–%.3f", lo, hi }') (at most 2; batched under load)"
  rtn=$(awk -F'\t' '$10 >= 0 { print $16 }' "$RESULTS")
  echo "  (every Redis variant and timed round, all phases, median $(printf '%s\n' "$rts" | range %.3f | sed 's/.*(\(.*\))/\1/'), with each node's background"
  echo "   of $BG_RATE round trips/s; net of it: $(printf '%s\n' "$rtn" | range %.3f); at -c1 each request is alone (2.000; above"
  echo "   it, the requests wrk abandons when a round ends, which the nodes still admit and settle); under load one call"
  echo "   carries the admissions and settlements that waited while the previous one was in flight)"
fi
if [ "$bg_nodes" -gt 0 ]; then
  # What Redis spends its time on: every command it ran since the idle measurement (warm-ups
  # and rounds of every Redis variant, all phases; script-internal calls are counted as
  # commands, and EVALSHA's time includes theirs).
  reqs=$(cat "$RESULTS" "$WARMUPS" | awk -F'\t' '$10 >= 0 { n += $9 } END { print n + 0 }')
  echo
  echo "-- Redis INFO commandstats over all Redis variants' requests ($reqs): top 12 by time --"
  printf '%-22s %10s %10s %10s\n' command calls/req usec/call usec/req
  redis-cli -h 127.0.0.1 -p "$REDIS_PORT" INFO commandstats | tr -d '\r' |
    awk -F'[:,=]' '/^cmdstat_/ { print substr($1, 9), $3, $5 }' | sort -k3,3nr | head -12 |
    awk -v n="$reqs" '{ printf "%-22s %10.3f %10.2f %10.2f\n", $1, $2 / n, $3 / $2, $3 / n }'
  echo "(EVALSHA's and FCALL's time includes the commands the scripts run; Redis CPU per request above also"
  echo " counts reading, parsing and answering the requests, which commandstats does not)"
fi
bad=$(awk -F'\t' '{ s += $8 } END { print s + 0 }' "$RESULTS")
fb=$(awk -F'\t' '{ s += $15 } END { print s + 0 }' "$RESULTS")
if [ "$bad" != 0 ] || [ "$fb" != 0 ]; then
  echo
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! WARNING: $bad errors or non-2xx responses, $fb admissions on local limits or refused"
  echo "!!! (Redis missed timeout_ms) during timed rounds: those rounds' numbers are invalid"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
fi
mkdir -p "$ROOT/target/bench"
cp "$RESULTS" "$ROOT/target/bench/cluster_compare.tsv"
echo "every round: target/bench/cluster_compare.tsv"
