//! `fulcrum ctl`: a command-line client of the admin API. Human-readable tables by default,
//! the API's raw JSON with `--json`. API errors are shown as one line on stderr, exit code 1.
//! Every answer is decoded into its type in [`crate::control::api`] (also with `--json`): an
//! answer that does not match — a field missing, say — is an error naming the endpoint.

use std::fmt::Write as _;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::control::api;
use crate::pool::AdminState;
use crate::upstream::tls::client_config;

/// Where the admin API is when neither `--admin` nor `FULCRUM_ADMIN` says otherwise.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9090";

/// Bound on connecting to the admin API.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one whole API call.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest API answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// `fulcrum ctl` arguments.
#[derive(Debug, clap::Args)]
pub struct CtlArgs {
    /// Admin API base URL [env: FULCRUM_ADMIN] [default: http://127.0.0.1:9090].
    #[arg(long, global = true, value_name = "URL")]
    pub admin: Option<String>,
    /// Bearer token of the admin API [env: FULCRUM_TOKEN].
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        conflicts_with = "token_file"
    )]
    pub token: Option<String>,
    /// File holding the bearer token (surrounding white space ignored), e.g. the admin's
    /// `[admin] token_file`.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// PEM file of the CA certificates to verify an https:// admin API with, instead of the
    /// public roots [env: FULCRUM_CA].
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<std::path::PathBuf>,
    /// Print the API's raw JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The `fulcrum ctl` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CtlCommand {
    /// List pools: algorithm, available/total backends, in-flight, requests.
    Pools,
    /// List the backends of a pool with their state, health, weights and numbers.
    Backends {
        /// Pool name.
        pool: String,
    },
    /// Add a backend to a pool (health-checked first when the pool has checks).
    Add {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
        /// Relative share of traffic.
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Drain a backend: no new requests, in-flight ones finish; it stays in the pool.
    Drain {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
    },
    /// Put a drained or maintenance backend back into service.
    Activate {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
    },
    /// Put a backend in maintenance: no traffic until activated.
    Maint {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
    },
    /// Remove a backend: drained first (bounded by the pool's drain_timeout) unless --now.
    Remove {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
        /// Remove at once, without waiting for in-flight requests.
        #[arg(long)]
        now: bool,
    },
    /// Set a backend's weight (0 = no new traffic).
    Weight {
        /// Pool name.
        pool: String,
        /// Backend address, IP:PORT.
        address: String,
        /// The new weight.
        weight: u32,
    },
    /// Reload the configuration file (same as SIGHUP).
    Reload,
    /// Show the autoscalers: size, wanted size, smoothed load, managed backends, decisions.
    Autoscale,
    /// Show recent membership, health and reload events.
    Events {
        /// How many events (most recent last).
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

/// Why a ctl command failed; the message is printed as one line.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CtlError(String);

/// Runs `fulcrum ctl`: prints the answer on stdout, or one error line on stderr and exits 1.
pub fn main(args: CtlArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(output) => {
            // Not print!: a closed stdout (`fulcrum ctl pools | head -1`) must not panic.
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(output.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Runs one ctl command and returns what it prints.
pub async fn run(args: CtlArgs) -> Result<String, CtlError> {
    let admin = args
        .admin
        .or_else(|| std::env::var("FULCRUM_ADMIN").ok())
        .filter(|a| !a.is_empty())
        .unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    let token = match (args.token, &args.token_file) {
        (Some(token), _) => Some(token),
        (None, Some(path)) => Some(read_token_file(path)?),
        (None, None) => std::env::var("FULCRUM_TOKEN").ok(),
    }
    .filter(|t| !t.is_empty());
    let ca = args.ca.or_else(|| {
        std::env::var_os("FULCRUM_CA")
            .filter(|v| !v.is_empty())
            .map(Into::into)
    });
    let client = Client::new(&admin, token, ca.as_deref())?;
    let json = args.json;
    let backend_path = |pool: &str, address: &str| {
        format!("/api/pools/{}/backends/{}", encode(pool), encode(address))
    };
    match args.command {
        CtlCommand::Pools => {
            let pools: Answer<Vec<api::PoolStatus>> =
                client.call(Method::GET, "/api/pools", None).await?;
            Ok(pools.show(json, |pools| pools_table(pools)))
        }
        CtlCommand::Backends { pool } => {
            let path = format!("/api/pools/{}", encode(&pool));
            let status: Answer<api::PoolStatus> = client.call(Method::GET, &path, None).await?;
            Ok(status.show(json, backends_table))
        }
        CtlCommand::Add {
            pool,
            address,
            weight,
        } => {
            let request = api::AddBackend {
                address: address.clone(),
                weight,
            };
            let path = format!("/api/pools/{}/backends", encode(&pool));
            let answer: Answer<api::BackendAdded> = client
                .call(Method::POST, &path, Some(body(&request)?))
                .await?;
            Ok(answer.show(json, |added| {
                format!(
                    "added {} to pool {pool} with weight {}\n",
                    added.added, added.weight
                )
            }))
        }
        CtlCommand::Drain { pool, address } => {
            let path = backend_path(&pool, &address);
            let answer = set_state(&client, &path, AdminState::Draining).await?;
            Ok(answer.show(json, |_| {
                format!("{address} in pool {pool}: draining (no new requests)\n")
            }))
        }
        CtlCommand::Activate { pool, address } => {
            let path = backend_path(&pool, &address);
            let answer = set_state(&client, &path, AdminState::Active).await?;
            Ok(answer.show(json, |_| format!("{address} in pool {pool}: active\n")))
        }
        CtlCommand::Maint { pool, address } => {
            let path = backend_path(&pool, &address);
            let answer = set_state(&client, &path, AdminState::Maint).await?;
            Ok(answer.show(json, |_| {
                format!("{address} in pool {pool}: maintenance (no traffic)\n")
            }))
        }
        CtlCommand::Remove { pool, address, now } => {
            let mut path = backend_path(&pool, &address);
            if now {
                path.push_str("?now=true");
            }
            let answer: Answer<api::BackendRemoved> =
                client.call(Method::DELETE, &path, None).await?;
            Ok(answer.show(json, |removed| {
                if removed.drained {
                    format!(
                        "removing {address} from pool {pool}: no new requests; it leaves when \
                         its in-flight requests finish (at most the pool's drain_timeout)\n"
                    )
                } else {
                    format!("removed {address} from pool {pool}\n")
                }
            }))
        }
        CtlCommand::Weight {
            pool,
            address,
            weight,
        } => {
            let request = api::UpdateBackend {
                weight: Some(weight),
                state: None,
            };
            let answer: Answer<api::BackendUpdated> = client
                .call(
                    Method::PATCH,
                    &backend_path(&pool, &address),
                    Some(body(&request)?),
                )
                .await?;
            Ok(answer.show(json, |_| {
                format!("{address} in pool {pool}: weight {weight}\n")
            }))
        }
        CtlCommand::Reload => {
            let answer: Answer<api::Reloaded> =
                client.call(Method::POST, "/api/reload", None).await?;
            Ok(answer.show(json, reload_summary))
        }
        CtlCommand::Autoscale => {
            let autoscalers: Answer<Vec<api::AutoscaleStatus>> =
                client.call(Method::GET, "/api/autoscale", None).await?;
            Ok(autoscalers.show(json, |autoscalers| autoscale_table(autoscalers)))
        }
        CtlCommand::Events { limit } => {
            let path = format!("/api/events?limit={limit}");
            let events: Answer<Vec<api::Event>> = client.call(Method::GET, &path, None).await?;
            Ok(events.show(json, |events| events_table(events)))
        }
    }
}

/// The token in `path`, without surrounding white space.
fn read_token_file(path: &std::path::Path) -> Result<String, CtlError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CtlError(format!("cannot read token file {}: {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CtlError(format!("token file {} is empty", path.display())));
    }
    Ok(token.to_string())
}

/// PATCHes a backend's admin state.
async fn set_state(
    client: &Client,
    path: &str,
    state: AdminState,
) -> Result<Answer<api::BackendUpdated>, CtlError> {
    let request = api::UpdateBackend {
        weight: None,
        state: Some(state),
    };
    client
        .call(Method::PATCH, path, Some(body(&request)?))
        .await
}

/// A request body as JSON.
fn body(request: &impl Serialize) -> Result<Bytes, CtlError> {
    serde_json::to_vec(request)
        .map(Bytes::from)
        .map_err(|e| CtlError(format!("cannot encode the request body: {e}")))
}

/// A 2xx answer: decoded into its API type, and as the API sent it (for `--json`).
struct Answer<T> {
    value: T,
    raw: Bytes,
}

impl<T> Answer<T> {
    /// What ctl prints: the API's JSON (pretty-printed) with `--json`, else `human(answer)`.
    fn show(&self, json: bool, human: impl FnOnce(&T) -> String) -> String {
        if json {
            pretty(&self.raw)
        } else {
            human(&self.value)
        }
    }
}

/// Decodes the 2xx answer of `endpoint` (`GET /api/pools`) from the admin API at `base` into
/// its API type. An answer that does not match — a field missing, of the wrong type, not
/// JSON at all — is an error naming the endpoint and the place in the answer.
fn decode<T: DeserializeOwned>(base: &str, endpoint: &str, body: &[u8]) -> Result<T, CtlError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let at = if path == "." {
            String::new()
        } else {
            format!(" at {path}")
        };
        CtlError(format!(
            "admin API at {base} answered {endpoint} with a body ctl does not understand{at}: {}",
            error.inner()
        ))
    })
}

/// A minimal HTTP/1.1 client of the admin API: one connection per call.
struct Client {
    /// The base URL as given (for messages).
    base: String,
    host: String,
    port: u16,
    /// Path prefix of the base URL, without a trailing slash.
    prefix: String,
    token: Option<String>,
    /// For an https:// URL: the TLS settings and the name the certificate must carry.
    tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
}

impl Client {
    fn new(base: &str, token: Option<String>, ca: Option<&Path>) -> Result<Client, CtlError> {
        let bad = |why: &str| CtlError(format!("invalid admin URL \"{base}\": {why}"));
        let with_scheme = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| bad("expected http://HOST:PORT"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            Some(other) => {
                return Err(bad(&format!(
                    "scheme {other} is not supported, use http or https"
                )))
            }
            None => return Err(bad("expected http://HOST:PORT")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .map_err(|_| bad("the host is not a valid DNS name or IP address"))?;
            let config =
                client_config(ca, true, b"http/1.1").map_err(|e| CtlError(e.to_string()))?;
            Some((config, name))
        } else {
            None
        };
        Ok(Client {
            base: base.to_string(),
            host,
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            prefix: uri.path().trim_end_matches('/').to_string(),
            token,
            tls,
        })
    }

    /// Calls the API with an optional JSON body; a 2xx answer decoded into `T`, else an
    /// error built from the API's error body.
    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Answer<T>, CtlError> {
        let exchange = self.exchange(method.clone(), path, body);
        match tokio::time::timeout(CALL_TIMEOUT, exchange).await {
            Ok(Ok(raw)) => Ok(Answer {
                value: decode(&self.base, &format!("{method} {path}"), &raw)?,
                raw,
            }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(CtlError(format!(
                "admin API at {} did not answer {method} {path} within {}s",
                self.base,
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    /// One exchange: the body of a 2xx answer, else an error built from the API's error body.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Bytes, CtlError> {
        let unreachable =
            |why: String| CtlError(format!("cannot reach admin API at {}: {why}", self.base));
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                unreachable(format!(
                    "connect timed out after {}s",
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| unreachable(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        let mut sender = match &self.tls {
            None => handshake(stream).await,
            Some((config, name)) => {
                let connect = TlsConnector::from(config.clone()).connect(name.clone(), stream);
                let stream = tokio::time::timeout(CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| {
                        unreachable(format!(
                            "TLS handshake timed out after {}s",
                            CONNECT_TIMEOUT.as_secs()
                        ))
                    })?
                    .map_err(|e| {
                        unreachable(format!(
                            "TLS: {e} (a private CA is trusted with --ca FILE or FULCRUM_CA)"
                        ))
                    })?;
                handshake(stream).await
            }
        }
        .map_err(|e| unreachable(e.to_string()))?;

        let host_header = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut request = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, host_header)
            .header(
                USER_AGENT,
                concat!("fulcrum-ctl/", env!("CARGO_PKG_VERSION")),
            );
        if let Some(token) = &self.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let payload = match body {
            Some(body) => {
                request = request.header(CONTENT_TYPE, "application/json");
                body
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| CtlError(format!("cannot build the request {method} {path}: {e}")))?;
        let hint = if self.tls.is_none() {
            " (an admin API with [admin] tls needs an https:// URL)"
        } else {
            ""
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("{method} {path}: {e}{hint}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the answer to {method} {path}: {e}")))?
            .to_bytes();
        if status.is_success() {
            return Ok(bytes);
        }
        // Not every error answer is the API's (a proxy in between, axum's own 405).
        let error: Option<api::ErrorBody> = serde_json::from_slice(&bytes).ok();
        Err(CtlError(api_error(status, error.as_ref(), &bytes)))
    }
}

/// An HTTP/1.1 client connection over `io` (its connection task spawned).
async fn handshake<S>(io: S) -> hyper::Result<SendRequest<Full<Bytes>>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// One line describing an API error answer.
fn api_error(status: StatusCode, body: Option<&api::ErrorBody>, raw: &[u8]) -> String {
    let message = body.map(|b| b.error.clone()).unwrap_or_else(|| {
        let text = String::from_utf8_lossy(raw);
        let first = text.lines().next().unwrap_or("").trim();
        if first.is_empty() {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        } else {
            first.to_string()
        }
    });
    let mut line = format!("{} {message}", status.as_u16());
    if let Some(field) = body.and_then(|b| b.field.as_deref()) {
        if !message.contains(&format!("`{field}`")) {
            let _ = write!(line, " (field `{field}`)");
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        line.push_str(" (give it with --token, --token-file or FULCRUM_TOKEN)");
    }
    line
}

/// Percent-encodes one path segment (pool names, IPv6 addresses).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~:".contains(&byte) {
            out.push(byte as char);
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The API's JSON answer pretty-printed (as sent when it is not JSON; it was decoded, so it is).
fn pretty(raw: &[u8]) -> String {
    // Only re-indented here: the fields were read through the API types.
    let mut text = serde_json::from_slice::<serde_json::Value>(raw)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| String::from_utf8_lossy(raw).into_owned());
    text.push('\n');
    text
}

/// Renders rows as aligned columns; `right[i]` right-aligns column i (numbers).
fn table(header: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            let pad = widths[i] - cell.chars().count();
            if i > 0 {
                line.push_str("  ");
            }
            if right[i] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// An optional cell: `-` when absent.
fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

fn pools_table(pools: &[api::PoolStatus]) -> String {
    let rows: Vec<Vec<String>> = pools
        .iter()
        .map(|pool| {
            let members: Vec<&api::BackendStatus> =
                pool.backends.iter().filter(|b| !b.removing).collect();
            let available = members.iter().filter(|b| b.available).count();
            let in_flight: u64 = pool.backends.iter().map(|b| u64::from(b.in_flight)).sum();
            let requests: u64 = pool.backends.iter().map(|b| b.requests).sum();
            vec![
                pool.name.clone(),
                pool.algorithm.clone(),
                format!("{available}/{}", members.len()),
                in_flight.to_string(),
                requests.to_string(),
            ]
        })
        .collect();
    table(
        &["POOL", "ALGORITHM", "BACKENDS", "IN-FLIGHT", "REQUESTS"],
        &[false, false, true, true, true],
        &rows,
    )
}

fn backends_table(pool: &api::PoolStatus) -> String {
    let rows: Vec<Vec<String>> = pool
        .backends
        .iter()
        .map(|b| {
            let state = if b.removing {
                "removing".to_string()
            } else {
                b.state.clone()
            };
            let mut health = b.health.clone();
            if b.ejected {
                health.push_str(",ejected");
            }
            if b.backed_off {
                health.push_str(",backed-off");
            }
            if b.agent_state != "up" {
                let _ = write!(health, ",agent-{}", b.agent_state);
            }
            let latency = b
                .latency_ms
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".to_string());
            vec![
                b.address.clone(),
                state,
                health,
                format!("{}/{}", b.weight, b.effective_weight),
                b.in_flight.to_string(),
                b.requests.to_string(),
                b.failures.to_string(),
                latency,
            ]
        })
        .collect();
    table(
        &[
            "ADDRESS",
            "STATE",
            "HEALTH",
            "WEIGHT",
            "IN-FLIGHT",
            "REQUESTS",
            "ERRORS",
            "LATENCY",
        ],
        &[false, false, false, true, true, true, true, true],
        &rows,
    )
}

fn events_table(events: &[api::Event]) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let at = UNIX_EPOCH + Duration::from_millis(e.at_ms);
            vec![
                humantime::format_rfc3339_millis(at).to_string(),
                e.kind.clone(),
                or_dash(e.pool.as_deref()),
                or_dash(e.backend.as_deref()),
                e.message.clone(),
            ]
        })
        .collect();
    table(
        &["TIME", "KIND", "POOL", "BACKEND", "MESSAGE"],
        &[false; 5],
        &rows,
    )
}

fn autoscale_table(autoscalers: &[api::AutoscaleStatus]) -> String {
    if autoscalers.is_empty() {
        return "no pool has autoscaling\n".to_string();
    }
    let rows: Vec<Vec<String>> = autoscalers
        .iter()
        .map(|a| {
            let managed: Vec<String> = a.managed.iter().map(|m| m.address.to_string()).collect();
            vec![
                a.pool.clone(),
                a.metric.clone(),
                // `{:?}` keeps the decimal point of a whole target (4.0), as the JSON has it.
                format!("{:.2}/{:?}", a.load_per_backend, a.target),
                a.backends.to_string(),
                a.desired.to_string(),
                format!("{}..{}", a.min, a.max),
                format!("{}/{}", a.scale_ups, a.scale_downs),
                a.failures.to_string(),
                if managed.is_empty() {
                    "-".to_string()
                } else {
                    managed.join(",")
                },
            ]
        })
        .collect();
    table(
        &[
            "POOL",
            "METRIC",
            "LOAD/TARGET",
            "BACKENDS",
            "WANTED",
            "MIN..MAX",
            "UP/DOWN",
            "FAILURES",
            "MANAGED",
        ],
        &[false, false, true, true, true, true, true, true, false],
        &rows,
    )
}

fn reload_summary(answer: &api::Reloaded) -> String {
    let changes = &answer.changes;
    let parts: Vec<String> = [
        (&changes.listeners_added, "listeners opened"),
        (&changes.listeners_changed, "listeners re-opened"),
        (&changes.listeners_removed, "listeners closed"),
        (&changes.pools_added, "pools added"),
        (&changes.pools_updated, "pools re-applied"),
        (&changes.pools_removed, "pools removed"),
    ]
    .into_iter()
    .filter(|(names, _)| !names.is_empty())
    .map(|(names, label)| format!("{label}: {}", names.join(", ")))
    .collect();
    if parts.is_empty() {
        "reloaded: no changes\n".to_string()
    } else {
        format!("reloaded; {}\n", parts.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let out = table(
            &["NAME", "N"],
            &[false, true],
            &[
                vec!["a".into(), "1".into()],
                vec!["long-name".into(), "100".into()],
            ],
        );
        assert_eq!(out, "NAME         N\na            1\nlong-name  100\n");
    }

    #[test]
    fn path_segments_are_encoded() {
        assert_eq!(encode("127.0.0.1:80"), "127.0.0.1:80");
        assert_eq!(encode("[::1]:80"), "%5B::1%5D:80");
        assert_eq!(encode("a b/c"), "a%20b%2Fc");
    }

    #[test]
    fn admin_urls_parse() {
        let client = Client::new("http://127.0.0.1:9090", None, None).unwrap();
        assert_eq!((client.host.as_str(), client.port), ("127.0.0.1", 9090));
        assert!(client.tls.is_none());
        let client = Client::new("[::1]:9", None, None).unwrap();
        assert_eq!((client.host.as_str(), client.port), ("::1", 9));
        let client = Client::new("http://localhost/admin/", None, None).unwrap();
        assert_eq!((client.port, client.prefix.as_str()), (80, "/admin"));
        let client = Client::new("https://admin.example/", None, None).unwrap();
        assert_eq!(client.port, 443);
        assert!(client.tls.is_some());
        let client = Client::new("https://[::1]:9443", None, None).unwrap();
        assert_eq!((client.host.as_str(), client.port), ("::1", 9443));
        assert!(Client::new("ftp://x:1", None, None).is_err());
        assert!(Client::new("http://", None, None).is_err());
        let missing = Client::new("https://x:1", None, Some(Path::new("/nonexistent/ca.pem")));
        assert!(missing.is_err_and(|e| e.0.contains("/nonexistent/ca.pem")));
    }

    #[test]
    fn api_errors_are_one_line() {
        let body = api::ErrorBody {
            error: "invalid request body: unknown field `wieght`".to_string(),
            field: Some("wieght".to_string()),
        };
        assert_eq!(
            api_error(StatusCode::BAD_REQUEST, Some(&body), b""),
            "400 invalid request body: unknown field `wieght`"
        );
        let body = api::ErrorBody {
            error: "nothing to change".to_string(),
            field: Some("weight".to_string()),
        };
        assert_eq!(
            api_error(StatusCode::BAD_REQUEST, Some(&body), b""),
            "400 nothing to change (field `weight`)"
        );
        assert_eq!(
            api_error(StatusCode::METHOD_NOT_ALLOWED, None, b""),
            "405 method not allowed"
        );
    }

    /// One backend as `GET /api/pools` shows it, without `without` when given.
    fn backend_json(without: Option<&str>) -> String {
        let mut fields = vec![
            r#""address":"127.0.0.1:8001""#,
            r#""weight":2"#,
            r#""effective_weight":2"#,
            r#""slow_start_percent":100"#,
            r#""state":"active""#,
            r#""health":"up""#,
            r#""ejected":false"#,
            r#""available":true"#,
            r#""agent_percent":100"#,
            r#""agent_cpu_percent":null"#,
            r#""agent_state":"up""#,
            r#""backed_off":false"#,
            r#""in_flight":1"#,
            r#""pending":0"#,
            r#""requests":30"#,
            r#""failures":0"#,
            r#""removing":false"#,
            r#""latency_ms":1.25"#,
        ];
        if let Some(field) = without {
            fields.retain(|f| !f.starts_with(&format!("\"{field}\"")));
        }
        format!("{{{}}}", fields.join(","))
    }

    fn pools_json(without: Option<&str>) -> String {
        format!(
            r#"[{{"name":"app","algorithm":"round_robin","backends":[{}]}}]"#,
            backend_json(without)
        )
    }

    #[test]
    fn answers_decode_into_the_api_types() {
        let pools: Vec<api::PoolStatus> =
            decode("http://x:1", "GET /api/pools", pools_json(None).as_bytes()).unwrap();
        assert_eq!(pools[0].backends[0].requests, 30);
        let out = pools_table(&pools);
        assert_eq!(
            out.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            ["app", "round_robin", "1/1", "1", "30"]
        );
        let out = backends_table(&pools[0]);
        assert_eq!(
            out.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            [
                "127.0.0.1:8001",
                "active",
                "up",
                "2/2",
                "1",
                "30",
                "0",
                "1.2ms"
            ]
        );
    }

    /// A missing field is an error naming the endpoint and where in the answer, never a zero;
    /// `null`able fields too.
    #[test]
    fn answers_missing_a_field_are_refused() {
        for field in ["requests", "in_flight", "latency_ms", "agent_cpu_percent"] {
            let body = pools_json(Some(field));
            let error =
                decode::<Vec<api::PoolStatus>>("http://x:1", "GET /api/pools", body.as_bytes())
                    .unwrap_err()
                    .to_string();
            assert!(
                error.starts_with(
                    "admin API at http://x:1 answered GET /api/pools with a body ctl does not \
                     understand at [0].backends[0]: "
                ),
                "{error}"
            );
            assert!(
                error.contains(&format!("missing field `{field}`")),
                "{error}"
            );
        }
        let error =
            decode::<api::Reloaded>("http://x:1", "POST /api/reload", br#"{"reloaded":true}"#)
                .unwrap_err()
                .to_string();
        assert!(
            error.contains("POST /api/reload") && error.contains("missing field `changes`"),
            "{error}"
        );
        let error = decode::<Vec<api::Event>>("http://x:1", "GET /api/events", b"ok\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("GET /api/events") && error.contains("expected value"),
            "{error}"
        );
        let error = decode::<api::PoolStatus>(
            "http://x:1",
            "GET /api/pools/app",
            br#"{"name":"app","algorithm":"round_robin","backends":[{"requests":"many"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            error.contains("at backends[0].requests: invalid type"),
            "{error}"
        );
    }

    #[test]
    fn reloads_and_autoscalers_are_summarized() {
        let reloaded = api::Reloaded {
            reloaded: true,
            changes: api::ReloadReport {
                pools_updated: vec!["app".to_string()],
                listeners_added: vec!["web".to_string(), "tcp".to_string()],
                ..api::ReloadReport::default()
            },
        };
        assert_eq!(
            reload_summary(&reloaded),
            "reloaded; listeners opened: web, tcp; pools re-applied: app\n"
        );
        let autoscaler = api::AutoscaleStatus {
            pool: "app".to_string(),
            metric: "cpu".to_string(),
            target: 4.0,
            min: 1,
            max: 3,
            backends: 2,
            desired: 3,
            load_per_backend: 5.5,
            managed: vec![api::ManagedBackend {
                address: "127.0.0.1:9001".parse().unwrap(),
                pid: None,
            }],
            scale_ups: 1,
            scale_downs: 0,
            failures: 0,
            replacements: 0,
        };
        let out = autoscale_table(&[autoscaler]);
        assert_eq!(
            out.lines()
                .nth(1)
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>(),
            [
                "app",
                "cpu",
                "5.50/4.0",
                "2",
                "3",
                "1..3",
                "1/0",
                "0",
                "127.0.0.1:9001"
            ]
        );
        assert_eq!(autoscale_table(&[]), "no pool has autoscaling\n");
    }
}
