//! End-to-end: the demo backend's `/stats` counters, which the benchmarks use to measure the
//! upstream connection reuse share.

mod common;

use common::*;

async fn stats(client: &reqwest::Client, addr: std::net::SocketAddr) -> (u64, u64) {
    let bytes = client
        .get(format!("http://{addr}/stats"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    (
        body["connections"].as_u64().unwrap(),
        body["requests"].as_u64().unwrap(),
    )
}

/// GETs `path` on one explicit HTTP/1.1 connection and returns the body.
async fn get_on(
    sender: &mut hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    path: &str,
) -> bytes::Bytes {
    use http_body_util::BodyExt;
    sender.ready().await.unwrap();
    let request = http::Request::get(path)
        .header(http::header::HOST, "backend")
        .body(http_body_util::Empty::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    response.into_body().collect().await.unwrap().to_bytes()
}

/// A new keep-alive connection to `addr` (its driver runs in the background).
async fn connection(
    addr: std::net::SocketAddr,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, driver) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(driver);
    sender
}

fn counters(body: &[u8]) -> (u64, u64) {
    let body: serde_json::Value = serde_json::from_slice(body).unwrap();
    (
        body["connections"].as_u64().unwrap(),
        body["requests"].as_u64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_counts_connections_and_requests() {
    let b = backend("b", 0);
    // Exactly one connection (not a client pool, whose reuse is timing-dependent) carries 5
    // requests and then /stats itself; /stats is not counted as a request.
    let mut first = connection(b.addr).await;
    for _ in 0..5 {
        get_on(&mut first, "/").await;
    }
    assert_eq!(counters(&get_on(&mut first, "/stats").await), (1, 5));
    let mut second = connection(b.addr).await;
    assert_eq!(counters(&get_on(&mut second, "/stats").await), (2, 5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancer_reuses_upstream_connections() {
    let b = backend("b", 0);
    let lb = balancer(&[(b.addr, 1)], "");
    let client = client();
    for _ in 0..50 {
        let response = client
            .get(format!("http://{}/", lb.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let (connections, requests) = stats(&client, b.addr).await;
    assert_eq!(requests, 50);
    // 50 sequential requests over pooled keep-alive connections (plus this /stats one): a
    // connection is back in the pool as soon as its response ends, so a handful at most.
    assert!(
        connections <= 4,
        "{connections} upstream connections for 50 requests"
    );
}
