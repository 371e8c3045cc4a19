//! `telemetry-gateway`: reads its configuration, binds its port, connects to etcd and serves
//! until SIGINT/SIGTERM. `--help` lists every variable; a configuration error exits with
//! status 2, any other failure (the port is taken, etcd never answered) with status 1.

use std::{net::SocketAddr, process::ExitCode};

use anyhow::Context as _;
use clap::Parser as _;
use telemetry_gateway::GatewayConfig;
use telemetry_shared::{etcd, observe};

/// No flags: the gateway is configured by environment variables.
#[derive(clap::Parser)]
#[command(
    name = "telemetry-gateway",
    version,
    about = "REST and WebSocket gateway over the GPU telemetry stored in etcd. \
Configured by the environment variables listed below.",
    after_help = GatewayConfig::env_help()
)]
struct Cli {}

fn main() -> ExitCode {
    Cli::parse();
    let config = GatewayConfig::load().unwrap_or_else(|err| err.exit());
    observe::init_tracing(&config.log);
    let log = config.log.clone();
    match serve(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => log.exit_failure(&err),
    }
}

#[tokio::main]
async fn serve(config: GatewayConfig) -> anyhow::Result<()> {
    let shutdown = observe::shutdown_on_signals();
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (GATEWAY_HOST, GATEWAY_PORT)"))?;
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
    telemetry_gateway::run(config, listener, client, shutdown).await?;
    Ok(())
}
