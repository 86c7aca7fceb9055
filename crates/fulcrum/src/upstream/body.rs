//! The body Fulcrum sends to a backend, and the watch that tells a client connection when its
//! request body has been read (an HTTP/1 connection is busy until then).

use std::pin::Pin;
use std::sync::Weak;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

/// The body Fulcrum sends to a backend: the client's body streamed through, or nothing (a
/// retried request, whose body was empty).
#[derive(Debug)]
pub enum RequestBody {
    /// The client's body, streamed.
    Client(Incoming),
    /// The client's body, streamed, its end reported to its connection (boxed: rare, and the
    /// other variants stay small).
    Watched(Box<WatchedBody>),
    /// The client's body of unknown length (chunked, or HTTP/2 without `content-length`),
    /// counted against the listener's `max_body_bytes` (boxed: rare, and the other variants
    /// stay small). Past the limit it ends with [`BodyTooLarge`], which aborts the backend's
    /// request.
    Limited(Box<LimitedBody>),
    /// No body.
    Empty,
}

/// The error ending a [`RequestBody`]: the client's (hyper's), or [`BodyTooLarge`].
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// A client request body grew past the listener's `max_body_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyTooLarge;

impl std::fmt::Display for BodyTooLarge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body larger than max_body_bytes")
    }
}

impl std::error::Error for BodyTooLarge {}

/// A client body counted against a limit (see [`RequestBody::Limited`]).
#[derive(Debug)]
pub struct LimitedBody {
    body: RequestBody,
    /// Bytes the body may still carry.
    remaining: u64,
}

impl RequestBody {
    /// The client's `body`, watched by `watch`.
    pub(crate) fn watched(body: Incoming, watch: BodyWatch) -> Self {
        RequestBody::Watched(Box::new(WatchedBody { body, watch }))
    }

    /// `self` (a client's body), ended with [`BodyTooLarge`] once it carries more than
    /// `limit` bytes.
    pub(crate) fn limited(self, limit: u64) -> Self {
        RequestBody::Limited(Box::new(LimitedBody {
            body: self,
            remaining: limit,
        }))
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = match self.get_mut() {
            RequestBody::Client(body) => Pin::new(body).poll_frame(cx),
            RequestBody::Watched(watched) => watched.poll_frame(cx),
            RequestBody::Limited(limited) => return limited.poll_frame(cx),
            RequestBody::Empty => return Poll::Ready(None),
        };
        // Boxed on the error path only.
        polled.map(|frame| frame.map(|frame| frame.map_err(BodyError::from)))
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Client(body) => body.is_end_stream(),
            RequestBody::Watched(watched) => watched.body.is_end_stream(),
            RequestBody::Limited(limited) => limited.body.is_end_stream(),
            RequestBody::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Client(body) => body.size_hint(),
            RequestBody::Watched(watched) => watched.body.size_hint(),
            RequestBody::Limited(limited) => limited.body.size_hint(),
            RequestBody::Empty => SizeHint::with_exact(0),
        }
    }
}

/// Told when a client request body is done (see `listener::park`: an HTTP/1 connection is busy
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

impl std::fmt::Debug for BodyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BodyWatch")
            .field("request", &self.request)
            .finish_non_exhaustive()
    }
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
#[derive(Debug)]
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

impl LimitedBody {
    fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                let len = data.len() as u64;
                if len > self.remaining {
                    // Not forwarded: the backend's request ends with this error (aborted).
                    self.remaining = 0;
                    return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                }
                self.remaining -= len;
            }
        }
        polled
    }
}
