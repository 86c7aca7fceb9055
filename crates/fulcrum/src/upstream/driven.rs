//! HTTP/1.1 upstream connections driven by the task of the request that uses them.
//!
//! A hyper client connection is a future that must be polled to write requests and read
//! responses. Spawned in a task of its own, every request costs cross-task wake-ups (request
//! in, response head out, body frames out). A [`Driven`] connection is instead polled by the
//! request's own task: together with the response future while the head is awaited
//! ([`Driven::send`]), then before each read of the response body (see `ProxyBody`). Once the
//! body has ended and the connection is idle and ready, sender and connection go back to the
//! pool together. Idle pooled connections are polled once a second by their pool's
//! housekeeping ([`Driven::check_idle`]), so a backend closing one is noticed then; one it
//! closes in between is noticed at its next use, where the request comes back unsent and is
//! retried on a new connection.
//! hyper's channels between sender, connection and body still wake "the other side", which
//! is now the same task: a relay waker turns those wakes into an immediate re-poll instead of
//! a reschedule of the whole client connection.
//!
//! Anything that cannot finish inline [`Driven::detach`]es the connection into a task of its
//! own, the classic way: a request whose body still streams once the response head is in (the
//! upload must not wait for the client to read the response), a response that ended before
//! the request body was sent, health checks reading bodies on their own.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;

use http::{Request, Response};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use tokio::time::{Instant, Sleep};

use crate::upstream::body::RequestBody;
use crate::upstream::{ConnectionStats, UpstreamSender};

/// A hyper connection future, made to log its error and keep its backend's `open` counter
/// while it lives; run either by [`Driven`] or in a task of its own.
pub type ConnectionTask = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Counts one open connection in its backend's stats until dropped.
struct OpenConnection(Arc<ConnectionStats>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Wraps hyper's `connection` future: its error is logged (debug), and `stats` (when given)
/// count it as opened, and as open until it ends or is dropped.
pub fn track<F>(
    connection: F,
    address: SocketAddr,
    stats: Option<&Arc<ConnectionStats>>,
) -> ConnectionTask
where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    let open = stats.map(|stats| {
        stats.open.fetch_add(1, Ordering::Relaxed);
        stats.opened.fetch_add(1, Ordering::Relaxed);
        OpenConnection(stats.clone())
    });
    Box::pin(async move {
        let _open = open;
        if let Err(error) = connection.await {
            tracing::debug!(backend = %address, %error, "upstream connection ended with an error");
        }
    })
}

/// Runs `connection` in a task of its own (dropped, which closes it, outside a runtime).
pub fn spawn(connection: ConnectionTask) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(connection);
    }
}

/// Most rounds of polling one `drive` call does before yielding to the runtime.
const MAX_ROUNDS: usize = 8;

/// The waker a driven connection is polled with. Wakes that happen while the task polls
/// the connection itself (hyper's channels between the connection and its sender or body
/// wake "the other side", here the very same task) are only noted, and answered by polling
/// again at once, instead of rescheduling the whole client connection's task. Other wakes
/// (socket readiness) go to the task that polled last.
struct Relay {
    /// `POLLING` while the task polls the connection, `WOKEN` once woken meanwhile.
    state: AtomicU8,
    task: AtomicWaker,
}

const POLLING: u8 = 1;
const WOKEN: u8 = 2;

impl Wake for Relay {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.state.fetch_or(WOKEN, Ordering::AcqRel) & POLLING == 0 {
            self.task.wake();
        }
    }
}

/// The connection future of a [`Driven`] connection and the waker it is polled with.
struct Engine {
    /// `None` once the connection ended (dropping it fails a request still queued on it,
    /// which hyper hands back as unsent) or was detached.
    connection: Option<ConnectionTask>,
    relay: Arc<Relay>,
    waker: Waker,
}

impl Engine {
    /// Polls `inner` (which only the connection makes progress), polling the connection
    /// whenever `inner` is not ready, until `inner` is ready or nothing is left to do.
    /// `connection_first` skips the first look at `inner` when it cannot be ready yet.
    fn drive<T>(
        &mut self,
        cx: &mut Context<'_>,
        mut connection_first: bool,
        mut inner: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        let Some(connection) = self.connection.as_mut() else {
            return inner(cx);
        };
        let mut relayed = Context::from_waker(&self.waker);
        for _ in 0..MAX_ROUNDS {
            self.relay.state.store(POLLING, Ordering::Release);
            if !std::mem::take(&mut connection_first) {
                if let Poll::Ready(value) = inner(&mut relayed) {
                    // The caller polls again when it wants more: nothing to wake it for.
                    self.relay.state.store(0, Ordering::Release);
                    return Poll::Ready(value);
                }
            }
            // The connection, polled now, sees whatever woke it so far.
            self.relay.state.store(POLLING, Ordering::Release);
            if connection.as_mut().poll(&mut relayed).is_ready() {
                self.connection = None;
                self.relay.state.store(0, Ordering::Release);
                return inner(cx);
            }
            if let Poll::Ready(value) = inner(&mut relayed) {
                self.relay.state.store(0, Ordering::Release);
                return Poll::Ready(value);
            }
            // Pending: wakes from now on go to this task. (Registered only now: a `Ready`
            // needs no waker, and a wake before this point is seen by the swap below.)
            self.relay.task.register(cx.waker());
            if self.relay.state.swap(0, Ordering::AcqRel) & WOKEN == 0 {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Whether `deadline` passed, on `timer` (made on first use, moved on to `deadline` when
    /// it fired at an earlier one).
    fn poll_timer(
        &mut self,
        cx: &mut Context<'_>,
        timer: &mut Option<Pin<Box<Sleep>>>,
        deadline: Instant,
    ) -> Poll<()> {
        // Through the relay (whose task `drive` registered when it returned `Pending`), so
        // that the timer firing while the connection is idle in the pool wakes nobody.
        let waker = if self.connection.is_some() {
            &self.waker
        } else {
            cx.waker()
        };
        let cx = &mut Context::from_waker(waker);
        let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.deadline() > deadline {
            sleep.as_mut().reset(deadline);
        }
        loop {
            std::task::ready!(sleep.as_mut().poll(cx));
            if sleep.deadline() >= deadline {
                return Poll::Ready(());
            }
            sleep.as_mut().reset(deadline);
        }
    }

    /// Hands the connection to a task of its own.
    fn detach(&mut self) {
        if let Some(connection) = self.connection.take() {
            spawn(connection);
        }
        self.relay.task.take();
    }
}

/// The response head did not arrive before the deadline.
#[derive(Debug)]
pub struct TimedOut;

/// An HTTP/1.1 connection with its sender, polled by whoever uses it (until detached).
pub struct Driven {
    sender: http1::SendRequest<RequestBody>,
    engine: Engine,
    /// The connection runs in a task of its own now.
    detached: bool,
    /// The response timeout's timer, kept with the connection: registering and cancelling a
    /// timer for every request costs more than the rest of the timeout. It stays armed at an
    /// earlier request's deadline (never later than the current one) and is moved on to the
    /// current deadline only when it fires before it.
    timer: Option<Pin<Box<Sleep>>>,
}

impl std::fmt::Debug for Driven {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driven")
            .field("detached", &self.detached)
            .finish_non_exhaustive()
    }
}

impl Driven {
    /// Pairs a sender with its (not yet polled) connection.
    pub fn new(sender: http1::SendRequest<RequestBody>, connection: ConnectionTask) -> Self {
        let relay = Arc::new(Relay {
            state: AtomicU8::new(0),
            task: AtomicWaker::new(),
        });
        Driven {
            sender,
            engine: Engine {
                connection: Some(connection),
                waker: Waker::from(relay.clone()),
                relay,
            },
            detached: false,
            timer: None,
        }
    }

    /// Polls `inner`, a response body that only this connection fills, driving the
    /// connection as needed.
    pub fn drive<T>(
        &mut self,
        cx: &mut Context<'_>,
        inner: impl FnMut(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.engine.drive(cx, false, inner)
    }

    /// Sends `request` and drives the connection until the response head arrived. On
    /// failure, gives the request back when it was provably not sent. A request whose body
    /// still streams detaches the connection once the head is in, so the upload goes on
    /// however fast the client reads the response.
    pub async fn send(
        &mut self,
        request: Request<RequestBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<RequestBody>>> {
        match self.send_until(request, None).await {
            Ok(result) => result,
            Err(TimedOut) => unreachable!("no deadline, no timeout"),
        }
    }

    /// [`send`](Self::send), failing with [`TimedOut`] when the response head is not in
    /// `timeout` after `sent_ns` (a [`crate::runtime::clock::now_ns`] reading).
    pub async fn send_within(
        &mut self,
        request: Request<RequestBody>,
        timeout: Duration,
        sent_ns: u64,
    ) -> Result<Result<Response<Incoming>, TrySendError<Request<RequestBody>>>, TimedOut> {
        let deadline = Instant::from_std(crate::runtime::clock::instant_at(sent_ns)) + timeout;
        self.send_until(request, Some(deadline)).await
    }

    async fn send_until(
        &mut self,
        request: Request<RequestBody>,
        deadline: Option<Instant>,
    ) -> Result<Result<Response<Incoming>, TrySendError<Request<RequestBody>>>, TimedOut> {
        let uploads = !request.body().is_end_stream();
        let mut response = pin!(self.sender.try_send_request(request));
        let (engine, timer) = (&mut self.engine, &mut self.timer);
        let mut first = true;
        let result = poll_fn(|cx| {
            // The response cannot be in before the connection wrote the request.
            let first = std::mem::take(&mut first);
            if let Poll::Ready(result) = engine.drive(cx, first, |cx| response.as_mut().poll(cx)) {
                return Poll::Ready(Ok(result));
            }
            match deadline {
                Some(deadline) => engine
                    .poll_timer(cx, timer, deadline)
                    .map(|()| Err(TimedOut)),
                None => Poll::Pending,
            }
        })
        .await;
        if uploads && matches!(result, Ok(Ok(_))) {
            self.detach();
        }
        result
    }

    /// Whether the connection ended or is closing.
    pub fn is_closed(&self) -> bool {
        (self.engine.connection.is_none() && !self.detached) || self.sender.is_closed()
    }

    /// Polls an idle connection once, with no task to wake, so that a backend that closed
    /// it is noticed now (the connection ends and can be dropped) rather than at its next use.
    /// `false` when the connection ended.
    pub fn check_idle(&mut self) -> bool {
        if self.is_closed() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let (engine, sender) = (&mut self.engine, &mut self.sender);
        let _ = engine.drive(&mut cx, true, |cx| sender.poll_ready(cx));
        !self.is_closed()
    }

    /// Whether a request can be sent now (the previous exchange is complete).
    pub fn is_ready(&self) -> bool {
        (self.engine.connection.is_some() || self.detached) && self.sender.is_ready()
    }

    /// Waits until a request can be sent; `false` when the connection ended instead.
    pub async fn ready(&mut self) -> bool {
        if self.is_ready() {
            return true;
        }
        if self.is_closed() {
            return false;
        }
        let (engine, sender) = (&mut self.engine, &mut self.sender);
        poll_fn(|cx| engine.drive(cx, false, |cx| sender.poll_ready(cx)))
            .await
            .is_ok()
    }

    /// Makes a connection whose response has ended ready for the next request (polling it
    /// once more if needed) and forgets the task that used it. `false` when it is still
    /// busy (e.g. still sending the request body) or ended.
    pub fn settle(&mut self) -> bool {
        if !self.is_ready() && !self.detached {
            let sender = &mut self.sender;
            let mut noop = Context::from_waker(Waker::noop());
            let _ = self
                .engine
                .drive(&mut noop, true, |cx| sender.poll_ready(cx));
        }
        self.engine.relay.task.take();
        self.is_ready()
    }

    /// Hands the connection to a task of its own, for good.
    pub fn detach(&mut self) {
        if !self.detached {
            self.engine.detach();
            self.detached = true;
        }
    }

    /// The sender, its connection running in a task of its own.
    pub fn into_detached(mut self) -> http1::SendRequest<RequestBody> {
        self.detach();
        self.sender
    }
}

impl UpstreamSender {
    /// Waits until an idle connection can take a request; `false` when it was closed meanwhile.
    pub async fn ready(&mut self) -> bool {
        match self {
            UpstreamSender::Http1(sender) => sender.ready().await.is_ok(),
            UpstreamSender::Driven(driven) => driven.ready().await,
            UpstreamSender::Http2(sender, _) => sender.ready().await.is_ok(),
        }
    }

    /// The same connection, running in a task of its own if it was driven (for users that
    /// do not poll it, like health checks reading a body).
    pub fn detached(self) -> Self {
        match self {
            UpstreamSender::Driven(driven) => UpstreamSender::Http1((*driven).into_detached()),
            other => other,
        }
    }

    /// A connection whose response body ended, ready to be pooled: a driven one that cannot
    /// be made ready at once (still sending the request body) is detached and finishes in
    /// the background.
    pub fn settled(self) -> Self {
        match self {
            UpstreamSender::Driven(mut driven) => {
                if driven.settle() {
                    UpstreamSender::Driven(driven)
                } else {
                    UpstreamSender::Http1((*driven).into_detached())
                }
            }
            other => other,
        }
    }
}
