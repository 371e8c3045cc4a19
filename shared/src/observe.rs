//! Logging, metrics and shutdown signals: the process-level plumbing every binary needs.

use std::net::{Ipv4Addr, SocketAddr};

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Installs the global `tracing` subscriber: human-readable lines on stderr, filtered by
/// `RUST_LOG` (default `info`). Safe to call more than once (later calls do nothing).
pub fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
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

/// Serves Prometheus `/metrics` on `0.0.0.0:port`; `port == 0` disables it. Must be called
/// inside a tokio runtime. The recorder is process-global, so call it once per process.
pub fn serve_metrics(port: u16) -> Result<(), MetricsError> {
    if port == 0 {
        return Ok(());
    }
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| MetricsError {
            port,
            reason: e.to_string(),
        })?;
    tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    Ok(())
}

/// Latency buckets (seconds) for every `*_seconds` histogram: 100 µs to 10 s.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The process-wide Prometheus recorder for a service that serves `/metrics` on its own HTTP
/// port (the gateway), installed at the first call. `None` if another recorder was installed
/// first (then metrics go there).
pub fn prometheus() -> Option<PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &SECONDS_BUCKETS)
                .ok()?
                .install_recorder()
                .ok()
        })
        .clone()
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
