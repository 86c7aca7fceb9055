//! `[pools.NAME.health]`, `[pools.NAME.passive]`, `[pools.NAME.agent]` and
//! `[pools.NAME.retry_budget]`: how a pool decides which backends may take traffic, and how
//! much it may retry.

use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::ConfigDuration;

/// Which active check to run.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HealthKind {
    /// A TCP connect succeeds.
    Tcp,
    /// An HTTP GET answers with an expected status (and body).
    Http,
}

/// An inclusive range of HTTP status codes, written "200-399" or "200".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusRange {
    /// Lowest accepted status.
    pub low: u16,
    /// Highest accepted status.
    pub high: u16,
}

impl StatusRange {
    /// Whether `status` is in the range.
    pub fn contains(&self, status: u16) -> bool {
        (self.low..=self.high).contains(&status)
    }
}

impl<'de> Deserialize<'de> for StatusRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        let parse = |s: &str| {
            s.trim()
                .parse::<u16>()
                .ok()
                .filter(|n| (100..=599).contains(n))
        };
        let range = match text.split_once('-') {
            Some((low, high)) => parse(low).zip(parse(high)),
            None => parse(&text).map(|n| (n, n)),
        };
        match range {
            Some((low, high)) if low <= high => Ok(StatusRange { low, high }),
            _ => Err(de::Error::custom(format!(
                "invalid status range \"{text}\": expected \"200\" or \"200-399\" (codes 100-599)"
            ))),
        }
    }
}

/// `[pools.NAME.health]`: active checks.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// tcp or http.
    pub kind: HealthKind,
    /// Path of the HTTP check.
    pub path: String,
    /// Statuses that count as healthy.
    pub expect_status: StatusRange,
    /// A substring the body must contain, if set.
    pub expect_body: Option<String>,
    /// Host header of the HTTP check (default: the backend address).
    pub host: Option<String>,
    /// Time between checks of one backend.
    pub interval: ConfigDuration,
    /// A check slower than this fails.
    pub timeout: ConfigDuration,
    /// Consecutive successes to mark a down backend up.
    pub rise: u32,
    /// Consecutive failures to mark an up backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            kind: HealthKind::Http,
            path: "/healthz".to_string(),
            expect_status: StatusRange {
                low: 200,
                high: 399,
            },
            expect_body: None,
            host: None,
            interval: ConfigDuration(Duration::from_secs(2)),
            timeout: ConfigDuration(Duration::from_secs(1)),
            rise: 2,
            fall: 3,
        }
    }
}

/// `[pools.NAME.passive]`: outlier detection from real traffic (on by default).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PassiveConfig {
    /// Off switch.
    pub enabled: bool,
    /// Consecutive failures (connect errors, resets, 5xx answers) that eject a backend.
    pub consecutive_failures: u32,
    /// Base ejection time; the n-th ejection in a row lasts n × this (capped).
    pub ejection_time: ConfigDuration,
    /// Longest single ejection.
    pub max_ejection_time: ConfigDuration,
    /// Never eject more than this share of the pool (percent), except that one backend may
    /// always be ejected when this is above 0 (as Envoy), so small pools still eject.
    pub max_ejected_percent: u8,
}

impl Default for PassiveConfig {
    fn default() -> Self {
        PassiveConfig {
            enabled: true,
            consecutive_failures: 5,
            ejection_time: ConfigDuration(Duration::from_secs(10)),
            max_ejection_time: ConfigDuration(Duration::from_secs(300)),
            max_ejected_percent: 10,
        }
    }
}

/// `[pools.NAME.agent]`: poll an agent (HAProxy agent-check protocol) on each backend host.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentCheckConfig {
    /// TCP port of the agent on the backend's IP.
    pub port: u16,
    /// Time between polls.
    #[serde(default = "default_agent_interval")]
    pub interval: ConfigDuration,
    /// A poll slower than this fails (the last good reply stays in force).
    #[serde(default = "default_agent_timeout")]
    pub timeout: ConfigDuration,
}

fn default_agent_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn default_agent_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}

/// `[pools.NAME.retry_budget]`: retries of requests that reached a backend are limited to
/// `percent` of requests plus `min_per_second`, so retries cannot snowball into a storm.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryBudgetConfig {
    /// Retries allowed as a percentage of requests.
    pub percent: u32,
    /// Retries always allowed per second, whatever the request rate.
    pub min_per_second: u32,
}

impl Default for RetryBudgetConfig {
    fn default() -> Self {
        RetryBudgetConfig {
            percent: 20,
            min_per_second: 3,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrapper {
        range: StatusRange,
    }

    fn range(text: &str) -> Result<StatusRange, toml::de::Error> {
        toml::from_str::<Wrapper>(&format!("range = \"{text}\"")).map(|w| w.range)
    }

    #[test]
    fn status_ranges_parse() {
        assert_eq!(
            range("200-399").unwrap(),
            StatusRange {
                low: 200,
                high: 399
            }
        );
        assert_eq!(
            range("204").unwrap(),
            StatusRange {
                low: 204,
                high: 204
            }
        );
        assert!(range("399-200").is_err());
        assert!(range("2xx").is_err());
        assert!(range("99").is_err());
        assert!(range("200-399").unwrap().contains(301));
    }
}
