#!/usr/bin/env bash
# The test command: Rust unit + integration tests of the whole workspace (real gateway binary,
# real SQLite, real Redis and PostgreSQL for the cluster tests, in-process mock provider; the mock crate's own tests), then the end-to-end
# tests with the official Python SDKs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
pip_install() { python3 -m pip install -q --disable-pip-version-check "$@"; }
# A Debian-managed Python refuses plain pip installs (PEP 668); pyenv's does not.
pip_install -r tests/e2e/requirements.txt || pip_install --break-system-packages -r tests/e2e/requirements.txt
# Installed above: the cluster tests (Redis, PostgreSQL) must run here, never skip.
export SPIDERGATE_REQUIRE_SERVICES=1
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
  cargo test --workspace --doc
else
  cargo test --workspace --no-fail-fast
fi
# Built by the step above (the mock binary for its own integration test); the SDK tests drive
# those same binaries.
SPIDERGATE_BIN="$PWD/target/debug/spidergate" SPIDERGATE_MOCK_BIN="$PWD/target/debug/spidergate-mock" \
  python3 -m pytest -q tests/e2e
