//! `telemetry-collector`: reads its configuration, connects to etcd and runs the collector until
//! SIGINT/SIGTERM. `--help` lists every variable; a configuration error exits with status 2,
//! any other failure with status 1.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use telemetry_collector::CollectorConfig;
use telemetry_shared::{etcd, health::Health, observe};

/// No flags: the collector is configured by environment variables.
#[derive(clap::Parser)]
#[command(
    name = "telemetry-collector",
    version,
    about = "Claims queued GPU telemetry through leased partitions and commits it to etcd exactly once. \
Configured by the environment variables listed below.",
    after_help = CollectorConfig::env_help()
)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    let config = CollectorConfig::load().unwrap_or_else(|err| err.exit());
    observe::init_tracing(&config.log);
    let log = config.log.clone();
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => log.exit_failure(&err),
    }
}

#[tokio::main]
async fn serve(config: CollectorConfig) -> anyhow::Result<()> {
    let shutdown = observe::shutdown_on_signals();
    let health = Health::new("collector", &shutdown);
    observe::serve_metrics(
        config.metrics_port,
        "collector",
        env!("CARGO_PKG_VERSION"),
        telemetry_collector::events::METRICS,
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
    telemetry_collector::run_with_health(config, client, shutdown, health).await?;
    Ok(())
}
