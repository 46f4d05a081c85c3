"""End-to-end: the real Claude Code CLI (`claude -p`, pinned by scripts/install-deps.sh into
target/e2e-node) against SpiderGate, changing only ANTHROPIC_BASE_URL and ANTHROPIC_API_KEY
(SPEC §3: /v1/messages "for the Anthropic SDKs and Claude Code"). On an Anthropic model the
request passes through; on an OpenAI-compatible one it is translated (what Claude Code sends:
adaptive thinking, `output_config`, `context_management`, a mid-conversation system message).
Each is charged exactly; refusals end the run at once instead of being retried.

    scripts/install-deps.sh
    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_claude_code.py
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from gateway_fixture import (
    MOCK_DEFAULT_CHUNKS,
    MOCK_DEFAULT_COMPLETION_TOKENS,
    MOCK_DEFAULT_PROMPT_TOKENS,
    MOCK_STREAM_TOKEN,
    REPO_ROOT,
    Gateway,
    anthropic_cost_nanos,
    gateway_stack,
    openai_cost_nanos,
)

CLAUDE = REPO_ROOT / "target/e2e-node/node_modules/.bin/claude"
# A refusal must end the run at once; a retried one took 60 s and more.
FAST_S = 20


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    assert CLAUDE.is_file(), f"{CLAUDE} missing: run scripts/install-deps.sh"
    yield from gateway_stack(tmp_path_factory, "claude-code")


def claude(home: Path, gw: Gateway, secret: str, model: str) -> tuple[subprocess.CompletedProcess, float]:
    """`claude -p "say hi" --output-format json` with only the gateway's URL and a key set,
    and no traffic but to it (a throwaway HOME; telemetry, updates and error reports off)."""
    home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TERM": "dumb",
        "ANTHROPIC_BASE_URL": gw.root_url,
        "ANTHROPIC_API_KEY": secret,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
    }
    start = time.monotonic()
    proc = subprocess.run(
        [str(CLAUDE), "-p", "say hi", "--model", model, "--output-format", "json"],
        env=env, cwd=home, capture_output=True, text=True, timeout=120,
    )
    return proc, time.monotonic() - start


def result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.stdout.strip(), f"no output (rc {proc.returncode}): {proc.stderr}"
    return json.loads(proc.stdout)


@pytest.mark.parametrize(
    "model, cost",
    [
        # Passed through to the Anthropic-kind provider.
        ("claude-sonnet-4-5", anthropic_cost_nanos(
            "claude-sonnet-4-5", input_tokens=MOCK_DEFAULT_PROMPT_TOKENS,
            output_tokens=MOCK_DEFAULT_COMPLETION_TOKENS)),
        # Translated to the OpenAI-kind provider's /chat/completions and back.
        ("gpt-4o-mini", openai_cost_nanos(
            "gpt-4o-mini", prompt_tokens=MOCK_DEFAULT_PROMPT_TOKENS,
            completion_tokens=MOCK_DEFAULT_COMPLETION_TOKENS)),
    ],
)
def test_claude_code_answers_through_the_gateway_and_is_charged(gw: Gateway, tmp_path, model, cost):
    key = gw.create_key(f"claude-code-{model}")
    proc, _ = claude(tmp_path / "home", gw, key["secret"], model)
    out = result(proc)
    assert proc.returncode == 0 and not out.get("is_error"), (proc.returncode, out, proc.stderr)
    assert out["result"] == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS, out
    gw.assert_spend(key["secret"], cost, model=model, requests=1)


def test_a_key_over_its_hard_budget_fails_at_once_with_402(gw: Gateway, tmp_path):
    key = gw.create_key("claude-code-broke", "--budget", "0.000001", "--budget-mode", "hard")
    proc, took = claude(tmp_path / "home", gw, key["secret"], "claude-sonnet-4-5")
    assert proc.returncode != 0, proc.stdout
    out = result(proc)
    assert out.get("is_error") and "402" in proc.stdout, out
    assert took < FAST_S, f"{took:.1f} s: retried"
    assert gw.spend_nanos(key["secret"]) == 0


def test_a_revoked_key_fails_at_once_not_after_retries(gw: Gateway, tmp_path):
    key = gw.create_key("claude-code-revoked")
    gw.cli("keys", "revoke", key["id"])
    proc, took = claude(tmp_path / "home", gw, key["secret"], "claude-sonnet-4-5")
    assert proc.returncode != 0, proc.stdout
    assert "401" in proc.stdout or "revoked" in proc.stdout, (proc.stdout, proc.stderr)
    assert took < FAST_S, f"{took:.1f} s: retried (x-should-retry not honoured?)"
