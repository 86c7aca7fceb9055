//! An epoll set registered with tokio's reactor, so one task can wait until any of the
//! descriptors in the set is ready (the parking lot of idle client connections uses it).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use nix::sys::epoll::{Epoll, EpollCreateFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// An epoll set that owns its descriptor for as long as it lives.
#[derive(Debug)]
pub struct OwnedEpoll(Epoll);

impl OwnedEpoll {
    /// The epoll set, to add, delete and wait on.
    pub fn epoll(&self) -> &Epoll {
        &self.0
    }
}

impl AsRawFd for OwnedEpoll {
    fn as_raw_fd(&self) -> RawFd {
        self.0 .0.as_raw_fd()
    }
}

/// A new close-on-exec epoll set, registered with the current tokio runtime's reactor for
/// readability (it is readable when a descriptor in it is ready). Must be called on a runtime.
pub fn register_new() -> io::Result<AsyncFd<OwnedEpoll>> {
    let epoll = OwnedEpoll(Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?);
    // SAFETY: `OwnedEpoll` owns its descriptor (an `OwnedFd` inside `Epoll`, never replaced:
    // the field is private and nothing hands out a mutable reference to it), so it stays open
    // and the same for as long as the `AsyncFd` holds it, and `as_raw_fd` always returns it.
    unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }.map_err(io::Error::from)
}
