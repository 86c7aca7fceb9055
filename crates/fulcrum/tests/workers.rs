//! End to end: the runtime shapes of `[server] workers` / `runtime`. Per-core workers (the
//! default) each accept on their own SO_REUSEPORT socket of one port and keep their own
//! upstream connections; `max_connections` still bounds the listener as a whole; the
//! work-stealing runtime serves too. Real `fulcrum` processes on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(backends: &[SocketAddr], server: &str, listener_extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[server]\n{server}\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n{listener_extra}\n\n\
         [pools.app]\nalgorithm = \"round_robin\"\nbackends = [{}]\n",
        list.join(", ")
    )
}

/// The sum of every sample of `metric` (counters: `metric_total`; any labels) in a
/// Prometheus text, and how many samples there were.
fn metric_sum(text: &str, metric: &str) -> (u64, usize) {
    let samples: Vec<u64> = text
        .lines()
        .filter(|line| {
            let rest = line.strip_prefix(metric).unwrap_or("-");
            let rest = rest.strip_prefix("_total").unwrap_or(rest);
            rest.starts_with('{') || rest.starts_with(' ')
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|value| value as u64)
        .collect();
    (samples.iter().sum(), samples.len())
}

/// One request on a fresh connection; returns the status line.
async fn request_on_new_connection(address: SocketAddr) -> String {
    let mut stream = TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer))
        .await
        .expect("answer within 5 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn per_core_workers_share_the_port_and_keep_their_own_upstream_connections() {
    let backends = [backend("w1", 0), backend("w2", 0)];
    let addresses: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let lb = balancer_with(&config(&addresses, "workers = 2", ""), 1);

    // 60 connections one after the other: the kernel hashes each to one of the two sockets.
    for _ in 0..60 {
        let status = request_on_new_connection(lb.addr).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
    }

    let metrics = metrics_text(&lb).await;
    let per_worker: Vec<u64> = (0..2)
        .map(|worker| {
            let label = format!("worker=\"{worker}\"");
            metrics
                .lines()
                .find(|l| {
                    l.starts_with("fulcrum_worker_connections_accepted") && l.contains(&label)
                })
                .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no accepted count for worker {worker}:\n{metrics}"))
                as u64
        })
        .collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 60, "{per_worker:?}");
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "both workers accept connections: {per_worker:?}"
    );

    // Requests are sequential, so each worker needs one connection per backend it sent to and
    // reuses it: 2 workers × 2 backends opened (3 if a worker only ever met one backend), the
    // rest reused. One idle queue shared by the workers would have opened only 2.
    let (opened, samples) = metric_sum(&metrics, "fulcrum_upstream_connections_opened");
    assert_eq!(samples, 2, "{metrics}");
    assert!((3..=4).contains(&opened), "opened {opened}:\n{metrics}");
    let (reused, _) = metric_sum(&metrics, "fulcrum_upstream_requests_reused");
    assert_eq!(reused + opened, 60, "{metrics}");
}

#[tokio::test]
async fn per_core_workers_keep_their_own_h2_upstream_connection() {
    let backend = backend("h2", 0);
    let config = config(&[backend.addr], "workers = 2", "").replace(
        "algorithm = \"round_robin\"",
        "algorithm = \"round_robin\"\nprotocol = \"h2\"",
    );
    let lb = balancer_with(&config, 1);
    // New client connections land on both workers (checked by the accepted counts); each
    // worker opens one HTTP/2 connection to the backend and multiplexes its requests on it.
    for _ in 0..60 {
        let status = request_on_new_connection(lb.addr).await;
        assert_eq!(status, "HTTP/1.1 200 OK");
    }
    let metrics = metrics_text(&lb).await;
    let (accepted, workers) = metric_sum(&metrics, "fulcrum_worker_connections_accepted");
    assert_eq!((accepted, workers), (60, 2), "{metrics}");
    let busy_workers = metrics
        .lines()
        .filter(|l| l.starts_with("fulcrum_worker_connections_accepted") && !l.ends_with(" 0"))
        .count();
    assert_eq!(
        busy_workers, 2,
        "both workers accept connections:\n{metrics}"
    );
    // A connection shared by the workers would be 1; one per request would be 60.
    let (opened, _) = metric_sum(&metrics, "fulcrum_upstream_connections_opened");
    assert_eq!(opened, 2, "one HTTP/2 connection per worker:\n{metrics}");
    let (reused, _) = metric_sum(&metrics, "fulcrum_upstream_requests_reused");
    assert_eq!(reused, 58, "{metrics}");
}

#[tokio::test]
async fn the_workers_flag_replaces_the_config_value() {
    let backend = backend("f1", 0);
    let lb = balancer_with_args(
        &config(&[backend.addr], "workers = 1", ""),
        1,
        &["--workers", "2"],
    );
    for _ in 0..20 {
        assert_eq!(request_on_new_connection(lb.addr).await, "HTTP/1.1 200 OK");
    }
    // Two per-core workers, so two accept counts (one worker has none).
    let metrics = metrics_text(&lb).await;
    let (accepted, workers) = metric_sum(&metrics, "fulcrum_worker_connections_accepted");
    assert_eq!((accepted, workers), (20, 2), "{metrics}");
}

#[tokio::test]
async fn max_connections_bounds_the_listener_across_workers() {
    let backend = backend("m1", 0);
    let lb = balancer_with(
        &config(&[backend.addr], "workers = 2", "max_connections = 4"),
        1,
    );
    // Four kept-alive connections, each proven accepted by an answer.
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(lb.addr).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("answer within 5 s")
            .unwrap();
        assert!(String::from_utf8_lossy(&buffer[..n]).starts_with("HTTP/1.1 200"));
        held.push(stream);
    }
    // Whichever worker accepts them, the next ones are over the listener's limit.
    for _ in 0..4 {
        let mut stream = TcpStream::connect(lb.addr).await.unwrap();
        let _ = stream
            .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
            .await;
        let mut buffer = [0u8; 4096];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
            .await
            .expect("closed within 5 s");
        assert!(
            matches!(read, Ok(0) | Err(_)),
            "a connection over max_connections is closed unanswered"
        );
    }
    let metrics = metrics_text(&lb).await;
    assert_eq!(
        metric_sum(&metrics, "fulcrum_client_connections_refused").0,
        4,
        "{metrics}"
    );
    drop(held);
}

#[tokio::test]
async fn work_stealing_runtime_serves_and_a_bad_shape_is_refused() {
    let backend = backend("s1", 0);
    let lb = balancer_with(
        &config(
            &[backend.addr],
            "workers = 2\nruntime = \"work_stealing\"",
            "",
        ),
        1,
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 50, 8).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("s1"), Some(&50));
    // One socket, so no per-worker counts.
    assert!(!metrics_text(&lb)
        .await
        .contains("fulcrum_worker_connections_accepted"));

    let (_dir, path) = write_config(&config(&[backend.addr], "runtime = \"per_thread\"", ""));
    let output = std::process::Command::new(fulcrum_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("fulcrum.toml:2:") && error.contains("per_thread"),
        "file:line:column and the bad value: {error}"
    );
}
