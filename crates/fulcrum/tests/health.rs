//! End-to-end: active health checks, passive ejection, retries and their limits, panic mode,
//! and the chaos scenario (a backend killed and restarted under load).

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn events_of(lb: &Proc, kind: &str, backend: &str) -> Vec<serde_json::Value> {
    admin_get(lb, "/api/events?limit=1000")
        .await
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == kind && e["backend"] == backend)
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_and_restarted_backend_under_load_costs_nothing() {
    let a = backend("a", 0);
    let mut b = backend("b", 0);
    let c = backend("c", 0);
    let b_addr = b.addr;
    let lb = balancer(
        &[(a.addr, 1), (b.addr, 1), (c.addr, 1)],
        "algorithm = \"round_robin\"\n[pools.app.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"250ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2",
    );
    let load = Load::start(&format!("http://{}/", lb.addr), 32, Duration::from_secs(15));
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.len() == 3)
            .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    b.kill();
    let killed_ms = unix_ms();
    let b_id = b_addr.to_string();
    assert!(
        eventually(Duration::from_secs(3), || async {
            !events_of(&lb, "health_down", &b_id).await.is_empty()
        })
        .await,
        "b never marked down"
    );
    let down_ms = events_of(&lb, "health_down", &b_id).await[0]["at_ms"]
        .as_u64()
        .unwrap();
    assert!(
        down_ms - killed_ms < 1000,
        "marked down {} ms after the kill",
        down_ms - killed_ms
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let before_restart = load.count("b");
    let _b = backend_at("b", b_addr);
    let restarted = Instant::now();
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r
            .counts
            .get("b")
            .copied()
            .unwrap_or(0)
            > before_restart)
            .await,
        "b never took traffic again"
    );
    let back_after = restarted.elapsed();
    // rise × interval + 1 s.
    assert!(
        back_after < Duration::from_millis(2 * 250 + 1000),
        "b took {back_after:?} to come back"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = load.stop().await;
    assert!(
        report.failures.is_empty(),
        "client errors: {:?}",
        report.failures
    );
    assert!(!events_of(&lb, "health_up", &b_id).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_take_failing_backends_out() {
    let a = backend("a", 0);
    let dead = dead_address();
    let lb = balancer(
        &[(a.addr, 1), (dead, 1)],
        "[pools.app.health]\nkind = \"tcp\"\ninterval = \"100ms\"\nfall = 1\n",
    );
    let dead_id = dead.to_string();
    assert!(
        eventually(Duration::from_secs(3), || async {
            app_backends(&lb).await[&dead_id]["health"] == "down"
        })
        .await
    );
    assert_eq!(app_backends(&lb).await[&a.addr.to_string()]["health"], "up");

    // HTTP check with an expected body: "ok" passes, anything else fails.
    let lb_ok = balancer(&[(a.addr, 1)], "[pools.app.health]\npath = \"/healthz\"\nexpect_body = \"ok\"\ninterval = \"100ms\"\nfall = 1\n");
    let lb_bad = balancer(&[(a.addr, 1)], "[pools.app.health]\npath = \"/healthz\"\nexpect_body = \"nope\"\ninterval = \"100ms\"\nfall = 1\n");
    let lb_status = balancer(
        &[(a.addr, 1)],
        "[pools.app.health]\npath = \"/x?status=503\"\ninterval = \"100ms\"\nfall = 1\n",
    );
    let a_id = a.addr.to_string();
    for lb in [&lb_bad, &lb_status] {
        assert!(
            eventually(Duration::from_secs(3), || async {
                app_backends(lb).await[&a_id]["health"] == "down"
            })
            .await
        );
        let response = client()
            .get(format!("http://{}/", lb.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 503, "all down answers 503 at once");
    }
    assert_eq!(app_backends(&lb_ok).await[&a_id]["health"], "up");
    let response = client()
        .get(format!("http://{}/", lb_ok.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_and_safe_retries() {
    let a = backend("a", 0);
    let (liar, accepted) = lying_backend();
    let lb = balancer(
        &[(a.addr, 1), (liar, 1)],
        "algorithm = \"round_robin\"\n[pools.app.passive]\nconsecutive_failures = 3\nejection_time = \"30s\"",
    );
    // GETs reaching the liar fail after they were sent; they are idempotent and bodiless,
    // so they are retried on `a`: the client sees only 200s.
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 60, 1).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts["a"], 60);
    let liar_id = liar.to_string();
    assert_eq!(
        events_of(&lb, "ejected", &liar_id).await.len(),
        1,
        "{}",
        lb.logs()
    );
    assert_eq!(app_backends(&lb).await[&liar_id]["ejected"], true);
    // Once ejected the liar gets nothing more.
    let seen = accepted.load(Ordering::SeqCst);
    let (_, failures) = spread(&format!("http://{}/", lb.addr), 20, 1).await;
    assert!(failures.is_empty());
    assert_eq!(accepted.load(Ordering::SeqCst), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_idempotent_request_is_never_retried() {
    let (liar, accepted) = lying_backend();
    let a = backend("a", 0);
    let lb = balancer(
        &[(liar, 1), (a.addr, 1)],
        "algorithm = \"round_robin\"\n[pools.app.passive]\nenabled = false",
    );
    // Round robin starts with the liar: the POST reaches it and must not be replayed on `a`.
    let response = client()
        .post(format!("http://{}/", lb.addr))
        .body("pay once")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // A GET with a body is not retried either.
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "round robin moved on to a");
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_budget_stops_retry_storms() {
    let a = backend("a", 0);
    let (liar, accepted) = lying_backend();
    // No passive ejection, a tiny budget: 0% of requests + 1 per second.
    let lb = balancer(
        &[(a.addr, 1), (liar, 1)],
        "algorithm = \"round_robin\"\n[pools.app.passive]\nenabled = false\n[pools.app.retry_budget]\npercent = 0\nmin_per_second = 1",
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 60, 1).await;
    // About half the requests hit the liar; only the first ones (the budget: 1/s over the
    // 10 s window) were retried, the rest failed.
    let liar_hits = accepted.load(Ordering::SeqCst);
    assert!(liar_hits >= 30, "{liar_hits}");
    assert!(
        liar_hits - failures.len() <= 12,
        "more retries than the budget: {liar_hits} hits, {} failures",
        failures.len()
    );
    assert!(
        failures.len() >= 15,
        "budget did not limit retries: {failures:?} {counts:?}"
    );
    assert!(
        failures.iter().all(|f| f == "status 502 Bad Gateway"),
        "{failures:?}"
    );
    assert!(lb.logs().contains("retry budget spent"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn panic_mode_spreads_over_all_when_all_are_down() {
    let a = backend("a", 0);
    let checks = "[pools.app.health]\npath = \"/x?status=500\"\ninterval = \"100ms\"\nfall = 1\n";
    let lb = balancer(&[(a.addr, 1)], &format!("panic_mode = true\n{checks}"));
    let a_id = a.addr.to_string();
    assert!(
        eventually(Duration::from_secs(3), || async {
            app_backends(&lb).await[&a_id]["health"] == "down"
        })
        .await
    );
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(lb.logs().contains("panic mode"));
}
