//! End-to-end: `fulcrum check` and `fulcrum run` refuse bad configuration with
//! `file:line:column` and what was expected, and accept the shipped examples.

mod common;

use std::process::Command;

use common::*;

const GOOD: &str = r#"[listeners.web]
listen = "127.0.0.1:0"
pool = "app"

[pools.app]
backends = ["127.0.0.1:9001"]
[pools.app.timeouts]
connect = "1s"
"#;

fn check(text: &str) -> (i32, String) {
    let (_dir, path) = write_config(text);
    let output = Command::new(fulcrum_bin())
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    (
        output.status.code().unwrap_or(-1),
        stderr.replace(path.to_str().unwrap(), "FILE"),
    )
}

#[test]
fn good_config_passes() {
    let (code, stderr) = check(GOOD);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn each_bad_case_names_line_and_column() {
    let cases = [
        (
            GOOD.replace("pool = \"app\"", "pool = \"app\"\ncolour = \"blue\""),
            "FILE:4:1:",
            "colour",
        ),
        (
            GOOD.replace("127.0.0.1:9001", "127.0.0.1:9x01"),
            "FILE:6:13:",
            "expected IP:PORT",
        ),
        (
            GOOD.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
            "FILE:2:10:",
            "expected IP:PORT",
        ),
        (
            GOOD.replace("connect = \"1s\"", "connect = \"soon\""),
            "FILE:8:11:",
            "expected a duration",
        ),
        (
            GOOD.replace("pool = \"app\"", "pool = \"api\""),
            "FILE:3:8:",
            "pool `api`, which is not defined",
        ),
        (
            GOOD.replace("[pools.app]", "[pools.app]\nalgorithm = \"best\""),
            "FILE:6:13:",
            "expected one of",
        ),
        (GOOD.replace("[pools.app]", "[pools.app"), "FILE:5:11:", ""),
    ];
    for (text, position, expected) in cases {
        let (code, stderr) = check(&text);
        assert_eq!(code, 1, "{text}\n{stderr}");
        assert!(stderr.starts_with(position), "want {position} got {stderr}");
        assert!(stderr.contains(expected), "want {expected:?} in {stderr}");
    }
}

#[test]
fn run_refuses_bad_config_with_the_same_message() {
    let (_dir, path) = write_config(&GOOD.replace("connect = \"1s\"", "connect = \"soon\""));
    let output = Command::new(fulcrum_bin())
        .args(["run", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("{}:8:11:", path.display())),
        "{stderr}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let (code, stderr) = check_path("/nonexistent/fulcrum.toml");
    assert_eq!(code, 1);
    assert!(stderr.contains("cannot read config file"), "{stderr}");
}

fn check_path(path: &str) -> (i32, String) {
    let output = Command::new(fulcrum_bin())
        .args(["check", "--config", path])
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

#[test]
fn shipped_examples_are_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let (code, stderr) = check_path(path.to_str().unwrap());
            assert_eq!(code, 0, "{}: {stderr}", path.display());
            checked += 1;
        }
    }
    assert!(checked > 0, "no examples found in {dir}");
}

#[test]
fn bad_autoscale_tables_name_line_and_column() {
    let table = |body: &str| format!("{GOOD}[pools.app.autoscale]\n{body}\n");
    let cases = [
        (
            table("provider = \"process\"\ncommand = [\"x\"]\nmetric = \"cpu\"\ntarget = 50\nmin = 3\nmax = 2"),
            "FILE:9:1:",
            "min <= max",
        ),
        (
            table("provider = \"process\"\nmetric = \"inflight_per_backend\"\ntarget = 4\nmax = 2"),
            "FILE:9:1:",
            "needs `command`",
        ),
        (
            table("provider = \"kubernetes\"\nmetric = \"cpu\"\ntarget = 4\nmax = 2"),
            "FILE:10:12:",
            "expected `process` or `command`",
        ),
        (
            table("provider = \"command\"\nscale_up = [\"up\"]\nscale_down = [\"down\"]\nmetric = \"rps_per_backend\"\ntarget = 0\nmax = 2"),
            "FILE:14:10:",
            "`pools.app.autoscale.target` must be a number greater than 0, not 0",
        ),
    ];
    for (text, position, expected) in cases {
        let (code, stderr) = check(&text);
        assert_eq!(code, 1, "{text}\n{stderr}");
        assert!(stderr.starts_with(position), "want {position} got {stderr}");
        assert!(stderr.contains(expected), "want {expected:?} in {stderr}");
    }
    let good = table("provider = \"process\"\ncommand = [\"fulcrum\", \"backend\", \"--listen\", \"127.0.0.1:{port}\"]\nmetric = \"inflight_per_backend\"\ntarget = 4\nmax = 4");
    let (code, stderr) = check(&good);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn out_of_range_numbers_and_durations_name_key_range_and_place() {
    let cases = [
        (
            GOOD.replace("pool = \"app\"", "pool = \"app\"\nmax_connections = 3000000000000000000"),
            "FILE:4:19: `listeners.web.max_connections` must be between 1 and 1000000, not 3000000000000000000",
        ),
        (
            GOOD.replace("pool = \"app\"", "pool = \"app\"\nmax_body_bytes = 0"),
            "FILE:4:18: `listeners.web.max_body_bytes` must be between 1 and 9223372036854775807, not 0",
        ),
        (
            GOOD.replace("connect = \"1s\"", "connect = \"0s\""),
            "FILE:8:11: `pools.app.timeouts.connect` must be between 1ms and 1d, not 0s",
        ),
        (
            GOOD.replace("connect = \"1s\"", "connect = \"300000000000years\""),
            "FILE:8:11: `pools.app.timeouts.connect` must be between 1ms and 1d, not 300000000000years",
        ),
        (
            format!("{GOOD}[pools.app.health]\ninterval = \"0s\"\n"),
            "FILE:10:12: `pools.app.health.interval` must be between 10ms and 1d, not 0s",
        ),
        (
            GOOD.replace("[pools.app.timeouts]", "resolve_every = \"0s\"\n[pools.app.timeouts]"),
            "FILE:7:17: `pools.app.resolve_every` must be between 100ms and 1d, not 0s",
        ),
        (
            format!("{GOOD}[pools.app.passive]\nmax_ejected_percent = 101\n"),
            "FILE:10:23: `pools.app.passive.max_ejected_percent` must be between 0 and 100, not 101",
        ),
    ];
    for (text, expected) in cases {
        let (code, stderr) = check(&text);
        assert_eq!(code, 1, "{text}\n{stderr}");
        assert!(stderr.starts_with(expected), "want {expected} got {stderr}");
    }
}
