//! `/livez` and `/readyz`: open to everyone (no token), for Kubernetes probes and load
//! balancers. See [`telemetry_shared::health`] for what each means; the gateway's own work is
//! its live feed (the one etcd watch behind every WebSocket and the read window) and its read
//! window, which must be loaded for reads to be served from memory.

use std::{collections::BTreeMap, sync::Arc};

use axum::{
    Json,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Serialize;
use telemetry_shared::health::Report;
use utoipa::ToSchema;

use crate::AppState;

/// Whether a probe passes.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ProbeStatus {
    /// Every check holds (200).
    Ok,
    /// At least one does not (503).
    Failing,
}

/// One check of a probe.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeCheck {
    /// Whether it holds.
    pub ok: bool,
    /// How it holds, or why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The answer of `/livez` and `/readyz` (200 or 503 alike).
#[derive(Debug, Serialize, ToSchema)]
pub struct ProbeReport {
    /// `ok` (200) or `failing` (503).
    pub status: ProbeStatus,
    /// `gateway`.
    pub service: String,
    /// The failing checks, `name: reason`, joined by `; `; absent when ok.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Every check by name.
    pub checks: BTreeMap<String, ProbeCheck>,
}

impl From<Report> for ProbeReport {
    fn from(report: Report) -> Self {
        ProbeReport {
            status: if report.ok() {
                ProbeStatus::Ok
            } else {
                ProbeStatus::Failing
            },
            service: report.service.to_string(),
            reason: report.reason,
            checks: report
                .checks
                .into_iter()
                .map(|(name, check)| {
                    let detail = (!check.detail.is_empty()).then_some(check.detail);
                    (name, ProbeCheck { ok: check.ok, detail })
                })
                .collect(),
        }
    }
}

/// 200 or 503 with the report.
fn answer(report: Report) -> Response {
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(ProbeReport::from(report))).into_response()
}

/// Is the process working? Its live feed and read-window loops run and none is stuck.
#[utoipa::path(
    get,
    path = "/livez",
    responses(
        (status = 200, description = "Every main loop runs", body = ProbeReport),
        (status = 503, description = "A main loop ended or is stuck: restart the process", body = ProbeReport),
    ),
    tag = "health"
)]
pub async fn livez(State(app): State<Arc<AppState>>) -> Response {
    answer(app.health.live())
}

/// Can the gateway serve? etcd answers, the live feed runs and the read window is loaded.
#[utoipa::path(
    get,
    path = "/readyz",
    responses(
        (status = 200, description = "Ready to serve", body = ProbeReport),
        (status = 503, description = "Not ready, with the reason: etcd does not answer, the live feed stopped, or the read window is loading", body = ProbeReport),
    ),
    tag = "health"
)]
pub async fn readyz(State(app): State<Arc<AppState>>) -> Response {
    let live_feed = if app.hub.following() {
        Ok(format!("delivered through revision {}", app.hub.delivered()))
    } else {
        Err("the live feed stopped".to_string())
    };
    let window = if !app.window.enabled() {
        Ok("off (WINDOW_POINTS=0)".to_string())
    } else {
        match app.window.revision() {
            Some(revision) => Ok(format!("loaded at revision {revision}")),
            None => Err("loading from etcd (reads go to etcd meanwhile)".to_string()),
        }
    };
    let report = app
        .health
        .ready()
        .await
        .with_check("live_feed", live_feed)
        .with_check("window", window);
    answer(report)
}
