//! Layer 4, upstream: reaching backends. Connections to one backend: a lock-free queue of idle HTTP/1.1 connections, or one shared
//! multiplexed HTTP/2 connection, and the connect path (TCP connect with timeout,
//! TCP_NODELAY, TLS when the pool asks for it, hyper handshake). Every connection to a
//! backend is made here: pooled ones ([`dial`]), dedicated upgradable HTTP/1.1 ones
//! ([`dial_upgradable`]) and TCP-mode sessions ([`connect_tcp`]); a [`ConnectError`] tells
//! whether the failure was local ([`ConnectError::is_local`]).

pub mod body;
pub mod driven;
pub mod tls;

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use http::header;
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri, Version};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2, TrySendError};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;

use crate::config::{PoolConfig, UpstreamProtocol};
use crate::upstream::body::RequestBody;
use driven::Driven;
use tls::UpstreamTlsError;

/// What connecting to a backend needs from its pool's settings (implemented by the pool's
/// settings, so the data path passes what it already holds).
pub trait ConnectSettings {
    /// How backends are connected to.
    fn transport(&self) -> &Arc<UpstreamTransport>;
    /// TCP connect timeout.
    fn connect_timeout(&self) -> Duration;
    /// Idle connections older than this are not reused.
    fn idle_timeout(&self) -> Duration;
}

/// An HTTP/1.1 connection handle.
type SendRequest<B> = http1::SendRequest<B>;

/// Most idle connections kept per backend. Enough for a busy backend at high concurrency;
/// the queues are preallocated, so this also bounds memory per backend (~10 KiB).
const MAX_IDLE_PER_BACKEND: usize = 256;

/// Fewest idle connections kept per backend and worker.
const MIN_IDLE_PER_WORKER: usize = 64;

/// HTTP/2 connections to backends are pinged this often; one unanswered that long is closed.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// Why no connection to a backend could be had. Always safe to retry elsewhere: nothing was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect did not finish within the pool's connect timeout.
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect failed: {0}")]
    Io(std::io::Error),
    /// The HTTP connection could not be set up.
    #[error("HTTP handshake failed: {0}")]
    Handshake(hyper::Error),
    /// The TLS handshake with the backend failed (certificate not trusted, ...).
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    /// The pool's TLS settings could not be loaded.
    #[error("upstream TLS unusable: {0}")]
    Setup(Arc<UpstreamTlsError>),
}

/// `errno` values of a connect that failed for want of a local resource (descriptors,
/// ephemeral ports, kernel memory): nothing the backend did.
const LOCAL_ERRNOS: [nix::errno::Errno; 5] = [
    nix::errno::Errno::EMFILE,
    nix::errno::Errno::ENFILE,
    nix::errno::Errno::EADDRNOTAVAIL,
    nix::errno::Errno::ENOBUFS,
    nix::errno::Errno::ENOMEM,
];

impl ConnectError {
    /// Whether the connect failed on this side, for want of a local resource (too many open
    /// files, no ephemeral port, out of memory) or because the pool's TLS settings are
    /// unusable: the backend is not to blame for it.
    pub fn is_local(&self) -> bool {
        match self {
            ConnectError::Io(error) => {
                error.kind() == std::io::ErrorKind::OutOfMemory
                    || error
                        .raw_os_error()
                        .is_some_and(|code| LOCAL_ERRNOS.iter().any(|e| *e as i32 == code))
            }
            ConnectError::Setup(_) => true,
            ConnectError::Timeout(_) | ConnectError::Handshake(_) | ConnectError::Tls(_) => false,
        }
    }
}

/// How a pool connects to its backends: HTTP version and TLS. Shared by the pool's
/// settings; equal when the configuration that made it is equal.
pub struct UpstreamTransport {
    /// HTTP/1.1 or HTTP/2.
    pub protocol: UpstreamProtocol,
    /// TLS client settings, when the pool uses TLS; `Err` when they could not be loaded.
    pub tls: Option<Result<UpstreamTls, Arc<UpstreamTlsError>>>,
    /// What this was built from, for equality.
    source: (bool, Option<std::path::PathBuf>, Option<String>, bool),
}

/// TLS towards the backends.
#[derive(Debug)]
pub struct UpstreamTls {
    /// rustls client settings (roots, ALPN).
    pub config: Arc<ClientConfig>,
    /// The same settings with ALPN `http/1.1` only, for upgraded (WebSocket) connections,
    /// which are HTTP/1.1 whatever the pool's protocol.
    pub upgrade_config: Arc<ClientConfig>,
    /// The name sent as SNI and verified; the backend's IP address when `None`.
    pub sni: Option<ServerName<'static>>,
}

impl UpstreamTransport {
    /// The transport a pool's configuration asks for. A CA file that cannot be loaded (it
    /// was checked with the config, so it changed since) makes every connect fail with why.
    pub fn from_config(config: &PoolConfig) -> Self {
        let tls = config.tls.then(|| {
            let alpn: &[u8] = match config.protocol {
                UpstreamProtocol::Http1 => b"http/1.1",
                UpstreamProtocol::H2 => b"h2",
            };
            let ca = config.ca.as_ref().map(|c| c.get_ref().as_path());
            if !config.verify {
                tracing::warn!(
                    "upstream TLS with verify = false: backend certificates are not checked"
                );
            }
            let client =
                crate::upstream::tls::client_config(ca, config.verify, alpn).map_err(|e| {
                    tracing::error!(error = %e, "upstream TLS settings cannot be loaded");
                    Arc::new(e)
                })?;
            let sni = config
                .sni
                .as_ref()
                .and_then(|name| ServerName::try_from(name.clone()).ok());
            let upgrade_config = match config.protocol {
                UpstreamProtocol::Http1 => client.clone(),
                UpstreamProtocol::H2 => {
                    let mut http1 = (*client).clone();
                    http1.alpn_protocols = vec![b"http/1.1".to_vec()];
                    Arc::new(http1)
                }
            };
            Ok(UpstreamTls {
                config: client,
                upgrade_config,
                sni,
            })
        });
        UpstreamTransport {
            protocol: config.protocol,
            tls,
            source: (
                config.tls,
                config.ca.as_ref().map(|c| c.get_ref().clone()),
                config.sni.clone(),
                config.verify,
            ),
        }
    }
}

impl PartialEq for UpstreamTransport {
    fn eq(&self, other: &Self) -> bool {
        self.protocol == other.protocol && self.source == other.source
    }
}

impl fmt::Debug for UpstreamTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTransport")
            .field("protocol", &self.protocol)
            .field("tls", &self.source.0)
            .field("ca", &self.source.1)
            .field("sni", &self.source.2)
            .field("verify", &self.source.3)
            .finish()
    }
}

/// A handle to send requests on: an HTTP/1.1 connection (one request at a time) or a clone
/// of a shared HTTP/2 connection (many streams at once).
#[derive(Debug)]
pub enum UpstreamSender {
    /// HTTP/1.1, the connection running in a task of its own.
    Http1(SendRequest<RequestBody>),
    /// HTTP/1.1, the connection polled by the task using it (see `proxy::driven`).
    Driven(Box<Driven>),
    /// HTTP/2, with whether the connection uses TLS (for the `:scheme`).
    Http2(http2::SendRequest<RequestBody>, bool),
}

impl UpstreamSender {
    /// Sends `request`; on failure, gives the request back when it was provably not sent.
    /// On HTTP/2 the request gets an absolute URI (`:scheme`, `:authority` from `Host`).
    pub async fn try_send_request(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self {
            UpstreamSender::Http1(sender) => sender.try_send_request(request).await,
            UpstreamSender::Driven(driven) => driven.send(request).await,
            UpstreamSender::Http2(sender, tls) => {
                let request = to_h2(request, *tls);
                sender.try_send_request(request).await
            }
        }
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        match self {
            UpstreamSender::Http1(sender) => sender.is_closed(),
            UpstreamSender::Driven(driven) => driven.is_closed(),
            UpstreamSender::Http2(sender, _) => sender.is_closed(),
        }
    }
}

/// Rewrites an HTTP/1.1-shaped request for HTTP/2: the `Host` header becomes `:authority`.
fn to_h2(mut request: Request<RequestBody>, tls: bool) -> Request<RequestBody> {
    if request.uri().authority().is_none() {
        let host = request.headers_mut().remove(header::HOST);
        let authority = host.and_then(|h| Authority::try_from(h.as_bytes()).ok());
        if let Some(authority) = authority {
            let mut parts = std::mem::take(request.uri_mut()).into_parts();
            parts.scheme = Some(if tls { Scheme::HTTPS } else { Scheme::HTTP });
            parts.authority = Some(authority);
            if parts.path_and_query.is_none() {
                parts.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
            }
            if let Ok(uri) = Uri::from_parts(parts) {
                *request.uri_mut() = uri;
                *request.version_mut() = Version::HTTP_2;
            }
        }
    }
    // Without a host, h2 sends the origin-form path with `:scheme` http and no `:authority`.
    request
}

/// A connection ready to carry one request.
#[derive(Debug)]
pub struct UpstreamConnection {
    /// The hyper handle to send the request on.
    pub sender: UpstreamSender,
    /// Whether it came from the idle pool (a reused connection may have been closed by the
    /// backend meanwhile; a request it returns unsent can be retried on a fresh one).
    pub reused: bool,
}

struct IdleConnection {
    sender: UpstreamSender,
    idle_since: Instant,
}

/// The keep-alive connections to one backend, per worker (see `workers.rs`): a queue of idle
/// HTTP/1.1 connections and one shared HTTP/2 connection each, since a connection is driven
/// on the worker that opened it; using it from another worker would cost two cross-thread
/// wake-ups per request.
pub struct ConnectionPool {
    address: SocketAddr,
    idle: Box<[ArrayQueue<IdleConnection>]>,
    stats: Arc<ConnectionStats>,
    /// Per worker: its HTTP/2 connection and the transport (by address) it was made with.
    h2: Box<[H2Slot]>,
}

/// One worker's HTTP/2 connection to a backend.
#[derive(Default)]
struct H2Slot {
    /// The connection its requests share, and the transport (by address) it was made with.
    shared: ArcSwapOption<(http2::SendRequest<RequestBody>, usize)>,
    /// Held while a new connection is being opened, so concurrent requests share it.
    connecting: tokio::sync::Mutex<()>,
}

/// Counters of one backend's upstream connections.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections opened since start.
    pub opened: AtomicU64,
    /// Requests sent on a reused (pooled) connection since start.
    pub reused: AtomicU64,
}

impl fmt::Debug for ConnectionPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectionPool")
            .field("address", &self.address)
            .field("idle", &self.idle_count())
            .finish()
    }
}

impl ConnectionPool {
    /// An empty pool for the backend at `address`.
    pub fn new(address: SocketAddr) -> Self {
        let workers = crate::runtime::workers::worker_slots();
        let per_worker = (MAX_IDLE_PER_BACKEND / workers).max(MIN_IDLE_PER_WORKER);
        ConnectionPool {
            address,
            idle: (0..workers).map(|_| ArrayQueue::new(per_worker)).collect(),
            stats: Arc::default(),
            h2: (0..workers).map(|_| H2Slot::default()).collect(),
        }
    }

    /// Connection counters.
    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }

    /// Number of idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.iter().map(ArrayQueue::len).sum()
    }

    /// The idle queue of the worker running on this thread.
    fn idle_here(&self) -> &ArrayQueue<IdleConnection> {
        let worker = crate::runtime::workers::current_worker();
        &self.idle[worker.min(self.idle.len() - 1)]
    }

    /// The HTTP/2 slot of the worker running on this thread.
    fn h2_here(&self) -> &H2Slot {
        let worker = crate::runtime::workers::current_worker();
        &self.h2[worker.min(self.h2.len() - 1)]
    }

    /// An idle connection if a live one is pooled (HTTP/1.1) or the shared connection
    /// (HTTP/2), else a new one.
    pub async fn acquire<S: ConnectSettings>(
        &self,
        settings: &S,
    ) -> Result<UpstreamConnection, ConnectError> {
        if settings.transport().protocol == UpstreamProtocol::H2 {
            return self.acquire_h2(settings).await;
        }
        let idle_timeout = settings.idle_timeout();
        let queue = self.idle_here();
        while let Some(mut idle) = queue.pop() {
            if idle.sender.is_closed() || idle.idle_since.elapsed() > idle_timeout {
                continue;
            }
            // Normally ready at once; errs if the backend closed the connection meanwhile.
            if idle.sender.ready().await {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(UpstreamConnection {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        self.connect(settings).await
    }

    /// This worker's live HTTP/2 connection made with `transport`, if there is one.
    fn shared_h2(&self, transport: usize) -> Option<http2::SendRequest<RequestBody>> {
        let guard = self.h2_here().shared.load();
        let (sender, made_with) = guard.as_deref()?;
        (*made_with == transport && sender.is_ready()).then(|| sender.clone())
    }

    async fn acquire_h2<S: ConnectSettings>(
        &self,
        settings: &S,
    ) -> Result<UpstreamConnection, ConnectError> {
        let transport = Arc::as_ptr(settings.transport()) as usize;
        let tls = settings.transport().tls.is_some();
        if let Some(sender) = self.shared_h2(transport) {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(UpstreamConnection {
                sender: UpstreamSender::Http2(sender, tls),
                reused: true,
            });
        }
        let _connecting = self.h2_here().connecting.lock().await;
        if let Some(sender) = self.shared_h2(transport) {
            self.stats.reused.fetch_add(1, Ordering::Relaxed);
            return Ok(UpstreamConnection {
                sender: UpstreamSender::Http2(sender, tls),
                reused: true,
            });
        }
        self.connect(settings).await
    }

    /// Opens a new connection, bypassing the idle pool. A new HTTP/2 connection replaces this
    /// worker's shared one for the requests that follow.
    pub async fn connect<S: ConnectSettings>(
        &self,
        settings: &S,
    ) -> Result<UpstreamConnection, ConnectError> {
        // Boxed: connecting (TCP, TLS handshake, HTTP handshake) is rare with pooling, and its
        // large state would otherwise be reserved inside every request's future.
        let connection = Box::pin(self.open(settings)).await?;
        if let UpstreamSender::Http2(sender, _) = &connection.sender {
            let transport = Arc::as_ptr(settings.transport()) as usize;
            self.h2_here()
                .shared
                .store(Some(Arc::new((sender.clone(), transport))));
        }
        Ok(connection)
    }

    async fn open<S: ConnectSettings>(
        &self,
        settings: &S,
    ) -> Result<UpstreamConnection, ConnectError> {
        let sender = dial(
            self.address,
            settings.transport(),
            settings.connect_timeout(),
            Some(&self.stats),
        )
        .await?;
        Ok(UpstreamConnection {
            sender,
            reused: false,
        })
    }

    /// Drops the idle connections that were idle longer than `idle_timeout`, or that the
    /// backend closed: those idle for at least `check_after` are polled once, so an end of
    /// stream shows (recently used ones are left alone, so a busy pool costs nothing). Run by
    /// the pool's housekeeping: without it a connection the backend closed would hold its
    /// descriptor, in CLOSE_WAIT, until traffic came back to pop it.
    pub fn sweep_idle(&self, idle_timeout: Duration, check_after: Duration) {
        let now = Instant::now();
        for queue in &self.idle {
            for _ in 0..queue.len() {
                let Some(mut idle) = queue.pop() else {
                    break;
                };
                let idle_for = now.saturating_duration_since(idle.idle_since);
                let alive = idle_for <= idle_timeout
                    && (idle_for < check_after
                        || match &mut idle.sender {
                            UpstreamSender::Driven(driven) => driven.check_idle(),
                            sender => !sender.is_closed(),
                        });
                if alive {
                    // Full only if requests returned connections meanwhile: then it closes.
                    let _ = queue.push(idle);
                }
            }
        }
    }

    /// Forgets every pooled connection (idle HTTP/1.1 ones close; the shared HTTP/2 ones close
    /// once their streams finish), so the next requests connect the pool's new way.
    pub fn clear(&self) {
        for queue in &self.idle {
            while queue.pop().is_some() {}
        }
        for slot in &self.h2 {
            slot.shared.store(None);
        }
    }

    /// Returns a connection whose exchange completed, for reuse. Dropped (closed) if the pool
    /// is full or the connection is closing. HTTP/2 handles are just dropped: the shared
    /// connection stays with the pool.
    pub fn release(&self, sender: UpstreamSender) {
        if matches!(sender, UpstreamSender::Http2(..)) || sender.is_closed() {
            return;
        }
        let _ = self.idle_here().push(IdleConnection {
            sender,
            idle_since: Instant::now(),
        });
    }
}

/// Opens one connection to `address` as `transport` says: TCP (bounded by `connect_timeout`),
/// TLS when configured (bounded too), then the HTTP/1.1 or HTTP/2 handshake. An HTTP/2
/// connection's task runs in the background; an HTTP/1.1 one comes back `Driven` (polled by
/// its user; `UpstreamSender::detached` runs it in the background). `stats` counts it when
/// given.
pub async fn dial(
    address: SocketAddr,
    transport: &UpstreamTransport,
    connect_timeout: Duration,
    stats: Option<&Arc<ConnectionStats>>,
) -> Result<UpstreamSender, ConnectError> {
    let stream = connect_tcp(address, connect_timeout).await?;
    match &transport.tls {
        None => {
            handshake(
                TokioIo::new(stream),
                transport.protocol,
                false,
                address,
                stats,
            )
            .await
        }
        Some(Err(error)) => Err(ConnectError::Setup(error.clone())),
        Some(Ok(tls)) => {
            let stream = tls_connect(tls, &tls.config, stream, address, connect_timeout).await?;
            handshake(
                TokioIo::new(stream),
                transport.protocol,
                true,
                address,
                stats,
            )
            .await
        }
    }
}

/// Opens a TCP connection to `address` (bounded by `connect_timeout`), with TCP_NODELAY: the
/// first step of every dial, and all of a TCP-mode session's (whose bytes are relayed as they
/// are, so the pool's TLS and HTTP settings do not apply).
pub async fn connect_tcp(
    address: SocketAddr,
    connect_timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(address))
        .await
        .map_err(|_| ConnectError::Timeout(connect_timeout))?
        .map_err(ConnectError::Io)?;
    // Small requests and responses must not wait for Nagle's algorithm.
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

/// The TLS handshake on `stream` with `config` (the pool's roots and verification, and an
/// ALPN), sending the pool's SNI (the backend's IP address without one).
async fn tls_connect(
    tls: &UpstreamTls,
    config: &Arc<ClientConfig>,
    stream: TcpStream,
    address: SocketAddr,
    connect_timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let name = tls
        .sni
        .clone()
        .unwrap_or_else(|| ServerName::IpAddress(address.ip().into()));
    let connector = tokio_rustls::TlsConnector::from(config.clone());
    tokio::time::timeout(connect_timeout, connector.connect(name, stream))
        .await
        .map_err(|_| ConnectError::Timeout(connect_timeout))?
        .map_err(ConnectError::Tls)
}

/// Opens a dedicated HTTP/1.1 connection to `address` that can be upgraded (WebSocket): TCP,
/// then TLS as `transport` says (ALPN `http/1.1` even when the pool speaks HTTP/2), then the
/// HTTP/1.1 handshake; the connection runs in a task of its own, upgrades allowed. Never
/// pooled, never counted in the backend's connection stats.
pub async fn dial_upgradable(
    address: SocketAddr,
    transport: &UpstreamTransport,
    connect_timeout: Duration,
) -> Result<SendRequest<RequestBody>, ConnectError> {
    let stream = connect_tcp(address, connect_timeout).await?;
    match &transport.tls {
        None => upgradable_handshake(TokioIo::new(stream), address).await,
        Some(Err(error)) => Err(ConnectError::Setup(error.clone())),
        Some(Ok(tls)) => {
            let stream =
                tls_connect(tls, &tls.upgrade_config, stream, address, connect_timeout).await?;
            upgradable_handshake(TokioIo::new(stream), address).await
        }
    }
}

/// The HTTP/1.1 handshake of [`dial_upgradable`].
async fn upgradable_handshake<I>(
    io: I,
    address: SocketAddr,
) -> Result<SendRequest<RequestBody>, ConnectError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(ConnectError::Handshake)?;
    tokio::spawn(async move {
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(backend = %address, %error, "upgrade connection ended with an error");
        }
    });
    Ok(sender)
}

/// Runs the HTTP handshake on a connected stream: an HTTP/1.1 connection is returned to be
/// driven by its user, an HTTP/2 one runs in a task of its own.
async fn handshake<I>(
    io: I,
    protocol: UpstreamProtocol,
    tls: bool,
    address: SocketAddr,
    stats: Option<&Arc<ConnectionStats>>,
) -> Result<UpstreamSender, ConnectError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    match protocol {
        UpstreamProtocol::Http1 => {
            let (sender, connection) = http1::Builder::new()
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            let connection = driven::track(connection, address, stats);
            Ok(UpstreamSender::Driven(Box::new(Driven::new(
                sender, connection,
            ))))
        }
        UpstreamProtocol::H2 => {
            let (sender, connection) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .adaptive_window(true)
                .keep_alive_interval(H2_KEEP_ALIVE)
                .keep_alive_timeout(H2_KEEP_ALIVE)
                .handshake(io)
                .await
                .map_err(ConnectError::Handshake)?;
            driven::spawn(driven::track(connection, address, stats));
            Ok(UpstreamSender::Http2(sender, tls))
        }
    }
}
