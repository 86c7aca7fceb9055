//! A monotonic clock in nanoseconds since process start: cheap to store in an atomic.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Nanoseconds elapsed since the first call in this process (monotonic, never 0 after start).
pub fn now_ns() -> u64 {
    origin().elapsed().as_nanos() as u64 + 1
}

/// The instant `now_ns()` returned `ns` at.
pub fn instant_at(ns: u64) -> Instant {
    origin() + std::time::Duration::from_nanos(ns.saturating_sub(1))
}

/// Says yes at most once per second of [`now_ns`], across threads: for the log line of a
/// refusal that a flood would repeat (the refusals themselves are all counted elsewhere).
#[derive(Debug, Default)]
pub struct OncePerSecond {
    /// The second (of `now_ns`, plus one) of the last yes; 0 before the first.
    last: std::sync::atomic::AtomicU64,
}

impl OncePerSecond {
    /// Whether to log now: true at most once per second.
    pub fn ready(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let now = now_ns() / 1_000_000_000 + 1;
        let last = self.last.load(Relaxed);
        last != now
            && self
                .last
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_second_says_yes_once() {
        let gate = OncePerSecond::default();
        assert!(gate.ready());
        assert!(!gate.ready());
        assert!(!gate.ready());
    }
}
