//! One backend's live state: atomics shared by every snapshot that contains the backend.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_balance::Candidate;
use serde::{Deserialize, Serialize};

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
    /// The operator's say: [`AdminState`] as a number.
    admin_state: AtomicU8,
    /// The health checks' say (true when no checks are configured).
    healthy: AtomicBool,
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
    /// A new, active, healthy backend with no history.
    pub fn new(address: SocketAddr, weight: u32) -> Backend {
        Backend(Arc::new(BackendState {
            address,
            id: address.to_string(),
            configured_weight: AtomicU32::new(weight),
            in_flight: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            down_until_ns: AtomicU64::new(0),
            admin_state: AtomicU8::new(AdminState::Active as u8),
            healthy: AtomicBool::new(true),
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

    /// The operator's state for this backend.
    pub fn admin_state(&self) -> AdminState {
        AdminState::from_u8(self.admin_state.load(Ordering::Relaxed))
    }

    /// Sets the operator's state.
    pub fn set_admin_state(&self, state: AdminState) {
        self.admin_state.store(state as u8, Ordering::Relaxed);
    }

    /// Sets the configured weight (0 = no new traffic).
    pub fn set_configured_weight(&self, weight: u32) {
        self.configured_weight.store(weight, Ordering::Relaxed);
    }

    /// Whether the operator lets the backend take new traffic.
    pub fn is_enabled(&self) -> bool {
        self.admin_state() == AdminState::Active
    }

    /// Whether health checks consider the backend up.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Records the health checks' verdict; returns the previous one.
    pub fn set_healthy(&self, healthy: bool) -> bool {
        self.healthy.swap(healthy, Ordering::Relaxed)
    }

    /// Effective weight: what balancers use.
    pub fn effective_weight(&self) -> u32 {
        self.configured_weight()
    }
}

/// What the operator wants of a backend, independent of its health.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes traffic (when healthy).
    Active = 0,
    /// Takes no new traffic; in-flight requests finish.
    #[serde(alias = "drain")]
    Draining = 1,
    /// Maintenance: takes no traffic, not health-checked into service.
    Maint = 2,
}

impl AdminState {
    fn from_u8(value: u8) -> AdminState {
        match value {
            0 => AdminState::Active,
            1 => AdminState::Draining,
            _ => AdminState::Maint,
        }
    }

    /// The lower-case name used by the API.
    pub fn name(self) -> &'static str {
        match self {
            AdminState::Active => "active",
            AdminState::Draining => "draining",
            AdminState::Maint => "maint",
        }
    }
}

impl Candidate for Backend {
    #[inline]
    fn weight(&self) -> u32 {
        self.effective_weight()
    }
    #[inline]
    fn in_flight(&self) -> u32 {
        self.in_flight_count()
    }
    #[inline]
    fn is_eligible(&self) -> bool {
        self.is_healthy() && self.is_enabled() && !self.is_backed_off()
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
