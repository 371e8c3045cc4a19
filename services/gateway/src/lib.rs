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
//!   `/`, embedded in the binary;
//! - `auth`: API tokens and the per-token limits (401, 429) in front of `/api/v1/`; `tls`:
//!   HTTPS with a certificate renewed without a restart; `reload`: re-reading the
//!   certificate, key and tokens files when they change; `probes`: `/livez` and `/readyz`.
//!
//! [`run`] serves on a given listener until the shutdown token is cancelled; the binary reads
//! its config, binds, connects and calls it, and tests call it in process on port 0. The crate
//! exports only that, its configuration and errors, and the API's description ([`ApiDoc`],
//! [`openapi_document`], [`ErrorBody`]).

mod auth;
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
mod probes;
mod query;
mod record;
mod reload;
mod rest;
mod store;
mod tls;
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
    health::Health,
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

pub use config::{CorsOrigins, GatewayConfig, TlsFiles, TokenLimits};
pub use error::ErrorBody;
pub use openapi::{ApiDoc, document as openapi_document};
pub use reload::FileError;

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
    /// The API tokens and their limits; `None` when the API is open.
    pub(crate) auth: Option<Arc<auth::Auth>>,
    /// What `/livez` and `/readyz` answer.
    pub(crate) health: Health,
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
    /// The certificate, key or tokens file cannot be used.
    #[error(transparent)]
    File(#[from] FileError),
    /// rustls refused the TLS configuration.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// The whole HTTP application.
fn router(state: Arc<AppState>) -> Router {
    // Open to everyone: the dashboard's files (the page asks for a token when the API answers
    // 401), the probes, the API index and the payload schemas.
    let open = Router::new()
        .route("/", get(dashboard::index))
        .route("/gpu", get(dashboard::gpu_page))
        .route("/assets/{file}", get(dashboard::asset))
        .route("/api", get(index))
        .route("/health", get(rest::health))
        .route("/livez", get(probes::livez))
        .route("/readyz", get(probes::readyz))
        .route("/schemas/{file}", get(rest::schema_file));
    // A token when tokens are configured.
    let api = Router::new()
        .route("/api/v1/gpus", get(rest::list_gpus))
        .route("/api/v1/gpus/latest", get(rest::fleet_latest))
        .route("/api/v1/gpus/{id}/telemetry", get(rest::gpu_telemetry))
        .route("/api/v1/stats", get(rest::stats))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    // Open for Prometheus unless GATEWAY_METRICS_REQUIRE_TOKEN.
    let metrics = Router::new()
        .route("/metrics/gpus", get(rest::gpu_metrics))
        .route("/metrics", get(metrics_text))
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics_token));
    let rest = open
        .merge(api)
        .merge(metrics)
        .layer(middleware::from_fn_with_state(state.clone(), timeout));
    let live = Router::new()
        .route("/api/v1/ws/telemetry", get(ws::ws_telemetry))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let cors = match &state.config.cors_origins {
        CorsOrigins::Any => CorsLayer::new().allow_origin(AllowOrigin::any()),
        CorsOrigins::List(list) => {
            CorsLayer::new().allow_origin(AllowOrigin::list(list.iter().filter_map(|o| o.parse().ok())))
        }
        CorsOrigins::None => CorsLayer::new(),
    }
    .allow_methods([Method::GET, Method::OPTIONS])
    .allow_headers([header::ACCEPT, header::CONTENT_TYPE, header::AUTHORIZATION])
    .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE]);
    let document = openapi::document(state.auth.is_some());
    Router::new()
        .merge(rest)
        .merge(live)
        .merge(SwaggerUi::new("/docs").external_url_unchecked("/openapi.json", document))
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

/// The token's identity, set on a request that passed [`require_token`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller(pub(crate) auth::TokenId);

/// With tokens configured: 401 without a valid token, 429 past the token's request rate,
/// before any handler (and so before any etcd request).
async fn require_token(State(app): State<Arc<AppState>>, mut request: Request, next: Next) -> Response {
    let Some(auth) = &app.auth else {
        return next.run(request).await;
    };
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| request.uri().path().to_string(), |p| p.as_str().to_string());
    match auth.authorize(request.headers(), &route) {
        Ok(id) => {
            request.extensions_mut().insert(Caller(id));
            next.run(request).await
        }
        Err(refusal) => refusal.into_response(),
    }
}

/// [`require_token`] for the metrics routes when `GATEWAY_METRICS_REQUIRE_TOKEN` is true.
async fn metrics_token(State(app): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if app.config.metrics_require_token {
        require_token(State(app), request, next).await
    } else {
        next.run(request).await
    }
}

/// Serves the gateway on `listener` until `shutdown` is cancelled.
pub async fn run(
    config: GatewayConfig,
    listener: TcpListener,
    client: Client,
    shutdown: CancellationToken,
) -> Result<(), GatewayError> {
    let health = Health::new("gateway", &shutdown);
    health.set_etcd(&client);
    // The files first: a gateway that cannot read its certificate or tokens does not start.
    let certificate = match &config.tls {
        Some(files) => Some(serve_certificate(files, &config, &shutdown)?),
        None => None,
    };
    let auth = match &config.api_tokens_file {
        Some(path) => Some(guard_api(path, &config, &shutdown)?),
        None => None,
    };
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
    if window.enabled() {
        tokio::spawn(health.watch(
            "window",
            window::maintain(window.clone(), store.clone(), shutdown.clone()),
        ));
    }
    let hub = hub::Hub::start(
        client,
        decoder,
        window.clone(),
        revision,
        &health,
        shutdown.clone(),
    );
    let state = Arc::new(AppState {
        store,
        window,
        hub,
        ws_slots: Arc::new(Semaphore::new(config.ws_max_connections)),
        shutdown: shutdown.clone(),
        metrics: observe::prometheus("gateway", env!("CARGO_PKG_VERSION"), events::METRICS),
        auth,
        health,
        config,
    });
    let scheme = if certificate.is_some() { "https" } else { "http" };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(
            %addr,
            scheme,
            tokens = state.auth.is_some(),
            "gateway listening (docs at /docs, OpenAPI at /openapi.json)"
        );
    }
    let app = router(state);
    match certificate {
        Some(certificate) => {
            let listener = tls::TlsListener::new(listener, certificate.server_config()?, shutdown.clone())?;
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await?;
        }
        None => {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await?;
        }
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// Loads the certificate and key, and follows their changes.
fn serve_certificate(
    files: &TlsFiles,
    config: &GatewayConfig,
    shutdown: &CancellationToken,
) -> Result<Arc<tls::Certificate>, FileError> {
    let cert = reload::Source {
        var: "GATEWAY_TLS_CERT_FILE",
        path: files.cert.clone(),
    };
    let key = reload::Source {
        var: "GATEWAY_TLS_KEY_FILE",
        path: files.key.clone(),
    };
    let watched = reload::Watched {
        what: "tls",
        sources: vec![cert.clone(), key.clone()],
    };
    let first = watched.read()?;
    let certificate = Arc::new(tls::Certificate::load(&cert, &key)?);
    let current = certificate.clone();
    let apply = move |contents: &[Vec<u8>]| -> Result<String, FileError> {
        let certified = tls::parse(&cert, &contents[0], &key, &contents[1])?;
        current.replace(certified);
        Ok("a new certificate is served from the next connection on".to_string())
    };
    tokio::spawn(reload::follow(
        watched,
        first,
        config.reload_interval,
        shutdown.clone(),
        apply,
    ));
    Ok(certificate)
}

/// Loads the tokens, and follows the file's changes.
fn guard_api(
    path: &std::path::Path,
    config: &GatewayConfig,
    shutdown: &CancellationToken,
) -> Result<Arc<auth::Auth>, FileError> {
    let source = reload::Source {
        var: "GATEWAY_API_TOKENS_FILE",
        path: path.to_path_buf(),
    };
    let first = source.read()?;
    let tokens = auth::Tokens::parse(&first).map_err(|reason| source.error(reason))?;
    if tokens.is_empty() {
        tracing::warn!(path = %path.display(), "GATEWAY_API_TOKENS_FILE lists no token: every API request gets a 401");
    }
    let auth = Arc::new(auth::Auth::new(tokens, config.token_limits));
    let current = auth.clone();
    let apply = move |contents: &[Vec<u8>]| -> Result<String, FileError> {
        let tokens = auth::Tokens::parse(&contents[0]).map_err(|reason| source.error(reason))?;
        Ok(format!("{} token(s) accepted", current.replace(tokens)))
    };
    tokio::spawn(reload::follow(
        reload::Watched {
            what: "tokens",
            sources: vec![reload::Source {
                var: "GATEWAY_API_TOKENS_FILE",
                path: path.to_path_buf(),
            }],
        },
        vec![first],
        config.reload_interval,
        shutdown.clone(),
        apply,
    ));
    Ok(auth)
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
