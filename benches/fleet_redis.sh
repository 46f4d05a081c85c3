#!/usr/bin/env bash
# What a tree of minted keys and a group add to a cluster admission, in Redis: the admission
# script (src/shared/lua/common.lua + admit.lua, exactly as the gateway loads them) run by
# redis-benchmark against a throwaway redis-server, for a lone key with a hard budget and for
# a grandchild (two parents, the root with a hard budget) in a group with a hard budget.
# Prints Redis' own time per script call (INFO commandstats, usec_per_call) per round.
#
#   benches/fleet_redis.sh [--rounds 3] [--n 20000] [--port 16399]
set -euo pipefail
ROUNDS=3; N=20000; PORT=16399
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS="$2"; shift 2 ;;
    --n) N="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
for b in redis-server redis-cli redis-benchmark; do
  command -v "$b" >/dev/null || { echo "$b is required (apt-get install redis-server redis-tools)" >&2; exit 2; }
done
redis-server --port "$PORT" --save '' --appendonly no --daemonize yes >/dev/null
trap 'redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true' EXIT
sleep 0.5
R=(redis-cli -p "$PORT")
ADMIT=$("${R[@]}" SCRIPT LOAD "$(cat "$ROOT/src/shared/lua/common.lua" "$ROOT/src/shared/lua/admit.lua")")
SEED=$("${R[@]}" SCRIPT LOAD "$(cat "$ROOT/src/shared/lua/common.lua" "$ROOT/src/shared/lua/seed.lua")")
now=$(date +%s%3N); day=$((now / 86400000))
month=$(( $(date -u +%Y) * 12 + 10#$(date -u +%m) - 1 )); exp=$((now + 40 * 86400000))
for p in '{sg}:k:lone' '{sg}:k:gc' '{sg}:k:c' '{sg}:k:root' '{sg}:g:grp'; do
  "${R[@]}" EVALSHA "$SEED" 1 "$p" "$month" "$day" 0 "$exp" 0 0 >/dev/null
done
per_call() { "${R[@]}" INFO commandstats | sed -n 's/^cmdstat_evalsha:.*usec_per_call=\([0-9.]*\).*/\1/p'; }
CAP=1000000000000
for round in $(seq 1 "$ROUNDS"); do
  "${R[@]}" CONFIG RESETSTAT >/dev/null
  # ARGV: key_id node res_id rpm rpd cap hard max_inflight held ttl_ms estimate
  redis-benchmark -p "$PORT" -n "$N" -c 4 -q EVALSHA "$ADMIT" 1 '{sg}:k:lone' \
    lone 1 1 -1 -1 "$CAP" 1 -1 100 30000 100 >/dev/null
  lone=$(per_call)
  "${R[@]}" CONFIG RESETSTAT >/dev/null
  # ... then the brakes' four placeholders and per level: kind, cap, rpm.
  redis-benchmark -p "$PORT" -n "$N" -c 4 -q EVALSHA "$ADMIT" 4 '{sg}:k:gc' '{sg}:k:c' '{sg}:k:root' '{sg}:g:grp' \
    gc 1 2 -1 -1 -1 0 -1 100 30000 100 -1 0 -1 '' p -1 -1 p "$CAP" -1 g "$CAP" -1 >/dev/null
  tree=$(per_call)
  echo "round $round: lone key ${lone} µs per admission; grandchild in a group ${tree} µs"
done
