//! Test fixtures: the real `fulcrum` binary started as backends and as the balancer, on
//! 127.0.0.1 port 0, with readiness read from their stdout and cleanup by process id.

#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};

/// How long a process may take to print its readiness line.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The fulcrum binary under test.
pub(crate) fn fulcrum_bin() -> &'static str {
    env!("CARGO_BIN_EXE_fulcrum")
}

/// A child process, killed (by pid) and reaped on drop.
pub(crate) struct Proc {
    child: Option<Child>,
    /// Address from the readiness line.
    pub addr: SocketAddr,
    /// Every `listening NAME SCHEME://ADDR` line: NAME → ADDR.
    pub listeners: HashMap<String, SocketAddr>,
    /// Where the process's stderr (its logs) goes.
    pub log_path: PathBuf,
    /// The config file of a `fulcrum run` (rewrite it and send HUP to reload).
    pub config_path: Option<PathBuf>,
    _dir: Option<tempfile::TempDir>,
}

impl Proc {
    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.as_ref().expect("process already reaped").id()
    }

    /// Kills the process with SIGKILL and reaps it.
    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends a signal by name ("TERM", "HUP", ...).
    pub(crate) fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub(crate) fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process's log output so far.
    pub(crate) fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin API's base URL (`fulcrum run` only).
    pub(crate) fn admin_url(&self) -> String {
        format!("http://{}", self.listeners["admin"])
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub(crate) fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM line")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `fulcrum ARGS` and waits until it printed at least `ready_lines` readiness lines.
fn spawn(
    args: &[&str],
    ready_lines: usize,
    dir: Option<tempfile::TempDir>,
    log_dir: &Path,
) -> Proc {
    spawn_via(&[], args, ready_lines, dir, log_dir)
}

/// [`spawn`], through `wrapper` (a command that executes its arguments, e.g. `prlimit`).
fn spawn_via(
    wrapper: &[&str],
    args: &[&str],
    ready_lines: usize,
    dir: Option<tempfile::TempDir>,
    log_dir: &Path,
) -> Proc {
    let log_path = log_dir.join(format!("log-{}.txt", unique()));
    let log = std::fs::File::create(&log_path).expect("log file");
    let mut command = match wrapper.split_first() {
        None => Command::new(fulcrum_bin()),
        Some((program, wrapper_args)) => {
            let mut command = Command::new(program);
            command.args(wrapper_args).arg(fulcrum_bin());
            command
        }
    };
    let mut child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("start fulcrum");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut listeners = HashMap::new();
    let mut first = None;
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    while listeners.len() < ready_lines {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = match rx.recv_timeout(left) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "fulcrum {args:?} not ready: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
        };
        let mut words = line.split_whitespace();
        if words.next() == Some("listening") {
            let name = words.next().unwrap_or_default().to_string();
            let addr: SocketAddr = words
                .next()
                .and_then(|u| u.split_once("://").map(|(_, a)| a))
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("bad readiness line {line:?}"));
            first.get_or_insert(addr);
            listeners.insert(name, addr);
        }
    }
    Proc {
        child: Some(child),
        addr: first.expect("a listener"),
        listeners,
        log_path,
        config_path: None,
        _dir: dir,
    }
}

fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts a demo backend named `name` (with an optional answer delay) on 127.0.0.1:0.
pub(crate) fn backend(name: &str, delay_ms: u64) -> Proc {
    spawn(
        &[
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--delay-ms",
            &delay_ms.to_string(),
        ],
        1,
        None,
        &std::env::temp_dir(),
    )
}

/// Starts `fulcrum backend --listen 127.0.0.1:0 --name NAME EXTRA...` (e.g. `--tcp-echo`,
/// `--proxy-protocol`).
pub(crate) fn backend_with(name: &str, extra: &[&str]) -> Proc {
    let mut args = vec!["backend", "--listen", "127.0.0.1:0", "--name", name];
    args.extend_from_slice(extra);
    spawn(&args, 1, None, &std::env::temp_dir())
}

/// Starts a demo backend named `name` serving HTTPS (h2 and http/1.1 by ALPN) with the PEM
/// certificate and key files given.
pub(crate) fn tls_backend(name: &str, cert: &Path, key: &Path) -> Proc {
    spawn(
        &[
            "backend",
            "--listen",
            "127.0.0.1:0",
            "--name",
            name,
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
        1,
        None,
        &std::env::temp_dir(),
    )
}

/// Starts a demo backend named `name` on a given address (e.g. to restart a killed one).
pub(crate) fn backend_at(name: &str, addr: SocketAddr) -> Proc {
    spawn(
        &["backend", "--listen", &addr.to_string(), "--name", name],
        1,
        None,
        &std::env::temp_dir(),
    )
}

/// Starts `fulcrum agent ARGS` (the caller gives `--listen` and the rest) and waits for its
/// readiness lines: `agent` (the agent-check port) and, with `--http-listen`, `agent-http`.
pub(crate) fn agent(args: &[&str]) -> Proc {
    let ready = 1 + usize::from(args.contains(&"--http-listen"));
    let mut all = vec!["agent"];
    all.extend_from_slice(args);
    spawn(&all, ready, None, &std::env::temp_dir())
}

/// A "backend" that accepts connections, reads a request head and closes without answering
/// (a [`ScriptedBackend`] with the default script). Returns its address and a counter of
/// accepted connections.
pub(crate) fn lying_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let backend = ScriptedBackend::start(Script::default());
    (backend.addr, backend.accepted.clone())
}

/// What a [`ScriptedBackend`] does once it wrote its reply on a connection.
#[derive(Debug, Clone, Default)]
pub(crate) enum After {
    /// Closes the connection.
    #[default]
    Close,
    /// Keeps it open, silent, reading (and ignoring) whatever comes, until the peer closes.
    Stall,
    /// Answers every further request head on the connection with the same reply.
    KeepAlive,
    /// Writes these bytes 100 ms later, unasked (counted in `late_writes`), then keeps the
    /// connection open and silent.
    Unsolicited(Vec<u8>),
}

/// The raw bytes and behaviour a [`ScriptedBackend`] answers each accepted connection with.
#[derive(Debug, Clone, Default)]
pub(crate) struct Script {
    /// Written as soon as the connection is accepted, before anything is read.
    pub eager: Vec<u8>,
    /// Written once a request head (up to an empty line) was read; `None`: nothing.
    pub reply: Option<Vec<u8>>,
    /// What follows the reply.
    pub after: After,
}

/// A raw-TCP "backend" on 127.0.0.1:0 that answers every connection it accepts with its
/// current [`Script`] (replaceable between cases with [`ScriptedBackend::set`], which also
/// closes the connections of the previous script, so no case is answered by another's): any
/// bytes, well-formed or not, then close, stall or keep the connection open. One thread per
/// connection; the threads end with their connections.
pub(crate) struct ScriptedBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    script: std::sync::Arc<std::sync::Mutex<Script>>,
    /// The connections open now (clones, to close them).
    open: std::sync::Arc<std::sync::Mutex<Vec<std::net::TcpStream>>>,
    /// Connections accepted so far.
    pub accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Unsolicited writes ([`After::Unsolicited`]) done so far.
    pub late_writes: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl ScriptedBackend {
    /// Starts it with `script`.
    pub(crate) fn start(script: Script) -> ScriptedBackend {
        use std::sync::atomic::Ordering::SeqCst;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let backend = ScriptedBackend {
            addr,
            script: std::sync::Arc::new(std::sync::Mutex::new(script)),
            open: Default::default(),
            accepted: Default::default(),
            late_writes: Default::default(),
        };
        let (script, open, accepted, late) = (
            backend.script.clone(),
            backend.open.clone(),
            backend.accepted.clone(),
            backend.late_writes.clone(),
        );
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { break };
                accepted.fetch_add(1, SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    open.lock().unwrap().push(clone);
                }
                let script = script.lock().unwrap().clone();
                let late = late.clone();
                std::thread::spawn(move || {
                    let _ = Self::serve(stream, &script, &late);
                });
            }
        });
        backend
    }

    /// The script for connections accepted from now on.
    /// Connections accepted before are closed.
    pub(crate) fn set(&self, script: Script) {
        *self.script.lock().unwrap() = script;
        for stream in self.open.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Connections accepted so far.
    pub(crate) fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn serve(
        mut stream: std::net::TcpStream,
        script: &Script,
        late: &std::sync::atomic::AtomicUsize,
    ) -> std::io::Result<()> {
        use std::io::{Read, Write};
        let mut pending = Vec::new();
        // Reads up to the end of the next request head; false at EOF.
        let read_head = |stream: &mut std::net::TcpStream, pending: &mut Vec<u8>| loop {
            if let Some(at) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                pending.drain(..at + 4);
                return true;
            }
            let mut buffer = [0u8; 4096];
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => return false,
                Ok(n) => pending.extend_from_slice(&buffer[..n]),
            }
        };
        if !script.eager.is_empty() {
            stream.write_all(&script.eager)?;
        }
        if !read_head(&mut stream, &mut pending) {
            return Ok(());
        }
        if let Some(reply) = &script.reply {
            stream.write_all(reply)?;
        }
        match &script.after {
            After::Close => {}
            After::Stall => while read_head(&mut stream, &mut pending) {},
            After::KeepAlive => {
                while read_head(&mut stream, &mut pending) {
                    stream.write_all(script.reply.as_deref().unwrap_or_default())?;
                }
            }
            After::Unsolicited(bytes) => {
                std::thread::sleep(Duration::from_millis(100));
                stream.write_all(bytes)?;
                late.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                while read_head(&mut stream, &mut pending) {}
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Both);
        Ok(())
    }
}

/// Writes `config` to a temporary file and returns (dir, path).
pub(crate) fn write_config(config: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fulcrum.toml");
    std::fs::write(&path, config).expect("write config");
    (dir, path)
}

/// Starts `fulcrum run` with this config text; `listeners` is how many listeners to await.
pub(crate) fn balancer_with(config: &str, listeners: usize) -> Proc {
    balancer_with_args(config, listeners, &[])
}

/// Like [`balancer_with`], with more command-line arguments after `run --config FILE`.
pub(crate) fn balancer_with_args(config: &str, listeners: usize, extra: &[&str]) -> Proc {
    let (dir, path) = write_config(config);
    let log_dir = dir.path().to_path_buf();
    let mut args = vec!["run", "--config", path.to_str().unwrap()];
    args.extend_from_slice(extra);
    // Every listener prints a readiness line, then the admin API ("listening admin ...").
    let mut proc = spawn(&args, listeners + 1, Some(dir), &log_dir);
    proc.config_path = Some(path);
    proc
}

/// Like [`balancer_with`], with the process's open-file limit (soft and hard) set to
/// `nofile` by util-linux's `prlimit`, which then executes fulcrum in its place (same pid).
pub(crate) fn balancer_with_nofile(config: &str, listeners: usize, nofile: u64) -> Proc {
    balancer_with_nofile_limits(config, listeners, nofile, nofile)
}

/// Like [`balancer_with_nofile`], with different soft and hard limits.
pub(crate) fn balancer_with_nofile_limits(
    config: &str,
    listeners: usize,
    soft: u64,
    hard: u64,
) -> Proc {
    let (dir, path) = write_config(config);
    let log_dir = dir.path().to_path_buf();
    let limit = format!("--nofile={soft}:{hard}");
    let args = ["run", "--config", path.to_str().unwrap()];
    let mut proc = spawn_via(
        &["prlimit", &limit],
        &args,
        listeners + 1,
        Some(dir),
        &log_dir,
    );
    proc.config_path = Some(path);
    proc
}

/// The number of descriptors process `pid` has open now (Linux `/proc`).
pub(crate) fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Starts `fulcrum run` with one HTTP listener `web` on port 0 in front of `backends`.
/// `pool_extra` is added to the `[pools.app]` table (e.g. `algorithm = "least_conn"`).
pub(crate) fn balancer(backends: &[(SocketAddr, u32)], pool_extra: &str) -> Proc {
    balancer_with(&config_for(backends, pool_extra), 1)
}

/// The config text `balancer` uses.
pub(crate) fn config_for(backends: &[(SocketAddr, u32)], pool_extra: &str) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|(addr, weight)| format!("{{ address = \"{addr}\", weight = {weight} }}"))
        .collect();
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n\n\
         [pools.app]\nbackends = [{}]\n{pool_extra}\n",
        list.join(", ")
    )
}

/// A free port on 127.0.0.1 with nothing listening (bound, then released).
pub(crate) fn dead_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Makes `ring` the process's rustls provider (reqwest is built without one of its own).
pub(crate) fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A TLS config trusting nothing, for clients that only speak plain HTTP: giving reqwest one
/// spares it loading the system's root certificates for every client it builds.
pub(crate) fn plain_tls_config() -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default TLS versions")
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth()
}

/// An HTTP client that never uses a proxy, with a bounded per-request time.
pub(crate) fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_backend_preconfigured(plain_tls_config())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Sends `total` GET requests to `url` from `concurrency` tasks; returns (X-Backend → count,
/// non-200 statuses and transport errors as text).
pub(crate) async fn spread(
    url: &str,
    total: usize,
    concurrency: usize,
) -> (HashMap<String, usize>, Vec<String>) {
    let client = client();
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, next, url) = (client.clone(), next.clone(), url.to_string());
        tasks.spawn(async move {
            let mut counts: HashMap<String, usize> = HashMap::new();
            let mut failures = Vec::new();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                match client.get(&url).send().await {
                    Ok(response) if response.status() == 200 => {
                        let name = response
                            .headers()
                            .get("x-backend")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("?")
                            .to_string();
                        let _ = response.bytes().await;
                        *counts.entry(name).or_default() += 1;
                    }
                    Ok(response) => failures.push(format!("status {}", response.status())),
                    Err(error) => failures.push(format!("error {error}")),
                }
            }
            (counts, failures)
        });
    }
    let mut counts = HashMap::new();
    let mut failures = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (c, f) = result.unwrap();
        for (k, v) in c {
            *counts.entry(k).or_default() += v;
        }
        failures.extend(f);
    }
    (counts, failures)
}

/// What a [`Load`] saw.
#[derive(Debug, Default)]
pub(crate) struct LoadReport {
    /// X-Backend → requests answered 200.
    pub counts: HashMap<String, usize>,
    /// X-Backend → when it first answered.
    pub first_seen: HashMap<String, std::time::Instant>,
    /// X-Backend → when the latest request it answered was sent.
    pub last_sent: HashMap<String, std::time::Instant>,
    /// Non-200 answers and transport errors.
    pub failures: Vec<String>,
}

impl LoadReport {
    /// Total successful requests.
    pub(crate) fn total(&self) -> usize {
        self.counts.values().sum()
    }
}

/// Continuous GET load from `concurrency` clients until stopped (bounded by `max_duration`).
pub(crate) struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    report: std::sync::Arc<std::sync::Mutex<LoadReport>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    /// Starts the load against `url`.
    pub(crate) fn start(url: &str, concurrency: usize, max_duration: Duration) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let report = std::sync::Arc::new(std::sync::Mutex::new(LoadReport::default()));
        let deadline = std::time::Instant::now() + max_duration;
        let mut tasks = tokio::task::JoinSet::new();
        let client = client();
        for _ in 0..concurrency {
            let (client, url, stop, report) = (
                client.clone(),
                url.to_string(),
                stop.clone(),
                report.clone(),
            );
            tasks.spawn(async move {
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && std::time::Instant::now() < deadline
                {
                    let sent = std::time::Instant::now();
                    let outcome = client.get(&url).send().await;
                    let now = std::time::Instant::now();
                    let mut report = report.lock().unwrap();
                    match outcome {
                        Ok(response) if response.status() == 200 => {
                            let name = response
                                .headers()
                                .get("x-backend")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("?")
                                .to_string();
                            *report.counts.entry(name.clone()).or_default() += 1;
                            report.first_seen.entry(name.clone()).or_insert(now);
                            report.last_sent.insert(name, sent);
                        }
                        Ok(response) => report
                            .failures
                            .push(format!("status {}", response.status())),
                        Err(error) => report.failures.push(format!("error {error}")),
                    }
                }
            });
        }
        Load {
            stop,
            report,
            tasks,
        }
    }

    /// Requests answered by `backend` so far.
    pub(crate) fn count(&self, backend: &str) -> usize {
        self.report
            .lock()
            .unwrap()
            .counts
            .get(backend)
            .copied()
            .unwrap_or(0)
    }

    /// Total successful requests so far.
    pub(crate) fn total(&self) -> usize {
        self.report.lock().unwrap().total()
    }

    /// Waits (bounded by `timeout`) until `condition` holds on the report so far.
    pub(crate) async fn wait_for(
        &self,
        timeout: Duration,
        condition: impl Fn(&LoadReport) -> bool,
    ) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if condition(&self.report.lock().unwrap()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        condition(&self.report.lock().unwrap())
    }

    /// Stops the clients and returns what they saw.
    pub(crate) async fn stop(mut self) -> LoadReport {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        std::mem::take(&mut self.report.lock().unwrap())
    }
}

/// Waits (bounded) until `probe` returns true, polling every 10 ms.
pub(crate) async fn eventually<F, Fut>(timeout: Duration, mut probe: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if probe().await {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// GETs an admin API path and parses the JSON answer.
pub(crate) async fn admin_get(lb: &Proc, path: &str) -> serde_json::Value {
    let response = client()
        .get(format!("{}{path}", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "GET {path}: {}",
        response.status()
    );
    serde_json::from_slice(&response.bytes().await.unwrap()).unwrap()
}

/// The balancer's Prometheus `/metrics` text.
pub(crate) async fn metrics_text(lb: &Proc) -> String {
    let response = client()
        .get(format!("{}/metrics", lb.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "GET /metrics");
    response.text().await.unwrap()
}

/// The backends of pool `app` as the admin API shows them: address → JSON.
pub(crate) async fn app_backends(lb: &Proc) -> HashMap<String, serde_json::Value> {
    let pool = admin_get(lb, "/api/pools/app").await;
    pool["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["address"].as_str().unwrap().to_string(), b.clone()))
        .collect()
}

/// Reads one complete HTTP/1.1 response (content-length or chunked) from a raw `stream`
/// (TCP or TLS), within 5 s.
pub(crate) async fn read_response<S: AsyncRead + Unpin>(stream: &mut S) -> String {
    let mut data = Vec::new();
    let complete = |data: &[u8]| {
        let text = String::from_utf8_lossy(data);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        for line in head.lines().skip(1) {
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    return body.len() >= value.trim().parse::<usize>().unwrap();
                }
            }
        }
        body.ends_with("0\r\n\r\n")
    };
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buffer = [0u8; 4096];
        while !complete(&data) {
            let n = stream.read(&mut buffer).await.expect("read response");
            assert!(
                n > 0,
                "connection closed; got {:?}",
                String::from_utf8_lossy(&data)
            );
            data.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no complete response in 5 s: {data:?}");
    String::from_utf8_lossy(&data).into_owned()
}

/// Waits (up to `limit`) for the server to close a raw `stream`; returns how long that took.
pub(crate) async fn closed_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Duration {
    let started = Instant::now();
    let mut buffer = [0u8; 64];
    match tokio::time::timeout(limit, stream.read(&mut buffer)).await {
        Ok(Ok(0) | Err(_)) => started.elapsed(),
        Ok(Ok(n)) => panic!("unexpected {n} bytes"),
        Err(_) => panic!("connection still open after {limit:?}"),
    }
}

/// A test certificate authority.
pub(crate) struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// A leaf certificate: PEM texts and the DER the server presents.
pub(crate) struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Ca {
    pub(crate) fn new() -> Ca {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fulcrum test CA");
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(
                params,
                rcgen::KeyPair::generate().unwrap(),
            )
            .unwrap(),
        }
    }

    pub(crate) fn pem(&self) -> String {
        self.issuer.pem()
    }

    pub(crate) fn leaf(&self, names: &[&str]) -> Leaf {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

impl Leaf {
    /// Writes `NAME.crt` and `NAME.key` into `dir`.
    pub(crate) fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// A rustls client config trusting `ca_pem` only, with ALPN h2 and http/1.1.
pub(crate) fn trusting(ca_pem: &str) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config =
        rustls::ClientConfig::builder_with_provider(fulcrum::config::certs::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}
