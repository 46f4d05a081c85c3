//! The multi-modal routes: OpenAI's `POST .../images/generations` (JSON, `b64_json`
//! images), `POST .../audio/speech` (audio bytes, streamed in chunks), and Anthropic's
//! `POST /v1/messages/count_tokens`.

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::json::{push_hex, unix_now};
use crate::knobs::Knobs;
use crate::reply::{Reply, Sent, Shape};
use crate::wire::{push_head, HeadFlags};

/// A 1x1 PNG, the image of every `b64_json` answer.
pub const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==";

/// The audio the mock speaks for `input`: an ID3 tag, then the input's SHA-256 repeated
/// 128 times (4,099 bytes), so a test can compare the bytes it got.
pub fn speech_audio(input: &str) -> Vec<u8> {
    let digest = Sha256::digest(input.as_bytes());
    let mut audio = b"ID3".to_vec();
    for _ in 0..128 {
        audio.extend_from_slice(&digest);
    }
    audio
}

#[derive(Deserialize)]
struct ImagesRequest {
    #[serde(default)]
    n: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<String>,
}

#[derive(Deserialize)]
struct SpeechRequest {
    input: String,
    #[serde(default)]
    response_format: Option<String>,
}

impl Reply<'_> {
    /// `n` images (a number or a numeric string, default 1), each a `b64_json` PNG; with
    /// `x-mock-image-usage: 1` also token usage, as token-priced image models report it.
    pub(crate) async fn images(&mut self, knobs: &Knobs, flags: HeadFlags, body: &[u8]) -> Sent {
        let Ok(request) = serde_json::from_slice::<ImagesRequest>(body) else {
            return self.bad_json(Shape::OpenAi, flags).await;
        };
        let n = match &request.n {
            None | Some(serde_json::Value::Null) => Some(1),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            Some(serde_json::Value::String(s)) => s.trim().parse().ok(),
            Some(_) => None,
        };
        let Some(n) = n.filter(|n| (1..=10).contains(n)) else {
            return self
                .error(Shape::OpenAi, 400, flags, "n must be between 1 and 10")
                .await;
        };
        if request.prompt.as_deref().unwrap_or("").is_empty() {
            return self
                .error(Shape::OpenAi, 400, flags, "prompt is required")
                .await;
        }
        let image = serde_json::json!({"b64_json": PNG_B64, "revised_prompt": request.prompt});
        let mut answer = serde_json::json!({
            "created": unix_now(),
            "data": vec![image; n as usize],
        });
        if knobs.image_usage {
            let tokens = knobs.tokens(body, None, crate::billing::Api::OpenAi);
            answer["usage"] = serde_json::json!({
                "input_tokens": tokens.fresh_input,
                "output_tokens": tokens.output,
                "total_tokens": tokens.fresh_input + tokens.output,
                "input_tokens_details": {"text_tokens": tokens.fresh_input, "image_tokens": 0},
            });
        }
        self.set_json(&answer);
        self.shared.add_media(n, 0);
        self.send_json(200, flags, knobs, None).await
    }

    /// [`speech_audio`] of the input, chunked in `x-mock-chunks` pieces (with
    /// `x-mock-chunk-delay-ms` between them), as `audio/mpeg` (or the asked format's type).
    pub(crate) async fn speech(&mut self, knobs: &Knobs, flags: HeadFlags, body: &[u8]) -> Sent {
        let Ok(request) = serde_json::from_slice::<SpeechRequest>(body) else {
            return self.bad_json(Shape::OpenAi, flags).await;
        };
        let content_type: &[u8] = match request.response_format.as_deref() {
            Some("wav") => b"audio/wav",
            Some("opus") => b"audio/ogg",
            Some("aac") => b"audio/aac",
            Some("flac") => b"audio/flac",
            Some("pcm") => b"audio/pcm",
            _ => b"audio/mpeg",
        };
        let audio = speech_audio(&request.input);
        self.shared
            .add_media(0, request.input.chars().count() as u64);
        self.out.clear();
        push_head(self.out, 200, content_type, None, flags);
        self.write_raw().await?;
        let pieces = knobs.chunks.max(1) as usize;
        let size = audio.len().div_ceil(pieces);
        for (i, piece) in audio.chunks(size).enumerate() {
            if let Some(delay) = knobs.chunk_delay(i as u64) {
                tokio::time::sleep(delay).await;
            }
            if knobs.breaks_at(i as u64) {
                return Err(());
            }
            self.out.clear();
            push_hex(self.out, piece.len());
            self.out.extend_from_slice(b"\r\n");
            self.out.extend_from_slice(piece);
            self.out.extend_from_slice(b"\r\n");
            self.write_raw().await?;
        }
        self.end_stream().await
    }

    /// Anthropic's token count: `{"input_tokens": N}` (`x-mock-prompt-tokens`, or `bytes`).
    pub(crate) async fn count_tokens(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        body: &[u8],
    ) -> Sent {
        if serde_json::from_slice::<serde_json::Value>(body).is_err() {
            return self.bad_json(Shape::Anthropic, flags).await;
        }
        let tokens = knobs.tokens(body, None, crate::billing::Api::Anthropic);
        self.set_json(&serde_json::json!({"input_tokens": tokens.fresh_input}));
        self.send_json(200, flags, knobs, None).await
    }
}

/// One part of a `multipart/form-data` body: its `name`, and its bytes.
pub(crate) struct Part<'a> {
    pub(crate) name: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// The parts of a form whose boundary is the body's first line (`--BOUNDARY`); None when
/// the body is not a well-formed form.
pub(crate) fn form_parts(body: &[u8]) -> Option<Vec<Part<'_>>> {
    let first = memchr::memmem::find(body, b"\r\n")?;
    let opener = body.get(..first)?.strip_prefix(b"--")?;
    let mut delim = b"\r\n--".to_vec();
    delim.extend_from_slice(opener);
    let finder = memchr::memmem::Finder::new(&delim);
    let mut parts = Vec::new();
    let mut at = first;
    loop {
        let rest = body.get(at..)?;
        if rest.starts_with(b"--") {
            return Some(parts);
        }
        let start = at + 2;
        let head_len = memchr::memmem::find(body.get(start..)?, b"\r\n\r\n")?;
        let head = &body[start..start + head_len];
        let value_start = start + head_len + 4;
        let value_len = finder.find(body.get(value_start..)?)?;
        let i = memchr::memmem::find(head, b"; name=\"")? + b"; name=\"".len();
        let end = memchr::memchr(b'"', &head[i..])?;
        parts.push(Part {
            name: &head[i..i + end],
            value: &body[value_start..value_start + value_len],
        });
        at = value_start + value_len + delim.len();
    }
}

/// Seconds of audio the mock hears in a file that is not a PCM WAV: 16,000 bytes a second
/// (128 kbit/s MP3).
pub const AUDIO_BYTES_PER_SECOND: f64 = 16_000.0;

/// The seconds of audio in `file`, as a provider would report them: a WAV's `data` bytes
/// over its `fmt ` byte rate, anything else at [`AUDIO_BYTES_PER_SECOND`].
pub fn audio_seconds(file: &[u8]) -> f64 {
    wav_seconds(file).unwrap_or(file.len() as f64 / AUDIO_BYTES_PER_SECOND)
}

/// A RIFF/WAVE file's duration: its first `data` chunk (as much of it as is there) over the
/// byte rate of the `fmt ` chunk before it.
fn wav_seconds(file: &[u8]) -> Option<f64> {
    if file.get(..4)? != b"RIFF" || file.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut at = 12;
    let mut byte_rate = None;
    while let Some(head) = file.get(at..at + 8) {
        let size = u32::from_le_bytes(head[4..8].try_into().ok()?) as usize;
        let body = at + 8;
        match &head[..4] {
            b"fmt " => {
                let rate = file.get(body + 8..body + 12)?;
                byte_rate = Some(u32::from_le_bytes(rate.try_into().ok()?)).filter(|&r| r > 0);
            }
            b"data" => {
                let len = size.min(file.len() - body);
                return Some(len as f64 / f64::from(byte_rate?));
            }
            _ => {}
        }
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

impl Reply<'_> {
    /// `/images/edits`: the form's `image` part(s) and `prompt` are required; answers like
    /// `/images/generations` with `n` images.
    pub(crate) async fn image_edits(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        body: &[u8],
    ) -> Sent {
        let Some(parts) = form_parts(body) else {
            return self
                .error(Shape::OpenAi, 400, flags, "malformed multipart body")
                .await;
        };
        let field = |name: &[u8]| parts.iter().find(|p| p.name == name).map(|p| p.value);
        if !parts.iter().any(|p| p.name.starts_with(b"image")) {
            return self
                .error(Shape::OpenAi, 400, flags, "image is required")
                .await;
        }
        let n = field(b"n")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map_or(Some(1), |v| v.trim().parse::<u64>().ok());
        let prompt = field(b"prompt").map(|p| String::from_utf8_lossy(p).into_owned());
        let request = serde_json::json!({"n": n, "prompt": prompt});
        self.images(knobs, flags, request.to_string().as_bytes())
            .await
    }

    /// `/audio/transcriptions` and `/audio/translations`: the text names the `file` part's
    /// SHA-256 and size (`sha256:<hex> bytes:<n>`); `response_format` json (default),
    /// `verbose_json` (with `duration`: [`audio_seconds`]), text, srt or vtt;
    /// with `stream=true`, server-sent events ([`Reply::transcription_stream`]).
    pub(crate) async fn transcription(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        body: &[u8],
    ) -> Sent {
        let Some(parts) = form_parts(body) else {
            return self
                .error(Shape::OpenAi, 400, flags, "malformed multipart body")
                .await;
        };
        let field = |name: &[u8]| parts.iter().find(|p| p.name == name).map(|p| p.value);
        let Some(file) = field(b"file") else {
            return self
                .error(Shape::OpenAi, 400, flags, "file is required")
                .await;
        };
        if field(b"model").is_none() {
            return self
                .error(Shape::OpenAi, 400, flags, "model is required")
                .await;
        }
        let digest = Sha256::digest(file);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let text = format!("sha256:{hex} bytes:{}", file.len());
        let duration = audio_seconds(file);
        let streamed =
            field(b"stream").is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"true"));
        if streamed {
            return self
                .transcription_stream(knobs, flags, body, &text, duration)
                .await;
        }
        let format =
            field(b"response_format").map(|f| String::from_utf8_lossy(f).trim().to_string());
        let (content_type, reply): (&[u8], Vec<u8>) = match format.as_deref() {
            None | Some("json") => {
                let mut reply = serde_json::json!({"text": text});
                if knobs.audio_usage_duration || knobs.audio_usage_tokens {
                    reply["usage"] = self.transcription_usage(knobs, body, duration);
                }
                (b"application/json", reply.to_string().into_bytes())
            }
            Some("verbose_json") => (
                b"application/json",
                serde_json::json!({
                    "task": "transcribe", "language": "english", "duration": duration,
                    "text": text, "segments": [],
                })
                .to_string()
                .into_bytes(),
            ),
            Some("text") => (
                b"text/plain; charset=utf-8",
                format!("{text}\n").into_bytes(),
            ),
            Some("srt") => (
                b"text/plain; charset=utf-8",
                format!("1\n00:00:00,000 --> 00:00:01,000\n{text}\n\n").into_bytes(),
            ),
            Some("vtt") => (
                b"text/vtt; charset=utf-8",
                format!("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n{text}\n\n").into_bytes(),
            ),
            Some(_) => {
                return self
                    .error(Shape::OpenAi, 400, flags, "unsupported response_format")
                    .await
            }
        };
        self.out.clear();
        push_head(self.out, 200, content_type, Some(reply.len()), flags);
        self.out.extend_from_slice(&reply);
        self.write_raw().await
    }

    /// A streamed transcription, as gpt-4o-transcribe answers `stream=true`: the text in
    /// `x-mock-chunks` `transcript.text.delta` events (paced, held and broken like chat
    /// streams), then `transcript.text.done` with the whole text and its `usage`: tokens
    /// (`x-mock-prompt-tokens` in, all of them audio; `x-mock-completion-tokens` out), or
    /// with `x-mock-audio-usage: duration` the seconds of audio, rounded up. No usage with
    /// `x-mock-no-usage: 1`. Unnamed `data:` events, no `[DONE]`.
    async fn transcription_stream(
        &mut self,
        knobs: &Knobs,
        flags: HeadFlags,
        body: &[u8],
        text: &str,
        duration: f64,
    ) -> Sent {
        self.start_stream(flags).await?;
        let pieces = knobs.chunks.clamp(1, text.len().max(1) as u64) as usize;
        let size = text.len().div_ceil(pieces).max(1);
        // The text is ASCII: any byte offset is a character boundary.
        for (i, start) in (0..text.len()).step_by(size).enumerate() {
            self.pace(knobs, i as u64).await?;
            let piece = &text[start..(start + size).min(text.len())];
            self.set_json(&serde_json::json!({"type": "transcript.text.delta", "delta": piece}));
            self.send_event(None).await?;
        }
        if knobs.break_after.is_some() {
            return Err(());
        }
        let mut done = serde_json::json!({"type": "transcript.text.done", "text": text});
        if !knobs.no_usage {
            done["usage"] = self.transcription_usage(knobs, body, duration);
        }
        self.set_json(&done);
        self.send_event(None).await?;
        self.end_stream().await
    }

    /// A transcription's `usage`: the seconds of audio, rounded up, with
    /// `x-mock-audio-usage: duration`, else tokens (`x-mock-prompt-tokens` audio tokens in,
    /// `x-mock-completion-tokens` out), counted as served.
    fn transcription_usage(
        &mut self,
        knobs: &Knobs,
        body: &[u8],
        duration: f64,
    ) -> serde_json::Value {
        if knobs.audio_usage_duration {
            return serde_json::json!({"type": "duration", "seconds": duration.ceil() as u64});
        }
        let tokens = knobs.tokens(body, None, crate::billing::Api::OpenAi);
        let input = tokens.fresh_input;
        self.shared.add_usage(crate::Served {
            prompt: input,
            completion: tokens.output,
            cache_read: 0,
            cache_write: 0,
        });
        serde_json::json!({
            "type": "tokens",
            "input_tokens": input,
            "input_token_details": {"text_tokens": 0, "audio_tokens": input},
            "output_tokens": tokens.output,
            "total_tokens": input.saturating_add(tokens.output),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A WAV: a `LIST` chunk of odd size (padded) before `fmt `, then `data_len` bytes
    /// declared, `present` of them there.
    fn wav(byte_rate: u32, data_len: u32, present: usize) -> Vec<u8> {
        let mut f = b"RIFF\0\0\0\0WAVE".to_vec();
        f.extend_from_slice(b"LIST");
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(b"abc\0");
        f.extend_from_slice(b"fmt ");
        f.extend_from_slice(&16u32.to_le_bytes());
        f.extend_from_slice(&[1, 0, 1, 0]);
        f.extend_from_slice(&16_000u32.to_le_bytes());
        f.extend_from_slice(&byte_rate.to_le_bytes());
        f.extend_from_slice(&[2, 0, 16, 0]);
        f.extend_from_slice(b"data");
        f.extend_from_slice(&data_len.to_le_bytes());
        f.resize(f.len() + present, 0);
        f
    }

    #[test]
    fn a_wav_is_heard_for_its_data_at_its_byte_rate_anything_else_at_16k_bytes_a_second() {
        assert_eq!(audio_seconds(&wav(32_000, 64_000, 64_000)), 2.0);
        // A declared length past the file's end: what is there.
        assert_eq!(audio_seconds(&wav(32_000, 64_000, 16_000)), 0.5);
        // No byte rate: not a WAV the mock can hear, so its bytes.
        let silent = wav(0, 64_000, 64_000);
        assert_eq!(audio_seconds(&silent), silent.len() as f64 / 16_000.0);
        assert_eq!(audio_seconds(&[0x55; 32_000]), 2.0);
    }
}
