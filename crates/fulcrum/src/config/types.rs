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

fn parse_socket_addr(text: &str) -> Result<SocketAddr, ValueError> {
    text.parse::<SocketAddr>()
        .map_err(|_| ValueError::SocketAddr(text.to_string()))
}

/// What a `hash_key` may be, for error messages.
const HASH_KEY_EXPECTED: &str =
    "expected \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"path\"";

/// Why a configuration value written as a string (an address, a `hash_key`) is invalid;
/// serde reports it at the value's position in the file. Each message quotes the value and
/// says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not an "IP:PORT" socket address.
    #[error(
        "invalid address \"{0}\": expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\""
    )]
    SocketAddr(String),
    /// A backend address that is neither "IP:PORT" nor "HOST:PORT".
    #[error("invalid address \"{0}\": expected IP:PORT, like \"127.0.0.1:8080\" or \"[::1]:8080\", or HOST:PORT, like \"app.internal:8080\"")]
    BackendAddress(String),
    /// A "HOST:PORT" backend address whose port is not 1-65535.
    #[error("invalid port in \"{0}\": expected 1-65535")]
    Port(String),
    /// `hash_key = "header:NAME"` with an invalid header name.
    #[error("invalid header name \"{name}\" in hash_key \"{text}\": {expected}", expected = HASH_KEY_EXPECTED)]
    HashKeyHeader {
        /// The header name.
        name: String,
        /// The whole `hash_key` value.
        text: String,
    },
    /// `hash_key = "cookie:NAME"` with an invalid cookie name.
    #[error("invalid cookie name \"{name}\" in hash_key \"{text}\": {expected}", expected = HASH_KEY_EXPECTED)]
    HashKeyCookie {
        /// The cookie name.
        name: String,
        /// The whole `hash_key` value.
        text: String,
    },
    /// A `hash_key` of none of the known forms.
    #[error("unknown hash_key \"{0}\": {expected}", expected = HASH_KEY_EXPECTED)]
    HashKey(String),
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
    /// Peak-EWMA P2C: load- and latency-aware, the best default for HTTP pools.
    fn default() -> Self {
        AlgorithmName(Algorithm::PeakEwma)
    }
}

/// What a consistent-hashing pool (`algorithm = "maglev"`) hashes to pick a backend:
/// `"client_ip"`, `"header:NAME"`, `"cookie:NAME"` or `"path"`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum HashKey {
    /// The client's IP address (the default).
    #[default]
    ClientIp,
    /// The value of a request header (lower-cased name).
    Header(http::HeaderName),
    /// The value of a cookie.
    Cookie(String),
    /// The request path (without the query).
    Path,
}

impl fmt::Display for HashKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Path => f.write_str("path"),
        }
    }
}

/// Parses a `hash_key` value.
pub(super) fn parse_hash_key(text: &str) -> Result<HashKey, ValueError> {
    match text {
        "client_ip" => return Ok(HashKey::ClientIp),
        "path" => return Ok(HashKey::Path),
        _ => {}
    }
    if let Some(name) = text.strip_prefix("header:") {
        return http::HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| ValueError::HashKeyHeader {
                name: name.to_string(),
                text: text.to_string(),
            });
    }
    if let Some(name) = text.strip_prefix("cookie:") {
        let token = |c: char| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?={}".contains(c);
        if name.is_empty() || !name.chars().all(token) {
            return Err(ValueError::HashKeyCookie {
                name: name.to_string(),
                text: text.to_string(),
            });
        }
        return Ok(HashKey::Cookie(name.to_string()));
    }
    Err(ValueError::HashKey(text.to_string()))
}

impl<'de> Deserialize<'de> for HashKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_hash_key(&text).map_err(de::Error::custom)
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
    pub address: BackendAddress,
    /// Relative share of traffic; 1 by default, 0 means no new traffic.
    pub weight: u32,
}

/// A backend's address: a fixed socket address, or a DNS name re-resolved every
/// `resolve_every` (each address it resolves to becomes a backend on `port`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum BackendAddress {
    /// "IP:PORT".
    Ip(SocketAddr),
    /// "HOST:PORT".
    Dns {
        /// The name to resolve.
        host: String,
        /// The port every resolved address is used with.
        port: u16,
    },
}

impl BackendAddress {
    /// The socket address, for fixed addresses.
    pub fn ip(&self) -> Option<SocketAddr> {
        match self {
            BackendAddress::Ip(address) => Some(*address),
            BackendAddress::Dns { .. } => None,
        }
    }
}

impl fmt::Display for BackendAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendAddress::Ip(address) => write!(f, "{address}"),
            BackendAddress::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Parses "IP:PORT" or "HOST:PORT" (a DNS name of letters, digits, '-' and '.').
fn parse_backend_address(text: &str) -> Result<BackendAddress, ValueError> {
    if let Ok(address) = text.parse::<SocketAddr>() {
        return Ok(BackendAddress::Ip(address));
    }
    let valid_host = |host: &str| {
        !host.is_empty()
            && host.len() <= 253
            && host.chars().any(|c| c.is_ascii_alphabetic())
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    };
    match text.rsplit_once(':') {
        Some((host, port)) if valid_host(host) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|port| BackendAddress::Dns {
                host: host.to_string(),
                port,
            })
            .ok_or_else(|| ValueError::Port(text.to_string())),
        _ => Err(ValueError::BackendAddress(text.to_string())),
    }
}

/// The table form of a backend, with unknown keys refused.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendTable {
    address: String,
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
                f.write_str(
                    "a backend: \"IP:PORT\", \"HOST:PORT\" or { address = \"...\", weight = N }",
                )
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<BackendSpec, E> {
                parse_backend_address(text)
                    .map(|address| BackendSpec { address, weight: 1 })
                    .map_err(E::custom)
            }

            fn visit_map<M: MapAccess<'de>>(self, map: M) -> Result<BackendSpec, M::Error> {
                let table = BackendTable::deserialize(de::value::MapAccessDeserializer::new(map))?;
                let address = parse_backend_address(&table.address).map_err(de::Error::custom)?;
                Ok(BackendSpec {
                    address,
                    weight: table.weight,
                })
            }
        }

        deserializer.deserialize_any(BackendVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_addresses_parse() {
        assert_eq!(
            parse_backend_address("10.0.0.1:80").unwrap(),
            BackendAddress::Ip("10.0.0.1:80".parse().unwrap())
        );
        assert_eq!(
            parse_backend_address("app.internal:8080").unwrap(),
            BackendAddress::Dns {
                host: "app.internal".into(),
                port: 8080
            }
        );
        assert!(parse_backend_address("localhost:0").is_err());
        assert!(parse_backend_address("nope").is_err());
        assert!(parse_backend_address("1.2.3:80").is_err());
        assert!(parse_backend_address("bad_host:80").is_err());
        assert!(parse_backend_address("127.0.0.1:99999").is_err());
    }

    #[test]
    fn hash_keys_parse() {
        assert_eq!(parse_hash_key("client_ip").unwrap(), HashKey::ClientIp);
        assert_eq!(parse_hash_key("path").unwrap(), HashKey::Path);
        assert_eq!(
            parse_hash_key("header:X-User").unwrap(),
            HashKey::Header(http::HeaderName::from_static("x-user"))
        );
        assert_eq!(
            parse_hash_key("cookie:session").unwrap(),
            HashKey::Cookie("session".into())
        );
        assert_eq!(
            parse_hash_key("header:X-User").unwrap().to_string(),
            "header:x-user"
        );
        for bad in [
            "",
            "ip",
            "header:",
            "header:a b",
            "cookie:",
            "cookie:a;b",
            "Path",
        ] {
            let message = parse_hash_key(bad).unwrap_err().to_string();
            assert!(message.contains("expected"), "{bad}: {message}");
        }
    }
}
