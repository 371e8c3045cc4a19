//! `telemetry-exporter`: reads its configuration, connects to etcd and exports the stored
//! telemetry by remote write until SIGINT/SIGTERM. `--help` lists every variable; a
//! configuration error exits with status 2, any other failure with status 1.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use telemetry_exporter::ExporterConfig;
use telemetry_shared::{etcd, health::Health, observe};

/// No flags: the exporter is configured by environment variables.
#[derive(clap::Parser)]
#[command(
    name = "telemetry-exporter",
    version,
    about = "Exports the stored GPU telemetry to Prometheus-compatible storage by remote write, exactly once. \
Configured by the environment variables listed below.",
    after_help = ExporterConfig::env_help()
)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    let config = ExporterConfig::load().unwrap_or_else(|err| err.exit());
    observe::init_tracing(&config.log);
    let log = config.log.clone();
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => log.exit_failure(&err),
    }
}

#[tokio::main]
async fn serve(config: ExporterConfig) -> anyhow::Result<()> {
    let shutdown = observe::shutdown_on_signals();
    let health = Health::new("exporter", &shutdown);
    observe::serve_metrics(
        config.metrics_port,
        "exporter",
        env!("CARGO_PKG_VERSION"),
        telemetry_exporter::events::METRICS,
        &health,
    )
    .await?;
    let client = match etcd::connect_with_retry(&config.common, &shutdown).await {
        Ok(client) => client,
        Err(etcd::EtcdError::Cancelled) => anyhow::bail!(
            "etcd at {} (ETCD_ENDPOINTS) did not answer before shutdown",
            config.common.etcd_endpoints.join(",")
        ),
        // A credentials file that cannot be used is a configuration error (status 2).
        Err(etcd::EtcdError::Config(err)) => err.exit(),
        Err(err) => return Err(err).context("connecting to etcd"),
    };
    telemetry_exporter::run_with_health(config, client, shutdown, health).await?;
    Ok(())
}
