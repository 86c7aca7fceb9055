//! A reload as a pure plan: [`plan`] compares the configuration in force with the new one and
//! says what to bind, keep and close, which pools to create, reconfigure and remove, which
//! autoscalers to start, update and stop, and which settings need a restart. The server only
//! carries the plan out (see [`super::Server`]); each pool's manager applies the per-backend
//! rule ([`crate::manager::backend_changes`]) to its own members.

use crate::config::{Config, PoolConfig};
use crate::listener::same_listener;
use crate::manager::{file_backends, file_diff, FileDiff};

use super::ReloadReport;

/// What a reload (or the start, from an empty configuration) changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// The first apply, at start (nothing was running): everything is new, and the report
    /// lists no additions.
    pub initial: bool,
    /// The listeners.
    pub listeners: ListenerPlan,
    /// The pools.
    pub pools: PoolPlan,
    /// The pools' autoscalers.
    pub autoscalers: AutoscalePlan,
    /// Changed settings that apply at start only (`[server] workers`, ...): a restart is
    /// needed for them; the running process keeps the old values.
    pub restart_required: Vec<&'static str>,
}

/// What happens to each listener, by name (each list in name order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenerPlan {
    /// New listeners: bound and started.
    pub add: Vec<String>,
    /// Listeners whose settings changed: the new one is bound and started, then the old one
    /// closed (it drains its connections), so no connection is refused meanwhile.
    pub change: Vec<String>,
    /// Unchanged listeners: kept running (TLS ones serve their re-read certificates).
    pub keep: Vec<String>,
    /// Listeners gone from the configuration: closed (they drain their connections).
    pub close: Vec<String>,
}

impl ListenerPlan {
    /// The listeners to bind (new and changed), in name order.
    pub fn to_bind(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .add
            .iter()
            .chain(&self.change)
            .map(String::as_str)
            .collect();
        names.sort_unstable();
        names
    }
}

/// What happens to each pool, by name (each list in name order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PoolPlan {
    /// New pools: created, each with its manager.
    pub create: Vec<String>,
    /// Pools whose configuration changed: their manager re-applies it. With each, how its
    /// backend list in the file changed (the manager applies only those entries).
    pub reconfigure: Vec<(String, FileDiff)>,
    /// Pools whose configuration is unchanged.
    pub keep: Vec<String>,
    /// Pools gone from the configuration: dropped.
    pub remove: Vec<String>,
}

/// What happens to each pool's autoscaler (each list in pool name order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoscalePlan {
    /// Pools that gain autoscaling: their autoscaler starts.
    pub start: Vec<String>,
    /// Pools whose autoscaling (or health check) settings changed: the autoscaler is told.
    pub update: Vec<String>,
    /// Pools whose autoscaling is unchanged.
    pub keep: Vec<String>,
    /// Pools that lose autoscaling (or are removed): their autoscaler stops.
    pub stop: Vec<AutoscaleStop>,
}

/// An autoscaler to stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AutoscaleStop {
    /// The pool it scales.
    pub pool: String,
    /// Whether its backends are released (drained out of the pool, which stays); false when
    /// the pool itself is removed: nothing routes there any more, its processes just stop.
    pub release: bool,
}

impl ReloadPlan {
    /// The report of this plan carried out (the admin API's reload answer).
    pub fn report(&self) -> ReloadReport {
        let added = |names: &Vec<String>| {
            if self.initial {
                Vec::new()
            } else {
                names.clone()
            }
        };
        ReloadReport {
            listeners_added: added(&self.listeners.add),
            listeners_removed: self.listeners.close.clone(),
            listeners_changed: self.listeners.change.clone(),
            pools_added: added(&self.pools.create),
            pools_updated: self
                .pools
                .reconfigure
                .iter()
                .map(|(name, _)| name.clone())
                .collect(),
            pools_removed: self.pools.remove.clone(),
            restart_required: self
                .restart_required
                .iter()
                .map(|s| s.to_string())
                .collect(),
        }
    }
}

/// What it takes to go from `old` (the configuration in force; an empty one at start) to
/// `new`. Pure: no sockets, no files, no tasks.
pub fn plan(old: &Config, new: &Config) -> ReloadPlan {
    let initial = old.listeners.is_empty();
    let mut plan = ReloadPlan {
        initial,
        ..ReloadPlan::default()
    };

    for (name, listener) in &new.listeners {
        match old.listeners.get(name) {
            None => plan.listeners.add.push(name.clone()),
            Some(current) if same_listener(current, listener) => {
                plan.listeners.keep.push(name.clone())
            }
            Some(_) => plan.listeners.change.push(name.clone()),
        }
    }
    plan.listeners.close = removed(old.listeners.keys(), |n| new.listeners.contains_key(n));

    for (name, pool) in &new.pools {
        match old.pools.get(name) {
            None => plan.pools.create.push(name.clone()),
            Some(current) if current == pool => plan.pools.keep.push(name.clone()),
            Some(current) => {
                let diff = file_diff(&file_backends(current), &file_backends(pool));
                plan.pools.reconfigure.push((name.clone(), diff));
            }
        }
    }
    plan.pools.remove = removed(old.pools.keys(), |n| new.pools.contains_key(n));

    for (name, pool) in &new.pools {
        let Some(wanted) = autoscaling(pool) else {
            continue;
        };
        match old.pools.get(name).and_then(autoscaling) {
            None => plan.autoscalers.start.push(name.clone()),
            Some(current) if current == wanted => plan.autoscalers.keep.push(name.clone()),
            Some(_) => plan.autoscalers.update.push(name.clone()),
        }
    }
    for (name, pool) in &old.pools {
        let still = new.pools.get(name).and_then(autoscaling).is_some();
        if autoscaling(pool).is_some() && !still {
            plan.autoscalers.stop.push(AutoscaleStop {
                pool: name.clone(),
                release: new.pools.contains_key(name),
            });
        }
    }

    if !initial {
        plan.restart_required = start_only_changes(old, new);
    }
    plan
}

/// The names in `old` that `kept` says are gone.
fn removed<'a>(
    old: impl Iterator<Item = &'a String>,
    kept: impl Fn(&String) -> bool,
) -> Vec<String> {
    old.filter(|n| !kept(n)).cloned().collect()
}

/// What a pool's autoscaler runs with: its settings and the pool's health check.
type Autoscaling<'a> = (
    &'a crate::config::AutoscaleConfig,
    &'a Option<crate::config::HealthConfig>,
);

fn autoscaling(pool: &PoolConfig) -> Option<Autoscaling<'_>> {
    pool.autoscale
        .as_ref()
        .map(|autoscale| (autoscale.get_ref(), &pool.health))
}

/// The settings read at start only that differ between `old` and `new`.
fn start_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (&old.server, &new.server);
    [
        ("[server] workers", o.worker_count() != n.worker_count()),
        ("[server] runtime", o.runtime != n.runtime),
        (
            "[server] shutdown_timeout",
            o.shutdown_timeout != n.shutdown_timeout,
        ),
        ("[server] log_format", o.log_format != n.log_format),
        (
            "[admin] listen",
            old.admin.listen.get_ref() != new.admin.listen.get_ref(),
        ),
        (
            "[admin] max_connections",
            old.admin.max_connections != new.admin.max_connections,
        ),
        (
            "[admin] header_read_timeout",
            old.admin.header_read_timeout != new.admin.header_read_timeout,
        ),
        (
            "[admin] idle_timeout",
            old.admin.idle_timeout != new.admin.idle_timeout,
        ),
        (
            "[admin] tls",
            old.admin.tls.as_ref().map(|t| t.get_ref())
                != new.admin.tls.as_ref().map(|t| t.get_ref()),
        ),
    ]
    .into_iter()
    .filter_map(|(name, changed)| changed.then_some(name))
    .collect()
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::path::Path;

    use super::*;

    const BASE: &str = r#"
[listeners.web]
listen = "127.0.0.1:8080"
pool = "app"

[listeners.api]
listen = "127.0.0.1:8081"
pool = "app"

[listeners.old]
listen = "127.0.0.1:8082"
pool = "app"

[pools.app]
backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 2 }]

[pools.gone]
backends = ["127.0.0.1:9101"]

[pools.same]
backends = ["127.0.0.1:9201"]
"#;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("test.toml")).unwrap()
    }

    fn names(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// `BASE` reloaded with: `api` moved to another port, `old` gone, `new` added; `app`'s
    /// backends changed, `gone` removed, `fresh` created, `same` untouched.
    fn reloaded() -> Config {
        parse(
            &BASE
                .replace("8081", "8181")
                .replace(
                    "[listeners.old]\nlisten = \"127.0.0.1:8082\"",
                    "[listeners.new]\nlisten = \"127.0.0.1:8083\"",
                )
                .replace(
                    "backends = [\"127.0.0.1:9001\", { address = \"127.0.0.1:9002\", weight = 2 }]",
                    "backends = [{ address = \"127.0.0.1:9002\", weight = 3 }, \"127.0.0.1:9003\"]",
                )
                .replace("[pools.gone]", "[pools.fresh]"),
        )
    }

    #[test]
    fn an_unchanged_config_keeps_everything() {
        let plan = plan(&parse(BASE), &parse(BASE));
        assert_eq!(plan.listeners.keep, names(&["api", "old", "web"]));
        assert!(plan.listeners.to_bind().is_empty());
        assert!(plan.listeners.close.is_empty());
        assert_eq!(plan.pools.keep, names(&["app", "gone", "same"]));
        assert!(plan.pools.create.is_empty() && plan.pools.reconfigure.is_empty());
        assert!(plan.pools.remove.is_empty() && plan.restart_required.is_empty());
        assert_eq!(plan.report().to_string(), "no changes");
    }

    #[test]
    fn listeners_are_added_changed_kept_and_closed() {
        let plan = plan(&parse(BASE), &reloaded());
        assert_eq!(
            plan.listeners,
            ListenerPlan {
                add: names(&["new"]),
                change: names(&["api"]),
                keep: names(&["web"]),
                close: names(&["old"]),
            }
        );
        assert_eq!(plan.listeners.to_bind(), vec!["api", "new"]);
    }

    #[test]
    fn a_listener_changed_in_any_setting_is_rebound() {
        let changed = BASE.replace(
            "pool = \"app\"\n\n[listeners.api]",
            "pool = \"same\"\n\n[listeners.api]",
        );
        let plan = plan(&parse(BASE), &parse(&changed));
        assert_eq!(plan.listeners.change, names(&["web"]));
    }

    #[test]
    fn pools_are_created_reconfigured_kept_and_removed() {
        let plan = plan(&parse(BASE), &reloaded());
        assert_eq!(plan.pools.create, names(&["fresh"]));
        assert_eq!(plan.pools.keep, names(&["same"]));
        assert_eq!(plan.pools.remove, names(&["gone"]));
        // With the file's backend changes, for the manager's per-backend rule.
        assert_eq!(
            plan.pools.reconfigure,
            vec![(
                "app".to_string(),
                FileDiff {
                    added: vec![(addr(9003), 1)],
                    reweighted: vec![(addr(9002), 3)],
                    removed: vec![addr(9001)],
                }
            )]
        );
    }

    #[test]
    fn a_pool_setting_change_reconfigures_with_an_empty_file_diff() {
        let changed = BASE.replace(
            "[pools.same]\nbackends = [\"127.0.0.1:9201\"]",
            "[pools.same]\nbackends = [\"127.0.0.1:9201\"]\nalgorithm = \"least_conn\"",
        );
        let plan = plan(&parse(BASE), &parse(&changed));
        assert_eq!(plan.pools.reconfigure.len(), 1);
        let (name, diff) = &plan.pools.reconfigure[0];
        assert_eq!(name, "same");
        assert!(diff.is_empty());
    }

    #[test]
    fn the_report_is_derived_from_the_plan() {
        let report = plan(&parse(BASE), &reloaded()).report();
        assert_eq!(report.listeners_added, names(&["new"]));
        assert_eq!(report.listeners_changed, names(&["api"]));
        assert_eq!(report.listeners_removed, names(&["old"]));
        assert_eq!(report.pools_added, names(&["fresh"]));
        assert_eq!(report.pools_updated, names(&["app"]));
        assert_eq!(report.pools_removed, names(&["gone"]));
        assert_eq!(
            report.to_string(),
            "listeners added: new; listeners changed: api; listeners removed: old; \
             pools added: fresh; pools updated: app; pools removed: gone"
        );
        // The admin API's JSON keeps its shape.
        let json = serde_json::to_value(&report).unwrap();
        let mut keys: Vec<&str> = json
            .as_object()
            .unwrap()
            .keys()
            .map(|k| k.as_str())
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "listeners_added",
                "listeners_changed",
                "listeners_removed",
                "pools_added",
                "pools_removed",
                "pools_updated"
            ]
        );
    }

    #[test]
    fn the_start_creates_everything_and_reports_no_additions() {
        let plan = plan(&Config::default(), &parse(BASE));
        assert!(plan.initial);
        assert_eq!(plan.listeners.add, names(&["api", "old", "web"]));
        assert_eq!(plan.pools.create, names(&["app", "gone", "same"]));
        assert!(plan.restart_required.is_empty());
        assert_eq!(plan.report().to_string(), "no changes");
    }

    #[test]
    fn workers_and_runtime_changes_need_a_restart() {
        let old = parse(&format!(
            "[server]\nworkers = 2\nruntime = \"per_core\"\n{BASE}"
        ));
        let new = parse(&format!(
            "[server]\nworkers = 3\nruntime = \"work_stealing\"\n{BASE}"
        ));
        let plan = plan(&old, &new);
        assert_eq!(
            plan.restart_required,
            vec!["[server] workers", "[server] runtime"]
        );
        // Nothing else changes: the listeners keep running as they are.
        assert!(plan.listeners.to_bind().is_empty() && plan.pools.reconfigure.is_empty());
        let report = plan.report();
        assert_eq!(
            report.to_string(),
            "restart required for: [server] workers, [server] runtime"
        );
        assert!(serde_json::to_value(&report)
            .unwrap()
            .get("restart_required")
            .is_none());
    }

    #[test]
    fn autoscalers_start_update_keep_and_stop() {
        let autoscale = |pool: &str, max: usize| {
            format!(
                "\n[pools.{pool}.autoscale]\nprovider = \"command\"\nmin = 1\nmax = {max}\n\
                 metric = \"rps_per_backend\"\ntarget = 1000\n\
                 scale_up = [\"true\"]\nscale_down = [\"true\"]\n"
            )
        };
        let old = parse(&format!(
            "{BASE}{}{}{}",
            autoscale("app", 2),
            autoscale("gone", 2),
            autoscale("same", 2)
        ));
        // `app` changes its maximum, `same` keeps its autoscaler, `gone` is removed with
        // its pool; `fresh` is a new pool with autoscaling.
        let new = parse(&format!(
            "{}{}{}",
            BASE.replace("[pools.gone]", "[pools.fresh]"),
            autoscale("app", 3),
            autoscale("fresh", 2),
        ));
        let plan = plan(&old, &new);
        assert_eq!(plan.autoscalers.start, names(&["fresh"]));
        assert_eq!(plan.autoscalers.update, names(&["app"]));
        assert!(plan.autoscalers.keep.is_empty());
        assert_eq!(
            plan.autoscalers.stop,
            vec![
                AutoscaleStop {
                    pool: "gone".into(),
                    release: false,
                },
                // Autoscaling turned off on a pool that stays: its backends are released.
                AutoscaleStop {
                    pool: "same".into(),
                    release: true,
                },
            ]
        );
        let unchanged = super::plan(&old, &old);
        assert_eq!(unchanged.autoscalers.keep, names(&["app", "gone", "same"]));
        assert!(unchanged.autoscalers.start.is_empty() && unchanged.autoscalers.stop.is_empty());
    }
}
