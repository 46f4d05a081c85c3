//! Bounds on the duration of an audio file, read from its container where that is cheap
//! and sound (SPEC §4). Transcriptions are priced per minute of audio; when the upstream
//! reports no duration (`text`, `srt`, `vtt`), the bound is what is charged, and it bounds
//! the reservation instead of `server.max_audio_seconds`.
//!
//! - WAV: the `data` bytes present over the `fmt ` byte rate ([`wav_duration_ms`]).
//! - MP3: the frames' own durations, walked header to header ([`mp3_duration_ms`]).
//! - FLAC, M4A, OGG, WebM: none. Their headers state a length (STREAMINFO's total samples,
//!   `mvhd`, granule positions) that decoders do not enforce: a FLAC whose STREAMINFO says
//!   one second decodes every frame that follows, and a frame of silence takes a few bytes
//!   for thousands of samples, so neither the header nor the size bounds what is billed.
//!   These fall back to `server.max_audio_seconds`.

/// The duration bound, in ms, of an audio file whose container gives a sound one (WAV,
/// MP3); `None` for anything else.
pub fn duration_bound_ms(file: &[u8]) -> Option<u64> {
    wav_duration_ms(file).or_else(|| mp3_duration_ms(file))
}

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

/// The most audio any byte of a non-free-format MPEG audio frame carries: 8 kbit/s is
/// 1 ms a byte, a little more where a frame's length is rounded down (1.005 at 11,025 Hz).
/// Bytes after the last frame are counted at this rate.
const MAX_MS_PER_BYTE: u64 = 2;

/// One MPEG audio frame header, as every decoder reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MpegHeader {
    /// `len` bytes (header included) of `samples` samples at `rate` Hz.
    Frame {
        len: usize,
        samples: u32,
        rate: u32,
        /// Side information after the header: where a Xing/Info tag starts.
        side_info: usize,
    },
    /// Bitrate index 0: a free-format frame, whose length (and so its audio per byte) the
    /// header does not give.
    FreeFormat,
    NotAFrame,
}

fn mpeg_header(h: &[u8]) -> MpegHeader {
    // Kbit/s by [MPEG-1?][layer I, II, III][index]; index 0 is free format, 15 invalid.
    const V1: [[u16; 15]; 3] = [
        [
            0, 32, 64, 96, 128, 160, 192, 224, 256, 288, 320, 352, 384, 416, 448,
        ],
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320, 384,
        ],
        [
            0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320,
        ],
    ];
    const V2: [[u16; 15]; 3] = [
        [
            0, 32, 48, 56, 64, 80, 96, 112, 128, 144, 160, 176, 192, 224, 256,
        ],
        [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
        [0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160],
    ];
    let [b0, b1, b2, b3] = match h.get(..4) {
        Some(&[a, b, c, d]) => [a, b, c, d],
        _ => return MpegHeader::NotAFrame,
    };
    if b0 != 0xFF || b1 & 0xE0 != 0xE0 {
        return MpegHeader::NotAFrame;
    }
    let version = (b1 >> 3) & 3; // 0: MPEG-2.5, 1: reserved, 2: MPEG-2, 3: MPEG-1
    let layer = match (b1 >> 1) & 3 {
        3 => 0, // Layer I
        2 => 1, // Layer II
        1 => 2, // Layer III
        _ => return MpegHeader::NotAFrame,
    };
    let bitrate_index = usize::from(b2 >> 4);
    let rate_index = usize::from((b2 >> 2) & 3);
    if version == 1 || bitrate_index == 15 || rate_index == 3 {
        return MpegHeader::NotAFrame;
    }
    if bitrate_index == 0 {
        return MpegHeader::FreeFormat;
    }
    let mpeg1 = version == 3;
    let kbps = u32::from(if mpeg1 { V1 } else { V2 }[layer][bitrate_index]);
    // MPEG-2 halves MPEG-1's sample rates, MPEG-2.5 quarters them.
    let shift = match version {
        3 => 0,
        2 => 1,
        _ => 2,
    };
    let rate: u32 = [44_100, 48_000, 32_000][rate_index] >> shift;
    let padding = usize::from((b2 >> 1) & 1);
    let bps = kbps * 1000;
    let (len, samples) = match (layer, mpeg1) {
        (0, _) => ((12 * bps / rate) as usize * 4 + padding * 4, 384),
        (2, false) => ((72 * bps / rate) as usize + padding, 576),
        _ => ((144 * bps / rate) as usize + padding, 1152),
    };
    let mono = b3 >> 6 == 3;
    let side_info = match (mpeg1, mono) {
        (true, false) => 32,
        (true, true) | (false, false) => 17,
        (false, true) => 9,
    };
    MpegHeader::Frame {
        len,
        samples,
        rate,
        side_info,
    }
}

/// An upper bound on the milliseconds an MP3 file plays, or `None` where it cannot be read
/// soundly. After any ID3v2 tags, the file must be MPEG audio frames from its first byte,
/// each starting where the previous one ends (its length fixed by its header), to its end:
/// the sum of their durations (each frame's samples over its sample rate) is what a
/// decoder plays. A last frame cut short counts whole; a trailing ID3v1 tag, or anything
/// after the last frame up to 4 KiB, counts at 2 ms a byte (more than any frame carries).
/// A free-format frame (its length not in its header) or anything else between frames
/// makes the file unknown, so no crafted file reads shorter than it plays. A Xing, Info or
/// VBRI tag's frame count, where larger, bounds it instead (what a reader of the tag
/// would report).
pub fn mp3_duration_ms(file: &[u8]) -> Option<u64> {
    const MAX_TAIL: usize = 4096;
    let mut at = skip_id3v2(file)?;
    let mut nanos: u128 = 0;
    let mut frames = 0u64;
    let mut claimed: Option<u128> = None;
    while at < file.len() {
        match mpeg_header(&file[at..]) {
            MpegHeader::Frame {
                len,
                samples,
                rate,
                side_info,
            } => {
                nanos += (u128::from(samples) * 1_000_000_000).div_ceil(u128::from(rate));
                if frames == 0 {
                    claimed = vbr_tag_frames(&file[at..], side_info).map(|n| {
                        (u128::from(n) * u128::from(samples) * 1_000_000_000)
                            .div_ceil(u128::from(rate))
                    });
                }
                frames += 1;
                at += len.max(1);
            }
            MpegHeader::FreeFormat => return None,
            MpegHeader::NotAFrame => {
                let tail = file.len() - at;
                if frames == 0 || tail > MAX_TAIL {
                    return None;
                }
                nanos += u128::from(tail as u64 * MAX_MS_PER_BYTE) * 1_000_000;
                break;
            }
        }
    }
    if frames == 0 {
        return None;
    }
    let ms = nanos.max(claimed.unwrap_or(0)).div_ceil(1_000_000);
    Some(u64::try_from(ms).unwrap_or(u64::MAX))
}

/// Where the audio starts after the ID3v2 tags that open a file (none: 0); `None` for a tag
/// that claims more bytes than the file has.
fn skip_id3v2(file: &[u8]) -> Option<usize> {
    let mut at = 0usize;
    while file.get(at..at + 3) == Some(b"ID3") {
        let h = file.get(at..at + 10)?;
        if h[6..10].iter().any(|b| b & 0x80 != 0) {
            return None;
        }
        let size = h[6..10]
            .iter()
            .fold(0usize, |acc, &b| (acc << 7) | usize::from(b));
        let footer = if h[5] & 0x10 != 0 { 10 } else { 0 };
        at = at.checked_add(10 + size + footer)?;
        if at > file.len() {
            return None;
        }
    }
    Some(at)
}

/// The frame count of a Xing / Info tag (after the side information of the first frame) or
/// a VBRI tag (32 bytes after the header).
fn vbr_tag_frames(frame: &[u8], side_info: usize) -> Option<u32> {
    let be = |i: usize| -> Option<u32> {
        frame
            .get(i..i + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    let xing = 4 + side_info;
    match frame.get(xing..xing + 4) {
        Some(b"Xing") | Some(b"Info") if be(xing + 4)? & 1 == 1 => return be(xing + 8),
        _ => {}
    }
    match frame.get(36..40) {
        Some(b"VBRI") => be(36 + 14),
        _ => None,
    }
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

    /// An MPEG-1 Layer III frame, 128 kbit/s at 44.1 kHz: 417 bytes, 1,152 samples.
    fn frame() -> Vec<u8> {
        let mut f = vec![0xFF, 0xFB, 0x90, 0x00];
        f.resize(417, 0x55);
        f
    }

    fn mp3(frames: usize) -> Vec<u8> {
        frame().repeat(frames)
    }

    fn id3v2(size: u8) -> Vec<u8> {
        let mut t = b"ID3\x04\x00\x00\x00\x00\x00".to_vec();
        t.push(size);
        t.resize(10 + usize::from(size), 0);
        t
    }

    #[test]
    fn an_mp3_plays_the_sum_of_its_frames() {
        // 100 x 1,152 / 44,100 s = 2,612.24 ms.
        assert_eq!(mp3_duration_ms(&mp3(100)), Some(2_613));
        assert_eq!(duration_bound_ms(&mp3(100)), Some(2_613));
        // ID3v2 tags ahead are skipped; a trailing ID3v1 tag counts 2 ms a byte.
        let mut tagged = id3v2(20);
        tagged.extend(id3v2(5));
        tagged.extend(mp3(100));
        tagged.extend_from_slice(b"TAG");
        tagged.resize(tagged.len() + 125, b' ');
        assert_eq!(mp3_duration_ms(&tagged), Some(2_613 + 256));
        // A last frame cut short counts whole.
        let cut = mp3(10);
        assert_eq!(
            mp3_duration_ms(&cut[..cut.len() - 100]),
            mp3_duration_ms(&cut)
        );
        // MPEG-2 Layer III at 8 kbit/s and 16 kHz: 36 bytes, 576 samples = 36 ms each.
        let mut low = vec![0xFF, 0xF3, 0x18, 0xC0];
        low.resize(36, 0);
        assert_eq!(mp3_duration_ms(&low.repeat(10)), Some(360));
    }

    #[test]
    fn a_crafted_mp3_never_reads_shorter_than_it_plays() {
        // Bytes between frames (a decoder would resync there and may find more audio).
        let mut gap = mp3(10);
        gap.extend(vec![0u8; 5000]);
        gap.extend(mp3(10));
        assert_eq!(mp3_duration_ms(&gap), None);
        // A free-format frame: its audio per byte is not in its header.
        let mut free = mp3(10);
        free.extend_from_slice(&[0xFF, 0xFB, 0x00, 0x00]);
        free.resize(free.len() + 400, 0);
        assert_eq!(mp3_duration_ms(&free), None);
        // Not MP3 from its first byte, an ID3 tag longer than the file, no frame at all.
        let mut late = vec![0u8; 3];
        late.extend(mp3(10));
        assert_eq!(mp3_duration_ms(&late), None);
        let mut long_tag = id3v2(20);
        long_tag[9] = 0x7F;
        assert_eq!(mp3_duration_ms(&long_tag), None);
        assert_eq!(mp3_duration_ms(b"ID3 not read"), None);
        assert_eq!(mp3_duration_ms(b""), None);
        // A Xing tag claiming more frames than the file holds bounds it by its claim; one
        // claiming fewer changes nothing.
        let mut xing = mp3(10);
        xing[36..40].copy_from_slice(b"Xing");
        xing[40..44].copy_from_slice(&1u32.to_be_bytes());
        xing[44..48].copy_from_slice(&1_000u32.to_be_bytes());
        assert_eq!(mp3_duration_ms(&xing), Some(26_123)); // 1,000 x 26.1224 ms
        xing[44..48].copy_from_slice(&1u32.to_be_bytes());
        assert_eq!(mp3_duration_ms(&xing), mp3_duration_ms(&mp3(10)));
    }

    #[test]
    fn no_frame_carries_more_than_the_tail_rate() {
        for b1 in 0xE0..=0xFFu8 {
            for b2 in 0..=0xFFu8 {
                if let MpegHeader::Frame {
                    len, samples, rate, ..
                } = mpeg_header(&[0xFF, b1, b2, 0])
                {
                    // samples / rate seconds in len bytes: at most MAX_MS_PER_BYTE ms a byte.
                    let ms_x_rate = u64::from(samples) * 1000;
                    assert!(
                        ms_x_rate <= MAX_MS_PER_BYTE * len as u64 * u64::from(rate),
                        "{b1:x} {b2:x}"
                    );
                }
            }
        }
    }

    #[test]
    fn flac_is_not_bounded_by_its_streaminfo() {
        // STREAMINFO claiming 16,000 samples at 16 kHz (one second): decoders play every
        // frame after it whatever it claims, so it is no bound.
        let mut f = b"fLaC".to_vec();
        f.extend_from_slice(&[0x80, 0, 0, 34]); // last block, STREAMINFO, 34 bytes
        f.extend_from_slice(&[0x10, 0x00, 0x10, 0x00, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&[0x03, 0xE8, 0x00, 0xF0, 0x00, 0x00, 0x3E, 0x80]);
        f.resize(f.len() + 16, 0); // MD5
        f.extend([0xFFu8, 0xF8, 0x69, 0x08].repeat(1000)); // frames
        assert_eq!(duration_bound_ms(&f), None);
    }
}
