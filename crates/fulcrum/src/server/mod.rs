//! Layer 10, server: running Fulcrum — build the pools (each with its manager task), start
//! the listeners, apply reloads, and shut down gracefully.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::ArcSwap;
use tokio::sync::{watch, Mutex};

use crate::autoscale::{AutoscaleStats, AutoscaleStatus, AutoscalerHandle};
use crate::config::{Config, ListenerProtocol, RuntimeShape};
use crate::listener::tls::{CertStore, TlsListener};
use crate::listener::{bind, same_listener, start_listener, ListenerTask};
pub use crate::listener::{BoundListener, ListenerStats};
use crate::manager::PoolManager;
use crate::pool::{Pool, PoolHandle};
use crate::proxy::http::HttpProxy;
use crate::runtime::events::EventLog;
use crate::runtime::workers::Workers;

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

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("config_path", &self.config_path)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Builds the pools and binds every listener; fails (with the listener's name and address)
    /// when one cannot be bound. Serving starts at once. `config_path` is what reloads re-read.
    ///
    /// With `runtime = "per_core"` and more than one worker, this starts the worker threads
    /// (see [`crate::runtime::workers`]); call it once per process then. `workers_override` (the
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
