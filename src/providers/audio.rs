//! Bounds on the duration of an audio file, read from its container where that is cheap
//! and sound (SPEC §4). Transcriptions are priced per minute of audio; when the upstream
//! reports no duration (`text`, `srt`, `vtt`), the bound is what is charged, and it bounds
//! the reservation instead of `server.max_audio_seconds`.
//!
//! - WAV (PCM and the other sample formats of fixed frame size): every byte from the first
//!   `data` chunk to the end of the file over the rate its samples play at, the lowest the
//!   `fmt ` chunks allow ([`wav_duration_ms`], [`wav_bytes_per_second`]). Decoders
//!   play samples at the sample rate whatever the byte-rate field says, and may read past a
//!   `data` size that claims less, or a second `data` chunk; compressed formats inside a
//!   WAV (ADPCM, MP3) have no such bound and fall back like the formats below.
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

/// Bytes of a file's opening kept for the WAV walk of [`AudioScan`]: a WAV whose `data`
/// chunk starts later (64 KiB of metadata first) is unknown when it arrives in pieces.
const HEAD_KEEP: usize = 64 * 1024;

/// A WAV file opens with `RIFF`, a length and `WAVE`.
const WAV_MAGIC_LEN: usize = 12;

fn is_wav_magic(h: &[u8]) -> bool {
    h.len() >= WAV_MAGIC_LEN && &h[0..4] == b"RIFF" && &h[8..12] == b"WAVE"
}

/// The same bound as [`duration_bound_ms`], computed as the file passes in pieces (a
/// streamed upload): the MP3 frame walk jumps from header to header, keeping at most a
/// frame head between pieces, and the WAV walk reads the file's first 64 KiB.
#[derive(Debug, Clone, Default)]
pub struct AudioScan {
    head: Vec<u8>,
    len: u64,
    mp3: Mp3Walk,
}

impl AudioScan {
    /// The file's next bytes.
    pub fn feed(&mut self, piece: &[u8]) {
        // The first 12 bytes tell whether the file is a WAV; only then is more kept, in one
        // allocation of the size kept (a doubling Vec took 128 KiB for 64).
        let mut rest = piece;
        while !rest.is_empty() && self.head.len() < self.head_keep() {
            let keep = self.head_keep();
            let take = (keep - self.head.len()).min(rest.len());
            self.head.reserve_exact(keep - self.head.len());
            self.head.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
        }
        self.mp3.feed(self.len, piece);
        self.len += piece.len() as u64;
    }

    /// How much of the file's opening the WAV walk may read: its first 64 KiB for a file
    /// that opens as a WAV does, else its first 12 bytes (enough to tell that it does not:
    /// the walk reads nothing more of it).
    fn head_keep(&self) -> usize {
        match self.head.get(..WAV_MAGIC_LEN) {
            None => WAV_MAGIC_LEN,
            Some(h) if is_wav_magic(h) => HEAD_KEEP,
            Some(_) => WAV_MAGIC_LEN,
        }
    }

    /// Whether the file's bytes so far hold everything its opening can tell a bound
    /// before the end ([`AudioScan::wav_bound_within`]): its first 12 bytes show it is no
    /// WAV, or its WAV header reached the `data` chunk, or the walk kept all it keeps. A
    /// large form's opening ends no earlier (`proxy::io::read_form_opening`).
    pub fn head_settled(&self) -> bool {
        match self.head.get(..WAV_MAGIC_LEN) {
            None => false,
            Some(h) if !is_wav_magic(h) => true,
            Some(_) => self.head.len() >= HEAD_KEEP || wav_bound_ms(&self.head, u64::MAX).is_some(),
        }
    }

    /// The bound, once the whole file passed.
    pub fn finish(&self) -> Option<u64> {
        wav_bound_ms(&self.head, self.len).or_else(|| self.mp3.finish(self.len))
    }

    /// A bound before the file's end, from a WAV header alone, for a file known to hold at
    /// most `max_len` bytes: its `data` chunk can hold no more than that, nor more than it
    /// claims. `None` for anything but a WAV whose header has arrived.
    pub fn wav_bound_within(&self, max_len: u64) -> Option<u64> {
        wav_bound_ms(&self.head, max_len.max(self.len))
    }
}

/// Milliseconds of audio in a WAV file, rounded up, at most: every byte from the first
/// `data` chunk's start to the end of the file (whatever size the chunk claims; a trailing
/// chunk counts as audio, a few ms too many rather than too few) over the slowest rate the
/// header allows (see the module's notes). `None` for anything else: no WAV, a compressed
/// sample format, or a header that does not add up.
pub fn wav_duration_ms(file: &[u8]) -> Option<u64> {
    wav_bound_ms(file, file.len() as u64)
}

/// [`wav_duration_ms`] of a file of `len` bytes of which `file` is the opening.
fn wav_bound_ms(file: &[u8], len: u64) -> Option<u64> {
    if !file.get(..WAV_MAGIC_LEN).is_some_and(is_wav_magic) {
        return None;
    }
    let u32_at = |i: usize| -> Option<u32> {
        file.get(i..i + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u16_at =
        |i: usize| -> Option<u16> { file.get(i..i + 2).map(|b| u16::from_le_bytes([b[0], b[1]])) };
    let mut at = 12;
    let mut rate = None;
    // A bounded walk: a well-formed file has a handful of chunks before its data.
    for _ in 0..64 {
        let id = file.get(at..at + 4)?;
        let size = u32_at(at + 4)? as usize;
        let body = at + 8;
        match id {
            b"fmt " => {
                let this = wav_bytes_per_second(
                    u16_at(body)?,
                    u16_at(body + 2)?,
                    u32_at(body + 4)?,
                    u32_at(body + 8)?,
                    u16_at(body + 12)?,
                    u16_at(body + 14)?,
                )?;
                // Decoders differ on which of two `fmt ` chunks they read (FFmpeg: the
                // first): the slower rate bounds either reading.
                rate = Some(rate.map_or(this, |r: u64| r.min(this)));
            }
            b"data" => {
                let present = len.saturating_sub(body as u64);
                return Some((present.saturating_mul(1000)).div_ceil(rate?));
            }
            _ => {}
        }
        // Chunks are padded to an even size.
        at = body.checked_add(size)?.checked_add(size & 1)?;
    }
    None
}

/// The rate a WAV's `data` bytes play at, for a sample format whose frames have a fixed
/// size: integer PCM, IEEE float, A-law, mu-law, or the extensible tag (which carries one
/// of these in practice). The lowest of the header's byte rate, sample rate x block align,
/// and sample rate x channels x whole bytes per sample (what FFmpeg's PCM decoder plays,
/// whatever `block_align` says), so no field written larger than the samples play can
/// shorten the bound. `None` for a compressed format or a zero field.
fn wav_bytes_per_second(
    tag: u16,
    channels: u16,
    sample_rate: u32,
    byte_rate: u32,
    block_align: u16,
    bits_per_sample: u16,
) -> Option<u64> {
    const FIXED_FRAME: [u16; 5] = [0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE];
    if !FIXED_FRAME.contains(&tag) {
        return None;
    }
    let rate = u64::from(sample_rate);
    let sample_bytes = u64::from(bits_per_sample).div_ceil(8);
    let rate = (rate * u64::from(block_align))
        .min(u64::from(byte_rate))
        .min(rate * u64::from(channels) * sample_bytes);
    (rate > 0).then_some(rate)
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

/// Bytes after an MP3's last frame that count at [`MAX_MS_PER_BYTE`]; more make it unknown.
const MAX_TAIL: usize = 4096;

/// What [`Mp3Walk`] expects where it stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Mp3Phase {
    /// ID3v2 tags, or the first frame.
    #[default]
    Tags,
    Frames,
    /// Something other than a frame, from this offset to the end.
    Tail(u64),
    Unknown,
}

/// [`mp3_duration_ms`] over a file that arrives in pieces: the same walk, from header to
/// header, keeping only the bytes of a header (at most 54, a first frame's VBR tag) that a
/// piece cuts in two.
#[derive(Debug, Clone, Default)]
struct Mp3Walk {
    /// Where the next tag or frame starts, in the file.
    at: u64,
    /// The file's bytes from `at` on, while fewer than [`Mp3Walk::need`] have arrived.
    pending: Vec<u8>,
    phase: Mp3Phase,
    nanos: u128,
    frames: u64,
    claimed: Option<u128>,
    /// The last frame header read, its length and its duration (ns).
    last: ([u8; 4], u64, u64),
}

impl Mp3Walk {
    /// Bytes read where the walk stands: a tag head, a first frame up to its VBRI tag's
    /// frame count, or a frame header.
    fn need(&self) -> usize {
        match self.phase {
            Mp3Phase::Tags => 10,
            Mp3Phase::Frames if self.frames == 0 => 54,
            _ => 4,
        }
    }

    /// The file's bytes from offset `off`, following the bytes fed before.
    fn feed(&mut self, off: u64, piece: &[u8]) {
        let end = off + piece.len() as u64;
        while matches!(self.phase, Mp3Phase::Tags | Mp3Phase::Frames) {
            self.repeat_frames(off, piece);
            let next = self.at + self.pending.len() as u64;
            if next >= end {
                return;
            }
            let from = next.saturating_sub(off) as usize;
            let need = self.need();
            if self.pending.is_empty() && piece.len() - from >= need {
                self.step(&piece[from..]);
                continue;
            }
            if self.pending.len() < need {
                let take = (need - self.pending.len()).min(piece.len() - from);
                self.pending.extend_from_slice(&piece[from..from + take]);
                if self.pending.len() < need {
                    return;
                }
            }
            let h = std::mem::take(&mut self.pending);
            let from = self.at;
            self.step(&h);
            // Still within these bytes (the tags ended where the frames begin): kept.
            if let Some(rest) = h.get((self.at - from) as usize..) {
                self.pending.extend_from_slice(rest);
            }
        }
    }

    /// Walks the frames that repeat the last header read (all of a constant-bitrate file's
    /// but the padded ones) in one tight loop over `piece` (the file's bytes from `off`):
    /// what [`Mp3Walk::step`] does for each, with their durations summed once. A 10 MB
    /// upload has about 24,000 of them.
    fn repeat_frames(&mut self, off: u64, piece: &[u8]) {
        if self.frames == 0 || !self.pending.is_empty() || self.phase != Mp3Phase::Frames {
            return;
        }
        let (head, len, nanos) = self.last;
        let Some(mut i) = self.at.checked_sub(off).map(|i| i as usize) else {
            return;
        };
        let mut n = 0u64;
        while piece.get(i..i + 4) == Some(&head[..]) {
            i += len as usize;
            n += 1;
        }
        self.at += n * len;
        self.frames += n;
        self.nanos += u128::from(nanos) * u128::from(n);
    }

    /// Reads the tag or frame at `at`, whose bytes (at least `need`, or all that are left
    /// of the file) start `h`.
    fn step(&mut self, h: &[u8]) {
        match self.phase {
            Mp3Phase::Tags if h.get(..3) == Some(b"ID3") => {
                let Some(h) = h.get(..10) else {
                    self.phase = Mp3Phase::Unknown;
                    return;
                };
                if h[6..10].iter().any(|b| b & 0x80 != 0) {
                    self.phase = Mp3Phase::Unknown;
                    return;
                }
                let size = h[6..10]
                    .iter()
                    .fold(0u64, |acc, &b| (acc << 7) | u64::from(b));
                let footer = if h[5] & 0x10 != 0 { 10 } else { 0 };
                self.at += 10 + size + footer;
            }
            Mp3Phase::Tags => self.phase = Mp3Phase::Frames,
            // The same header as the frame before (a constant-bitrate file: all but the
            // padding bit): the same length and duration, without decoding it again.
            Mp3Phase::Frames if self.frames > 0 && h.get(..4) == Some(&self.last.0[..]) => {
                self.nanos += u128::from(self.last.2);
                self.frames += 1;
                self.at += self.last.1;
            }
            Mp3Phase::Frames => match mpeg_header(h) {
                MpegHeader::Frame {
                    len,
                    samples,
                    rate,
                    side_info,
                } => {
                    let nanos = (u64::from(samples) * 1_000_000_000).div_ceil(u64::from(rate));
                    self.nanos += u128::from(nanos);
                    if let Some(&[a, b, c, d]) = h.get(..4) {
                        self.last = ([a, b, c, d], len.max(1) as u64, nanos);
                    }
                    if self.frames == 0 {
                        self.claimed = vbr_tag_frames(h, side_info).map(|n| {
                            (u128::from(n) * u128::from(samples) * 1_000_000_000)
                                .div_ceil(u128::from(rate))
                        });
                    }
                    self.frames += 1;
                    self.at += len.max(1) as u64;
                }
                MpegHeader::FreeFormat => self.phase = Mp3Phase::Unknown,
                MpegHeader::NotAFrame if self.frames == 0 => self.phase = Mp3Phase::Unknown,
                MpegHeader::NotAFrame => self.phase = Mp3Phase::Tail(self.at),
            },
            Mp3Phase::Tail(_) | Mp3Phase::Unknown => {}
        }
    }

    /// The bound of a file of `len` bytes, all of them fed.
    fn finish(&self, len: u64) -> Option<u64> {
        let mut w = self.clone();
        // The bytes still pending are the file's last ones: read what starts in them.
        let base = w.at;
        let rest = std::mem::take(&mut w.pending);
        while matches!(w.phase, Mp3Phase::Tags | Mp3Phase::Frames) && w.at < len {
            let Some(h) = rest.get((w.at - base) as usize..) else {
                break;
            };
            w.step(h);
        }
        match w.phase {
            Mp3Phase::Tags | Mp3Phase::Unknown => return None,
            Mp3Phase::Tail(start) => {
                let tail = len.saturating_sub(start);
                if tail > MAX_TAIL as u64 {
                    return None;
                }
                w.nanos += u128::from(tail * MAX_MS_PER_BYTE) * 1_000_000;
            }
            Mp3Phase::Frames => {}
        }
        if w.frames == 0 {
            return None;
        }
        let ms = w.nanos.max(w.claimed.unwrap_or(0)).div_ceil(1_000_000);
        Some(u64::try_from(ms).unwrap_or(u64::MAX))
    }
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
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn any_cuts_give_the_bound_of_the_whole(
            which in 0usize..25,
            cuts in proptest::collection::vec(0usize..50_000, 0..8),
        ) {
            let all = fixtures();
            let f = &all[which % all.len()];
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(f.len())).collect();
            cuts.sort_unstable();
            let mut scan = AudioScan::default();
            let mut prev = 0;
            for c in cuts.into_iter().chain([f.len()]) {
                scan.feed(&f[prev..c]);
                prev = c;
            }
            prop_assert_eq!(scan.finish(), duration_bound_ms(f));
        }
    }

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

    /// A `fmt ` chunk of PCM: (channels, sample rate, byte rate, block align, bits).
    fn fmt_chunk(channels: u16, rate: u32, byte_rate: u32, align: u16, bits: u16) -> Vec<u8> {
        let mut f = b"fmt ".to_vec();
        f.extend_from_slice(&16u32.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&channels.to_le_bytes());
        f.extend_from_slice(&rate.to_le_bytes());
        f.extend_from_slice(&byte_rate.to_le_bytes());
        f.extend_from_slice(&align.to_le_bytes());
        f.extend_from_slice(&bits.to_le_bytes());
        f
    }

    fn wav_of(fmts: &[Vec<u8>], data_len: usize) -> Vec<u8> {
        let mut f = b"RIFF\0\0\0\0WAVE".to_vec();
        for fmt in fmts {
            f.extend_from_slice(fmt);
        }
        f.extend_from_slice(b"data");
        f.extend_from_slice(&(data_len as u32).to_le_bytes());
        f.resize(f.len() + data_len, 0);
        f
    }

    /// FFmpeg plays PCM at sample rate x channels x bytes per sample, whatever the byte
    /// rate and block align say, and reads the first of two `fmt ` chunks: a black-box
    /// audit shrank 12.5 s of 8-bit mono 8 kHz to a 13 ms bound with a large block align and
    /// byte rate, and to 17 ms with a fast second `fmt `. The bound is the slowest reading.
    #[test]
    fn no_header_field_or_second_fmt_shortens_the_bound() {
        let honest = fmt_chunk(1, 8_000, 8_000, 1, 8);
        assert_eq!(
            wav_duration_ms(&wav_of(std::slice::from_ref(&honest), 100_000)),
            Some(12_500)
        );
        let inflated = fmt_chunk(1, 8_000, 8_000_000, 1000, 8);
        assert_eq!(wav_duration_ms(&wav_of(&[inflated], 100_000)), Some(12_500));
        let fast = fmt_chunk(8, 192_000, 24_576_000, 32, 32);
        for order in [[honest.clone(), fast.clone()], [fast, honest]] {
            assert_eq!(wav_duration_ms(&wav_of(&order, 100_000)), Some(12_500));
        }
        // 24-bit samples in 4-byte frames: FFmpeg reads 3-byte samples, the longer playing.
        let padded = fmt_chunk(2, 48_000, 384_000, 8, 24);
        assert_eq!(wav_duration_ms(&wav_of(&[padded], 288_000)), Some(1_000));
    }

    #[test]
    fn reads_the_duration_from_the_bytes_present() {
        assert_eq!(wav_duration_ms(&wav(64_000, 64_000)), Some(2_000));
        assert_eq!(wav_duration_ms(&wav(32_001, 32_001)), Some(1_001)); // rounded up
                                                                        // A header claiming more audio than the file holds: only what is there counts.
        assert_eq!(wav_duration_ms(&wav(16_000, 3_200_000)), Some(500));
    }

    #[test]
    fn a_lying_header_cannot_shorten_the_bound() {
        // A byte rate 500 times what 16 kHz mono 16-bit plays: the samples' own rate counts.
        let mut fast = wav(64_000, 64_000);
        fast[28..32].copy_from_slice(&16_000_000u32.to_le_bytes());
        assert_eq!(wav_duration_ms(&fast), Some(2_000));
        // A block align doubled (as if stereo) while the byte rate says mono: the lower rate.
        let mut wide = wav(64_000, 64_000);
        wide[32..34].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(wav_duration_ms(&wide), Some(2_000));
        // A `data` chunk that claims less than follows it: every byte to the end counts.
        assert_eq!(wav_duration_ms(&wav(64_000, 1_600)), Some(2_000));
        // A second `data` chunk after a short first one: counted too (its 8-byte head with it).
        let mut two = wav(1_600, 1_600);
        two.extend_from_slice(b"data");
        two.extend_from_slice(&62_400u32.to_le_bytes());
        two.resize(two.len() + 62_400, 0);
        assert_eq!(wav_duration_ms(&two), Some(2_001));
        // Compressed samples (IMA ADPCM, MP3 in a WAV): no bound from the header.
        for tag in [0x0011u16, 0x0055] {
            let mut packed = wav(64_000, 64_000);
            packed[20..22].copy_from_slice(&tag.to_le_bytes());
            assert_eq!(wav_duration_ms(&packed), None, "{tag:#x}");
        }
        // Float and extensible are fixed-size frames like PCM.
        for tag in [0x0003u16, 0xFFFE] {
            let mut f = wav(64_000, 64_000);
            f[20..22].copy_from_slice(&tag.to_le_bytes());
            assert_eq!(wav_duration_ms(&f), Some(2_000), "{tag:#x}");
        }
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

    /// Every file of these tests, and a few more cut at awkward places.
    fn fixtures() -> Vec<Vec<u8>> {
        let mut all = vec![
            mp3(100),
            mp3(1),
            wav(64_000, 64_000),
            wav(16_000, 3_200_000),
            wav(0, 0)[..30].to_vec(),
            b"ID3\x03not a wav".to_vec(),
            Vec::new(),
            b"ID3".to_vec(),
            b"\xFF\xFB".to_vec(),
        ];
        let mut tagged = id3v2(20);
        tagged.extend(id3v2(5));
        tagged.extend(mp3(100));
        tagged.extend_from_slice(b"TAG");
        tagged.resize(tagged.len() + 125, b' ');
        all.push(tagged);
        let cut = mp3(10);
        all.push(cut[..cut.len() - 100].to_vec());
        let mut gap = mp3(10);
        gap.extend(vec![0u8; 5000]);
        gap.extend(mp3(10));
        all.push(gap);
        let mut tail = mp3(10);
        tail.extend(vec![0u8; 4096]);
        all.push(tail.clone());
        tail.push(0);
        all.push(tail);
        let mut free = mp3(10);
        free.extend_from_slice(&[0xFF, 0xFB, 0x00, 0x00]);
        free.resize(free.len() + 400, 0);
        all.push(free);
        let mut late = vec![0u8; 3];
        late.extend(mp3(10));
        all.push(late);
        let mut long_tag = id3v2(20);
        long_tag[9] = 0x7F;
        all.push(long_tag);
        all.push(id3v2(20));
        let mut xing = mp3(10);
        xing[36..40].copy_from_slice(b"Xing");
        xing[40..44].copy_from_slice(&1u32.to_be_bytes());
        xing[44..48].copy_from_slice(&1_000u32.to_be_bytes());
        all.push(xing);
        let mut low = vec![0xFF, 0xF3, 0x18, 0xC0];
        low.resize(36, 0);
        all.push(low.repeat(10));
        all.push(low[..20].to_vec());
        all
    }

    fn in_pieces(file: &[u8], size: usize) -> Option<u64> {
        let mut scan = AudioScan::default();
        for piece in file.chunks(size.max(1)) {
            scan.feed(piece);
        }
        scan.finish()
    }

    #[test]
    fn the_head_settles_once_it_can_tell_all_a_bound_before_the_end_can() {
        let settled_after = |file: &[u8]| {
            let mut scan = AudioScan::default();
            for (i, b) in file.iter().enumerate() {
                if scan.head_settled() {
                    return Some(i);
                }
                scan.feed(std::slice::from_ref(b));
            }
            scan.head_settled().then_some(file.len())
        };
        // No WAV: its first 12 bytes say so.
        assert_eq!(settled_after(&[0xFF; 100]), Some(WAV_MAGIC_LEN));
        // A WAV: once its `data` chunk's header is in, and the bound it gives is the one
        // the whole file's opening gives.
        let w = wav(32_000, 32_000);
        let data_at = w.windows(4).position(|x| x == b"data").unwrap();
        assert_eq!(settled_after(&w), Some(data_at + 8));
        let mut scan = AudioScan::default();
        scan.feed(&w[..data_at + 8]);
        assert_eq!(scan.wav_bound_within(w.len() as u64), Some(1_000));
        // A WAV whose `data` chunk comes after more than the walk keeps: at what it keeps.
        let mut padded = w[..12].to_vec();
        padded.extend_from_slice(b"LIST");
        padded.extend_from_slice(&(70_000u32).to_le_bytes());
        padded.resize(padded.len() + 70_000, 0);
        padded.extend_from_slice(&w[12..]);
        assert_eq!(settled_after(&padded), Some(HEAD_KEEP));
        // Cut short before either: never.
        assert_eq!(settled_after(&w[..data_at + 7]), None);
    }

    #[test]
    fn a_file_in_pieces_has_the_bound_of_the_whole() {
        for (i, f) in fixtures().iter().enumerate() {
            let whole = duration_bound_ms(f);
            for size in [
                1,
                2,
                3,
                4,
                5,
                9,
                10,
                11,
                53,
                54,
                55,
                416,
                417,
                418,
                4096,
                1 << 20,
            ] {
                assert_eq!(in_pieces(f, size), whole, "fixture {i}, pieces of {size}");
            }
        }
        // A WAV's header bounds it before its end: what fits in the bytes left (56 bytes of
        // header), whatever its `data` chunk claims (a decoder may play past a short claim).
        let mut scan = AudioScan::default();
        scan.feed(&wav(64_000, 64_000)[..100]);
        assert_eq!(scan.wav_bound_within(1_000_000), Some(31_249));
        assert_eq!(scan.wav_bound_within(32_044), Some(1_000));
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
