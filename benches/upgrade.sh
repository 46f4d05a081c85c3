#!/usr/bin/env bash
# Zero-drop binary upgrade under load: wrk drives chat completions through the gateway while,
# mid-run, a second `spidergate serve --upgrade` takes over the listening socket from the
# first (Pingora's graceful upgrade: the new process waits on server.upgrade_sock, the old
# one gets SIGQUIT, sends its sockets, finishes its in-flight requests for
# server.shutdown_grace_s, commits its ledger and exits). Both share one SQLite database.
#
#   benches/upgrade.sh [--duration 12] [--switch-at 4] [--connections 32] [--grace 5]
#                      [--gw-threads 1] [--stream] [--no-build] [--keep]
#
# OLD_BIN / NEW_BIN (default: this tree's release build) choose the binaries on either side of
# the upgrade, e.g. the last release and this tree; the mock and the CLI come from this tree.
#
# After wrk ends the new gateway gets SIGTERM (drain, ledger flush), then the script compares
# what wrk saw with what the database recorded:
#   failed requests = non-2xx + socket errors (connect, read, write, timeout)   must be 0
#   lost spend rows = 2xx responses wrk received - SUM(requests) FROM spend     must be 0
# wrk stops at its deadline with one request open per connection; the gateway serves or cuts
# those and books them too, so the recorded count may exceed wrk's 2xx by at most the number
# of connections (reported as "booked beyond wrk's count").
# Prints PASS or FAIL and exits 0 / 1 (2 when the set-up itself fails).
set -euo pipefail

DURATION=12
SWITCH_AT=4
CONNECTIONS=32
GRACE=5
GW_THREADS=1
STREAM=0
BUILD=1
KEEP=0
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) DURATION="$2"; shift 2 ;;
    --switch-at) SWITCH_AT="$2"; shift 2 ;;
    --connections) CONNECTIONS="$2"; shift 2 ;;
    --grace) GRACE="$2"; shift 2 ;;
    --gw-threads) GW_THREADS="$2"; shift 2 ;;
    --stream) STREAM=1; shift ;;
    --no-build) BUILD=0; shift ;;
    --keep) KEEP=1; shift ;;
    -h|--help) sed -n '2,23p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# Pingora's old process keeps accepting for 5 s after it hands the sockets over, then stops
# its listeners and closes its idle keep-alive connections: that moment must fall inside the run.
[ $(( SWITCH_AT + 7 )) -le "$DURATION" ] || { echo "--duration must be at least --switch-at + 7 s" >&2; exit 2; }

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/target/release/spidergate"
MOCK="$ROOT/target/release/spidergate-mock"
LUA="$ROOT/benches/lua/chat.lua"
OLD_BIN="${OLD_BIN:-$BIN}"
NEW_BIN="${NEW_BIN:-$BIN}"
setup_fail() { echo "upgrade.sh: $*" >&2; exit 2; }

command -v wrk >/dev/null 2>&1 || setup_fail "wrk is required (apt-get install wrk)"
if command -v sqlite3 >/dev/null 2>&1; then
  sql() { sqlite3 "$DB" "$1"; }
elif command -v python3 >/dev/null 2>&1; then
  sql() { python3 -c 'import sqlite3,sys; r=sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0]; print("" if r is None else r)' "$DB" "$1"; }
else
  setup_fail "sqlite3 or python3 is required to read the database"
fi

if [ "$BUILD" = 1 ]; then
  # The same set as benches/wrk_compare.sh, so the two do not rebuild each other's deps.
  cargo build --release --workspace --bins --examples
fi
for b in "$BIN" "$MOCK" "$OLD_BIN" "$NEW_BIN"; do [ -x "$b" ] || setup_fail "missing $b (build first)"; done

TMP="$(mktemp -d -t spidergate-upgrade.XXXXXX)"
DB="$TMP/gw.db"
PIDS=()
cleanup() {
  # SIGTERM, not SIGINT: a non-interactive shell starts background jobs with SIGINT and
  # SIGQUIT ignored, and the mock installs no handler of its own (the gateways do).
  local p i alive
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 1 100); do
    alive=0
    for p in "${PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
  if [ "$KEEP" = 1 ]; then echo "kept $TMP" >&2; else rm -rf "$TMP"; fi
}
trap cleanup EXIT
trap 'exit 2' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Below the kernel's ephemeral range (32768+ by default), so no client socket holds the port.
free_port() {
  local p
  while :; do
    p=$(( 20000 + RANDOM % 12000 ))
    port_busy "$p" || { echo "$p"; return; }
  done
}
wait_port() {
  local i
  for i in $(seq 1 100); do port_busy "$1" && return 0; sleep 0.1; done
  tail -20 "$TMP/$2.log" >&2 || true
  setup_fail "nothing listens on 127.0.0.1:$1 ($2)"
}
# Waits up to $2 seconds for child $1 to exit; sets RC to its exit status (or "running").
# (Not in a $(...) subshell: only this shell can reap its children.)
wait_exit() {
  local pid="$1" i
  RC=running
  for i in $(seq 1 $(( $2 * 10 ))); do
    if ! kill -0 "$pid" 2>/dev/null; then
      RC=0; wait "$pid" || RC=$?
      return
    fi
    sleep 0.1
  done
}

MOCK_PORT=$(free_port)
GW_PORT=$(free_port)
while [ "$GW_PORT" = "$MOCK_PORT" ]; do GW_PORT=$(free_port); done

"$MOCK" --listen "127.0.0.1:$MOCK_PORT" --threads 1 >"$TMP/mock.log" 2>&1 &
PIDS+=($!)
wait_port "$MOCK_PORT" mock

cat >"$TMP/gw.yaml" <<YAML
listen: "127.0.0.1:$GW_PORT"
database: "$DB"
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
  threads: $GW_THREADS
  shutdown_grace_s: $GRACE
  upgrade_sock: "$TMP/upgrade.sock"
YAML
export SPIDERGATE_BENCH_MOCK_KEY="sk-bench"
"$BIN" --config "$TMP/gw.yaml" check-config >/dev/null
# Limits far above what the run can reach, so every request takes the full admission path.
SECRET="$("$BIN" --config "$TMP/gw.yaml" keys create --name upgrade --json \
  --rpm 100000000 --rpd 1000000000 --budget 1000000 --budget-mode hard \
  | tr -d '\n' | sed -n 's/.*"secret"[[:space:]]*:[[:space:]]*"\([^"]*\)".*/\1/p')"
[ -n "$SECRET" ] || setup_fail "could not read the key's secret from keys create --json"

export RUST_LOG="${RUST_LOG:-info}"
"$OLD_BIN" --config "$TMP/gw.yaml" serve >"$TMP/old.log" 2>&1 &
OLD_PID=$!; PIDS+=($OLD_PID)
wait_port "$GW_PORT" old

# Smoke test before the clock starts.
code=$(curl -s -o "$TMP/smoke" -w '%{http_code}' -X POST "http://127.0.0.1:$GW_PORT/v1/chat/completions" \
  -H "Authorization: Bearer $SECRET" -H 'Content-Type: application/json' \
  -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}' || true)
[ "$code" = 200 ] || setup_fail "smoke test answered $code: $(head -c 300 "$TMP/smoke")"

echo "gateway :$GW_PORT (old pid $OLD_PID), mock :$MOCK_PORT; wrk -t2 -c$CONNECTIONS -d${DURATION}s$([ "$STREAM" = 1 ] && echo ' (stream)'); upgrade at ${SWITCH_AT}s; grace ${GRACE}s"
SG_SECRET="$SECRET" SG_STREAM="$STREAM" wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" -s "$LUA" \
  "http://127.0.0.1:$GW_PORT" >"$TMP/wrk.out" 2>&1 &
WRK_PID=$!
T0=$(date +%s.%N)
elapsed() { awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN { printf "%5.2fs", b - a }'; }
sleep "$SWITCH_AT"

# The upgrade: start the new process (it binds server.upgrade_sock and waits for the
# sockets), and once it waits, SIGQUIT the old one, which hands the sockets over.
"$NEW_BIN" --config "$TMP/gw.yaml" serve --upgrade >"$TMP/new.log" 2>&1 &
NEW_PID=$!; PIDS+=($NEW_PID)
for i in $(seq 1 100); do [ -S "$TMP/upgrade.sock" ] && break; sleep 0.05; done
[ -S "$TMP/upgrade.sock" ] || { tail -20 "$TMP/new.log" >&2; setup_fail "the new process never opened $TMP/upgrade.sock"; }
echo "  $(elapsed)  new gateway (pid $NEW_PID) waits on the upgrade socket; SIGQUIT to the old one (pid $OLD_PID)"
kill -QUIT "$OLD_PID"

wait "$WRK_PID" || true
echo "  $(elapsed)  wrk done"
# The old process serves its in-flight requests for up to the grace, then exits.
wait_exit "$OLD_PID" $(( GRACE + 20 )); OLD_RC=$RC
echo "  $(elapsed)  old gateway exited: $OLD_RC"
kill -0 "$NEW_PID" 2>/dev/null || { tail -20 "$TMP/new.log" >&2; setup_fail "the new gateway is not running"; }
kill -TERM "$NEW_PID"
wait_exit "$NEW_PID" $(( GRACE + 20 )); NEW_RC=$RC
echo "  $(elapsed)  new gateway stopped (SIGTERM): $NEW_RC"

line=$(grep '^WRK_RESULT' "$TMP/wrk.out" || true)
[ -n "$line" ] || { cat "$TMP/wrk.out" >&2; setup_fail "wrk produced no result"; }
f() { printf '%s\n' "$line" | tr ' ' '\n' | sed -n "s/^$1=//p"; }
REQUESTS=$(f requests); NON2XX=$(f non2xx)
CONNECT=$(f connect); READ=$(f read); WRITE=$(f write); TIMEOUT=$(f timeout)
OK=$(( REQUESTS - NON2XX ))
FAILED=$(( NON2XX + CONNECT + READ + WRITE + TIMEOUT ))

# The smoke test's request is in the database too: subtract it.
SPEND=$(( $(sql "SELECT COALESCE(SUM(requests), 0) FROM spend") - 1 ))
TRACES=$(( $(sql "SELECT COUNT(*) FROM traces") - 1 ))
TRACES_OK=$(( $(sql "SELECT COUNT(*) FROM traces WHERE status BETWEEN 200 AND 299") - 1 ))
CUT=$(sql "SELECT COUNT(*) FROM traces WHERE status NOT BETWEEN 200 AND 299")
ORPHANS=$(sql "SELECT COUNT(*) FROM inflight")
LOST=$(( OK - SPEND )); [ "$LOST" -ge 0 ] || LOST=0
EXTRA=$(( SPEND - OK )); [ "$EXTRA" -ge 0 ] || EXTRA=0
HANDOVERS=$(grep -c 'listener sockets sent' "$TMP/old.log" || true)

echo
echo "wrk:      $REQUESTS requests in ${DURATION}s, $(f p50_us) us p50, $(f p99_us) us p99"
echo "failed:   $FAILED  (non-2xx $NON2XX; socket errors: connect $CONNECT, read $READ, write $WRITE, timeout $TIMEOUT)"
echo "database: SUM(requests) FROM spend = $SPEND, traces = $TRACES ($TRACES_OK 2xx, $CUT cut when wrk hung up), open journal rows $ORPHANS"
echo "spend:    2xx served $OK, booked $SPEND: lost $LOST; booked beyond wrk's count $EXTRA (wrk's open requests at its deadline, <= $CONNECTIONS)"
echo "upgrade:  sockets handed over $HANDOVERS time(s); old exit $OLD_RC, new exit $NEW_RC"

verdict=PASS
[ "$FAILED" -eq 0 ] || verdict=FAIL
[ "$LOST" -eq 0 ] || verdict=FAIL
[ "$EXTRA" -le "$CONNECTIONS" ] || verdict=FAIL
[ "$TRACES" -eq "$SPEND" ] || verdict=FAIL
[ "$ORPHANS" -eq 0 ] || verdict=FAIL
[ "$OLD_RC" = 0 ] && [ "$NEW_RC" = 0 ] || verdict=FAIL
[ "$HANDOVERS" -ge 1 ] || verdict=FAIL
echo "$verdict"
if [ "$verdict" = FAIL ]; then
  echo "--- wrk" >&2; cat "$TMP/wrk.out" >&2
  # Not shown: the new process's retries while it waits for the sockets, and the requests
  # wrk abandons at its deadline.
  quiet='No incoming socket transfer|Downstream ConnectionClosed'
  echo "--- old gateway (warnings and errors)" >&2; grep -E 'WARN|ERROR' "$TMP/old.log" | grep -vE "$quiet" | tail -20 >&2 || true
  echo "--- new gateway (warnings and errors)" >&2; grep -E 'WARN|ERROR' "$TMP/new.log" | grep -vE "$quiet" | tail -20 >&2 || true
  exit 1
fi
