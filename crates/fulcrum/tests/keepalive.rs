//! End to end: idle HTTP/1.1 keep-alive client connections park (their hyper state freed)
//! and come back on the same TCP connection; `keep_alive_timeout` (not `header_read_timeout`)
//! bounds their idle time. Real `fulcrum` processes on 127.0.0.1, raw client sockets.
//!
//! The pauses here are the idle times under test (each a few ticks of `park_after`), not
//! waits for readiness.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Config with one HTTP listener `web` (extra keys given) in front of `backend`.
fn config(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n{listener_extra}\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

/// Sends one request on `stream` and asserts a 200 answer that keeps the connection open.
async fn get_ok(stream: &mut TcpStream) {
    stream.write_all(REQUEST).await.unwrap();
    let response = read_response(stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
}

#[tokio::test]
async fn idle_keep_alive_connection_parks_and_serves_its_next_requests() {
    let backend = backend("app", 0);
    // Without parking, hyper would close the idle connection at header_read_timeout (600 ms).
    let lb = balancer_with(
        &config(
            backend.addr,
            "header_read_timeout = \"600ms\"\npark_after = \"50ms\"",
        ),
        1,
    );
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    for _ in 0..3 {
        get_ok(&mut stream).await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    // Pipelined requests after a park are all answered; the last one closes the connection.
    let mut two = REQUEST.to_vec();
    two.extend_from_slice(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(&two).await.unwrap();
    let mut answers = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answers));
    assert!(read.await.is_ok(), "no close after Connection: close");
    let answers = String::from_utf8_lossy(&answers);
    assert_eq!(answers.matches("HTTP/1.1 200").count(), 2, "{answers}");
}

#[tokio::test]
async fn keep_alive_timeout_bounds_idle_clients_not_header_read_timeout() {
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "header_read_timeout = \"500ms\"\nkeep_alive_timeout = \"2s\"\npark_after = \"50ms\"",
        ),
        1,
    );
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    get_ok(&mut stream).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    get_ok(&mut stream).await;
    // Then idle past keep_alive_timeout: Fulcrum closes it (parked 1-2 ticks after the
    // answer, then 2 s).
    let waited = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(1900) && waited <= Duration::from_millis(3500),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn request_split_across_the_park_point_is_answered() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr, "park_after = \"50ms\""), 1);
    let (first, rest) = REQUEST.split_at(20);
    // On a connection that served a request: the half head is kept while the connection parks.
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    get_ok(&mut stream).await;
    for _ in 0..2 {
        stream.write_all(first).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        stream.write_all(rest).await.unwrap();
        let response = read_response(&mut stream).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    get_ok(&mut stream).await;
    // On a new connection's first request (no park before a first answer).
    let mut fresh = TcpStream::connect(lb.addr).await.unwrap();
    fresh.write_all(first).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    fresh.write_all(rest).await.unwrap();
    let response = read_response(&mut fresh).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
    get_ok(&mut fresh).await;
}

#[tokio::test]
async fn silent_client_is_closed_at_header_read_timeout() {
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "header_read_timeout = \"500ms\"\nkeep_alive_timeout = \"10s\"",
        ),
        1,
    );
    let mut silent = TcpStream::connect(lb.addr).await.unwrap();
    let waited = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(450) && waited <= Duration::from_secs(3),
        "closed after {waited:?}"
    );
}

#[tokio::test]
async fn shutdown_closes_parked_connections_at_once() {
    let backend = backend("app", 0);
    let mut lb = balancer_with(&config(backend.addr, "park_after = \"50ms\""), 1);
    let mut parked = TcpStream::connect(lb.addr).await.unwrap();
    get_ok(&mut parked).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    lb.signal("TERM");
    // The default shutdown_timeout is 30 s: closing within 3 s means nothing waited for it.
    closed_within(&mut parked, Duration::from_secs(3)).await;
    assert_eq!(
        lb.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        lb.logs()
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connection_behind_a_proxy_protocol_header_parks_too() {
    use fulcrum::wire::proxy_protocol::encode_v1;
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "accept_proxy_protocol = true\nheader_read_timeout = \"600ms\"\npark_after = \"50ms\"",
        ),
        1,
    );
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    let front: SocketAddr = "203.0.113.9:4242".parse().unwrap();
    stream
        .write_all(encode_v1(front, lb.addr).as_bytes())
        .await
        .unwrap();
    for _ in 0..2 {
        get_ok(&mut stream).await;
        // Past header_read_timeout: only a parked connection is still open.
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    get_ok(&mut stream).await;
}

/// `fulcrum_client_connections_parked{listener="web"}` as the metrics show it now.
async fn parked_now(lb: &Proc) -> u64 {
    let metrics = metrics_text(lb).await;
    metrics
        .lines()
        .find(|l| l.starts_with("fulcrum_client_connections_parked{listener=\"web\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no parked gauge:\n{metrics}"))
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn idle_connections_wait_in_the_parking_lot_and_come_back_from_it() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config(backend.addr, "park_after = \"50ms\""), 1);
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(lb.addr).await.unwrap();
        get_ok(&mut stream).await;
        streams.push(stream);
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            parked_now(&lb).await == 5
        })
        .await,
        "5 idle connections parked in the lot: {}",
        parked_now(&lb).await
    );
    // Each one leaves the lot when its client sends, and is served on the same connection.
    for stream in &mut streams {
        get_ok(stream).await;
    }
    // A client that closes while parked leaves the lot too.
    assert!(
        eventually(Duration::from_secs(5), || async {
            parked_now(&lb).await == 5
        })
        .await,
        "parked again"
    );
    streams.truncate(2);
    assert!(
        eventually(Duration::from_secs(5), || async {
            parked_now(&lb).await == 2
        })
        .await,
        "closed clients leave the lot: {}",
        parked_now(&lb).await
    );
    let metrics = metrics_text(&lb).await;
    assert!(
        metrics.contains("fulcrum_client_connections_open{listener=\"web\"} 2"),
        "{metrics}"
    );
}

/// Reads until `stream` closes; returns what came, and whether it closed within 5 s.
async fn read_until_closed(stream: &mut TcpStream) -> (String, bool) {
    let mut data = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        // A reset (the client wrote into a closed connection) ends it too.
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            data.extend_from_slice(&buffer[..n]);
        }
    });
    let closed = read.await.is_ok();
    (String::from_utf8_lossy(&data).into_owned(), closed)
}

#[tokio::test]
async fn request_body_is_never_parsed_as_the_next_request() {
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            backend.addr,
            "header_read_timeout = \"600ms\"\npark_after = \"50ms\"",
        ),
        1,
    );
    // The second half of the body is a whole request of its own.
    let smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let head = |path: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {}\r\n\r\n",
            10 + smuggled.len()
        )
    };

    // The backend answers at once and drops the body unread 100 ms later; the client
    // pauses mid-upload for several ticks, then sends the rest.
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    get_ok(&mut stream).await;
    stream
        .write_all(format!("{}0123456789", head("/?unread_ms=100")).as_bytes())
        .await
        .unwrap();
    let response = read_response(&mut stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stream.write_all(smuggled).await;
    // hyper does not wait for the rest of a body nobody reads: the connection closes, and
    // nothing else is answered.
    let (rest, closed) = read_until_closed(&mut stream).await;
    assert!(
        rest.is_empty(),
        "the body was answered as a request: {rest}"
    );
    assert!(closed, "still open after 5 s");

    // A body the backend reads after answering (`/grpc-echo` streams it back): the pause
    // does not park the connection mid-body; once the body is complete, it parks as usual.
    let mut stream = TcpStream::connect(lb.addr).await.unwrap();
    get_ok(&mut stream).await;
    stream
        .write_all(format!("{}0123456789", head("/grpc-echo")).as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.write_all(smuggled).await.unwrap();
    let echo = read_response(&mut stream).await;
    assert!(echo.starts_with("HTTP/1.1 200"), "{echo}");
    // Chunked: the two halves of the body, echoed as they came.
    assert!(
        echo.contains("\r\n0123456789\r\n") && echo.contains("\r\nGET /smuggled"),
        "{echo}"
    );
    // Past header_read_timeout: only a parked connection is still open.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    get_ok(&mut stream).await;
}
