#!/usr/bin/env bash
# Throughput and CPU-per-request of the full gateway against a bare Pingora pass-through
# proxy (examples/bare_proxy.rs) and nginx, all in front of the same mock provider, measured
# in one run with alternating rounds so machine noise hits every proxy alike.
#
#   benches/wrk_compare.sh [--duration 10] [--connections 32] [--rounds 3]
#                          [--no-nginx] [--no-stream] [--no-tls] [--no-build] [--no-pin]
#                          [--fleet] [--syscalls] [--profile DIR]
#
# Each row also gives the proxy's CPU per request split into user and kernel time, the
# part of it spent by threads other than the request worker (bg_us: the gateway's ledger
# writer, checkpointer and background tasks), its context switches per request (all
# threads, from /proc) and, with --syscalls, its system calls per request (perf's
# raw_syscalls tracepoint). With --profile DIR, each round of each proxy is sampled by
# `perf record` (cpu-clock, 4999 Hz, all threads) into DIR/VARIANT.PROXY.ROUND.data: where
# the wall-clock time goes, to set beside the counted instructions of benches/instr.py (a
# function's share of time above its share of instructions stalls: cache misses, atomics,
# mispredictions). PROFILE_EVENT=E records every hit of another event instead
# (raw_syscalls:sys_enter: which system calls, per thread); PROFILE_CALLGRAPH=fp or
# dwarf,16384 records call graphs too (release builds keep no frame pointers: fp gives
# whole kernel stacks only).
#
# --fleet: the gateway's requests come from a key three deep in a tree of minted keys (the
# bench key, a child, a grandchild through /v1/keys) inside a group with a hard budget and an
# rpm, so each admission also checks and holds two parents and a group (SPEC §7). Compare
# its gateway/bare ratios with a run without it.
#
# Variants: plain chat, streamed chat, and (unless --no-stream) a streamed /v1/messages
# pass-through to an anthropic-kind provider (the mock speaks both formats); and, unless
# --no-tls, two HTTPS rows with certificates from a CA made for the run:
#   tls_upstream: plain chat to a TLS upstream (a second mock serving HTTPS), the gateway's
#                 provider with `tls_ca_file` against a bare proxy verifying the same CA;
#   tls_listener: wrk speaks HTTPS to the proxy, which terminates TLS (the gateway with
#                 `tls`, a second gateway process on the same database; a bare proxy with
#                 a TLS listener), plain HTTP to the mock.
#
# Measured the way ops run it: each proxy process (all its threads) pinned to CPU 1, wrk and
# the mock on CPU 0 (--no-pin to let the scheduler place them), and the gateway's key has an
# rpm, an rpd and a hard budget, so every request takes the full admission path.
# Bar: gateway rps >= 0.80 x bare rps, CPU/request <= 1.25 x bare, p99 <= 1.5 x bare.
# It reports PASS/FAIL; it always exits 0 unless the set-up itself fails.
# Writes the median gateway rps (plain chat) to target/bench/gateway_rps.txt, which
# `cargo bench --bench ledger_throughput` compares the ledger writer against.
#
#   benches/wrk_compare.sh --cluster [--duration 10] [--rounds 3] [--connections 32] [--no-build] ...
# runs benches/cluster_compare.sh instead (the Redis limit store against in-process limits, one
# and three nodes; its own header says how).
set -euo pipefail

for arg in "$@"; do
  if [ "$arg" = --cluster ]; then exec "$(dirname "$0")/cluster_compare.sh" "$@"; fi
done

DURATION=10
CONNECTIONS=32
ROUNDS=3
WITH_NGINX=1
WITH_STREAM=1
WITH_TLS=1
FLEET=0
BUILD=1
PIN=1
COUNT_SYSCALLS=0
PROFILE_DIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --no-nginx) WITH_NGINX=0; shift ;;
    --no-stream) WITH_STREAM=0; shift ;;
    --no-tls) WITH_TLS=0; shift ;;
    --fleet) FLEET=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --no-pin) PIN=0; shift ;;
    --syscalls) COUNT_SYSCALLS=1; shift ;;
    --profile) PROFILE_DIR="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^[^#]/{ /^#/p }' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
LUA="$ROOT/benches/lua/chat.lua"
BIN="$ROOT/target/release/spidergate"
MOCK="$ROOT/target/release/spidergate-mock"
# The gateway binary under test (default: this tree's release build) and the bare proxy's
# (BARE_BIN, default this tree's `examples/bare_proxy`: compare builds of one profile, e.g.
# both from an LTO build); the mock and the CLI always come from this tree.
GW_BIN="${GW_BIN:-$BIN}"
BARE="${BARE_BIN:-$ROOT/target/release/examples/bare_proxy}"
CLK_TCK="$(getconf CLK_TCK)"

need() { command -v "$1" >/dev/null 2>&1; }
if ! need wrk || { [ "$WITH_NGINX" = 1 ] && ! need nginx; }; then
  if [ "$(id -u)" = 0 ] && need apt-get; then
    pkgs=(wrk); [ "$WITH_NGINX" = 1 ] && pkgs+=(nginx-light)
    apt-get install -y "${pkgs[@]}" >/dev/null || { apt-get update >/dev/null && apt-get install -y "${pkgs[@]}" >/dev/null; }
  fi
fi
need wrk || { echo "wrk is required (apt-get install wrk)" >&2; exit 1; }
if [ "$WITH_NGINX" = 1 ] && ! need nginx; then
  echo "nginx not found: skipping the nginx column" >&2; WITH_NGINX=0
fi
NGINX_BIN="$(command -v nginx || true)"

if [ "$BUILD" = 1 ]; then
  cargo build --release --workspace --bins --examples
fi
if [ ! -x "$BIN" ] || [ ! -x "$BARE" ] || [ ! -x "$MOCK" ]; then echo "missing $BIN, $BARE or $MOCK (build first)" >&2; exit 1; fi

TMP="$(mktemp -d -t spidergate-bench.XXXXXX)"
[ -z "$PROFILE_DIR" ] || mkdir -p "$PROFILE_DIR"
PIDS=()
cleanup() {
  # SIGINT is Pingora's fast shutdown (SIGTERM waits out the graceful period); nginx with
  # master_process off also exits on it. Anything still alive after 5 s gets SIGKILL.
  local p
  for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null || true; done
  for _ in $(seq 1 50); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 30000 ))
    port_busy "$p" || { echo "$p"; return; }
  done
}
wait_port() {
  for _ in $(seq 1 100); do port_busy "$1" && return 0; sleep 0.1; done
  echo "nothing listens on 127.0.0.1:$1 ($2); log:" >&2; tail -20 "$TMP/$2.log" >&2 || true; exit 1
}

MOCK_PORT=$(free_port); BARE_PORT=$(free_port); GW_PORT=$(free_port); NGINX_PORT=$(free_port)
MOCK_TLS_PORT=$(free_port); BARE_TLS_PORT=$(free_port); BARE_TLSL_PORT=$(free_port); GW_TLSL_PORT=$(free_port)

# CPU placement: proxies on the last CPU, load generator and mock on the first.
PROXY_CPU=$(( $(nproc) - 1 ))
LOAD_CPU=0
# Prefixes, not functions: `taskset` execs the program, so `$!` is the program's own pid
# (whose CPU time is read from /proc).
PROXY_PIN=(); LOAD_PIN=()
if [ "$PIN" = 1 ] && command -v taskset >/dev/null; then
  PROXY_PIN=(taskset -c "$PROXY_CPU"); LOAD_PIN=(taskset -c "$LOAD_CPU")
fi

# 1. Mock provider (1 thread).
"${LOAD_PIN[@]}" "$MOCK" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" mock

# 2. Bare Pingora pass-through (1 thread).
"${PROXY_PIN[@]}" "$BARE" --listen "127.0.0.1:$BARE_PORT" --upstream "127.0.0.1:$MOCK_PORT" --threads 1 \
  >"$TMP/bare.log" 2>&1 &
PIDS+=($!); BARE_PID=$!

# 2b. The https row: a CA and a certificate for 127.0.0.1 made for this run, the mock serving
# HTTPS with it, and a second bare proxy that verifies it.
TLS_PROVIDER=""; TLS_MODEL=""
if [ "$WITH_TLS" = 1 ]; then
  command -v openssl >/dev/null || { echo "openssl is required for the https row (or --no-tls)" >&2; exit 1; }
  mkdir -p "$TMP/tls"
  (
    cd "$TMP/tls"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=spidergate-bench-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
      -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=127.0.0.1 \
      -keyout leaf.key -out leaf.csr 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n' >leaf.ext
    openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile leaf.ext \
      -out leaf.pem 2>/dev/null
  )
  "${LOAD_PIN[@]}" "$MOCK" --listen "127.0.0.1:$MOCK_TLS_PORT" --threads 1 \
    --tls-cert "$TMP/tls/leaf.pem" --tls-key "$TMP/tls/leaf.key" >"$TMP/mock-tls.log" 2>&1 &
  PIDS+=($!)
  wait_port "$MOCK_TLS_PORT" mock-tls
  "${PROXY_PIN[@]}" "$BARE" --listen "127.0.0.1:$BARE_TLS_PORT" --upstream "127.0.0.1:$MOCK_TLS_PORT" --threads 1 \
    --tls-sni 127.0.0.1 --ca-file "$TMP/tls/ca.pem" >"$TMP/bare-tls.log" 2>&1 &
  PIDS+=($!); BARE_TLS_PID=$!
  "${PROXY_PIN[@]}" "$BARE" --listen "127.0.0.1:$BARE_TLSL_PORT" --upstream "127.0.0.1:$MOCK_PORT" --threads 1 \
    --listen-tls-cert "$TMP/tls/leaf.pem" --listen-tls-key "$TMP/tls/leaf.key" >"$TMP/bare-tlsl.log" 2>&1 &
  PIDS+=($!); BARE_TLSL_PID=$!
  TLS_PROVIDER="  - name: mock-tls
    kind: openai
    base_url: \"https://127.0.0.1:$MOCK_TLS_PORT/v1\"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
    tls_ca_file: \"$TMP/tls/ca.pem\""
  TLS_MODEL="  - id: gpt-4o-mini-tls
    provider: mock-tls
    upstream_id: gpt-4o-mini
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384"
fi

# 3. The gateway (1 thread) on a temp config and database, with one key.
# The anthropic provider and model only for the /v1/messages row (with --no-stream the config
# stays one an older build accepts, for GW_BIN comparisons).
ANTHROPIC_PROVIDER=""; ANTHROPIC_MODEL=""
if [ "$WITH_STREAM" = 1 ]; then
  ANTHROPIC_PROVIDER="  - name: mock-anthropic
    kind: anthropic
    base_url: \"http://127.0.0.1:$MOCK_PORT\"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY"
  ANTHROPIC_MODEL="  - id: claude-bench
    provider: mock-anthropic
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    cache_read_usd_per_mtok: 0.3
    max_output_tokens: 16384"
fi
cat >"$TMP/gw.yaml" <<YAML
listen: "127.0.0.1:$GW_PORT"
database: "$TMP/gw.db"
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:$MOCK_PORT/v1"
    api_key_env: SPIDERGATE_BENCH_MOCK_KEY
$ANTHROPIC_PROVIDER
$TLS_PROVIDER
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
$ANTHROPIC_MODEL
$TLS_MODEL
server:
  threads: 1
YAML
export SPIDERGATE_BENCH_MOCK_KEY="sk-bench"
"$GW_BIN" --config "$TMP/gw.yaml" check-config >/dev/null
# A key with every per-request control on (limits far above what the run can reach).
INFLIGHT=(); "$GW_BIN" keys create --help | grep -q -- --max-inflight && INFLIGHT=(--max-inflight 100000)
SECRET="$("$GW_BIN" --config "$TMP/gw.yaml" keys create --name bench --json \
  --rpm 100000000 --rpd 1000000000 --budget 1000000 --budget-mode hard "${INFLIGHT[@]}" \
  | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
[ -n "$SECRET" ] || { echo "could not read the key's secret from keys create --json" >&2; exit 1; }
RUST_LOG=warn "${PROXY_PIN[@]}" "$GW_BIN" --config "$TMP/gw.yaml" serve >"$TMP/gateway.log" 2>&1 &
PIDS+=($!); GW_PID=$!
if [ "$WITH_TLS" = 1 ]; then
  # The same gateway terminating TLS: a second process on the same database and key.
  sed -e "s#^listen: .*#listen: \"127.0.0.1:$GW_TLSL_PORT\"#" \
      -e "s#^server:#tls:\n  cert_file: \"$TMP/tls/leaf.pem\"\n  key_file: \"$TMP/tls/leaf.key\"\nserver:#" \
      -e "s#^  threads: 1#  threads: 1\n  upgrade_sock: \"$TMP/gw-tls-upgrade.sock\"#" \
      "$TMP/gw.yaml" >"$TMP/gw-tls.yaml"
  "$GW_BIN" --config "$TMP/gw-tls.yaml" check-config >/dev/null
  RUST_LOG=warn "${PROXY_PIN[@]}" "$GW_BIN" --config "$TMP/gw-tls.yaml" serve >"$TMP/gateway-tls.log" 2>&1 &
  PIDS+=($!); GW_TLSL_PID=$!
fi

# 4. Optional nginx (1 process, keep-alive upstream pool), for context.
if [ "$WITH_NGINX" = 1 ]; then
  mkdir -p "$TMP/nginx"
  cat >"$TMP/nginx/nginx.conf" <<NGX
worker_processes 1;
master_process off;
daemon off;
pid $TMP/nginx/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx/body;
  proxy_temp_path $TMP/nginx/proxy;
  fastcgi_temp_path $TMP/nginx/fastcgi;
  uwsgi_temp_path $TMP/nginx/uwsgi;
  scgi_temp_path $TMP/nginx/scgi;
  upstream mock { server 127.0.0.1:$MOCK_PORT; keepalive 128; }
  server {
    listen 127.0.0.1:$NGINX_PORT;
    location / {
      proxy_pass http://mock;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
NGX
  "${PROXY_PIN[@]}" "$NGINX_BIN" -p "$TMP/nginx" -c "$TMP/nginx/nginx.conf" >"$TMP/nginx.log" 2>&1 &
  PIDS+=($!); NGINX_PID=$!
fi

wait_port "$BARE_PORT" bare
[ "$WITH_TLS" = 1 ] && { wait_port "$BARE_TLS_PORT" bare-tls; wait_port "$BARE_TLSL_PORT" bare-tlsl; wait_port "$GW_TLSL_PORT" gateway-tls; }
wait_port "$GW_PORT" gateway
[ "$WITH_NGINX" = 1 ] && wait_port "$NGINX_PORT" nginx

# --fleet: the gateway's requests come from a grandchild minted through /v1/keys under the
# bench key (its hard budget now bounds the tree), in a group with a hard budget and an rpm
# (SPEC §7): every admission also checks and holds two parents and a group.
if [ "$FLEET" = 1 ]; then
  "$GW_BIN" --config "$TMP/gw.yaml" groups create bench-group --budget 1000000 --budget-mode hard \
    --rpm 100000000 --json >/dev/null
  ROOT_ID="$("$GW_BIN" --config "$TMP/gw.yaml" keys list --json | tr -d '\n' \
    | sed -n 's/.*"id"[[:space:]]*:[[:space:]]*"\(key_[0-9a-f]*\)".*/\1/p')"
  "$GW_BIN" --config "$TMP/gw.yaml" keys update "$ROOT_ID" --group bench-group \
    --scopes gate:chat,gate:usage,gate:keys --json >/dev/null
  sleep 1  # the gateway polls the store for key changes (server.reload_interval_ms)
  for depth in 1 2; do
    SECRET="$(curl -s -X POST "http://127.0.0.1:$GW_PORT/v1/keys" -H "Authorization: Bearer $SECRET" \
      -H 'Content-Type: application/json' \
      -d "{\"name\":\"bench-$depth\",\"rpm\":100000000,\"rpd\":1000000000,\"scopes\":[\"gate:chat\",\"gate:usage\",\"gate:keys\"]}" \
      | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
    [ -n "$SECRET" ] || { echo "--fleet: could not mint the depth-$depth key" >&2; exit 1; }
  done
  echo "fleet: the gateway's key is a grandchild of the bench key, in bench-group"
fi

PROXIES=(bare gateway)
[ "$WITH_NGINX" = 1 ] && PROXIES+=(nginx)
port_of() { case "$1" in bare) echo "$BARE_PORT";; gateway) echo "$GW_PORT";; nginx) echo "$NGINX_PORT";; esac; }
pid_of() { case "$1" in bare) echo "$BARE_PID";; gateway) echo "$GW_PID";; nginx) echo "$NGINX_PID";; esac; }

# Smoke test: every proxy must answer 200 with a completion before we time anything.
smoke() {
  local name="$1" port="$2" model="$3" code
  code=$(curl -s -o "$TMP/smoke.$name" -w '%{http_code}' -X POST "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
    -d "{\"model\":\"$model\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" || true)
  if [ "$code" != 200 ]; then
    echo "smoke test: $name answered $code: $(head -c 300 "$TMP/smoke.$name")" >&2; exit 1
  fi
}
for p in "${PROXIES[@]}"; do smoke "$p" "$(port_of "$p")" gpt-4o-mini; done
if [ "$WITH_TLS" = 1 ]; then
  smoke bare-tls "$BARE_TLS_PORT" gpt-4o-mini-tls
  smoke gateway-tls "$GW_PORT" gpt-4o-mini-tls
  for pp in "bare-tlsl $BARE_TLSL_PORT" "gateway-tlsl $GW_TLSL_PORT"; do
    set -- $pp
    code=$(curl -s --cacert "$TMP/tls/ca.pem" -o "$TMP/smoke.$1" -w '%{http_code}' -X POST "https://127.0.0.1:$2/v1/chat/completions" \
      -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
      -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' || true)
    [ "$code" = 200 ] || { echo "smoke test: $1 answered $code: $(head -c 300 "$TMP/smoke.$1")" >&2; exit 1; }
  done
fi

# utime and stime of the whole process (all threads), in clock ticks: "user system".
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12, $13 }' "/proc/$1/stat"; }
# CPU time in ns (user + system) of each of the process's threads, from schedstat (clock
# ticks would be 10 ms a thread): "tid:ns ...". A round's bg figure is the time of all
# threads but the busiest, which is the request worker (both proxies run one here): the
# gateway's ledger writer, checkpointer and background tasks, Pingora's timer thread. A
# thread that ends mid-round is not counted.
thread_ns() {
  for t in /proc/"$1"/task/*; do
    read -r ns _ 2>/dev/null <"$t/schedstat" && printf '%s:%s ' "${t##*/}" "$ns"
  done
  echo
}
# The bg nanoseconds between two thread_ns samples.
bg_ns() {
  awk -v b="$1" -v a="$2" 'BEGIN {
    n = split(b, x, " "); for (i = 1; i <= n; i++) { split(x[i], kv, ":"); was[kv[1]] = kv[2] }
    n = split(a, y, " "); for (i = 1; i <= n; i++) { split(y[i], kv, ":"); d = kv[2] - was[kv[1]]
      s += d; if (d > m) m = d }
    printf "%.0f\n", s - m }'
}
# Context switches of the whole process (all threads, voluntary and not).
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s + 0 }'; }
# With --syscalls: system calls of the whole process while a round runs, counted by perf (root
# or a permissive perf_event_paranoid; the tracepoint costs a little per call, in every
# proxy alike); else -1.
PERF_SYSCALLS=0
if [ "$COUNT_SYSCALLS" = 1 ] && command -v perf >/dev/null && perf stat -e raw_syscalls:sys_enter -p $$ -- true >/dev/null 2>&1; then PERF_SYSCALLS=1; fi

RESULTS="$TMP/results.tsv"
: >"$RESULTS"

# run_round VARIANT PROXY ROUND DURATION
run_round() {
  local variant="$1" p="$2" round="$3" dur="$4" stream=0 api=chat model=gpt-4o-mini pid port before after out line
  [ "$variant" = stream ] && stream=1
  [ "$variant" = messages ] && api=messages
  pid=$(pid_of "$p"); port=$(port_of "$p")
  local scheme=http
  if [ "$variant" = tls_upstream ]; then
    model=gpt-4o-mini-tls
    [ "$p" = bare ] && { pid=$BARE_TLS_PID; port=$BARE_TLS_PORT; }
  fi
  if [ "$variant" = tls_listener ]; then
    scheme=https
    case "$p" in
      bare) pid=$BARE_TLSL_PID; port=$BARE_TLSL_PORT ;;
      gateway) pid=$GW_TLSL_PID; port=$GW_TLSL_PORT ;;
    esac
  fi
  local cs_before cs_after perf_pid="" record_pid=""
  local bg_before bg_after
  before=$(cpu_ticks "$pid"); cs_before=$(ctx_switches "$pid"); bg_before=$(thread_ns "$pid")
  if [ "$PERF_SYSCALLS" = 1 ]; then
    perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$TMP/perf.$p" -- sleep "$dur" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  if [ -n "$PROFILE_DIR" ] && [ "$round" != warmup ]; then
    # cpu-clock sampled at 4999 Hz; another event (a tracepoint) recorded at every hit.
    perf record -q -e "${PROFILE_EVENT:-cpu-clock}" $([ -n "${PROFILE_EVENT:-}" ] && echo -c 1 || echo -F 4999) \
      ${PROFILE_CALLGRAPH:+--call-graph=$PROFILE_CALLGRAPH} -p "$pid" -o "$PROFILE_DIR/$variant.$p.$round.data" -- sleep "$dur" >/dev/null 2>&1 &
    record_pid=$!
  fi
  out=$(SG_SECRET="$SECRET" SG_STREAM="$stream" SG_API="$api" SG_MODEL="$model" "${LOAD_PIN[@]}" wrk -t1 -c"$CONNECTIONS" -d"${dur}s" -s "$LUA" \
        "$scheme://127.0.0.1:$port" 2>&1)
  after=$(cpu_ticks "$pid"); cs_after=$(ctx_switches "$pid"); bg_after=$(thread_ns "$pid")
  [ -z "$record_pid" ] || wait "$record_pid" 2>/dev/null || true
  local syscalls=-1
  if [ -n "$perf_pid" ]; then
    wait "$perf_pid" 2>/dev/null || true
    syscalls=$(awk -F, '/raw_syscalls:sys_enter/ { print $1 + 0 }' "$TMP/perf.$p" 2>/dev/null || echo -1)
    [ -n "$syscalls" ] || syscalls=-1
  fi
  [ "$round" = warmup ] && return 0
  line=$(printf '%s\n' "$out" | grep '^WRK_RESULT' || true)
  if [ -z "$line" ]; then echo "wrk produced no result for $p:" >&2; printf '%s\n' "$out" >&2; exit 1; fi
  if printf '%s\n' "$out" | grep -q 'Non-2xx'; then
    echo "!!!!!!!! WARNING: $p ($variant, round $round) had non-2xx responses: $(printf '%s\n' "$out" | grep 'Non-2xx') !!!!!!!!" >&2
  fi
  if printf '%s\n' "$out" | grep -q 'Socket errors'; then
    echo "!!! warning: $p ($variant, round $round): $(printf '%s\n' "$out" | grep 'Socket errors')" >&2
  fi
  # variant proxy round rps cpu_us_per_req p50_us p99_us non2xx requests cs_per_req
  # syscalls_per_req user_us_per_req sys_us_per_req bg_us_per_req
  local user sys
  read -r user sys <<<"$(awk -v b="$before" -v a="$after" 'BEGIN { split(b, x, " "); split(a, y, " "); print y[1] - x[1], y[2] - x[2] }')"
  printf '%s\n' "$line" | awk -v v="$variant" -v p="$p" -v r="$round" -v du="$user" -v ds="$sys" -v hz="$CLK_TCK" \
      -v cs="$((cs_after - cs_before))" -v sc="$syscalls" -v bg="$(bg_ns "$bg_before" "$bg_after")" '{
      for (i = 2; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] }
      rps = f["requests"] / (f["duration_us"] / 1e6)
      n = f["requests"] > 0 ? f["requests"] : 1
      per = f["requests"] > 0 ? 1e6 / hz / f["requests"] : 0
      printf "%s\t%s\t%s\t%.0f\t%.2f\t%d\t%d\t%d\t%d\t%.3f\t%.3f\t%.2f\t%.2f\t%.2f\n", v, p, r, rps, (du + ds) * per, f["p50_us"], f["p99_us"], f["non2xx"], f["requests"], cs / n, (sc < 0 ? -1 : sc / n), du * per, ds * per, bg / 1000 / n
    }' >>"$RESULTS"
}

VARIANTS=(plain)
[ "$WITH_STREAM" = 1 ] && VARIANTS+=(stream messages)
[ "$WITH_TLS" = 1 ] && VARIANTS+=(tls_upstream tls_listener)
# The proxies a variant compares: the TLS rows have no nginx column.
proxies_for() { case "$1" in tls_*) echo bare gateway ;; *) echo "${PROXIES[@]}" ;; esac; }

echo "mock :$MOCK_PORT  bare :$BARE_PORT  gateway :$GW_PORT$([ "$WITH_NGINX" = 1 ] && echo "  nginx :$NGINX_PORT")"
echo "wrk -t1 -c$CONNECTIONS -d${DURATION}s, $ROUNDS alternating rounds per variant, $(nproc) cores, CLK_TCK $CLK_TCK"
for variant in "${VARIANTS[@]}"; do
  read -r -a VPROXIES <<<"$(proxies_for "$variant")"
  for p in "${VPROXIES[@]}"; do run_round "$variant" "$p" warmup 2; done
  for r in $(seq 1 "$ROUNDS"); do
    # Rotate the order each round so no proxy always runs first/last.
    n=${#VPROXIES[@]}
    for k in $(seq 0 $((n - 1))); do
      p=${VPROXIES[$(( (k + r - 1) % n ))]}
      run_round "$variant" "$p" "$r" "$DURATION"
      printf '  %s %-6s round %s %-8s done\n' "$(date +%T)" "$variant" "$r" "$p" >&2
    done
  done
done

# Report.
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) print 0; else if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
col() { awk -F'\t' -v v="$1" -v p="$2" -v c="$3" '$1 == v && $2 == p { print $c }' "$RESULTS"; }

mkdir -p "$ROOT/target/bench"
for variant in "${VARIANTS[@]}"; do
  echo
  case "$variant" in
    stream) echo "== stream chat (\"stream\":true) ==" ;;
    messages) echo "== messages stream (/v1/messages pass-through to an anthropic provider, \"stream\":true) ==" ;;
    tls_upstream) echo "== tls_upstream chat (plain chat; both proxies reach the upstream over verified TLS, pooled) ==" ;;
    tls_listener) echo "== tls_listener chat (plain chat; wrk speaks HTTPS to the proxy, which terminates TLS) ==" ;;
    *) echo "== $variant chat ==" ;;
  esac
  printf '%-8s %-7s %10s %12s %9s %9s %7s %8s %9s %8s %8s %8s\n' proxy round rps "cpu_us/req" p50_ms p99_ms non2xx "cs/req" "sysc/req" "usr_us" "sys_us" "bg_us"
  read -r -a VPROXIES <<<"$(proxies_for "$variant")"
  for p in "${VPROXIES[@]}"; do
    awk -F'\t' -v v="$variant" -v p="$p" '$1 == v && $2 == p {
        printf "%-8s %-7s %10d %12.2f %9.2f %9.2f %7d %8.3f %9.3f %8.2f %8.2f %8.2f\n", $2, $3, $4, $5, $6 / 1000, $7 / 1000, $8, $10, $11, $12, $13, $14 }' "$RESULTS"
    printf '%-8s %-7s %10.0f %12.2f %46s %8.2f %8.2f %8.2f\n' "$p" median "$(col "$variant" "$p" 4 | median)" "$(col "$variant" "$p" 5 | median)" "" \
      "$(col "$variant" "$p" 12 | median)" "$(col "$variant" "$p" 13 | median)" "$(col "$variant" "$p" 14 | median)"
  done
  bare_rps=$(col "$variant" bare 4 | median); gw_rps=$(col "$variant" gateway 4 | median)
  bare_cpu=$(col "$variant" bare 5 | median); gw_cpu=$(col "$variant" gateway 5 | median)
  # Paired per-round ratios too (each gateway round against the bare round next to it).
  paired_rps=$(paste <(col "$variant" gateway 4) <(col "$variant" bare 4) | awk '{ print $1 / $2 }' | median)
  paired_cpu=$(paste <(col "$variant" gateway 5) <(col "$variant" bare 5) | awk '{ print $1 / $2 }' | median)
  awk -v v="$variant" -v gr="$gw_rps" -v br="$bare_rps" -v gc="$gw_cpu" -v bc="$bare_cpu" \
      -v pr="$paired_rps" -v pc="$paired_cpu" 'BEGIN {
    rr = gr / br; cr = gc / bc
    printf "%s: gateway/bare rps        = %.3f  (bar >= 0.80) %s   [median of paired rounds %.3f]\n", v, rr, (rr >= 0.80 ? "PASS" : "FAIL"), pr
    printf "%s: gateway/bare cpu/req    = %.3f  (bar <= 1.25) %s   [median of paired rounds %.3f]\n", v, cr, (cr <= 1.25 ? "PASS" : "FAIL"), pc
  }'
  bare_p99=$(col "$variant" bare 7 | median); gw_p99=$(col "$variant" gateway 7 | median)
  awk -v v="$variant" -v g="$gw_p99" -v b="$bare_p99" 'BEGIN {
    r = g / b
    printf "%s: gateway/bare p99        = %.3f  (bar <= 1.50) %s   [%.2f ms vs %.2f ms]\n", v, r, (r <= 1.50 ? "PASS" : "FAIL"), g / 1000, b / 1000
  }'
  if [ "$WITH_NGINX" = 1 ] && [ "${variant#tls_}" = "$variant" ]; then
    ng_rps=$(col "$variant" nginx 4 | median); ng_cpu=$(col "$variant" nginx 5 | median)
    awk -v v="$variant" -v nr="$ng_rps" -v br="$bare_rps" -v gr="$gw_rps" -v nc="$ng_cpu" -v bc="$bare_cpu" -v gc="$gw_cpu" 'BEGIN {
      printf "%s: (context) nginx/bare rps = %.3f, cpu/req = %.3f; gateway/nginx rps = %.3f, cpu/req = %.3f\n", v, nr / br, nc / bc, gr / nr, gc / nc }'
  fi
  if [ "$variant" = plain ]; then
    printf '%.0f\n' "$gw_rps" >"$ROOT/target/bench/gateway_rps.txt"
  fi
done

bad=$(awk -F'\t' '{ s += $8 } END { print s + 0 }' "$RESULTS")
if [ "$bad" != 0 ]; then
  echo
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
  echo "!!! WARNING: $bad non-2xx responses during timed rounds: numbers invalid"
  echo "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!"
fi
echo
echo "median gateway rps (plain) written to target/bench/gateway_rps.txt"
cp "$RESULTS" "$ROOT/target/bench/wrk_compare.tsv"
