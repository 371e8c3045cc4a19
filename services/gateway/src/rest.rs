//! The REST endpoints. Each handler validates its input into a 4xx [`ApiError`] first, then
//! reads through [`crate::store::Store`].

use std::{str::FromStr, sync::Arc};

use axum::{
    Json,
    extract::{
        Path, Query, State,
        rejection::{PathRejection, QueryRejection},
    },
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use telemetry_shared::{SchemaVersion, model::GpuInfo};
use utoipa::{IntoParams, ToSchema};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    negotiate::{media_type, negotiate},
    query::{Order, RawTelemetryQuery, TelemetryQuery, nonblank},
    store::{EtcdHealth, Stats},
};

fn query<T>(q: Result<Query<T>, QueryRejection>) -> Result<T, ApiError> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::invalid("query", e.body_text()))
}

/// The live feed as `/health` reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveStatus {
    /// The last revision the live feed broadcast.
    pub revision: i64,
    /// Connected WebSocket subscribers.
    pub subscribers: usize,
}

/// `/health` when etcd answers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// Always `ok`.
    pub status: String,
    /// The etcd member that answered.
    pub etcd: EtcdHealth,
    /// The live feed.
    pub live: LiveStatus,
}

/// Is the gateway able to serve? 200 with the etcd member and revision, or 503 with why.
#[utoipa::path(
    get,
    path = "/health",
    responses(
        (status = 200, description = "etcd answers", body = Health),
        (status = 503, description = "etcd does not answer", body = ErrorBody),
    ),
    tag = "health"
)]
pub async fn health(State(app): State<Arc<AppState>>) -> Result<Json<Health>, ApiError> {
    let etcd = app
        .store
        .health()
        .await
        .map_err(|reason| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "etcd_unavailable", reason))?;
    Ok(Json(Health {
        status: "ok".into(),
        etcd,
        live: LiveStatus {
            revision: app.hub.delivered(),
            subscribers: app.hub.subscribers(),
        },
    }))
}

/// A GPU as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct GpuView {
    /// GPU UUID (the global identity).
    pub uuid: String,
    /// Host the GPU is in.
    pub hostname: String,
    /// GPU index within its host (unique only per host).
    pub gpu_id: String,
    /// Device name, e.g. `nvidia0`.
    pub device: Option<String>,
    /// Model name.
    pub model: Option<String>,
    /// Processing time of its newest record (RFC 3339; may lag by about a second).
    pub last_seen: String,
}

impl From<&GpuInfo> for GpuView {
    fn from(g: &GpuInfo) -> Self {
        GpuView {
            uuid: g.uuid.clone(),
            hostname: g.hostname.clone(),
            gpu_id: g.gpu_id.clone(),
            device: g.device.clone(),
            model: g.model.clone(),
            last_seen: g.last_seen.to_string(),
        }
    }
}

/// Filters of `GET /api/v1/gpus`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct GpusParams {
    /// Only GPUs of this host.
    pub hostname: Option<String>,
}

/// The GPU list.
#[derive(Debug, Serialize, ToSchema)]
pub struct GpuList {
    /// Number of GPUs listed.
    pub count: usize,
    /// The GPUs, by host then gpu_id.
    pub gpus: Vec<GpuView>,
}

/// Every GPU in the index, optionally of one host.
#[utoipa::path(
    get,
    path = "/api/v1/gpus",
    params(GpusParams),
    responses(
        (status = 200, description = "The GPUs", body = GpuList),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "etcd does not answer", body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn list_gpus(
    State(app): State<Arc<AppState>>,
    params: Result<Query<GpusParams>, QueryRejection>,
) -> Result<Json<GpuList>, ApiError> {
    let params = query(params)?;
    let hostname = nonblank("hostname", params.hostname)?;
    let gpus = app.store.gpus().await?;
    let gpus: Vec<GpuView> = gpus
        .iter()
        .filter(|g| hostname.as_deref().is_none_or(|h| g.hostname == h))
        .map(GpuView::from)
        .collect();
    Ok(Json(GpuList {
        count: gpus.len(),
        gpus,
    }))
}

/// A page of one GPU's telemetry.
#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryPage {
    /// The schema version of every item.
    pub schema_version: String,
    /// The GPU.
    pub gpu: GpuView,
    /// The page order.
    pub order: Order,
    /// Items in this page.
    pub count: usize,
    /// The etcd revision the page was read at.
    pub revision: i64,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
    /// The records, each a payload of `schema_version` (see `/schemas/{version}.json`).
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
}

/// One GPU's telemetry, newest first by default.
///
/// `{id}` is the GPU's UUID, or its gpu_id together with `?hostname=` (a bare gpu_id is
/// accepted only when one host has it). Times bound the record's processing time, inclusive.
/// Pages: `limit` records; `next_cursor` continues in O(limit) however deep; `offset` skips
/// records (O(offset)). The payload version is negotiated with `?schema=` or `Accept`.
#[utoipa::path(
    get,
    path = "/api/v1/gpus/{id}/telemetry",
    params(
        ("id" = String, Path, description = "GPU UUID, or gpu_id with ?hostname="),
        RawTelemetryQuery,
    ),
    responses(
        (status = 200, description = "A page of records", body = TelemetryPage),
        (status = 400, description = "Bad parameter or ambiguous gpu_id", body = ErrorBody),
        (status = 404, description = "Unknown GPU", body = ErrorBody),
        (status = 406, description = "Unknown schema version", body = ErrorBody),
        (status = 503, description = "etcd does not answer", body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn gpu_telemetry(
    State(app): State<Arc<AppState>>,
    id: Result<Path<String>, PathRejection>,
    raw: Result<Query<RawTelemetryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(id) = id.map_err(|e| ApiError::invalid("id", e.body_text()))?;
    let raw = query(raw)?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let version = negotiate(raw.schema.as_deref(), accept)?;
    let q = TelemetryQuery::parse(&raw)?;
    let gpu = app.store.resolve_gpu(&id, q.hostname.as_deref()).await?;
    let (page, revision) = app
        .store
        .telemetry_page(&gpu, &q, &app.config.columns.metric)
        .await?;
    let items: Vec<serde_json::Value> = page.records.iter().map(|m| m.to_version(version)).collect();
    let body = TelemetryPage {
        schema_version: version.as_str().to_string(),
        gpu: GpuView::from(&gpu),
        order: q.order,
        count: items.len(),
        revision,
        next_cursor: page.next_cursor.map(|c| c.encode()),
        items,
    };
    Ok(versioned(version, Json(body).into_response()))
}

/// Labels a payload response with its media type, and says it varies with `Accept`.
fn versioned(version: SchemaVersion, mut response: Response) -> Response {
    if let Ok(value) = HeaderValue::from_str(&media_type(version)) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
        .headers_mut()
        .insert(header::VARY, HeaderValue::from_static("Accept"));
    response
}

/// Pipeline totals, from the collectors' counters and index counts (no scan of the data).
#[utoipa::path(
    get,
    path = "/api/v1/stats",
    responses(
        (status = 200, description = "Totals", body = Stats),
        (status = 503, description = "etcd does not answer", body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn stats(State(app): State<Arc<AppState>>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(app.store.stats().await?))
}

/// The JSON Schema of a payload version (`v1.json`, `v1beta2.json`, `v1beta1.json`).
#[utoipa::path(
    get,
    path = "/schemas/{file}",
    params(("file" = String, Path, description = "`{version}.json`, e.g. `v1.json`")),
    responses(
        (status = 200, description = "The JSON Schema", content_type = "application/schema+json"),
        (status = 404, description = "No such version", body = ErrorBody),
    ),
    tag = "schemas"
)]
pub async fn schema_file(Path(file): Path<String>) -> Result<Response, ApiError> {
    let version = file
        .strip_suffix(".json")
        .and_then(|v| SchemaVersion::from_str(v).ok())
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no schema {file:?}; available: v1.json, v1beta2.json, v1beta1.json"
            ))
        })?;
    Ok((
        [(header::CONTENT_TYPE, "application/schema+json")],
        version.json_schema(),
    )
        .into_response())
}
