//! Fulcrum: a fast, load-aware HTTP load balancer.
//!
//! The binary (`src/main.rs`) is a thin command line over this library: [`config`] reads and
//! validates the TOML file, [`server`] binds listeners and serves them with the [`proxy`],
//! which picks backends from a [`pool`] snapshot through `fulcrum-balance`.

pub mod admin;
pub mod agent;
pub mod allocator;
pub mod autoscale;
pub mod backend;
pub mod clock;
pub mod config;
pub mod ctl;
pub mod demo;
pub mod discovery;
pub mod events;
pub mod health;
pub mod memory;
pub mod metrics;
pub mod pool;
pub mod proxy;
pub mod server;
pub mod tick;
pub mod tls;
pub mod workers;
