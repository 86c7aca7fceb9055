//! The admin listener: REST API over the pools (JSON in and out), reload, events.
//! Loopback by default and safe by default: every call passes the checks of `auth.rs` (its
//! `Host` names the admin, it is not cross-site, a write's body is JSON, the bearer token when
//! there is one: configured, read from `token_file` and re-read when it changes, or generated
//! at start off loopback); the listener bounds its connections, their header read time and
//! idle time, and speaks TLS with `[admin] tls` (the listeners' `listener/tls.rs`).

mod auth;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::control::api;
use crate::listener::tls::{CertStore, ListenerTlsError, TlsListener, WATCH_INTERVAL};
use crate::pool::{PoolError, PoolHandle};
use crate::server::Server;

/// Most events one `GET /api/events` returns.
const MAX_EVENTS: usize = 1000;

/// An API error: status and a JSON body `{"error": ..., "field": ...}` ([`api::ErrorBody`]).
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            field: None,
        }
    }

    fn field(field: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = api::ErrorBody {
            error: self.message,
            field: self.field,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<PoolError> for ApiError {
    fn from(error: PoolError) -> Self {
        let status = match error {
            PoolError::NotFound(_) => StatusCode::NOT_FOUND,
            PoolError::AlreadyExists(_) => StatusCode::CONFLICT,
            PoolError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, error.to_string())
    }
}

/// Parses a JSON body, naming the offending field on error.
fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let path = error.path().to_string();
        let message = error.inner().to_string();
        // serde names unknown fields in the message, not the path.
        let field = if path == "." {
            message
                .split('`')
                .nth(1)
                .map(str::to_string)
                .unwrap_or_else(|| "body".to_string())
        } else {
            path
        };
        ApiError::field(&field, format!("invalid request body: {message}"))
    })
}

/// A parsed query string, or a 400 naming `field` (the only parameter of the endpoint).
fn parse_query<T>(query: Result<Query<T>, QueryRejection>, field: &str) -> Result<T, ApiError> {
    query
        .map(|Query(query)| query)
        .map_err(|rejection| ApiError::field(field, rejection.body_text()))
}

fn parse_address(text: &str) -> Result<SocketAddr, ApiError> {
    text.parse().map_err(|_| {
        ApiError::field(
            "address",
            format!("invalid address \"{text}\": expected IP:PORT"),
        )
    })
}

fn pool(server: &Server, name: &str) -> Result<PoolHandle, ApiError> {
    server
        .pools()
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no pool named `{name}`")))
}

type ApiResult = Result<Response, ApiError>;

async fn list_pools(State(server): State<Arc<Server>>) -> ApiResult {
    let pools: Vec<api::PoolStatus> = server
        .pools()
        .values()
        .map(|h| h.pool.status().into())
        .collect();
    Ok(Json(pools).into_response())
}

async fn show_pool(State(server): State<Arc<Server>>, Path(name): Path<String>) -> ApiResult {
    let status: api::PoolStatus = pool(&server, &name)?.pool.status().into();
    Ok(Json(status).into_response())
}

async fn add_backend(
    State(server): State<Arc<Server>>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let handle = pool(&server, &name)?;
    let request: api::AddBackend = parse_body(&body)?;
    let address = parse_address(&request.address)?;
    handle.add(address, request.weight).await?;
    let answer = api::BackendAdded {
        added: address.to_string(),
        weight: request.weight,
    };
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

async fn update_backend(
    State(server): State<Arc<Server>>,
    Path((name, address)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult {
    let handle = pool(&server, &name)?;
    let address = parse_address(&address)?;
    let request: api::UpdateBackend = parse_body(&body)?;
    if request.weight.is_none() && request.state.is_none() {
        return Err(ApiError::field(
            "weight",
            "nothing to change: give `weight` and/or `state`",
        ));
    }
    handle
        .update(address, request.weight, request.state)
        .await?;
    let answer = api::BackendUpdated {
        updated: address.to_string(),
    };
    Ok(Json(answer).into_response())
}

async fn remove_backend(
    State(server): State<Arc<Server>>,
    Path((name, address)): Path<(String, String)>,
    query: Result<Query<api::RemoveQuery>, QueryRejection>,
) -> ApiResult {
    let handle = pool(&server, &name)?;
    let query = parse_query(query, "now")?;
    let address = parse_address(&address)?;
    handle.remove(address, query.now).await?;
    let status = if query.now {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    let answer = api::BackendRemoved {
        removed: address.to_string(),
        drained: !query.now,
    };
    Ok((status, Json(answer)).into_response())
}

async fn reload(State(server): State<Arc<Server>>) -> ApiResult {
    match server.reload().await {
        Ok(report) => Ok(Json(api::Reloaded {
            reloaded: true,
            changes: report.into(),
        })
        .into_response()),
        Err(error) => Err(ApiError::new(StatusCode::BAD_REQUEST, format!("{error:#}"))),
    }
}

async fn events(
    State(server): State<Arc<Server>>,
    query: Result<Query<api::EventsQuery>, QueryRejection>,
) -> ApiResult {
    let query = parse_query(query, "limit")?;
    let limit = query.limit.unwrap_or(100).min(MAX_EVENTS);
    let events: Vec<api::Event> = server
        .events()
        .recent(limit)
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(events).into_response())
}

async fn metrics(State(server): State<Arc<Server>>) -> Response {
    let text = crate::control::metrics::render(&crate::control::metrics::registry(&server));
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn autoscale(State(server): State<Arc<Server>>) -> ApiResult {
    let autoscalers: Vec<api::AutoscaleStatus> = server
        .autoscale_status()
        .await
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(Json(autoscalers).into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

/// The admin API's routes, behind the checks of every call (`auth.rs`: `Host`, cross-site,
/// JSON writes, token). `generated_token` is the token made at start for a public address
/// without one; the configured token (re-read on every call) takes its place.
pub fn router(server: Arc<Server>, generated_token: Option<String>) -> Router {
    let guard = Arc::new(auth::Guard {
        server: server.clone(),
        generated_token,
    });
    Router::new()
        .route("/api/pools", get(list_pools))
        .route("/api/pools/{pool}", get(show_pool))
        .route("/api/pools/{pool}/backends", post(add_backend))
        .route(
            "/api/pools/{pool}/backends/{address}",
            patch(update_backend).delete(remove_backend),
        )
        .route("/api/reload", post(reload))
        .route("/api/events", get(events))
        .route("/api/autoscale", get(autoscale))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(guard, auth::guard))
        .with_state(server)
}

/// Why the admin API could not start.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// Its address cannot be bound.
    #[error("cannot listen on {address} for the admin API: {error}")]
    Listen {
        /// The admin listen address.
        address: SocketAddr,
        /// Why binding failed.
        error: std::io::Error,
    },
    /// The address of the bound socket cannot be read.
    #[error("cannot read the admin API's listening address: {0}")]
    LocalAddr(std::io::Error),
    /// No token could be generated for a public admin address.
    #[error("cannot generate a token for the admin API: {0}")]
    Token(std::io::Error),
    /// Its TLS certificate cannot be loaded or used.
    #[error("admin API TLS: {0}")]
    Tls(#[from] ListenerTlsError),
}

/// The admin listener's limits (`[admin]`, read at start).
#[derive(Debug, Clone, Copy)]
struct Limits {
    max_connections: usize,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

/// Binds the admin listener; serving runs in a background task until `stop` turns true.
///
/// Listening off loopback without a token, it generates one and prints it once on stderr.
/// With `[admin] tls`, it speaks HTTPS (HTTP/1.1 by ALPN) and reloads the certificate when
/// its files change. With `token_file`, the file is watched: a new token applies within a
/// second.
pub async fn start(
    server: Arc<Server>,
    stop: watch::Receiver<bool>,
) -> Result<SocketAddr, AdminError> {
    let admin = server.admin_config();
    let listen = admin.listen.get_ref().0;
    let tls = match &admin.tls {
        Some(tls) => {
            let config = tls.get_ref().listener_config(admin.header_read_timeout.0);
            let store = CertStore::load(&config)?;
            let alpn = vec![b"http/1.1".to_vec()];
            let tls = TlsListener::with_alpn(
                "admin",
                &config,
                store,
                Some(server.events().clone()),
                alpn,
            )?;
            tokio::spawn(tls.clone().watch_files(stop.clone()));
            Some(tls)
        }
        None => None,
    };
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| AdminError::Listen {
            address: listen,
            error,
        })?;
    let address = listener.local_addr().map_err(AdminError::LocalAddr)?;
    let generated_token = if admin.needs_generated_token() {
        let token = auth::generate_token().map_err(AdminError::Token)?;
        eprintln!("admin token (generated, not saved): {token}");
        tracing::warn!(%address, "admin API listens off loopback without [admin] token or token_file: generated a token for this run, printed once on stderr (\"admin token (generated, not saved): ...\")");
        Some(token)
    } else {
        None
    };
    tokio::spawn(watch_token_file(server.clone(), stop.clone()));
    let limits = Limits {
        max_connections: admin.max_connections.max(1),
        header_read_timeout: admin.header_read_timeout.0,
        idle_timeout: admin.idle_timeout.0,
    };
    let app = router(server, generated_token);
    tokio::spawn(serve(listener, app, tls, limits, stop));
    Ok(address)
}

/// Re-reads `[admin] token_file` (when the configuration in force has one) when it changes
/// (its modification time or length, checked every [`WATCH_INTERVAL`]) until `stop` turns
/// true: the new token is in force from then on. A file that cannot be read or is empty keeps the old token (logged, recorded as an
/// event). A reload re-reads the file itself; requests never touch the file system.
async fn watch_token_file(server: Arc<Server>, mut stop: watch::Receiver<bool>) {
    let mut interval = tokio::time::interval(WATCH_INTERVAL);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = interval.tick() => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        let current = server.admin_config();
        if current.token_file.is_none() {
            continue; // None now; a reload may set one.
        }
        let seen = current.clone();
        // File system calls block: keep them off the async workers.
        let Ok(Some(outcome)) = tokio::task::spawn_blocking(move || seen.reread_token_file()).await
        else {
            continue;
        };
        let (new, error) = match outcome {
            Ok(new) => (new, None),
            Err((new, error)) => (new, Some(error)),
        };
        if !server.replace_admin_config(&current, new) {
            continue; // A reload came first and read the file itself.
        }
        match error {
            None => {
                tracing::info!("admin token file changed: the new token is in force");
                server.events().record(
                    "admin_token_reload",
                    None,
                    None,
                    "admin token file changed; the new token is in force".to_string(),
                );
            }
            Some(error) => {
                tracing::error!(%error, "admin token file changed but cannot be used; the previous token stays in force");
                server.events().record(
                    "admin_token_reload_failed",
                    None,
                    None,
                    format!("{error}; the previous admin token stays in force"),
                );
            }
        }
    }
}

/// Accepts admin connections until `stop` turns true: at most `max_connections` at once (more
/// are closed at accept), each served (after its TLS handshake, with `tls`) with hyper's
/// header read timeout and closed when idle.
async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<Arc<TlsListener>>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_BUF)
        .keep_alive(true);
    let builder = Arc::new(builder);
    loop {
        let (stream, client) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "admin API: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%client, max_connections = limits.max_connections, "admin API: connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let Ok(local) = stream.local_addr() else {
            continue;
        };
        let connection = Connection {
            local,
            builder: builder.clone(),
            app: app.clone(),
            idle_timeout: limits.idle_timeout,
            stop: stop.clone(),
            _slot: slot,
        };
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => connection.serve(stream).await,
                Some(tls) => {
                    if let Some(stream) = tls.handshake(stream, client).await {
                        connection.serve(stream).await;
                    }
                }
            }
        });
    }
}

/// One accepted admin connection and what serving it needs.
#[derive(Debug)]
struct Connection {
    local: SocketAddr,
    builder: Arc<http1::Builder>,
    app: Router,
    idle_timeout: Duration,
    stop: watch::Receiver<bool>,
    _slot: OwnedSemaphorePermit,
}

/// Largest request head the admin reads.
const MAX_BUF: usize = 64 * 1024;

impl Connection {
    /// Serves the connection: closed after `idle_timeout` without a byte read or written; at
    /// shutdown, its request in flight finishes first (for a few seconds at most).
    async fn serve<S>(self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let Connection {
            local,
            builder,
            app,
            idle_timeout,
            mut stop,
            _slot,
        } = self;
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            stream,
            activity: activity.clone(),
        };
        let service = TowerToHyperService::new(app);
        let service = hyper::service::service_fn(move |mut request: hyper::Request<Incoming>| {
            request.extensions_mut().insert(auth::LocalAddr(local));
            hyper::service::Service::call(&service, request)
        });
        let connection = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(connection);
        loop {
            let deadline = activity.last() + idle_timeout;
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    if activity.last() + idle_timeout <= Instant::now() {
                        tracing::debug!(?idle_timeout, "admin API: idle connection closed");
                        return;
                    }
                }
                _ = stop.changed() => break,
            }
        }
        connection.as_mut().graceful_shutdown();
        let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
    }
}

/// When a connection last read or wrote a byte.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream (TCP, or TLS over TCP) that notes each read or write in its [`Activity`].
#[derive(Debug)]
struct Tracked<S> {
    stream: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.stream).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write(cx, buf);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        if matches!(result, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        result
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}
