//! `telemetry-chaos`: the chaos run (see `telemetry_tests::chaos`). Prints the seed, the
//! schedule and a table; exits non-zero on any loss, duplicate or failed check.

use std::{path::PathBuf, process::ExitCode};

use clap::Parser;
use telemetry_tests::chaos::{ChaosOptions, run};

#[derive(Parser, Debug)]
#[command(
    name = "telemetry-chaos",
    version,
    about = "Exactly-once under faults: the real services on a 3-member etcd, faults on a seeded schedule, then an audit",
    after_help = "Environment variables:\n  ETCD_BIN [default: the vendored etcd 3.7.2, else etcd on PATH]\n          The etcd \
binary the cluster runs.\n\nThe services it starts get only the variables the run sets."
)]
struct Args {
    /// Rows of generated input (the DCGM sample repeated).
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Rounds of the six faults.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Seconds between faults.
    #[arg(long, default_value_t = 8.0)]
    gap: f64,
    /// Seed of the schedule (random if not given; printed either way).
    #[arg(long)]
    seed: Option<u64>,
    /// The short variant (20,000 rows, one round): what `scripts/test` runs.
    #[arg(long)]
    short: bool,
    /// Directory of the service binaries.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where logs and the input go (default target/chaos/<seed>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    let (rows, rounds, gap) = if args.short {
        (20_000, 1, 6.0)
    } else {
        (args.rows, args.rounds, args.gap)
    };
    let options = ChaosOptions {
        rows,
        rounds,
        gap_s: gap,
        seed,
        bin_dir: args.bin_dir,
        work_dir: args
            .work_dir
            .unwrap_or_else(|| PathBuf::from(format!("target/chaos/{seed}"))),
    };
    eprintln!(
        "chaos: seed {seed}, {rows} rows, {rounds} round(s); logs in {}",
        options.work_dir.display()
    );
    match run(&options).await {
        Ok(report) => {
            println!("{}", report.table());
            if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("chaos run failed: {err:#}");
            ExitCode::from(2)
        }
    }
}
