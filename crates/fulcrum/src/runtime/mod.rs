//! Layer 1, runtime: what every other layer runs on — the coarse clock, the housekeeping
//! ticker, the worker threads, memory return and the allocator, and the recent-events log.

pub mod allocator;
pub mod clock;
pub mod events;
pub mod memory;
pub mod tick;
pub mod workers;
