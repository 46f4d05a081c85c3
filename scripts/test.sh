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
# Golden files are blessed by hand (SPIDERGATE_BLESS_GOLDEN=1 cargo nextest run ...), never here.
if [ -n "${SPIDERGATE_BLESS_GOLDEN:-}" ]; then
  echo "scripts/test.sh: unset SPIDERGATE_BLESS_GOLDEN; the test run never rewrites golden files" >&2
  exit 1
fi
golden_state() { { git diff --no-ext-diff tests/golden; git status --porcelain --untracked-files=all tests/golden; } | sha256sum; }
golden_before="$(golden_state)"
# Installed above: the cluster tests (Redis, PostgreSQL) and the browser tests must run here,
# never skip.
export SPIDERGATE_REQUIRE_SERVICES=1
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast 2>&1 | tee -a "$log" || status=1
  cargo test --workspace --doc 2>&1 | tee -a "$log" || status=1
else
  cargo test --workspace --no-fail-fast 2>&1 | tee -a "$log" || status=1
fi
# Built by the step above (the mock binary for its own integration test); the SDK tests drive
# those same binaries.
SPIDERGATE_BIN="$PWD/target/debug/spidergate" SPIDERGATE_MOCK_BIN="$PWD/target/debug/spidergate-mock" \
  python3 -m pytest -q -rs tests/e2e 2>&1 | tee -a "$log" || status=1

# Skips: nextest's summary ("N skipped"), libtest's "N ignored" and pytest's "N skipped" (a
# missing service fails under SPIDERGATE_REQUIRE_SERVICES; this catches any other skip).
skipped="$(grep -Eo '[0-9]+ (skipped|ignored)' "$log" | awk '{n += $1} END {print n + 0}')"
echo "scripts/test.sh: skipped tests: $skipped"
if [ "$skipped" -ne 0 ]; then
  echo "scripts/test.sh: $skipped tests were skipped; every test must run here" >&2
  status=1
fi
if [ "$(golden_state)" != "$golden_before" ]; then
  echo "scripts/test.sh: the test run changed tests/golden:" >&2
  git status --short tests/golden >&2
  status=1
fi
exit "$status"
