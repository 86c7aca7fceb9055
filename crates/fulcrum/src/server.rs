//! Running Fulcrum: build the pools, bind the listeners, accept connections, serve them with
//! hyper, and shut down gracefully.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use crate::config::{Config, ListenerConfig};
use crate::pool::Pool;
use crate::proxy::http::HttpProxy;

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
}

/// A running Fulcrum: its listeners and pools, and the handle to stop it.
pub struct RunningServer {
    listeners: Vec<BoundListener>,
    pools: BTreeMap<String, Arc<Pool>>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
    shutdown_timeout: Duration,
}

impl RunningServer {
    /// Builds the pools and binds every listener; fails (with the listener's name and address)
    /// when one cannot be bound. Serving starts at once.
    pub async fn start(config: &Config) -> Result<RunningServer> {
        let pools: BTreeMap<String, Arc<Pool>> = config
            .pools
            .iter()
            .map(|(name, pool)| (name.clone(), Pool::from_config(name, pool)))
            .collect();
        let (stop, stopped) = watch::channel(false);
        let mut tasks = JoinSet::new();
        let mut listeners = Vec::new();
        for (name, listener_config) in &config.listeners {
            let socket = bind(listener_config.listen.0).with_context(|| {
                format!(
                    "cannot listen on {} for listener `{name}`",
                    listener_config.listen.0
                )
            })?;
            let address = socket.local_addr()?;
            let pool_name = listener_config.pool.get_ref().clone();
            let pool = pools
                .get(&pool_name)
                .cloned()
                .with_context(|| format!("listener `{name}` uses undefined pool `{pool_name}`"))?;
            let proxy = Arc::new(HttpProxy::new(name, pool));
            tasks.spawn(serve_http(
                socket,
                proxy,
                listener_config.clone(),
                stopped.clone(),
                config.server.shutdown_timeout.0,
            ));
            tracing::info!(listener = %name, %address, pool = %pool_name, "listening");
            listeners.push(BoundListener {
                name: name.clone(),
                address,
                pool: pool_name,
            });
        }
        Ok(RunningServer {
            listeners,
            pools,
            stop,
            tasks,
            shutdown_timeout: config.server.shutdown_timeout.0,
        })
    }

    /// The bound listeners.
    pub fn listeners(&self) -> &[BoundListener] {
        &self.listeners
    }

    /// The pools by name.
    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout), then
    /// closes what is left.
    pub async fn shutdown(mut self) {
        tracing::info!(timeout = ?self.shutdown_timeout, "shutting down: no new connections, finishing in-flight requests");
        let _ = self.stop.send(true);
        while self.tasks.join_next().await.is_some() {}
        tracing::info!("shutdown complete");
    }
}

/// Binds a listening socket with SO_REUSEADDR, SO_REUSEPORT (so a restarted or second process
/// can bind beside this one) and a deep backlog.
fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
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
    TcpListener::from_std(socket.into())
}

/// Builds the hyper server for one listener: HTTP/1.1 with keep-alive and HTTP/2 prior
/// knowledge, header size and header read time bounded.
fn http_builder(config: &ListenerConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout.0)
        .max_buf_size(config.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32);
    builder
}

/// Accepts and serves connections of one HTTP listener until told to stop, then drains.
async fn serve_http(
    listener: TcpListener,
    proxy: Arc<HttpProxy>,
    config: ListenerConfig,
    mut stop: watch::Receiver<bool>,
    shutdown_timeout: Duration,
) {
    let builder = http_builder(&config);
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(config.max_connections));
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Usually out of file descriptors: back off briefly instead of spinning.
                    tracing::error!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            tracing::warn!(%client, max_connections = config.max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        serve_connection(&builder, &graceful, stream, client, proxy.clone(), permit);
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(timeout = ?shutdown_timeout, "shutdown timeout reached; closing remaining connections");
        }
    }
}

fn serve_connection(
    builder: &auto::Builder<TokioExecutor>,
    graceful: &GracefulShutdown,
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let proxy = proxy.clone();
        async move { proxy.handle(request, client).await }
    });
    let connection = builder
        .serve_connection(TokioIo::new(stream), service)
        .into_owned();
    let connection = graceful.watch(connection);
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%client, %error, "client connection ended with an error");
        }
        drop(permit);
    });
}
