//! The gateway: REST and WebSocket access to the stored GPU telemetry.
//!
//! Layout:
//! - `rest`: `/health`, `/api/v1/gpus`, `/api/v1/gpus/{id}/telemetry`, `/api/v1/stats`,
//!   `/schemas/{version}.json`; `ws`: `/api/v1/ws/telemetry`, whose frames and close codes
//!   are in `frames`, fed by the `hub` (one etcd watch per process, fanned out);
//! - `params`: what each query parameter may hold, parsed and declared in one place;
//!   `query`: the telemetry query and its cursors; `negotiate`: the payload version a
//!   client gets; `error`: the one JSON error body;
//! - `store`: bounded reads from etcd; `page`: which records a telemetry page holds and
//!   where the next one starts (pure, beside the store's read loop);
//! - `openapi`: the OpenAPI document (`/openapi.json`, `/docs`); `events`: every log line
//!   and metric, one event type per thing that happens; `dashboard`: the live dashboard at
//!   `/`, embedded in the binary.
//!
//! [`run`] serves on a given listener until the shutdown token is cancelled; the binary reads
//! its config, binds, connects and calls it, and tests call it in process on port 0. The crate
//! exports only that, its configuration and errors, and the API's description ([`ApiDoc`],
//! [`openapi_document`], [`ErrorBody`]).

mod config;
mod dashboard;
mod error;
mod events;
mod fleet;
mod frames;
mod hub;
mod negotiate;
mod openapi;
mod page;
mod params;
mod query;
mod record;
mod rest;
mod store;
mod window;
mod ws;

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{MatchedPath, Request, State},
    http::{Method, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use etcd_client::Client;
use metrics_exporter_prometheus::PrometheusHandle;
use telemetry_shared::{
    Keyspace,
    etcd::{EtcdError, current_revision},
    observe,
};
use tokio::{net::TcpListener, sync::Semaphore};
use tokio_util::sync::CancellationToken;
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
    trace::TraceLayer,
};
use utoipa_swagger_ui::SwaggerUi;

pub use config::{CorsOrigins, GatewayConfig};
pub use error::ErrorBody;
pub use openapi::{ApiDoc, document as openapi_document};

use error::ApiError;

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct AppState {
    /// The configuration.
    pub(crate) config: GatewayConfig,
    /// Reads from etcd.
    pub(crate) store: Arc<store::Store>,
    /// Recent records in memory.
    pub(crate) window: Arc<window::Window>,
    /// The live feed.
    pub(crate) hub: hub::Hub,
    /// One permit per allowed WebSocket subscriber.
    pub(crate) ws_slots: Arc<Semaphore>,
    /// Cancelled at shutdown (WebSocket sessions close with "going away").
    pub(crate) shutdown: CancellationToken,
    /// Renders `/metrics`.
    pub(crate) metrics: Option<PrometheusHandle>,
}

/// Errors that stop the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// etcd could not be read at start-up.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Serve(#[from] std::io::Error),
}

/// The whole HTTP application.
fn router(state: Arc<AppState>) -> Router {
    let rest = Router::new()
        .route("/", get(dashboard::index))
        .route("/gpu", get(dashboard::gpu_page))
        .route("/assets/{file}", get(dashboard::asset))
        .route("/api", get(index))
        .route("/health", get(rest::health))
        .route("/api/v1/gpus", get(rest::list_gpus))
        .route("/api/v1/gpus/latest", get(rest::fleet_latest))
        .route("/metrics/gpus", get(rest::gpu_metrics))
        .route("/api/v1/gpus/{id}/telemetry", get(rest::gpu_telemetry))
        .route("/api/v1/stats", get(rest::stats))
        .route("/schemas/{file}", get(rest::schema_file))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(state.clone(), timeout));
    let cors = match &state.config.cors_origins {
        CorsOrigins::Any => CorsLayer::new().allow_origin(AllowOrigin::any()),
        CorsOrigins::List(list) => {
            CorsLayer::new().allow_origin(AllowOrigin::list(list.iter().filter_map(|o| o.parse().ok())))
        }
        CorsOrigins::None => CorsLayer::new(),
    }
    .allow_methods([Method::GET, Method::OPTIONS])
    .allow_headers([header::ACCEPT, header::CONTENT_TYPE]);
    Router::new()
        .merge(rest)
        .route("/api/v1/ws/telemetry", get(ws::ws_telemetry))
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", openapi::document()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(record_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(cors)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the gateway failed on this request; it has been logged",
            )
            .into_response()
        }))
        .with_state(state)
}

/// Serves the gateway on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let decoder = record::Decoder {
        keys: Keyspace::new(&config.common.etcd_namespace),
        columns: config.columns.clone(),
        profiles: telemetry_shared::profiles::ProfileCache::new(),
    };
    let store = Arc::new(store::Store::new(client.clone(), decoder.clone()));
    let window = Arc::new(window::Window::new(window::Limits {
        points_per_gpu: config.window_points,
        max_bytes: config.window_bytes,
    }));
    // The window is loaded at `revision`, and the live feed (which keeps it current) follows
    // from just after it.
    let revision = current_revision(&client, &decoder.keys.data_prefix()).await?;
    window.reset(revision);
    tokio::spawn(window::maintain(window.clone(), store.clone(), shutdown.clone()));
    let hub = hub::Hub::start(client, decoder, window.clone(), revision, shutdown.clone());
    let state = Arc::new(AppState {
        store,
        window,
        hub,
        ws_slots: Arc::new(Semaphore::new(config.ws_max_connections)),
        shutdown: shutdown.clone(),
        metrics: observe::prometheus("gateway", env!("CARGO_PKG_VERSION"), events::METRICS),
        config,
    });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "gateway listening (docs at /docs, OpenAPI at /openapi.json)");
    }
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    tracing::info!("gateway stopped");
    Ok(())
}

async fn index() -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "service": "telemetry-gateway",
        "links": {
            "health": "/health",
            "gpus": "/api/v1/gpus",
            "telemetry": "/api/v1/gpus/{id}/telemetry",
            "stats": "/api/v1/stats",
            "live": "/api/v1/ws/telemetry",
            "openapi": "/openapi.json",
            "docs": "/docs",
            "schemas": ["/schemas/v1.json", "/schemas/v1beta2.json", "/schemas/v1beta1.json"],
            "metrics": "/metrics",
        }
    }))
}

async fn metrics_text(State(app): State<Arc<AppState>>) -> Response {
    match &app.metrics {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "metrics_unavailable",
            "another metrics recorder is installed in this process",
        )
        .into_response(),
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(format!(
        "no route for {} {}",
        request.method(),
        request.uri().path()
    ))
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", request.method(), request.uri().path()),
    )
}

/// Bounds every REST request by `GATEWAY_REQUEST_TIMEOUT` (503 with a JSON body).
async fn timeout(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let limit = app.config.request_timeout;
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request took longer than {limit:?} (GATEWAY_REQUEST_TIMEOUT)"),
        )
        .into_response(),
    }
}

/// Counts requests and records their latency by route and status.
async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    observe::emit(events::HttpRequestAnswered {
        method,
        route,
        status: response.status().as_u16(),
        elapsed: started.elapsed(),
    });
    response
}
