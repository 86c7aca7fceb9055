//! Layer 10, server: running Fulcrum — build the pools (each with its manager task), start
//! the listeners, apply reloads, and shut down gracefully.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{watch, Mutex};

use crate::autoscale::{AutoscaleStats, AutoscaleStatus, AutoscalerHandle};
use crate::config::{AdminConfig, Config, ListenerConfig, ListenerProtocol, RuntimeShape};
use crate::listener::tls::{CertStore, TlsListener};
use crate::listener::{bind, duplicate, start_listener, ListenerTask};
pub use crate::listener::{BoundListener, ListenerStats};
use crate::manager::PoolManager;
use crate::pool::{Pool, PoolHandle};
use crate::proxy::http::HttpProxy;
use crate::proxy::limits::RequestLimits;
use crate::runtime::events::EventLog;
use crate::runtime::workers::Workers;

mod error;
pub mod plan;

pub use error::{Cause, ServerError};
pub use plan::ReloadPlan;

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
    /// `[admin]` of the configuration in force (lock-free read, per admin request).
    admin: ArcSwap<AdminConfig>,
    /// Where listeners are served: per-core worker runtimes, or the current runtime.
    workers: Workers,
    /// `--workers` from the command line, applied to every config.
    workers_override: Option<usize>,
}

/// What a reload prepares before changing anything: the listeners it starts, and the
/// certificates re-read for the TLS listeners it keeps.
struct Prepared {
    to_start: Vec<ToStart>,
    certs: BTreeMap<String, CertStore>,
}

/// A listener to start: its sockets bound and its TLS ready.
struct ToStart {
    name: String,
    config: ListenerConfig,
    sockets: Vec<std::net::TcpListener>,
    tls: Option<Arc<TlsListener>>,
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
    /// Changed settings that apply at start only (in the log and the event; not in the API's
    /// JSON, whose shape is fixed).
    #[serde(skip)]
    pub restart_required: Vec<String>,
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
            ("restart required for", &self.restart_required),
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
    ) -> Result<Arc<Server>, ServerError> {
        if let Some(workers) = workers_override {
            config.server.workers = workers;
        }
        let workers = match (config.server.runtime, config.server.worker_count()) {
            (RuntimeShape::PerCore, count) if count > 1 => {
                Workers::start(count).map_err(|error| ServerError::Workers(error.into()))?
            }
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
            admin: ArcSwap::from_pointee(config.admin.clone()),
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

    /// `[admin]` of the configuration in force, without waiting for a reload in progress:
    /// the admin API reads its token and allowed host names here on every request.
    pub fn admin_config(&self) -> Arc<AdminConfig> {
        self.admin.load_full()
    }

    /// Puts `new` in force as `[admin]` if `current` still is (a reload in between wins: it
    /// read the token file itself); whether it was. For the admin's token file watch.
    pub fn replace_admin_config(&self, current: &Arc<AdminConfig>, new: AdminConfig) -> bool {
        let previous = self.admin.compare_and_swap(current, Arc::new(new));
        Arc::ptr_eq(&previous, current)
    }

    /// The configuration in force.
    pub async fn config(&self) -> Config {
        self.running.lock().await.config.clone()
    }

    /// Re-reads the config file and applies it. A bad file changes nothing: the error (with
    /// `file:line:column`) is returned, logged and recorded as an event.
    pub async fn reload(&self) -> Result<ReloadReport, ServerError> {
        let Some(path) = &self.config_path else {
            return Err(ServerError::NoConfigFile);
        };
        let outcome = match Config::load(path) {
            Ok(config) => self.apply(config).await,
            Err(error) => Err(ServerError::Config(error)),
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

    /// Makes the running state match `config` by carrying out [`plan::plan`]: first what can
    /// fail (the listeners' pools, certificates and sockets; a failure changes nothing), then
    /// the pools (new ones created, changed ones reconfigured), the autoscalers, and the
    /// listeners (new ones started before changed ones are closed, so a changed listener
    /// never refuses a connection).
    async fn apply(&self, mut config: Config) -> Result<ReloadReport, ServerError> {
        if let Some(workers) = self.workers_override {
            config.server.workers = workers;
        }
        let mut running = self.running.lock().await;
        // The listeners as they run (the same as the config in force's, unless a reload failed
        // half-way in starting them).
        let mut current = running.config.clone();
        current.listeners = running
            .listeners
            .iter()
            .map(|(name, l)| (name.clone(), l.config.clone()))
            .collect();
        let plan = plan::plan(&current, &config);
        if !plan.restart_required.is_empty() {
            tracing::warn!(
                settings = %plan.restart_required.join(", "),
                workers = config.server.worker_count(),
                runtime = %config.server.runtime,
                "these settings apply at start only: restart to change them"
            );
        }
        let Prepared {
            to_start,
            mut certs,
        } = self.prepare_listeners(&plan, &config, &running.listeners)?;
        let pools = self.apply_pools(&plan, &config).await?;
        self.apply_autoscale(&mut running, &plan, &config, &pools);

        for ToStart {
            name,
            config: listener_config,
            sockets,
            tls,
        } in to_start
        {
            let tunnel_idle_timeout = listener_config.idle_timeout.0;
            let pool_name = listener_config.pool.get_ref();
            let pool = pools
                .get(pool_name)
                .map(|h| h.pool.clone())
                .ok_or_else(|| ServerError::UndefinedPool {
                    listener: name.clone(),
                    pool: pool_name.clone(),
                })?;
            let proxy = HttpProxy::new(&name, pool, self.events.clone(), config.server.access_log)
                .with_tls(tls.is_some())
                .with_allowed_upgrades(&listener_config.allowed_upgrades)
                .with_max_body_bytes(listener_config.max_body_bytes)
                .with_limits(RequestLimits::new(&listener_config));
            let task = start_listener(
                &self.workers,
                &name,
                listener_config,
                sockets,
                proxy.with_tunnel_idle_timeout(tunnel_idle_timeout),
                self.shutdown_timeout,
                tls,
            )
            .map_err(|error| ServerError::Listener {
                listener: name.clone(),
                source: error.into(),
            })?;
            tracing::info!(listener = %name, address = %task.bound.address, pool = %task.bound.pool, "listening");
            if let Some(old) = running.listeners.insert(name, task) {
                old.close();
            }
        }
        for name in &plan.listeners.close {
            if let Some(old) = running.listeners.remove(name) {
                tracing::info!(listener = %name, "listener removed by reload; draining its connections");
                old.close();
            }
        }
        // Listeners kept as they were serve their freshly loaded certificates from now on.
        for name in &plan.listeners.keep {
            let tls = running.listeners.get(name).and_then(|l| l.tls.as_ref());
            if let (Some(tls), Some(store)) = (tls, certs.remove(name)) {
                tls.install(store);
            }
        }
        crate::runtime::fdlimit::warn_if_short(
            running.listeners.values().map(|l| l.config.max_connections),
        );
        self.admin.store(Arc::new(config.admin.clone()));
        running.config = config;
        self.listener_stats.store(Arc::new(
            running
                .listeners
                .iter()
                .map(|(name, l)| (name.clone(), l.stats.clone()))
                .collect(),
        ));
        Ok(plan.report())
    }

    /// Everything about the listeners that can fail, before anything changes: each listener
    /// to bind names a defined pool, every TLS listener's certificates load (kept listeners'
    /// too, so a bad file refuses the whole reload), and the new and changed listeners' sockets
    /// bind. A changed listener whose address stays the same is handed the running one's
    /// sockets (duplicated) instead: nothing is re-bound or closed, so no connection waiting
    /// in an accept queue is reset.
    fn prepare_listeners(
        &self,
        plan: &ReloadPlan,
        config: &Config,
        running: &BTreeMap<String, ListenerTask>,
    ) -> Result<Prepared, ServerError> {
        let to_bind = plan.listeners.to_bind();
        for name in &to_bind {
            let pool = config.listeners[*name].pool.get_ref();
            if !config.pools.contains_key(pool) {
                return Err(ServerError::UndefinedPool {
                    listener: name.to_string(),
                    pool: pool.clone(),
                });
            }
        }
        let mut certs = BTreeMap::new();
        for (name, listener) in &config.listeners {
            if let (ListenerProtocol::Https, Some(tls)) = (&listener.protocol, &listener.tls) {
                let store = CertStore::load(tls).map_err(|error| ServerError::Certificates {
                    listener: name.clone(),
                    source: error.into(),
                })?;
                certs.insert(name.clone(), store);
            }
        }
        let mut to_start = Vec::new();
        for name in to_bind {
            let listener = &config.listeners[name];
            let tls = match (certs.remove(name), &listener.tls) {
                (Some(store), Some(tls)) => Some(
                    TlsListener::new(name, tls, store, Some(self.events.clone())).map_err(
                        |error| ServerError::Certificates {
                            listener: name.to_string(),
                            source: error.into(),
                        },
                    )?,
                ),
                _ => None,
            };
            let address = listener.listen.0;
            let carried = running
                .get(name)
                .filter(|old| old.config.listen.0 == address)
                .map(|old| duplicate(&old.sockets));
            let sockets = match carried {
                Some(sockets) => sockets,
                None => bind(address, self.workers.sockets_per_listener()),
            }
            .map_err(|error| ServerError::Bind {
                listener: name.to_string(),
                address,
                source: error.into(),
            })?;
            to_start.push(ToStart {
                name: name.to_string(),
                config: listener.clone(),
                sockets,
                tls,
            });
        }
        Ok(Prepared { to_start, certs })
    }

    /// Creates, reconfigures and drops pools as `plan` says; returns the new pool map (also
    /// published).
    async fn apply_pools(
        &self,
        plan: &ReloadPlan,
        config: &Config,
    ) -> Result<Arc<BTreeMap<String, PoolHandle>>, ServerError> {
        let old_pools = self.pools.load_full();
        let mut pools = BTreeMap::new();
        for name in &plan.pools.keep {
            if let Some(handle) = old_pools.get(name) {
                pools.insert(name.clone(), handle.clone());
            }
        }
        for (name, _) in &plan.pools.reconfigure {
            if let Some(handle) = old_pools.get(name) {
                handle
                    .reconfigure(config.pools[name].clone())
                    .await
                    .map_err(|source| ServerError::PoolStopped {
                        pool: name.clone(),
                        source,
                    })?;
                pools.insert(name.clone(), handle.clone());
            }
        }
        // Created: the new ones (and, defensively, any the plan keeps but that is not running).
        for (name, pool_config) in &config.pools {
            if !pools.contains_key(name) {
                let pool = Pool::from_config(name, pool_config);
                let handle = PoolManager::spawn(
                    pool,
                    pool_config,
                    self.events.clone(),
                    self.stop_managers.subscribe(),
                );
                pools.insert(name.clone(), handle);
            }
        }
        let pools = Arc::new(pools);
        self.pools.store(pools.clone());
        Ok(pools)
    }

    /// Starts, updates and stops the pools' autoscalers as `plan` says.
    fn apply_autoscale(
        &self,
        running: &mut Running,
        plan: &ReloadPlan,
        config: &Config,
        pools: &BTreeMap<String, PoolHandle>,
    ) {
        let autoscaling = |name: &str| {
            let pool_config = config.pools.get(name)?;
            let autoscale = pool_config.autoscale.as_ref()?.get_ref().clone();
            Some((autoscale, pool_config.health.clone(), pools.get(name)?))
        };
        for name in plan
            .autoscalers
            .start
            .iter()
            .chain(&plan.autoscalers.update)
        {
            let Some((autoscale, health, pool)) = autoscaling(name) else {
                continue;
            };
            match running.autoscalers.get(name) {
                Some(handle) => handle.update(autoscale, health),
                None => {
                    let handle = AutoscalerHandle::spawn(
                        pool.clone(),
                        autoscale,
                        health,
                        self.events.clone(),
                    );
                    running.autoscalers.insert(name.clone(), handle);
                }
            }
        }
        for stop in &plan.autoscalers.stop {
            // Autoscaling turned off: its backends drain out of the pool and stop. Pool
            // removed: nothing routes there any more, so its processes just stop.
            if let Some(handle) = running.autoscalers.remove(&stop.pool) {
                tracing::info!(pool = %stop.pool, "autoscaling removed by reload");
                tokio::spawn(handle.stop(stop.release));
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A config with listeners `web` and `extra` (at `extra`) on pool `app` (`algorithm`).
    fn config_text(extra: &str, algorithm: &str) -> String {
        format!(
            "[server]\nruntime = \"work_stealing\"\n\n\
             [listeners.web]\nlisten = \"127.0.0.1:0\"\npool = \"app\"\n\n\
             [listeners.extra]\nlisten = \"{extra}\"\npool = \"app\"\n\n\
             [pools.app]\nalgorithm = \"{algorithm}\"\nbackends = [\"127.0.0.1:9001\"]\n"
        )
    }

    #[tokio::test]
    async fn a_reload_that_cannot_bind_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fulcrum.toml");
        std::fs::write(&path, config_text("127.0.0.1:0", "round_robin")).unwrap();
        let config = Config::load(&path).unwrap();
        let server = Server::start(config, Some(path.clone()), None)
            .await
            .unwrap();
        let addresses = |listeners: Vec<BoundListener>| {
            let mut addresses: Vec<_> = listeners.iter().map(|l| l.address).collect();
            addresses.sort();
            addresses
        };
        let bound = addresses(server.listeners().await);
        let algorithm = || server.pools()["app"].pool.snapshot().settings.algorithm;
        let before = algorithm();

        // The pool changes too, but 192.0.2.1 (TEST-NET-1) is not ours to bind: refused whole.
        std::fs::write(&path, config_text("192.0.2.1:80", "least_conn")).unwrap();
        let error = server.reload().await.unwrap_err();
        assert!(
            matches!(&error, ServerError::Bind { listener, .. } if listener == "extra"),
            "{error:#}"
        );
        let message = format!("{error:#}");
        assert!(
            message.starts_with("cannot listen on 192.0.2.1:80 for listener `extra`: "),
            "{message}"
        );
        assert!(algorithm() == before, "the pool was reconfigured");
        assert_eq!(addresses(server.listeners().await), bound);
        assert_eq!(server.reloads.refused.load(Ordering::Relaxed), 1);
        assert!(server
            .events()
            .recent(10)
            .iter()
            .any(|e| e.kind == "reload_failed"));

        // The same change with an address that binds applies.
        std::fs::write(&path, config_text("127.0.0.1:0", "least_conn")).unwrap();
        let report = server.reload().await.unwrap();
        assert_eq!(report.to_string(), "pools updated: app");
        assert!(algorithm() != before);
        assert_eq!(addresses(server.listeners().await), bound);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_reload_with_a_value_out_of_range_is_refused_at_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fulcrum.toml");
        std::fs::write(&path, config_text("127.0.0.1:0", "round_robin")).unwrap();
        let server = Server::start(Config::load(&path).unwrap(), Some(path.clone()), None)
            .await
            .unwrap();
        let algorithm = || server.pools()["app"].pool.snapshot().settings.algorithm;
        let before = algorithm();
        // `fulcrum check` refuses this (a zero interval would busy-loop discovery): so does
        // a reload, through the same Config::load, and nothing changes.
        let text = config_text("127.0.0.1:0", "least_conn") + "resolve_every = \"0s\"\n";
        std::fs::write(&path, text).unwrap();
        let error = server.reload().await.unwrap_err();
        let ServerError::Config(error) = &error else {
            panic!("{error:#}");
        };
        assert_eq!((error.line, error.column), (15, 17), "{error}");
        assert_eq!(
            error.message,
            "`pools.app.resolve_every` must be between 100ms and 1d, not 0s"
        );
        assert!(algorithm() == before, "the pool was reconfigured");
        assert_eq!(server.reloads.refused.load(Ordering::Relaxed), 1);
        server.shutdown().await;
    }

    #[tokio::test]
    async fn a_reload_without_a_config_file_is_refused() {
        let config = Config::parse(
            &config_text("127.0.0.1:0", "round_robin"),
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        let server = Server::start(config, None, None).await.unwrap();
        let error = server.reload().await.unwrap_err();
        assert!(matches!(error, ServerError::NoConfigFile), "{error}");
        server.shutdown().await;
    }
}
