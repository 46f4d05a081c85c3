//! Agent key secrets: minting from the OS CSPRNG, strict format checks, SHA-256 digests.

use sha2::{Digest, Sha256};

pub const TOKEN_PREFIX: &str = "spideriq_pat_";
const HEX_LEN: usize = 32;
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + HEX_LEN;

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

/// True only for the exact shape `spideriq_pat_` + 32 lowercase hex characters.
/// Checked before any lookup, so malformed input never reaches a map or the database.
pub fn is_well_formed(token: &str) -> bool {
    token.len() == TOKEN_LEN
        && token.starts_with(TOKEN_PREFIX)
        && token.as_bytes()[TOKEN_PREFIX.len()..]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
}

/// Extracts a well-formed token from an `Authorization` header value.
pub fn from_authorization(value: &[u8]) -> Option<&str> {
    let rest = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "))?;
    let token = std::str::from_utf8(rest).ok()?.trim();
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
    }
}
