//! How the gateway reaches its providers: every address of their host names, kept fresh in
//! the background (`addrs`); the CAs a provider's certificate must chain to (`trust`); and
//! the corporate egress proxy that upstream connections may have to tunnel through (`tunnel`).
//!
//! TLS itself is Pingora's (the `rustls` feature, ring as the crypto provider installed at
//! start-up): the chain is verified against the system trust store, or against the
//! provider's `tls_ca_file`, and the host name is checked by SNI. There is deliberately no
//! switch to skip verification.

pub mod addrs;
pub mod trust;
pub mod tunnel;

pub use addrs::ProviderAddrs;
pub use trust::CaBundle;
pub use tunnel::{ConnectTunnel, EgressProxy};

/// Why an attempt could not reach its provider, as a low-cardinality metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// The TLS handshake failed: an untrusted chain, a certificate for another name, or no
    /// protocol in common.
    Tls,
    /// The TCP connection was refused or found no route.
    Refused,
    /// Connecting (TCP or TLS) took longer than `server.connect_timeout_ms`.
    Timeout,
    /// The egress proxy refused or broke the CONNECT tunnel.
    Proxy,
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Tls,
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Proxy,
        ConnectFailure::Other,
    ];

    pub fn of(e: &pingora_error::Error) -> ConnectFailure {
        use pingora_error::ErrorType::*;
        match e.etype() {
            TLSHandshakeFailure | InvalidCert | HandshakeError | TLSWantX509Lookup => {
                ConnectFailure::Tls
            }
            ConnectTimedout | TLSHandshakeTimedout => ConnectFailure::Timeout,
            ConnectRefused | ConnectNoRoute => ConnectFailure::Refused,
            ConnectProxyFailure => ConnectFailure::Proxy,
            _ => ConnectFailure::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            ConnectFailure::Tls => "tls",
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Proxy => "proxy",
            ConnectFailure::Other => "other",
        }
    }

    /// Another address of the same host may succeed where this one failed: a refused or
    /// timed-out TCP connection. A TLS failure would repeat on every address.
    pub fn try_another_address(self) -> bool {
        matches!(self, ConnectFailure::Refused | ConnectFailure::Timeout)
    }
}
