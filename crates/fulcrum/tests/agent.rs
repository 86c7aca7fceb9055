//! End-to-end: the backend agent. Fulcrum polling a plain agent (a few lines of std code that
//! print `50%` then `drain`), Fulcrum polling real `fulcrum agent` processes, and the real
//! HAProxy from Debian polling `fulcrum agent` with its `agent-check`.
//!
//! Each backend host has its own agent on the pool's agent port; on one machine the two hosts
//! are 127.0.0.1 and ::1, so each backend's agent is the one on its own address.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Flags that make a `fulcrum agent`'s answer independent of this machine's load: CPU and
/// memory never lower the weight, memory and disk never drain.
const STEADY: [&str; 8] = [
    "--cpu-weight-from",
    "100",
    "--mem-weight-from",
    "100",
    "--mem-drain",
    "100",
    "--disk-drain",
    "100",
];

/// A plain agent: writes the current `line` to every connection and closes it.
fn plain_agent(first_line: &str) -> (SocketAddr, Arc<Mutex<String>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let line = Arc::new(Mutex::new(first_line.to_string()));
    let current = line.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { break };
            let text = current.lock().unwrap().clone();
            let _ = stream.write_all(text.as_bytes());
        }
    });
    (address, line)
}

fn agent_pool(port: u16) -> String {
    format!(
        "algorithm = \"round_robin\"\n[pools.app.agent]\nport = {port}\ninterval = \"100ms\"\ntimeout = \"500ms\""
    )
}

async fn backend_view(lb: &Proc, address: SocketAddr) -> serde_json::Value {
    app_backends(lb).await[&address.to_string()].clone()
}

/// Waits until the backend at `address` shows `field == value` in the admin API.
async fn wait_field(lb: &Proc, address: SocketAddr, field: &str, value: serde_json::Value) {
    let ok = eventually(Duration::from_secs(5), || {
        let value = value.clone();
        async move { backend_view(lb, address).await[field] == value }
    })
    .await;
    assert!(
        ok,
        "backend {address}: {field} never became {value}: {}\n{}",
        backend_view(lb, address).await,
        lb.logs()
    );
}

/// The agent's `GET /status` JSON.
async fn agent_status(url: &str) -> serde_json::Value {
    let response = client().get(url).send().await.unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

fn share(counts: &HashMap<String, usize>, name: &str) -> f64 {
    let total: usize = counts.values().sum();
    counts.get(name).copied().unwrap_or(0) as f64 / total.max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_agent_halves_the_weight_then_drains_the_backend() {
    let (agent_address, line) = plain_agent("50%\n");
    let a = backend("a", 0);
    // b's host (::1) runs no agent: it keeps full weight and stays up.
    let b = backend_at("b", "[::1]:0".parse().unwrap());
    let lb = balancer(
        &[(a.addr, 10), (b.addr, 10)],
        &agent_pool(agent_address.port()),
    );
    wait_field(&lb, a.addr, "effective_weight", 5.into()).await;
    assert_eq!(backend_view(&lb, a.addr).await["agent_percent"], 50);
    let b_view = backend_view(&lb, b.addr).await;
    assert_eq!(b_view["effective_weight"], 10, "{b_view}");
    assert_eq!(b_view["agent_state"], "up", "{b_view}");

    let url = format!("http://{}/", lb.addr);
    // The balancer rebuilds its weights within a housekeeping tick of the change: smooth
    // weighted round robin over weights 5 and 10 then gives a exactly 10 of any 30 requests.
    let rebuilt = eventually(Duration::from_secs(5), || async {
        spread(&url, 30, 2).await.0.get("a") == Some(&10)
    })
    .await;
    assert!(rebuilt, "a's halved weight never reached the balancer");
    let (counts, failures) = spread(&url, 300, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    // Weights 5 and 10: a gets a third.
    let a_share = share(&counts, "a");
    assert!((0.25..=0.42).contains(&a_share), "{counts:?}");

    *line.lock().unwrap() = "drain\n".to_string();
    wait_field(&lb, a.addr, "agent_state", "drain".into()).await;
    let a_view = backend_view(&lb, a.addr).await;
    assert_eq!(a_view["available"], false, "{a_view}");
    // `drain` alone leaves the weight as the agent last set it.
    assert_eq!(a_view["agent_percent"], 50, "{a_view}");
    let (counts, failures) = spread(&url, 200, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("a"), None, "{counts:?}");
    assert_eq!(counts.get("b"), Some(&200), "{counts:?}");

    let events = admin_get(&lb, "/api/events?limit=1000").await;
    let a_id = a.addr.to_string();
    let changes: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "agent" && e["backend"] == a_id.as_str())
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    assert_eq!(changes.len(), 2, "{changes:?}");
    assert!(changes[0].contains("50% up"), "{changes:?}");
    assert!(changes[1].contains("50% drain"), "{changes:?}");
    assert!(lb.logs().contains("agent: 50% drain"), "{}", lb.logs());

    // A reload without `[pools.app.agent]` stops polling and forgets the agent's say.
    let config = config_for(&[(a.addr, 10), (b.addr, 10)], "algorithm = \"round_robin\"");
    std::fs::write(lb.config_path.as_ref().unwrap(), config).unwrap();
    lb.signal("HUP");
    wait_field(&lb, a.addr, "agent_state", "up".into()).await;
    assert_eq!(backend_view(&lb, a.addr).await["effective_weight"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulcrum_agents_set_weight_maintenance_and_down() {
    let dir = tempfile::tempdir().unwrap();
    let maint_b = dir.path().join("maint-b");
    let down_b = dir.path().join("down-b");
    let mut args_a = vec!["--listen", "127.0.0.1:0", "--max-weight", "50"];
    args_a.extend(STEADY);
    let agent_a = agent(&args_a);
    let port = agent_a.addr.port();
    let listen_b = format!("[::1]:{port}");
    let check = format!("test ! -e {}", down_b.display());
    let maint_arg = maint_b.display().to_string();
    let mut args_b = vec![
        "--listen",
        &listen_b,
        "--http-listen",
        "127.0.0.1:0",
        "--maint-file",
        &maint_arg,
        "--check-command",
        &check,
        "--check-interval",
        "100ms",
    ];
    args_b.extend(STEADY);
    let agent_b = agent(&args_b);
    let status_url = format!("http://{}/status", agent_b.listeners["agent-http"]);

    let a = backend("a", 0);
    let b = backend_at("b", "[::1]:0".parse().unwrap());
    let lb = balancer(&[(a.addr, 10), (b.addr, 10)], &agent_pool(port));
    wait_field(&lb, a.addr, "agent_percent", 50.into()).await;
    assert_eq!(backend_view(&lb, a.addr).await["effective_weight"], 5);
    wait_field(&lb, b.addr, "agent_state", "up".into()).await;
    assert_eq!(backend_view(&lb, b.addr).await["effective_weight"], 10);

    let status = agent_status(&status_url).await;
    assert_eq!(status["verdict"], "up", "{status}");
    assert_eq!(status["weight_percent"], 100, "{status}");
    assert_eq!(status["maint"], false, "{status}");
    assert!(status["cpu_percent"].as_f64().is_some(), "{status}");
    assert!(status["memory_percent"].as_f64().unwrap() > 0.0, "{status}");

    // Maintenance switch: b takes nothing while the file exists.
    let url = format!("http://{}/", lb.addr);
    std::fs::write(&maint_b, "").unwrap();
    wait_field(&lb, b.addr, "agent_state", "maint".into()).await;
    let (counts, failures) = spread(&url, 100, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("a"), Some(&100), "{counts:?}");
    let status = agent_status(&status_url).await;
    assert_eq!(status["verdict"], "maint", "{status}");
    std::fs::remove_file(&maint_b).unwrap();
    wait_field(&lb, b.addr, "agent_state", "up".into()).await;

    // The check command fails: b is down; it passes again: b is back.
    std::fs::write(&down_b, "").unwrap();
    wait_field(&lb, b.addr, "agent_state", "down".into()).await;
    assert_eq!(backend_view(&lb, b.addr).await["available"], false);
    std::fs::remove_file(&down_b).unwrap();
    wait_field(&lb, b.addr, "agent_state", "up".into()).await;
    let (counts, failures) = spread(&url, 150, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert!(share(&counts, "b") > 0.5, "{counts:?}");
}

/// The Debian haproxy binary; the test fails (never skips) without it.
fn haproxy_bin() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/usr/local/sbin"].map(PathBuf::from));
    dirs.into_iter()
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
        .expect("haproxy is not installed: run `apt-get install -y haproxy` (.ci/run does)")
}

/// A haproxy process, killed by pid and reaped on drop.
struct HaProxy {
    child: std::process::Child,
    socket: PathBuf,
    log: PathBuf,
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HaProxy {
    /// Starts haproxy in the foreground with `config` written in `dir`, and waits until its
    /// stats socket answers.
    fn start(dir: &Path, config: &str) -> HaProxy {
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let log = dir.join("haproxy.log");
        let child = std::process::Command::new(haproxy_bin())
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(std::fs::File::create(dir.join("haproxy.err")).unwrap())
            .spawn()
            .expect("start haproxy");
        let mut haproxy = HaProxy {
            child,
            socket: dir.join("admin.sock"),
            log,
        };
        let ready = wait_until(Duration::from_secs(10), || {
            if let Ok(Some(status)) = haproxy.child.try_wait() {
                panic!("haproxy exited with {status}: {}", haproxy.logs());
            }
            haproxy.command("show info").is_some()
        });
        assert!(
            ready,
            "haproxy stats socket never answered: {}",
            haproxy.logs()
        );
        haproxy
    }

    fn logs(&self) -> String {
        let err = self.log.with_file_name("haproxy.err");
        format!(
            "{}{}",
            std::fs::read_to_string(&self.log).unwrap_or_default(),
            std::fs::read_to_string(err).unwrap_or_default()
        )
    }

    /// Sends one command to the stats socket and returns the answer.
    fn command(&self, command: &str) -> Option<String> {
        let mut stream = std::os::unix::net::UnixStream::connect(&self.socket).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        stream.write_all(format!("{command}\n").as_bytes()).ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        Some(answer)
    }

    /// The `show stat` row of `proxy`/`server`, by column name.
    fn server(&self, proxy: &str, server: &str) -> HashMap<String, String> {
        let stat = self.command("show stat").unwrap_or_default();
        let mut lines = stat.lines();
        let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
            return HashMap::new();
        };
        let names: Vec<&str> = header.split(',').collect();
        lines
            .map(|l| l.split(',').collect::<Vec<_>>())
            .find(|f| f.first() == Some(&proxy) && f.get(1) == Some(&server))
            .map(|fields| {
                names
                    .iter()
                    .zip(fields)
                    .map(|(n, f)| (n.to_string(), f.to_string()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until `proxy`/`server` has this status and (if given) weight.
    fn wait_server(&self, status: &str, weight: Option<&str>) {
        let ok = wait_until(Duration::from_secs(10), || {
            let row = self.server("app", "s1");
            row.get("status").map(String::as_str) == Some(status)
                && weight.is_none_or(|w| row.get("weight").map(String::as_str) == Some(w))
        });
        assert!(
            ok,
            "haproxy server never reached status {status} weight {weight:?}: {:?}\n{}",
            self.server("app", "s1"),
            self.logs()
        );
    }
}

fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn haproxy_agent_check_follows_fulcrum_agent() {
    let dir = tempfile::tempdir().unwrap();
    let maint = dir.path().join("maint");
    let drain = dir.path().join("drain");
    let down = dir.path().join("down");
    let maint_arg = maint.display().to_string();
    let drain_arg = drain.display().to_string();
    let check = format!("test ! -e {}", down.display());
    let mut args = vec![
        "--drain-file",
        &drain_arg,
        "--listen",
        "127.0.0.1:0",
        "--max-weight",
        "50",
        "--maint-file",
        &maint_arg,
        "--check-command",
        &check,
        "--check-interval",
        "100ms",
    ];
    args.extend(STEADY);
    let agent = agent(&args);
    let server = backend("s1", 0);
    // haproxy cannot bind port 0: take a free port and release it.
    let front = dead_address();
    let config = format!(
        "global\n    stats socket {sock} level admin\n\n\
         defaults\n    mode http\n    timeout connect 1s\n    timeout client 5s\n    timeout server 5s\n\n\
         listen app\n    bind {front}\n    \
         server s1 {server} weight 100 check inter 200ms agent-check agent-port {port} agent-inter 200ms\n",
        sock = dir.path().join("admin.sock").display(),
        server = server.addr,
        port = agent.addr.port(),
    );
    let haproxy = HaProxy::start(dir.path(), &config);

    // 50% of the configured weight 100.
    haproxy.wait_server("UP", Some("50"));
    std::fs::write(&maint, "").unwrap();
    haproxy.wait_server("MAINT", None);
    std::fs::remove_file(&maint).unwrap();
    haproxy.wait_server("UP", Some("50"));
    std::fs::write(&drain, "").unwrap();
    haproxy.wait_server("DRAIN (agent)", Some("50"));
    std::fs::remove_file(&drain).unwrap();
    haproxy.wait_server("UP", Some("50"));
    std::fs::write(&down, "").unwrap();
    haproxy.wait_server("DOWN (agent)", None);
    std::fs::remove_file(&down).unwrap();
    haproxy.wait_server("UP", Some("50"));
    // HAProxy shows the agent's word and comment as its last agent check.
    let row = haproxy.server("app", "s1");
    assert!(
        row.get("last_agt").is_some_and(|d| d.contains("up (cpu")),
        "{row:?}"
    );
    // Dropping `haproxy` kills it by pid and reaps it.
}
