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
use telemetry_shared::{SchemaVersion, model::GpuInfo, observe::emit};
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
    events::PageServed,
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

/// The in-memory read window as `/health` reports it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WindowStatus {
    /// The etcd revision the window reflects; null while it loads (reads go to etcd then).
    pub revision: Option<i64>,
    /// Records held.
    pub records: usize,
    /// Bytes held (records' JSON size).
    pub bytes: usize,
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
    /// The in-memory read window.
    pub window: WindowStatus,
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
        window: {
            let (records, bytes) = app.window.size();
            WindowStatus {
                revision: app.window.revision(),
                records,
                bytes,
            }
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
    pub items: Vec<Box<serde_json::value::RawValue>>,
}

/// A [`TelemetryPage`] without its items, serialized in the same field order.
#[derive(Serialize)]
struct PageEnvelope<'a> {
    schema_version: &'a str,
    gpu: GpuView,
    order: Order,
    count: usize,
    revision: i64,
    next_cursor: Option<String>,
}

/// The JSON of a [`TelemetryPage`]: the envelope, then `"items"` spliced from the records'
/// payloads, which each record renders once and keeps (re-parsing them into values or raw
/// values for every answer cost more than the rest of the request).
fn page_body<'a>(
    envelope: &PageEnvelope<'_>,
    payloads: impl ExactSizeIterator<Item = &'a str>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut body = serde_json::to_vec(envelope)?;
    // The envelope is an object: drop its closing brace and append the items.
    body.pop();
    body.reserve(payloads.len() * 768 + 16);
    body.extend_from_slice(b",\"items\":[");
    for (i, payload) in payloads.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(payload.as_bytes());
    }
    body.extend_from_slice(b"]}");
    Ok(body)
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
                )),
                ("same_view" = (
                    operation_id = "gpu_telemetry",
                    parameters(
                        ("id" = "$request.path.id"),
                        ("revision" = "$response.body#/revision"),
                        ("order" = "$request.query.order"),
                        ("hostname" = "$request.query.hostname"),
                        ("limit" = "$request.query.limit")
                    ),
                    description = "The same GPU read from etcd as of this page's revision (with `cursor`, the next page of one consistent view)"
                ))
            )
        ),
        (status = 400, description = "Bad parameter, start_time after end_time, a cursor this gateway did not issue or issued for the other order, an ambiguous gpu_id, or a `revision` etcd has not reached", body = ErrorBody),
        (status = 404, description = "Unknown GPU, or not on the given host", body = ErrorBody),
        (status = 406, description = "Unknown schema version (`schema` or `Accept`)", body = ErrorBody),
        (status = 410, description = "`revision` is older than etcd's compacted history", body = ErrorBody),
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
    let (page, revision, source) = read_page(&app, &gpu, &q, no_cache(&headers)).await?;
    let envelope = PageEnvelope {
        schema_version: version.as_str(),
        gpu: GpuView::from(&gpu),
        order: q.order,
        count: page.records.len(),
        revision,
        next_cursor: page.next_cursor.map(|c| c.encode()),
    };
    let payloads = page.records.iter().map(|r| r.payload(version));
    let body = page_body(&envelope, payloads)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?;
    let json = [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))];
    let mut response = versioned(version, (json, body).into_response());
    response
        .headers_mut()
        .insert(SOURCE_HEADER, HeaderValue::from_static(source));
    Ok(response)
}

/// Response header saying where a page was read: `memory` (the window) or `etcd`.
pub(crate) const SOURCE_HEADER: &str = "x-telemetry-source";

/// Did the client ask not to be served from a cache (`Cache-Control: no-cache`)?
fn no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-cache"))
}

/// A telemetry page from the window when it can answer exactly (and the client did not ask for
/// a past revision or for no cache), otherwise from etcd; with its revision and its source.
async fn read_page(
    app: &AppState,
    gpu: &GpuInfo,
    query: &TelemetryQuery,
    no_cache: bool,
) -> Result<(crate::page::Page, i64, &'static str), ApiError> {
    if query.at.is_none() && !no_cache {
        let prefix = app.store.keys().gpu_data_prefix(&gpu.hostname, &gpu.gpu_id);
        if let Some((page, revision)) = app.window.page(gpu, &prefix, query) {
            emit(PageServed { source: "memory" });
            return Ok((page, revision, "memory"));
        }
    }
    let (page, revision) = app
        .store
        .telemetry_page(gpu, query, query.at)
        .await
        .map_err(|err| crate::error::revision_refused(&err).unwrap_or_else(|| ApiError::from(err)))?;
    emit(PageServed { source: "etcd" });
    Ok((page, revision, "etcd"))
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

/// Filters of `GET /api/v1/gpus/latest`.
#[derive(Debug, Default, Deserialize)]
pub struct LatestParams {
    /// Only GPUs of this host.
    pub hostname: Option<String>,
    /// Only this metric.
    pub metric: Option<String>,
}

impl IntoParams for LatestParams {
    fn into_params(_: impl Fn() -> Option<ParameterIn>) -> Vec<Parameter> {
        vec![
            params::query(
                "hostname",
                "Only GPUs of this host. Must not be blank.",
                params::text_schema("mtv5-dgx1-hgpu-031"),
            ),
            params::query(
                "metric",
                "Only this metric (numbers and booleans compare as text). Must not be blank.",
                params::text_schema("DCGM_FI_DEV_GPU_UTIL"),
            ),
        ]
    }
}

/// The latest value of each metric of every GPU, in one request (what the dashboard's overview
/// shows). Answered from the gateway's in-memory window; each GPU lists the metrics it has a
/// record of in the window.
#[utoipa::path(
    get,
    path = "/api/v1/gpus/latest",
    params(LatestParams),
    responses(
        (status = 200, description = "Every GPU with its latest values", body = crate::fleet::FleetLatest),
        (status = 400, description = "Bad parameter", body = ErrorBody),
        (status = 503, description = "The in-memory window is still loading (retry after the Retry-After seconds), or etcd does not answer", body = ErrorBody),
    ),
    tag = "telemetry"
)]
pub async fn fleet_latest(
    State(app): State<Arc<AppState>>,
    params: Result<Query<LatestParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let params = query(params)?;
    let hostname = params::text("hostname", params.hostname)?;
    let metric = params::text("metric", params.metric)?;
    let Some((latest, revision)) = app.window.latest() else {
        return Ok(warming_up());
    };
    let gpus = app.store.gpus_cached().await?;
    let body = crate::fleet::latest(
        &gpus,
        &latest,
        revision,
        hostname.as_deref(),
        metric.as_deref(),
        &app.config.columns.value,
    );
    Ok(Json(body).into_response())
}

/// The latest samples of every GPU as Prometheus text (format 0.0.4), named and labelled like
/// dcgm-exporter's, for Prometheus to scrape (`/metrics/gpus`).
pub async fn gpu_metrics(State(app): State<Arc<AppState>>) -> Response {
    let Some((latest, _)) = app.window.latest() else {
        return warming_up();
    };
    let text = crate::fleet::exposition(
        &latest,
        &app.config.columns,
        telemetry_shared::Timestamp::now(),
        app.config.gpu_metrics_max_age,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The answer while the window loads: 503 with a JSON body and `Retry-After`.
fn warming_up() -> Response {
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "warming_up",
        "the gateway is still loading recent telemetry into memory; retry in a second",
    )
    .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spliced body is byte for byte what serializing a [`TelemetryPage`] gives.
    #[test]
    fn a_spliced_page_is_the_serialized_page() {
        let gpu = GpuView {
            uuid: "GPU-1".into(),
            hostname: "h".into(),
            gpu_id: "0".into(),
            device: Some("nvidia0".into()),
            model: None,
            last_seen: "2026-12-01T00:00:00Z".into(),
        };
        let payloads = [r#"{"a":1}"#, r#"{"b":"x,\"y\""}"#];
        for (items, next_cursor) in [(&payloads[..], Some("c".to_string())), (&payloads[..0], None)] {
            let envelope = PageEnvelope {
                schema_version: "v1",
                gpu: gpu.clone(),
                order: Order::Desc,
                count: items.len(),
                revision: 7,
                next_cursor: next_cursor.clone(),
            };
            let page = TelemetryPage {
                schema_version: "v1".into(),
                gpu: gpu.clone(),
                order: Order::Desc,
                count: items.len(),
                revision: 7,
                next_cursor,
                items: items
                    .iter()
                    .map(|p| serde_json::value::RawValue::from_string(p.to_string()).expect("JSON"))
                    .collect(),
            };
            let spliced = page_body(&envelope, items.iter().copied()).expect("body");
            assert_eq!(
                String::from_utf8(spliced).expect("UTF-8"),
                serde_json::to_string(&page).expect("page")
            );
        }
    }
}
