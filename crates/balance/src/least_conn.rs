//! Weighted least connections: the backend with the fewest in-flight requests per unit of
//! weight wins. Ties are broken at random so equal backends share evenly.
//!
//! Small pools (up to [`SCAN_MAX`] backends) are scanned exactly at every pick. Larger pools
//! keep a lock-free min-tree of load keys (see [`LeastConn`]) so a pick costs O(log n): the
//! caller reports in-flight changes with [`LeastConn::load_changed`] and refreshes the whole
//! tree now and then with [`LeastConn::refresh_all`].

use std::sync::atomic::{AtomicU64, Ordering};

use crate::{bounded, splitmix64, Balancer, Candidate, PickContext};

/// Pools up to this many backends are scanned exactly at every pick (faster than the tree
/// there, and no notifications needed).
pub const SCAN_MAX: usize = 16;

/// Descents tried before a pick falls back to the exact scan (each failed descent repairs
/// the stale path it found).
const MAX_DESCENTS: u64 = 4;

/// A node packs a load key (high 48 bits) and how many leaves below hold that key (low 16
/// bits, saturating).
const COUNT_BITS: u32 = 16;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// The key of a backend that may not be picked (ineligible or weight 0) or of a padding leaf.
const KEY_NONE: u64 = (1 << (64 - COUNT_BITS)) - 1;
/// A node with no pickable leaf below it.
const EMPTY: u64 = KEY_NONE << COUNT_BITS;

/// Weighted least connections. Stateless (an exact scan) for small pools; for pools of more
/// than [`SCAN_MAX`] backends it keeps a min-tree of load keys over the backends in
/// snapshot order.
///
/// # The tree
///
/// An implicit binary tree of `AtomicU64`s: leaf `i` holds backend `i`'s load key,
/// `((in_flight + 1) << 32) / weight` (32 fractional bits: the order of two backends is exact
/// while their weights stay below 65536; closer loads may compare equal), or "none" when the
/// backend is ineligible or has weight 0. An inner node holds the smallest key below it and
/// how many leaves hold it. A pick walks from the root towards the smaller child and, when
/// both children tie, into each with a probability proportional to its number of tied
/// leaves, so equal backends share evenly. Everything is relaxed atomics, never a lock.
///
/// # Staleness and self-healing
///
/// The tree is only as fresh as its notifications: callers report every in-flight change
/// with [`LeastConn::load_changed`] (O(log n)) and call [`LeastConn::refresh_all`] after
/// building and periodically. Concurrent updates may leave a node transiently stale; a pick
/// checks the leaf it reached against the live candidate (eligibility, weight, in-flight)
/// and against the root's minimum, repairs the path when they disagree and descends again
/// (a few times at most, then it scans exactly). So an over-loaded, unhealthy or
/// zero-weight backend is never picked from a stale leaf; a backend whose load *dropped*,
/// or which became eligible again (health, back-off end, weight change), without a
/// notification waits for its next notification or the next refresh. Retries (a non-empty
/// [`PickContext::excluded`]) whose descent reaches an excluded backend scan exactly.
#[derive(Debug, Default)]
pub struct LeastConn {
    tree: Option<LoadTree>,
}

impl LeastConn {
    /// Weighted least connections over `weights` (the members' weights, in snapshot order).
    /// Builds the tree when there are more than [`SCAN_MAX`] members, assuming nothing in
    /// flight; call [`LeastConn::refresh_all`] with the live candidates before picking.
    pub fn new(weights: &[u32]) -> Self {
        LeastConn {
            tree: (weights.len() > SCAN_MAX).then(|| LoadTree::new(weights)),
        }
    }

    /// Whether picks rely on [`LeastConn::load_changed`] notifications (a tree is kept).
    #[inline]
    pub fn tracks_load(&self) -> bool {
        self.tree.is_some()
    }

    /// Backend `index`'s in-flight count (or eligibility, or weight) changed: updates its
    /// leaf from `backends[index]` and the path to the root, O(log n). No-op without a tree
    /// or for an index out of range.
    #[inline]
    pub fn load_changed<C: Candidate>(&self, index: usize, backends: &[C]) {
        if let (Some(tree), Some(candidate)) = (&self.tree, backends.get(index)) {
            if index < tree.len {
                tree.set(index, leaf_value(candidate), true);
            }
        }
    }

    /// Recomputes the whole tree from the live candidates, O(n). Call it after building and
    /// periodically (the server does every 250 ms) so that staleness is bounded.
    pub fn refresh_all<C: Candidate>(&self, backends: &[C]) {
        if let Some(tree) = &self.tree {
            tree.refresh(backends);
        }
    }
}

impl Balancer for LeastConn {
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
        match &self.tree {
            Some(tree) if tree.len == backends.len() => tree
                .pick(backends, ctx)
                .unwrap_or_else(|| scan(backends, ctx)),
            _ => scan(backends, ctx),
        }
    }
}

/// The exact O(n) pick: scans every usable backend from a random start and keeps the least
/// loaded (the first found among equals).
pub fn scan<C: Candidate>(backends: &[C], ctx: &PickContext<'_>) -> Option<usize> {
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

/// The tree's load key of a backend with `in_flight` requests and weight `weight` (> 0):
/// `(in_flight + 1) / weight` with 32 fractional bits, monotone in the exact load (two
/// backends never compare in the wrong order; very close loads may compare equal).
/// `None` for weight 0.
#[inline]
pub fn load_key(in_flight: u32, weight: u32) -> Option<u64> {
    (weight > 0).then(|| {
        let load = (u64::from(in_flight) + 1).min(u64::from(u32::MAX));
        ((load << 32) / u64::from(weight)).min(KEY_NONE - 1)
    })
}

/// The leaf value of a candidate: its key with a count of 1, or [`EMPTY`] when it may not be
/// picked by anyone.
#[inline]
fn leaf_value<C: Candidate>(candidate: &C) -> u64 {
    if !candidate.is_eligible() {
        return EMPTY;
    }
    match load_key(candidate.in_flight(), candidate.weight()) {
        Some(key) => (key << COUNT_BITS) | 1,
        None => EMPTY,
    }
}

#[inline]
fn key(node: u64) -> u64 {
    node >> COUNT_BITS
}

#[inline]
fn count(node: u64) -> u64 {
    node & COUNT_MASK
}

/// The parent of two nodes: the smaller key, with the summed count of the children that
/// hold it.
#[inline]
fn combine(left: u64, right: u64) -> u64 {
    match key(left).cmp(&key(right)) {
        std::cmp::Ordering::Less => left,
        std::cmp::Ordering::Greater => right,
        std::cmp::Ordering::Equal => {
            (key(left) << COUNT_BITS) | (count(left) + count(right)).min(COUNT_MASK)
        }
    }
}

/// An implicit binary min-tree: node 1 is the root, node `k` has children `2k` and `2k + 1`,
/// leaf `i` is node `leaves + i`; leaves past `len` are padding ([`EMPTY`]).
struct LoadTree {
    nodes: Box<[AtomicU64]>,
    /// Number of leaves (a power of two).
    leaves: usize,
    /// Number of backends.
    len: usize,
}

impl std::fmt::Debug for LoadTree {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let root = self.load(1);
        f.debug_struct("LoadTree")
            .field("len", &self.len)
            .field("min_key", &key(root))
            .field("tied", &count(root))
            .finish()
    }
}

impl LoadTree {
    fn new(weights: &[u32]) -> Self {
        let leaves = weights.len().next_power_of_two();
        let nodes: Box<[AtomicU64]> = (0..2 * leaves).map(|_| AtomicU64::new(EMPTY)).collect();
        for (i, &weight) in weights.iter().enumerate() {
            if let Some(key) = load_key(0, weight) {
                nodes[leaves + i].store((key << COUNT_BITS) | 1, Ordering::Relaxed);
            }
        }
        let tree = LoadTree {
            nodes,
            leaves,
            len: weights.len(),
        };
        tree.rebuild_inner();
        tree
    }

    #[inline]
    fn load(&self, node: usize) -> u64 {
        self.nodes[node].load(Ordering::Relaxed)
    }

    fn rebuild_inner(&self) {
        for node in (1..self.leaves).rev() {
            let value = combine(self.load(2 * node), self.load(2 * node + 1));
            self.nodes[node].store(value, Ordering::Relaxed);
        }
    }

    fn refresh<C: Candidate>(&self, backends: &[C]) {
        for i in 0..self.leaves {
            let value = match backends.get(i) {
                Some(candidate) if i < self.len => leaf_value(candidate),
                _ => EMPTY,
            };
            self.nodes[self.leaves + i].store(value, Ordering::Relaxed);
        }
        self.rebuild_inner();
    }

    /// Sets leaf `index` to `value` and recomputes its ancestors. With `early_stop`, stops at
    /// the first node that does not change (the usual notification); without, recomputes the
    /// whole path (a repair).
    #[inline]
    fn set(&self, index: usize, value: u64, early_stop: bool) {
        let mut node = self.leaves + index;
        if self.load(node) != value {
            self.nodes[node].store(value, Ordering::Relaxed);
        } else if early_stop {
            return;
        }
        let mut value = value;
        while node > 1 {
            let sibling = self.load(node ^ 1);
            let (left, right) = if node & 1 == 0 {
                (value, sibling)
            } else {
                (sibling, value)
            };
            node /= 2;
            value = combine(left, right);
            if self.load(node) != value {
                self.nodes[node].store(value, Ordering::Relaxed);
            } else if early_stop {
                return;
            }
        }
    }

    /// Walks from the root to a leaf holding the root's key (`root`), choosing among tied
    /// children in proportion to their tied leaves with `random`. Returns the leaf's index.
    #[inline]
    fn descend(&self, root: u64, random: u64) -> usize {
        let mut r = bounded(random, count(root).max(1) as usize) as u64;
        let mut node = 1;
        while node < self.leaves {
            let left = self.load(2 * node);
            let right = self.load(2 * node + 1);
            node = 2 * node
                + match key(left).cmp(&key(right)) {
                    std::cmp::Ordering::Less => 0,
                    std::cmp::Ordering::Greater => 1,
                    std::cmp::Ordering::Equal => {
                        let (tied_left, total) = (count(left), count(left) + count(right));
                        if total == 0 {
                            0
                        } else {
                            // Counts can be transiently inconsistent with the parent's.
                            if r >= total {
                                r %= total;
                            }
                            if r < tied_left {
                                0
                            } else {
                                r -= tied_left;
                                1
                            }
                        }
                    }
                };
        }
        node - self.leaves
    }

    /// A tree pick; `None` asks for the exact scan (nothing pickable per the tree, an
    /// excluded backend reached, or stale paths found on every try).
    #[inline]
    #[allow(clippy::option_option)] // the outer None means "scan instead", the inner one "none"
    fn pick<C: Candidate>(&self, backends: &[C], ctx: &PickContext<'_>) -> Option<Option<usize>> {
        let mut random = ctx.random;
        for attempt in 0..MAX_DESCENTS {
            let root = self.load(1);
            if key(root) == KEY_NONE {
                return None;
            }
            if attempt > 0 {
                random = splitmix64(random);
            }
            let index = self.descend(root, random);
            let stored = self.load(self.leaves + index);
            let live = backends.get(index).map_or(EMPTY, leaf_value);
            if live == stored && key(live) == key(root) {
                if ctx.excluded.contains(&index) {
                    return None;
                }
                return Some(Some(index));
            }
            self.set(index, live, false);
        }
        None
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
        let lc = LeastConn::new(&[1, 1, 1]);
        assert_eq!(lc.pick(&backends, &PickContext::with_random(7)), Some(1));
        // Weight 4 with 9 in flight: (9+1)/4 = 2.5 < (2+1)/1 = 3.
        backends[0].weight = 4;
        backends[0].in_flight = 9;
        assert_eq!(lc.pick(&backends, &PickContext::with_random(7)), Some(0));
    }

    #[test]
    fn ties_spread_over_all() {
        for n in [4usize, 40, 100] {
            let backends = vec![StaticCandidate::new(1); n];
            let lc = LeastConn::new(&vec![1; n]);
            lc.refresh_all(&backends);
            let mut seen = vec![0usize; n];
            let picks = 100 * n as u64;
            for i in 0..picks {
                seen[lc
                    .pick(&backends, &PickContext::with_random(splitmix64(i)))
                    .unwrap()] += 1;
            }
            assert!(seen.iter().all(|&c| c > 50), "{n}: {seen:?}");
        }
    }

    /// Ties spread evenly even over a ragged tree (33 leaves in a 64-leaf tree) and over a
    /// subset of tied backends.
    #[test]
    fn ties_spread_evenly_over_a_ragged_tree() {
        let mut backends = vec![StaticCandidate::new(1); 33];
        for (i, b) in backends.iter_mut().enumerate() {
            b.in_flight = u32::from(i % 3 == 0);
        }
        let lc = LeastConn::new(&[1; 33]);
        lc.refresh_all(&backends);
        let mut seen = [0usize; 33];
        for i in 0..44_000 {
            seen[lc
                .pick(&backends, &PickContext::with_random(splitmix64(i)))
                .unwrap()] += 1;
        }
        for (i, &c) in seen.iter().enumerate() {
            if i % 3 == 0 {
                assert_eq!(c, 0, "{seen:?}");
            } else {
                // 22 tied backends: 2000 each expected.
                assert!((1700..2300).contains(&c), "{seen:?}");
            }
        }
    }

    #[test]
    fn none_when_nothing_usable() {
        for n in [2usize, 40] {
            let mut backends = vec![StaticCandidate::new(1); n];
            for b in &mut backends[1..] {
                b.eligible = false;
            }
            let lc = LeastConn::new(&vec![1; n]);
            lc.refresh_all(&backends);
            let ctx = PickContext {
                excluded: &[0],
                ..PickContext::with_random(1)
            };
            assert_eq!(lc.pick(&backends, &ctx), None);
            assert_eq!(lc.pick(&backends, &PickContext::with_random(1)), Some(0));
            assert_eq!(lc.pick::<StaticCandidate>(&[], &ctx), None);
        }
    }

    fn random_state(seed: u64, n: usize) -> Vec<StaticCandidate> {
        (0..n as u64)
            .map(|i| {
                let h = splitmix64(seed ^ splitmix64(i));
                StaticCandidate {
                    weight: match h % 10 {
                        0 => 0,
                        1..=3 => 1 + (h >> 8) as u32 % 300,
                        _ => 100,
                    },
                    in_flight: (h >> 20) as u32 % 6,
                    eligible: !(h >> 40).is_multiple_of(7),
                }
            })
            .collect()
    }

    /// The best load among usable backends, exactly (by the linear scan).
    fn best(backends: &[StaticCandidate], ctx: &PickContext<'_>) -> Option<(u32, u32)> {
        scan(backends, ctx).map(|i| (backends[i].in_flight, backends[i].weight))
    }

    fn assert_least<'a>(
        lc: &LeastConn,
        backends: &[StaticCandidate],
        ctx: &PickContext<'a>,
        what: &str,
    ) {
        let picked = lc.pick(backends, ctx);
        match (picked, best(backends, ctx)) {
            (None, None) => {}
            (Some(i), Some((in_flight, weight))) => {
                assert!(ctx.usable(i, &backends[i]), "{what}: picked unusable {i}");
                let b = &backends[i];
                assert!(
                    !less_loaded(in_flight, weight, b.in_flight, b.weight),
                    "{what}: picked {i} ({}/{}) but ({in_flight}/{weight}) is less loaded",
                    b.in_flight,
                    b.weight
                );
            }
            (picked, best) => panic!("{what}: picked {picked:?}, best {best:?}"),
        }
    }

    #[test]
    fn tree_is_exact_on_random_states() {
        for seed in 0..200u64 {
            let n = 17 + (splitmix64(seed) % 300) as usize;
            let mut backends = random_state(seed, n);
            let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
            let lc = LeastConn::new(&weights);
            assert!(lc.tracks_load());
            lc.refresh_all(&backends);
            for step in 0..50u64 {
                let random = splitmix64(seed << 32 | step);
                let excluded = [
                    bounded(random, n),
                    bounded(splitmix64(random), n),
                    scan(&backends, &PickContext::with_random(random)).unwrap_or(0),
                ];
                let ctx = PickContext {
                    excluded: &excluded[..(step % 4).min(3) as usize],
                    ..PickContext::with_random(random)
                };
                assert_least(&lc, &backends, &ctx, &format!("seed {seed} step {step}"));
                // With every change notified, the first descent succeeds: no scan fallback.
                let tree = lc.tree.as_ref().unwrap();
                let plain = PickContext::with_random(random);
                if scan(&backends, &plain).is_some() {
                    let first = tree.descend(tree.load(1), random);
                    assert_eq!(tree.load(tree.leaves + first), leaf_value(&backends[first]));
                    assert_eq!(tree.pick(&backends, &plain), Some(Some(first)));
                }
                // Change one backend and notify.
                let i = bounded(splitmix64(random ^ 1), n);
                let h = splitmix64(random ^ 2);
                match h % 8 {
                    0 => backends[i].eligible = !backends[i].eligible,
                    1 => backends[i].weight = (h >> 8) as u32 % 200,
                    2..=4 => backends[i].in_flight += 1,
                    _ => backends[i].in_flight = backends[i].in_flight.saturating_sub(1),
                }
                lc.load_changed(i, &backends);
            }
        }
    }

    #[test]
    fn stale_tree_heals() {
        let n = 64;
        let mut backends = vec![StaticCandidate::new(1); n];
        let lc = LeastConn::new(&vec![1; n]);
        lc.refresh_all(&backends);
        // Every backend but 63 gets busy without any notification: the tree still believes
        // all are idle, yet picks find 63 (stale leaves are repaired as they are reached,
        // and the exact scan backs up the few descents that keep hitting stale ones).
        for b in &mut backends[..63] {
            b.in_flight = 5;
        }
        for i in 0..20 {
            assert_eq!(
                lc.pick(&backends, &PickContext::with_random(splitmix64(i))),
                Some(63)
            );
        }
        // Backends going down unnoticed are never picked.
        backends[63].eligible = false;
        backends[10].in_flight = 0;
        lc.load_changed(10, &backends);
        backends[10].eligible = false;
        for i in 0..20 {
            let picked = lc
                .pick(&backends, &PickContext::with_random(splitmix64(i)))
                .unwrap();
            assert!(backends[picked].eligible && picked != 10, "{picked}");
        }
        // After a refresh the tree is exact again without repairs.
        lc.refresh_all(&backends);
        let tree = lc.tree.as_ref().unwrap();
        assert_eq!(key(tree.load(1)), load_key(5, 1).unwrap());
        assert_eq!(count(tree.load(1)), 62);
        // A root left too low by a lost race is repaired by the pick that trips over it.
        let right = tree.load(1);
        tree.nodes[1].store((1 << COUNT_BITS) | 1, Ordering::Relaxed);
        let picked = lc.pick(&backends, &PickContext::with_random(3)).unwrap();
        assert!(backends[picked].eligible && backends[picked].in_flight == 5);
        assert_eq!(tree.load(1), right);
    }

    /// A backend whose in-flight count other threads change.
    struct Live {
        in_flight: std::sync::atomic::AtomicU32,
        weight: u32,
        eligible: bool,
    }

    impl Candidate for Live {
        fn weight(&self) -> u32 {
            self.weight
        }
        fn in_flight(&self) -> u32 {
            self.in_flight.load(Ordering::Relaxed)
        }
        fn is_eligible(&self) -> bool {
            self.eligible
        }
    }

    /// Four threads pick, start and end requests, notifying each change, all at once: every
    /// pick is usable, the tree is (nearly) consistent once quiet, and a refresh makes it
    /// exact.
    #[test]
    fn concurrent_picks_and_notifications() {
        let n = 200;
        let backends: Vec<Live> = (0..n)
            .map(|i| Live {
                in_flight: 0.into(),
                weight: 1 + i as u32 % 3,
                eligible: i % 10 != 3,
            })
            .collect();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight).collect();
        let lc = LeastConn::new(&weights);
        lc.refresh_all(&backends);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let (lc, backends) = (&lc, &backends);
                s.spawn(move || {
                    let mut random = t;
                    let mut held = std::collections::VecDeque::new();
                    for _ in 0..20_000 {
                        random = splitmix64(random);
                        let i = lc
                            .pick(backends, &PickContext::with_random(random))
                            .unwrap();
                        assert!(backends[i].eligible);
                        backends[i].in_flight.fetch_add(1, Ordering::Relaxed);
                        lc.load_changed(i, backends);
                        held.push_back(i);
                        if held.len() > 50 {
                            let done = held.pop_front().unwrap();
                            backends[done].in_flight.fetch_sub(1, Ordering::Relaxed);
                            lc.load_changed(done, backends);
                        }
                    }
                    for done in held {
                        backends[done].in_flight.fetch_sub(1, Ordering::Relaxed);
                        lc.load_changed(done, backends);
                    }
                });
            }
        });
        assert!(backends.iter().all(|b| b.in_flight() == 0));
        {
            let tree = lc.tree.as_ref().unwrap();
            let stale = (1..2 * tree.leaves)
                .filter(|&node| {
                    if node >= tree.leaves {
                        let i = node - tree.leaves;
                        tree.load(node) != backends.get(i).map_or(EMPTY, leaf_value)
                    } else {
                        tree.load(node) != combine(tree.load(2 * node), tree.load(2 * node + 1))
                    }
                })
                .count();
            // Lost races may leave a few nodes stale until the refresh (in practice none).
            assert!(stale * 10 < 2 * tree.leaves, "{stale} stale nodes");
        }
        lc.refresh_all(&backends);
        let tree = lc.tree.as_ref().unwrap();
        // Weight 3 backends (66 of them, 6 ineligible) are the least loaded when idle.
        assert_eq!(key(tree.load(1)), load_key(0, 3).unwrap());
        assert_eq!(count(tree.load(1)), 60);
        let picked = lc.pick(&backends, &PickContext::with_random(9)).unwrap();
        assert_eq!(backends[picked].weight, 3);
    }

    #[test]
    fn keys_follow_exact_order() {
        for a in 0..20u32 {
            for wa in 1..40u32 {
                for (b, wb) in [(3u32, 7u32), (0, 1), (10, 33), (1, 2)] {
                    if less_loaded(a, wa, b, wb) {
                        assert!(load_key(a, wa) < load_key(b, wb));
                    }
                }
            }
        }
        assert_eq!(load_key(1, 0), None);
        assert!(load_key(u32::MAX, 1).unwrap() < KEY_NONE);
    }
}
