//! The parking lot: idle client connections that wait for their next request without a task
//! or a tokio registration of their own (Linux).
//!
//! A parked connection (see `park.rs`) has given back hyper's buffers, but it used to keep its
//! task (about 1 KiB with its future) and its registration in tokio's reactor while it waited
//! for the client. A lot is a private epoll set instead, one per listener and worker. Parking
//! takes the socket out of tokio and adds it to the set, and the connection's task ends.
//!
//! What remains per parked connection is the socket, the caller's value (the connection's
//! context) and a deadline: some 50 bytes in the lot. One task per lot ([`Lot::run`]) waits
//! for the set's own descriptor (registered with tokio) to become readable.
//! - A socket with data is taken out of the set and handed back to the caller, which serves
//!   it in a fresh task.
//! - A socket the client closed is closed.
//! - A socket still idle at `keep_alive_timeout` is closed.
//! - Everything left is closed when the server drains.

use std::collections::VecDeque;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fulcrum_sys::epoll::OwnedEpoll;
use nix::errno::Errno;
use nix::sys::epoll::{EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

/// Events taken from the set per wake-up.
const EVENTS_PER_WAKE: usize = 64;

/// The epoll set, as a descriptor tokio can watch. Owns the descriptor for its whole life.
/// Idle connections of one listener on one worker; see the module doc.
pub(crate) struct Lot<T> {
    epoll: AsyncFd<OwnedEpoll>,
    keep_alive_timeout: Duration,
    state: Mutex<State<T>>,
    /// Wakes [`Lot::run`] when a connection parks in an empty lot (to set its timer).
    parked_in_empty: Notify,
    /// Connections parked here now, added to a count the listener shares with its other lots.
    gauge: Arc<AtomicU64>,
}

struct State<T> {
    /// Parked connections by slot; `free` lists the empty slots.
    slots: Vec<Option<Parked<T>>>,
    free: Vec<u32>,
    /// (deadline, slot, generation) in parking order, which is deadline order.
    deadlines: VecDeque<(Instant, u32, u32)>,
    /// Tells a slot's successive occupants apart (stale deadlines and events).
    generation: u32,
    parked: usize,
}

struct Parked<T> {
    stream: std::net::TcpStream,
    value: T,
    generation: u32,
}

impl<T> Lot<T> {
    /// An empty lot whose connections close after `keep_alive_timeout` without data; `gauge`
    /// counts its parked connections (with other lots'). Must be called on the runtime that
    /// will run [`Lot::run`].
    pub(crate) fn new(keep_alive_timeout: Duration, gauge: Arc<AtomicU64>) -> io::Result<Self> {
        let epoll = fulcrum_sys::epoll::register_new()?;
        Ok(Lot {
            epoll,
            keep_alive_timeout,
            state: Mutex::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                deadlines: VecDeque::new(),
                generation: 0,
                parked: 0,
            }),
            parked_in_empty: Notify::new(),
            gauge,
        })
    }

    /// How many connections are parked here now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().parked
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Parks `stream` with `value` until the client sends again. `Err` gives them back when
    /// the socket cannot be watched here (the caller then waits in its own task); a socket that
    /// cannot be taken out of tokio is closed (`Ok`).
    pub(crate) fn park(&self, stream: TcpStream, value: T) -> Result<(), (TcpStream, T)> {
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "cannot park a connection; closing it");
                return Ok(());
            }
        };
        let mut state = self.lock();
        let generation = state.generation;
        state.generation = state.generation.wrapping_add(1);
        let slot = match state.free.pop() {
            Some(slot) => slot,
            None => {
                state.slots.push(None);
                (state.slots.len() - 1) as u32
            }
        };
        let event = EpollEvent::new(
            EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP,
            key(slot, generation),
        );
        if let Err(error) = self.epoll.get_ref().epoll().add(&stream, event) {
            state.free.push(slot);
            drop(state);
            tracing::debug!(%error, "cannot add a connection to the parking lot");
            return match TcpStream::from_std(stream) {
                Ok(stream) => Err((stream, value)),
                Err(_) => Ok(()),
            };
        }
        let deadline = Instant::now() + self.keep_alive_timeout;
        state.deadlines.push_back((deadline, slot, generation));
        state.slots[slot as usize] = Some(Parked {
            stream,
            value,
            generation,
        });
        state.parked += 1;
        self.gauge.fetch_add(1, Ordering::Relaxed);
        let was_empty = state.parked == 1;
        drop(state);
        if was_empty {
            self.parked_in_empty.notify_one();
        }
        Ok(())
    }

    /// Takes slot `slot` out of the lot if `generation` still holds it.
    fn take(&self, state: &mut State<T>, slot: u32, generation: u32) -> Option<Parked<T>> {
        let entry = state.slots.get_mut(slot as usize)?;
        if entry.as_ref()?.generation != generation {
            return None;
        }
        let parked = entry.take()?;
        state.free.push(slot);
        state.parked -= 1;
        self.gauge.fetch_sub(1, Ordering::Relaxed);
        let _ = self.epoll.get_ref().epoll().delete(&parked.stream);
        Some(parked)
    }

    /// Serves the lot until `drain` changes (or its sender is dropped): hands every socket
    /// the client sends on to `resume` (with its value, registered with the current runtime),
    /// closes sockets the client closed or left idle past `keep_alive_timeout`, and finally
    /// closes whatever is still parked.
    pub(crate) async fn run(
        &self,
        drain: &mut watch::Receiver<()>,
        mut resume: impl FnMut(TcpStream, T),
    ) {
        let mut events = [EpollEvent::empty(); EVENTS_PER_WAKE];
        loop {
            let next_deadline = self.next_deadline();
            tokio::select! {
                biased;
                _ = drain.changed() => break,
                ready = self.epoll.readable() => {
                    let Ok(mut guard) = ready else { break };
                    let woken = match self.epoll.get_ref().epoll().wait(&mut events, EpollTimeout::ZERO) {
                        Ok(n) => n,
                        Err(Errno::EINTR) => continue,
                        Err(error) => {
                            tracing::error!(%error, "parking lot: epoll_wait failed");
                            0
                        }
                    };
                    if woken < events.len() {
                        guard.clear_ready();
                    }
                    for event in &events[..woken] {
                        self.wake(event.data(), &mut resume);
                    }
                }
                _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(far_future)),
                    if next_deadline.is_some() => self.expire(),
                _ = self.parked_in_empty.notified(), if next_deadline.is_none() => {}
            }
        }
        let mut state = self.lock();
        state.slots.clear();
        state.free.clear();
        state.deadlines.clear();
        self.gauge.fetch_sub(state.parked as u64, Ordering::Relaxed);
        state.parked = 0;
    }

    /// The earliest deadline of a connection still parked (stale entries dropped).
    fn next_deadline(&self) -> Option<Instant> {
        let mut state = self.lock();
        while let Some(&(deadline, slot, generation)) = state.deadlines.front() {
            let live = state.slots[slot as usize]
                .as_ref()
                .is_some_and(|p| p.generation == generation);
            if live {
                return Some(deadline);
            }
            state.deadlines.pop_front();
        }
        None
    }

    /// Closes the connections whose deadline passed.
    fn expire(&self) {
        let now = Instant::now();
        let mut state = self.lock();
        while let Some(&(deadline, slot, generation)) = state.deadlines.front() {
            if deadline > now {
                break;
            }
            state.deadlines.pop_front();
            if self.take(&mut state, slot, generation).is_some() {
                tracing::trace!("parked connection closed at keep_alive_timeout");
            }
        }
    }

    /// An event for the socket with key `data`: data (resume), or the client's close (close).
    fn wake(&self, data: u64, resume: &mut impl FnMut(TcpStream, T)) {
        let (slot, generation) = unkey(data);
        let Some(parked) = self.take(&mut self.lock(), slot, generation) else {
            return;
        };
        let mut probe = [0u8; 1];
        match parked.stream.peek(&mut probe) {
            Ok(n) if n > 0 => {}
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            // The client closed (or the socket failed): drop it.
            _ => return,
        }
        match TcpStream::from_std(parked.stream) {
            Ok(stream) => resume(stream, parked.value),
            Err(error) => tracing::debug!(%error, "cannot resume a parked connection"),
        }
    }
}

fn key(slot: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(slot)
}

fn unkey(data: u64) -> (u32, u32) {
    (data as u32, (data >> 32) as u32)
}

fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        (client, server)
    }

    /// Where a test lot's resumed connections come out.
    type Resumed = tokio::sync::mpsc::UnboundedReceiver<(TcpStream, u32)>;

    /// A lot running in its own task; resumed connections come out of the channel.
    fn running(timeout: Duration) -> (Arc<Lot<u32>>, Resumed, watch::Sender<()>) {
        let lot = Arc::new(Lot::new(timeout, Arc::default()).unwrap());
        let (resumed, out) = tokio::sync::mpsc::unbounded_channel();
        let (drain, mut drained) = watch::channel(());
        let runner = lot.clone();
        tokio::spawn(async move {
            runner
                .run(&mut drained, |stream, value| {
                    let _ = resumed.send((stream, value));
                })
                .await;
        });
        (lot, out, drain)
    }

    #[tokio::test]
    async fn a_parked_connection_resumes_when_its_client_sends() {
        let (lot, mut resumed, _drain) = running(Duration::from_secs(30));
        let (mut client_a, server_a) = pair().await;
        let (_client_b, server_b) = pair().await;
        lot.park(server_a, 1).map_err(|_| ()).unwrap();
        lot.park(server_b, 2).map_err(|_| ()).unwrap();
        assert_eq!(lot.len(), 2);
        client_a.write_all(b"GET").await.unwrap();
        let (mut stream, value) = tokio::time::timeout(Duration::from_secs(5), resumed.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(value, 1);
        assert_eq!(lot.len(), 1);
        // The bytes are still unread, and the resumed stream works both ways.
        let mut buffer = [0u8; 3];
        stream.read_exact(&mut buffer).await.unwrap();
        assert_eq!(&buffer, b"GET");
        stream.write_all(b"ok").await.unwrap();
        let mut answer = [0u8; 2];
        client_a.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ok");
    }

    #[tokio::test]
    async fn closed_and_expired_connections_are_dropped_and_drain_closes_the_rest() {
        let (lot, mut resumed, drain) = running(Duration::from_millis(200));
        let (client_a, server_a) = pair().await;
        lot.park(server_a, 1).map_err(|_| ()).unwrap();
        drop(client_a);
        let (mut client_b, server_b) = pair().await;
        lot.park(server_b, 2).map_err(|_| ()).unwrap();
        // Both leave the lot without being resumed: one closed, one timed out.
        let mut buffer = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), client_b.read(&mut buffer))
            .await
            .expect("closed at keep_alive_timeout");
        assert!(matches!(closed, Ok(0) | Err(_)));
        assert_eq!(lot.len(), 0);
        assert!(resumed.try_recv().is_err());

        let (mut client_c, server_c) = pair().await;
        lot.park(server_c, 3).map_err(|_| ()).unwrap();
        drain.send_replace(());
        let closed = tokio::time::timeout(Duration::from_secs(5), client_c.read(&mut buffer))
            .await
            .expect("closed at drain");
        assert!(matches!(closed, Ok(0) | Err(_)));
    }

    #[test]
    fn keys_round_trip() {
        assert_eq!(unkey(key(7, u32::MAX)), (7, u32::MAX));
        assert_eq!(unkey(key(u32::MAX, 0)), (u32::MAX, 0));
    }
}
