#!/usr/bin/env bash
# One command from a fresh clone to a running gateway: installs build deps, builds, starts the
# mock provider (no provider account needed), mints a demo key and serves conf/spidergate.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --workspace --bins
BIN=target/release/spidergate
export SPIDERGATE_CONFIG="${SPIDERGATE_CONFIG:-conf/spidergate.yaml}"
# Provider keys for the bundled mock (it checks that Anthropic requests carry one); a real
# provider's keys come from your environment instead.
export MOCK_API_KEY="${MOCK_API_KEY:-sk-mock-openai}"
export MOCK_ANTHROPIC_KEY_1="${MOCK_ANTHROPIC_KEY_1:-sk-mock-anthropic-1}"
export MOCK_ANTHROPIC_KEY_2="${MOCK_ANTHROPIC_KEY_2:-sk-mock-anthropic-2}"
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
echo '  curl http://127.0.0.1:8080/v1/messages -H "x-api-key: <secret>" -d '"'"'{"model":"spideriq/claude","max_tokens":256,"messages":[{"role":"user","content":"hi"}]}'"'"
$BIN serve
