//! End-to-end: the balancing algorithms against real backends. One of three backends answers
//! 50 ms late: peak-EWMA starves it, round robin gives it a third. Maglev keeps a user on one
//! backend. Slow start holds a new backend at 10% of its weight. Counts are asserted, not times.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;

const REQUESTS: usize = 2000;

/// The tests here measure how traffic splits; run one at a time so they do not skew each
/// other's latencies on a small machine.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const CLIENTS: usize = 32;

/// Two fast backends and one 50 ms slow one, with the balancer's config for them.
fn fast_fast_slow() -> [Proc; 3] {
    [
        backend("fast1", 0),
        backend("fast2", 0),
        backend("slow", 50),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_is_the_default_and_starves_the_slow_backend() {
    let _serial = SERIAL.lock().await;
    let backends = fast_fast_slow();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = balancer(&list, "");
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), REQUESTS, CLIENTS).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.values().sum::<usize>(), REQUESTS, "{counts:?}");
    let slow = counts.get("slow").copied().unwrap_or(0);
    eprintln!("peak_ewma: {counts:?}");
    assert!(
        slow * 20 < REQUESTS,
        "the slow backend got {slow} of {REQUESTS}: {counts:?}"
    );
    assert!(counts["fast1"] > 600 && counts["fast2"] > 600, "{counts:?}");
    // The API names the algorithm and shows the latency estimates it works from.
    let pool = admin_get(&lb, "/api/pools/app").await;
    assert_eq!(pool["algorithm"], "peak_ewma");
    let latency: HashMap<String, f64> = pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_string(),
                b["latency_ms"].as_f64().unwrap_or(0.0),
            )
        })
        .collect();
    eprintln!("peak_ewma latency estimates (ms): {latency:?}");
    let slow_ms = latency[&backends[2].addr.to_string()];
    assert!(slow_ms > 20.0, "{latency:?}");
    for fast in &backends[..2] {
        assert!(latency[&fast.addr.to_string()] < slow_ms, "{latency:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_gives_the_slow_backend_a_third() {
    let _serial = SERIAL.lock().await;
    let backends = fast_fast_slow();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = balancer(&list, "algorithm = \"round_robin\"");
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), REQUESTS, CLIENTS).await;
    assert!(failures.is_empty(), "{failures:?}");
    for name in ["fast1", "fast2", "slow"] {
        let got = counts.get(name).copied().unwrap_or(0);
        assert!(got.abs_diff(REQUESTS / 3) <= 10, "{name}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_keeps_each_user_on_one_backend() {
    let _serial = SERIAL.lock().await;
    let backends = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    // No bounded_load here: a bound may move a key while its backend is busy (unit-tested).
    let lb = balancer(
        &list,
        "algorithm = \"maglev\"\nhash_key = \"header:X-User\"",
    );
    let client = client();
    let url = format!("http://{}/", lb.addr);
    let mut homes: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..4 {
        for user in 0..30 {
            let response = client
                .get(&url)
                .header("x-user", format!("user-{user}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "round {round}");
            let name = response.headers()["x-backend"]
                .to_str()
                .unwrap()
                .to_string();
            homes
                .entry(format!("user-{user}"))
                .or_default()
                .insert(name);
        }
    }
    for (user, seen) in &homes {
        assert_eq!(seen.len(), 1, "{user} landed on {seen:?}");
    }
    let used: HashSet<&String> = homes.values().flatten().collect();
    assert_eq!(
        used.len(),
        3,
        "30 users should spread over all backends: {homes:?}"
    );
    // Every request finished: nothing is left counted in flight.
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb)
                .await
                .values()
                .all(|b| b["in_flight"] == 0)
        })
        .await,
        "{:?}",
        app_backends(&lb).await
    );
    // Requests without the header spread rather than all landing on one backend.
    let (counts, failures) = spread(&url, 300, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_holds_a_new_backend_at_a_tenth_then_releases_it() {
    let _serial = SERIAL.lock().await;
    let (a, b) = (backend("a", 0), backend("b", 0));
    // An hour-long ramp: during the test the new backend stays at the 10% floor.
    let lb = balancer(
        &[(a.addr, 1)],
        "algorithm = \"round_robin\"\nslow_start = \"1h\"",
    );
    let response = client()
        .post(format!("{}/api/pools/app/backends", lb.admin_url()))
        .header("content-type", "application/json")
        .body(format!("{{\"address\": \"{}\", \"weight\": 1}}", b.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let b_id = b.addr.to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await.contains_key(&b_id)
        })
        .await
    );
    let status = app_backends(&lb).await;
    assert_eq!(status[&b_id]["slow_start_percent"], 10, "{status:?}");
    let url = format!("http://{}/", lb.addr);
    // Weights 100 : 10 (hundredths): b gets 1 request in 11.
    let (counts, failures) = spread(&url, 1100, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    let got = counts.get("b").copied().unwrap_or(0);
    assert!((90..=110).contains(&got), "{counts:?}");

    // A one-second ramp instead (reload): b has been in longer than that, so it reaches full
    // weight and takes half.
    std::fs::write(
        lb.config_path.as_ref().unwrap(),
        config_for(
            &[(a.addr, 1)],
            "algorithm = \"round_robin\"\nslow_start = \"1s\"",
        ),
    )
    .unwrap();
    let response = client()
        .post(format!("{}/api/reload", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await[&b_id]["slow_start_percent"] == 100
        })
        .await
    );
    let (counts, failures) = spread(&url, 1000, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    let got = counts.get("b").copied().unwrap_or(0);
    assert!((450..=550).contains(&got), "{counts:?}");
}

/// least_conn over 20 backends, past the exact-scan size: picks come from its min-tree of
/// loads, fed by every request start and end. One backend answering 200 ms late keeps
/// requests in flight and so gets few; the 19 others share the rest; nothing stays counted
/// in flight afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_over_many_backends_avoids_the_busy_one() {
    let _serial = SERIAL.lock().await;
    let backends: Vec<Proc> = (0..20)
        .map(|i| backend(&format!("b{i}"), if i == 7 { 200 } else { 0 }))
        .collect();
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = balancer(&list, "algorithm = \"least_conn\"");
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), REQUESTS, CLIENTS).await;
    eprintln!("least_conn over 20: {counts:?}");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.values().sum::<usize>(), REQUESTS, "{counts:?}");
    let slow = counts.get("b7").copied().unwrap_or(0);
    // A fair share would be 100 of 2000.
    assert!(
        slow * 40 < REQUESTS,
        "the busy backend got {slow}: {counts:?}"
    );
    for i in (0..20).filter(|&i| i != 7) {
        let got = counts.get(&format!("b{i}")).copied().unwrap_or(0);
        assert!(got * 40 > REQUESTS, "b{i} got {got}: {counts:?}");
    }
    assert_eq!(
        admin_get(&lb, "/api/pools/app").await["algorithm"],
        "least_conn"
    );
    let drained = eventually(Duration::from_secs(5), || async {
        app_backends(&lb)
            .await
            .values()
            .all(|b| b["in_flight"].as_u64() == Some(0))
    })
    .await;
    assert!(drained, "{:?}", app_backends(&lb).await);
}
