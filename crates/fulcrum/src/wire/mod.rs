//! Layer 3, wire: byte formats spoken with peers, each parser beside its writer — the PROXY
//! protocol v1/v2 and the agent-check line.

pub mod agent_line;
pub mod proxy_protocol;
