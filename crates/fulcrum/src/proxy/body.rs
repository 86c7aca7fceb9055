//! The response body Fulcrum sends to clients: either the backend's body, streamed frame by
//! frame, or a short local body (errors). No boxing, no buffering.

use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::{Backend, InFlightGuard};
use crate::proxy::access_log::AccessRecord;
use crate::proxy::upstream::UpstreamSender;

/// The body Fulcrum sends to a backend: the client's body streamed through, or nothing (a
/// retried request, whose body was empty).
pub enum RequestBody {
    /// The client's body, streamed.
    Client(Incoming),
    /// The client's body, streamed, its end reported to its connection (boxed: rare, and the
    /// other variants stay small).
    Watched(Box<WatchedBody>),
    /// No body.
    Empty,
}

impl RequestBody {
    /// The client's `body`, watched by `watch`.
    pub(crate) fn watched(body: Incoming, watch: BodyWatch) -> Self {
        RequestBody::Watched(Box::new(WatchedBody { body, watch }))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Watched(watched) => watched.poll_frame(cx),
            RequestBody::Empty => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Watched(watched) => watched.body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Watched(watched) => watched.body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Told when a client request body is done (see `server::park`: an HTTP/1 connection is busy
/// until then, since its unread body bytes come before the next request).
pub(crate) trait BodyWatcher: Send + Sync {
    /// The body of request number `request` was read to its end (`read_to_end`), or dropped
    /// before its end.
    fn body_done(&self, request: u32, read_to_end: bool);
}

/// Reports, once, the end of one client request body to its watcher: read to its end (see
/// [`WatchedBody`]), or dropped before (this guard dropped first, e.g. with a request that
/// got a local error response).
pub(crate) struct BodyWatch {
    /// Weak: a body an upstream connection still holds does not keep its client connection's
    /// state (and slot) alive.
    watcher: Option<Weak<dyn BodyWatcher>>,
    request: u32,
}

impl BodyWatch {
    /// Watches the body of request number `request` for `watcher`.
    pub(crate) fn new(watcher: Weak<dyn BodyWatcher>, request: u32) -> Self {
        BodyWatch {
            watcher: Some(watcher),
            request,
        }
    }

    fn done(&mut self, read_to_end: bool) {
        if let Some(watcher) = self.watcher.take().and_then(|w| w.upgrade()) {
            watcher.body_done(self.request, read_to_end);
        }
    }
}

impl Drop for BodyWatch {
    fn drop(&mut self) {
        self.done(false);
    }
}

/// A client request body with its [`BodyWatch`].
pub struct WatchedBody {
    body: Incoming,
    watch: BodyWatch,
}

impl WatchedBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        // A body of known length ends with its last frame: the reader may not poll again.
        let ended = match &polled {
            Poll::Ready(None) => true,
            Poll::Ready(Some(Ok(_))) => self.body.is_end_stream(),
            _ => false,
        };
        if ended {
            self.watch.done(true);
        }
        polled
    }
}

/// A backend's response body. Holds the request's in-flight slot until the body is finished
/// or dropped, and hands the connection back to the pool once the body ended cleanly.
pub struct UpstreamBody {
    inner: Incoming,
    sender: Option<UpstreamSender>,
    guard: InFlightGuard,
    /// The access-log line to write when the body is done (only when the log is on).
    access: Option<Box<AccessRecord>>,
}

impl UpstreamBody {
    /// Wraps a backend's body; `sender` goes back to the backend's pool at the end.
    pub fn new(inner: Incoming, sender: UpstreamSender, guard: InFlightGuard) -> Self {
        UpstreamBody {
            inner,
            sender: Some(sender),
            guard,
            access: None,
        }
    }

    /// The backend this body comes from.
    pub fn backend(&self) -> &Backend {
        self.guard.backend()
    }

    /// Writes `record` (with the bytes sent) when the body is finished or dropped.
    pub fn log_access(&mut self, record: Box<AccessRecord>) {
        self.access = Some(record);
    }

    fn release_connection(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.guard.backend().connections.release(sender.settled());
        }
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        // A body dropped before its end leaves the connection mid-message: close it (drop the
        // sender). One that had nothing more to read is reusable.
        if self.inner.is_end_stream() {
            self.release_connection();
        }
        if let Some(access) = &self.access {
            access.write();
        }
    }
}

/// What a client receives as a response body.
pub enum ProxyBody {
    /// Streamed from a backend.
    Upstream(UpstreamBody),
    /// Generated by Fulcrum (error pages); `None` once sent.
    Full(Option<Bytes>),
}

impl ProxyBody {
    /// A body with fixed content.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        ProxyBody::Full(Some(bytes.into()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream(body) => {
                let inner = &mut body.inner;
                let polled = match &mut body.sender {
                    // A driven connection reads the body only when polled.
                    Some(UpstreamSender::Driven(driven)) => {
                        driven.drive(cx, |cx| Pin::new(&mut *inner).poll_frame(cx))
                    }
                    _ => Pin::new(inner).poll_frame(cx),
                };
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let (Some(access), Some(data)) = (body.access.as_mut(), frame.data_ref())
                        {
                            access.bytes += data.len() as u64;
                        }
                    }
                    Poll::Ready(None) => body.release_connection(),
                    Poll::Ready(Some(Err(error))) => {
                        body.sender = None;
                        body.guard.backend().record_failure(None);
                        tracing::warn!(backend = %body.guard.backend().address, %error, "backend response body failed mid-stream");
                    }
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Upstream(body) => body.inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(bytes)) => SizeHint::with_exact(bytes.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            ProxyBody::Upstream(body) => body.inner.size_hint(),
        }
    }
}
