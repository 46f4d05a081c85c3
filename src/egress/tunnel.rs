//! Upstream connections through a corporate egress proxy: `HTTPS_PROXY` / `https_proxy`
//! name an HTTP proxy, `NO_PROXY` / `no_proxy` the hosts reached directly, exactly as the
//! OpenAI and Anthropic SDKs read them. An `https://` provider is then reached through an
//! HTTP `CONNECT host:port` tunnel, and TLS to the provider runs inside it, verified as
//! usual: the proxy sees only the host name and ciphertext.
//!
//! Pingora's own CONNECT support speaks only to a Unix socket, so the tunnel is a custom
//! L4 connector ([`ConnectTunnel`]) set on each proxied peer.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use pingora_core::connectors::L4Connect;
use pingora_core::protocols::l4::stream::Stream;
use pingora_error::{Error, ErrorType, OrErr, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest CONNECT response head accepted from the proxy.
const MAX_PROXY_HEAD: usize = 16 * 1024;

/// The egress proxy the environment names, and the hosts that bypass it.
#[derive(Clone, PartialEq, Eq)]
pub struct EgressProxy {
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization` value, from credentials in the proxy URL.
    authorization: Option<String>,
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for EgressProxy {
    // Credentials stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressProxy")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("authenticated", &self.authorization.is_some())
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl EgressProxy {
    /// From the process environment: `https_proxy` (else `HTTPS_PROXY`) and `no_proxy`
    /// (else `NO_PROXY`). `None` when no proxy is set; `Err` when it cannot be parsed.
    pub fn from_env() -> Result<Option<EgressProxy>, String> {
        let var = |lower: &str, upper: &str| {
            std::env::var(lower)
                .ok()
                .filter(|v| !v.trim().is_empty())
                .or_else(|| std::env::var(upper).ok().filter(|v| !v.trim().is_empty()))
        };
        let Some(url) = var("https_proxy", "HTTPS_PROXY") else {
            return Ok(None);
        };
        let no_proxy = var("no_proxy", "NO_PROXY").unwrap_or_default();
        Self::parse(&url, &no_proxy)
            .map(Some)
            .map_err(|e| format!("HTTPS_PROXY: {e}"))
    }

    /// `http://[user:password@]host[:port][/]`; a bare `host:port` means `http://`.
    pub fn parse(url: &str, no_proxy: &str) -> Result<EgressProxy, String> {
        let url = url.trim();
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.contains("://") {
            // https:// (TLS to the proxy), socks5://, ...
            return Err("only an http:// proxy (HTTP CONNECT) is supported".into());
        } else {
            url
        };
        let rest = rest.trim_end_matches('/');
        let (userinfo, authority) = match rest.rsplit_once('@') {
            Some((u, a)) => (Some(u), a),
            None => (None, rest),
        };
        if authority.is_empty() || authority.contains('/') {
            return Err("must be http://host[:port]".into());
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || authority.starts_with('[') || h.is_empty() => {
                let port = p.parse().map_err(|_| format!("bad port \"{p}\""))?;
                (h, port)
            }
            _ => (authority, 80),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("must name a host".into());
        }
        let authorization = userinfo.map(|u| {
            let decoded = crate::percent::decode(u);
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded)
            )
        });
        Ok(EgressProxy {
            host: host.to_owned(),
            port,
            authorization,
            no_proxy: no_proxy
                .split(',')
                .map(|e| e.trim().to_ascii_lowercase())
                .filter(|e| !e.is_empty())
                .collect(),
        })
    }

    /// Whether `host:port` goes through the proxy: not when `NO_PROXY` is `*`, names the
    /// host, a parent domain of it (`example.com` or `.example.com`), or `host:port`.
    pub fn applies_to(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        !self.no_proxy.iter().any(|entry| {
            if entry == "*" {
                return true;
            }
            let (name, entry_port) = match entry.rsplit_once(':') {
                Some((n, p)) if !n.contains(':') || n.ends_with(']') => (n, p.parse().ok()),
                _ => (entry.as_str(), None),
            };
            if entry_port.is_some_and(|p: u16| p != port) {
                return false;
            }
            let name = name
                .trim_start_matches("*.")
                .trim_start_matches('.')
                .trim_start_matches('[')
                .trim_end_matches(']');
            host == name || host.ends_with(&format!(".{name}"))
        })
    }

    /// The connector for one target behind this proxy.
    pub fn tunnel_to(
        &self,
        target_host: &str,
        target_port: u16,
        timeout: Duration,
    ) -> ConnectTunnel {
        let target = if target_host.contains(':') {
            format!("[{target_host}]:{target_port}")
        } else {
            format!("{target_host}:{target_port}")
        };
        ConnectTunnel {
            target,
            authorization: self.authorization.clone(),
            timeout,
        }
    }
}

/// Opens a TCP connection to the proxy (the peer's address) and a CONNECT tunnel through it
/// to `target`; Pingora then runs TLS to the provider over the tunnel.
pub struct ConnectTunnel {
    target: String,
    authorization: Option<String>,
    timeout: Duration,
}

impl std::fmt::Debug for ConnectTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectTunnel")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for ConnectTunnel {
    async fn connect(
        &self,
        addr: &pingora_core::protocols::l4::socket::SocketAddr,
    ) -> Result<Stream> {
        let Some(proxy) = addr.as_inet().copied() else {
            return Error::e_explain(
                ErrorType::ConnectProxyFailure,
                "egress proxy is not a TCP address",
            );
        };
        match tokio::time::timeout(self.timeout, self.open(proxy)).await {
            Ok(r) => r,
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!(
                    "CONNECT {} through {proxy}: timed out after {:?}",
                    self.target, self.timeout
                ),
            ),
        }
    }
}

impl ConnectTunnel {
    async fn open(&self, proxy: SocketAddr) -> Result<Stream> {
        let mut tcp = TcpStream::connect(proxy).await.map_err(|e| {
            let etype = match e.kind() {
                std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                _ => ErrorType::ConnectError,
            };
            Error::because(etype, format!("egress proxy {proxy}"), e)
        })?;
        let _ = tcp.set_nodelay(true);
        let mut head = format!(
            "CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nUser-Agent: spidergate\r\n",
            t = self.target
        );
        if let Some(auth) = &self.authorization {
            head.push_str("Proxy-Authorization: ");
            head.push_str(auth);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.or_err(
            ErrorType::ConnectProxyFailure,
            "writing CONNECT to the egress proxy",
        )?;
        // The provider says nothing before our ClientHello, so everything the proxy sends
        // before then is its response head.
        let mut buf = Vec::with_capacity(512);
        loop {
            let mut chunk = [0u8; 1024];
            let n = tcp.read(&mut chunk).await.or_err(
                ErrorType::ConnectProxyFailure,
                "reading the egress proxy's answer",
            )?;
            if n == 0 {
                return Error::e_explain(
                    ErrorType::ConnectProxyFailure,
                    format!(
                        "egress proxy closed the connection before answering CONNECT {}",
                        self.target
                    ),
                );
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(end) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut response = httparse::Response::new(&mut headers);
                let status = match response.parse(&buf[..end + 4]) {
                    Ok(httparse::Status::Complete(_)) => response.code.unwrap_or(0),
                    _ => 0,
                };
                if !(200..300).contains(&status) {
                    return Error::e_explain(
                        ErrorType::ConnectProxyFailure,
                        format!("egress proxy answered {status} to CONNECT {}", self.target),
                    );
                }
                if buf.len() > end + 4 {
                    return Error::e_explain(
                        ErrorType::ConnectProxyFailure,
                        "egress proxy sent bytes after its CONNECT answer",
                    );
                }
                return Ok(Stream::from(tcp));
            }
            if buf.len() > MAX_PROXY_HEAD {
                return Error::e_explain(
                    ErrorType::ConnectProxyFailure,
                    "egress proxy's CONNECT answer is too long",
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_like_the_sdks_read_them() {
        let p = EgressProxy::parse("http://proxy.corp:3128", "").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 3128));
        assert!(p.authorization.is_none());
        let p = EgressProxy::parse("proxy.corp:8080/", "").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("proxy.corp", 8080));
        let p = EgressProxy::parse("http://proxy.corp", "").unwrap();
        assert_eq!(p.port, 80);
        let p = EgressProxy::parse("http://al%40ice:s3cret@[::1]:3128", "").unwrap();
        assert_eq!((p.host.as_str(), p.port), ("::1", 3128));
        // base64("al@ice:s3cret")
        assert_eq!(
            p.authorization.as_deref(),
            Some("Basic YWxAaWNlOnMzY3JldA==")
        );
        assert!(!format!("{p:?}").contains("s3cret"));
        assert!(EgressProxy::parse("https://proxy:443", "").is_err());
        assert!(EgressProxy::parse("socks5://proxy:1080", "").is_err());
        assert!(EgressProxy::parse("http://proxy:notaport", "").is_err());
        assert!(EgressProxy::parse("http://", "").is_err());
    }

    #[test]
    fn no_proxy_names_hosts_domains_ports_and_everything() {
        let p = EgressProxy::parse(
            "http://p:1",
            "localhost, .internal.corp,example.com,api.x.io:8443,[::1]",
        )
        .unwrap();
        assert!(!p.applies_to("localhost", 443));
        assert!(!p.applies_to("llm.internal.corp", 443));
        assert!(!p.applies_to("example.com", 443));
        assert!(!p.applies_to("api.example.com", 443));
        assert!(!p.applies_to("API.Example.COM.", 443));
        assert!(!p.applies_to("api.x.io", 8443));
        assert!(p.applies_to("api.x.io", 443));
        assert!(!p.applies_to("::1", 443));
        assert!(p.applies_to("api.openai.com", 443));
        assert!(p.applies_to("notexample.com", 443));
        let all = EgressProxy::parse("http://p:1", "*").unwrap();
        assert!(!all.applies_to("api.openai.com", 443));
    }

    #[test]
    fn tunnel_targets_bracket_ipv6() {
        let p = EgressProxy::parse("http://p:1", "").unwrap();
        assert_eq!(
            p.tunnel_to("::1", 443, Duration::from_secs(1)).target,
            "[::1]:443"
        );
        assert_eq!(
            p.tunnel_to("api.openai.com", 443, Duration::from_secs(1))
                .target,
            "api.openai.com:443"
        );
    }
}
