//! Logging, metrics, health endpoints and shutdown signals: the process-level plumbing every
//! binary needs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::OnceLock,
    time::Duration,
};

use axum::{
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::{
    config::{LogConfig, LogFormat},
    health::{Health, Report},
};

/// Installs the global `tracing` subscriber on stderr, filtered by `RUST_LOG` (default `info`):
/// human-readable lines, or one JSON object per line with `LOG_FORMAT=json` (the event's fields
/// at the top level beside `timestamp`, `level` and `target`). Both come from the binary's
/// config ([`LogConfig`]), so they are validated and listed in `--help`. Safe to call more
/// An error and its causes on one line, joined by `: `, leaving out a cause whose text the line
/// already holds (many errors repeat their source in their own message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    append_causes(err.to_string(), err.source())
}

/// `line`, then `source` and each of its causes as [`error_chain`] joins them (for errors that
/// keep their source elsewhere than [`std::error::Error::source`]).
pub fn append_causes(mut line: String, mut source: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(cause) = source {
        let text = cause.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = cause.source();
    }
    line
}

/// than once (later calls do nothing).
pub fn init_tracing(log: &LogConfig) {
    // The config checked that the filter parses; "info" is only a fallback.
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match log.format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// One thing that happened in a service, Vector's `internal_events` pattern: the event's
/// `emit` writes its log line and updates its metrics together, so names, labels and levels
/// never drift apart, and a new signal is added in one place (the service's `events` module,
/// which also lists the metric in its [`MetricDef`] table).
pub trait InternalEvent: Sized {
    /// Logs the event and records its metrics.
    fn emit(self);
}

/// Emits an event (see [`InternalEvent`]).
pub fn emit(event: impl InternalEvent) {
    event.emit();
}

/// What kind of Prometheus metric a [`MetricDef`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// A monotonic counter (name ends in `_total`).
    Counter,
    /// A value that goes up and down.
    Gauge,
    /// A histogram with buckets.
    Histogram,
}

/// A metric a process exports, with its help text. Each service keeps one table of them beside
/// its events; the recorder is told about each at start-up, so every metric has `# HELP` and
/// `# TYPE` lines (what `promtool check metrics` asks for) even before its first update.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// The metric name (Prometheus conventions: `<service>_<what>_<unit>[_total]`).
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// One sentence for `# HELP`.
    pub help: &'static str,
    /// True when the metric always carries labels (then it appears with its first update);
    /// an unlabelled counter is registered at zero at start-up, so it is there from the first
    /// scrape.
    pub labeled: bool,
}

impl MetricDef {
    /// A counter.
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        MetricDef {
            name,
            kind: MetricKind::Counter,
            help,
            labeled: false,
        }
    }

    /// A gauge.
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        MetricDef {
            name,
            kind: MetricKind::Gauge,
            help,
            labeled: false,
        }
    }

    /// The same metric, always with labels.
    pub const fn labeled(mut self) -> Self {
        self.labeled = true;
        self
    }

    /// A histogram.
    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        MetricDef {
            name,
            kind: MetricKind::Histogram,
            help,
            labeled: false,
        }
    }
}

/// Metrics of the shared code (retries, watches), exported by every service.
pub const SHARED_METRICS: &[MetricDef] = &[
    MetricDef::counter(
        "etcd_request_retries_total",
        "Idempotent etcd requests retried after a retryable error.",
    ),
    MetricDef::counter(
        "etcd_watch_restarts_total",
        "etcd watches re-created after they broke (from the last complete revision).",
    ),
    MetricDef::counter(
        "etcd_watch_compacted_total",
        "etcd watches that fell behind a compaction and lost history.",
    ),
];

/// Latency buckets (seconds) for every `*_seconds` histogram: 100 µs to 10 s.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Buckets for every other histogram (sizes and counts): powers of two from 1 to 65,536.
const SIZE_BUCKETS: [f64; 17] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
    32768.0, 65536.0,
];

/// The recorder's configuration: real histograms (with buckets, not summaries) everywhere.
fn builder() -> PrometheusBuilder {
    let builder = PrometheusBuilder::new();
    let builder = match builder.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS) {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    };
    match builder.set_buckets(&SIZE_BUCKETS) {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    }
}

/// Tells the recorder about `service`'s metrics and the shared ones, and sets
/// `<service>_build_info{version}` to 1.
fn describe(service: &'static str, version: &'static str, defs: &[MetricDef]) {
    let build_info = format!("{service}_build_info");
    metrics::describe_gauge!(
        build_info.clone(),
        "Always 1; the labels say which build of the service this is."
    );
    metrics::gauge!(build_info, "version" => version).set(1.0);
    for def in SHARED_METRICS.iter().chain(defs) {
        match def.kind {
            MetricKind::Counter => {
                metrics::describe_counter!(def.name, def.help);
                if !def.labeled {
                    metrics::counter!(def.name).increment(0);
                }
            }
            MetricKind::Gauge => metrics::describe_gauge!(def.name, def.help),
            MetricKind::Histogram => metrics::describe_histogram!(def.name, def.help),
        }
    }
}

/// Errors starting the metrics endpoint.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve Prometheus metrics on port {port} (METRICS_PORT): {reason}")]
pub struct MetricsError {
    /// The port asked for.
    pub port: u16,
    /// Why it failed.
    pub reason: String,
}

/// How often the recorder's upkeep runs (what the exporter's own listener did): histograms are
/// drained into their buckets and new descriptions published.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Serves Prometheus `/metrics` for `service` (its `version`, its metric table), and `/livez`
/// and `/readyz` from `health`, on `0.0.0.0:port`; `port == 0` serves nothing (the recorder is
/// not installed either). Binds before returning, so a taken port is reported here. Must be
/// called inside a tokio runtime, once per process.
pub async fn serve_metrics(
    port: u16,
    service: &'static str,
    version: &'static str,
    defs: &[MetricDef],
    health: &Health,
) -> Result<(), MetricsError> {
    if port == 0 {
        return Ok(());
    }
    let failed = |reason: String| MetricsError { port, reason };
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let handle = builder().install_recorder().map_err(|e| failed(e.to_string()))?;
    describe(service, version, defs);
    tokio::spawn(upkeep(handle.clone()));
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .with_state(handle)
        .merge(probes(health.clone()));
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::error!(%error, "the metrics and health server stopped");
        }
    });
    tracing::info!(%addr, "serving Prometheus metrics at /metrics, health at /livez and /readyz");
    Ok(())
}

async fn upkeep(handle: PrometheusHandle) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tick.tick().await;
        handle.run_upkeep();
    }
}

/// `/metrics`: the recorder's text exposition, as the exporter's own listener sent it.
async fn render(State(handle): State<PrometheusHandle>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain")], handle.render()).into_response()
}

/// `/livez` and `/readyz` answered from `health`.
pub fn probes<S: Clone + Send + Sync + 'static>(health: Health) -> axum::Router<S> {
    let live = health.clone();
    axum::Router::new()
        .route("/livez", get(move || async move { report_response(live.live()) }))
        .route(
            "/readyz",
            get(move || async move { report_response(health.ready().await) }),
        )
}

/// A health report as HTTP: 200 when ok, 503 when failing, with the report as JSON.
pub fn report_response(report: Report) -> Response {
    let status = if report.ok() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(report)).into_response()
}

/// The process-wide Prometheus recorder for a service that serves `/metrics` on its own HTTP
/// port (the gateway), installed at the first call and described for `service`. `None` if
/// another recorder was installed first (then metrics go there).
pub fn prometheus(
    service: &'static str,
    version: &'static str,
    defs: &[MetricDef],
) -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    let handle = HANDLE.get_or_init(|| builder().install_recorder().ok()).clone();
    if handle.is_some() {
        describe(service, version, defs);
    }
    handle
}

/// A token cancelled at the first SIGINT or SIGTERM: services finish in-flight work and exit.
/// A second signal exits at once with status 130, for an operator who does not want to wait.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested; finishing in-flight work (signal again to force)");
        trigger.cancel();
        wait_for_signal().await;
        tracing::warn!("second signal: exiting immediately");
        std::process::exit(130);
    });
    token
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
