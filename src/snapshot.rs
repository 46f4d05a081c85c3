//! What the request path reads, swapped whole with one `ArcSwap`: the config's routes
//! (catalog, provider addresses, prebuilt headers) and the key set built against them. A
//! request holds its own `Arc<Snapshot>`, so every index it took stays valid across a
//! reload; a config reload (SIGHUP) and a key reload swap the same pointer.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::admission::Endpoint;
use crate::catalog::Catalog;
use crate::config::Config;
use crate::keys::KeySet;

pub struct Snapshot {
    pub routes: Arc<Routes>,
    pub keys: Arc<KeySet>,
}

/// Everything derived from the config, built once per (re)load: model data lives in the
/// catalog; this adds what the proxy needs per provider and per model, ready to use.
pub struct Routes {
    pub config: Config,
    pub catalog: Catalog,
    /// Resolved address of each provider, by provider index.
    pub provider_addrs: Vec<SocketAddr>,
    /// Upstream request URIs by provider: `[chat completions, embeddings]`.
    upstream_uris: Vec<[http::Uri; 2]>,
    /// Per provider: `Authorization` (the provider's own key) and `Host`.
    pub provider_headers: Vec<ProviderHeaders>,
    /// Per model, its id as a header value (`X-SpiderGate-Model`, fallback header).
    pub model_headers: Vec<http::HeaderValue>,
    /// Model ids and provider names, shared into every trace without copying.
    pub model_names: Vec<Arc<str>>,
    pub provider_names: Vec<Arc<str>>,
}

/// Request headers for one provider, built once per (re)load.
pub struct ProviderHeaders {
    pub authorization: Option<http::HeaderValue>,
    pub host: http::HeaderValue,
}

impl Routes {
    /// Builds the routes of a validated config (provider keys already read). This is the
    /// last check `serve`, SIGHUP and `check-config` share: provider addresses resolve,
    /// every header value is valid. Errors name the field path.
    pub fn build(config: Config) -> Result<Routes, String> {
        let mut provider_addrs = Vec::with_capacity(config.providers.len());
        let mut upstream_uris = Vec::with_capacity(config.providers.len());
        let mut provider_headers = Vec::with_capacity(config.providers.len());
        for (i, p) in config.providers.iter().enumerate() {
            provider_addrs.push(
                p.resolve().map_err(|e| {
                    format!("providers[{i}].base_url: cannot resolve {}: {e}", p.host)
                })?,
            );
            let uri = |suffix: &str| {
                http::Uri::try_from(format!("{}{suffix}", p.base_path))
                    .map_err(|e| format!("providers[{i}].base_url: bad path: {e}"))
            };
            upstream_uris.push([
                uri(Endpoint::ChatCompletions.upstream_suffix())?,
                uri(Endpoint::Embeddings.upstream_suffix())?,
            ]);
            let value = |v: &str, what: &str| {
                http::HeaderValue::from_str(v)
                    .map_err(|_| format!("providers[{i}]: {what} is not a valid header value"))
            };
            let mut authorization = match &p.authorization {
                Some(a) => Some(value(a, "the API key")?),
                None => None,
            };
            if let Some(a) = authorization.as_mut() {
                a.set_sensitive(true);
            }
            provider_headers.push(ProviderHeaders {
                authorization,
                host: value(&p.host_header, "the host")?,
            });
        }
        let mut model_headers = Vec::with_capacity(config.models.len());
        for (i, m) in config.models.iter().enumerate() {
            model_headers.push(
                http::HeaderValue::from_str(&m.id)
                    .map_err(|_| format!("models[{i}].id: not usable in a header"))?,
            );
        }
        Ok(Routes {
            catalog: Catalog::new(&config),
            provider_addrs,
            upstream_uris,
            provider_headers,
            model_headers,
            model_names: config
                .models
                .iter()
                .map(|m| Arc::from(m.id.as_str()))
                .collect(),
            provider_names: config
                .providers
                .iter()
                .map(|p| Arc::from(p.name.as_str()))
                .collect(),
            config,
        })
    }

    /// The request URI for `endpoint` on provider `p` (prebuilt: no formatting per request).
    pub fn upstream_uri(&self, p: usize, endpoint: Endpoint) -> &http::Uri {
        let i = match endpoint {
            Endpoint::Embeddings => 1,
            _ => 0,
        };
        &self.upstream_uris[p][i]
    }
}
