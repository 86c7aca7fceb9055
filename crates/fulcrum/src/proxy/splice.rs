//! Zero-copy relaying between two TCP sockets on Linux with splice(2): bytes go from one
//! socket into a pipe and from the pipe into the other socket inside the kernel, never through
//! a user-space buffer. Safe wrappers (nix) only; readiness comes from tokio.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};

use nix::fcntl::{splice, OFlag, SpliceFFlags};
use nix::unistd::pipe2;
use tokio::io::Interest;
use tokio::net::TcpStream;

/// Most bytes moved per splice call: the default pipe capacity (16 pages).
const PIPE_CHUNK: usize = 64 * 1024;

/// The result of one splice of up to `asked` bytes that moved `moved`. A short move (some, but
/// less than asked) means the socket was drained (or filled) at that moment, as tokio's own
/// reads and writes assume on Linux: it is reported as `WouldBlock` with the count in
/// `short`, so `try_io` clears the readiness it saw. The next splice then waits for epoll's
/// next edge instead of costing a syscall that would only return EAGAIN. (tokio clears only
/// the readiness event it observed: one that arrived meanwhile is kept.)
fn drained(moved: usize, asked: usize, short: &mut usize) -> io::Result<usize> {
    if moved > 0 && moved < asked {
        *short = moved;
        return Err(io::ErrorKind::WouldBlock.into());
    }
    Ok(moved)
}

/// Moves bytes from `src` to `dst` until `src` ends (then shuts down `dst`'s write side),
/// counting them into `local` and `shared`.
pub async fn pump(
    src: &TcpStream,
    dst: &TcpStream,
    local: &AtomicU64,
    shared: &AtomicU64,
) -> io::Result<()> {
    let (pipe_read, pipe_write) = pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        // The pipe is empty here, so EAGAIN can only mean "src has nothing to read".
        let filled = loop {
            src.readable().await?;
            let mut short = 0;
            match src.try_io(Interest::READABLE, || {
                let n = splice(src, None, &pipe_write, None, PIPE_CHUNK, flags)?;
                drained(n, PIPE_CHUNK, &mut short)
            }) {
                Ok(n) => break n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && short > 0 => {
                    break short
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {} // wait for readiness again
                Err(error) => return Err(error),
            }
        };
        if filled == 0 {
            match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
                Err(error) if error.kind() != io::ErrorKind::NotConnected => return Err(error),
                _ => return Ok(()),
            }
        }
        local.fetch_add(filled as u64, Ordering::Relaxed);
        shared.fetch_add(filled as u64, Ordering::Relaxed);
        // The pipe holds data here, so EAGAIN can only mean "dst cannot take more now".
        let mut left = filled;
        while left > 0 {
            dst.writable().await?;
            let mut short = 0;
            match dst.try_io(Interest::WRITABLE, || {
                let n = splice(&pipe_read, None, dst, None, left, flags)?;
                drained(n, left, &mut short)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => left -= n,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock && short > 0 => {
                    left -= short
                }
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {} // wait for readiness again
                Err(error) => return Err(error),
            }
        }
    }
}
