//! `fulcrum ctl`: a command-line client of the admin API. Human-readable tables by default,
//! the API's raw JSON with `--json`. API errors are shown as one line on stderr, exit code 1.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

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
    #[arg(long, global = true, value_name = "TOKEN")]
    pub token: Option<String>,
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
    let token = args
        .token
        .or_else(|| std::env::var("FULCRUM_TOKEN").ok())
        .filter(|t| !t.is_empty());
    let client = Client::new(&admin, token)?;
    let json = args.json;
    let backend_path = |pool: &str, address: &str| {
        format!("/api/pools/{}/backends/{}", encode(pool), encode(address))
    };
    match args.command {
        CtlCommand::Pools => {
            let pools = client.call(Method::GET, "/api/pools", None).await?;
            Ok(if json {
                pretty(&pools)
            } else {
                pools_table(&pools)
            })
        }
        CtlCommand::Backends { pool } => {
            let status = client
                .call(Method::GET, &format!("/api/pools/{}", encode(&pool)), None)
                .await?;
            Ok(if json {
                pretty(&status)
            } else {
                backends_table(&status)
            })
        }
        CtlCommand::Add {
            pool,
            address,
            weight,
        } => {
            let answer = client
                .call(
                    Method::POST,
                    &format!("/api/pools/{}/backends", encode(&pool)),
                    Some(json!({ "address": address, "weight": weight })),
                )
                .await?;
            Ok(if json {
                pretty(&answer)
            } else {
                format!("added {address} to pool {pool} with weight {weight}\n")
            })
        }
        CtlCommand::Drain { pool, address } => {
            set_state(&client, &backend_path(&pool, &address), "drain", json)
                .await
                .map(|out| {
                    out.unwrap_or_else(|| {
                        format!("{address} in pool {pool}: draining (no new requests)\n")
                    })
                })
        }
        CtlCommand::Activate { pool, address } => {
            set_state(&client, &backend_path(&pool, &address), "active", json)
                .await
                .map(|out| out.unwrap_or_else(|| format!("{address} in pool {pool}: active\n")))
        }
        CtlCommand::Maint { pool, address } => {
            set_state(&client, &backend_path(&pool, &address), "maint", json)
                .await
                .map(|out| {
                    out.unwrap_or_else(|| {
                        format!("{address} in pool {pool}: maintenance (no traffic)\n")
                    })
                })
        }
        CtlCommand::Remove { pool, address, now } => {
            let mut path = backend_path(&pool, &address);
            if now {
                path.push_str("?now=true");
            }
            let answer = client.call(Method::DELETE, &path, None).await?;
            Ok(if json {
                pretty(&answer)
            } else if now {
                format!("removed {address} from pool {pool}\n")
            } else {
                format!(
                    "removing {address} from pool {pool}: no new requests; it leaves when its \
                     in-flight requests finish (at most the pool's drain_timeout)\n"
                )
            })
        }
        CtlCommand::Weight {
            pool,
            address,
            weight,
        } => {
            let answer = client
                .call(
                    Method::PATCH,
                    &backend_path(&pool, &address),
                    Some(json!({ "weight": weight })),
                )
                .await?;
            Ok(if json {
                pretty(&answer)
            } else {
                format!("{address} in pool {pool}: weight {weight}\n")
            })
        }
        CtlCommand::Reload => {
            let answer = client.call(Method::POST, "/api/reload", None).await?;
            Ok(if json {
                pretty(&answer)
            } else {
                reload_summary(&answer)
            })
        }
        CtlCommand::Autoscale => {
            let autoscalers = client.call(Method::GET, "/api/autoscale", None).await?;
            Ok(if json {
                pretty(&autoscalers)
            } else {
                autoscale_table(&autoscalers)
            })
        }
        CtlCommand::Events { limit } => {
            let events = client
                .call(Method::GET, &format!("/api/events?limit={limit}"), None)
                .await?;
            Ok(if json {
                pretty(&events)
            } else {
                events_table(&events)
            })
        }
    }
}

/// PATCHes a backend's admin state; returns the raw JSON with `--json`, else None.
async fn set_state(
    client: &Client,
    path: &str,
    state: &str,
    json: bool,
) -> Result<Option<String>, CtlError> {
    let answer = client
        .call(Method::PATCH, path, Some(json!({ "state": state })))
        .await?;
    Ok(json.then(|| pretty(&answer)))
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
}

impl Client {
    fn new(base: &str, token: Option<String>) -> Result<Client, CtlError> {
        let bad = |why: &str| CtlError(format!("invalid admin URL \"{base}\": {why}"));
        let with_scheme = if base.contains("://") {
            base.to_string()
        } else {
            format!("http://{base}")
        };
        let uri: Uri = with_scheme
            .parse()
            .map_err(|_| bad("expected http://HOST:PORT"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(other) => return Err(bad(&format!("scheme {other} is not supported, use http"))),
            None => return Err(bad("expected http://HOST:PORT")),
        }
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_string();
        Ok(Client {
            base: base.to_string(),
            host,
            port: uri.port_u16().unwrap_or(80),
            prefix: uri.path().trim_end_matches('/').to_string(),
            token,
        })
    }

    /// Calls the API; a 2xx answer's JSON, else an error built from the API's error JSON.
    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
        match tokio::time::timeout(CALL_TIMEOUT, self.exchange(method.clone(), path, body)).await {
            Ok(outcome) => outcome,
            Err(_) => Err(CtlError(format!(
                "admin API at {} did not answer {method} {path} within {}s",
                self.base,
                CALL_TIMEOUT.as_secs()
            ))),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CtlError> {
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
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(connection);

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
                Bytes::from(body.to_string())
            }
            None => Bytes::new(),
        };
        let request = request
            .body(Full::new(payload))
            .map_err(|e| CtlError(format!("cannot build the request {method} {path}: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(format!("{method} {path}: {e}")))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading the answer to {method} {path}: {e}")))?
            .to_bytes();
        let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
        if status.is_success() {
            return parsed.ok_or_else(|| {
                CtlError(format!(
                    "admin API at {} answered {method} {path} with something that is not JSON",
                    self.base
                ))
            });
        }
        Err(CtlError(api_error(status, parsed.as_ref(), &bytes)))
    }
}

/// One line describing an API error answer.
fn api_error(status: StatusCode, body: Option<&Value>, raw: &[u8]) -> String {
    let message = body
        .and_then(|b| b["error"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = String::from_utf8_lossy(raw);
            let first = text.lines().next().unwrap_or("").trim();
            if first.is_empty() {
                status.canonical_reason().unwrap_or("error").to_lowercase()
            } else {
                first.to_string()
            }
        });
    let mut line = format!("{} {message}", status.as_u16());
    if let Some(field) = body.and_then(|b| b["field"].as_str()) {
        if !message.contains(&format!("`{field}`")) {
            let _ = write!(line, " (field `{field}`)");
        }
    }
    if status == StatusCode::UNAUTHORIZED {
        line.push_str(" (give it with --token or FULCRUM_TOKEN)");
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

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
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

fn number(value: &Value) -> u64 {
    value.as_u64().unwrap_or(0)
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_string(),
        other => other.to_string(),
    }
}

fn backends(pool: &Value) -> &[Value] {
    pool["backends"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn pools_table(pools: &Value) -> String {
    let rows: Vec<Vec<String>> = pools
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|pool| {
            let members: Vec<&Value> = backends(pool)
                .iter()
                .filter(|b| b["removing"] != true)
                .collect();
            let available = members.iter().filter(|b| b["available"] == true).count();
            let in_flight: u64 = backends(pool).iter().map(|b| number(&b["in_flight"])).sum();
            let requests: u64 = backends(pool).iter().map(|b| number(&b["requests"])).sum();
            vec![
                text(&pool["name"]),
                text(&pool["algorithm"]),
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

fn backends_table(pool: &Value) -> String {
    let rows: Vec<Vec<String>> = backends(pool)
        .iter()
        .map(|b| {
            let state = if b["removing"] == true {
                "removing".to_string()
            } else {
                text(&b["state"])
            };
            let mut health = text(&b["health"]);
            if b["ejected"] == true {
                health.push_str(",ejected");
            }
            if b["backed_off"] == true {
                health.push_str(",backed-off");
            }
            if b["agent_state"].as_str().is_some_and(|s| s != "up") {
                let _ = write!(health, ",agent-{}", text(&b["agent_state"]));
            }
            let latency = b["latency_ms"]
                .as_f64()
                .map(|ms| format!("{ms:.1}ms"))
                .unwrap_or_else(|| "-".to_string());
            vec![
                text(&b["address"]),
                state,
                health,
                format!(
                    "{}/{}",
                    number(&b["weight"]),
                    number(&b["effective_weight"])
                ),
                number(&b["in_flight"]).to_string(),
                number(&b["requests"]).to_string(),
                number(&b["failures"]).to_string(),
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

fn events_table(events: &Value) -> String {
    let rows: Vec<Vec<String>> = events
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|e| {
            let at = UNIX_EPOCH + Duration::from_millis(number(&e["at_ms"]));
            vec![
                humantime::format_rfc3339_millis(at).to_string(),
                text(&e["kind"]),
                text(&e["pool"]),
                text(&e["backend"]),
                text(&e["message"]),
            ]
        })
        .collect();
    table(
        &["TIME", "KIND", "POOL", "BACKEND", "MESSAGE"],
        &[false; 5],
        &rows,
    )
}

fn autoscale_table(autoscalers: &Value) -> String {
    let rows: Vec<Vec<String>> = autoscalers
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|a| {
            let managed: Vec<String> = a["managed"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|m| text(&m["address"]))
                .collect();
            vec![
                text(&a["pool"]),
                text(&a["metric"]),
                format!(
                    "{:.2}/{}",
                    a["load_per_backend"].as_f64().unwrap_or(0.0),
                    text(&a["target"])
                ),
                number(&a["backends"]).to_string(),
                number(&a["desired"]).to_string(),
                format!("{}..{}", number(&a["min"]), number(&a["max"])),
                format!("{}/{}", number(&a["scale_ups"]), number(&a["scale_downs"])),
                number(&a["failures"]).to_string(),
                if managed.is_empty() {
                    "-".to_string()
                } else {
                    managed.join(",")
                },
            ]
        })
        .collect();
    if rows.is_empty() {
        return "no pool has autoscaling\n".to_string();
    }
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

fn reload_summary(answer: &Value) -> String {
    let changes = &answer["changes"];
    let mut parts = Vec::new();
    for (key, label) in [
        ("listeners_added", "listeners opened"),
        ("listeners_changed", "listeners re-opened"),
        ("listeners_removed", "listeners closed"),
        ("pools_added", "pools added"),
        ("pools_updated", "pools re-applied"),
        ("pools_removed", "pools removed"),
    ] {
        let names: Vec<String> = changes[key]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .map(text)
            .collect();
        if !names.is_empty() {
            parts.push(format!("{label}: {}", names.join(", ")));
        }
    }
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
        let client = Client::new("http://127.0.0.1:9090", None).unwrap();
        assert_eq!((client.host.as_str(), client.port), ("127.0.0.1", 9090));
        let client = Client::new("[::1]:9", None).unwrap();
        assert_eq!((client.host.as_str(), client.port), ("::1", 9));
        let client = Client::new("http://localhost/admin/", None).unwrap();
        assert_eq!((client.port, client.prefix.as_str()), (80, "/admin"));
        assert!(Client::new("https://x:1", None).is_err());
        assert!(Client::new("http://", None).is_err());
    }

    #[test]
    fn api_errors_are_one_line() {
        let body =
            json!({ "error": "invalid request body: unknown field `wieght`", "field": "wieght" });
        assert_eq!(
            api_error(StatusCode::BAD_REQUEST, Some(&body), b""),
            "400 invalid request body: unknown field `wieght`"
        );
        let body = json!({ "error": "nothing to change", "field": "weight" });
        assert_eq!(
            api_error(StatusCode::BAD_REQUEST, Some(&body), b""),
            "400 nothing to change (field `weight`)"
        );
        assert_eq!(
            api_error(StatusCode::METHOD_NOT_ALLOWED, None, b""),
            "405 method not allowed"
        );
    }
}
