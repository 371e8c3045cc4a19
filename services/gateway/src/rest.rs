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
use utoipa::{
    IntoParams, ToSchema,
    openapi::{
        ObjectBuilder, Type,
        path::{Parameter, ParameterIn},
        schema::Object,
    },
};

use crate::{
    AppState,
    error::{ApiError, ErrorBody},
    negotiate::{media_type, negotiate},
    params,
    query::{Order, RawTelemetryQuery, TelemetryQuery},
    store::{EtcdHealth, Stats},
};

/// The 503 of a route that reads etcd.
const UNAVAILABLE: &str = "etcd does not answer, or the request took longer than GATEWAY_REQUEST_TIMEOUT";
/// The 503 of a route that does not read etcd.
const TIMEOUT: &str = "The request took longer than GATEWAY_REQUEST_TIMEOUT";

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
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
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
    #[schema(format = DateTime)]
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
#[derive(Debug, Default, Deserialize)]
pub struct GpusParams {
    /// Only GPUs of this host.
    pub hostname: Option<String>,
}

impl IntoParams for GpusParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![params::query(
            "hostname",
            "Only GPUs of this host. Must not be blank.",
            params::text_schema("mtv5-dgx1-hgpu-031"),
        )]
    }
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
        (status = 200, description = "The GPUs", body = GpuList, links(
            ("telemetry" = (
                operation_id = "gpu_telemetry",
                parameters(("id" = "$response.body#/gpus/0/uuid")),
                description = "The telemetry of a listed GPU (any `gpus[i].uuid`)"
            ))
        )),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn list_gpus(
    State(app): State<Arc<AppState>>,
    params: Result<Query<GpusParams>, QueryRejection>,
) -> Result<Json<GpuList>, ApiError> {
    let params = query(params)?;
    let hostname = params::text("hostname", params.hostname)?;
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
    /// Pass as `cursor` (with the same `order`) for the next page; null on the last page.
    pub next_cursor: Option<String>,
    /// The records, each a payload of `schema_version` (see `/schemas/{version}.json`; each
    /// media type of the 200 response names its version's payload schema).
    #[schema(value_type = Vec<Object>)]
    pub items: Vec<serde_json::Value>,
}

fn gpu_id_schema() -> Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .examples(["GPU-5fd4f087-86f3-7a43-b711-4771313afc50"])
        .build()
}

/// The path of `GET /api/v1/gpus/{id}/telemetry`.
#[derive(Debug, Default, Deserialize)]
pub struct TelemetryPath {
    /// The GPU's UUID, or its gpu_id.
    pub id: String,
}

impl IntoParams for TelemetryPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![params::path(
            "id",
            "The GPU's UUID, or its gpu_id together with `?hostname=` (a bare gpu_id is \
             accepted only when one host has it; otherwise 400 `ambiguous_gpu_id`). The `gpus` \
             of `GET /api/v1/gpus` name them (its `telemetry` link).",
            gpu_id_schema(),
        )]
    }
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
    params(TelemetryPath, RawTelemetryQuery),
    responses(
        (status = 200, description = "A page of records, in the negotiated payload version", body = TelemetryPage,
            links(
                ("next" = (
                    operation_id = "gpu_telemetry",
                    parameters(
                        ("id" = "$request.path.id"),
                        ("cursor" = "$response.body#/next_cursor"),
                        ("order" = "$request.query.order"),
                        ("hostname" = "$request.query.hostname"),
                        ("start_time" = "$request.query.start_time"),
                        ("end_time" = "$request.query.end_time"),
                        ("metric" = "$request.query.metric"),
                        ("limit" = "$request.query.limit"),
                        ("schema" = "$request.query.schema")
                    ),
                    description = "The next page, while `next_cursor` is not null (without `offset`)"
                ))
            )
        ),
        (status = 400, description = "Bad parameter, start_time after end_time, a cursor this gateway did not issue or issued for the other order, or an ambiguous gpu_id", body = ErrorBody),
        (status = 404, description = "Unknown GPU, or not on the given host", body = ErrorBody),
        (status = 406, description = "Unknown schema version (`schema` or `Accept`)", body = ErrorBody),
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn gpu_telemetry(
    State(app): State<Arc<AppState>>,
    path: Result<Path<TelemetryPath>, PathRejection>,
    raw: Result<Query<RawTelemetryQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Path(TelemetryPath { id }) = path.map_err(|e| ApiError::invalid("id", e.body_text()))?;
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
        (status = 503, description = UNAVAILABLE, body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn stats(State(app): State<Arc<AppState>>) -> Result<Json<Stats>, ApiError> {
    Ok(Json(app.store.stats().await?))
}

fn schema_file_schema() -> Object {
    let files: Vec<String> = SchemaVersion::ALL
        .iter()
        .map(|v| format!("{}.json", v.as_str()))
        .collect();
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(files))
        .examples(["v1.json"])
        .build()
}

/// The path of `GET /schemas/{file}`.
#[derive(Debug, Default, Deserialize)]
pub struct SchemaPath {
    /// `{version}.json`.
    pub file: String,
}

impl IntoParams for SchemaPath {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![params::path(
            "file",
            "`{version}.json`; another name is a 404.",
            schema_file_schema(),
        )]
    }
}

/// The JSON Schema (draft 2020-12) of a payload version.
#[utoipa::path(
    get,
    path = "/schemas/{file}",
    params(SchemaPath),
    responses(
        (status = 200, description = "The JSON Schema", body = Object, content_type = "application/schema+json"),
        (status = 404, description = "No such version", body = ErrorBody),
        (status = 503, description = TIMEOUT, body = ErrorBody),
    ),
    tag = "schemas"
)]
pub async fn schema_file(path: Result<Path<SchemaPath>, PathRejection>) -> Result<Response, ApiError> {
    let file = path.map(|Path(p)| p.file).unwrap_or_default();
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
