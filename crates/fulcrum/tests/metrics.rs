//! End-to-end: `/metrics` is valid OpenMetrics text (checked by the reference Python parser,
//! `prometheus_client.openmetrics.parser`) and its counters match the traffic sent; the access
//! log writes one structured line per request.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

/// Parses exposition text with the reference parser; returns (name, labels, value) samples.
fn parse_openmetrics(text: &str) -> Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> {
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new("python3")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 is needed for this test");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the OpenMetrics parser refused /metrics (needs `pip install prometheus-client`): {}\n{text}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: Vec<(String, serde_json::Map<String, serde_json::Value>, f64)> =
        serde_json::from_slice(&output.stdout).unwrap();
    parsed
}

fn sum(
    samples: &[(String, serde_json::Map<String, serde_json::Value>, f64)],
    name: &str,
    label: Option<(&str, &str)>,
) -> f64 {
    samples
        .iter()
        .filter(|(n, labels, _)| {
            n == name
                && label.is_none_or(|(k, v)| labels.get(k).and_then(|x| x.as_str()) == Some(v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_traffic() {
    let (a, b) = (backend("a", 0), backend("b", 0));
    let dead = dead_address();
    let lb = balancer(
        &[(a.addr, 1), (b.addr, 1)],
        "algorithm = \"round_robin\"\n[pools.app.passive]\nenabled = false",
    );
    let (counts, failures) = spread(&format!("http://{}/", lb.addr), 100, 4).await;
    assert!(failures.is_empty());
    assert_eq!(counts.values().sum::<usize>(), 100);
    let (_, failures) = spread(&format!("http://{}/?status=503", lb.addr), 10, 2).await;
    assert_eq!(failures.len(), 10);
    let (_, failures) = spread(&format!("http://{}/?status=404", lb.addr), 7, 1).await;
    assert_eq!(failures.len(), 7);
    // A pool with nothing alive answers 503 locally.
    let lb_dead = balancer(&[(dead, 1)], "");
    let response = client()
        .get(format!("http://{}/", lb_dead.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);

    let text = metrics_text(&lb).await;
    let samples = parse_openmetrics(&text);
    assert_eq!(
        sum(
            &samples,
            "fulcrum_backend_responses_total",
            Some(("class", "2xx"))
        ),
        100.0
    );
    assert_eq!(
        sum(
            &samples,
            "fulcrum_backend_responses_total",
            Some(("class", "5xx"))
        ),
        10.0
    );
    assert_eq!(
        sum(
            &samples,
            "fulcrum_backend_responses_total",
            Some(("class", "4xx"))
        ),
        7.0
    );
    assert_eq!(
        sum(&samples, "fulcrum_request_duration_seconds_count", None),
        117.0
    );
    assert_eq!(sum(&samples, "fulcrum_backend_up", None), 2.0);
    assert_eq!(sum(&samples, "fulcrum_local_responses_total", None), 0.0);
    assert!(sum(&samples, "fulcrum_client_connections_accepted_total", None) >= 4.0);
    assert!(sum(&samples, "fulcrum_upstream_requests_reused_total", None) > 50.0);

    let text = metrics_text(&lb_dead).await;
    let samples = parse_openmetrics(&text);
    assert_eq!(
        sum(
            &samples,
            "fulcrum_local_responses_total",
            Some(("status", "503"))
        ),
        1.0
    );
    assert_eq!(sum(&samples, "fulcrum_backend_failures_total", None), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_writes_one_json_line_per_request() {
    let a = backend("a", 0);
    let config = config_for(&[(a.addr, 1)], "").replace(
        "[admin]",
        "[server]\naccess_log = true\nlog_format = \"json\"\n\n[admin]",
    );
    let lb = balancer_with(&config, 1);
    let client = client();
    for path in ["/one", "/two?x=1", "/bytes/1000"] {
        let response = client
            .get(format!("http://{}{path}", lb.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    let found = eventually(std::time::Duration::from_secs(5), || async {
        lb.logs()
            .lines()
            .filter(|l| l.contains("fulcrum::access"))
            .count()
            == 3
    })
    .await;
    assert!(found, "{}", lb.logs());
    let lines: Vec<serde_json::Value> = lb
        .logs()
        .lines()
        .filter(|l| l.contains("fulcrum::access"))
        .map(|l| serde_json::from_str(l).expect("JSON log line"))
        .collect();
    let last = &lines[2]["fields"];
    assert_eq!(last["path"], "/bytes/1000");
    assert_eq!(last["method"], "GET");
    assert_eq!(last["status"], 200);
    assert_eq!(last["bytes"], 1000);
    assert_eq!(last["backend"], a.addr.to_string());
    assert!(last["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(last["duration_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(lines[1]["fields"]["path"], "/two?x=1");
}
