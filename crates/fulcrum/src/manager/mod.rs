//! The pool manager: one task per pool, the only writer of its snapshot. The admin API, config
//! reload, discovery and the autoscaler send it [`PoolCommand`]s; it validates, applies,
//! publishes a new snapshot, and records an event for every change.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

use crate::config::{AgentCheckConfig, BackendAddress, HealthConfig, PoolConfig};
use crate::discovery::dns::{self, DnsTarget};
use crate::health::{run_agent, run_checks, ActiveCheck};
use crate::pool::{
    AdminState, AgentVerdict, Backend, Pool, PoolCommand, PoolError, PoolHandle, PoolSettings,
    PoolSnapshot,
};
use crate::runtime::clock::now_ns;
use crate::runtime::events::EventLog;

/// How often the manager looks at draining backends and changed effective weights, and
/// refills the retry budget.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);

/// Idle upstream connections are checked every this many housekeeping ticks...
const SWEEP_IDLE_EVERY_TICKS: u32 = 4;
/// ...that is every second; a connection used within the last second is not polled.
const SWEEP_IDLE_INTERVAL: Duration = HOUSEKEEPING_INTERVAL.saturating_mul(SWEEP_IDLE_EVERY_TICKS);

/// The retry budget counts requests and retries over this many housekeeping ticks (10 s).
const RETRY_WINDOW_TICKS: usize = 40;

/// A removed backend finishing its in-flight requests.
#[derive(Debug)]
struct Retiring {
    backend: Backend,
    deadline: Instant,
}

/// The task that owns a pool's membership.
#[derive(Debug)]
pub struct PoolManager {
    pool: Arc<Pool>,
    settings: Arc<PoolSettings>,
    members: Vec<Backend>,
    retiring: Vec<Retiring>,
    /// Housekeeping ticks so far.
    ticks: u64,
    /// Backends and weights as the config file last listed them (reload rule: the file wins
    /// only for backends whose entry in the file changed).
    from_file: HashMap<SocketAddr, u32>,
    events: Arc<EventLog>,
    /// (requests, retries) totals at each of the last ticks, oldest first.
    retry_window: std::collections::VecDeque<(u64, u64)>,
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

/// What the DNS discovery task of a pool runs with (restarted when this changes).
#[derive(Debug, Clone, PartialEq)]
struct DnsSettings {
    targets: Vec<DnsTarget>,
    servers: Vec<SocketAddr>,
    interval: Duration,
}

impl DnsSettings {
    fn of(config: &PoolConfig) -> Option<DnsSettings> {
        let targets: Vec<DnsTarget> = config
            .backends
            .get_ref()
            .iter()
            .filter_map(|b| match &b.get_ref().address {
                BackendAddress::Dns { host, port } => Some(DnsTarget {
                    host: host.clone(),
                    port: *port,
                    weight: b.get_ref().weight,
                }),
                BackendAddress::Ip(_) => None,
            })
            .collect();
        (!targets.is_empty()).then(|| DnsSettings {
            targets,
            servers: config.dns_servers.iter().map(|s| s.0).collect(),
            interval: config.resolve_every.0,
        })
    }
}

impl PoolManager {
    /// Starts the manager of `pool` (created from `config`); it stops when `stop` turns true.
    pub fn spawn(
        pool: Arc<Pool>,
        config: &PoolConfig,
        events: Arc<EventLog>,
        stop: watch::Receiver<bool>,
    ) -> PoolHandle {
        let snapshot = pool.snapshot();
        let manager = PoolManager {
            pool: pool.clone(),
            settings: snapshot.settings.clone(),
            members: snapshot.backends.clone(),
            retiring: Vec::new(),
            ticks: 0,
            from_file: file_backends(config),
            events,
            retry_window: std::collections::VecDeque::with_capacity(RETRY_WINDOW_TICKS + 1),
            health: config.health.clone(),
            checks: HashMap::new(),
            agent: config.agent.clone(),
            agents: HashMap::new(),
            discovered: HashMap::new(),
            dns: None,
            commands: None,
        };
        drop(snapshot);
        let mut manager = manager;
        for backend in manager.members.clone() {
            manager.start_checks(&backend);
        }
        // Commands are rare (operators, reloads, discovery); a short queue applies back-pressure.
        let (commands, receiver) = mpsc::channel(64);
        manager.commands = Some(commands.downgrade());
        manager.restart_dns(DnsSettings::of(config));
        tokio::spawn(manager.run(receiver, stop));
        PoolHandle { pool, commands }
    }

    async fn run(
        mut self,
        mut commands: mpsc::Receiver<PoolCommand>,
        mut stop: watch::Receiver<bool>,
    ) {
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
    }

    /// (Re)starts DNS discovery when its settings changed; sources no longer configured have
    /// their backends drained.
    fn restart_dns(&mut self, settings: Option<DnsSettings>) {
        if self.dns.as_ref().map(|(s, _)| s) == settings.as_ref() {
            return;
        }
        if let Some((_, task)) = self.dns.take() {
            task.abort();
        }
        let sources: Vec<String> = settings
            .iter()
            .flat_map(|s| s.targets.iter().map(DnsTarget::source))
            .collect();
        let gone: Vec<String> = self
            .discovered
            .keys()
            .filter(|k| !sources.contains(k))
            .cloned()
            .collect();
        for source in gone {
            self.discovered(source, Vec::new(), 0);
        }
        let (Some(settings), Some(commands)) = (settings, self.commands.clone()) else {
            return;
        };
        let task = tokio::spawn(dns::run(
            self.pool.name.clone(),
            settings.targets.clone(),
            settings.servers.clone(),
            settings.interval,
            commands,
        ));
        self.dns = Some((settings, task.abort_handle()));
    }

    /// A discovery source now resolves to `addresses`: new ones join, vanished ones drain.
    /// Addresses also listed as fixed backends are left alone.
    fn discovered(&mut self, source: String, addresses: Vec<SocketAddr>, weight: u32) {
        let previous = self.discovered.remove(&source).unwrap_or_default();
        for address in &previous {
            if !addresses.contains(address)
                && !self.from_file.contains_key(address)
                && self.position(*address).is_some()
            {
                let _ = self.remove(*address, false);
                self.events.record(
                    "discovery",
                    Some(&self.pool.name),
                    Some(&address.to_string()),
                    format!("{source} no longer resolves to {address}"),
                );
            }
        }
        for address in &addresses {
            if self.position(*address).is_none() {
                let _ = self.add(*address, weight);
                self.events.record(
                    "discovery",
                    Some(&self.pool.name),
                    Some(&address.to_string()),
                    format!("{source} resolves to {address}"),
                );
            }
        }
        if !addresses.is_empty() {
            self.discovered.insert(source, addresses);
        }
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

    fn apply(&mut self, command: PoolCommand) {
        match command {
            PoolCommand::Add {
                address,
                weight,
                reply,
            } => {
                let _ = reply.send(self.add(address, weight));
            }
            PoolCommand::Update {
                address,
                weight,
                state,
                reply,
            } => {
                let _ = reply.send(self.update(address, weight, state));
            }
            PoolCommand::Remove {
                address,
                now,
                reply,
            } => {
                let _ = reply.send(self.remove(address, now));
            }
            PoolCommand::Discovered {
                source,
                addresses,
                weight,
            } => self.discovered(source, addresses, weight),
            PoolCommand::Reconfigure { config, reply } => {
                self.reconfigure(&config);
                let _ = reply.send(Ok(()));
            }
        }
        self.publish();
    }

    fn add(&mut self, address: SocketAddr, weight: u32) -> Result<(), PoolError> {
        if self.position(address).is_some() {
            return Err(PoolError::AlreadyExists(address));
        }
        // A backend coming back while its old self still drains: take the old state back.
        let backend = match self
            .retiring
            .iter()
            .position(|r| r.backend.address == address)
        {
            Some(i) => {
                let backend = self.retiring.swap_remove(i).backend;
                backend.set_configured_weight(weight);
                backend.set_admin_state(AdminState::Active);
                backend
            }
            None => Backend::new(address, weight),
        };
        // A joining backend ramps up (slow start, when configured).
        backend.set_slow_start(self.settings.slow_start);
        backend.set_latency_decay(self.settings.latency_decay);
        backend.begin_ramp(now_ns());
        if self.health.is_some() {
            // Health-checked before it takes traffic: the first passing check brings it up.
            backend.set_healthy(false);
        }
        self.start_checks(&backend);
        self.members.push(backend);
        self.record(
            "backend_added",
            address,
            format!("backend {address} added with weight {weight}"),
        );
        Ok(())
    }

    fn update(
        &mut self,
        address: SocketAddr,
        weight: Option<u32>,
        state: Option<AdminState>,
    ) -> Result<(), PoolError> {
        let index = self.position(address).ok_or(PoolError::NotFound(address))?;
        let backend = self.members[index].clone();
        if let Some(weight) = weight {
            let old = backend.configured_weight();
            backend.set_configured_weight(weight);
            self.record(
                "backend_weight",
                address,
                format!("backend {address} weight {old} -> {weight}"),
            );
        }
        if let Some(state) = state {
            let old = backend.admin_state();
            backend.set_admin_state(state);
            if old != AdminState::Active && state == AdminState::Active {
                backend.begin_ramp(now_ns());
            }
            self.record(
                "backend_state",
                address,
                format!("backend {address} state {} -> {}", old.name(), state.name()),
            );
        }
        Ok(())
    }

    fn remove(&mut self, address: SocketAddr, now: bool) -> Result<(), PoolError> {
        let index = self.position(address).ok_or(PoolError::NotFound(address))?;
        let backend = self.members.remove(index);
        self.stop_checks(address);
        if now || backend.in_flight_count() == 0 {
            self.record(
                "backend_removed",
                address,
                format!("backend {address} removed"),
            );
        } else {
            self.record(
                "backend_draining",
                address,
                format!(
                    "backend {address} draining {} in-flight request(s) before removal",
                    backend.in_flight_count()
                ),
            );
            self.retiring.push(Retiring {
                backend,
                deadline: Instant::now() + self.settings.drain_timeout,
            });
        }
        Ok(())
    }

    /// Applies a reloaded config: new backends join, backends gone from the file drain,
    /// weights changed in the file apply; backends and weights set through the API on entries
    /// the file did not change are kept.
    fn reconfigure(&mut self, config: &PoolConfig) {
        let new_file = file_backends(config);
        let new_settings = Arc::new(PoolSettings::from_config(config));
        let transport_changed = new_settings.transport != self.settings.transport;
        if *new_settings != *self.settings {
            if new_settings.slow_start != self.settings.slow_start {
                for backend in &self.members {
                    backend.set_slow_start(new_settings.slow_start);
                }
            }
            if new_settings.latency_decay != self.settings.latency_decay {
                for backend in &self.members {
                    backend.set_latency_decay(new_settings.latency_decay);
                }
            }
            self.settings = new_settings;
            self.events.record(
                "pool_settings",
                Some(&self.pool.name),
                None,
                "pool settings changed by reload",
            );
        }
        if config.health != self.health {
            self.health = config.health.clone();
            self.events.record(
                "health_config",
                Some(&self.pool.name),
                None,
                "health check settings changed by reload",
            );
            for backend in self.members.clone() {
                self.stop_checks(backend.address);
                if self.health.is_none() {
                    backend.set_healthy(true);
                }
                self.start_checks(&backend);
            }
        } else if transport_changed {
            // HTTP checks connect like requests do (TLS, HTTP/2): restart them on the new way.
            for backend in self.members.clone() {
                self.stop_checks(backend.address);
                self.start_checks(&backend);
            }
        }
        if transport_changed {
            // Pooled connections were made the old way (plain or TLS, HTTP/1.1 or HTTP/2).
            for backend in &self.members {
                backend.connections.clear();
            }
        }
        if config.agent != self.agent {
            self.agent = config.agent.clone();
            self.events.record(
                "agent_config",
                Some(&self.pool.name),
                None,
                "agent polling settings changed by reload",
            );
            for backend in self.members.clone() {
                if let Some(agent) = self.agents.remove(&backend.address) {
                    agent.abort();
                }
                if self.agent.is_none() {
                    backend.set_agent(Some(100), Some(AgentVerdict::Up));
                }
                self.start_agent(&backend);
            }
        }
        self.restart_dns(DnsSettings::of(config));
        let old_file = std::mem::take(&mut self.from_file);
        for (address, old_weight) in &old_file {
            if !new_file.contains_key(address) && self.position(*address).is_some() {
                let _ = self.remove(*address, false);
            } else if let Some(&new_weight) = new_file.get(address) {
                if new_weight != *old_weight {
                    let _ = self.update(*address, Some(new_weight), None);
                }
            }
        }
        for (address, weight) in &new_file {
            if !old_file.contains_key(address) {
                match self.position(*address) {
                    Some(_) => {
                        let _ = self.update(*address, Some(*weight), None);
                    }
                    None => {
                        let _ = self.add(*address, *weight);
                    }
                }
            }
        }
        self.from_file = new_file;
    }

    /// Retry budget: over the last window, retries may be `retry_percent` of requests plus
    /// `retry_min_per_second` per second. The allowance is recomputed here each tick.
    fn refill_retry_budget(&mut self) {
        let requests: u64 = self
            .members
            .iter()
            .chain(self.retiring.iter().map(|r| &r.backend))
            .map(|b| b.request_count())
            .sum();
        let retries = self.pool.retry_count();
        self.retry_window.push_back((requests, retries));
        if self.retry_window.len() > RETRY_WINDOW_TICKS {
            self.retry_window.pop_front();
        }
        let (old_requests, old_retries) = self
            .retry_window
            .front()
            .copied()
            .unwrap_or((requests, retries));
        // The per-second floor counts over the whole window from the start, so a pool that
        // just started (or just got its first traffic) can already absorb a backend dying
        // under load.
        let window_seconds =
            (RETRY_WINDOW_TICKS as u64 * HOUSEKEEPING_INTERVAL.as_millis() as u64).div_ceil(1000);
        let earned = requests.saturating_sub(old_requests) * u64::from(self.settings.retry_percent)
            / 100
            + u64::from(self.settings.retry_min_per_second) * window_seconds;
        let spent = retries.saturating_sub(old_retries);
        self.pool.set_retry_allowance(earned as i64 - spent as i64);
    }

    fn housekeeping(&mut self) {
        // Connections parked on this thread since: return their freed buffers to the OS.
        crate::runtime::memory::collect_if_parked();
        self.refill_retry_budget();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(u64::from(SWEEP_IDLE_EVERY_TICKS)) {
            for backend in self
                .members
                .iter()
                .chain(self.retiring.iter().map(|r| &r.backend))
            {
                backend
                    .connections
                    .sweep_idle(self.settings.idle_timeout, SWEEP_IDLE_INTERVAL);
            }
        }
        let now = Instant::now();
        let before = self.retiring.len();
        let events = self.events.clone();
        let pool = self.pool.name.clone();
        self.retiring.retain(|r| {
            let in_flight = r.backend.in_flight_count();
            if in_flight == 0 {
                events.record("backend_removed", Some(&pool), Some(&r.backend.id), format!("backend {} drained and removed", r.backend.id));
                false
            } else if now >= r.deadline {
                events.record(
                    "backend_removed",
                    Some(&pool),
                    Some(&r.backend.id),
                    format!("backend {} removed at drain timeout with {in_flight} request(s) still in flight", r.backend.id),
                );
                false
            } else {
                true
            }
        });
        // Slow start advances here: balancing weights move in 250 ms steps, and selectors that
        // precompute from weights (round robin's schedule, random's sums, Maglev's table) are
        // rebuilt below, off the data path, whenever a weight moved.
        let now_ns = now_ns();
        for backend in &self.members {
            backend.update_ramp(now_ns);
        }
        let weights_changed = {
            let snapshot = self.pool.snapshot();
            snapshot
                .backends
                .iter()
                .zip(&snapshot.built_weights)
                .any(|(b, &w)| b.balancing_weight() != w)
        };
        if weights_changed || before != self.retiring.len() {
            self.publish();
        } else {
            // least_conn's tree: health and eligibility changes reach it within a tick.
            self.pool.refresh_load();
        }
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

fn file_backends(config: &PoolConfig) -> HashMap<SocketAddr, u32> {
    config
        .backends
        .get_ref()
        .iter()
        .filter_map(|b| {
            b.get_ref()
                .address
                .ip()
                .map(|address| (address, b.get_ref().weight))
        })
        .collect()
}
