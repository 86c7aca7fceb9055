//! The only unsafe code of Fulcrum. The rest of the workspace forbids `unsafe`; each module
//! here wraps one unsafe interface in a safe one and argues, at the unsafe block, why the
//! wrapper upholds its contract:
//!
//! - [`alloc`]: mimalloc as the global allocator, and returning freed memory to the OS.
//! - [`epoll`] (Linux): an epoll set registered with tokio's reactor.
//! - [`process`] (Linux): a child process that is sent SIGTERM when Fulcrum dies.

pub mod alloc;
#[cfg(target_os = "linux")]
pub mod epoll;
#[cfg(target_os = "linux")]
pub mod process;
