//! HTTP/1.1 `Upgrade` pass-through (WebSocket, and the listener's other `allowed_upgrades`):
//! the request goes to a
//! backend on a dedicated HTTP/1.1 connection (never pooled; TLS when the pool says so, with
//! ALPN `http/1.1` even for an HTTP/2 pool), picked like any request of the client, and when the backend answers
//! `101 Switching Protocols` both connections are handed over by hyper and relayed byte for
//! byte. The tunnel holds the backend's in-flight slot for its whole life, so balancing sees
//! it and a drain waits for it (up to the pool's drain timeout).
//!
//! WebSockets over HTTP/2 (extended CONNECT, RFC 8441) are translated: the client's
//! `CONNECT` with `:protocol = websocket` becomes an HTTP/1.1 `GET` with `Upgrade: websocket`
//! (and a fresh `Sec-WebSocket-Key`) to the backend, whose `101` becomes a `200` on the
//! client's stream; the HTTP/2 stream and the backend connection are then relayed.
//!
//! Only the listener's `allowed_upgrades` pass (default `websocket`; `h2c` never, so a
//! client cannot switch a backend connection to HTTP/2 behind Fulcrum's back): the `Upgrade`
//! the backend gets lists only the allowed protocols the client offered; a request offering
//! none is served as a plain HTTP/1.1 request (`Upgrade` and `HTTP2-Settings` removed); an
//! extended CONNECT for another protocol is refused (400); and a backend that switches to a
//! protocol it was not offered gets a 502, its connection closed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::ext::Protocol;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;

use crate::config::UpstreamProtocol;
use crate::pool::PoolSnapshot;
use crate::proxy::attempt::{http_key_hash, Attempts};
use crate::proxy::body::{ProxyBody, UpstreamBody};
use crate::proxy::error::{Blame, Failure};
use crate::proxy::headers::remove_hop_by_hop;
use crate::proxy::http::{prepare_request, refuse, HttpProxy};
use crate::proxy::tcp::relay;
use crate::upstream::body::{BodyWatch, RequestBody};
use crate::upstream::{dial_upgradable, UpstreamSender};

/// `HTTP2-Settings`: the settings of an `Upgrade: h2c` request (RFC 7540 §3.2.1).
static HTTP2_SETTINGS: header::HeaderName = header::HeaderName::from_static("http2-settings");

/// The client connection's place on its listener (connection limit, open count), put in an
/// upgrade request's extensions by the listener so the tunnel holds it for its whole life.
#[derive(Clone, Debug)]
pub struct ClientSlot(pub Arc<dyn std::any::Any + Send + Sync>);

/// Whether `request` asks for an HTTP/1.1 protocol upgrade (`Connection: upgrade` and an
/// `Upgrade` header).
pub fn is_upgrade<B>(request: &Request<B>) -> bool {
    is_extended_connect(request) || is_http11_upgrade(request)
}

/// Whether `request` is an HTTP/2 extended CONNECT (RFC 8441), e.g. a WebSocket over HTTP/2.
fn is_extended_connect<B>(request: &Request<B>) -> bool {
    request.method() == Method::CONNECT && request.extensions().get::<Protocol>().is_some()
}

fn is_http11_upgrade<B>(request: &Request<B>) -> bool {
    request.version() == Version::HTTP_11
        && request.headers().contains_key(header::UPGRADE)
        && request
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// What becomes of a request (see [`HttpProxy::upgrade_offer`]).
#[derive(Debug)]
pub(crate) enum Offer {
    /// An upgrade to forward: for HTTP/1.1 the `Upgrade` value to send (the allowed protocols
    /// the client offered), `None` for an HTTP/2 extended CONNECT.
    Tunnel(Option<HeaderValue>),
    /// A plain request (nothing allowed was offered; the upgrade headers are gone).
    Plain,
    /// A 400, for this reason.
    Refused(&'static str),
}

/// The protocol name of an `Upgrade` token (`websocket/13` → `websocket`).
fn protocol_name(token: &str) -> &str {
    let token = token.trim();
    token.split_once('/').map_or(token, |(name, _)| name).trim()
}

impl HttpProxy {
    /// Whether protocol `name` may be passed to a backend (case-insensitive).
    fn allows_upgrade(&self, name: &str) -> bool {
        self.allowed_upgrades
            .iter()
            .any(|allowed| allowed.eq_ignore_ascii_case(name))
    }

    /// What to do with upgrade request `request` (see [`is_upgrade`]): tunnel the allowed
    /// protocols it offers, or serve it as a plain request without its upgrade headers.
    pub(crate) fn upgrade_offer<B>(&self, request: &mut Request<B>) -> Offer {
        if is_extended_connect(request) {
            let protocol = request.extensions().get::<Protocol>();
            return match protocol {
                Some(protocol) if self.allows_upgrade(protocol.as_str()) => Offer::Tunnel(None),
                _ => Offer::Refused("400 bad request: upgrade protocol not allowed"),
            };
        }
        let mut offered = String::new();
        for value in request.headers().get_all(header::UPGRADE) {
            let Ok(value) = value.to_str() else { continue };
            for token in value.split(',') {
                if self.allows_upgrade(protocol_name(token)) {
                    if !offered.is_empty() {
                        offered.push_str(", ");
                    }
                    offered.push_str(token.trim());
                }
            }
        }
        match HeaderValue::from_str(&offered) {
            Ok(value) if !offered.is_empty() => Offer::Tunnel(Some(value)),
            _ => {
                let headers = request.headers_mut();
                headers.remove(header::UPGRADE);
                headers.remove(&HTTP2_SETTINGS);
                Offer::Plain
            }
        }
    }

    /// Forwards an upgrade request (`upgrade`: the HTTP/1.1 `Upgrade` to send, see
    /// [`Offer::Tunnel`]); on `101` relays both connections until either closes.
    pub(crate) async fn forward_upgrade(
        &self,
        mut request: Request<Incoming>,
        upgrade: Option<HeaderValue>,
        client: SocketAddr,
        client_ip: &HeaderValue,
        idle_timeout: Duration,
        watch: Option<BodyWatch>,
    ) -> Response<ProxyBody> {
        let client_upgrade = hyper::upgrade::on(&mut request);
        let slot = request.extensions_mut().remove::<ClientSlot>();
        let extended = is_extended_connect(&request);
        let upgrade = if extended {
            // RFC 8441 → RFC 6455: the backend gets the HTTP/1.1 form of the same request.
            let protocol = request
                .extensions_mut()
                .remove::<Protocol>()
                .map(|p| p.as_str().to_string())
                .unwrap_or_default();
            *request.method_mut() = Method::GET;
            let headers = request.headers_mut();
            if protocol.eq_ignore_ascii_case("websocket") {
                if !headers.contains_key(header::SEC_WEBSOCKET_KEY) {
                    if let Ok(key) = HeaderValue::from_str(&generate_key()) {
                        headers.insert(header::SEC_WEBSOCKET_KEY, key);
                    }
                }
                headers
                    .entry(header::SEC_WEBSOCKET_VERSION)
                    .or_insert(HeaderValue::from_static("13"));
            }
            match HeaderValue::from_str(&protocol) {
                Ok(value) => Some(value),
                Err(_) => return Failure::bad_request("400 bad request: bad :protocol").response(),
            }
        } else {
            upgrade
        };
        let version = request.version();
        let mut request = match prepare_request(request, client_ip, self.scheme) {
            Ok(request) => request,
            Err(message) => return refuse(message, version),
        };
        // prepare_request removed the hop-by-hop headers; an upgrade needs these two back.
        if let Some(upgrade) = upgrade {
            request.headers_mut().insert(header::UPGRADE, upgrade);
        }
        request
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        let pool = &self.pool;
        let snapshot_guard = pool.snapshot();
        let snapshot: &PoolSnapshot = &snapshot_guard;
        let settings = &*snapshot.settings;
        // Keyed like any request of the client (header, cookie, path or address).
        let mut attempts = Attempts::new(
            self,
            snapshot,
            http_key_hash(settings, &request, client.ip()),
        );
        let timeout = settings.connect_timeout;
        let connected = attempts
            .connect(|backend| dial_upgradable(backend.address, &settings.transport, timeout))
            .await;
        let (backend, mut sender) = match connected {
            Ok(connected) => connected,
            Err(exhausted) => {
                if !exhausted.is_local() {
                    tracing::warn!(listener = %self.listener, pool = %pool.name, "no backend available");
                }
                return exhausted.response();
            }
        };
        let guard = self.pool.start_request(snapshot, backend);
        let awaiting = backend.await_answer();
        let response = match tokio::time::timeout(
            settings.request_timeout,
            sender.send_request(match watch {
                None => request.map(RequestBody::Client),
                Some(watch) => request.map(|body| RequestBody::watched(body, watch)),
            }),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => {
                let failure = Failure::no_answer();
                self.fail(
                    snapshot,
                    backend,
                    failure,
                    &error,
                    "answering 502 to the upgrade request",
                );
                return failure.response();
            }
            Err(_) => {
                let failure = Failure::timeout();
                let waited = settings.request_timeout;
                self.fail(
                    snapshot,
                    backend,
                    failure,
                    &format_args!("no response head within {waited:?}"),
                    "answering 504 to the upgrade request",
                );
                return failure.response();
            }
        };
        drop(awaiting);
        backend.record_status(response.status().as_u16());
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // Refused upgrade: an ordinary response. The connection is then reusable by the
            // pool's requests if they speak HTTP/1.1 (it was made with the pool's transport);
            // an HTTP/2 pool has no use for it.
            if response.status().is_server_error() {
                self.charge(snapshot, backend, Blame::Failure);
            } else {
                backend.record_success();
            }
            let reusable = settings.transport.protocol == UpstreamProtocol::Http1;
            let mut response = response.map(|body| {
                let sender = reusable.then_some(UpstreamSender::Http1(sender));
                ProxyBody::Upstream(UpstreamBody::with_connection(body, sender, guard))
            });
            remove_hop_by_hop(response.headers_mut());
            return response;
        }
        let switched_to = response
            .headers()
            .get(header::UPGRADE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !switched_to
            .split(',')
            .all(|p| self.allows_upgrade(protocol_name(p)))
        {
            // Not what the client was offered (e.g. h2c): never relayed.
            let failure = Failure::no_answer();
            self.fail(
                snapshot,
                backend,
                failure,
                &format_args!("switched to {switched_to:?}, which the client may not use"),
                "answering 502 to the upgrade request",
            );
            return failure.response();
        }
        backend.record_success();
        backend
            .sessions
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut response = response;
        let upstream_upgrade = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        parts.extensions = http::Extensions::new();
        if extended {
            // HTTP/2 has no 101 and no connection-level headers: a 200 opens the tunnel.
            parts.status = StatusCode::OK;
            for name in [
                header::CONNECTION,
                header::UPGRADE,
                header::SEC_WEBSOCKET_ACCEPT,
            ] {
                parts.headers.remove(name);
            }
        }
        let backend = backend.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            let _held = (guard, slot);
            let (client_io, upstream_io) = match tokio::join!(client_upgrade, upstream_upgrade) {
                (Ok(c), Ok(u)) => (c, u),
                (Err(error), _) | (_, Err(error)) => {
                    tracing::debug!(backend = %backend.address, %error, "upgrade did not complete");
                    return;
                }
            };
            let (mut client_io, mut upstream_io) =
                (TokioIo::new(client_io), TokioIo::new(upstream_io));
            let (end, sent, received) = relay(
                &mut client_io,
                &mut upstream_io,
                &backend,
                &pool,
                idle_timeout,
            )
            .await;
            tracing::debug!(%client, backend = %backend.address, ?end, bytes_to_backend = sent, bytes_to_client = received, "upgraded connection ended");
        });
        Response::from_parts(parts, ProxyBody::Full(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_upgrade_requests() {
        let request = |connection: &str, version| {
            let mut request = Request::new(());
            *request.version_mut() = version;
            request.headers_mut().insert(
                header::CONNECTION,
                HeaderValue::from_str(connection).unwrap(),
            );
            request
                .headers_mut()
                .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            request
        };
        assert!(is_upgrade(&request("Upgrade", Version::HTTP_11)));
        assert!(is_upgrade(&request(
            "keep-alive, upgrade",
            Version::HTTP_11
        )));
        assert!(!is_upgrade(&request("keep-alive", Version::HTTP_11)));
        assert!(!is_upgrade(&request("upgrade", Version::HTTP_2)));
        let mut connect = Request::new(());
        *connect.method_mut() = Method::CONNECT;
        *connect.version_mut() = Version::HTTP_2;
        assert!(!is_upgrade(&connect), "plain CONNECT is not an upgrade");
        connect
            .extensions_mut()
            .insert(Protocol::from_static("websocket"));
        assert!(is_upgrade(&connect), "extended CONNECT");
    }

    #[test]
    fn only_allowed_upgrades_are_offered() {
        let text = "[listeners.web]\nlisten = \"127.0.0.1:8080\"\npool = \"app\"\n\n\
                    [pools.app]\nbackends = [\"127.0.0.1:10000\"]\n";
        let config = crate::config::Config::parse(text, std::path::Path::new("t.toml")).unwrap();
        let pool = crate::pool::Pool::from_config("app", &config.pools["app"]);
        let proxy = HttpProxy::new("web", pool, Default::default(), false)
            .with_allowed_upgrades(&["WebSocket".into(), "foo".into(), "h2c".into()]);
        let offer = |upgrade: &str| {
            let mut request = Request::new(());
            let headers = request.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
            headers.insert("http2-settings", HeaderValue::from_static("AAMAAABk"));
            let offer = proxy.upgrade_offer(&mut request);
            (offer, request)
        };
        let (tunnel, _) = offer("h2c, websocket/13, bar, FOO");
        match tunnel {
            Offer::Tunnel(Some(value)) => assert_eq!(value, "websocket/13, FOO"),
            other => panic!("{other:?}"),
        }
        for plain in ["h2c", "H2C", "bar", ""] {
            let (offer, request) = offer(plain);
            assert!(matches!(offer, Offer::Plain), "{plain}: {offer:?}");
            assert!(!request.headers().contains_key(header::UPGRADE), "{plain}");
            assert!(!request.headers().contains_key("http2-settings"), "{plain}");
        }
    }
}
