"""End-to-end: either API shape reaches either provider kind (SPEC section 3).

- the `openai` SDK against an Anthropic-kind model through /v1/chat/completions (JSON and SSE,
  tool calls, usage chunk);
- the `anthropic` SDK against an OpenAI-kind model through /v1/messages (plain, stream helper,
  tool use);
- the alias [claude-sonnet-4-5, gpt-4o-mini] falling back across kinds when the Anthropic
  upstream answers 529 / 503.

Spend is checked to the nano-dollar against the mock's reported usage and the config prices.

    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_translation_sdk.py
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from gateway_fixture import (
    CLAUDE_FALLBACK_ALIAS,
    CLAUDE_UPSTREAM_ID,
    MOCK_DEFAULT_CHUNKS,
    MOCK_REPLY_TEXT,
    MOCK_STREAM_TOKEN,
    MOCK_TOOL_ARGUMENTS,
    Gateway,
    anthropic_cost_nanos,
    gateway_stack,
    openai_cost_nanos,
)

CLAUDE = "claude-sonnet-4-5"
GPT = "gpt-4o-mini"
MESSAGES = [{"role": "user", "content": "Say hello."}]
WEATHER_Q = [{"role": "user", "content": "Weather in Paris?"}]
OPENAI_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
ANTHROPIC_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city.",
    "input_schema": OPENAI_TOOL["function"]["parameters"],
}

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from gateway_stack(tmp_path_factory, "translation-sdk")


def _claude_cost(input_tokens=10, output_tokens=5, cache_read=0, cache_write=0) -> int:
    return anthropic_cost_nanos(CLAUDE, input_tokens=input_tokens, output_tokens=output_tokens,
                                cache_read=cache_read, cache_write=cache_write)


def _gpt_cost(prompt_tokens=10, completion_tokens=5, cached_tokens=0) -> int:
    return openai_cost_nanos(GPT, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                             cached_tokens=cached_tokens)


# 1. openai SDK -> /v1/chat/completions -> Anthropic-kind model ----------------------------

def test_chat_on_anthropic_model_plain(gw: Gateway):
    key = gw.create_key("tr-chat-plain")
    c = gw.openai(key["secret"])
    resp = c.chat.completions.create(model=CLAUDE, messages=MESSAGES, max_tokens=64)
    assert isinstance(resp, openai.types.chat.ChatCompletion)
    assert resp.object == "chat.completion"
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == MOCK_REPLY_TEXT
    assert not choice.message.tool_calls
    assert choice.finish_reason == "stop"
    assert resp.usage.prompt_tokens == 10
    assert resp.usage.completion_tokens == 5
    assert resp.usage.total_tokens == 15
    gw.assert_spend(key["secret"], _claude_cost(), model=CLAUDE, requests=1)


def test_chat_on_anthropic_model_cache_usage(gw: Gateway):
    key = gw.create_key("tr-chat-cache")
    c = gw.openai(key["secret"])
    resp = c.chat.completions.create(
        model=CLAUDE, messages=MESSAGES,
        extra_headers={
            "x-mock-prompt-tokens": "50",
            "x-mock-completion-tokens": "7",
            "x-mock-cache-read-tokens": "2000",
            "x-mock-cache-write-tokens": "300",
        },
    )
    # OpenAI's convention: prompt_tokens counts every input token, cached_tokens the reads.
    assert resp.usage.prompt_tokens == 50 + 2000 + 300
    assert resp.usage.prompt_tokens_details.cached_tokens == 2000
    assert resp.usage.completion_tokens == 7
    gw.assert_spend(key["secret"], _claude_cost(50, 7, 2000, 300), model=CLAUDE, requests=1)


def test_chat_on_anthropic_model_stream_include_usage(gw: Gateway):
    key = gw.create_key("tr-chat-stream")
    c = gw.openai(key["secret"])
    chunks = list(c.chat.completions.create(
        model=CLAUDE, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
        extra_headers={"x-mock-chunks": "4", "x-mock-cache-read-tokens": "30"},
    ))
    assert chunks
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == MOCK_STREAM_TOKEN * 4
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    usage_chunks = [ch for ch in chunks if ch.usage is not None]
    assert len(usage_chunks) == 1, usage_chunks
    last = chunks[-1]
    assert last is usage_chunks[0] and last.choices == [], last
    assert last.usage.prompt_tokens == 10 + 30
    assert last.usage.completion_tokens == 5
    assert last.usage.prompt_tokens_details.cached_tokens == 30
    gw.assert_spend(key["secret"], _claude_cost(10, 5, cache_read=30), model=CLAUDE, requests=1)


def test_chat_on_anthropic_model_stream_without_usage_still_charged(gw: Gateway):
    key = gw.create_key("tr-chat-stream-nousage")
    c = gw.openai(key["secret"])
    chunks = list(c.chat.completions.create(model=CLAUDE, messages=MESSAGES, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS
    assert not [ch for ch in chunks if ch.usage is not None], "usage chunk the client did not ask for"
    gw.assert_spend(key["secret"], _claude_cost(), model=CLAUDE, requests=1)


def test_chat_on_anthropic_model_tool_call_plain(gw: Gateway):
    key = gw.create_key("tr-chat-tool")
    c = gw.openai(key["secret"])
    resp = c.chat.completions.create(
        model=CLAUDE, messages=WEATHER_Q, tools=[OPENAI_TOOL],
        extra_headers={"x-mock-tool-call": "get_weather"},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1, choice.message
    assert calls[0].type == "function"
    assert calls[0].id
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == MOCK_TOOL_ARGUMENTS
    gw.assert_spend(key["secret"], _claude_cost(), model=CLAUDE, requests=1)


def test_chat_on_anthropic_model_tool_call_stream(gw: Gateway):
    key = gw.create_key("tr-chat-tool-stream")
    c = gw.openai(key["secret"])
    chunks = list(c.chat.completions.create(
        model=CLAUDE, messages=WEATHER_Q, tools=[OPENAI_TOOL], stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-tool-call": "get_weather", "x-mock-chunks": "5"},
    ))
    calls: dict[int, dict] = {}
    finishes = []
    for ch in chunks:
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            slot = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                slot["id"] = tc.id
            if tc.function and tc.function.name:
                slot["name"] += tc.function.name
            if tc.function and tc.function.arguments:
                slot["arguments"] += tc.function.arguments
        if ch.choices[0].finish_reason:
            finishes.append(ch.choices[0].finish_reason)
    assert list(calls) == [0], calls
    assert calls[0]["id"], calls
    assert calls[0]["name"] == "get_weather", calls
    assert json.loads(calls[0]["arguments"]) == MOCK_TOOL_ARGUMENTS, calls
    assert finishes == ["tool_calls"], finishes
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5, chunks[-1]
    gw.assert_spend(key["secret"], _claude_cost(), model=CLAUDE, requests=1)


# 2. anthropic SDK -> /v1/messages -> OpenAI-kind model -----------------------------------

def test_messages_on_openai_model_plain(gw: Gateway):
    key = gw.create_key("tr-msg-plain")
    c = gw.anthropic(key["secret"])
    msg = c.messages.create(
        model=GPT, max_tokens=64, messages=MESSAGES, system="Be brief.",
        extra_headers={"x-mock-prompt-tokens": "100", "x-mock-cache-read-tokens": "40"},
    )
    assert isinstance(msg, anthropic.types.Message)
    assert msg.role == "assistant"
    assert [b.type for b in msg.content] == ["text"], msg
    assert msg.content[0].text == MOCK_REPLY_TEXT
    assert msg.stop_reason == "end_turn"
    # The mock reports prompt_tokens 140 with cached_tokens 40; Anthropic's input_tokens
    # excludes the cache reads.
    assert msg.usage.input_tokens == 100
    assert msg.usage.cache_read_input_tokens == 40
    assert msg.usage.output_tokens == 5
    gw.assert_spend(key["secret"], _gpt_cost(140, 5, cached_tokens=40), model=GPT, requests=1)


def test_messages_on_openai_model_stream_helper(gw: Gateway):
    key = gw.create_key("tr-msg-stream")
    c = gw.anthropic(key["secret"])
    with c.messages.stream(model=GPT, max_tokens=64, messages=MESSAGES,
                           extra_headers={"x-mock-chunks": "5", "x-mock-completion-tokens": "8"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == MOCK_STREAM_TOKEN * 5
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 10
    assert final.usage.output_tokens == 8
    gw.assert_spend(key["secret"], _gpt_cost(10, 8), model=GPT, requests=1)


def test_messages_on_openai_model_tool_use(gw: Gateway):
    key = gw.create_key("tr-msg-tool")
    c = gw.anthropic(key["secret"])
    msg = c.messages.create(model=GPT, max_tokens=64, messages=WEATHER_Q, tools=[ANTHROPIC_TOOL],
                            extra_headers={"x-mock-tool-call": "get_weather"})
    assert msg.stop_reason == "tool_use"
    blocks = [b for b in msg.content if b.type == "tool_use"]
    assert len(blocks) == 1, msg
    assert blocks[0].name == "get_weather" and blocks[0].id
    assert blocks[0].input == MOCK_TOOL_ARGUMENTS

    with c.messages.stream(model=GPT, max_tokens=64, messages=WEATHER_Q, tools=[ANTHROPIC_TOOL],
                           extra_headers={"x-mock-tool-call": "get_weather", "x-mock-chunks": "4"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    blocks = [b for b in final.content if b.type == "tool_use"]
    assert len(blocks) == 1, final
    assert blocks[0].name == "get_weather"
    assert blocks[0].input == MOCK_TOOL_ARGUMENTS
    gw.assert_spend(key["secret"], 2 * _gpt_cost(), model=GPT, requests=2)


# 3. Cross-kind fallback ------------------------------------------------------------------

FAIL_CLAUDE = {"x-mock-status-model": CLAUDE_UPSTREAM_ID}


@pytest.mark.parametrize("status", ["529", "503"])
def test_fallback_alias_chat(gw: Gateway, status: str):
    key = gw.create_key(f"tr-fallback-chat-{status}")
    c = gw.openai(key["secret"])
    raw = c.chat.completions.with_raw_response.create(
        model=CLAUDE_FALLBACK_ALIAS, messages=MESSAGES,
        extra_headers={"x-mock-status": status, **FAIL_CLAUDE},
    )
    assert raw.status_code == 200
    assert raw.headers.get("x-spidergate-fallback-from") == CLAUDE, dict(raw.headers)
    assert raw.headers.get("x-spidergate-model") == GPT, dict(raw.headers)
    resp = raw.parse()
    assert resp.choices[0].message.content == MOCK_REPLY_TEXT
    assert resp.choices[0].finish_reason == "stop"
    u = gw.assert_spend(key["secret"], _gpt_cost())
    assert u["by_model"][GPT]["spend_nanodollars"] == _gpt_cost(), u


@pytest.mark.parametrize("status", ["529", "503"])
def test_fallback_alias_messages(gw: Gateway, status: str):
    key = gw.create_key(f"tr-fallback-msg-{status}")
    c = gw.anthropic(key["secret"])
    raw = c.messages.with_raw_response.create(
        model=CLAUDE_FALLBACK_ALIAS, max_tokens=64, messages=MESSAGES,
        extra_headers={"x-mock-status": status, **FAIL_CLAUDE},
    )
    assert raw.status_code == 200
    assert raw.headers.get("x-spidergate-fallback-from") == CLAUDE, dict(raw.headers)
    assert raw.headers.get("x-spidergate-model") == GPT, dict(raw.headers)
    msg = raw.parse()
    assert msg.content[0].text == MOCK_REPLY_TEXT
    assert msg.stop_reason == "end_turn"
    u = gw.assert_spend(key["secret"], _gpt_cost())
    assert u["by_model"][GPT]["spend_nanodollars"] == _gpt_cost(), u


def test_fallback_alias_stream(gw: Gateway):
    """A streamed request falls back too (the 529 arrives before any byte reached the client)."""
    key = gw.create_key("tr-fallback-stream")
    c = gw.openai(key["secret"])
    with c.chat.completions.with_streaming_response.create(
        model=CLAUDE_FALLBACK_ALIAS, messages=MESSAGES, stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-mock-status": "529", **FAIL_CLAUDE},
    ) as raw:
        assert raw.headers.get("x-spidergate-fallback-from") == CLAUDE, dict(raw.headers)
        chunks = list(raw.parse())
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == MOCK_STREAM_TOKEN * MOCK_DEFAULT_CHUNKS
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 10
    gw.assert_spend(key["secret"], _gpt_cost())


def test_alias_without_failure_serves_anthropic(gw: Gateway):
    key = gw.create_key("tr-alias-ok")
    c = gw.openai(key["secret"])
    raw = c.chat.completions.with_raw_response.create(model=CLAUDE_FALLBACK_ALIAS, messages=MESSAGES)
    assert raw.headers.get("x-spidergate-model") == CLAUDE, dict(raw.headers)
    assert "x-spidergate-fallback-from" not in raw.headers
    assert raw.parse().choices[0].message.content == MOCK_REPLY_TEXT
    gw.assert_spend(key["secret"], _claude_cost(), model=CLAUDE, requests=1)


# A stream the upstream breaks off: each SDK raises its own API error, not a transport one.

CUT = {"x-mock-chunks": "10", "x-mock-break-after": "3"}


@pytest.mark.parametrize("model", [GPT, CLAUDE])
def test_chat_stream_broken_upstream_raises_api_error(gw: Gateway, model: str):
    key = gw.create_key(f"tr-cut-chat-{model}")
    c = gw.openai(key["secret"])
    texts = []
    with pytest.raises(openai.APIError) as raised:
        for ch in c.chat.completions.create(model=model, messages=MESSAGES, stream=True,
                                            extra_headers=CUT):
            if ch.choices:
                texts.append(ch.choices[0].delta.content or "")
    # An error event of the API, not a cut connection (httpx's RemoteProtocolError).
    assert not isinstance(raised.value, openai.APIConnectionError), raised.value
    assert "upstream stream" in str(raised.value), raised.value
    assert "".join(texts) == MOCK_STREAM_TOKEN * 3


@pytest.mark.parametrize("model", [CLAUDE, GPT])
def test_messages_stream_broken_upstream_raises_api_error(gw: Gateway, model: str):
    key = gw.create_key(f"tr-cut-msg-{model}")
    c = gw.anthropic(key["secret"])
    with pytest.raises(anthropic.APIStatusError) as raised:
        with c.messages.stream(model=model, max_tokens=64, messages=MESSAGES,
                               extra_headers=CUT) as stream:
            for _ in stream.text_stream:
                pass
    assert raised.value.body["error"]["type"] == "api_error", raised.value.body
