//! Logging, metrics and shutdown signals: the process-level plumbing every binary needs.

use std::net::{Ipv4Addr, SocketAddr};

use metrics_exporter_prometheus::PrometheusBuilder;
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
