//! The changes a pool's manager accepts, and the handle the admin API, reloads, discovery and
//! the autoscaler send them through.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{AdminState, Pool};
use crate::config::PoolConfig;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No backend with this address in the pool.
    #[error("backend {0} is not in the pool")]
    NotFound(SocketAddr),
    /// A backend with this address is already in the pool.
    #[error("backend {0} is already in the pool")]
    AlreadyExists(SocketAddr),
    /// The manager has stopped (shutdown in progress).
    #[error("the pool is shutting down")]
    Stopped,
}

/// A change to a pool.
#[derive(Debug)]
pub enum PoolCommand {
    /// Add a backend.
    Add {
        /// Its address.
        address: SocketAddr,
        /// Its weight.
        weight: u32,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<(), PoolError>>,
    },
    /// Change a backend's weight and/or admin state.
    Update {
        /// Which backend.
        address: SocketAddr,
        /// New weight, if changing.
        weight: Option<u32>,
        /// New admin state, if changing.
        state: Option<AdminState>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<(), PoolError>>,
    },
    /// Remove a backend: at once (`now`) or after its in-flight requests finish.
    Remove {
        /// Which backend.
        address: SocketAddr,
        /// Skip the drain.
        now: bool,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<(), PoolError>>,
    },
    /// The full set of addresses a discovery source (e.g. a DNS name) resolves to now.
    Discovered {
        /// The source ("HOST:PORT").
        source: String,
        /// Every address behind it.
        addresses: Vec<SocketAddr>,
        /// Weight for new backends from it.
        weight: u32,
    },
    /// Apply a new configuration of this pool (reload).
    Reconfigure {
        /// The pool's new config.
        config: Box<PoolConfig>,
        /// Where the outcome goes.
        reply: oneshot::Sender<Result<(), PoolError>>,
    },
}

/// A cloneable handle to send commands to a pool's manager and read the pool.
#[derive(Debug, Clone)]
pub struct PoolHandle {
    /// The pool (for reading snapshots and status).
    pub pool: Arc<Pool>,
    pub(crate) commands: mpsc::Sender<PoolCommand>,
}

impl PoolHandle {
    async fn send(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), PoolError>>) -> PoolCommand,
    ) -> Result<(), PoolError> {
        let (reply, outcome) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| PoolError::Stopped)?;
        outcome.await.map_err(|_| PoolError::Stopped)?
    }

    /// Adds a backend.
    pub async fn add(&self, address: SocketAddr, weight: u32) -> Result<(), PoolError> {
        self.send(|reply| PoolCommand::Add {
            address,
            weight,
            reply,
        })
        .await
    }

    /// Changes a backend's weight and/or admin state.
    pub async fn update(
        &self,
        address: SocketAddr,
        weight: Option<u32>,
        state: Option<AdminState>,
    ) -> Result<(), PoolError> {
        self.send(|reply| PoolCommand::Update {
            address,
            weight,
            state,
            reply,
        })
        .await
    }

    /// Removes a backend (drains first unless `now`).
    pub async fn remove(&self, address: SocketAddr, now: bool) -> Result<(), PoolError> {
        self.send(|reply| PoolCommand::Remove {
            address,
            now,
            reply,
        })
        .await
    }

    /// Applies a reloaded configuration of this pool.
    pub async fn reconfigure(&self, config: PoolConfig) -> Result<(), PoolError> {
        self.send(|reply| PoolCommand::Reconfigure {
            config: Box::new(config),
            reply,
        })
        .await
    }
}
