//! End-to-end: autoscaling with real processes. The process provider starts `fulcrum backend`
//! children; the command provider runs shell commands that start and stop them.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::*;

/// The autoscale status of pool `app`.
async fn status(lb: &Proc) -> serde_json::Value {
    let all = admin_get(lb, "/api/autoscale").await;
    all.as_array()
        .unwrap()
        .iter()
        .find(|a| a["pool"] == "app")
        .cloned()
        .expect("pool app has an autoscaler")
}

fn pids(status: &serde_json::Value) -> Vec<u32> {
    status["managed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["pid"].as_u64().unwrap() as u32)
        .collect()
}

fn alive(pid: u32) -> bool {
    // A reaped or never-existing process has no /proc entry; a zombie is not alive either.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

fn process_pool(autoscale: &str) -> String {
    config_for(&[], &format!(
        "algorithm = \"least_conn\"\n\n[pools.app.autoscale]\nprovider = \"process\"\n\
         command = [\"{}\", \"backend\", \"--listen\", \"127.0.0.1:{{port}}\", \"--name\", \"{{name}}\", \"--delay-ms\", \"200\"]\n\
         stop_grace = \"2s\"\nsample_every = \"100ms\"\n{autoscale}\n",
        fulcrum_bin()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_grows_under_load_and_shrinks_back_without_loss() {
    let config = process_pool(
        "min = 1\nmax = 4\nmetric = \"inflight_per_backend\"\ntarget = 4\n\
         scale_up_after = \"500ms\"\nscale_down_after = \"1s\"\ncooldown = \"300ms\"",
    );
    let lb = balancer_with(&config, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(&lb).await["backends"] == 1
        })
        .await,
        "the pool never reached min = 1: {}",
        lb.logs()
    );

    // 24 concurrent slow requests against a target of 4 in flight per backend.
    let url = format!("http://{}/", lb.addr);
    let heavy = Load::start(&url, 24, Duration::from_secs(30));
    let most = AtomicU64::new(0);
    let grew = eventually(Duration::from_secs(20), || async {
        let backends = status(&lb).await["backends"].as_u64().unwrap();
        most.fetch_max(backends, Ordering::Relaxed);
        backends >= 3
    })
    .await;
    assert!(grew, "never grew to 3 backends: {}", lb.logs());
    // Stay loaded a little longer: it may reach max, never more.
    let keep_until = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < keep_until {
        most.fetch_max(
            status(&lb).await["backends"].as_u64().unwrap(),
            Ordering::Relaxed,
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let most = most.into_inner();
    assert!(most <= 4, "exceeded max: {most}");
    let started = pids(&status(&lb).await);
    let heavy = heavy.stop().await;
    assert!(heavy.failures.is_empty(), "{:?}", heavy.failures);
    assert!(heavy.counts.len() >= 3, "{:?}", heavy.counts);

    // Light load keeps running while the pool shrinks back to min: nothing may fail.
    let light = Load::start(&url, 2, Duration::from_secs(30));
    let least = AtomicU64::new(u64::MAX);
    let shrank = eventually(Duration::from_secs(20), || async {
        let backends = status(&lb).await["backends"].as_u64().unwrap();
        least.fetch_min(backends, Ordering::Relaxed);
        backends == 1
    })
    .await;
    assert!(shrank, "never shrank to 1: {}", lb.logs());
    let light = light.stop().await;
    assert!(light.failures.is_empty(), "{:?}", light.failures);
    assert!(light.total() > 0);
    assert_eq!(least.into_inner(), 1, "went below min");

    // The backends it stopped are gone; the one it kept is alive.
    let kept = pids(&status(&lb).await);
    assert_eq!(kept.len(), 1);
    for pid in started.iter().filter(|p| !kept.contains(p)) {
        assert!(
            eventually(Duration::from_secs(5), || async { !alive(*pid) }).await,
            "stopped backend {pid} still runs"
        );
    }
    let events = admin_get(&lb, "/api/events?limit=1000").await;
    let messages: Vec<String> = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "autoscale")
        .map(|e| e["message"].as_str().unwrap().to_string())
        .collect();
    assert!(
        messages.iter().any(|m| m.starts_with("scale up")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m.starts_with("scale down")),
        "{messages:?}"
    );
    let metrics = metrics_text(&lb).await;
    assert!(
        metrics.contains("fulcrum_autoscale_backends{pool=\"app\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("fulcrum_autoscale_decisions_total{pool=\"app\",direction=\"up\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashed_backend_is_replaced_and_children_stop_with_fulcrum() {
    let config = process_pool(
        "min = 2\nmax = 3\nmetric = \"inflight_per_backend\"\ntarget = 4\n\
         scale_up_after = \"10s\"\nscale_down_after = \"10s\"",
    );
    let mut lb = balancer_with(&config, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            pids(&status(&lb).await).len() == 2
        })
        .await,
        "{}",
        lb.logs()
    );
    let before = pids(&status(&lb).await);
    let status_code = std::process::Command::new("kill")
        .args(["-KILL", &before[0].to_string()])
        .status()
        .unwrap();
    assert!(status_code.success());
    assert!(
        eventually(Duration::from_secs(10), || async {
            let now = status(&lb).await;
            let pids = pids(&now);
            pids.len() == 2 && !pids.contains(&before[0]) && now["replacements"] == 1
        })
        .await,
        "crashed backend not replaced: {}",
        lb.logs()
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 20, 4).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.values().sum::<usize>(), 20);

    let children = pids(&status(&lb).await);
    lb.signal("TERM");
    assert_eq!(
        lb.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        lb.logs()
    );
    for pid in children {
        assert!(
            eventually(Duration::from_secs(5), || async { !alive(pid) }).await,
            "child {pid} outlived fulcrum"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_provider_runs_the_platform_commands() {
    let dir = tempfile::tempdir().unwrap();
    let dir_path = dir.path().display().to_string();
    // scale_up starts a backend on a free port in the background and prints its address;
    // scale_down stops the one at {address}.
    let scale_up = format!(
        "out=$(mktemp -p {dir_path}); {bin} backend --listen 127.0.0.1:0 --name from-command >\"$out\" 2>&1 </dev/null & pid=$!; \
         for i in $(seq 200); do addr=$(sed -n 's|^listening backend http://\\([^ ]*\\).*|\\1|p' \"$out\"); [ -n \"$addr\" ] && break; sleep 0.05; done; \
         echo $pid > {dir_path}/$addr.pid; echo $addr",
        bin = fulcrum_bin()
    );
    let scale_down = format!("kill $(cat {dir_path}/{{address}}.pid)");
    let autoscale = |min: usize| {
        format!(
            "[pools.app.autoscale]\nprovider = \"command\"\nmin = {min}\nmax = 2\nmetric = \"rps_per_backend\"\ntarget = 1000\n\
             sample_every = \"100ms\"\nscale_down_after = \"300ms\"\ncooldown = \"100ms\"\n\
             scale_up = [\"sh\", \"-c\", {scale_up:?}]\nscale_down = [\"sh\", \"-c\", {scale_down:?}]\n"
        )
    };
    let config = config_for(&[], &autoscale(1));
    let lb = balancer_with(&config, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(&lb).await["managed"].as_array().unwrap().len() == 1
        })
        .await,
        "{}",
        lb.logs()
    );
    let address = status(&lb).await["managed"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 10, 2).await;
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!(counts.get("from-command"), Some(&10), "{counts:?}");

    // min = 0 and no load: the backend drains, scale_down runs and its process exits.
    let pid: u32 = std::fs::read_to_string(dir.path().join(format!("{address}.pid")))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let reload_config = config.replace("min = 1", "min = 0");
    std::fs::write(lb.config_path.as_ref().unwrap(), reload_config).unwrap();
    lb.signal("HUP");
    assert!(
        eventually(Duration::from_secs(10), || async { !alive(pid) }).await,
        "scale_down never stopped {address}: {}",
        lb.logs()
    );
    assert!(app_backends(&lb).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_shows_the_autoscaler() {
    let config = process_pool(
        "min = 1\nmax = 3\nmetric = \"inflight_per_backend\"\ntarget = 4\nscale_up_after = \"10s\"",
    );
    let lb = balancer_with(&config, 1);
    assert!(
        eventually(Duration::from_secs(10), || async {
            status(&lb).await["backends"] == 1
        })
        .await
    );
    let output = std::process::Command::new(fulcrum_bin())
        .args(["ctl", "--admin", &lb.admin_url(), "autoscale"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines[0].starts_with("POOL"), "{stdout}");
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(row[0], "app", "{stdout}");
    assert_eq!(row[1], "inflight_per_backend", "{stdout}");
    assert_eq!(row[3], "1", "{stdout}");
    assert_eq!(row[5], "1..3", "{stdout}");
    let managed = status(&lb).await["managed"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(row[8], managed, "{stdout}");
}

/// A plain HAProxy-style agent on 127.0.0.1 (every autoscaled backend's IP) that answers
/// whatever line the test sets.
fn plain_agent() -> (u16, std::sync::Arc<std::sync::Mutex<String>>) {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let line = std::sync::Arc::new(std::sync::Mutex::new(String::from("100% up\n")));
    let answer = line.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let text = answer.lock().unwrap().clone();
            let _ = stream.write_all(text.as_bytes());
        }
    });
    (port, line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_metric_follows_the_agents_reports() {
    let (agent_port, line) = plain_agent();
    *line.lock().unwrap() = "100% up #cpu 90% mem 20%\n".to_string();
    let config = process_pool(&format!(
        "min = 1\nmax = 3\nmetric = \"cpu\"\ntarget = 50\n\
         scale_up_after = \"300ms\"\nscale_down_after = \"300ms\"\ncooldown = \"200ms\"\n\n\
         [pools.app.agent]\nport = {agent_port}\ninterval = \"100ms\"\ntimeout = \"500ms\""
    ));
    let lb = balancer_with(&config, 1);
    // 90% CPU per backend against a 50% target: the pool grows to max.
    assert!(
        eventually(Duration::from_secs(15), || async {
            status(&lb).await["backends"] == 3
        })
        .await,
        "never grew on CPU: {}",
        lb.logs()
    );
    let backends = app_backends(&lb).await;
    assert!(
        backends.values().all(|b| b["agent_cpu_percent"] == 90),
        "{backends:?}"
    );
    // The agents now say 10%: back to min.
    *line.lock().unwrap() = "100% up #cpu 10%\n".to_string();
    assert!(
        eventually(Duration::from_secs(15), || async {
            status(&lb).await["backends"] == 1
        })
        .await,
        "never shrank on CPU: {}",
        lb.logs()
    );
}
