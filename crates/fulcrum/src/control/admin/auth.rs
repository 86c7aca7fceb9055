//! What every admin API call must pass before it reaches a handler, in this order:
//!
//! 1. `Host` names the admin itself (the address the connection arrived at, `localhost` on
//!    loopback, or one of `[admin] allowed_hosts`): a DNS-rebinding name is refused (421). A
//!    request without `Host` (HTTP/1.0) is accepted on loopback only (403 elsewhere).
//! 2. Not cross-site: `Sec-Fetch-Site` other than `same-origin`/`none`, or an `Origin` that is
//!    not the admin itself, is refused (403), whatever the method.
//! 3. A write (POST, PUT, PATCH, DELETE) with a body says `Content-Type: application/json`
//!    (415 otherwise), so a cross-site "simple" form or `text/plain` POST never gets here.
//! 4. The bearer token, when there is one (configured as `token` or `token_file`, or
//!    generated at start for a public address): compared in constant time, read from the
//!    configuration in force on every request, so a reload that changes `[admin] token`
//!    applies at once, and so does a token file rewritten in place (see `mod.rs`).

use std::io::Read;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use super::ApiError;
use crate::server::Server;

/// The local address a request's connection arrived at (a request extension set per
/// connection by the admin's accept loop).
#[derive(Debug, Clone, Copy)]
pub(super) struct LocalAddr(pub(super) SocketAddr);

/// What the checks read: the running server (its `[admin]` in force) and the token generated
/// at start, if any.
#[derive(Debug)]
pub(super) struct Guard {
    pub(super) server: Arc<Server>,
    /// Generated at start because the admin listens on a public address without a token;
    /// a configured token takes its place.
    pub(super) generated_token: Option<String>,
}

/// Compares two byte strings in time that depends only on their lengths.
pub(super) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A fresh random token: 32 bytes from the operating system's generator, in hex.
pub(super) fn generate_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Splits `host[:port]` (`[v6]:port` for IPv6) into a lower-case name and a port
/// (`default_port` when absent); `None` for anything else.
fn split_authority(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if authority.is_empty() || authority.contains(['@', '/', ' ']) {
        return None;
    }
    let (name, port) = if let Some(rest) = authority.strip_prefix('[') {
        match rest.split_once(']')? {
            (name, "") => (name, None),
            (name, after) => (name, Some(after.strip_prefix(':')?)),
        }
    } else {
        match authority.split_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => default_port,
        Some(port) if port.bytes().all(|b| b.is_ascii_digit()) => port.parse().ok()?,
        Some(_) => return None,
    };
    if name.is_empty() {
        return None;
    }
    Some((name.to_ascii_lowercase(), port))
}

/// Whether `authority` (from `Host` or `Origin`) names the admin: the address the connection
/// arrived at, `localhost` with its port when that is loopback, or an allowed name (whose port
/// is the admin's when it gives none).
pub(super) fn authority_allowed(
    authority: &str,
    default_port: u16,
    local: SocketAddr,
    allowed_hosts: &[String],
) -> bool {
    let Some((name, port)) = split_authority(authority, default_port) else {
        return false;
    };
    let local_ip = local.ip().to_canonical();
    if port == local.port() {
        if name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical() == local_ip)
        {
            return true;
        }
        if local_ip.is_loopback() && name == "localhost" {
            return true;
        }
    }
    allowed_hosts.iter().any(|entry| {
        split_authority(entry, local.port()).is_some_and(|(n, p)| n == name && p == port)
    })
}

/// Whether an `Origin` header value names the admin (`null` and unknown schemes never do).
fn origin_allowed(origin: &str, local: SocketAddr, allowed_hosts: &[String]) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    let (authority, default_port) = if let Some(rest) = origin.strip_prefix("http://") {
        (rest, 80)
    } else if let Some(rest) = origin.strip_prefix("https://") {
        (rest, 443)
    } else {
        return false;
    };
    authority_allowed(authority, default_port, local, allowed_hosts)
}

/// Whether the request carries a body (a length above zero, or chunked).
fn has_body(headers: &HeaderMap) -> bool {
    if headers.contains_key(header::TRANSFER_ENCODING) {
        return true;
    }
    headers
        .get(header::CONTENT_LENGTH)
        .is_some_and(|v| v.to_str().map_or(true, |v| v.trim() != "0"))
}

/// Whether `Content-Type` is `application/json` (parameters such as `charset` allowed).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"))
}

/// Why a request is refused before the token is even looked at, if it is.
pub(super) fn refusal(
    method: &Method,
    headers: &HeaderMap,
    uri_authority: Option<&str>,
    local: SocketAddr,
    allowed_hosts: &[String],
) -> Option<ApiError> {
    let host = uri_authority.or_else(|| headers.get(header::HOST).and_then(|v| v.to_str().ok()));
    match host {
        None if !local.ip().to_canonical().is_loopback() => {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                "a Host header is required on a non-loopback admin address",
            ));
        }
        None => {}
        Some(host) if !authority_allowed(host, 80, local, allowed_hosts) => {
            return Some(ApiError::new(
                StatusCode::MISDIRECTED_REQUEST,
                format!(
                    "Host \"{host}\" is not this admin API: use {local} or a name in [admin] allowed_hosts"
                ),
            ));
        }
        Some(_) => {}
    }
    if let Some(site) = headers.get("sec-fetch-site") {
        let site = site.to_str().unwrap_or("");
        if !site.eq_ignore_ascii_case("same-origin") && !site.eq_ignore_ascii_case("none") {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-site request refused (Sec-Fetch-Site: {site})"),
            ));
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !origin_allowed(origin, local, allowed_hosts) {
            return Some(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin request refused (Origin: {origin})"),
            ));
        }
    }
    let write = [Method::POST, Method::PUT, Method::PATCH, Method::DELETE].contains(method);
    if write && has_body(headers) && !is_json(headers) {
        return Some(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "a request body must be sent with Content-Type: application/json",
        ));
    }
    None
}

/// Middleware: the checks of [`refusal`], then, when there is a token, `Authorization:
/// Bearer TOKEN`.
pub(super) async fn guard(
    State(guard): State<Arc<Guard>>,
    request: Request,
    next: Next,
) -> Response {
    let admin = guard.server.admin_config();
    let local = request
        .extensions()
        .get::<LocalAddr>()
        .map_or(admin.listen.get_ref().0, |l| l.0);
    if let Some(refused) = refusal(
        request.method(),
        request.headers(),
        request.uri().authority().map(|a| a.as_str()),
        local,
        &admin.allowed_hosts,
    ) {
        tracing::warn!(path = %request.uri().path(), reason = %refused.message, "admin API call refused");
        return refused.into_response();
    }
    let token = admin.token().or(guard.generated_token.as_deref());
    if let Some(token) = token {
        let presented = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
            tracing::warn!(path = %request.uri().path(), "admin API call refused: missing or wrong token");
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "missing or wrong bearer token" })),
            )
                .into_response();
        }
    }
    next.run(request).await
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:9090".parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, HeaderValue::from_static(value));
        }
        map
    }

    fn status(method: Method, pairs: &[(&'static str, &'static str)]) -> Option<StatusCode> {
        let allowed = ["admin.example:443".to_string(), "lb.internal".to_string()];
        refusal(&method, &headers(pairs), None, local(), &allowed).map(|e| e.status)
    }

    #[test]
    fn compares_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(constant_time_eq(b"", b""));
    }

    #[test]
    fn a_token_is_generated_only_off_loopback_without_one() {
        let needs = |listen: &str, token: Option<&str>| {
            let mut admin = crate::config::AdminConfig::default();
            admin.listen =
                toml::Spanned::new(0..0, crate::config::ListenAddr(listen.parse().unwrap()));
            admin.token = token.map(str::to_string);
            admin.needs_generated_token()
        };
        assert!(!needs("127.0.0.1:9090", None));
        assert!(!needs("127.0.0.2:9090", None));
        assert!(!needs("[::1]:9090", None));
        assert!(!needs("[::ffff:127.0.0.1]:9090", None));
        assert!(needs("0.0.0.0:9090", None));
        assert!(needs("[::]:9090", Some("")));
        assert!(needs("192.0.2.1:9090", None));
        assert!(!needs("0.0.0.0:9090", Some("s3cret")));
        let (a, b) = (generate_token().unwrap(), generate_token().unwrap());
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }

    #[test]
    fn host_must_name_the_admin() {
        assert_eq!(status(Method::GET, &[("host", "127.0.0.1:9090")]), None);
        assert_eq!(status(Method::GET, &[("host", "LOCALHOST:9090")]), None);
        assert_eq!(status(Method::GET, &[("host", "lb.internal:9090")]), None);
        assert_eq!(status(Method::GET, &[("host", "admin.example:443")]), None);
        // Loopback without Host (HTTP/1.0) is fine.
        assert_eq!(status(Method::GET, &[]), None);
        let misdirected = Some(StatusCode::MISDIRECTED_REQUEST);
        assert_eq!(
            status(Method::GET, &[("host", "evil.example:9090")]),
            misdirected
        );
        assert_eq!(
            status(Method::GET, &[("host", "127.0.0.1:9091")]),
            misdirected
        );
        assert_eq!(status(Method::GET, &[("host", "127.0.0.1")]), misdirected);
        assert_eq!(
            status(Method::GET, &[("host", "localhost:80")]),
            misdirected
        );
        assert_eq!(
            status(Method::GET, &[("host", "lb.internal:80")]),
            misdirected
        );
        assert_eq!(
            status(Method::GET, &[("host", "u@127.0.0.1:9090")]),
            misdirected
        );
        assert_eq!(status(Method::GET, &[("host", "::1:9090")]), misdirected);
        // Off loopback, no Host is refused and localhost is not the admin.
        let public: SocketAddr = "192.0.2.1:9090".parse().unwrap();
        let refuse =
            |pairs| refusal(&Method::GET, &headers(pairs), None, public, &[]).map(|e| e.status);
        assert_eq!(refuse(&[]), Some(StatusCode::FORBIDDEN));
        assert_eq!(refuse(&[("host", "localhost:9090")]), misdirected);
        assert_eq!(refuse(&[("host", "192.0.2.1:9090")]), None);
        let v6: SocketAddr = "[::1]:9090".parse().unwrap();
        assert!(authority_allowed("[::1]:9090", 80, v6, &[]));
        assert!(authority_allowed("localhost:9090", 80, v6, &[]));
        assert!(!authority_allowed("[::2]:9090", 80, v6, &[]));
    }

    #[test]
    fn cross_site_requests_are_refused() {
        let host = ("host", "127.0.0.1:9090");
        let forbidden = Some(StatusCode::FORBIDDEN);
        for site in ["same-origin", "none"] {
            let pairs = [host, ("sec-fetch-site", site)];
            assert_eq!(status(Method::GET, &pairs), None, "{site}");
        }
        for site in ["cross-site", "same-site", ""] {
            let pairs = [host, ("sec-fetch-site", site)];
            assert_eq!(status(Method::POST, &pairs), forbidden, "{site}");
            assert_eq!(status(Method::GET, &pairs), forbidden, "{site}");
        }
        assert_eq!(
            status(Method::POST, &[host, ("origin", "http://127.0.0.1:9090")]),
            None
        );
        assert_eq!(
            status(Method::POST, &[host, ("origin", "http://localhost:9090")]),
            None
        );
        assert_eq!(
            status(Method::POST, &[host, ("origin", "https://admin.example")]),
            None
        );
        for origin in [
            "http://evil.example",
            "http://127.0.0.1:8080",
            "https://127.0.0.1:9090:1",
            "null",
            "file://",
            "http://admin.example",
        ] {
            let pairs = [host, ("origin", origin)];
            assert_eq!(status(Method::POST, &pairs), forbidden, "{origin}");
        }
    }

    #[test]
    fn writes_with_a_body_must_be_json() {
        let host = ("host", "127.0.0.1:9090");
        let unsupported = Some(StatusCode::UNSUPPORTED_MEDIA_TYPE);
        for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let text = [
                host,
                ("content-type", "text/plain"),
                ("content-length", "2"),
            ];
            assert_eq!(status(method.clone(), &text), unsupported, "{method}");
            let none = [host, ("content-length", "2")];
            assert_eq!(status(method.clone(), &none), unsupported, "{method}");
            let chunked = [host, ("transfer-encoding", "chunked")];
            assert_eq!(status(method.clone(), &chunked), unsupported, "{method}");
            let json = [
                host,
                ("content-type", "Application/JSON; charset=utf-8"),
                ("content-length", "2"),
            ];
            assert_eq!(status(method.clone(), &json), None, "{method}");
            // No body: nothing to type.
            assert_eq!(status(method.clone(), &[host]), None, "{method}");
            let empty = [
                host,
                ("content-length", "0"),
                ("content-type", "text/plain"),
            ];
            assert_eq!(status(method.clone(), &empty), None, "{method}");
        }
        let text = [
            host,
            ("content-type", "text/plain"),
            ("content-length", "2"),
        ];
        assert_eq!(status(Method::GET, &text), None);
    }
}
