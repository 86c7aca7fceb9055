//! `fulcrum backend`: the demo backend server used by the demo, the tests and the benchmarks.
//!
//! Every path answers 200 with `X-Backend: NAME` and a small JSON body (name, method, path,
//! received header count, and the length and FNV-1a hash of the request body it read).
//! Special paths: `/healthz` answers `ok`; `/bytes/N` streams N bytes of [`pattern_byte`];
//! `/stats` answers `{"connections":C,"requests":R}`: connections accepted and requests answered
//! so far (the benchmarks derive the upstream connection reuse share from them).
//! `/ws` is a WebSocket echo server. The JSON body's `client` (and the `X-Client-Addr`
//! header) is the client address: the peer's, or with `--proxy-protocol` the one the PROXY
//! header carries. [`spawn_tcp_echo`] is the raw TCP echo server (`--tcp-echo`).
//! The JSON body also reports the HTTP version.
//! `/grpc-echo` streams the request body back frame by frame as it arrives and ends with
//! `grpc-status: 0` trailers (a gRPC-style bidirectional stream).
//! Query parameters: `delay_ms=N` delays the answer, `status=NNN` changes the status,
//! `echo=headers` adds the received headers to the JSON body, `unread_ms=N` answers without
//! reading the request body (`body_bytes` 0) and drops the body unread N ms later (hyper then
//! closes the connection, unless the rest of the body had already arrived). `/healthz` and
//! `/stats` never read the request body either.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT,
    SEC_WEBSOCKET_KEY, UPGRADE,
};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;

use crate::listener::tls::{CertStore, ListenerTlsError, TlsListener};
use crate::wire::proxy_protocol::read_header;

/// Header naming the backend that answered.
pub static X_BACKEND: HeaderName = HeaderName::from_static("x-backend");
/// Header with the client address the backend saw (the PROXY header's, when one was sent).
pub static X_CLIENT_ADDR: HeaderName = HeaderName::from_static("x-client-addr");

/// Size of the chunks `/bytes/N` streams.
const CHUNK: usize = 64 * 1024;

/// Settings of one demo backend.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Name reported in `X-Backend` and the body; defaults to the listen address.
    pub name: Option<String>,
    /// Delay before every answer (except `/healthz`).
    pub delay: Duration,
    /// Expect a PROXY protocol header (v1 or v2) on every connection and report the client
    /// address it carries.
    pub proxy_protocol: bool,
    /// Serve HTTPS (ALPN h2 and http/1.1) with this PEM certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Why a demo backend could not start.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Its address cannot be bound.
    #[error("backend cannot listen on {address}: {error}")]
    Listen {
        /// The address it was to listen on.
        address: SocketAddr,
        /// Why binding failed.
        error: std::io::Error,
    },
    /// The address of the bound socket cannot be read.
    #[error("backend cannot read its listening address: {0}")]
    LocalAddr(std::io::Error),
    /// Its name cannot be sent in the `X-Backend` header.
    #[error("backend name must be a valid header value: {0}")]
    Name(http::header::InvalidHeaderValue),
    /// Its certificate or key cannot be loaded, or TLS cannot be set up.
    #[error(transparent)]
    Tls(#[from] ListenerTlsError),
}

/// Binds `listen` for a demo backend.
async fn bind(listen: SocketAddr) -> Result<(TcpListener, SocketAddr), BackendError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| BackendError::Listen {
            address: listen,
            error,
        })?;
    let address = listener.local_addr().map_err(BackendError::LocalAddr)?;
    Ok((listener, address))
}

/// How long a client may take to send its PROXY protocol header.
const PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the PROXY header of a new connection: the carried client address (the peer's when
/// the header carries none), or `None` when the header is bad (logged; close the connection).
async fn proxied_client(stream: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
    match tokio::time::timeout(PROXY_HEADER_TIMEOUT, read_header(stream)).await {
        Ok(Ok(carried)) => Some(carried.map_or(peer, |c| c.source)),
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "backend: bad PROXY protocol header");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, "backend: no PROXY protocol header in time");
            None
        }
    }
}

/// Binds `listen` and serves a TCP echo server in a background task (every connection gets
/// back exactly the bytes it sends). With `proxy_protocol`, each connection's PROXY header is
/// read and not echoed. Returns the bound address.
pub async fn spawn_tcp_echo(
    listen: SocketAddr,
    proxy_protocol: bool,
) -> Result<SocketAddr, BackendError> {
    let (listener, address) = bind(listen).await?;
    tokio::spawn(async move {
        loop {
            let (mut stream, peer) = crate::listener::accept(&listener).await;
            tokio::spawn(async move {
                if proxy_protocol && proxied_client(&mut stream, peer).await.is_none() {
                    return;
                }
                let _ = stream.set_nodelay(true);
                let (read, mut write) = stream.into_split();
                let mut read = tokio::io::BufReader::with_capacity(CHUNK, read);
                if tokio::io::copy_buf(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    Ok(address)
}

/// The byte at `offset` of the `/bytes/N` stream: a simple pattern a client can recompute.
#[inline]
pub fn pattern_byte(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// FNV-1a 64-bit hash, streamed: feed chunks with [`Fnv1a::update`].
#[derive(Debug, Clone, Copy)]
pub struct Fnv1a(pub u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Mixes `bytes` into the hash.
    pub fn update(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// Binds `listen` and serves the demo backend in a background task. Returns the bound address.
pub async fn spawn_backend(
    listen: SocketAddr,
    options: BackendOptions,
) -> Result<SocketAddr, BackendError> {
    let tls = match &options.tls {
        Some((cert, key)) => {
            let config = crate::config::ListenerTlsConfig {
                certs: vec![toml::Spanned::new(
                    0..0,
                    crate::config::CertConfig {
                        cert: cert.clone(),
                        key: key.clone(),
                        default: true,
                    },
                )],
                handshake_timeout: crate::config::ConfigDuration(Duration::from_secs(10)),
            };
            let store = CertStore::load(&config)?;
            Some(TlsListener::new("backend", &config, store, None)?)
        }
        None => None,
    };
    let (listener, address) = bind(listen).await?;
    let name = options.name.clone().unwrap_or_else(|| address.to_string());
    let state = Arc::new(BackendServer {
        name: HeaderValue::from_str(&name).map_err(BackendError::Name)?,
        delay: options.delay,
        connections: AtomicU64::new(0),
        requests: AtomicU64::new(0),
        proxy_protocol: options.proxy_protocol,
    });
    tokio::spawn(accept_loop(listener, state, tls));
    Ok(address)
}

struct BackendServer {
    name: HeaderValue,
    delay: Duration,
    /// Connections accepted so far.
    connections: AtomicU64,
    /// Requests answered so far (`/stats` excluded).
    requests: AtomicU64,
    proxy_protocol: bool,
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<BackendServer>,
    tls: Option<Arc<TlsListener>>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (mut stream, peer) = crate::listener::accept(&listener).await;
        let _ = stream.set_nodelay(true);
        state.connections.fetch_add(1, Ordering::Relaxed);
        let state = state.clone();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let client = if state.proxy_protocol {
                match proxied_client(&mut stream, peer).await {
                    Some(client) => client,
                    None => return,
                }
            } else {
                peer
            };
            let service = service_fn(move |request| {
                let state = state.clone();
                async move { state.answer(request, client).await }
            });
            match tls {
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = builder
                            .serve_connection_with_upgrades(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

/// A response body: either fixed bytes or the `/bytes/N` pattern stream.
enum BackendBody {
    Full(Option<Bytes>),
    Pattern {
        sent: u64,
        total: u64,
    },
    /// Frames produced by a task (`/grpc-echo`).
    Stream(Channel<Bytes>),
}

impl Body for BackendBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            BackendBody::Stream(channel) => Pin::new(channel).poll_frame(cx),
            BackendBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            BackendBody::Pattern { sent, total } => {
                if *sent >= *total {
                    return Poll::Ready(None);
                }
                let len = (CHUNK as u64).min(*total - *sent) as usize;
                let chunk: Vec<u8> = (*sent..*sent + len as u64).map(pattern_byte).collect();
                *sent += len as u64;
                Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
            }
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            BackendBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            BackendBody::Pattern { sent, total } => SizeHint::with_exact(total - sent),
            BackendBody::Stream(channel) => channel.size_hint(),
        }
    }
}

fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<&'a str> {
    query?
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

impl BackendServer {
    /// Streams the request body back as it arrives, then `grpc-status: 0` trailers.
    fn grpc_echo(&self, mut body: Incoming) -> Response<BackendBody> {
        let (mut sender, channel) = Channel::new(16);
        tokio::spawn(async move {
            while let Some(Ok(frame)) = body.frame().await {
                if let Ok(data) = frame.into_data() {
                    if sender.send_data(data).await.is_err() {
                        return;
                    }
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("echoed"));
            let _ = sender.send_trailers(trailers).await;
        });
        let mut response = Response::new(BackendBody::Stream(channel));
        let headers = response.headers_mut();
        headers.insert(X_BACKEND.clone(), self.name.clone());
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        response
    }

    async fn answer(
        &self,
        mut request: Request<Incoming>,
        client: SocketAddr,
    ) -> Result<Response<BackendBody>, Infallible> {
        if request.uri().path() == "/ws" {
            return Ok(self.websocket_echo(&mut request));
        }
        let (parts, mut body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query();
        if path == "/grpc-echo" {
            return Ok(self.grpc_echo(body));
        }
        let mut response = if path == "/healthz" {
            Response::new(BackendBody::Full(Some(Bytes::from_static(b"ok\n"))))
        } else if path == "/stats" {
            let text = format!(
                "{{\"connections\":{},\"requests\":{}}}\n",
                self.connections.load(Ordering::Relaxed),
                self.requests.load(Ordering::Relaxed)
            );
            Response::new(BackendBody::Full(Some(Bytes::from(text))))
        } else {
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut received = 0u64;
            let mut hash = Fnv1a::default();
            let unread = query_param(query, "unread_ms").and_then(|v| v.parse().ok());
            if let Some(hold) = unread {
                // Answer without reading the body; drop it unread later (hyper then closes
                // the connection, unless the rest of the body was already buffered).
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(hold)).await;
                    drop(body);
                });
            } else {
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(frame) => {
                            if let Some(data) = frame.data_ref() {
                                received += data.len() as u64;
                                hash.update(data);
                            }
                        }
                        Err(_) => break,
                    }
                }
            }
            let delay = query_param(query, "delay_ms")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis)
                .unwrap_or(self.delay);
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            let body = if let Some(size) = path.strip_prefix("/bytes/").and_then(|n| n.parse().ok())
            {
                BackendBody::Pattern {
                    sent: 0,
                    total: size,
                }
            } else {
                let mut json = serde_json::json!({
                    "name": self.name.to_str().unwrap_or(""),
                    "method": parts.method.as_str(),
                    "version": format!("{:?}", parts.version),
                    "path": path,
                    "headers": parts.headers.len(),
                    "body_bytes": received,
                    "body_fnv": format!("{:016x}", hash.0),
                    "client": client.to_string(),
                });
                if query_param(query, "echo") == Some("headers") {
                    let echoed: serde_json::Map<String, serde_json::Value> = parts
                        .headers
                        .iter()
                        .map(|(name, value)| {
                            (
                                name.to_string(),
                                String::from_utf8_lossy(value.as_bytes()).into(),
                            )
                        })
                        .collect();
                    json["echo"] = echoed.into();
                }
                let mut text = json.to_string();
                text.push('\n');
                BackendBody::Full(Some(Bytes::from(text)))
            };
            let mut response = Response::new(body);
            if let Some(status) = query_param(query, "status").and_then(|s| s.parse().ok()) {
                if let Ok(status) = StatusCode::from_u16(status) {
                    *response.status_mut() = status;
                }
            }
            response
        };
        let headers = response.headers_mut();
        headers.insert(X_BACKEND.clone(), self.name.clone());
        if let Ok(client) = HeaderValue::from_str(&client.to_string()) {
            headers.insert(X_CLIENT_ADDR.clone(), client);
        }
        if !path.starts_with("/bytes/") {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Ok(response)
    }
}

impl BackendServer {
    /// `/ws`: a WebSocket echo server (text and binary messages come back as sent).
    fn websocket_echo(&self, request: &mut Request<Incoming>) -> Response<BackendBody> {
        let key = request.headers().get(SEC_WEBSOCKET_KEY).cloned();
        let is_websocket = request
            .headers()
            .get(UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
        let Some(key) = key.filter(|_| is_websocket) else {
            let mut response = Response::new(BackendBody::Full(Some(Bytes::from_static(
                b"expected a WebSocket upgrade\n",
            ))));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            return response;
        };
        let upgrade = hyper::upgrade::on(request);
        tokio::spawn(async move {
            let Ok(upgraded) = upgrade.await else {
                return;
            };
            let mut socket =
                WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
            while let Some(Ok(message)) = socket.next().await {
                let echo = match message {
                    Message::Text(_) | Message::Binary(_) => message,
                    Message::Close(_) => break,
                    _ => continue,
                };
                if socket.send(echo).await.is_err() {
                    break;
                }
            }
            let _ = socket.close(None).await;
        });
        let mut response = Response::new(BackendBody::Full(None));
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
        if let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) {
            headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
        }
        headers.insert(X_BACKEND.clone(), self.name.clone());
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv_matches_reference_values() {
        let mut hash = Fnv1a::default();
        hash.update(b"");
        assert_eq!(hash.0, 0xcbf29ce484222325);
        hash.update(b"a");
        assert_eq!(hash.0, 0xaf63dc4c8601ec8c);
    }

    #[test]
    fn query_params_are_found() {
        assert_eq!(query_param(Some("a=1&delay_ms=20"), "delay_ms"), Some("20"));
        assert_eq!(query_param(Some("a=1"), "delay_ms"), None);
        assert_eq!(query_param(None, "a"), None);
    }
}
