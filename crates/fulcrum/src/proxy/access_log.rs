//! The access log: one structured line per request (target `fulcrum::access`), written when
//! the response body has been sent, so it carries the bytes and the full duration. Off by
//! default; `[server] access_log = true` turns it on, and `log_format` chooses text or JSON.

use std::net::SocketAddr;
use std::time::Instant;

use http::{Method, Request};

/// What is known of a request for its access-log line.
#[derive(Debug)]
pub struct AccessRecord {
    client: SocketAddr,
    method: Method,
    path: String,
    started: Instant,
    status: u16,
    backend: Option<SocketAddr>,
    /// Response body bytes sent so far.
    pub bytes: u64,
}

impl AccessRecord {
    /// Starts a record for `request` from `client`.
    pub fn start<B>(
        request: &Request<B>,
        client: SocketAddr,
        started: Instant,
    ) -> Box<AccessRecord> {
        Box::new(AccessRecord {
            client,
            method: request.method().clone(),
            path: request
                .uri()
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".to_string()),
            started,
            status: 0,
            backend: None,
            bytes: 0,
        })
    }

    /// Sets the response status and the backend that answered (none for local answers).
    pub fn respond(&mut self, status: u16, backend: Option<SocketAddr>) {
        self.status = status;
        self.backend = backend;
    }

    /// Writes the line.
    pub fn write(&self) {
        let backend = self.backend.map(|b| b.to_string());
        tracing::info!(
            target: "fulcrum::access",
            client = %self.client,
            method = %self.method,
            path = %self.path,
            status = self.status,
            backend = backend.as_deref().unwrap_or("-"),
            duration_ms = self.started.elapsed().as_secs_f64() * 1000.0,
            bytes = self.bytes,
            "request"
        );
    }
}
