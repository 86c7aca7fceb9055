//! One backend's live state: atomics shared by every snapshot that contains the backend.

use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fulcrum_balance::{slow_start_percent, Candidate, PeakEwma};
use serde::{Deserialize, Serialize};

use crate::runtime::clock::now_ns;
use crate::upstream::ConnectionPool;

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
    /// Requests sent and not answered yet (HTTP: until the response head; TCP: the session).
    awaiting: AtomicU32,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Response bodies that broke after their head was passed on, not yet charged to the
    /// passive-ejection streak (that happens at the backend's next answer).
    broken_bodies: AtomicU32,
    /// Backend answers by status class: index 0 = 1xx … 4 = 5xx.
    responses_by_class: [AtomicU64; 5],
    /// Until this clock reading (ns) the backend is skipped after a failed connect; 0 = not.
    down_until_ns: AtomicU64,
    /// The operator's say: [`AdminState`] as a number.
    admin_state: AtomicU8,
    /// The health checks' say (true when no checks are configured).
    healthy: AtomicBool,
    /// Passive ejection (outlier detection) state.
    passive: PassiveState,
    /// The agent's say: weight percent (0..=100) and [`AgentVerdict`] as a number.
    agent_percent: AtomicU8,
    agent_verdict: AtomicU8,
    /// CPU use (percent) the agent mentioned (`#cpu 62%`); [`UNKNOWN_CPU`] when it did not.
    agent_cpu: AtomicU8,
    /// The pool's slow-start ramp length in ns; 0 = slow start off.
    slow_start_ns: AtomicU64,
    /// Clock reading (ns) at which the current ramp began (may lie ahead: an ejection's end).
    ramp_start_ns: AtomicU64,
    /// Slow-start factor in percent (10..=100), advanced by the pool manager's housekeeping.
    ramp_percent: AtomicU8,
    /// This backend's index in its pool's current snapshot ([`NO_SLOT`] when it is in none):
    /// where in-flight changes are reported to a selector that tracks load (least_conn's
    /// tree). Set when a snapshot is built; checked against the snapshot before use.
    slot: AtomicUsize,
    /// Peak-EWMA of the time from sending a request to receiving the response head.
    pub latency: PeakEwma,
    /// Idle keep-alive connections to this backend.
    pub connections: ConnectionPool,
    /// TCP-mode sessions and upgraded (WebSocket) connections: counts and bytes.
    pub sessions: SessionStats,
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
            awaiting: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            broken_bodies: AtomicU32::new(0),
            responses_by_class: Default::default(),
            down_until_ns: AtomicU64::new(0),
            admin_state: AtomicU8::new(AdminState::Active as u8),
            healthy: AtomicBool::new(true),
            passive: PassiveState::default(),
            agent_percent: AtomicU8::new(100),
            agent_verdict: AtomicU8::new(AgentVerdict::Up as u8),
            agent_cpu: AtomicU8::new(UNKNOWN_CPU),
            slow_start_ns: AtomicU64::new(0),
            ramp_start_ns: AtomicU64::new(0),
            ramp_percent: AtomicU8::new(100),
            slot: AtomicUsize::new(NO_SLOT),
            latency: PeakEwma::default(),
            connections: ConnectionPool::new(address),
            sessions: SessionStats::default(),
        }))
    }

    /// Counts a request as sent and waiting for its answer until the guard is dropped. Unlike
    /// the in-flight count, this leaves out the time Fulcrum spends forwarding the response,
    /// which would make a busy balancer blame fast backends for its own queueing.
    pub fn await_answer(&self) -> AwaitingGuard<'_> {
        self.awaiting.fetch_add(1, Ordering::Relaxed);
        AwaitingGuard { backend: self }
    }

    /// Counts a request as started; the guard counts it finished when dropped.
    pub fn start_request(&self) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlightGuard {
            backend: self.clone(),
            pool: None,
        }
    }

    /// Whether `self` and `other` are the same backend (not merely the same address).
    #[inline]
    pub fn same(&self, other: &Backend) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// [`BackendState`]'s slot value for "in no snapshot".
pub(crate) const NO_SLOT: usize = usize::MAX;

impl BackendState {
    /// The weight from the configuration or the admin API.
    pub fn configured_weight(&self) -> u32 {
        self.configured_weight.load(Ordering::Relaxed)
    }

    /// This backend's index in its pool's latest snapshot ([`NO_SLOT`]: none).
    #[inline]
    pub(crate) fn slot(&self) -> usize {
        self.slot.load(Ordering::Relaxed)
    }

    /// Records this backend's index in the snapshot being built.
    pub(crate) fn set_slot(&self, slot: usize) {
        self.slot.store(slot, Ordering::Relaxed);
    }

    /// Requests in flight now.
    pub fn in_flight_count(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests sent to this backend since start.
    pub fn request_count(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Backend answers of status class `class` (0 = 1xx … 4 = 5xx) since start.
    pub fn response_count(&self, class: usize) -> u64 {
        self.responses_by_class[class].load(Ordering::Relaxed)
    }

    /// Counts a backend answer with `status` (for metrics by status class).
    #[inline]
    pub fn record_status(&self, status: u16) {
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.responses_by_class[class].fetch_add(1, Ordering::Relaxed);
    }

    /// Times passive ejection took this backend out since start.
    pub fn ejection_count(&self) -> u64 {
        self.passive.ejections_total.load(Ordering::Relaxed)
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

    /// Records a response body that broke after its head was passed on (cut short, bad
    /// chunking): a failure now, and one in the passive-ejection streak when the backend next
    /// answers (see [`Backend::take_broken_bodies`]; its head had already counted as a success).
    pub fn record_broken_body(&self) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        self.broken_bodies.fetch_add(1, Ordering::Relaxed);
    }

    /// The broken bodies recorded since the last call (normally none: one load).
    #[inline]
    pub fn take_broken_bodies(&self) -> u32 {
        if self.broken_bodies.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.broken_bodies.swap(0, Ordering::Relaxed)
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

    /// Records the health checks' verdict; returns the previous one. Coming back up starts a
    /// slow-start ramp and forgets the latency estimate (the backend is tried afresh).
    pub fn set_healthy(&self, healthy: bool) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        if healthy && !was {
            self.recovered(now_ns());
        }
        was
    }

    /// The backend became available again at `at_ns`: ramp up from there, latency unknown.
    fn recovered(&self, at_ns: u64) {
        self.begin_ramp(at_ns);
        self.latency.reset();
    }

    /// Effective weight: configured weight × the agent's percentage × the slow-start ramp.
    /// A nonzero product never rounds down to zero.
    pub fn effective_weight(&self) -> u32 {
        let hundredths = self.balancing_weight();
        if hundredths == 0 {
            return 0;
        }
        (hundredths / 100).max(1)
    }

    /// The weight balancers use, in hundredths of a configured weight unit: configured
    /// weight × agent percent × slow-start percent / 100. Finer than [`Self::effective_weight`]
    /// so that a ramp or an agent factor still matters for weight-1 backends.
    #[inline]
    pub fn balancing_weight(&self) -> u32 {
        let configured = u64::from(self.configured_weight());
        let agent = u64::from(self.agent_percent.load(Ordering::Relaxed).min(100));
        let ramp = u64::from(self.ramp_percent.load(Ordering::Relaxed));
        if configured == 0 || agent == 0 {
            return 0;
        }
        (configured * agent * ramp / 100).clamp(1, u64::from(u32::MAX)) as u32
    }

    /// Sets the time constant of the backend's peak-EWMA latency estimate.
    pub fn set_latency_decay(&self, decay: Duration) {
        self.latency.set_decay(decay);
    }

    /// Sets the pool's slow-start ramp length (zero turns slow start off and ends any ramp).
    pub fn set_slow_start(&self, ramp: Duration) {
        self.slow_start_ns
            .store(ramp.as_nanos() as u64, Ordering::Relaxed);
        if ramp.is_zero() {
            self.ramp_percent.store(100, Ordering::Relaxed);
        }
    }

    /// Starts a slow-start ramp at clock reading `at_ns` (the backend joined or became
    /// available again). Nothing happens when slow start is off.
    pub fn begin_ramp(&self, at_ns: u64) {
        if self.slow_start_ns.load(Ordering::Relaxed) == 0 {
            return;
        }
        self.ramp_start_ns.store(at_ns.max(1), Ordering::Relaxed);
        self.ramp_percent.store(
            fulcrum_balance::slow_start::SLOW_START_FLOOR_PERCENT,
            Ordering::Relaxed,
        );
    }

    /// Advances the slow-start factor to clock reading `now_ns`; returns whether it changed.
    /// The pool manager calls this on every housekeeping tick and rebuilds the selector when
    /// balancing weights moved.
    pub fn update_ramp(&self, now_ns: u64) -> bool {
        let start = self.ramp_start_ns.load(Ordering::Relaxed);
        // 0: never ramped (a backend present from the start takes its full weight at once).
        let ramp = if start == 0 {
            0
        } else {
            self.slow_start_ns.load(Ordering::Relaxed)
        };
        let elapsed = now_ns.saturating_sub(start);
        let percent = slow_start_percent(Duration::from_nanos(elapsed), Duration::from_nanos(ramp));
        self.ramp_percent.swap(percent, Ordering::Relaxed) != percent
    }

    /// The slow-start factor in percent (100 when not ramping).
    pub fn ramp_percent(&self) -> u8 {
        self.ramp_percent.load(Ordering::Relaxed)
    }

    /// The CPU use (percent) the backend's agent last reported, if it reports one.
    pub fn agent_cpu(&self) -> Option<u8> {
        let cpu = self.agent_cpu.load(Ordering::Relaxed);
        (cpu != UNKNOWN_CPU).then_some(cpu)
    }

    /// Records the CPU use the agent reported (None: it stopped reporting one).
    pub fn set_agent_cpu(&self, cpu: Option<u8>) {
        self.agent_cpu
            .store(cpu.map_or(UNKNOWN_CPU, |c| c.min(100)), Ordering::Relaxed);
    }

    /// The agent's weight percentage (100 when no agent reported).
    pub fn agent_percent(&self) -> u8 {
        self.agent_percent.load(Ordering::Relaxed)
    }

    /// The agent's verdict.
    pub fn agent_verdict(&self) -> AgentVerdict {
        AgentVerdict::from_u8(self.agent_verdict.load(Ordering::Relaxed))
    }

    /// Applies an agent's report: weight percent (clamped to 100) and/or verdict. Returns
    /// whether anything changed.
    pub fn set_agent(&self, percent: Option<u8>, verdict: Option<AgentVerdict>) -> bool {
        let mut changed = false;
        if let Some(percent) = percent {
            changed |=
                self.agent_percent.swap(percent.min(100), Ordering::Relaxed) != percent.min(100);
        }
        if let Some(verdict) = verdict {
            changed |= self.agent_verdict.swap(verdict as u8, Ordering::Relaxed) != verdict as u8;
        }
        changed
    }

    /// Forgets connect back-off and passive ejection: an active check just proved the
    /// backend healthy again.
    pub fn clear_failures(&self) {
        // An ejection cut short: its ramp starts now rather than at the planned end.
        let now = now_ns();
        if self.ramp_start_ns.load(Ordering::Relaxed) > now {
            self.ramp_start_ns.store(now, Ordering::Relaxed);
        }
        self.down_until_ns.store(0, Ordering::Relaxed);
        self.passive.ejected_until_ns.store(0, Ordering::Relaxed);
        self.passive
            .consecutive_failures
            .store(0, Ordering::Relaxed);
    }

    /// Whether passive ejection currently keeps the backend out.
    pub fn is_ejected(&self) -> bool {
        self.passive.is_ejected_now()
    }

    /// Records a good answer (resets the passive failure streak).
    #[inline]
    pub fn record_success(&self) {
        self.passive.record_success();
    }

    /// Records a failed exchange for passive ejection; returns how long the backend is now
    /// ejected for, when this failure ejected it. `may_eject` is asked only when the streak
    /// reaches the threshold (it checks the pool-wide ejection cap).
    pub fn record_passive_failure(
        &self,
        policy: &PassivePolicy,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let now = now_ns();
        let ejected = self.passive.record_failure(policy, now, may_eject);
        if let Some(duration) = ejected {
            // Back in service when the ejection ends: ramp up (and probe afresh) from then.
            self.recovered(now + duration.as_nanos() as u64);
        }
        ejected
    }

    /// Whether balancers may send it new traffic: healthy, enabled, the agent says up, not
    /// backed off after a failed connect and not ejected.
    pub fn is_available(&self) -> bool {
        self.is_healthy()
            && self.is_enabled()
            && self.agent_verdict() == AgentVerdict::Up
            && !self.is_backed_off()
            && !self.is_ejected()
    }
}

/// `agent_cpu` value meaning "no figure".
const UNKNOWN_CPU: u8 = u8::MAX;

/// What a backend's agent last said about taking traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentVerdict {
    /// Take traffic (also when no agent is configured).
    Up = 0,
    /// No new traffic.
    Drain = 1,
    /// Maintenance: no traffic.
    Maint = 2,
    /// Down: no traffic.
    Down = 3,
}

impl AgentVerdict {
    fn from_u8(value: u8) -> AgentVerdict {
        match value {
            0 => AgentVerdict::Up,
            1 => AgentVerdict::Drain,
            2 => AgentVerdict::Maint,
            _ => AgentVerdict::Down,
        }
    }

    /// The lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            AgentVerdict::Up => "up",
            AgentVerdict::Drain => "drain",
            AgentVerdict::Maint => "maint",
            AgentVerdict::Down => "down",
        }
    }
}

/// Passive ejection settings of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PassivePolicy {
    /// Consecutive failures that eject.
    pub consecutive_failures: u32,
    /// Base ejection time (× the number of ejections in a row).
    pub ejection_time: Duration,
    /// Longest ejection.
    pub max_ejection_time: Duration,
    /// Most of the pool (percent) that may be ejected at once.
    pub max_ejected_percent: u8,
}

/// Lock-free passive ejection state of one backend.
#[derive(Debug, Default)]
struct PassiveState {
    consecutive_failures: AtomicU32,
    /// Ejections in a row (reset when the backend stayed in long enough).
    ejections: AtomicU32,
    /// Ejected until this clock reading (ns); 0 = never ejected.
    ejected_until_ns: AtomicU64,
    /// Ejections since start.
    ejections_total: AtomicU64,
}

impl PassiveState {
    fn is_ejected(&self, now: u64) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && now < until
    }

    /// [`Self::is_ejected`] at the current time; the clock is read only when an ejection is on
    /// record (this runs on every pick).
    #[inline]
    fn is_ejected_now(&self) -> bool {
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        until != 0 && now_ns() < until
    }

    #[inline]
    fn record_success(&self) {
        // Read first: the common case (no streak) then writes nothing, keeping the cache
        // line shared between cores.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    fn record_failure(
        &self,
        policy: &PassivePolicy,
        now: u64,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        let streak = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if streak < policy.consecutive_failures.max(1) || self.is_ejected(now) || !may_eject() {
            return None;
        }
        self.consecutive_failures.store(0, Ordering::Relaxed);
        let last_until = self.ejected_until_ns.load(Ordering::Relaxed);
        // A backend that stayed in service longer than the longest ejection starts afresh.
        if last_until == 0
            || now.saturating_sub(last_until) > policy.max_ejection_time.as_nanos() as u64
        {
            self.ejections.store(0, Ordering::Relaxed);
        }
        let ejections = self.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        self.ejections_total.fetch_add(1, Ordering::Relaxed);
        let duration = policy
            .ejection_time
            .saturating_mul(ejections)
            .min(policy.max_ejection_time);
        self.ejected_until_ns
            .store(now + duration.as_nanos() as u64, Ordering::Relaxed);
        Some(duration)
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
        self.balancing_weight()
    }
    #[inline]
    fn in_flight(&self) -> u32 {
        self.in_flight_count()
    }
    #[inline]
    fn pending(&self) -> u32 {
        self.awaiting.load(Ordering::Relaxed)
    }
    #[inline]
    fn is_eligible(&self) -> bool {
        self.is_available()
    }
    #[inline]
    fn latency_ns(&self, now_ns: u64) -> u64 {
        self.latency.estimate(now_ns)
    }
}

/// Holds one in-flight slot on a backend; releases it on drop, whatever path the request took.
#[derive(Debug)]
pub struct InFlightGuard {
    backend: Backend,
    /// The pool to tell about the release, when its selector tracks load (see
    /// [`super::Pool::start_request`]); `None` otherwise, so other algorithms pay nothing.
    pub(super) pool: Option<Arc<super::Pool>>,
}

impl InFlightGuard {
    /// The backend this request runs on.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }
}

/// Holds one waiting-for-an-answer slot on a backend (see [`Backend::await_answer`]). It
/// borrows the backend: it never outlives the exchange that holds the backend anyway.
#[derive(Debug)]
pub struct AwaitingGuard<'a> {
    backend: &'a BackendState,
}

impl Drop for AwaitingGuard<'_> {
    fn drop(&mut self) {
        self.backend.awaiting.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(pool) = &self.pool {
            pool.load_changed(&self.backend);
        }
    }
}

/// Counters of one backend's TCP sessions and upgraded connections.
#[derive(Debug, Default)]
pub struct SessionStats {
    /// Sessions opened since start.
    pub opened: AtomicU64,
    /// Bytes received from clients and sent to this backend.
    pub bytes_to_backend: AtomicU64,
    /// Bytes received from this backend and sent to clients.
    pub bytes_to_client: AtomicU64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> PassivePolicy {
        PassivePolicy {
            consecutive_failures: 3,
            ejection_time: Duration::from_secs(10),
            max_ejection_time: Duration::from_secs(25),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_for_growing_times() {
        let state = PassiveState::default();
        let second = 1_000_000_000u64;
        let mut now = 1;
        assert_eq!(state.record_failure(&policy(), now, || true), None);
        assert_eq!(state.record_failure(&policy(), now, || true), None);
        state.record_success();
        assert_eq!(state.record_failure(&policy(), now, || true), None);
        assert_eq!(state.record_failure(&policy(), now, || true), None);
        assert_eq!(
            state.record_failure(&policy(), now, || true),
            Some(Duration::from_secs(10))
        );
        assert!(state.is_ejected(now + 9 * second));
        assert!(!state.is_ejected(now + 10 * second));
        now += 11 * second;
        for _ in 0..2 {
            assert_eq!(state.record_failure(&policy(), now, || true), None);
        }
        assert_eq!(
            state.record_failure(&policy(), now, || true),
            Some(Duration::from_secs(20))
        );
        now += 21 * second;
        for _ in 0..2 {
            state.record_failure(&policy(), now, || true);
        }
        // Capped at max_ejection_time.
        assert_eq!(
            state.record_failure(&policy(), now, || true),
            Some(Duration::from_secs(25))
        );
        // Long healthy service resets the multiplier.
        now += 100 * second;
        for _ in 0..2 {
            state.record_failure(&policy(), now, || true);
        }
        assert_eq!(
            state.record_failure(&policy(), now, || true),
            Some(Duration::from_secs(10))
        );
    }

    #[test]
    fn respects_the_pool_cap() {
        let state = PassiveState::default();
        for _ in 0..10 {
            assert_eq!(state.record_failure(&policy(), 1, || false), None);
        }
        assert!(!state.is_ejected(1));
    }

    #[test]
    fn agent_percent_scales_weight_without_reaching_zero() {
        let backend = Backend::new("127.0.0.1:1".parse().unwrap(), 3);
        assert_eq!(backend.effective_weight(), 3);
        backend.set_agent(Some(50), None);
        assert_eq!(backend.effective_weight(), 1);
        backend.set_agent(Some(1), None);
        assert_eq!(backend.effective_weight(), 1);
        backend.set_agent(Some(0), None);
        assert_eq!(backend.effective_weight(), 0);
        backend.set_agent(Some(200), Some(AgentVerdict::Drain));
        assert_eq!(backend.effective_weight(), 3);
        assert!(!backend.is_available());
    }

    #[test]
    fn slow_start_ramps_the_balancing_weight() {
        let backend = Backend::new("127.0.0.1:1".parse().unwrap(), 2);
        assert_eq!(backend.balancing_weight(), 200);
        // A backend present from the start never ramps, even with slow start on.
        backend.set_slow_start(Duration::from_secs(10));
        assert!(!backend.update_ramp(1));
        assert_eq!(backend.balancing_weight(), 200);
        backend.set_slow_start(Duration::ZERO);
        // Off: a ramp request changes nothing.
        backend.begin_ramp(1);
        assert_eq!(backend.balancing_weight(), 200);
        let second = 1_000_000_000;
        backend.set_slow_start(Duration::from_secs(10));
        backend.begin_ramp(second);
        assert_eq!(backend.ramp_percent(), 10);
        assert_eq!(backend.balancing_weight(), 20);
        assert_eq!(backend.effective_weight(), 1);
        assert!(backend.update_ramp(6 * second));
        assert_eq!(backend.ramp_percent(), 55);
        assert_eq!(backend.balancing_weight(), 110);
        assert!(!backend.update_ramp(6 * second));
        backend.update_ramp(11 * second);
        assert_eq!(backend.balancing_weight(), 200);
        // A ramp that starts in the future (an ejection's end) holds the floor until then.
        backend.begin_ramp(100 * second);
        backend.update_ramp(50 * second);
        assert_eq!(backend.ramp_percent(), 10);
        backend.set_agent(Some(50), None);
        assert_eq!(backend.balancing_weight(), 10);
        backend.set_slow_start(Duration::ZERO);
        assert_eq!(backend.balancing_weight(), 100);
    }

    #[test]
    fn recovery_starts_a_ramp_and_forgets_latency() {
        let backend = Backend::new("127.0.0.1:1".parse().unwrap(), 1);
        backend.set_slow_start(Duration::from_secs(10));
        backend.latency.observe(5_000_000, now_ns());
        backend.set_healthy(false);
        assert_eq!(backend.ramp_percent(), 100);
        backend.set_healthy(true);
        assert_eq!(backend.ramp_percent(), 10);
        assert_eq!(backend.latency.estimate(now_ns()), 0);
    }
}
