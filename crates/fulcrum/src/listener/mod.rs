//! Layer 9, listener: binding (one `SO_REUSEPORT` socket per worker), accepting, the
//! connection limit and each connection's slot, and serving an HTTP connection — in rounds
//! that park while idle (`park`, `lot`), behind TLS (`tls`) or a PROXY header — or a TCP
//! listener's sessions (`tcp`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{ListenerConfig, ListenerProtocol};
use crate::proxy::http::HttpProxy;
use crate::proxy::limits::RefusedRequests;
use crate::runtime::workers::Workers;
use per_ip::{IpSlot, PerIpLimit};
use tls::TlsListener;

mod h2;
#[cfg(target_os = "linux")]
mod lot;
mod park;
pub mod per_ip;
pub mod tcp;
pub mod tls;

/// Pending connections the kernel queues per listener before accept.
const LISTEN_BACKLOG: i32 = 4096;

/// A bound listener, ready to accept.
#[derive(Debug, Clone)]
pub struct BoundListener {
    /// The listener's name in the config.
    pub name: String,
    /// The address it actually listens on (port 0 resolved).
    pub address: SocketAddr,
    /// The pool it serves.
    pub pool: String,
    /// Whether it terminates TLS (`https`).
    pub tls: bool,
    /// Whether it is a raw TCP (L4) listener.
    pub tcp: bool,
}

/// A listener's accept tasks (one per worker) and the switch that stops them.
pub(crate) struct ListenerTask {
    pub(crate) config: ListenerConfig,
    pub(crate) bound: BoundListener,
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) tasks: Vec<JoinHandle<()>>,
    pub(crate) stats: Arc<ListenerStats>,
    /// TLS termination, for `https` listeners.
    pub(crate) tls: Option<Arc<TlsListener>>,
    /// The listening sockets (duplicates of those the accept loops own), handed to the
    /// listener that replaces this one on the same address.
    pub(crate) sockets: Vec<std::net::TcpListener>,
}

/// Counters of one listener's client connections.
#[derive(Debug, Default)]
pub struct ListenerStats {
    /// Client connections open now.
    pub open: AtomicU64,
    /// Client connections accepted since start.
    pub accepted: AtomicU64,
    /// Client connections closed at accept because of `max_connections`.
    pub refused: AtomicU64,
    /// Client connections closed at accept because of `max_connections_per_ip`.
    pub refused_per_ip: AtomicU64,
    /// Client connections accepted by each worker (how evenly the kernel spreads them).
    pub accepted_by_worker: Box<[AtomicU64]>,
    /// Idle client connections parked in the listener's parking lots now (Linux).
    pub parked: Arc<AtomicU64>,
    /// Requests refused by `max_header_count`, `max_header_bytes`, `max_uri_bytes` and
    /// `requests_per_ip` (counted by the listener's proxy).
    pub refused_requests: Arc<RefusedRequests>,
}

impl ListenerStats {
    /// Counters for a listener served by `workers` accept loops.
    pub fn new(workers: usize) -> Self {
        ListenerStats {
            accepted_by_worker: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ..ListenerStats::default()
        }
    }

    /// Counts a connection accepted on this thread's worker.
    pub fn note_accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
        if let Some(count) = self
            .accepted_by_worker
            .get(crate::runtime::workers::current_worker())
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl ListenerTask {
    /// Stops accepting; the task drains its connections in the background.
    pub(crate) fn close(self) {
        let _ = self.stop.send(true);
    }
}

/// Whether two listener configs can share one running listener (spans are not compared).
pub(crate) fn same_listener(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a == b
}

/// Why a listener could not start serving its sockets.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    /// No socket was bound for it.
    #[error("no listening socket")]
    NoSocket,
    /// The address of its bound socket cannot be read.
    #[error("cannot read the listening socket's address: {0}")]
    LocalAddr(std::io::Error),
    /// A listening socket could not be duplicated (to hand it to a reloaded listener).
    #[error("cannot duplicate the listening socket: {0}")]
    Duplicate(std::io::Error),
}

/// Duplicates listening sockets: the copies share the sockets (and their accept queues), so a
/// reloaded listener on the same address serves them while the old accept loops stop, and
/// no connection waiting in a queue is reset.
pub(crate) fn duplicate(
    sockets: &[std::net::TcpListener],
) -> std::io::Result<Vec<std::net::TcpListener>> {
    sockets
        .iter()
        .map(std::net::TcpListener::try_clone)
        .collect()
}

/// Starts serving `sockets` (one per worker) as the listener `name`.
pub(crate) fn start_listener(
    workers: &Workers,
    name: &str,
    config: ListenerConfig,
    sockets: Vec<std::net::TcpListener>,
    proxy: HttpProxy,
    shutdown_timeout: Duration,
    tls: Option<Arc<TlsListener>>,
) -> Result<ListenerTask, ListenerError> {
    let address = sockets
        .first()
        .ok_or(ListenerError::NoSocket)?
        .local_addr()
        .map_err(ListenerError::LocalAddr)?;
    let bound = BoundListener {
        name: name.to_string(),
        address,
        pool: config.pool.get_ref().clone(),
        tls: tls.is_some(),
        tcp: config.protocol == ListenerProtocol::Tcp,
    };
    let (stop, stopped) = watch::channel(false);
    let stats = Arc::new(ListenerStats {
        refused_requests: proxy.refused_requests(),
        ..ListenerStats::new(workers.sockets_per_listener())
    });
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch_files(stopped.clone()));
    }
    // `max_connections` bounds the listener as a whole, across its workers.
    let limit = Arc::new(Semaphore::new(config.max_connections));
    // So does `max_connections_per_ip`, for each client IP.
    let per_ip = Arc::new(PerIpLimit::new(config.max_connections_per_ip));
    let kept = duplicate(&sockets).map_err(ListenerError::Duplicate)?;
    let mut sockets = sockets.into_iter().map(Some).collect::<Vec<_>>();
    let (http_proxy, tcp_proxy) = if config.protocol == ListenerProtocol::Tcp {
        let tcp = crate::proxy::tcp::TcpProxy::new(proxy, &config);
        (None, Some(Arc::new(tcp)))
    } else {
        (Some(Arc::new(proxy)), None)
    };
    let tasks = workers.spawn_each(|worker| {
        let socket = sockets[worker].take();
        let accept = AcceptSettings {
            limit: limit.clone(),
            max_connections: config.max_connections,
            per_ip: per_ip.clone(),
            stop: stopped.clone(),
            shutdown_timeout,
            stats: stats.clone(),
        };
        let (http_proxy, tcp_proxy, config, tls) = (
            http_proxy.clone(),
            tcp_proxy.clone(),
            config.clone(),
            tls.clone(),
        );
        async move {
            // Registered with the runtime of the worker that serves it.
            let listener = match socket.map(TcpListener::from_std) {
                Some(Ok(listener)) => listener,
                Some(Err(error)) => {
                    tracing::error!(%error, %address, "cannot serve a listening socket");
                    return;
                }
                None => return,
            };
            match (tcp_proxy, http_proxy) {
                (Some(tcp_proxy), _) => tcp::serve_tcp(listener, tcp_proxy, accept).await,
                (None, Some(proxy)) => serve_http(listener, proxy, config, accept, tls).await,
                (None, None) => {}
            }
        }
    });
    Ok(ListenerTask {
        config,
        bound,
        stop,
        tasks,
        stats,
        tls,
        sockets: kept,
    })
}

/// What every accept loop of one listener shares.
#[derive(Debug)]
pub struct AcceptSettings {
    /// The listener's `max_connections`, across all its workers.
    pub limit: Arc<Semaphore>,
    /// The size of `limit` (for the log).
    pub max_connections: usize,
    /// The listener's `max_connections_per_ip`, across all its workers.
    pub per_ip: Arc<PerIpLimit>,
    /// Turns true when the listener must stop accepting and drain.
    pub stop: watch::Receiver<bool>,
    /// How long draining may take.
    pub shutdown_timeout: Duration,
    /// The listener's connection counters.
    pub stats: Arc<ListenerStats>,
}

impl AcceptSettings {
    /// Admits the connection just accepted from `client` (the socket peer, before any PROXY
    /// header), or counts and logs (at most once a second for `max_connections_per_ip`) why it
    /// is refused; the caller then closes it.
    pub fn admit(&self, client: SocketAddr) -> Option<Admitted> {
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, max_connections = self.max_connections, "connection limit reached; closing new connection");
            return None;
        };
        let Some(ip) = self.per_ip.try_acquire(client.ip()) else {
            self.stats.refused_per_ip.fetch_add(1, Ordering::Relaxed);
            if self.per_ip.should_log() {
                tracing::warn!(%client, max_connections_per_ip = self.per_ip.max(), "connection limit per client IP reached; closing new connections from it (logged at most once a second)");
            }
            return None;
        };
        self.stats.note_accepted();
        Some(Admitted {
            _permit: permit,
            _ip: ip,
        })
    }
}

/// An admitted connection's place in `max_connections` and in its IP's
/// `max_connections_per_ip`, both released when it drops.
#[derive(Debug)]
pub struct Admitted {
    _permit: tokio::sync::OwnedSemaphorePermit,
    _ip: IpSlot,
}

/// Binds `count` listening sockets on `address` (one per worker; port 0 is resolved by the
/// first) with SO_REUSEADDR, SO_REUSEPORT (so the kernel spreads connections over the workers,
/// and a reload or a second process can bind beside them) and a deep backlog.
pub(crate) fn bind(
    address: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let first = bind_one(address)?;
    let address = first.local_addr()?;
    let mut sockets = vec![first];
    for _ in 1..count {
        sockets.push(bind_one(address)?);
    }
    Ok(sockets)
}

fn bind_one(address: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(
        Domain::for_address(address),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    #[cfg(unix)]
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&address.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// The smallest and largest HTTP/2 flow-control windows (RFC 9113 6.9.2).
const H2_WINDOWS: (u32, u32) = (65_535, (1 << 31) - 1);

/// Builds the hyper server for one listener: HTTP/1.1 with keep-alive and HTTP/2 prior
/// knowledge, header size and header read time bounded; HTTP/2 with the listener's stream,
/// window, buffer and keep-alive PING settings (out-of-range values clamped to what HTTP/2
/// and hyper accept).
fn http_builder(config: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.0)
        .max_buf_size(config.max_header_bytes)
        .keep_alive(true);
    if let Some(count) = park::max_headers(config.max_header_count) {
        builder.http1().max_headers(count);
    }
    builder
        .http2()
        .enable_connect_protocol() // WebSockets over HTTP/2 (RFC 8441), see proxy/upgrade.rs
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(config.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(config.h2_max_concurrent_streams.max(1))
        .initial_stream_window_size(config.h2_stream_window.clamp(H2_WINDOWS.0, H2_WINDOWS.1))
        .initial_connection_window_size(
            config
                .h2_connection_window
                .clamp(H2_WINDOWS.0, H2_WINDOWS.1),
        )
        .max_send_buf_size(config.h2_max_send_buffer.clamp(1, u32::MAX as usize));
    let interval = config.h2_keep_alive_interval.0;
    if !interval.is_zero() {
        builder
            .http2()
            .keep_alive_interval(interval)
            .keep_alive_timeout(config.h2_keep_alive_timeout.0);
    }
    builder
}

/// Accepts and serves connections of one HTTP listener until told to stop, then drains.
async fn serve_http(
    listener: TcpListener,
    proxy: Arc<HttpProxy>,
    config: ListenerConfig,
    accept_settings: AcceptSettings,
    tls: Option<Arc<TlsListener>>,
) {
    let mut stop = accept_settings.stop.clone();
    let shutdown_timeout = accept_settings.shutdown_timeout;
    let stats = accept_settings.stats.clone();
    let builder = Arc::new(http_builder(&config));
    // Every connection (TLS ones after their handshake) parks and drains through `drain`.
    let plain = tls.is_none();
    let park = Arc::new(park::ParkSettings::new(&config, builder.clone()).with_tls(tls));
    let (drain, _) = watch::channel(());
    if plain {
        park.start_lot(drain.subscribe(), stats.parked.clone());
    }
    loop {
        let (stream, client) = tokio::select! {
            accepted = accept(&listener) => accepted,
            _ = stop.changed() => break,
        };
        let Some(permit) = accept_settings.admit(client) else {
            drop(stream);
            continue;
        };
        if config.accept_proxy_protocol {
            serve_connection_after_proxy_header(
                &park,
                &drain,
                stream,
                client,
                proxy.clone(),
                (permit, stats.clone()),
                config.header_read_timeout.0,
            );
            continue;
        }
        serve_connection(
            &park,
            &drain,
            stream,
            client,
            proxy.clone(),
            (permit, stats.clone()),
        );
    }
    drop(listener);
    drain.send_replace(());
    tokio::select! {
        _ = drain.closed() => return,
        _ = tokio::time::sleep(shutdown_timeout) => {}
    }
    let open = stats.open.load(Ordering::Relaxed);
    tracing::warn!(timeout = ?shutdown_timeout, open, "shutdown timeout reached; closing remaining connections");
    park.close_all();
    // They close at their next tick (a fraction of a second); do not wait forever for them.
    let _ = tokio::time::timeout(Duration::from_secs(1), drain.closed()).await;
}

/// Serves a plain-TCP client connection in its own task; idle HTTP/1.1 connections park (see
/// [`park`]). The server's shutdown reaches it through `drain`.
fn serve_connection(
    park: &Arc<park::ParkSettings>,
    drain: &watch::Sender<()>,
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    (permit, stats): (Admitted, Arc<ListenerStats>),
) {
    let slot = Arc::new(ConnectionSlot::new(permit, stats));
    tokio::spawn(park::serve(
        park.clone(),
        stream,
        client,
        proxy,
        slot,
        drain.subscribe(),
    ));
}

/// The next connection on `listener`. Accept errors (usually out of file descriptors) are
/// logged and retried after a short pause instead of spinning. Cancel-safe.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(error) => {
                tracing::error!(%error, local = ?listener.local_addr().ok(), "accept failed; retrying shortly");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Gives an upgrade request its client connection's slot (the tunnel outlives hyper's
/// connection, so it must keep the connection counted); other requests are left alone.
pub(crate) fn attach_client_slot<B>(request: &mut http::Request<B>, slot: &Arc<ConnectionSlot>) {
    if crate::proxy::upgrade::is_upgrade(request) {
        request
            .extensions_mut()
            .insert(crate::proxy::upgrade::ClientSlot(slot.clone()));
    }
}

/// One client connection's place on its listener: its `max_connections` permit, its count in
/// its IP's `max_connections_per_ip` and in the open connections, both released when the last holder (the connection, or the tunnel
/// of an upgraded connection) drops it.
pub(crate) struct ConnectionSlot {
    _permit: Admitted,
    stats: Arc<ListenerStats>,
}

impl ConnectionSlot {
    pub(crate) fn new(permit: Admitted, stats: Arc<ListenerStats>) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        ConnectionSlot {
            _permit: permit,
            stats,
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Like [`serve_connection`], for listeners behind a front load balancer: first reads the
/// PROXY protocol header (within `header_timeout`; a bad or missing one closes the connection)
/// and serves the connection as coming from the client address it carries.
fn serve_connection_after_proxy_header(
    park: &Arc<park::ParkSettings>,
    drain: &watch::Sender<()>,
    mut stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<HttpProxy>,
    (permit, stats): (Admitted, Arc<ListenerStats>),
    header_timeout: Duration,
) {
    let slot = Arc::new(ConnectionSlot::new(permit, stats));
    let park = park.clone();
    let drain = drain.subscribe();
    tokio::spawn(async move {
        let header =
            crate::wire::proxy_protocol::read_header_within(&mut stream, header_timeout, peer)
                .await;
        if let Some(carried) = header {
            let client = carried.map_or(peer, |c| c.source);
            park::serve(park, stream, client, proxy, slot, drain).await;
        }
    });
}
