//! Running Fulcrum: build the pools (each with its manager task), bind the listeners, serve
//! them with hyper, apply reloads, and shut down gracefully.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio::task::JoinHandle;

use crate::autoscale::{AutoscaleStats, AutoscaleStatus, AutoscalerHandle};
use crate::config::{Config, ListenerConfig, ListenerProtocol, RuntimeShape};
use crate::events::EventLog;
use crate::pool::{Pool, PoolHandle, PoolManager};
use crate::proxy::http::HttpProxy;
use crate::tls::{CertStore, TlsListener};
use crate::workers::Workers;

#[cfg(target_os = "linux")]
mod lot;
mod park;

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
struct ListenerTask {
    config: ListenerConfig,
    bound: BoundListener,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<ListenerStats>,
    /// TLS termination, for `https` listeners.
    tls: Option<Arc<TlsListener>>,
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
    /// Client connections accepted by each worker (how evenly the kernel spreads them).
    pub accepted_by_worker: Box<[AtomicU64]>,
    /// Idle client connections parked in the listener's parking lots now (Linux).
    pub parked: Arc<AtomicU64>,
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
            .get(crate::workers::current_worker())
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What changes only on reload, behind one async mutex so reloads apply one at a time.
struct Running {
    config: Config,
    listeners: BTreeMap<String, ListenerTask>,
    /// The autoscaler of each pool that has one.
    autoscalers: BTreeMap<String, AutoscalerHandle>,
}

/// A running Fulcrum: pools, listeners, the event log, and the handles to reload and stop it.
pub struct Server {
    config_path: Option<PathBuf>,
    events: Arc<EventLog>,
    pools: ArcSwap<BTreeMap<String, PoolHandle>>,
    running: Mutex<Running>,
    /// Turns true at shutdown: pool managers stop.
    stop_managers: watch::Sender<bool>,
    shutdown_timeout: Duration,
    /// Connection counters of the listeners, by name (for metrics; lock-free read).
    listener_stats: ArcSwap<Vec<(String, Arc<ListenerStats>)>>,
    /// Autoscaler numbers by pool (for metrics; lock-free read).
    autoscale_stats: ArcSwap<Vec<(String, Arc<AutoscaleStats>)>>,
    /// Reloads applied and refused since start.
    pub reloads: ReloadCounters,
    /// Where listeners are served: per-core worker runtimes, or the current runtime.
    workers: Workers,
    /// `--workers` from the command line, applied to every config.
    workers_override: Option<usize>,
}

/// Reload outcomes since start.
#[derive(Debug, Default)]
pub struct ReloadCounters {
    /// Reloads applied.
    pub applied: AtomicU64,
    /// Reloads refused (bad config; the old one kept running).
    pub refused: AtomicU64,
}

/// The outcome of a reload, for the API and the log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    /// Listeners opened.
    pub listeners_added: Vec<String>,
    /// Listeners closed (after draining their connections).
    pub listeners_removed: Vec<String>,
    /// Listeners re-opened with new settings.
    pub listeners_changed: Vec<String>,
    /// Pools created.
    pub pools_added: Vec<String>,
    /// Pools whose config was re-applied.
    pub pools_updated: Vec<String>,
    /// Pools dropped.
    pub pools_removed: Vec<String>,
}

impl std::fmt::Display for ReloadReport {
    /// "listeners added: web; pools updated: app", or "no changes".
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = [
            ("listeners added", &self.listeners_added),
            ("listeners changed", &self.listeners_changed),
            ("listeners removed", &self.listeners_removed),
            ("pools added", &self.pools_added),
            ("pools updated", &self.pools_updated),
            ("pools removed", &self.pools_removed),
        ]
        .iter()
        .filter(|(_, names)| !names.is_empty())
        .map(|(label, names)| format!("{label}: {}", names.join(", ")))
        .collect();
        if parts.is_empty() {
            f.write_str("no changes")
        } else {
            f.write_str(&parts.join("; "))
        }
    }
}

impl Server {
    /// Builds the pools and binds every listener; fails (with the listener's name and address)
    /// when one cannot be bound. Serving starts at once. `config_path` is what reloads re-read.
    ///
    /// With `runtime = "per_core"` and more than one worker, this starts the worker threads
    /// (see [`crate::workers`]); call it once per process then. `workers_override` (the
    /// command line's `--workers`) replaces `[server] workers` in this and every reloaded config.
    pub async fn start(
        mut config: Config,
        config_path: Option<PathBuf>,
        workers_override: Option<usize>,
    ) -> Result<Arc<Server>> {
        if let Some(workers) = workers_override {
            config.server.workers = workers;
        }
        let workers = match (config.server.runtime, config.server.worker_count()) {
            (RuntimeShape::PerCore, count) if count > 1 => Workers::start(count)?,
            _ => Workers::inline(),
        };
        tracing::info!(workers = config.server.worker_count(), runtime = %config.server.runtime, "starting");
        let (stop_managers, _) = watch::channel(false);
        let events = Arc::new(EventLog::default());
        let server = Arc::new(Server {
            config_path,
            events,
            pools: ArcSwap::from_pointee(BTreeMap::new()),
            running: Mutex::new(Running {
                config: Config::default(),
                listeners: BTreeMap::new(),
                autoscalers: BTreeMap::new(),
            }),
            stop_managers,
            shutdown_timeout: config.server.shutdown_timeout.0,
            listener_stats: ArcSwap::from_pointee(Vec::new()),
            autoscale_stats: ArcSwap::from_pointee(Vec::new()),
            reloads: ReloadCounters::default(),
            workers,
            workers_override,
        });
        server.apply(config).await?;
        Ok(server)
    }

    /// The bound listeners.
    pub async fn listeners(&self) -> Vec<BoundListener> {
        let running = self.running.lock().await;
        running
            .listeners
            .values()
            .map(|l| l.bound.clone())
            .collect()
    }

    /// The pools by name, with handles to change them (lock-free read).
    pub fn pools(&self) -> arc_swap::Guard<Arc<BTreeMap<String, PoolHandle>>> {
        self.pools.load()
    }

    /// Connection counters of every listener.
    pub fn listener_stats(&self) -> Arc<Vec<(String, Arc<ListenerStats>)>> {
        self.listener_stats.load_full()
    }

    /// The control-plane event log.
    pub fn events(&self) -> &Arc<EventLog> {
        &self.events
    }

    /// The configuration in force.
    pub async fn config(&self) -> Config {
        self.running.lock().await.config.clone()
    }

    /// Re-reads the config file and applies it. A bad file changes nothing: the error (with
    /// `file:line:column`) is returned, logged and recorded as an event.
    pub async fn reload(&self) -> Result<ReloadReport> {
        let Some(path) = &self.config_path else {
            anyhow::bail!("no configuration file to reload (started without --config)");
        };
        let outcome = match Config::load(path) {
            Ok(config) => self.apply(config).await,
            Err(error) => Err(anyhow::Error::new(error)),
        };
        match &outcome {
            Ok(report) => {
                self.reloads.applied.fetch_add(1, Ordering::Relaxed);
                self.events
                    .record("reload", None, None, format!("reload applied: {report}"))
            }
            Err(error) => {
                self.reloads.refused.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %format!("{error:#}"), "reload refused; the previous configuration keeps running");
                self.events.record(
                    "reload_failed",
                    None,
                    None,
                    format!("reload refused: {error:#}"),
                );
            }
        }
        outcome
    }

    /// Makes the running state match `config`: pools first (new ones created, existing ones
    /// reconfigured), then listeners (new ones bound before changed ones are closed, so a
    /// changed listener never refuses a connection).
    async fn apply(&self, mut config: Config) -> Result<ReloadReport> {
        if let Some(workers) = self.workers_override {
            config.server.workers = workers;
        }
        let mut running = self.running.lock().await;
        let mut report = ReloadReport {
            listeners_added: vec![],
            listeners_removed: vec![],
            listeners_changed: vec![],
            pools_added: vec![],
            pools_updated: vec![],
            pools_removed: vec![],
        };
        let (old, new) = (&running.config.server, &config.server);
        if !running.config.listeners.is_empty()
            && (old.worker_count(), old.runtime) != (new.worker_count(), new.runtime)
        {
            tracing::warn!(
                workers = new.worker_count(),
                runtime = %new.runtime,
                "[server] workers and runtime apply at start only: restart to change them"
            );
        }
        // Bind every new or changed listener first: if one fails, nothing changes.
        let mut to_start = Vec::new();
        // Certificates are (re)loaded now too, so a bad file refuses the whole reload.
        let mut certs = BTreeMap::new();
        for (name, listener) in &config.listeners {
            if let (ListenerProtocol::Https, Some(tls)) = (&listener.protocol, &listener.tls) {
                let store = CertStore::load(tls)
                    .map_err(anyhow::Error::msg)
                    .with_context(|| format!("listener `{name}`"))?;
                certs.insert(name.clone(), store);
            }
            let unchanged = running
                .listeners
                .get(name)
                .is_some_and(|old| same_listener(&old.config, listener));
            if !unchanged {
                let sockets = bind(listener.listen.0, self.workers.sockets_per_listener())
                    .with_context(|| {
                        format!(
                            "cannot listen on {} for listener `{name}`",
                            listener.listen.0
                        )
                    })?;
                to_start.push((name.clone(), listener.clone(), sockets));
            }
        }
        let old_pools = self.pools.load_full();
        let mut pools = BTreeMap::new();
        for (name, pool_config) in &config.pools {
            match old_pools.get(name) {
                Some(handle) => {
                    if running.config.pools.get(name) != Some(pool_config) {
                        handle
                            .reconfigure(pool_config.clone())
                            .await
                            .with_context(|| format!("pool `{name}`"))?;
                        report.pools_updated.push(name.clone());
                    }
                    pools.insert(name.clone(), handle.clone());
                }
                None => {
                    let pool = Pool::from_config(name, pool_config);
                    let handle = PoolManager::spawn(
                        pool,
                        pool_config,
                        self.events.clone(),
                        self.stop_managers.subscribe(),
                    );
                    pools.insert(name.clone(), handle);
                    if !running.config.pools.is_empty() {
                        report.pools_added.push(name.clone());
                    }
                }
            }
        }
        report.pools_removed = old_pools
            .keys()
            .filter(|n| !pools.contains_key(*n))
            .cloned()
            .collect();
        self.pools.store(Arc::new(pools));
        let pools = self.pools.load_full();
        self.apply_autoscale(&mut running, &config, &pools);

        for (name, listener_config, sockets) in to_start {
            let tunnel_idle_timeout = listener_config.idle_timeout.0;
            let pool = pools
                .get(listener_config.pool.get_ref())
                .map(|h| h.pool.clone())
                .with_context(|| {
                    format!(
                        "listener `{name}` uses undefined pool `{}`",
                        listener_config.pool.get_ref()
                    )
                })?;
            let tls = match (certs.remove(&name), &listener_config.tls) {
                (Some(store), Some(tls)) => Some(
                    TlsListener::new(&name, tls, store, Some(self.events.clone()))
                        .map_err(anyhow::Error::msg)
                        .with_context(|| format!("listener `{name}`"))?,
                ),
                _ => None,
            };
            let proxy = HttpProxy::new(&name, pool, self.events.clone(), config.server.access_log)
                .with_tls(tls.is_some());
            let task = start_listener(
                &self.workers,
                &name,
                listener_config,
                sockets,
                proxy.with_tunnel_idle_timeout(tunnel_idle_timeout),
                self.shutdown_timeout,
                tls,
            )?;
            tracing::info!(listener = %name, address = %task.bound.address, pool = %task.bound.pool, "listening");
            if let Some(old) = running.listeners.insert(name.clone(), task) {
                report.listeners_changed.push(name.clone());
                old.close();
            } else if !running.config.listeners.is_empty() {
                report.listeners_added.push(name.clone());
            }
        }
        let removed: Vec<String> = running
            .listeners
            .keys()
            .filter(|n| !config.listeners.contains_key(*n))
            .cloned()
            .collect();
        for name in removed {
            if let Some(old) = running.listeners.remove(&name) {
                tracing::info!(listener = %name, "listener removed by reload; draining its connections");
                old.close();
                report.listeners_removed.push(name);
            }
        }
        // Listeners kept as they were serve their freshly loaded certificates from now on.
        for (name, store) in certs {
            if let Some(tls) = running.listeners.get(&name).and_then(|l| l.tls.as_ref()) {
                tls.install(store);
            }
        }
        running.config = config;
        self.listener_stats.store(Arc::new(
            running
                .listeners
                .iter()
                .map(|(name, l)| (name.clone(), l.stats.clone()))
                .collect(),
        ));
        Ok(report)
    }

    /// Starts, updates and stops the pools' autoscalers to match `config`.
    fn apply_autoscale(
        &self,
        running: &mut Running,
        config: &Config,
        pools: &BTreeMap<String, PoolHandle>,
    ) {
        let mut old = std::mem::take(&mut running.autoscalers);
        for (name, pool_config) in &config.pools {
            let (Some(autoscale), Some(pool)) = (&pool_config.autoscale, pools.get(name)) else {
                continue;
            };
            let autoscale = autoscale.get_ref().clone();
            let handle = match old.remove(name) {
                Some(handle) => {
                    handle.update(autoscale, pool_config.health.clone());
                    handle
                }
                None => AutoscalerHandle::spawn(
                    pool.clone(),
                    autoscale,
                    pool_config.health.clone(),
                    self.events.clone(),
                ),
            };
            running.autoscalers.insert(name.clone(), handle);
        }
        for (name, handle) in old {
            // Autoscaling turned off: its backends drain out of the pool and stop. Pool
            // removed: nothing routes there any more, so its processes just stop.
            let release = pools.contains_key(&name);
            tracing::info!(pool = %name, "autoscaling removed by reload");
            tokio::spawn(handle.stop(release));
        }
        self.autoscale_stats.store(Arc::new(
            running
                .autoscalers
                .iter()
                .map(|(name, a)| (name.clone(), a.stats.clone()))
                .collect(),
        ));
    }

    /// The autoscalers' state, for the admin API.
    pub async fn autoscale_status(&self) -> Vec<AutoscaleStatus> {
        let running = self.running.lock().await;
        running
            .autoscalers
            .iter()
            .map(|(name, a)| a.status(name))
            .collect()
    }

    /// The autoscalers' numbers by pool (for metrics; lock-free read).
    pub fn autoscale_stats(&self) -> Arc<Vec<(String, Arc<AutoscaleStats>)>> {
        self.autoscale_stats.load_full()
    }

    /// Stops accepting, lets in-flight requests finish (up to the shutdown timeout), then
    /// closes what is left.
    pub async fn shutdown(&self) {
        tracing::info!(timeout = ?self.shutdown_timeout, "shutting down: no new connections, finishing in-flight requests");
        let mut running = self.running.lock().await;
        let listeners = std::mem::take(&mut running.listeners);
        let mut tasks = Vec::new();
        for (_, listener) in listeners {
            let _ = listener.stop.send(true);
            tasks.extend(listener.tasks);
        }
        for task in tasks {
            let _ = task.await;
        }
        // Requests are done: autoscaled backend processes can stop.
        let autoscalers = std::mem::take(&mut running.autoscalers);
        let mut stops = tokio::task::JoinSet::new();
        for (_, autoscaler) in autoscalers {
            stops.spawn(autoscaler.stop(false));
        }
        stops.join_all().await;
        let _ = self.stop_managers.send(true);
        tracing::info!("shutdown complete");
    }
}

impl ListenerTask {
    /// Stops accepting; the task drains its connections in the background.
    fn close(self) {
        let _ = self.stop.send(true);
    }
}

/// Whether two listener configs can share one running listener (spans are not compared).
fn same_listener(a: &ListenerConfig, b: &ListenerConfig) -> bool {
    a == b
}

fn start_listener(
    workers: &Workers,
    name: &str,
    config: ListenerConfig,
    sockets: Vec<std::net::TcpListener>,
    proxy: HttpProxy,
    shutdown_timeout: Duration,
    tls: Option<Arc<TlsListener>>,
) -> Result<ListenerTask> {
    let address = sockets
        .first()
        .context("no listening socket")?
        .local_addr()?;
    let bound = BoundListener {
        name: name.to_string(),
        address,
        pool: config.pool.get_ref().clone(),
        tls: tls.is_some(),
        tcp: config.protocol == ListenerProtocol::Tcp,
    };
    let (stop, stopped) = watch::channel(false);
    let stats = Arc::new(ListenerStats::new(workers.sockets_per_listener()));
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch_files(stopped.clone()));
    }
    // `max_connections` bounds the listener as a whole, across its workers.
    let limit = Arc::new(Semaphore::new(config.max_connections));
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
                (Some(tcp_proxy), _) => {
                    crate::proxy::tcp::serve_tcp(
                        listener,
                        tcp_proxy,
                        config.max_connections,
                        accept,
                    )
                    .await
                }
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
    })
}

/// What every accept loop of one listener shares.
pub struct AcceptSettings {
    /// The listener's `max_connections`, across all its workers.
    pub limit: Arc<Semaphore>,
    /// Turns true when the listener must stop accepting and drain.
    pub stop: watch::Receiver<bool>,
    /// How long draining may take.
    pub shutdown_timeout: Duration,
    /// The listener's connection counters.
    pub stats: Arc<ListenerStats>,
}

/// Binds `count` listening sockets on `address` (one per worker; port 0 is resolved by the
/// first) with SO_REUSEADDR, SO_REUSEPORT (so the kernel spreads connections over the workers,
/// and a reload or a second process can bind beside them) and a deep backlog.
fn bind(address: SocketAddr, count: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
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
        .enable_connect_protocol() // WebSockets over HTTP/2 (RFC 8441), see proxy/upgrade.rs
        .timer(TokioTimer::new())
        .max_header_list_size(config.max_header_bytes as u32);
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
    let AcceptSettings {
        limit,
        mut stop,
        shutdown_timeout,
        stats,
    } = accept_settings;
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
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%client, max_connections = config.max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        stats.note_accepted();
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
        _ = drain.closed() => {}
        _ = tokio::time::sleep(shutdown_timeout) => {
            tracing::warn!(timeout = ?shutdown_timeout, "shutdown timeout reached; closing remaining connections");
        }
    }
}

/// Serves a plain-TCP client connection in its own task; idle HTTP/1.1 connections park (see
/// [`park`]). The server's shutdown reaches it through `drain`.
fn serve_connection(
    park: &Arc<park::ParkSettings>,
    drain: &watch::Sender<()>,
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    (permit, stats): (tokio::sync::OwnedSemaphorePermit, Arc<ListenerStats>),
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
pub(crate) async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
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

/// The hyper service of one client connection: every request goes to `proxy`; an upgrade
/// request carries the connection's slot, since its tunnel outlives hyper's connection.
pub(crate) fn client_service(
    proxy: Arc<HttpProxy>,
    client: SocketAddr,
    slot: Arc<ConnectionSlot>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::proxy::body::ProxyBody>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    let client_ip = crate::proxy::headers::client_ip_value(client.ip());
    service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        crate::proxy::upgrade::attach_client_slot(&mut request, &slot);
        let proxy = proxy.clone();
        let client_ip = client_ip.clone();
        async move { proxy.handle(request, client, client_ip).await }
    })
}

/// One client connection's place on its listener: its `max_connections` permit and its count
/// in the open connections, both released when the last holder (the connection, or the tunnel
/// of an upgraded connection) drops it.
pub(crate) struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    stats: Arc<ListenerStats>,
}

impl ConnectionSlot {
    pub(crate) fn new(
        permit: tokio::sync::OwnedSemaphorePermit,
        stats: Arc<ListenerStats>,
    ) -> Self {
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
    (permit, stats): (tokio::sync::OwnedSemaphorePermit, Arc<ListenerStats>),
    header_timeout: Duration,
) {
    let slot = Arc::new(ConnectionSlot::new(permit, stats));
    let park = park.clone();
    let drain = drain.subscribe();
    tokio::spawn(async move {
        let header = crate::proxy::tcp::read_proxy_header(&mut stream, header_timeout, peer).await;
        if let Some(carried) = header {
            let client = carried.map_or(peer, |c| c.source);
            park::serve(park, stream, client, proxy, slot, drain).await;
        }
    });
}
