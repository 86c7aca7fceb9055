//! End-to-end: the admin API, drain, reload — under continuous load, nothing lost.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_added_through_api_takes_traffic_within_a_second() {
    let (a, b, c) = (backend("a", 0), backend("b", 0), backend("c", 0));
    let lb = balancer(&[(a.addr, 1), (b.addr, 1)], "algorithm = \"round_robin\"");
    let load = Load::start(&format!("http://{}/", lb.addr), 32, Duration::from_secs(20));
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.total() > 100)
            .await
    );
    let added_at = Instant::now();
    let response = client()
        .post(format!("{}/api/pools/app/backends", lb.admin_url()))
        .json_body(&json!({ "address": c.addr.to_string(), "weight": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.contains_key("c"))
            .await
    );
    let report = load.stop().await;
    let took = report.first_seen["c"] - added_at;
    assert!(
        took < Duration::from_secs(1),
        "new backend took {took:?} to get traffic"
    );
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    let events = admin_get(&lb, "/api/events").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "backend_added"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_backend_lets_its_slow_request_finish() {
    let (a, b) = (backend("a", 0), backend("b", 0));
    let lb = balancer(&[(a.addr, 1), (b.addr, 1)], "algorithm = \"round_robin\"");
    // Two slow requests: round robin puts one on each backend.
    let slow_url = format!("http://{}/?delay_ms=1500", lb.addr);
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = slow_url.clone();
            tokio::spawn(async move { client().get(url).send().await })
        })
        .collect();
    let a_addr = a.addr.to_string();
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await[&a_addr]["in_flight"] == 1
        })
        .await
    );
    let load = Load::start(&format!("http://{}/", lb.addr), 32, Duration::from_secs(20));
    let response = client()
        .delete(format!(
            "{}/api/pools/app/backends/{}",
            lb.admin_url(),
            a.addr
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let removed_at = Instant::now();
    // While draining it is listed as draining with its request still in flight.
    let status = app_backends(&lb).await;
    assert_eq!(status[&a_addr]["state"], "draining", "{status:?}");
    for request in slow {
        let response = request.await.unwrap().expect("slow request completed");
        assert_eq!(response.status(), 200);
    }
    assert!(
        eventually(Duration::from_secs(3), || async {
            !app_backends(&lb).await.contains_key(&a_addr)
        })
        .await,
        "drained backend still listed"
    );
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    if let Some(last) = report.last_sent.get("a") {
        assert!(
            *last <= removed_at,
            "backend a got a request sent after its removal"
        );
    }
    assert!(report.counts["b"] > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reload_swapping_backends_loses_nothing() {
    let olds = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let news = [backend("d", 0), backend("e", 0)];
    let before = [(olds[0].addr, 1), (olds[1].addr, 1), (olds[2].addr, 1)];
    let after = [(olds[0].addr, 1), (news[0].addr, 1), (news[1].addr, 1)];
    let lb = balancer(&before, "algorithm = \"round_robin\"");
    let load = Load::start(&format!("http://{}/", lb.addr), 32, Duration::from_secs(20));
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.len() == 3)
            .await
    );
    std::fs::write(
        lb.config_path.as_ref().unwrap(),
        config_for(&after, "algorithm = \"round_robin\""),
    )
    .unwrap();
    lb.signal("HUP");
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.contains_key("d")
            && r.counts.contains_key("e"))
            .await,
        "new backends never got traffic: {}",
        lb.logs()
    );
    let status = app_backends(&lb).await;
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(
        !status.contains_key(&olds[1].addr.to_string())
            || status[&olds[1].addr.to_string()]["removing"] == true
    );
    let events = admin_get(&lb, "/api/events").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reload"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_reload_keeps_the_old_config_serving() {
    let a = backend("a", 0);
    let lb = balancer(&[(a.addr, 1)], "");
    let path = lb.config_path.clone().unwrap();
    std::fs::write(
        &path,
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\npool = \"nope\"\n",
    )
    .unwrap();
    let response = client()
        .post(format!("{}/api/reload", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body = response.text().await.unwrap();
    assert!(body.contains(&format!("{}:3:8", path.display())), "{body}");
    // Still serving with the old config.
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    // SIGHUP with the same bad file: logged, still serving.
    lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            lb.logs().contains("reload refused")
        })
        .await
    );
    let response = client()
        .get(format!("http://{}/", lb.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let events = admin_get(&lb, "/api/events").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reload_failed"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_admin_requires_the_token() {
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"\ntoken = \"t0ken\"",
    );
    let lb = balancer_with(&config, 1);
    let url = format!(
        "http://127.0.0.1:{}/api/pools",
        lb.listeners["admin"].port()
    );
    let client = client();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
    let wrong = client
        .get(&url)
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let right = client
        .get(&url)
        .header("authorization", "Bearer t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), 200);
}

/// The token a `fulcrum run` printed on stderr for a public admin address without one.
fn generated_token(lb: &Proc) -> Option<String> {
    let logs = lb.logs();
    let mut tokens = logs
        .lines()
        .filter_map(|l| l.strip_prefix("admin token (generated, not saved): "));
    let token = tokens.next()?.trim().to_string();
    assert!(tokens.next().is_none(), "printed once: {logs}");
    Some(token)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn public_admin_without_a_token_generates_one_and_requires_it() {
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"0.0.0.0:0\"",
    );
    // `fulcrum check` says what will happen.
    let (_dir, path) = write_config(&config);
    let output = std::process::Command::new(fulcrum_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("not loopback") && stderr.contains("will generate a token"),
        "{stderr}"
    );

    let lb = balancer_with(&config, 1);
    let token = generated_token(&lb).unwrap_or_else(|| panic!("no token printed: {}", lb.logs()));
    assert_eq!(token.len(), 64, "{token}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token}");
    // Bound on every address, reached here through loopback.
    let url = format!(
        "http://127.0.0.1:{}/api/pools",
        lb.listeners["admin"].port()
    );
    let client = client();
    let status = |token: Option<String>| {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("nope".into())).await, 401);
    assert_eq!(status(Some(token[..63].to_string())).await, 401);
    assert_eq!(status(Some(token.clone())).await, 200);

    // Another start, another token.
    let again = balancer_with(&config, 1);
    assert_ne!(generated_token(&again), Some(token));
    // A configured token: nothing generated.
    let configured = balancer_with(
        &config.replace("[admin]\n", "[admin]\ntoken = \"t0ken\"\n"),
        1,
    );
    assert_eq!(generated_token(&configured), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_rotates_without_restart_and_never_falls_open() {
    let a = backend("a", 0);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, "first-token\n").unwrap();
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{}\"",
            token_file.display()
        ),
    );
    let lb = balancer_with(&config, 1);
    let url = format!("{}/api/pools", lb.admin_url());
    let client = client();
    let status = |token: Option<&'static str>| {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("first-token")).await, 200);

    // Rewritten in place: the new token works within about a second, the old one stops.
    let rewritten = Instant::now();
    std::fs::write(&token_file, "second-token").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(Some("second-token")).await == 200
        })
        .await,
        "{}",
        lb.logs()
    );
    let took = rewritten.elapsed();
    assert!(took < Duration::from_secs(3), "rotation took {took:?}");
    assert_eq!(status(Some("first-token")).await, 401);

    // Emptied: logged, the second token stays in force, nothing opens.
    std::fs::write(&token_file, "").unwrap();
    assert!(
        eventually(Duration::from_secs(5), || async {
            lb.logs()
                .contains("admin token file changed but cannot be used")
        })
        .await,
        "{}",
        lb.logs()
    );
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("second-token")).await, 200);

    // Gone at reload: the reload is refused, the second token stays in force.
    std::fs::remove_file(&token_file).unwrap();
    let reload = client
        .post(format!("{}/api/reload", lb.admin_url()))
        .header("authorization", "Bearer second-token")
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 400);
    let answer = reload.text().await.unwrap();
    assert!(answer.contains("cannot read token file"), "{answer}");
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("second-token")).await, 200);

    // Back, and re-read by a SIGHUP reload.
    std::fs::write(&token_file, "third-token").unwrap();
    lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(Some("third-token")).await == 200
        })
        .await,
        "{}",
        lb.logs()
    );
    assert_eq!(status(Some("second-token")).await, 401);
    let events = admin_get_with(&lb, "/api/events", "third-token").await;
    assert!(
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "admin_token_reload"),
        "{events}"
    );
}

async fn admin_get_with(lb: &Proc, path: &str, token: &str) -> serde_json::Value {
    let response = client()
        .get(format!("{}{path}", lb.admin_url()))
        .header("authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_validates_input_and_applies_weight_and_drain() {
    let (a, b) = (backend("a", 0), backend("b", 0));
    let lb = balancer(&[(a.addr, 1), (b.addr, 1)], "algorithm = \"round_robin\"");
    let api = lb.admin_url();
    let client = client();
    let bad = client
        .post(format!("{api}/api/pools/app/backends"))
        .json_body(&json!({ "address": "127.0.0.1:1", "wieght": 2 }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&bad.bytes().await.unwrap()).unwrap();
    assert_eq!(body["field"], "wieght", "{body}");
    let bad = client
        .post(format!("{api}/api/pools/app/backends"))
        .json_body(&json!({ "address": "nowhere" }))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let body: serde_json::Value = serde_json::from_slice(&bad.bytes().await.unwrap()).unwrap();
    assert_eq!(body["field"], "address", "{body}");
    let missing = client
        .get(format!("{api}/api/pools/none"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let missing = client
        .patch(format!("{api}/api/pools/app/backends/127.0.0.1:1"))
        .json_body(&json!({ "weight": 3 }))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let duplicate = client
        .post(format!("{api}/api/pools/app/backends"))
        .json_body(&json!({ "address": a.addr.to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), 409);

    // Weight 3:1 through the API.
    let patched = client
        .patch(format!("{api}/api/pools/app/backends/{}", a.addr))
        .json_body(&json!({ "weight": 3 }))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), 200);
    assert!(
        eventually(Duration::from_secs(3), || async {
            app_backends(&lb).await[&a.addr.to_string()]["effective_weight"] == 3
        })
        .await
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 400, 4).await;
    assert!(failures.is_empty());
    assert_eq!((counts["a"], counts["b"]), (300, 100), "{counts:?}");

    // Drain: no new traffic to a.
    let drained = client
        .patch(format!("{api}/api/pools/app/backends/{}", a.addr))
        .json_body(&json!({ "state": "drain" }))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 200);
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 200, 4).await;
    assert!(failures.is_empty());
    assert_eq!(counts.get("a"), None, "{counts:?}");
    assert_eq!(
        app_backends(&lb).await[&a.addr.to_string()]["state"],
        "draining"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_and_rebinding_requests_change_nothing() {
    let (a, c) = (backend("a", 0), backend("c", 0));
    let lb = balancer(&[(a.addr, 1)], "");
    let api = lb.admin_url();
    let admin = lb.listeners["admin"];
    let client = client();
    let add = format!("{api}/api/pools/app/backends");
    let body = json!({ "address": c.addr.to_string() }).to_string();

    // A form-like cross-site POST (text/plain, no preflight): 415, nothing added.
    let plain = client
        .post(&add)
        .header("content-type", "text/plain")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(plain.status(), 415);
    // Cross-site by Origin or Sec-Fetch-Site: 403, even with a JSON body or none.
    let evil = client
        .post(&add)
        .header("origin", "http://evil.example")
        .json_body(&json!({ "address": c.addr.to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(evil.status(), 403);
    for (name, value) in [
        ("origin", "http://evil.example"),
        ("origin", "null"),
        ("sec-fetch-site", "cross-site"),
        ("sec-fetch-site", "same-site"),
    ] {
        let reload = client
            .post(format!("{api}/api/reload"))
            .header(name, value)
            .send()
            .await
            .unwrap();
        assert_eq!(reload.status(), 403, "{name}: {value}");
    }
    let read = client
        .get(format!("{api}/api/pools"))
        .header("sec-fetch-site", "cross-site")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 403);
    let backends = app_backends(&lb).await;
    assert_eq!(backends.len(), 1, "{backends:?}");
    let events = admin_get(&lb, "/api/events").await;
    assert!(
        !events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "reload" || e["kind"] == "reload_failed"),
        "{events}"
    );

    // DNS rebinding: a foreign Host is refused; the admin's own names are served.
    let pools = "GET /api/pools HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n";
    let port = admin.port();
    for host in [
        format!("evil.example:{port}"),
        format!("127.0.0.1:{}", port + 1),
        "127.0.0.1".to_string(),
    ] {
        let answer = raw(admin, &pools.replace("{host}", &host)).await;
        assert!(answer.starts_with("HTTP/1.1 421"), "{host}: {answer}");
    }
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let answer = raw(admin, &pools.replace("{host}", &host)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{host}: {answer}");
    }
    // HTTP/1.0 without Host: fine on loopback.
    let answer = raw(admin, "GET /healthz HTTP/1.0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");

    // The same page (same origin, JSON) may write.
    let same = client
        .post(&add)
        .header("origin", format!("http://localhost:{port}"))
        .header("sec-fetch-site", "same-origin")
        .json_body(&json!({ "address": c.addr.to_string() }))
        .send()
        .await
        .unwrap();
    assert_eq!(same.status(), 201);
    assert_eq!(app_backends(&lb).await.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_hosts_and_token_follow_a_reload() {
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "");
    let lb = balancer_with(&config, 1);
    let path = lb.config_path.clone().unwrap();
    let admin = lb.listeners["admin"];
    let url = format!("{}/api/pools", lb.admin_url());
    let client = client();
    let status = |token: Option<&'static str>| {
        let mut request = client.get(&url);
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(None).await, 200);
    let named = "GET /healthz HTTP/1.1\r\nHost: lb.internal\r\nConnection: close\r\n\r\n"
        .replace("lb.internal", &format!("lb.internal:{}", admin.port()));
    assert!(raw(admin, &named).await.starts_with("HTTP/1.1 421"));

    // A token (and a host name) set by reload through the API: in force at once.
    let with = |extra: &str| {
        config.replace(
            "[admin]\nlisten = \"127.0.0.1:0\"",
            &format!("[admin]\nlisten = \"127.0.0.1:0\"\n{extra}"),
        )
    };
    std::fs::write(
        &path,
        with("token = \"t0ken\"\nallowed_hosts = [\"lb.internal\"]"),
    )
    .unwrap();
    let reload = client
        .post(format!("{}/api/reload", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(reload.status(), 200);
    let answer = reload.text().await.unwrap();
    assert!(!answer.contains("[admin]"), "{answer}");
    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("nope")).await, 401);
    assert_eq!(status(Some("t0ken")).await, 200);
    let answer = raw(admin, &named).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");

    // Changed again by SIGHUP: the old token stops working.
    std::fs::write(&path, with("token = \"n3w\"")).unwrap();
    lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(5), || async {
            status(Some("n3w")).await == 200
        })
        .await,
        "{}",
        lb.logs()
    );
    assert_eq!(status(Some("t0ken")).await, 401);
    assert!(raw(admin, &named).await.starts_with("HTTP/1.1 421"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_bounded_in_number_and_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\nmax_connections = 2\nheader_read_timeout = \"1s\"\nidle_timeout = \"30s\"",
    );
    let lb = balancer_with(&config, 1);
    let admin = lb.listeners["admin"];
    // Two connections: one silent, one that stops half-way through its headers.
    let started = Instant::now();
    let mut silent = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut partial = tokio::net::TcpStream::connect(admin).await.unwrap();
    partial
        .write_all(b"GET /api/pools HTTP/1.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A third is over the cap: closed at once.
    let mut third = tokio::net::TcpStream::connect(admin).await.unwrap();
    let mut buf = [0u8; 256];
    let read = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "third connection not closed at once: {read:?}"
    );
    // Both are closed after the header read timeout.
    for (name, stream) in [("silent", &mut silent), ("partial", &mut partial)] {
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            let mut all = Vec::new();
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "{name} connection still open");
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    // Slots free again.
    let answer = raw(
        admin,
        &format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_admin_request_body_is_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]\nlisten = \"127.0.0.1:0\"",
        "[admin]\nlisten = \"127.0.0.1:0\"\nheader_read_timeout = \"30s\"\nidle_timeout = \"1s\"",
    );
    let lb = balancer_with(&config, 1);
    let admin = lb.listeners["admin"];
    let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
    let head = format!(
        "POST /api/pools/app/backends HTTP/1.1\r\nHost: {admin}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"address\""
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "stalled connection still open");
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(app_backends(&lb).await.len(), 1);
}

/// Sends `request` on a new connection to `address` and reads the answer to its end.
async fn raw(address: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer))
        .await
        .expect("answer within 10s")
        .unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// JSON request bodies without reqwest's `json` feature.
trait JsonBody {
    fn json_body(self, value: &serde_json::Value) -> Self;
}

impl JsonBody for reqwest::RequestBuilder {
    fn json_body(self, value: &serde_json::Value) -> Self {
        self.header("content-type", "application/json")
            .body(value.to_string())
    }
}
