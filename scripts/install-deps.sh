#!/usr/bin/env bash
# Installs what the build and the tests need on a fresh Debian machine (idempotent).
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)          # libz-ng-sys under pingora-core
command -v curl >/dev/null || need+=(curl)
# The dashboard's browser tests drive a real headless Chromium.
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
# .ci/run checks conf/spidergate.service with systemd-analyze (verify, security --offline).
command -v systemd-analyze >/dev/null || need+=(systemd)
# Cluster mode (scripts/cluster.sh, the shared_state tests): Redis, PostgreSQL and nginx
# as the load balancer in front of the nodes.
command -v redis-server >/dev/null || need+=(redis-server)
compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null || need+=(postgresql)
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
# TLS to providers verifies against the system trust store; the egress-proxy tests tunnel
# through a real HTTP CONNECT proxy.
[ -s /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
command -v tinyproxy >/dev/null || [ -x /usr/bin/tinyproxy ] || need+=(tinyproxy)
# The Claude Code end-to-end test (tests/e2e/test_claude_code.py) drives the real CLI.
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# Claude Code, pinned, into the build directory (rebuilt from the npm registry when absent).
CLAUDE_CODE_VERSION=2.1.197
if ! [ -x target/e2e-node/node_modules/.bin/claude ] \
  || [ "$(target/e2e-node/node_modules/.bin/claude --version 2>/dev/null | cut -d' ' -f1)" != "$CLAUDE_CODE_VERSION" ]; then
  npm install --prefix target/e2e-node --no-audit --no-fund --loglevel=error \
    "@anthropic-ai/claude-code@$CLAUDE_CODE_VERSION" >/dev/null
fi
