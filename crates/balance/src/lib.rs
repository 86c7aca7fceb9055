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

pub mod ewma;
pub mod least_conn;
pub mod maglev;
pub mod p2c;
pub mod peak_ewma;
pub mod random;
pub mod round_robin;
pub mod slow_start;

pub use ewma::PeakEwma;
pub use least_conn::LeastConn;
pub use maglev::Maglev;
pub use p2c::PowerOfTwoChoices;
pub use peak_ewma::PeakEwmaP2c;
pub use random::WeightedRandom;
pub use round_robin::RoundRobin;
pub use slow_start::slow_start_percent;

/// What a balancer sees of one backend when it picks.
pub trait Candidate {
    /// Effective weight: configured weight × external factor × slow-start ramp.
    /// Zero means "no new traffic".
    fn weight(&self) -> u32;
    /// Requests (or TCP sessions) currently in flight on this backend.
    fn in_flight(&self) -> u32;
    /// Requests sent to this backend and not answered yet (peak-EWMA's "pending"): unlike
    /// [`Candidate::in_flight`] it excludes the time the balancer spends relaying answers.
    /// The in-flight count unless the implementation tracks it separately.
    fn pending(&self) -> u32 {
        self.in_flight()
    }
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
    /// Power of two random choices on peak-EWMA latency × (pending + 1) / weight.
    PeakEwma,
    /// Weighted random.
    Random,
    /// Maglev consistent hashing on the request's key, optionally with bounded loads.
    Maglev,
}

impl Algorithm {
    /// Every algorithm with its configuration name.
    pub const ALL: &'static [(&'static str, Algorithm)] = &[
        ("round_robin", Algorithm::RoundRobin),
        ("least_conn", Algorithm::LeastConn),
        ("p2c", Algorithm::P2c),
        ("peak_ewma", Algorithm::PeakEwma),
        ("random", Algorithm::Random),
        ("maglev", Algorithm::Maglev),
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
    /// See [`PeakEwmaP2c`].
    PeakEwma(PeakEwmaP2c),
    /// See [`WeightedRandom`].
    Random(WeightedRandom),
    /// See [`Maglev`].
    Maglev(Maglev),
}

impl Selector {
    /// Builds the selector for `algorithm` over these members (in snapshot order).
    /// Rebuild it whenever membership or weights change: round robin, random and Maglev use
    /// the weights given here; the others read live weights at pick time. least_conn over
    /// more than [`least_conn::SCAN_MAX`] members keeps live loads in a tree: call
    /// [`Selector::refresh_all`] with the live candidates after building, and report
    /// in-flight changes with [`Selector::load_changed`].
    pub fn build(algorithm: Algorithm, members: &[Member<'_>], options: &BuildOptions) -> Selector {
        match algorithm {
            Algorithm::RoundRobin => {
                let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
                Selector::RoundRobin(RoundRobin::new(&weights))
            }
            Algorithm::LeastConn => {
                let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
                Selector::LeastConn(LeastConn::new(&weights))
            }
            Algorithm::P2c => Selector::P2c(PowerOfTwoChoices),
            Algorithm::PeakEwma => Selector::PeakEwma(PeakEwmaP2c),
            Algorithm::Random => {
                let weights: Vec<u32> = members.iter().map(|m| m.weight).collect();
                Selector::Random(WeightedRandom::new(&weights))
            }
            Algorithm::Maglev => Selector::Maglev(Maglev::new(
                members.iter().map(|m| (m.id, m.weight)),
                options.table_size,
                options.bounded_load,
            )),
        }
    }

    /// Whether this selector wants [`Selector::load_changed`] notifications (least_conn over
    /// more than [`least_conn::SCAN_MAX`] backends). Callers check this first, so the other
    /// algorithms pay nothing.
    #[inline]
    pub fn tracks_load(&self) -> bool {
        match self {
            Selector::LeastConn(b) => b.tracks_load(),
            _ => false,
        }
    }

    /// Backend `index` of `backends` (the snapshot the selector was built for) changed its
    /// in-flight count: O(log n) for least_conn's tree, a no-op for every other algorithm.
    #[inline]
    pub fn load_changed<C: Candidate>(&self, index: usize, backends: &[C]) {
        if let Selector::LeastConn(b) = self {
            b.load_changed(index, backends);
        }
    }

    /// Recomputes any live-load state from `backends`, O(n): after building and
    /// periodically, so that state missed by notifications (health, weights) is bounded in
    /// time. A no-op for algorithms without such state.
    pub fn refresh_all<C: Candidate>(&self, backends: &[C]) {
        if let Selector::LeastConn(b) = self {
            b.refresh_all(backends);
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
            Selector::PeakEwma(b) => b.pick(backends, ctx),
            Selector::Random(b) => b.pick(backends, ctx),
            Selector::Maglev(b) => b.pick(backends, ctx),
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

/// A seeded 64-bit hash of `bytes`, stable across processes, machines and versions (no
/// per-process randomness), so every balancer node maps the same key the same way. Not
/// DoS-resistant; keys only choose among backends.
#[inline]
pub fn hash_bytes(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = splitmix64(seed ^ (bytes.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        h = splitmix64(h ^ u64::from_le_bytes(word));
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut word = [0u8; 8];
        word[..rest.len()].copy_from_slice(rest);
        h = splitmix64(h ^ u64::from_le_bytes(word));
    }
    h
}

/// The hash of a request's affinity key (client IP bytes, header or cookie value, path), for
/// [`PickContext::key_hash`].
#[inline]
pub fn key_hash(bytes: &[u8]) -> u64 {
    hash_bytes(0x6b65_795f_6861_7368, bytes)
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
    fn hashes_are_stable_and_seeded() {
        assert_eq!(key_hash(b"alice"), key_hash(b"alice"));
        assert_ne!(key_hash(b"alice"), key_hash(b"alicf"));
        assert_ne!(key_hash(b"abcdefgh"), key_hash(b"abcdefgh\0"));
        assert_ne!(hash_bytes(1, b"x"), hash_bytes(2, b"x"));
        assert_ne!(key_hash(b""), 0);
    }

    #[test]
    fn selector_builds_every_algorithm() {
        let members = [Member { id: "a", weight: 1 }, Member { id: "b", weight: 2 }];
        let backends = [StaticCandidate::new(1), StaticCandidate::new(2)];
        for (_, algorithm) in Algorithm::ALL {
            let selector = Selector::build(*algorithm, &members, &BuildOptions::default());
            assert!(selector
                .pick(&backends, &PickContext::with_random(3))
                .is_some());
        }
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
