//! `fulcrum backend`: the demo backend server used by the demo, the tests and the benchmarks.
//!
//! Every path answers 200 with `X-Backend: NAME` and a small JSON body (name, method, path,
//! HTTP version, received header count, and the length and FNV-1a hash of the request body it read).
//! Special paths: `/healthz` answers `ok`; `/bytes/N` streams N bytes of [`pattern_byte`].
//! `/grpc-echo` streams the request body back frame by frame as it arrives and ends with
//! `grpc-status: 0` trailers (a gRPC-style bidirectional stream).
//! Query parameters: `delay_ms=N` delays the answer, `status=NNN` changes the status,
//! `echo=headers` adds the received headers to the JSON body.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Header naming the backend that answered.
pub static X_BACKEND: HeaderName = HeaderName::from_static("x-backend");

/// Size of the chunks `/bytes/N` streams.
const CHUNK: usize = 64 * 1024;

/// Settings of one demo backend.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    /// Name reported in `X-Backend` and the body; defaults to the listen address.
    pub name: Option<String>,
    /// Delay before every answer (except `/healthz`).
    pub delay: Duration,
    /// Serve HTTPS (ALPN h2 and http/1.1) with this PEM certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
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
pub async fn spawn_backend(listen: SocketAddr, options: BackendOptions) -> Result<SocketAddr> {
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
            let store = crate::tls::CertStore::load(&config).map_err(anyhow::Error::msg)?;
            Some(
                crate::tls::TlsListener::new("backend", &config, store, None)
                    .map_err(anyhow::Error::msg)?,
            )
        }
        None => None,
    };
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("backend cannot listen on {listen}"))?;
    let address = listener.local_addr()?;
    let name = options.name.clone().unwrap_or_else(|| address.to_string());
    let state = Arc::new(BackendServer {
        name: HeaderValue::from_str(&name).context("backend name must be a valid header value")?,
        delay: options.delay,
    });
    tokio::spawn(accept_loop(listener, state, tls));
    Ok(address)
}

struct BackendServer {
    name: HeaderValue,
    delay: Duration,
}

async fn accept_loop(
    listener: TcpListener,
    state: Arc<BackendServer>,
    tls: Option<Arc<crate::tls::TlsListener>>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::error!(%error, "backend accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { state.answer(request).await }
        });
        if let Some(tls) = tls.clone() {
            let builder = builder.clone();
            tokio::spawn(async move {
                if let Ok(stream) = tls.accept(stream).await {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            });
            continue;
        }
        let connection = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        tokio::spawn(async move {
            let _ = connection.await;
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
        request: Request<Incoming>,
    ) -> Result<Response<BackendBody>, Infallible> {
        let (parts, mut body) = request.into_parts();
        let path = parts.uri.path().to_string();
        let query = parts.uri.query();
        if path == "/grpc-echo" {
            return Ok(self.grpc_echo(body));
        }
        let mut response = if path == "/healthz" {
            Response::new(BackendBody::Full(Some(Bytes::from_static(b"ok\n"))))
        } else {
            let mut received = 0u64;
            let mut hash = Fnv1a::default();
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
        if !path.starts_with("/bytes/") {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        Ok(response)
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
