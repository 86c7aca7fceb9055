//! End-to-end: pooled (idle) upstream connections that the backend closed meanwhile. Idle
//! pooled connections are not watched, so the closure is only seen when the next request is
//! sent; that request comes back unsent and must go out on a new connection.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_on_a_pooled_connection_the_backend_closed_goes_out_on_a_new_one() {
    let mut first = backend("first", 0);
    let address = first.addr;
    // One attempt only: no retry on another backend can hide a lost request.
    let lb = balancer(&[(address, 1)], "max_attempts = 1");
    let client = client();
    let url = format!("http://{}/echo", lb.addr);

    // One exchange leaves one idle connection in the pool.
    let response = client.get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-backend"], "first");

    // The backend goes away (closing that connection) and comes back on the same address.
    first.kill();
    let _second = backend_at("second", address);

    // Not idempotent and with a body: only the unsent-request retry on a new connection can
    // deliver it, and it must arrive exactly once, whole.
    for round in 0..3 {
        let response = client
            .post(&url)
            .body(format!("payload {round}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200, "round {round}");
        assert_eq!(response.headers()["x-backend"], "second");
        let body: serde_json::Value = serde_json::from_slice(&response.bytes().await.unwrap())
            .expect("JSON from the backend");
        assert_eq!(body["method"], "POST");
        assert_eq!(body["body_bytes"], 9);
    }
    let logs = lb.logs();
    assert!(!logs.contains("backend failed before answering"), "{logs}");
}
