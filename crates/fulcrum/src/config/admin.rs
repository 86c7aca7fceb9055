//! `[admin]`: where the admin API listens and how it is protected — its token (inline, or in
//! a file re-read when it changes), the host names it answers to, optional TLS.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use toml::Spanned;

use super::tls::{self, CertConfig, ListenerTlsConfig};
use super::{ConfigDuration, ListenAddr};

/// `[admin]`: where the admin API listens and how it is protected.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Admin listen address; loopback by default.
    pub listen: Spanned<ListenAddr>,
    /// Bearer token. Without it (and without `token_file`) on a non-loopback `listen`, a
    /// token is generated at start and printed on stderr. Re-read on reload.
    pub token: Option<String>,
    /// File holding the bearer token (instead of `token`): read at start and on reload, and
    /// re-read when it changes (checked once a second). Relative to the config file.
    pub token_file: Option<Spanned<PathBuf>>,
    /// Host names (`name` or `name:port`; without a port, the admin's port) that clients may
    /// use in `Host` and `Origin` besides the listen address (and `localhost` on loopback).
    /// Re-read on reload.
    pub allowed_hosts: Vec<String>,
    /// Open admin connections above this are closed at accept.
    pub max_connections: usize,
    /// A request's headers must arrive within this; a keep-alive connection silent this long
    /// before its next request is closed too. With `tls`, also the TLS handshake's limit.
    pub header_read_timeout: ConfigDuration,
    /// A connection that reads and writes nothing for this long is closed.
    pub idle_timeout: ConfigDuration,
    /// Serve the admin API over TLS with this certificate.
    pub tls: Option<Spanned<AdminTlsConfig>>,
    /// The token read from `token_file`, and the file's stamp when it was read.
    #[serde(skip)]
    file_token: Option<(String, Option<FileStamp>)>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Spanned::new(0..0, ListenAddr(SocketAddr::from(([127, 0, 0, 1], 9090)))),
            token: None,
            token_file: None,
            allowed_hosts: Vec::new(),
            max_connections: 64,
            header_read_timeout: ConfigDuration(Duration::from_secs(10)),
            idle_timeout: ConfigDuration(Duration::from_secs(60)),
            tls: None,
            file_token: None,
        }
    }
}

/// `[admin] tls = { cert = "...", key = "..." }`: the admin listener's certificate.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminTlsConfig {
    /// PEM file with the certificate chain, leaf first (relative to the config file).
    pub cert: PathBuf,
    /// PEM file with the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// A file's modification time and length, to notice that it changed.
type FileStamp = (SystemTime, u64);

fn stamp(path: &Path) -> Option<FileStamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// It cannot be read.
    #[error("cannot read token file {}: {error}", .path.display())]
    Read {
        /// The token file.
        path: PathBuf,
        /// Why it cannot be read.
        error: std::io::Error,
    },
    /// It holds nothing but white space.
    #[error("token file {} is empty", .path.display())]
    Empty {
        /// The token file.
        path: PathBuf,
    },
    /// The token holds bytes that cannot be sent in an `Authorization` header.
    #[error("token file {}: the token must be visible ASCII characters (no spaces or control characters)", .path.display())]
    Invalid {
        /// The token file.
        path: PathBuf,
    },
}

/// The token in `path`: its content without surrounding white space (a final newline).
fn read_token(path: &Path) -> Result<String, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|error| TokenFileError::Read {
        path: path.to_path_buf(),
        error,
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            path: path.to_path_buf(),
        });
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(TokenFileError::Invalid {
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}

impl AdminTlsConfig {
    /// The same certificate as a listener's `tls` table, with `handshake_timeout`, so the
    /// admin listener terminates TLS with the listeners' code.
    pub fn listener_config(&self, handshake_timeout: Duration) -> ListenerTlsConfig {
        ListenerTlsConfig {
            certs: vec![Spanned::new(
                0..0,
                CertConfig {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    default: true,
                },
            )],
            handshake_timeout: ConfigDuration(handshake_timeout),
        }
    }
}

impl AdminConfig {
    /// The bearer token configured (`token`, or what `token_file` held when last read), if
    /// any; an empty `token` is none.
    pub fn token(&self) -> Option<&str> {
        self.token
            .as_deref()
            .filter(|t| !t.is_empty())
            .or(self.file_token.as_ref().map(|(t, _)| t.as_str()))
    }

    /// Whether a token must be generated at start: the admin listens on a non-loopback (or
    /// the unspecified) address and no token is configured.
    pub fn needs_generated_token(&self) -> bool {
        !self.listen.get_ref().0.ip().to_canonical().is_loopback() && self.token().is_none()
    }

    /// `token_file` re-read if it changed since it was last read (its modification time or
    /// length differ). File system calls: run it off the async workers.
    ///
    /// `None`: no `token_file`, or unchanged. `Some(Ok(new))`: this configuration with the
    /// new token. `Some(Err((new, error)))`: the file changed but cannot be used; `new` keeps
    /// the old token and remembers the file's new state, so the error is reported once.
    #[allow(clippy::type_complexity)]
    pub fn reread_token_file(&self) -> Option<Result<AdminConfig, (AdminConfig, TokenFileError)>> {
        let path = self.token_file.as_ref()?.get_ref();
        let (old_token, old_stamp) = self.file_token.as_ref()?;
        let now = stamp(path);
        if now == *old_stamp {
            return None;
        }
        let mut new = self.clone();
        Some(match read_token(path) {
            Ok(token) => {
                new.file_token = Some((token, now));
                Ok(new)
            }
            Err(error) => {
                new.file_token = Some((old_token.clone(), now));
                Err((new, error))
            }
        })
    }

    /// Makes `token_file` and the certificate paths relative to the config file's directory.
    pub(super) fn resolve_paths(&mut self, base: Option<&Path>) {
        if let Some(path) = self.token_file.as_mut() {
            tls::resolve(base, path.get_mut());
        }
        if let Some(config) = self.tls.as_mut() {
            let config = config.get_mut();
            tls::resolve(base, &mut config.cert);
            tls::resolve(base, &mut config.key);
        }
    }

    /// Checks `[admin]` and reads its token file: `token` and `token_file` are not both set,
    /// the token file holds a token, the certificate loads.
    pub(super) fn validate(&mut self) -> Result<(), (Range<usize>, String)> {
        if let Some(path) = &self.token_file {
            if self.token.is_some() {
                return Err((
                    path.span(),
                    "admin: set `token` or `token_file`, not both".to_string(),
                ));
            }
            let before = stamp(path.get_ref());
            let token = read_token(path.get_ref()).map_err(|e| (path.span(), e.to_string()))?;
            self.file_token = Some((token, before));
        }
        if let Some(config) = &self.tls {
            let c = config.get_ref();
            super::certs::load_certified_key(&c.cert, &c.key)
                .map_err(|e| (config.span(), format!("admin tls: {e}")))?;
        }
        Ok(())
    }
}
