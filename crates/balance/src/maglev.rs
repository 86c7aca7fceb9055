//! Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted, with optional bounded
//! loads (Mirrokni et al., 2018).
//!
//! A lookup table of prime size M (65537 by default) is filled from the members' ids alone:
//! each member has a permutation of the slots given by two independent hashes of its id
//! (offset, skip), and members take turns claiming their next free slot, a member of weight w
//! taking w turns for each turn of the heaviest member's weight. Turns go in id order, so every
//! node that knows the same members builds the same table whatever their order; removing one
//! member moves mostly its own slots.
//!
//! A pick maps the request's key hash to a slot. When that slot's backend is unusable (down,
//! excluded, weight 0) or, with bounded loads, full, the walk continues over the following
//! slots, which belong to pseudo-randomly ordered backends, so the overflow of one backend is
//! spread rather than dumped on a single neighbour.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::{hash_bytes, Balancer, Candidate, PickContext};

/// Seeds of the two independent hashes of a member id.
const OFFSET_SEED: u64 = 0x6d61_676c_6576_6f66; // "maglevof"
const SKIP_SEED: u64 = 0x6d61_676c_6576_736b; // "maglevsk"

/// Table slots walked before falling back to a scan of the backends.
const MAX_WALK: usize = 64;

/// With bounded loads, the pool-wide totals (an O(n) sum) are recomputed every this many
/// picks that need them and read from a cache in between: a slightly stale average keeps the
/// bound approximate, as it is under concurrency anyway, and the pick O(1) amortised.
const LOAD_REFRESH: u32 = 64;

/// A built Maglev table.
#[derive(Debug)]
pub struct Maglev {
    /// Slot → backend index.
    table: Vec<u32>,
    /// Bounded-load factor (> 1), if any.
    bounded_load: Option<f64>,
    /// Cached pool totals for the bound: in-flight (high 32 bits) and weight (low 32 bits).
    load_cache: AtomicU64,
    /// Picks that consulted the cache (refresh every [`LOAD_REFRESH`]).
    load_reads: AtomicU32,
}

/// Whether `n` is prime (trial division; table sizes are small).
pub fn is_prime(n: usize) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// The smallest prime ≥ `n` (and ≥ 2).
pub fn next_prime(n: usize) -> usize {
    let mut candidate = n.max(2);
    while !is_prime(candidate) {
        candidate += 1;
    }
    candidate
}

impl Maglev {
    /// Builds the table for members with these `(id, weight)`s, in snapshot order.
    /// `table_size` is rounded up to a prime; members of weight 0 get no slot.
    pub fn new<'a>(
        members: impl IntoIterator<Item = (&'a str, u32)>,
        table_size: usize,
        bounded_load: Option<f64>,
    ) -> Self {
        let size = next_prime(table_size);
        let members: Vec<(&str, u32)> = members.into_iter().collect();
        let max_weight = members.iter().map(|m| u64::from(m.1)).max().unwrap_or(0);
        let mut table = Vec::new();
        if max_weight > 0 {
            table = vec![u32::MAX; size];
            struct Entry {
                index: u32,
                offset: u64,
                skip: u64,
                next: u64,
                weight: u64,
                target: u64,
            }
            let m = size as u64;
            let mut entries: Vec<Entry> = members
                .iter()
                .enumerate()
                .filter(|(_, (_, w))| *w > 0)
                .map(|(index, (id, w))| Entry {
                    index: index as u32,
                    offset: hash_bytes(OFFSET_SEED, id.as_bytes()) % m,
                    skip: hash_bytes(SKIP_SEED, id.as_bytes()) % (m - 1) + 1,
                    next: 0,
                    weight: u64::from(*w),
                    target: 0,
                })
                .collect();
            // Turns go in id order, not snapshot order, so the table depends only on the set
            // of members: nodes that list them differently still agree.
            entries.sort_by_key(|e| members[e.index as usize].0);
            let mut filled = 0usize;
            let mut iteration = 0u64;
            while filled < size {
                for entry in entries.iter_mut() {
                    if filled == size {
                        break;
                    }
                    // A member of the heaviest weight takes a turn every iteration; one of a
                    // third of it every third iteration.
                    if iteration * entry.weight < entry.target {
                        continue;
                    }
                    entry.target += max_weight;
                    loop {
                        let slot = ((entry.offset + entry.next * entry.skip) % m) as usize;
                        entry.next += 1;
                        if table[slot] == u32::MAX {
                            table[slot] = entry.index;
                            filled += 1;
                            break;
                        }
                    }
                }
                iteration += 1;
            }
        }
        Maglev {
            table,
            bounded_load: bounded_load.filter(|c| c.is_finite() && *c >= 1.0),
            load_cache: AtomicU64::new(0),
            load_reads: AtomicU32::new(0),
        }
    }

    /// The lookup table (slot → backend index); empty when no member has weight.
    pub fn table(&self) -> &[u32] {
        &self.table
    }

    /// The backend the table assigns to `key_hash`, ignoring liveness.
    pub fn lookup(&self, key_hash: u64) -> Option<usize> {
        (!self.table.is_empty())
            .then(|| self.table[(key_hash % self.table.len() as u64) as usize] as usize)
    }
}

/// The bounded-load capacity check: total in-flight and total weight of usable backends.
struct Load {
    in_flight: u64,
    weight: u64,
}

impl Load {
    /// Totals from the cache of `maglev`, refreshed every [`LOAD_REFRESH`] reads.
    fn cached<C: Candidate>(maglev: &Maglev, backends: &[C], ctx: &PickContext<'_>) -> Load {
        if maglev
            .load_reads
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(LOAD_REFRESH)
        {
            let load = Load::of(backends, ctx);
            let packed = (load.in_flight.min(u64::from(u32::MAX)) << 32)
                | load.weight.min(u64::from(u32::MAX));
            maglev.load_cache.store(packed, Ordering::Relaxed);
            return load;
        }
        let packed = maglev.load_cache.load(Ordering::Relaxed);
        Load {
            in_flight: packed >> 32,
            weight: packed & u64::from(u32::MAX),
        }
    }

    fn of<C: Candidate>(backends: &[C], ctx: &PickContext<'_>) -> Load {
        let mut load = Load {
            in_flight: 0,
            weight: 0,
        };
        for (i, b) in backends.iter().enumerate() {
            if ctx.usable(i, b) {
                load.in_flight += u64::from(b.in_flight());
                load.weight += u64::from(b.weight());
            }
        }
        load
    }

    /// Whether `candidate` may take one more request: in-flight + 1 ≤
    /// ceil(c × (total in-flight + 1) × weight / total weight), and the bound is at least 1.
    fn admits<C: Candidate>(&self, candidate: &C, factor: f64) -> bool {
        if self.weight == 0 {
            return true;
        }
        let share = candidate.weight() as f64 / self.weight as f64;
        let capacity = (factor * (self.in_flight + 1) as f64 * share)
            .ceil()
            .max(1.0);
        f64::from(candidate.in_flight()) + 1.0 <= capacity
    }
}

impl Balancer for Maglev {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        let m = self.table.len();
        if m == 0 || backends.is_empty() {
            return None;
        }
        let start = (ctx.key_hash % m as u64) as usize;
        let mut load: Option<Load> = None;
        let mut fits = |candidate: &C| match self.bounded_load {
            // Idle backends always fit: the common case needs no pool-wide sum.
            Some(factor) if candidate.in_flight() > 0 => load
                .get_or_insert_with(|| Load::cached(self, backends, ctx))
                .admits(candidate, factor),
            _ => true,
        };
        for step in 0..MAX_WALK.min(m) {
            let index = self.table[(start + step) % m] as usize;
            if let Some(candidate) = backends.get(index) {
                if ctx.usable(index, candidate) && fits(candidate) {
                    return Some(index);
                }
            }
        }
        // Most backends are unusable or full: scan them from the key's own backend on, first
        // within the bound, then ignoring it (availability beats the bound).
        let n = backends.len();
        let first = self.table[start] as usize % n;
        for bounded in [true, false] {
            for step in 0..n {
                let index = (first + step) % n;
                let candidate = &backends[index];
                if ctx.usable(index, candidate) && (!bounded || fits(candidate)) {
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
    use crate::{splitmix64, StaticCandidate};

    fn ids(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("10.0.{}.{}:8080", i / 256, i % 256))
            .collect()
    }

    fn build(ids: &[String], size: usize) -> Maglev {
        Maglev::new(ids.iter().map(|id| (id.as_str(), 1)), size, None)
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(2) && !is_prime(1) && !is_prime(65535));
        assert_eq!(next_prime(65536), 65537);
        assert_eq!(next_prime(0), 2);
    }

    #[test]
    fn table_is_full_and_even() {
        let maglev = build(&ids(7), 65537);
        assert_eq!(maglev.table().len(), 65537);
        let mut counts = [0usize; 7];
        for &b in maglev.table() {
            counts[b as usize] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(max - min <= 1, "{counts:?}");
    }

    #[test]
    fn weights_shape_the_table() {
        let ids = ids(3);
        let maglev = Maglev::new(ids.iter().map(String::as_str).zip([3, 1, 0]), 65537, None);
        let mut counts = [0usize; 3];
        for &b in maglev.table() {
            counts[b as usize] += 1;
        }
        assert_eq!(counts[2], 0);
        assert!(counts[0].abs_diff(3 * counts[1]) < 10, "{counts:?}");
    }

    #[test]
    fn same_key_same_backend_and_walks_past_unusable() {
        let ids = ids(5);
        let maglev = build(&ids, 65537);
        let mut backends = vec![StaticCandidate::new(1); 5];
        let ctx = |key| PickContext {
            key_hash: key,
            ..PickContext::with_random(99)
        };
        let key = splitmix64(42);
        let home = maglev.pick(&backends, &ctx(key)).unwrap();
        assert_eq!(Some(home), maglev.lookup(key));
        for _ in 0..10 {
            assert_eq!(maglev.pick(&backends, &ctx(key)), Some(home));
        }
        backends[home].eligible = false;
        let other = maglev.pick(&backends, &ctx(key)).unwrap();
        assert_ne!(other, home);
        let excluded = [other];
        let third = maglev
            .pick(
                &backends,
                &PickContext {
                    excluded: &excluded,
                    ..ctx(key)
                },
            )
            .unwrap();
        assert!(third != home && third != other);
        for b in backends.iter_mut() {
            b.eligible = false;
        }
        assert_eq!(maglev.pick(&backends, &ctx(key)), None);
    }

    #[test]
    fn bounded_load_overflows_to_others() {
        let ids = ids(4);
        let maglev = Maglev::new(ids.iter().map(|id| (id.as_str(), 1)), 65537, Some(1.25));
        let mut backends = vec![StaticCandidate::new(1); 4];
        let key = splitmix64(7);
        let home = maglev.lookup(key).unwrap();
        let ctx = PickContext {
            key_hash: key,
            ..PickContext::with_random(1)
        };
        // Home holds 2, the rest 1 each: capacity = ceil(1.25 × 6 / 4) = 2, so home is full.
        for (i, b) in backends.iter_mut().enumerate() {
            b.in_flight = if i == home { 2 } else { 1 };
        }
        let picked = maglev.pick(&backends, &ctx).unwrap();
        assert_ne!(picked, home);
        // Without the bound the key stays home.
        let unbounded = build(&ids, 65537);
        assert_eq!(unbounded.pick(&backends, &ctx), Some(home));
        // A far-overloaded home: the others take its keys.
        for b in backends.iter_mut() {
            b.in_flight = 100;
        }
        backends[home].in_flight = 1000;
        assert!(maglev.pick(&backends, &ctx).is_some());
    }

    #[test]
    fn empty_when_no_weight() {
        let ids = ids(2);
        let maglev = Maglev::new(ids.iter().map(|id| (id.as_str(), 0)), 13, None);
        assert!(maglev.table().is_empty());
        let backends = vec![StaticCandidate::new(1); 2];
        assert_eq!(maglev.pick(&backends, &PickContext::with_random(1)), None);
    }
}
