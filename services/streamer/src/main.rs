//! `telemetry-streamer`: reads its configuration, connects to etcd and runs the streamer until
//! it is done (one-shot) or receives SIGINT/SIGTERM. `--help` lists every flag and variable; a
//! configuration error exits with status 2, any other failure with status 1.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser as _;
use telemetry_shared::{etcd, health::Health, observe};
use telemetry_streamer::{Flags, StreamerConfig};

fn main() -> ExitCode {
    let flags = Flags::parse();
    let config = StreamerConfig::load(&flags).unwrap_or_else(|err| err.exit());
    observe::init_tracing(&config.log);
    let log = config.log.clone();
    match stream(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => log.exit_failure(&err),
    }
}

#[tokio::main]
async fn stream(config: StreamerConfig) -> anyhow::Result<()> {
    let shutdown = observe::shutdown_on_signals();
    let health = Health::new("streamer", &shutdown);
    observe::serve_metrics(
        config.metrics_port,
        "streamer",
        env!("CARGO_PKG_VERSION"),
        telemetry_streamer::events::METRICS,
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
    telemetry_streamer::run_with_health(config, client, shutdown, health).await?;
    Ok(())
}
