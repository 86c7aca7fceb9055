//! Discovery sources that change a pool's membership from outside the config file. Each one
//! reports the full set of addresses behind a source name to the pool manager, which adds
//! what is new and drains what vanished.

pub mod dns;
