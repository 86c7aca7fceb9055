//! TLS termination on `https` listeners with rustls (crypto provider `ring`): certificates
//! chosen by SNI, ALPN `h2` / `http/1.1`, TLS 1.2 and 1.3, reload without dropping open
//! connections.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::config::certs::{load_certified_key, provider, CertError};
use crate::config::ListenerTlsConfig;
use crate::runtime::events::EventLog;

/// How often the certificate and key files of `https` listeners are checked for changes.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Why a listener's TLS termination could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ListenerTlsError {
    /// A certificate or key file cannot be loaded (the message names the file).
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The listener's `tls` table lists no certificate.
    #[error("no certificate configured")]
    NoCertificate,
    /// rustls refused the protocol versions or the crypto provider.
    #[error("TLS setup: {0}")]
    Setup(rustls::Error),
}

/// The certificates of one listener, indexed by name.
#[derive(Debug)]
pub struct CertStore {
    certs: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    /// `example.com` for a certificate carrying `*.example.com`.
    wildcard: HashMap<String, usize>,
    default: usize,
}

impl CertStore {
    /// Loads every certificate of `config`. The first certificate listing a name wins it.
    pub fn load(config: &ListenerTlsConfig) -> Result<CertStore, ListenerTlsError> {
        let mut store = CertStore {
            certs: Vec::with_capacity(config.certs.len()),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: 0,
        };
        for (index, cert) in config.certs.iter().enumerate() {
            let cert = cert.get_ref();
            let loaded = load_certified_key(&cert.cert, &cert.key)?;
            for name in loaded.names {
                match name.strip_prefix("*.") {
                    Some(parent) => store.wildcard.entry(parent.to_string()),
                    None => store.exact.entry(name),
                }
                .or_insert(index);
            }
            if cert.default {
                store.default = index;
            }
            store.certs.push(loaded.key);
        }
        if store.certs.is_empty() {
            return Err(ListenerTlsError::NoCertificate);
        }
        Ok(store)
    }

    /// The certificate for a client that asked for `server_name` (SNI).
    pub fn pick(&self, server_name: Option<&str>) -> &Arc<CertifiedKey> {
        let index = server_name
            .and_then(|name| {
                let lower;
                let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower = name.to_ascii_lowercase();
                    lower.as_str()
                } else {
                    name
                };
                self.exact.get(name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(self.default);
        &self.certs[index]
    }
}

/// Chooses the certificate by SNI from a store that reloads swap atomically: handshakes
/// started after a swap get the new certificates, established connections are not touched.
#[derive(Debug)]
struct SniResolver {
    store: ArcSwap<CertStore>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.store.load().pick(hello.server_name()).clone())
    }
}

/// TLS termination for one `https` listener.
pub struct TlsListener {
    name: String,
    config: ListenerTlsConfig,
    resolver: Arc<SniResolver>,
    acceptor: TlsAcceptor,
    /// Modification time and size of every certificate and key file at the last load.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
    /// Where certificate reloads driven by file changes are recorded.
    events: Option<Arc<EventLog>>,
}

impl std::fmt::Debug for TlsListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsListener")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl TlsListener {
    /// TLS for listener `name` serving the certificates in `store` (loaded from `config`).
    /// Reloads caused by file changes are recorded in `events` when given.
    pub fn new(
        name: &str,
        config: &ListenerTlsConfig,
        store: CertStore,
        events: Option<Arc<EventLog>>,
    ) -> Result<Arc<TlsListener>, ListenerTlsError> {
        let alpn = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::with_alpn(name, config, store, events, alpn)
    }

    /// [`TlsListener::new`] offering the ALPN protocols `alpn` (the admin API: `http/1.1`
    /// only) instead of `h2` and `http/1.1`.
    pub fn with_alpn(
        name: &str,
        config: &ListenerTlsConfig,
        store: CertStore,
        events: Option<Arc<EventLog>>,
        alpn: Vec<Vec<u8>>,
    ) -> Result<Arc<TlsListener>, ListenerTlsError> {
        let stamps = file_stamps(config);
        let resolver = Arc::new(SniResolver {
            store: ArcSwap::from_pointee(store),
        });
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(ListenerTlsError::Setup)?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        server.alpn_protocols = alpn;
        // Session tickets let returning clients resume without a full handshake.
        if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
            server.ticketer = ticketer;
        }
        Ok(Arc::new(TlsListener {
            name: name.to_string(),
            config: config.clone(),
            resolver,
            acceptor: TlsAcceptor::from(Arc::new(server)),
            stamps: Mutex::new(stamps),
            events,
        }))
    }

    /// Serves `store` to new handshakes from now on.
    pub fn install(&self, store: CertStore) {
        *self.stamps.lock().unwrap_or_else(|e| e.into_inner()) = file_stamps(&self.config);
        self.resolver.store.store(Arc::new(store));
        tracing::info!(listener = %self.name, "TLS certificates reloaded");
    }

    /// Reloads the certificates if a certificate or key file changed since the last load.
    /// A file that fails to load keeps the old certificates (the error is logged).
    pub fn reload_if_changed(&self) {
        let now = file_stamps(&self.config);
        {
            let mut stamps = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
            if *stamps == now {
                return;
            }
            // Remember the new state even if it fails to load: a broken file is reported
            // once, and retried when it changes again.
            *stamps = now;
        }
        match CertStore::load(&self.config) {
            Ok(store) => {
                self.resolver.store.store(Arc::new(store));
                tracing::info!(listener = %self.name, "certificate files changed; TLS certificates reloaded");
                if let Some(events) = &self.events {
                    events.record(
                        "cert_reload",
                        None,
                        None,
                        format!(
                            "listener `{}`: certificate files changed; reloaded",
                            self.name
                        ),
                    );
                }
            }
            Err(error) => {
                tracing::error!(
                    listener = %self.name, %error,
                    "certificate files changed but cannot be loaded; the previous certificates stay in use"
                );
                if let Some(events) = &self.events {
                    events.record(
                        "cert_reload_failed",
                        None,
                        None,
                        format!(
                            "listener `{}`: {error}; the previous certificates stay in use",
                            self.name
                        ),
                    );
                }
            }
        }
    }

    /// Runs the TLS handshake on an accepted connection, bounded by the handshake timeout.
    pub async fn accept(&self, stream: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let timeout = self.config.handshake_timeout.0;
        match tokio::time::timeout(timeout, self.acceptor.accept(stream)).await {
            Ok(result) => result,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("TLS handshake not finished within {timeout:?}"),
            )),
        }
    }

    /// [`TlsListener::accept`] for a client connection from `client`: a failed handshake is
    /// logged (debug) and gives `None`.
    pub(crate) async fn handshake(
        &self,
        stream: TcpStream,
        client: SocketAddr,
    ) -> Option<TlsStream<TcpStream>> {
        match self.accept(stream).await {
            Ok(stream) => Some(stream),
            Err(error) => {
                tracing::debug!(listener = %self.name, %client, %error, "TLS handshake failed");
                None
            }
        }
    }

    /// Polls the certificate files every [`WATCH_INTERVAL`] until `stop` turns true.
    pub async fn watch_files(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(WATCH_INTERVAL);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let this = self.clone();
            // File system calls block: keep them off the async workers.
            let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
        }
    }
}

fn file_stamps(config: &ListenerTlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    let stamp = |path: &PathBuf| {
        let meta = std::fs::metadata(path).ok()?;
        Some((meta.modified().ok()?, meta.len()))
    };
    config
        .certs
        .iter()
        .flat_map(|c| [stamp(&c.get_ref().cert), stamp(&c.get_ref().key)])
        .collect()
}
