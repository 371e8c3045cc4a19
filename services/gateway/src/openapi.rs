//! The OpenAPI document.

use utoipa::OpenApi;

use crate::{error, query, rest, store, ws};

/// The OpenAPI 3 description, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "GPU telemetry gateway",
        description = "Read GPU telemetry stored in etcd by the collectors: REST pages and a live \
                       WebSocket feed, with schema-versioned payloads (v1, v1beta2, v1beta1)."
    ),
    paths(
        rest::health,
        rest::list_gpus,
        rest::gpu_telemetry,
        rest::stats,
        rest::schema_file,
        ws::ws_telemetry
    ),
    components(schemas(
        error::ErrorBody,
        rest::Health,
        rest::LiveStatus,
        store::EtcdHealth,
        rest::GpuView,
        rest::GpuList,
        rest::TelemetryPage,
        store::Stats,
        query::Order
    )),
    tags(
        (name = "telemetry", description = "Stored telemetry"),
        (name = "live", description = "Live telemetry over WebSocket"),
        (name = "health", description = "Liveness and readiness"),
        (name = "schemas", description = "JSON Schemas of the payload versions")
    )
)]
pub struct ApiDoc;
