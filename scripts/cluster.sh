#!/usr/bin/env bash
# Three gateway nodes sharing one PostgreSQL and one Redis, behind nginx, on one machine
# (what is shared and why budgets hold: docs/cluster.md). For a fresh Debian machine, run as
# root or as a user with sudo.
#
#   scripts/cluster.sh [up]   install and start Redis and PostgreSQL (Debian packages), create
#                             the role and database `spidergate`, build, start the mock
#                             provider (127.0.0.1:9000), nodes 1-3 (127.0.0.1:8181-8183, admin
#                             8191-8193) and nginx (127.0.0.1:8080, round-robin over the
#                             nodes), then mint a demo key
#   scripts/cluster.sh down   stop nginx, the nodes and the mock; Redis and PostgreSQL stay
#   scripts/cluster.sh status each node's /health, nginx, Redis, PostgreSQL (exit 1 if any fails)
#   scripts/cluster.sh infra  only Redis, PostgreSQL and the role and database
#
# Environment: SPIDERGATE_POSTGRES_URL / SPIDERGATE_REDIS_URL, when set, name servers the
# script uses as they are (it neither starts nor configures them); SPIDERGATE_ADMIN_TOKEN
# (generated and kept in data/cluster/env if unset); SPIDERGATE_PG_PASSWORD (the role's
# password, default spidergate); NO_BUILD=1 skips `cargo build`; GW_BIN=path runs another
# build of the gateway.
# Everything the script writes (per-node configs, logs, pid files, nginx.conf, Redis' data)
# is under data/cluster/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUN=$ROOT/data/cluster
CONF=$ROOT/conf/cluster.yaml
BIN=${GW_BIN:-$ROOT/target/release/spidergate}
MOCK_BIN=$ROOT/target/release/spidergate-mock
NODES=(1 2 3)
LB=127.0.0.1:8080
MOCK=127.0.0.1:9000
REDIS_PORT=6379
PG_ROLE=spidergate
PG_PASSWORD=${SPIDERGATE_PG_PASSWORD:-spidergate}
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

node_port() { echo $((8180 + $1)); }
admin_port() { echo $((8190 + $1)); }
say() { printf '%s\n' "$*"; }
die() {
  printf 'cluster.sh: %s\n' "$*" >&2
  exit 1
}

# Runs a command until it succeeds, every 0.2 s, at most $2 times.
wait_for() {
  local what=$1 tries=$2 n
  shift 2
  for ((n = 0; n < tries; n++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  die "$what did not come up"
}

# The pid in file $1, if that process runs and its command line contains $2 (a pid file
# left by a process that died is never taken for another process that got its number).
live_pid() {
  local pid cmdline
  [ -f "$1" ] || return 1
  pid=$(cat "$1")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  cmdline=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ $cmdline == *"$2"* ]] || return 1
  echo "$pid"
}

answers() { curl -s -o /dev/null -m 2 "$1"; }

# Starts a long-running command detached from this shell (own session, no terminal), its
# output appended to log file $2, its pid written to $1.
spawn() {
  local pidfile=$1 log=$2
  shift 2
  setsid "$@" </dev/null >>"$log" 2>&1 &
  echo $! >"$pidfile"
}

# --- packages -------------------------------------------------------------------------
# The cluster's part of scripts/install-deps.sh (without the browser the tests need).
install_packages() {
  local need=()
  command -v cmake >/dev/null || need+=(cmake)
  command -v curl >/dev/null || need+=(curl)
  command -v redis-server >/dev/null || need+=(redis-server)
  compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || need+=(postgresql)
  [ -x "$NGINX" ] || need+=(nginx-light)
  if [ ${#need[@]} -gt 0 ]; then
    say "Installing ${need[*]}"
    $SUDO apt-get update -qq || true
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
  fi
  NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}

# --- Redis ----------------------------------------------------------------------------
start_redis() {
  if [ -n "${OWN_REDIS_URL:-}" ]; then
    redis-cli -u "$SPIDERGATE_REDIS_URL" ping >/dev/null 2>&1 ||
      say "warning: Redis at SPIDERGATE_REDIS_URL does not answer PING"
    return
  fi
  if [ "$(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; then
    say "Redis: already answering on 127.0.0.1:$REDIS_PORT"
    return
  fi
  # Not the Debian service (no systemd needed): our own daemon, its data in the run dir.
  # The append-only file keeps holds and month spend across a Redis restart; without it
  # the nodes re-seed month spend from PostgreSQL (docs/cluster.md).
  mkdir -p "$RUN/redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$RUN/redis" --pidfile "$RUN/redis/redis.pid" --logfile "$RUN/redis/redis.log" \
    --appendonly yes
  wait_for "Redis on 127.0.0.1:$REDIS_PORT" 50 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping
  say "Redis: started on 127.0.0.1:$REDIS_PORT (log $RUN/redis/redis.log)"
}

# --- PostgreSQL -----------------------------------------------------------------------
as_postgres() {
  if [ "$(id -u)" -eq 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && sudo -u postgres -- "$@")
  fi
}

# "VERSION PORT STATUS" of the newest Debian cluster named main, if there is one.
pg_main_cluster() {
  pg_lsclusters -h 2>/dev/null | awk '$2 == "main" { line = $1 " " $3 " " $4 } END { if (line) print line }'
}

start_postgres() {
  if [ -n "${OWN_PG_URL:-}" ]; then
    pg_isready -q -d "$SPIDERGATE_POSTGRES_URL" ||
      say "warning: PostgreSQL at SPIDERGATE_POSTGRES_URL does not answer"
    return
  fi
  local line ver port status
  line=$(pg_main_cluster)
  if [ -z "$line" ]; then
    ver=$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)
    [ -n "$ver" ] || die "no PostgreSQL server under /usr/lib/postgresql"
    say "PostgreSQL: creating the Debian cluster $ver/main"
    $SUDO pg_createcluster "$ver" main >/dev/null
    line=$(pg_main_cluster)
  fi
  read -r ver port status <<<"$line"
  case $status in
    online*) say "PostgreSQL: cluster $ver/main already running on port $port" ;;
    *)
      $SUDO pg_ctlcluster "$ver" main start
      say "PostgreSQL: started cluster $ver/main on port $port"
      ;;
  esac
  wait_for "PostgreSQL on 127.0.0.1:$port" 150 pg_isready -q -h 127.0.0.1 -p "$port"
  # The role and database, idempotently; the password is (re)set so the URL below works.
  as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$port" -d postgres \
    -v role="$PG_ROLE" -v password="$PG_PASSWORD" <<'SQL'
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
ALTER ROLE :"role" WITH LOGIN PASSWORD :'password';
SELECT format('CREATE DATABASE %I OWNER %I', :'role', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = :'role') \gexec
SQL
  export SPIDERGATE_POSTGRES_URL="postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:$port/$PG_ROLE"
  # Over TCP with the password, as the gateway connects.
  psql -X -q -At "$SPIDERGATE_POSTGRES_URL" -c 'SELECT 1' >/dev/null ||
    die "cannot connect as $PG_ROLE over TCP (pg_hba.conf must allow scram-sha-256 or md5 on 127.0.0.1)"
  say "PostgreSQL: role and database $PG_ROLE ready"
}

# --- environment ----------------------------------------------------------------------
# URLs the caller set are used as they are; otherwise the local servers started here.
setup_env() {
  OWN_PG_URL=${SPIDERGATE_POSTGRES_URL:-}
  OWN_REDIS_URL=${SPIDERGATE_REDIS_URL:-}
  local port
  port=$(pg_main_cluster | awk '{ print $2 }')
  export SPIDERGATE_POSTGRES_URL=${SPIDERGATE_POSTGRES_URL:-postgres://$PG_ROLE:$PG_PASSWORD@127.0.0.1:${port:-5432}/$PG_ROLE}
  export SPIDERGATE_REDIS_URL=${SPIDERGATE_REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/}
  # Provider keys for the bundled mock, as scripts/quickstart.sh sets them.
  export MOCK_API_KEY=${MOCK_API_KEY:-sk-mock-openai}
  export MOCK_ANTHROPIC_KEY_1=${MOCK_ANTHROPIC_KEY_1:-sk-mock-anthropic-1}
  export MOCK_ANTHROPIC_KEY_2=${MOCK_ANTHROPIC_KEY_2:-sk-mock-anthropic-2}
  export RUST_LOG=${RUST_LOG:-info}
}

# The admin token: the caller's, else the one a previous `up` kept (the running nodes may
# have it), else a new one.
setup_admin_token() {
  if [ -z "${SPIDERGATE_ADMIN_TOKEN:-}" ] && [ -f "$RUN/env" ]; then
    # shellcheck disable=SC1091
    SPIDERGATE_ADMIN_TOKEN=$(. "$RUN/env" && printf '%s' "${SPIDERGATE_ADMIN_TOKEN:-}")
  fi
  if [ -z "${SPIDERGATE_ADMIN_TOKEN:-}" ]; then
    SPIDERGATE_ADMIN_TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
  fi
  export SPIDERGATE_ADMIN_TOKEN
  # For the CLI and the admin API from another shell: `. data/cluster/env`.
  (
    umask 077
    {
      for v in SPIDERGATE_POSTGRES_URL SPIDERGATE_REDIS_URL SPIDERGATE_ADMIN_TOKEN \
        MOCK_API_KEY MOCK_ANTHROPIC_KEY_1 MOCK_ANTHROPIC_KEY_2; do
        printf 'export %s=%q\n' "$v" "${!v}"
      done
      printf 'export SPIDERGATE_CONFIG=%q\n' "$RUN/node1.yaml"
    } >"$RUN/env.new"
  )
  mv "$RUN/env.new" "$RUN/env"
}

# --- mock provider, nodes, nginx ------------------------------------------------------
start_mock() {
  if answers "http://$MOCK/health"; then
    say "mock provider: already answering on $MOCK"
    return
  fi
  spawn "$RUN/mock.pid" "$RUN/mock.log" "$MOCK_BIN" --listen "$MOCK"
  wait_for "the mock provider on $MOCK" 50 answers "http://$MOCK/health"
  say "mock provider: started on $MOCK (log $RUN/mock.log)"
}

# data/cluster/nodeN.yaml: conf/cluster.yaml (node 1) with node N's listen, admin.listen
# and server.upgrade_sock.
write_node_configs() {
  local i
  for i in "${NODES[@]}"; do
    {
      echo "# Generated by scripts/cluster.sh from conf/cluster.yaml: node $i. Edit that file."
      sed -e "s/127\.0\.0\.1:8181\"/127.0.0.1:$(node_port "$i")\"/" \
        -e "s/127\.0\.0\.1:8191/127.0.0.1:$(admin_port "$i")/" \
        -e "s|^\(  upgrade_sock:\).*|\1 \"$RUN/node$i-upgrade.sock\"|" "$CONF"
    } >"$RUN/node$i.yaml"
    if ! grep -q "^listen: \"127.0.0.1:$(node_port "$i")\"" "$RUN/node$i.yaml" ||
      ! grep -q "^  listen: \"127.0.0.1:$(admin_port "$i")\"" "$RUN/node$i.yaml" ||
      ! grep -q "^  upgrade_sock: \"$RUN/node$i-upgrade.sock\"" "$RUN/node$i.yaml"; then
      die "$CONF: node $i cannot be derived (expected listen 127.0.0.1:8181, admin.listen 127.0.0.1:8191 and server.upgrade_sock)"
    fi
  done
}

start_node() {
  local i=$1 port pid
  port=$(node_port "$i")
  if pid=$(live_pid "$RUN/node$i.pid" "$BIN serve"); then
    say "node $i: already running (pid $pid) on 127.0.0.1:$port"
    return
  fi
  ! answers "http://127.0.0.1:$port/health" || die "127.0.0.1:$port is taken by another process"
  SPIDERGATE_CONFIG="$RUN/node$i.yaml" spawn "$RUN/node$i.pid" "$RUN/node$i.log" "$BIN" serve
  pid=$(cat "$RUN/node$i.pid")
  local n
  for ((n = 0; n < 150; n++)); do
    answers "http://127.0.0.1:$port/health" && break
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 20 "$RUN/node$i.log" >&2
      die "node $i exited (log $RUN/node$i.log; scripts/cluster.sh down stops what did start)"
    fi
    sleep 0.2
  done
  answers "http://127.0.0.1:$port/health" || die "node $i does not answer on 127.0.0.1:$port"
  say "node $i: started (pid $pid) on 127.0.0.1:$port, admin 127.0.0.1:$(admin_port "$i") (log $RUN/node$i.log)"
}

write_nginx_conf() {
  local i servers=""
  for i in "${NODES[@]}"; do
    servers+="        server 127.0.0.1:$(node_port "$i");"$'\n'
  done
  mkdir -p "$RUN/nginx/tmp"
  cat >"$RUN/nginx/nginx.conf" <<EOF
# Generated by scripts/cluster.sh: round-robin over the gateway nodes.
worker_processes 1;
pid $RUN/nginx/nginx.pid;
error_log $RUN/nginx/error.log warn;
events { worker_connections 4096; }
http {
    log_format upstream '\$remote_addr [\$time_local] "\$request" \$status '
                        'node=\$upstream_addr \$request_time';
    access_log $RUN/nginx/access.log upstream;
    client_body_temp_path $RUN/nginx/tmp/body;
    proxy_temp_path $RUN/nginx/tmp/proxy;
    fastcgi_temp_path $RUN/nginx/tmp/fastcgi;
    uwsgi_temp_path $RUN/nginx/tmp/uwsgi;
    scgi_temp_path $RUN/nginx/tmp/scgi;
    # The gateway's max_body_bytes (32 MiB) decides; nginx lets such bodies through.
    client_max_body_size 33m;

    upstream spidergate {
${servers}        keepalive 64;
        # Below the gateway's keep-alive idle (server.header_timeout_ms, 10 s), so nginx
        # never reuses a connection the node is closing.
        keepalive_timeout 5s;
    }
    server {
        listen $LB;
        location / {
            proxy_pass http://spidergate;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host \$host;
            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            # Streams pass chunk by chunk, bodies go up as they arrive.
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            # A node that refuses the connection is skipped; a POST that reached a node is
            # never sent to a second one (nginx does not retry non-idempotent requests).
            proxy_next_upstream error timeout;
        }
    }
}
EOF
}

nginx_cmd() { "$NGINX" -c "$RUN/nginx/nginx.conf" -p "$RUN/nginx/" -e "$RUN/nginx/error.log" "$@"; }

start_nginx() {
  write_nginx_conf
  nginx_cmd -t -q || die "nginx rejects $RUN/nginx/nginx.conf"
  local pid
  if pid=$(live_pid "$RUN/nginx/nginx.pid" "nginx: master"); then
    nginx_cmd -s reload
    say "nginx: reloaded (pid $pid) on $LB"
    return
  fi
  ! answers "http://$LB/" || die "$LB is taken by another process"
  nginx_cmd
  wait_for "nginx on $LB" 50 answers "http://$LB/health"
  say "nginx: started on $LB (logs $RUN/nginx/)"
}

# Sends signal $5 to the process in pid file $1 (if it is $2) and waits up to $3 s for it.
stop_pid() {
  local pidfile=$1 match=$2 secs=$3 name=$4 signal=$5 pid n
  if ! pid=$(live_pid "$pidfile" "$match"); then
    rm -f "$pidfile"
    return
  fi
  kill "-$signal" "$pid"
  for ((n = 0; n < secs * 5; n++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    say "$name (pid $pid) still running after ${secs}s"
    return
  fi
  rm -f "$pidfile"
  say "$name: stopped"
}

# --- commands -------------------------------------------------------------------------
cmd_infra() {
  mkdir -p "$RUN"
  install_packages
  setup_env
  start_redis
  start_postgres
}

cmd_up() {
  cmd_infra
  if [ "${NO_BUILD:-0}" != 1 ]; then
    command -v cargo >/dev/null || die "cargo not found (install Rust with rustup first)"
    cargo build --release --workspace --bins
  fi
  if [ ! -x "$BIN" ] || [ ! -x "$MOCK_BIN" ]; then die "no release binaries in target/release"; fi
  setup_admin_token
  write_node_configs
  SPIDERGATE_CONFIG="$RUN/node1.yaml" "$BIN" check-config
  start_mock
  # Node 1 first: it creates or migrates the schema before the others connect.
  local i
  for i in "${NODES[@]}"; do start_node "$i"; done
  start_nginx
  say
  say "Admin token (dashboard sign-in, admin API; also in $RUN/env): $SPIDERGATE_ADMIN_TOKEN"
  say "Minting a demo key through node 1's CLI (the secret is shown once):"
  SPIDERGATE_CONFIG="$RUN/node1.yaml" "$BIN" keys create --name cluster-agent --ttl 1d --budget 5 --rpm 60
  say
  say "Cluster on http://$LB/v1 (nginx, round-robin over 127.0.0.1:8181, 8182, 8183). Try:"
  say '  curl http://'"$LB"'/v1/chat/completions -H "Authorization: Bearer <secret>" -d '"'"'{"model":"spideriq/fast","messages":[{"role":"user","content":"hi"}]}'"'"
  say '  for i in 1 2 3; do curl -s http://'"$LB"'/v1/usage -H "Authorization: Bearer <secret>"; echo; done   # same figures from every node'
  say "Which node served each request: $RUN/nginx/access.log"
  say "Dashboards: http://127.0.0.1:8191/dashboard (or 8192, 8193; the same keys on each)."
  say "CLI from another shell: . $RUN/env && target/release/spidergate keys list"
  say "Health: scripts/cluster.sh status    Stop: scripts/cluster.sh down"
}

cmd_down() {
  local i
  # nginx first (SIGQUIT: it finishes the requests it is proxying), then the nodes.
  stop_pid "$RUN/nginx/nginx.pid" "nginx: master" 40 nginx QUIT
  for i in "${NODES[@]}"; do
    # SIGTERM: each node drains for up to server.shutdown_grace_s, then commits its ledger.
    stop_pid "$RUN/node$i.pid" "$BIN serve" 40 "node $i" TERM &
  done
  wait
  stop_pid "$RUN/mock.pid" "$MOCK_BIN " 10 "mock provider" TERM
  say "Redis and PostgreSQL keep running (their data stays)."
}

cmd_status() {
  setup_env
  local i code body bad=0
  for i in "${NODES[@]}" lb; do
    local url name
    if [ "$i" = lb ]; then
      url="http://$LB/health" name="nginx $LB"
    else
      url="http://127.0.0.1:$(node_port "$i")/health" name="node $i 127.0.0.1:$(node_port "$i")"
    fi
    body=$(curl -s -m 2 -w '\n%{http_code}' "$url" || true)
    code=${body##*$'\n'}
    body=${body%$'\n'*}
    [ "$code" = 200 ] || bad=1
    printf '%-26s %s %s\n' "$name" "${code/#000/down}" "$body"
  done
  if [ "$(redis-cli -u "$SPIDERGATE_REDIS_URL" ping 2>/dev/null)" = PONG ]; then
    printf '%-26s %s\n' "redis" "ok"
  else
    printf '%-26s %s\n' "redis" "unreachable"
    bad=1
  fi
  if pg_isready -q -d "$SPIDERGATE_POSTGRES_URL"; then
    printf '%-26s %s\n' "postgres" "ok"
  else
    printf '%-26s %s\n' "postgres" "unreachable"
    bad=1
  fi
  return "$bad"
}

case "${1:-up}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  infra) cmd_infra ;;
  *) die "usage: scripts/cluster.sh [up|down|status|infra]" ;;
esac
