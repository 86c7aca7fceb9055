//! Layer 1, runtime: what every other layer runs on — the coarse clock, the housekeeping
//! ticker, the worker threads, memory return and the allocator, the recent-events log, and the
//! open file limit.

pub mod allocator;
pub mod clock;
pub mod events;
pub mod fdlimit;
pub mod memory;
pub mod tick;
pub mod workers;
