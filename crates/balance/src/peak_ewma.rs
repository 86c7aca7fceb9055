//! Peak-EWMA power of two choices (Finagle's and Linkerd's default): draw two usable backends
//! and send the request to the cheaper one, where
//! cost = peak-EWMA latency × (pending + 1) / weight, where pending counts the requests sent
//! and not answered yet ([`Candidate::pending`]).
//!
//! A backend whose latency is unknown (new, or reset after recovering) costs 0 while it has
//! nothing in flight, so it is tried at once, and a prohibitive [`UNKNOWN_BUSY_COST`] while
//! its first request is outstanding, so a slow newcomer gets one request, not a pile of them.
//! Estimates decay without samples, so a backend that was slow is tried again later.

use crate::p2c::pick_two;
use crate::{bounded, Balancer, Candidate, PickContext};

/// Cost of a backend with unknown latency and requests in flight (Finagle's penalty).
pub const UNKNOWN_BUSY_COST: f64 = (u64::MAX >> 16) as f64;

/// Peak-EWMA power of two choices (stateless: latency lives in the candidates).
#[derive(Debug, Default, Clone, Copy)]
pub struct PeakEwmaP2c;

/// The cost of sending one more request to `candidate` at `now_ns`.
#[inline]
pub fn cost<C: Candidate>(candidate: &C, now_ns: u64) -> f64 {
    let (load, weight) = load_and_weight(candidate, now_ns);
    if weight == 0.0 {
        return f64::INFINITY;
    }
    load / weight
}

/// (latency × (pending + 1), weight): the cost as a fraction, so two costs compare by
/// cross-multiplication without dividing.
#[inline]
fn load_and_weight<C: Candidate>(candidate: &C, now_ns: u64) -> (f64, f64) {
    let weight = candidate.weight();
    if weight == 0 {
        return (1.0, 0.0);
    }
    let pending = candidate.pending();
    let latency = match (candidate.latency_ns(now_ns), pending) {
        (0, 0) => return (0.0, f64::from(weight)),
        (0, _) => UNKNOWN_BUSY_COST,
        (latency, _) => latency as f64,
    };
    (latency * (f64::from(pending) + 1.0), f64::from(weight))
}

/// Whether `b` is strictly cheaper than `a` at `now_ns`.
#[inline]
fn cheaper<C: Candidate>(b: &C, a: &C, now_ns: u64) -> bool {
    let (load_a, weight_a) = load_and_weight(a, now_ns);
    let (load_b, weight_b) = load_and_weight(b, now_ns);
    load_b * weight_a < load_a * weight_b
}

impl Balancer for PeakEwmaP2c {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        if backends.len() > 2 {
            let now = ctx.now_ns;
            if let Some(index) = pick_two(backends, ctx, |a, b| cheaper(b, a, now)) {
                return Some(index);
            }
        }
        cheapest(backends, ctx)
    }
}

/// The cheapest usable backend by a full scan from a random start (ties spread).
fn cheapest<C: Candidate>(backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
    let n = backends.len();
    if n == 0 {
        return None;
    }
    let start = bounded(ctx.random, n);
    let mut best: Option<(usize, f64)> = None;
    for step in 0..n {
        let index = (start + step) % n;
        if !ctx.usable(index, &backends[index]) {
            continue;
        }
        let c = cost(&backends[index], ctx.now_ns);
        if best.is_none_or(|(_, best_cost)| c < best_cost) {
            best = Some((index, c));
        }
    }
    best.map(|(index, _)| index)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{splitmix64, PeakEwma, StaticCandidate};

    /// A candidate with a real latency estimate.
    struct Timed {
        inner: StaticCandidate,
        /// Requests awaiting an answer; the in-flight count when `None`.
        pending: Option<u32>,
        latency: PeakEwma,
    }

    impl Timed {
        fn new(weight: u32, latency_ns: Option<u64>) -> Self {
            let latency = PeakEwma::default();
            if let Some(ns) = latency_ns {
                latency.observe(ns, 1);
            }
            Timed {
                inner: StaticCandidate::new(weight),
                pending: None,
                latency,
            }
        }
    }

    impl Candidate for Timed {
        fn weight(&self) -> u32 {
            self.inner.weight
        }
        fn in_flight(&self) -> u32 {
            self.inner.in_flight
        }
        fn pending(&self) -> u32 {
            self.pending.unwrap_or(self.inner.in_flight)
        }
        fn is_eligible(&self) -> bool {
            self.inner.eligible
        }
        fn latency_ns(&self, now_ns: u64) -> u64 {
            self.latency.estimate(now_ns)
        }
    }

    fn shares(backends: &[Timed], picks: u64, now_ns: u64) -> Vec<usize> {
        let mut seen = vec![0; backends.len()];
        for i in 0..picks {
            let ctx = PickContext {
                now_ns,
                ..PickContext::with_random(splitmix64(i))
            };
            seen[PeakEwmaP2c.pick(backends, &ctx).unwrap()] += 1;
        }
        seen
    }

    #[test]
    fn avoids_the_slow_backend() {
        let backends = vec![
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(50_000_000)),
        ];
        let seen = shares(&backends, 3000, 2);
        assert_eq!(seen[2], 0, "{seen:?}");
        assert!(seen[0] > 1200 && seen[1] > 1200, "{seen:?}");
    }

    #[test]
    fn in_flight_outweighs_small_latency_gaps() {
        let mut backends = vec![
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_200_000)),
        ];
        backends[0].inner.in_flight = 4;
        let seen = shares(&backends, 100, 2);
        assert_eq!(seen, vec![0, 100]);
    }

    #[test]
    fn cost_counts_pending_requests_not_responses_being_relayed() {
        // Backend 0 has many responses still being relayed but nothing awaiting an answer;
        // backend 1 has fewer in flight, all of them awaiting: backend 0 is cheaper.
        let mut backends = vec![
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_000_000)),
        ];
        backends[0].inner.in_flight = 10;
        backends[0].pending = Some(0);
        backends[1].inner.in_flight = 3;
        let seen = shares(&backends, 100, 2);
        assert_eq!(seen, vec![100, 0]);
    }

    #[test]
    fn unknown_is_tried_once_at_a_time() {
        let mut backends = vec![
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, None),
        ];
        let ctx = PickContext::with_random(0);
        assert_eq!(cost(&backends[3], 2), 0.0);
        // Idle and unknown: preferred over anything known.
        assert_eq!(PeakEwmaP2c.pick(&backends[2..], &ctx), Some(1));
        // One request outstanding: avoided until it answers.
        backends[3].inner.in_flight = 1;
        let seen = shares(&backends, 1000, 2);
        assert_eq!(seen[3], 0, "{seen:?}");
    }

    #[test]
    fn slow_backend_is_retried_after_decay() {
        let backends = vec![
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(1_000_000)),
            Timed::new(1, Some(50_000_000)),
        ];
        // Backends 0 and 1 stay busy; after a minute the old 50 ms peak has decayed.
        let mut busy = backends;
        busy[0].inner.in_flight = 3;
        busy[1].inner.in_flight = 3;
        busy[0].latency.observe(1_000_000, 60_000_000_000);
        busy[1].latency.observe(1_000_000, 60_000_000_000);
        let seen = shares(&busy, 1000, 60_000_000_000);
        assert!(seen[2] > 300, "{seen:?}");
    }

    #[test]
    fn weight_divides_cost_and_unusable_are_skipped() {
        let mut backends = vec![
            Timed::new(4, Some(3_000_000)),
            Timed::new(1, Some(1_000_000)),
        ];
        // 3 ms / 4 < 1 ms / 1.
        assert_eq!(shares(&backends, 50, 2), vec![50, 0]);
        backends[0].inner.eligible = false;
        assert_eq!(shares(&backends, 50, 2), vec![0, 50]);
        backends[1].inner.weight = 0;
        assert_eq!(
            PeakEwmaP2c.pick(&backends, &PickContext::with_random(1)),
            None
        );
    }
}
