//! `[pools.NAME.autoscale]`: grow the pool under sustained load and shrink it when idle.

use std::time::Duration;

use serde::Deserialize;

use super::ConfigDuration;

/// What load the autoscaler steers by.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AutoscaleMetric {
    /// Requests in flight per available backend.
    InflightPerBackend,
    /// Requests per second per available backend.
    RpsPerBackend,
    /// CPU use (percent) reported by the backends' agents, averaged.
    Cpu,
}

/// How new backends are obtained.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AutoscaleProvider {
    /// Fulcrum starts local processes from `command`.
    Process,
    /// Fulcrum runs `scale_up` / `scale_down` commands (any platform).
    Command,
}

/// `[pools.NAME.autoscale]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleConfig {
    /// Fewest backends the autoscaler keeps (it starts some at once if the pool has fewer).
    #[serde(default = "default_min")]
    pub min: usize,
    /// Most backends the pool may have.
    pub max: usize,
    /// The load measure.
    pub metric: AutoscaleMetric,
    /// Wanted value of the metric per backend.
    pub target: f64,
    /// The smoothed load must stay above target this long before the pool grows.
    #[serde(default = "default_scale_up_after")]
    pub scale_up_after: ConfigDuration,
    /// The pool must be larger than needed this long before it shrinks.
    #[serde(default = "default_scale_down_after")]
    pub scale_down_after: ConfigDuration,
    /// No decision within this time after the previous one.
    #[serde(default = "default_cooldown")]
    pub cooldown: ConfigDuration,
    /// Backends added or removed per decision.
    #[serde(default = "default_step")]
    pub step: usize,
    /// How often the load is sampled.
    #[serde(default = "default_sample_every")]
    pub sample_every: ConfigDuration,
    /// Where backends come from.
    pub provider: AutoscaleProvider,
    /// `process`: the command line of one backend; `{port}` becomes a free port on
    /// 127.0.0.1 and `{name}` a unique name.
    #[serde(default)]
    pub command: Vec<String>,
    /// `command`: prints the new backend address(es), one "IP:PORT" per line.
    #[serde(default)]
    pub scale_up: Vec<String>,
    /// `command`: removes the backend `{address}`.
    #[serde(default)]
    pub scale_down: Vec<String>,
    /// A scale command running longer than this is killed and counted as failed.
    #[serde(default = "default_command_timeout")]
    pub command_timeout: ConfigDuration,
    /// A started backend must pass its health check within this time.
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: ConfigDuration,
    /// `process`: after SIGTERM, wait this long before SIGKILL.
    #[serde(default = "default_stop_grace")]
    pub stop_grace: ConfigDuration,
    /// Weight of new backends.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_min() -> usize {
    1
}
fn default_scale_up_after() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_scale_down_after() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_cooldown() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_step() -> usize {
    1
}
fn default_sample_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}
fn default_command_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(60))
}
fn default_ready_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}
fn default_stop_grace() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_weight() -> u32 {
    1
}

impl AutoscaleConfig {
    /// Checks the rules serde cannot express; returns what is wrong.
    pub fn problems(&self) -> Option<String> {
        if self.max == 0 || self.min > self.max {
            return Some(format!(
                "autoscale needs 0 <= min <= max and max >= 1 (min = {}, max = {})",
                self.min, self.max
            ));
        }
        if self.target.is_nan() || self.target <= 0.0 {
            return Some("autoscale target must be greater than 0".to_string());
        }
        if self.step == 0 {
            return Some("autoscale step must be at least 1".to_string());
        }
        match self.provider {
            AutoscaleProvider::Process if self.command.is_empty() => {
                Some("autoscale provider \"process\" needs `command`, e.g. [\"fulcrum\", \"backend\", \"--listen\", \"127.0.0.1:{port}\"]".to_string())
            }
            AutoscaleProvider::Command if self.scale_up.is_empty() || self.scale_down.is_empty() => {
                Some("autoscale provider \"command\" needs `scale_up` and `scale_down` commands".to_string())
            }
            _ => None,
        }
    }
}
