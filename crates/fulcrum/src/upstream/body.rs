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
