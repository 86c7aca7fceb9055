//! The one attempt loop of the data path, shared by HTTP requests, upgrades (WebSocket) and
//! TCP sessions: the balancer key of a client (the same for every protocol), the random
//! source, picking with exclusions up to the one `max_attempts` cap, panic mode, and what a
//! failure on a backend costs it.
//!
//! [`Attempts::connect`] connects to the balancer's picks until one connects; each connect
//! failure on the way is reported with [`Attempts::failed`], which charges the backend as the
//! [`Failure`] says (nothing for a local failure) and logs it. When no backend is left, the
//! answer is [`Failure::exhausted`]. An HTTP request whose exchange fails unsent (or may be
//! replayed) calls it again for the next backend.

use std::cell::Cell;
use std::future::Future;
use std::net::IpAddr;

use fulcrum_balance::{bounded, key_hash, splitmix64, Algorithm, PickContext};
use http::header::{self, HeaderMap};
use http::Request;

use crate::config::HashKey;
use crate::pool::{Backend, PoolSettings, PoolSnapshot};
use crate::proxy::error::{Blame, Failure};
use crate::proxy::http::HttpProxy;
use crate::runtime::clock::now_ns;
use crate::upstream::ConnectError;

/// Most backends one request, upgrade or session is tried on, whatever the config says
/// (bounds the stack array of tried indexes).
pub const MAX_ATTEMPTS_CAP: usize = 8;

thread_local! {
    static RANDOM_STATE: Cell<u64> = Cell::new(now_ns() ^ (std::process::id() as u64) << 32);
}

/// A fresh random number for balancer decisions (per-thread SplitMix64; no lock, no syscall).
pub fn next_random() -> u64 {
    RANDOM_STATE.with(|state| {
        let next = splitmix64(state.get());
        state.set(next);
        next
    })
}

/// The hash of a client's IP address, as consistent hashing (`hash_key = "client_ip"`) keys
/// it on every protocol: an IPv4-mapped IPv6 address hashes as its IPv4 address.
pub fn client_ip_hash(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => key_hash(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => key_hash(&v4.octets()),
            None => key_hash(&v6.octets()),
        },
    }
}

/// The hash of the request's affinity key, or `None` when the request has no such key
/// (header or cookie absent). Reads the key in place: no allocation.
pub fn request_key_hash<B>(key: &HashKey, request: &Request<B>, client: IpAddr) -> Option<u64> {
    match key {
        HashKey::ClientIp => Some(client_ip_hash(client)),
        HashKey::Header(name) => request
            .headers()
            .get(name)
            .map(|value| key_hash(value.as_bytes())),
        HashKey::Cookie(name) => cookie_value(request.headers(), name.as_bytes()).map(key_hash),
        HashKey::Path => Some(key_hash(request.uri().path().as_bytes())),
    }
}

/// The value of cookie `name` in the request's `Cookie` header(s).
fn cookie_value<'a>(headers: &'a HeaderMap, name: &[u8]) -> Option<&'a [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii();
            let value = pair.strip_prefix(name)?.strip_prefix(b"=")?;
            Some(value.trim_ascii())
        })
}

/// The balancer key of an HTTP request or upgrade from `client`: under consistent hashing
/// the hash of the pool's `hash_key` (a request without that key spreads randomly), else 0
/// (unused).
#[inline]
pub fn http_key_hash<B>(settings: &PoolSettings, request: &Request<B>, client: IpAddr) -> u64 {
    if settings.algorithm == Algorithm::Maglev {
        request_key_hash(&settings.hash_key, request, client).unwrap_or_else(next_random)
    } else {
        0
    }
}

/// The balancer key of a TCP session from `client`: its IP address, hashed as for HTTP (a
/// session has no header, cookie or path to hash), so a TCP and an HTTP listener on one
/// pool send a client to the same backend.
pub fn session_key_hash(client: IpAddr) -> u64 {
    client_ip_hash(client)
}

/// The backends one request (upgrade, session) is tried on: the balancer's picks, each
/// excluding those tried before, up to the pool's `max_attempts` (at most
/// [`MAX_ATTEMPTS_CAP`]); then, in panic mode, every backend in turn from a random one,
/// whatever its health says (least bad when checks are wrong or the whole pool flaps).
pub struct Attempts<'a> {
    /// The proxy whose request this is (listener and pool names, event log).
    proxy: &'a HttpProxy,
    snapshot: &'a PoolSnapshot,
    key_hash: u64,
    now_ns: u64,
    limit: u8,
    picked: u8,
    /// Panic mode: `None` until picking ran out; then the next step of the sweep.
    sweep: Option<u8>,
    /// Panic mode may not follow (a failure is to be answered, or Fulcrum itself failed).
    no_panic: bool,
    /// Where panic mode's sweep started (random).
    start: usize,
    /// The latest failure that was Fulcrum's own (answered instead of "no backend").
    local: Option<Failure>,
    tried: [usize; MAX_ATTEMPTS_CAP],
}

impl std::fmt::Debug for Attempts<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempts")
            .field("picked", &self.picked)
            .field("limit", &self.limit)
            .field("sweep", &self.sweep)
            .finish_non_exhaustive()
    }
}

impl<'a> Attempts<'a> {
    /// The attempts at one request of `proxy` keyed `key_hash` (see [`http_key_hash`],
    /// [`session_key_hash`]) on `snapshot` (of `proxy`'s pool).
    #[inline]
    pub fn new(proxy: &'a HttpProxy, snapshot: &'a PoolSnapshot, key_hash: u64) -> Self {
        Attempts {
            proxy,
            snapshot,
            key_hash,
            now_ns: now_ns(),
            limit: snapshot.settings.max_attempts.clamp(1, MAX_ATTEMPTS_CAP) as u8,
            picked: 0,
            sweep: None,
            no_panic: false,
            start: 0,
            local: None,
            tried: [usize::MAX; MAX_ATTEMPTS_CAP],
        }
    }

    /// How many tries the pool allows.
    pub fn limit(&self) -> usize {
        usize::from(self.limit)
    }

    /// The next backend to try, `None` when there is none left.
    #[inline]
    pub fn next_backend(&mut self) -> Option<&'a Backend> {
        if self.sweep.is_none() && self.picked < self.limit {
            let picked = usize::from(self.picked);
            let ctx = PickContext {
                key_hash: self.key_hash,
                random: next_random(),
                now_ns: self.now_ns,
                excluded: &self.tried[..picked],
            };
            if let Some(index) = self.snapshot.pick(&ctx) {
                self.tried[picked] = index;
                self.picked += 1;
                return Some(&self.snapshot.backends[index]);
            }
        }
        self.next_in_panic()
    }

    /// Panic mode's sweep (kept out of line: rare).
    #[inline(never)]
    fn next_in_panic(&mut self) -> Option<&'a Backend> {
        let backends = &self.snapshot.backends;
        if !self.snapshot.settings.panic_mode || self.no_panic || backends.is_empty() {
            return None;
        }
        let step = match self.sweep {
            Some(step) => step,
            None => {
                self.start = bounded(next_random(), backends.len());
                let (listener, pool) = (&self.proxy.listener, &self.proxy.pool.name);
                tracing::warn!(%listener, %pool, "panic mode: no backend available, trying all of them");
                0
            }
        };
        if usize::from(step) >= backends.len().min(MAX_ATTEMPTS_CAP) {
            return None;
        }
        self.sweep = Some(step + 1);
        Some(&backends[(self.start + usize::from(step)) % backends.len()])
    }

    /// Whether the backends now come from panic mode's sweep.
    pub fn in_panic(&self) -> bool {
        self.sweep.is_some()
    }

    /// No panic-mode sweep after this (the caller has a failure to answer with).
    pub fn no_panic(&mut self) {
        self.no_panic = true;
    }

    /// Connect failover: `connect` to the next backend until one connects; each failure is
    /// reported ([`Attempts::failed`]). When none is left: what to answer (see
    /// [`Failure::exhausted`]).
    #[inline]
    pub async fn connect<T, F, Fut>(&mut self, mut connect: F) -> Result<(&'a Backend, T), Failure>
    where
        F: FnMut(&'a Backend) -> Fut,
        Fut: Future<Output = Result<T, ConnectError>>,
    {
        while let Some(backend) = self.next_backend() {
            match connect(backend).await {
                Ok(connected) => return Ok((backend, connected)),
                Err(error) => self.failed(backend, Failure::connect(&error), &error),
            }
        }
        Err(Failure::exhausted(self.local))
    }

    /// Reports `failure` on `backend` (caused by `cause`): the backend is charged
    /// as the failure says — in panic mode only logged, since every backend is unavailable
    /// then anyway — and a local failure ends panic mode's hopes (it would fail the same).
    pub fn failed(&mut self, backend: &Backend, failure: Failure, cause: &dyn std::fmt::Display) {
        if failure.is_local() {
            self.no_panic = true;
            self.local = Some(failure);
        }
        let proxy = self.proxy;
        if !self.in_panic() {
            proxy.charge(self.snapshot, backend, failure.blame());
        }
        failure.log(
            &proxy.listener,
            &proxy.pool.name,
            Some(backend),
            cause,
            "trying another backend",
        );
    }
}

/// Whether one more of `pool_size` backends may be ejected while `ejected` already are: the
/// share stays within `max_percent`, except that the first ejection is always allowed when
/// `max_percent` is above 0 (as Envoy does), so a pool of three with the default 10% can still
/// eject its one bad backend, and a client that makes backends fail cannot empty the pool.
fn may_eject_another(ejected: usize, pool_size: usize, max_percent: u8) -> bool {
    let max_percent = usize::from(max_percent);
    max_percent > 0 && (ejected == 0 || (ejected + 1) * 100 <= pool_size * max_percent)
}

impl HttpProxy {
    /// Charges `backend` (of `snapshot`) with `blame`: failure counter, connect back-off,
    /// and passive ejection, capped at the pool's `max_ejected_percent`.
    pub(crate) fn charge(&self, snapshot: &PoolSnapshot, backend: &Backend, blame: Blame) {
        let backoff = match blame {
            Blame::None => return,
            Blame::Failure => None,
            Blame::FailureWithBackoff => Some(snapshot.settings.failure_backoff),
        };
        backend.record_failure(backoff);
        self.passive_failure(snapshot, backend);
    }

    /// Charges `backend` with `broken` response bodies that broke after their head was passed
    /// on (already counted as failures): each one in the passive-ejection streak.
    #[cold]
    #[inline(never)]
    pub(crate) fn charge_broken_bodies(
        &self,
        snapshot: &PoolSnapshot,
        backend: &Backend,
        broken: u32,
    ) {
        // Enough to eject at any threshold that matters; a burst need not loop for long.
        for _ in 0..broken.min(64) {
            self.passive_failure(snapshot, backend);
        }
    }

    /// One failure in `backend`'s passive-ejection streak, which may eject it (capped at the
    /// pool's `max_ejected_percent`).
    fn passive_failure(&self, snapshot: &PoolSnapshot, backend: &Backend) {
        let Some(policy) = &snapshot.settings.passive else {
            return;
        };
        let may_eject = || {
            let ejected = snapshot.backends.iter().filter(|b| b.is_ejected()).count();
            may_eject_another(ejected, snapshot.backends.len(), policy.max_ejected_percent)
        };
        if let Some(duration) = backend.record_passive_failure(policy, may_eject) {
            self.events.record(
                "ejected",
                Some(&self.pool.name),
                Some(&backend.id),
                format!(
                    "backend {} ejected for {duration:?} after {} consecutive failures",
                    backend.id, policy.consecutive_failures
                ),
            );
        }
    }

    /// Charges `backend` with `failure` (as [`Failure::blame`] says) and logs it, `next`
    /// telling what happens now.
    pub(crate) fn fail(
        &self,
        snapshot: &PoolSnapshot,
        backend: &Backend,
        failure: Failure,
        cause: &dyn std::fmt::Display,
        next: &str,
    ) {
        self.charge(snapshot, backend, failure.blame());
        failure.log(&self.listener, &self.pool.name, Some(backend), cause, next);
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn ejection_is_capped_by_share_but_one_is_always_allowed() {
        assert!(may_eject_another(0, 3, 10));
        assert!(!may_eject_another(1, 3, 10));
        assert!(may_eject_another(1, 20, 10));
        assert!(!may_eject_another(2, 20, 10));
        assert!(may_eject_another(1, 4, 50));
        assert!(!may_eject_another(2, 4, 50));
        assert!(!may_eject_another(0, 3, 0));
        assert!(may_eject_another(9, 10, 100));
    }
    use std::path::Path;

    use std::sync::Arc;

    use super::*;
    use crate::config::Config;
    use crate::pool::Pool;

    fn request(headers: &[(&str, &str)], path: &str) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn keys_are_read_from_the_request() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let r = request(
            &[("x-user", "alice"), ("cookie", "a=1; session=s3cr3t ;b=2")],
            "/cart?x=1",
        );
        let hash = |key: &HashKey| request_key_hash(key, &r, ip);
        assert_eq!(hash(&HashKey::ClientIp), Some(key_hash(&[10, 1, 2, 3])));
        assert_eq!(
            request_key_hash(&HashKey::ClientIp, &r, mapped),
            hash(&HashKey::ClientIp)
        );
        let header = HashKey::Header(http::HeaderName::from_static("x-user"));
        assert_eq!(hash(&header), Some(key_hash(b"alice")));
        assert_eq!(
            hash(&HashKey::Cookie("session".into())),
            Some(key_hash(b"s3cr3t"))
        );
        assert_eq!(hash(&HashKey::Cookie("sess".into())), None);
        assert_eq!(hash(&HashKey::Path), Some(key_hash(b"/cart")));
        let bare = request(&[], "/");
        assert_eq!(request_key_hash(&header, &bare, ip), None);
    }

    /// A TCP session and an HTTP request of one client carry one key.
    #[test]
    fn sessions_and_requests_of_a_client_share_its_key() {
        for ip in ["10.0.0.1", "::ffff:10.0.0.1", "2001:db8::7"] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(
                Some(session_key_hash(ip)),
                request_key_hash(&HashKey::ClientIp, &request(&[], "/"), ip)
            );
        }
        assert_ne!(
            session_key_hash("10.0.0.1".parse().unwrap()),
            session_key_hash("10.0.0.2".parse().unwrap())
        );
    }

    fn pool(n: usize, extra: &str) -> Arc<Pool> {
        let backends: Vec<String> = (0..n)
            .map(|i| format!("\"127.0.0.1:{}\"", 10000 + i))
            .collect();
        let text = format!(
            "[listeners.web]\nlisten = \"127.0.0.1:8080\"\nprotocol = \"http\"\npool = \"app\"\n\n\
             [pools.app]\nalgorithm = \"round_robin\"\nbackends = [{}]\n{extra}\n",
            backends.join(", ")
        );
        let config = Config::parse(&text, Path::new("test.toml")).unwrap();
        Pool::from_config("app", &config.pools["app"])
    }

    /// Picks exclude what was tried, stop at max_attempts, and panic mode then sweeps every
    /// backend (at most the cap), unless told not to.
    #[test]
    fn attempts_exclude_tried_backends_then_sweep_in_panic_mode() {
        let pool = pool(3, "max_attempts = 2");
        let snapshot = pool.snapshot();
        let proxy = HttpProxy::new("web", pool.clone(), Default::default(), false);
        let mut attempts = Attempts::new(&proxy, &snapshot, 0);
        let first = attempts.next_backend().unwrap().id.clone();
        let second = attempts.next_backend().unwrap().id.clone();
        assert_ne!(first, second);
        assert!(attempts.next_backend().is_none(), "max_attempts = 2");

        let pool = self::pool(10, "max_attempts = 1\npanic_mode = true");
        let snapshot = pool.snapshot();
        for backend in &snapshot.backends {
            backend.set_healthy(false);
        }
        let proxy = HttpProxy::new("web", pool.clone(), Default::default(), false);
        let mut attempts = Attempts::new(&proxy, &snapshot, 0);
        let swept: Vec<String> =
            std::iter::from_fn(|| attempts.next_backend().map(|b| b.id.clone())).collect();
        assert!(attempts.in_panic());
        assert_eq!(swept.len(), MAX_ATTEMPTS_CAP);
        let mut distinct = swept.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), MAX_ATTEMPTS_CAP, "{swept:?}");
        let mut attempts = Attempts::new(&proxy, &snapshot, 0);
        attempts.no_panic();
        assert!(attempts.next_backend().is_none());
    }
}
