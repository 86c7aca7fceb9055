//! Why starting or reloading failed.

use std::fmt;
use std::net::SocketAddr;

use crate::config::ConfigError;
use crate::pool::PoolError;

/// A cause from a lower layer, whatever its type (an `io::Error`, a listener's or the
/// runtime's error, or a message).
pub type Cause = Box<dyn std::error::Error + Send + Sync>;

/// Why [`super::Server::start`] or [`super::Server::reload`] failed. A refused reload
/// changes nothing.
///
/// `{}` shows this error's own message; `{:#}` adds its causes, `: `-separated (like
/// `anyhow`), so the admin API and the log show the whole story.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Reload asked for, but Fulcrum was started without a configuration file.
    NoConfigFile,
    /// The configuration file could not be read or is invalid (shown as `file:line:column:
    /// message`).
    Config(ConfigError),
    /// A listener's address could not be bound.
    Bind {
        /// The listener's name.
        listener: String,
        /// The address in its config.
        address: SocketAddr,
        /// Why (from the OS).
        #[source]
        source: Cause,
    },
    /// A TLS listener's certificates could not be loaded or used.
    Certificates {
        /// The listener's name.
        listener: String,
        /// Why (the file and what is wrong with it).
        #[source]
        source: Cause,
    },
    /// A listener names a pool the configuration does not define.
    UndefinedPool {
        /// The listener's name.
        listener: String,
        /// The pool it names.
        pool: String,
    },
    /// A bound listener could not start serving.
    Listener {
        /// The listener's name.
        listener: String,
        /// Why.
        #[source]
        source: Cause,
    },
    /// A pool's manager has stopped (shutdown in progress).
    PoolStopped {
        /// The pool.
        pool: String,
        /// What the pool said.
        #[source]
        source: PoolError,
    },
    /// The worker threads could not be started.
    Workers(#[source] Cause),
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServerError::NoConfigFile => {
                f.write_str("no configuration file to reload (started without --config)")?
            }
            ServerError::Config(error) => write!(f, "{error}")?,
            ServerError::Bind {
                listener, address, ..
            } => write!(f, "cannot listen on {address} for listener `{listener}`")?,
            ServerError::Certificates { listener, .. } => {
                write!(f, "listener `{listener}`: bad TLS certificates")?
            }
            ServerError::UndefinedPool { listener, pool } => {
                write!(f, "listener `{listener}` uses undefined pool `{pool}`")?
            }
            ServerError::Listener { listener, .. } => {
                write!(f, "listener `{listener}` cannot start")?
            }
            ServerError::PoolStopped { pool, .. } => write!(f, "pool `{pool}`")?,
            ServerError::Workers(_) => f.write_str("cannot start the worker threads")?,
        }
        if f.alternate() {
            let mut cause = std::error::Error::source(self);
            while let Some(error) = cause {
                write!(f, ": {error}")?;
                cause = error.source();
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alternate_display_adds_the_causes() {
        let error = ServerError::Bind {
            listener: "web".into(),
            address: SocketAddr::from(([127, 0, 0, 1], 80)),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse).into(),
        };
        assert_eq!(
            error.to_string(),
            "cannot listen on 127.0.0.1:80 for listener `web`"
        );
        assert_eq!(
            format!("{error:#}"),
            "cannot listen on 127.0.0.1:80 for listener `web`: address in use"
        );
        let error = ServerError::Certificates {
            listener: "secure".into(),
            source: "key.pem: no private key found".into(),
        };
        assert_eq!(
            format!("{error:#}"),
            "listener `secure`: bad TLS certificates: key.pem: no private key found"
        );
        assert!(std::error::Error::source(&ServerError::NoConfigFile).is_none());
    }
}
