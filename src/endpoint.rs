//! Which endpoint a request path names, and what each endpoint is: its label in traces and
//! metrics, and the family of models that serves it. Plain data at the bottom of the crate:
//! providers, admission and the proxy all read it.

use crate::config::Family;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    /// OpenAI's Responses API.
    Responses,
    /// Anthropic's Messages API.
    Messages,
    /// Anthropic's token count (`/v1/messages/count_tokens`): free, counted in rpm and rpd.
    CountTokens,
    /// `/v1/images/generations` (JSON).
    ImagesGenerations,
    /// `/v1/audio/speech`: JSON in, audio bytes out.
    Speech,
    /// `/v1/images/edits` (multipart).
    ImagesEdits,
    /// `/v1/audio/transcriptions` (multipart).
    Transcriptions,
    /// `/v1/audio/translations` (multipart).
    Translations,
    Models,
    Model,
    Aliases,
    Usage,
    /// `GET`/`POST /v1/keys`: an agent lists or mints its child keys (scope `gate:keys`).
    Keys,
    /// `POST /v1/keys/{id}/revoke`: an agent revokes one of its descendants.
    KeyRevoke,
    Health,
    /// Any other path under `/v1/messages/`: unknown, answered in Anthropic's shape.
    MessagesOther,
    Unknown,
}

impl Endpoint {
    /// Label for traces and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Responses => "responses",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "messages.count_tokens",
            Endpoint::ImagesGenerations => "images.generations",
            Endpoint::Speech => "audio.speech",
            Endpoint::ImagesEdits => "images.edits",
            Endpoint::Transcriptions => "audio.transcriptions",
            Endpoint::Translations => "audio.translations",
            Endpoint::Models => "models",
            Endpoint::Model => "models.get",
            Endpoint::Aliases => "aliases",
            Endpoint::Usage => "usage",
            Endpoint::Keys => "keys",
            Endpoint::KeyRevoke => "keys.revoke",
            Endpoint::Health => "health",
            Endpoint::MessagesOther | Endpoint::Unknown => "unknown",
        }
    }

    /// The family of models that serves this endpoint (None: not a model call).
    pub fn family(self) -> Option<Family> {
        match self {
            Endpoint::ChatCompletions
            | Endpoint::Responses
            | Endpoint::Messages
            | Endpoint::CountTokens => Some(Family::Chat),
            Endpoint::Embeddings => Some(Family::Embeddings),
            Endpoint::ImagesGenerations | Endpoint::ImagesEdits => Some(Family::Images),
            Endpoint::Speech => Some(Family::Speech),
            Endpoint::Transcriptions | Endpoint::Translations => Some(Family::Transcriptions),
            Endpoint::Models
            | Endpoint::Model
            | Endpoint::Aliases
            | Endpoint::Usage
            | Endpoint::Keys
            | Endpoint::KeyRevoke
            | Endpoint::Health
            | Endpoint::MessagesOther
            | Endpoint::Unknown => None,
        }
    }

    /// Whether requests here go to a model (admitted, proxied, charged).
    pub fn is_model_call(self) -> bool {
        self.family().is_some()
    }

    /// Whether the endpoint answers with media or about media (images, speech, audio
    /// text), priced per unit or in tokens.
    pub fn is_media(self) -> bool {
        matches!(
            self,
            Endpoint::ImagesGenerations
                | Endpoint::ImagesEdits
                | Endpoint::Speech
                | Endpoint::Transcriptions
                | Endpoint::Translations
        )
    }

    /// Whether requests here carry a multipart form, not a JSON body.
    pub fn takes_form(self) -> bool {
        matches!(
            self,
            Endpoint::ImagesEdits | Endpoint::Transcriptions | Endpoint::Translations
        )
    }

    /// Whether the path is unknown (404 after authentication).
    pub fn is_unknown(self) -> bool {
        matches!(self, Endpoint::Unknown | Endpoint::MessagesOther)
    }
}

/// Maps a request path to an endpoint; `/api/gate/v1` is the same prefix as `/v1`.
/// For `GET /v1/models/{id}` the id is the rest of the path.
pub fn route(path: &str) -> (Endpoint, &str) {
    if path == "/health" {
        return (Endpoint::Health, "");
    }
    let Some(rest) = path
        .strip_prefix("/v1")
        .or_else(|| path.strip_prefix("/api/gate/v1"))
    else {
        return (Endpoint::Unknown, "");
    };
    let rest = rest.trim_end_matches('/');
    match rest {
        "/chat/completions" => (Endpoint::ChatCompletions, ""),
        "/embeddings" => (Endpoint::Embeddings, ""),
        "/responses" => (Endpoint::Responses, ""),
        "/messages" => (Endpoint::Messages, ""),
        "/messages/count_tokens" => (Endpoint::CountTokens, ""),
        "/images/generations" => (Endpoint::ImagesGenerations, ""),
        "/audio/speech" => (Endpoint::Speech, ""),
        "/images/edits" => (Endpoint::ImagesEdits, ""),
        "/audio/transcriptions" => (Endpoint::Transcriptions, ""),
        "/audio/translations" => (Endpoint::Translations, ""),
        "/models" => (Endpoint::Models, ""),
        "/aliases" => (Endpoint::Aliases, ""),
        "/usage" => (Endpoint::Usage, ""),
        "/keys" => (Endpoint::Keys, ""),
        _ if rest.starts_with("/messages/") => (Endpoint::MessagesOther, ""),
        _ => match rest.strip_prefix("/models/") {
            Some(id) if !id.is_empty() => (Endpoint::Model, id),
            _ => match rest
                .strip_prefix("/keys/")
                .and_then(|r| r.strip_suffix("/revoke"))
            {
                Some(id) if !id.is_empty() && !id.contains('/') => (Endpoint::KeyRevoke, id),
                _ => (Endpoint::Unknown, ""),
            },
        },
    }
}
