//! Keep-alive connections to one backend: a lock-free queue of idle HTTP/1.1 connections and
//! the connect path (TCP connect with timeout, TCP_NODELAY, hyper handshake).

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::proxy::body::RequestBody;

/// Most idle connections kept per backend. Enough for a busy backend at high concurrency;
/// the queue is preallocated, so this also bounds memory per backend (~10 KiB).
const MAX_IDLE_PER_BACKEND: usize = 256;

/// Why no connection to a backend could be had. Always safe to retry elsewhere: nothing was sent.
#[derive(Debug)]
pub enum ConnectError {
    /// The TCP connect did not finish within the pool's connect timeout.
    Timeout(Duration),
    /// The TCP connect failed (refused, unreachable, ...).
    Io(std::io::Error),
    /// The HTTP connection could not be set up.
    Handshake(hyper::Error),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Timeout(d) => write!(f, "connect timed out after {d:?}"),
            ConnectError::Io(e) => write!(f, "connect failed: {e}"),
            ConnectError::Handshake(e) => write!(f, "HTTP handshake failed: {e}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A connection ready to carry one request.
pub struct UpstreamConnection {
    /// The hyper handle to send the request on.
    pub sender: SendRequest<RequestBody>,
    /// Whether it came from the idle pool (a reused connection may have been closed by the
    /// backend meanwhile; a request it returns unsent can be retried on a fresh one).
    pub reused: bool,
}

struct IdleConnection {
    sender: SendRequest<RequestBody>,
    idle_since: Instant,
}

/// The idle keep-alive connections to one backend.
pub struct ConnectionPool {
    address: SocketAddr,
    idle: ArrayQueue<IdleConnection>,
    stats: Arc<ConnectionStats>,
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
            .field("idle", &self.idle.len())
            .finish()
    }
}

impl ConnectionPool {
    /// An empty pool for the backend at `address`.
    pub fn new(address: SocketAddr) -> Self {
        ConnectionPool {
            address,
            idle: ArrayQueue::new(MAX_IDLE_PER_BACKEND),
            stats: Arc::default(),
        }
    }

    /// Connection counters.
    pub fn stats(&self) -> &ConnectionStats {
        &self.stats
    }

    /// Number of idle connections held now.
    pub fn idle_count(&self) -> usize {
        self.idle.len()
    }

    /// An idle connection if a live one is pooled, else a new one.
    pub async fn acquire(
        &self,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Result<UpstreamConnection, ConnectError> {
        while let Some(mut idle) = self.idle.pop() {
            if idle.sender.is_closed() || idle.idle_since.elapsed() > idle_timeout {
                continue;
            }
            // Normally ready at once; errs if the backend closed the connection meanwhile.
            if idle.sender.ready().await.is_ok() {
                self.stats.reused.fetch_add(1, Ordering::Relaxed);
                return Ok(UpstreamConnection {
                    sender: idle.sender,
                    reused: true,
                });
            }
        }
        self.connect(connect_timeout).await
    }

    /// Opens a new connection, bypassing the idle pool.
    pub async fn connect(
        &self,
        connect_timeout: Duration,
    ) -> Result<UpstreamConnection, ConnectError> {
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(self.address))
            .await
            .map_err(|_| ConnectError::Timeout(connect_timeout))?
            .map_err(ConnectError::Io)?;
        // Small requests and responses must not wait for Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(ConnectError::Handshake)?;
        let address = self.address;
        let stats = self.stats.clone();
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(backend = %address, %error, "upstream connection ended with an error");
            }
            stats.open.fetch_sub(1, Ordering::Relaxed);
        });
        Ok(UpstreamConnection {
            sender,
            reused: false,
        })
    }

    /// Returns a connection whose exchange completed, for reuse. Dropped (closed) if the pool
    /// is full or the connection is closing.
    pub fn release(&self, sender: SendRequest<RequestBody>) {
        if sender.is_closed() {
            return;
        }
        let _ = self.idle.push(IdleConnection {
            sender,
            idle_since: Instant::now(),
        });
    }
}
