//! End to end: the process's open file limit (raised at start to the hard limit, with a warning
//! when it cannot hold the listeners' `max_connections`) and the limits on HTTP/2 client
//! connections (idle and handshake timeouts, concurrent streams). Real `fulcrum` processes on
//! 127.0.0.1, raw client sockets.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;

/// Config with one HTTP listener `web` (extra keys given) in front of `backend`.
fn config(backend: SocketAddr, listener_extra: &str) -> String {
    format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\n\
         [listeners.web]\nlisten = \"127.0.0.1:0\"\nprotocol = \"http\"\npool = \"app\"\n{listener_extra}\n\n\
         [pools.app]\nbackends = [\"{backend}\"]\n"
    )
}

/// The soft and hard "Max open files" of process `pid` (Linux `/proc/PID/limits`).
#[cfg(target_os = "linux")]
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("Max open files line");
    let numbers: Vec<u64> = line
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

#[cfg(target_os = "linux")]
#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_limit() {
    let backend = backend("app", 0);
    let lb = balancer_with_nofile_limits(
        &config(backend.addr, "max_connections = 1000"),
        1,
        256,
        4096,
    );
    assert_eq!(nofile_limits(lb.pid()), (4096, 4096));
    let logs = lb.logs();
    assert!(logs.contains("open file limit raised"), "{logs}");
    assert!(!logs.contains("open file limit ("), "{logs}");
}

#[cfg(target_os = "linux")]
#[test]
fn a_hard_limit_below_what_max_connections_needs_is_warned_about() {
    let backend = backend("app", 0);
    // 10 000 connections may need 20 256 descriptors.
    let lb = balancer_with_nofile_limits(&config(backend.addr, ""), 1, 256, 1024);
    assert_eq!(nofile_limits(lb.pid()), (1024, 1024));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut logs = lb.logs();
    while !logs.contains("the open file limit (1024)") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        logs = lb.logs();
    }
    assert!(logs.contains("the open file limit (1024)"), "{logs}");
    assert!(logs.contains("(20256: two descriptors"), "{logs}");
}
