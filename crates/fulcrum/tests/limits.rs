//! End to end: the process's open file limit (raised at start to the hard limit, with a warning
//! when it cannot hold the listeners' `max_connections`) and the limits on HTTP/2 client
//! connections (idle and handshake timeouts, concurrent streams), and the request head limits
//! `max_header_count` (431) and `max_uri_bytes` (414), exact over HTTP/1.1 and HTTP/2. Real
//! `fulcrum` processes on 127.0.0.1, raw client sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// Config with one HTTP listener `web` (extra keys given) in front of `backend`.
fn config(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n{listener_extra}\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

/// The soft and hard "Max open files" of process `pid` (Linux `/proc/PID/limits`).
#[cfg(target_os = "linux")]
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[cfg(target_os = "linux")]
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let backend = backend("app", 0);
    let lb = balancer_with_nofile_limits(
        &config(backend.addr, "max_connections = 1000"),
        1,
        256,
        4096,
    );
    assert_eq!(nofile_limits(lb.pid()), (4096, 4096));
    let logs = lb.logs();
    assert!(logs.contains("open file limit raised"), "{logs}");
    assert!(!logs.contains("open file limit ("), "{logs}");
    // A reload to more connections than 4096 descriptors hold is warned about.
    let path = lb.config_path.clone().unwrap();
    std::fs::write(&path, config(backend.addr, "max_connections = 3000")).unwrap();
    lb.signal("HUP");
    assert!(
        wait_for_log(&lb, "the open file limit (4096)"),
        "{}",
        lb.logs()
    );
}

/// Waits (up to 5 s) for `text` in `lb`'s log.
fn wait_for_log(lb: &Proc, text: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !lb.logs().contains(text) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

#[cfg(target_os = "linux")]
#[test]
fn a_hard_limit_below_what_max_connections_needs_is_warned_about() {
    let backend = backend("app", 0);
    // 10 000 connections may need 20 256 descriptors.
    let lb = balancer_with_nofile_limits(&config(backend.addr, ""), 1, 256, 1024);
    assert_eq!(nofile_limits(lb.pid()), (1024, 1024));
    assert!(
        wait_for_log(&lb, "the open file limit (1024)"),
        "{}",
        lb.logs()
    );
    let logs = lb.logs();
    assert!(logs.contains("(20256: two descriptors"), "{logs}");
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// An empty SETTINGS frame.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];

/// One HTTP/2 frame: its type and payload.
struct Frame {
    kind: u8,
    payload: Vec<u8>,
}

/// Reads the next frame, or `None` at the end of the stream (or after `within`).
async fn next_frame(stream: &mut tokio::net::TcpStream, within: Duration) -> Option<Frame> {
    use tokio::io::AsyncReadExt;
    let read = async {
        let mut header = [0u8; 9];
        stream.read_exact(&mut header).await.ok()?;
        let length =
            (usize::from(header[0]) << 16) | (usize::from(header[1]) << 8) | usize::from(header[2]);
        let mut payload = vec![0u8; length];
        stream.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: header[3],
            payload,
        })
    };
    tokio::time::timeout(within, read).await.ok().flatten()
}

/// The frame types read until the server closes the connection, and when it closed;
/// panics if it is still open after `within`.
async fn frames_until_closed(
    stream: &mut tokio::net::TcpStream,
    within: Duration,
) -> (Vec<u8>, Instant) {
    let deadline = Instant::now() + within;
    let mut kinds = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "still open after {within:?}: {kinds:?}");
        match next_frame(stream, left).await {
            Some(frame) => kinds.push(frame.kind),
            None => return (kinds, Instant::now()),
        }
    }
}

/// Connects to `addr` and sends the HTTP/2 preface and an empty SETTINGS frame.
async fn h2c_handshake(addr: SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend_from_slice(EMPTY_SETTINGS);
    stream.write_all(&hello).await.unwrap();
    stream
}

const GOAWAY: u8 = 7;
const SETTINGS: u8 = 4;

#[tokio::test]
async fn an_idle_http2_connection_gets_a_goaway_and_closes_after_keep_alive_timeout() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr, "keep_alive_timeout = \"1s\""), 1);
    let started = Instant::now();
    // The client never acknowledges anything (neither SETTINGS nor the GOAWAY's PING).
    let mut stream = h2c_handshake(lb.addr).await;
    let (kinds, closed) = frames_until_closed(&mut stream, Duration::from_secs(8)).await;
    let idle = closed - started;
    assert!(kinds.contains(&GOAWAY), "{kinds:?}");
    // keep_alive_timeout, then at most the GOAWAY grace (1 s) and some slack.
    assert!(
        idle >= Duration::from_millis(900) && idle < Duration::from_secs(4),
        "{idle:?}"
    );
}

#[tokio::test]
async fn an_http2_request_longer_than_keep_alive_timeout_is_answered() {
    // The backend answers after 1.5 s: the open stream keeps the connection from idling out.
    let backend = backend("app", 1500);
    let lb = balancer_with(&config(backend.addr, "keep_alive_timeout = \"1s\""), 1);
    let client = reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(plain_tls_config())
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = tokio::time::timeout(
        Duration::from_secs(10),
        client.get(format!("http://{}/", lb.addr)).send(),
    )
    .await
    .expect("answered in time")
    .expect("answered");
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
}

#[tokio::test]
async fn an_http2_client_that_never_completes_its_handshake_is_closed_at_header_read_timeout() {
    use tokio::io::AsyncWriteExt;
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "header_read_timeout = \"500ms\"\nkeep_alive_timeout = \"60s\"",
        ),
        1,
    );
    // Nothing at all; the preface alone; the preface and half a SETTINGS frame.
    let mut half = PREFACE.to_vec();
    half.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3]);
    for sent in [&[][..], PREFACE, &half] {
        let started = Instant::now();
        let mut stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        stream.write_all(sent).await.unwrap();
        let (_, closed) = frames_until_closed(&mut stream, Duration::from_secs(5)).await;
        let waited = closed - started;
        assert!(
            waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
            "{} bytes sent: closed after {waited:?}",
            sent.len()
        );
    }
}

/// The settings of the server's SETTINGS frame, by identifier.
fn settings(payload: &[u8]) -> std::collections::HashMap<u16, u32> {
    payload
        .chunks_exact(6)
        .map(|s| {
            (
                u16::from_be_bytes([s[0], s[1]]),
                u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
            )
        })
        .collect()
}

#[tokio::test]
async fn http2_settings_are_the_listener_s() {
    let backend = backend("app", 0);
    for (extra, streams, window) in [
        ("", 100, 1024 * 1024),
        (
            "h2_max_concurrent_streams = 7\nh2_stream_window = 100000",
            7,
            100_000,
        ),
    ] {
        let lb = balancer_with(&config(backend.addr, extra), 1);
        let mut stream = h2c_handshake(lb.addr).await;
        let first = next_frame(&mut stream, Duration::from_secs(5))
            .await
            .expect("a frame");
        assert_eq!(first.kind, SETTINGS);
        let settings = settings(&first.payload);
        assert_eq!(settings.get(&3), Some(&streams), "{extra}: {settings:?}");
        assert_eq!(settings.get(&4), Some(&window), "{extra}: {settings:?}");
        // max_header_bytes' default.
        assert_eq!(settings.get(&6), Some(&65536), "{extra}: {settings:?}");
    }
}

const PING: u8 = 6;

#[tokio::test]
async fn an_http2_client_that_does_not_answer_keep_alive_pings_is_closed() {
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "keep_alive_timeout = \"60s\"\n\
             h2_keep_alive_interval = \"300ms\"\nh2_keep_alive_timeout = \"300ms\"",
        ),
        1,
    );
    let started = Instant::now();
    let mut stream = h2c_handshake(lb.addr).await;
    let (kinds, closed) = frames_until_closed(&mut stream, Duration::from_secs(8)).await;
    assert!(kinds.contains(&PING), "{kinds:?}");
    let waited = closed - started;
    assert!(waited < Duration::from_secs(4), "{waited:?}");
}

/// A WebSocket over HTTP/2 (extended CONNECT) is an open stream: it outlives
/// `keep_alive_timeout` while quiet, and the connection idles out once it is closed.
#[tokio::test]
async fn an_http2_websocket_keeps_its_connection_past_keep_alive_timeout() {
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message};

    let backend = backend("ws2", 0);
    let lb = balancer_with(&config(backend.addr, "keep_alive_timeout = \"1s\""), 1);
    let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let closed = tokio::spawn(async move {
        let _ = connection.await;
        Instant::now()
    });
    // A plain request first: the server's SETTINGS must have enabled extended CONNECT.
    let get = http::Request::get(format!("http://{}/", lb.addr))
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(sender.send_request(get).await.unwrap().status(), 200);
    let mut connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{}/ws", lb.addr))
        .header("sec-websocket-version", "13")
        .body(Empty::<Bytes>::new())
        .unwrap();
    connect
        .extensions_mut()
        .insert(hyper::ext::Protocol::from_static("websocket"));
    let mut response = sender.send_request(connect).await.unwrap();
    assert_eq!(response.status(), 200);
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    // Quiet for 2.5 keep_alive_timeouts.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    socket.send(Message::text("still here")).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(5), socket.next())
        .await
        .expect("an echo within 5 s");
    assert_eq!(echo.unwrap().unwrap(), Message::text("still here"));
    socket.close(None).await.unwrap();
    while let Some(Ok(_)) = socket.next().await {}
    drop(socket);
    let tunnel_closed = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(6), closed)
        .await
        .expect("the connection did not idle out after its WebSocket closed")
        .unwrap();
    let idle = closed_at - tunnel_closed;
    assert!(idle < Duration::from_secs(4), "{idle:?}");
}

/// Sends raw `request` on a new connection and reads the answer until the server closes the
/// connection (within 5 s).
async fn answer_then_close(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("the connection was not closed within 5 s")
        .ok();
    String::from_utf8_lossy(&answer).into_owned()
}

/// Sends raw `request` on a new connection and reads one keep-alive response.
async fn answer_kept_alive(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    read_response(&mut stream).await
}

/// An HTTP/1.1 GET of `target` with `lines` header lines (`Host` and `x-N: v`).
fn get_with(target: &str, lines: usize) -> Vec<u8> {
    let mut request = format!("GET {target} HTTP/1.1\r\nHost: limits\r\n");
    for n in 1..lines {
        request.push_str(&format!("x-{n}: v\r\n"));
    }
    request.push_str("\r\n");
    request.into_bytes()
}

/// A prior-knowledge HTTP/2 connection to `addr` (driven in the background).
async fn h2_connect(
    stream: tokio::net::TcpStream,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// Sends an HTTP/2 GET of `path` with `headers` fields (`x-N: v`) and returns its status,
/// headers and body.
async fn h2_get(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    authority: SocketAddr,
    path: &str,
    headers: usize,
) -> (u16, http::HeaderMap, String) {
    use http_body_util::BodyExt;
    let mut request = http::Request::get(format!("http://{authority}{path}"));
    for n in 0..headers {
        request = request.header(format!("x-{n}"), "v");
    }
    let request = request.body(http_body_util::Empty::new()).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

/// `fulcrum_requests_refused_total{listener="web",status=...}` now.
async fn refused_requests(lb: &Proc, status: u16) -> f64 {
    let text = metrics_text(lb).await;
    let prefix = "fulcrum_requests_refused_total{";
    text.lines()
        .find(|l| {
            l.starts_with(prefix)
                && l.contains("listener=\"web\"")
                && l.contains(&format!("status=\"{status}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {prefix}..status={status} in\n{text}"))
}

#[tokio::test]
async fn max_header_count_is_exact_over_http1_and_http2() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr, "max_header_count = 50"), 1);
    // HTTP/1.1: 50 lines pass, 51 get 431 and the connection closes.
    let served = answer_kept_alive(lb.addr, &get_with("/", 50)).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = answer_then_close(lb.addr, &get_with("/", 51)).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    // HTTP/2: 50 fields pass, 51 get Fulcrum's 431 and the connection stays usable.
    let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut h2 = h2_connect(stream).await;
    assert_eq!(h2_get(&mut h2, lb.addr, "/", 50).await.0, 200);
    let (status, _, body) = h2_get(&mut h2, lb.addr, "/", 51).await;
    assert_eq!(status, 431);
    assert_eq!(body, "431 request header fields too large\n");
    assert_eq!(h2_get(&mut h2, lb.addr, "/", 0).await.0, 200);
    assert_eq!(refused_requests(&lb, 431).await, 2.0);
    // Logged once (both refusals came within a second), naming the limit.
    assert!(lb.logs().contains("max_header_count"), "{}", lb.logs());
}

#[tokio::test]
async fn the_default_header_count_refuses_the_101st_line() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr, ""), 1);
    // The backend (hyper) itself takes 100 lines: Fulcrum adds X-Forwarded-*, so 97 pass.
    let served = answer_kept_alive(lb.addr, &get_with("/", 97)).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = answer_then_close(lb.addr, &get_with("/", 101)).await;
    assert!(refused.starts_with("HTTP/1.1 431"), "{refused}");
    let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut h2 = h2_connect(stream).await;
    assert_eq!(h2_get(&mut h2, lb.addr, "/", 101).await.0, 431);
    assert_eq!(refused_requests(&lb, 431).await, 2.0);
}

#[tokio::test]
async fn max_uri_bytes_is_exact_to_the_byte_over_http1_and_http2() {
    let backend = backend("app", 0);
    // The default, 8 KiB.
    let lb = balancer_with(&config(backend.addr, ""), 1);
    let target = |length: usize| format!("/{}", "a".repeat(length - 1));
    let served = answer_kept_alive(lb.addr, &get_with(&target(8192), 1)).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = answer_then_close(lb.addr, &get_with(&target(8193), 1)).await;
    assert!(refused.starts_with("HTTP/1.1 414"), "{refused}");
    assert!(
        refused.ends_with("414 URI too long: the request target is too long\n"),
        "{refused}"
    );
    // The absolute form counts whole: scheme, authority and path.
    let prefix = format!("http://{}", lb.addr);
    let absolute = |length: usize| format!("{prefix}{}", target(length - prefix.len()));
    let served = answer_kept_alive(lb.addr, &get_with(&absolute(8192), 1)).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    let refused = answer_then_close(lb.addr, &get_with(&absolute(8193), 1)).await;
    assert!(refused.starts_with("HTTP/1.1 414"), "{refused}");
    // HTTP/2: `:path`.
    let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut h2 = h2_connect(stream).await;
    assert_eq!(h2_get(&mut h2, lb.addr, &target(8192), 0).await.0, 200);
    let (status, _, body) = h2_get(&mut h2, lb.addr, &target(8193), 0).await;
    assert_eq!(
        (status, body.as_str()),
        (414, "414 URI too long: the request target is too long\n")
    );
    assert_eq!(h2_get(&mut h2, lb.addr, "/", 0).await.0, 200);
    assert_eq!(refused_requests(&lb, 414).await, 3.0);
    assert!(
        lb.logs().contains("request target too long"),
        "{}",
        lb.logs()
    );
}
