//! Loading the certificate, key and CA files a configuration names (PEM), with errors that
//! name the file and say what is wrong; used by validation and by TLS set-up on both sides.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider Fulcrum uses everywhere (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A loaded certificate: the chain and key ready for handshakes, and the DNS names (from the
/// certificate's subject alternative names) it answers for.
#[derive(Debug)]
pub struct LoadedCert {
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// DNS names of the leaf certificate, lower case; `*.example.com` for wildcards.
    pub names: Vec<String>,
}

/// Loads a PEM certificate chain and its PEM private key. Errors name the file and say what
/// is wrong (unreadable, no PEM certificate, no key, unsupported key, key not matching).
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, String> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|e| format!("cannot read certificate file {}: {e}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad certificate file {}: {e}", cert_path.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "certificate file {} has no PEM certificate (-----BEGIN CERTIFICATE-----)",
            cert_path.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => format!(
            "key file {} has no PEM private key (PKCS#8, PKCS#1 or SEC1)",
            key_path.display()
        ),
        e => format!("cannot read key file {}: {e}", key_path.display()),
    })?;
    let names = {
        let leaf = webpki::EndEntityCert::try_from(&chain[0]).map_err(|e| {
            format!(
                "certificate file {}: the first certificate cannot be parsed: {e}",
                cert_path.display()
            )
        })?;
        leaf.valid_dns_names()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => format!(
            "key file {} does not match certificate file {}",
            key_path.display(),
            cert_path.display()
        ),
        e => format!("unusable private key in {}: {e}", key_path.display()),
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        names,
    })
}

/// Loads CA certificates (PEM) to verify backends with. Errors name the file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read CA file {}: {e}", path.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("bad CA file {}: {e}", path.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("bad CA certificate in {}: {e}", path.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "CA file {} has no PEM certificate (-----BEGIN CERTIFICATE-----)",
            path.display()
        ));
    }
    Ok(roots)
}
