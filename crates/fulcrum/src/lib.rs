//! Fulcrum: a fast, load-aware HTTP and TCP load balancer.
//!
//! The crate is built in layers; each imports only from the layers above it in this list
//! (`tests/layers.rs` fails otherwise), and the binary (`src/main.rs`) sits on top:
//!
//! 1. [`runtime`]: clock, ticker, worker threads, memory, allocator, the events log.
//! 2. [`config`]: the TOML schema, validation (`file:line:column`), certificate files.
//! 3. [`wire`]: byte formats — the PROXY protocol, the agent-check line.
//! 4. [`upstream`]: reaching backends — transport, dial, connection pool, driven connections.
//! 5. [`pool`]: backend state, the pool snapshot and selector, the pool's commands.
//! 6. [`health`], [`discovery`]: active and agent checks; DNS discovery.
//! 7. [`manager`], [`autoscale`]: the pool manager task; the autoscaler.
//! 8. [`proxy`]: the data path — HTTP forwarding, failover, upgrades, TCP sessions.
//! 9. [`listener`]: bind, accept, limits, connection slots, serving and parking connections.
//! 10. [`server`]: start, reload, shutdown.
//! 11. [`control`]: the admin API and the metrics.
//! 12. [`cli`]: `ctl`, `demo`, the demo backend, the agent.

pub mod runtime;

pub mod config;

pub mod wire;

pub mod upstream;

pub mod pool;

pub mod discovery;
pub mod health;

pub mod autoscale;
pub mod manager;

pub mod proxy;

pub mod listener;

pub mod server;

pub mod control;

pub mod cli;
