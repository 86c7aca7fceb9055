//! Value types of the configuration that parse themselves from strings, so a bad value is
//! reported by serde at its own position in the file.

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use fulcrum_balance::Algorithm;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

/// A socket address written as "IP:PORT".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ListenAddr(pub SocketAddr);

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_socket_addr(&text)
            .map(ListenAddr)
            .map_err(de::Error::custom)
    }
}

fn parse_socket_addr(text: &str) -> Result<SocketAddr, String> {
    text.parse::<SocketAddr>().map_err(|_| {
        format!("invalid address \"{text}\": expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\"")
    })
}

/// A duration written the human way: "250ms", "1s", "2m", "1h 30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConfigDuration(pub Duration);

impl<'de> Deserialize<'de> for ConfigDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map(ConfigDuration)
            .map_err(|e| de::Error::custom(format!("invalid duration \"{text}\" ({e}): expected a duration like \"250ms\", \"1s\" or \"2m\"")))
    }
}

/// A balancing algorithm by its configuration name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlgorithmName(pub Algorithm);

impl Default for AlgorithmName {
    fn default() -> Self {
        AlgorithmName(Algorithm::RoundRobin)
    }
}

impl<'de> Deserialize<'de> for AlgorithmName {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Algorithm::from_name(&text)
            .map(AlgorithmName)
            .ok_or_else(|| {
                let names: Vec<&str> = Algorithm::ALL.iter().map(|(n, _)| *n).collect();
                de::Error::custom(format!(
                    "unknown algorithm \"{text}\": expected one of {}",
                    names.join(", ")
                ))
            })
    }
}

/// One backend of a pool: `"IP:PORT"` or `{ address = "IP:PORT", weight = N }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// Where the backend listens.
    pub address: SocketAddr,
    /// Relative share of traffic; 1 by default, 0 means no new traffic.
    pub weight: u32,
}

/// The table form of a backend, with unknown keys refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    address: ListenAddr,
    #[serde(default = "default_weight")]
    weight: u32,
}

fn default_weight() -> u32 {
    1
}

impl<'de> Deserialize<'de> for BackendSpec {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BackendVisitor;

        impl<'de> Visitor<'de> for BackendVisitor {
            type Value = BackendSpec;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a backend: \"IP:PORT\" or { address = \"IP:PORT\", weight = N }")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<BackendSpec, E> {
                parse_socket_addr(text)
                    .map(|address| BackendSpec { address, weight: 1 })
                    .map_err(E::custom)
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<BackendSpec, M::Error> {
                let table = BackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(BackendSpec {
                    address: table.address.0,
                    weight: table.weight,
                })
            }
        }

        deserializer.deserialize_any(BackendVisitor)
    }
}
