//! What the request path reads, swapped whole with one `ArcSwap`: the config's routes
//! (catalog, provider addresses, prebuilt headers) and the key set built against them. A
//! request holds its own `Arc<Snapshot>`, so every index it took stays valid across a
//! reload; a config reload (SIGHUP) and a key reload swap the same pointer.

use std::sync::Arc;

use pingora_core::connectors::L4Connect;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::egress::{CaBundle, EgressProxy, ProviderAddrs};
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
    /// How each provider is reached (addresses, trust, tunnel), by provider index.
    pub provider_links: Vec<ProviderLink>,
    /// Upstream request URIs by provider, indexed by `UpstreamRoute`.
    upstream_uris: Vec<[http::Uri; UpstreamRoute::ALL.len()]>,
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
    /// What the build found odd but not fatal (a provider host that does not resolve yet):
    /// logged by `serve` and printed by `check-config`.
    pub warnings: Vec<String>,
}

/// How the proxy reaches one provider, built once per (re)load.
pub struct ProviderLink {
    /// Every address of the host connections go to (the egress proxy's when tunnelled),
    /// refreshed in the background.
    pub addrs: ProviderAddrs,
    /// `tls_ca_file`, read and parsed.
    pub ca: Option<CaBundle>,
    /// The CONNECT tunnel through the egress proxy, when one applies to this provider.
    pub tunnel: Option<Arc<dyn L4Connect + Send + Sync>>,
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
        let mut provider_links = Vec::with_capacity(config.providers.len());
        let egress = EgressProxy::from_env()?;
        let mut warnings = Vec::new();
        if config
            .shared_state
            .as_ref()
            .is_some_and(|s| s.redis_url.is_none())
        {
            warnings.push(
                "shared_state: PostgreSQL but no Redis (`redis_url_env`): keys, spend and traces \
                 are shared, but each node counts rpm, rpd, max_inflight and budget holds on its \
                 own, so N nodes admit up to N times a key's limits; name a Redis for limits \
                 that hold across the cluster"
                    .to_string(),
            );
        }
        let mut upstream_uris = Vec::with_capacity(config.providers.len());
        let mut provider_headers = Vec::with_capacity(config.providers.len());
        let mut provider_keys = Vec::with_capacity(config.providers.len());
        for (i, p) in config.providers.iter().enumerate() {
            provider_links.push(ProviderLink::build(
                i,
                p,
                egress.as_ref(),
                config.tuning.connect_timeout,
                &mut warnings,
            )?);
            let uri = |suffix: &str| {
                http::Uri::try_from(format!("{}{suffix}", p.base_path))
                    .map_err(|e| format!("providers[{i}].base_url: bad path: {e}"))
            };
            let mut uris = Vec::with_capacity(UpstreamRoute::ALL.len());
            for route in UpstreamRoute::ALL {
                uris.push(uri(route.suffix())?);
            }
            upstream_uris.push(
                uris.try_into()
                    .map_err(|_| format!("providers[{i}]: upstream routes"))?,
            );
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
            provider_links,
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
            warnings,
            config,
        })
    }

    /// The request URI for `route` on provider `p` (prebuilt: no formatting per request).
    pub fn upstream_uri(&self, p: usize, route: UpstreamRoute) -> &http::Uri {
        &self.upstream_uris[p][route as usize]
    }
}

impl ProviderLink {
    fn build(
        i: usize,
        p: &crate::config::Provider,
        egress: Option<&EgressProxy>,
        connect_timeout: std::time::Duration,
        warnings: &mut Vec<String>,
    ) -> Result<ProviderLink, String> {
        let ca = match &p.tls_ca_file {
            Some(path) => {
                Some(CaBundle::load(path).map_err(|e| format!("providers[{i}].tls_ca_file: {e}"))?)
            }
            None => None,
        };
        // Only https:// providers tunnel, as in the SDKs: HTTPS_PROXY is for https URLs.
        let egress = egress.filter(|e| p.tls && e.applies_to(&p.host, p.port));
        // A host that does not resolve now is not fatal: DNS may be down at start-up, and
        // one unreachable provider must not stop the others. It is retried in the background.
        let (addrs, unresolved) = match egress {
            Some(e) => ProviderAddrs::resolve_or_wait(&e.host, e.port),
            None => ProviderAddrs::resolve_or_wait(&p.host, p.port),
        };
        if let Some(e) = unresolved {
            let field = match egress {
                Some(_) => "HTTPS_PROXY".to_string(),
                None => format!("providers[{i}].base_url"),
            };
            warnings.push(format!(
                "{field}: cannot resolve {} yet ({e}); its requests get 502 until it does",
                addrs.host()
            ));
        }
        let tunnel = egress.map(|e| {
            Arc::new(e.tunnel_to(&p.host, p.port, connect_timeout))
                as Arc<dyn L4Connect + Send + Sync>
        });
        Ok(ProviderLink { addrs, ca, tunnel })
    }
}
