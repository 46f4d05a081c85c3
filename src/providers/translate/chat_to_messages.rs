//! A client speaking OpenAI chat completions, served by an Anthropic model: the request goes
//! out as a Messages request, the answer comes back as a chat completion.
//!
//! Formats: OpenAI's Chat Completions reference (request, `chat.completion`,
//! `chat.completion.chunk`) and Anthropic's Messages reference and streaming guide.
//!
//! # Request fields
//!
//! A field set to `null` counts as absent. Anything else is either translated or refused
//! with 400 `invalid_request` naming the field; nothing that changes the answer is dropped.
//!
//! | OpenAI field | Anthropic | Decision |
//! |---|---|---|
//! | `model` | `model` | replaced by the upstream model |
//! | `messages` | `system` + `messages` | see below |
//! | `max_tokens`, `max_completion_tokens` | `max_tokens` | the larger; else the configured default; 0 refused |
//! | `temperature` | `temperature` | 0..=1 passed; outside refused (Anthropic's range is 0..1; no silent clamp) |
//! | `top_p` | `top_p` | passed |
//! | `stop` (string or array) | `stop_sequences` | passed |
//! | `stream` | `stream` | passed |
//! | `stream_options` | - | read by the caller (`include_usage` picks the usage chunk) |
//! | `user`, `safety_identifier` | `metadata.user_id` | `safety_identifier` wins when both are set |
//! | `tools` (`function`) | `tools` (`name`, `description`, `input_schema`, `strict`) | no `parameters`: an empty object schema; other tool types refused |
//! | `tool_choice` | `tool_choice` | `auto`, `none`, `required`->`any`, named function->`tool`; `allowed_tools`/custom refused; without tools `auto`/`none` are moot, the others refused |
//! | `parallel_tool_calls: false` | `tool_choice.disable_parallel_tool_use` | `true` is the default on both sides |
//! | `n` | - | 1 accepted, more refused (one choice per Messages call) |
//! | `logprobs`, `top_logprobs` | - | `false`/0 accepted, else refused (no log probabilities) |
//! | `presence_penalty`, `frequency_penalty` | - | 0 accepted, else refused (no equivalent) |
//! | `logit_bias` | - | `{}` accepted, else refused |
//! | `seed` | - | refused (no seeded sampling) |
//! | `response_format` | - | `text` accepted (the default); `json_object`, `json_schema` refused |
//! | `reasoning_effort`, `verbosity` | - | refused (no faithful mapping to `thinking` budgets) |
//! | `modalities`, `audio` | - | `["text"]` accepted; audio output refused |
//! | `service_tier` | - | `auto`/`default` accepted (Anthropic's default tier), others refused |
//! | `store` | - | `false` accepted; `true` refused (nothing would be stored) |
//! | `metadata` | - | dropped: OpenAI only keeps it with stored completions, it never shapes the answer |
//! | `prediction` | - | dropped: a latency hint, the answer is the same without it |
//! | `prompt_cache_key`, `prompt_cache_retention` | - | dropped: OpenAI cache-routing hints |
//! | `functions`, `function_call`, `web_search_options` | - | refused (legacy functions: use `tools`) |
//! | anything else | - | refused, naming the field |
//!
//! Messages: `system` and `developer` messages (string or text parts, at any position) are
//! hoisted, in order, into the top-level `system` (a string for one plain string, else text
//! blocks), as Anthropic's own OpenAI compatibility layer does. `user` text and images
//! (`data:` URLs as base64 sources of jpeg/png/gif/webp, `http(s)` URLs as URL sources;
//! `detail` has no equivalent and is ignored) become blocks; audio and file parts are refused.
//! `assistant` text, `refusal` and `tool_calls` become `text` and `tool_use` blocks
//! (`arguments` must be a JSON object; an empty string means `{}`); its `reasoning_content`
//! and `annotations` (echoed back by clients that resend whole response messages) are
//! dropped: a prior turn's reasoning cannot be replayed without Anthropic's signature.
//! `tool` messages become `tool_result` blocks in a user turn (their `name` is implied by the
//! `tool_call_id`). Consecutive turns of one role are merged, since Anthropic alternates
//! roles; empty text is skipped. A participant `name` on other roles is refused.
//!
//! # Responses and streams
//!
//! `text` blocks are joined into `content`, `thinking` into `reasoning_content`, `tool_use`
//! into `tool_calls`; `redacted_thinking` and server-tool blocks have no OpenAI form and are
//! left out. Stop reasons: `end_turn`, `stop_sequence`, `pause_turn` -> `stop`;
//! `max_tokens`, `model_context_window_exceeded` -> `length`; `tool_use` -> `tool_calls`;
//! `refusal` -> `content_filter`. Usage: `prompt_tokens` counts every input token (cache
//! reads and writes included), `prompt_tokens_details.cached_tokens` the cache reads.
//! Errors keep Anthropic's error type as `code` and use OpenAI's word for it as `type`.

mod request;
mod response;
mod stream;

pub use request::request;
pub use response::{error_json, response_json};
pub use stream::StreamTranslator;

#[cfg(test)]
mod tests;
