//! End to end: `max_connections_per_ip` on an HTTP and a TCP listener, and
//! `requests_per_ip` (429 with `Retry-After`). Real `fulcrum` processes; raw client sockets
//! bound to 127.0.0.1 and 127.0.0.2, or presenting other client IPs in PROXY v1 headers.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// Config with one listener `front` (`protocol`) in front of `backend`, 3 connections per IP.
fn config(protocol: &str, backend: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.front]\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\npool = \"app\"\n\
         max_connections_per_ip = 3\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

/// A connection to `addr` from the local address `from`.
async fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse::<IpAddr>().unwrap(), 0))
        .unwrap();
    socket.connect(addr).await.unwrap()
}

/// Whether `stream` is served: a request (HTTP) or a line (TCP echo) gets an answer, rather
/// than the connection closing. Bounded to 5 s.
async fn served(stream: &mut TcpStream, http: bool) -> bool {
    let probe: &[u8] = if http {
        b"GET / HTTP/1.1\r\nHost: per-ip\r\n\r\n"
    } else {
        b"ping\n"
    };
    if stream.write_all(probe).await.is_err() {
        return false;
    }
    let mut data = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => data.extend_from_slice(&buffer[..n]),
            }
            let done = if http {
                data.windows(4).any(|w| w == b"\r\n\r\n")
            } else {
                data.ends_with(b"\n")
            };
            if done {
                return true;
            }
        }
    })
    .await
    .expect("neither an answer nor a close within 5 s");
    if read && http {
        assert!(data.starts_with(b"HTTP/1.1 200"), "{data:?}");
    }
    read && (http || data == b"ping\n")
}

/// A served connection from `from`: retried (bounded) while the server may still be
/// releasing a closed connection's count.
async fn served_from(from: &str, addr: SocketAddr, http: bool) -> TcpStream {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = connect_from(from, addr).await;
        if served(&mut stream, http).await {
            return stream;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no connection from {from} served within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The value of metric `name` for listener `front`.
async fn front_metric(lb: &Proc, name: &str) -> f64 {
    let text = metrics_text(lb).await;
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("listener=\"front\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

async fn limits_connections_per_ip(lb: &Proc, http: bool) {
    let addr = lb.listeners["front"];
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(served_from("127.0.0.1", addr, http).await);
    }
    // The 4th from the same IP is closed at accept.
    let mut fourth = connect_from("127.0.0.1", addr).await;
    closed_within(&mut fourth, Duration::from_secs(2)).await;
    assert_eq!(
        front_metric(lb, "fulcrum_client_connections_refused_per_ip_total").await,
        1.0
    );
    assert_eq!(
        front_metric(lb, "fulcrum_client_connections_refused_total").await,
        0.0
    );
    // Another IP is served.
    let other = served_from("127.0.0.2", addr, http).await;
    // Closing one of the three frees its place.
    drop(open.pop());
    open.push(served_from("127.0.0.1", addr, http).await);
    drop((open, other));
    assert!(lb.logs().contains("connection limit per client IP reached"));
}

#[tokio::test]
async fn http_listener_limits_connections_per_ip() {
    let backend = backend("app", 0);
    let lb = balancer_with(&config("http", backend.addr), 1);
    limits_connections_per_ip(&lb, true).await;
}

#[tokio::test]
async fn tcp_listener_limits_connections_per_ip() {
    let echo = backend_with("echo", &["--tcp-echo"]);
    let lb = balancer_with(&config("tcp", echo.addr), 1);
    limits_connections_per_ip(&lb, false).await;
}

#[tokio::test]
async fn an_upgraded_connection_keeps_its_place_until_the_tunnel_closes() {
    let backend = backend("ws", 0);
    let lb = balancer_with(&config("http", backend.addr).replace("= 3", "= 1"), 1);
    let addr = lb.listeners["front"];
    let stream = connect_from("127.0.0.1", addr).await;
    let (socket, response) = tokio_tungstenite::client_async(format!("ws://{addr}/ws"), stream)
        .await
        .expect("WebSocket handshake through fulcrum");
    assert_eq!(response.status(), 101);
    // The tunnel holds the IP's one place: another connection from it is closed at accept.
    let mut second = connect_from("127.0.0.1", addr).await;
    closed_within(&mut second, Duration::from_secs(2)).await;
    drop(socket);
    drop(served_from("127.0.0.1", addr, true).await);
}

/// A TLS connection from `from` to `addr` (any certificate accepted) that answers a GET.
async fn tls_served_from(
    from: &str,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let config = fulcrum::upstream::tls::client_config(None, false, b"http/1.1").unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = connect_from(from, addr).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector
        .connect(name, stream)
        .await
        .expect("TLS handshake");
    tls.write_all(b"GET / HTTP/1.1\r\nHost: per-ip\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(&mut tls).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    tls
}

#[tokio::test]
async fn https_listener_limits_connections_per_ip_before_the_handshake() {
    let backend = backend("app", 0);
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.path().join("web.crt"), dir.path().join("web.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let text = config("https", backend.addr).replace("= 3", "= 1").replace(
        "\n\n[pools.app]",
        &format!(
            "\n[[listeners.front.tls.certs]]\ncert = \"{}\"\nkey = \"{}\"\n\n[pools.app]",
            cert_path.display(),
            key_path.display()
        ),
    );
    let lb = balancer_with(&text, 1);
    let addr = lb.listeners["front"];
    let first = tls_served_from("127.0.0.1", addr).await;
    // Refused at accept, before any TLS byte.
    let mut second = connect_from("127.0.0.1", addr).await;
    closed_within(&mut second, Duration::from_secs(2)).await;
    let other = tls_served_from("127.0.0.2", addr).await;
    assert_eq!(
        front_metric(&lb, "fulcrum_client_connections_refused_per_ip_total").await,
        1.0
    );
    drop((first, other));
}

/// Config with an HTTP listener `front` behind a front balancer (PROXY protocol) with
/// `requests_per_ip = { rate = 1, burst = 3 }`.
fn rate_config(backend: SocketAddr) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.front]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\
         accept_proxy_protocol = true\nrequests_per_ip = {{ rate = 1, burst = 3 }}\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

/// A connection to `addr` presenting `client` as its source in a PROXY v1 header.
async fn connect_as(client: &str, addr: SocketAddr) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let source = SocketAddr::new(client.parse().unwrap(), 40000);
    stream
        .write_all(fulcrum::wire::proxy_protocol::encode_v1(source, addr).as_bytes())
        .await
        .unwrap();
    stream
}

/// One keep-alive GET on `stream`: the response's text.
async fn get(stream: &mut TcpStream) -> String {
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: rate\r\n\r\n")
        .await
        .unwrap();
    read_response(stream).await
}

/// The `Retry-After` of a response's text, in seconds.
fn retry_after(response: &str) -> u64 {
    response
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .unwrap_or_else(|| panic!("no Retry-After in {response}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn requests_per_ip_answers_429_with_retry_after_per_client_ip() {
    let backend = backend("app", 0);
    let lb = balancer_with(&rate_config(backend.addr), 1);
    let addr = lb.listeners["front"];
    let mut first = connect_as("203.0.113.1", addr).await;
    // The burst passes, the next request gets 429 on the same, kept-alive, connection.
    for _ in 0..3 {
        let response = get(&mut first).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }
    let limited = get(&mut first).await;
    assert!(limited.starts_with("HTTP/1.1 429"), "{limited}");
    assert!(limited.ends_with("429 too many requests\n"), "{limited}");
    assert!(!limited.contains("connection: close"), "{limited}");
    let wait = retry_after(&limited);
    assert!((1..=2).contains(&wait), "{limited}");
    let limited_at = std::time::Instant::now();
    // Another client IP (through the same front balancer) is served.
    let mut second = connect_as("203.0.113.2", addr).await;
    let response = get(&mut second).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // So is an HTTP/2 client from a third IP, limited alike.
    let mut h2 = h2_as("203.0.113.3", addr).await;
    for _ in 0..3 {
        assert_eq!(h2_status(&mut h2, addr).await.0, 200);
    }
    let (status, retry) = h2_status(&mut h2, addr).await;
    assert_eq!((status, retry.is_some()), (429, true), "{retry:?}");
    assert_eq!(
        front_metric(&lb, "fulcrum_requests_rate_limited_total").await,
        2.0
    );
    // After Retry-After, the first client is served again, on its connection.
    tokio::time::sleep(Duration::from_secs(wait).saturating_sub(limited_at.elapsed())).await;
    let response = get(&mut first).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(lb.logs().contains("requests_per_ip"), "{}", lb.logs());
}

/// A prior-knowledge HTTP/2 connection to `addr` presenting `client` in a PROXY v1 header.
async fn h2_as(
    client: &str,
    addr: SocketAddr,
) -> hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = connect_as(client, addr).await;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    sender
}

/// An HTTP/2 GET: its status and `Retry-After`.
async fn h2_status(
    sender: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    addr: SocketAddr,
) -> (u16, Option<String>) {
    let request = http::Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
        .await
        .expect("an answer within 5 s")
        .unwrap();
    let retry = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (response.status().as_u16(), retry)
}

#[tokio::test]
async fn requests_per_ip_is_one_bucket_across_connections_and_workers() {
    let backend = backend("app", 0);
    let text = rate_config(backend.addr).replace("burst = 3", "burst = 10");
    let lb = balancer_with(&text, 1);
    let addr = lb.listeners["front"];
    // 20 connections from one client IP, spread by the kernel over the 2 workers.
    let started = std::time::Instant::now();
    let mut connections = Vec::new();
    for _ in 0..20 {
        connections.push(connect_as("198.51.100.7", addr).await);
    }
    let answers = futures_util::future::join_all(connections.iter_mut().map(get)).await;
    let elapsed = started.elapsed();
    let passed = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 200"))
        .count();
    let limited = answers
        .iter()
        .filter(|a| a.starts_with("HTTP/1.1 429"))
        .count();
    assert_eq!(passed + limited, 20, "{answers:?}");
    // Exactly the burst, plus one token per whole second the test took (rate = 1).
    let refilled = elapsed.as_secs() as usize;
    assert!(
        (10..=10 + refilled).contains(&passed),
        "{passed} passed in {elapsed:?}"
    );
    // With more than one worker, both served some of them (all 20 on one: odds 2^-19).
    let metrics = metrics_text(&lb).await;
    let by_worker: Vec<f64> = metrics
        .lines()
        .filter(|l| l.starts_with("fulcrum_worker_connections_accepted_total{"))
        .filter(|l| l.contains("listener=\"front\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    assert!(by_worker.iter().all(|&n| n > 0.0), "{by_worker:?}");
}
