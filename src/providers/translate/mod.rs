//! Translation between OpenAI chat completions and Anthropic Messages, both ways, requests
//! and responses, JSON and SSE. A client speaking one shape can reach a model of the other
//! kind with the same controls and accounting. What cannot be translated is refused with
//! 400 `invalid_request`, never silently dropped.

pub mod chat_to_messages;
pub mod messages_to_chat;
