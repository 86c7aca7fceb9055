//! A lock-free latency histogram: fixed buckets of atomics, observed on the hot path without
//! a lock (prometheus-client's own histogram takes a lock per observation).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the usual Prometheus spread from 0.5 ms to 10 s).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Bucket bounds in microseconds, for integer comparison on the hot path.
const BUCKETS_MICROS: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// Counts of observations per bucket (non-cumulative; the last slot is +Inf), their sum and
/// count.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; 15],
    sum_micros: AtomicU64,
}

impl LatencyHistogram {
    /// Records one observation.
    #[inline]
    pub fn observe(&self, elapsed: Duration) {
        let micros = elapsed.as_micros() as u64;
        let slot = BUCKETS_MICROS.partition_point(|&bound| bound < micros);
        self.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts as (upper bound, count)) for exposition.
    /// Bucket counts are not cumulative: the encoder accumulates them.
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = BUCKETS
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(&self.counts)
            .map(|(bound, count)| (bound, count.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, c)| c).sum();
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_the_right_buckets() {
        let histogram = LatencyHistogram::default();
        histogram.observe(Duration::from_micros(400));
        histogram.observe(Duration::from_micros(500));
        histogram.observe(Duration::from_millis(3));
        histogram.observe(Duration::from_secs(60));
        let (sum, count, buckets) = histogram.snapshot();
        assert_eq!(count, 4);
        assert!((sum - 60.0039).abs() < 1e-9);
        assert_eq!(buckets[0], (0.0005, 2));
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets[13], (10.0, 0));
        assert_eq!(buckets[14], (f64::INFINITY, 1));
    }
}
