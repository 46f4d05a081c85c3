//! Provider wire formats. Nothing outside this module knows one: each format's request
//! fields, usage parsing, error shape and translation live here, beside each other.
//!
//! The seam is [`Plan`]: for one attempt (a model of the chain), the endpoint the client
//! called and the kind of the model's provider decide how the body goes out (pass-through
//! with its model replaced, or translated), where it goes, which headers carry the provider
//! key, and which [`codec::ResponseCodec`] reads the answer back.

pub mod anthropic;
pub mod audio;
pub mod codec;
pub mod hidden;
pub mod json_scan;
pub mod mask;
pub mod multipart;
pub mod openai;
pub mod openai_usage;
pub mod pool;
pub mod responses;
pub mod sse;
pub mod transcription;
pub mod translate;

use bytes::Bytes;

use crate::endpoint::Endpoint;
use crate::error::GateError;
use openai::RequestFields;

pub use crate::config::ProviderKind;

/// How one attempt reaches its provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Same shape on both sides: the body goes out with its model replaced.
    Chat,
    Embeddings,
    Responses,
    Messages,
    /// A chat completion served by an Anthropic model.
    ChatViaMessages,
    /// A Messages request served by an OpenAI-kind model.
    MessagesViaChat,
    /// Anthropic's token count, passed through (free).
    CountTokens,
    /// A token count for an OpenAI-kind model: answered by the gateway with its own prompt
    /// bound; nothing goes upstream.
    CountTokensEstimate,
    /// `/images/generations`: priced per image returned, or by token usage if reported.
    Images,
    /// `/audio/speech`: priced per input character; the audio streams back as it comes.
    Speech,
    /// Multipart, the `model` part rewritten: `/images/edits` (per image, like `Images`).
    ImagesEdits,
    /// Multipart: `/audio/transcriptions`, priced per minute of reported duration.
    Transcriptions,
    /// Multipart: `/audio/translations`, likewise.
    Translations,
}

/// The upstream routes a provider may be sent to, indexing `Routes::upstream_uri`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamRoute {
    ChatCompletions = 0,
    Embeddings = 1,
    Responses = 2,
    Messages = 3,
    CountTokens = 4,
    ImagesGenerations = 5,
    AudioSpeech = 6,
    ImagesEdits = 7,
    AudioTranscriptions = 8,
    AudioTranslations = 9,
}

impl UpstreamRoute {
    pub const ALL: [UpstreamRoute; 10] = [
        UpstreamRoute::ChatCompletions,
        UpstreamRoute::Embeddings,
        UpstreamRoute::Responses,
        UpstreamRoute::Messages,
        UpstreamRoute::CountTokens,
        UpstreamRoute::ImagesGenerations,
        UpstreamRoute::AudioSpeech,
        UpstreamRoute::ImagesEdits,
        UpstreamRoute::AudioTranscriptions,
        UpstreamRoute::AudioTranslations,
    ];

    /// Path after the provider's `base_url` (SPEC §6).
    pub fn suffix(self) -> &'static str {
        match self {
            UpstreamRoute::ChatCompletions => "/chat/completions",
            UpstreamRoute::Embeddings => "/embeddings",
            UpstreamRoute::Responses => "/responses",
            UpstreamRoute::Messages => "/v1/messages",
            UpstreamRoute::CountTokens => "/v1/messages/count_tokens",
            UpstreamRoute::ImagesGenerations => "/images/generations",
            UpstreamRoute::AudioSpeech => "/audio/speech",
            UpstreamRoute::ImagesEdits => "/images/edits",
            UpstreamRoute::AudioTranscriptions => "/audio/transcriptions",
            UpstreamRoute::AudioTranslations => "/audio/translations",
        }
    }
}

impl Plan {
    /// The plan for `endpoint` on a provider of `kind`; None when that kind cannot serve it
    /// (embeddings and the Responses API on an Anthropic model).
    pub fn new(endpoint: Endpoint, kind: ProviderKind) -> Option<Plan> {
        use ProviderKind::*;
        Some(match (endpoint, kind) {
            (Endpoint::ChatCompletions, OpenAi) => Plan::Chat,
            (Endpoint::ChatCompletions, Anthropic) => Plan::ChatViaMessages,
            (Endpoint::Embeddings, OpenAi) => Plan::Embeddings,
            (Endpoint::Responses, OpenAi) => Plan::Responses,
            (Endpoint::Messages, Anthropic) => Plan::Messages,
            (Endpoint::Messages, OpenAi) => Plan::MessagesViaChat,
            (Endpoint::CountTokens, Anthropic) => Plan::CountTokens,
            (Endpoint::CountTokens, OpenAi) => Plan::CountTokensEstimate,
            (Endpoint::ImagesGenerations, OpenAi) => Plan::Images,
            (Endpoint::Speech, OpenAi) => Plan::Speech,
            (Endpoint::ImagesEdits, OpenAi) => Plan::ImagesEdits,
            (Endpoint::Transcriptions, OpenAi) => Plan::Transcriptions,
            (Endpoint::Translations, OpenAi) => Plan::Translations,
            _ => return None,
        })
    }

    pub fn route(self) -> UpstreamRoute {
        match self {
            Plan::Chat | Plan::MessagesViaChat => UpstreamRoute::ChatCompletions,
            Plan::Embeddings => UpstreamRoute::Embeddings,
            Plan::Responses => UpstreamRoute::Responses,
            Plan::Messages | Plan::ChatViaMessages => UpstreamRoute::Messages,
            // Never sent: the count is answered before any upstream is picked.
            Plan::CountTokens | Plan::CountTokensEstimate => UpstreamRoute::CountTokens,
            Plan::Images => UpstreamRoute::ImagesGenerations,
            Plan::Speech => UpstreamRoute::AudioSpeech,
            Plan::ImagesEdits => UpstreamRoute::ImagesEdits,
            Plan::Transcriptions => UpstreamRoute::AudioTranscriptions,
            Plan::Translations => UpstreamRoute::AudioTranslations,
        }
    }

    /// Whether the gateway answers this plan itself (no upstream).
    pub fn answered_locally(self) -> bool {
        self == Plan::CountTokensEstimate
    }

    /// The provider's kind on the wire.
    pub fn upstream_kind(self) -> ProviderKind {
        match self.route() {
            UpstreamRoute::Messages | UpstreamRoute::CountTokens => ProviderKind::Anthropic,
            _ => ProviderKind::OpenAi,
        }
    }

    /// Whether the body and the answer are rewritten between two formats.
    pub fn translates(self) -> bool {
        matches!(self, Plan::ChatViaMessages | Plan::MessagesViaChat)
    }

    /// The body for the provider: the client's bytes with `model` replaced (a chat stream
    /// also asks for usage), or the translation. `output_cap` is the per-choice output the
    /// reservation allowed for: the body carries it in the route's own field, inserted when
    /// the client set none. 400 for what cannot be translated.
    pub fn upstream_body(
        self,
        body: &Bytes,
        fields: &RequestFields,
        upstream_id: &str,
        output_cap: u64,
    ) -> Result<Bytes, GateError> {
        use openai::CapField;
        Ok(match self {
            Plan::Chat => openai::rewrite_body(
                body,
                fields,
                upstream_id,
                true,
                Some((CapField::Chat, output_cap)),
            ),
            Plan::Embeddings
            | Plan::CountTokens
            | Plan::CountTokensEstimate
            | Plan::Images
            | Plan::Speech => openai::rewrite_body(body, fields, upstream_id, false, None),
            Plan::Responses => openai::rewrite_body(
                body,
                fields,
                upstream_id,
                false,
                Some((CapField::Responses, output_cap)),
            ),
            Plan::Messages => openai::rewrite_body(
                body,
                fields,
                upstream_id,
                false,
                Some((CapField::Messages, output_cap)),
            ),
            Plan::ImagesEdits | Plan::Transcriptions | Plan::Translations => {
                multipart::rewrite_span(body, fields.model_span(), upstream_id)
            }
            Plan::ChatViaMessages => {
                translate::chat_to_messages::request(body, upstream_id, output_cap)?.into()
            }
            Plan::MessagesViaChat => {
                translate::messages_to_chat::request(body, upstream_id, output_cap)?.into()
            }
        })
    }
}

/// The wire format the client speaks on `endpoint`, for the gateway's own error bodies.
pub fn client_kind(endpoint: Endpoint) -> ProviderKind {
    match endpoint {
        Endpoint::Messages | Endpoint::CountTokens | Endpoint::MessagesOther => {
            ProviderKind::Anthropic
        }
        _ => ProviderKind::OpenAi,
    }
}

/// A gateway error in the client's shape: Anthropic's on every `/v1/messages*` path, else
/// OpenAI's.
pub fn error_body(endpoint: Endpoint, err: &GateError) -> Vec<u8> {
    match client_kind(endpoint) {
        ProviderKind::Anthropic => anthropic::error_body(err),
        ProviderKind::OpenAi => err.body(),
    }
}
