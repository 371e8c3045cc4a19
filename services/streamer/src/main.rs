//! `telemetry-streamer`: reads its configuration, connects to etcd and runs the streamer until
//! it is done (one-shot) or receives SIGINT/SIGTERM.

use anyhow::Context as _;
use clap::Parser as _;
use telemetry_shared::{etcd, observe};
use telemetry_streamer::{Flags, StreamerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    observe::init_tracing();
    let flags = Flags::parse();
    let config = StreamerConfig::load(&flags).context("invalid configuration")?;
    observe::serve_metrics(
        config.metrics_port,
        "streamer",
        env!("CARGO_PKG_VERSION"),
        telemetry_streamer::events::METRICS,
    )?;
    let shutdown = observe::shutdown_on_signals();
    let client = match etcd::connect_with_retry(&config.common, &shutdown).await {
        Ok(client) => client,
        Err(etcd::EtcdError::Cancelled) => return Ok(()),
        Err(err) => return Err(err).context("connecting to etcd"),
    };
    telemetry_streamer::run(config, client, shutdown).await?;
    Ok(())
}
