//! What a provider bills beyond the request body (SPEC §2): stored context, server-side
//! tools, files and documents, its tool-use system prompt, and `background` runs. The body's
//! bytes bound its own tokens; these do not, so admission bounds them another way (the
//! model's context window, a per-tool overhead) or refuses them for hard-budget keys.

use serde::Deserialize;

/// Top-level fields that make the provider read input the body does not hold: OpenAI's
/// stored responses, conversations and prompt templates (Responses API).
const STORED_CONTEXT: [&str; 3] = ["previous_response_id", "conversation", "prompt"];

/// Top-level fields that run tools on the provider's side, each use billed as more input
/// (search results, fetched pages, tool output) and often a fee: Anthropic's remote MCP
/// servers and code-execution containers, OpenAI chat's web search.
const SERVER_FIELDS: [&str; 3] = ["mcp_servers", "container", "web_search_options"];

/// What the body shows of the input it does not hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hidden {
    /// The first field that makes the provider read stored context or a file the body does
    /// not hold; only the model's context window bounds what it adds.
    pub unseen_input: Option<String>,
    /// The first server-side tool: each of its runs adds input without a bound the gateway
    /// can know, and may add a fee.
    pub server_tool: Option<String>,
    /// The request declares tools: the provider adds its tool-use system prompt.
    pub tools: bool,
    /// Provider-defined client tools (bash, text editor, shell), each with a hidden definition.
    pub provider_tools: u64,
    /// `background: true`: the answer returns before the work is done, without its usage.
    pub background: bool,
}

#[derive(Deserialize)]
struct Tool<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<std::borrow::Cow<'a, str>>,
}

/// What a tool of `kind` adds beyond its definition in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// The client's own function: its definition is in the body.
    Client,
    /// Defined by the provider, run by the client: a fixed hidden definition.
    ProviderDefined,
    /// Run by the provider: web search and fetch, file search, code execution, computer use,
    /// MCP, image generation, and any type not known here.
    Server,
}

/// A tool's `type` (absent for Anthropic's custom tools).
pub fn tool_kind(kind: Option<&str>) -> ToolKind {
    match kind {
        None | Some("function" | "custom") => ToolKind::Client,
        Some("local_shell" | "shell" | "apply_patch") => ToolKind::ProviderDefined,
        Some(k) if k.starts_with("bash_") || k.starts_with("text_editor_") => {
            ToolKind::ProviderDefined
        }
        Some(_) => ToolKind::Server,
    }
}

/// The raw top-level fields `parse_request` found, for [`Hidden::read`].
#[derive(Default)]
pub struct RawHidden<'a> {
    pub tools: Option<&'a str>,
    /// `(name, value)` of the stored-context and server fields present.
    pub named: Vec<(&'static str, &'a str)>,
    pub background: Option<&'a str>,
}

impl<'a> RawHidden<'a> {
    /// Keeps `value` if `name` is one of the fields this module reads.
    pub fn offer(&mut self, name: &str, value: &'a str) {
        if let Some(n) = STORED_CONTEXT
            .iter()
            .chain(SERVER_FIELDS.iter())
            .find(|n| **n == name)
        {
            self.named.push((n, value));
        }
    }
}

fn present(v: &str) -> bool {
    !matches!(v, "null" | "false")
}

impl Hidden {
    /// From the raw fields and the body's file parts (`files`: input files, documents and
    /// references to stored items, found at any depth by the media walk).
    pub fn read(raw: &RawHidden<'_>, files: u64) -> Hidden {
        let mut h = Hidden::default();
        for (name, value) in &raw.named {
            if !present(value) {
                continue;
            }
            if STORED_CONTEXT.contains(name) {
                h.unseen_input.get_or_insert_with(|| (*name).to_string());
            } else {
                h.server_tool.get_or_insert_with(|| (*name).to_string());
            }
        }
        if files > 0 && h.unseen_input.is_none() {
            h.unseen_input = Some("a file, document or stored item part".into());
        }
        if let Some(tools) = raw.tools.filter(|t| *t != "null") {
            // A list serde cannot read (a key given twice, a `type` that is not a string) is
            // one the gateway cannot judge, and a provider may read another way: treated as
            // a server-side tool, refused for a hard-budget key.
            let list = serde_json::from_str::<Vec<Tool<'_>>>(tools);
            h.tools = list.as_ref().map_or(true, |l| !l.is_empty());
            if list.is_err() {
                h.server_tool.get_or_insert_with(|| {
                    "tools (a list that cannot be read one way only)".into()
                });
            }
            for (i, t) in list.iter().flatten().enumerate() {
                match tool_kind(t.kind.as_deref()) {
                    ToolKind::Client => {}
                    ToolKind::ProviderDefined => h.provider_tools += 1,
                    ToolKind::Server => {
                        let kind = t.kind.as_deref().unwrap_or("");
                        h.server_tool
                            .get_or_insert_with(|| format!("tools[{i}] (type '{kind}')"));
                    }
                }
            }
        }
        h.background = raw.background == Some("true");
        h
    }

    /// Hidden input tokens this request adds on top of its body, known without a context
    /// window: the tool-use system prompt, once, and each provider-defined tool's definition.
    pub fn overhead_tokens(&self, tool_prompt_tokens: u64) -> u64 {
        let uses = u64::from(self.tools).saturating_add(self.provider_tools);
        uses.saturating_mul(tool_prompt_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::openai::parse_request;

    fn hidden(body: &str) -> Hidden {
        parse_request(body.as_bytes()).unwrap().hidden
    }

    #[test]
    fn stored_context_is_named() {
        let h = hidden(r#"{"model":"m","previous_response_id":"resp_1","input":"go on"}"#);
        assert_eq!(h.unseen_input.as_deref(), Some("previous_response_id"));
        let h = hidden(r#"{"model":"m","conversation":{"id":"conv_1"}}"#);
        assert_eq!(h.unseen_input.as_deref(), Some("conversation"));
        let h = hidden(r#"{"model":"m","prompt":{"id":"pmpt_1"}}"#);
        assert_eq!(h.unseen_input.as_deref(), Some("prompt"));
        assert_eq!(
            hidden(r#"{"model":"m","previous_response_id":null}"#),
            Hidden::default()
        );
    }

    #[test]
    fn server_tools_on_both_apis_are_named() {
        for (body, want) in [
            (
                r#"{"model":"m","tools":[{"type":"function","name":"f"},{"type":"web_search"}]}"#,
                "tools[1] (type 'web_search')",
            ),
            (
                r#"{"model":"m","tools":[{"type":"web_search_20250305","name":"web_search","max_uses":5}]}"#,
                "tools[0] (type 'web_search_20250305')",
            ),
            (
                r#"{"model":"m","tools":[{"type":"file_search","vector_store_ids":["vs"]}]}"#,
                "tools[0] (type 'file_search')",
            ),
            (
                r#"{"model":"m","tools":[{"type":"computer_20250124","name":"computer"}]}"#,
                "tools[0] (type 'computer_20250124')",
            ),
            (
                r#"{"model":"m","mcp_servers":[{"type":"url","url":"https://x"}]}"#,
                "mcp_servers",
            ),
            (
                r#"{"model":"m","web_search_options":{}}"#,
                "web_search_options",
            ),
        ] {
            let h = hidden(body);
            assert_eq!(h.server_tool.as_deref(), Some(want), "{body}");
        }
    }

    #[test]
    fn tools_add_their_prompt_and_provider_tools_their_definitions() {
        let h = hidden(r#"{"model":"m","tools":[{"name":"f","input_schema":{}}]}"#);
        assert_eq!(
            (h.tools, h.provider_tools, h.server_tool.as_deref()),
            (true, 0, None)
        );
        assert_eq!(h.overhead_tokens(1000), 1000);
        let h = hidden(r#"{"model":"m","tools":[{"type":"bash_20250124","name":"bash"}]}"#);
        assert_eq!(h.overhead_tokens(1000), 2000);
        assert_eq!(
            hidden(r#"{"model":"m","tools":[]}"#).overhead_tokens(1000),
            0
        );
    }

    #[test]
    fn files_and_documents_are_unseen_input() {
        let h = hidden(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"document","source":{"type":"url","url":"https://x/a.pdf"}}]}]}"#,
        );
        assert!(h.unseen_input.is_some());
        let h = hidden(r#"{"model":"m","input":[{"type":"item_reference","id":"msg_1"}]}"#);
        assert!(h.unseen_input.is_some());
        let h = hidden(r#"{"model":"m","background":true}"#);
        assert!(h.background);
    }
}
