//! End to end: WebSocket through an HTTP listener, TCP (L4) mode, PROXY protocol to backends
//! and from a front load balancer. Real `fulcrum` processes on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use fulcrum::wire::proxy_protocol::{encode_v1, encode_v2};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Bytes streamed through TCP mode in the big echo test. 1 GiB: measured at ~4 s in a debug
/// build on loopback (see the test's log line), within the few-seconds budget.
const ECHO_BYTES: u64 = 1 << 30;

/// Config with one listener `front` (protocol and extra keys given) in front of pool `app`.
fn config(
    protocol: &str,
    backends: &[SocketAddr],
    listener_extra: &str,
    pool_extra: &str,
) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.front]\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"app\"\n{listener_extra}\n\n\
         [pools.app]\nbackends = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

/// In-flight count of backend `addr` of pool `app`.
async fn in_flight(lb: &Proc, addr: SocketAddr) -> u64 {
    app_backends(lb).await[&addr.to_string()]["in_flight"]
        .as_u64()
        .unwrap()
}

#[tokio::test]
async fn websocket_echo_passes_through_and_counts_in_flight() {
    let backend = backend("ws", 0);
    let lb = balancer_with(
        &config("http", &[backend.addr], "max_connections = 1", ""),
        1,
    );
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let (mut socket, response) =
        tokio_tungstenite::client_async(format!("ws://{}/ws", lb.addr), stream)
            .await
            .expect("WebSocket handshake through fulcrum");
    assert_eq!(response.status(), 101);
    assert_eq!(response.headers()["x-backend"], "ws");
    for i in 0..5 {
        let text = format!("hello {i}");
        socket.send(Message::text(text.clone())).await.unwrap();
        let echoed = socket.next().await.unwrap().unwrap();
        assert_eq!(echoed, Message::text(text));
    }
    let blob: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
    socket.send(Message::binary(blob.clone())).await.unwrap();
    assert_eq!(socket.next().await.unwrap().unwrap(), Message::binary(blob));
    // The open tunnel is one request in flight on the backend, and still holds its client
    // connection's place on the listener (max_connections = 1: another client is refused).
    assert_eq!(in_flight(&lb, backend.addr).await, 1);
    let open = "listener=\"front\"";
    assert_eq!(
        metric(&lb, "fulcrum_client_connections_open", &[open]).await,
        1.0
    );
    assert!(
        client()
            .get(format!("http://{}/", lb.addr))
            .send()
            .await
            .is_err(),
        "a second connection was served beside the open WebSocket"
    );
    // Removing the backend drains it: it stays listed (draining) while the tunnel is open,
    // and the tunnel keeps working.
    let removed = client()
        .delete(format!(
            "{}/api/pools/app/backends/{}",
            lb.admin_url(),
            backend.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 202);
    let status = app_backends(&lb).await;
    assert_eq!(
        status[&backend.addr.to_string()]["state"],
        "draining",
        "{status:?}"
    );
    socket.send(Message::text("still open")).await.unwrap();
    assert_eq!(
        socket.next().await.unwrap().unwrap(),
        Message::text("still open")
    );
    socket.close(None).await.unwrap();
    while let Some(Ok(_)) = socket.next().await {}
    drop(socket);
    assert!(
        eventually(Duration::from_secs(5), || async {
            !app_backends(&lb)
                .await
                .contains_key(&backend.addr.to_string())
        })
        .await,
        "backend still listed after its WebSocket closed"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(&lb, "fulcrum_client_connections_open", &[open]).await == 0.0
        })
        .await
    );
}

#[tokio::test]
async fn websocket_over_http2_extended_connect_reaches_an_http1_backend() {
    use bytes::Bytes;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::protocol::Role;

    let backend = backend("ws2", 0);
    let lb = balancer_with(&config("http", &[backend.addr], "", ""), 1);
    let stream = TcpStream::connect(lb.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    // A plain request first: its answer comes after the server's SETTINGS, which must have
    // enabled extended CONNECT before the client may use it.
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
    assert_eq!(response.headers()["x-backend"], "ws2");
    let upgraded = hyper::upgrade::on(&mut response).await.unwrap();
    let mut socket = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    for i in 0..3 {
        let text = format!("over h2 {i}");
        socket.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(text));
    }
    assert_eq!(in_flight(&lb, backend.addr).await, 1);
    socket.close(None).await.unwrap();
    while let Some(Ok(_)) = socket.next().await {}
    drop(socket);
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight(&lb, backend.addr).await == 0
        })
        .await,
        "in-flight not released after the HTTP/2 WebSocket closed"
    );
}

/// Streams `total` bytes of a pattern through `addr` and checks the echo byte for byte, with
/// bounded memory. Returns the elapsed time.
async fn echo_pattern(addr: SocketAddr, total: u64) -> Duration {
    // A prime period longer than a write, so a misplaced chunk cannot match by chance.
    const PERIOD: usize = 65_521;
    const CHUNK: usize = 64 * 1024;
    let pattern: std::sync::Arc<Vec<u8>> = std::sync::Arc::new(
        (0..PERIOD + CHUNK)
            .map(|i| {
                ((i % PERIOD) as u64).wrapping_mul(2_654_435_761) as u8 ^ ((i % PERIOD) >> 8) as u8
            })
            .collect(),
    );
    let started = Instant::now();
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer_pattern = pattern.clone();
    let writer = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < total {
            let at = (sent % PERIOD as u64) as usize;
            let len = CHUNK.min((total - sent) as usize);
            write
                .write_all(&writer_pattern[at..at + len])
                .await
                .unwrap();
            sent += len as u64;
        }
        write.shutdown().await.unwrap();
    });
    let mut buffer = vec![0u8; CHUNK];
    let mut received = 0u64;
    loop {
        let n = read.read(&mut buffer).await.unwrap();
        if n == 0 {
            break;
        }
        let at = (received % PERIOD as u64) as usize;
        assert!(
            buffer[..n] == pattern[at..at + n],
            "echo differs within bytes {received}..{}",
            received + n as u64
        );
        received += n as u64;
        assert!(received <= total, "more bytes came back than were sent");
    }
    writer.await.unwrap();
    assert_eq!(received, total, "echo ended early");
    started.elapsed()
}

/// The value of metric `name` with all of `labels` in a Prometheus text scrape.
async fn metric(lb: &Proc, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(lb).await;
    text.lines()
        .find(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} {labels:?} in\n{text}"))
}

#[tokio::test]
async fn tcp_mode_echoes_a_large_stream_byte_identical() {
    let echo = backend_with("echo", &["--tcp-echo"]);
    let lb = balancer_with(&config("tcp", &[echo.addr], "", ""), 1);
    let elapsed = echo_pattern(lb.addr, ECHO_BYTES).await;
    eprintln!(
        "TCP mode echoed {} MiB in {elapsed:?} ({:.0} MiB/s each way)",
        ECHO_BYTES >> 20,
        (ECHO_BYTES >> 20) as f64 / elapsed.as_secs_f64()
    );
    let backend = format!("backend=\"{}\"", echo.addr);
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight(&lb, echo.addr).await == 0
        })
        .await
    );
    assert_eq!(
        metric(
            &lb,
            "fulcrum_backend_session_bytes_total",
            &[&backend, "to_backend"]
        )
        .await,
        ECHO_BYTES as f64
    );
    assert_eq!(
        metric(
            &lb,
            "fulcrum_backend_session_bytes_total",
            &[&backend, "to_client"]
        )
        .await,
        ECHO_BYTES as f64
    );
    assert_eq!(
        metric(&lb, "fulcrum_backend_sessions_total", &[&backend]).await,
        1.0
    );
}

/// Sends `line` on a new connection through `addr` and returns what came back before EOF.
async fn echo_line(addr: SocketAddr, line: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(line.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut reply))
        .await
        .expect("echo in time")
        .unwrap();
    reply
}

#[tokio::test]
async fn tcp_mode_fails_over_from_a_dead_backend_and_counts_sessions() {
    let echo = backend_with("echo", &["--tcp-echo"]);
    let dead = dead_address();
    let lb = balancer_with(
        &config(
            "tcp",
            &[dead, echo.addr],
            "",
            "algorithm = \"round_robin\"\n[server]\naccess_log = true",
        ),
        1,
    );
    for i in 0..6 {
        let line = format!("ping {i}\n");
        assert_eq!(echo_line(lb.addr, &line).await, line);
    }
    let backends = app_backends(&lb).await;
    assert!(
        backends[&dead.to_string()]["failures"].as_u64().unwrap() >= 1,
        "{backends:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            lb.logs().matches("tcp session").count() >= 6
        })
        .await,
        "no access-log line per session: {}",
        lb.logs()
    );
    // An open session counts as in flight on its backend.
    let mut open = TcpStream::connect(lb.addr).await.unwrap();
    open.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    open.read_exact(&mut byte).await.unwrap();
    assert_eq!(in_flight(&lb, echo.addr).await, 1);
    drop(open);
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight(&lb, echo.addr).await == 0
        })
        .await
    );
}

/// Sends a raw HTTP/1.1 GET for `path` (after `preamble`) on a new connection to `addr` and
/// returns the response text (empty when the connection was closed without an answer).
async fn raw_get(addr: SocketAddr, preamble: &[u8], path: &str) -> (SocketAddr, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let local = stream.local_addr().unwrap();
    let mut request = preamble.to_vec();
    request.extend_from_slice(
        format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    stream.write_all(&request).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply))
        .await
        .expect("answer or close in time");
    (local, String::from_utf8_lossy(&reply).into_owned())
}

/// The JSON body of a raw HTTP response.
fn json_body(response: &str) -> serde_json::Value {
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body)
        .unwrap_or_else(|| panic!("no body in {response:?}"));
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("{e}: {body:?}"))
}

#[tokio::test]
async fn proxy_v2_to_backends_carries_the_real_client_address() {
    let backend = backend_with("pp", &["--proxy-protocol"]);
    // HTTP health checks reach a backend that insists on a PROXY header: they send a LOCAL
    // one. A backend added through the API starts down and comes up on its first passing
    // check, so its coming up proves the checks pass.
    let lb = balancer_with(
        &config(
            "tcp",
            &[dead_address()],
            "",
            "proxy_protocol = \"v2\"\n[pools.app.health]\nkind = \"http\"\ninterval = \"100ms\"",
        ),
        1,
    );
    let added = client()
        .post(format!("{}/api/pools/app/backends", lb.admin_url()))
        .header("content-type", "application/json")
        .body(format!("{{\"address\": \"{}\"}}", backend.addr))
        .send()
        .await
        .unwrap();
    assert!(added.status().is_success(), "{}", added.status());
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await[&backend.addr.to_string()]["health"] == "up"
        })
        .await,
        "health checks with a PROXY LOCAL header failed: {}",
        lb.logs()
    );
    let (local, response) = raw_get(lb.addr, b"", "/").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        response.contains(&format!("x-client-addr: {local}")),
        "{response}"
    );
    assert_eq!(json_body(&response)["client"], local.to_string());
}

#[tokio::test]
async fn listener_accepts_proxy_protocol_from_a_front_balancer() {
    let backend = backend("app", 0);
    let lb = balancer_with(
        &config(
            "http",
            &[backend.addr],
            "accept_proxy_protocol = true\nheader_read_timeout = \"1s\"",
            "",
        ),
        1,
    );
    let front: SocketAddr = "203.0.113.9:4242".parse().unwrap();
    for header in [
        encode_v2(front, lb.addr),
        encode_v1(front, lb.addr).into_bytes(),
    ] {
        let (_, response) = raw_get(lb.addr, &header, "/?echo=headers").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert_eq!(
            json_body(&response)["echo"]["x-forwarded-for"],
            "203.0.113.9",
            "{response}"
        );
    }
    // A client that sends nothing is closed at header_read_timeout.
    let mut silent = TcpStream::connect(lb.addr).await.unwrap();
    let waited = closed_within(&mut silent, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}"
    );
    // No header (a plain request): closed without an answer, and logged.
    let (_, response) = raw_get(lb.addr, b"", "/").await;
    assert_eq!(
        response, "",
        "a connection without a PROXY header was served"
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            lb.logs().contains("bad PROXY protocol header")
        })
        .await,
        "{}",
        lb.logs()
    );
}

#[tokio::test]
async fn tcp_listener_passes_the_front_client_address_on_to_backends() {
    let backend = backend_with("pp", &["--proxy-protocol"]);
    let lb = balancer_with(
        &config(
            "tcp",
            &[backend.addr],
            "accept_proxy_protocol = true",
            "proxy_protocol = \"v2\"",
        ),
        1,
    );
    let front: SocketAddr = "[2001:db8::5]:6000".parse().unwrap();
    let (_, response) = raw_get(lb.addr, &encode_v1(front, lb.addr).into_bytes(), "/").await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(json_body(&response)["client"], front.to_string());
}

/// Opens a session through `addr` and checks it echoes (so it is established end to end).
async fn open_session(addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(b"x").await.unwrap();
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.unwrap();
    stream
}

/// Waits (bounded) for the peer to close `stream`; returns how long that took.
async fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
        Ok(Ok(0) | Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Err(_) => panic!("session still open after {limit:?}"),
    }
}

#[tokio::test]
async fn tcp_mode_honours_max_connections_idle_timeout_and_drain_timeout() {
    let echo = backend_with("echo", &["--tcp-echo"]);
    let lb = balancer_with(
        &config(
            "tcp",
            &[echo.addr],
            "max_connections = 1\nidle_timeout = \"1s\"",
            "drain_timeout = \"1s\"",
        ),
        1,
    );
    // One session allowed: a second connection is closed at once.
    let mut first = open_session(lb.addr).await;
    let mut second = TcpStream::connect(lb.addr).await.unwrap();
    closed_within(&mut second, Duration::from_secs(3)).await;
    // The idle session is closed after about a second of silence.
    let idle = closed_within(&mut first, Duration::from_secs(5)).await;
    assert!(
        idle >= Duration::from_millis(500),
        "closed too early: {idle:?}"
    );
    // A session on a removed backend lasts until the drain timeout, then is closed. First the
    // idle session must be gone from the listener too (its max_connections slot is free).
    assert!(
        eventually(Duration::from_secs(5), || async {
            in_flight(&lb, echo.addr).await == 0
                && metrics_text(&lb)
                    .await
                    .contains("fulcrum_client_connections_open{listener=\"front\"} 0")
        })
        .await
    );
    let mut session = open_session(lb.addr).await;
    let removed = client()
        .delete(format!(
            "{}/api/pools/app/backends/{}",
            lb.admin_url(),
            echo.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 202);
    // Keep it busy (so the idle timeout cannot be what closes it) until it is closed.
    let removed_at = Instant::now();
    let mut echoes = 0;
    loop {
        assert!(
            removed_at.elapsed() < Duration::from_secs(5),
            "session outlived the drain timeout"
        );
        if session.write_all(b"y").await.is_err() {
            break;
        }
        let mut byte = [0u8; 1];
        match session.read(&mut byte).await {
            Ok(1) => echoes += 1,
            _ => break,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let lasted = removed_at.elapsed();
    assert!(
        echoes >= 3,
        "a draining backend's session must keep working"
    );
    assert!(
        lasted >= Duration::from_millis(900),
        "closed before the drain timeout: {lasted:?}"
    );
    assert!(
        eventually(Duration::from_secs(3), || async {
            app_backends(&lb).await.is_empty()
        })
        .await
    );
}
