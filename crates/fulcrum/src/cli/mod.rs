//! Layer 12, cli: what the `fulcrum` binary's subcommands run besides the balancer itself —
//! `ctl`, `demo`, the demo backend (`backend`, also the tests' fixture) and the `agent`.

pub mod agent;
pub mod ctl;
pub mod demo;
pub mod demo_backend;
