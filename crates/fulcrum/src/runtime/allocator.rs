//! The global allocator of the `fulcrum` binary: mimalloc, through `fulcrum-sys` (the
//! workspace's unsafe code lives there), called at natural alignment with plain `mi_malloc`.

pub use fulcrum_sys::alloc::{collect_freed_memory, MiMalloc};
