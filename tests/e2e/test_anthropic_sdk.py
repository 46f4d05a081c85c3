"""End-to-end: the official `anthropic` Python SDK against SpiderGate's /v1/messages, natively
passed through to an Anthropic-kind provider (the mock), with the gateway's controls and
exact spend accounting (cache reads and writes included).

    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_anthropic_sdk.py
"""

from __future__ import annotations

import secrets as pysecrets

import anthropic
import pytest

from gateway_fixture import (
    MOCK_DEFAULT_CHUNKS,
    MOCK_REPLY_TEXT,
    MOCK_STREAM_TOKEN,
    MOCK_TOOL_ARGUMENTS,
    Gateway,
    anthropic_cost_nanos,
    gateway_stack,
)

MODEL = "claude-sonnet-4-5"
MESSAGES = [{"role": "user", "content": "Say hello."}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}

# The SDK warns that this (real) model name is deprecated; the mock does not care.
pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from gateway_stack(tmp_path_factory, "anthropic-sdk")


def _key(gw: Gateway, name: str, *flags: str) -> tuple[dict, anthropic.Anthropic]:
    key = gw.create_key(name, *flags)
    return key, gw.anthropic(key["secret"])


def _assert_anthropic_error(e: anthropic.APIStatusError, status: int, err_type: str, code: str) -> None:
    assert e.status_code == status, (e.status_code, e.body)
    assert isinstance(e.body, dict), e.body
    assert e.body.get("type") == "error", e.body
    assert e.body["error"]["type"] == err_type, e.body
    assert isinstance(e.body["error"].get("message"), str) and e.body["error"]["message"], e.body
    assert e.response.headers.get("x-spidergate-error-code") == code, dict(e.response.headers)


# 1. Plain -------------------------------------------------------------------------------

def test_messages_create(gw: Gateway):
    key, c = _key(gw, "anth-plain")
    msg = c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert isinstance(msg, anthropic.types.Message)
    assert msg.type == "message" and msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"], msg
    assert msg.content[0].text == MOCK_REPLY_TEXT
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 10
    assert msg.usage.output_tokens == 5
    gw.assert_spend(key["secret"], anthropic_cost_nanos(MODEL, input_tokens=10, output_tokens=5),
                    model=MODEL, requests=1)


def test_messages_create_with_bearer_token(gw: Gateway):
    """The agent key also works as `Authorization: Bearer` (the SDK's auth_token)."""
    key = gw.create_key("anth-bearer")
    c = anthropic.Anthropic(base_url=gw.root_url, auth_token=key["secret"], api_key=None,
                            max_retries=0, timeout=30)
    msg = c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    assert msg.content[0].text == MOCK_REPLY_TEXT
    gw.assert_spend(key["secret"], anthropic_cost_nanos(MODEL, input_tokens=10, output_tokens=5))


def test_messages_create_raw_headers(gw: Gateway):
    key, c = _key(gw, "anth-raw")
    raw = c.messages.with_raw_response.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    for h in ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset"):
        assert h in raw.headers, f"missing {h}: {dict(raw.headers)}"
    assert raw.headers.get("x-spidergate-model") == MODEL, dict(raw.headers)
    assert raw.parse().content[0].text == MOCK_REPLY_TEXT


def test_messages_cache_tokens_priced_once(gw: Gateway):
    key, c = _key(gw, "anth-cache")
    msg = c.messages.create(
        model=MODEL, max_tokens=64, messages=MESSAGES,
        extra_headers={
            "x-mock-prompt-tokens": "50",
            "x-mock-completion-tokens": "7",
            "x-mock-cache-read-tokens": "2000",
            "x-mock-cache-write-tokens": "300",
        },
    )
    assert msg.usage.input_tokens == 50
    assert msg.usage.cache_read_input_tokens == 2000
    assert msg.usage.cache_creation_input_tokens == 300
    assert msg.usage.output_tokens == 7
    expected = anthropic_cost_nanos(MODEL, input_tokens=50, output_tokens=7, cache_read=2000, cache_write=300)
    assert expected == 50 * 3000 + 2000 * 300 + 300 * 3750 + 7 * 15000  # 1,980,000 nano-USD
    gw.assert_spend(key["secret"], expected, model=MODEL, requests=1)


# 2. Streaming (the SDK's stream helper) --------------------------------------------------

def test_messages_stream_helper(gw: Gateway):
    key, c = _key(gw, "anth-stream")
    with c.messages.stream(model=MODEL, max_tokens=64, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS
    assert [b.type for b in final.content] == ["text"], final
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 10
    assert final.usage.output_tokens == 5
    gw.assert_spend(key["secret"], anthropic_cost_nanos(MODEL, input_tokens=10, output_tokens=5),
                    model=MODEL, requests=1)


def test_messages_stream_cache_tokens(gw: Gateway):
    key, c = _key(gw, "anth-stream-cache")
    with c.messages.stream(
        model=MODEL, max_tokens=64, messages=MESSAGES,
        extra_headers={
            "x-mock-chunks": "6",
            "x-mock-prompt-tokens": "20",
            "x-mock-completion-tokens": "9",
            "x-mock-cache-read-tokens": "100",
            "x-mock-cache-write-tokens": "40",
        },
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == MOCK_STREAM_TOKEN * 6
    assert final.usage.input_tokens == 20
    assert final.usage.cache_read_input_tokens == 100
    assert final.usage.cache_creation_input_tokens == 40
    assert final.usage.output_tokens == 9
    gw.assert_spend(
        key["secret"],
        anthropic_cost_nanos(MODEL, input_tokens=20, output_tokens=9, cache_read=100, cache_write=40),
        model=MODEL, requests=1,
    )


# 3. Tool use ----------------------------------------------------------------------------

def test_tool_use_plain(gw: Gateway):
    key, c = _key(gw, "anth-tool")
    msg = c.messages.create(
        model=MODEL, max_tokens=64, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_headers={"x-mock-tool-call": "get_weather"},
    )
    assert msg.stop_reason == "tool_use"
    blocks = [b for b in msg.content if b.type == "tool_use"]
    assert len(blocks) == 1, msg
    assert blocks[0].name == "get_weather"
    assert blocks[0].input == MOCK_TOOL_ARGUMENTS
    assert blocks[0].id
    gw.assert_spend(key["secret"], anthropic_cost_nanos(MODEL, input_tokens=10, output_tokens=5))


def test_tool_use_stream_helper(gw: Gateway):
    key, c = _key(gw, "anth-tool-stream")
    with c.messages.stream(
        model=MODEL, max_tokens=64, tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        extra_headers={"x-mock-tool-call": "get_weather", "x-mock-chunks": "5"},
    ) as stream:
        partials = [e.partial_json for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert len(partials) == 5, partials
    assert final.stop_reason == "tool_use"
    blocks = [b for b in final.content if b.type == "tool_use"]
    assert len(blocks) == 1, final
    assert blocks[0].name == "get_weather"
    assert blocks[0].input == MOCK_TOOL_ARGUMENTS
    assert final.usage.output_tokens == 5
    gw.assert_spend(key["secret"], anthropic_cost_nanos(MODEL, input_tokens=10, output_tokens=5))


# 4. Errors in Anthropic's shape -> the SDK's exception classes ----------------------------

def test_bad_key_is_authentication_error(gw: Gateway):
    never_issued = "spideriq_pat_" + pysecrets.token_hex(16)
    with pytest.raises(anthropic.AuthenticationError) as ei:
        gw.anthropic(never_issued).messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    _assert_anthropic_error(ei.value, 401, "authentication_error", "invalid_api_key")


def test_rpm_exceeded_is_rate_limit_error(gw: Gateway):
    key, c = _key(gw, "anth-rpm2", "--rpm", "2")
    for _ in range(2):
        assert c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES).content
    with pytest.raises(anthropic.RateLimitError) as ei:
        c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    _assert_anthropic_error(ei.value, 429, "rate_limit_error", "rate_limit_exceeded")
    retry_after = ei.value.response.headers.get("retry-after")
    assert retry_after is not None and retry_after.strip().isdigit(), dict(ei.value.response.headers)
    assert 1 <= int(retry_after) <= 60, retry_after


def test_model_not_allowed_is_permission_denied(gw: Gateway):
    key, c = _key(gw, "anth-haiku-only", "--models", "claude-haiku-4-5")
    with pytest.raises(anthropic.PermissionDeniedError) as ei:
        c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    _assert_anthropic_error(ei.value, 403, "permission_error", "model_not_allowed")
    # The allowed model works, and only it is charged.
    assert c.messages.create(model="claude-haiku-4-5", max_tokens=64, messages=MESSAGES).content
    gw.assert_spend(key["secret"], anthropic_cost_nanos("claude-haiku-4-5", input_tokens=10, output_tokens=5),
                    model="claude-haiku-4-5", requests=1)


def test_unknown_model_is_not_found(gw: Gateway):
    key, c = _key(gw, "anth-404")
    with pytest.raises(anthropic.NotFoundError) as ei:
        c.messages.create(model="claude-no-such-model", max_tokens=64, messages=MESSAGES)
    _assert_anthropic_error(ei.value, 404, "not_found_error", "model_not_found")


def test_hard_budget_is_402_billing_error(gw: Gateway):
    key, c = _key(gw, "anth-tiny-budget", "--budget", "0.000001", "--budget-mode", "hard")
    with pytest.raises(anthropic.APIStatusError) as ei:
        c.messages.create(model=MODEL, max_tokens=64, messages=MESSAGES)
    e = ei.value
    _assert_anthropic_error(e, 402, "billing_error", "budget_exceeded")
    # SPEC: the 402 message states current spend against the cap.
    assert "0.000001" in e.body["error"]["message"], e.body
    # A refused request costs nothing.
    assert gw.spend_nanos(key["secret"]) == 0
