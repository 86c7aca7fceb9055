//! HTTP/2 client connections (prior knowledge on plain TCP, ALPN `h2` on TLS), served by
//! hyper's auto builder to their end, with the two bounds hyper's HTTP/2 server lacks:
//!
//! - the handshake: a client that has not sent the connection preface and its first SETTINGS
//!   frame within `header_read_timeout` is disconnected (the bytes are counted as hyper reads
//!   them, [`HandshakeIo`]);
//! - idleness: a connection with no stream open for `keep_alive_timeout` is shut down
//!   gracefully (GOAWAY). Streams are counted by the service: one [`Stream`] guard per request,
//!   held by its future and then by its response body until hyper drops it (body sent, or the
//!   stream reset), and one more by an upgrade's tunnel for its whole life. One timer per
//!   connection, re-armed at each expiry: nothing is done per request but two atomic counts.
//!
//! hyper's graceful shutdown sends a GOAWAY and a PING, and only closes once the PING is
//! answered; a client with no stream open that has not answered within [`GOAWAY_GRACE`] is
//! disconnected. Dead peers of busy connections are noticed by hyper's keep-alive PINGs
//! (`h2_keep_alive_interval`, set in the listener's builder).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::ConnectionSlot;
use crate::proxy::body::ProxyBody;
use crate::proxy::http::HttpProxy;

/// How long a connection shut down gracefully, with no stream open, waits for its client to
/// answer the GOAWAY's PING before it is closed.
pub(crate) const GOAWAY_GRACE: Duration = Duration::from_secs(1);

/// The client's connection preface (24 bytes) and the header of its first frame (9 bytes).
const PREFACE_AND_FRAME_HEADER: usize = 24 + 9;

/// The two timeouts of an HTTP/2 connection.
#[derive(Debug, Clone)]
pub(crate) struct Timeouts {
    /// The preface and the first SETTINGS frame must have arrived within this.
    pub(crate) handshake: Duration,
    /// A connection with no stream open this long is shut down.
    pub(crate) idle: Duration,
    /// Turns true when the listener's drain outlasted `shutdown_timeout`: close at once.
    pub(crate) closing: watch::Receiver<bool>,
}

/// Serves an HTTP/2 connection to its end: shut down gracefully when `drain` fires or when it
/// has been idle for `timeouts.idle`, dropped when its handshake is late.
pub(crate) async fn serve<S>(
    auto: &auto::Builder<TokioExecutor>,
    timeouts: Timeouts,
    stream: S,
    client: SocketAddr,
    proxy: Arc<HttpProxy>,
    slot: Arc<ConnectionSlot>,
    drain: &mut watch::Receiver<()>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::new());
    let service = service(proxy, client, slot, activity.clone());
    let io = HandshakeIo {
        stream,
        seen: 0,
        header: [0; 9],
        activity: activity.clone(),
    };
    let connection = auto.serve_connection_with_upgrades(TokioIo::new(io), service);
    let mut connection = std::pin::pin!(connection);
    let mut drained = std::pin::pin!(drain.changed());
    let mut closing = timeouts.closing.clone();
    let mut closed = std::pin::pin!(closing.wait_for(|closing| *closing));
    let handshake_deadline = activity.start + timeouts.handshake;
    let mut phase = Phase::Handshake;
    let mut timer = std::pin::pin!(tokio::time::sleep_until(
        handshake_deadline.min(activity.start + timeouts.idle)
    ));
    let result = loop {
        tokio::select! {
            result = connection.as_mut() => break result,
            // The drain outlasted `shutdown_timeout`: close, whatever is in flight.
            _ = &mut closed => return,
            _ = &mut drained, if phase != Phase::Closing => {
                phase = Phase::Closing;
                connection.as_mut().graceful_shutdown();
                timer.as_mut().reset(Instant::now() + GOAWAY_GRACE);
            }
            () = &mut timer => {
                let now = Instant::now();
                if phase == Phase::Handshake {
                    if !activity.handshake.load(Ordering::Relaxed) {
                        if now >= handshake_deadline {
                            tracing::debug!(%client, "no HTTP/2 preface and SETTINGS within header_read_timeout; closing");
                            return;
                        }
                        timer.as_mut().reset(handshake_deadline);
                        continue;
                    }
                    phase = Phase::Open;
                }
                let next = match phase {
                    Phase::Closing if activity.open.load(Ordering::Relaxed) == 0 => {
                        tracing::debug!(%client, "HTTP/2 client did not acknowledge the GOAWAY; closing");
                        return;
                    }
                    Phase::Closing => now + GOAWAY_GRACE,
                    _ => match activity.idle_deadline(timeouts.idle) {
                        Some(deadline) if deadline <= now => {
                            tracing::debug!(%client, "idle HTTP/2 connection: GOAWAY");
                            phase = Phase::Closing;
                            connection.as_mut().graceful_shutdown();
                            now + GOAWAY_GRACE
                        }
                        Some(deadline) => deadline,
                        None => now + timeouts.idle,
                    },
                };
                timer.as_mut().reset(next);
            }
        }
    };
    if let Err(error) = result {
        tracing::debug!(%client, %error, "client connection ended with an error");
    }
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Its preface and first SETTINGS frame may not have arrived yet.
    Handshake,
    /// Serving streams.
    Open,
    /// Shut down gracefully (idle, or the server drains).
    Closing,
}

/// What a connection's streams, its IO and its timer share.
#[derive(Debug)]
struct Activity {
    /// When the connection started; `idle_since` counts from it.
    start: Instant,
    /// Streams open now (requests, their response bodies, upgrade tunnels).
    open: AtomicUsize,
    /// When `open` last fell to 0, in nanoseconds since `start`.
    idle_since: AtomicU64,
    /// The preface and the first frame (SETTINGS) have been read.
    handshake: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            handshake: AtomicBool::new(false),
        }
    }

    /// When the connection will have been idle for `idle`; `None` while a stream is open.
    fn idle_deadline(&self, idle: Duration) -> Option<Instant> {
        if self.open.load(Ordering::Acquire) > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        Some(self.start + since + idle)
    }
}

/// One open stream of a connection: counted from its creation to its drop.
#[derive(Debug)]
struct Stream(Arc<Activity>);

impl Stream {
    fn open(activity: &Arc<Activity>) -> Stream {
        activity.open.fetch_add(1, Ordering::AcqRel);
        Stream(activity.clone())
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let activity = &self.0;
        // Recorded before the count falls, so the timer never sees 0 with a stale time.
        let since = activity.start.elapsed().as_nanos();
        activity
            .idle_since
            .store(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Release);
        activity.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its stream counted until hyper drops it.
#[derive(Debug)]
pub(crate) struct StreamBody {
    body: ProxyBody,
    _stream: Stream,
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The hyper service of one HTTP/2 client connection: every request goes to `proxy`, counted
/// as an open stream until its response body is dropped; an upgrade request carries the
/// connection's slot and one more open stream, since its tunnel outlives the response.
fn service(
    proxy: Arc<HttpProxy>,
    client: SocketAddr,
    slot: Arc<ConnectionSlot>,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    http::Request<hyper::body::Incoming>,
    Response = http::Response<StreamBody>,
    Error = Infallible,
    Future: Send + 'static,
> + Clone
       + Send
       + 'static {
    let client_ip = crate::proxy::headers::client_ip_value(client.ip());
    service_fn(move |mut request: http::Request<hyper::body::Incoming>| {
        if crate::proxy::upgrade::is_upgrade(&request) {
            let held = (slot.clone(), Stream::open(&activity));
            request
                .extensions_mut()
                .insert(crate::proxy::upgrade::ClientSlot(Arc::new(held)));
        }
        let stream = Stream::open(&activity);
        let proxy = proxy.clone();
        let client_ip = client_ip.clone();
        async move {
            let response = proxy.handle(request, client, client_ip).await?;
            Ok(response.map(|body| StreamBody {
                body,
                _stream: stream,
            }))
        }
    })
}

/// The stream as hyper sees it, noting when the client's preface and first frame are in.
struct HandshakeIo<S> {
    stream: S,
    /// Bytes read so far, up to the end of the first frame.
    seen: usize,
    /// The first frame's header.
    header: [u8; 9],
    activity: Arc<Activity>,
}

impl<S> HandshakeIo<S> {
    fn observe(&mut self, bytes: &[u8]) {
        let start = self.seen;
        let wanted = PREFACE_AND_FRAME_HEADER.saturating_sub(start);
        for (i, &byte) in bytes.iter().take(wanted).enumerate() {
            if let Some(at) = (start + i).checked_sub(24) {
                self.header[at] = byte;
            }
        }
        self.seen = start.saturating_add(bytes.len());
        if self.seen >= PREFACE_AND_FRAME_HEADER {
            let [a, b, c, ..] = self.header;
            let length = (usize::from(a) << 16) | (usize::from(b) << 8) | usize::from(c);
            if self.seen >= PREFACE_AND_FRAME_HEADER + length {
                self.activity.handshake.store(true, Ordering::Relaxed);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for HandshakeIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        if !this.activity.handshake.load(Ordering::Relaxed) && buf.filled().len() > before {
            this.observe(&buf.filled()[before..]);
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for HandshakeIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, data)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> HandshakeIo<tokio::io::Empty> {
        HandshakeIo {
            stream: tokio::io::empty(),
            seen: 0,
            header: [0; 9],
            activity: Arc::new(Activity::new()),
        }
    }

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    #[tokio::test]
    async fn the_handshake_is_done_once_the_first_frame_is_in() {
        // SETTINGS with one setting (6 bytes), read in pieces.
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        let mut io = io();
        io.observe(&bytes[..20]);
        io.observe(&bytes[20..30]);
        io.observe(&bytes[30..38]);
        assert!(!io.activity.handshake.load(Ordering::Relaxed));
        io.observe(&bytes[38..]);
        assert!(io.activity.handshake.load(Ordering::Relaxed));
        // An empty SETTINGS frame, all at once.
        let mut io2 = self::io();
        let mut empty = PREFACE.to_vec();
        empty.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
        io2.observe(&empty[..PREFACE.len()]);
        assert!(!io2.activity.handshake.load(Ordering::Relaxed));
        io2.observe(&empty[PREFACE.len()..]);
        assert!(io2.activity.handshake.load(Ordering::Relaxed));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_counts_from_the_last_stream_closed() {
        let activity = Arc::new(Activity::new());
        let idle = Duration::from_secs(5);
        assert_eq!(activity.idle_deadline(idle), Some(activity.start + idle));
        let first = Stream::open(&activity);
        let second = Stream::open(&activity);
        tokio::time::advance(Duration::from_secs(3)).await;
        drop(first);
        assert_eq!(activity.idle_deadline(idle), None);
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(second);
        assert_eq!(
            activity.idle_deadline(idle),
            Some(activity.start + Duration::from_secs(4) + idle)
        );
    }
}
