//! DNS discovery: backends written `HOST:PORT` are re-resolved every `resolve_every`
//! (hickory-resolver, A and AAAA); each resolved IP becomes a backend on PORT. A failed
//! lookup keeps the last good set.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::Resolver;
use tokio::sync::mpsc;

use crate::pool::PoolCommand;

/// One `HOST:PORT` entry of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsTarget {
    /// Name to resolve.
    pub host: String,
    /// Port for every resolved address.
    pub port: u16,
    /// Weight of every resolved backend.
    pub weight: u32,
}

impl DnsTarget {
    /// The source name the manager files these backends under ("HOST:PORT").
    pub fn source(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Why the DNS resolver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ResolverError {
    /// The system's resolver configuration (resolv.conf) cannot be read.
    #[error("cannot read the system's DNS configuration: {0}")]
    SystemConfig(NetError),
    /// The resolver refused its configuration.
    #[error("cannot build the DNS resolver: {0}")]
    Build(NetError),
}

/// Builds the resolver: the given servers, or the system's configuration. Caching is off so
/// that every round asks again (the round's interval is the cache).
pub fn resolver(servers: &[SocketAddr]) -> Result<Resolver<TokioRuntimeProvider>, ResolverError> {
    let mut builder = if servers.is_empty() {
        Resolver::builder_tokio().map_err(ResolverError::SystemConfig)?
    } else {
        let name_servers = servers
            .iter()
            .map(|server| {
                let mut udp = ConnectionConfig::udp();
                udp.port = server.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = server.port();
                NameServerConfig::new(server.ip(), true, vec![udp, tcp])
            })
            .collect();
        Resolver::builder_with_config(
            ResolverConfig::from_name_servers(name_servers),
            TokioRuntimeProvider::default(),
        )
    };
    builder.options_mut().cache_size = 0;
    builder.options_mut().timeout = Duration::from_secs(2);
    builder.options_mut().attempts = 1;
    builder.build().map_err(ResolverError::Build)
}

/// Resolves every target every `interval` and reports the address sets to the pool manager
/// through `commands` until the manager goes away.
pub async fn run(
    pool: String,
    targets: Vec<DnsTarget>,
    servers: Vec<SocketAddr>,
    interval: Duration,
    commands: mpsc::WeakSender<PoolCommand>,
) {
    let resolver = match resolver(&servers) {
        Ok(resolver) => resolver,
        Err(error) => {
            tracing::error!(pool = %pool, %error, "DNS discovery cannot start: no resolver");
            return;
        }
    };
    loop {
        for target in &targets {
            match resolver.lookup_ip(target.host.as_str()).await {
                Ok(lookup) => {
                    let addresses: BTreeSet<SocketAddr> = lookup
                        .iter()
                        .map(|ip| SocketAddr::new(ip, target.port))
                        .collect();
                    let Some(sender) = commands.upgrade() else {
                        return;
                    };
                    let command = PoolCommand::Discovered {
                        source: target.source(),
                        addresses: addresses.into_iter().collect(),
                        weight: target.weight,
                    };
                    if sender.send(command).await.is_err() {
                        return;
                    }
                }
                Err(error) => {
                    tracing::warn!(pool = %pool, host = %target.host, %error, "DNS lookup failed; keeping the last resolved backends");
                }
            }
        }
        tokio::time::sleep(interval).await;
    }
}
