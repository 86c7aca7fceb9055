//! The admin listener: REST API over the pools (JSON in and out), reload, events.
//! Loopback by default; when a token is configured every call needs `Authorization: Bearer`.

mod auth;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::control::api;
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

/// The admin API's routes.
pub fn router(server: Arc<Server>, token: Option<String>) -> Router {
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
        .layer(axum::middleware::from_fn_with_state(
            Arc::new(token.filter(|t| !t.is_empty())),
            auth::require_token,
        ))
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
}

/// Binds the admin listener; serving runs in a background task until `stop` turns true.
pub async fn start(
    listen: SocketAddr,
    token: Option<String>,
    server: Arc<Server>,
    mut stop: watch::Receiver<bool>,
) -> Result<SocketAddr, AdminError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|error| AdminError::Listen {
            address: listen,
            error,
        })?;
    let address = listener.local_addr().map_err(AdminError::LocalAddr)?;
    let app = router(server, token);
    tokio::spawn(async move {
        let served = axum::serve(listener, app).with_graceful_shutdown(async move {
            let _ = stop.changed().await;
        });
        if let Err(error) = served.await {
            tracing::error!(%error, "admin API stopped");
        }
    });
    Ok(address)
}
