"""End-to-end: the official `openai` Python SDK's Responses API (`POST /v1/responses`) through
SpiderGate to an OpenAI-kind provider (the mock): plain and streamed, exact spend including
cached input tokens (usage from `response.completed` when streamed), and the hard budget.

    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_responses_sdk.py
"""

from __future__ import annotations

import json

import openai
import pytest

from gateway_fixture import (
    MOCK_DEFAULT_CHUNKS,
    MOCK_REPLY_TEXT,
    MOCK_STREAM_TOKEN,
    MOCK_TOOL_ARGUMENTS,
    Gateway,
    gateway_stack,
    openai_cost_nanos,
)

MODEL = "gpt-4o-mini"
CACHE_HEADERS = {
    "x-mock-prompt-tokens": "200",       # uncached input
    "x-mock-cache-read-tokens": "1000",  # cached input: input_tokens = 1200, cached_tokens = 1000
    "x-mock-completion-tokens": "20",
}


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from gateway_stack(tmp_path_factory, "responses-sdk")


def _cost(input_tokens=10, output_tokens=5, cached=0, model=MODEL) -> int:
    return openai_cost_nanos(model, prompt_tokens=input_tokens, completion_tokens=output_tokens,
                             cached_tokens=cached)


def test_responses_create_plain(gw: Gateway):
    key = gw.create_key("resp-plain")
    c = gw.openai(key["secret"])
    raw = c.responses.with_raw_response.create(model=MODEL, input="Say hello.")
    assert raw.headers.get("x-spidergate-model") == MODEL, dict(raw.headers)
    assert "x-ratelimit-remaining-requests" in raw.headers, dict(raw.headers)
    resp = raw.parse()
    assert isinstance(resp, openai.types.responses.Response)
    assert resp.status == "completed"
    assert resp.output_text == MOCK_REPLY_TEXT
    assert resp.usage.input_tokens == 10
    assert resp.usage.output_tokens == 5
    gw.assert_spend(key["secret"], _cost(), model=MODEL, requests=1)


def test_responses_create_cached_tokens_priced_once(gw: Gateway):
    key = gw.create_key("resp-cache")
    c = gw.openai(key["secret"])
    resp = c.responses.create(model=MODEL, input="Say hello.", extra_headers=CACHE_HEADERS)
    assert resp.output_text == MOCK_REPLY_TEXT
    assert resp.usage.input_tokens == 1200
    assert resp.usage.input_tokens_details.cached_tokens == 1000
    assert resp.usage.output_tokens == 20
    expected = _cost(1200, 20, cached=1000)
    assert expected == 200 * 150 + 1000 * 75 + 20 * 600  # 117,000 nano-USD
    gw.assert_spend(key["secret"], expected, model=MODEL, requests=1)


def test_responses_create_stream_true(gw: Gateway):
    key = gw.create_key("resp-stream")
    c = gw.openai(key["secret"])
    events = list(c.responses.create(model=MODEL, input="Say hello.", stream=True,
                                     extra_headers={**CACHE_HEADERS, "x-mock-chunks": "4"}))
    types = [e.type for e in events]
    assert types[0] == "response.created", types
    assert types[-1] == "response.completed", types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == MOCK_STREAM_TOKEN * 4
    done = events[-1].response
    assert done.status == "completed"
    assert done.output_text == text
    assert done.usage.input_tokens == 1200
    assert done.usage.input_tokens_details.cached_tokens == 1000
    assert done.usage.output_tokens == 20
    gw.assert_spend(key["secret"], _cost(1200, 20, cached=1000), model=MODEL, requests=1)


def test_responses_stream_helper(gw: Gateway):
    key = gw.create_key("resp-stream-helper")
    c = gw.openai(key["secret"])
    with c.responses.stream(model=MODEL, input="Say hello.") as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS
    assert final.output_text == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS
    assert final.usage.input_tokens == 10 and final.usage.output_tokens == 5
    gw.assert_spend(key["secret"], _cost(), model=MODEL, requests=1)


def test_responses_function_call(gw: Gateway):
    key = gw.create_key("resp-tool")
    c = gw.openai(key["secret"])
    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False},
        "strict": True,
    }
    resp = c.responses.create(model=MODEL, input="Weather in Paris?", tools=[tool],
                              extra_headers={"x-mock-tool-call": "get_weather"})
    calls = [o for o in resp.output if o.type == "function_call"]
    assert len(calls) == 1, resp.output
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == MOCK_TOOL_ARGUMENTS

    events = list(c.responses.create(model=MODEL, input="Weather in Paris?", tools=[tool], stream=True,
                                     extra_headers={"x-mock-tool-call": "get_weather", "x-mock-chunks": "3"}))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(args) == MOCK_TOOL_ARGUMENTS
    assert events[-1].type == "response.completed"
    gw.assert_spend(key["secret"], 2 * _cost(), model=MODEL, requests=2)


def test_responses_hard_budget_exceeded(gw: Gateway):
    key = gw.create_key("resp-tiny-budget", "--budget", "0.000001", "--budget-mode", "hard")
    c = gw.openai(key["secret"])
    with pytest.raises(openai.APIStatusError) as ei:
        c.responses.create(model=MODEL, input="Say hello.", max_output_tokens=64)
    e = ei.value
    assert e.status_code == 402, (e.status_code, e.body)
    assert e.code == "budget_exceeded", e.body
    assert isinstance(e.body, dict) and e.body.get("code") == "budget_exceeded", e.body
    assert "0.000001" in e.message, e.message  # SPEC: the message states spend against the cap
    assert e.response.headers.get("x-spidergate-error-code") == "budget_exceeded"
    with pytest.raises(openai.APIStatusError) as ei:
        list(c.responses.create(model=MODEL, input="Say hello.", stream=True))
    assert ei.value.status_code == 402 and ei.value.code == "budget_exceeded", ei.value.body
    assert gw.spend_nanos(key["secret"]) == 0


def test_responses_budget_allows_then_refuses(gw: Gateway):
    """A hard budget that covers one small request's reservation but not a second: the first
    is served and charged exactly, and later ones are refused once spend + reservation exceed
    the cap."""
    # Reservation bound for max_output_tokens=16: prompt estimate + 16 * 600 nano; cap 0.0001 USD
    # (100,000 nano). Each served request costs 10*150 + 5*600 = 4,500 nano.
    key = gw.create_key("resp-budget", "--budget", "0.0001", "--budget-mode", "hard")
    c = gw.openai(key["secret"])
    served = 0
    refused = None
    for _ in range(40):
        try:
            c.responses.create(model=MODEL, input="Hi", max_output_tokens=16)
            served += 1
        except openai.APIStatusError as e:
            refused = e
            break
    assert served >= 1, "the first request fits the budget"
    assert refused is not None, "a hard budget of 100,000 nano-USD must refuse within 40 requests of 4,500"
    assert refused.status_code == 402 and refused.code == "budget_exceeded", refused.body
    spent = gw.spend_nanos(key["secret"])
    assert spent == served * _cost(), (spent, served)
    assert spent <= 100_000
