//! The data path: HTTP proxying (hyper), upstream connection pools, response bodies, TCP
//! (L4) forwarding, HTTP upgrades (WebSocket) and the PROXY protocol.

pub mod access_log;
pub mod body;
pub mod driven;
pub mod headers;
pub mod http;
pub mod proxy_protocol;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod tcp;
pub mod upgrade;
pub mod upstream;
