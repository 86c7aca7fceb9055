//! Applying a reloaded pool config: settings, health and agent checks, DNS discovery, and the
//! members. The per-backend rule is pure ([`backend_changes`]): the config file wins only for
//! the entries the file changed, so what the admin API, discovery or the autoscaler did to
//! other backends survives a reload.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use super::commands::DnsSettings;
use super::PoolManager;
use crate::config::PoolConfig;
use crate::pool::{AgentVerdict, PoolSettings};

/// The backends a pool's config file lists by IP address, with their weights (DNS names are
/// discovery's: see [`crate::discovery`]).
pub type FileBackends = BTreeMap<SocketAddr, u32>;

/// The backends `config` lists by IP address, with their weights.
pub fn file_backends(config: &PoolConfig) -> FileBackends {
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

/// How a pool's backend list in the file changed from one version of the file to the next.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileDiff {
    /// Entries the new file lists and the old one did not, with their weights.
    pub added: Vec<(SocketAddr, u32)>,
    /// Entries both list, with a different weight in the new file (the new weight).
    pub reweighted: Vec<(SocketAddr, u32)>,
    /// Entries the old file listed and the new one does not.
    pub removed: Vec<SocketAddr>,
}

impl FileDiff {
    /// Whether the file's backend list is unchanged.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.reweighted.is_empty() && self.removed.is_empty()
    }
}

/// The difference between two versions of a pool's file backends, by address.
pub fn file_diff(old_file: &FileBackends, new_file: &FileBackends) -> FileDiff {
    let mut diff = FileDiff::default();
    for (&address, &weight) in new_file {
        match old_file.get(&address) {
            None => diff.added.push((address, weight)),
            Some(&old) if old != weight => diff.reweighted.push((address, weight)),
            Some(_) => {}
        }
    }
    diff.removed = old_file
        .keys()
        .filter(|a| !new_file.contains_key(a))
        .copied()
        .collect();
    diff
}

/// What a reload does to a pool's members.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BackendPlan {
    /// Backends to add: new in the file and not members.
    pub add: Vec<(SocketAddr, u32)>,
    /// Members given the file's weight: their entry's weight changed, or the entry is new in
    /// the file (a backend added through the API or discovery, now listed in the file).
    pub set_weight: Vec<(SocketAddr, u32)>,
    /// Members to remove (they drain): gone from the file.
    pub remove: Vec<SocketAddr>,
}

impl BackendPlan {
    /// Whether the reload leaves the members as they are.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.set_weight.is_empty() && self.remove.is_empty()
    }
}

/// The reload rule for one pool: the file wins only for the entries the file changed between
/// `old_file` and `new_file`. `members` are the pool's backends now (from the file, the admin
/// API, discovery or the autoscaler).
///
/// - An entry new in the file joins, or, if already a member, takes the file's weight.
/// - An entry whose weight changed in the file takes the new weight (if still a member).
/// - An entry gone from the file is removed (if still a member).
/// - Entries the file did not change are left alone: a weight or admin state set through the
///   API survives, and so does the removal of a file backend through the API. Members the
///   file never listed (added through the API or by discovery) are not touched.
pub fn backend_changes(
    old_file: &FileBackends,
    new_file: &FileBackends,
    members: &[SocketAddr],
) -> BackendPlan {
    let members: HashSet<SocketAddr> = members.iter().copied().collect();
    let diff = file_diff(old_file, new_file);
    let (present, absent): (Vec<_>, Vec<_>) = diff
        .added
        .into_iter()
        .partition(|(address, _)| members.contains(address));
    BackendPlan {
        add: absent,
        set_weight: diff
            .reweighted
            .into_iter()
            .filter(|(address, _)| members.contains(address))
            .chain(present)
            .collect(),
        remove: diff
            .removed
            .into_iter()
            .filter(|address| members.contains(address))
            .collect(),
    }
}

impl PoolManager {
    /// Applies a reloaded config: new backends join, backends gone from the file drain,
    /// weights changed in the file apply; backends and weights set through the API on entries
    /// the file did not change are kept (see [`backend_changes`]).
    pub(super) fn reconfigure(&mut self, config: &PoolConfig) {
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
        let new_file = file_backends(config);
        let members: Vec<SocketAddr> = self.members.iter().map(|b| b.address).collect();
        let plan = backend_changes(&self.from_file, &new_file, &members);
        for address in plan.remove {
            let _ = self.remove(address, false);
        }
        for (address, weight) in plan.set_weight {
            let _ = self.update(address, Some(weight), None);
        }
        for (address, weight) in plan.add {
            let _ = self.add(address, weight);
        }
        self.from_file = new_file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::test_support::{pool_config, pool_config_with, Running, A, B};

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    fn file(entries: &[(u16, u32)]) -> FileBackends {
        entries.iter().map(|&(p, w)| (addr(p), w)).collect()
    }

    #[test]
    fn an_unchanged_file_changes_nothing() {
        let f = file(&[(1, 1), (2, 3)]);
        // Whatever the API did to the members (weights, removal of 2, an added 9).
        let plan = backend_changes(&f, &f, &[addr(1), addr(9)]);
        assert!(plan.is_empty(), "{plan:?}");
        assert!(file_diff(&f, &f).is_empty());
    }

    #[test]
    fn an_api_weight_survives_a_reload_that_does_not_touch_its_entry() {
        // 1's weight was set through the API; the reload only changes 2's weight.
        let old = file(&[(1, 1), (2, 1)]);
        let new = file(&[(1, 1), (2, 5)]);
        let plan = backend_changes(&old, &new, &[addr(1), addr(2)]);
        assert_eq!(plan.set_weight, vec![(addr(2), 5)]);
        assert!(plan.add.is_empty() && plan.remove.is_empty(), "{plan:?}");
    }

    #[test]
    fn the_file_wins_when_its_entry_changed() {
        let old = file(&[(1, 1)]);
        let new = file(&[(1, 4)]);
        let plan = backend_changes(&old, &new, &[addr(1)]);
        assert_eq!(plan.set_weight, vec![(addr(1), 4)]);
        // Removed through the API meanwhile: the changed weight does not bring it back.
        let plan = backend_changes(&old, &new, &[]);
        assert!(plan.is_empty(), "{plan:?}");
    }

    #[test]
    fn a_backend_removed_from_the_file_is_removed() {
        let old = file(&[(1, 1), (2, 1)]);
        let new = file(&[(1, 1)]);
        let plan = backend_changes(&old, &new, &[addr(1), addr(2)]);
        assert_eq!(plan.remove, vec![addr(2)]);
        assert!(plan.add.is_empty() && plan.set_weight.is_empty());
        assert_eq!(file_diff(&old, &new).removed, vec![addr(2)]);
    }

    #[test]
    fn discovered_and_api_added_backends_are_not_removed_by_a_reload() {
        let old = file(&[(1, 1)]);
        let new = file(&[(1, 1), (3, 2)]);
        // 8 came from discovery, 9 from the API: the file never listed them.
        let plan = backend_changes(&old, &new, &[addr(1), addr(8), addr(9)]);
        assert_eq!(plan.add, vec![(addr(3), 2)]);
        assert!(
            plan.remove.is_empty() && plan.set_weight.is_empty(),
            "{plan:?}"
        );
    }

    #[test]
    fn a_member_newly_listed_in_the_file_takes_the_file_weight() {
        let old = file(&[(1, 1)]);
        let new = file(&[(1, 1), (9, 7)]);
        let plan = backend_changes(&old, &new, &[addr(1), addr(9)]);
        assert_eq!(plan.set_weight, vec![(addr(9), 7)]);
        assert!(plan.add.is_empty());
    }

    #[test]
    fn the_file_diff_lists_added_reweighted_and_removed_entries() {
        let old = file(&[(1, 1), (2, 1), (3, 1)]);
        let new = file(&[(1, 1), (2, 2), (4, 1)]);
        assert_eq!(
            file_diff(&old, &new),
            FileDiff {
                added: vec![(addr(4), 1)],
                reweighted: vec![(addr(2), 2)],
                removed: vec![addr(3)],
            }
        );
    }

    #[tokio::test]
    async fn the_manager_applies_the_rule_to_its_members() {
        let running = Running::start(&pool_config(""));
        // Through the API: A's weight, and a backend the file never listed.
        running.handle.update(A, Some(5), None).await.unwrap();
        running.handle.add(addr(9009), 2).await.unwrap();
        // A reload changing B's entry only.
        let b_changed = "\"127.0.0.1:9001\", { address = \"127.0.0.1:9002\", weight = 3 }";
        running
            .handle
            .reconfigure(pool_config_with(b_changed, ""))
            .await
            .unwrap();
        assert_eq!(
            running.member(A).configured_weight(),
            5,
            "the API weight was lost"
        );
        assert_eq!(
            running.member(B).configured_weight(),
            3,
            "the file's change was lost"
        );
        assert_eq!(running.member(addr(9009)).configured_weight(), 2);
        // A reload dropping A from the file: A goes, the API's backend stays.
        let a_gone = "{ address = \"127.0.0.1:9002\", weight = 3 }";
        running
            .handle
            .reconfigure(pool_config_with(a_gone, ""))
            .await
            .unwrap();
        assert!(
            running.find(A).is_none(),
            "still a member after leaving the file"
        );
        assert!(running.find(addr(9009)).is_some());
        assert!(running.recorded("backend 127.0.0.1:9001 removed"));
        running.stop().await;
    }
}
