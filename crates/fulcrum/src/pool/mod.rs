//! Pools of backends: per-backend live state (atomics), the immutable snapshot that the data
//! path reads without locks, and the pool that publishes new snapshots.

mod backend;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fulcrum_balance::{Algorithm, Balancer, BuildOptions, Member, PickContext, Selector};

pub use backend::{Backend, BackendState, InFlightGuard};

use crate::config::PoolConfig;

/// Settings of a pool that the data path needs per request.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// The selection algorithm.
    pub algorithm: Algorithm,
    /// TCP connect timeout towards a backend.
    pub connect_timeout: Duration,
    /// Time allowed from sending a request to receiving the response head.
    pub request_timeout: Duration,
    /// Idle upstream keep-alive connections older than this are not reused.
    pub idle_timeout: Duration,
    /// How long a backend that failed a connect is skipped.
    pub failure_backoff: Duration,
    /// Most backends one request is tried on.
    pub max_attempts: usize,
}

impl PoolSettings {
    /// The data-path settings of a configured pool.
    pub fn from_config(config: &PoolConfig) -> Self {
        PoolSettings {
            algorithm: config.algorithm.0,
            connect_timeout: config.timeouts.connect.0,
            request_timeout: config.timeouts.request.0,
            idle_timeout: config.timeouts.idle.0,
            failure_backoff: config.failure_backoff.0,
            max_attempts: config.max_attempts,
        }
    }
}

/// One consistent view of a pool: membership and the selector built for exactly that
/// membership, published together so a reader never sees half an update.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The backends eligible for selection, in selector order.
    pub backends: Vec<Backend>,
    /// The selector built over `backends`.
    pub selector: Selector,
}

impl PoolSnapshot {
    /// Builds a snapshot (and its selector) over `backends`.
    pub fn build(algorithm: Algorithm, backends: Vec<Backend>) -> Self {
        let ids: Vec<String> = backends.iter().map(|b| b.id.clone()).collect();
        let members: Vec<Member<'_>> = backends
            .iter()
            .zip(&ids)
            .map(|(b, id)| Member {
                id,
                weight: b.configured_weight(),
            })
            .collect();
        let selector = Selector::build(algorithm, &members, &BuildOptions::default());
        PoolSnapshot { backends, selector }
    }

    /// Picks a backend for a request; `excluded` are indexes already tried.
    #[inline]
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<usize> {
        self.selector.pick(&self.backends, ctx)
    }
}

/// A named pool: its settings and the current snapshot, swapped atomically on change.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name in the config.
    pub name: String,
    /// Data-path settings.
    pub settings: PoolSettings,
    snapshot: ArcSwap<PoolSnapshot>,
}

impl Pool {
    /// Creates the pool described by `config`.
    pub fn from_config(name: &str, config: &PoolConfig) -> Arc<Pool> {
        let settings = PoolSettings::from_config(config);
        let backends = config
            .backends
            .get_ref()
            .iter()
            .map(|spec| Backend::new(spec.get_ref().address, spec.get_ref().weight))
            .collect();
        Arc::new(Pool {
            name: name.to_string(),
            snapshot: ArcSwap::from_pointee(PoolSnapshot::build(settings.algorithm, backends)),
            settings,
        })
    }

    /// The current snapshot (lock-free).
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    /// Publishes a new snapshot. Only the pool's owner (its manager) calls this.
    pub fn publish(&self, snapshot: PoolSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
    }
}
