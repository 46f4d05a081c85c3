//! A provider's own trust anchors (`tls_ca_file`): the CAs of a self-hosted model server
//! or a private gateway, read from PEM once per (re)load and handed to every TLS peer of
//! that provider. Without one, Pingora verifies against the system trust store.

use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::Arc;

use pingora_core::protocols::tls::CaType;
use pingora_core::utils::tls::WrappedX509;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The certificates of one `tls_ca_file`, in Pingora's per-peer form.
#[derive(Clone)]
pub struct CaBundle {
    pub certs: Arc<CaType>,
    /// Identifies the bundle's content: pooled connections verified against another bundle
    /// (before a reload changed the file) are never reused for this one.
    pub fingerprint: u64,
}

impl std::fmt::Debug for CaBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaBundle")
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl CaBundle {
    /// Reads every certificate of a PEM file. Errors say what is wrong with the file, for a
    /// message that already names the field.
    pub fn load(path: &Path) -> Result<CaBundle, String> {
        let pem =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let mut ders = Vec::new();
        for item in CertificateDer::pem_slice_iter(&pem) {
            let der = item.map_err(|e| format!("{} is not valid PEM: {e}", path.display()))?;
            ders.push(der.as_ref().to_vec());
        }
        if ders.is_empty() {
            return Err(format!(
                "{} holds no PEM certificate (\"-----BEGIN CERTIFICATE-----\")",
                path.display()
            ));
        }
        // The same checks rustls makes of a trust anchor, now rather than at first connect.
        let mut roots = rustls::RootCertStore::empty();
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        let mut certs = Vec::with_capacity(ders.len());
        for (i, der) in ders.into_iter().enumerate() {
            roots
                .add(CertificateDer::from(der.as_slice()))
                .map_err(|e| {
                    format!("{}: certificate {} is unusable: {e}", path.display(), i + 1)
                })?;
            der.hash(&mut hasher);
            let cert = WrappedX509::try_new(der, |raw| {
                X509Certificate::from_der(raw).map(|(_, cert)| cert)
            })
            .map_err(|e| format!("{}: certificate {} is unusable: {e}", path.display(), i + 1))?;
            certs.push(cert);
        }
        Ok(CaBundle {
            certs: Arc::from(certs.into_boxed_slice()),
            fingerprint: hasher.finish(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_an_empty_one_and_garbage_are_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CaBundle::load(&dir.path().join("nope.pem")).unwrap_err();
        assert!(missing.contains("cannot read"), "{missing}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "just text\n").unwrap();
        let e = CaBundle::load(&empty).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");

        let garbage = dir.path().join("garbage.pem");
        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = CaBundle::load(&garbage).unwrap_err();
        assert!(e.contains("certificate 1 is unusable"), "{e}");
    }
}
