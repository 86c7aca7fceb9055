//! Per-core worker runtimes (`[server] workers = N`, `runtime = "per_core"`, the default).
//!
//! With N > 1 workers, N threads each run their own single-threaded tokio runtime. Every
//! listener binds one `SO_REUSEPORT` socket per worker, so the kernel spreads new
//! connections over the workers, and a connection is served start to end on the thread that
//! accepted it. No work stealing means no cross-thread wake-ups or task migration per request.
//! Each worker also has its own idle upstream connections (see `proxy/upstream.rs`): a
//! connection's task runs on the worker that opened it, and only that worker reuses it.
//!
//! The control plane (pool managers, health checks, discovery, autoscaling, the admin API)
//! stays on the process's main runtime.
//!
//! With one worker, or with `runtime = "work_stealing"` (a multi-threaded runtime), there are no
//! worker threads. Everything then runs on the main runtime, with one socket per listener.

use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// How often each worker gives memory freed by parked connections back to the OS.
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_millis(250);

/// How many per-worker queues the upstream idle pools keep (set once at start).
static QUEUES: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's worker index; 0 on threads that are not workers.
    static WORKER_INDEX: Cell<usize> = const { Cell::new(0) };
}

/// How many per-worker slots the data path's per-worker structures need.
pub fn worker_slots() -> usize {
    QUEUES.load(Ordering::Relaxed)
}

/// The index (below [`worker_slots`]) of the worker running on this thread; 0 elsewhere.
pub fn current_worker() -> usize {
    WORKER_INDEX.with(Cell::get)
}

/// Why the worker threads could not be started.
#[derive(Debug, thiserror::Error)]
pub enum WorkersError {
    /// A worker's tokio runtime could not be built.
    #[error("cannot start a worker runtime: {0}")]
    Runtime(std::io::Error),
    /// A worker thread could not be spawned.
    #[error("cannot start a worker thread: {0}")]
    Thread(std::io::Error),
}

/// The worker threads' runtimes, or none: then listeners are served on the current runtime.
pub struct Workers {
    handles: Vec<Handle>,
    /// Dropping a sender ends its worker's thread (and its runtime with every task on it).
    _stops: Vec<oneshot::Sender<()>>,
}

impl std::fmt::Debug for Workers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Workers")
            .field("threads", &self.handles.len())
            .finish()
    }
}

impl Workers {
    /// No worker threads: listeners are served on the runtime that starts them.
    pub fn inline() -> Self {
        Workers {
            handles: Vec::new(),
            _stops: Vec::new(),
        }
    }

    /// Starts `count` worker threads, each with a single-threaded runtime. Call once per
    /// process, before any pool is built (the upstream pools size their per-worker queues by it).
    pub fn start(count: usize) -> Result<Self, WorkersError> {
        QUEUES.store(count.max(1), Ordering::Relaxed);
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(WorkersError::Runtime)?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("fulcrum-worker-{index}"))
                .spawn(move || {
                    WORKER_INDEX.with(|slot| slot.set(index));
                    runtime.block_on(async move {
                        let mut tick = tokio::time::interval(HOUSEKEEPING_INTERVAL);
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                        tokio::pin!(stopped);
                        loop {
                            tokio::select! {
                                _ = &mut stopped => break,
                                _ = tick.tick() => crate::runtime::memory::collect_if_parked(),
                            }
                        }
                    });
                    // Tasks still on this runtime are dropped here, on the worker's own thread.
                    drop(runtime);
                })
                .map_err(WorkersError::Thread)?;
        }
        Ok(Workers {
            handles,
            _stops: stops,
        })
    }

    /// How many listener sockets (and accept loops) each listener gets: one per worker.
    pub fn sockets_per_listener(&self) -> usize {
        self.handles.len().max(1)
    }

    /// Runs `make(i)` for every worker `i` (one call when there are no worker threads) and
    /// spawns each future on its worker's runtime (on the current runtime without workers).
    pub fn spawn_each<F>(&self, mut make: impl FnMut(usize) -> F) -> Vec<JoinHandle<()>>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        if self.handles.is_empty() {
            return vec![tokio::spawn(make(0))];
        }
        self.handles
            .iter()
            .enumerate()
            .map(|(index, handle)| handle.spawn(make(index)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_run_tasks_on_their_own_threads() {
        let workers = Workers::start(3).unwrap();
        assert_eq!(workers.sockets_per_listener(), 3);
        let (sender, receiver) = std::sync::mpsc::channel();
        let tasks = workers.spawn_each(|index| {
            let sender = sender.clone();
            async move {
                let thread = std::thread::current().name().map(str::to_string);
                sender.send((index, current_worker(), thread)).unwrap();
            }
        });
        assert_eq!(tasks.len(), 3);
        let mut seen: Vec<_> = (0..3).map(|_| receiver.recv().unwrap()).collect();
        seen.sort();
        for (index, (spawned_for, ran_on, thread)) in seen.into_iter().enumerate() {
            assert_eq!(spawned_for, index);
            assert_eq!(ran_on, index);
            assert_eq!(thread, Some(format!("fulcrum-worker-{index}")));
        }
    }
}
