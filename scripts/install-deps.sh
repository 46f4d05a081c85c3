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
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq || true
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
