//! Client connections of HTTP listeners (`http` and `https`) that hold almost no memory while
//! idle.
//!
//! hyper keeps an HTTP/1 connection's buffers (8 KiB to write, 8 KiB read), its boxed service
//! future and its dispatcher for the connection's whole life, idle or not; and its
//! `header_read_timeout` also runs while a keep-alive connection waits for its next request.
//! So an HTTP/1.1 connection here is served in rounds: a hyper connection serves requests until
//! the client has been silent for a tick (`park_after`, at most a third of
//! `header_read_timeout`) with no request in flight; it is then closed gracefully without
//! closing the stream, and taken apart (`into_parts`) to get the stream and any unparsed bytes
//! back. The connection is *parked*: a plain TCP socket moves (on Linux) to the listener's
//! parking lot (`lot.rs`: the socket leaves tokio for a private epoll set and the task ends);
//! otherwise the task holds the stream alone. When the client sends again (within
//! `keep_alive_timeout`), a new round starts with its bytes; hyper's header timer thus only
//! runs once a request has begun. The stream is a [`ParkStream`]: the TCP socket, or on
//! `https` listeners the TLS stream (the handshake runs here first, bounded by
//! `handshake_timeout`; rustls keeps its own state, hyper's is freed all the same).
//!
//! A request counts as in flight until its service future is done *and* its body has been
//! read to its end or dropped: a backend may answer before the client has sent the whole
//! body, and the rest of the body must never be read as the next request. A body dropped
//! before its end is not drained: hyper reads what has already arrived and otherwise closes
//! the connection after the response; such a connection never parks (see [`Ctx::body_done`]).
//!
//! HTTP/2 connections (prior knowledge on TCP, ALPN `h2` on TLS) are served by hyper's auto
//! builder and never park. The server's graceful shutdown reaches every connection through a watch
//! channel: a parked one closes at once, a served one (at its next tick) finishes its
//! requests first.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use super::ConnectionSlot;
use crate::config::ListenerConfig;
use crate::listener::tls::TlsListener;
use crate::proxy::http::HttpProxy;
use crate::upstream::body::{BodyWatch, BodyWatcher};

/// What an HTTP/2 client with prior knowledge sends first.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long closing a parked connection may wait for its socket (a TLS `close_notify`).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a connection accepted just before a drain may take to send its first bytes.
const DRAIN_FIRST_BYTES: Duration = Duration::from_secs(1);

/// The shortest park tick, whatever the config says.
const MIN_TICK: Duration = Duration::from_millis(10);

/// hyper's default number of header lines its HTTP/1 parser takes (on the stack).
const HYPER_MAX_HEADERS: usize = 100;

/// The `max_headers` to set on an HTTP/1 builder for `max_header_count` (hyper's parser then
/// answers 431, and closes, for a head with more lines, exactly); `None` when it is hyper's
/// default: setting any value makes hyper size its parse buffers at run time, and above 100
/// allocate them per request.
pub(crate) fn max_headers(count: usize) -> Option<usize> {
    (count != HYPER_MAX_HEADERS).then_some(count)
}

/// How one listener serves its plain-TCP HTTP connections.
pub(crate) struct ParkSettings {
    http1: http1::Builder,
    /// For HTTP/2 with prior knowledge.
    auto: Arc<auto::Builder<TokioExecutor>>,
    header_read_timeout: Duration,
    keep_alive_timeout: Duration,
    /// A connection parks at the first tick after a full tick without traffic.
    tick: Duration,
    /// Where parked connections wait, once [`ParkSettings::start_lot`] ran.
    #[cfg(target_os = "linux")]
    lot: std::sync::OnceLock<super::lot::Lot<Arc<Ctx>>>,
    /// TLS termination, on `https` listeners.
    tls: Option<Arc<TlsListener>>,
    /// Turns true when the listener's `shutdown_timeout` has passed after a drain: every
    /// connection still served closes at once (at its next tick), in-flight requests or not.
    closing: watch::Sender<bool>,
}

impl ParkSettings {
    /// The settings of `config`'s listener; `auto` serves its HTTP/2 connections.
    pub(crate) fn new(config: &ListenerConfig, auto: Arc<auto::Builder<TokioExecutor>>) -> Self {
        let mut http1 = http1::Builder::new();
        http1
            .timer(TokioTimer::new())
            .header_read_timeout(config.header_read_timeout.0)
            .max_buf_size(config.max_header_bytes)
            // Exact: a complete head one byte over is 431 too, however few reads it took.
            .max_header_size(config.max_header_bytes)
            .keep_alive(true);
        if let Some(count) = max_headers(config.max_header_count) {
            http1.max_headers(count);
        }
        let header_read_timeout = config.header_read_timeout.0;
        // hyper's header timer also runs between requests: park (at most two ticks after the
        // last traffic) before it closes the connection.
        let tick = config
            .park_after
            .0
            .min(header_read_timeout / 3)
            .max(MIN_TICK);
        ParkSettings {
            http1,
            auto,
            header_read_timeout,
            keep_alive_timeout: config.keep_alive_timeout.0,
            tick,
            #[cfg(target_os = "linux")]
            lot: std::sync::OnceLock::new(),
            tls: None,
            closing: watch::Sender::new(false),
        }
    }

    /// Closes every connection of this listener still served (the drain took longer than
    /// `shutdown_timeout`): HTTP/1 rounds at their next tick, HTTP/2 connections at once.
    pub(crate) fn close_all(&self) {
        self.closing.send_replace(true);
    }

    /// Serves an HTTP/2 connection (prior knowledge, or ALPN `h2`) with this listener's
    /// builder and timeouts.
    async fn serve_http2<S>(
        &self,
        stream: S,
        client: SocketAddr,
        proxy: Arc<HttpProxy>,
        slot: Arc<ConnectionSlot>,
        drain: &mut watch::Receiver<()>,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let timeouts = super::h2::Timeouts {
            handshake: self.header_read_timeout,
            idle: self.keep_alive_timeout,
            closing: self.closing.subscribe(),
        };
        super::h2::serve(&self.auto, timeouts, stream, client, proxy, slot, drain).await;
    }

    /// Connections start with a TLS handshake on `tls` (an `https` listener), if given.
    pub(crate) fn with_tls(mut self, tls: Option<Arc<TlsListener>>) -> Self {
        self.tls = tls;
        self
    }

    /// Opens the parking lot of these settings' listener on the current runtime (the worker's)
    /// and serves it until `drain` changes: connections parked there resume in new tasks. Without
    /// it (or off Linux) a parked connection waits in its own task.
    /// `gauge` counts the connections parked in it.
    pub(crate) fn start_lot(
        self: &Arc<Self>,
        drain: watch::Receiver<()>,
        gauge: Arc<std::sync::atomic::AtomicU64>,
    ) {
        #[cfg(target_os = "linux")]
        {
            let lot = match super::lot::Lot::new(self.keep_alive_timeout, gauge) {
                Ok(lot) => lot,
                Err(error) => {
                    tracing::warn!(%error, "no parking lot: idle connections wait in their own tasks");
                    return;
                }
            };
            if self.lot.set(lot).is_err() {
                return;
            }
            let settings = self.clone();
            tokio::spawn(async move {
                let mut drain = drain;
                let resume_drain = drain.clone();
                let Some(lot) = settings.lot.get() else {
                    return;
                };
                lot.run(&mut drain, |stream, ctx| {
                    let (settings, drain) = (settings.clone(), resume_drain.clone());
                    tokio::spawn(async move {
                        serve_http1(&settings, stream, Bytes::new(), ctx, drain).await;
                    });
                })
                .await;
            });
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (drain, gauge);
    }
}

/// A client connection's byte stream: plain TCP, or TLS over TCP.
trait ParkStream: AsyncRead + AsyncWrite + Unpin + Send + Sized + 'static {
    /// Waits for the client's next bytes while the connection is parked. Returns the bytes
    /// it had to take from the stream (served first in the next round), or `None` when the
    /// client closed or the stream failed.
    fn next_bytes(&mut self) -> impl std::future::Future<Output = Option<Bytes>> + Send;

    /// Parks the idle connection in the listener's parking lot, when this kind of stream can
    /// wait there: `Ok` once the lot has it (it resumes the connection in a new task), `Err`
    /// gives both back to wait in this task.
    fn into_lot(self, _settings: &ParkSettings, ctx: Arc<Ctx>) -> Result<(), (Self, Arc<Ctx>)> {
        Err((self, ctx))
    }
}

impl ParkStream for TcpStream {
    /// Peeks: the bytes stay in the socket.
    async fn next_bytes(&mut self) -> Option<Bytes> {
        let mut probe = [0u8; 1];
        match self.peek(&mut probe).await {
            Ok(n) if n > 0 => Some(Bytes::new()),
            _ => None,
        }
    }

    /// A plain socket leaves tokio for the lot's epoll set (Linux).
    fn into_lot(self, settings: &ParkSettings, ctx: Arc<Ctx>) -> Result<(), (Self, Arc<Ctx>)> {
        #[cfg(target_os = "linux")]
        if let Some(lot) = settings.lot.get() {
            return lot.park(self, ctx);
        }
        let _ = settings;
        Err((self, ctx))
    }
}

impl ParkStream for TlsStream<TcpStream> {
    /// Reads: TLS records must be decrypted to tell data from alerts (a `close_notify`
    /// ends the connection). The rest of a record stays in rustls' plaintext buffer.
    async fn next_bytes(&mut self) -> Option<Bytes> {
        let mut first = [0u8; 256];
        match self.read(&mut first).await {
            Ok(n) if n > 0 => Some(Bytes::copy_from_slice(&first[..n])),
            _ => None,
        }
    }
}

/// Serves one client connection (already accepted, PROXY header already read) until it
/// closes, times out, or the server shuts down (`drain` changes or is dropped).
pub(crate) async fn serve(
    settings: Arc<ParkSettings>,
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    slot: Arc<ConnectionSlot>,
    mut drain: watch::Receiver<()>,
) {
    let _ = stream.set_nodelay(true);
    if let Some(tls) = settings.tls.clone() {
        // Boxed: plain connections' tasks do not carry the TLS state.
        Box::pin(serve_tls(settings, tls, stream, client, proxy, slot, drain)).await;
        return;
    }
    match first_bytes(&stream, settings.header_read_timeout, &mut drain).await {
        First::Closed => return,
        First::Http2 => {
            // Boxed, like the rounds below: a parked connection's task stays small.
            Box::pin(settings.serve_http2(stream, client, proxy, slot, &mut drain)).await;
            return;
        }
        First::Http1 => {}
    }
    serve_http1(
        &settings,
        stream,
        Bytes::new(),
        Ctx::new(proxy, client, slot),
        drain,
    )
    .await;
}

/// Serves a connection of an `https` listener: the TLS handshake (bounded by the listener's
/// `handshake_timeout`), then HTTP/2 if ALPN chose it, else HTTP/1.1 in rounds that park.
async fn serve_tls(
    settings: Arc<ParkSettings>,
    tls: Arc<TlsListener>,
    stream: TcpStream,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    slot: Arc<ConnectionSlot>,
    mut drain: watch::Receiver<()>,
) {
    // Not cut short by a drain: the client is waiting for its first answer (the handshake
    // is bounded by `handshake_timeout`).
    let Some(stream) = tls.handshake(stream, client).await else {
        return;
    };
    if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
        settings
            .serve_http2(stream, client, proxy, slot, &mut drain)
            .await;
        return;
    }
    // hyper's header timer bounds the first request from here.
    serve_http1(
        &settings,
        stream,
        Bytes::new(),
        Ctx::new(proxy, client, slot),
        drain,
    )
    .await;
}

/// Serves an HTTP/1 connection in rounds until it closes; `leftover` holds bytes already
/// taken from `stream`.
async fn serve_http1<S: ParkStream>(
    settings: &ParkSettings,
    mut stream: S,
    mut leftover: Bytes,
    mut ctx: Arc<Ctx>,
    mut drain: watch::Receiver<()>,
) {
    loop {
        let io = ParkIo {
            stream,
            leftover,
            ctx: ctx.clone(),
        };
        // Boxed: the round's state (hyper's connection) is only allocated while it runs.
        let Some((back, rest)) = Box::pin(serve_round(settings, io, &ctx, &mut drain)).await else {
            return;
        };
        stream = back;
        leftover = rest;
        if !leftover.is_empty() {
            // Part of the next request head: hyper reads the rest (within its header timer).
            continue;
        }
        // Parked: in the lot (plain TCP on Linux: this task ends), or here, holding only the
        // stream until the client sends again.
        tracing::trace!(client = %ctx.client, "idle connection parked");
        crate::runtime::memory::connection_parked();
        (stream, ctx) = match stream.into_lot(settings, ctx) {
            Ok(()) => return,
            Err(back) => back,
        };
        tokio::select! {
            biased;
            _ = drain.changed() => {}
            next = tokio::time::timeout(settings.keep_alive_timeout, stream.next_bytes()) => {
                if let Ok(Some(bytes)) = next {
                    leftover = bytes;
                    continue;
                }
                // The client closed, the stream failed, or keep_alive_timeout passed.
            }
        }
        // Closed without waiting: only a TLS close_notify (or a TCP FIN) is to be sent.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, stream.shutdown()).await;
        return;
    }
}

/// What a new connection starts with.
enum First {
    /// Nothing within `header_read_timeout`, EOF, an error, or the server is shutting down.
    Closed,
    /// An HTTP/1 request.
    Http1,
    /// The HTTP/2 connection preface.
    Http2,
}

/// Waits (up to `timeout`) for the client's first bytes and tells HTTP/2 prior knowledge from
/// HTTP/1, without consuming anything.
async fn first_bytes(
    stream: &TcpStream,
    timeout: Duration,
    drain: &mut watch::Receiver<()>,
) -> First {
    let detect = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            let n = match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return First::Closed,
                Ok(n) => n,
            };
            if buf[..n] != H2_PREFACE[..n] {
                return First::Http1;
            }
            if n == H2_PREFACE.len() {
                return First::Http2;
            }
            // A strict prefix of the preface: peek would return it again at once, so wait a
            // little for the rest (rare: only HTTP/2 clients start with "PRI").
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut detect = std::pin::pin!(tokio::time::timeout_at(deadline, detect));
    tokio::select! {
        biased;
        first = &mut detect => first.unwrap_or(First::Closed),
        // A connection accepted before the drain still gets its first request served if it
        // comes soon; one that stays silent is closed.
        _ = drain.changed() => tokio::time::timeout(DRAIN_FIRST_BYTES, detect)
            .await
            .map_or(First::Closed, |first| first.unwrap_or(First::Closed)),
    }
}

/// One hyper HTTP/1 connection over `io`, until it ends (`None`: the connection is over,
/// closed or upgraded) or parks (`Some`: the socket and the bytes read but not parsed).
async fn serve_round<S: ParkStream>(
    settings: &ParkSettings,
    io: ParkIo<S>,
    ctx: &Arc<Ctx>,
    drain: &mut watch::Receiver<()>,
) -> Option<(S, Bytes)> {
    let state = &ctx.state;
    state.parking.store(false, Relaxed);
    state.active.store(false, Relaxed);
    let round_start = state.started.load(Relaxed);
    let mut connection = settings
        .http1
        .serve_connection(TokioIo::new(io), service(ctx.clone()))
        .with_upgrades();
    let mut ticks = crate::runtime::tick::Ticker::new(settings.tick);
    let mut draining = false;
    let mut parking = false;
    let result = loop {
        tokio::select! {
            biased;
            result = &mut connection => break result,
            _ = ticks.tick() => {
                // The server's shutdown is noticed at a tick: polling the shared channel on
                // every wake-up of every connection would take its lock on the hot path.
                if *settings.closing.borrow() {
                    // The drain outlasted `shutdown_timeout`: close, whatever is in flight.
                    return None;
                }
                // A round that has not started a request yet was opened by the client's
                // bytes (a new connection, or one resumed from the lot): its request is
                // served before the drain closes it (hyper's header timer bounds the wait).
                if !draining
                    && drain.has_changed().unwrap_or(true)
                    && state.started.load(Relaxed) != round_start
                {
                    // Finish what is in flight, then really close.
                    draining = true;
                    state.parking.store(false, Relaxed);
                    Pin::new(&mut connection).graceful_shutdown();
                }
                if draining || parking {
                    continue;
                }
                let active = state.active.swap(false, Relaxed);
                let started = state.started.load(Relaxed);
                // A round parks only once it has served a request: hyper then is idle
                // between requests and closes at once (a fresh hyper connection would
                // instead answer its first request with `Connection: close`). Not while a
                // request body is still open: its unread bytes come before the next request.
                if !active
                    && started != round_start
                    && started == state.finished.load(Relaxed)
                    && state.open_bodies.load(Relaxed) == 0
                {
                    if state.unread.load(Relaxed) {
                        // hyper may have drained the rest of the body, or will close: which
                        // one cannot be told from here, so the connection closes for real.
                        draining = true;
                    } else {
                        parking = true;
                        state.parking.store(true, Relaxed);
                    }
                    Pin::new(&mut connection).graceful_shutdown();
                }
            }
        }
    };
    if let Err(error) = result {
        ctx.proxy
            .limits
            .head_refused(&error, ctx.client, &ctx.proxy.listener);
        tracing::debug!(client = %ctx.client, %error, "client connection ended with an error");
        return None;
    }
    if !state.parking.load(Relaxed) {
        return None;
    }
    let parts = connection.into_parts()?;
    let io = parts.io.into_inner();
    // Copied out: `read_buf` shares hyper's whole read buffer (8 KiB or more), even empty.
    let rest = if parts.read_buf.is_empty() && io.leftover.is_empty() {
        Bytes::new()
    } else {
        let mut rest = BytesMut::with_capacity(parts.read_buf.len() + io.leftover.len());
        rest.extend_from_slice(&parts.read_buf);
        rest.extend_from_slice(&io.leftover);
        rest.freeze()
    };
    Some((io.stream, rest))
}

/// What one HTTP/1 client connection shares between its rounds, its service and its socket.
struct Ctx {
    proxy: Arc<HttpProxy>,
    client: SocketAddr,
    /// `client`'s address as a header value, made once per connection.
    client_ip: http::HeaderValue,
    slot: Arc<ConnectionSlot>,
    state: ConnState,
}

impl Ctx {
    fn new(proxy: Arc<HttpProxy>, client: SocketAddr, slot: Arc<ConnectionSlot>) -> Arc<Ctx> {
        Arc::new(Ctx {
            proxy,
            client,
            client_ip: crate::proxy::headers::client_ip_value(client.ip()),
            slot,
            state: ConnState::default(),
        })
    }
}

/// Activity of one connection. One task touches it (hyper's connection, its service futures
/// and its IO are all polled by the connection's task): loads and stores are enough.
#[derive(Default)]
struct ConnState {
    /// Bytes read or written since the last tick.
    active: AtomicBool,
    /// A park is under way: hyper's closing of the socket is skipped.
    parking: AtomicBool,
    /// Requests whose service began (wrapping).
    started: AtomicU32,
    /// Requests whose service future completed or was dropped (wrapping).
    finished: AtomicU32,
    /// Request bodies neither read to their end nor dropped yet.
    open_bodies: AtomicU32,
    /// The latest request's body was dropped before its end (see [`Ctx::body_done`]).
    unread: AtomicBool,
}

impl Ctx {
    /// Counts a request whose service begins, and watches its `body` unless it is empty.
    /// Not inlined: kept out of hyper's `recv_msg`, the service future is built in place
    /// (callgrind: 400 instructions per request less).
    #[inline(never)]
    fn start_request(self: &Arc<Ctx>, body: &hyper::body::Incoming) -> Option<BodyWatch> {
        let state = &self.state;
        let n = state.started.load(Relaxed);
        state.started.store(n.wrapping_add(1), Relaxed);
        // hyper parsed this request, so it read the previous body to its end.
        state.unread.store(false, Relaxed);
        if body.is_end_stream() {
            return None;
        }
        let open = state.open_bodies.load(Relaxed);
        state.open_bodies.store(open.wrapping_add(1), Relaxed);
        let watcher: std::sync::Weak<Ctx> = Arc::downgrade(self);
        Some(BodyWatch::new(watcher, n))
    }
}

impl BodyWatcher for Ctx {
    /// A body dropped before its end: hyper reads what has already arrived of the rest and,
    /// if that does not finish it, closes the connection once the response is written
    /// (`poll_drain_or_close_read`). It never waits for more of an unread body, and neither
    /// does Fulcrum (a backend that refused an upload must not make it read the upload): such
    /// a connection closes, at once or at its next quiet tick, and never parks. A later
    /// request on the connection means hyper did drain the body: its flag is stale.
    fn body_done(&self, request: u32, read_to_end: bool) {
        let state = &self.state;
        let open = state.open_bodies.load(Relaxed);
        state.open_bodies.store(open.wrapping_sub(1), Relaxed);
        if !read_to_end && state.started.load(Relaxed) == request.wrapping_add(1) {
            state.unread.store(true, Relaxed);
        }
    }
}

/// Counts a request as finished when its service future completes or is dropped.
struct Finished<'a>(&'a ConnState);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        let n = self.0.finished.load(Relaxed);
        self.0.finished.store(n.wrapping_add(1), Relaxed);
    }
}

/// The connection's hyper service: every request goes to the proxy (an upgrade request with
/// the connection's slot), counted. Written out rather than wrapping a plain service: a wrapper
/// future costs one more copy of the ~4 KB request future per request (callgrind: +1 000
/// instructions per request).
fn service(
    ctx: Arc<Ctx>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<crate::proxy::body::ProxyBody>,
    Error = std::convert::Infallible,
    Future: Send + 'static,
> + Send
       + 'static {
    service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        super::attach_client_slot(&mut request, &ctx.slot);
        let ctx = ctx.clone();
        let watch = ctx.start_request(request.body());
        async move {
            let _finished = Finished(&ctx.state);
            ctx.proxy
                .handle_watched(request, ctx.client, ctx.client_ip.clone(), watch)
                .await
        }
    })
}

/// The stream as hyper sees it: bytes left from the previous round first, activity recorded,
/// and no shutdown while the connection parks.
struct ParkIo<S> {
    stream: S,
    leftover: Bytes,
    ctx: Arc<Ctx>,
}

impl<S: ParkStream> AsyncRead for ParkIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.leftover.is_empty() {
            let n = this.leftover.len().min(buf.remaining());
            buf.put_slice(&this.leftover.split_to(n));
            this.ctx.state.active.store(true, Relaxed);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() != before {
            this.ctx.state.active.store(true, Relaxed);
        }
        poll
    }
}

impl<S: ParkStream> AsyncWrite for ParkIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.ctx.state.active.store(true, Relaxed);
        }
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, data);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            this.ctx.state.active.store(true, Relaxed);
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.ctx.state.parking.load(Relaxed) {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(listener_extra: &str) -> Result<crate::config::Config, crate::config::ConfigError> {
        let text = format!(
            "[listeners.web]\nlisten = \"127.0.0.1:0\"\npool = \"app\"\n{listener_extra}\n\
             [pools.app]\nbackends = [\"127.0.0.1:1\"]\n"
        );
        crate::config::Config::parse(&text, std::path::Path::new("test.toml"))
    }

    fn settings(listener_extra: &str) -> ParkSettings {
        let config = parse(listener_extra).expect("valid config");
        let auto = Arc::new(auto::Builder::new(TokioExecutor::new()));
        ParkSettings::new(&config.listeners["web"], auto)
    }

    #[test]
    fn tick_is_park_after_but_parks_before_the_header_timer_fires() {
        let defaults = settings("");
        assert_eq!(defaults.tick, Duration::from_secs(1));
        assert_eq!(defaults.keep_alive_timeout, Duration::from_secs(75));
        // hyper's header timer runs between requests: two ticks must fit in it.
        let short = settings("header_read_timeout = \"900ms\"");
        assert_eq!(short.tick, Duration::from_millis(300));
        let tiny = settings("header_read_timeout = \"1ms\"\npark_after = \"10ms\"");
        assert_eq!(tiny.tick, MIN_TICK);
    }

    #[test]
    fn bad_park_settings_are_refused_with_their_rule() {
        for (extra, rule) in [
            (
                "park_after = \"5ms\"",
                "`listeners.web.park_after` must be between 10ms and 1d",
            ),
            (
                "keep_alive_timeout = \"0s\"",
                "`listeners.web.keep_alive_timeout` must be between 1ms and 1d",
            ),
            ("keep_alive_timeout = \"soon\"", "invalid duration \"soon\""),
        ] {
            let error = parse(extra).expect_err(extra).to_string();
            assert!(error.contains(rule), "{extra}: {error}");
        }
    }
}
