//! What a real provider bills beyond the request body, as its documentation describes it,
//! for `x-mock-prompt-tokens: bytes`: stored context, server-side tool results, files, and
//! Anthropic's tool-use system prompt. Independent of the gateway's own bound on purpose:
//! tests compare the gateway's charges against this.

use serde_json::Value;

/// Anthropic's tool-use system prompt for `tool_choice` `auto` / `none` (Claude 4 models, per
/// its pricing documentation), and for `any` / `tool`.
pub(crate) const ANTHROPIC_TOOL_PROMPT_AUTO: u64 = 346;
pub(crate) const ANTHROPIC_TOOL_PROMPT_ANY: u64 = 313;
/// Hidden definitions of Anthropic's own client tools, per its documentation.
const ANTHROPIC_BASH: u64 = 245;
const ANTHROPIC_TEXT_EDITOR: u64 = 700;
/// Computer use: its system prompt plus the tool's definition.
const ANTHROPIC_COMPUTER: u64 = 499 + 735;

/// The sizes the provider adds, steered by knobs (defaults: a long stored conversation, a
/// search that returns several pages, a multi-page PDF).
#[derive(Clone, Copy)]
pub(crate) struct HiddenSizes {
    /// `x-mock-stored-tokens`: a stored response, conversation or prompt template.
    pub(crate) stored: u64,
    /// `x-mock-server-tool-tokens`: each server-side tool's results fed back as input.
    pub(crate) server_tool: u64,
    /// `x-mock-file-tokens`: each file, document or stored-item part.
    pub(crate) file: u64,
}

impl Default for HiddenSizes {
    fn default() -> Self {
        HiddenSizes {
            stored: 50_000,
            server_tool: 30_000,
            file: 20_000,
        }
    }
}

/// Which API is billing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Api {
    OpenAi,
    Anthropic,
}

/// Input tokens the provider adds to what the body shows.
pub(crate) fn hidden_input(body: &[u8], api: Api, sizes: &HiddenSizes) -> u64 {
    let Ok(Value::Object(top)) = serde_json::from_slice::<Value>(body) else {
        return 0;
    };
    let mut hidden = 0u64;
    let present = |k: &str| {
        top.get(k)
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
    };
    for field in ["previous_response_id", "conversation", "prompt"] {
        if present(field) {
            hidden = hidden.saturating_add(sizes.stored);
        }
    }
    for field in ["mcp_servers", "container", "web_search_options"] {
        if present(field) {
            hidden = hidden.saturating_add(sizes.server_tool);
        }
    }
    let tools = top.get("tools").and_then(Value::as_array);
    for tool in tools.into_iter().flatten() {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("custom");
        hidden = hidden.saturating_add(match kind {
            "function" | "custom" => 0,
            k if k.starts_with("bash_") => ANTHROPIC_BASH,
            k if k.starts_with("text_editor_") => ANTHROPIC_TEXT_EDITOR,
            k if k.starts_with("computer_") => ANTHROPIC_COMPUTER,
            "local_shell" | "shell" | "apply_patch" => 0,
            _ => sizes.server_tool,
        });
    }
    if api == Api::Anthropic && tools.is_some_and(|t| !t.is_empty()) {
        let forced = top
            .get("tool_choice")
            .and_then(|c| c.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "any" || t == "tool");
        hidden = hidden.saturating_add(if forced {
            ANTHROPIC_TOOL_PROMPT_ANY
        } else {
            ANTHROPIC_TOOL_PROMPT_AUTO
        });
    }
    let files = count_files(&Value::Object(top));
    hidden.saturating_add(files.saturating_mul(sizes.file))
}

/// File, document and stored-item parts at any depth.
fn count_files(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a.iter().map(count_files).sum(),
        Value::Object(o) => {
            let own = o.get("type").and_then(Value::as_str).is_some_and(|t| {
                matches!(t, "input_file" | "file" | "document" | "item_reference")
            });
            u64::from(own) + o.values().map(count_files).sum::<u64>()
        }
        _ => 0,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn bills_what_the_body_does_not_show() {
        let sizes = HiddenSizes::default();
        let h = |b: &str, api| hidden_input(b.as_bytes(), api, &sizes);
        assert_eq!(h(r#"{"model":"m"}"#, Api::OpenAi), 0);
        assert_eq!(h(r#"{"previous_response_id":"r"}"#, Api::OpenAi), 50_000);
        assert_eq!(
            h(r#"{"tools":[{"type":"web_search"}]}"#, Api::OpenAi),
            30_000
        );
        assert_eq!(h(r#"{"tools":[{"name":"f"}]}"#, Api::Anthropic), 346);
        assert_eq!(
            h(
                r#"{"tools":[{"name":"f"}],"tool_choice":{"type":"any"}}"#,
                Api::Anthropic
            ),
            313
        );
        assert_eq!(
            h(
                r#"{"messages":[{"content":[{"type":"document"}]}]}"#,
                Api::Anthropic
            ),
            20_000
        );
    }
}
