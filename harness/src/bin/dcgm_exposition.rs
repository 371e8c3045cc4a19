//! Serves `data/dcgm_sample.csv` as dcgm-exporter's Prometheus text on `/metrics` (and
//! simulated targets on `/targets/{i}/metrics`) until interrupted: a stand-in dcgm-exporter for
//! `scripts/run` in scrape mode.

use clap::Parser as _;

/// Flags.
#[derive(clap::Parser)]
#[command(
    name = "dcgm-exposition",
    version,
    about = "Serves the DCGM sample as dcgm-exporter text on http://ADDR/metrics until interrupted"
)]
struct Cli {
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1:9400")]
    listen: std::net::SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let server = match telemetry_harness::ExpositionServer::start_on(cli.listen).await {
        Ok(server) => server,
        Err(err) => {
            eprintln!("dcgm-exposition: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    eprintln!("serving the DCGM sample on http://{}/metrics", cli.listen);
    let _ = tokio::signal::ctrl_c().await;
    drop(server);
    std::process::ExitCode::SUCCESS
}
