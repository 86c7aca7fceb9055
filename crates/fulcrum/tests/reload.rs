//! End-to-end: reloads lose nothing. A changed listener keeps its socket (no connection
//! waiting in its accept queue is reset), and a listener that goes away closes the
//! connections still open on it at `shutdown_timeout`.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A config with the listener `web` (and `extra`, if given) in front of `backend`.
fn config(backend: SocketAddr, max_connections: usize, extra: bool) -> String {
    let extra = if extra {
        "[listeners.extra]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\n"
    } else {
        ""
    };
    format!(
        "[server]\nshutdown_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\
         max_connections = {max_connections}\n\n{extra}\
         [pools.app]\nbackends = [{{ address = \"{backend}\" }}]\n"
    )
}

/// Rewrites the balancer's config file and reloads it through the admin API; the answer's
/// `changes`.
async fn reload(lb: &Proc, text: &str) -> serde_json::Value {
    std::fs::write(lb.config_path.as_ref().unwrap(), text).unwrap();
    let answer = client()
        .post(format!("{}/api/reload", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", lb.logs());
    let body: serde_json::Value = serde_json::from_str(&answer.text().await.unwrap()).unwrap();
    body["changes"].clone()
}

/// One request on a new connection (`Connection: close`); the status line.
async fn one_request(address: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut answer = Vec::new();
    stream
        .read_to_end(&mut answer)
        .await
        .map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    Ok(text.lines().next().unwrap_or_default().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_listener_keeps_its_socket_and_loses_no_connection() {
    let a = backend("a", 0);
    let lb = balancer_with(&config(a.addr, 10_000, false), 1);
    let address = lb.listeners["web"];
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(Mutex::new(Vec::new()));
    let mut clients = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (stop, answered, failures) = (stop.clone(), answered.clone(), failures.clone());
        clients.spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match one_request(address).await {
                    Ok(status) if status.starts_with("HTTP/1.1 200") => {
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(status) => failures.lock().unwrap().push(status),
                    Err(error) => failures.lock().unwrap().push(error),
                }
            }
        });
    }
    assert!(
        eventually(Duration::from_secs(5), || async {
            answered.load(Ordering::Relaxed) > 50
        })
        .await
    );
    // Each reload changes the listener (its connection limit), so it is restarted: on the
    // same socket, which keeps accepting throughout.
    for round in 0..4 {
        let before = answered.load(Ordering::Relaxed);
        let changes = reload(&lb, &config(a.addr, 9_000 + round, false)).await;
        assert_eq!(changes["listeners_changed"], serde_json::json!(["web"]));
        assert!(
            eventually(Duration::from_secs(5), || async {
                answered.load(Ordering::Relaxed) > before + 50
            })
            .await
        );
    }
    stop.store(true, Ordering::Relaxed);
    while clients.join_next().await.is_some() {}
    let failures = std::mem::take(&mut *failures.lock().unwrap());
    assert!(
        failures.is_empty(),
        "{} failures: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Still the same port: the socket was handed over, not re-bound.
    assert_eq!(
        one_request(address).await,
        Ok("HTTP/1.1 200 OK".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_closes_what_is_left_at_shutdown_timeout() {
    let slow = backend("slow", 30_000);
    let lb = balancer_with(&config(slow.addr, 10_000, true), 2);
    let mut stream = TcpStream::connect(lb.listeners["extra"]).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    // The request is in flight at the backend (which answers after 30 s).
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await[&slow.addr.to_string()]["in_flight"] == 1
        })
        .await
    );
    let changes = reload(&lb, &config(slow.addr, 10_000, false)).await;
    assert_eq!(changes["listeners_removed"], serde_json::json!(["extra"]));
    // shutdown_timeout (1 s), then the next tick: closed, not left to the backend's 30 s.
    let waited = closed_within(&mut stream, Duration::from_secs(5)).await;
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}"
    );
    // The rest of the balancer runs on.
    assert!(admin_get(&lb, "/api/pools").await.is_array());
}
