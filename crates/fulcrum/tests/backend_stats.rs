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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_counts_connections_and_requests() {
    let b = backend("b", 0);
    let client = client();
    for _ in 0..5 {
        let response = client
            .get(format!("http://{}/", b.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    // One keep-alive connection carried the 5 requests and the /stats request itself;
    // /stats is not counted as a request.
    assert_eq!(stats(&client, b.addr).await, (1, 5));
    let fresh = common::client();
    assert_eq!(stats(&fresh, b.addr).await, (2, 5));
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
