//! The data path: HTTP proxying (hyper), upstream connection pools, response bodies.

pub mod access_log;
pub mod body;
pub mod headers;
pub mod http;
pub mod upstream;
