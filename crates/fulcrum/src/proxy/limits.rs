//! The per-request limits of one listener, checked before anything is picked or forwarded:
//! the number of header lines (`max_header_count`, 431), the length of the request target
//! (`max_uri_bytes`, 414) and, when configured, the requests per second of each client IP
//! (`requests_per_ip`, 429 with `Retry-After`).
//!
//! Per request this costs two comparisons, and one branch while `requests_per_ip` is not set.
//! When it is set, a token bucket per client IP ([`RateLimiter`]) is shared by the listener's
//! workers (exact across them): 64 shards, each a short mutex over a map of the IPs it
//! tracks, and no syscall (`runtime::clock::now_ns` reads the vDSO clock).
//!
//! On HTTP/1 hyper's parser refuses a head with more than `max_header_count` lines itself
//! (its 431, and the connection closes): such refusals are counted and logged here too
//! ([`RequestLimits::head_refused`]), with the 414 for a target over hyper's own 65534 bytes.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderValue};
use http::{Request, Response, Uri, Version};

use crate::config::{ListenerConfig, RequestRateConfig};
use crate::proxy::body::ProxyBody;
use crate::proxy::error::{Failure, Kind, Origin};
use crate::runtime::clock::{now_ns, OncePerSecond};

/// Nanoseconds per second.
const SECOND: u64 = 1_000_000_000;

/// Requests refused by one listener's limits, for the metrics.
#[derive(Debug, Default)]
pub struct RefusedRequests {
    /// 431: more header lines than `max_header_count`, or (HTTP/1, by hyper) a head over
    /// `max_header_bytes`.
    pub headers: AtomicU64,
    /// 414: a request target over `max_uri_bytes`.
    pub uri: AtomicU64,
    /// 429: over `requests_per_ip`.
    pub rate_limited: AtomicU64,
}

/// The per-request limits of one listener.
#[derive(Debug)]
pub struct RequestLimits {
    max_header_count: usize,
    max_uri_bytes: usize,
    rate: Option<Box<RateLimiter>>,
    refused: Arc<RefusedRequests>,
    /// One log line a second at most, per kind of refusal.
    logs: [OncePerSecond; 3],
}

impl Default for RequestLimits {
    /// No limits (a proxy built without a listener config).
    fn default() -> Self {
        RequestLimits {
            max_header_count: usize::MAX,
            max_uri_bytes: usize::MAX,
            rate: None,
            refused: Arc::default(),
            logs: Default::default(),
        }
    }
}

impl RequestLimits {
    /// The limits of `config`'s listener.
    pub fn new(config: &ListenerConfig) -> Self {
        RequestLimits {
            max_header_count: config.max_header_count,
            max_uri_bytes: config.max_uri_bytes,
            rate: config
                .requests_per_ip
                .as_ref()
                .map(|rate| Box::new(RateLimiter::new(rate))),
            ..RequestLimits::default()
        }
    }

    /// The refusal counters (shared with the listener's stats).
    pub fn refused(&self) -> Arc<RefusedRequests> {
        self.refused.clone()
    }

    /// Why `request` from `client` is refused (counted and logged), `None` when it may go on.
    #[inline]
    pub(crate) fn check<B>(
        &self,
        request: &Request<B>,
        client: SocketAddr,
        listener: &str,
    ) -> Option<Refusal> {
        let count = request.headers().len();
        if count > self.max_header_count {
            return Some(self.too_many_headers(count, client, listener));
        }
        let target = target_len(request.uri(), request.version());
        if target > self.max_uri_bytes {
            return Some(self.uri_too_long(target, client, listener));
        }
        let rate = self.rate.as_ref()?;
        let wait = rate.check(client.ip(), now_ns()).err()?;
        Some(self.rate_limited(rate, wait, client, listener))
    }

    #[cold]
    fn too_many_headers(&self, count: usize, client: SocketAddr, listener: &str) -> Refusal {
        self.refused.headers.fetch_add(1, Relaxed);
        if self.logs[0].ready() {
            tracing::warn!(%listener, %client, headers = count, max_header_count = self.max_header_count, "request with too many header lines; answered 431 (logged at most once a second)");
        }
        Refusal::TooManyHeaders
    }

    #[cold]
    fn uri_too_long(&self, length: usize, client: SocketAddr, listener: &str) -> Refusal {
        self.refused.uri.fetch_add(1, Relaxed);
        if self.logs[1].ready() {
            tracing::warn!(%listener, %client, bytes = length, max_uri_bytes = self.max_uri_bytes, "request target too long; answered 414 (logged at most once a second)");
        }
        Refusal::UriTooLong
    }

    #[cold]
    fn rate_limited(
        &self,
        rate: &RateLimiter,
        wait_ns: u64,
        client: SocketAddr,
        listener: &str,
    ) -> Refusal {
        self.refused.rate_limited.fetch_add(1, Relaxed);
        let retry_after = retry_after_secs(wait_ns);
        if self.logs[2].ready() {
            tracing::warn!(%listener, %client, rate = rate.rate, burst = rate.burst, retry_after, "client over requests_per_ip; answered 429 (logged at most once a second)");
        }
        Refusal::RateLimited { retry_after }
    }

    /// Counts and logs (at most once a second) a request head hyper's HTTP/1 parser refused
    /// itself with 431 (more than `max_header_count` lines, more than `max_header_bytes`) or
    /// 414 (a target over its own 65534 bytes), given its error; other errors are ignored.
    pub fn head_refused(&self, error: &hyper::Error, client: SocketAddr, listener: &str) {
        if !error.is_parse_too_large() {
            return;
        }
        // hyper tells the two apart only in its message.
        let uri = error.to_string().contains("URI");
        let (counter, log, status) = if uri {
            (&self.refused.uri, &self.logs[1], 414)
        } else {
            (&self.refused.headers, &self.logs[0], 431)
        };
        counter.fetch_add(1, Relaxed);
        if log.ready() {
            tracing::warn!(%listener, %client, status, max_header_count = self.max_header_count, "request head over max_header_bytes or max_header_count (or a target over 65534 bytes); answered by the HTTP/1 parser, connection closed (logged at most once a second)");
        }
    }
}

/// Why a request was refused by a limit; small, so a request's future stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// More header lines than `max_header_count` (431).
    TooManyHeaders,
    /// A target over `max_uri_bytes` (414).
    UriTooLong,
    /// Over `requests_per_ip` (429), a token available in `retry_after` seconds.
    RateLimited {
        /// Whole seconds, at least 1.
        retry_after: u64,
    },
}

impl Refusal {
    /// The answer: Fulcrum's one-line error. A refused head closes an HTTP/1 connection
    /// (`Connection: close`), as hyper's parser does; a 429 has `Retry-After` and keeps it.
    #[cold]
    pub(crate) fn response(self, version: Version) -> Response<ProxyBody> {
        let kind = match self {
            Refusal::TooManyHeaders => Kind::HeadersTooLarge,
            Refusal::UriTooLong => Kind::UriTooLong,
            Refusal::RateLimited { .. } => Kind::TooManyRequests,
        };
        let mut response = Failure::new(Origin::Client, kind).response();
        let headers = response.headers_mut();
        match self {
            Refusal::RateLimited { retry_after } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
            }
            _ if version < Version::HTTP_2 => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// The length of the request target as the client sent it: on HTTP/1 the request line's
/// target (origin-form `/path?query`, absolute-form `http://host/path`, authority-form, `*`);
/// on HTTP/2 `:path` (`:authority` for a CONNECT). A `#fragment`, which hyper drops and
/// never forwards, is not counted.
#[inline]
fn target_len(uri: &Uri, version: Version) -> usize {
    let path = uri.path_and_query().map_or(0, |p| p.as_str().len());
    let authority = || uri.authority().map_or(0, |a| a.as_str().len());
    if version == Version::HTTP_2 {
        return if path > 0 { path } else { authority() };
    }
    match uri.scheme_str() {
        Some(scheme) => scheme.len() + 3 + authority() + path,
        None => authority() + path,
    }
}

/// Whole seconds until `wait_ns` has passed, at least 1 (`Retry-After`).
fn retry_after_secs(wait_ns: u64) -> u64 {
    wait_ns.div_ceil(SECOND).max(1)
}

/// Shards of the bucket map.
const SHARDS: usize = 64;

/// One shard on its own cache line, so workers locking neighbouring shards do not contend.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Shard(Mutex<Buckets>);

/// A shard's buckets: each client's theoretical arrival time, by key.
type Buckets = HashMap<Key, u64, BuildHasherDefault<Prehashed>>;

/// A client's bucket key with its hash, computed once (keyed SipHash) for both the shard and
/// the shard's map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    hash: u64,
    ip: IpAddr,
}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes [`Key::hash`] through to the map.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used; anything else still hashes, just not as well.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `requests_per_ip`: a token bucket per client IP, `burst` deep and refilled at `rate` a
/// second, shared by a listener's workers.
///
/// Each bucket is one number, its theoretical arrival time (GCRA, the generic cell rate
/// algorithm: the same verdicts as a token bucket): the instant its tokens would be all spent
/// at the rate. A request is allowed when, with its token taken, that instant is at most
/// `burst` tokens' worth of time ahead of now. A bucket whose instant has passed is full,
/// exactly like a bucket never seen: it can be forgotten without changing any verdict.
///
/// Memory: at most `max_clients` IPs are tracked (split evenly over the shards; IPv6 per /64,
/// so one host rotating through its addresses is one client). A new IP finding its shard
/// full first removes the shard's full buckets (idle clients: nothing is lost); if none is
/// full, the eighth of the buckets nearest to full is evicted — their clients get fresh
/// buckets, the smallest gift possible — while the clients most limited keep theirs.
#[derive(Debug)]
pub struct RateLimiter {
    rate: u64,
    burst: u64,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst` tokens' worth of nanoseconds.
    tolerance: u64,
    /// Most IPs tracked per shard.
    per_shard: usize,
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
}

impl RateLimiter {
    /// The limiter of `config`.
    pub fn new(config: &RequestRateConfig) -> Self {
        let rate = config.rate.max(1);
        let burst = config.burst().max(1);
        let interval = (SECOND / rate).max(1);
        RateLimiter {
            rate,
            burst,
            interval,
            tolerance: interval.saturating_mul(burst),
            per_shard: usize::try_from(config.max_clients.div_ceil(SHARDS as u64))
                .unwrap_or(usize::MAX)
                .max(1),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    /// Takes a token for a request from `ip` at `now` (nanoseconds, [`now_ns`]): `Ok`, or
    /// `Err` with the nanoseconds until one is available.
    pub fn check(&self, ip: IpAddr, now: u64) -> Result<(), u64> {
        let ip = client_key(ip);
        let hash = self.hasher.hash_one(ip);
        let key = Key { hash, ip };
        // Bits the map does not use for its slot (the low ones) or its tags (the top 7).
        let shard = &self.shards[((hash >> 32) as usize) % SHARDS];
        let mut map = shard.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tat) = map.get_mut(&key) {
            let next = (*tat).max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.tolerance {
                return Err(ahead - self.tolerance);
            }
            *tat = next;
            return Ok(());
        }
        // A new client: a full bucket, so this request is allowed.
        if map.len() >= self.per_shard {
            self.make_room(&mut map, now);
        }
        map.insert(key, now + self.interval);
        Ok(())
    }

    /// Frees at least one place in a full shard (see the type's comment): the full buckets,
    /// or else the eighth of them nearest to full (at least one), so that a flood of new
    /// clients scans a shard once per eighth of it rather than once per client.
    #[cold]
    fn make_room(&self, map: &mut Buckets, now: u64) {
        map.retain(|_, tat| *tat > now);
        if map.len() < self.per_shard {
            return;
        }
        let mut tats: Vec<u64> = map.values().copied().collect();
        let evict = (tats.len() / 8).max(1);
        let (_, &mut cut, _) = tats.select_nth_unstable(evict - 1);
        // Every bucket below the cut goes, and as many at it as make up the number.
        let mut ties = evict - tats.iter().filter(|&&t| t < cut).count();
        map.retain(|_, tat| {
            if *tat < cut {
                return false;
            }
            if *tat == cut && ties > 0 {
                ties -= 1;
                return false;
            }
            true
        });
    }

    /// Client IPs tracked now.
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

/// The bucket key of `ip`: IPv4 (also when mapped into IPv6) as is, IPv6 per /64 (what one
/// host or site is given, so rotating through it does not make new clients).
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rate: u64, burst: u64, max_clients: u64) -> RateLimiter {
        RateLimiter::new(&RequestRateConfig {
            rate,
            burst: Some(burst),
            max_clients,
        })
    }

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn a_burst_passes_then_the_rate() {
        // 10 a second (one token per 100 ms), 5 deep.
        let limiter = limiter(10, 5, 1000);
        let t0 = 1_000 * SECOND;
        for _ in 0..5 {
            assert_eq!(limiter.check(A, t0), Ok(()));
        }
        // The 6th waits exactly one interval; another client is unaffected.
        assert_eq!(limiter.check(A, t0), Err(100_000_000));
        assert_eq!(limiter.check(B, t0), Ok(()));
        // Refusals take no token.
        assert_eq!(limiter.check(A, t0 + 40_000_000), Err(60_000_000));
        assert_eq!(limiter.check(A, t0 + 100_000_000), Ok(()));
        assert!(limiter.check(A, t0 + 100_000_000).is_err());
        // A quiet second refills 5 (not more: the bucket is 5 deep).
        let later = t0 + 2 * SECOND;
        for _ in 0..5 {
            assert_eq!(limiter.check(A, later), Ok(()));
        }
        assert!(limiter.check(A, later).is_err());
    }

    #[test]
    fn the_sustained_rate_is_exact() {
        // 100 a second, 1 deep: over 10 s of requests every millisecond, 1000 pass (+1 at t0).
        let limiter = limiter(100, 1, 1000);
        let t0 = SECOND;
        let passed = (0..10_000u64)
            .filter(|ms| limiter.check(A, t0 + ms * 1_000_000).is_ok())
            .count();
        assert_eq!(passed, 1000);
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(1), 1);
        assert_eq!(retry_after_secs(SECOND), 1);
        assert_eq!(retry_after_secs(SECOND + 1), 2);
        assert_eq!(retry_after_secs(0), 1);
        // 1 a second, 2 deep: the 3rd request waits a second.
        let limiter = limiter(1, 2, 1000);
        assert!(limiter.check(A, SECOND).is_ok() && limiter.check(A, SECOND).is_ok());
        assert_eq!(limiter.check(A, SECOND).map_err(retry_after_secs), Err(1));
    }

    #[test]
    fn memory_is_bounded_and_idle_buckets_go_first() {
        // 64 clients at most: one per shard.
        let limiter = limiter(1, 2, 64);
        let t0 = 10 * SECOND;
        // One limited client, then 100 000 others rotating through IPv6 /64s.
        assert!(limiter.check(A, t0).is_ok() && limiter.check(A, t0).is_ok());
        assert!(limiter.check(A, t0).is_err());
        for n in 0..20_000u128 {
            let ip = IpAddr::V6(Ipv6Addr::from((0x2001_0db8u128 << 96) | (n << 64)));
            let _ = limiter.check(ip, t0 + 1);
            assert!(limiter.clients() <= 64);
        }
        assert!(limiter.clients() <= 64);
        // Buckets whose time has passed are full: a new client's arrival sweeps them out.
        let much_later = t0 + 100 * SECOND;
        for n in 0..200u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n));
            assert_eq!(limiter.check(ip, much_later), Ok(()));
        }
        assert!(limiter.clients() <= 64);
    }

    #[test]
    fn a_full_shard_evicts_the_bucket_nearest_to_full_not_the_limited_client() {
        // Two places per shard.
        let limiter = limiter(1, 1, 2 * SHARDS as u64);
        let shard =
            |ip: IpAddr| ((limiter.hasher.hash_one(client_key(ip)) >> 32) as usize) % SHARDS;
        let mut same = (1..u32::MAX)
            .map(|n| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n)))
            .filter(|ip| shard(*ip) == shard(A));
        let (near_full, newcomer) = (same.next().unwrap(), same.next().unwrap());
        let t0 = 10 * SECOND;
        // A is limited (its bucket 1 s from full); `near_full` spent its token later, so
        // its bucket is nearer to full.
        assert!(limiter.check(A, t0).is_ok());
        assert!(limiter.check(A, t0).is_err());
        assert!(limiter.check(near_full, t0 - SECOND / 2).is_ok());
        assert_eq!(limiter.clients(), 2);
        assert!(limiter.check(newcomer, t0).is_ok());
        assert_eq!(limiter.clients(), 2);
        // A is still limited; `near_full` was forgotten (a fresh bucket).
        assert!(limiter.check(A, t0).is_err());
        assert!(limiter.check(near_full, t0).is_ok());
    }

    #[test]
    fn a_flood_of_new_clients_evicts_an_eighth_of_a_full_shard_at_a_time() {
        // 16 places per shard, filled with limited buckets of increasing fullness.
        let limiter = limiter(1, 100, 16 * SHARDS as u64);
        let shard =
            |ip: IpAddr| ((limiter.hasher.hash_one(client_key(ip)) >> 32) as usize) % SHARDS;
        let target = shard(A);
        let same: Vec<IpAddr> = (1..u32::MAX)
            .map(|n| IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + n)))
            .filter(|ip| shard(*ip) == target)
            .take(18)
            .collect();
        let t0 = 1000 * SECOND;
        for (n, ip) in same[..16].iter().enumerate() {
            // Client n spends n + 1 tokens: the first ones are the nearest to full.
            for _ in 0..=n {
                assert!(limiter.check(*ip, t0).is_ok());
            }
        }
        assert_eq!(limiter.clients(), 16);
        // A newcomer evicts two (16 / 8): the two nearest to full.
        assert!(limiter.check(same[16], t0).is_ok());
        assert_eq!(limiter.clients(), 15);
        let tracked = |ip: &IpAddr| {
            let map = limiter.shards[target].0.lock().unwrap();
            let hash = limiter.hasher.hash_one(*ip);
            map.contains_key(&Key { hash, ip: *ip })
        };
        assert!(!tracked(&same[0]) && !tracked(&same[1]));
        assert!(same[2..17].iter().all(tracked));
        // The next newcomer fits without a sweep.
        assert!(limiter.check(same[17], t0).is_ok());
        assert_eq!(limiter.clients(), 16);
    }

    #[test]
    fn ipv6_is_keyed_per_slash_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), A);
        let limiter = limiter(1, 1, 1000);
        assert!(limiter.check(a, SECOND).is_ok());
        assert!(limiter.check(b, SECOND).is_err());
        assert!(limiter.check(c, SECOND).is_ok());
    }

    #[test]
    fn the_target_is_counted_as_sent() {
        let h1 = |target: &str| target_len(&target.parse::<Uri>().unwrap(), Version::HTTP_11);
        for target in [
            "/",
            "/a/b?c=d&e",
            "http://example.com:8080/x?y",
            "example.com:443",
            "*",
        ] {
            assert_eq!(h1(target), target.len(), "{target}");
        }
        let h2 = "https://example.com/path?q".parse::<Uri>().unwrap();
        assert_eq!(target_len(&h2, Version::HTTP_2), "/path?q".len());
    }

    #[test]
    fn limits_answer_431_414_and_429() {
        let text = "[listeners.web]\nlisten = \"127.0.0.1:0\"\npool = \"app\"\n\
                    max_header_count = 2\nmax_uri_bytes = 64\n\
                    requests_per_ip = { rate = 1, burst = 1 }\n\
                    [pools.app]\nbackends = [\"127.0.0.1:1\"]\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let limits = RequestLimits::new(&config.listeners["web"]);
        let client: SocketAddr = "192.0.2.9:1234".parse().unwrap();
        let request = |uri: &str, headers: usize| {
            let mut builder = Request::get(uri);
            for n in 0..headers {
                builder = builder.header(format!("x-{n}"), "v");
            }
            builder.body(()).unwrap()
        };
        let refused = |r: &Request<()>| {
            limits
                .check(r, client, "web")
                .map(|r| r.response(Version::HTTP_11).status())
        };
        assert_eq!(refused(&request("/", 3)), Some(431.try_into().unwrap()));
        let long = format!("/{}", "a".repeat(64));
        assert_eq!(refused(&request(&long, 2)), Some(414.try_into().unwrap()));
        assert_eq!(refused(&request(&long[..64], 2)), None);
        let limited = limits
            .check(&request("/", 0), client, "web")
            .unwrap()
            .response(Version::HTTP_11);
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()[header::RETRY_AFTER], "1");
        assert!(limited.headers().get(header::CONNECTION).is_none());
        let counts = limits.refused();
        assert_eq!(
            (
                counts.headers.load(Relaxed),
                counts.uri.load(Relaxed),
                counts.rate_limited.load(Relaxed)
            ),
            (1, 1, 1)
        );
    }
}
