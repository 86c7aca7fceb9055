//! Slow start: a backend that joins or recovers takes a growing share of traffic, from
//! [`SLOW_START_FLOOR_PERCENT`] of its weight to all of it, linearly over the ramp duration.

use std::time::Duration;

/// Share of its weight a backend gets at the very start of its ramp.
pub const SLOW_START_FLOOR_PERCENT: u8 = 10;

/// The slow-start factor in percent (10..=100) for a backend whose ramp began `elapsed` ago
/// and lasts `ramp`. A zero `ramp` (slow start off) gives 100.
pub fn slow_start_percent(elapsed: Duration, ramp: Duration) -> u8 {
    if ramp.is_zero() || elapsed >= ramp {
        return 100;
    }
    let floor = u128::from(SLOW_START_FLOOR_PERCENT);
    let grown = (100 - floor) * elapsed.as_nanos() / ramp.as_nanos();
    (floor + grown) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ramps_linearly_from_floor_to_full() {
        let ramp = Duration::from_secs(10);
        assert_eq!(slow_start_percent(Duration::ZERO, ramp), 10);
        assert_eq!(slow_start_percent(Duration::from_secs(5), ramp), 55);
        assert_eq!(slow_start_percent(Duration::from_millis(9999), ramp), 99);
        assert_eq!(slow_start_percent(ramp, ramp), 100);
        assert_eq!(slow_start_percent(Duration::from_secs(60), ramp), 100);
        assert_eq!(slow_start_percent(Duration::ZERO, Duration::ZERO), 100);
    }

    #[test]
    fn never_decreases() {
        let ramp = Duration::from_millis(777);
        let mut last = 0;
        for ms in 0..1000 {
            let p = slow_start_percent(Duration::from_millis(ms), ramp);
            assert!(p >= last && (10..=100).contains(&p));
            last = p;
        }
    }
}
