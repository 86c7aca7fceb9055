//! TLS settings: `[listeners.NAME.tls]` (termination) and the upstream keys of a pool
//! (`tls`, `ca`, `sni`, `verify`, `protocol`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::ConfigDuration;

/// `[listeners.NAME.tls]`: the certificates of an `https` listener.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Certificates, chosen by the client's SNI among the DNS names each one carries. The
    /// one marked `default = true` (else the first) answers clients without or with an
    /// unknown SNI.
    pub certs: Vec<Spanned<CertConfig>>,
    /// A client must finish the TLS handshake within this time.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: ConfigDuration,
}

fn default_handshake_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}

/// `[[listeners.NAME.tls.certs]]`: one certificate chain and its private key (PEM files).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertConfig {
    /// PEM file with the certificate chain, leaf first. Relative paths are taken from the
    /// config file's directory.
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Serve this certificate to clients whose SNI matches no certificate.
    #[serde(default)]
    pub default: bool,
}

/// How Fulcrum speaks HTTP to a pool's backends.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 with a pool of keep-alive connections per backend.
    #[default]
    Http1,
    /// HTTP/2: requests multiplexed over one connection per backend and worker (gRPC needs it).
    H2,
}

/// Resolves `path` against `base` (the config file's directory) unless it is absolute.
pub(super) fn resolve(base: Option<&Path>, path: &mut PathBuf) {
    if let Some(base) = base {
        if path.is_relative() && !base.as_os_str().is_empty() {
            *path = base.join(&*path);
        }
    }
}
