//! Masks the operator's provider account in upstream error bodies passed to agents (SPEC
//! §2): organization (`org-…`), project (`proj_…`) and key (`sk-…`) identifiers keep their
//! prefix and length, their characters become `*`. Length is kept so a `Content-Length`
//! stays true; status, `type` and `code` are untouched (their values are not identifiers).

const PREFIXES: [&[u8]; 3] = [b"org-", b"proj_", b"sk-"];

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Masks every identifier in `bytes`, in place. Returns whether anything changed.
pub fn mask_account_ids(bytes: &mut [u8]) -> bool {
    let mut changed = false;
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
}
