//! A pool manager running its real loop, for the manager's tests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::PoolManager;
use crate::config::{Config, PoolConfig};
use crate::pool::{Backend, Pool, PoolHandle};
use crate::runtime::events::EventLog;

/// The first backend of [`pool_config`]'s pool.
pub(super) const A: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9001);
/// Its second backend.
pub(super) const B: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9002);

/// Pool `app` with backends `A` and `B` (weight 1), plus `extra` lines of `[pools.app]`.
pub(super) fn pool_config(extra: &str) -> PoolConfig {
    pool_config_with("\"127.0.0.1:9001\", \"127.0.0.1:9002\"", extra)
}

/// Pool `app` with `backends` (the TOML array's items), plus `extra` lines of `[pools.app]`.
pub(super) fn pool_config_with(backends: &str, extra: &str) -> PoolConfig {
    let text = format!(
        "[listeners.web]\nlisten = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [pools.app]\nbackends = [{backends}]\n{extra}\n"
    );
    let mut config = Config::parse(&text, Path::new("test.toml")).unwrap();
    config.pools.remove("app").unwrap()
}

/// A running manager of pool `app`.
pub(super) struct Running {
    pub(super) handle: PoolHandle,
    events: Arc<EventLog>,
    stop: watch::Sender<bool>,
    task: JoinHandle<PoolManager>,
}

impl Running {
    /// Starts the manager of a pool made from `config`.
    pub(super) fn start(config: &PoolConfig) -> Running {
        let events = Arc::new(EventLog::default());
        let pool = Pool::from_config("app", config);
        let (manager, handle, commands) = PoolManager::new(pool, config, events.clone());
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(manager.run(commands, stopped));
        Running {
            handle,
            events,
            stop,
            task,
        }
    }

    /// The addresses of the draining backends.
    pub(super) fn retiring(&self) -> Vec<SocketAddr> {
        let snapshot = self.handle.pool.snapshot();
        snapshot.retiring.iter().map(|b| b.address).collect()
    }

    /// The member at `address`, if any.
    pub(super) fn find(&self, address: SocketAddr) -> Option<Backend> {
        let snapshot = self.handle.pool.snapshot();
        let backend = snapshot.backends.iter().find(|b| b.address == address);
        backend.cloned()
    }

    /// The member at `address`.
    pub(super) fn member(&self, address: SocketAddr) -> Backend {
        self.find(address).expect("not a member")
    }

    /// Whether an event's message contains `text`.
    pub(super) fn recorded(&self, text: &str) -> bool {
        let events = self.events.recent(1000);
        events.iter().any(|e| e.message.contains(text))
    }

    /// Stops the loop; the manager as it ended.
    pub(super) async fn stop(self) -> PoolManager {
        let _ = self.stop.send(true);
        self.task.await.unwrap()
    }
}
