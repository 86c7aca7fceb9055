//! End to end: the one attempt loop of HTTP requests, upgrades and TCP sessions. Consistent
//! hashing keys a WebSocket like any request of its client, and a TCP session like an HTTP
//! request from the same address; a connect that fails for want of local descriptors blames
//! no backend. Real `fulcrum` processes on 127.0.0.1 (clients also from other 127.0.0.0/8
//! addresses).

mod common;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// The value of `metric` with all of `labels` in the balancer's metrics (0 when absent).
async fn metric(lb: &Proc, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(lb).await;
    text.lines()
        .filter(|line| line.starts_with(name) && labels.iter().all(|l| line.contains(l)))
        .find_map(|line| line.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The status code and `X-Backend` of a raw HTTP/1.1 response.
fn status_and_backend(response: &str) -> (u16, String) {
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let backend = response
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("x-backend")
                .then(|| value.trim().to_string())
        })
        .unwrap_or_default();
    (status, backend)
}

/// Sends one GET over a new connection from `source` (a 127.0.0.0/8 address) to `addr`
/// and returns the backend that answered.
async fn backend_seen_from(source: IpAddr, addr: SocketAddr) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (status, backend) = status_and_backend(&read_response(&mut stream).await);
    assert_eq!(status, 200, "via {addr} from {source}");
    backend
}

/// Under maglev keyed by a header, every WebSocket of one key lands on one backend, and
/// different keys spread (upgrades used to be picked with key 0: all on one backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maglev_keeps_the_websockets_of_a_key_on_one_backend() {
    let backends = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let list: Vec<_> = backends.iter().map(|b| (b.addr, 1)).collect();
    let lb = balancer(
        &list,
        "algorithm = \"maglev\"\nhash_key = \"header:X-User\"",
    );
    let mut homes: HashMap<String, HashSet<String>> = HashMap::new();
    for round in 0..3 {
        for user in 0..16 {
            let mut request = format!("ws://{}/ws", lb.addr)
                .into_client_request()
                .unwrap();
            let user = format!("user-{user}");
            request
                .headers_mut()
                .insert("x-user", user.parse().unwrap());
            let stream = TcpStream::connect(lb.addr).await.unwrap();
            let (socket, response) = tokio_tungstenite::client_async(request, stream)
                .await
                .unwrap_or_else(|e| panic!("round {round}, {user}: {e}"));
            assert_eq!(response.status(), 101);
            let name = response.headers()["x-backend"]
                .to_str()
                .unwrap()
                .to_string();
            homes.entry(user).or_default().insert(name);
            drop(socket);
        }
    }
    for (user, seen) in &homes {
        assert_eq!(seen.len(), 1, "{user}'s WebSockets landed on {seen:?}");
    }
    let used: HashSet<&String> = homes.values().flatten().collect();
    assert!(used.len() > 1, "16 keys all on one backend: {homes:?}");
}

/// A TCP listener and an HTTP listener on one maglev pool keyed by client address send each
/// client to the same backend (the TCP session's key used to be hashed differently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_http_listeners_send_a_client_to_the_same_backend() {
    let backends = [backend("a", 0), backend("b", 0), backend("c", 0)];
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\n\
         [listeners.raw]\nlisten = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"app\"\n\n\
         [pools.app]\nalgorithm = \"maglev\"\nhash_key = \"client_ip\"\nbackends = [{}]\n",
        list.join(", ")
    );
    let lb = balancer_with(&config, 2);
    let (web, raw) = (lb.listeners["web"], lb.listeners["raw"]);
    let mut used = HashSet::new();
    for last in 1..=12u8 {
        let client = IpAddr::from([127, 0, 0, last]);
        let over_http = backend_seen_from(client, web).await;
        let over_tcp = backend_seen_from(client, raw).await;
        assert_eq!(over_http, over_tcp, "client {client}");
        // And again: the same backend every time.
        assert_eq!(
            backend_seen_from(client, raw).await,
            over_tcp,
            "client {client}"
        );
        used.insert(over_tcp);
    }
    assert!(used.len() > 1, "12 clients all on one backend: {used:?}");
}

/// Descriptors of the balancer under a low RLIMIT_NOFILE.
const NOFILE: u64 = 128;

/// Requests whose connects fail because the balancer is out of descriptors (EMFILE) get a
/// 503 saying so, and no backend is blamed: no failure counted, no back-off, no passive
/// ejection (even at one consecutive failure). Service resumes once descriptors are free.
/// (Linux: `/proc/PID/fd` counts the balancer's descriptors; util-linux's `prlimit` sets
/// the limit.)
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_descriptors_blames_no_backend() {
    let backends = [backend("a", 0), backend("b", 0)];
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\
         header_read_timeout = \"60s\"\n\n\
         [pools.app]\nalgorithm = \"round_robin\"\nbackends = [{}]\nmax_attempts = 2\n\
         failure_backoff = \"60s\"\n\
         [pools.app.passive]\nconsecutive_failures = 1\nejection_time = \"60s\"\n",
        list.join(", ")
    );
    let lb = balancer_with_nofile(&config, 1, NOFILE);
    let pid = lb.pid();
    // The probe: a client connection accepted while descriptors were still free.
    let mut probe = TcpStream::connect(lb.addr).await.unwrap();
    let web = "listener=\"web\"";
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(&lb, "fulcrum_client_connections_open", &[web]).await == 1.0
        })
        .await,
        "probe connection not accepted"
    );
    // Idle clients until accept fails for want of descriptors (and a few more waiting in the
    // backlog, which take any descriptor freed meanwhile).
    let mut idle = Vec::new();
    let exhausted = |lb: &Proc| lb.logs().contains("accept failed");
    while !exhausted(&lb) {
        assert!(idle.len() < NOFILE as usize, "never ran out: {}", lb.logs());
        let before = open_fds(pid);
        idle.push(TcpStream::connect(lb.addr).await.unwrap());
        eventually(Duration::from_secs(2), || async {
            open_fds(pid) > before || exhausted(&lb)
        })
        .await;
    }
    for _ in 0..4 {
        idle.push(TcpStream::connect(lb.addr).await.unwrap());
    }
    // (At least: descriptors inherited above the limit count too.)
    assert!(open_fds(pid) >= NOFILE as usize, "descriptors left");
    for round in 0..3 {
        probe
            .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
            .await
            .unwrap();
        let response = read_response(&mut probe).await;
        let (status, _) = status_and_backend(&response);
        assert_eq!(status, 503, "round {round}: {response}");
        assert!(response.contains("out of resources"), "{response}");
    }
    assert!(
        lb.logs().contains("not the backend's fault"),
        "{}",
        lb.logs()
    );
    // Descriptors free again: service resumes on the probe and on new connections.
    drop(idle);
    assert!(
        eventually(Duration::from_secs(5), || async {
            open_fds(pid) < NOFILE as usize / 2
        })
        .await,
        "descriptors not released: {}",
        open_fds(pid)
    );
    probe
        .write_all(b"GET / HTTP/1.1\r\nhost: test\r\n\r\n")
        .await
        .unwrap();
    let (status, _) = status_and_backend(&read_response(&mut probe).await);
    assert_eq!(status, 200);
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 20, 2).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.len(), 2, "both backends serve: {counts:?}");
    for (address, backend) in app_backends(&lb).await {
        assert_eq!(backend["ejected"], false, "{address}: {backend}");
        assert_eq!(backend["backed_off"], false, "{address}: {backend}");
        assert_eq!(backend["failures"], 0, "{address}: {backend}");
        assert_eq!(backend["available"], true, "{address}: {backend}");
    }
}
