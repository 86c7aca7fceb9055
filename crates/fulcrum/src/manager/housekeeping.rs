//! The pool manager's 250 ms tick: drained and timed-out backends leave, the retry budget's
//! window moves on, slow start advances (and selectors are rebuilt when weights moved), and
//! once a second idle upstream connections are swept.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use super::PoolManager;
use crate::pool::Backend;
use crate::runtime::clock::now_ns;

/// How often the manager looks at draining backends and changed effective weights, and
/// refills the retry budget.
pub(super) const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);

/// Idle upstream connections are checked every this many housekeeping ticks...
const SWEEP_IDLE_EVERY_TICKS: u32 = 4;
/// ...that is every second; a connection used within the last second is not polled.
const SWEEP_IDLE_INTERVAL: Duration = HOUSEKEEPING_INTERVAL.saturating_mul(SWEEP_IDLE_EVERY_TICKS);

/// The retry budget counts requests and retries over this many housekeeping ticks (10 s).
const RETRY_WINDOW_TICKS: usize = 40;

/// A removed backend finishing its in-flight requests.
#[derive(Debug)]
pub(super) struct Retiring {
    pub(super) backend: Backend,
    /// When it is dropped even with requests still in flight (the pool's drain timeout).
    pub(super) deadline: Instant,
}

/// The retry budget's window: (requests, retries) totals at each of the last ticks, oldest
/// first.
#[derive(Debug)]
pub(super) struct RetryWindow(VecDeque<(u64, u64)>);

impl Default for RetryWindow {
    fn default() -> Self {
        RetryWindow(VecDeque::with_capacity(RETRY_WINDOW_TICKS + 1))
    }
}

impl RetryWindow {
    /// Records this tick's totals; returns the totals at the window's start.
    fn slide(&mut self, requests: u64, retries: u64) -> (u64, u64) {
        self.0.push_back((requests, retries));
        if self.0.len() > RETRY_WINDOW_TICKS {
            self.0.pop_front();
        }
        self.0.front().copied().unwrap_or((requests, retries))
    }
}

impl PoolManager {
    /// One housekeeping tick.
    pub(super) fn housekeeping(&mut self) {
        // Connections parked on this thread since: return their freed buffers to the OS.
        crate::runtime::memory::collect_if_parked();
        self.refill_retry_budget();
        self.ticks = self.ticks.wrapping_add(1);
        if self.ticks.is_multiple_of(u64::from(SWEEP_IDLE_EVERY_TICKS)) {
            self.sweep_idle();
        }
        let before = self.retiring.len();
        self.drop_drained(Instant::now());
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
        let (old_requests, old_retries) = self.retry_window.slide(requests, retries);
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

    /// Idle upstream connections of every backend (draining ones too): closed past the idle
    /// timeout, polled when idle for a second so those the backend closed are dropped.
    fn sweep_idle(&mut self) {
        self.sweeps += 1;
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

    /// Drops the draining backends that finished their requests, and those past their
    /// deadline at `now` with requests still in flight.
    fn drop_drained(&mut self, now: Instant) {
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
    }
}

#[cfg(test)]
mod tests {
    //! Time-driven: the manager's real loop on tokio's paused clock (time jumps to the next
    //! timer whenever every task waits).

    use super::*;
    use crate::manager::test_support::{pool_config, Running, A};

    #[tokio::test(start_paused = true)]
    async fn a_draining_backend_is_dropped_at_the_drain_timeout_and_not_before() {
        let running = Running::start(&pool_config("drain_timeout = \"5s\""));
        let _request = running.member(A).start_request();
        running.handle.remove(A, false).await.unwrap();
        assert_eq!(running.retiring(), vec![A]);
        tokio::time::sleep(Duration::from_millis(4_900)).await;
        assert_eq!(
            running.retiring(),
            vec![A],
            "dropped before the drain timeout"
        );
        assert!(!running.recorded("removed at drain timeout"));
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(
            running.retiring().is_empty(),
            "still draining after the timeout"
        );
        assert!(running.recorded("removed at drain timeout with 1 request(s) still in flight"));
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_draining_backend_leaves_at_the_tick_after_its_last_request() {
        let running = Running::start(&pool_config("drain_timeout = \"30s\""));
        let request = running.member(A).start_request();
        running.handle.remove(A, false).await.unwrap();
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(running.retiring(), vec![A]);
        drop(request);
        tokio::time::sleep(HOUSEKEEPING_INTERVAL + Duration::from_millis(10)).await;
        assert!(running.retiring().is_empty());
        assert!(running.recorded("drained and removed"));
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn the_retry_budget_refills_over_its_window() {
        // 1 retry a second over the 10 s window, none earned from requests.
        let running = Running::start(&pool_config(
            "[pools.app.retry_budget]\npercent = 0\nmin_per_second = 1",
        ));
        let pool = running.handle.pool.clone();
        // The first tick runs at once.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut spent = 0;
        while pool.try_retry() {
            spent += 1;
        }
        assert_eq!(spent, 10);
        // Still spent until those retries slide out of the window...
        tokio::time::sleep(Duration::from_millis(9_500)).await;
        assert!(!pool.try_retry(), "refilled before the window passed");
        // ...10 s after they were made.
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert!(pool.try_retry(), "not refilled after the window");
        running.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_are_swept_once_a_second() {
        let running = Running::start(&pool_config(""));
        tokio::time::sleep(Duration::from_millis(10_100)).await;
        let manager = running.stop().await;
        // Ticks at 0, 0.25 s, ... 10 s; a sweep every fourth.
        assert_eq!(manager.ticks, 41);
        assert_eq!(manager.sweeps, 10);
    }
}
