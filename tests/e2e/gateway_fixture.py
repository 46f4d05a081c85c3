"""Shared harness for the SDK end-to-end tests: a hermetic `spidergate-mock` + `spidergate serve`
pair with an OpenAI-kind and an Anthropic-kind provider, cache prices, and a cross-kind alias.

Used by test_anthropic_sdk.py, test_translation_sdk.py and test_responses_sdk.py (each starts
its own pair, module-scoped). test_openai_sdk.py keeps its own copy of the same approach.

    pip install -r tests/e2e/requirements.txt
    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e

SPIDERGATE_BIN defaults to target/debug/spidergate; SPIDERGATE_MOCK_BIN to the
`spidergate-mock` next to it.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HEALTH_DEADLINE_S = 30.0
RELOAD_DEADLINE_S = 10.0  # SPEC: CLI changes take effect within 1 s; generous for slow CI.

OPENAI_PROVIDER_KEY = "sk-mock-openai"
ANTHROPIC_PROVIDER_KEY = "sk-ant-mock"

# The mock's fixed replies (mock/src/reply.rs, mock/src/knobs.rs).
MOCK_REPLY_TEXT = "Hello from the SpiderGate mock provider."
MOCK_STREAM_TOKEN = "tok "
MOCK_DEFAULT_CHUNKS = 3
MOCK_DEFAULT_PROMPT_TOKENS = 10
MOCK_DEFAULT_COMPLETION_TOKENS = 5
MOCK_TOOL_ARGUMENTS = {"city": "Paris"}

# Models (USD per million tokens). 1 USD/Mtok = 1000 nano-USD per token; every price below is a
# whole number of nano-USD per token, so expected costs are exact integers.
PRICES = {
    "gpt-4o-mini": {"input": 0.15, "output": 0.60, "cache_read": 0.075},
    "gpt-4o": {"input": 2.50, "output": 10.00, "cache_read": 1.25},
    "claude-sonnet-4-5": {"input": 3.00, "output": 15.00, "cache_read": 0.30, "cache_write": 3.75},
    "claude-haiku-4-5": {"input": 1.00, "output": 5.00, "cache_read": 0.10, "cache_write": 1.25},
}
# The upstream id of claude-sonnet-4-5 (what the mock sees in the body; x-mock-status-model).
CLAUDE_UPSTREAM_ID = "claude-sonnet-4-5-20250929"
CLAUDE_FALLBACK_ALIAS = "spideriq/claude"  # [claude-sonnet-4-5, gpt-4o-mini]

CONFIG_TEMPLATE = """\
listen: "127.0.0.1:{gw_port}"
database: "{db}"
max_body_bytes: 33554432
public_catalog: false
providers:
  - name: mock-openai
    kind: openai
    base_url: "http://127.0.0.1:{mock_port}/v1"
    api_key_env: E2E_OPENAI_PROVIDER_KEY
  - name: mock-anthropic
    kind: anthropic
    base_url: "http://127.0.0.1:{mock_port}"
    api_key_env: E2E_ANTHROPIC_PROVIDER_KEY
models:
  - id: gpt-4o-mini
    provider: mock-openai
    upstream_id: gpt-4o-mini
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    cache_read_usd_per_mtok: 0.075
    max_output_tokens: 16384
  - id: gpt-4o
    provider: mock-openai
    input_usd_per_mtok: 2.50
    output_usd_per_mtok: 10.00
    cache_read_usd_per_mtok: 1.25
    max_output_tokens: 16384
  - id: claude-sonnet-4-5
    provider: mock-anthropic
    upstream_id: {claude_upstream}
    input_usd_per_mtok: 3.00
    output_usd_per_mtok: 15.00
    cache_read_usd_per_mtok: 0.30
    cache_write_usd_per_mtok: 3.75
    max_output_tokens: 64000
  - id: claude-haiku-4-5
    provider: mock-anthropic
    input_usd_per_mtok: 1.00
    output_usd_per_mtok: 5.00
    cache_read_usd_per_mtok: 0.10
    cache_write_usd_per_mtok: 1.25
    max_output_tokens: 64000
aliases:
  {alias}: [claude-sonnet-4-5, gpt-4o-mini]
server:
  reload_interval_ms: 50
  auth_failures_per_minute: 100000
"""


def _nanos_per_token(usd_per_mtok: float) -> int:
    return round(usd_per_mtok * 1000)


def anthropic_cost_nanos(model: str, *, input_tokens: int, output_tokens: int,
                         cache_read: int = 0, cache_write: int = 0) -> int:
    """Anthropic usage: `input_tokens` excludes the cache reads and writes; each priced once."""
    p = PRICES[model]
    return (input_tokens * _nanos_per_token(p["input"])
            + cache_read * _nanos_per_token(p.get("cache_read", p["input"]))
            + cache_write * _nanos_per_token(p.get("cache_write", p["input"]))
            + output_tokens * _nanos_per_token(p["output"]))


def openai_cost_nanos(model: str, *, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
    """OpenAI usage: `prompt_tokens` includes `cached_tokens`; each token priced once."""
    p = PRICES[model]
    return ((prompt_tokens - cached_tokens) * _nanos_per_token(p["input"])
            + cached_tokens * _nanos_per_token(p.get("cache_read", p["input"]))
            + completion_tokens * _nanos_per_token(p["output"]))


def _bin_path() -> Path:
    raw = os.environ.get("SPIDERGATE_BIN", "target/debug/spidergate")
    p = Path(raw)
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        pytest.exit(f"spidergate binary not found at {p} (set SPIDERGATE_BIN)", returncode=2)
    return p


def _mock_bin_path(gateway_bin: Path) -> Path:
    raw = os.environ.get("SPIDERGATE_MOCK_BIN")
    p = Path(raw) if raw else gateway_bin.with_name("spidergate-mock")
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        pytest.exit(f"spidergate-mock binary not found at {p} (set SPIDERGATE_MOCK_BIN)", returncode=2)
    return p


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_tcp(port: int, proc: subprocess.Popen, deadline_s: float, what: str) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not accept connections on port {port} within {deadline_s}s")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@dataclass
class Gateway:
    bin: Path
    config: Path
    port: int
    log_path: Path
    env: dict
    secrets: list = field(default_factory=list)

    @property
    def root_url(self) -> str:
        """What the anthropic SDK takes as base_url (it appends /v1/messages)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """What the openai SDK takes as base_url."""
        return f"http://127.0.0.1:{self.port}/v1"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.bin), "--config", str(self.config), *args],
            env=self.env, capture_output=True, text=True, timeout=30,
        )
        assert proc.returncode == 0, (
            f"spidergate {' '.join(args)} failed ({proc.returncode}):\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
        return proc

    def create_key(self, name: str, *flags: str) -> dict:
        """`keys create --json`, then poll until the gateway knows the key (not 401)."""
        key = json.loads(self.cli("keys", "create", "--name", name, *flags, "--json").stdout)
        assert re.fullmatch(r"spideriq_pat_[0-9a-f]{32}", key["secret"]), key
        self.secrets.append(key["secret"])
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        last = None
        while time.monotonic() < deadline:
            # Rejected after authentication (400: no `model`), so it costs no quota or budget.
            r = httpx.post(f"{self.base_url}/chat/completions",
                           headers={"Authorization": f"Bearer {key['secret']}"}, json={}, timeout=10)
            last = (r.status_code, r.text)
            if r.status_code not in (401, 429):
                return key
            time.sleep(0.03)
        raise AssertionError(f"key {name} not active within {RELOAD_DEADLINE_S}s; last probe: {last}")

    def usage(self, secret: str) -> dict:
        """GET /v1/usage with the key itself."""
        r = httpx.get(f"{self.base_url}/usage", headers={"Authorization": f"Bearer {secret}"}, timeout=10)
        assert r.status_code == 200, (r.status_code, r.text)
        return r.json()

    def spend_nanos(self, secret: str) -> int:
        u = self.usage(secret)
        assert "spend_nanodollars" in u, u
        return u["spend_nanodollars"]

    def assert_spend(self, secret: str, expected_nanos: int, model: str | None = None,
                     requests: int | None = None) -> dict:
        """The key's month-to-date spend equals `expected_nanos` exactly (and the model row,
        when given, carries it all)."""
        u = self.usage(secret)
        assert u["spend_nanodollars"] == expected_nanos, (
            f"spend {u['spend_nanodollars']} nano-USD, expected {expected_nanos}: {u}")
        if model is not None:
            row = u["by_model"].get(model)
            assert row is not None, f"no by_model row for {model}: {u}"
            assert row["spend_nanodollars"] == expected_nanos, (model, u)
            if requests is not None:
                assert row["requests"] == requests, (model, u)
        return u

    def anthropic(self, secret: str, **kw):
        import anthropic
        return anthropic.Anthropic(base_url=self.root_url, api_key=secret, max_retries=0, timeout=30, **kw)

    def openai(self, secret: str, **kw):
        import openai
        return openai.OpenAI(base_url=self.base_url, api_key=secret, max_retries=0, timeout=30, **kw)


def gateway_stack(tmp_path_factory, name: str = "spidergate", extra_models: str = ""):
    """Generator for a pytest fixture: starts mock + gateway, yields a `Gateway`, tears down,
    then checks the gateway log holds no agent secret. `extra_models`: YAML list items added
    to `models:`."""
    binary = _bin_path()
    tmp = tmp_path_factory.mktemp(name)
    mock_port = _free_port()
    gw_port = _free_port()
    while gw_port == mock_port:
        gw_port = _free_port()
    cfg = tmp / "spidergate.yaml"
    cfg.write_text(CONFIG_TEMPLATE.format(
        gw_port=gw_port, mock_port=mock_port, db=tmp / "spidergate.db",
        claude_upstream=CLAUDE_UPSTREAM_ID, alias=CLAUDE_FALLBACK_ALIAS,
    ).replace("aliases:\n", extra_models + "aliases:\n", 1))
    env = dict(os.environ)
    env["E2E_OPENAI_PROVIDER_KEY"] = OPENAI_PROVIDER_KEY
    env["E2E_ANTHROPIC_PROVIDER_KEY"] = ANTHROPIC_PROVIDER_KEY
    env.pop("SPIDERGATE_CONFIG", None)

    mock_log = open(tmp / "mock.log", "wb")
    gw_log_path = tmp / "gateway.log"
    gw_log = open(gw_log_path, "wb")
    mock = gateway = None
    g = Gateway(bin=binary, config=cfg, port=gw_port, log_path=gw_log_path, env=env)
    try:
        mock = subprocess.Popen(
            [str(_mock_bin_path(binary)), "--listen", f"127.0.0.1:{mock_port}", "--threads", "2"],
            cwd=tmp, env=env, stdout=mock_log, stderr=subprocess.STDOUT,
        )
        _wait_tcp(mock_port, mock, HEALTH_DEADLINE_S, "mock provider")
        gateway = subprocess.Popen(
            [str(binary), "--config", str(cfg), "serve"],
            cwd=tmp, env=env, stdout=gw_log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + HEALTH_DEADLINE_S
        while True:
            if gateway.poll() is not None:
                raise RuntimeError(
                    f"gateway exited with {gateway.returncode}:\n{gw_log_path.read_text(errors='replace')}")
            try:
                if httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway /health not 200 within {HEALTH_DEADLINE_S}s")
            time.sleep(0.05)
        yield g
    finally:
        _stop(gateway)
        _stop(mock)
        gw_log.close()
        mock_log.close()
    log = gw_log_path.read_text(errors="replace")
    leaked = [s for s in g.secrets if s in log]
    assert not leaked, f"gateway log {gw_log_path} contains {len(leaked)} agent secret(s)"
