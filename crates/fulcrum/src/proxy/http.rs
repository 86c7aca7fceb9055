//! The HTTP reverse proxy: one client request in, a backend chosen, the request forwarded on a
//! pooled connection, the response streamed back. Backends are tried by the shared attempt
//! loop ([`crate::proxy::attempt`]); failures are [`Failure`]s, which become 502 / 503 / 504
//! (400 for requests that cannot be forwarded) with a one-line body and a log line naming
//! the backend and the reason.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body as _;
use hyper::body::Incoming;

use crate::pool::{Backend, Pool, PoolSnapshot};
use crate::proxy::access_log::AccessRecord;
use crate::proxy::attempt::{http_key_hash, Attempts};
use crate::proxy::body::{ProxyBody, UpstreamBody};
use crate::proxy::error::{Blame, Failure, Kind, Origin, Retry};
use crate::proxy::headers::{add_forwarded, has_hop_by_hop, remove_hop_by_hop, valid_host};
use crate::proxy::limits::{RefusedRequests, RequestLimits};
use crate::proxy::upgrade::Offer;
use crate::runtime::clock::now_ns;
use crate::runtime::events::EventLog;
use crate::upstream::body::{BodyTooLarge, BodyWatch, RequestBody};
use crate::upstream::driven::TimedOut;
use crate::upstream::{UpstreamConnection, UpstreamSender};

/// Proxies the requests of one listener to its pool.
#[derive(Debug)]
pub struct HttpProxy {
    pub(crate) listener: String,
    pub(crate) pool: Arc<Pool>,
    pub(crate) events: Arc<EventLog>,
    pub(crate) access_log: bool,
    /// Idle timeout of upgraded (WebSocket) connections.
    pub(crate) tunnel_idle_timeout: std::time::Duration,
    /// `X-Forwarded-Proto`: "https" on TLS listeners.
    pub(crate) scheme: &'static str,
    /// The upgrade protocols passed to backends (lowercase; never `h2c`).
    pub(crate) allowed_upgrades: Box<[String]>,
    /// Largest request body forwarded (the listener's `max_body_bytes`); larger gets 413.
    pub(crate) max_body_bytes: u64,
    /// Header count, target length and request rate per client IP.
    pub(crate) limits: RequestLimits,
}

impl HttpProxy {
    /// A proxy for listener `listener` forwarding to `pool`.
    pub fn new(listener: &str, pool: Arc<Pool>, events: Arc<EventLog>, access_log: bool) -> Self {
        HttpProxy {
            listener: listener.to_string(),
            pool,
            events,
            access_log,
            tunnel_idle_timeout: std::time::Duration::from_secs(600),
            scheme: "http",
            allowed_upgrades: Box::new(["websocket".to_string()]),
            max_body_bytes: u64::MAX,
            limits: RequestLimits::default(),
        }
    }

    /// Sets the listener's per-request limits (`max_header_count`, `max_uri_bytes`,
    /// `requests_per_ip`).
    pub fn with_limits(mut self, limits: RequestLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Counters of the requests this listener's limits refused.
    pub fn refused_requests(&self) -> Arc<RefusedRequests> {
        self.limits.refused()
    }

    /// Sets the largest request body forwarded (the listener's `max_body_bytes`): a larger
    /// `Content-Length` gets 413 before any backend is picked; a body of unknown length that
    /// grows past it is cut off (the backend's request aborted) and answered 413.
    pub fn with_max_body_bytes(mut self, limit: u64) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Sets the upgrade protocols passed to backends (the listener's `allowed_upgrades`;
    /// case-insensitive; `h2c` is dropped: it is never passed).
    pub fn with_allowed_upgrades(mut self, allowed: &[String]) -> Self {
        self.allowed_upgrades = allowed
            .iter()
            .map(|p| p.trim().to_ascii_lowercase())
            .filter(|p| !p.is_empty() && p != "h2c")
            .collect();
        self
    }

    /// Sets the idle timeout of upgraded (WebSocket) connections.
    pub fn with_tunnel_idle_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.tunnel_idle_timeout = timeout;
        self
    }

    /// Marks the listener as TLS-terminating (`X-Forwarded-Proto: https`).
    pub fn with_tls(mut self, tls: bool) -> Self {
        self.scheme = if tls { "https" } else { "http" };
        self
    }

    /// Handles one client request from `client` (whose address as a header value is
    /// `client_ip`, made once per connection). Never fails: errors become responses.
    pub fn handle(
        &self,
        request: Request<Incoming>,
        client: SocketAddr,
        client_ip: HeaderValue,
    ) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + '_
    {
        self.handle_watched(request, client, client_ip, None)
    }

    /// [`HttpProxy::handle`], with `watch` told when the request's body is done.
    pub(crate) async fn handle_watched(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
        client_ip: HeaderValue,
        watch: Option<BodyWatch>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        let started = Instant::now();
        let mut access = self
            .access_log
            .then(|| AccessRecord::start(&request, client, started));
        let version = request.version();
        // Over the header count, the target length or the client's request rate.
        let limited = self.limits.check(&request, client, &self.listener);
        // A known length (Content-Length) over the limit: one comparison; nothing picked,
        // dialled or forwarded.
        let too_long = request
            .body()
            .size_hint()
            .upper()
            .is_some_and(|length| length > self.max_body_bytes);
        let offer = if too_long || limited.is_some() {
            None
        } else if crate::proxy::upgrade::is_upgrade(&request) {
            Some(self.upgrade_offer(&mut request))
        } else {
            Some(Offer::Plain)
        };
        let mut response = match offer {
            None => match limited {
                Some(refusal) => refusal.response(version),
                None => too_large(version),
            },
            // Boxed: upgrades are rare and their state (dedicated connection, handshake) is
            // large; inline it would be reserved in every request's future.
            Some(Offer::Tunnel(upgrade)) => {
                Box::pin(self.forward_upgrade(
                    request,
                    upgrade,
                    client,
                    &client_ip,
                    self.tunnel_idle_timeout,
                    watch,
                ))
                .await
            }
            Some(Offer::Refused(message)) => refuse(message, version),
            Some(Offer::Plain) => match prepare_request(request, &client_ip, self.scheme) {
                Ok(request) => {
                    // A body of unknown length is counted as it streams.
                    let limit = request
                        .body()
                        .size_hint()
                        .upper()
                        .is_none()
                        .then_some(self.max_body_bytes);
                    self.forward(request, client.ip(), watch, limit).await
                }
                Err(message) => refuse(message, version),
            },
        };
        let status = response.status().as_u16();
        match response.body_mut() {
            ProxyBody::Upstream(body) => {
                self.pool.latency.observe(started.elapsed());
                if let Some(mut record) = access.take() {
                    record.respond(status, Some(body.backend().address));
                    body.log_access(record);
                }
            }
            ProxyBody::Full(bytes) => {
                self.pool.record_local_error(status);
                if let Some(record) = access.as_mut() {
                    record.respond(status, None);
                    record.bytes = bytes.as_ref().map_or(0, |b| b.len() as u64);
                    record.write();
                }
            }
        }
        Ok(response)
    }

    async fn forward(
        &self,
        request: Request<Incoming>,
        client: IpAddr,
        watch: Option<BodyWatch>,
        limit: Option<u64>,
    ) -> Response<ProxyBody> {
        let pool = &self.pool;
        let snapshot_guard = pool.snapshot();
        let snapshot: &PoolSnapshot = &snapshot_guard;
        let mut attempts = Attempts::new(
            self,
            snapshot,
            http_key_hash(&snapshot.settings, &request, client),
        );
        // A request that reached a backend may be sent again elsewhere only when it is
        // idempotent and has no body: keep its head for that.
        let replay = (attempts.limit() > 1
            && request.method().is_idempotent()
            && request.body().is_end_stream())
        .then(|| ReplayableHead::of(&request));
        let mut request = match watch {
            None => request.map(RequestBody::Client),
            Some(watch) => request.map(|body| RequestBody::watched(body, watch)),
        };
        if let Some(limit) = limit {
            // A body of unknown length is counted as it streams (see `RequestBody::Limited`).
            request = request.map(|body| body.limited(limit));
        }
        let version = request.version();
        // The failure to answer with if no later attempt succeeds (a replayed request's).
        let mut failure = None;
        let settings = &*snapshot.settings;
        loop {
            let connected = attempts
                .connect(|backend| backend.connections.acquire(settings))
                .await;
            let (backend, connection) = match connected {
                Ok(connected) => connected,
                Err(exhausted) => {
                    let failure = failure.unwrap_or(exhausted);
                    if failure.kind == Kind::NoBackend {
                        tracing::warn!(listener = %self.listener, pool = %pool.name, "no backend available");
                    }
                    return failure.response();
                }
            };
            match self.exchange(snapshot, backend, connection, request).await {
                Exchange::Answered(response) => return response,
                Exchange::Unsent(unsent, why) => {
                    request = unsent;
                    // A backend that closed (or answered garbage before) a new connection
                    // failed, it was not unavailable: 502 if no other backend answers.
                    if why.kind == Kind::Closed {
                        failure = Some(why);
                    }
                }
                Exchange::Failed(failed) => match &replay {
                    Some(head)
                        if failed.retry() == Retry::IfReplayable
                            && !attempts.in_panic()
                            && pool.try_retry() =>
                    {
                        tracing::info!(pool = %pool.name, backend = %backend.address, "retrying idempotent request on another backend");
                        request = head.rebuild();
                        failure = Some(failed);
                        attempts.no_panic();
                    }
                    _ if failed.kind == Kind::BodyTooLarge => return too_large(version),
                    _ => return failed.response(),
                },
            }
        }
    }

    /// Sends `request` on `connection` and waits for the response head.
    async fn exchange(
        &self,
        snapshot: &PoolSnapshot,
        backend: &Backend,
        mut connection: UpstreamConnection,
        mut request: Request<RequestBody>,
    ) -> Exchange {
        let settings = &*snapshot.settings;
        let guard = self.pool.start_request(snapshot, backend);
        loop {
            let _awaiting = backend.await_answer();
            let sent_ns = now_ns();
            let sent = match &mut connection.sender {
                UpstreamSender::Driven(driven) => {
                    driven
                        .send_within(request, settings.request_timeout, sent_ns)
                        .await
                }
                // Boxed: HTTP/2 (and spawned HTTP/1.1) sends would otherwise reserve their timer
                // and hyper future inside every request's future, which hyper moves around.
                sender => Box::pin(tokio::time::timeout(
                    settings.request_timeout,
                    sender.try_send_request(request),
                ))
                .await
                .map_err(|_| TimedOut),
            };
            let mut error = match sent {
                Ok(Ok(mut response)) => {
                    // Time to response headers feeds the backend's peak-EWMA latency.
                    let answered_ns = now_ns();
                    backend
                        .latency
                        .observe(answered_ns.saturating_sub(sent_ns), answered_ns);
                    backend.record_status(response.status().as_u16());
                    if response.status().is_server_error() {
                        self.charge(snapshot, backend, Blame::Failure);
                    } else {
                        match backend.take_broken_bodies() {
                            0 => backend.record_success(),
                            // Bodies it broke since its last answer: they count now (so
                            // this answer does not reset the streak).
                            broken => self.charge_broken_bodies(snapshot, backend, broken),
                        }
                    }
                    remove_hop_by_hop(response.headers_mut());
                    let response = response.map(|body| {
                        ProxyBody::Upstream(UpstreamBody::new(body, connection.sender, guard))
                    });
                    return Exchange::Answered(response);
                }
                Ok(Err(error)) => error,
                Err(_) => {
                    // A timeout counts as (at least) the whole timeout of latency.
                    backend
                        .latency
                        .observe(settings.request_timeout.as_nanos() as u64, now_ns());
                    let timeout = Failure::timeout();
                    let waited = settings.request_timeout;
                    self.fail(
                        snapshot,
                        backend,
                        timeout,
                        &format_args!("no response head within {waited:?}"),
                        "answering 504",
                    );
                    return Exchange::Failed(timeout);
                }
            };
            let Some(unsent) = error.take_message() else {
                let error = error.into_error();
                if is_body_too_large(&error) {
                    // Cut off past `max_body_bytes`: the client's doing, never the backend's.
                    let failed = Failure::new(Origin::Client, Kind::BodyTooLarge);
                    self.fail(snapshot, backend, failed, &error, "answering 413");
                    return Exchange::Failed(failed);
                }
                if is_client_body_error(&error) {
                    // The client's body broke off or was malformed (a bad chunk): the
                    // client's doing, never the backend's.
                    let failed = Failure::bad_request("400 bad request: malformed request body");
                    self.fail(snapshot, backend, failed, &error, "answering 400");
                    return Exchange::Failed(failed);
                }
                let failed = Failure::no_answer();
                self.fail(
                    snapshot,
                    backend,
                    failed,
                    &error,
                    "answering 502 unless the request can be retried",
                );
                return Exchange::Failed(failed);
            };
            let error = error.into_error();
            if !connection.reused {
                self.fail(
                    snapshot,
                    backend,
                    Failure::closed(),
                    &error,
                    "trying another backend",
                );
                return Exchange::Unsent(unsent, Failure::closed());
            }
            // A keep-alive connection the backend had just closed: once more on a fresh one.
            tracing::debug!(backend = %backend.address, %error, "pooled connection was closed; reconnecting");
            match backend.connections.connect(settings).await {
                Ok(fresh) => {
                    connection = fresh;
                    request = unsent;
                }
                Err(connect_error) => {
                    let failure = Failure::connect(&connect_error);
                    self.fail(
                        snapshot,
                        backend,
                        failure,
                        &connect_error,
                        "trying another backend",
                    );
                    return Exchange::Unsent(unsent, failure);
                }
            }
        }
    }
}

/// The 400 for a request that cannot be forwarded (see [`Failure::bad_request`]). On HTTP/1
/// it also closes the connection (`Connection: close`): where the next request starts can no
/// longer be trusted. (HTTP/2 has no such header; its streams are framed.)
pub(crate) fn refuse(message: &'static str, version: Version) -> Response<ProxyBody> {
    let mut response = Failure::bad_request(message).response();
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// The 413 for a request body over the listener's `max_body_bytes`; on HTTP/1 it also closes
/// the connection (`Connection: close`), as [`refuse`] does: the rest of the body is not read.
fn too_large(version: Version) -> Response<ProxyBody> {
    let mut response = Failure::new(Origin::Client, Kind::BodyTooLarge).response();
    if version < Version::HTTP_2 {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    response
}

/// Whether hyper's client failed `error` because the request body grew past its limit.
fn is_body_too_large(error: &hyper::Error) -> bool {
    std::error::Error::source(error).is_some_and(|cause| cause.is::<BodyTooLarge>())
}

/// Whether hyper's client failed `error` because the request body (the client's, as hyper's
/// server read it) failed: a malformed chunked body, or a client gone mid-body.
fn is_client_body_error(error: &hyper::Error) -> bool {
    error.is_user()
        && std::error::Error::source(error).is_some_and(|cause| cause.is::<hyper::Error>())
}

/// How one attempt on one backend ended.
enum Exchange {
    /// The backend's response for the client.
    Answered(Response<ProxyBody>),
    /// The request was provably not sent: it can go to another backend as it is; the
    /// failure is what to answer if none is left (a connect failure: "no backend").
    Unsent(Request<RequestBody>, Failure),
    /// The backend took the request and failed before answering (or in time): what to
    /// answer unless [`Failure::retry`] allows another backend.
    Failed(Failure),
}

/// The head of an idempotent, bodiless request, kept so it can be sent again.
struct ReplayableHead {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl ReplayableHead {
    fn of<B>(request: &Request<B>) -> Self {
        ReplayableHead {
            method: request.method().clone(),
            uri: request.uri().clone(),
            headers: request.headers().clone(),
        }
    }

    fn rebuild(&self) -> Request<RequestBody> {
        let mut request = Request::new(RequestBody::Empty);
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Rewrites a client request for the backend: origin-form URI, HTTP/1.1, `Host` kept (or set
/// from the target's authority), hop-by-hop headers removed, `X-Forwarded-*` added.
///
/// Host rules (RFC 9112 §3.2, RFC 9113 §8.3.1): more than one `Host` header, a `Host` that is
/// not a valid `uri-host[:port]`, or an HTTP/1.1 request with neither a `Host` nor an
/// absolute-form target is refused (400). When the request has an authority (an HTTP/1.1
/// absolute-form target, or HTTP/2's `:authority`), it wins: the backend's `Host` (and
/// `X-Forwarded-Host`) is the authority, whatever `Host` the client also sent.
///
/// Also refused: `CONNECT` (a reverse proxy has no tunnels), and a `Transfer-Encoding` other
/// than one `chunked` (hyper decodes `chunked` only; the message is re-framed for the backend).
pub(crate) fn prepare_request<B>(
    mut request: Request<B>,
    client_ip: &HeaderValue,
    scheme: &'static str,
) -> Result<Request<B>, &'static str> {
    if request.method() == Method::CONNECT {
        // A reverse proxy has no tunnels to offer (a 2xx would upgrade both connections).
        return Err("400 bad request: CONNECT is not supported");
    }
    let mut hosts = request.headers().get_all(header::HOST).iter();
    let host_header = hosts.next();
    if hosts.next().is_some() {
        return Err("400 bad request: more than one Host header");
    }
    if host_header.is_some_and(|host| !valid_host(host.as_bytes())) {
        return Err("400 bad request: invalid Host header");
    }
    let (host, mut host_header_present) = match (request.uri().authority(), host_header) {
        // The authority wins; a Host equal to it is kept as it is (no copy).
        (Some(authority), Some(host)) if authority.as_str().as_bytes() == host.as_bytes() => {
            (Some(host.clone()), true)
        }
        (Some(authority), _) if !valid_host(authority.as_str().as_bytes()) => {
            return Err("400 bad request: invalid authority");
        }
        (Some(authority), _) => (
            Some(
                HeaderValue::from_str(authority.as_str())
                    .map_err(|_| "400 bad request: invalid authority")?,
            ),
            false,
        ),
        (None, Some(host)) => (Some(host.clone()), true),
        (None, None) if request.version() == Version::HTTP_11 => {
            return Err("400 bad request: no Host header");
        }
        (None, None) => (None, false),
    };
    if request.uri().authority().is_some() || request.uri().scheme().is_some() {
        let path = request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        *request.uri_mut() =
            Uri::try_from(path).map_err(|_| "400 bad request: invalid request target")?;
    }
    let headers = request.headers_mut();
    if has_hop_by_hop(headers) {
        // hyper decoded one `chunked`; any other transfer coding (`gzip, chunked`, a second
        // `chunked`) would reach the backend still applied, yet unannounced.
        let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter();
        if let Some(coding) = codings.next() {
            if !coding
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
                || codings.next().is_some()
            {
                return Err("400 bad request: unsupported Transfer-Encoding");
            }
        }
        // `TE: trailers` says the client accepts trailers; gRPC needs it to reach the backend.
        let te_trailers = headers.get_all(header::TE).iter().any(|v| {
            v.to_str().is_ok_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            })
        });
        remove_hop_by_hop(headers);
        if te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        // `Connection: host` would have removed it.
        host_header_present = headers.contains_key(header::HOST);
    }
    if let Some(host) = &host {
        if !host_header_present {
            headers.insert(header::HOST, host.clone());
        }
    }
    add_forwarded(headers, client_ip, scheme, host);
    *request.version_mut() = Version::HTTP_11;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)], path: &str) -> Request<()> {
        let mut builder = Request::builder().uri(path);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(()).unwrap()
    }

    #[test]
    fn requests_are_rewritten_for_the_backend() {
        let client_ip = crate::proxy::headers::client_ip_value("10.0.0.9".parse().unwrap());
        // Plain request: Host kept, X-Forwarded-* added, nothing else touched.
        let plain = prepare_request(
            request(
                &[("host", "app.example"), ("x-forwarded-for", "1.2.3.4")],
                "/a",
            ),
            &client_ip,
            "http",
        )
        .unwrap();
        let h = plain.headers();
        assert_eq!(h["host"], "app.example");
        assert_eq!(h["x-forwarded-for"], "1.2.3.4, 10.0.0.9");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "app.example");
        assert_eq!(h.len(), 4);
        // Hop-by-hop headers go, `TE: trailers` stays, and a Host the Connection header named
        // is put back (the backend needs it).
        let hop = prepare_request(
            request(
                &[
                    ("host", "app.example"),
                    ("connection", "keep-alive, host, x-secret"),
                    ("x-secret", "1"),
                    ("te", "trailers"),
                    ("keep-alive", "timeout=5"),
                ],
                "/b",
            ),
            &client_ip,
            "https",
        )
        .unwrap();
        let h = hop.headers();
        assert_eq!(h["host"], "app.example");
        assert_eq!(h["te"], "trailers");
        assert!(!h.contains_key("connection") && !h.contains_key("x-secret"));
        assert!(!h.contains_key("keep-alive"));
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        // Absolute-form target without Host: origin-form, Host from the authority.
        let absolute = prepare_request(
            request(&[], "http://b.example:8080/c?d=1"),
            &client_ip,
            "http",
        )
        .unwrap();
        assert_eq!(absolute.uri(), "/c?d=1");
        assert_eq!(absolute.headers()["host"], "b.example:8080");
    }

    #[test]
    fn host_rules() {
        let client_ip = crate::proxy::headers::client_ip_value("10.0.0.9".parse().unwrap());
        let prepare = |request| prepare_request(request, &client_ip, "http");
        // More than one Host, or an invalid one: refused.
        let mut two = request(&[("host", "a.example")], "/");
        two.headers_mut()
            .append("host", HeaderValue::from_static("b.example"));
        assert_eq!(
            prepare(two).unwrap_err(),
            "400 bad request: more than one Host header"
        );
        for bad in ["a.example/x", "user@a.example", "a .example", "a.example?x"] {
            let err = prepare(request(&[("host", bad)], "/")).unwrap_err();
            assert_eq!(err, "400 bad request: invalid Host header", "{bad}");
        }
        for good in ["a.example", "a.example:8080", "[::1]:80", "10.0.0.1", ""] {
            assert!(prepare(request(&[("host", good)], "/")).is_ok(), "{good}");
        }
        // HTTP/1.1 needs a Host (or an absolute-form target); HTTP/1.0 does not.
        assert_eq!(
            prepare(request(&[], "/")).unwrap_err(),
            "400 bad request: no Host header"
        );
        let mut old = request(&[], "/");
        *old.version_mut() = Version::HTTP_10;
        assert!(!prepare(old).unwrap().headers().contains_key("host"));
        // The absolute-form target's authority (or HTTP/2's :authority) wins over Host.
        let absolute = prepare(request(
            &[("host", "evil.example")],
            "http://good.example/p",
        ))
        .unwrap();
        assert_eq!(absolute.uri(), "/p");
        assert_eq!(absolute.headers()["host"], "good.example");
        assert_eq!(absolute.headers()["x-forwarded-host"], "good.example");
        let mut h2 = request(&[("host", "evil.example")], "https://good.example/p");
        *h2.version_mut() = Version::HTTP_2;
        let h2 = prepare(h2).unwrap();
        assert_eq!(h2.headers()["host"], "good.example");
        assert_eq!(h2.headers().get_all("host").iter().count(), 1);
    }
}
