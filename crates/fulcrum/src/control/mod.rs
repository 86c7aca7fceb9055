//! Layer 11, control: the admin REST API and the Prometheus metrics, both reading the running
//! server.

pub mod admin;
pub mod metrics;
