//! `fulcrum demo`: three demo backends and a balancer in front of them, no config needed.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Result;

use crate::backend::{spawn_backend, BackendOptions};
use crate::config::Config;

/// Starts `count` demo backends on loopback and returns the configuration of a balancer on
/// `listen` in front of them.
pub async fn start_demo_backends(listen: SocketAddr, count: usize) -> Result<Config> {
    let mut backends = Vec::new();
    for i in 1..=count {
        let options = BackendOptions {
            name: Some(format!("demo-{i}")),
            delay: std::time::Duration::ZERO,
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
