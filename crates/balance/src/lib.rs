//! Backend selection for Fulcrum: pure logic, no I/O, no async runtime.
//!
//! A [`Balancer`] is built from a pool's membership (one entry per backend, in snapshot order)
//! and picks the index of the backend that should take the next request. Live numbers
//! (in-flight requests, latency, eligibility) are read at pick time through the
//! [`Candidate`] trait, which the server implements on its per-backend state. Picking never
//! takes a lock; per-balancer state (a round-robin cursor) is an atomic.
//!
//! Failover falls out of [`PickContext::excluded`]: the caller passes the backends it already
//! tried and the balancer yields the next best one.

#![deny(missing_docs)]

pub mod least_conn;
pub mod p2c;
pub mod round_robin;

pub use least_conn::LeastConn;
pub use p2c::PowerOfTwoChoices;
pub use round_robin::RoundRobin;

/// What a balancer sees of one backend when it picks.
pub trait Candidate {
    /// Effective weight: configured weight × external factor × slow-start ramp.
    /// Zero means "no new traffic".
    fn weight(&self) -> u32;
    /// Requests (or TCP sessions) currently in flight on this backend.
    fn in_flight(&self) -> u32;
    /// Whether the backend may take new traffic at all (healthy and enabled).
    fn is_eligible(&self) -> bool;
    /// Latency estimate in nanoseconds at `now_ns` (peak-EWMA); 0 when nothing is known yet.
    fn latency_ns(&self, now_ns: u64) -> u64 {
        let _ = now_ns;
        0
    }
}

/// One member of a pool as a balancer is built from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member<'a> {
    /// Stable identity of the backend (its address as configured). Consistent hashing uses it,
    /// so every node that knows the same members builds the same table.
    pub id: &'a str,
    /// Effective weight at build time.
    pub weight: u32,
}

/// Algorithm parameters that are fixed when a balancer is built.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildOptions {
    /// Maglev lookup table size; must be prime. 65537 by default.
    pub table_size: usize,
    /// Consistent hashing with bounded loads: no backend takes more than this multiple of the
    /// average in-flight (e.g. 1.25). `None` disables the bound.
    pub bounded_load: Option<f64>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            table_size: 65537,
            bounded_load: None,
        }
    }
}

/// Per-request inputs to a pick.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    /// Hash of the request's affinity key (client IP, header, cookie, path); 0 when unused.
    pub key_hash: u64,
    /// Randomness supplied by the caller, so tests can be exact. Any well-mixed `u64`.
    pub random: u64,
    /// Monotonic time in nanoseconds, for time-decayed estimates.
    pub now_ns: u64,
    /// Indexes of backends already tried for this request; they are skipped.
    pub excluded: &'a [usize],
}

impl PickContext<'_> {
    /// A context with the given randomness and nothing excluded.
    pub fn with_random(random: u64) -> PickContext<'static> {
        PickContext {
            key_hash: 0,
            random,
            now_ns: 0,
            excluded: &[],
        }
    }

    /// Whether backend `index` may be chosen for this request.
    #[inline]
    pub fn usable<C: Candidate>(&self, index: usize, candidate: &C) -> bool {
        candidate.is_eligible() && candidate.weight() > 0 && !self.excluded.contains(&index)
    }
}

/// A backend selection algorithm.
pub trait Balancer: Send + Sync {
    /// Picks the index (into `backends`) of the backend for the next request, or `None` when
    /// no backend is usable. `backends` must be in the order the balancer was built with.
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize>;
}

/// The algorithms a pool can be configured with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's algorithm).
    RoundRobin,
    /// Weighted least connections (in-flight requests / weight).
    LeastConn,
    /// Power of two random choices on weighted in-flight requests.
    P2c,
}

impl Algorithm {
    /// Every algorithm with its configuration name.
    pub const ALL: &'static [(&'static str, Algorithm)] = &[
        ("round_robin", Algorithm::RoundRobin),
        ("least_conn", Algorithm::LeastConn),
        ("p2c", Algorithm::P2c),
    ];

    /// Looks an algorithm up by its configuration name.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, algorithm)| *algorithm)
    }

    /// The configuration name of this algorithm.
    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, a)| *a == self)
            .map(|(n, _)| *n)
            .unwrap_or("unknown")
    }
}

/// A built balancer of any algorithm: enum dispatch, no allocation or virtual call per pick.
#[derive(Debug)]
pub enum Selector {
    /// See [`RoundRobin`].
    RoundRobin(RoundRobin),
    /// See [`LeastConn`].
    LeastConn(LeastConn),
    /// See [`PowerOfTwoChoices`].
    P2c(PowerOfTwoChoices),
}

impl Selector {
    /// Builds the selector for `algorithm` over these members (in snapshot order).
    /// Rebuild it whenever membership or weights change.
    pub fn build(algorithm: Algorithm, members: &[Member<'_>], options: &BuildOptions) -> Selector {
        let _ = options;
        match algorithm {
            Algorithm::RoundRobin => {
                let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
                Selector::RoundRobin(RoundRobin::new(&weights))
            }
            Algorithm::LeastConn => Selector::LeastConn(LeastConn),
            Algorithm::P2c => Selector::P2c(PowerOfTwoChoices),
        }
    }
}

impl Balancer for Selector {
    #[inline]
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        match self {
            Selector::RoundRobin(b) => b.pick(backends, ctx),
            Selector::LeastConn(b) => b.pick(backends, ctx),
            Selector::P2c(b) => b.pick(backends, ctx),
        }
    }
}

/// SplitMix64: derives a fresh well-mixed value from `x`. Used to get several random
/// numbers out of the one in [`PickContext::random`].
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Maps a random `u64` uniformly onto `0..n` (Lemire's multiply-shift; `n` > 0).
#[inline]
pub fn bounded(random: u64, n: usize) -> usize {
    ((u128::from(random) * n as u128) >> 64) as usize
}

/// A simple candidate for tests and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaticCandidate {
    /// Effective weight.
    pub weight: u32,
    /// In-flight requests.
    pub in_flight: u32,
    /// Healthy and enabled.
    pub eligible: bool,
}

impl StaticCandidate {
    /// An eligible, idle candidate of weight `weight`.
    pub fn new(weight: u32) -> Self {
        StaticCandidate {
            weight,
            in_flight: 0,
            eligible: true,
        }
    }
}

impl Candidate for StaticCandidate {
    fn weight(&self) -> u32 {
        self.weight
    }
    fn in_flight(&self) -> u32 {
        self.in_flight
    }
    fn is_eligible(&self) -> bool {
        self.eligible
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for (name, algorithm) in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(name), Some(*algorithm));
            assert_eq!(algorithm.name(), *name);
        }
        assert_eq!(Algorithm::from_name("nope"), None);
    }

    #[test]
    fn bounded_stays_in_range() {
        for i in 0..1000u64 {
            assert!(bounded(splitmix64(i), 7) < 7);
        }
        assert_eq!(bounded(u64::MAX, 3), 2);
        assert_eq!(bounded(0, 3), 0);
    }
}
