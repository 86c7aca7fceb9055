//! The admin API's and discovery's commands: add, update and remove a backend, apply what a
//! discovery source resolves to, and (re)start DNS discovery.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::time::Instant;

use super::housekeeping::Retiring;
use super::PoolManager;
use crate::config::{BackendAddress, PoolConfig};
use crate::discovery::dns::{self, DnsTarget};
use crate::pool::{AdminState, Backend, PoolCommand, PoolError};
use crate::runtime::clock::now_ns;

/// What the DNS discovery task of a pool runs with (restarted when this changes).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct DnsSettings {
    targets: Vec<DnsTarget>,
    servers: Vec<SocketAddr>,
    interval: Duration,
}

impl DnsSettings {
    pub(super) fn of(config: &PoolConfig) -> Option<DnsSettings> {
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
    /// Applies one command and publishes the resulting snapshot.
    pub(super) fn apply(&mut self, command: PoolCommand) {
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

    /// (Re)starts DNS discovery when its settings changed; sources no longer configured have
    /// their backends drained.
    pub(super) fn restart_dns(&mut self, settings: Option<DnsSettings>) {
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

    /// Adds a backend (taking back its draining old self, if any); it ramps up and, with
    /// health checks, waits for its first passing check.
    pub(super) fn add(&mut self, address: SocketAddr, weight: u32) -> Result<(), PoolError> {
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

    /// Changes a member's weight and/or admin state.
    pub(super) fn update(
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

    /// Removes a member: at once when `now` or idle, else it drains until its in-flight
    /// requests finish or the pool's drain timeout passes (see housekeeping).
    pub(super) fn remove(&mut self, address: SocketAddr, now: bool) -> Result<(), PoolError> {
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
}
