//! What the request path reads, swapped whole with one `ArcSwap`: the config's routes
//! (catalog, provider addresses, prebuilt headers) and the key set built against them. A
//! request holds its own `Arc<Snapshot>`, so every index it took stays valid across a
//! reload; a config reload (SIGHUP) and a key reload swap the same pointer.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::keys::KeySet;
use crate::providers::pool::KeyPool;
use crate::providers::{ProviderKind, UpstreamRoute};

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
    /// Upstream request URIs by provider, indexed by `UpstreamRoute`.
    upstream_uris: Vec<[http::Uri; 4]>,
    /// Per provider: its kind, `Host` and version header.
    pub provider_headers: Vec<ProviderHeaders>,
    /// Per provider: its API keys, used round-robin; a refused key rests. Rebuilt on a
    /// config reload (rests start over).
    pub provider_keys: Vec<KeyPool>,
    /// Per model, its id as a header value (`X-SpiderGate-Model`, fallback header).
    pub model_headers: Vec<http::HeaderValue>,
    /// Model ids and provider names, shared into every trace without copying.
    pub model_names: Vec<Arc<str>>,
    pub provider_names: Vec<Arc<str>>,
}

/// Request headers for one provider, built once per (re)load.
pub struct ProviderHeaders {
    pub kind: ProviderKind,
    pub host: http::HeaderValue,
    /// Anthropic: `anthropic-version` when the client sends none.
    pub anthropic_version: http::HeaderValue,
}

impl Routes {
    /// Builds the routes of a validated config (provider keys already read). This is the
    /// last check `serve`, SIGHUP and `check-config` share: provider addresses resolve,
    /// every header value is valid. Errors name the field path.
    pub fn build(config: Config) -> Result<Routes, String> {
        let mut provider_addrs = Vec::with_capacity(config.providers.len());
        let mut upstream_uris = Vec::with_capacity(config.providers.len());
        let mut provider_headers = Vec::with_capacity(config.providers.len());
        let mut provider_keys = Vec::with_capacity(config.providers.len());
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
                uri(UpstreamRoute::ALL[0].suffix())?,
                uri(UpstreamRoute::ALL[1].suffix())?,
                uri(UpstreamRoute::ALL[2].suffix())?,
                uri(UpstreamRoute::ALL[3].suffix())?,
            ]);
            let value = |v: &str, what: &str| {
                http::HeaderValue::from_str(v)
                    .map_err(|_| format!("providers[{i}]: {what} is not a valid header value"))
            };
            let mut keys = Vec::with_capacity(p.keys.len());
            for (env, key) in &p.keys {
                let mut header = match p.kind {
                    ProviderKind::OpenAi => value(&format!("Bearer {key}"), "an API key")?,
                    ProviderKind::Anthropic => value(key, "an API key")?,
                };
                header.set_sensitive(true);
                keys.push((env.clone(), header));
            }
            provider_keys.push(KeyPool::new(keys));
            provider_headers.push(ProviderHeaders {
                kind: p.kind,
                host: value(&p.host_header, "the host")?,
                anthropic_version: value(&p.anthropic_version, "anthropic_version")?,
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
            provider_keys,
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

    /// The request URI for `route` on provider `p` (prebuilt: no formatting per request).
    pub fn upstream_uri(&self, p: usize, route: UpstreamRoute) -> &http::Uri {
        &self.upstream_uris[p][route as usize]
    }
}
