//! Agent key secrets: minting from the OS CSPRNG, strict format checks, SHA-256 digests.

use std::borrow::Cow;

use sha2::{Digest, Sha256};

pub const TOKEN_PREFIX: &str = "spideriq_pat_";
const HEX_LEN: usize = 32;
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + HEX_LEN;

/// `text` with the hex digits after each `spideriq_pat_` in it replaced by `[redacted]`: for
/// what a client wrote where a name belongs (a request's `model`, a path's model id), which
/// an error body, a trace and the logs repeat. SPEC §1: the secret never appears there,
/// however the client misplaced it. A cut-off secret is still most of one, so any digits
/// go. Text without the prefix comes back as it is, without a copy.
pub fn redact_secrets(text: &str) -> Cow<'_, str> {
    const REDACTED: &str = "[redacted]";
    if text.len() < TOKEN_PREFIX.len() || !text.contains(TOKEN_PREFIX) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(TOKEN_PREFIX) {
        let after = at + TOKEN_PREFIX.len();
        out.push_str(&rest[..after]);
        let digits = rest[after..]
            .bytes()
            .take_while(u8::is_ascii_hexdigit)
            .count();
        if digits > 0 {
            out.push_str(REDACTED);
        }
        rest = &rest[after + digits..];
    }
    out.push_str(rest);
    Cow::Owned(out)
}

/// SHA-256 of a whole secret; the only form in which a secret is ever stored.
pub type TokenHash = [u8; 32];

/// A freshly minted key: the secret (shown once) and what is stored.
pub struct MintedToken {
    pub secret: String,
    pub hash: TokenHash,
    /// First 4 hex characters after the prefix, for display.
    pub prefix: String,
}

fn random_hex(bytes: usize) -> std::io::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::getrandom(&mut buf).map_err(std::io::Error::other)?;
    Ok(hex(&buf))
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// Mints `spideriq_pat_` + 32 lowercase hex characters (128 bits from the OS CSPRNG).
pub fn mint() -> std::io::Result<MintedToken> {
    let secret = format!("{TOKEN_PREFIX}{}", random_hex(16)?);
    let hash = hash_token(&secret);
    let prefix = secret[TOKEN_PREFIX.len()..TOKEN_PREFIX.len() + 4].to_string();
    Ok(MintedToken {
        secret,
        hash,
        prefix,
    })
}

/// A public key id, independent of the secret: `key_` + 16 hex characters.
pub fn new_key_id() -> std::io::Result<String> {
    Ok(format!("key_{}", random_hex(8)?))
}

pub fn hash_token(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

/// How many tokens a thread's [`TokenMemo`] remembers before it starts over.
const MEMO_CAPACITY: usize = 4096;

/// The SHA-256 digests of the tokens this thread has seen authenticate, so a key's every
/// request does not hash its secret again (SHA-256 is ~4k instructions in software; a
/// lookup here is two SipHash rounds over 45 bytes).
///
/// Entries are keyed by a 128-bit SipHash of the token under a random per-thread key, so
/// no secret is kept in memory, and an attacker who cannot read this process's memory
/// cannot aim a token at another's entry. It memoizes a pure function and decides
/// nothing: revocation, expiry and every other check still run on the digest. Only
/// tokens that matched a key are remembered ([`TokenMemo::remember`]), so a flood of
/// made-up tokens cannot evict the real ones. Thread-local: no lock on the request path.
pub struct TokenMemo {
    sip_key: [u8; 16],
    digests: std::collections::HashMap<u128, TokenHash, PassThrough>,
}

/// The map's hasher: its keys are already keyed SipHash outputs.
#[derive(Default, Clone, Copy)]
pub struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u128` is used; fold anything else in rather than drop it.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

impl std::hash::BuildHasher for PassThrough {
    type Hasher = PassThrough;
    fn build_hasher(&self) -> PassThrough {
        PassThrough(0)
    }
}

impl TokenMemo {
    fn new() -> TokenMemo {
        let mut sip_key = [0u8; 16];
        // Without the OS generator the memo still works; it is the digest that authenticates.
        let _ = getrandom::getrandom(&mut sip_key);
        TokenMemo {
            sip_key,
            digests: std::collections::HashMap::with_hasher(PassThrough(0)),
        }
    }

    fn tag(&self, token: &str) -> u128 {
        use siphasher::sip128::{Hasher128, SipHasher13};
        let mut h = SipHasher13::new_with_key(&self.sip_key);
        std::hash::Hasher::write(&mut h, token.as_bytes());
        h.finish128().as_u128()
    }

    /// The token's digest: remembered (`None`), or computed now with the tag under which
    /// [`TokenMemo::remember`] keeps it once it has matched a key.
    pub fn digest(token: &str) -> (TokenHash, Option<MemoTag>) {
        let (known, tag) = MEMO.with_borrow(|m| {
            let tag = m.tag(token);
            (m.digests.get(&tag).copied(), tag)
        });
        match known {
            Some(d) => (d, None),
            None => (hash_token(token), Some(MemoTag(tag))),
        }
    }

    /// Remembers a digest that matched a key.
    pub fn remember(tag: MemoTag, digest: &TokenHash) {
        MEMO.with_borrow_mut(|m| {
            if m.digests.len() >= MEMO_CAPACITY {
                m.digests.clear();
            }
            m.digests.insert(tag.0, *digest);
        });
    }
}

/// Where a token's digest goes in this thread's [`TokenMemo`].
#[derive(Debug, Clone, Copy)]
pub struct MemoTag(u128);

thread_local! {
    static MEMO: std::cell::RefCell<TokenMemo> = std::cell::RefCell::new(TokenMemo::new());
}

/// True only for the exact shape `spideriq_pat_` + 32 lowercase hex characters.
/// Checked before any lookup, so malformed input never reaches a map or the database.
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        // Every byte looked up, without stopping at the first bad one: a loop without a
        // branch per byte (the early-exit form cost ~300 instructions a request).
        && token.as_bytes()[TOKEN_PREFIX.len()..]
            .iter()
            .fold(true, |ok, &b| ok & LOWER_HEX[usize::from(b)])
}

/// Which bytes are lowercase hex digits.
const LOWER_HEX: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = matches!(b as u8, b'0'..=b'9' | b'a'..=b'f');
        b += 1;
    }
    t
};

/// The credentials of an `Authorization` header value in the `Bearer` scheme, whose name
/// is case-insensitive (RFC 9110 §11.1): `Bearer`, `bearer` and `BEARER` all count.
pub fn bearer(value: &[u8]) -> Option<&[u8]> {
    let (scheme, rest) = value.split_at_checked(7)?;
    scheme.eq_ignore_ascii_case(b"bearer ").then_some(rest)
}

/// Extracts a well-formed token from an `Authorization` header value.
pub fn from_authorization(value: &[u8]) -> Option<&str> {
    let token = std::str::from_utf8(bearer(value)?).ok()?.trim();
    is_well_formed(token).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_well_formed_and_distinct() {
        let a = mint().unwrap();
        let b = mint().unwrap();
        assert!(is_well_formed(&a.secret), "{}", a.secret);
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash_token(&a.secret));
        assert_eq!(a.prefix, &a.secret[13..17]);
    }

    #[test]
    fn secrets_written_as_names_are_redacted_and_other_text_is_not_copied() {
        let s = "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d";
        assert_eq!(redact_secrets(s), "spideriq_pat_[redacted]");
        assert_eq!(
            redact_secrets(&format!("x/{s}:{s}!")),
            "x/spideriq_pat_[redacted]:spideriq_pat_[redacted]!"
        );
        // A cut-off secret, and the prefix with nothing after it.
        assert_eq!(
            redact_secrets("spideriq_pat_0a1b2c3d4e5"),
            "spideriq_pat_[redacted]"
        );
        assert_eq!(redact_secrets("spideriq_pat_"), "spideriq_pat_");
        for plain in [
            "gpt-4o-mini",
            "",
            "spideriq_pa",
            "claude-sonnet-4-5-20250929",
        ] {
            assert!(matches!(redact_secrets(plain), Cow::Borrowed(t) if t == plain));
        }
        // Multi-byte text around it stays whole.
        assert_eq!(
            redact_secrets(&format!("é{s}ü")),
            "éspideriq_pat_[redacted]ü"
        );
    }

    fn hex(h: &TokenHash) -> String {
        h.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Known answers, not the function against itself: FIPS 180-2's "abc" vector, and a
    /// token's digest as coreutils' `sha256sum` prints it.
    #[test]
    fn the_stored_hash_is_plain_sha256_of_the_secret() {
        assert_eq!(
            hex(&hash_token("abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&hash_token("spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d")),
            "497530f2c0a10c3d49fde9230a7df19817b20b258df3862c0595ea4b3eaad278"
        );
    }

    proptest::proptest! {
        /// The table agrees with the shape's plain definition on any text, mostly near-tokens.
        #[test]
        fn well_formed_is_the_prefix_and_32_lowercase_hex(
            body in "[0-9a-fA-F\\x00-\\x7f\u{80}-\u{10ffff}]{30,34}",
            prefix in proptest::sample::select(vec![TOKEN_PREFIX, "spideriq_pat", "spideriq_PAT_", ""]),
        ) {
            let token = format!("{prefix}{body}");
            let plain = token.len() == TOKEN_LEN
                && token.starts_with(TOKEN_PREFIX)
                && token[TOKEN_PREFIX.len()..]
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            proptest::prop_assert_eq!(is_well_formed(&token), plain, "{:?}", token);
        }
    }

    #[test]
    fn every_byte_is_judged_alone() {
        let ok = *b"spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d";
        for at in TOKEN_PREFIX.len()..TOKEN_LEN {
            for b in 0..=255u8 {
                let mut t = ok;
                t[at] = b;
                let Ok(token) = std::str::from_utf8(&t) else {
                    continue;
                };
                let want = b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
                assert_eq!(is_well_formed(token), want, "byte {b:#x} at {at}");
            }
        }
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let ok = "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d";
        assert!(is_well_formed(ok));
        for bad in [
            "",
            "spideriq_pat_",
            "spideriq_pat_0A1B2C3D4E5F6A7B8C9D0E1F2A3B4C5D",
            "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5",
            "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d0",
            "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5g",
            "sk-0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d0a1b2c3d4e5f",
            "spideriq_pat_' OR 1=1 --aaaaaaaaaaaaaaaaaaaaa",
        ] {
            assert!(!is_well_formed(bad), "{bad}");
        }
        assert_eq!(
            from_authorization(format!("Bearer {ok}").as_bytes()),
            Some(ok)
        );
        assert_eq!(from_authorization(ok.as_bytes()), None);
        assert_eq!(from_authorization(b"Bearer \xff\xfe"), None);
        for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
            let value = format!("{scheme} {ok}");
            assert_eq!(from_authorization(value.as_bytes()), Some(ok), "{scheme}");
        }
        for not in ["Basic", "Bearer_", "Bearerx"] {
            let value = format!("{not} {ok}");
            assert_eq!(from_authorization(value.as_bytes()), None, "{not}");
        }
    }

    #[test]
    fn the_memo_gives_each_token_its_own_digest_and_remembers_only_when_told() {
        let a = "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d";
        let b = "spideriq_pat_0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5e";
        // Independent oracle: SHA-256 of the secret, from the sha2 crate directly.
        let sha = |t: &str| -> TokenHash { Sha256::digest(t.as_bytes()).into() };
        let (d, tag) = TokenMemo::digest(a);
        assert_eq!(d, sha(a));
        let tag = tag.expect("not remembered before it matched a key");
        assert!(
            TokenMemo::digest(a).1.is_some(),
            "digest alone remembers nothing"
        );
        TokenMemo::remember(tag, &d);
        let (again, tag) = TokenMemo::digest(a);
        assert_eq!(again, sha(a));
        assert!(tag.is_none(), "remembered once it matched");
        // One character apart: a different entry, computed afresh.
        let (db, tb) = TokenMemo::digest(b);
        assert_eq!(db, sha(b));
        assert!(tb.is_some());
    }

    #[test]
    fn the_memo_starts_over_when_full() {
        let token = |i: usize| format!("{TOKEN_PREFIX}{i:032x}");
        for i in 0..=MEMO_CAPACITY {
            let t = token(i);
            let (d, tag) = TokenMemo::digest(&t);
            if let Some(tag) = tag {
                TokenMemo::remember(tag, &d);
            }
        }
        let last = token(MEMO_CAPACITY);
        let (d, tag) = TokenMemo::digest(&last);
        assert_eq!(d, hash_token(&last));
        assert!(tag.is_none(), "the newest entry survives the restart");
        MEMO.with_borrow(|m| assert!(m.digests.len() <= MEMO_CAPACITY));
    }
}
