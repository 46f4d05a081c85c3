//! Translation between OpenAI chat completions and Anthropic Messages, both ways, requests
//! and responses, JSON and SSE. A client speaking one shape can reach a model of the other
//! kind with the same controls and accounting. What cannot be translated is refused with
//! 400 `invalid_request`, never silently dropped.

pub mod chat_to_messages;
pub mod messages_to_chat;

/// Whether the golden tests rewrite their expected files: only with
/// `SPIDERGATE_BLESS_GOLDEN=1`, and never in CI (`scripts/test.sh` refuses the variable and
/// fails when a golden file changes).
#[cfg(test)]
fn bless_golden() -> bool {
    let bless = std::env::var_os("SPIDERGATE_BLESS_GOLDEN").is_some_and(|v| v == "1");
    assert!(
        !(bless && std::env::var_os("CI").is_some()),
        "SPIDERGATE_BLESS_GOLDEN is set in CI: golden files are blessed by hand, never by CI"
    );
    bless
}
