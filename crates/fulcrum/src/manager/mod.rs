//! The pool manager: one task per pool, the only writer of its snapshot. The admin API, config
//! reload, discovery and the autoscaler send it [`PoolCommand`]s; it validates, applies,
//! publishes a new snapshot, and records an event for every change.
//!
//! By job: this module spawns the task and runs its loop; `commands` applies the admin and
//! discovery commands; [`reconcile`] applies a reloaded pool config (the per-backend rule is
//! the pure [`reconcile::backend_changes`]); `housekeeping` runs the 250 ms tick (drain
//! deadlines, the retry budget's window, slow start, the idle sweep).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::config::{AgentCheckConfig, HealthConfig, PoolConfig};
use crate::health::{run_agent, run_checks, ActiveCheck};
use crate::pool::{Backend, Pool, PoolCommand, PoolHandle, PoolSettings, PoolSnapshot};
use crate::runtime::events::EventLog;

mod commands;
mod housekeeping;
pub mod reconcile;
#[cfg(test)]
mod test_support;

use commands::DnsSettings;
use housekeeping::{Retiring, RetryWindow, HOUSEKEEPING_INTERVAL};
pub use reconcile::{
    backend_changes, file_backends, file_diff, BackendPlan, FileBackends, FileDiff,
};

/// The task that owns a pool's membership.
#[derive(Debug)]
pub struct PoolManager {
    pool: Arc<Pool>,
    settings: Arc<PoolSettings>,
    members: Vec<Backend>,
    retiring: Vec<Retiring>,
    /// Housekeeping ticks so far.
    ticks: u64,
    /// Idle sweeps run so far.
    sweeps: u64,
    /// Backends and weights as the config file last listed them (reload rule: the file wins
    /// only for backends whose entry in the file changed).
    from_file: FileBackends,
    events: Arc<EventLog>,
    /// The retry budget's window of (requests, retries) totals.
    retry_window: RetryWindow,
    /// Active health check settings, if any.
    health: Option<HealthConfig>,
    /// The running check task of each member.
    checks: HashMap<SocketAddr, AbortHandle>,
    /// Agent polling settings, if any.
    agent: Option<AgentCheckConfig>,
    /// The running agent polling task of each member.
    agents: HashMap<SocketAddr, AbortHandle>,
    /// Addresses each discovery source currently provides.
    discovered: HashMap<String, Vec<SocketAddr>>,
    /// The DNS discovery task and what it was started with.
    dns: Option<(DnsSettings, AbortHandle)>,
    /// A handle on our own command queue, for discovery tasks (weak: they must not keep the
    /// manager alive).
    commands: Option<mpsc::WeakSender<PoolCommand>>,
}

impl PoolManager {
    /// Starts the manager of `pool` (created from `config`); it stops when `stop` turns true.
    pub fn spawn(
        pool: Arc<Pool>,
        config: &PoolConfig,
        events: Arc<EventLog>,
        stop: watch::Receiver<bool>,
    ) -> PoolHandle {
        let (manager, handle, receiver) = PoolManager::new(pool, config, events);
        tokio::spawn(manager.run(receiver, stop));
        handle
    }

    /// The manager of `pool`, its checks and DNS discovery started, and its command queue;
    /// [`PoolManager::run`] serves the queue.
    fn new(
        pool: Arc<Pool>,
        config: &PoolConfig,
        events: Arc<EventLog>,
    ) -> (PoolManager, PoolHandle, mpsc::Receiver<PoolCommand>) {
        let snapshot = pool.snapshot();
        let mut manager = PoolManager {
            pool: pool.clone(),
            settings: snapshot.settings.clone(),
            members: snapshot.backends.clone(),
            retiring: Vec::new(),
            ticks: 0,
            sweeps: 0,
            from_file: file_backends(config),
            events,
            retry_window: RetryWindow::default(),
            health: config.health.clone(),
            checks: HashMap::new(),
            agent: config.agent.clone(),
            agents: HashMap::new(),
            discovered: HashMap::new(),
            dns: None,
            commands: None,
        };
        drop(snapshot);
        for backend in manager.members.clone() {
            manager.start_checks(&backend);
        }
        // Commands are rare (operators, reloads, discovery); a short queue applies back-pressure.
        let (commands, receiver) = mpsc::channel(64);
        manager.commands = Some(commands.downgrade());
        manager.restart_dns(DnsSettings::of(config));
        (manager, PoolHandle { pool, commands }, receiver)
    }

    /// Serves commands and runs the housekeeping tick until `stop` turns true or every handle
    /// is gone; returns the manager (its tasks stopped) for tests to look at.
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<PoolCommand>,
        mut stop: watch::Receiver<bool>,
    ) -> PoolManager {
        let mut housekeeping = tokio::time::interval(HOUSEKEEPING_INTERVAL);
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => self.apply(command),
                    None => break,
                },
                _ = housekeeping.tick() => self.housekeeping(),
                _ = stop.changed() => break,
            }
        }
        for (_, check) in self.checks.drain() {
            check.abort();
        }
        for (_, agent) in self.agents.drain() {
            agent.abort();
        }
        if let Some((_, task)) = self.dns.take() {
            task.abort();
        }
        self
    }

    /// Starts the active checks of `backend`, when the pool has checks, and its agent
    /// polling when the pool has an agent and it is not polled yet.
    fn start_checks(&mut self, backend: &Backend) {
        if !self.agents.contains_key(&backend.address) {
            self.start_agent(backend);
        }
        let Some(health) = &self.health else {
            return;
        };
        let task = tokio::spawn(run_checks(
            ActiveCheck::from_config(health)
                .with_proxy_protocol(self.settings.proxy_protocol)
                .with_transport(self.settings.transport.clone()),
            backend.clone(),
            self.pool.name.clone(),
            self.events.clone(),
            health.interval.0,
            health.rise,
            health.fall,
            1,
        ));
        if let Some(old) = self.checks.insert(backend.address, task.abort_handle()) {
            old.abort();
        }
    }

    fn stop_checks(&mut self, address: SocketAddr) {
        if let Some(check) = self.checks.remove(&address) {
            check.abort();
        }
        if let Some(agent) = self.agents.remove(&address) {
            agent.abort();
        }
    }

    /// Starts polling the agent of `backend`, when the pool has an agent configured.
    fn start_agent(&mut self, backend: &Backend) {
        let Some(agent) = &self.agent else {
            return;
        };
        let task = tokio::spawn(run_agent(
            backend.clone(),
            self.pool.name.clone(),
            self.events.clone(),
            agent.port,
            agent.interval.0,
            agent.timeout.0,
        ));
        if let Some(old) = self.agents.insert(backend.address, task.abort_handle()) {
            old.abort();
        }
    }

    fn position(&self, address: SocketAddr) -> Option<usize> {
        self.members.iter().position(|b| b.address == address)
    }

    fn publish(&self) {
        let retiring = self.retiring.iter().map(|r| r.backend.clone()).collect();
        self.pool.publish(PoolSnapshot::build(
            self.settings.clone(),
            self.members.clone(),
            retiring,
        ));
    }

    fn record(&self, kind: &'static str, address: SocketAddr, message: String) {
        self.events.record(
            kind,
            Some(&self.pool.name),
            Some(&address.to_string()),
            message,
        );
    }
}
