//! The TOML configuration: schema (serde), parsing with `file:line:column` errors, and the
//! cross-reference checks that serde cannot express (a listener naming a missing pool, ...).

mod admin;
mod autoscale;
pub mod certs;
mod health;
mod ranges;
mod tls;
mod types;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

pub use admin::{AdminConfig, AdminTlsConfig, TokenFileError};
pub use autoscale::{AutoscaleConfig, AutoscaleMetric, AutoscaleProvider};
pub use health::{
    AgentCheckConfig, HealthConfig, HealthKind, PassiveConfig, RetryBudgetConfig, StatusRange,
};
pub use tls::{CertConfig, ListenerTlsConfig, UpstreamProtocol};
pub use types::{
    AlgorithmName, BackendAddress, BackendSpec, ConfigDuration, HashKey, ListenAddr, ValueError,
};

/// A whole Fulcrum configuration file.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// The admin listener (REST API, metrics).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Client-facing listeners by name.
    #[serde(default)]
    pub listeners: BTreeMap<String, ListenerConfig>,
    /// Backend pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, PoolConfig>,
}

/// `[server]`: process-wide settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Worker threads; 0 (the default) means one per CPU core.
    pub workers: usize,
    /// How the workers share the work: see [`RuntimeShape`].
    pub runtime: RuntimeShape,
    /// How long a graceful shutdown waits for in-flight requests before closing them.
    pub shutdown_timeout: ConfigDuration,
    /// Log format: "text" (default) or "json".
    pub log_format: LogFormat,
    /// One log line per request (target `fulcrum::access`); off by default for speed.
    pub access_log: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            workers: 0,
            runtime: RuntimeShape::PerCore,
            shutdown_timeout: ConfigDuration(Duration::from_secs(30)),
            log_format: LogFormat::Text,
            access_log: false,
        }
    }
}

impl ServerConfig {
    /// The number of workers: `workers`, or the number of CPU cores when it is 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// `[server] runtime`: how the worker threads are organised.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeShape {
    /// One single-threaded runtime per worker thread, one `SO_REUSEPORT` listener socket per
    /// worker, per-worker upstream connection pools; a connection stays on the worker that
    /// accepted it (see `workers.rs`).
    #[default]
    PerCore,
    /// One multi-threaded tokio runtime with `workers` threads stealing work from each other,
    /// one socket per listener.
    WorkStealing,
}

impl std::fmt::Display for RuntimeShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RuntimeShape::PerCore => "per_core",
            RuntimeShape::WorkStealing => "work_stealing",
        })
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The protocol a listener speaks to clients.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge) in clear text.
    Http,
    /// Raw TCP: each client connection is forwarded byte for byte to one backend.
    Tcp,
    /// HTTP/1.1 and HTTP/2 (chosen by ALPN) over TLS; needs a `tls` table.
    Https,
}

/// `[listeners.NAME]`: one client-facing socket.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address to bind, e.g. "0.0.0.0:80"; port 0 picks a free port.
    pub listen: ListenAddr,
    /// Client protocol.
    #[serde(default = "default_protocol")]
    pub protocol: ListenerProtocol,
    /// Name of the pool that serves this listener.
    pub pool: Spanned<String>,
    /// Open client connections above this are refused (closed at accept).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Open client connections from one client IP (the socket peer, before any PROXY header;
    /// IPv6 per full address) above this are refused (closed at accept).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// A client must send a complete request head (on HTTP/2: the connection preface and its
    /// SETTINGS) within this time (408-style close).
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout: ConfigDuration,
    /// A keep-alive client connection idle this long between requests is closed (on HTTP/2:
    /// with no stream open, after a GOAWAY).
    #[serde(default = "default_keep_alive_timeout")]
    pub keep_alive_timeout: ConfigDuration,
    /// An HTTP/1.1 client connection without traffic for about this long (between one and two
    /// times it) is parked: its HTTP state and buffers are freed until the client sends again.
    #[serde(default = "default_park_after")]
    pub park_after: ConfigDuration,
    /// Largest request head accepted; larger gets 431. At least 8 KiB.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Largest request body forwarded (1 to 2^63-1 bytes; 100 MiB by default): a larger
    /// `Content-Length` gets 413 before any backend is picked; a body of unknown length
    /// (chunked, HTTP/2 without `content-length`) that grows past it is cut off and answered
    /// 413 (or, once the backend's response has begun, the connection closed).
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Most header lines in one request (HTTP/2: header fields, pseudo-headers not counted);
    /// more gets 431. 100 by default, hyper's and HAProxy's (`tune.http.maxhdr` 101).
    #[serde(default = "default_max_header_count")]
    pub max_header_count: usize,
    /// Longest request target (HTTP/1: as sent on the request line; HTTP/2: `:path`); longer
    /// gets 414. 8 KiB by default, nginx's `large_client_header_buffers` size.
    #[serde(default = "default_max_uri_bytes")]
    pub max_uri_bytes: usize,
    /// Requests per second of each client IP (a token bucket); over it a request gets 429
    /// with `Retry-After`. Off unless set (see `default_max_connections_per_ip` for why).
    #[serde(default)]
    pub requests_per_ip: Option<RequestRateConfig>,
    /// Expect a PROXY protocol header (v1 or v2) from a front load balancer on every
    /// connection, and use the client address it carries (read within `header_read_timeout`).
    #[serde(default)]
    pub accept_proxy_protocol: bool,
    /// TCP sessions and upgraded (WebSocket) connections idle this long in both directions
    /// are closed.
    #[serde(default = "default_tunnel_idle_timeout")]
    pub idle_timeout: ConfigDuration,
    /// HTTP/1.1 `Upgrade` protocols (case-insensitive tokens) passed to the backends, and
    /// HTTP/2 extended CONNECT `:protocol`s; others are served as plain requests (their
    /// `Upgrade` removed). `h2c` is never passed, even if listed.
    #[serde(default = "default_allowed_upgrades")]
    pub allowed_upgrades: Vec<String>,
    /// Certificates of an `https` listener.
    #[serde(default)]
    pub tls: Option<ListenerTlsConfig>,
    /// HTTP/2: streams one client connection may have open at once (advertised as
    /// `SETTINGS_MAX_CONCURRENT_STREAMS`; 1 to 10000).
    #[serde(default = "default_h2_max_concurrent_streams")]
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2: each stream's receive window, the request body bytes a client may send before
    /// Fulcrum has forwarded them (65535 to 2^31-1).
    #[serde(default = "default_h2_stream_window")]
    pub h2_stream_window: u32,
    /// HTTP/2: the connection's receive window, shared by all its streams (65535 to 2^31-1).
    #[serde(default = "default_h2_connection_window")]
    pub h2_connection_window: u32,
    /// HTTP/2: response body bytes buffered per stream for a client that reads slowly (1 KiB
    /// to 16 MiB).
    #[serde(default = "default_h2_max_send_buffer")]
    pub h2_max_send_buffer: usize,
    /// HTTP/2: a PING is sent after this long without frames from the client; "0s" sends none.
    #[serde(default = "default_h2_keep_alive_interval")]
    pub h2_keep_alive_interval: ConfigDuration,
    /// HTTP/2: a connection whose client does not answer a keep-alive PING within this is closed.
    #[serde(default = "default_h2_keep_alive_timeout")]
    pub h2_keep_alive_timeout: ConfigDuration,
}

fn default_h2_max_concurrent_streams() -> u32 {
    // RFC 9113 recommends no fewer than 100; hyper's own default is 200.
    100
}
fn default_h2_stream_window() -> u32 {
    1024 * 1024
}
fn default_h2_connection_window() -> u32 {
    2 * 1024 * 1024
}
fn default_h2_max_send_buffer() -> usize {
    // hyper's default is 400 KiB per stream: 200 streams of a client that never reads would
    // hold ~80 MiB.
    64 * 1024
}
fn default_h2_keep_alive_interval() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(20))
}
fn default_h2_keep_alive_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(20))
}

fn default_tunnel_idle_timeout() -> ConfigDuration {
    // Long-lived sessions (databases, WebSockets) are normal; 10 minutes still reaps dead peers.
    ConfigDuration(Duration::from_secs(600))
}

fn default_allowed_upgrades() -> Vec<String> {
    vec!["websocket".to_string()]
}

fn default_protocol() -> ListenerProtocol {
    ListenerProtocol::Http
}
fn default_max_connections() -> usize {
    // Generous for one host, yet bounded so a connection flood cannot exhaust file descriptors.
    10_000
}
fn default_max_connections_per_ip() -> usize {
    // Off (the largest value) unless set: behind a CDN, a NAT or a front load balancer every
    // client can share one address, and a limit would refuse them all; set it on listeners
    // that face clients directly.
    1_000_000
}
fn default_header_read_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(10))
}
fn default_keep_alive_timeout() -> ConfigDuration {
    // nginx's default.
    ConfigDuration(Duration::from_secs(75))
}
fn default_park_after() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(1))
}
fn default_max_body_bytes() -> u64 {
    // 100 MiB: far above nginx's 1 MiB, as a load balancer in front of upload endpoints
    // should be, yet bounded.
    100 * 1024 * 1024
}
fn default_max_header_count() -> usize {
    // hyper's default (its parser's buffer on the stack; more would be allocated per request).
    100
}
fn default_max_uri_bytes() -> usize {
    // nginx's large_client_header_buffers size.
    8 * 1024
}

/// `[listeners.NAME] requests_per_ip = { rate = 100, burst = 200 }`: a token bucket per client
/// IP (the PROXY header's source when the listener accepts one, else the socket peer; IPv6
/// per /64), `burst` tokens deep, refilled at `rate` a second.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RequestRateConfig {
    /// Requests per second, sustained.
    pub rate: u64,
    /// Requests that may come at once after a quiet spell; `rate` (one second's worth) when
    /// not set.
    #[serde(default)]
    pub burst: Option<u64>,
    /// Most client IPs tracked at once (memory stays below ~64 bytes each); see
    /// `proxy/limits.rs` for what happens when they are all tracked.
    #[serde(default = "default_rate_max_clients")]
    pub max_clients: u64,
}

impl RequestRateConfig {
    /// The bucket's depth: `burst`, or `rate` when not set.
    pub fn burst(&self) -> u64 {
        self.burst.unwrap_or(self.rate)
    }
}

fn default_rate_max_clients() -> u64 {
    65_536
}
fn default_max_header_bytes() -> usize {
    // 64 KiB: far above real browsers' heads (~1-8 KiB), small enough to bound memory per client.
    64 * 1024
}

/// `[pools.NAME]`: a set of interchangeable backends and how to spread load over them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Selection algorithm; `peak_ewma` by default.
    #[serde(default)]
    pub algorithm: AlgorithmName,
    /// What `maglev` hashes: "client_ip" (default), "header:NAME", "cookie:NAME" or "path".
    #[serde(default)]
    pub hash_key: Option<Spanned<HashKey>>,
    /// `maglev` with bounded loads: no backend takes more than this multiple of the average
    /// in-flight requests (e.g. 1.25); the overflow walks on to the next backends.
    #[serde(default)]
    pub bounded_load: Option<Spanned<f64>>,
    /// The backends, as "IP:PORT" strings or `{ address = "...", weight = N }` tables.
    pub backends: Spanned<Vec<Spanned<BackendSpec>>>,
    /// Timeouts towards the backends.
    #[serde(default)]
    pub timeouts: PoolTimeouts,
    /// How long a backend that refused a connection is skipped before it is tried again.
    #[serde(default = "default_failure_backoff")]
    pub failure_backoff: ConfigDuration,
    /// How many different backends one request may be tried on (connect failures).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: usize,
    /// A removed backend's in-flight requests may take this long before it is dropped.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout: ConfigDuration,
    /// Active health checks; none when absent.
    #[serde(default)]
    pub health: Option<HealthConfig>,
    /// Passive ejection from real traffic (on by default).
    #[serde(default)]
    pub passive: PassiveConfig,
    /// Agent polling; none when absent.
    #[serde(default)]
    pub agent: Option<AgentCheckConfig>,
    /// Limit on retries of requests that reached a backend.
    #[serde(default)]
    pub retry_budget: RetryBudgetConfig,
    /// When every backend is down: false (default) answers 503 at once; true spreads the
    /// traffic over all backends anyway, as the least bad option.
    #[serde(default)]
    pub panic_mode: bool,
    /// Slow start: a backend that joins or recovers ramps from 10% to 100% of its weight over
    /// this long ("10s"). Off when absent or zero.
    #[serde(default)]
    pub slow_start: Option<ConfigDuration>,
    /// Time constant of the peak-EWMA latency estimate (`peak_ewma`): how long a latency
    /// peak keeps counting after the samples stop or turn fast again ("2s").
    #[serde(default = "default_latency_decay")]
    pub latency_decay: ConfigDuration,
    /// How often backends written as HOST:PORT are re-resolved.
    #[serde(default = "default_resolve_every")]
    pub resolve_every: ConfigDuration,
    /// DNS servers for HOST:PORT backends ("IP:PORT"); the system's resolv.conf when empty.
    #[serde(default)]
    pub dns_servers: Vec<ListenAddr>,
    /// Autoscaling; none when absent.
    #[serde(default)]
    pub autoscale: Option<Spanned<AutoscaleConfig>>,
    /// Send a PROXY protocol header ("v1" or "v2") with the client's address at the start of
    /// every backend connection (TCP listeners only).
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocolVersion>,
    /// HTTP version spoken to the backends: "http1" (default) or "h2".
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// Connect to the backends with TLS.
    #[serde(default)]
    pub tls: bool,
    /// PEM file of the CA certificates that sign the backends' certificates (with `tls`);
    /// the webpki (Mozilla) roots when absent.
    #[serde(default)]
    pub ca: Option<Spanned<PathBuf>>,
    /// Server name sent (SNI) and verified; the backend's address when absent.
    #[serde(default)]
    pub sni: Option<String>,
    /// Verify the backends' certificates (default true). False accepts any certificate.
    #[serde(default = "default_verify")]
    pub verify: bool,
}

fn default_verify() -> bool {
    true
}

/// Which PROXY protocol header to send to backends.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocolVersion {
    /// The text header: `PROXY TCP4 src dst sport dport\r\n`.
    V1,
    /// The binary header (what HAProxy and most servers prefer).
    V2,
}

fn default_latency_decay() -> ConfigDuration {
    ConfigDuration(fulcrum_balance::ewma::DEFAULT_DECAY)
}

fn default_resolve_every() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(5))
}

fn default_drain_timeout() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(30))
}

fn default_failure_backoff() -> ConfigDuration {
    ConfigDuration(Duration::from_secs(2))
}
fn default_max_attempts() -> usize {
    3
}

/// `[pools.NAME.timeouts]`.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PoolTimeouts {
    /// TCP connect to a backend.
    pub connect: ConfigDuration,
    /// From sending the request to receiving the response head (504 after that).
    pub request: ConfigDuration,
    /// Idle keep-alive connections to backends are closed after this.
    pub idle: ConfigDuration,
}

impl Default for PoolTimeouts {
    fn default() -> Self {
        PoolTimeouts {
            connect: ConfigDuration(Duration::from_secs(1)),
            request: ConfigDuration(Duration::from_secs(30)),
            idle: ConfigDuration(Duration::from_secs(60)),
        }
    }
}

/// A configuration error pointing at the place in the file: `file:line:column: message`, or
/// `file: message` when it is about no place in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", self.place())]
pub struct ConfigError {
    /// The file the error is in.
    pub file: PathBuf,
    /// 1-based line; 0 when the error is not about a place in the file (unreadable file).
    pub line: usize,
    /// 1-based column, when known.
    pub column: usize,
    /// What is wrong and what was expected.
    pub message: String,
}

impl ConfigError {
    /// `file:line:column`, or just `file` when `line` is 0.
    fn place(&self) -> String {
        match self.line {
            0 => self.file.display().to_string(),
            line => format!("{}:{line}:{}", self.file.display(), self.column),
        }
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read config file: {e}"),
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `file` is only used in error messages.
    pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
        let at = |span: Option<Range<usize>>, message: String| {
            let (line, column) = line_column(text, span.map(|s| s.start).unwrap_or(0));
            ConfigError {
                file: file.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let mut config: Config =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().trim().to_string()))?;
        config.resolve_paths(file.parent());
        ranges::check(&config, text)
            .and_then(|()| config.validate())
            .and_then(|()| config.validate_tls())
            .and_then(|()| config.admin.validate())
            .map_err(|(span, message)| at(Some(span), message))?;
        Ok(config)
    }

    /// Makes the certificate, key and CA paths relative to the config file's directory.
    fn resolve_paths(&mut self, base: Option<&Path>) {
        self.admin.resolve_paths(base);
        for listener in self.listeners.values_mut() {
            for cert in listener.tls.iter_mut().flat_map(|t| t.certs.iter_mut()) {
                let cert = cert.get_mut();
                tls::resolve(base, &mut cert.cert);
                tls::resolve(base, &mut cert.key);
            }
        }
        for pool in self.pools.values_mut() {
            if let Some(ca) = pool.ca.as_mut() {
                tls::resolve(base, ca.get_mut());
            }
        }
    }

    /// Checks TLS settings: an `https` listener has certificates that load (files readable,
    /// key matching the certificate), a pool's CA file loads and its `sni` is a valid name.
    fn validate_tls(&self) -> Result<(), (Range<usize>, String)> {
        for (name, listener) in &self.listeners {
            match (&listener.protocol, &listener.tls) {
                (ListenerProtocol::Https, None) => {
                    return Err((
                        listener.pool.span(),
                        format!("listener `{name}` has protocol \"https\" but no [listeners.{name}.tls] table with certs"),
                    ))
                }
                (ListenerProtocol::Https, Some(tls)) => {
                    if tls.certs.is_empty() {
                        return Err((
                            listener.pool.span(),
                            format!("listener `{name}`: tls.certs is empty; add [[listeners.{name}.tls.certs]] with cert and key"),
                        ));
                    }
                    if tls.certs.iter().filter(|c| c.get_ref().default).count() > 1 {
                        return Err((
                            listener.pool.span(),
                            format!("listener `{name}`: more than one certificate has default = true"),
                        ));
                    }
                    for cert in &tls.certs {
                        let c = cert.get_ref();
                        crate::config::certs::load_certified_key(&c.cert, &c.key)
                            .map_err(|e| (cert.span(), format!("listener `{name}`: {e}")))?;
                    }
                }
                (_, Some(_)) => {
                    return Err((
                        listener.pool.span(),
                        format!("listener `{name}` has a tls table but its protocol is not \"https\""),
                    ))
                }
                (_, None) => {}
            }
        }
        for (name, pool) in &self.pools {
            if let Some(ca) = &pool.ca {
                if !pool.tls {
                    return Err((ca.span(), format!("pool `{name}`: `ca` needs `tls = true`")));
                }
                crate::config::certs::load_roots(ca.get_ref())
                    .map_err(|e| (ca.span(), format!("pool `{name}`: {e}")))?;
            }
            if let Some(sni) = &pool.sni {
                if rustls_pki_types::ServerName::try_from(sni.as_str()).is_err() {
                    return Err((
                        pool.backends.span(),
                        format!("pool `{name}`: sni {sni:?} is not a valid DNS name or IP address"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Checks the rules serde cannot express. Returns the offending span and a message.
    fn validate(&self) -> Result<(), (Range<usize>, String)> {
        if self.listeners.is_empty() {
            return Err((
                0..0,
                "no listeners: add a [listeners.NAME] table".to_string(),
            ));
        }
        for (name, listener) in &self.listeners {
            if !self.pools.contains_key(listener.pool.get_ref()) {
                let known: Vec<&str> = self.pools.keys().map(String::as_str).collect();
                return Err((
                    listener.pool.span(),
                    format!(
                        "listener `{name}` uses pool `{}`, which is not defined (defined pools: {})",
                        listener.pool.get_ref(),
                        if known.is_empty() { "none".to_string() } else { known.join(", ") }
                    ),
                ));
            }
            let pool = &self.pools[listener.pool.get_ref()];
            if pool.proxy_protocol.is_some() && listener.protocol != ListenerProtocol::Tcp {
                return Err((
                    listener.pool.span(),
                    format!(
                        "listener `{name}`: pool `{}` sends a PROXY protocol header, which only TCP listeners support (pooled HTTP connections are shared by many clients)",
                        listener.pool.get_ref()
                    ),
                ));
            }
        }
        for (name, pool) in &self.pools {
            if pool.backends.get_ref().is_empty() && pool.autoscale.is_none() {
                return Err((
                    pool.backends.span(),
                    format!("pool `{name}` has no backends: expected at least one \"IP:PORT\""),
                ));
            }
            let mut seen = std::collections::HashSet::new();
            for backend in pool.backends.get_ref() {
                if !seen.insert(&backend.get_ref().address) {
                    return Err((
                        backend.span(),
                        format!(
                            "pool `{name}` lists backend {} twice",
                            backend.get_ref().address
                        ),
                    ));
                }
            }
            if let Some(autoscale) = &pool.autoscale {
                if let Some(problem) = autoscale.get_ref().problems() {
                    return Err((autoscale.span(), format!("pool `{name}`: {problem}")));
                }
            }
            let maglev = pool.algorithm.0 == fulcrum_balance::Algorithm::Maglev;
            if let Some(key) = &pool.hash_key {
                if !maglev {
                    return Err((
                        key.span(),
                        format!("pool `{name}`: hash_key only applies to algorithm = \"maglev\""),
                    ));
                }
            }
            if let Some(bound) = &pool.bounded_load {
                if !maglev {
                    return Err((
                        bound.span(),
                        format!(
                            "pool `{name}`: bounded_load only applies to algorithm = \"maglev\""
                        ),
                    ));
                }
                let c = *bound.get_ref();
                if !c.is_finite() || c < 1.0 {
                    return Err((
                        bound.span(),
                        format!("pool `{name}`: bounded_load must be a number of at least 1.0 (like 1.25), not {c}"),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
[admin]
listen = "127.0.0.1:9090"

[listeners.web]
listen = "127.0.0.1:8080"
protocol = "http"
pool = "app"

[pools.app]
algorithm = "round_robin"            # also: least_conn, p2c (more come later)
backends = [
  { address = "127.0.0.1:9001", weight = 2 },
  { address = "127.0.0.1:9002" },     # weight defaults to 1
  "127.0.0.1:9003",                  # plain string form
]
[pools.app.timeouts]
connect = "1s"
request = "30s"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    fn error_at(text: &str) -> (usize, usize, String) {
        let e = parse(text).expect_err("config should be refused");
        (e.line, e.column, e.message)
    }

    #[test]
    fn parses_the_documented_example() {
        let config = parse(ISSUE_EXAMPLE).unwrap();
        let pool = &config.pools["app"];
        let backends: Vec<(String, u32)> = pool
            .backends
            .get_ref()
            .iter()
            .map(|b| (b.get_ref().address.to_string(), b.get_ref().weight))
            .collect();
        assert_eq!(
            backends,
            vec![
                ("127.0.0.1:9001".to_string(), 2),
                ("127.0.0.1:9002".to_string(), 1),
                ("127.0.0.1:9003".to_string(), 1)
            ]
        );
        assert_eq!(pool.timeouts.connect.0, Duration::from_secs(1));
        assert_eq!(pool.timeouts.request.0, Duration::from_secs(30));
        assert_eq!(config.listeners["web"].pool.get_ref(), "app");
        assert_eq!(config.admin.listen.get_ref().0.port(), 9090);
    }

    #[test]
    fn unknown_key_points_at_it() {
        let text = ISSUE_EXAMPLE.replace("protocol = \"http\"", "protocl = \"http\"");
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (7, 1), "{message}");
        assert!(message.contains("protocl"), "{message}");
    }

    #[test]
    fn bad_backend_address_points_at_it() {
        let text = ISSUE_EXAMPLE.replace("\"127.0.0.1:9003\"", "\"127.0.0.1:99999\"");
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (15, 3), "{message}");
        assert!(message.contains("127.0.0.1:99999"), "{message}");
    }

    #[test]
    fn bad_address_in_table_form_points_at_it() {
        let text =
            ISSUE_EXAMPLE.replace("{ address = \"127.0.0.1:9002\" }", "{ address = \"nope\" }");
        let (line, _, message) = error_at(&text);
        assert_eq!(line, 14, "{message}");
        assert!(message.contains("nope"), "{message}");
    }

    #[test]
    fn bad_duration_points_at_it() {
        let text = ISSUE_EXAMPLE.replace("connect = \"1s\"", "connect = \"1 fortnight\"");
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (18, 11), "{message}");
        assert!(message.contains("duration"), "{message}");
    }

    #[test]
    fn missing_pool_points_at_listener() {
        let text = ISSUE_EXAMPLE.replace("pool = \"app\"", "pool = \"ap\"");
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (8, 8), "{message}");
        assert!(
            message.contains("`ap`") && message.contains("app"),
            "{message}"
        );
    }

    #[test]
    fn unknown_algorithm_lists_the_known_ones() {
        let text = ISSUE_EXAMPLE.replace("\"round_robin\"", "\"fastest\"");
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (11, 13), "{message}");
        assert!(
            message.contains("round_robin") && message.contains("least_conn"),
            "{message}"
        );
    }

    #[test]
    fn tcp_listener_and_proxy_protocol_keys_parse() {
        let text = ISSUE_EXAMPLE
            .replace(
                "protocol = \"http\"",
                "protocol = \"tcp\"\naccept_proxy_protocol = true\nidle_timeout = \"30s\"",
            )
            .replace(
                "algorithm = \"round_robin\"",
                "proxy_protocol = \"v2\"\nalgorithm = \"round_robin\"",
            );
        let config = parse(&text).unwrap();
        let listener = &config.listeners["web"];
        assert_eq!(listener.protocol, ListenerProtocol::Tcp);
        assert!(listener.accept_proxy_protocol);
        assert_eq!(listener.idle_timeout.0, Duration::from_secs(30));
        assert_eq!(
            config.pools["app"].proxy_protocol,
            Some(ProxyProtocolVersion::V2)
        );
        let zero = text.replace("idle_timeout = \"30s\"", "idle_timeout = \"0s\"");
        assert!(
            error_at(&zero).2.contains("idle_timeout"),
            "{}",
            error_at(&zero).2
        );
        let bad = text.replace("\"v2\"", "\"v3\"");
        assert!(error_at(&bad).2.contains("v3"), "{}", error_at(&bad).2);
    }

    #[test]
    fn proxy_protocol_to_http_backends_is_refused_at_the_listener() {
        let text = ISSUE_EXAMPLE.replace(
            "algorithm = \"round_robin\"",
            "proxy_protocol = \"v2\"\nalgorithm = \"round_robin\"",
        );
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (8, 8), "{message}");
        assert!(message.contains("only TCP listeners"), "{message}");
    }

    #[test]
    fn duplicate_backend_and_empty_pool_are_refused() {
        let text = ISSUE_EXAMPLE.replace("\"127.0.0.1:9003\"", "\"127.0.0.1:9001\"");
        assert!(error_at(&text).2.contains("twice"));
        let text = ISSUE_EXAMPLE.replace(
            "backends = [\n  { address = \"127.0.0.1:9001\", weight = 2 },\n  { address = \"127.0.0.1:9002\" },     # weight defaults to 1\n  \"127.0.0.1:9003\",                  # plain string form\n]",
            "backends = []",
        );
        assert!(error_at(&text).2.contains("no backends"));
    }

    #[test]
    fn public_admin_without_a_token_gets_one_generated() {
        let text =
            ISSUE_EXAMPLE.replace("listen = \"127.0.0.1:9090\"", "listen = \"0.0.0.0:9090\"");
        assert!(parse(&text).unwrap().admin.needs_generated_token());
        assert!(!parse(ISSUE_EXAMPLE).unwrap().admin.needs_generated_token());
        let with_token = text.replace("[admin]\n", "[admin]\ntoken = \"s3cret\"\n");
        let config = parse(&with_token).unwrap();
        assert!(!config.admin.needs_generated_token());
        assert_eq!(config.admin.token(), Some("s3cret"));
    }

    #[test]
    fn token_file_is_read_checked_and_exclusive_with_token() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "  t0ken\n").unwrap();
        let file = dir.path().join("fulcrum.toml");
        let with = |extra: &str| {
            ISSUE_EXAMPLE.replace(
                "listen = \"127.0.0.1:9090\"",
                &format!("listen = \"0.0.0.0:9090\"\n{extra}"),
            )
        };
        // Relative to the config file's directory.
        let config = Config::parse(&with("token_file = \"token\""), &file).unwrap();
        assert_eq!(config.admin.token(), Some("t0ken"));
        assert!(!config.admin.needs_generated_token());
        assert!(config.admin.reread_token_file().is_none(), "unchanged");
        std::fs::write(&token, "n3w-token").unwrap();
        let rotated = config.admin.reread_token_file().unwrap().unwrap();
        assert_eq!(rotated.token(), Some("n3w-token"));
        assert!(rotated.reread_token_file().is_none());
        std::fs::write(&token, "\n").unwrap();
        let (kept, error) = rotated.reread_token_file().unwrap().unwrap_err();
        assert_eq!(kept.token(), Some("n3w-token"));
        assert!(error.to_string().contains("is empty"), "{error}");
        assert!(kept.reread_token_file().is_none(), "reported once");
        std::fs::remove_file(&token).unwrap();
        let (kept, error) = kept.reread_token_file().unwrap().unwrap_err();
        assert_eq!(kept.token(), Some("n3w-token"));
        assert!(
            error.to_string().contains("cannot read token file"),
            "{error}"
        );

        let (line, column, message) = {
            let e = Config::parse(&with("token_file = \"token\""), &file).unwrap_err();
            (e.line, e.column, e.message)
        };
        assert_eq!((line, column), (4, 14), "{message}");
        assert!(message.contains("cannot read token file"), "{message}");
        std::fs::write(&token, "").unwrap();
        let e = Config::parse(&with("token_file = \"token\""), &file).unwrap_err();
        assert!(e.message.contains("is empty"), "{}", e.message);
        std::fs::write(&token, "two words").unwrap();
        let e = Config::parse(&with("token_file = \"token\""), &file).unwrap_err();
        assert!(e.message.contains("visible ASCII"), "{}", e.message);
        std::fs::write(&token, "t0ken").unwrap();
        let e = Config::parse(&with("token = \"x\"\ntoken_file = \"token\""), &file).unwrap_err();
        assert_eq!((e.line, e.column), (5, 14), "{}", e.message);
        assert!(e.message.contains("not both"), "{}", e.message);
    }

    #[test]
    fn admin_tls_certificate_must_load() {
        let text = ISSUE_EXAMPLE.replace(
            "listen = \"127.0.0.1:9090\"",
            "listen = \"127.0.0.1:9090\"\ntls = { cert = \"/nonexistent/a.crt\", key = \"/nonexistent/a.key\" }",
        );
        let (line, column, message) = error_at(&text);
        assert_eq!((line, column), (4, 7), "{message}");
        assert!(
            message.contains("admin tls: cannot read certificate file /nonexistent/a.crt"),
            "{message}"
        );
        let text = text.replace("key = ", "kee = ");
        assert!(error_at(&text).2.contains("unknown field `kee`"));
    }

    #[test]
    fn balancing_keys_parse_and_point_at_errors() {
        let maglev = ISSUE_EXAMPLE.replace(
            "algorithm = \"round_robin\"",
            "algorithm = \"maglev\"\nhash_key = \"header:X-User\"\nbounded_load = 1.25\nslow_start = \"10s\"",
        );
        let config = parse(&maglev).unwrap();
        let pool = &config.pools["app"];
        assert_eq!(
            pool.hash_key.as_ref().unwrap().get_ref().to_string(),
            "header:x-user"
        );
        assert_eq!(*pool.bounded_load.as_ref().unwrap().get_ref(), 1.25);
        assert_eq!(pool.slow_start.unwrap().0, Duration::from_secs(10));
        let (line, column, message) = error_at(&maglev.replace("header:X-User", "header:X User"));
        assert_eq!((line, column), (12, 12), "{message}");
        assert!(message.contains("X User"), "{message}");
        let (line, column, message) = error_at(&maglev.replace("1.25", "0.5"));
        assert_eq!((line, column), (13, 16), "{message}");
        assert!(message.contains("at least 1.0"), "{message}");
        let (line, _, message) = error_at(&maglev.replace("\"maglev\"", "\"p2c\""));
        assert_eq!(line, 12, "{message}");
        assert!(message.contains("maglev"), "{message}");
        let (line, _, message) = error_at(&maglev.replace("\"10s\"", "\"10\""));
        assert_eq!(line, 14, "{message}");
        // Default: peak_ewma.
        let plain = ISSUE_EXAMPLE.replace("algorithm = \"round_robin\"", "");
        assert_eq!(
            parse(&plain).unwrap().pools["app"].algorithm.0,
            fulcrum_balance::Algorithm::PeakEwma
        );
    }

    #[test]
    fn tls_settings_are_checked() {
        let text = ISSUE_EXAMPLE.replace("protocol = \"http\"", "protocol = \"https\"");
        assert!(error_at(&text).2.contains("no [listeners.web.tls] table"));
        let text = ISSUE_EXAMPLE.replace(
            "[pools.app.timeouts]",
            "ca = \"ca.pem\"\n[pools.app.timeouts]",
        );
        assert!(error_at(&text).2.contains("`ca` needs `tls = true`"));
        let text = ISSUE_EXAMPLE.replace(
            "[pools.app.timeouts]",
            "tls = true\nca = \"/nonexistent/ca.pem\"\n[pools.app.timeouts]",
        );
        let (line, _, message) = error_at(&text);
        assert_eq!(line, 18, "{message}");
        assert!(message.contains("/nonexistent/ca.pem"), "{message}");
        let text = ISSUE_EXAMPLE.replace(
            "[pools.app.timeouts]",
            "tls = true\nsni = \"not a name\"\nprotocol = \"h2\"\n[pools.app.timeouts]",
        );
        assert!(error_at(&text).2.contains("not a valid DNS name"));
        let text = ISSUE_EXAMPLE.replace(
            "[pools.app.timeouts]",
            "tls = true\nsni = \"backend.internal\"\nprotocol = \"h2\"\n[pools.app.timeouts]",
        );
        let config = parse(&text).unwrap();
        assert_eq!(config.pools["app"].protocol, UpstreamProtocol::H2);
        assert!(config.pools["app"].verify);
    }

    #[test]
    fn relative_certificate_paths_follow_the_config_file() {
        let mut path = PathBuf::from("certs/a.pem");
        tls::resolve(Some(Path::new("/etc/fulcrum")), &mut path);
        assert_eq!(path, PathBuf::from("/etc/fulcrum/certs/a.pem"));
        let mut path = PathBuf::from("/abs/a.pem");
        tls::resolve(Some(Path::new("/etc/fulcrum")), &mut path);
        assert_eq!(path, PathBuf::from("/abs/a.pem"));
    }

    #[test]
    fn syntax_error_has_position() {
        let (line, _, _) = error_at("[listeners.web\nlisten = 1");
        assert_eq!(line, 1);
    }

    #[test]
    fn line_column_counts_characters() {
        assert_eq!(line_column("ab\ncdé\nx", 7), (2, 4));
        assert_eq!(line_column("", 0), (1, 1));
    }
}
