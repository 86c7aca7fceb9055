//! The active checks: a TCP connect, or an HTTP GET with expected status and body.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, HOST, USER_AGENT};
use http::Request;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::HealthCheck;
use crate::config::{
    HealthConfig, HealthKind, ProxyProtocolVersion, StatusRange, UpstreamProtocol,
};
use crate::upstream::body::RequestBody;
use crate::upstream::{dial, ConnectError, UpstreamSender, UpstreamTransport};
use crate::wire::proxy_protocol::encode_local;

/// Most of a health-check response body that is read to look for `expect_body`.
const MAX_CHECK_BODY: usize = 64 * 1024;

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No answer in time.
    #[error("check timed out after {0:?}")]
    Timeout(Duration),
    /// Connect or I/O failure.
    #[error("check connect failed: {0}")]
    Io(std::io::Error),
    /// The connection could not be set up (connect timeout, TLS, HTTP/2 handshake).
    #[error("check request failed: {0}")]
    Connect(ConnectError),
    /// The `Host` header (the configured `host`) is not a valid header value.
    #[error("check request failed: {0}")]
    Host(http::header::InvalidHeaderValue),
    /// The request could not be built (an invalid `path`).
    #[error("check request failed: {0}")]
    Request(http::Error),
    /// The HTTP exchange failed (handshake, request or response head).
    #[error("check request failed: {0}")]
    Exchange(hyper::Error),
    /// The response body could not be read, or exceeded the bound on what is read.
    #[error("check request failed: {0}")]
    ReadBody(Box<dyn std::error::Error + Send + Sync>),
    /// Answered with a status outside the expected range.
    #[error("check answered status {0}")]
    Status(u16),
    /// The body lacked the expected text.
    #[error("check body lacks the expected text")]
    Body,
}

/// A configured active check.
#[derive(Debug, Clone)]
pub struct ActiveCheck {
    kind: HealthKind,
    path: String,
    expect_status: StatusRange,
    expect_body: Option<String>,
    host: Option<String>,
    timeout: Duration,
    /// The pool's backends expect a PROXY header first: checks send a LOCAL one.
    proxy_protocol: Option<ProxyProtocolVersion>,
    /// The pool's way to reach backends (TLS, HTTP/2), for HTTP checks; plain HTTP/1.1 if none.
    transport: Option<Arc<UpstreamTransport>>,
}

impl ActiveCheck {
    /// The check described by `config`.
    pub fn from_config(config: &HealthConfig) -> Self {
        ActiveCheck {
            kind: config.kind,
            path: if config.path.starts_with('/') {
                config.path.clone()
            } else {
                format!("/{}", config.path)
            },
            expect_status: config.expect_status,
            expect_body: config.expect_body.clone(),
            host: config.host.clone(),
            timeout: config.timeout.0,
            proxy_protocol: None,
            transport: None,
        }
    }

    /// Makes every check start with a PROXY protocol LOCAL header (for pools whose backends
    /// expect a PROXY header on every connection), like HAProxy's `check-send-proxy`.
    pub fn with_proxy_protocol(mut self, version: Option<ProxyProtocolVersion>) -> Self {
        self.proxy_protocol = version;
        self
    }

    async fn connect(&self, address: SocketAddr) -> Result<TcpStream, CheckError> {
        let mut stream = TcpStream::connect(address).await.map_err(CheckError::Io)?;
        if let Some(version) = self.proxy_protocol {
            stream
                .write_all(&encode_local(version))
                .await
                .map_err(CheckError::Io)?;
        }
        Ok(stream)
    }

    /// HTTP checks reach the backends like the pool's requests do: with TLS and HTTP/2 when
    /// the pool uses them.
    pub fn with_transport(mut self, transport: Arc<UpstreamTransport>) -> Self {
        let plain = transport.tls.is_none() && transport.protocol == UpstreamProtocol::Http1;
        self.transport = (!plain).then_some(transport);
        self
    }

    /// An HTTP check over TLS or HTTP/2, through the same connect path as proxied requests.
    async fn http_via_transport(
        &self,
        address: SocketAddr,
        transport: &UpstreamTransport,
    ) -> Result<(), CheckError> {
        let mut sender = dial(address, transport, self.timeout, None)
            .await
            .map(UpstreamSender::detached)
            .map_err(|e| match e {
                ConnectError::Io(e) => CheckError::Io(e),
                e => CheckError::Connect(e),
            })?;
        let host = self.host.clone().unwrap_or_else(|| address.to_string());
        let mut request = Request::get(self.path.as_str())
            .header(
                HOST,
                HeaderValue::from_str(&host).map_err(CheckError::Host)?,
            )
            .header(USER_AGENT, "fulcrum-health-check")
            .body(RequestBody::Empty)
            .map_err(CheckError::Request)?;
        if transport.protocol == UpstreamProtocol::Http1 {
            request
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        let response = sender
            .try_send_request(request)
            .await
            .map_err(|e| CheckError::Exchange(e.into_error()))?;
        self.judge(response).await
    }

    /// Whether a check's answer passes: expected status, and the expected text in the body
    /// (read up to a bound) when one is configured.
    async fn judge<B>(&self, response: http::Response<B>) -> Result<(), CheckError>
    where
        B: http_body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let status = response.status().as_u16();
        if !self.expect_status.contains(status) {
            return Err(CheckError::Status(status));
        }
        if let Some(expected) = &self.expect_body {
            let body = Limited::new(response.into_body(), MAX_CHECK_BODY)
                .collect()
                .await
                .map_err(CheckError::ReadBody)?
                .to_bytes();
            if !String::from_utf8_lossy(&body).contains(expected.as_str()) {
                return Err(CheckError::Body);
            }
        }
        Ok(())
    }

    async fn http(&self, address: SocketAddr) -> Result<(), CheckError> {
        if let Some(transport) = &self.transport {
            return self.http_via_transport(address, transport).await;
        }
        let stream = self.connect(address).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(CheckError::Exchange)?;
        let driver = tokio::spawn(connection);
        let host = self.host.clone().unwrap_or_else(|| address.to_string());
        let request = Request::get(self.path.as_str())
            .header(
                HOST,
                HeaderValue::from_str(&host).map_err(CheckError::Host)?,
            )
            .header(USER_AGENT, "fulcrum-health-check")
            .header(CONNECTION, "close")
            .body(Empty::<Bytes>::new())
            .map_err(CheckError::Request)?;
        let outcome = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(CheckError::Exchange)?;
            self.judge(response).await
        }
        .await;
        driver.abort();
        outcome
    }
}

impl HealthCheck for ActiveCheck {
    async fn check(&self, address: SocketAddr) -> Result<(), CheckError> {
        let attempt = async {
            match self.kind {
                HealthKind::Tcp => self.connect(address).await.map(drop),
                HealthKind::Http => self.http(address).await,
            }
        };
        tokio::time::timeout(self.timeout, attempt)
            .await
            .map_err(|_| CheckError::Timeout(self.timeout))?
    }
}
