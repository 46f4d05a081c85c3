//! SPEC §3, §4, §6: the multi-modal endpoints (`/v1/images/generations`, `/v1/audio/speech`)
//! and `/v1/messages/count_tokens`, through the same admission, controls, ledger and traces
//! as chat, against the bundled mock.

mod common;

use common::*;
use serde_json::{json, Value};

/// One model per family beside chat, with literal prices: images at 0.04 USD each, a
/// token-priced image model (5 / 40 USD per Mtok), speech at 15 USD per million characters,
/// transcriptions at 0.006 USD a minute or by tokens (6 / 10 USD per Mtok, as
/// gpt-4o-transcribe), and Claude for the token count.
const MODELS_YAML: &str = r#"
models:
  - id: gpt-4o-mini
    provider: mock
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
    max_output_tokens: 1000
  - id: img
    provider: mock
    upstream_id: gpt-image-upstream
    endpoint: images
    usd_per_image: 0.04
  - id: img-tokens
    provider: mock
    endpoint: images
    input_usd_per_mtok: 5
    output_usd_per_mtok: 40
    max_output_tokens: 5000
  - id: tts
    provider: mock
    upstream_id: tts-upstream
    endpoint: speech
    usd_per_mchar: 15
  - id: whisper
    provider: mock
    upstream_id: whisper-upstream-long-name
    endpoint: transcriptions
    usd_per_minute: 0.006
  - id: transcribe
    provider: mock
    endpoint: transcriptions
    input_usd_per_mtok: 6
    output_usd_per_mtok: 10
    max_output_tokens: 2000
  - id: claude
    provider: mock-anthropic
    upstream_id: claude-upstream
    input_usd_per_mtok: 3
    output_usd_per_mtok: 15
    max_output_tokens: 1000
"#;

fn start(mock: &spidergate_mock::MockProvider) -> Gateway {
    start_with(mock, "")
}

/// [`start`] with more of the config's `models:` list (and what follows it) after
/// [`MODELS_YAML`]'s.
fn start_with(mock: &spidergate_mock::MockProvider, more: &str) -> Gateway {
    // A transcription reserves 600 s of audio: 0.06 USD on `whisper`.
    GatewayBuilder::new(mock)
        .models(&format!("{MODELS_YAML}{more}"))
        .server("max_audio_seconds: 600")
        .start()
}

const BOUNDARY: &str = "sgBoundary7MA4YWxk";

/// A `multipart/form-data` body as the SDKs send it: text fields, then files.
fn form(fields: &[(&str, &str)], files: &[(&str, &str, &[u8])]) -> Vec<u8> {
    let mut b = Vec::new();
    for (name, value) in fields {
        b.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                .as_bytes(),
        );
    }
    for (name, filename, bytes) in files {
        b.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n")
                .as_bytes(),
        );
        b.extend_from_slice(bytes);
        b.extend_from_slice(b"\r\n");
    }
    b.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

fn post_form(gw: &Gateway, path: &str, key: &Key, body: &[u8]) -> Response {
    post_form_with(gw, path, key, body, &[])
}

fn post_form_with(
    gw: &Gateway,
    path: &str,
    key: &Key,
    body: &[u8],
    extra: &[(&str, &str)],
) -> Response {
    let bearer = key.bearer();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let mut headers = vec![
        ("Authorization", bearer.as_str()),
        ("Content-Type", ct.as_str()),
    ];
    headers.extend_from_slice(extra);
    http(gw.addr, "POST", path, &headers, body).expect("POST")
}

/// 200,000 bytes that are not text (every byte value, CRLFs and dashes included).
fn audio_file() -> Vec<u8> {
    (0..200_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn post(gw: &Gateway, path: &str, key: &Key, body: &Value, extra: &[(&str, &str)]) -> Response {
    gw.post(path, &key.bearer(), body.to_string().as_bytes(), extra)
}

fn spend(gw: &Gateway, key: &Key) -> i64 {
    gw.usage(key)["spend_nanodollars"]
        .as_i64()
        .expect("spend_nanodollars")
}

/// The key's traces on `endpoint`, once the ledger has written `n` of them.
fn traces_on(gw: &Gateway, key: &Key, endpoint: &str, n: usize) -> Vec<TraceRec> {
    wait_for(std::time::Duration::from_secs(5), "traces", || {
        let t: Vec<TraceRec> = gw
            .trace_rows(&key.id)
            .into_iter()
            .filter(|t| t.endpoint == endpoint)
            .collect();
        (t.len() >= n).then_some(t)
    })
}

/// SPEC §2: a body that is not a JSON object with a string `model` is 400 `invalid_request`.
/// An array is JSON, and serde's derived reading of a struct takes one field by field: a
/// black-box audit saw `["gpt-4o-mini"]` admitted as naming its model, charged, and sent
/// upstream as broken JSON, on every JSON surface. Nothing is forwarded or counted now.
#[test]
fn a_json_body_that_is_not_an_object_is_400_on_every_surface_and_reaches_nothing() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    for (path, body) in [
        ("/v1/chat/completions", r#"["gpt-4o-mini"]"#),
        (
            "/v1/chat/completions",
            " \n[\"gpt-4o-mini\", false, null, \"10\"]",
        ),
        (
            "/v1/chat/completions",
            r#"{"model":"gpt-4o-mini","messages":[],"stream":true,"stream_options":[true]}"#,
        ),
        ("/v1/responses", r#"["gpt-4o-mini"]"#),
        ("/v1/messages", r#"["claude"]"#),
        ("/v1/messages/count_tokens", r#"["claude"]"#),
        ("/v1/images/generations", r#"["img", null, null]"#),
        ("/v1/audio/speech", r#"["tts", "hello"]"#),
    ] {
        let r = gw.post(path, &key.bearer(), body.as_bytes(), &[]);
        assert_eq!(r.status, 400, "{path} {body}: {}", r.text());
        assert_eq!(
            r.header("x-spidergate-error-code"),
            Some("invalid_request"),
            "{path} {body}"
        );
    }
    assert!(mock.requests().is_empty(), "{:?}", mock.requests());
    let usage = gw.usage(&key);
    assert_eq!(usage["requests_today"], 0);
    assert_eq!(usage["spend_nanodollars"], 0);
}

/// JSON is UTF-8 (SPEC §2: a body that is not JSON is 400 `invalid_request`): bad bytes in a
/// field the gateway does not read are refused on the media surfaces too, as on chat, and
/// nothing goes upstream or is charged (a black-box audit saw them forwarded).
#[test]
fn a_media_body_that_is_not_utf8_is_refused() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let mut image = br#"{"model":"img","prompt":"a cat","size":""#.to_vec();
    image.extend_from_slice(b"\xff\"}");
    let mut speech = br#"{"model":"tts","input":"hello","voice":""#.to_vec();
    speech.extend_from_slice(b"\xc0\xaf\"}");
    for (path, body) in [
        ("/v1/images/generations", &image),
        ("/v1/audio/speech", &speech),
    ] {
        let r = gw.post(path, &key.bearer(), body, &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{path}: {}",
            r.text()
        );
    }
    assert!(mock.requests().is_empty());
}

#[test]
fn images_are_charged_per_image_returned_with_n_as_a_number_or_a_string() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "img", "prompt": "a spider", "n": 2}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(r.json()["data"][0]["b64_json"], spidergate_mock::PNG_B64);
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/images/generations");
    assert_eq!(sent[0].json().expect("json")["model"], "gpt-image-upstream");
    assert_eq!(sent[0].provider_key(), Some(PROVIDER_KEY));
    // 2 x 0.04 USD.
    assert_eq!(spend(&gw, &key), 80_000_000);

    let r = post(
        &gw,
        "/api/gate/v1/images/generations",
        &key,
        &json!({"model": "img", "prompt": "a spider", "n": "3"}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 80_000_000 + 120_000_000);
    let t = traces_on(&gw, &key, "images.generations", 2);
    assert_eq!(t[0].cost_nanos, 80_000_000);
    assert_eq!(t[0].served_model.as_deref(), Some("img"));
    assert!(!t[0].usage_estimated);
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("image"), 2));
    assert_eq!((t[1].unit.as_deref(), t[1].units), (Some("image"), 3));
}

#[test]
fn token_usage_reported_by_an_image_model_is_priced_with_its_token_prices() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "img-tokens", "prompt": "a spider"}),
        &[
            ("x-mock-image-usage", "1"),
            ("x-mock-prompt-tokens", "100"),
            ("x-mock-completion-tokens", "1000"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // 100 x 5 + 1000 x 40 USD per million tokens.
    assert_eq!(spend(&gw, &key), 500_000 + 40_000_000);
    let t = traces_on(&gw, &key, "images.generations", 1);
    assert_eq!((t[0].prompt_tokens, t[0].completion_tokens), (100, 1000));
    // Token-priced: the trace names tokens, not images.
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("token"), 0));
}

#[test]
fn speech_streams_the_audio_through_and_is_charged_per_input_character() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    // 11 Unicode code points (13 bytes).
    let input = "héllo wörld";
    let r = post(
        &gw,
        "/v1/audio/speech",
        &key,
        &json!({"model": "tts", "input": input, "voice": "alloy"}),
        &[("x-mock-chunks", "4")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("audio/mpeg"));
    assert_eq!(r.body, spidergate_mock::speech_audio(input));
    assert_eq!(mock.requests()[0].path, "/v1/audio/speech");
    assert_eq!(
        mock.requests()[0].json().expect("json")["model"],
        "tts-upstream"
    );
    // 11 x 15 USD per million characters.
    assert_eq!(spend(&gw, &key), 165_000);
    let t = traces_on(&gw, &key, "audio.speech", 1);
    assert_eq!(t[0].cost_nanos, 165_000);
    assert!(!t[0].usage_estimated);
}

#[test]
fn a_model_called_on_another_familys_endpoint_is_400_and_nothing_is_forwarded() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let cases = [
        (
            "/v1/images/generations",
            json!({"model": "gpt-4o-mini", "prompt": "x"}),
        ),
        ("/v1/audio/speech", json!({"model": "img", "input": "x"})),
        (
            "/v1/chat/completions",
            json!({"model": "tts", "messages": [{"role": "user", "content": "x"}]}),
        ),
        ("/v1/embeddings", json!({"model": "img", "input": "x"})),
        // A model with no `endpoint` set is a chat model, nothing more.
        (
            "/v1/embeddings",
            json!({"model": "gpt-4o-mini", "input": "x"}),
        ),
    ];
    for (path, body) in cases {
        let r = post(&gw, path, &key, &body, &[]);
        assert_eq!(r.status, 400, "{path}: {}", r.text());
        assert_eq!(r.code(), "invalid_request", "{path}");
    }
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
}

#[test]
fn the_multi_modal_endpoints_need_gate_chat_and_an_allowed_model() {
    let mock = mock();
    let gw = start(&mock);
    let models_only = gw.create_key(&["--scopes", "gate:models"]);
    let chat_only_mini = gw.create_key(&["--models", "gpt-4o-mini"]);
    mock.clear();
    for (path, body) in [
        (
            "/v1/images/generations",
            json!({"model": "img", "prompt": "x"}),
        ),
        ("/v1/audio/speech", json!({"model": "tts", "input": "x"})),
    ] {
        let r = post(&gw, path, &models_only, &body, &[]);
        assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
        let r = post(&gw, path, &chat_only_mini, &body, &[]);
        assert_eq!((r.status, r.code().as_str()), (403, "model_not_allowed"));
    }
    let r = gw.post(
        "/v1/messages/count_tokens",
        &models_only.bearer(),
        json!({"model": "claude", "messages": []})
            .to_string()
            .as_bytes(),
        &[],
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "permission_error");
    assert!(mock.requests().is_empty());
}

#[test]
fn a_hard_budget_reserves_n_images_and_refuses_with_nothing_forwarded() {
    let mock = mock();
    let gw = start(&mock);
    // 0.05 USD: one image (0.04) fits, two (0.08) do not.
    let key = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    mock.clear();
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "img", "prompt": "x", "n": 2}),
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    assert!(mock.requests().is_empty());
    // Speech: 4,000 characters at 15 USD per million = 0.06 USD > 0.05.
    let r = post(
        &gw,
        "/v1/audio/speech",
        &key,
        &json!({"model": "tts", "input": "x".repeat(4_000)}),
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    assert!(mock.requests().is_empty());
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "img", "prompt": "x", "n": "1"}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 40_000_000);
}

#[test]
fn count_tokens_on_an_anthropic_model_is_passed_through_free_and_counted_in_rpm() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&["--rpm", "2"]);
    mock.clear();
    let body = json!({"model": "claude", "messages": [{"role": "user", "content": "hi"}]});
    let r = gw.post(
        "/v1/messages/count_tokens",
        "",
        body.to_string().as_bytes(),
        &[
            ("x-api-key", key.secret.as_str()),
            ("anthropic-version", "2023-06-01"),
            ("x-mock-prompt-tokens", "42"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), json!({"input_tokens": 42}));
    assert_eq!(r.header("x-spidergate-estimated"), None);
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].path, "/v1/messages/count_tokens");
    assert_eq!(sent[0].json().expect("json")["model"], "claude-upstream");
    assert_eq!(sent[0].header("x-api-key"), Some(ANTHROPIC_PROVIDER_KEY));
    let t = traces_on(&gw, &key, "messages.count_tokens", 1);
    assert_eq!((t[0].status, t[0].cost_nanos), (200, 0));
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], 0);
    assert_eq!(usage["requests_this_minute"], 1);
    let r = post(&gw, "/v1/messages/count_tokens", &key, &body, &[]);
    assert_eq!(r.status, 200, "{}", r.text());
    // The third in the minute is over the key's rpm, refused in Anthropic's shape.
    let r = post(&gw, "/v1/messages/count_tokens", &key, &body, &[]);
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");
    assert_eq!(
        r.header("x-spidergate-error-code"),
        Some("rate_limit_exceeded")
    );
}

#[test]
fn count_tokens_on_an_openai_model_is_the_gateways_own_prompt_bound() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let body = json!({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
        .to_string();
    let r = gw.post(
        "/v1/messages/count_tokens",
        &key.bearer(),
        body.as_bytes(),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-estimated"), Some("true"));
    // Every token is at least one byte of the body.
    assert_eq!(r.json(), json!({"input_tokens": body.len()}));
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
    let t = traces_on(&gw, &key, "messages.count_tokens", 1);
    assert_eq!((t[0].status, t[0].cost_nanos), (200, 0));
}

#[test]
fn errors_on_every_messages_path_use_anthropics_shape() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let body = json!({"model": "claude", "messages": []}).to_string();
    let r = gw.post("/v1/messages/count_tokens", "", body.as_bytes(), &[]);
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["type"], "error");
    assert_eq!(r.json()["error"]["type"], "authentication_error");
    let r = gw.post("/v1/messages/batches", &key.bearer(), body.as_bytes(), &[]);
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"]["type"], "not_found_error");
    let r = gw.post(
        "/v1/messages/count_tokens",
        &key.bearer(),
        br#"{"messages": []}"#,
        &[],
    );
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    assert_eq!(r.header("x-spidergate-error-code"), Some("invalid_request"));
}

#[test]
fn a_transcription_reaches_the_upstream_byte_for_byte_but_its_model_and_is_charged_per_minute() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let file = audio_file();
    let body = form(
        &[("model", "whisper"), ("response_format", "verbose_json")],
        &[("file", "speech.mp3", &file)],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let sha: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&file)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    assert_eq!(r.json()["text"], format!("sha256:{sha} bytes:200000"));
    let sent = mock.requests();
    assert_eq!(sent[0].path, "/v1/audio/transcriptions");
    let want = form(
        &[
            ("model", "whisper-upstream-long-name"),
            ("response_format", "verbose_json"),
        ],
        &[("file", "speech.mp3", &file)],
    );
    assert!(
        sent[0].body == want,
        "the upstream body differs beyond its model part"
    );
    // 200,000 bytes at 16,000 a second = 12.5 s = 12,500 ms at 0.006 USD a minute.
    assert_eq!(spend(&gw, &key), 1_250_000);
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert_eq!(t[0].cost_nanos, 1_250_000);
    assert!(!t[0].usage_estimated);
    // The trace names the unit charged (SPEC §4).
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("ms"), 12_500));
}

#[test]
fn a_transcription_without_a_reported_duration_is_charged_its_bound() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "a.mp3", b"short audio")],
    );
    let r = post_form(&gw, "/v1/audio/translations", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().starts_with("sha256:"));
    assert_eq!(mock.requests()[0].path, "/v1/audio/translations");
    // max_audio_seconds: 600 at 0.006 USD a minute.
    assert_eq!(spend(&gw, &key), 60_000_000);
    let t = traces_on(&gw, &key, "audio.translations", 1);
    assert!(t[0].usage_estimated);
}

/// A PCM WAV file: 16 kHz, mono, 16-bit (32,000 bytes a second), `data_len` bytes of audio.
fn wav(data_len: u32) -> Vec<u8> {
    let mut f = b"RIFF".to_vec();
    f.extend_from_slice(&(36 + data_len).to_le_bytes());
    f.extend_from_slice(b"WAVEfmt ");
    f.extend_from_slice(&[16, 0, 0, 0, 1, 0, 1, 0]); // chunk size 16, PCM, mono
    f.extend_from_slice(&16_000u32.to_le_bytes());
    f.extend_from_slice(&32_000u32.to_le_bytes());
    f.extend_from_slice(&[2, 0, 16, 0]);
    f.extend_from_slice(b"data");
    f.extend_from_slice(&data_len.to_le_bytes());
    f.resize(f.len() + data_len as usize, 0x11);
    f
}

/// SPEC §4: a transcription whose format reports no duration is charged the duration read
/// from the file; that duration, not `max_audio_seconds`, is also its reservation, so a hard
/// budget far below the configured bound still admits a short WAV.
#[test]
fn a_wav_transcription_without_a_reported_duration_is_charged_the_files_duration() {
    let mock = mock();
    let gw = start(&mock);
    // 0.001 USD: below the 600 s bound (0.06 USD), above 2 s of audio (0.0002 USD).
    let key = gw.create_key(&["--budget", "0.001", "--budget-mode", "hard"]);
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.wav", &wav(64_000))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // 2 s at 0.006 USD a minute = 0.0002 USD.
    assert_eq!(spend(&gw, &key), 200_000);
    // A file whose container gives no bound is bounded by max_audio_seconds: refused.
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", b"ID3 not read")],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
}

/// SPEC §4: the upstream's reported duration is what a transcription is charged, before
/// the duration read from the file and past the reservation's bound. The mock hears
/// anything but a WAV at 16,000 bytes a second: 200 frames of a 128 kbit/s MP3 are 5.2125 s
/// to it and 5.2245 s by their frames; 100 KB the gateway cannot read are 6.25 s, past a
/// 5 s `max_audio_seconds`.
#[test]
fn a_reported_duration_is_charged_as_reported_not_as_the_file_says() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(MODELS_YAML)
        .server("max_audio_seconds: 5")
        .start();
    let key = gw.create_key(&[]);
    let mut spent = 0;
    for (file, want_ms) in [(mp3(200), 5_213), (vec![0x42; 100_000], 6_250)] {
        let body = form(
            &[("model", "whisper"), ("response_format", "verbose_json")],
            &[("file", "speech.mp3", &file)],
        );
        let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
        assert_eq!(r.status, 200, "{}", r.text());
        let reported = r.json()["duration"].as_f64().expect("duration");
        assert_eq!((reported * 1000.0).ceil() as i64, want_ms);
        // 100 nano-USD a millisecond.
        spent += want_ms * 100;
        assert_eq!(spend(&gw, &key), spent);
    }
    let t = traces_on(&gw, &key, "audio.transcriptions", 2);
    let mut units: Vec<_> = t.iter().map(|t| (t.units, t.usage_estimated)).collect();
    units.sort();
    assert_eq!(units, [(5_213, false), (6_250, false)]);
}

/// SPEC §2: a hard budget is never overshot, and a `max_usd_per_hour` counts reservations
/// (§7). A file whose length the gateway cannot read is reserved `max_audio_seconds`; under
/// either cap it is charged at most that, however long the upstream says it was (a key
/// without one is charged as reported: the test above).
#[test]
fn a_capped_keys_transcription_is_charged_at_most_its_reservation() {
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .models(MODELS_YAML)
        .server("max_audio_seconds: 5")
        .start();
    // 6.25 s to the mock (16,000 bytes a second), past the 5 s bound.
    let unreadable = vec![0x42; 100_000];
    let caps: [&[&str]; 2] = [
        &["--budget", "0.001", "--budget-mode", "hard"],
        &["--max-usd-per-hour", "0.001"],
    ];
    for cap in caps {
        let key = gw.create_key(cap);
        let body = form(
            &[("model", "whisper"), ("response_format", "verbose_json")],
            &[("file", "speech.ogg", &unreadable)],
        );
        let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
        assert_eq!(r.status, 200, "{cap:?}: {}", r.text());
        assert_eq!(r.json()["duration"].as_f64(), Some(6.25));
        // 5 s at 100 nano-USD a millisecond, not 6.25 s.
        assert_eq!(spend(&gw, &key), 500_000, "{cap:?}");
        let t = traces_on(&gw, &key, "audio.transcriptions", 1);
        assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("ms"), 5_000));
        assert!(t[0].usage_estimated, "the bound, not what was reported");
    }
}

/// SPEC §4: images at `usd_per_image`, token prices only "where the upstream reports token
/// usage instead (token-priced image models)". gpt-image-1's `stream: true` answer reports
/// tokens and counts no images: on a model priced per image it is charged its `n` images,
/// never the $0 its missing token prices would give.
#[test]
fn a_streamed_image_reporting_only_tokens_is_charged_per_image_on_a_unit_priced_model() {
    let events = concat!(
        "event: image_generation.partial_image\n",
        "data: {\"type\":\"image_generation.partial_image\",\"b64_json\":\"AAAA\",\"partial_image_index\":0}\n\n",
        "event: image_generation.completed\n",
        "data: {\"type\":\"image_generation.completed\",\"b64_json\":\"AAAA\",",
        "\"usage\":{\"input_tokens\":100,\"output_tokens\":4272,\"total_tokens\":4372}}\n\n",
    );
    let upstream = canned_upstream(http_reply("200 OK", "text/event-stream", events));
    // A JSON answer that returned no image: none charged (per image returned).
    let none = r#"{"created":1,"data":[]}"#;
    let empty = canned_upstream(http_reply("200 OK", "application/json", none));
    let mock = mock();
    let gw = GatewayBuilder::new(&mock)
        .provider(&format!(
            "  - name: canned\n    kind: openai\n    base_url: \"http://{upstream}/v1\"\n"
        ))
        .provider(&format!(
            "  - name: empty\n    kind: openai\n    base_url: \"http://{empty}/v1\"\n"
        ))
        .models(&MODELS_YAML.replacen(
            "models:\n",
            "models:\n  - id: simg\n    provider: canned\n    upstream_id: gpt-image-1\n    endpoint: images\n    usd_per_image: 0.04\n  - id: nimg\n    provider: empty\n    endpoint: images\n    usd_per_image: 0.04\n",
            1,
        ))
        .start();
    let key = gw.create_key(&[]);
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "nimg", "prompt": "a cat", "n": 2}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 0);
    let key = gw.create_key(&["--budget", "1", "--budget-mode", "hard"]);
    let r = post(
        &gw,
        "/v1/images/generations",
        &key,
        &json!({"model": "simg", "prompt": "a cat", "n": 2, "stream": true}),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.text().contains("image_generation.completed"));
    assert_eq!(spend(&gw, &key), 80_000_000);
    let t = traces_on(&gw, &key, "images.generations", 1);
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("image"), 2));
}

/// SPEC §4: a model priced both ways is charged its unit price unless the upstream reports
/// token usage: speech its characters, a transcription in a format without usage the
/// duration read from its file; with token usage reported, the token prices.
#[test]
fn a_model_with_unit_and_token_prices_is_charged_units_without_token_usage() {
    let mock = mock();
    let gw = start_with(
        &mock,
        "  - id: tts-both\n    provider: mock\n    endpoint: speech\n    usd_per_mchar: 15\n    input_usd_per_mtok: 1\n    output_usd_per_mtok: 1\n    max_output_tokens: 2000\n  - id: whisper-both\n    provider: mock\n    endpoint: transcriptions\n    usd_per_minute: 0.006\n    input_usd_per_mtok: 6\n    output_usd_per_mtok: 10\n    max_output_tokens: 2000\n",
    );
    let key = gw.create_key(&[]);
    let r = post(
        &gw,
        "/v1/audio/speech",
        &key,
        &json!({"model": "tts-both", "input": "abc", "voice": "alloy"}),
        &[],
    );
    assert_eq!(r.status, 200);
    // 3 characters at 15 USD a million.
    assert_eq!(spend(&gw, &key), 45_000);
    let body = form(
        &[("model", "whisper-both"), ("response_format", "json")],
        &[("file", "speech.wav", &wav(64_000))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // 2 s read from the WAV at 0.006 USD a minute.
    assert_eq!(spend(&gw, &key), 45_000 + 200_000);
    let r = post_form_with(
        &gw,
        "/v1/audio/transcriptions",
        &key,
        &body,
        &[
            ("x-mock-audio-usage", "tokens"),
            ("x-mock-prompt-tokens", "100"),
            ("x-mock-completion-tokens", "10"),
        ],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // 100 x 6 + 10 x 10 USD per million tokens.
    assert_eq!(spend(&gw, &key), 45_000 + 200_000 + 600_000 + 100_000);
    // A model priced only in tokens whose answer reports none: its token bound, never
    // zero (every byte of the form an input token, `max_output_tokens` out).
    let spent = spend(&gw, &key);
    let body = form(
        &[("model", "transcribe"), ("response_format", "json")],
        &[("file", "speech.wav", &wav(64_000))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let bound = body.len() as i64 * 6_000 + 2_000 * 10_000;
    assert_eq!(spend(&gw, &key), spent + bound);
    let t = traces_on(&gw, &key, "audio.transcriptions", 3);
    assert!(t.iter().any(|t| t.usage_estimated && t.cost_nanos == bound));
}

/// SPEC §2: a speech answer the upstream cut is charged its characters (what the provider
/// bills), and the trace says the charge was not reported.
#[test]
fn speech_cut_by_the_upstream_is_charged_its_characters_marked_estimated() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let bearer = key.bearer();
    let body = json!({"model": "tts", "input": "hello", "voice": "alloy"}).to_string();
    let stream = send_request(
        gw.addr,
        "POST",
        "/v1/audio/speech",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", "application/json"),
            ("x-mock-break-after", "1"),
        ],
        body.as_bytes(),
    )
    .expect("send");
    let (status, _, mut reader) = read_stream_head(stream).expect("head");
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    let t = traces_on(&gw, &key, "audio.speech", 1);
    assert_eq!(t[0].error_code.as_deref(), Some("upstream_stream_broken"));
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("char"), 5));
    assert!(t[0].usage_estimated);
    // 5 characters at 15 USD a million.
    assert_eq!(spend(&gw, &key), 75_000);
}

/// An MP3: MPEG-1 Layer III frames at 128 kbit/s and 44.1 kHz (417 bytes, 1,152 samples
/// each), `frames` of them.
fn mp3(frames: usize) -> Vec<u8> {
    let mut frame = vec![0xFF, 0xFB, 0x90, 0x00];
    frame.resize(417, 0x55);
    frame.repeat(frames)
}

/// SPEC §4: an MP3's frames bound its duration (the sum of theirs), so a format without a
/// reported duration is charged that, and a hard budget below `max_audio_seconds` admits
/// it; bytes between frames that could hide more audio make the file unknown again.
#[test]
fn an_mp3_transcription_without_a_reported_duration_is_charged_the_sum_of_its_frames() {
    let mock = mock();
    let gw = start(&mock);
    // 0.001 USD: below the 600 s bound (0.06 USD), above 5.2 s of audio.
    let key = gw.create_key(&["--budget", "0.001", "--budget-mode", "hard"]);
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", &mp3(200))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // 200 x 1,152 / 44,100 s = 5,224.5 ms, rounded up, at 100 nano-USD a ms.
    assert_eq!(spend(&gw, &key), 522_500);
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("ms"), 5_225));
    // The same frames with 8 KiB of something else between them: no bound but the
    // configured one, which the budget cannot hold.
    let mut crafted = mp3(100);
    crafted.extend(vec![0u8; 8192]);
    crafted.extend(mp3(100));
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", &crafted)],
    );
    mock.clear();
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    assert!(mock.requests().is_empty());
}

#[test]
fn image_edits_are_charged_per_image_with_n_as_a_form_string() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let png = spidergate_mock::PNG_B64.as_bytes();
    let body = form(
        &[("model", "img"), ("prompt", "add a hat"), ("n", "2")],
        &[("image[]", "a.png", png), ("mask", "m.png", png)],
    );
    let r = post_form(&gw, "/v1/images/edits", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    assert_eq!(mock.requests()[0].path, "/v1/images/edits");
    assert_eq!(spend(&gw, &key), 80_000_000);
}

/// An edit's input images say nothing about their tokens in their bytes (a 70-byte PNG is
/// still an image): on a token-priced image model each one is reserved
/// `media_part_tokens`, so a hard budget that holds one input cannot be spent on two.
#[test]
fn each_input_of_an_image_edit_is_reserved_its_media_part_tokens() {
    let mock = mock();
    let gw = start(&mock);
    // One input: (body + 25,000) tokens at 5 USD/M plus 5,000 at 40 USD/M, about 0.33 USD.
    // Two inputs: about 0.45 USD.
    let key = gw.create_key(&["--budget", "0.40", "--budget-mode", "hard"]);
    mock.clear();
    let png = spidergate_mock::PNG_B64.as_bytes();
    let two = form(
        &[("model", "img-tokens"), ("prompt", "add a hat")],
        &[("image[]", "a.png", png), ("image[]", "b.png", png)],
    );
    let r = post_form(&gw, "/v1/images/edits", &key, &two);
    assert_eq!(
        (r.status, r.code().as_str()),
        (402, "budget_exceeded"),
        "{}",
        r.text()
    );
    assert!(mock.requests().is_empty());
    // A mask is an input too; an image without a filename, named `image`, as well.
    let mut masked = form(
        &[("model", "img-tokens"), ("prompt", "add a hat")],
        &[("mask", "m.png", png)],
    );
    let close = format!("--{BOUNDARY}--\r\n");
    masked.truncate(masked.len() - close.len());
    masked.extend_from_slice(
        format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\nxyz\r\n{close}"
        )
        .as_bytes(),
    );
    let r = post_form(&gw, "/v1/images/edits", &key, &masked);
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    assert!(mock.requests().is_empty());
    let one = form(
        &[("model", "img-tokens"), ("prompt", "add a hat")],
        &[("image[]", "a.png", png)],
    );
    let reported = [
        ("x-mock-image-usage", "1"),
        ("x-mock-prompt-tokens", "100"),
        ("x-mock-completion-tokens", "1000"),
    ];
    let r = post_form_with(&gw, "/v1/images/edits", &key, &one, &reported);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(mock.requests().len(), 1);
    // 100 x 5 + 1,000 x 40 USD per million tokens.
    assert_eq!(spend(&gw, &key), 500_000 + 40_000_000);
    // Without its token usage the answer is charged its bound, never zero: every byte of
    // the form and the input's tokens, and the output cap.
    let r = post_form(&gw, "/v1/images/edits", &key, &one);
    assert_eq!(r.status, 200, "{}", r.text());
    let bound = (one.len() as i64 + 25_000) * 5_000 + 5_000 * 40_000;
    assert_eq!(spend(&gw, &key), 40_500_000 + bound);
    // Two refusals and two answers.
    let t = traces_on(&gw, &key, "images.edits", 4);
    assert!(t
        .iter()
        .any(|t| t.usage_estimated && t.prompt_tokens == one.len() as i64 + 25_000));
}

/// An edit takes at most 16 images and a mask: more is refused before anything goes, held
/// or forwarded as it arrives (where the 18th input stops the upload), so the reservation
/// of a form whose later parts are not read yet can count 17.
#[test]
fn an_image_edit_with_more_than_sixteen_images_and_a_mask_is_refused() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let png = spidergate_mock::PNG_B64.as_bytes();
    let inputs = |k: usize| -> Vec<(&str, &str, &[u8])> {
        (0..k).map(|_| ("image[]", "a.png", png)).collect()
    };
    let fields = [("model", "img"), ("prompt", "add a hat")];
    let r = post_form(&gw, "/v1/images/edits", &key, &form(&fields, &inputs(18)));
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert!(mock.requests().is_empty());
    let r = post_form(&gw, "/v1/images/edits", &key, &form(&fields, &inputs(17)));
    assert_eq!(r.status, 200, "{}", r.text());
    mock.clear();
    // A large form: its opening is admitted before the later inputs arrive.
    let image = large_file();
    let mut files = vec![("image[]", "big.png", image.as_slice())];
    files.extend(inputs(17));
    let r = post_form(&gw, "/v1/images/edits", &key, &form(&fields, &files));
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert!(
        mock.requests().is_empty(),
        "the upstream never got a whole form"
    );
    assert_eq!(
        spend(&gw, &key),
        40_000_000,
        "only the 17-input edit is charged"
    );
}

/// The parts whose values price a form are read once: a second `n`, `response_format` or
/// `file` (the upstream may take either; the bound would be the other's) is refused
/// before anything goes, and the first `n` of a form is not given a second chance.
#[test]
fn a_part_that_prices_a_form_given_twice_is_refused() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let png = spidergate_mock::PNG_B64.as_bytes();
    let wav = wav(32_000);
    let bodies = [
        (
            "/v1/images/edits",
            form(
                &[("model", "img"), ("n", "1"), ("n", "10")],
                &[("image[]", "a.png", png)],
            ),
        ),
        (
            "/v1/audio/transcriptions",
            form(
                &[
                    ("model", "whisper"),
                    ("response_format", "text"),
                    ("response_format", "json"),
                ],
                &[("file", "a.wav", &wav)],
            ),
        ),
        (
            "/v1/audio/translations",
            form(
                &[("model", "whisper")],
                &[("file", "a.wav", &wav), ("file", "b.mp3", &mp3(200))],
            ),
        ),
    ];
    for (path, body) in &bodies {
        let r = post_form(&gw, path, &key, body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{path}: {}",
            r.text()
        );
        assert!(r.text().contains("given twice"), "{}", r.text());
    }
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
}

#[test]
fn a_malformed_multipart_body_is_400_and_reaches_nothing() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let good = form(&[("model", "whisper")], &[("file", "a.mp3", b"abc")]);
    let cut = &good[..good.len() - 12];
    let no_model = form(&[], &[("file", "a.mp3", b"abc")]);
    for body in [cut, b"not a form".as_slice(), &no_model] {
        let r = post_form(&gw, "/v1/audio/transcriptions", &key, body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{}",
            r.text()
        );
    }
    // JSON where a form is expected.
    let r = gw.post(
        "/v1/images/edits",
        &key.bearer(),
        br#"{"model":"img","prompt":"x"}"#,
        &[],
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    // Another family's model in a well-formed form.
    let r = post_form(
        &gw,
        "/v1/audio/transcriptions",
        &key,
        &form(&[("model", "img")], &[("file", "a.mp3", b"abc")]),
    );
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
}

/// SPEC §2 and §4: the reservation bounds the form the upstream reads, so a form that reads
/// two ways is refused. A black-box audit got ten images (and a model off the allow-list)
/// past a hard cap with a second `boundary` (the gateway read the first, Starlette the
/// last) and with a part named twice (`name="x"; name="n"`: n=10 to Starlette).
#[test]
fn a_form_that_reads_two_ways_is_400_and_reaches_nothing() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    mock.clear();
    let bearer = key.bearer();
    let plain = form(
        &[("model", "img"), ("prompt", "x")],
        &[("image", "a.png", b"png")],
    );
    let named_twice = {
        let mut b = plain.clone();
        b.truncate(b.len() - format!("--{BOUNDARY}--\r\n").len());
        b.extend_from_slice(
            format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"x\"; name=\"n\"\r\n\r\n10\r\n--{BOUNDARY}--\r\n")
                .as_bytes(),
        );
        b
    };
    let one = format!("multipart/form-data; boundary={BOUNDARY}");
    let two = format!("multipart/form-data; boundary={BOUNDARY}; boundary=Other");
    for (content_types, body) in [
        (vec![one.as_str()], &named_twice),
        (vec![two.as_str()], &plain),
        (
            vec![one.as_str(), "multipart/form-data; boundary=Other"],
            &plain,
        ),
    ] {
        let mut headers = vec![("Authorization", bearer.as_str())];
        headers.extend(content_types.iter().map(|ct| ("Content-Type", *ct)));
        let r = http(gw.addr, "POST", "/v1/images/edits", &headers, body).expect("POST");
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{content_types:?}: {}",
            r.text()
        );
    }
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 0);
    // The same form without the second name or boundary is served.
    let r = post_form(&gw, "/v1/images/edits", &key, &plain);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn a_hard_budget_reserves_the_audio_duration_bound() {
    let mock = mock();
    let gw = start(&mock);
    // 0.05 USD < 600 s at 0.006 USD a minute (0.06).
    let key = gw.create_key(&["--budget", "0.05", "--budget-mode", "hard"]);
    let models_only = gw.create_key(&["--scopes", "gate:models"]);
    mock.clear();
    let body = form(&[("model", "whisper")], &[("file", "a.mp3", b"abc")]);
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!((r.status, r.code().as_str()), (402, "budget_exceeded"));
    let r = post_form(&gw, "/v1/audio/transcriptions", &models_only, &body);
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
    assert!(mock.requests().is_empty());
}

#[test]
fn concurrent_image_requests_never_bill_past_a_hard_cap() {
    let mock = mock();
    let gw = start(&mock);
    // 0.10 USD: two images of 0.04 fit, a third does not, however many race.
    let key = gw.create_key(&["--budget", "0.10", "--budget-mode", "hard"]);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..12)
            .map(|_| {
                s.spawn(|| {
                    post(
                        &gw,
                        "/v1/images/generations",
                        &key,
                        &json!({"model": "img", "prompt": "x", "n": 1}),
                        &[("x-mock-delay-ms", "100")],
                    )
                    .status
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    let ok = statuses.iter().filter(|&&s| s == 200).count() as i64;
    assert!(
        statuses.iter().all(|&s| s == 200 || s == 402),
        "{statuses:?}"
    );
    assert_eq!(ok, 2, "{statuses:?}");
    assert_eq!(mock.requests().len(), 2);
    let billed = spend(&gw, &key);
    assert_eq!(billed, ok * 40_000_000);
    assert!(billed <= 100_000_000);
}

/// The JSON of every `data:` event of an SSE body.
fn sse_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .split("\n\n")
        .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
        .map(|d| serde_json::from_str(d).expect("event JSON"))
        .collect()
}

/// SPEC §3, §4: a streamed transcription (`stream=true`) passes through as it arrives (the
/// first delta reaches the client while the upstream holds the rest) and is charged from the
/// usage of its `transcript.text.done` event: tokens at the model's token prices, or the
/// seconds of audio of a per-minute model.
#[test]
fn a_streamed_transcription_passes_through_and_is_charged_from_its_final_usage() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let file = audio_file();
    let body = form(
        &[("model", "transcribe"), ("stream", "true")],
        &[("file", "speech.mp3", &file)],
    );
    let bearer = key.bearer();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let stream = send_request(
        gw.addr,
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", ct.as_str()),
            ("x-mock-prompt-tokens", "1250"),
            ("x-mock-completion-tokens", "40"),
            ("x-mock-hold", "transcript"),
        ],
        &body,
    )
    .expect("send");
    let (status, headers, mut reader) = read_stream_head(stream).expect("head");
    assert_eq!(status, 200);
    let ct = headers.iter().find(|(k, _)| k == "content-type");
    assert!(
        ct.is_some_and(|(_, v)| v.starts_with("text/event-stream")),
        "{headers:?}"
    );
    // The first delta is here while the mock holds the second one: nothing was buffered.
    let first = read_first_event(&mut reader);
    assert!(first.contains("\"transcript.text.delta\""), "{first}");
    // The mock registers its hold just after sending the first event: wait for it.
    wait_for(std::time::Duration::from_secs(5), "the mock's hold", || {
        (mock.held("transcript") == 1).then_some(())
    });
    mock.release("transcript");
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut reader, &mut rest).expect("rest");
    let events = sse_events(&rest);
    let text = format!("sha256:{} bytes:200000", sha256_hex(&file));
    let done = events.last().expect("events");
    assert_eq!(done["type"], "transcript.text.done");
    assert_eq!(done["text"], text.as_str());
    // The usage reaches the client as the provider sent it.
    assert_eq!(done["usage"]["input_tokens"], 1250);
    assert_eq!(done["usage"]["input_token_details"]["audio_tokens"], 1250);
    assert_eq!(done["usage"]["output_tokens"], 40);
    // The upstream got the form as sent, `stream` part included.
    let sent = mock.requests();
    assert_eq!(sent[0].path, "/v1/audio/transcriptions");
    assert!(sent[0].body == body, "the upstream body differs");
    assert_eq!(mock.served_usage(), (1250, 40));
    // 1,250 x 6,000 + 40 x 10,000 nano-USD.
    assert_eq!(spend(&gw, &key), 7_900_000);
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert_eq!((t[0].cost_nanos, t[0].usage_estimated), (7_900_000, false));
    assert_eq!((t[0].prompt_tokens, t[0].completion_tokens), (1250, 40));
    assert_eq!(t[0].unit.as_deref(), Some("token"));

    // A per-minute model whose stream reports seconds of audio: 200,000 bytes are 12.5 s,
    // reported as 13 s: 13,000 ms at 0.006 USD a minute.
    let key = gw.create_key(&[]);
    let body = form(
        &[("model", "whisper"), ("stream", "true")],
        &[("file", "speech.mp3", &file)],
    );
    let r = post_form_with(
        &gw,
        "/v1/audio/transcriptions",
        &key,
        &body,
        &[("x-mock-audio-usage", "duration")],
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        sse_events(&r.body).last().expect("done")["usage"]["seconds"],
        13
    );
    assert_eq!(spend(&gw, &key), 1_300_000);
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert!(!t[0].usage_estimated);
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("ms"), 13_000));
}

/// SPEC §4: a streamed transcription cut before its usage is charged an estimate never below
/// what the provider bills: the prompt's bound (the body's bytes, at least its audio tokens)
/// and one token per byte of the text delivered so far, marked estimated.
#[test]
fn a_streamed_transcription_cut_before_its_usage_is_charged_the_prompt_bound_and_the_text_so_far() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let file = audio_file();
    let body = form(
        &[("model", "transcribe"), ("stream", "true")],
        &[("file", "speech.mp3", &file)],
    );
    let bearer = key.bearer();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let stream = send_request(
        gw.addr,
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", ct.as_str()),
            ("x-mock-prompt-tokens", "bytes"),
            ("x-mock-chunks", "3"),
            ("x-mock-break-after", "1"),
        ],
        &body,
    )
    .expect("send");
    let (status, _, mut reader) = read_stream_head(stream).expect("head");
    assert_eq!(status, 200);
    let mut rest = Vec::new();
    let _ = std::io::Read::read_to_end(&mut reader, &mut rest);
    let text = String::from_utf8_lossy(&rest);
    // The text (84 bytes) comes in 3 deltas of 28: one arrived before the break.
    assert_eq!(text.matches("transcript.text.delta").count(), 1, "{text}");
    assert!(!text.contains("transcript.text.done"), "{text}");
    let prompt = body.len() as i64;
    let want = prompt * 6_000 + 28 * 10_000;
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert_eq!(t[0].error_code.as_deref(), Some("upstream_stream_broken"));
    assert!(t[0].usage_estimated);
    assert_eq!((t[0].prompt_tokens, t[0].completion_tokens), (prompt, 28));
    assert_eq!(t[0].cost_nanos, want);
    assert_eq!(spend(&gw, &key), want);
    // The provider bills at most the body it received as input (`x-mock-prompt-tokens:
    // bytes`: every byte a token), and the 28 bytes of text it had sent as output.
    assert!(mock.requests()[0].body.len() as i64 <= prompt);
}

// ---- Large forms, forwarded as they arrive (SPEC §3, §4; `server.multipart_hold_bytes`,
// 1 MiB by default: every form below is larger, and goes upstream while it is read).

/// 3 MB that are not text and hold, again and again, every opening of the delimiter
/// (`\r`, `\r\n`, `\r\n-`, ... `\r\n--sgBoundary7MA4YWx`) without ever completing it.
fn large_file() -> Vec<u8> {
    let delim = format!("\r\n--{BOUNDARY}");
    let mut f = Vec::with_capacity(3_000_000);
    let mut i = 0u32;
    while f.len() < 3_000_000 {
        let cut = 1 + (i as usize % (delim.len() - 1));
        f.extend_from_slice(&delim.as_bytes()[..cut]);
        f.push(0);
        f.extend((0..97u32).map(|j| (i.wrapping_add(j).wrapping_mul(2_654_435_761) >> 13) as u8));
        i += 1;
    }
    f.truncate(3_000_000);
    f
}

/// Sends `body` with a declared length of `declared` bytes and returns the open connection.
fn send_form(gw: &Gateway, key: &Key, declared: usize, body: &[u8]) -> std::net::TcpStream {
    let bearer = key.bearer();
    let ct = format!("multipart/form-data; boundary={BOUNDARY}");
    let len = declared.to_string();
    send_request(
        gw.addr,
        "POST",
        "/v1/audio/transcriptions",
        &[
            ("Authorization", bearer.as_str()),
            ("Content-Type", ct.as_str()),
            ("Content-Length", len.as_str()),
        ],
        body,
    )
    .expect("send")
}

#[test]
fn a_large_form_streams_to_the_upstream_byte_for_byte_with_only_its_model_rewritten() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let file = large_file();
    let body = form(
        &[("model", "whisper"), ("response_format", "verbose_json")],
        &[("file", "speech.mp3", &file)],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["text"],
        format!("sha256:{} bytes:3000000", sha256_hex(&file))
    );
    let sent = mock.requests();
    let want = form(
        &[
            ("model", "whisper-upstream-long-name"),
            ("response_format", "verbose_json"),
        ],
        &[("file", "speech.mp3", &file)],
    );
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0].header("content-length"),
        Some(want.len().to_string().as_str())
    );
    assert!(
        sent[0].body == want,
        "the upstream body differs beyond its model part"
    );
    // The reported 187.5 s (3,000,000 bytes at 16,000 a second) at 0.006 USD a minute.
    assert_eq!(spend(&gw, &key), 18_750_000);

    // A large MP3 whose format reports no duration: charged the sum of its frames, read
    // as the file went by. 3,000 frames x 1,152 / 44,100 s = 78,367.35 ms.
    let mp3 = mp3(3_000);
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", &mp3)],
    );
    let r = post_form(&gw, "/v1/audio/translations", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.text().trim_end(),
        format!("sha256:{} bytes:{}", sha256_hex(&mp3), mp3.len())
    );
    assert_eq!(spend(&gw, &key), 18_750_000 + 7_836_800);
    let t = traces_on(&gw, &key, "audio.translations", 1);
    assert_eq!((t[0].unit.as_deref(), t[0].units), (Some("ms"), 78_368));
}

/// SPEC §4: the file of a form forwarded as it arrives cannot be walked before it goes,
/// so a hard budget reserves `max_audio_seconds` for it (a WAV's header still bounds it);
/// a key too poor for that is refused before any byte reaches the upstream. A small form
/// with the same frames is held, walked, and admitted on its precise bound.
#[test]
fn a_large_form_on_a_hard_budget_reserves_max_audio_seconds_and_refuses_with_nothing_forwarded() {
    let mock = mock();
    let gw = start(&mock);
    // 0.01 USD: below the 600 s bound (0.06 USD), above the 78.4 s of the MP3 below.
    let key = gw.create_key(&["--budget", "0.01", "--budget-mode", "hard"]);
    mock.clear();
    let connections = mock.connections();
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", &mp3(3_000))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(
        (r.status, r.code().as_str()),
        (402, "budget_exceeded"),
        "{}",
        r.text()
    );
    assert!(mock.requests().is_empty());
    assert_eq!(mock.connections(), connections, "not even a connection");
    assert_eq!(spend(&gw, &key), 0);
    // Under the hold threshold, the same frames are walked before forwarding.
    let small = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.mp3", &mp3(200))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &small);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 522_500);
    // A large WAV: its header bounds it (62.5 s, 0.00625 USD) before it goes.
    let big_wav = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.wav", &wav(2_000_000))],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &big_wav);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 522_500 + 6_250_000);
}

/// A large form's opening ends after its `model` part only once a file under way has shown
/// its head: a WAV header that arrives in a later piece still bounds the reservation.
#[test]
fn a_large_wavs_header_in_a_later_piece_than_its_model_still_bounds_its_reservation() {
    let mock = mock();
    let gw = start(&mock);
    // 0.01 USD: below the 600 s of `max_audio_seconds` (0.06 USD), above the WAV's 62.5 s.
    let key = gw.create_key(&["--budget", "0.01", "--budget-mode", "hard"]);
    mock.clear();
    let body = form(
        &[("model", "whisper"), ("response_format", "text")],
        &[("file", "speech.wav", &wav(2_000_000))],
    );
    // Up to the file's fifth byte (`RIFF` and one more), then, a moment later, the rest.
    let cut = body.windows(4).position(|w| w == b"RIFF").expect("the WAV") + 5;
    let mut conn = send_form(&gw, &key, body.len(), &body[..cut]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(mock.requests().is_empty(), "not decided on the model alone");
    std::io::Write::write_all(&mut conn, &body[cut..]).expect("send the rest");
    let r = read_response(conn).expect("the answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(spend(&gw, &key), 6_250_000);
}

/// Loop detection sees a large form by its opening and its length: the same upload again
/// is a repeat, one that opens alike but is longer is another request.
#[test]
fn a_large_upload_repeated_is_a_loop_and_a_longer_one_that_opens_alike_is_not() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&["--loop-limit", "1"]);
    let file = large_file();
    let upload = |len: usize| {
        let body = form(
            &[("model", "whisper"), ("response_format", "verbose_json")],
            &[("file", "speech.mp3", &file[..len])],
        );
        post_form(&gw, "/v1/audio/transcriptions", &key, &body)
    };
    assert_eq!(upload(2_000_000).status, 200);
    assert_eq!(
        upload(2_500_000).status,
        200,
        "same opening, another length"
    );
    let r = upload(2_000_000);
    assert_eq!(
        (r.status, r.code().as_str()),
        (429, "loop_detected"),
        "{}",
        r.text()
    );
}

/// An opening longer than what Pingora keeps for a retry (64 KiB: here a 100 KB part
/// before `model`) goes upstream in front of the first piece after it, byte for byte.
#[test]
fn a_large_form_whose_opening_outgrows_the_retry_buffer_reaches_the_upstream_whole() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let prompt: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let file = large_file();
    let fields = |model| {
        [
            ("prompt", prompt.as_str()),
            ("model", model),
            ("response_format", "verbose_json"),
        ]
    };
    let body = form(&fields("whisper"), &[("file", "speech.mp3", &file)]);
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    let want = form(
        &fields("whisper-upstream-long-name"),
        &[("file", "speech.mp3", &file)],
    );
    let sent = mock.requests();
    assert_eq!(sent.len(), 1);
    assert!(
        sent[0].body == want,
        "the upstream body differs beyond its model part"
    );
    assert_eq!(spend(&gw, &key), 18_750_000);
}

#[test]
fn a_large_form_for_the_wrong_family_or_a_model_not_allowed_reaches_nothing() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    let models_only = gw.create_key(&["--scopes", "gate:models"]);
    let mini_only = gw.create_key(&["--models", "gpt-4o-mini"]);
    mock.clear();
    let connections = mock.connections();
    let file = large_file();
    let wrong_family = form(&[("model", "img")], &[("file", "a.mp3", &file)]);
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &wrong_family);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    let whisper = form(&[("model", "whisper")], &[("file", "a.mp3", &file)]);
    let r = post_form(&gw, "/v1/audio/transcriptions", &mini_only, &whisper);
    assert_eq!((r.status, r.code().as_str()), (403, "model_not_allowed"));
    // Refused before any of the body is read: answered at once, and the connection closed
    // with the body unread (Pingora keeps no connection whose request body it did not
    // read), so a client still sending may be cut off mid-body; the answer came first.
    let mut conn = send_form(&gw, &models_only, whisper.len(), &[]);
    if let Err(e) = std::io::Write::write_all(&mut conn, &whisper) {
        assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
            ),
            "{e}"
        );
    }
    let r = read_response(conn).expect("the answer");
    assert_eq!((r.status, r.code().as_str()), (403, "insufficient_scope"));
    assert!(mock.requests().is_empty());
    assert_eq!(mock.connections(), connections);
    assert_eq!(spend(&gw, &key), 0);
}

/// SPEC §3: what can be judged before forwarding is 400 with nothing forwarded; a form
/// found malformed only later is cut short upstream (the provider never receives a whole
/// form), answered 400, and charged nothing.
#[test]
fn a_large_malformed_form_is_400_and_the_upstream_never_receives_a_whole_form() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let connections = mock.connections();
    let file = large_file();
    // No `model` part at all (read to the end to find out), and a part with no name early.
    let no_model = form(&[("response_format", "text")], &[("file", "a.mp3", &file)]);
    let mut nameless = form(&[("model", "whisper")], &[("file", "a.mp3", &file)]);
    let at = nameless
        .windows(10)
        .position(|w| w == b"name=\"file")
        .expect("file part");
    nameless[at..at + 4].copy_from_slice(b"nope");
    for body in [&no_model, &nameless] {
        let r = post_form(&gw, "/v1/audio/transcriptions", &key, body);
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "invalid_request"),
            "{}",
            r.text()
        );
    }
    assert_eq!(mock.connections(), connections, "nothing forwarded");
    // Malformed in the middle (a part without a name after 2 MB of file): the part of the
    // form before it went upstream, the rest never does; the client, still sending, gets
    // the 400 (the rest of its body is read and dropped).
    let mut middle = form(&[("model", "whisper")], &[("file", "a.mp3", &file)]);
    let bad_part = format!("\r\n--{BOUNDARY}\r\nContent-Type: x\r\n\r\n");
    middle.splice(2_000_000..2_000_000, bad_part.bytes());
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &middle);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    // The mock counts a connection when its accept loop gets to it, which may be a moment
    // after the gateway answered.
    wait_for(
        std::time::Duration::from_secs(10),
        "it was on its way",
        || (mock.connections() > connections).then_some(()),
    );
    assert!(
        mock.requests().is_empty(),
        "the upstream never got a whole form"
    );
    // Malformed at its very end (no closing delimiter): only known once most of it went.
    let whole = form(&[("model", "whisper")], &[("file", "a.mp3", &file)]);
    let cut = &whole[..whole.len() - 12];
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, cut);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert!(r.json()["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("multipart"));
    // The mock counts a connection when its accept loop gets to it, which may be a moment
    // after the gateway answered.
    wait_for(
        std::time::Duration::from_secs(10),
        "it was on its way",
        || (mock.connections() > connections).then_some(()),
    );
    assert!(
        mock.requests().is_empty(),
        "the upstream never got a whole form"
    );
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], 0);
    assert_eq!(usage["reserved_usd"].as_f64(), Some(0.0));
}

#[test]
fn a_client_that_hangs_up_mid_upload_leaves_no_hold_and_no_spend() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&[]);
    mock.clear();
    let connections = mock.connections();
    let whole = form(&[("model", "whisper")], &[("file", "a.mp3", &large_file())]);
    // Two thirds of the form, then the client is gone.
    let stream = send_form(&gw, &key, whole.len(), &whole[..2_000_000]);
    wait_for(
        std::time::Duration::from_secs(10),
        "the upload to start upstream",
        || (mock.connections() > connections).then_some(()),
    );
    drop(stream);
    let t = traces_on(&gw, &key, "audio.transcriptions", 1);
    assert_eq!(t[0].status, 499);
    assert_eq!(t[0].cost_nanos, 0);
    assert!(mock.requests().is_empty());
    let usage = gw.usage(&key);
    assert_eq!(usage["spend_nanodollars"], 0);
    assert_eq!(usage["reserved_usd"].as_f64(), Some(0.0));
    assert_eq!(usage["requests_in_flight"], 0);
}

/// Image edits take the same path: a large form's `n` before its files is reserved and
/// charged; under a hard budget one after them, which the reservation did not count, stops
/// the upload. Without one, it is forwarded as sent and the images returned are charged.
#[test]
fn a_large_image_edit_is_charged_its_n_and_an_n_after_the_files_stops_it() {
    let mock = mock();
    let gw = start(&mock);
    let key = gw.create_key(&["--budget", "100", "--budget-mode", "hard"]);
    mock.clear();
    let image = large_file();
    let body = form(
        &[("model", "img"), ("prompt", "add a hat"), ("n", "2")],
        &[("image[]", "a.png", &image)],
    );
    let r = post_form(&gw, "/v1/images/edits", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    let want = form(
        &[
            ("model", "gpt-image-upstream"),
            ("prompt", "add a hat"),
            ("n", "2"),
        ],
        &[("image[]", "a.png", &image)],
    );
    assert!(
        mock.requests()[0].body == want,
        "only the model part differs"
    );
    assert_eq!(spend(&gw, &key), 80_000_000);
    mock.clear();
    let mut late_n = form(
        &[("model", "img"), ("prompt", "add a hat")],
        &[("image[]", "a.png", &image)],
    );
    let close = format!("--{BOUNDARY}--\r\n");
    late_n.truncate(late_n.len() - close.len());
    late_n.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n3\r\n{close}")
            .as_bytes(),
    );
    let r = post_form(&gw, "/v1/images/edits", &key, &late_n);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &key), 80_000_000);
    // A `max_usd_per_hour` counts reservations too (SPEC §7): the same.
    let braked = gw.create_key(&["--max-usd-per-hour", "100"]);
    let r = post_form(&gw, "/v1/images/edits", &braked, &late_n);
    assert_eq!(
        (r.status, r.code().as_str()),
        (400, "invalid_request"),
        "{}",
        r.text()
    );
    assert!(mock.requests().is_empty());
    assert_eq!(spend(&gw, &braked), 0);
    let unbudgeted = gw.create_key(&[]);
    let r = post_form(&gw, "/v1/images/edits", &unbudgeted, &late_n);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(3));
    assert_eq!(spend(&gw, &unbudgeted), 120_000_000);
    // A second `n`, in any form, is refused: the upstream might take either.
    let mut two_n = form(
        &[("model", "img"), ("n", "1")],
        &[("image[]", "a.png", &image)],
    );
    two_n.truncate(two_n.len() - close.len());
    two_n.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\n9\r\n{close}")
            .as_bytes(),
    );
    mock.clear();
    let r = post_form(&gw, "/v1/images/edits", &unbudgeted, &two_n);
    assert_eq!((r.status, r.code().as_str()), (400, "invalid_request"));
    assert!(
        mock.requests().is_empty(),
        "the upstream never got a whole form"
    );
}

/// SPEC §2: a model that fails (a refused connection, a 429 or 5xx) before any byte
/// reached the client falls back to the next of its alias. A large form naming an alias of
/// more than one model is held whole, as a small one is, so it can be sent again.
#[test]
fn a_large_form_naming_an_alias_falls_back_on_a_refused_connection_a_429_or_a_5xx() {
    let mock = mock();
    // Upstreams that refuse every request, after reading it whole.
    let refusing = |status: &str| {
        let body = r#"{"error":{"message":"no","type":"server_error","code":null}}"#;
        canned_upstream(http_reply(status, "application/json", body))
    };
    let (five, busy) = (
        refusing("500 Internal Server Error"),
        refusing("429 Too Many Requests"),
    );
    let gw = GatewayBuilder::new(&mock)
        .provider(&format!(
            "  - name: five\n    kind: openai\n    base_url: \"http://{five}/v1\"\n"
        ))
        .provider(&format!(
            "  - name: busy\n    kind: openai\n    base_url: \"http://{busy}/v1\"\n"
        ))
        .models(&format!(
            "{MODELS_YAML}  - id: whisper-dead\n    provider: dead\n    endpoint: transcriptions\n    usd_per_minute: 0.006\n  - id: whisper-500\n    provider: five\n    endpoint: transcriptions\n    usd_per_minute: 0.006\n  - id: whisper-429\n    provider: busy\n    endpoint: transcriptions\n    usd_per_minute: 0.006\naliases:\n  stt/failover: [whisper-dead, whisper]\n  stt/500: [whisper-500, whisper]\n  stt/429: [whisper-429, whisper]\n"
        ))
        .server("max_audio_seconds: 600")
        .start();
    let key = gw.create_key(&[]);
    mock.clear();
    let file = large_file();
    let body = form(
        &[
            ("model", "stt/failover"),
            ("response_format", "verbose_json"),
        ],
        &[("file", "speech.mp3", &file)],
    );
    let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-spidergate-model"), Some("whisper"));
    let want = form(
        &[
            ("model", "whisper-upstream-long-name"),
            ("response_format", "verbose_json"),
        ],
        &[("file", "speech.mp3", &file)],
    );
    assert!(
        mock.requests()[0].body == want,
        "the fallback's form, whole"
    );
    assert_eq!(spend(&gw, &key), 18_750_000);
    // A 500 or a 429 from the first model, after its whole form went: sent again to the
    // next, whole.
    for first in ["whisper-500", "whisper-429"] {
        mock.clear();
        let alias = first.replace("whisper-", "stt/");
        let body = form(
            &[("model", &alias), ("response_format", "verbose_json")],
            &[("file", "speech.mp3", &file)],
        );
        let r = post_form(&gw, "/v1/audio/transcriptions", &key, &body);
        assert_eq!(r.status, 200, "{first}: {}", r.text());
        assert_eq!(r.header("x-spidergate-fallback-from"), Some(first));
        let want = form(
            &[
                ("model", "whisper-upstream-long-name"),
                ("response_format", "verbose_json"),
            ],
            &[("file", "speech.mp3", &file)],
        );
        let seen = mock.requests();
        assert!(
            seen.len() == 1 && seen[0].body == want,
            "{first}: the fallback's form, whole"
        );
    }
    // The refused attempts cost nothing; the two that served, 187.5 s each.
    assert_eq!(spend(&gw, &key), 3 * 18_750_000);
}
