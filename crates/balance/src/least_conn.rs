//! Weighted least connections: the backend with the fewest in-flight requests per unit of
//! weight wins. Ties are broken from a random starting point so equal backends share evenly.

use crate::{bounded, Balancer, Candidate, PickContext};

/// Weighted least connections (stateless: it reads live in-flight counts).
#[derive(Debug, Default, Clone, Copy)]
pub struct LeastConn;

/// Whether `a` (in-flight, weight) is strictly less loaded than `b`:
/// (a.in_flight + 1) / a.weight < (b.in_flight + 1) / b.weight, compared without division.
#[inline]
pub(crate) fn less_loaded(
    a_in_flight: u32,
    a_weight: u32,
    b_in_flight: u32,
    b_weight: u32,
) -> bool {
    (u64::from(a_in_flight) + 1) * u64::from(b_weight)
        < (u64::from(b_in_flight) + 1) * u64::from(a_weight)
}

impl Balancer for LeastConn {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        let start = bounded(ctx.random, n);
        let mut best: Option<(usize, u32, u32)> = None;
        // From a random start to the end, then from the beginning (no division per step).
        for index in (start..n).chain(0..start) {
            let candidate = &backends[index];
            if !ctx.usable(index, candidate) {
                continue;
            }
            let (in_flight, weight) = (candidate.in_flight(), candidate.weight());
            match best {
                Some((_, best_in_flight, best_weight))
                    if !less_loaded(in_flight, weight, best_in_flight, best_weight) => {}
                _ => best = Some((index, in_flight, weight)),
            }
        }
        best.map(|(index, _, _)| index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{splitmix64, StaticCandidate};

    #[test]
    fn picks_fewest_in_flight_per_weight() {
        let mut backends = vec![StaticCandidate::new(1); 3];
        backends[0].in_flight = 5;
        backends[1].in_flight = 2;
        backends[2].in_flight = 3;
        assert_eq!(
            LeastConn.pick(&backends, &PickContext::with_random(7)),
            Some(1)
        );
        // Weight 4 with 9 in flight: (9+1)/4 = 2.5 < (2+1)/1 = 3.
        backends[0].weight = 4;
        backends[0].in_flight = 9;
        assert_eq!(
            LeastConn.pick(&backends, &PickContext::with_random(7)),
            Some(0)
        );
    }

    #[test]
    fn ties_spread_over_all() {
        let backends = vec![StaticCandidate::new(1); 4];
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[LeastConn
                .pick(&backends, &PickContext::with_random(splitmix64(i)))
                .unwrap()] += 1;
        }
        assert!(seen.iter().all(|&c| c > 50), "{seen:?}");
    }

    #[test]
    fn none_when_nothing_usable() {
        let mut backends = vec![StaticCandidate::new(1); 2];
        backends[0].eligible = false;
        let ctx = PickContext {
            excluded: &[1],
            ..PickContext::with_random(1)
        };
        assert_eq!(LeastConn.pick(&backends, &ctx), None);
        assert_eq!(LeastConn.pick::<StaticCandidate>(&[], &ctx), None);
    }
}
