//! Loading the certificate, key and CA files a configuration names (PEM), with errors that
//! name the file and say what is wrong; used by validation and by TLS set-up on both sides.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::{self, PemObject};
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

/// Why a certificate chain and its key could not be loaded. Every message names the file;
/// the cause (the PEM, X.509 or key error) is part of the message, not a separate
/// [`source`](std::error::Error::source), since configuration errors are printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The certificate file cannot be opened or read.
    #[error("cannot read certificate file {}: {error}", .path.display())]
    ReadCert {
        /// The certificate file.
        path: PathBuf,
        /// Why it cannot be read.
        error: pem::Error,
    },
    /// The certificate file is not valid PEM.
    #[error("bad certificate file {}: {error}", .path.display())]
    BadCert {
        /// The certificate file.
        path: PathBuf,
        /// What is wrong with its PEM.
        error: pem::Error,
    },
    /// The certificate file holds no certificate.
    #[error("certificate file {} has no PEM certificate (-----BEGIN CERTIFICATE-----)", .path.display())]
    NoCert {
        /// The certificate file.
        path: PathBuf,
    },
    /// The first (leaf) certificate is not a valid X.509 certificate.
    #[error("certificate file {}: the first certificate cannot be parsed: {error}", .path.display())]
    BadLeaf {
        /// The certificate file.
        path: PathBuf,
        /// Why the certificate cannot be parsed.
        error: webpki::Error,
    },
    /// The key file holds no private key.
    #[error("key file {} has no PEM private key (PKCS#8, PKCS#1 or SEC1)", .path.display())]
    NoKey {
        /// The key file.
        path: PathBuf,
    },
    /// The key file cannot be opened, read or decoded.
    #[error("cannot read key file {}: {error}", .path.display())]
    ReadKey {
        /// The key file.
        path: PathBuf,
        /// Why it cannot be read.
        error: pem::Error,
    },
    /// The key is not the certificate's.
    #[error("key file {} does not match certificate file {}", .key.display(), .cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
    },
    /// The key cannot be used for signing (unsupported algorithm, ...).
    #[error("unusable private key in {}: {error}", .path.display())]
    BadKey {
        /// The key file.
        path: PathBuf,
        /// Why rustls refused it.
        error: rustls::Error,
    },
}

/// Loads a PEM certificate chain and its PEM private key. Errors name the file and say what
/// is wrong (unreadable, no PEM certificate, no key, unsupported key, key not matching).
pub fn load_certified_key(cert_path: &Path, key_path: &Path) -> Result<LoadedCert, CertError> {
    let chain = CertificateDer::pem_file_iter(cert_path)
        .map_err(|error| CertError::ReadCert {
            path: cert_path.to_path_buf(),
            error,
        })?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| CertError::BadCert {
            path: cert_path.to_path_buf(),
            error,
        })?;
    if chain.is_empty() {
        return Err(CertError::NoCert {
            path: cert_path.to_path_buf(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| match error {
        pem::Error::NoItemsFound => CertError::NoKey {
            path: key_path.to_path_buf(),
        },
        error => CertError::ReadKey {
            path: key_path.to_path_buf(),
            error,
        },
    })?;
    let names = {
        let leaf =
            webpki::EndEntityCert::try_from(&chain[0]).map_err(|error| CertError::BadLeaf {
                path: cert_path.to_path_buf(),
                error,
            })?;
        leaf.valid_dns_names()
            .map(|n| n.to_ascii_lowercase())
            .collect()
    };
    let key = CertifiedKey::from_der(chain, key, &provider()).map_err(|error| match error {
        rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
            cert: cert_path.to_path_buf(),
            key: key_path.to_path_buf(),
        },
        error => CertError::BadKey {
            path: key_path.to_path_buf(),
            error,
        },
    })?;
    Ok(LoadedCert {
        key: Arc::new(key),
        names,
    })
}

/// Why a CA file could not be loaded. Every message names the file and includes the cause.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA file cannot be opened or read.
    #[error("cannot read CA file {}: {error}", .path.display())]
    Read {
        /// The CA file.
        path: PathBuf,
        /// Why it cannot be read.
        error: pem::Error,
    },
    /// The CA file is not valid PEM.
    #[error("bad CA file {}: {error}", .path.display())]
    BadPem {
        /// The CA file.
        path: PathBuf,
        /// What is wrong with its PEM.
        error: pem::Error,
    },
    /// A certificate in the CA file cannot be used as a trust anchor.
    #[error("bad CA certificate in {}: {error}", .path.display())]
    BadCert {
        /// The CA file.
        path: PathBuf,
        /// Why rustls refused it.
        error: rustls::Error,
    },
    /// The CA file holds no certificate.
    #[error("CA file {} has no PEM certificate (-----BEGIN CERTIFICATE-----)", .path.display())]
    Empty {
        /// The CA file.
        path: PathBuf,
    },
}

/// Loads CA certificates (PEM) to verify backends with. Errors name the file.
pub fn load_roots(path: &Path) -> Result<RootCertStore, CaError> {
    let mut roots = RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(path).map_err(|error| CaError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    for cert in certs {
        let cert = cert.map_err(|error| CaError::BadPem {
            path: path.to_path_buf(),
            error,
        })?;
        roots.add(cert).map_err(|error| CaError::BadCert {
            path: path.to_path_buf(),
            error,
        })?;
    }
    if roots.is_empty() {
        return Err(CaError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}
