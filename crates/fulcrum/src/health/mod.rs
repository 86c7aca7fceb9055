//! Health: active checks (TCP, HTTP) run on the control plane, one task per backend, and flip
//! lock-free state on the backend that the balancer reads. Passive ejection lives with the
//! backend's state (`pool::backend`) because it is fed by the data path; agent polling is in
//! [`agent`].

pub mod active;
pub mod agent;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fulcrum_balance::splitmix64;

use crate::pool::Backend;
use crate::runtime::clock::now_ns;
use crate::runtime::events::EventLog;

pub use active::{ActiveCheck, CheckError};
pub use agent::run_agent;

/// A check that answers whether one backend is fit to serve.
pub trait HealthCheck {
    /// Runs the check once against `address`.
    fn check(
        &self,
        address: SocketAddr,
    ) -> impl std::future::Future<Output = Result<(), CheckError>> + Send;
}

/// The interval with ±10% jitter, so checks of many backends and pools do not align.
pub fn jittered(interval: Duration) -> Duration {
    let spread = interval.as_nanos() as u64 / 5;
    if spread == 0 {
        return interval;
    }
    let offset = splitmix64(now_ns()) % spread;
    interval - Duration::from_nanos(spread / 2) + Duration::from_nanos(offset)
}

/// Rise/fall bookkeeping of one backend's active checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RiseFall {
    successes: u32,
    failures: u32,
}

/// What a check result changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// The backend went up.
    Up,
    /// The backend went down.
    Down,
}

impl RiseFall {
    /// Fresh counters.
    pub fn new() -> Self {
        RiseFall {
            successes: 0,
            failures: 0,
        }
    }

    /// Feeds one result; `healthy` is the current state; returns the transition to make.
    pub fn feed(&mut self, ok: bool, healthy: bool, rise: u32, fall: u32) -> Transition {
        if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            if !healthy && self.successes >= rise.max(1) {
                return Transition::Up;
            }
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            if healthy && self.failures >= fall.max(1) {
                return Transition::Down;
            }
        }
        Transition::None
    }
}

impl Default for RiseFall {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `check` against `backend` every `interval` (jittered) until the task is aborted,
/// flipping its health with rise/fall and recording every change. A backend that starts
/// down needs `initial_rise` successes to come up the first time (1 for new backends, so
/// they join quickly once they answer).
#[allow(clippy::too_many_arguments)]
pub async fn run_checks<C: HealthCheck>(
    check: C,
    backend: Backend,
    pool: String,
    events: Arc<EventLog>,
    interval: Duration,
    rise: u32,
    fall: u32,
    initial_rise: u32,
) {
    let mut counters = RiseFall::new();
    let mut first_rise = !backend.is_healthy();
    loop {
        let result = check.check(backend.address).await;
        let healthy = backend.is_healthy();
        let needed_rise = if first_rise { initial_rise } else { rise };
        match counters.feed(result.is_ok(), healthy, needed_rise, fall) {
            Transition::Up => {
                first_rise = false;
                backend.clear_failures();
                backend.set_healthy(true);
                events.record(
                    "health_up",
                    Some(&pool),
                    Some(&backend.id),
                    format!("backend {} is up: health check passed", backend.id),
                );
            }
            Transition::Down => {
                backend.set_healthy(false);
                let reason = result.err().map(|e| e.to_string()).unwrap_or_default();
                events.record(
                    "health_down",
                    Some(&pool),
                    Some(&backend.id),
                    format!("backend {} is down: {reason}", backend.id),
                );
            }
            Transition::None => {
                if let Err(error) = &result {
                    tracing::debug!(pool = %pool, backend = %backend.id, %error, "health check failed");
                }
            }
        }
        tokio::time::sleep(jittered(interval)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rise_and_fall_need_consecutive_results() {
        let mut rf = RiseFall::new();
        assert_eq!(rf.feed(false, true, 2, 3), Transition::None);
        assert_eq!(rf.feed(false, true, 2, 3), Transition::None);
        assert_eq!(rf.feed(true, true, 2, 3), Transition::None);
        assert_eq!(rf.feed(false, true, 2, 3), Transition::None);
        assert_eq!(rf.feed(false, true, 2, 3), Transition::None);
        assert_eq!(rf.feed(false, true, 2, 3), Transition::Down);
        assert_eq!(rf.feed(true, false, 2, 3), Transition::None);
        assert_eq!(rf.feed(true, false, 2, 3), Transition::Up);
    }

    #[test]
    fn zero_rise_or_fall_act_as_one() {
        let mut rf = RiseFall::new();
        assert_eq!(rf.feed(false, true, 0, 0), Transition::Down);
        assert_eq!(rf.feed(true, false, 0, 0), Transition::Up);
    }

    #[test]
    fn jitter_stays_within_ten_percent() {
        for _ in 0..100 {
            let d = jittered(Duration::from_millis(1000));
            assert!(
                d >= Duration::from_millis(900) && d <= Duration::from_millis(1100),
                "{d:?}"
            );
        }
    }
}
