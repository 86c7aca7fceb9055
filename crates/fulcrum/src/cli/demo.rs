//! `fulcrum demo`: three demo backends and a balancer in front of them, no config needed.

use std::net::SocketAddr;
use std::path::Path;

use crate::cli::demo_backend::{spawn_backend, BackendError, BackendOptions};
use crate::config::{Config, ConfigError};

/// Why a demo could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A demo backend could not start.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The generated configuration was refused (a bug, or an unusable `--listen`).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The path of the running `fulcrum` executable, which the autoscaler starts as backend
    /// processes, cannot be found.
    #[error("cannot find the fulcrum executable: {0}")]
    CurrentExe(std::io::Error),
}

/// Starts `count` demo backends on loopback and returns the configuration of a balancer on
/// `listen` in front of them.
pub async fn start_demo_backends(listen: SocketAddr, count: usize) -> Result<Config, DemoError> {
    let mut backends = Vec::new();
    for i in 1..=count {
        let options = BackendOptions {
            name: Some(format!("demo-{i}")),
            delay: std::time::Duration::ZERO,
            proxy_protocol: false,
            tls: None,
        };
        let address = spawn_backend(SocketAddr::from(([127, 0, 0, 1], 0)), options).await?;
        println!("started demo backend demo-{i} on http://{address}");
        backends.push(format!("\"{address}\""));
    }
    let text = format!(
        "[listeners.demo]\nlisten = \"{listen}\"\nprotocol = \"http\"\npool = \"demo\"\n\n\
         [pools.demo]\nalgorithm = \"round_robin\"\nbackends = [{}]\n\n\
         [server]\nshutdown_timeout = \"5s\"\n",
        backends.join(", ")
    );
    Ok(Config::parse(&text, Path::new("<demo>"))?)
}

/// The configuration of an autoscaled demo: a balancer on `listen` whose pool starts one
/// `fulcrum backend` process and grows to `max` under load (more than 8 requests in flight
/// per backend for 3 s), shrinking again after 15 s of lower load.
pub fn autoscaled_demo(listen: SocketAddr, max: usize) -> Result<Config, DemoError> {
    let exe = std::env::current_exe().map_err(DemoError::CurrentExe)?;
    let command = toml_string(&exe.display().to_string());
    let text = format!(
        "[listeners.demo]\nlisten = \"{listen}\"\nprotocol = \"http\"\npool = \"demo\"\n\n\
         [pools.demo]\nalgorithm = \"least_conn\"\nbackends = []\n\n\
         [pools.demo.autoscale]\nprovider = \"process\"\n\
         command = [{command}, \"backend\", \"--listen\", \"127.0.0.1:{{port}}\", \"--name\", \"{{name}}\"]\n\
         min = 1\nmax = {max}\nmetric = \"inflight_per_backend\"\ntarget = 8\n\
         scale_up_after = \"3s\"\nscale_down_after = \"15s\"\ncooldown = \"2s\"\nsample_every = \"250ms\"\n\
         stop_grace = \"5s\"\n\n\
         [server]\nshutdown_timeout = \"5s\"\n"
    );
    println!("autoscaling demo: the pool starts with 1 backend and grows to {max} under load");
    println!(
        "load it:  wrk -c64 -d60s 'http://{listen}/?delay_ms=100'   watch it:  curl -s http://127.0.0.1:9090/api/autoscale"
    );
    Ok(Config::parse(&text, Path::new("<demo>"))?)
}

/// `value` as a TOML basic string.
fn toml_string(value: &str) -> String {
    let escaped: String = value
        .chars()
        .flat_map(|c| match c {
            '"' => vec!['\\', '"'],
            '\\' => vec!['\\', '\\'],
            c => vec![c],
        })
        .collect();
    format!("\"{escaped}\"")
}
