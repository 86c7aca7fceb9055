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
