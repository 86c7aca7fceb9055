//! End-to-end: the HTTP load balancer over real sockets, with real backend processes.

mod common;

use std::time::Duration;

use common::*;
use fulcrum::cli::demo_backend::{pattern_byte, Fnv1a};

fn assert_share(
    counts: &std::collections::HashMap<String, usize>,
    name: &str,
    total: usize,
    share: f64,
) {
    let got = *counts.get(name).unwrap_or(&0) as f64 / total as f64;
    assert!(
        (got - share).abs() <= 0.02,
        "{name}: share {got:.3}, expected {share:.3} ±0.02; counts {counts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let backends = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let lb = balancer(
        &backends.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "algorithm = \"round_robin\"",
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 3000, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    for name in ["a", "b", "c"] {
        assert_share(&counts, name, 3000, 1.0 / 3.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_are_honoured() {
    let backends = [
        backend("heavy", 0),
        backend("light1", 0),
        backend("light2", 0),
    ];
    let weighted = [
        (backends[0].addr, 2),
        (backends[1].addr, 1),
        (backends[2].addr, 1),
    ];
    let lb = balancer(&weighted, "algorithm = \"round_robin\"");
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 3000, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_share(&counts, "heavy", 3000, 0.5);
    assert_share(&counts, "light1", 3000, 0.25);
    assert_share(&counts, "light2", 3000, 0.25);

    // Load-based algorithms follow weights through the load: with every answer taking 20 ms,
    // requests pile up in flight, and a backend of weight 2 is given about twice the
    // in-flight requests of a backend of weight 1. (With instant answers nothing is in
    // flight and scheduling noise decides, so the backends are slowed down here.)
    let slow = [
        backend("heavy", 20),
        backend("light1", 20),
        backend("light2", 20),
    ];
    let weighted = [(slow[0].addr, 2), (slow[1].addr, 1), (slow[2].addr, 1)];
    for algorithm in ["least_conn", "p2c", "peak_ewma"] {
        let lb = balancer(&weighted, &format!("algorithm = \"{algorithm}\""));
        let (counts, failures) = spread(&format!("http://{}/", lb.addr), 1200, 16).await;
        assert!(failures.is_empty(), "{algorithm}: {failures:?}");
        assert_eq!(counts.len(), 3, "{algorithm}: {counts:?}");
        let lightest = counts["light1"].max(counts["light2"]);
        assert!(
            counts["heavy"] * 10 >= lightest * 13,
            "{algorithm}: weight 2 should take clearly more than weight 1: {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_backend_costs_no_request() {
    let mut backends = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let lb = balancer(
        &backends.iter().map(|b| (b.addr, 1)).collect::<Vec<_>>(),
        "",
    );
    let url = format!("http://{}/", lb.addr);
    let load = tokio::spawn(async move { spread(&url, 4000, 16).await });
    // Kill one backend while the load runs: wait until some requests went through first.
    let probe = client();
    for _ in 0..200 {
        if probe
            .get(format!("http://{}/", lb.addr))
            .send()
            .await
            .is_ok()
        {
            break;
        }
    }
    backends[1].kill();
    let (counts, failures) = load.await.unwrap();
    assert!(failures.is_empty(), "client saw failures: {failures:?}");
    assert_eq!(counts.values().sum::<usize>(), 4000);
    assert!(counts["a"] > 0 && counts["c"] > 0, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_backends_dead_gives_503_at_once() {
    let lb = balancer(&[(dead_address(), 1), (dead_address(), 1)], "");
    let client = client();
    for _ in 0..3 {
        let response = tokio::time::timeout(
            Duration::from_secs(5),
            client.get(format!("http://{}/", lb.addr)).send(),
        )
        .await
        .expect("answered without hanging")
        .unwrap();
        assert_eq!(response.status(), 503);
        let body = response.text().await.unwrap();
        assert!(body.contains("no backend available"), "{body}");
        assert_eq!(body.lines().count(), 1);
    }
    assert!(lb.logs().contains("backend unreachable"), "{}", lb.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_backend_gives_504_and_lying_backend_502() {
    let slow = backend("slow", 2000);
    let lb = balancer(
        &[(slow.addr, 1)],
        "[pools.app.timeouts]\nrequest = \"300ms\"",
    );
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    assert!(
        lb.logs().contains(&slow.addr.to_string()),
        "log names the backend: {}",
        lb.logs()
    );

    // A "backend" that accepts, reads the request and closes without answering.
    let liar = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let liar_addr = liar.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        for stream in liar.incoming().take(4) {
            let mut stream = stream.unwrap();
            let mut buffer = [0u8; 4096];
            let _ = stream.read(&mut buffer);
        }
    });
    let lb = balancer(&[(liar_addr, 1)], "");
    let response = client()
        .post(format!("http://{}/", lb.addr))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert!(response.text().await.unwrap().contains("bad gateway"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_headers_are_set_and_hop_by_hop_removed() {
    let b = backend("echo", 0);
    let lb = balancer(&[(b.addr, 1)], "");
    let response = client()
        .get(format!("http://{}/x?echo=headers", lb.addr))
        .header("x-forwarded-for", "203.0.113.9")
        .header("connection", "keep-alive, x-private")
        .header("x-private", "secret")
        .header("keep-alive", "timeout=5")
        .header("host", "shop.example")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json_value().await;
    let echo = &body["echo"];
    assert_eq!(echo["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(echo["x-forwarded-proto"], "http");
    assert_eq!(echo["x-forwarded-host"], "shop.example");
    assert_eq!(echo["host"], "shop.example");
    assert!(
        echo.get("x-private").is_none() && echo.get("keep-alive").is_none(),
        "{echo}"
    );
}

/// Reads a JSON body (reqwest's `json` feature is not needed for one call).
trait JsonValue {
    async fn json_value(self) -> serde_json::Value;
}

impl JsonValue for reqwest::Response {
    async fn json_value(self) -> serde_json::Value {
        serde_json::from_slice(&self.bytes().await.unwrap()).unwrap()
    }
}

/// A request body of `total` bytes of the backend's pattern, generated as it is sent.
struct PatternBody {
    sent: u64,
    total: u64,
}

impl http_body::Body for PatternBody {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if self.sent >= self.total {
            return std::task::Poll::Ready(None);
        }
        let len = (256 * 1024u64).min(self.total - self.sent);
        let chunk: Vec<u8> = (self.sent..self.sent + len).map(pattern_byte).collect();
        self.sent += len;
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk.into()))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.total - self.sent)
    }
}

fn pattern_hash(total: u64) -> String {
    let mut hash = Fnv1a::default();
    let mut offset = 0;
    while offset < total {
        let len = (1u64 << 20).min(total - offset);
        let chunk: Vec<u8> = (offset..offset + len).map(pattern_byte).collect();
        hash.update(&chunk);
        offset += len;
    }
    format!("{:016x}", hash.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_bodies_stream_both_ways_with_bounded_memory() {
    const SIZE: u64 = 256 * 1024 * 1024;
    let b = backend("bulk", 0);
    // 256 MiB is over the default `max_body_bytes` (100 MiB): the listener allows 1 GiB.
    let config = config_for(&[(b.addr, 1)], "").replace(
        "pool = \"app\"\n\n",
        "pool = \"app\"\nmax_body_bytes = 1073741824\n\n",
    );
    let lb = balancer_with(&config, 1);
    let expected = pattern_hash(SIZE);
    let client = client();

    // Upload: the backend hashes what it received.
    let response = client
        .post(format!("http://{}/upload", lb.addr))
        .body(reqwest::Body::wrap(PatternBody {
            sent: 0,
            total: SIZE,
        }))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.json_value().await;
    assert_eq!(body["body_bytes"], SIZE);
    assert_eq!(body["body_fnv"], expected.as_str());

    // Download: we hash what we received.
    let mut response = client
        .get(format!("http://{}/bytes/{SIZE}", lb.addr))
        .timeout(Duration::from_secs(120))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut hash = Fnv1a::default();
    let mut received = 0u64;
    while let Some(chunk) = response.chunk().await.unwrap() {
        received += chunk.len() as u64;
        hash.update(&chunk);
    }
    assert_eq!(received, SIZE);
    assert_eq!(format!("{:016x}", hash.0), expected);

    let peak_kib = lb.peak_rss_kib();
    assert!(
        peak_kib < 64 * 1024,
        "balancer peak RSS {peak_kib} KiB, limit 64 MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() {
    // The backend is this test: it tells us when the request arrived and answers only after
    // the balancer was told to stop, so the request is provably in flight during shutdown.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let backend_addr = backend.local_addr().unwrap();
    let (arrived_tx, arrived_rx) = std::sync::mpsc::channel();
    let (answer_tx, answer_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut stream, _) = backend.accept().unwrap();
        let mut buffer = [0u8; 4096];
        let _ = stream.read(&mut buffer);
        arrived_tx.send(()).unwrap();
        answer_rx.recv().unwrap();
        let _ = stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-backend: test\r\n\r\nlate\n");
    });
    let mut lb = balancer(&[(backend_addr, 1)], "");
    let url = format!("http://{}/", lb.addr);
    let in_flight = tokio::spawn(async move { client().get(url).send().await });
    tokio::task::spawn_blocking(move || arrived_rx.recv_timeout(Duration::from_secs(10)))
        .await
        .unwrap()
        .expect("request reached the backend");
    lb.signal("TERM");
    // Stopped accepting: new connections are refused while the old request is still open.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        while std::net::TcpStream::connect(lb.addr).is_ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(refused.is_ok(), "listener still accepting after SIGTERM");
    answer_tx.send(()).unwrap();
    let response = in_flight
        .await
        .unwrap()
        .expect("in-flight request completed");
    assert_eq!(response.status(), 200);
    assert_eq!(response.text().await.unwrap(), "late\n");
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        lb.logs()
    );
}
