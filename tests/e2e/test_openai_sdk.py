"""End-to-end test: drive a real SpiderGate with the official `openai` Python SDK.

Hermetic: starts `spidergate-mock` and `spidergate serve` on free loopback ports
with a temporary config and database, mints keys with the CLI, and tears everything down.

    pip install -r tests/e2e/requirements.txt
    SPIDERGATE_BIN=target/release/spidergate python3 -m pytest -q tests/e2e/test_openai_sdk.py

SPIDERGATE_BIN defaults to target/debug/spidergate (relative to the repo root).
"""

from __future__ import annotations

import json
import os
import re
import secrets as pysecrets
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MOCK_API_KEY = "sk-mock"
HEALTH_DEADLINE_S = 30.0
RELOAD_DEADLINE_S = 10.0  # SPEC: CLI changes take effect within 1 s; generous for slow CI.
MESSAGES = [{"role": "user", "content": "Say hello."}]


def _bin_path() -> Path:
    raw = os.environ.get("SPIDERGATE_BIN", "target/debug/spidergate")
    p = Path(raw)
    if not p.is_absolute():
        p = REPO_ROOT / p
    if not p.is_file():
        pytest.exit(f"spidergate binary not found at {p} (set SPIDERGATE_BIN)", returncode=2)
    return p


def _mock_bin_path(gateway_bin: Path) -> Path:
    """The `spidergate-mock` binary: SPIDERGATE_MOCK_BIN, else next to the gateway binary."""
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


CONFIG_TEMPLATE = """\
listen: "127.0.0.1:{gw_port}"
database: "{db}"
max_body_bytes: 33554432
public_catalog: false
providers:
  - name: mock
    kind: openai
    base_url: "http://127.0.0.1:{mock_port}/v1"
    api_key_env: MOCK_API_KEY
models:
  - id: gpt-4o-mini
    provider: mock
    upstream_id: gpt-4o-mini
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 16384
  - id: llama-3.1-8b-instant
    provider: mock
    upstream_id: meta-llama/llama-3.1-8b-instant
    input_usd_per_mtok: 0
    output_usd_per_mtok: 0
    max_output_tokens: 8192
    free: true
  - id: gpt-4o
    provider: mock
    input_usd_per_mtok: 2.50
    output_usd_per_mtok: 10.00
    max_output_tokens: 16384
  - id: text-embedding-3-small
    provider: mock
    endpoint: embeddings
    input_usd_per_mtok: 0.02
    output_usd_per_mtok: 0
aliases:
  spideriq/fast: [llama-3.1-8b-instant, gpt-4o-mini]
"""


@dataclass
class Gateway:
    bin: Path
    config: Path
    port: int
    log_path: Path
    env: dict
    secrets: list = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [str(self.bin), "--config", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 0, (
            f"spidergate {' '.join(args)} failed ({proc.returncode}):\n"
            f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
        return proc

    def create_key(self, name: str, *flags: str, wait: bool = True) -> dict:
        """`keys create --json`, then poll until the gateway knows the key (not 401)."""
        out = self.cli("keys", "create", "--name", name, *flags, "--json").stdout
        key = json.loads(out)
        for field_name in ("id", "secret", "name", "expires_at"):
            assert field_name in key, f"keys create --json lacks {field_name!r}: {key}"
        assert key["name"] == name
        assert re.fullmatch(r"spideriq_pat_[0-9a-f]{32}", key["secret"]), key["secret"]
        self.secrets.append(key["secret"])
        if wait:
            self.wait_for_key_status(key["secret"], lambda st, code: st != 401, "become active")
        return key

    def probe(self, secret: str) -> tuple[int, str | None]:
        """An authenticated request the gateway must reject AFTER authentication
        (400 invalid_request: body lacks `model`; or 403 for a key without gate:chat), so
        it consumes neither rate-limit quota nor budget (SPEC section 2)."""
        r = httpx.post(
            f"{self.base_url}/chat/completions",
            headers={"Authorization": f"Bearer {secret}"},
            json={},
            timeout=10,
        )
        try:
            code = r.json()["error"]["code"]
        except Exception:  # noqa: BLE001 - a non-JSON body is reported via the status
            code = None
        return r.status_code, code

    def wait_for_key_status(self, secret: str, pred, what: str) -> tuple[int, str | None]:
        deadline = time.monotonic() + RELOAD_DEADLINE_S
        last = None
        while time.monotonic() < deadline:
            last = self.probe(secret)
            if pred(*last):
                return last
            time.sleep(0.05)
        raise AssertionError(f"key did not {what} within {RELOAD_DEADLINE_S}s; last probe: {last}")

    def client(self, secret: str, base_url: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=base_url or self.base_url, api_key=secret, max_retries=0, timeout=30)


@pytest.fixture(scope="session")
def gw(tmp_path_factory) -> Gateway:
    binary = _bin_path()
    tmp = tmp_path_factory.mktemp("spidergate")
    mock_port, gw_port = _free_port(), _free_port()
    while gw_port == mock_port:
        gw_port = _free_port()

    cfg = tmp / "spidergate.yaml"
    cfg.write_text(CONFIG_TEMPLATE.format(gw_port=gw_port, mock_port=mock_port, db=tmp / "spidergate.db"))

    env = dict(os.environ)
    env["MOCK_API_KEY"] = MOCK_API_KEY
    env.pop("SPIDERGATE_CONFIG", None)

    mock_log = open(tmp / "mock.log", "wb")
    gw_log_path = tmp / "gateway.log"
    gw_log = open(gw_log_path, "wb")
    mock = gateway = None
    g = Gateway(bin=binary, config=cfg, port=gw_port, log_path=gw_log_path, env=env)
    try:
        mock = subprocess.Popen(
            [str(_mock_bin_path(binary)), "--listen", f"127.0.0.1:{mock_port}"],
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
                    f"gateway exited with {gateway.returncode}:\n{gw_log_path.read_text(errors='replace')}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{gw_port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway /health not 200 within {HEALTH_DEADLINE_S}s")
            time.sleep(0.1)

        yield g
    finally:
        _stop(gateway)
        _stop(mock)
        gw_log.close()
        mock_log.close()
    # After a clean shutdown (all log lines flushed) the log must still hold no secret.
    log = gw_log_path.read_text(errors="replace")
    leaked = [s for s in g.secrets if s in log]
    assert not leaked, f"gateway log {gw_log_path} contains {len(leaked)} agent secret(s)"


@pytest.fixture(scope="session")
def default_key(gw: Gateway) -> dict:
    return gw.create_key("e2e-default")


@pytest.fixture(scope="session")
def client(gw: Gateway, default_key: dict) -> openai.OpenAI:
    return gw.client(default_key["secret"])


def _error_code(e: openai.APIStatusError) -> str | None:
    # openai-python passes body["error"] as `body` and copies its `code` to `e.code`.
    code = e.code
    body_code = e.body.get("code") if isinstance(e.body, dict) else None
    assert code == body_code, (code, body_code)
    return code


# 1. Plain chat completion ----------------------------------------------------------------

def test_chat_completion(client: openai.OpenAI):
    resp = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(resp, openai.types.chat.ChatCompletion)
    assert resp.choices, resp
    assert resp.choices[0].message.content, resp
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 10
    assert resp.usage.completion_tokens == 5


def test_chat_completion_rate_limit_headers(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES)
    for h in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset"):
        assert h in raw.headers, f"missing {h}: {dict(raw.headers)}"
    assert raw.parse().choices[0].message.content


# 2. Streaming ---------------------------------------------------------------------------

def test_stream_hides_usage_unless_asked(client: openai.OpenAI):
    chunks = list(client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True))
    assert chunks, "no chunks"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text, "streamed delta content is empty"
    with_usage = [c for c in chunks if c.usage is not None]
    assert not with_usage, f"client did not ask for usage but got a usage chunk: {with_usage[-1]}"
    # Nor an empty-choices usage-only chunk with usage stripped.
    assert all(c.choices for c in chunks), "client got a choices==[] chunk it did not ask for"


def test_stream_include_usage(client: openai.OpenAI):
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len(chunks) >= 2, chunks
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    last = chunks[-1]
    assert last.usage is not None, f"last chunk has no usage: {last}"
    assert last.usage.prompt_tokens == 10
    assert last.usage.completion_tokens == 5
    assert last.choices == []


# 3. Alias -------------------------------------------------------------------------------

def test_alias(client: openai.OpenAI):
    raw = client.chat.completions.with_raw_response.create(model="spideriq/fast", messages=MESSAGES)
    resp = raw.parse()
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens == 10
    # The first model of the chain served (the mock does not fail).
    assert raw.headers.get("x-spidergate-model") == "llama-3.1-8b-instant", dict(raw.headers)
    assert resp.model != "spideriq/fast"
    assert "x-spidergate-fallback-from" not in raw.headers


# 4. /api/gate/v1 prefix -----------------------------------------------------------------

def test_api_gate_prefix(gw: Gateway, default_key: dict):
    c = gw.client(default_key["secret"], base_url=f"http://127.0.0.1:{gw.port}/api/gate/v1")
    resp = c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert resp.choices[0].message.content
    assert resp.usage.prompt_tokens == 10
    ids = {m.id for m in c.models.list()}
    assert "gpt-4o-mini" in ids


# 5. Embeddings --------------------------------------------------------------------------

def test_embeddings(client: openai.OpenAI):
    resp = client.embeddings.create(model="text-embedding-3-small", input="hi")
    assert len(resp.data) == 1
    assert len(resp.data[0].embedding) > 0
    assert all(isinstance(x, float) for x in resp.data[0].embedding)
    assert resp.usage.prompt_tokens > 0
    # A chat model serves the chat family only (SPEC §3).
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model="gpt-4o-mini", input="hi")
    assert e.value.code == "invalid_request", e.value.body
    # The message names the path the client called.
    assert "not /v1/embeddings" in e.value.message, e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="text-embedding-3-small",
                                       messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "invalid_request", e.value.body
    assert "not /v1/chat/completions" in e.value.message, e.value.message


# 6. Models ------------------------------------------------------------------------------

def test_models_list(client: openai.OpenAI):
    ids = {m.id for m in client.models.list()}
    assert {"gpt-4o-mini", "gpt-4o", "llama-3.1-8b-instant"} <= ids, ids


def test_model_retrieve_takes_an_alias_escaped_or_not(gw: Gateway):
    # SDKs escape the id in the path (openai-node: `/models/spideriq%2Ffast`).
    key = gw.create_key("e2e-alias-retrieve")
    client = gw.client(key["secret"])
    assert client.models.retrieve("spideriq/fast").id == "spideriq/fast"
    r = httpx.get(f"{gw.base_url}/models/spideriq%2Ffast",
                  headers={"Authorization": f"Bearer {key['secret']}"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "spideriq/fast"


def test_models_list_respects_allow_list(gw: Gateway):
    key = gw.create_key("e2e-llama-only", "--models", "llama-3.1-8b-instant")
    ids = [m.id for m in gw.client(key["secret"]).models.list()]
    assert ids == ["llama-3.1-8b-instant"], ids


# 7. Errors ------------------------------------------------------------------------------

def test_unknown_key_is_authentication_error(gw: Gateway):
    never_issued = "spideriq_pat_" + pysecrets.token_hex(16)
    with pytest.raises(openai.AuthenticationError) as ei:
        gw.client(never_issued).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 401
    assert _error_code(ei.value) == "invalid_api_key"


def test_malformed_key_is_authentication_error(gw: Gateway):
    with pytest.raises(openai.AuthenticationError) as ei:
        gw.client("sk-nope").chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 401
    assert _error_code(ei.value) == "invalid_api_key"


def test_revoked_key(gw: Gateway):
    key = gw.create_key("e2e-revoke-me")
    c = gw.client(key["secret"])
    assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    gw.cli("keys", "revoke", key["id"])
    gw.wait_for_key_status(key["secret"], lambda st, code: st == 401, "be rejected after revoke")
    with pytest.raises(openai.AuthenticationError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _error_code(ei.value) == "token_revoked"


def test_insufficient_scope(gw: Gateway):
    key = gw.create_key("e2e-models-only", "--scopes", "gate:models")
    c = gw.client(key["secret"])
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 403
    assert _error_code(ei.value) == "insufficient_scope"
    # The scope it does have works.
    assert "gpt-4o-mini" in {m.id for m in c.models.list()}


def test_model_not_in_allow_list(gw: Gateway):
    key = gw.create_key("e2e-gpt4o-only", "--models", "gpt-4o")
    c = gw.client(key["secret"])
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _error_code(ei.value) == "model_not_allowed"
    assert c.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices[0].message.content


def test_free_only_key(gw: Gateway):
    key = gw.create_key("e2e-free-only", "--free-only")
    c = gw.client(key["secret"])
    with pytest.raises(openai.PermissionDeniedError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _error_code(ei.value) == "model_not_allowed"
    resp = c.chat.completions.create(model="llama-3.1-8b-instant", messages=MESSAGES)
    assert resp.choices[0].message.content


def test_unknown_model(client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model="no-such-model-e2e", messages=MESSAGES)
    assert ei.value.status_code == 404
    assert _error_code(ei.value) == "model_not_found"


def test_rate_limit(gw: Gateway):
    key = gw.create_key("e2e-rpm2", "--rpm", "2")
    c = gw.client(key["secret"])
    for _ in range(2):
        assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 429
    assert _error_code(ei.value) == "rate_limit_exceeded"
    retry_after = ei.value.response.headers.get("retry-after")
    assert retry_after is not None, dict(ei.value.response.headers)
    assert re.fullmatch(r"\d+", retry_after.strip()), retry_after
    assert 1 <= int(retry_after) <= 60, retry_after


def test_runaway_agent_brakes_raise_rate_limit_error(gw: Gateway):
    """SPEC §7: max_usd_per_hour and loop_limit refusals are 429s the SDK raises as
    RateLimitError, with their own codes and a whole-seconds Retry-After."""
    key = gw.create_key("e2e-loop", "--loop-limit", "2")
    c = gw.client(key["secret"])
    for _ in range(2):
        assert c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES).choices
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _error_code(ei.value) == "loop_detected"
    assert 1 <= int(ei.value.response.headers["retry-after"]) <= 61

    # A cap below one request's upper-bound cost: refused before anything is spent.
    key = gw.create_key("e2e-hourly", "--max-usd-per-hour", "0.000001")
    c = gw.client(key["secret"])
    with pytest.raises(openai.RateLimitError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert _error_code(ei.value) == "spend_rate_exceeded"
    assert int(ei.value.response.headers["retry-after"]) >= 1


def test_hard_budget_exceeded(gw: Gateway):
    key = gw.create_key("e2e-tiny-budget", "--budget", "0.000001", "--budget-mode", "hard")
    c = gw.client(key["secret"])
    with pytest.raises(openai.APIStatusError) as ei:
        c.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert ei.value.status_code == 402
    assert _error_code(ei.value) == "budget_exceeded"
    assert ei.value.message


# 8. No secret in the log (runs last; the session fixture re-checks after shutdown) --------

def test_zz_log_has_no_secrets(gw: Gateway):
    log = gw.log_path.read_text(errors="replace")
    assert log, "gateway log is empty; is it being captured?"
    leaked = [s for s in gw.secrets if s in log]
    assert not leaked, f"gateway log {gw.log_path} contains {len(leaked)} agent secret(s)"
    # No full-length PAT at all, issued by us or not (the never-issued probe included).
    assert not re.search(r"spideriq_pat_[0-9a-f]{32}", log)
