//! Peak-EWMA latency estimate (as in Finagle and Linkerd): a slower sample raises the estimate
//! at once, faster samples pull it down gradually, and with no samples it decays towards zero
//! over time, so a backend that was slow is tried again later.
//!
//! Unlike Finagle's purely time-based weights, every faster sample pulls the estimate at least
//! [`MIN_SAMPLE_WEIGHT`] of the way down. With time weights alone a busy backend (tens of
//! thousands of samples a second, each weighing `1 - e^(-Δt/τ)` ≈ Δt/τ) keeps its worst
//! moment of the last τ seconds as its estimate, so one scheduling hiccup makes a fast server
//! look as slow as a truly slow one for seconds; with the floor it forgets a one-off peak after
//! about a hundred faster answers, while a server that stays slow keeps a high estimate.
//!
//! The state is two atomics; readers never write, writers use one compare-and-swap loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Default decay time constant: after this long without samples the estimate has fallen to
/// 1/e (37%) of its value.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

/// The least weight a sample below the estimate gets, however soon it follows the previous
/// one: the estimate forgets a one-off peak within ~`3 / MIN_SAMPLE_WEIGHT` faster samples.
pub const MIN_SAMPLE_WEIGHT: f64 = 1.0 / 32.0;

/// A lock-free peak-EWMA latency estimate in nanoseconds.
///
/// Times are caller-supplied monotonic nanoseconds (`now_ns`), so the struct needs no clock
/// and tests are exact. Unknown (nothing observed yet, or [`PeakEwma::reset`]) reads as 0.
#[derive(Debug)]
pub struct PeakEwma {
    /// The estimate at `stamp_ns`, as `f64` bits.
    cost_bits: AtomicU64,
    /// When the estimate was last updated; 0 = nothing known.
    stamp_ns: AtomicU64,
    /// `1 / τ` in 1/nanoseconds as `f64` bits (τ at least 1 ns), so reads multiply instead of
    /// divide; an atomic so a pool's configured decay can change while traffic flows.
    inv_decay_bits: AtomicU64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma::new(DEFAULT_DECAY)
    }
}

impl PeakEwma {
    /// An empty estimate decaying with time constant `decay` (see [`DEFAULT_DECAY`]).
    pub fn new(decay: Duration) -> Self {
        PeakEwma {
            cost_bits: AtomicU64::new(0f64.to_bits()),
            stamp_ns: AtomicU64::new(0),
            inv_decay_bits: AtomicU64::new(inverse_ns(decay).to_bits()),
        }
    }

    /// The decay time constant.
    pub fn decay(&self) -> Duration {
        Duration::from_nanos((1.0 / self.inv_decay()).round() as u64)
    }

    /// Changes the decay time constant; the current estimate is kept.
    pub fn set_decay(&self, decay: Duration) {
        self.inv_decay_bits
            .store(inverse_ns(decay).to_bits(), Ordering::Relaxed);
    }

    #[inline]
    fn inv_decay(&self) -> f64 {
        f64::from_bits(self.inv_decay_bits.load(Ordering::Relaxed))
    }

    /// Records one round-trip time observed at `now_ns` (> 0): a sample above the current
    /// estimate replaces it (peak), a lower one is averaged in with weight
    /// `max(1 - e^(-Δt/τ), MIN_SAMPLE_WEIGHT)`.
    pub fn observe(&self, rtt_ns: u64, now_ns: u64) {
        let rtt = rtt_ns as f64;
        let now_ns = now_ns.max(1);
        let stamp = self.stamp_ns.swap(now_ns, Ordering::AcqRel);
        let elapsed = now_ns.saturating_sub(stamp) as f64;
        let inv_decay = self.inv_decay();
        let mut current = self.cost_bits.load(Ordering::Acquire);
        loop {
            let cost = f64::from_bits(current);
            let next = if stamp == 0 || rtt > cost {
                rtt
            } else {
                let w = (-elapsed * inv_decay).exp().min(1.0 - MIN_SAMPLE_WEIGHT);
                cost * w + rtt * (1.0 - w)
            };
            match self.cost_bits.compare_exchange_weak(
                current,
                next.to_bits(),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The estimate at `now_ns` in nanoseconds: the last value decayed by the time since it
    /// was set. 0 when nothing is known; at least 1 otherwise.
    pub fn estimate(&self, now_ns: u64) -> u64 {
        let stamp = self.stamp_ns.load(Ordering::Acquire);
        if stamp == 0 {
            return 0;
        }
        let cost = f64::from_bits(self.cost_bits.load(Ordering::Acquire));
        let elapsed = now_ns.saturating_sub(stamp);
        if elapsed == 0 {
            return (cost as u64).max(1);
        }
        ((cost * (-(elapsed as f64) * self.inv_decay()).exp()) as u64).max(1)
    }

    /// Forgets everything: the backend is unknown again (e.g. after it recovered).
    pub fn reset(&self) {
        self.stamp_ns.store(0, Ordering::Release);
        self.cost_bits.store(0f64.to_bits(), Ordering::Release);
    }
}

/// `1 / decay` in 1/nanoseconds, with the decay at least 1 ns.
fn inverse_ns(decay: Duration) -> f64 {
    1.0 / (decay.as_nanos() as f64).max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;

    #[test]
    fn unknown_until_observed() {
        let ewma = PeakEwma::default();
        assert_eq!(ewma.estimate(5 * S), 0);
        ewma.observe(3 * MS, S);
        assert_eq!(ewma.estimate(S), 3 * MS);
        ewma.reset();
        assert_eq!(ewma.estimate(2 * S), 0);
    }

    #[test]
    fn peaks_jump_up_and_decay_down() {
        let ewma = PeakEwma::new(Duration::from_secs(10));
        ewma.observe(MS, S);
        ewma.observe(50 * MS, S + 1);
        assert_eq!(ewma.estimate(S + 1), 50 * MS, "peak taken at once");
        // Ten seconds later with no samples: e^-1 of it.
        let later = ewma.estimate(11 * S + 1);
        assert!((18 * MS..19 * MS).contains(&later), "{later}");
        // A fast sample right after a peak moves it by MIN_SAMPLE_WEIGHT; one much later dominates.
        ewma.observe(MS, S + 2);
        let expected = 50.0 * (1.0 - MIN_SAMPLE_WEIGHT) + MIN_SAMPLE_WEIGHT;
        let moved = ewma.estimate(S + 2) as f64 / MS as f64;
        assert!((moved - expected).abs() < 0.01, "{moved} ms");
        ewma.observe(MS, 100 * S);
        let settled = ewma.estimate(100 * S);
        assert!((MS..MS + MS / 100).contains(&settled), "{settled}");
    }

    #[test]
    fn frequent_fast_samples_forget_a_peak() {
        // A busy backend: a sample every 40 µs, one 10 ms hiccup among 0.5 ms answers.
        let ewma = PeakEwma::new(Duration::from_secs(10));
        let mut now = S;
        ewma.observe(MS / 2, now);
        now += 40_000;
        ewma.observe(10 * MS, now);
        assert_eq!(ewma.estimate(now), 10 * MS);
        for _ in 0..100 {
            now += 40_000;
            ewma.observe(MS / 2, now);
        }
        // 4 ms later the hiccup is mostly forgotten (time weights alone: still ~10 ms).
        let settled = ewma.estimate(now);
        assert!(settled < MS, "{settled}");
        // A backend that stays slow keeps its estimate.
        for _ in 0..100 {
            now += 40_000;
            ewma.observe(10 * MS, now);
        }
        assert_eq!(ewma.estimate(now), 10 * MS);
    }

    #[test]
    fn decay_can_change_while_in_use() {
        let ewma = PeakEwma::new(Duration::from_secs(10));
        assert_eq!(ewma.decay(), Duration::from_secs(10));
        ewma.observe(50 * MS, S);
        ewma.set_decay(Duration::from_secs(1));
        assert_eq!(ewma.decay(), Duration::from_secs(1));
        // One second later: e^-1 of the peak under the new time constant.
        let later = ewma.estimate(2 * S);
        assert!((18 * MS..19 * MS).contains(&later), "{later}");
    }

    #[test]
    fn decays_towards_zero_but_stays_known() {
        let ewma = PeakEwma::new(Duration::from_millis(1));
        ewma.observe(50 * MS, 1);
        assert_eq!(ewma.estimate(1000 * S), 1);
    }
}
