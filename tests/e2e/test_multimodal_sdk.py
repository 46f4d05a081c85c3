"""End-to-end: the official `openai` SDK's `images.generate`, `images.edit`,
`audio.speech.create`, `audio.transcriptions.create` (plain and `stream=True`) and
`audio.translations.create`, and the `anthropic` SDK's `messages.count_tokens`, through
SpiderGate to the mock, with exact spend.

    SPIDERGATE_BIN=target/debug/spidergate python3 -m pytest -q tests/e2e/test_multimodal_sdk.py
"""

from __future__ import annotations

import base64
import hashlib

import anthropic
import openai
import pytest

from gateway_fixture import Gateway, gateway_stack

# 0.04 USD per image; 15 USD per million input characters (Unicode code points); 0.006 USD a
# minute of audio, or 6 / 10 USD per million tokens in / out (gpt-4o-transcribe).
EXTRA_MODELS = """\
  - id: gpt-image-1
    provider: mock-openai
    endpoint: images
    usd_per_image: 0.04
  - id: tts-1
    provider: mock-openai
    endpoint: speech
    usd_per_mchar: 15
  - id: whisper-1
    provider: mock-openai
    upstream_id: whisper-upstream
    endpoint: transcriptions
    usd_per_minute: 0.006
  - id: gpt-4o-transcribe
    provider: mock-openai
    endpoint: transcriptions
    input_usd_per_mtok: 6
    output_usd_per_mtok: 10
    max_output_tokens: 2000
"""
MOCK_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def mock_speech(text: str) -> bytes:
    """What the mock speaks (mock/src/media.rs `speech_audio`)."""
    return b"ID3" + hashlib.sha256(text.encode()).digest() * 128


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    yield from gateway_stack(tmp_path_factory, "multimodal-sdk", extra_models=EXTRA_MODELS)


def test_images_generate_n2_is_charged_two_images(gw: Gateway):
    key = gw.create_key("img")
    c = gw.openai(key["secret"])
    resp = c.images.generate(model="gpt-image-1", prompt="a spider at a gate", n=2)
    assert len(resp.data) == 2
    assert all(base64.b64decode(d.b64_json) == MOCK_PNG for d in resp.data)
    gw.assert_spend(key["secret"], 2 * 40_000_000, model="gpt-image-1", requests=1)


def test_audio_speech_bytes_arrive_and_are_charged_per_character(gw: Gateway):
    key = gw.create_key("tts")
    c = gw.openai(key["secret"])
    text = "Grüße aus dem Netz"  # 18 code points, 20 bytes
    with c.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text) as r:
        audio = r.read()
    assert audio == mock_speech(text)
    gw.assert_spend(key["secret"], 18 * 15_000, model="tts-1", requests=1)


def test_a_chat_model_on_images_is_bad_request(gw: Gateway):
    key = gw.create_key("wrong-family")
    c = gw.openai(key["secret"])
    with pytest.raises(openai.BadRequestError) as e:
        c.images.generate(model="gpt-4o-mini", prompt="x")
    assert e.value.body["code"] == "invalid_request"
    assert gw.spend_nanos(key["secret"]) == 0


def test_anthropic_count_tokens_is_passed_through_free(gw: Gateway):
    key = gw.create_key("count")
    c = gw.anthropic(key["secret"])
    r = c.messages.with_raw_response.count_tokens(
        model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}],
        extra_headers={"x-mock-prompt-tokens": "42"})
    assert r.parse().input_tokens == 42
    assert r.headers.get("x-spidergate-estimated") is None
    assert gw.spend_nanos(key["secret"]) == 0
    assert gw.usage(key["secret"])["requests_this_minute"] == 1


def test_count_tokens_on_an_openai_model_is_estimated(gw: Gateway):
    key = gw.create_key("count-est")
    c = gw.anthropic(key["secret"])
    r = c.messages.with_raw_response.count_tokens(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert r.headers.get("x-spidergate-estimated") == "true"
    assert r.parse().input_tokens > 0
    assert gw.spend_nanos(key["secret"]) == 0


def test_count_tokens_errors_are_anthropic_exceptions(gw: Gateway):
    key = gw.create_key("count-scope", "--scopes", "gate:models")
    c = gw.anthropic(key["secret"])
    with pytest.raises(anthropic.PermissionDeniedError):
        c.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])
    bad = gw.anthropic("spideriq_pat_" + "0" * 32)
    with pytest.raises(anthropic.AuthenticationError):
        bad.messages.count_tokens(model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}])


def _audio_200kb() -> bytes:
    return bytes((i * 2654435761 >> 13) & 0xFF for i in range(200_000))


@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_audio_upload_reaches_the_mock_intact_and_is_charged_per_minute(gw: Gateway, kind: str):
    key = gw.create_key(f"stt-{kind}")
    c = gw.openai(key["secret"])
    audio = _audio_200kb()
    api = c.audio.transcriptions if kind == "transcriptions" else c.audio.translations
    resp = api.create(model="whisper-1", file=("speech.mp3", audio, "audio/mpeg"),
                      response_format="verbose_json")
    # The mock names the sha256 of the file part it received.
    assert resp.text == f"sha256:{hashlib.sha256(audio).hexdigest()} bytes:200000"
    # 200,000 bytes at 16,000 a second = 12.5 s at 0.006 USD a minute = 0.00125 USD.
    gw.assert_spend(key["secret"], 1_250_000, model="whisper-1", requests=1)


@pytest.mark.parametrize("kind", ["transcriptions", "translations"])
def test_a_large_upload_streams_through_intact_and_is_charged_per_minute(gw: Gateway, kind: str):
    """Above server.multipart_hold_bytes (1 MiB) the form goes upstream as it arrives."""
    key = gw.create_key(f"stt-large-{kind}")
    c = gw.openai(key["secret"])
    audio = hashlib.shake_256(b"large upload").digest(4_000_000)
    api = c.audio.transcriptions if kind == "transcriptions" else c.audio.translations
    resp = api.create(model="whisper-1", file=("speech.mp3", audio, "audio/mpeg"),
                      response_format="verbose_json")
    assert resp.text == f"sha256:{hashlib.sha256(audio).hexdigest()} bytes:4000000"
    # 4,000,000 bytes at 16,000 a second = 250 s at 0.006 USD a minute = 0.025 USD.
    gw.assert_spend(key["secret"], 25_000_000, model="whisper-1", requests=1)


def test_streamed_transcription_arrives_event_by_event_and_is_charged_its_final_usage(gw: Gateway):
    key = gw.create_key("stt-stream")
    c = gw.openai(key["secret"])
    audio = _audio_200kb()
    stream = c.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("speech.mp3", audio, "audio/mpeg"), stream=True,
        extra_headers={"x-mock-prompt-tokens": "1250", "x-mock-completion-tokens": "40"})
    events = list(stream)
    text = f"sha256:{hashlib.sha256(audio).hexdigest()} bytes:200000"
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) == 3 and "".join(deltas) == text
    done = events[-1]
    assert done.type == "transcript.text.done" and done.text == text
    assert (done.usage.input_tokens, done.usage.output_tokens) == (1250, 40)
    # 1,250 x 6,000 + 40 x 10,000 nano-USD, from the usage of transcript.text.done.
    gw.assert_spend(key["secret"], 7_900_000, model="gpt-4o-transcribe", requests=1)


def test_images_edit_with_a_real_png(gw: Gateway):
    key = gw.create_key("img-edit")
    c = gw.openai(key["secret"])
    resp = c.images.edit(model="gpt-image-1", image=("in.png", MOCK_PNG, "image/png"),
                         prompt="add a hat", n=2)
    assert len(resp.data) == 2
    gw.assert_spend(key["secret"], 2 * 40_000_000, model="gpt-image-1", requests=1)
