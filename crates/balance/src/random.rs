//! Weighted random: each backend is drawn with probability weight / total weight. Stateless
//! per pick (one binary search over prefix sums built with the pool), so it shares nothing
//! between cores and needs no coordination between balancer instances.

use crate::{splitmix64, Balancer, Candidate, PickContext};

/// Random draws tried before falling back to a scan when drawn backends are unusable.
const DRAWS: usize = 8;

/// Weighted random over the weights the pool was built with.
#[derive(Debug, Clone)]
pub struct WeightedRandom {
    /// Running sums of the weights: `cumulative[i]` = w0 + … + wi.
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    /// Built from the backends' effective weights (in snapshot order).
    pub fn new(weights: &[u32]) -> Self {
        let mut total = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                total += u64::from(w);
                total
            })
            .collect();
        WeightedRandom { cumulative }
    }

    fn total(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }

    /// The backend owning point `r` (0 ≤ r < total) of the weight line.
    #[inline]
    fn locate(&self, r: u64) -> usize {
        self.cumulative.partition_point(|&c| c <= r)
    }
}

impl Balancer for WeightedRandom {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        let total = self.total();
        let n = backends.len().min(self.cumulative.len());
        if total == 0 || n == 0 {
            return None;
        }
        let mut random = ctx.random;
        for _ in 0..DRAWS {
            let index = self.locate(bounded_u64(random, total));
            if index < n && ctx.usable(index, &backends[index]) {
                return Some(index);
            }
            random = splitmix64(random);
        }
        // Much of the weight is unusable: draw among what is left, by live weights.
        let live: u64 = (0..n)
            .filter(|&i| ctx.usable(i, &backends[i]))
            .map(|i| u64::from(backends[i].weight()))
            .sum();
        if live == 0 {
            return None;
        }
        let mut point = bounded_u64(random, live);
        for i in (0..n).filter(|&i| ctx.usable(i, &backends[i])) {
            let w = u64::from(backends[i].weight());
            if point < w {
                return Some(i);
            }
            point -= w;
        }
        None
    }
}

/// Maps a random `u64` uniformly onto `0..n` (`n` > 0).
#[inline]
fn bounded_u64(random: u64, n: u64) -> u64 {
    ((u128::from(random) * u128::from(n)) >> 64) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::StaticCandidate;

    fn counts(weights: &[u32], backends: &[StaticCandidate], picks: u64) -> Vec<usize> {
        let balancer = WeightedRandom::new(weights);
        let mut seen = vec![0; backends.len()];
        for i in 0..picks {
            if let Some(index) = balancer.pick(backends, &PickContext::with_random(splitmix64(i))) {
                seen[index] += 1;
            }
        }
        seen
    }

    #[test]
    fn follows_weights() {
        let weights = [3, 1, 0, 6];
        let backends: Vec<_> = weights.iter().map(|&w| StaticCandidate::new(w)).collect();
        let seen = counts(&weights, &backends, 100_000);
        assert_eq!(seen[2], 0);
        for (count, expected) in seen.iter().zip([30_000, 10_000, 0, 60_000]) {
            assert!(count.abs_diff(expected) < 1_000, "{seen:?}");
        }
    }

    #[test]
    fn skips_unusable_and_falls_back() {
        let weights = [1000, 1000, 1];
        let mut backends: Vec<_> = weights.iter().map(|&w| StaticCandidate::new(w)).collect();
        backends[0].eligible = false;
        backends[1].eligible = false;
        let seen = counts(&weights, &backends, 100);
        assert_eq!(seen, vec![0, 0, 100]);
        backends[2].eligible = false;
        assert_eq!(counts(&weights, &backends, 10), vec![0, 0, 0]);
        assert_eq!(counts(&[], &[], 10), Vec::<usize>::new());
    }
}
