//! End-to-end: DNS discovery against a real DNS server (dnsmasq, from Debian) on loopback.
//! Backends written HOST:PORT follow the name's records: new addresses join, vanished ones
//! drain, with traffic flowing and nothing lost.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

/// A dnsmasq serving the names in a hosts file we rewrite; killed on drop.
struct Dnsmasq {
    child: Child,
    hosts: std::path::PathBuf,
    address: SocketAddr,
    dir: tempfile::TempDir,
}

impl Dnsmasq {
    fn start(hosts: &str) -> Dnsmasq {
        let dir = tempfile::tempdir().unwrap();
        let hosts_path = dir.path().join("hosts");
        std::fs::write(&hosts_path, hosts).unwrap();
        let log_path = dir.path().join("dnsmasq.log");
        // dnsmasq binds UDP and TCP on its port: another process may take the port between
        // our check and its bind (tests run in parallel), so a few tries with fresh ports.
        for _attempt in 0..5 {
            let port = free_udp_and_tcp_port();
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Command::new("dnsmasq")
                .args([
                    // Debug mode: foreground, logs to stderr, and never changes user or
                    // capabilities (which a locked-down container may refuse).
                    "--no-daemon",
                    "--conf-file=/dev/null",
                    "--log-facility=-",
                    "--log-queries",
                    "--no-resolv",
                    "--no-hosts",
                    "--bind-interfaces",
                    "--listen-address=127.0.0.1",
                    "--local-ttl=0",
                    &format!("--port={port}"),
                    &format!("--addn-hosts={}", hosts_path.display()),
                ])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("dnsmasq is needed for this test (apt-get install dnsmasq-base)");
            let address = SocketAddr::from(([127, 0, 0, 1], port));
            // Ready when it answers a query of its own (bounded); say why if it never does.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let mut port_taken = false;
            while !answers_query(address, "app.fulcrum.test") {
                let exited = child.try_wait().unwrap();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                if exited.is_some() && log.contains("Address already in use") {
                    port_taken = true;
                    break;
                }
                if exited.is_some() || std::time::Instant::now() > deadline {
                    let _ = child.kill();
                    panic!("dnsmasq never answered (exit: {exited:?}); its log:\n{log}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if port_taken {
                continue;
            }
            return Dnsmasq {
                child,
                hosts: hosts_path,
                address,
                dir,
            };
        }
        panic!("dnsmasq found no free port in 5 tries");
    }

    /// What dnsmasq has logged so far (queries included).
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dnsmasq.log")).unwrap_or_default()
    }

    /// Replaces the records and tells dnsmasq to re-read them.
    fn set_hosts(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

/// A port on 127.0.0.1 free for both UDP and TCP right now.
fn free_udp_and_tcp_port() -> u16 {
    loop {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Sends one A query for `name` and reports whether an answer came back within 200 ms.
fn answers_query(server: SocketAddr, name: &str) -> bool {
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.split('.') {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    if socket.send_to(&query, server).is_err() {
        return false;
    }
    let mut answer = [0u8; 512];
    matches!(socket.recv_from(&mut answer), Ok((n, _)) if n >= 12 && answer[..2] == [0x12, 0x34])
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on both 127.0.0.2 and 127.0.0.3 (every 127/8 address is loopback on Linux).
fn shared_port() -> u16 {
    loop {
        let first = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.3", port)).is_ok() {
            return port;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_backends_follow_the_records_without_loss() {
    let port = shared_port();
    let a = backend_at("a", SocketAddr::from(([127, 0, 0, 2], port)));
    let b = backend_at("b", SocketAddr::from(([127, 0, 0, 3], port)));
    let dns = Dnsmasq::start("127.0.0.2 app.fulcrum.test\n");
    let config = config_for(&[], "")
        .replace(
            "backends = []",
            &format!(
                "backends = [\"app.fulcrum.test:{port}\"]\nresolve_every = \"200ms\"\ndns_servers = [\"{}\"]",
                dns.address
            ),
        );
    let lb = balancer_with(&config, 1);
    let a_id = a.addr.to_string();
    let b_id = b.addr.to_string();
    assert!(
        eventually(Duration::from_secs(10), || async {
            app_backends(&lb).await.contains_key(&a_id)
        })
        .await,
        "name never resolved: {}\ndnsmasq log:\n{}",
        lb.logs(),
        dns.log()
    );
    let load = Load::start(&format!("http://{}/", lb.addr), 16, Duration::from_secs(20));
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.contains_key("a"))
            .await
    );

    // The name moves to b: b joins, a drains and leaves.
    dns.set_hosts("127.0.0.3 app.fulcrum.test\n");
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts.contains_key("b"))
            .await,
        "{}",
        lb.logs()
    );
    assert!(
        eventually(Duration::from_secs(5), || async {
            !app_backends(&lb).await.contains_key(&a_id)
        })
        .await
    );
    let a_count = load.count("a");
    assert!(
        load.wait_for(Duration::from_secs(5), |r| r.counts["b"] > 100)
            .await
    );
    assert_eq!(load.count("a"), a_count, "a got traffic after it left");

    // Both records: both take traffic.
    dns.set_hosts("127.0.0.2 app.fulcrum.test\n127.0.0.3 app.fulcrum.test\n");
    assert!(
        eventually(Duration::from_secs(5), || async {
            app_backends(&lb).await.len() == 2
        })
        .await
    );
    let report = load.stop().await;
    assert!(report.failures.is_empty(), "{:?}", report.failures);
    assert!(app_backends(&lb).await.contains_key(&b_id));
    let events = admin_get(&lb, "/api/events?limit=1000").await;
    assert!(events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["kind"] == "discovery"));
}
