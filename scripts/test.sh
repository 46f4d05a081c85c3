#!/usr/bin/env bash
# The test command: Rust unit + integration tests (real gateway binary, real SQLite, in-process
# mock provider), then the end-to-end test with the official openai Python SDK.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
pip_install() { python3 -m pip install -q --disable-pip-version-check "$@"; }
# A Debian-managed Python refuses plain pip installs (PEP 668); pyenv's does not.
pip_install -r tests/e2e/requirements.txt || pip_install --break-system-packages -r tests/e2e/requirements.txt
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --no-fail-fast
  cargo test --doc
else
  cargo test --no-fail-fast
fi
# Built by the step above; the SDK test drives that same binary.
SPIDERGATE_BIN="$PWD/target/debug/spidergate" python3 -m pytest -q tests/e2e
