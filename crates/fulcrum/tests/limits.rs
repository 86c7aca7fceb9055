//! End to end: the process's open file limit (raised at start to the hard limit, with a warning
//! when it cannot hold the listeners' `max_connections`) and the limits on HTTP/2 client
//! connections (idle and handshake timeouts, concurrent streams). Real `fulcrum` processes on
//! 127.0.0.1, raw client sockets.

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
