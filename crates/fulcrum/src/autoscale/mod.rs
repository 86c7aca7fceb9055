//! Autoscaling: one task per pool with `[pools.NAME.autoscale]` samples the pool's load,
//! asks the [`decider`] what to do and carries it out through a [`provider`]: new backends
//! join through the pool manager once they are ready; on scale-down the autoscaler drains a
//! backend it started (the newest) and only then stops or releases it, so no request is lost.
//! Everything happens on the control plane: the data path only ever sees pool snapshots.

pub mod decider;
pub mod provider;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{AutoscaleConfig, AutoscaleMetric, AutoscaleProvider, HealthConfig};
use crate::health::active::ActiveCheck;
use crate::health::HealthCheck;
use crate::pool::PoolHandle;
use crate::runtime::events::EventLog;
use decider::{Decider, DeciderSettings, Decision};
use provider::{parse_addresses, run_command, BackendProcess};

/// Longest wait between retries of a failing provider.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// What an autoscaler has done, read by `/metrics` and `/api/autoscale` (control plane).
#[derive(Debug, Default)]
pub struct AutoscaleStats {
    /// Backends in the pool (all members, autoscaled or not).
    pub backends: AtomicUsize,
    /// The size the smoothed load asks for.
    pub desired: AtomicUsize,
    /// The smoothed load per backend, in thousandths.
    pub load_per_backend_milli: AtomicU64,
    /// Scale-up decisions carried out.
    pub scale_ups: AtomicU64,
    /// Scale-down decisions carried out.
    pub scale_downs: AtomicU64,
    /// Provider failures (a backend that did not start or get ready, a command that failed).
    pub failures: AtomicU64,
    /// Crashed backend processes replaced.
    pub replacements: AtomicU64,
    /// The backends the autoscaler manages, oldest first.
    managed: Mutex<Vec<ManagedBackend>>,
}

impl AutoscaleStats {
    /// The backends the autoscaler manages, oldest first.
    pub fn managed(&self) -> Vec<ManagedBackend> {
        self.managed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A backend the autoscaler started, as the admin API shows it (its wire form is
/// `control::api::ManagedBackend`).
#[derive(Debug, Clone)]
pub struct ManagedBackend {
    /// Its address.
    pub address: SocketAddr,
    /// Its process id (process provider).
    pub pid: Option<u32>,
}

/// The autoscaler of one pool as the admin API shows it (its wire form is
/// `control::api::AutoscaleStatus`).
#[derive(Debug)]
pub struct AutoscaleStatus {
    /// The pool.
    pub pool: String,
    /// The metric steered by.
    pub metric: &'static str,
    /// Wanted metric value per backend.
    pub target: f64,
    /// Fewest backends.
    pub min: usize,
    /// Most backends.
    pub max: usize,
    /// Backends in the pool now.
    pub backends: usize,
    /// Size the load asks for.
    pub desired: usize,
    /// Smoothed metric per backend.
    pub load_per_backend: f64,
    /// Backends the autoscaler started, oldest first.
    pub managed: Vec<ManagedBackend>,
    /// Scale-ups carried out.
    pub scale_ups: u64,
    /// Scale-downs carried out.
    pub scale_downs: u64,
    /// Provider failures.
    pub failures: u64,
    /// Crashed backends replaced.
    pub replacements: u64,
}

/// The name of a metric as written in the config.
pub fn metric_name(metric: AutoscaleMetric) -> &'static str {
    match metric {
        AutoscaleMetric::InflightPerBackend => "inflight_per_backend",
        AutoscaleMetric::RpsPerBackend => "rps_per_backend",
        AutoscaleMetric::Cpu => "cpu",
    }
}

/// A running autoscaler: its config channel, stop switch, task and numbers.
#[derive(Debug)]
pub struct AutoscalerHandle {
    config: watch::Sender<(AutoscaleConfig, Option<HealthConfig>)>,
    stop: watch::Sender<StopMode>,
    task: JoinHandle<()>,
    /// Its numbers.
    pub stats: Arc<AutoscaleStats>,
}

impl AutoscalerHandle {
    /// Starts the autoscaler of `pool`.
    pub fn spawn(
        pool: PoolHandle,
        config: AutoscaleConfig,
        health: Option<HealthConfig>,
        events: Arc<EventLog>,
    ) -> AutoscalerHandle {
        let stats = Arc::new(AutoscaleStats::default());
        let (config_sender, config_receiver) = watch::channel((config.clone(), health.clone()));
        let (stop, stop_receiver) = watch::channel(StopMode::Running);
        let autoscaler = Autoscaler {
            name: pool.pool.name.clone(),
            pool,
            decider: Decider::new(DeciderSettings::from_config(&config)),
            config,
            health,
            events,
            stats: stats.clone(),
            managed: Vec::new(),
            to_release: Vec::new(),
            failures_in_row: 0,
            next_attempt: Instant::now(),
            last_requests: None,
            serial: 0,
        };
        let task = tokio::spawn(autoscaler.run(config_receiver, stop_receiver));
        AutoscalerHandle {
            config: config_sender,
            stop,
            task,
            stats,
        }
    }

    /// Applies a reloaded config (backends it started are kept).
    pub fn update(&self, config: AutoscaleConfig, health: Option<HealthConfig>) {
        let new = (config, health);
        self.config.send_if_modified(|current| {
            let changed = *current != new;
            *current = new;
            changed
        });
    }

    /// Stops the autoscaler: backends it started are drained and stopped (process provider)
    /// or released (command provider) when `release` is set; at shutdown (`release` false)
    /// processes are stopped without draining, since the listeners are already drained.
    pub async fn stop(self, release: bool) {
        let _ = self.stop.send(if release {
            StopMode::Release
        } else {
            StopMode::Stop
        });
        let _ = self.task.await;
    }

    /// Status for the admin API.
    pub fn status(&self, pool: &str) -> AutoscaleStatus {
        let config = &self.config.borrow().0;
        let s = &self.stats;
        AutoscaleStatus {
            pool: pool.to_string(),
            metric: metric_name(config.metric),
            target: config.target,
            min: config.min,
            max: config.max,
            backends: s.backends.load(Ordering::Relaxed),
            desired: s.desired.load(Ordering::Relaxed),
            load_per_backend: s.load_per_backend_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            managed: s.managed(),
            scale_ups: s.scale_ups.load(Ordering::Relaxed),
            scale_downs: s.scale_downs.load(Ordering::Relaxed),
            failures: s.failures.load(Ordering::Relaxed),
            replacements: s.replacements.load(Ordering::Relaxed),
        }
    }
}

/// How an autoscaler is asked to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopMode {
    /// Keep going.
    Running,
    /// Stop its processes (shutdown: the listeners are already drained).
    Stop,
    /// Drain its backends out of the pool, then stop or release them (autoscale removed).
    Release,
}

/// A backend the autoscaler started.
#[derive(Debug)]
struct Managed {
    address: SocketAddr,
    /// The local process (process provider).
    process: Option<BackendProcess>,
}

struct Autoscaler {
    name: String,
    pool: PoolHandle,
    config: AutoscaleConfig,
    health: Option<HealthConfig>,
    decider: Decider,
    events: Arc<EventLog>,
    stats: Arc<AutoscaleStats>,
    managed: Vec<Managed>,
    /// Backends drained whose `scale_down` command failed; retried with back-off.
    to_release: Vec<SocketAddr>,
    failures_in_row: u32,
    next_attempt: Instant,
    /// (when, total requests) at the previous sample, for requests per second.
    last_requests: Option<(Instant, u64)>,
    serial: u64,
}

impl Autoscaler {
    async fn run(
        mut self,
        mut config: watch::Receiver<(AutoscaleConfig, Option<HealthConfig>)>,
        mut stop: watch::Receiver<StopMode>,
    ) {
        tracing::info!(pool = %self.name, min = self.config.min, max = self.config.max, metric = metric_name(self.config.metric), target = self.config.target, "autoscaler started");
        // A stop request interrupts a round (a half-started process is killed when dropped;
        // a backend being drained is still in `managed` and is stopped below). Config changes
        // are picked up between rounds, never in the middle of one.
        loop {
            if config.has_changed().unwrap_or(false) {
                (self.config, self.health) = config.borrow_and_update().clone();
                self.decider
                    .set_settings(DeciderSettings::from_config(&self.config));
                self.event(format!(
                    "autoscale settings changed: min {} max {} target {}",
                    self.config.min, self.config.max, self.config.target
                ));
            }
            let pause = self.config.sample_every.0;
            tokio::select! {
                _ = stop.changed() => break,
                _ = async {
                    tokio::time::sleep(pause).await;
                    self.tick().await;
                } => {}
            }
        }
        if *stop.borrow() == StopMode::Release {
            while let Some(last) = self.managed.last() {
                let address = last.address;
                self.drain(address).await;
                if let Some(managed) = self.managed.pop() {
                    self.finish(managed).await;
                }
            }
        }
        self.stop_all().await;
    }

    fn event(&self, message: String) {
        self.events
            .record("autoscale", Some(&self.name), None, message);
    }

    /// One round: replace crashed processes, retry releases, sample, decide, act.
    async fn tick(&mut self) {
        self.replace_crashed().await;
        self.retry_releases().await;
        let snapshot = self.pool.pool.snapshot();
        let current = snapshot.backends.len();
        let now = Instant::now();
        let load = match self.config.metric {
            AutoscaleMetric::InflightPerBackend => snapshot
                .backends
                .iter()
                .map(|b| f64::from(b.in_flight_count()))
                .sum::<f64>(),
            AutoscaleMetric::RpsPerBackend => {
                let total: u64 = snapshot
                    .backends
                    .iter()
                    .chain(snapshot.retiring.iter())
                    .map(|b| b.request_count())
                    .sum();
                let rate = match self.last_requests {
                    Some((at, before)) if now > at => {
                        total.saturating_sub(before) as f64 / (now - at).as_secs_f64()
                    }
                    _ => 0.0,
                };
                self.last_requests = Some((now, total));
                rate
            }
            AutoscaleMetric::Cpu => {
                // The CPU use the backends' agents report (`#cpu 62%`); a backend whose agent
                // reports none counts as exactly on target, so it neither grows nor shrinks
                // the pool.
                snapshot
                    .backends
                    .iter()
                    .map(|b| b.agent_cpu().map_or(self.config.target, f64::from))
                    .sum::<f64>()
            }
        };
        drop(snapshot);
        let decision = self.decider.observe(now, load, current);
        self.stats.backends.store(current, Ordering::Relaxed);
        self.stats
            .desired
            .store(self.decider.desired(), Ordering::Relaxed);
        self.stats.load_per_backend_milli.store(
            (self.decider.smoothed_load() / current.max(1) as f64 * 1000.0) as u64,
            Ordering::Relaxed,
        );
        if now < self.next_attempt {
            return;
        }
        match decision {
            Decision::Hold => {}
            Decision::Grow { to, reason } => {
                let metric = metric_name(self.config.metric);
                tracing::info!(pool = %self.name, from = current, to, %reason, metric, "autoscale: growing");
                self.event(format!("scale up {current} -> {to}: {reason}"));
                self.stats.scale_ups.fetch_add(1, Ordering::Relaxed);
                for _ in current..to {
                    if !self.grow().await {
                        break;
                    }
                }
            }
            Decision::Shrink { to, reason } => {
                let metric = metric_name(self.config.metric);
                let removable = self.managed.len().min(current - to);
                if removable == 0 {
                    return;
                }
                tracing::info!(pool = %self.name, from = current, to = current - removable, %reason, metric, "autoscale: shrinking");
                self.event(format!(
                    "scale down {current} -> {}: {reason}",
                    current - removable
                ));
                self.stats.scale_downs.fetch_add(1, Ordering::Relaxed);
                for _ in 0..removable {
                    self.shrink().await;
                }
            }
        }
        self.publish_managed();
    }

    fn publish_managed(&self) {
        let addresses = self
            .managed
            .iter()
            .map(|m| ManagedBackend {
                address: m.address,
                pid: m.process.as_ref().and_then(BackendProcess::pid),
            })
            .collect();
        *self.stats.managed.lock().unwrap_or_else(|e| e.into_inner()) = addresses;
    }

    fn failed(&mut self, message: String) {
        self.failures_in_row += 1;
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let backoff = Duration::from_secs(1)
            .saturating_mul(1 << self.failures_in_row.min(6))
            .min(MAX_BACKOFF);
        self.next_attempt = Instant::now() + backoff;
        tracing::warn!(pool = %self.name, ?backoff, "autoscale: {message}; retrying after back-off");
        self.events.record(
            "autoscale_failed",
            Some(&self.name),
            None,
            format!("{message}; next attempt in {backoff:?}"),
        );
    }

    /// Whether `address` passes the pool's health check (or accepts TCP when there is none).
    async fn is_ready(&self, address: SocketAddr) -> bool {
        match &self.health {
            Some(health) => ActiveCheck::from_config(health)
                .check(address)
                .await
                .is_ok(),
            None => tokio::time::timeout(
                Duration::from_secs(1),
                tokio::net::TcpStream::connect(address),
            )
            .await
            .is_ok_and(|c| c.is_ok()),
        }
    }

    /// Adds one backend; false when the provider failed.
    async fn grow(&mut self) -> bool {
        match self.config.provider {
            AutoscaleProvider::Process => self.start_process().await,
            AutoscaleProvider::Command => self.run_scale_up().await,
        }
    }

    async fn start_process(&mut self) -> bool {
        self.serial += 1;
        let name = format!("{}-auto-{}", self.name, self.serial);
        let mut process = match BackendProcess::spawn(&self.config.command, &name, &self.name) {
            Ok(process) => process,
            Err(error) => {
                self.failed(format!("{error:#}"));
                return false;
            }
        };
        let address = process.address;
        let deadline = Instant::now() + self.config.ready_timeout.0;
        loop {
            if let Some(status) = process.exited() {
                self.failed(format!(
                    "backend {name} on {address} exited before it was ready ({status})"
                ));
                return false;
            }
            if self.is_ready(address).await {
                break;
            }
            if Instant::now() >= deadline {
                process.stop(self.config.stop_grace.0).await;
                self.failed(format!(
                    "backend {name} on {address} not ready within {:?}",
                    self.config.ready_timeout.0
                ));
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if let Err(error) = self.pool.add(address, self.config.weight).await {
            process.stop(self.config.stop_grace.0).await;
            self.failed(format!("cannot add {address}: {error}"));
            return false;
        }
        self.failures_in_row = 0;
        self.event(format!(
            "started backend {name} on {address} (pid {})",
            process.pid().unwrap_or(0)
        ));
        self.managed.push(Managed {
            address,
            process: Some(process),
        });
        self.publish_managed();
        true
    }

    async fn run_scale_up(&mut self) -> bool {
        let words = provider::expand(&self.config.scale_up, &[("pool", &self.name)]);
        let addresses = match run_command(&words, self.config.command_timeout.0)
            .await
            .and_then(|out| parse_addresses(&out))
        {
            Ok(addresses) => addresses,
            Err(error) => {
                self.failed(format!("scale_up failed: {error:#}"));
                return false;
            }
        };
        for address in addresses {
            let deadline = Instant::now() + self.config.ready_timeout.0;
            while !self.is_ready(address).await && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match self.pool.add(address, self.config.weight).await {
                Ok(()) => {
                    self.event(format!("scale_up provided backend {address}"));
                    self.managed.push(Managed {
                        address,
                        process: None,
                    });
                }
                Err(error) => self.failed(format!("cannot add {address}: {error}")),
            }
        }
        self.failures_in_row = 0;
        self.publish_managed();
        true
    }

    /// Drains the newest managed backend, then stops or releases it.
    async fn shrink(&mut self) {
        let Some(address) = self.managed.last().map(|m| m.address) else {
            return;
        };
        self.drain(address).await;
        if let Some(managed) = self.managed.pop() {
            self.publish_managed();
            self.finish(managed).await;
        }
    }

    /// Removes `address` from the pool and waits until its in-flight requests are done (the
    /// pool manager enforces `drain_timeout`).
    async fn drain(&self, address: SocketAddr) {
        if self.pool.remove(address, false).await.is_err() {
            return;
        }
        let limit = Instant::now() + self.pool.pool.snapshot().settings.drain_timeout;
        loop {
            let gone = {
                let snapshot = self.pool.pool.snapshot();
                !snapshot
                    .backends
                    .iter()
                    .chain(snapshot.retiring.iter())
                    .any(|b| b.address == address)
            };
            if gone || Instant::now() > limit + Duration::from_secs(1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops a drained backend's process, or runs `scale_down` for it.
    async fn finish(&mut self, managed: Managed) {
        match managed.process {
            Some(process) => {
                let name = process.name.clone();
                process.stop(self.config.stop_grace.0).await;
                self.event(format!("stopped backend {name} on {}", managed.address));
            }
            None => self.release(managed.address).await,
        }
    }

    async fn release(&mut self, address: SocketAddr) {
        let words = provider::expand(
            &self.config.scale_down,
            &[("address", &address.to_string()), ("pool", &self.name)],
        );
        match run_command(&words, self.config.command_timeout.0).await {
            Ok(_) => {
                self.failures_in_row = 0;
                self.event(format!("scale_down released backend {address}"));
            }
            Err(error) => {
                self.to_release.push(address);
                self.failed(format!("scale_down of {address} failed: {error:#}"));
            }
        }
    }

    async fn retry_releases(&mut self) {
        if self.to_release.is_empty() || Instant::now() < self.next_attempt {
            return;
        }
        for address in std::mem::take(&mut self.to_release) {
            self.release(address).await;
        }
    }

    /// Removes crashed processes from the pool and starts replacements.
    async fn replace_crashed(&mut self) {
        let mut crashed = Vec::new();
        self.managed.retain_mut(|m| match m.process.as_mut() {
            Some(process) => match process.exited() {
                Some(status) => {
                    crashed.push((m.address, process.name.clone(), status));
                    false
                }
                None => true,
            },
            None => true,
        });
        for (address, name, status) in crashed {
            let _ = self.pool.remove(address, true).await;
            tracing::warn!(pool = %self.name, backend = %address, %status, "autoscaled backend exited; replacing it");
            self.event(format!(
                "backend {name} on {address} exited ({status}); replacing it"
            ));
            self.publish_managed();
            if self.pool.pool.snapshot().backends.len() < self.config.max && self.grow().await {
                self.stats.replacements.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// At stop: processes are stopped (SIGTERM, then SIGKILL after the grace period), all at
    /// once; backends from a command provider are left to the platform.
    async fn stop_all(&mut self) {
        let grace = self.config.stop_grace.0;
        let managed = std::mem::take(&mut self.managed);
        let mut stops = tokio::task::JoinSet::new();
        for process in managed.into_iter().filter_map(|m| m.process) {
            stops.spawn(process.stop(grace));
        }
        stops.join_all().await;
        self.publish_managed();
        tracing::info!(pool = %self.name, "autoscaler stopped");
    }
}
