#!/usr/bin/env bash
# One command from a fresh clone to a running gateway: installs build deps, builds, starts the
# mock provider (no provider account needed), mints a demo key and serves conf/spidergate.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --workspace --bins
BIN=target/release/spidergate
export SPIDERGATE_CONFIG="${SPIDERGATE_CONFIG:-conf/spidergate.yaml}"
$BIN check-config
if ! curl -fsS http://127.0.0.1:9000/health >/dev/null 2>&1; then
  target/release/spidergate-mock --listen 127.0.0.1:9000 >/tmp/spidergate-mock.log 2>&1 &
  MOCK_PID=$!
  trap 'kill $MOCK_PID 2>/dev/null || true' EXIT
fi
# The admin API and dashboard need a token; generate one unless the caller set it.
if [ -z "${SPIDERGATE_ADMIN_TOKEN:-}" ]; then
  SPIDERGATE_ADMIN_TOKEN="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
  export SPIDERGATE_ADMIN_TOKEN
  echo "Admin token for this session (sign in to the dashboard with it): $SPIDERGATE_ADMIN_TOKEN"
fi
echo "Minting a demo key (the secret is shown once):"
$BIN keys create --name quickstart-agent --ttl 1d
echo
echo "Gateway on http://127.0.0.1:8080/v1 — try:"
echo "Dashboard on http://127.0.0.1:8081/dashboard (sign in with the admin token above)."
echo '  curl http://127.0.0.1:8080/v1/chat/completions -H "Authorization: Bearer <secret>" -d '"'"'{"model":"spideriq/fast","messages":[{"role":"user","content":"hi"}]}'"'"
$BIN serve
