//! Pools of backends: per-backend live state (atomics), the immutable snapshot that the data
//! path reads without locks, the pool that holds the current snapshot, and the manager task
//! that is the only writer of it.

mod backend;
mod command;
pub mod histogram;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use fulcrum_balance::{Algorithm, Balancer, BuildOptions, Member, PickContext, Selector};

use backend::NO_SLOT;
pub use backend::{AdminState, AgentVerdict, Backend, BackendState, InFlightGuard, PassivePolicy};
pub use command::{PoolCommand, PoolError, PoolHandle};

use crate::config::{HashKey, PoolConfig};
use crate::pool::histogram::LatencyHistogram;
use crate::upstream::{ConnectSettings, UpstreamTransport};

/// The statuses Fulcrum answers with itself when a backend cannot.
const LOCAL_ERROR_STATUSES: [u16; 3] = [502, 503, 504];

/// Settings of a pool that the data path needs per request.
#[derive(Debug, Clone, PartialEq)]
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
    /// How long a removed backend's in-flight requests may take before it is dropped.
    pub drain_timeout: Duration,
    /// Passive ejection, when enabled.
    pub passive: Option<PassivePolicy>,
    /// When nothing is available, spread over every backend instead of answering 503.
    pub panic_mode: bool,
    /// Retries allowed as a percentage of requests.
    pub retry_percent: u32,
    /// Retries always allowed per second.
    pub retry_min_per_second: u32,
    /// PROXY protocol header sent at the start of backend connections (TCP mode).
    pub proxy_protocol: Option<crate::config::ProxyProtocolVersion>,
    /// Slow-start ramp length; zero = off.
    pub slow_start: Duration,
    /// Time constant of each backend's peak-EWMA latency estimate.
    pub latency_decay: Duration,
    /// What consistent hashing hashes (`maglev` only).
    pub hash_key: HashKey,
    /// Consistent hashing with bounded loads: the factor (`maglev` only).
    pub bounded_load: Option<f64>,
    /// How backends are connected to: HTTP/1.1 or HTTP/2, TLS or not.
    pub transport: Arc<UpstreamTransport>,
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
            drain_timeout: config.drain_timeout.0,
            passive: config.passive.enabled.then(|| PassivePolicy {
                consecutive_failures: config.passive.consecutive_failures,
                ejection_time: config.passive.ejection_time.0,
                max_ejection_time: config.passive.max_ejection_time.0,
                max_ejected_percent: config.passive.max_ejected_percent.min(100),
            }),
            panic_mode: config.panic_mode,
            retry_percent: config.retry_budget.percent,
            retry_min_per_second: config.retry_budget.min_per_second,
            proxy_protocol: config.proxy_protocol,
            slow_start: config.slow_start.map_or(Duration::ZERO, |d| d.0),
            latency_decay: config.latency_decay.0,
            hash_key: config
                .hash_key
                .as_ref()
                .map(|k| k.get_ref().clone())
                .unwrap_or_default(),
            bounded_load: config.bounded_load.as_ref().map(|b| *b.get_ref()),
            transport: Arc::new(UpstreamTransport::from_config(config)),
        }
    }
}

impl ConnectSettings for PoolSettings {
    fn transport(&self) -> &Arc<UpstreamTransport> {
        &self.transport
    }

    fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    fn idle_timeout(&self) -> Duration {
        self.idle_timeout
    }
}

/// One consistent view of a pool: membership, the selector built for exactly that membership
/// and the settings, published together so a reader never sees half an update.
#[derive(Debug)]
pub struct PoolSnapshot {
    /// The backends that can be picked, in selector order.
    pub backends: Vec<Backend>,
    /// The selector built over `backends`.
    pub selector: Selector,
    /// The pool's data-path settings.
    pub settings: Arc<PoolSettings>,
    /// Removed backends still finishing in-flight requests (never picked; shown in status).
    pub retiring: Vec<Backend>,
    /// The balancing weights the selector was built with (to know when to rebuild).
    pub built_weights: Vec<u32>,
}

impl PoolSnapshot {
    /// Builds a snapshot (and its selector) over `backends`, and records each backend's
    /// index in it (see [`Pool::load_changed`]).
    pub fn build(
        settings: Arc<PoolSettings>,
        backends: Vec<Backend>,
        retiring: Vec<Backend>,
    ) -> Self {
        for backend in &retiring {
            backend.set_slot(NO_SLOT);
        }
        for (index, backend) in backends.iter().enumerate() {
            backend.set_slot(index);
        }
        let built_weights: Vec<u32> = backends.iter().map(|b| b.balancing_weight()).collect();
        let members: Vec<Member<'_>> = backends
            .iter()
            .zip(&built_weights)
            .map(|(b, &weight)| Member { id: &b.id, weight })
            .collect();
        let options = BuildOptions {
            bounded_load: settings.bounded_load,
            ..BuildOptions::default()
        };
        let selector = Selector::build(settings.algorithm, &members, &options);
        selector.refresh_all(&backends);
        PoolSnapshot {
            backends,
            selector,
            settings,
            retiring,
            built_weights,
        }
    }

    /// Picks a backend for a request; `ctx.excluded` are indexes already tried.
    #[inline]
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<usize> {
        self.selector.pick(&self.backends, ctx)
    }
}

/// A named pool: the current snapshot, swapped atomically by the pool's manager.
#[derive(Debug)]
pub struct Pool {
    /// The pool's name in the config.
    pub name: String,
    snapshot: ArcSwap<PoolSnapshot>,
    /// Retries still allowed now; the manager refills it from the recent request rate (see
    /// `PoolManager::refill_retry_budget`), so requests themselves pay nothing for it.
    retry_allowance: AtomicI64,
    /// Retries made since start.
    retries: AtomicU64,
    /// Time from request to response head, for requests a backend answered.
    pub latency: LatencyHistogram,
    /// Responses Fulcrum generated itself: 502, 503, 504.
    local_errors: [AtomicU64; 3],
}

impl Pool {
    /// Creates the pool described by `config` (the caller starts its manager).
    pub fn from_config(name: &str, config: &PoolConfig) -> Arc<Pool> {
        let settings = Arc::new(PoolSettings::from_config(config));
        let backends = config
            .backends
            .get_ref()
            .iter()
            .filter_map(|spec| {
                let spec = spec.get_ref();
                spec.address.ip().map(|address| {
                    let backend = Backend::new(address, spec.weight);
                    // Starting backends take full weight at once; only later joins ramp.
                    backend.set_slow_start(settings.slow_start);
                    backend.set_latency_decay(settings.latency_decay);
                    backend
                })
            })
            .collect();
        let initial_allowance = i64::from(settings.retry_min_per_second);
        Arc::new(Pool {
            name: name.to_string(),
            snapshot: ArcSwap::from_pointee(PoolSnapshot::build(settings, backends, Vec::new())),
            retry_allowance: AtomicI64::new(initial_allowance),
            retries: AtomicU64::new(0),
            latency: LatencyHistogram::default(),
            local_errors: Default::default(),
        })
    }

    /// The current snapshot (lock-free).
    #[inline]
    pub fn snapshot(&self) -> arc_swap::Guard<Arc<PoolSnapshot>> {
        self.snapshot.load()
    }

    /// Publishes a new snapshot. Only the pool's manager calls this.
    pub(crate) fn publish(&self, snapshot: PoolSnapshot) {
        self.snapshot.store(Arc::new(snapshot));
        // In-flight changes between the build and the store went to the old snapshot.
        self.refresh_load();
    }

    /// Counts a request as started on `backend` (of `snapshot`, this pool's snapshot the
    /// request picked from). When the pool's selector tracks load (least_conn over many
    /// backends), it is told now and again when the guard drops; for every other algorithm
    /// this is exactly [`Backend::start_request`].
    #[inline]
    pub fn start_request(
        self: &Arc<Self>,
        snapshot: &PoolSnapshot,
        backend: &Backend,
    ) -> InFlightGuard {
        let mut guard = backend.start_request();
        if snapshot.selector.tracks_load() {
            self.load_changed(backend);
            guard.pool = Some(self.clone());
        }
        guard
    }

    /// Tells the *current* snapshot's selector that `backend`'s in-flight count changed. A
    /// request can outlive the snapshot it picked from, so the backend's slot (recorded at
    /// build) is checked against the current snapshot: a backend no longer in it (or a
    /// snapshot not yet published) is skipped, and the next refresh covers it.
    pub fn load_changed(&self, backend: &Backend) {
        let snapshot = self.snapshot.load();
        let slot = backend.slot();
        if snapshot
            .backends
            .get(slot)
            .is_some_and(|current| current.same(backend))
        {
            snapshot.selector.load_changed(slot, &snapshot.backends);
        }
    }

    /// Recomputes the current selector's live-load state from every backend (least_conn's
    /// tree; nothing for other algorithms). The manager calls it on every housekeeping tick:
    /// health, eligibility and weight changes that no in-flight change reported reach the
    /// tree within one tick.
    pub fn refresh_load(&self) {
        let snapshot = self.snapshot.load();
        if snapshot.selector.tracks_load() {
            snapshot.selector.refresh_all(&snapshot.backends);
        }
    }

    /// Takes one retry from the budget; false when the budget is spent.
    pub fn try_retry(&self) -> bool {
        let allowed = self
            .retry_allowance
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                (left > 0).then_some(left - 1)
            })
            .is_ok();
        if allowed {
            self.retries.fetch_add(1, Ordering::Relaxed);
        } else {
            tracing::warn!(pool = %self.name, "retry budget spent; not retrying");
        }
        allowed
    }

    /// Counts a response Fulcrum generated itself (502, 503 or 504).
    pub fn record_local_error(&self, status: u16) {
        if let Some(slot) = LOCAL_ERROR_STATUSES.iter().position(|&s| s == status) {
            self.local_errors[slot].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// (status, count) of the responses Fulcrum generated itself.
    pub fn local_error_counts(&self) -> [(u16, u64); 3] {
        std::array::from_fn(|i| {
            (
                LOCAL_ERROR_STATUSES[i],
                self.local_errors[i].load(Ordering::Relaxed),
            )
        })
    }

    /// Retries made since start.
    pub fn retry_count(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Sets the retries allowed from now on (the manager's refill).
    pub(crate) fn set_retry_allowance(&self, allowance: i64) {
        self.retry_allowance.store(allowance, Ordering::Relaxed);
    }

    /// A JSON-ready view of the pool and every backend, retiring ones included.
    pub fn status(&self) -> PoolStatus {
        let snapshot = self.snapshot();
        PoolStatus {
            name: self.name.clone(),
            algorithm: snapshot.settings.algorithm.name(),
            backends: snapshot
                .backends
                .iter()
                .map(|b| BackendStatus::of(b, false))
                .chain(snapshot.retiring.iter().map(|b| BackendStatus::of(b, true)))
                .collect(),
        }
    }
}

/// A pool's state as the admin API shows it (its wire form is `control::api::PoolStatus`).
#[derive(Debug, Clone)]
pub struct PoolStatus {
    /// Pool name.
    pub name: String,
    /// Selection algorithm.
    pub algorithm: &'static str,
    /// Every backend.
    pub backends: Vec<BackendStatus>,
}

/// A backend's state as the admin API shows it (its wire form is
/// `control::api::BackendStatus`).
#[derive(Debug, Clone)]
pub struct BackendStatus {
    /// Address.
    pub address: String,
    /// Weight from config or API.
    pub weight: u32,
    /// Weight balancers use now (configured × agent × slow start).
    pub effective_weight: u32,
    /// Slow-start factor in percent (100 when not ramping).
    pub slow_start_percent: u8,
    /// active / draining / maint (a removed backend finishing its requests shows draining).
    pub state: &'static str,
    /// up / down per health checks.
    pub health: &'static str,
    /// Ejected by passive outlier detection right now.
    pub ejected: bool,
    /// Whether it can be picked for new requests now.
    pub available: bool,
    /// The agent's weight percentage (100 without an agent).
    pub agent_percent: u8,
    /// CPU use (percent) the agent reported, when it reports one.
    pub agent_cpu_percent: Option<u8>,
    /// The agent's verdict (up without an agent).
    pub agent_state: &'static str,
    /// Whether it is skipped for now after failed connects.
    pub backed_off: bool,
    /// Requests in flight.
    pub in_flight: u32,
    /// Requests sent and not answered yet (what `peak_ewma` multiplies latency by).
    pub pending: u32,
    /// Requests sent since start.
    pub requests: u64,
    /// Failures seen since start.
    pub failures: u64,
    /// Removed from the pool, finishing in-flight requests.
    pub removing: bool,
    /// The balancer's latency estimate (peak-EWMA of the time to response headers), in
    /// milliseconds; `None` until measured.
    pub latency_ms: Option<f64>,
}

impl BackendStatus {
    fn of(backend: &Backend, removing: bool) -> Self {
        BackendStatus {
            address: backend.id.clone(),
            weight: backend.configured_weight(),
            effective_weight: backend.effective_weight(),
            slow_start_percent: backend.ramp_percent(),
            state: if removing {
                "draining"
            } else {
                backend.admin_state().name()
            },
            health: if backend.is_healthy() { "up" } else { "down" },
            ejected: backend.is_ejected(),
            available: !removing && backend.is_available(),
            agent_percent: backend.agent_percent(),
            agent_cpu_percent: backend.agent_cpu(),
            agent_state: backend.agent_verdict().name(),
            backed_off: backend.is_backed_off(),
            in_flight: backend.in_flight_count(),
            pending: fulcrum_balance::Candidate::pending(backend),
            requests: backend.request_count(),
            failures: backend.failure_count(),
            removing,
            latency_ms: match backend.latency.estimate(crate::runtime::clock::now_ns()) {
                0 => None,
                ns => Some(ns as f64 / 1e6),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use fulcrum_balance::splitmix64;

    use super::*;
    use crate::config::Config;

    fn pool(algorithm: &str, n: usize) -> Arc<Pool> {
        let backends: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 10000 + i))
            .collect();
        let text = format!(
            "[listeners.web]\nlisten = \"127.0.0.1:8080\"\nprotocol = \"http\"\npool = \"app\"\n\n\
             [pools.app]\nalgorithm = \"{algorithm}\"\nbackends = [{}]\n",
            backends.join(", ")
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        Pool::from_config("app", &config.pools["app"])
    }

    fn picks(pool: &Pool) -> Vec<String> {
        let snapshot = pool.snapshot();
        (0..50)
            .map(|r| {
                let index = snapshot
                    .pick(&PickContext::with_random(splitmix64(r)))
                    .unwrap();
                snapshot.backends[index].id.clone()
            })
            .collect()
    }

    /// least_conn over 40 backends keeps a tree fed by request starts and ends, also for
    /// requests that outlive the snapshot they picked from.
    #[test]
    fn least_conn_tree_follows_requests_across_rebuilds() {
        let pool = pool("least_conn", 40);
        let first = pool.snapshot();
        assert!(first.selector.tracks_load());
        // Two requests on every backend, one on 127.0.0.1:10017: it is the least loaded.
        let mut guards: Vec<(String, InFlightGuard)> = Vec::new();
        for (i, backend) in first.backends.iter().enumerate() {
            for _ in 0..if i == 17 { 1 } else { 2 } {
                guards.push((backend.id.clone(), pool.start_request(&first, backend)));
            }
        }
        assert!(picks(&pool).iter().all(|id| id == "127.0.0.1:10017"));
        // Membership changes (order reversed, 10003 removed): every backend moves slot.
        let mut members = first.backends.clone();
        members.reverse();
        let removed = members.remove(36);
        assert_eq!(removed.id, "127.0.0.1:10003");
        pool.publish(PoolSnapshot::build(
            first.settings.clone(),
            members,
            vec![removed],
        ));
        drop(first);
        // Requests that picked from the old snapshot end: 10005 becomes the least loaded
        // (the new tree hears of it at its new slot), the removed backend's ends go nowhere.
        guards.retain(|(id, _)| id != "127.0.0.1:10005" && id != "127.0.0.1:10003");
        assert!(picks(&pool).iter().all(|id| id == "127.0.0.1:10005"));
        // Requests started on the new snapshot count too.
        let current = pool.snapshot();
        let ten_five = current
            .backends
            .iter()
            .find(|b| b.id == "127.0.0.1:10005")
            .unwrap();
        let more: Vec<InFlightGuard> = (0..3)
            .map(|_| pool.start_request(&current, ten_five))
            .collect();
        assert!(picks(&pool).iter().all(|id| id == "127.0.0.1:10017"));
        drop(more);
        assert!(picks(&pool).iter().all(|id| id == "127.0.0.1:10005"));
    }

    /// Other algorithms (and least_conn over few backends) attach nothing to the guard.
    #[test]
    fn other_algorithms_pay_nothing() {
        for (algorithm, n) in [("peak_ewma", 40), ("p2c", 40), ("least_conn", 3)] {
            let pool = pool(algorithm, n);
            let snapshot = pool.snapshot();
            assert!(!snapshot.selector.tracks_load());
            let guard = pool.start_request(&snapshot, &snapshot.backends[0]);
            assert!(guard.pool.is_none(), "{algorithm}");
            assert_eq!(snapshot.backends[0].in_flight_count(), 1);
        }
    }
}
