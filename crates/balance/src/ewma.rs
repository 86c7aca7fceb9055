//! Peak-EWMA latency estimate (as in Finagle and Linkerd): a slower sample raises the estimate
//! at once, faster samples pull it down gradually, and with no samples it decays towards zero
//! over time, so a backend that was slow is tried again later.
//!
//! The state is two atomics; readers never write, writers use one compare-and-swap loop.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Default decay time constant: after this long without samples the estimate has fallen to
/// 1/e (37%) of its value.
pub const DEFAULT_DECAY: Duration = Duration::from_secs(10);

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
    /// Decay time constant in nanoseconds (at least 1).
    decay_ns: f64,
    /// `1 / decay_ns`, so reads multiply instead of divide.
    inv_decay: f64,
}

impl Default for PeakEwma {
    fn default() -> Self {
        PeakEwma::new(DEFAULT_DECAY)
    }
}

impl PeakEwma {
    /// An empty estimate decaying with time constant `decay` (see [`DEFAULT_DECAY`]).
    pub fn new(decay: Duration) -> Self {
        let decay_ns = (decay.as_nanos() as f64).max(1.0);
        PeakEwma {
            cost_bits: AtomicU64::new(0f64.to_bits()),
            stamp_ns: AtomicU64::new(0),
            decay_ns,
            inv_decay: 1.0 / decay_ns,
        }
    }

    /// The decay time constant.
    pub fn decay(&self) -> Duration {
        Duration::from_nanos(self.decay_ns as u64)
    }

    /// Records one round-trip time observed at `now_ns` (> 0): a sample above the current
    /// estimate replaces it (peak), a lower one is averaged in with weight `1 - e^(-Δt/τ)`.
    pub fn observe(&self, rtt_ns: u64, now_ns: u64) {
        let rtt = rtt_ns as f64;
        let now_ns = now_ns.max(1);
        let stamp = self.stamp_ns.swap(now_ns, Ordering::AcqRel);
        let elapsed = now_ns.saturating_sub(stamp) as f64;
        let mut current = self.cost_bits.load(Ordering::Acquire);
        loop {
            let cost = f64::from_bits(current);
            let next = if stamp == 0 || rtt > cost {
                rtt
            } else {
                let w = (-elapsed * self.inv_decay).exp();
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
        ((cost * (-(elapsed as f64) * self.inv_decay).exp()) as u64).max(1)
    }

    /// Forgets everything: the backend is unknown again (e.g. after it recovered).
    pub fn reset(&self) {
        self.stamp_ns.store(0, Ordering::Release);
        self.cost_bits.store(0f64.to_bits(), Ordering::Release);
    }
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
        // A fast sample right after a peak barely moves it; one much later dominates.
        ewma.observe(MS, S + 2);
        assert!(ewma.estimate(S + 2) > 49 * MS);
        ewma.observe(MS, 100 * S);
        let settled = ewma.estimate(100 * S);
        assert!((MS..MS + MS / 100).contains(&settled), "{settled}");
    }

    #[test]
    fn decays_towards_zero_but_stays_known() {
        let ewma = PeakEwma::new(Duration::from_millis(1));
        ewma.observe(50 * MS, 1);
        assert_eq!(ewma.estimate(1000 * S), 1);
    }
}
