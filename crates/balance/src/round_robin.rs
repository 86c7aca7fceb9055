//! Smooth weighted round robin, as nginx does it, made lock-free.
//!
//! nginx keeps a `current_weight` per backend and updates all of them under a lock on every
//! pick. The sequence that procedure produces depends only on the weights, so Fulcrum runs it
//! once when the pool changes and stores the resulting schedule; a pick is then one atomic
//! increment and an index. The schedule interleaves backends smoothly (weights 5,1,1 give
//! `a a b a c a a`, not `a a a a a b c`).

use std::sync::atomic::{AtomicUsize, Ordering};

use crate::{Balancer, Candidate, PickContext};

/// Longest schedule kept. Weights whose sum exceeds it are scaled down proportionally
/// (ratios stay within 1 / MAX_SCHEDULE of exact), bounding memory and rebuild time.
const MAX_SCHEDULE: u64 = 1 << 16;

/// Smooth weighted round robin over a precomputed schedule.
#[derive(Debug)]
pub struct RoundRobin {
    schedule: Vec<u32>,
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// Builds the schedule for backends with these weights (zero-weight backends never appear).
    pub fn new(weights: &[u32]) -> Self {
        RoundRobin {
            schedule: smooth_schedule(weights),
            cursor: AtomicUsize::new(0),
        }
    }

    /// The precomputed order of backend indexes, one cycle long.
    pub fn schedule(&self) -> &[u32] {
        &self.schedule
    }
}

/// Runs nginx's smooth weighted round robin for one full cycle and returns the picks.
/// Weights are divided by their greatest common divisor first (100, 100, 200 → 1, 1, 2): the
/// sequence is the same, one cycle is shorter and the build is cheaper.
fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let divisor = weights.iter().fold(0u32, |g, &w| gcd(g, w)).max(1);
    let weights: Vec<u32> = weights.iter().map(|&w| w / divisor).collect();
    let weights = &weights[..];
    let total: u64 = weights.iter().map(|&w| u64::from(w)).sum();
    if total == 0 {
        return Vec::new();
    }
    let scaled: Vec<i64> = if total > MAX_SCHEDULE {
        weights
            .iter()
            .map(|&w| {
                if w == 0 {
                    0
                } else {
                    ((u64::from(w) * MAX_SCHEDULE / total).max(1)) as i64
                }
            })
            .collect()
    } else {
        weights.iter().map(|&w| i64::from(w)).collect()
    };
    let cycle: i64 = scaled.iter().sum();
    let mut current = vec![0i64; scaled.len()];
    let mut schedule = Vec::with_capacity(cycle as usize);
    for _ in 0..cycle {
        let mut best = usize::MAX;
        for (i, w) in scaled.iter().enumerate() {
            if *w == 0 {
                continue;
            }
            current[i] += w;
            if best == usize::MAX || current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= cycle;
        schedule.push(best as u32);
    }
    schedule
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Balancer for RoundRobin {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        let len = self.schedule.len();
        if len == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        // Walk forward from our slot until a usable backend turns up; a full cycle without one
        // means none is usable.
        for step in 0..len {
            let index = self.schedule[(start + step) % len] as usize;
            if let Some(candidate) = backends.get(index) {
                if ctx.usable(index, candidate) {
                    return Some(index);
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticCandidate;

    fn counts(weights: &[u32], picks: usize) -> Vec<usize> {
        let rr = RoundRobin::new(weights);
        let backends: Vec<_> = weights.iter().map(|&w| StaticCandidate::new(w)).collect();
        let mut counts = vec![0; weights.len()];
        for _ in 0..picks {
            counts[rr.pick(&backends, &PickContext::with_random(0)).unwrap()] += 1;
        }
        counts
    }

    #[test]
    fn matches_nginx_sequence() {
        // nginx's documented example: weights 5, 1, 1 give a a b a c a a.
        assert_eq!(
            RoundRobin::new(&[5, 1, 1]).schedule(),
            &[0, 0, 1, 0, 2, 0, 0]
        );
    }

    #[test]
    fn honours_weights_exactly_per_cycle() {
        assert_eq!(counts(&[2, 1, 1], 4000), vec![2000, 1000, 1000]);
        assert_eq!(counts(&[1, 1, 1], 3000), vec![1000, 1000, 1000]);
    }

    #[test]
    fn zero_weight_gets_nothing() {
        assert_eq!(counts(&[0, 3], 30), vec![0, 30]);
        assert!(RoundRobin::new(&[0, 0]).schedule().is_empty());
    }

    #[test]
    fn skips_ineligible_and_excluded() {
        let rr = RoundRobin::new(&[1, 1, 1]);
        let mut backends = vec![StaticCandidate::new(1); 3];
        backends[1].eligible = false;
        let ctx = PickContext {
            excluded: &[0],
            ..PickContext::with_random(0)
        };
        for _ in 0..10 {
            assert_eq!(rr.pick(&backends, &ctx), Some(2));
        }
        backends[2].eligible = false;
        assert_eq!(rr.pick(&backends, &ctx), None);
    }

    #[test]
    fn common_factors_do_not_lengthen_the_cycle() {
        assert_eq!(
            RoundRobin::new(&[500, 100, 100]).schedule(),
            &[0, 0, 1, 0, 2, 0, 0]
        );
        assert_eq!(RoundRobin::new(&[0, 300]).schedule(), &[1]);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let rr = RoundRobin::new(&[u32::MAX, u32::MAX / 2, 1]);
        assert!(rr.schedule().len() as u64 <= MAX_SCHEDULE + 3);
        assert!(rr.schedule().contains(&2));
    }
}
