//! Giving freed memory back to the OS once client connections go idle.
//!
//! A parked connection (see `server/park.rs`) frees its hyper buffers, but mimalloc only
//! returns freed pages to the OS (after its purge delay) when the allocator is used again on
//! the same thread, which an idle process never does. So parking marks the thread, and the
//! thread asks mimalloc to collect: at once when it has not for a second, otherwise at the
//! next housekeeping tick on that thread (`collect_if_parked`): the pool manager's with one
//! worker, each worker thread's own 250 ms tick with per-core workers (`workers.rs`).

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Least time between two collections on one thread.
const MIN_INTERVAL: Duration = Duration::from_secs(1);

thread_local! {
    /// Whether a connection parked on this thread since its last collection.
    static PARKED_SINCE_COLLECT: Cell<bool> = const { Cell::new(false) };
    /// When this thread last collected.
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// A client connection on this thread was parked (its buffers were just freed).
pub fn connection_parked() {
    PARKED_SINCE_COLLECT.with(|parked| parked.set(true));
    let due = LAST_COLLECT.with(|last| last.get().is_none_or(|at| at.elapsed() >= MIN_INTERVAL));
    if due {
        collect();
    }
}

/// Collects when a connection parked on this thread since the last collection (called
/// periodically, so the last connections of an idle wave are covered too).
pub fn collect_if_parked() {
    if PARKED_SINCE_COLLECT.with(Cell::get) {
        collect();
    }
}

fn collect() {
    PARKED_SINCE_COLLECT.with(|parked| parked.set(false));
    LAST_COLLECT.with(|last| last.set(Some(Instant::now())));
    // Forced, because the non-forced pass leaves pages still inside mimalloc's purge delay
    // (measured: 18.2 KB per idle connection non-forced, 3.7 KB forced); its cost is bounded
    // by collecting at most once a second per thread, and only after connections parked.
    super::allocator::collect_freed_memory();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parking_collects_at_most_once_a_second_then_at_the_next_tick() {
        connection_parked();
        let first = LAST_COLLECT
            .with(Cell::get)
            .expect("the first park collects at once");
        assert!(!PARKED_SINCE_COLLECT.with(Cell::get));
        connection_parked();
        assert_eq!(LAST_COLLECT.with(Cell::get), Some(first), "throttled");
        assert!(PARKED_SINCE_COLLECT.with(Cell::get), "left for the tick");
        collect_if_parked();
        assert!(!PARKED_SINCE_COLLECT.with(Cell::get));
        assert!(LAST_COLLECT.with(Cell::get).unwrap() > first);
    }
}
