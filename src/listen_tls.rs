//! TLS on the gateway's own listeners (`tls` for agents, `admin.tls` for the admin API and
//! dashboard): the certificate pair checked as `check-config` reports it, a rustls server
//! config (TLS 1.3 preferred, TLS 1.2 with forward-secret AEAD suites only, ALPN `h2` then
//! `http/1.1`), and a certificate that SIGHUP swaps for new connections while open ones
//! continue on the old.
//!
//! The served certificate lives behind an `ArcSwap` read by rustls' certificate resolver at
//! each handshake, so rotation needs neither a new listener nor a restart.

use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora_core::listeners::tls::TlsSettings;
use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{Config, TlsFiles};

/// `check-config` warns when a certificate expires sooner than this.
pub const EXPIRY_WARNING_DAYS: i64 = 14;

/// What `/metrics` and the logs say of a loaded certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// Expiry (`notAfter`), Unix seconds.
    pub not_after: i64,
    /// The leaf's serial number, hex.
    pub serial: String,
}

/// A checked certificate chain and key, ready to serve.
pub struct LoadedPair {
    key: Arc<CertifiedKey>,
    pub info: CertInfo,
}

/// Reads and checks a pair: both files readable PEM, the key matching the leaf certificate,
/// the leaf not expired at `now` (Unix seconds). Errors name `field` (`tls` or `admin.tls`).
pub fn load_pair(field: &str, files: &TlsFiles, now: i64) -> Result<LoadedPair, String> {
    let cert_at = format!("{field}.cert_file");
    let key_at = format!("{field}.key_file");
    let cert_pem = read(&cert_at, &files.cert_file)?;
    let key_pem = read(&key_at, &files.key_file)?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{cert_at}: not valid PEM: {e}"))?;
    let Some(leaf) = chain.first() else {
        return Err(format!(
            "{cert_at}: {} holds no PEM certificate",
            files.cert_file.display()
        ));
    };
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{key_at}: {} holds no PEM private key: {e}",
            files.key_file.display()
        )
    })?;
    let (_, parsed) = X509Certificate::from_der(leaf.as_ref())
        .map_err(|e| format!("{cert_at}: the first certificate cannot be parsed: {e}"))?;
    let info = CertInfo {
        not_after: parsed.validity().not_after.timestamp(),
        serial: parsed.raw_serial_as_string().replace(':', ""),
    };
    if info.not_after <= now {
        return Err(format!(
            "{cert_at}: the certificate expired at {} (Unix time {})",
            parsed.validity().not_after,
            info.not_after
        ));
    }
    let provider = ring::default_provider();
    // `from_der` refuses a key that does not belong to the leaf certificate.
    let key = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("{key_at}: does not match the certificate in {cert_at}: {e}"))?;
    Ok(LoadedPair {
        key: Arc::new(key),
        info,
    })
}

fn read(at: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{at}: cannot read {}: {e}", path.display()))
}

/// The warning for a certificate that expires within [`EXPIRY_WARNING_DAYS`], if any.
pub fn expiry_warning(field: &str, info: &CertInfo, now: i64) -> Option<String> {
    let left = info.not_after - now;
    (left < EXPIRY_WARNING_DAYS * 86_400).then(|| {
        format!(
            "{field}.cert_file: the certificate expires in {} days ({} hours); renew it and send SIGHUP",
            left / 86_400,
            left / 3_600
        )
    })
}

/// What `check-config` checks of the listeners' certificates: errors fail it, the rest are
/// warnings (expiry within 14 days, plain HTTP on a non-loopback address).
pub fn check(config: &Config, now: i64) -> Result<Vec<String>, String> {
    let mut warnings = plain_http_warnings(config);
    for (field, files) in listener_files(config) {
        let pair = load_pair(field, files, now)?;
        warnings.extend(expiry_warning(field, &pair.info, now));
    }
    Ok(warnings)
}

fn listener_files(config: &Config) -> impl Iterator<Item = (&'static str, &TlsFiles)> {
    let agent = config.tls.as_ref().map(|t| ("tls", t));
    let admin = config
        .admin
        .as_ref()
        .and_then(|a| a.tls.as_ref())
        .map(|t| ("admin.tls", t));
    agent.into_iter().chain(admin)
}

/// A plain-HTTP listener on an address other hosts can reach carries bearer secrets (agent
/// keys, the admin token) in clear.
pub fn plain_http_warnings(config: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if config.tls.is_none() && !is_loopback(&config.listen) {
        warnings.push(format!(
            "listen: {} is plain HTTP on a non-loopback address: agent keys cross the network in clear; set `tls` (or terminate TLS in front and keep this on loopback)",
            config.listen
        ));
    }
    if let Some(admin) = &config.admin {
        if admin.tls.is_none() && !is_loopback(&admin.listen) {
            warnings.push(format!(
                "admin.listen: {} is plain HTTP on a non-loopback address: the admin token and the dashboard cross the network in clear; set `admin.tls`",
                admin.listen
            ));
        }
    }
    warnings
}

fn is_loopback(listen: &str) -> bool {
    listen
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_loopback())
}

/// The certificate one listener serves; swapped by SIGHUP.
pub struct ListenerCert {
    pub field: &'static str,
    files: ArcSwap<TlsFiles>,
    resolver: Arc<CertResolver>,
    info: ArcSwap<CertInfo>,
}

#[derive(Debug)]
struct CertResolver(ArcSwap<CertifiedKey>);

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

impl ListenerCert {
    pub fn load(field: &'static str, files: &TlsFiles, now: i64) -> Result<ListenerCert, String> {
        let pair = load_pair(field, files, now)?;
        Ok(ListenerCert {
            field,
            files: ArcSwap::from_pointee(files.clone()),
            resolver: Arc::new(CertResolver(ArcSwap::new(pair.key))),
            info: ArcSwap::from_pointee(pair.info),
        })
    }

    /// The loaded certificate's expiry and serial.
    pub fn info(&self) -> Arc<CertInfo> {
        self.info.load_full()
    }

    /// Pingora's TLS settings for this listener: our rustls config around the swappable
    /// certificate.
    pub fn settings(&self) -> Result<TlsSettings, String> {
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                // rustls negotiates the highest version both sides have: 1.3 first. Its suites
                // are all forward-secret AEADs (no CBC, RC4, 3DES or static RSA).
                .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
                .map_err(|e| format!("{}: {e}", self.field))?
                .with_no_client_auth()
                .with_cert_resolver(self.resolver.clone());
        let mut config = config;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        TlsSettings::with_server_config(Arc::new(config))
            .map_err(|e| format!("{}: {e}", self.field))
    }

    /// The pair to serve from now on (already loaded and checked); new connections get it.
    fn swap(&self, files: &TlsFiles, pair: LoadedPair) {
        self.resolver.0.store(pair.key);
        self.info.store(Arc::new(pair.info));
        self.files.store(Arc::new(files.clone()));
    }
}

/// Pairs read by [`ListenerCerts::prepare`], swapped in by [`PendingCerts::apply`] once the
/// rest of the reload succeeded too.
pub struct PendingCerts<'a> {
    pub warnings: Vec<String>,
    pairs: Vec<(&'a ListenerCert, TlsFiles, LoadedPair)>,
}

impl PendingCerts<'_> {
    /// New connections get the new certificates from now on; open ones keep theirs.
    pub fn apply(self) {
        for (cert, files, pair) in self.pairs {
            if cert.info.load().serial != pair.info.serial {
                log::info!(
                    "{}: now serving certificate {} (expires at Unix time {})",
                    cert.field,
                    pair.info.serial,
                    pair.info.not_after
                );
            }
            cert.swap(&files, pair);
        }
    }
}

/// The certificates of both listeners.
#[derive(Default)]
pub struct ListenerCerts {
    pub agent: Option<ListenerCert>,
    pub admin: Option<ListenerCert>,
}

impl ListenerCerts {
    /// Loads the pairs the config names (start-up): a bad pair is an error.
    pub fn load(config: &Config, now: i64) -> Result<ListenerCerts, String> {
        let agent = config
            .tls
            .as_ref()
            .map(|f| ListenerCert::load("tls", f, now))
            .transpose()?;
        let admin = config
            .admin
            .as_ref()
            .and_then(|a| a.tls.as_ref())
            .map(|f| ListenerCert::load("admin.tls", f, now))
            .transpose()?;
        Ok(ListenerCerts { agent, admin })
    }

    /// SIGHUP, first step: re-reads and checks every pair the new config names, changing
    /// nothing. If one pair is bad, the error (with its field path) is returned and every
    /// listener keeps its certificate. A listener that gains or loses TLS needs a restart
    /// (a warning; it keeps what it serves).
    pub fn prepare(&self, config: &Config, now: i64) -> Result<PendingCerts<'_>, String> {
        let mut pending = PendingCerts {
            warnings: Vec::new(),
            pairs: Vec::new(),
        };
        let wanted = [
            (&self.agent, "tls", config.tls.as_ref()),
            (
                &self.admin,
                "admin.tls",
                config.admin.as_ref().and_then(|a| a.tls.as_ref()),
            ),
        ];
        for (running, field, files) in wanted {
            match (running, files) {
                (Some(cert), Some(files)) => {
                    let pair = load_pair(field, files, now)?;
                    pending
                        .warnings
                        .extend(expiry_warning(field, &pair.info, now));
                    pending.pairs.push((cert, files.clone(), pair));
                }
                (None, None) => {}
                // Checked as `check-config` checks it, though it serves only after a
                // restart: a reload must not accept what the next start would refuse.
                (None, Some(files)) => {
                    let pair = load_pair(field, files, now)?;
                    pending
                        .warnings
                        .extend(expiry_warning(field, &pair.info, now));
                    pending.warnings.push(format!(
                        "{field} was added; that takes effect at the next restart"
                    ));
                }
                (Some(_), None) => pending.warnings.push(format!(
                    "{field} was removed; that takes effect at the next restart"
                )),
            }
        }
        Ok(pending)
    }

    /// `spidergate_tls_certificate_expiry_seconds{listener}` for `/metrics`.
    pub fn render_metrics(&self, s: &mut String) {
        use std::fmt::Write;
        let certs = [("agent", &self.agent), ("admin", &self.admin)];
        if certs.iter().all(|(_, c)| c.is_none()) {
            return;
        }
        s.push_str("# HELP spidergate_tls_certificate_expiry_seconds Expiry (notAfter) of the certificate a listener serves, Unix seconds.\n# TYPE spidergate_tls_certificate_expiry_seconds gauge\n");
        for (listener, cert) in certs {
            if let Some(cert) = cert {
                let _ = writeln!(
                    s,
                    "spidergate_tls_certificate_expiry_seconds{{listener=\"{listener}\"}} {}",
                    cert.info().not_after
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_listeners_are_not_warned_about() {
        assert!(is_loopback("127.0.0.1:8080"));
        assert!(is_loopback("[::1]:8080"));
        assert!(!is_loopback("0.0.0.0:8080"));
        assert!(!is_loopback("10.1.2.3:8080"));
    }

    #[test]
    fn unreadable_files_name_the_field() {
        let files = TlsFiles {
            cert_file: "/nonexistent/cert.pem".into(),
            key_file: "/nonexistent/key.pem".into(),
        };
        let e = load_pair("admin.tls", &files, 0).err().unwrap();
        assert!(e.starts_with("admin.tls.cert_file: cannot read"), "{e}");
    }

    #[test]
    fn expiry_within_two_weeks_is_a_warning() {
        let info = CertInfo {
            not_after: 1_000_000 + 13 * 86_400,
            serial: "01".into(),
        };
        assert!(expiry_warning("tls", &info, 1_000_000).is_some());
        let later = CertInfo {
            not_after: 1_000_000 + 15 * 86_400,
            ..info
        };
        assert!(expiry_warning("tls", &later, 1_000_000).is_none());
    }
}
