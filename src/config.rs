//! YAML configuration: raw serde structs (unknown keys rejected) validated into [`Config`],
//! with errors that name the field path, e.g. `models[3].provider: no provider named "opnai"`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::money::Price;

pub const DEFAULT_CONFIG_PATH: &str = "conf/spidergate.yaml";

/// The most models one alias may list (the fallback chain a request walks).
pub const MAX_ALIAS_MODELS: usize = 8;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    database: Option<String>,
    #[serde(default = "default_max_body")]
    max_body_bytes: u64,
    #[serde(default)]
    public_catalog: bool,
    /// The URL agents use to reach this gateway (shown in the dashboard's snippets).
    public_url: Option<String>,
    #[serde(default)]
    admin: Option<RawAdmin>,
    /// Agents connect over HTTPS (HTTP/1.1 or HTTP/2 by ALPN).
    tls: Option<RawTls>,
    providers: Option<Vec<RawProvider>>,
    models: Option<Vec<RawModel>>,
    #[serde(default, deserialize_with = "unique_keys")]
    aliases: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    server: RawServer,
    shared_state: Option<RawSharedState>,
    telemetry: Option<RawTelemetry>,
    /// Budget-threshold and brake alerts to webhooks (SPEC §7).
    alerts: Option<crate::alerts::RawAlerts>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelemetry {
    /// OTLP/HTTP collector base URL; spans go to `<url>/v1/traces`. Without it the gateway
    /// still continues and starts W3C trace contexts, but exports nothing.
    otlp_endpoint: Option<String>,
    #[serde(default = "default_service_name")]
    service_name: String,
    /// Spans waiting for the exporter; past this they are dropped (and counted).
    #[serde(default = "default_max_queue_spans")]
    max_queue_spans: usize,
    /// Longest wait for one export request to the collector.
    #[serde(default = "default_export_timeout_ms")]
    export_timeout_ms: u64,
}

fn default_service_name() -> String {
    "spidergate".into()
}

fn default_max_queue_spans() -> usize {
    2048
}

fn default_export_timeout_ms() -> u64 {
    5_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSharedState {
    postgres_url_env: Option<String>,
    redis_url_env: Option<String>,
    #[serde(default = "default_on_error")]
    on_error: String,
    /// How long a reservation outlives a node that stopped renewing it (a crashed node's
    /// holds are charged at their estimate after this).
    #[serde(default = "default_reservation_ttl_ms")]
    reservation_ttl_ms: u64,
    /// Longest wait for one Redis command before `on_error` applies.
    #[serde(default = "default_shared_timeout_ms")]
    timeout_ms: u64,
}

fn default_on_error() -> String {
    "closed".into()
}

fn default_reservation_ttl_ms() -> u64 {
    30_000
}

fn default_shared_timeout_ms() -> u64 {
    250
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    #[serde(default = "default_admin_listen")]
    listen: String,
    #[serde(default = "default_token_env")]
    token_env: String,
    tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert_file: String,
    key_file: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    kind: String,
    base_url: String,
    api_key_env: Option<String>,
    /// A pool of provider keys, used round-robin (instead of `api_key_env`).
    api_key_envs: Option<Vec<String>>,
    /// Anthropic only: the `anthropic-version` sent when the client sends none.
    anthropic_version: Option<String>,
    /// `https://` only: verify the provider's certificate against these CAs (PEM) instead of
    /// the system trust store.
    tls_ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    id: String,
    provider: String,
    upstream_id: Option<String>,
    /// Token prices: 0 when absent (a model priced per image, character or minute).
    #[serde(default)]
    input_usd_per_mtok: f64,
    #[serde(default)]
    output_usd_per_mtok: f64,
    /// The endpoint family the model serves: chat (default) | embeddings | images | speech |
    /// transcriptions.
    endpoint: Option<String>,
    usd_per_image: Option<f64>,
    usd_per_mchar: Option<f64>,
    usd_per_minute: Option<f64>,
    max_output_tokens: Option<u32>,
    /// The most input one model call can take: the bound of what stored context, files and
    /// documents add beyond the body.
    context_window_tokens: Option<u64>,
    #[serde(default)]
    free: bool,
    cache_read_usd_per_mtok: Option<f64>,
    cache_write_usd_per_mtok: Option<f64>,
}

/// Settings beyond the fixed contract, all optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    threads: usize,
    connect_timeout_ms: u64,
    /// The older single upstream read timeout: the default of both of the two below.
    read_timeout_ms: u64,
    /// Longest wait from the request going upstream to the response head.
    first_byte_timeout_ms: Option<u64>,
    /// Longest gap between upstream body chunks.
    idle_timeout_ms: Option<u64>,
    flush_interval_ms: u64,
    reload_interval_ms: u64,
    trace_retention_days: u32,
    /// SIGTERM waits this long for in-flight requests, then charges the rest and exits.
    shutdown_grace_s: Option<u64>,
    /// The older name of `shutdown_grace_s`, still accepted.
    shutdown_timeout_secs: Option<u64>,
    default_max_output_tokens: u32,
    media_part_tokens: u32,
    /// The longest audio a transcription or translation may bill: its reservation's bound.
    max_audio_seconds: u32,
    /// Multipart forms up to this many bytes are read whole before they are forwarded;
    /// larger ones are forwarded as they arrive, once their opening is read and admitted.
    multipart_hold_bytes: u64,
    /// Input tokens a provider adds to a request with tools (its tool-use system prompt),
    /// and again for each provider-defined client tool (bash, text editor, computer use).
    tool_prompt_tokens: u32,
    auth_failures_per_minute: u32,
    ledger_max_backlog: usize,
    /// Where `serve --upgrade` receives the listening sockets of the running gateway.
    upgrade_sock: String,
    /// A new connection's first request head must be complete within this (counted from
    /// accept, not per read); also the idle time allowed on a kept-alive connection before
    /// its next request head.
    header_timeout_ms: u64,
    /// Client connections open at once on the proxy listener; more get 503
    /// `too_many_connections`. 0: no cap.
    max_connections: usize,
    /// Larger request heads (request line and headers) get 431.
    max_header_bytes: usize,
    /// A request body must arrive whole within this (408 after).
    body_timeout_ms: u64,
    /// Provider host names are resolved again this often (and on a config reload).
    dns_refresh_ms: u64,
    /// Load balancers (addresses or networks) whose `X-Forwarded-For` names the client for
    /// the per-address auth-failure limit.
    trusted_proxies: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            threads: 2,
            connect_timeout_ms: 5_000,
            read_timeout_ms: 300_000,
            first_byte_timeout_ms: None,
            idle_timeout_ms: None,
            flush_interval_ms: 500,
            reload_interval_ms: 250,
            trace_retention_days: 30,
            shutdown_grace_s: None,
            shutdown_timeout_secs: None,
            default_max_output_tokens: DEFAULT_MAX_OUTPUT_TOKENS,
            media_part_tokens: DEFAULT_MEDIA_PART_TOKENS,
            max_audio_seconds: DEFAULT_MAX_AUDIO_SECONDS,
            multipart_hold_bytes: DEFAULT_MULTIPART_HOLD_BYTES,
            tool_prompt_tokens: DEFAULT_TOOL_PROMPT_TOKENS,
            auth_failures_per_minute: 60,
            ledger_max_backlog: 100_000,
            upgrade_sock: "data/spidergate-upgrade.sock".into(),
            header_timeout_ms: 10_000,
            max_connections: 10_000,
            max_header_bytes: 65_536,
            body_timeout_ms: 60_000,
            dns_refresh_ms: 30_000,
            trusted_proxies: Vec::new(),
        }
    }
}

/// Output bound for models without `max_output_tokens`: at least what the largest current
/// models allow (o-series 100k, Claude with extended output 128k).
pub const DEFAULT_MAX_OUTPUT_TOKENS: u32 = 131_072;
/// Prompt tokens reserved per image, audio or file part, whose bytes in the body (often a
/// URL or file id) say nothing about their token count. OpenAI's high-detail image formula
/// tops out below 2k tokens and Anthropic's at about 1.6k per image; a PDF page costs 1.5k-3k.
pub const DEFAULT_MEDIA_PART_TOKENS: u32 = 25_000;
/// Two hours: past OpenAI's 25 MB upload at any bitrate its transcription models accept.
pub const DEFAULT_MAX_AUDIO_SECONDS: u32 = 7_200;
/// `server.multipart_hold_bytes`: a minute of 128 kbit/s MP3 is about 1 MB.
pub const DEFAULT_MULTIPART_HOLD_BYTES: u64 = 1 << 20;
/// Hidden input of a request with tools. Anthropic documents its tool-use system prompt at
/// 313-530 tokens by model and `tool_choice`, and 245-735 tokens for each of its own client
/// tools (bash, text editor, computer use); OpenAI's tool framing is smaller.
pub const DEFAULT_TOOL_PROMPT_TOKENS: u32 = 1_000;

/// A mapping whose every key is new: YAML lets a key appear twice and serde's map keeps the
/// last, so an alias written twice would silently lose its first chain (repeated struct fields
/// are refused already, as serde's duplicate field).
fn unique_keys<'de, D>(d: D) -> Result<BTreeMap<String, Vec<String>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Unique;
    impl<'de> serde::de::Visitor<'de> for Unique {
        type Value = BTreeMap<String, Vec<String>>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a mapping of alias names to lists of model ids")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, Vec<String>>()? {
                if out.contains_key(&k) {
                    return Err(serde::de::Error::custom(format!("duplicate alias \"{k}\"")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Unique)
}

fn default_max_body() -> u64 {
    32 * 1024 * 1024
}
fn default_admin_listen() -> String {
    "127.0.0.1:8081".into()
}
fn default_token_env() -> String {
    "SPIDERGATE_ADMIN_TOKEN".into()
}

/// The wire format a provider speaks (`kind` in the config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    /// OpenAI and every OpenAI-compatible API: chat completions, embeddings, responses.
    OpenAi,
    /// Anthropic's Messages API.
    Anthropic,
}

impl ProviderKind {
    pub fn label(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A SQLite file (created with its directory if missing).
    Sqlite(PathBuf),
    /// A PostgreSQL connection URL (`postgres://user:pass@host:port/db`).
    Postgres(String),
}

/// Hand-written so a password in a PostgreSQL URL never reaches a log line.
impl fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreLocation::Sqlite(path) => f.debug_tuple("Sqlite").field(path).finish(),
            StoreLocation::Postgres(_) => f.write_str("Postgres(<url>)"),
        }
    }
}

/// Where Redis is (`shared_state.redis_url_env`), by the form of its URL:
/// - `redis://[:password@]host:port[/db]` (or `rediss://`, `redis+unix://`): one server;
/// - `redis+sentinel://host:port[,host:port…]/<master name>`: the master that Sentinel names;
/// - `redis+cluster://host:port[,host:port…]`: a Redis Cluster.
///
/// Plain data, checked here (so `check-config` reports a malformed URL); the limit store
/// connects to it. Hosts are kept as `redis://host:port` URLs.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisUrl {
    Single(String),
    Sentinel { hosts: Vec<String>, master: String },
    Cluster { hosts: Vec<String> },
}

impl RedisUrl {
    pub fn parse(url: &str) -> std::result::Result<RedisUrl, String> {
        let url = url.trim();
        let hosts = |rest: &str| -> std::result::Result<Vec<String>, String> {
            let hosts: Vec<String> = rest
                .split(',')
                .filter(|h| !h.is_empty())
                .map(|h| format!("redis://{h}"))
                .collect();
            if hosts.is_empty() {
                return Err("names no host".into());
            }
            for h in &hosts {
                redis::IntoConnectionInfo::into_connection_info(h.as_str())
                    .map_err(|e| e.to_string())?;
            }
            Ok(hosts)
        };
        if let Some(rest) = url.strip_prefix("redis+sentinel://") {
            let (list, master) = rest.split_once('/').ok_or(
                "redis+sentinel:// needs the master name: redis+sentinel://host:26379/mymaster",
            )?;
            let master = master.trim_end_matches('/');
            if master.is_empty() {
                return Err("redis+sentinel:// needs the master name after the hosts".into());
            }
            return Ok(RedisUrl::Sentinel {
                hosts: hosts(list)?,
                master: master.to_string(),
            });
        }
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            return Ok(RedisUrl::Cluster {
                hosts: hosts(rest.trim_end_matches('/'))?,
            });
        }
        redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| e.to_string())?;
        Ok(RedisUrl::Single(url.to_string()))
    }
}

/// Hand-written so a password in the URL never reaches a log line.
impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RedisUrl::Single(_) => "Single(<url>)",
            RedisUrl::Sentinel { .. } => "Sentinel(<urls>)",
            RedisUrl::Cluster { .. } => "Cluster(<urls>)",
        })
    }
}

/// The `anthropic-version` header sent upstream when neither the client nor the provider's
/// config names one.
pub const DEFAULT_ANTHROPIC_VERSION: &str = "2023-06-01";

/// A provider as configured. `Debug` names its keys' variables, never their values (SPEC
/// §2: the operator's provider account stays hidden, logs included).
#[derive(Clone)]
pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    pub base_url: String,
    pub tls: bool,
    /// Host name for `Host` and SNI.
    pub host: String,
    /// `Host` header value (with the port when it is not the scheme's default).
    pub host_header: String,
    pub port: u16,
    /// Path prefix from `base_url`, without a trailing slash (e.g. `/v1`).
    pub base_path: String,
    /// The provider keys, read from their environment variables at start-up (or reload):
    /// `(env var name, key)`, one per entry of `api_key_envs` (or `api_key_env`). A
    /// variable that is unset or empty is skipped.
    pub keys: Vec<(String, String)>,
    /// The environment variables named by `api_key_env` / `api_key_envs`.
    pub key_envs: Vec<String>,
    /// Anthropic: `anthropic-version` when the client sends none.
    pub anthropic_version: String,
    /// The CAs (PEM) this provider's certificate must chain to, instead of the system's.
    pub tls_ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let keys: Vec<(&str, &str)> = self
            .keys
            .iter()
            .map(|(env, _)| (env.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("Provider")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("base_url", &self.base_url)
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("host_header", &self.host_header)
            .field("port", &self.port)
            .field("base_path", &self.base_path)
            .field("keys", &keys)
            .field("key_envs", &self.key_envs)
            .field("anthropic_version", &self.anthropic_version)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// The endpoint family a model serves (`models[].endpoint`): a model answers only on the
/// endpoints of its own family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Family {
    #[default]
    Chat,
    Embeddings,
    Images,
    Speech,
    Transcriptions,
}

impl Family {
    pub fn label(self) -> &'static str {
        match self {
            Family::Chat => "chat",
            Family::Embeddings => "embeddings",
            Family::Images => "images",
            Family::Speech => "speech",
            Family::Transcriptions => "transcriptions",
        }
    }

    pub fn parse(s: &str) -> Option<Family> {
        Some(match s {
            "chat" => Family::Chat,
            "embeddings" => Family::Embeddings,
            "images" => Family::Images,
            "speech" => Family::Speech,
            "transcriptions" => Family::Transcriptions,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Model {
    pub id: String,
    pub provider: usize,
    pub upstream_id: String,
    pub input_price: Price,
    pub output_price: Price,
    /// Cache reads and writes, when configured; else the input price.
    pub cache_read_price: Option<Price>,
    pub cache_write_price: Option<Price>,
    /// The most output one request can produce: the model's `max_output_tokens`, else
    /// `server.default_max_output_tokens`.
    pub max_output_tokens: u32,
    /// The model's context window, when configured: bounds the input of a request whose
    /// body does not show all of it (stored context, files, documents).
    pub context_window_tokens: Option<u64>,
    pub free: bool,
    /// The endpoint family it serves (`endpoint`).
    pub family: Family,
    /// The price per unit of what its family returns (an image, an input character, a
    /// millisecond of audio), when configured; charged on top of any token usage.
    pub unit_price: Option<UnitPrice>,
}

/// What a multi-modal model charges per unit (SPEC §4), exact in pico-dollars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnitPrice {
    /// Pico-dollars per `per` units.
    pico: u64,
    per: u64,
    pub unit: Unit,
}

/// The unit a multi-modal price counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Image,
    /// A Unicode code point of the input.
    Char,
    /// A millisecond of audio (priced per minute).
    Millisecond,
}

impl Unit {
    pub fn label(self) -> &'static str {
        match self {
            Unit::Image => "image",
            Unit::Char => "char",
            Unit::Millisecond => "ms",
        }
    }
}

impl UnitPrice {
    /// From USD per `usd_per` units (`usd_per_image`: 1, `usd_per_mchar`: 1e6 characters,
    /// `usd_per_minute`: 60,000 ms); None unless finite and within 0..=1e6 USD.
    pub fn new(usd: f64, per: u64, unit: Unit) -> Option<UnitPrice> {
        (usd.is_finite() && (0.0..=1.0e6).contains(&usd)).then(|| UnitPrice {
            pico: (usd * 1e12).round() as u64,
            per,
            unit,
        })
    }

    /// The cost of `units`, rounded up to the nano-dollar, saturating.
    pub fn cost(self, units: u64) -> crate::money::Nanos {
        let pico = u128::from(units) * u128::from(self.pico);
        let nanos = pico.div_ceil(u128::from(self.per.max(1)) * 1000);
        crate::money::Nanos::new(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}

/// `telemetry`: W3C trace context on every model call and, with an `otlp_endpoint`, one
/// OpenTelemetry span per call. Read at start; a reload keeps the running settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Telemetry {
    /// The collector's traces URL (`otlp_endpoint` + `/v1/traces`), when exporting.
    pub traces_url: Option<String>,
    pub service_name: String,
    pub max_queue_spans: usize,
    pub export_timeout: Duration,
}

fn parse_telemetry(raw: RawTelemetry) -> Result<Telemetry, ConfigError> {
    let traces_url = match raw.otlp_endpoint {
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
            let base = u.trim_end_matches('/');
            if base.parse::<http::Uri>().is_err() || base.len() <= "https://".len() {
                return err("telemetry.otlp_endpoint", format!("\"{u}\" is not a URL"));
            }
            // The SDK uses a configured URL as is; the OTLP/HTTP convention is a base URL.
            Some(if base.ends_with("/v1/traces") {
                base.to_string()
            } else {
                format!("{base}/v1/traces")
            })
        }
        Some(u) => {
            return err(
                "telemetry.otlp_endpoint",
                format!("\"{u}\" must start with http:// or https://"),
            )
        }
        None => None,
    };
    if raw.service_name.trim().is_empty() {
        return err("telemetry.service_name", "must not be empty");
    }
    if !(16..=1_000_000).contains(&raw.max_queue_spans) {
        return err(
            "telemetry.max_queue_spans",
            "must be between 16 and 1000000",
        );
    }
    if !(100..=60_000).contains(&raw.export_timeout_ms) {
        return err(
            "telemetry.export_timeout_ms",
            "must be between 100 and 60000",
        );
    }
    Ok(Telemetry {
        traces_url,
        service_name: raw.service_name,
        max_queue_spans: raw.max_queue_spans,
        export_timeout: Duration::from_millis(raw.export_timeout_ms),
    })
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: String,
    pub token_env: String,
    pub tls: Option<TlsFiles>,
}

/// The admin token: the value of environment variable `name`, unless unset or empty.
pub fn admin_token_from_env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|t| !t.is_empty())
}

/// A listener's certificate chain and private key (PEM files), re-read on SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

fn parse_tls(at: &str, raw: Option<RawTls>) -> Result<Option<TlsFiles>, ConfigError> {
    let Some(t) = raw else {
        return Ok(None);
    };
    if t.cert_file.is_empty() {
        return err(format!("{at}.cert_file"), "must name a file");
    }
    if t.key_file.is_empty() {
        return err(format!("{at}.key_file"), "must name a file");
    }
    Ok(Some(TlsFiles {
        cert_file: PathBuf::from(t.cert_file),
        key_file: PathBuf::from(t.key_file),
    }))
}

/// What happens to a request when Redis (or PostgreSQL) cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// Hard-budget keys get 503 `limits_unavailable`; other keys use this node's limits.
    Closed,
    /// Every key falls back to this node's limits (counted in a warning metric).
    Local,
}

/// `shared_state`: several gateway nodes sharing keys, ledger and traces (PostgreSQL) and
/// live limits (Redis). URLs are read from the named environment variables at load.
#[derive(Clone)]
pub struct SharedState {
    pub postgres_url: Option<String>,
    pub redis_url: Option<String>,
    pub on_error: OnError,
    pub reservation_ttl: Duration,
    pub timeout: Duration,
}

impl std::fmt::Debug for SharedState {
    // URLs may carry passwords: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedState")
            .field("postgres", &self.postgres_url.is_some())
            .field("redis", &self.redis_url.is_some())
            .field("on_error", &self.on_error)
            .field("reservation_ttl", &self.reservation_ttl)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// The URL in the environment variable `env` names (`field` for the error).
fn url_from_env(field: &str, env: Option<String>) -> Result<Option<String>, ConfigError> {
    let Some(env) = env else { return Ok(None) };
    match std::env::var(&env) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(v.trim().to_string())),
        _ => err(
            format!("shared_state.{field}"),
            format!("environment variable {env} is not set"),
        ),
    }
}

/// `database` as given: every door (gateway, CLI, dashboard) must open the same file, so an
/// empty name or `:memory:` (a database of each process's own that vanishes with it) is
/// refused. Not needed when the keys, ledger and traces are in PostgreSQL.
fn database_path(database: Option<String>, on_postgres: bool) -> Result<String, ConfigError> {
    match database {
        Some(d) if d.trim().is_empty() || d.trim() == ":memory:" || d.starts_with("file:") => {
            err("database", format!("\"{d}\" is not a file path"))
        }
        Some(d) => Ok(d),
        None if on_postgres => Ok(String::new()),
        None => err("database", "required"),
    }
}

fn parse_shared_state(raw: RawSharedState) -> Result<SharedState, ConfigError> {
    let postgres_url = url_from_env("postgres_url_env", raw.postgres_url_env)?;
    let redis_url = url_from_env("redis_url_env", raw.redis_url_env)?;
    // Parsed now, so check-config reports a malformed URL (never echoed: it may hold a
    // password).
    if let Some(u) = &postgres_url {
        if u.parse::<postgres::Config>().is_err() {
            return err(
                "shared_state.postgres_url_env",
                "is not a PostgreSQL URL (postgres://user:password@host:5432/db)",
            );
        }
    }
    if let Some(u) = &redis_url {
        if RedisUrl::parse(u).is_err() {
            return err(
                "shared_state.redis_url_env",
                "is not a Redis URL (redis://host:6379, redis+sentinel://host:26379/master, redis+cluster://host:6379,host:6379)",
            );
        }
    }
    if postgres_url.is_none() && redis_url.is_none() {
        return err(
            "shared_state",
            "names neither postgres_url_env nor redis_url_env",
        );
    }
    let on_error = match raw.on_error.as_str() {
        "closed" => OnError::Closed,
        "local" => OnError::Local,
        other => {
            return err(
                "shared_state.on_error",
                format!("\"{other}\" is not closed or local"),
            )
        }
    };
    if !(1_000..=3_600_000).contains(&raw.reservation_ttl_ms) {
        return err(
            "shared_state.reservation_ttl_ms",
            "must be between 1000 and 3600000",
        );
    }
    if !(10..=10_000).contains(&raw.timeout_ms) {
        return err("shared_state.timeout_ms", "must be between 10 and 10000");
    }
    Ok(SharedState {
        postgres_url,
        redis_url,
        on_error,
        reservation_ttl: Duration::from_millis(raw.reservation_ttl_ms),
        timeout: Duration::from_millis(raw.timeout_ms),
    })
}

#[derive(Debug, Clone)]
pub struct Tuning {
    pub threads: usize,
    pub connect_timeout: Duration,
    /// Longest wait from the request going upstream to the response head.
    pub first_byte_timeout: Duration,
    /// Longest gap between upstream body chunks. When it differs from `first_byte_timeout`,
    /// a watchdog enforces the shorter one (`proxy::watchdog`).
    pub idle_timeout: Duration,
    pub flush_interval: Duration,
    pub reload_interval: Duration,
    pub trace_retention_days: u32,
    pub shutdown_grace: Duration,
    pub media_part_tokens: u32,
    /// The duration bound of a transcription's audio (`server.max_audio_seconds`).
    pub max_audio_seconds: u32,
    /// Larger multipart forms are forwarded as they arrive (`server.multipart_hold_bytes`).
    pub multipart_hold_bytes: u64,
    pub tool_prompt_tokens: u32,
    pub auth_failures_per_minute: u32,
    pub ledger_max_backlog: usize,
    pub upgrade_sock: String,
    pub header_timeout: Duration,
    /// 0: no cap.
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub body_timeout: Duration,
    pub dns_refresh: Duration,
    pub trusted_proxies: Vec<crate::shield::IpNet>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub listen: String,
    pub database: PathBuf,
    pub max_body_bytes: u64,
    pub public_catalog: bool,
    /// The URL agents use (`public_url`, else `http://` + `listen`), without a trailing `/`.
    pub public_url: String,
    pub admin: Option<AdminConfig>,
    /// The agent listener's certificate (`tls`): HTTPS when set.
    pub tls: Option<TlsFiles>,
    pub providers: Vec<Provider>,
    pub models: Vec<Model>,
    /// Alias name -> ranked model indexes.
    pub aliases: BTreeMap<String, Vec<usize>>,
    pub tuning: Tuning,
    pub shared_state: Option<SharedState>,
    pub telemetry: Option<Telemetry>,
    /// `alerts`: thresholds and webhooks (with their secrets, read at load). Reloadable.
    pub alerts: Option<crate::alerts::Alerts>,
}

/// A validation failure naming the field path.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

fn err<T>(path: impl std::fmt::Display, msg: impl std::fmt::Display) -> Result<T, ConfigError> {
    Err(ConfigError(format!("{path}: {msg}")))
}

/// Resolves the config path: `--config`, else `$SPIDERGATE_CONFIG`, else the default.
pub fn resolve_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("SPIDERGATE_CONFIG") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_CONFIG_PATH),
    }
}

impl Config {
    /// Where keys, ledger and traces live: PostgreSQL when `shared_state` names it, else the
    /// SQLite file `database`.
    pub fn store_location(&self) -> StoreLocation {
        match self
            .shared_state
            .as_ref()
            .and_then(|s| s.postgres_url.clone())
        {
            Some(url) => StoreLocation::Postgres(url),
            None => StoreLocation::Sqlite(self.database.clone()),
        }
    }

    /// Where the store is, read from the config file alone, for when the file does not load
    /// whole (a typo elsewhere must not keep an operator from revoking a key): `database`,
    /// or PostgreSQL when `shared_state.postgres_url_env` names a set variable; every
    /// other field is ignored, checked or not.
    ///
    /// It guesses nothing: a `shared_state` block must read as in a whole load (a misspelt
    /// `postgres_url_env` there would otherwise send the revocation to an unused SQLite
    /// file while the gateway runs on PostgreSQL), a top-level name that looks like a
    /// misplaced one (`shared-state`, `postgres_url_env`) is refused, and the SQLite file
    /// must exist.
    pub fn store_location_only(path: &Path) -> Result<StoreLocation, ConfigError> {
        #[derive(Deserialize)]
        struct StoreOnly {
            database: Option<String>,
            shared_state: Option<RawSharedState>,
            #[serde(flatten)]
            rest: BTreeMap<String, serde_yaml::Value>,
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        let raw: StoreOnly = serde_yaml::from_str(&text)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        if let Some(name) = raw
            .rest
            .keys()
            .find(|k| k.contains("shared") || k.contains("postgres"))
        {
            return err(name, "is not a field; is it part of shared_state?");
        }
        let env = raw.shared_state.and_then(|s| s.postgres_url_env);
        if let Some(url) = url_from_env("postgres_url_env", env)? {
            return Ok(StoreLocation::Postgres(url));
        }
        let file = PathBuf::from(database_path(raw.database, false)?);
        if !file.is_file() {
            return err("database", format!("{} does not exist", file.display()));
        }
        Ok(StoreLocation::Sqlite(file))
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Config::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = serde_yaml::from_str(text).map_err(|e| {
            // serde_yaml names the path of unknown or mistyped fields in its message.
            ConfigError(format!("{}: {e}", path.display()))
        })?;
        Config::validate(raw, path)
    }

    fn validate(raw: RawConfig, path: &Path) -> Result<Config, ConfigError> {
        let Some(listen) = raw.listen else {
            return err("listen", "required");
        };
        check_socket_addr("listen", &listen)?;
        let shared_state = raw.shared_state.map(parse_shared_state).transpose()?;
        let on_postgres = shared_state
            .as_ref()
            .is_some_and(|s| s.postgres_url.is_some());
        let database = database_path(raw.database, on_postgres)?;
        if raw.max_body_bytes == 0 {
            return err("max_body_bytes", "must be greater than 0");
        }
        let admin = match raw.admin {
            Some(a) => {
                check_socket_addr("admin.listen", &a.listen)?;
                if listeners_overlap(&listen, &a.listen) {
                    return err(
                        "admin.listen",
                        format!("\"{}\" is the proxy's own listener (`listen`); the admin API needs its own", a.listen),
                    );
                }
                if a.token_env.is_empty() {
                    return err("admin.token_env", "must name an environment variable");
                }
                Some(AdminConfig {
                    listen: a.listen,
                    token_env: a.token_env,
                    tls: parse_tls("admin.tls", a.tls)?,
                })
            }
            None => None,
        };

        let Some(raw_providers) = raw.providers else {
            return err("providers", "required");
        };
        if raw_providers.is_empty() {
            return err("providers", "at least one provider is required");
        }
        let mut providers = Vec::with_capacity(raw_providers.len());
        let mut provider_index = HashMap::new();
        for (i, p) in raw_providers.into_iter().enumerate() {
            let at = format!("providers[{i}]");
            if p.name.trim().is_empty() {
                return err(format!("{at}.name"), "must not be empty");
            }
            if provider_index.insert(p.name.clone(), i).is_some() {
                return err(
                    format!("{at}.name"),
                    format!("duplicate provider \"{}\"", p.name),
                );
            }
            providers.push(parse_provider(&at, p)?);
        }

        let Some(raw_models) = raw.models else {
            return err("models", "required");
        };
        if raw_models.is_empty() {
            return err("models", "at least one model is required");
        }
        let mut models = Vec::with_capacity(raw_models.len());
        let mut model_index = HashMap::new();
        for (i, m) in raw_models.into_iter().enumerate() {
            let at = format!("models[{i}]");
            if m.id.is_empty() {
                return err(format!("{at}.id"), "must not be empty");
            }
            if model_index.insert(m.id.clone(), i).is_some() {
                return err(format!("{at}.id"), format!("duplicate model \"{}\"", m.id));
            }
            if m.upstream_id
                .as_deref()
                .is_some_and(|u| u.trim().is_empty())
            {
                return err(format!("{at}.upstream_id"), "must not be empty");
            }
            let Some(&provider) = provider_index.get(&m.provider) else {
                return err(
                    format!("{at}.provider"),
                    format!("no provider named \"{}\"", m.provider),
                );
            };
            let input = price(&format!("{at}.input_usd_per_mtok"), m.input_usd_per_mtok)?;
            let output = price(&format!("{at}.output_usd_per_mtok"), m.output_usd_per_mtok)?;
            let cache_price = |field: &str, v: Option<f64>| match v {
                Some(v) => price(&format!("{at}.{field}"), v).map(Some),
                None => Ok(None),
            };
            let cache_read_price =
                cache_price("cache_read_usd_per_mtok", m.cache_read_usd_per_mtok)?;
            let cache_write_price =
                cache_price("cache_write_usd_per_mtok", m.cache_write_usd_per_mtok)?;
            if m.max_output_tokens == Some(0) {
                return err(format!("{at}.max_output_tokens"), "must be greater than 0");
            }
            if let Some(window) = m.context_window_tokens {
                if window == 0 {
                    return err(
                        format!("{at}.context_window_tokens"),
                        "must be greater than 0",
                    );
                }
                if let Some(out) = m.max_output_tokens.filter(|&o| u64::from(o) > window) {
                    return err(
                        format!("{at}.max_output_tokens"),
                        format!("{out} exceeds the model's context_window_tokens ({window})"),
                    );
                }
            }
            let family = match m.endpoint.as_deref() {
                None => Family::Chat,
                Some(e) => match Family::parse(e) {
                    Some(f) => f,
                    None => {
                        return err(
                            format!("{at}.endpoint"),
                            format!("\"{e}\" is not one of chat, embeddings, images, speech, transcriptions"),
                        )
                    }
                },
            };
            let unit_price = parse_unit_price(&at, family, &m)?;
            models.push(Model {
                family,
                unit_price,
                upstream_id: m.upstream_id.unwrap_or_else(|| m.id.clone()),
                id: m.id,
                provider,
                input_price: input,
                output_price: output,
                cache_read_price,
                cache_write_price,
                max_output_tokens: m
                    .max_output_tokens
                    .unwrap_or(raw.server.default_max_output_tokens),
                context_window_tokens: m.context_window_tokens,
                free: m.free,
            });
        }

        let mut aliases = BTreeMap::new();
        for (name, chain) in raw.aliases {
            let at = format!("aliases.{name}");
            if model_index.contains_key(&name) {
                return err(&at, "an alias may not share its name with a model");
            }
            if chain.is_empty() {
                return err(&at, "must list at least one model");
            }
            if chain.len() > MAX_ALIAS_MODELS {
                return err(
                    &at,
                    format!(
                        "lists {} models; an alias chain holds at most {MAX_ALIAS_MODELS}",
                        chain.len()
                    ),
                );
            }
            let mut resolved = Vec::with_capacity(chain.len());
            for (j, id) in chain.iter().enumerate() {
                match model_index.get(id) {
                    Some(&m) => resolved.push(m),
                    None => return err(format!("{at}[{j}]"), format!("no model named \"{id}\"")),
                }
            }
            aliases.insert(name, resolved);
        }

        let s = raw.server;
        if s.threads == 0 {
            return err("server.threads", "must be at least 1");
        }
        if s.flush_interval_ms == 0 || s.flush_interval_ms > 1_000 {
            return err("server.flush_interval_ms", "must be between 1 and 1000");
        }
        if s.reload_interval_ms == 0 || s.reload_interval_ms > 1_000 {
            return err("server.reload_interval_ms", "must be between 1 and 1000");
        }
        if s.trace_retention_days == 0 {
            return err("server.trace_retention_days", "must be at least 1");
        }
        if s.default_max_output_tokens == 0 {
            return err("server.default_max_output_tokens", "must be at least 1");
        }
        if s.auth_failures_per_minute == 0 {
            return err("server.auth_failures_per_minute", "must be at least 1");
        }
        if s.read_timeout_ms == 0 {
            return err("server.read_timeout_ms", "must be at least 1");
        }
        if s.first_byte_timeout_ms == Some(0) {
            return err("server.first_byte_timeout_ms", "must be at least 1");
        }
        if s.idle_timeout_ms == Some(0) {
            return err("server.idle_timeout_ms", "must be at least 1");
        }
        if s.header_timeout_ms < 1_000 {
            return err("server.header_timeout_ms", "must be at least 1000");
        }
        if s.body_timeout_ms < 1_000 {
            return err("server.body_timeout_ms", "must be at least 1000");
        }
        if s.max_header_bytes < 1_024 {
            return err("server.max_header_bytes", "must be at least 1024");
        }
        let mut trusted_proxies = Vec::with_capacity(s.trusted_proxies.len());
        for (i, p) in s.trusted_proxies.iter().enumerate() {
            match crate::shield::IpNet::parse(p) {
                Some(net) => trusted_proxies.push(net),
                None => {
                    return err(
                        format!("server.trusted_proxies[{i}]"),
                        format!("\"{p}\" is not an address or network (10.0.0.0/8)"),
                    )
                }
            }
        }
        if !(100..=60_000).contains(&s.dns_refresh_ms) {
            return err("server.dns_refresh_ms", "must be between 100 and 60000");
        }
        if s.ledger_max_backlog < 1_000 {
            return err("server.ledger_max_backlog", "must be at least 1000");
        }
        let telemetry = raw.telemetry.map(parse_telemetry).transpose()?;
        let alerts = raw
            .alerts
            .map(crate::alerts::settings::parse)
            .transpose()
            .map_err(ConfigError)?;
        let public_url = match raw.public_url {
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                u.trim_end_matches('/').to_string()
            }
            Some(u) => {
                return err(
                    "public_url",
                    format!("\"{u}\" must start with http:// or https://"),
                )
            }
            None => format!("http://{listen}"),
        };
        Ok(Config {
            path: path.to_path_buf(),
            listen,
            database: PathBuf::from(database),
            shared_state,
            telemetry,
            alerts,
            max_body_bytes: raw.max_body_bytes,
            public_catalog: raw.public_catalog,
            public_url,
            admin,
            tls: parse_tls("tls", raw.tls)?,
            providers,
            models,
            aliases,
            tuning: Tuning {
                threads: s.threads,
                connect_timeout: Duration::from_millis(s.connect_timeout_ms),
                first_byte_timeout: Duration::from_millis(
                    s.first_byte_timeout_ms.unwrap_or(s.read_timeout_ms),
                ),
                idle_timeout: Duration::from_millis(s.idle_timeout_ms.unwrap_or(s.read_timeout_ms)),
                flush_interval: Duration::from_millis(s.flush_interval_ms),
                reload_interval: Duration::from_millis(s.reload_interval_ms),
                trace_retention_days: s.trace_retention_days,
                shutdown_grace: Duration::from_secs(
                    s.shutdown_grace_s.or(s.shutdown_timeout_secs).unwrap_or(30),
                ),
                media_part_tokens: s.media_part_tokens,
                max_audio_seconds: s.max_audio_seconds.max(1),
                multipart_hold_bytes: s.multipart_hold_bytes,
                tool_prompt_tokens: s.tool_prompt_tokens,
                auth_failures_per_minute: s.auth_failures_per_minute,
                ledger_max_backlog: s.ledger_max_backlog,
                upgrade_sock: s.upgrade_sock,
                header_timeout: Duration::from_millis(s.header_timeout_ms),
                max_connections: s.max_connections,
                max_header_bytes: s.max_header_bytes,
                body_timeout: Duration::from_millis(s.body_timeout_ms),
                dns_refresh: Duration::from_millis(s.dns_refresh_ms),
                trusted_proxies,
            },
        })
    }

    /// Reads every provider key from its environment variable (at `serve` start-up).
    pub fn load_provider_keys(&mut self) {
        for p in &mut self.providers {
            p.keys = p
                .key_envs
                .iter()
                .filter_map(|env| {
                    let key = std::env::var(env).ok().filter(|k| !k.is_empty())?;
                    Some((env.clone(), key))
                })
                .collect();
        }
    }

    pub fn model_index(&self, id: &str) -> Option<usize> {
        self.models.iter().position(|m| m.id == id)
    }
}

/// Whether two listen addresses would take the same port: the same port on the same
/// address, or on any address when one of them is the unspecified one (`0.0.0.0`, `::`).
fn listeners_overlap(a: &str, b: &str) -> bool {
    match (a.parse::<SocketAddr>(), b.parse::<SocketAddr>()) {
        (Ok(a), Ok(b)) => {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        }
        _ => a == b,
    }
}

fn check_socket_addr(at: &str, value: &str) -> Result<(), ConfigError> {
    match value.parse::<SocketAddr>() {
        Ok(_) => Ok(()),
        Err(_) => err(at, format!("\"{value}\" is not an IP:port address")),
    }
}

/// The one unit price `models[i]` may set: the one its family charges by.
fn parse_unit_price(
    at: &str,
    family: Family,
    m: &RawModel,
) -> Result<Option<UnitPrice>, ConfigError> {
    let fields = [
        (
            "usd_per_image",
            m.usd_per_image,
            Family::Images,
            1,
            Unit::Image,
        ),
        (
            "usd_per_mchar",
            m.usd_per_mchar,
            Family::Speech,
            1_000_000,
            Unit::Char,
        ),
        (
            "usd_per_minute",
            m.usd_per_minute,
            Family::Transcriptions,
            60_000,
            Unit::Millisecond,
        ),
    ];
    let mut found = None;
    for (name, value, serves, per, unit) in fields {
        let Some(usd) = value else { continue };
        if family != serves {
            return err(
                format!("{at}.{name}"),
                format!(
                    "only a model with endpoint: {} has this price",
                    serves.label()
                ),
            );
        }
        match UnitPrice::new(usd, per, unit) {
            Some(p) => found = Some(p),
            None => {
                return err(
                    format!("{at}.{name}"),
                    "must be a price between 0 and 1000000 USD",
                )
            }
        }
    }
    Ok(found)
}

fn price(at: &str, usd_per_mtok: f64) -> Result<Price, ConfigError> {
    match Price::per_mtok(usd_per_mtok) {
        Some(p) => Ok(p),
        None => err(
            at,
            "must be a price between 0 and 1000000 USD per million tokens",
        ),
    }
}

fn parse_provider(at: &str, p: RawProvider) -> Result<Provider, ConfigError> {
    let kind = match p.kind.as_str() {
        "openai" => ProviderKind::OpenAi,
        "anthropic" => ProviderKind::Anthropic,
        other => {
            return err(
                format!("{at}.kind"),
                format!("unknown kind \"{other}\" (openai | anthropic)"),
            )
        }
    };
    let (tls, rest) = if let Some(r) = p.base_url.strip_prefix("https://") {
        (true, r)
    } else if let Some(r) = p.base_url.strip_prefix("http://") {
        (false, r)
    } else {
        return err(
            format!("{at}.base_url"),
            "must start with http:// or https://",
        );
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return err(format!("{at}.base_url"), "must name a host");
    }
    let default_port = if tls { 443 } else { 80 };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') || authority.starts_with('[') => match port.parse() {
            Ok(port) => (h.trim_start_matches('[').trim_end_matches(']'), port),
            Err(_) => return err(format!("{at}.base_url"), format!("bad port \"{port}\"")),
        },
        _ => (authority, default_port),
    };
    let host_header = if port == default_port {
        host.to_string()
    } else {
        authority.to_string()
    };
    let key_envs = match (p.api_key_env, p.api_key_envs) {
        (Some(_), Some(_)) => {
            return err(
                format!("{at}.api_key_envs"),
                "give either api_key_env or api_key_envs, not both",
            )
        }
        (Some(env), None) => vec![env],
        (None, Some(envs)) if envs.is_empty() => {
            return err(
                format!("{at}.api_key_envs"),
                "must name at least one variable",
            )
        }
        (None, Some(envs)) => envs,
        (None, None) => Vec::new(),
    };
    for (i, env) in key_envs.iter().enumerate() {
        if env.is_empty() || key_envs[..i].contains(env) {
            return err(
                format!("{at}.api_key_envs[{i}]"),
                "must be a distinct, non-empty variable name",
            );
        }
    }
    let tls_ca_file = match p.tls_ca_file {
        Some(f) if f.is_empty() => return err(format!("{at}.tls_ca_file"), "must name a file"),
        Some(_) if !tls => {
            return err(format!("{at}.tls_ca_file"), "only for an https:// base_url")
        }
        f => f.map(PathBuf::from),
    };
    if p.anthropic_version.is_some() && kind != ProviderKind::Anthropic {
        return err(
            format!("{at}.anthropic_version"),
            "only for kind: anthropic",
        );
    }
    Ok(Provider {
        name: p.name,
        kind,
        base_url: p.base_url.clone(),
        tls,
        host: host.to_string(),
        host_header,
        port,
        base_path: path.trim_end_matches('/').to_string(),
        keys: Vec::new(),
        key_envs,
        anthropic_version: p
            .anthropic_version
            .unwrap_or_else(|| DEFAULT_ANTHROPIC_VERSION.to_string()),
        tls_ca_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_keys_never_appear_in_debug_output() {
        let yaml = "listen: \"127.0.0.1:1\"\ndatabase: \"x.db\"\nproviders: [{name: p, kind: openai, base_url: \"http://127.0.0.1:1/v1\", api_key_env: SG_DEBUG_TEST_KEY}]\nmodels: [{id: m, provider: p, input_usd_per_mtok: 1, output_usd_per_mtok: 1}]\n";
        let mut config = Config::parse(yaml, Path::new("t.yaml")).unwrap();
        config.providers[0].keys =
            vec![("SG_DEBUG_TEST_KEY".into(), "sk-live-secret-value".into())];
        let shown = format!("{config:?} {:?}", config.providers[0]);
        assert!(!shown.contains("sk-live-secret-value"), "{shown}");
        assert!(shown.contains("SG_DEBUG_TEST_KEY"), "{shown}");
    }

    const BASE: &str = r#"
listen: "127.0.0.1:8080"
database: "data/x.db"
providers:
  - name: openai
    kind: openai
    base_url: "http://127.0.0.1:9000/v1"
    api_key_env: OPENAI_API_KEY
models:
  - id: gpt-4o-mini
    provider: openai
    input_usd_per_mtok: 0.15
    output_usd_per_mtok: 0.60
  - id: llama
    provider: openai
    upstream_id: meta/llama
    input_usd_per_mtok: 0
    output_usd_per_mtok: 0
    free: true
aliases:
  spideriq/fast: [llama, gpt-4o-mini]
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.yaml"))
    }

    #[test]
    fn valid_config_resolves_everything() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.max_body_bytes, 32 * 1024 * 1024);
        assert_eq!(c.models[0].input_price.pico_per_token(), 150_000);
        assert_eq!(c.models[0].output_price.pico_per_token(), 600_000);
        assert_eq!(c.models[1].upstream_id, "meta/llama");
        assert_eq!(c.aliases["spideriq/fast"], vec![1, 0]);
        let p = &c.providers[0];
        assert_eq!((p.host.as_str(), p.port, p.tls), ("127.0.0.1", 9000, false));
        assert_eq!(p.base_path, "/v1");
        assert_eq!(p.host_header, "127.0.0.1:9000");
    }

    /// SPEC: CLI changes take effect within 1 s. The gateway polls the store every
    /// `reload_interval_ms`, so that contract is this bound (the integration tests check that
    /// changes arrive; they do not time them).
    #[test]
    fn reload_interval_above_one_second_is_refused() {
        assert_eq!(
            parse(BASE).unwrap().tuning.reload_interval,
            Duration::from_millis(250)
        );
        let at = |ms: u64| parse(&format!("{BASE}server:\n  reload_interval_ms: {ms}\n"));
        assert_eq!(
            at(1_000).unwrap().tuning.reload_interval,
            Duration::from_secs(1)
        );
        assert_eq!(
            at(1_001).unwrap_err().to_string(),
            "server.reload_interval_ms: must be between 1 and 1000"
        );
    }

    #[test]
    fn the_store_is_read_from_a_config_that_does_not_load_whole() {
        let dir = std::env::temp_dir().join(format!("sg-store-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.yaml");
        let at = |text: &str| {
            std::fs::write(&path, text).unwrap();
            Config::store_location_only(&path).map_err(|e| e.to_string())
        };
        let db = dir.join("x.db");
        let base = BASE.replace("data/x.db", &db.display().to_string());
        let broken = format!("{base}\nlisten_typo: 1\nmodels: 7\n");
        assert!(Config::parse(&broken, &path).is_err());
        assert_eq!(
            at(&broken).unwrap_err(),
            format!("database: {} does not exist", db.display()),
            "never a new, empty database"
        );
        std::fs::write(&db, b"").unwrap();
        match at(&broken).unwrap() {
            StoreLocation::Sqlite(p) => assert_eq!(p, db),
            other => panic!("{other:?}"),
        }
        // Nothing guessed about where PostgreSQL settings might have been meant to go.
        let typo = at(&format!(
            "{base}\nshared_state:\n  postgres_url_evn: SG_STORE_ONLY_TEST_PG\n"
        ))
        .unwrap_err();
        assert!(typo.contains("postgres_url_evn"), "{typo}");
        let misplaced = at(&format!(
            "{base}\npostgres_url_env: SG_STORE_ONLY_TEST_PG\n"
        ));
        assert!(misplaced.unwrap_err().starts_with("postgres_url_env: "));
        let dashed = at(&format!("{base}\nshared-state: {{}}\n"));
        assert!(dashed.unwrap_err().starts_with("shared-state: "));
        assert_eq!(
            at("database: \":memory:\"\n").unwrap_err(),
            "database: \":memory:\" is not a file path"
        );
        assert_eq!(at("listen: x\n").unwrap_err(), "database: required");
        std::env::set_var("SG_STORE_ONLY_TEST_PG", "postgres://u@127.0.0.1/db");
        let pg = at("shared_state:\n  postgres_url_env: SG_STORE_ONLY_TEST_PG\nbogus: 1\n");
        assert!(matches!(pg.unwrap(), StoreLocation::Postgres(u) if u.ends_with("/db")));
        assert!(
            at("shared_state:\n  postgres_url_env: SG_STORE_ONLY_TEST_UNSET\n")
                .unwrap_err()
                .contains("SG_STORE_ONLY_TEST_UNSET is not set")
        );
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn an_alias_written_twice_is_refused_not_overwritten() {
        let twice = format!("{BASE}  spideriq/fast: [gpt-4o-mini]\n");
        let e = parse(&twice).unwrap_err().to_string();
        assert!(e.contains("duplicate alias \"spideriq/fast\""), "{e}");
        let two = format!("{BASE}  spideriq/other: [gpt-4o-mini]\n");
        assert_eq!(parse(&two).unwrap().aliases.len(), 2);
    }

    #[test]
    fn errors_name_the_field_path() {
        let bad = BASE.replace(
            "provider: openai\n    upstream_id",
            "provider: opnai\n    upstream_id",
        );
        let e = parse(&bad).unwrap_err().to_string();
        assert_eq!(e, "models[1].provider: no provider named \"opnai\"");

        let bad = BASE.replace("[llama, gpt-4o-mini]", "[llama, gpt-5]");
        let e = parse(&bad).unwrap_err().to_string();
        assert_eq!(e, "aliases.spideriq/fast[1]: no model named \"gpt-5\"");

        let bad = BASE.replace("listen: \"127.0.0.1:8080\"\n", "");
        assert_eq!(parse(&bad).unwrap_err().to_string(), "listen: required");
    }

    #[test]
    fn a_config_every_door_cannot_share_is_refused() {
        for db in [
            "\"\"",
            "\":memory:\"",
            "\"file::memory:?cache=shared\"",
            "\"  \"",
        ] {
            let bad = BASE.replace("database: \"data/x.db\"", &format!("database: {db}"));
            let e = parse(&bad).unwrap_err().to_string();
            assert!(e.starts_with("database: "), "{db}: {e}");
        }
        for admin in ["127.0.0.1:8080", "0.0.0.0:8080", "[::]:8080"] {
            let bad = format!("{BASE}admin: {{listen: \"{admin}\", token_env: T}}\n");
            let e = parse(&bad).unwrap_err().to_string();
            assert!(e.starts_with("admin.listen: "), "{admin}: {e}");
        }
        // Another port, or the same port on another address, is fine.
        for admin in ["127.0.0.1:8081", "127.0.0.2:8080"] {
            let ok = format!("{BASE}admin: {{listen: \"{admin}\", token_env: T}}\n");
            assert!(parse(&ok).is_ok(), "{admin}");
        }
        let bad = BASE.replace("  - name: openai\n", "  - name: \"\"\n");
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "providers[0].name: must not be empty"
        );
        let bad = BASE.replace("upstream_id: meta/llama", "upstream_id: \"\"");
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "models[1].upstream_id: must not be empty"
        );
        let nine = ["llama"; MAX_ALIAS_MODELS + 1].join(", ");
        let bad = BASE.replace("[llama, gpt-4o-mini]", &format!("[{nine}]"));
        assert_eq!(
            parse(&bad).unwrap_err().to_string(),
            "aliases.spideriq/fast: lists 9 models; an alias chain holds at most 8"
        );
        let eight = ["llama"; MAX_ALIAS_MODELS].join(", ");
        assert!(parse(&BASE.replace("[llama, gpt-4o-mini]", &format!("[{eight}]"))).is_ok());
    }

    #[test]
    fn model_families_and_unit_prices_are_validated() {
        let media = BASE.replace(
            "aliases:",
            "  - {id: img, provider: openai, endpoint: images, usd_per_image: 0.04}\n  - {id: tts, provider: openai, endpoint: speech, usd_per_mchar: 15}\n  - {id: stt, provider: openai, endpoint: transcriptions, usd_per_minute: 0.006}\n  - {id: emb, provider: openai, endpoint: embeddings, input_usd_per_mtok: 0.02}\naliases:",
        );
        let c = parse(&media).unwrap();
        let families: Vec<Family> = c.models.iter().map(|m| m.family).collect();
        assert_eq!(
            families,
            [
                Family::Chat,
                Family::Chat,
                Family::Images,
                Family::Speech,
                Family::Transcriptions,
                Family::Embeddings
            ]
        );
        // Exact: 2 images, a million characters, one minute (in ms).
        let price = |i: usize| c.models[i].unit_price.unwrap();
        assert_eq!(price(2).cost(2), crate::money::Nanos::new(80_000_000));
        assert_eq!(
            price(3).cost(1_000_000),
            crate::money::Nanos::new(15_000_000_000)
        );
        assert_eq!(price(4).cost(60_000), crate::money::Nanos::new(6_000_000));
        assert_eq!(c.models[2].input_price, Price::FREE);

        let bad = media.replace("endpoint: images", "endpoint: pictures");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("models[2].endpoint: \"pictures\" is not one of"),
            "{e}"
        );
        let bad = media.replace("endpoint: speech, usd_per_mchar", "usd_per_mchar");
        let e = parse(&bad).unwrap_err().to_string();
        assert_eq!(
            e,
            "models[3].usd_per_mchar: only a model with endpoint: speech has this price"
        );
        let bad = media.replace("usd_per_image: 0.04", "usd_per_image: -1");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.starts_with("models[2].usd_per_image: must be a price"),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_errors() {
        let bad = format!("{BASE}\nlisten_port: 3\n");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.contains("unknown field `listen_port`"), "{e}");
        let bad = BASE.replace("free: true", "free: true\n    fre: 1");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(
            e.contains("models[1]") && e.contains("unknown field `fre`"),
            "{e}"
        );
    }

    #[test]
    fn shared_state_reads_its_urls_from_the_environment_and_frees_database() {
        // Names unique to this test: the environment is shared by the test threads.
        std::env::set_var("SG_CFG_TEST_PG", "postgres://u:p@127.0.0.1:5432/sg");
        std::env::set_var("SG_CFG_TEST_REDIS", "redis://127.0.0.1:6379/");
        std::env::set_var("SG_CFG_TEST_BAD", "http://nope");
        let shared = |body: &str| {
            format!(
                "{}\nshared_state:\n{body}",
                BASE.replace("database: \"data/x.db\"\n", "")
            )
        };
        let c = parse(&shared(
            "  postgres_url_env: SG_CFG_TEST_PG\n  redis_url_env: SG_CFG_TEST_REDIS\n",
        ))
        .unwrap();
        let s = c.shared_state.as_ref().unwrap();
        assert_eq!(s.on_error, OnError::Closed);
        assert_eq!(s.reservation_ttl, Duration::from_secs(30));
        assert!(matches!(c.store_location(), StoreLocation::Postgres(_)));
        // The URL (a password) never shows in Debug output.
        assert!(!format!("{c:?}").contains("u:p@"));

        // Without PostgreSQL, `database` is required again.
        let e = parse(&shared("  redis_url_env: SG_CFG_TEST_REDIS\n")).unwrap_err();
        assert_eq!(e.to_string(), "database: required");

        let e = parse(&shared("  postgres_url_env: SG_CFG_TEST_UNSET_VAR\n")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "shared_state.postgres_url_env: environment variable SG_CFG_TEST_UNSET_VAR is not set"
        );
        let e = parse(&shared(
            "  postgres_url_env: SG_CFG_TEST_PG\n  redis_url_env: SG_CFG_TEST_BAD\n",
        ))
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("shared_state.redis_url_env: is not a Redis URL"),
            "{e}"
        );
        let e = parse(&shared(
            "  postgres_url_env: SG_CFG_TEST_PG\n  on_error: open\n",
        ))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "shared_state.on_error: \"open\" is not closed or local"
        );
        let e = parse(&shared("  on_error: local\n")).unwrap_err();
        assert!(
            e.to_string().starts_with("shared_state: names neither"),
            "{e}"
        );
    }

    #[test]
    fn base_url_must_be_http() {
        let bad = BASE.replace("http://127.0.0.1:9000/v1", "ftp://x");
        let e = parse(&bad).unwrap_err().to_string();
        assert!(e.starts_with("providers[0].base_url:"), "{e}");
    }

    #[test]
    fn read_timeout_ms_is_the_default_of_first_byte_and_idle() {
        let t = |server: &str| parse(&format!("{BASE}server:\n{server}")).map(|c| c.tuning);
        let ms = Duration::from_millis;
        let c = t("  read_timeout_ms: 700\n").unwrap();
        assert_eq!((c.first_byte_timeout, c.idle_timeout), (ms(700), ms(700)));
        let c = t("  read_timeout_ms: 700\n  idle_timeout_ms: 200\n").unwrap();
        assert_eq!((c.first_byte_timeout, c.idle_timeout), (ms(700), ms(200)));
        let c = t("  first_byte_timeout_ms: 100\n").unwrap();
        assert_eq!(
            (c.first_byte_timeout, c.idle_timeout),
            (ms(100), ms(300_000))
        );
        for field in [
            "read_timeout_ms",
            "first_byte_timeout_ms",
            "idle_timeout_ms",
        ] {
            let e = t(&format!("  {field}: 0\n")).unwrap_err().to_string();
            assert_eq!(e, format!("server.{field}: must be at least 1"));
        }
    }
}
