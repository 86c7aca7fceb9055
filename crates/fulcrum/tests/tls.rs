//! End-to-end: TLS termination (SNI, ALPN h2, certificate reload), upstream TLS and HTTP/2,
//! and a gRPC-style stream with trailers, over real sockets with certificates made by rcgen.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// An HTTPS client trusting `ca_pem`, with `names` resolved to `addr`, reporting TLS info.
fn https_client(ca_pem: &str, names: &[&str], addr: SocketAddr) -> reqwest::Client {
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .tls_backend_preconfigured(trusting(ca_pem))
        .tls_info(true);
    for name in names {
        builder = builder.resolve(name, addr);
    }
    builder.build().unwrap()
}

/// The DER of the certificate the server presented for `response`.
fn peer_cert(response: &reqwest::Response) -> Vec<u8> {
    response
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|info| info.peer_certificate())
        .expect("TLS info with the peer certificate")
        .to_vec()
}

/// Opens a TLS connection with `server_name` as SNI (none for an IP) accepting any
/// certificate, and returns the certificate the server presented.
async fn presented_cert(addr: SocketAddr, server_name: &str) -> Vec<u8> {
    let config = fulcrum::upstream::tls::client_config(None, false, b"http/1.1").unwrap();
    let connector = tokio_rustls::TlsConnector::from(config);
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let tls = connector.connect(name, stream).await.unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn https_listener(certs: &[(&Path, &Path, bool)]) -> String {
    let mut text = String::from(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\npool = \"app\"\n",
    );
    for (cert, key, default) in certs {
        text.push_str(&format!(
            "[[listeners.web.tls.certs]]\ncert = \"{}\"\nkey = \"{}\"\ndefault = {default}\n",
            cert.display(),
            key.display()
        ));
    }
    text
}

fn config(listener: &str, backends: &[SocketAddr], pool_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n{listener}\n[pools.app]\nbackends = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_selects_the_certificate_of_each_host_name() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (a, b) = (ca.leaf(&["a.test"]), ca.leaf(&["b.test", "*.b.test"]));
    let (a_cert, a_key) = a.write(dir.path(), "a");
    let (b_cert, b_key) = b.write(dir.path(), "b");
    let backend = backend("one", 0);
    let lb = balancer_with(
        &config(
            &https_listener(&[(&a_cert, &a_key, false), (&b_cert, &b_key, true)]),
            &[backend.addr],
            "",
        ),
        1,
    );
    let client = https_client(&ca.pem(), &["a.test", "b.test", "x.b.test"], lb.addr);
    let port = lb.addr.port();
    for (host, leaf) in [("a.test", &a), ("b.test", &b), ("x.b.test", &b)] {
        let response = client
            .get(format!("https://{host}:{port}/?echo=headers"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(response.status(), 200, "{host}");
        assert!(
            peer_cert(&response) == leaf.der,
            "{host}: wrong certificate"
        );
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).unwrap();
        assert_eq!(body["echo"]["x-forwarded-proto"], "https", "{body}");
        assert_eq!(body["name"], "one");
    }
    // No SNI (an IP address) and an unknown name get the default certificate (b).
    assert!(presented_cert(lb.addr, "127.0.0.1").await == b.der);
    assert!(presented_cert(lb.addr, "unknown.test").await == b.der);
    // TLS 1.2 and TLS 1.3 are both offered.
    for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::pem::PemObject::from_pem_slice(ca.pem().as_bytes()).unwrap())
            .unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(fulcrum::config::certs::provider())
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
        let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        let tls = connector
            .connect("a.test".try_into().unwrap(), stream)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.protocol_version(), Some(version.version));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_and_requests_multiplex_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["app.test"]).write(dir.path(), "app");
    let backend = backend("one", 0);
    let lb = balancer_with(
        &config(
            &https_listener(&[(&cert, &key, false)]),
            &[backend.addr],
            "",
        ),
        1,
    );
    let client = https_client(&ca.pem(), &["app.test"], lb.addr);
    let url = format!("https://app.test:{}/?delay_ms=300", lb.addr.port());
    // One request first, so the connection exists before the burst.
    let first = client.get(&url).send().await.unwrap();
    assert_eq!(first.version(), reqwest::Version::HTTP_2);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move {
            let response = client.get(&url).send().await.unwrap();
            (response.status(), response.version())
        });
    }
    while let Some(result) = tasks.join_next().await {
        let (status, version) = result.unwrap();
        assert_eq!(status, 200);
        assert_eq!(version, reqwest::Version::HTTP_2);
    }
    // 50 requests of 300 ms each, done together: they ran concurrently.
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_secs(3),
        "50 requests took {elapsed:?}"
    );
    let metrics = client_metrics(&lb).await;
    assert!(
        metrics.contains("fulcrum_client_connections_accepted_total{listener=\"web\"} 1\n"),
        "expected exactly one client connection:\n{metrics}"
    );
}

async fn client_metrics(lb: &Proc) -> String {
    metrics_text(lb).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_reload_switches_new_handshakes_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let old = ca.leaf(&["app.test"]);
    let (cert, key) = old.write(dir.path(), "app");
    let backend = backend("one", 0);
    let lb = balancer_with(
        &config(
            &https_listener(&[(&cert, &key, false)]),
            &[backend.addr],
            "",
        ),
        1,
    );
    let url = format!("https://app.test:{}/", lb.addr.port());
    // An open HTTP/2 connection, kept by this client's pool.
    let kept = https_client(&ca.pem(), &["app.test"], lb.addr);
    let response = kept.get(&url).send().await.unwrap();
    assert!(peer_cert(&response) == old.der);

    // New certificate files: picked up by the file watcher.
    let new = ca.leaf(&["app.test"]);
    new.write(dir.path(), "app");
    let switched = eventually(Duration::from_secs(10), || async {
        let fresh = https_client(&ca.pem(), &["app.test"], lb.addr);
        match fresh.get(&url).send().await {
            Ok(response) => peer_cert(&response) == new.der,
            Err(_) => false,
        }
    })
    .await;
    assert!(switched, "new handshakes never got the new certificate");
    let recorded = eventually(Duration::from_secs(5), || async {
        let events = admin_get(&lb, "/api/events").await;
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "cert_reload")
    })
    .await;
    assert!(recorded, "no cert_reload event");

    // The connection opened before the reload still works (same connection: same old cert).
    let response = kept.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        peer_cert(&response) == old.der,
        "the open connection was replaced"
    );

    // A broken key: the reload is refused with the file named, the current cert stays.
    std::fs::write(&key, "not a key").unwrap();
    let reload = client()
        .post(format!("{}/api/reload", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let error = reload.text().await.unwrap();
    assert!(error.contains(key.to_str().unwrap()), "{error}");
    let fresh = https_client(&ca.pem(), &["app.test"], lb.addr);
    let response = fresh.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(peer_cert(&response) == new.der);
    let logged = eventually(Duration::from_secs(5), || async {
        lb.logs().contains("cannot be loaded")
    })
    .await;
    assert!(logged, "the file watcher did not report the bad key");
    // It keeps the current certificate too.
    let response = fresh.get(&url).send().await.unwrap();
    assert!(peer_cert(&response) == new.der);
}

fn check(text: &str) -> (i32, String) {
    let (_dir, path) = write_config(text);
    let output = Command::new(fulcrum_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn check_names_a_missing_or_bad_certificate_file() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["app.test"]).write(dir.path(), "app");
    let (_, other_key) = ca.leaf(&["other.test"]).write(dir.path(), "other");
    let backends = ["127.0.0.1:9001".parse().unwrap()];
    let good = config(&https_listener(&[(&cert, &key, false)]), &backends, "");
    let (code, stderr) = check(&good);
    assert_eq!(code, 0, "{stderr}");

    let missing = dir.path().join("missing.crt");
    let (code, stderr) = check(&config(
        &https_listener(&[(&missing, &key, false)]),
        &backends,
        "",
    ));
    assert_eq!(code, 1);
    assert!(
        stderr.contains(missing.to_str().unwrap()) && stderr.contains("cannot read certificate"),
        "{stderr}"
    );

    let (code, stderr) = check(&config(
        &https_listener(&[(&cert, &other_key, false)]),
        &backends,
        "",
    ));
    assert_eq!(code, 1);
    assert!(
        stderr.contains(other_key.to_str().unwrap()) && stderr.contains("does not match"),
        "{stderr}"
    );

    let (code, stderr) = check(&good.replace("protocol = \"https\"", "protocol = \"http\""));
    assert_eq!(code, 1);
    assert!(stderr.contains("not \"https\""), "{stderr}");
}

/// GETs `url` and returns the backend's JSON answer (status must be 200).
async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    let response = client.get(url).send().await.unwrap();
    assert_eq!(response.status(), 200, "{url}");
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn plain_listener() -> String {
    "[listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_verifies_with_the_pool_ca_and_speaks_h1_or_h2() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["backend.test"]).write(dir.path(), "backend");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let backend = tls_backend("secure", &cert, &key);
    let ca_line = format!(
        "tls = true\nca = \"{}\"\nsni = \"backend.test\"",
        ca_path.display()
    );
    for (extra, version) in [
        (ca_line.clone(), "HTTP/1.1"),
        (format!("{ca_line}\nprotocol = \"h2\""), "HTTP/2.0"),
        // No CA: the test CA is not trusted, but verify = false accepts any certificate.
        (
            "tls = true\nverify = false\nprotocol = \"h2\"".to_string(),
            "HTTP/2.0",
        ),
    ] {
        // HTTP health checks go the same way (TLS, HTTP/2): the backend must come up.
        let extra =
            format!("{extra}\n[pools.app.health]\npath = \"/healthz\"\ninterval = \"100ms\"\n");
        let lb = balancer_with(&config(&plain_listener(), &[backend.addr], &extra), 1);
        let id = backend.addr.to_string();
        let up = eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await[&id]["health"] == "up"
        })
        .await;
        assert!(up, "health check over TLS failed ({extra}): {}", lb.logs());
        let body = get_json(&client(), &format!("http://{}/", lb.addr)).await;
        assert_eq!(body["name"], "secure", "{extra}");
        assert_eq!(body["version"], version, "{extra}");
    }
    // Verification on, without the CA: the backend is not trusted, the client gets an error.
    let lb = balancer_with(
        &config(
            &plain_listener(),
            &[backend.addr],
            "tls = true\nsni = \"backend.test\"\nmax_attempts = 1",
        ),
        1,
    );
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_server_error(), "{}", response.status());
    let logged = eventually(Duration::from_secs(5), || async {
        lb.logs().contains("TLS handshake failed")
    })
    .await;
    assert!(logged, "{}", lb.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_upstream_multiplexes_requests_on_one_connection() {
    let backend = backend("one", 0);
    // One worker: each worker keeps its own HTTP/2 connection (tests/workers.rs).
    let lb = balancer_with(
        &format!(
            "[server]\nworkers = 1\n\n{}",
            config(&plain_listener(), &[backend.addr], "protocol = \"h2\"")
        ),
        1,
    );
    let url = format!("http://{}/?delay_ms=200", lb.addr);
    let client = client();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..40 {
        let (client, url) = (client.clone(), url.clone());
        tasks.spawn(async move { get_json(&client, &url).await });
    }
    while let Some(body) = tasks.join_next().await {
        assert_eq!(body.unwrap()["version"], "HTTP/2.0");
    }
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "took {elapsed:?}");
    let metrics = client_metrics(&lb).await;
    let opened = metrics
        .lines()
        .find(|l| l.starts_with("fulcrum_upstream_connections_opened_total{"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        opened.ends_with(" 1"),
        "expected one backend connection: {opened}"
    );
}

/// A gRPC-style bidirectional stream over an HTTP/2 connection `sender` to `uri`: each
/// message is echoed before the next is sent, then the trailers arrive.
async fn grpc_echo_roundtrip(
    mut sender: hyper::client::conn::http2::SendRequest<
        http_body_util::channel::Channel<bytes::Bytes>,
    >,
    uri: &str,
) {
    use http_body_util::BodyExt;
    let (mut body_tx, body) = http_body_util::channel::Channel::new(4);
    let request = http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(body)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .expect("response head in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/grpc");
    let mut body = response.into_body();
    for i in 0..5 {
        let message = bytes::Bytes::from(format!("message {i}"));
        body_tx.send_data(message.clone()).await.unwrap();
        // The echo arrives while the request is still open: streaming in both directions.
        let mut echoed = Vec::new();
        while echoed.len() < message.len() {
            let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
                .await
                .expect("echo in time")
                .expect("a frame")
                .unwrap();
            echoed.extend_from_slice(&frame.into_data().expect("data before trailers"));
        }
        assert_eq!(echoed, message);
    }
    drop(body_tx);
    let mut trailers = None;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(10), body.frame())
        .await
        .expect("end in time")
    {
        if let Ok(t) = frame.unwrap().into_trailers() {
            trailers = Some(t);
        }
    }
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers["grpc-status"], "0");
    assert_eq!(trailers["grpc-message"], "echoed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_stream_with_trailers_passes_through_h2c_and_tls() {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    // Clear text: h2c prior knowledge to Fulcrum, h2c to the backend.
    let backend = backend("grpc", 0);
    let lb = balancer_with(
        &config(&plain_listener(), &[backend.addr], "protocol = \"h2\""),
        1,
    );
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(connection);
    grpc_echo_roundtrip(sender, &format!("http://{}/grpc-echo", lb.addr)).await;

    // TLS on both sides: ALPN h2 from the client, TLS + h2 to the backend.
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (front_cert, front_key) = ca.leaf(&["grpc.test"]).write(dir.path(), "front");
    let (back_cert, back_key) = ca.leaf(&["backend.test"]).write(dir.path(), "back");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let tls_backend = tls_backend("grpc-tls", &back_cert, &back_key);
    let lb = balancer_with(
        &config(
            &https_listener(&[(&front_cert, &front_key, false)]),
            &[tls_backend.addr],
            &format!(
                "protocol = \"h2\"\ntls = true\nca = \"{}\"\nsni = \"backend.test\"",
                ca_path.display()
            ),
        ),
        1,
    );
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(trusting(&ca.pem())));
    let tls = connector
        .connect("grpc.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    grpc_echo_roundtrip(
        sender,
        &format!("https://grpc.test:{}/grpc-echo", lb.addr.port()),
    )
    .await;
}

/// A raw HTTP/1.1 (ALPN `http/1.1`) TLS connection to `addr` for `app.test`, trusting
/// `ca_pem`; `preamble` (a PROXY protocol header) is sent before the handshake.
async fn http1_over_tls(
    ca_pem: &str,
    addr: SocketAddr,
    preamble: &[u8],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let mut config = trusting(ca_pem);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(preamble).await.unwrap();
    connector
        .connect("app.test".try_into().unwrap(), stream)
        .await
        .unwrap()
}

/// Sends a GET on a raw HTTP/1.1 `stream` and asserts a 200 that keeps the connection.
async fn get_ok<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: &mut S) {
    use tokio::io::AsyncWriteExt;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let response = read_response(stream).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(
        !response.to_ascii_lowercase().contains("connection: close"),
        "{response}"
    );
}

/// The pauses here are the idle times under test, not waits for readiness.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_https_clients_are_kept_until_keep_alive_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["app.test"]).write(dir.path(), "app");
    let backend = backend("one", 0);
    let timeouts = "header_read_timeout = \"500ms\"\nkeep_alive_timeout = \"3s\"\n";
    let listener = https_listener(&[(&cert, &key, false)]);
    // The same listener again, behind a PROXY protocol header.
    let proxied = listener
        .replace("listeners.web", "listeners.proxied")
        .replacen(
            "pool = \"app\"\n",
            "pool = \"app\"\naccept_proxy_protocol = true\n",
            1,
        );
    let listeners = format!("{listener}\n{proxied}")
        .replace("pool = \"app\"\n", &format!("pool = \"app\"\n{timeouts}"));
    let lb = balancer_with(&config(&listeners, &[backend.addr], ""), 2);

    // Idle longer than header_read_timeout between requests: the connection stays.
    let mut idle = http1_over_tls(&ca.pem(), lb.listeners["web"], b"").await;
    get_ok(&mut idle).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    get_ok(&mut idle).await;
    let answered = Instant::now();

    // A request head that stalls is still bounded by header_read_timeout.
    let mut slow = http1_over_tls(&ca.pem(), lb.listeners["web"], b"").await;
    get_ok(&mut slow).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    slow.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
    let waited = started.elapsed();
    assert!(closed.is_ok(), "a stalled head was not closed within 3 s");
    assert!(
        waited >= Duration::from_millis(400) && waited <= Duration::from_millis(2000),
        "stalled head closed after {waited:?}"
    );

    // TLS after a PROXY protocol header, idle past header_read_timeout too.
    let front: SocketAddr = "203.0.113.9:4242".parse().unwrap();
    let header = fulcrum::wire::proxy_protocol::encode_v1(front, lb.listeners["proxied"]);
    let mut proxied = http1_over_tls(&ca.pem(), lb.listeners["proxied"], header.as_bytes()).await;
    get_ok(&mut proxied).await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    get_ok(&mut proxied).await;

    // Idle past keep_alive_timeout (3 s after its last answer): closed.
    closed_within(&mut idle, Duration::from_secs(5)).await;
    let idle_for = answered.elapsed();
    assert!(
        idle_for >= Duration::from_millis(2900) && idle_for <= Duration::from_millis(4500),
        "closed after {idle_for:?} idle"
    );
}

/// A relay in front of `target` that records the first byte of every connection it is sent
/// (a TLS handshake starts with 0x16), then passes the bytes on both ways.
async fn first_byte_spy(
    target: SocketAddr,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<u8>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if inbound.read_exact(&mut first).await.is_err() {
                    return;
                }
                record.lock().unwrap().push(first[0]);
                let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                    return;
                };
                if outbound.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    (addr, seen)
}

/// A WebSocket to a `tls = true` pool goes out over TLS (the backend's port sees a TLS
/// handshake first), verified with the pool's CA and SNI, with ALPN http/1.1 also when the
/// pool speaks HTTP/2 (the backend offers both: an h2 ALPN would break the upgrade).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_to_a_tls_pool_is_encrypted_and_verified() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["backend.test"]).write(dir.path(), "backend");
    let ca_path = dir.path().join("ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let backend = tls_backend("wss", &cert, &key);
    let (spy, first_bytes) = first_byte_spy(backend.addr).await;
    let ca_line = format!(
        "tls = true\nca = \"{}\"\nsni = \"backend.test\"",
        ca_path.display()
    );
    for protocol in ["http1", "h2"] {
        let extra = format!("{ca_line}\nprotocol = \"{protocol}\"");
        let lb = balancer_with(&config(&plain_listener(), &[spy], &extra), 1);
        let stream = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        let (mut socket, response) =
            tokio_tungstenite::client_async(format!("ws://{}/ws", lb.addr), stream)
                .await
                .unwrap_or_else(|e| {
                    panic!("WebSocket via a TLS pool ({protocol}): {e}\n{}", lb.logs())
                });
        assert_eq!(response.status(), 101, "{protocol}");
        assert_eq!(response.headers()["x-backend"], "wss", "{protocol}");
        for i in 0..3 {
            let text = format!("{protocol} over TLS {i}");
            socket.send(Message::text(text.clone())).await.unwrap();
            assert_eq!(socket.next().await.unwrap().unwrap(), Message::text(text));
        }
        socket.close(None).await.unwrap();
        while let Some(Ok(_)) = socket.next().await {}
        // A refused upgrade (no Sec-WebSocket-Key) is an ordinary response, whole, over the
        // same TLS connection.
        let mut raw = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(
            &mut raw,
            b"GET /ws HTTP/1.1\r\nhost: test\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let refused = read_response(&mut raw).await;
        assert!(refused.starts_with("HTTP/1.1 400"), "{protocol}: {refused}");
        assert!(
            refused.contains("expected a WebSocket upgrade"),
            "{refused}"
        );
        let seen = first_bytes.lock().unwrap().clone();
        assert!(
            !seen.is_empty(),
            "{protocol}: the backend saw no connection"
        );
        assert!(
            seen.iter().all(|&b| b == 0x16),
            "{protocol}: a connection to the TLS pool began with {seen:x?}, not a TLS handshake"
        );
        first_bytes.lock().unwrap().clear();
    }
}

/// HTTP/2 over TLS (ALPN `h2`) holds a connection slot like HTTP/1.1: idle (no stream open)
/// past `keep_alive_timeout` it gets a GOAWAY and closes; silent after the TLS handshake it is
/// closed at `header_read_timeout`. The pauses are the timeouts under test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_silent_h2_clients_over_tls_are_closed() {
    use http_body_util::BodyExt;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key) = ca.leaf(&["app.test"]).write(dir.path(), "app");
    let backend = backend("one", 0);
    let listener = https_listener(&[(&cert, &key, false)]).replace(
        "pool = \"app\"\n",
        "pool = \"app\"\nheader_read_timeout = \"500ms\"\nkeep_alive_timeout = \"1s\"\n",
    );
    let lb = balancer_with(&config(&listener, &[backend.addr], ""), 1);
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(trusting(&ca.pem())));

    // One request, then idle.
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let tls = connector
        .connect("app.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    let closed = tokio::spawn(async move {
        let _ = connection.await;
        Instant::now()
    });
    let request = http::Request::get(format!("https://app.test:{}/", lb.addr.port()))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap();
    let answered = Instant::now();
    let closed_at = tokio::time::timeout(Duration::from_secs(5), closed)
        .await
        .expect("the idle h2 connection was not closed within 5 s")
        .unwrap();
    let idle = closed_at - answered;
    assert!(
        idle >= Duration::from_millis(800) && idle < Duration::from_secs(3),
        "closed after {idle:?} idle"
    );

    // The TLS handshake, then not even the HTTP/2 preface.
    let tcp = tokio::net::TcpStream::connect(lb.addr).await.unwrap();
    let mut silent = connector
        .connect("app.test".try_into().unwrap(), tcp)
        .await
        .unwrap();
    assert_eq!(silent.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let started = Instant::now();
    closed_within(&mut silent, Duration::from_secs(5)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "silent h2 client closed after {waited:?}"
    );
}
