//! When to grow or shrink a pool: pure logic over a smoothed load, no I/O.
//!
//! The load (total in-flight requests, or total requests per second, over the pool) is
//! smoothed with an exponential moving average whose time constant is a tenth of
//! `scale_up_after`, so sampling noise does not matter and a burst fades quickly; the wanted
//! size must then hold for the whole window, so a burst shorter than it adds nothing. The wanted size is
//! `ceil(smoothed / target)` clamped to `min..=max`. The pool grows only after the wanted size
//! has stayed above the current size for `scale_up_after`, shrinks only after it has stayed
//! below for `scale_down_after`, moves at most `step` backends per decision, and makes no
//! decision within `cooldown` of the previous one. Below `min` or above `max` (a crash, a
//! reload) it corrects at once.

use std::time::{Duration, Instant};

use crate::config::AutoscaleConfig;

/// Share of one backend's target that the load may exceed a whole number of backends by
/// without asking for another one.
const DEADBAND: f64 = 0.05;

/// The decision parameters (from `[pools.NAME.autoscale]`).
#[derive(Debug, Clone, PartialEq)]
pub struct DeciderSettings {
    /// Fewest backends.
    pub min: usize,
    /// Most backends.
    pub max: usize,
    /// Wanted load per backend.
    pub target: f64,
    /// How long the pool must be too small before it grows.
    pub scale_up_after: Duration,
    /// How long the pool must be too large before it shrinks.
    pub scale_down_after: Duration,
    /// Quiet time after a decision.
    pub cooldown: Duration,
    /// Most backends added or removed per decision.
    pub step: usize,
}

impl DeciderSettings {
    /// The settings of an autoscale config.
    pub fn from_config(config: &AutoscaleConfig) -> Self {
        DeciderSettings {
            min: config.min,
            max: config.max,
            target: config.target,
            scale_up_after: config.scale_up_after.0,
            scale_down_after: config.scale_down_after.0,
            cooldown: config.cooldown.0,
            step: config.step.max(1),
        }
    }
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep the pool as it is.
    Hold,
    /// Grow the pool to `to` backends.
    Grow {
        /// The new size.
        to: usize,
        /// Why, for the log and the event list.
        reason: String,
    },
    /// Shrink the pool to `to` backends.
    Shrink {
        /// The new size.
        to: usize,
        /// Why, for the log and the event list.
        reason: String,
    },
}

/// The decision state of one pool.
#[derive(Debug)]
pub struct Decider {
    settings: DeciderSettings,
    smoothed: Option<f64>,
    last_sample: Option<Instant>,
    too_small_since: Option<Instant>,
    too_large_since: Option<Instant>,
    last_decision: Option<Instant>,
}

impl Decider {
    /// A decider with nothing observed yet.
    pub fn new(settings: DeciderSettings) -> Self {
        Decider {
            settings,
            smoothed: None,
            last_sample: None,
            too_small_since: None,
            too_large_since: None,
            last_decision: None,
        }
    }

    /// Replaces the parameters (reload), keeping the smoothed load and timers.
    pub fn set_settings(&mut self, settings: DeciderSettings) {
        self.settings = settings;
    }

    /// The smoothed total load (0 before the first sample).
    pub fn smoothed_load(&self) -> f64 {
        self.smoothed.unwrap_or(0.0)
    }

    /// The pool size the smoothed load asks for, within `min..=max`. A load within 5% of a
    /// backend's target over a whole number of backends does not ask for one more (so a
    /// decaying average that never quite reaches zero still lets the pool shrink to `min`).
    pub fn desired(&self) -> usize {
        let s = &self.settings;
        let wanted = (self.smoothed_load() / s.target - DEADBAND).ceil().max(0.0);
        // `as` saturates on huge or NaN values, and the clamp bounds the rest.
        (wanted as usize).clamp(s.min, s.max.max(s.min))
    }

    /// Feeds one sample of the total `load` at `now`, with `current` backends in the pool,
    /// and says what to do.
    pub fn observe(&mut self, now: Instant, load: f64, current: usize) -> Decision {
        let load = if load.is_finite() { load.max(0.0) } else { 0.0 };
        self.smoothed = Some(match (self.smoothed, self.last_sample) {
            (Some(previous), Some(at)) => {
                let tau = (self.settings.scale_up_after / 10).max(Duration::from_millis(1));
                let alpha = 1.0 - (-(now - at).as_secs_f64() / tau.as_secs_f64()).exp();
                previous + alpha * (load - previous)
            }
            _ => load,
        });
        self.last_sample = Some(now);
        let s = self.settings.clone();
        let desired = self.desired();
        let per_backend = self.smoothed_load() / current.max(1) as f64;
        if current < s.min {
            return self.decide(
                now,
                Decision::Grow {
                    to: s.min,
                    reason: format!("{current} backend(s) is below min {}", s.min),
                },
            );
        }
        if current > s.max {
            return self.decide(
                now,
                Decision::Shrink {
                    to: s.max,
                    reason: format!("{current} backend(s) is above max {}", s.max),
                },
            );
        }
        let cooled = self
            .last_decision
            .is_none_or(|at| now.duration_since(at) >= s.cooldown);
        if desired > current {
            self.too_large_since = None;
            let since = *self.too_small_since.get_or_insert(now);
            if now.duration_since(since) >= s.scale_up_after && cooled {
                let to = desired.min(current + s.step);
                return self.decide(
                    now,
                    Decision::Grow {
                        to,
                        reason: format!(
                            "load {per_backend:.2} per backend above target {} for {:?} (smoothed total {:.2}, wants {desired})",
                            s.target,
                            now.duration_since(since),
                            self.smoothed_load()
                        ),
                    },
                );
            }
        } else if desired < current {
            self.too_small_since = None;
            let since = *self.too_large_since.get_or_insert(now);
            if now.duration_since(since) >= s.scale_down_after && cooled {
                let to = desired.max(current.saturating_sub(s.step));
                return self.decide(
                    now,
                    Decision::Shrink {
                        to,
                        reason: format!(
                            "load {per_backend:.2} per backend below target {} for {:?} (smoothed total {:.2}, wants {desired})",
                            s.target,
                            now.duration_since(since),
                            self.smoothed_load()
                        ),
                    },
                );
            }
        } else {
            self.too_small_since = None;
            self.too_large_since = None;
        }
        Decision::Hold
    }

    fn decide(&mut self, now: Instant, decision: Decision) -> Decision {
        self.last_decision = Some(now);
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> DeciderSettings {
        DeciderSettings {
            min: 1,
            max: 4,
            target: 4.0,
            scale_up_after: Duration::from_secs(3),
            scale_down_after: Duration::from_secs(6),
            cooldown: Duration::from_secs(1),
            step: 1,
        }
    }

    /// Feeds `load` every 100 ms for `seconds` and returns every non-hold decision with its
    /// time offset in ms; the pool size follows the decisions.
    fn run(
        decider: &mut Decider,
        start: Instant,
        from_ms: u64,
        seconds: u64,
        load: f64,
        size: &mut usize,
    ) -> Vec<(u64, Decision)> {
        let mut out = Vec::new();
        for step in 0..seconds * 10 {
            let at = from_ms + step * 100;
            let decision = decider.observe(start + Duration::from_millis(at), load, *size);
            match &decision {
                Decision::Grow { to, .. } | Decision::Shrink { to, .. } => {
                    *size = *to;
                    out.push((at, decision));
                }
                Decision::Hold => {}
            }
        }
        out
    }

    #[test]
    fn one_burst_adds_nothing() {
        let start = Instant::now();
        let mut decider = Decider::new(settings());
        let mut size = 1;
        assert!(run(&mut decider, start, 0, 5, 2.0, &mut size).is_empty());
        // A 1 s burst of 40 in flight: above target, but not for scale_up_after.
        assert!(run(&mut decider, start, 5_000, 1, 40.0, &mut size).is_empty());
        assert!(run(&mut decider, start, 6_000, 5, 2.0, &mut size).is_empty());
        assert_eq!(size, 1);
    }

    #[test]
    fn sustained_load_grows_step_by_step_up_to_max() {
        let start = Instant::now();
        let mut decider = Decider::new(settings());
        let mut size = 1;
        let decisions = run(&mut decider, start, 0, 20, 24.0, &mut size);
        assert_eq!(size, 4, "{decisions:?}");
        let times: Vec<u64> = decisions.iter().map(|(t, _)| *t).collect();
        // Not before scale_up_after; then one step per cooldown; never past max.
        assert!(times[0] >= 3_000, "{times:?}");
        assert!(times.windows(2).all(|w| w[1] - w[0] >= 1_000), "{times:?}");
        assert_eq!(decisions.len(), 3);
        assert!(
            matches!(&decisions[0].1, Decision::Grow { to: 2, reason } if reason.contains("above target"))
        );
    }

    #[test]
    fn idle_pool_shrinks_to_min_after_scale_down_after() {
        let start = Instant::now();
        let mut decider = Decider::new(settings());
        let mut size = 4;
        run(&mut decider, start, 0, 10, 16.0, &mut size);
        assert_eq!(size, 4);
        let decisions = run(&mut decider, start, 10_000, 20, 0.0, &mut size);
        assert_eq!(size, 1, "{decisions:?}");
        assert!(decisions[0].0 >= 16_000, "{decisions:?}");
        assert!(decisions
            .iter()
            .all(|(_, d)| matches!(d, Decision::Shrink { .. })));
    }

    #[test]
    fn below_min_and_above_max_are_corrected_at_once() {
        let start = Instant::now();
        let mut decider = Decider::new(settings());
        assert!(matches!(
            decider.observe(start, 0.0, 0),
            Decision::Grow { to: 1, .. }
        ));
        let mut decider = Decider::new(settings());
        assert!(matches!(
            decider.observe(start, 100.0, 6),
            Decision::Shrink { to: 4, .. }
        ));
    }

    #[test]
    fn step_bounds_each_decision_and_desired_is_clamped() {
        let start = Instant::now();
        let mut decider = Decider::new(DeciderSettings {
            step: 10,
            ..settings()
        });
        let mut size = 1;
        let decisions = run(&mut decider, start, 0, 5, 1000.0, &mut size);
        assert_eq!(decisions.len(), 1, "{decisions:?}");
        assert_eq!(size, 4);
        assert_eq!(decider.desired(), 4);
    }

    #[test]
    fn a_trickle_of_load_lets_the_pool_reach_zero() {
        let start = Instant::now();
        let mut decider = Decider::new(DeciderSettings {
            min: 0,
            ..settings()
        });
        decider.observe(start, 0.01, 1);
        assert_eq!(decider.desired(), 0);
        let mut decider = Decider::new(settings());
        decider.observe(start, 4.1, 1);
        assert_eq!(decider.desired(), 1, "within the deadband of one backend");
        let mut decider = Decider::new(settings());
        decider.observe(start, 4.4, 1);
        assert_eq!(decider.desired(), 2);
    }

    #[test]
    fn garbage_load_is_treated_as_zero() {
        let start = Instant::now();
        let mut decider = Decider::new(settings());
        decider.observe(start, f64::NAN, 1);
        decider.observe(start + Duration::from_millis(100), f64::INFINITY, 1);
        assert_eq!(decider.smoothed_load(), 0.0);
        assert_eq!(decider.desired(), 1);
    }
}
