//! The PROXY protocol (HAProxy's spec, versions 1 and 2): a header at the start of a TCP
//! connection carrying the original client and destination addresses across a proxy.
//! [`encode_v1`] / [`encode_v2`] write one for backends; [`read_header`] reads one from a
//! front load balancer, byte-exact, leaving the stream positioned at the payload.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::ProxyProtocolVersion;

/// The 12-byte signature that starts every v2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// Longest v1 header, CRLF included (spec section 2.1).
const V1_MAX_LEN: usize = 107;

/// Largest v2 address block (with TLVs) accepted. The spec allows 65535; real senders use a
/// few hundred bytes at most, and a bound keeps a hostile peer from making us buffer 64 KiB.
const V2_MAX_LEN: usize = 4096;

/// The addresses a PROXY header carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxiedAddresses {
    /// The original client.
    pub source: SocketAddr,
    /// The address the client connected to (the front proxy's listener).
    pub destination: SocketAddr,
}

/// Why a PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection failed or closed before a complete header arrived.
    #[error("reading PROXY protocol header: {0}")]
    Io(std::io::Error),
    /// The bytes are not a valid PROXY header.
    #[error("malformed PROXY protocol header: {0}")]
    Malformed(String),
}

impl From<std::io::Error> for ProxyHeaderError {
    fn from(error: std::io::Error) -> Self {
        ProxyHeaderError::Io(error)
    }
}

fn malformed<T>(why: impl Into<String>) -> Result<T, ProxyHeaderError> {
    Err(ProxyHeaderError::Malformed(why.into()))
}

/// The header of `version` for a connection from `source` to `destination`.
pub fn encode(
    version: ProxyProtocolVersion,
    source: SocketAddr,
    destination: SocketAddr,
) -> Vec<u8> {
    match version {
        ProxyProtocolVersion::V1 => encode_v1(source, destination).into_bytes(),
        ProxyProtocolVersion::V2 => encode_v2(source, destination),
    }
}

/// A header that carries no address: v2 command LOCAL, or v1 `PROXY UNKNOWN`. The proxy's
/// own connections (health checks) send it; the receiver uses the connection's addresses.
pub fn encode_local(version: ProxyProtocolVersion) -> Vec<u8> {
    match version {
        ProxyProtocolVersion::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        ProxyProtocolVersion::V2 => {
            let mut header = V2_SIGNATURE.to_vec();
            header.extend_from_slice(&[0x20, 0x00, 0, 0]); // version 2, LOCAL, UNSPEC, no block
            header
        }
    }
}

/// Both addresses in one family: IPv4 when both are IPv4, else both as IPv6 (IPv4-mapped).
fn same_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(IpAddr::V6(ip.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    };
    if source.is_ipv4() && destination.is_ipv4() {
        (source, destination)
    } else {
        (v6(source), v6(destination))
    }
}

/// A v1 (text) header: `PROXY TCP4 1.2.3.4 5.6.7.8 1000 80\r\n`.
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> String {
    let (source, destination) = same_family(source, destination);
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
}

/// A v2 (binary) header, command PROXY, over TCP, without TLVs.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = same_family(source, destination);
    let mut header = Vec::with_capacity(16 + 36);
    header.extend_from_slice(&V2_SIGNATURE);
    header.push(0x21); // version 2, command PROXY
    match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            header.push(0x11); // AF_INET, STREAM
            header.extend_from_slice(&12u16.to_be_bytes());
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            header.push(0x21); // AF_INET6, STREAM
            header.extend_from_slice(&36u16.to_be_bytes());
            header.extend_from_slice(&s.octets());
            header.extend_from_slice(&d.octets());
        }
        _ => unreachable!("same_family returns one family"),
    }
    header.extend_from_slice(&source.port().to_be_bytes());
    header.extend_from_slice(&destination.port().to_be_bytes());
    header
}

/// Reads a v1 or v2 header from the start of `stream`, consuming exactly its bytes. Returns
/// the carried addresses, or `None` for a header that carries none (v2 LOCAL, v1 UNKNOWN,
/// non-IP families): the caller then uses the connection's own addresses. The caller bounds
/// the time this may take.
pub async fn read_header<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<ProxiedAddresses>, ProxyHeaderError> {
    let mut start = [0u8; 12];
    stream.read_exact(&mut start).await?;
    if start == V2_SIGNATURE {
        read_v2(stream).await
    } else if start.starts_with(b"PROXY ") {
        // The shortest v1 header ("PROXY UNKNOWN\r\n") is 15 bytes, so 12 never over-read.
        // Read the rest a byte at a time: reading more could swallow payload bytes.
        let mut line = Vec::with_capacity(V1_MAX_LEN);
        line.extend_from_slice(&start);
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX_LEN {
                return malformed("v1 header longer than 107 bytes without CRLF");
            }
            line.push(stream.read_u8().await?);
        }
        parse_v1(&line)
    } else {
        malformed(format!(
            "expected a PROXY protocol signature, got {:?}",
            String::from_utf8_lossy(&start)
        ))
    }
}

async fn read_v2<R: AsyncRead + Unpin>(
    stream: &mut R,
) -> Result<Option<ProxiedAddresses>, ProxyHeaderError> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head).await?;
    let [version_command, family, len_hi, len_lo] = head;
    if version_command >> 4 != 2 {
        return malformed(format!("unsupported version {}", version_command >> 4));
    }
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    if len > V2_MAX_LEN {
        return malformed(format!(
            "address block of {len} bytes (at most {V2_MAX_LEN} accepted)"
        ));
    }
    let mut block = vec![0u8; len];
    stream.read_exact(&mut block).await?;
    let command = version_command & 0x0f;
    match command {
        0 => return Ok(None), // LOCAL: the proxy's own connection (health check)
        1 => {}
        other => return malformed(format!("unknown command {other}")),
    }
    let addresses = match family >> 4 {
        1 if block.len() >= 12 => {
            let ip = |at: usize| {
                IpAddr::V4(Ipv4Addr::new(
                    block[at],
                    block[at + 1],
                    block[at + 2],
                    block[at + 3],
                ))
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            ProxiedAddresses {
                source: SocketAddr::new(ip(0), port(8)),
                destination: SocketAddr::new(ip(4), port(10)),
            }
        }
        2 if block.len() >= 36 => {
            let ip = |at: usize| {
                let mut octets = [0u8; 16];
                octets.copy_from_slice(&block[at..at + 16]);
                IpAddr::V6(Ipv6Addr::from(octets))
            };
            let port = |at: usize| u16::from_be_bytes([block[at], block[at + 1]]);
            ProxiedAddresses {
                source: SocketAddr::new(ip(0), port(32)),
                destination: SocketAddr::new(ip(16), port(34)),
            }
        }
        1 | 2 => return malformed(format!("address block of {len} bytes is too short")),
        0 | 3 => return Ok(None), // UNSPEC or UNIX: no IP addresses to use
        other => return malformed(format!("unknown address family {other}")),
    };
    Ok(Some(addresses))
}

fn parse_v1(line: &[u8]) -> Result<Option<ProxiedAddresses>, ProxyHeaderError> {
    let Ok(text) = std::str::from_utf8(&line[..line.len() - 2]) else {
        return malformed("v1 header is not ASCII");
    };
    let fields: Vec<&str> = text.split(' ').collect();
    match fields.as_slice() {
        ["PROXY", "UNKNOWN", ..] => Ok(None),
        ["PROXY", family @ ("TCP4" | "TCP6"), source, destination, source_port, destination_port] =>
        {
            let ip = |text: &str| -> Result<IpAddr, ProxyHeaderError> {
                let ip: IpAddr = text
                    .parse()
                    .map_err(|_| ProxyHeaderError::Malformed(format!("bad address {text:?}")))?;
                if ip.is_ipv4() != (*family == "TCP4") {
                    return malformed(format!("address {text} is not {family}"));
                }
                Ok(ip)
            };
            let port = |text: &str| -> Result<u16, ProxyHeaderError> {
                // Ports are plain decimal without sign or leading zeros.
                if text.starts_with('0') && text.len() > 1 || text.starts_with('+') {
                    return malformed(format!("bad port {text:?}"));
                }
                text.parse()
                    .map_err(|_| ProxyHeaderError::Malformed(format!("bad port {text:?}")))
            };
            Ok(Some(ProxiedAddresses {
                source: SocketAddr::new(ip(source)?, port(source_port)?),
                destination: SocketAddr::new(ip(destination)?, port(destination_port)?),
            }))
        }
        _ => malformed(format!("bad v1 header {text:?}")),
    }
}

/// Reads the PROXY header a front load balancer sends, within `timeout`. `None` when the
/// connection must be closed (logged); `Some(None)` when the header carries no address.
pub async fn read_header_within(
    stream: &mut tokio::net::TcpStream,
    timeout: std::time::Duration,
    peer: std::net::SocketAddr,
) -> Option<Option<ProxiedAddresses>> {
    match tokio::time::timeout(timeout, read_header(stream)).await {
        Ok(Ok(carried)) => Some(carried),
        Ok(Err(error)) => {
            tracing::warn!(%peer, %error, "closing connection: bad PROXY protocol header");
            None
        }
        Err(_) => {
            tracing::warn!(%peer, ?timeout, "closing connection: no PROXY protocol header in time");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    async fn read(bytes: &[u8]) -> (Result<Option<ProxiedAddresses>, ProxyHeaderError>, Vec<u8>) {
        let mut stream = bytes;
        let result = read_header(&mut stream).await;
        (result, stream.to_vec())
    }

    #[test]
    fn v2_ipv4_matches_the_spec_layout() {
        let header = encode_v2(addr("10.1.2.3:4000"), addr("192.168.0.1:443"));
        let mut expected = V2_SIGNATURE.to_vec();
        expected.extend_from_slice(&[0x21, 0x11, 0, 12, 10, 1, 2, 3, 192, 168, 0, 1]);
        expected.extend_from_slice(&4000u16.to_be_bytes());
        expected.extend_from_slice(&443u16.to_be_bytes());
        assert_eq!(header, expected);
    }

    #[tokio::test]
    async fn v2_round_trips_and_leaves_the_payload() {
        for (source, destination) in [
            ("10.1.2.3:4000", "192.168.0.1:443"),
            ("[2001:db8::1]:65535", "[::1]:80"),
        ] {
            let mut bytes = encode_v2(addr(source), addr(destination));
            bytes.extend_from_slice(b"GET / HTTP/1.1\r\n");
            let (result, rest) = read(&bytes).await;
            let carried = result.unwrap().unwrap();
            assert_eq!(carried.source, addr(source));
            assert_eq!(carried.destination, addr(destination));
            assert_eq!(rest, b"GET / HTTP/1.1\r\n");
        }
    }

    #[tokio::test]
    async fn mixed_families_are_sent_as_ipv6() {
        let bytes = encode_v2(addr("10.0.0.1:1"), addr("[::1]:2"));
        let carried = read(&bytes).await.0.unwrap().unwrap();
        assert_eq!(carried.source, addr("[::ffff:10.0.0.1]:1"));
        assert!(encode_v1(addr("10.0.0.1:1"), addr("[::1]:2")).starts_with("PROXY TCP6 "));
    }

    #[tokio::test]
    async fn v1_round_trips_and_leaves_the_payload() {
        let mut bytes = encode_v1(addr("203.0.113.7:51000"), addr("127.0.0.1:8080")).into_bytes();
        assert_eq!(bytes, b"PROXY TCP4 203.0.113.7 127.0.0.1 51000 8080\r\n");
        bytes.extend_from_slice(b"payload");
        let (result, rest) = read(&bytes).await;
        let carried = result.unwrap().unwrap();
        assert_eq!(carried.source, addr("203.0.113.7:51000"));
        assert_eq!(carried.destination, addr("127.0.0.1:8080"));
        assert_eq!(rest, b"payload");
        let six = encode_v1(addr("[2001:db8::7]:1"), addr("[::1]:2"));
        let carried = read(six.as_bytes()).await.0.unwrap().unwrap();
        assert_eq!(carried.source, addr("[2001:db8::7]:1"));
    }

    #[tokio::test]
    async fn local_and_unknown_carry_no_address() {
        let local = encode_local(ProxyProtocolVersion::V2);
        assert!(read(&local).await.0.unwrap().is_none());
        let unknown = encode_local(ProxyProtocolVersion::V1);
        assert!(read(&unknown).await.0.unwrap().is_none());
        assert!(read(b"PROXY UNKNOWN\r\n").await.0.unwrap().is_none());
        assert!(read(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n")
            .await
            .0
            .unwrap()
            .is_none());
    }

    #[tokio::test]
    async fn malformed_headers_are_refused() {
        let bad: Vec<Vec<u8>> = vec![
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n".to_vec(),
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 2\r\n".to_vec(),
            b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n".to_vec(),
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(),
            [b"PROXY TCP4 ".as_slice(), &[b'1'; 120], b"\r\n"].concat(),
            [V2_SIGNATURE.as_slice(), &[0x11, 0x11, 0, 12]].concat(), // version 1 in v2 framing
            [V2_SIGNATURE.as_slice(), &[0x21, 0x11, 0, 4, 1, 2, 3, 4]].concat(), // too short
            [V2_SIGNATURE.as_slice(), &[0x21, 0x11, 0xff, 0xff]].concat(), // too long
            [V2_SIGNATURE.as_slice(), &[0x2f, 0x11, 0, 0]].concat(),  // unknown command
        ];
        for bytes in bad {
            match read(&bytes).await.0 {
                Err(ProxyHeaderError::Malformed(_)) => {}
                other => panic!("{:?} accepted: {other:?}", String::from_utf8_lossy(&bytes)),
            }
        }
        // Truncated: an I/O error (end of stream), not a panic.
        let truncated = &encode_v2(addr("1.2.3.4:1"), addr("5.6.7.8:2"))[..20];
        assert!(matches!(
            read(truncated).await.0,
            Err(ProxyHeaderError::Io(_))
        ));
        assert!(matches!(
            read(b"PROXY TCP4 1.2").await.0,
            Err(ProxyHeaderError::Io(_))
        ));
    }
}
