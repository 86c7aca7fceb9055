//! The accept loop of a TCP (L4) listener: each connection, within `max_connections` and
//! `max_connections_per_ip`, is one session of the TCP proxy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::{AcceptSettings, ListenerStats};
use crate::proxy::tcp::TcpProxy;

/// Accepts and forwards the connections of one TCP listener until told to stop, then lets
/// open sessions finish for up to `shutdown_timeout` and closes the rest.
pub async fn serve_tcp(
    listener: TcpListener,
    proxy: Arc<TcpProxy>,
    accept_settings: AcceptSettings,
) {
    let mut stop = accept_settings.stop.clone();
    let shutdown_timeout = accept_settings.shutdown_timeout;
    let stats = accept_settings.stats.clone();
    let mut sessions = JoinSet::new();
    loop {
        let (stream, client) = tokio::select! {
            accepted = super::accept(&listener) => accepted,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            _ = stop.changed() => break,
        };
        let Some(permit) = accept_settings.admit(client) else {
            drop(stream);
            continue;
        };
        let open = OpenConnection::new(stats.clone());
        let proxy = proxy.clone();
        sessions.spawn(async move {
            proxy.session(stream, client).await;
            drop((permit, open));
        });
    }
    drop(listener);
    let drained = tokio::time::timeout(shutdown_timeout, async {
        while sessions.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(timeout = ?shutdown_timeout, open = sessions.len(), "shutdown timeout reached; closing remaining TCP sessions");
        sessions.abort_all();
        while sessions.join_next().await.is_some() {}
    }
}

/// Counts one open client connection on its listener while it lives (also when aborted).
struct OpenConnection(Arc<ListenerStats>);

impl OpenConnection {
    fn new(stats: Arc<ListenerStats>) -> Self {
        stats.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection(stats)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}
