//! Child processes that do not outlive Fulcrum: the kernel sends them SIGTERM when the thread
//! that started them dies (the autoscaler's local backend processes).

#![allow(unsafe_code)]

use tokio::process::Command;

/// Makes `command`'s child receive SIGTERM when its parent thread exits (`PR_SET_PDEATHSIG`).
pub fn terminate_with_parent(command: &mut Command) {
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call (prctl); it allocates nothing and takes no lock.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
}
