//! The live dashboard: static pages and scripts embedded in the binary (no build step, no CDN),
//! drawing with the vendored uPlot time-series library. The pages use only the public API:
//! `/api/v1/gpus`, `/api/v1/gpus/{id}/telemetry`, `/api/v1/stats` and the WebSocket feed.

use axum::{
    extract::{Path, rejection::PathRejection},
    http::header,
    response::{Html, IntoResponse, Response},
};

use crate::error::ApiError;

/// `GET /`: every GPU grouped by host with its latest values, live, and pipeline health.
pub async fn index() -> Html<&'static str> {
    Html(include_str!("../assets/index.html"))
}

/// `GET /gpu?uuid=`: one GPU's time-series charts, history then live.
pub async fn gpu_page() -> Html<&'static str> {
    Html(include_str!("../assets/gpu.html"))
}

/// The embedded assets: (name, content type, bytes).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("../assets/app.css"),
    ),
    (
        "auth.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/auth.js"),
    ),
    (
        "common.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/common.js"),
    ),
    (
        "dashboard.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/dashboard.js"),
    ),
    (
        "gpu.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/gpu.js"),
    ),
    (
        "uplot.iife.min.js",
        "text/javascript; charset=utf-8",
        include_str!("../assets/uplot.iife.min.js"),
    ),
    (
        "uplot.min.css",
        "text/css; charset=utf-8",
        include_str!("../assets/uplot.min.css"),
    ),
];

/// `GET /assets/{file}` (a name that is not UTF-8 is no asset either: a JSON 404).
pub async fn asset(file: Result<Path<String>, PathRejection>) -> Response {
    let file = file.map(|Path(f)| f).unwrap_or_default();
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => (
            [
                (header::CONTENT_TYPE, *content_type),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            *body,
        )
            .into_response(),
        None => ApiError::not_found(format!("no asset {file:?}")).into_response(),
    }
}
