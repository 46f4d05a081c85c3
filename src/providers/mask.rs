//! Masks the operator's provider account in upstream error bodies passed to agents (SPEC
//! §2): organization (`org-…`), project (`proj_…`) and key (`sk-…`) identifiers keep their
//! prefix and length, their characters become `*`. Length is kept so a `Content-Length`
//! stays true; status, `type` and `code` are untouched (their values are not identifiers).

use std::sync::LazyLock;

use arc_swap::ArcSwap;

const PREFIXES: [&[u8]; 3] = [b"org-", b"proj_", b"sk-"];

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// The operator's provider keys, as the configuration last loaded them from their
/// variables. An upstream may echo the key it got (`Incorrect API key provided: gsk_…`), and
/// many providers' keys have no prefix the scan above knows (`gsk_`, `xai-`, `fw_`, none):
/// every one of these is masked wherever it appears, whatever it looks like.
static PROVIDER_KEYS: LazyLock<ArcSwap<Vec<Box<[u8]>>>> = LazyLock::new(ArcSwap::default);
/// A key this short could be a placeholder (`not-needed`, `dummy-key-1`, for a local model
/// server) or an ordinary word of an error message: left alone. Real provider keys are
/// longer (OpenAI's, Anthropic's, Groq's, xAI's: 40 to 100+ characters).
const MIN_KEY_BYTES: usize = 16;
/// How much of a masked provider key stays readable: enough to tell which key it was.
const KEY_SHOWN_BYTES: usize = 4;

/// Adds provider keys to mask (a config loaded them; see [`PROVIDER_KEYS`]). Keys are
/// added, never dropped: one a reload replaced may still be in use by requests in flight,
/// or by this process again should that reload fail, and masking it costs nothing.
pub fn know_provider_keys<'a>(keys: impl IntoIterator<Item = &'a str>) {
    let fresh: Vec<&str> = keys
        .into_iter()
        .filter(|k| k.len() >= MIN_KEY_BYTES)
        .collect();
    PROVIDER_KEYS.rcu(|known| {
        let mut all: Vec<Box<[u8]>> = known.iter().cloned().collect();
        all.extend(fresh.iter().map(|k| Box::<[u8]>::from(k.as_bytes())));
        // Longest first: a key inside a longer one must not mask part of the longer one
        // first, which would then no longer be found whole.
        all.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        all.dedup();
        all
    });
}

/// The keys `config` loaded ([`crate::config::Config::load_provider_keys`]) are the ones
/// to mask from now on.
pub fn know_provider_keys_of(config: &crate::config::Config) {
    know_provider_keys(
        config
            .providers
            .iter()
            .flat_map(|p| p.keys.iter().map(|(_, key)| key.as_str())),
    );
}

/// Masks every known provider key in `bytes` past its first few bytes. Returns whether
/// anything changed.
fn mask_provider_keys(bytes: &mut [u8]) -> bool {
    let known = PROVIDER_KEYS.load();
    let mut changed = false;
    for key in known.iter() {
        let mut from = 0;
        while let Some(at) = memchr::memmem::find(&bytes[from..], key) {
            let start = from + at;
            bytes[start + KEY_SHOWN_BYTES..start + key.len()].fill(b'*');
            changed = true;
            from = start + key.len();
        }
    }
    changed
}

/// Masks every identifier and known provider key in `bytes`, in place. Returns whether
/// anything changed.
pub fn mask_account_ids(bytes: &mut [u8]) -> bool {
    let mut changed = mask_provider_keys(bytes);
    let mut i = 0;
    while i < bytes.len() {
        let at_boundary = i == 0 || !is_id_byte(bytes[i - 1]);
        let prefix = PREFIXES
            .iter()
            .find(|p| at_boundary && bytes[i..].starts_with(p));
        let Some(prefix) = prefix else {
            i += 1;
            continue;
        };
        let start = i + prefix.len();
        let mut end = start;
        while end < bytes.len() && is_id_byte(bytes[end]) {
            end += 1;
        }
        // A bare word such as "sk-" alone, or a short one ("org-a"), names nothing.
        if end - start >= 3 {
            bytes[start..end].fill(b'*');
            changed = true;
        }
        i = end.max(i + 1);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(s: &str) -> String {
        let mut b = s.as_bytes().to_vec();
        mask_account_ids(&mut b);
        String::from_utf8(b).unwrap()
    }

    #[test]
    fn identifiers_keep_their_prefix_and_length_only() {
        let body = r#"{"error":{"message":"Request too large for gpt-4o in organization org-AbC123xyz on tokens per min (TPM): Limit 30000, Requested 450000. Project proj_Xyz789abc, key sk-proj-abcdef12345.","type":"tokens","code":"rate_limit_exceeded"}}"#;
        let out = masked(body);
        assert_eq!(out.len(), body.len());
        for secret in ["AbC123xyz", "Xyz789abc", "proj-abcdef12345"] {
            assert!(!out.contains(secret), "{out}");
        }
        assert!(out.contains("org-*********"), "{out}");
        assert!(out.contains(r#""code":"rate_limit_exceeded""#), "{out}");
        assert!(out.contains(r#""type":"tokens""#), "{out}");
        assert_eq!(masked("task-org-1 disk-abc"), "task-org-1 disk-abc");
    }

    /// A provider key with no known prefix, echoed by its upstream, is masked too (the only
    /// test in this binary that sets the known keys: they are the process's).
    #[test]
    fn a_configured_provider_key_is_masked_whatever_its_prefix() {
        know_provider_keys([
            "gsk_9f8e7d6c5b4a3928171600",
            "not-needed",
            "xai-ABCDEFGHIJKLMNOP",
            // A key inside a longer one: the longer is still masked whole.
            "abcdefghijklmnop",
            "abcdefghijklmnop0123456789",
        ]);
        let body = r#"{"error":{"message":"Incorrect API key provided: Bearer gsk_9f8e7d6c5b4a3928171600 (xai-ABCDEFGHIJKLMNOP, again gsk_9f8e7d6c5b4a3928171600, abcdefghijklmnop0123456789). not-needed","code":"invalid_api_key"}}"#;
        let out = masked(body);
        assert_eq!(out.len(), body.len());
        assert!(!out.contains("9f8e7d6c5b4a"), "{out}");
        assert!(!out.contains("ABCDEFGHIJKLMNOP"), "{out}");
        assert!(out.contains("Bearer gsk_**********************"), "{out}");
        assert!(out.contains("xai-****************"), "{out}");
        assert!(out.contains(" abcd**********************)"), "{out}");
        assert!(out.contains("). not-needed"), "a placeholder stays: {out}");
        assert!(out.contains(r#""code":"invalid_api_key""#), "{out}");
    }
}
