//! `max_connections_per_ip`: the open connections of each client IP on one listener, shared by
//! its workers. Counted at accept and released when the connection's slot drops, so the cost is
//! one short lock per connection, never per request; entries at zero are removed, so memory is
//! bounded by the open connections.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use crate::runtime::clock::OncePerSecond;

/// Shards of the map, so workers accepting at once rarely contend on one lock.
const SHARDS: usize = 16;

/// The open connections of each client IP of one listener, within a limit per IP.
#[derive(Debug)]
pub struct PerIpLimit {
    max: u32,
    shards: [Mutex<HashMap<IpAddr, u32>>; SHARDS],
    hasher: std::collections::hash_map::RandomState,
    /// Refusals are logged at most once a second.
    log: OncePerSecond,
}

impl PerIpLimit {
    /// A limit of `max` open connections per client IP (at least 1).
    pub fn new(max: usize) -> Self {
        PerIpLimit {
            max: u32::try_from(max.max(1)).unwrap_or(u32::MAX),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
            hasher: std::collections::hash_map::RandomState::new(),
            log: OncePerSecond::default(),
        }
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, u32>> {
        &self.shards[(self.hasher.hash_one(ip) as usize) % SHARDS]
    }

    /// Counts one more connection from `ip`, or `None` when `ip` has `max` open already.
    pub fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = shard.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(IpSlot {
            limit: self.clone(),
            ip,
        })
    }

    /// Open connections counted for `ip` now.
    pub fn open(&self, ip: IpAddr) -> u32 {
        let shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        shard.get(&ip).copied().unwrap_or(0)
    }

    /// Client IPs with a connection counted now.
    pub fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    fn release(&self, ip: IpAddr) {
        let mut shard = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = shard.get_mut(&ip) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                shard.remove(&ip);
            }
        }
    }

    /// Whether a refusal may be logged now: at most once per second per listener, so a host
    /// hammering the limit cannot flood the log (the refusals are all counted).
    pub fn should_log(&self) -> bool {
        self.log.ready()
    }

    /// The limit per IP.
    pub fn max(&self) -> u32 {
        self.max
    }
}

/// One connection counted for its client IP; dropping it releases the count.
#[derive(Debug)]
pub struct IpSlot {
    limit: Arc<PerIpLimit>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        self.limit.release(self.ip);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_ip_and_forgets_at_zero() {
        let limit = Arc::new(PerIpLimit::new(2));
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "::1".parse().unwrap();
        let first = limit.try_acquire(a).unwrap();
        let second = limit.try_acquire(a).unwrap();
        assert!(limit.try_acquire(a).is_none());
        let other = limit.try_acquire(b).unwrap();
        assert_eq!((limit.open(a), limit.open(b), limit.clients()), (2, 1, 2));
        drop(first);
        let third = limit.try_acquire(a).unwrap();
        drop((second, third, other));
        assert_eq!(limit.clients(), 0);
    }

    #[test]
    fn logs_at_most_once_per_second() {
        let limit = PerIpLimit::new(1);
        assert!(limit.should_log());
        assert!(!limit.should_log());
        assert!(!limit.should_log());
    }
}
