//! `telemetry-collector`: reads its configuration, connects to etcd and runs the collector until
//! SIGINT/SIGTERM.

use anyhow::Context as _;
use telemetry_collector::CollectorConfig;
use telemetry_shared::{etcd, observe};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    observe::init_tracing();
    let config = CollectorConfig::load().context("invalid configuration")?;
    observe::serve_metrics(
        config.metrics_port,
        "collector",
        env!("CARGO_PKG_VERSION"),
        telemetry_collector::events::METRICS,
    )?;
    let shutdown = observe::shutdown_on_signals();
    let client = match etcd::connect_with_retry(&config.common, &shutdown).await {
        Ok(client) => client,
        Err(etcd::EtcdError::Cancelled) => return Ok(()),
        Err(err) => return Err(err).context("connecting to etcd"),
    };
    telemetry_collector::run(config, client, shutdown).await?;
    Ok(())
}
