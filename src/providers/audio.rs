//! The duration of an audio file, read from its container header where that is cheap and
//! exact: WAV (RIFF `fmt ` + `data`). Transcriptions are priced per minute of audio; when
//! the upstream reports no duration (`text`, `srt`, `vtt`), this is what is charged, and it
//! bounds the reservation instead of `server.max_audio_seconds` (SPEC §4).

/// Milliseconds of audio in a WAV file, rounded up: the `data` chunk's bytes (as many as
/// the file really holds, whatever its header claims) over the `fmt ` chunk's byte rate.
/// `None` for anything else, or a header that does not add up.
pub fn wav_duration_ms(file: &[u8]) -> Option<u64> {
    if file.len() < 12 || &file[0..4] != b"RIFF" || &file[8..12] != b"WAVE" {
        return None;
    }
    let u32_at = |i: usize| -> Option<u32> {
        file.get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let mut at = 12;
    let mut byte_rate = None;
    // A bounded walk: a well-formed file has a handful of chunks before its data.
    for _ in 0..64 {
        let id = file.get(at..at + 4)?;
        let size = u32_at(at + 4)? as usize;
        let body = at + 8;
        match id {
            b"fmt " => byte_rate = u32_at(body + 8).filter(|&r| r > 0),
            b"data" => {
                let present = file.len().saturating_sub(body).min(size) as u64;
                let rate = u64::from(byte_rate?);
                return Some((present * 1000).div_ceil(rate));
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PCM WAV header and `data_len` bytes of silence: 16 kHz mono 16-bit = 32,000 B/s.
    fn wav(data_len: u32, claimed: u32) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"RIFF");
        f.extend_from_slice(&(36 + claimed).to_le_bytes());
        f.extend_from_slice(b"WAVE");
        f.extend_from_slice(b"fmt ");
        f.extend_from_slice(&16u32.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes()); // PCM
        f.extend_from_slice(&1u16.to_le_bytes()); // mono
        f.extend_from_slice(&16_000u32.to_le_bytes());
        f.extend_from_slice(&32_000u32.to_le_bytes()); // byte rate
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(b"LIST");
        f.extend_from_slice(&3u32.to_le_bytes());
        f.extend_from_slice(b"abc\0"); // odd size, padded
        f.extend_from_slice(b"data");
        f.extend_from_slice(&claimed.to_le_bytes());
        f.resize(f.len() + data_len as usize, 0);
        f
    }

    #[test]
    fn reads_the_duration_from_the_bytes_present() {
        assert_eq!(wav_duration_ms(&wav(64_000, 64_000)), Some(2_000));
        assert_eq!(wav_duration_ms(&wav(32_001, 32_001)), Some(1_001)); // rounded up
                                                                        // A header claiming more audio than the file holds: only what is there counts.
        assert_eq!(wav_duration_ms(&wav(16_000, 3_200_000)), Some(500));
    }

    #[test]
    fn anything_else_is_unknown() {
        assert_eq!(wav_duration_ms(b"ID3\x03not a wav"), None);
        assert_eq!(wav_duration_ms(b""), None);
        let mut no_rate = wav(1_000, 1_000);
        no_rate[28..32].copy_from_slice(&0u32.to_le_bytes());
        assert_eq!(wav_duration_ms(&no_rate), None);
        // Truncated before the data chunk.
        assert_eq!(wav_duration_ms(&wav(0, 0)[..30]), None);
    }
}
