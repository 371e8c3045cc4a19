//! `telemetry-gateway`: reads its configuration, binds its port, connects to etcd and serves
//! until SIGINT/SIGTERM.

use std::net::SocketAddr;

use anyhow::Context as _;
use telemetry_gateway::GatewayConfig;
use telemetry_shared::{etcd, observe};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    observe::init_tracing();
    let config = GatewayConfig::load().context("invalid configuration")?;
    let shutdown = observe::shutdown_on_signals();
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (GATEWAY_HOST, GATEWAY_PORT)"))?;
    let client = match etcd::connect_with_retry(&config.common, &shutdown).await {
        Ok(client) => client,
        Err(etcd::EtcdError::Cancelled) => return Ok(()),
        Err(err) => return Err(err).context("connecting to etcd"),
    };
    telemetry_gateway::run(config, listener, client, shutdown).await?;
    Ok(())
}
