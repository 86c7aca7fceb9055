//! Layer 11, control: the admin REST API and the Prometheus metrics, both reading the running
//! server, and the API's wire types, shared with `fulcrum ctl`.

pub mod admin;
pub mod api;
pub mod metrics;
