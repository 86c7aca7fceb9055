//! Layer 8, proxy: the data path — HTTP forwarding with failover (hyper), HTTP upgrades
//! (WebSocket), TCP (L4) sessions, the one attempt loop they share, the typed failure that
//! decides every locally generated response, header rewriting, the response body and the
//! access log.

pub mod access_log;
pub mod attempt;
pub mod body;
pub mod error;
pub mod headers;
pub mod http;
pub mod limits;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod tcp;
pub mod upgrade;
