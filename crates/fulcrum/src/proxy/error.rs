//! The data path's typed failure: where it came from (the client, a backend, or Fulcrum
//! itself), what it was, and whether the request may go to another backend. A [`Failure`]
//! alone decides the status of the response Fulcrum answers with, whether a retry is safe,
//! the log line, and what is blamed on the backend (failure count, connect back-off, passive
//! ejection). Every response Fulcrum generates itself is built here ([`Failure::response`]).
//!
//! A failure on Fulcrum's side — a connect that failed for want of descriptors, ports or
//! memory (EMFILE, ENFILE, EADDRNOTAVAIL, ENOBUFS, ENOMEM), or unusable upstream TLS
//! settings — is never blamed on a backend: no back-off, no passive ejection.

use std::fmt;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};

use crate::pool::Backend;
use crate::proxy::body::ProxyBody;
use crate::upstream::ConnectError;

/// Who caused a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client sent something Fulcrum will not forward, or too late.
    Client,
    /// A backend failed: unreachable, closed the connection, did not answer (in time).
    Backend,
    /// Fulcrum itself: out of descriptors, ports or memory, nothing to pick, unusable settings.
    Local,
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request that cannot be forwarded (400), with the reason the client is told.
    BadRequest(&'static str),
    /// The client did not send its request in time (408).
    RequestTimeout,
    /// The request body is larger than allowed (413).
    BodyTooLarge,
    /// The request target is longer than allowed (414).
    UriTooLong,
    /// The client sends more than it is allowed to (429).
    TooManyRequests,
    /// The request's header section is larger than allowed (431).
    HeadersTooLarge,
    /// No backend can be picked, or none could be reached (503).
    NoBackend,
    /// No connection to a backend could be had; nothing was sent (502; 503 when local).
    Connect,
    /// A backend closed a new connection before taking the request; nothing was sent (502).
    Closed,
    /// A backend took the request (or part of a session) and failed before answering (502).
    NoAnswer,
    /// A backend did not answer within the request timeout (504).
    Timeout,
}

/// Whether a failed request may be sent to another backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Nothing reached the backend: the request can go elsewhere as it is.
    Safe,
    /// The backend may have acted on the request: only a replayable (idempotent, bodiless)
    /// request may be sent again, within the pool's retry budget.
    IfReplayable,
    /// Answer the client now.
    Never,
}

/// What a failure costs the backend it happened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blame {
    /// Nothing: not the backend's doing.
    None,
    /// A failure (counter, passive ejection).
    Failure,
    /// A failure, and the backend is skipped for the pool's `failure_backoff` (connects).
    FailureWithBackoff,
}

/// A failure on the data path. Small and `Copy`: the cause (an I/O error, ...) is given to
/// [`Failure::log`] where it happens, not carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failure {
    /// Who caused it.
    pub origin: Origin,
    /// What it was.
    pub kind: Kind,
}

impl Failure {
    /// A failure of `kind` caused by `origin`.
    pub const fn new(origin: Origin, kind: Kind) -> Self {
        Failure { origin, kind }
    }

    /// A request that cannot be forwarded, for `reason` (a 400 with it as the body).
    pub const fn bad_request(reason: &'static str) -> Self {
        Failure::new(Origin::Client, Kind::BadRequest(reason))
    }

    /// Nothing to pick, or every attempt failed (503).
    pub const fn no_backend() -> Self {
        Failure::new(Origin::Local, Kind::NoBackend)
    }

    /// A connect to a backend that failed with `error`: Fulcrum's own failure when it ran out
    /// of a local resource (see [`ConnectError::is_local`]), else the backend's.
    pub fn connect(error: &ConnectError) -> Self {
        let origin = if error.is_local() {
            Origin::Local
        } else {
            Origin::Backend
        };
        Failure::new(origin, Kind::Connect)
    }

    /// The backend closed a new connection before taking the request.
    pub const fn closed() -> Self {
        Failure::new(Origin::Backend, Kind::Closed)
    }

    /// The backend took the request and failed before answering.
    pub const fn no_answer() -> Self {
        Failure::new(Origin::Backend, Kind::NoAnswer)
    }

    /// The backend did not answer in time.
    pub const fn timeout() -> Self {
        Failure::new(Origin::Backend, Kind::Timeout)
    }

    /// What the client is answered when every attempt ended with this failure (or with none,
    /// when `last` is `None`): the local failure itself, so the client learns that Fulcrum
    /// is out of resources, else "no backend available".
    pub fn exhausted(last: Option<Failure>) -> Self {
        match last {
            Some(failure) if failure.is_local() => failure,
            _ => Failure::no_backend(),
        }
    }

    /// Whether Fulcrum itself failed (see [`Origin::Local`]); such a failure never makes a
    /// backend back off or be ejected.
    pub fn is_local(&self) -> bool {
        self.origin == Origin::Local
    }

    /// The status the client is answered with.
    pub fn status(&self) -> StatusCode {
        match self.kind {
            Kind::BadRequest(_) => StatusCode::BAD_REQUEST,
            Kind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Kind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Kind::UriTooLong => StatusCode::URI_TOO_LONG,
            Kind::TooManyRequests => StatusCode::TOO_MANY_REQUESTS,
            Kind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Kind::NoBackend => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Connect if self.is_local() => StatusCode::SERVICE_UNAVAILABLE,
            Kind::Connect | Kind::Closed | Kind::NoAnswer => StatusCode::BAD_GATEWAY,
            Kind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Whether the request may be sent to another backend.
    pub fn retry(&self) -> Retry {
        match self.kind {
            Kind::Connect | Kind::Closed => Retry::Safe,
            Kind::NoAnswer => Retry::IfReplayable,
            _ => Retry::Never,
        }
    }

    /// What the backend it happened on is charged with.
    pub fn blame(&self) -> Blame {
        if self.origin != Origin::Backend {
            return Blame::None;
        }
        match self.kind {
            Kind::Connect | Kind::Closed => Blame::FailureWithBackoff,
            _ => Blame::Failure,
        }
    }

    /// The one-line body of the response (what the client is told).
    pub fn message(&self) -> &'static str {
        match self.kind {
            Kind::BadRequest(reason) => reason,
            Kind::RequestTimeout => "408 request timeout: the request did not arrive in time",
            Kind::BodyTooLarge => "413 payload too large: the request body is too large",
            Kind::UriTooLong => "414 URI too long: the request target is too long",
            Kind::TooManyRequests => "429 too many requests",
            Kind::HeadersTooLarge => "431 request header fields too large",
            Kind::Connect if self.is_local() => {
                "503 service unavailable: the load balancer is out of resources"
            }
            Kind::NoBackend => "503 service unavailable: no backend available",
            Kind::Connect => "502 bad gateway: the backend could not be reached",
            Kind::Closed | Kind::NoAnswer => "502 bad gateway: the backend failed to answer",
            Kind::Timeout => "504 gateway timeout: the backend did not answer in time",
        }
    }

    /// The response Fulcrum answers with: the status and a one-line text body.
    pub fn response(&self) -> Response<ProxyBody> {
        let message = self.message();
        let mut body = Vec::with_capacity(message.len() + 1);
        body.extend_from_slice(message.as_bytes());
        body.push(b'\n');
        let mut response = Response::new(ProxyBody::full(Bytes::from(body)));
        *response.status_mut() = self.status();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        response
    }

    /// Logs the failure, which happened on `backend` (when one was involved) of `pool`, the
    /// pool of listener `listener`; `cause` is the error behind it, `next` what happens now
    /// (e.g. "trying another backend").
    pub fn log(
        &self,
        listener: &str,
        pool: &str,
        backend: Option<&Backend>,
        cause: &dyn fmt::Display,
        next: &str,
    ) {
        let what = match (self.origin, self.kind) {
            (Origin::Local, Kind::Connect) => {
                "cannot connect for want of local resources (not the backend's fault)"
            }
            (Origin::Local, Kind::NoBackend) => "no backend available",
            (_, Kind::Connect) => "backend unreachable",
            (_, Kind::Closed) => "backend closed a new connection",
            (_, Kind::NoAnswer) => "backend failed before answering",
            (_, Kind::Timeout) => "backend did not answer in time",
            _ => self.message(),
        };
        let address = backend.map(|b| b.address);
        match self.origin {
            Origin::Client => tracing::debug!(
                %listener, %pool, %cause, "{what}; {next}"
            ),
            Origin::Local if self.kind == Kind::Connect => tracing::error!(
                %listener, %pool, backend = ?address, %cause, "{what}; {next}"
            ),
            _ => tracing::warn!(
                %listener, %pool, backend = ?address, %cause, "{what}; {next}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_decides_status_retry_and_blame() {
        let refused = ConnectError::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        let emfile = ConnectError::Io(std::io::Error::from_raw_os_error(
            nix::errno::Errno::EMFILE as i32,
        ));
        let no_port = ConnectError::Io(std::io::Error::from_raw_os_error(
            nix::errno::Errno::EADDRNOTAVAIL as i32,
        ));
        let backend_down = Failure::connect(&refused);
        assert_eq!(backend_down.origin, Origin::Backend);
        assert_eq!(backend_down.blame(), Blame::FailureWithBackoff);
        assert_eq!(backend_down.retry(), Retry::Safe);
        for local in [
            &emfile,
            &no_port,
            &ConnectError::Setup(std::sync::Arc::new(
                crate::upstream::tls::UpstreamTlsError::Setup(rustls::Error::General(
                    "no CA".into(),
                )),
            )),
        ] {
            let failure = Failure::connect(local);
            assert!(failure.is_local(), "{local}");
            assert_eq!(failure.blame(), Blame::None, "{local}");
            assert_eq!(failure.status(), StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(Failure::exhausted(Some(failure)), failure);
        }
        assert_eq!(
            Failure::exhausted(Some(backend_down)),
            Failure::no_backend()
        );
        assert_eq!(Failure::exhausted(None).status(), 503);
        assert_eq!(Failure::no_answer().retry(), Retry::IfReplayable);
        assert_eq!(Failure::no_answer().blame(), Blame::Failure);
        assert_eq!(Failure::timeout().retry(), Retry::Never);
        assert_eq!(Failure::timeout().status(), 504);
        assert_eq!(Failure::closed().blame(), Blame::FailureWithBackoff);
        let statuses = [
            (Kind::BadRequest("400 bad request: x"), 400),
            (Kind::RequestTimeout, 408),
            (Kind::BodyTooLarge, 413),
            (Kind::UriTooLong, 414),
            (Kind::TooManyRequests, 429),
            (Kind::HeadersTooLarge, 431),
        ];
        for (kind, status) in statuses {
            let failure = Failure::new(Origin::Client, kind);
            assert_eq!(failure.status(), status);
            assert_eq!(failure.blame(), Blame::None);
            assert_eq!(failure.retry(), Retry::Never);
            assert!(failure.message().starts_with(&status.to_string()));
        }
        let response = Failure::no_answer().response();
        assert_eq!(response.status(), 502);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/plain; charset=utf-8"
        );
    }
}
