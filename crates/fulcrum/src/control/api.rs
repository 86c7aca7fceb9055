//! The admin API's wire types: every JSON body the API answers with or accepts, in one place.
//! The admin server ([`super::admin`]) serializes them, built from the internal status types by
//! the `From` impls here; `fulcrum ctl` deserializes the answers into them, so the two cannot
//! drift apart unnoticed.
//!
//! Answers are decoded strictly: every field is required, `null`able ones (`Option`) included —
//! a field that is missing is an error, never a silent zero or `None`. Fields an answer has and
//! a type does not know are ignored, so an older ctl still reads a newer server's answers.
//! Request bodies refuse unknown fields (a typo is an error naming the field).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::autoscale;
use crate::pool::{self, AdminState};
use crate::runtime::events;
use crate::server;

/// A pool: `GET /api/pools` answers a list of them, `GET /api/pools/{pool}` one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Selection algorithm, as written in the config (`round_robin`, `peak_ewma`, ...).
    pub algorithm: String,
    /// Every backend, those being removed included.
    pub backends: Vec<BackendStatus>,
}

/// A backend of a pool.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    /// Address, `IP:PORT`.
    pub address: String,
    /// Weight from config or API.
    pub weight: u32,
    /// Weight balancers use now (configured × agent × slow start).
    pub effective_weight: u32,
    /// Slow-start factor in percent (100 when not ramping).
    pub slow_start_percent: u8,
    /// `active` / `draining` / `maint` (a removed backend finishing its requests shows
    /// `draining`).
    pub state: String,
    /// `up` / `down` per health checks.
    pub health: String,
    /// Ejected by passive outlier detection right now.
    pub ejected: bool,
    /// Whether it can be picked for new requests now.
    pub available: bool,
    /// The agent's weight percentage (100 without an agent).
    pub agent_percent: u8,
    /// CPU use (percent) the agent reported; `null` when it reports none.
    #[serde(deserialize_with = "Option::deserialize")]
    pub agent_cpu_percent: Option<u8>,
    /// The agent's verdict: `up` / `drain` / `maint` / `down` (`up` without an agent).
    pub agent_state: String,
    /// Whether it is skipped for now after failed connects.
    pub backed_off: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests sent and not answered yet (what `peak_ewma` multiplies latency by).
    pub pending: u32,
    /// Requests sent since start.
    pub requests: u64,
    /// Failures seen since start.
    pub failures: u64,
    /// Removed from the pool, finishing in-flight requests.
    pub removing: bool,
    /// The balancer's latency estimate (peak-EWMA of the time to response headers), in
    /// milliseconds; `null` until measured.
    #[serde(deserialize_with = "Option::deserialize")]
    pub latency_ms: Option<f64>,
}

/// `POST /api/pools/{pool}/backends`: the backend to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    /// Backend address, `IP:PORT` (checked by the server, which names the field on error).
    pub address: String,
    /// Relative share of traffic; 1 when not given.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The answer to [`AddBackend`] (201 Created).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendAdded {
    /// The address added.
    pub added: String,
    /// Its weight.
    pub weight: u32,
}

/// `PATCH /api/pools/{pool}/backends/{address}`: what to change; at least one of the two.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBackend {
    /// The new weight (0 = no new traffic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// The new admin state: `active`, `draining` (or `drain`), `maint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<AdminState>,
}

/// The answer to [`UpdateBackend`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendUpdated {
    /// The address changed.
    pub updated: String,
}

/// The query of `DELETE /api/pools/{pool}/backends/{address}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RemoveQuery {
    /// Remove at once instead of draining first; false when not given.
    #[serde(default)]
    pub now: bool,
}

/// The answer to `DELETE /api/pools/{pool}/backends/{address}`: 200 when removed at once,
/// 202 when draining first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRemoved {
    /// The address removed.
    pub removed: String,
    /// Whether it is draining (in-flight requests finish first) rather than gone already.
    pub drained: bool,
}

/// What a reload changed.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
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

/// The answer to `POST /api/reload` when the new config was applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// Always true (a failed reload answers an [`ErrorBody`]).
    pub reloaded: bool,
    /// What changed.
    pub changes: ReloadReport,
}

/// The query of `GET /api/events`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EventsQuery {
    /// How many of the most recent events; 100 when not given, at most 1000.
    pub limit: Option<usize>,
}

/// One event: `GET /api/events` answers a list of them, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number, increasing from 1.
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// What kind of event: `backend_added`, `backend_removed`, `health`, `reload`, ...
    pub kind: String,
    /// The pool concerned; `null` when none.
    #[serde(deserialize_with = "Option::deserialize")]
    pub pool: Option<String>,
    /// The backend concerned; `null` when none.
    #[serde(deserialize_with = "Option::deserialize")]
    pub backend: Option<String>,
    /// Human-readable detail.
    pub message: String,
}

/// The autoscaler of one pool: `GET /api/autoscale` answers a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoscaleStatus {
    /// The pool.
    pub pool: String,
    /// The metric steered by, as written in the config.
    pub metric: String,
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

/// A backend an autoscaler started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagedBackend {
    /// Its address.
    pub address: SocketAddr,
    /// Its process id (process provider); `null` for a command provider's backends.
    #[serde(deserialize_with = "Option::deserialize")]
    pub pid: Option<u32>,
}

/// The body of every error answer (4xx, 5xx): `{"error": ..., "field": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, one line.
    pub error: String,
    /// The request field (body or query) at fault, when one is; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl From<pool::PoolStatus> for PoolStatus {
    fn from(status: pool::PoolStatus) -> Self {
        PoolStatus {
            name: status.name,
            algorithm: status.algorithm.to_string(),
            backends: status.backends.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<pool::BackendStatus> for BackendStatus {
    fn from(status: pool::BackendStatus) -> Self {
        BackendStatus {
            address: status.address,
            weight: status.weight,
            effective_weight: status.effective_weight,
            slow_start_percent: status.slow_start_percent,
            state: status.state.to_string(),
            health: status.health.to_string(),
            ejected: status.ejected,
            available: status.available,
            agent_percent: status.agent_percent,
            agent_cpu_percent: status.agent_cpu_percent,
            agent_state: status.agent_state.to_string(),
            backed_off: status.backed_off,
            in_flight: status.in_flight,
            pending: status.pending,
            requests: status.requests,
            failures: status.failures,
            removing: status.removing,
            latency_ms: status.latency_ms,
        }
    }
}

impl From<server::ReloadReport> for ReloadReport {
    fn from(report: server::ReloadReport) -> Self {
        ReloadReport {
            listeners_added: report.listeners_added,
            listeners_removed: report.listeners_removed,
            listeners_changed: report.listeners_changed,
            pools_added: report.pools_added,
            pools_updated: report.pools_updated,
            pools_removed: report.pools_removed,
        }
    }
}

impl From<events::Event> for Event {
    fn from(event: events::Event) -> Self {
        Event {
            id: event.id,
            at_ms: event.at_ms,
            kind: event.kind.to_string(),
            pool: event.pool,
            backend: event.backend,
            message: event.message,
        }
    }
}

impl From<autoscale::AutoscaleStatus> for AutoscaleStatus {
    fn from(status: autoscale::AutoscaleStatus) -> Self {
        AutoscaleStatus {
            pool: status.pool,
            metric: status.metric.to_string(),
            target: status.target,
            min: status.min,
            max: status.max,
            backends: status.backends,
            desired: status.desired,
            load_per_backend: status.load_per_backend,
            managed: status.managed.into_iter().map(Into::into).collect(),
            scale_ups: status.scale_ups,
            scale_downs: status.scale_downs,
            failures: status.failures,
            replacements: status.replacements,
        }
    }
}

impl From<autoscale::ManagedBackend> for ManagedBackend {
    fn from(managed: autoscale::ManagedBackend) -> Self {
        ManagedBackend {
            address: managed.address,
            pid: managed.pid,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;
    use serde_json::json;

    use super::*;

    /// Serializes `value`, checks the JSON is `expected`, and decodes it back to `value`.
    fn round_trip<T>(value: T, expected: serde_json::Value)
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let text = serde_json::to_string(&value).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json, expected, "{text}");
        let back: T = serde_json::from_str(&text).unwrap();
        assert_eq!(back, value, "{text}");
    }

    fn backend_status() -> pool::BackendStatus {
        pool::BackendStatus {
            address: "127.0.0.1:8001".to_string(),
            weight: 2,
            effective_weight: 1,
            slow_start_percent: 50,
            state: "active",
            health: "up",
            ejected: false,
            available: true,
            agent_percent: 100,
            agent_cpu_percent: Some(40),
            agent_state: "up",
            backed_off: false,
            in_flight: 3,
            pending: 1,
            requests: 120,
            failures: 4,
            removing: false,
            latency_ms: Some(1.5),
        }
    }

    fn backend_json() -> serde_json::Value {
        json!({
            "address": "127.0.0.1:8001", "weight": 2, "effective_weight": 1,
            "slow_start_percent": 50, "state": "active", "health": "up", "ejected": false,
            "available": true, "agent_percent": 100, "agent_cpu_percent": 40,
            "agent_state": "up", "backed_off": false, "in_flight": 3, "pending": 1,
            "requests": 120, "failures": 4, "removing": false, "latency_ms": 1.5
        })
    }

    #[test]
    fn pool_status_round_trips_with_one_latency_field() {
        let status = pool::PoolStatus {
            name: "app".to_string(),
            algorithm: "peak_ewma",
            backends: vec![
                backend_status(),
                pool::BackendStatus {
                    agent_cpu_percent: None,
                    latency_ms: None,
                    removing: true,
                    ..backend_status()
                },
            ],
        };
        let mut unmeasured = backend_json();
        unmeasured["agent_cpu_percent"] = json!(null);
        unmeasured["latency_ms"] = json!(null);
        unmeasured["removing"] = json!(true);
        let expected = json!({
            "name": "app", "algorithm": "peak_ewma", "backends": [backend_json(), unmeasured]
        });
        round_trip(PoolStatus::from(status.clone()), expected.clone());
        round_trip(vec![PoolStatus::from(status)], json!([expected]));
    }

    #[test]
    fn backend_status_round_trips() {
        round_trip(BackendStatus::from(backend_status()), backend_json());
    }

    #[test]
    fn requests_and_their_answers_round_trip() {
        round_trip(
            AddBackend {
                address: "127.0.0.1:9".to_string(),
                weight: 3,
            },
            json!({"address": "127.0.0.1:9", "weight": 3}),
        );
        let add: AddBackend = serde_json::from_str(r#"{"address": "127.0.0.1:9"}"#).unwrap();
        assert_eq!(add.weight, 1, "weight defaults to 1");
        round_trip(
            BackendAdded {
                added: "127.0.0.1:9".to_string(),
                weight: 3,
            },
            json!({"added": "127.0.0.1:9", "weight": 3}),
        );
        round_trip(
            UpdateBackend {
                weight: Some(0),
                state: None,
            },
            json!({"weight": 0}),
        );
        round_trip(
            UpdateBackend {
                weight: None,
                state: Some(AdminState::Draining),
            },
            json!({"state": "draining"}),
        );
        let drain: UpdateBackend = serde_json::from_str(r#"{"state": "drain"}"#).unwrap();
        assert_eq!(drain.state, Some(AdminState::Draining));
        round_trip(
            BackendUpdated {
                updated: "127.0.0.1:9".to_string(),
            },
            json!({"updated": "127.0.0.1:9"}),
        );
        round_trip(RemoveQuery { now: true }, json!({"now": true}));
        round_trip(
            BackendRemoved {
                removed: "127.0.0.1:9".to_string(),
                drained: true,
            },
            json!({"removed": "127.0.0.1:9", "drained": true}),
        );
        round_trip(EventsQuery { limit: Some(5) }, json!({"limit": 5}));
    }

    #[test]
    fn request_bodies_refuse_unknown_fields() {
        let error = serde_json::from_str::<AddBackend>(r#"{"address": "x", "wieght": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `wieght`"), "{error}");
        let error = serde_json::from_str::<UpdateBackend>(r#"{"weigth": 2}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("unknown field `weigth`"), "{error}");
    }

    #[test]
    fn reload_report_round_trips() {
        let report = server::ReloadReport {
            listeners_added: vec!["web".to_string()],
            listeners_removed: vec![],
            listeners_changed: vec!["tcp".to_string()],
            pools_added: vec![],
            pools_updated: vec!["app".to_string()],
            pools_removed: vec!["old".to_string()],
            restart_required: vec![],
        };
        round_trip(
            Reloaded {
                reloaded: true,
                changes: report.into(),
            },
            json!({"reloaded": true, "changes": {
                "listeners_added": ["web"], "listeners_removed": [],
                "listeners_changed": ["tcp"], "pools_added": [],
                "pools_updated": ["app"], "pools_removed": ["old"]
            }}),
        );
    }

    #[test]
    fn events_round_trip() {
        let events = vec![
            events::Event {
                id: 1,
                at_ms: 1_700_000_000_123,
                kind: "reload",
                pool: None,
                backend: None,
                message: "reload applied: no changes".to_string(),
            },
            events::Event {
                id: 2,
                at_ms: 1_700_000_000_456,
                kind: "backend_added",
                pool: Some("app".to_string()),
                backend: Some("127.0.0.1:9".to_string()),
                message: "added".to_string(),
            },
        ];
        round_trip(
            events.into_iter().map(Event::from).collect::<Vec<_>>(),
            json!([
                {"id": 1, "at_ms": 1_700_000_000_123_u64, "kind": "reload", "pool": null,
                 "backend": null, "message": "reload applied: no changes"},
                {"id": 2, "at_ms": 1_700_000_000_456_u64, "kind": "backend_added",
                 "pool": "app", "backend": "127.0.0.1:9", "message": "added"}
            ]),
        );
    }

    #[test]
    fn autoscale_status_round_trips() {
        let status = autoscale::AutoscaleStatus {
            pool: "app".to_string(),
            metric: "inflight_per_backend",
            target: 4.0,
            min: 1,
            max: 3,
            backends: 2,
            desired: 2,
            load_per_backend: 3.5,
            managed: vec![
                autoscale::ManagedBackend {
                    address: "127.0.0.1:9001".parse().unwrap(),
                    pid: Some(42),
                },
                autoscale::ManagedBackend {
                    address: "[::1]:9002".parse().unwrap(),
                    pid: None,
                },
            ],
            scale_ups: 1,
            scale_downs: 0,
            failures: 2,
            replacements: 0,
        };
        round_trip(
            vec![AutoscaleStatus::from(status)],
            json!([{
                "pool": "app", "metric": "inflight_per_backend", "target": 4.0, "min": 1,
                "max": 3, "backends": 2, "desired": 2, "load_per_backend": 3.5,
                "managed": [{"address": "127.0.0.1:9001", "pid": 42},
                            {"address": "[::1]:9002", "pid": null}],
                "scale_ups": 1, "scale_downs": 0, "failures": 2, "replacements": 0
            }]),
        );
    }

    #[test]
    fn error_body_round_trips_with_and_without_field() {
        round_trip(
            ErrorBody {
                error: "invalid request body: unknown field `wieght`".to_string(),
                field: Some("wieght".to_string()),
            },
            json!({"error": "invalid request body: unknown field `wieght`", "field": "wieght"}),
        );
        round_trip(
            ErrorBody {
                error: "no pool named `x`".to_string(),
                field: None,
            },
            json!({"error": "no pool named `x`"}),
        );
    }

    /// A `null`able field still has to be there: missing is an error, not `None`.
    #[test]
    fn answers_missing_a_field_are_refused() {
        for field in ["requests", "latency_ms", "agent_cpu_percent", "state"] {
            let mut json = backend_json();
            json.as_object_mut().unwrap().remove(field);
            let error = serde_json::from_value::<BackendStatus>(json)
                .unwrap_err()
                .to_string();
            assert_eq!(error, format!("missing field `{field}`"));
        }
        let error = serde_json::from_str::<ManagedBackend>(r#"{"address": "127.0.0.1:1"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("missing field `pid`"), "{error}");
        let error = serde_json::from_str::<Event>(
            r#"{"id": 1, "at_ms": 2, "kind": "reload", "backend": null, "message": ""}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(error.starts_with("missing field `pool`"), "{error}");
    }

    /// Fields a newer server adds do not break an older ctl.
    #[test]
    fn answers_with_more_fields_are_read() {
        let mut json = backend_json();
        json["something_new"] = json!(7);
        assert_eq!(
            serde_json::from_value::<BackendStatus>(json).unwrap(),
            BackendStatus::from(backend_status())
        );
    }
}
