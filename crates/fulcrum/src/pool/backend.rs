//! One backend's live state: atomics shared by every snapshot that contains the backend.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_balance::Candidate;

use crate::clock::now_ns;
use crate::proxy::upstream::ConnectionPool;

/// Live numbers and flags of one backend. Updated with atomics from the data path and the
/// control plane; never locked.
#[derive(Debug)]
pub struct BackendState {
    /// Where the backend listens.
    pub address: SocketAddr,
    /// Stable identity (the address as text), used by consistent hashing and in logs.
    pub id: String,
    configured_weight: AtomicU32,
    in_flight: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Until this clock reading (ns) the backend is skipped after a failed connect; 0 = not.
    down_until_ns: AtomicU64,
    /// Enabled by the operator (false while draining or in maintenance).
    enabled: AtomicBool,
    /// Idle keep-alive connections to this backend.
    pub connections: ConnectionPool,
}

/// A shared handle on a backend's state; what snapshots hold and balancers see.
#[derive(Debug, Clone)]
pub struct Backend(Arc<BackendState>);

impl Deref for Backend {
    type Target = BackendState;
    fn deref(&self) -> &BackendState {
        &self.0
    }
}

impl Backend {
    /// A new, enabled backend with no history.
    pub fn new(address: SocketAddr, weight: u32) -> Backend {
        Backend(Arc::new(BackendState {
            address,
            id: address.to_string(),
            configured_weight: AtomicU32::new(weight),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            down_until_ns: AtomicU64::new(0),
            enabled: AtomicBool::new(true),
            connections: ConnectionPool::new(address),
        }))
    }

    /// Counts a request as started; the guard counts it finished when dropped.
    pub fn start_request(&self) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            backend: self.clone(),
        }
    }
}

impl BackendState {
    /// The weight from the configuration or the admin API.
    pub fn configured_weight(&self) -> u32 {
        self.configured_weight.load(Ordering::Relaxed)
    }

    /// Requests in flight now.
    pub fn in_flight_count(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend since start.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Failures (connect errors, broken responses) seen since start.
    pub fn failure_count(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Records a failure; with `backoff`, the backend is also skipped for that long.
    pub fn record_failure(&self, backoff: Option<Duration>) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Some(backoff) = backoff {
            self.down_until_ns
                .store(now_ns() + backoff.as_nanos() as u64, Ordering::Relaxed);
        }
    }

    /// Whether the backend is currently skipped after a failure.
    pub fn is_backed_off(&self) -> bool {
        let until = self.down_until_ns.load(Ordering::Relaxed);
        until != 0 && now_ns() < until
    }

    /// Whether the operator lets the backend take new traffic.
    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
}

impl Candidate for Backend {
    #[inline]
    fn weight(&self) -> u32 {
        self.configured_weight()
    }
    #[inline]
    fn in_flight(&self) -> u32 {
        self.in_flight_count()
    }
    #[inline]
    fn is_eligible(&self) -> bool {
        self.is_enabled() && !self.is_backed_off()
    }
}

/// Holds one in-flight slot on a backend; releases it on drop, whatever path the request took.
#[derive(Debug)]
pub struct InFlightGuard {
    backend: Backend,
}

impl InFlightGuard {
    /// The backend this request runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}
