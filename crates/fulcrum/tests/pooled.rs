//! End-to-end: pooled (idle) upstream connections that the backend closed meanwhile. The
//! pool's housekeeping polls connections idle for a second or more, so a closed one is
//! dropped within about two seconds; one closed just before the next request is only seen
//! when that request is sent, comes back unsent and must go out on a new connection.

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

/// Idle connections the backend closed do not linger (in CLOSE_WAIT) until traffic returns:
/// the pool's housekeeping notices the end of stream and drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_the_backend_closed_are_dropped_without_traffic() {
    let mut b = backend("b", 0);
    let lb = balancer(&[(b.addr, 1)], "");
    let client = client();
    for _ in 0..4 {
        let response = client
            .get(format!("http://{}/", lb.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let open = |text: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with("fulcrum_upstream_connections_open{"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    let before = open(&metrics_text(&lb).await);
    assert!(before >= 1, "an idle pooled connection is open");

    // The backend goes away, closing its end; no request follows.
    b.kill();
    let lb = &lb;
    let dropped = eventually(std::time::Duration::from_secs(6), || async move {
        open(&metrics_text(lb).await) == 0
    })
    .await;
    let text = metrics_text(lb).await;
    assert!(
        dropped,
        "closed idle connections still open: {}\n{text}",
        open(&text)
    );
}

/// The response timeout's timer is kept with the upstream connection and moved on lazily:
/// each request still gets its full `request` timeout, counted from when it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_on_a_reused_connection_gets_its_full_response_timeout() {
    let b = backend("b", 0);
    let lb = balancer(
        &[(b.addr, 1)],
        "max_attempts = 1\n[pools.app.timeouts]\nrequest = \"1s\"",
    );
    let client = client();
    let get = |delay_ms: u64| {
        let request = client.get(format!("http://{}/?delay_ms={delay_ms}", lb.addr));
        async move {
            let started = std::time::Instant::now();
            let status = request.send().await.unwrap().status().as_u16();
            (status, started.elapsed())
        }
    };
    // The first request arms the timer at its deadline (t0 + 1 s); the second one, answered
    // after 600 ms on the same connection, leaves it there.
    assert_eq!(get(0).await.0, 200);
    assert_eq!(get(600).await.0, 200);
    // Sent at ~t0 + 0.6 s and answered at ~t0 + 1.3 s: the timer fires at t0 + 1 s, before
    // this request's own deadline (~t0 + 1.6 s), and must not time it out.
    let (status, took) = get(700).await;
    assert_eq!(status, 200, "timed out early after {took:?}");
    // A request slower than the timeout still gets its 504, after about the timeout.
    let (status, took) = get(3000).await;
    assert_eq!(status, 504);
    assert!(
        took >= std::time::Duration::from_millis(900)
            && took < std::time::Duration::from_millis(2500),
        "504 after {took:?}"
    );
}

/// A client that goes away in the middle of a response body leaves its upstream connection
/// mid-message: it must be closed, never handed to the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_left_mid_body_by_the_client_is_not_reused() {
    let b = backend("b", 0);
    let lb = balancer(&[(b.addr, 1)], "");
    let mut response = client()
        .get(format!("http://{}/bytes/{}", lb.addr, 64 * 1024 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    // Fresh clients: each request is answered whole, by a connection in a clean state.
    for _ in 0..5 {
        let response = client()
            .get(format!("http://{}/after", lb.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.unwrap()).expect("a whole JSON body");
        assert_eq!(body["path"], "/after");
    }
}
