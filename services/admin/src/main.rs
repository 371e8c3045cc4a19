//! `telemetry-admin`: the operations CLI. etcd is found through the same variables as the
//! services (`ETCD_ENDPOINTS`, `ETCD_NAMESPACE`); commands and their arguments are flags.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use telemetry_shared::{CommonConfig, Keyspace, config::RawCommonConfig, etcd};

#[derive(Parser, Debug)]
#[command(
    name = "telemetry-admin",
    about = "Inspect and repair a GPU telemetry pipeline in etcd (ETCD_ENDPOINTS, ETCD_NAMESPACE)"
)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Queue depth and lag, per partition, with each partition's owner.
    Queue,
    /// List, show, replay or purge dead letters.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
    /// Count data keys per GPU and check them against the index and the counters (exit 1 on a
    /// problem).
    Audit {
        /// Fail unless exactly this many data keys exist.
        #[arg(long)]
        expect: Option<u64>,
    },
    /// Collectors, their leases and the partitions they own.
    Status,
}

#[derive(Subcommand, Debug)]
enum DeadLetters {
    /// List dead letters (oldest first).
    List {
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Show one dead letter in full.
    Show {
        /// Its id (from `list`).
        id: String,
    },
    /// Put dead letters back on the queue, each exactly once.
    Replay {
        /// Their ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Their ids.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<String>,
        /// Delete every dead letter.
        #[arg(long)]
        all: bool,
    },
}

fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn age(s: Option<f64>) -> String {
    s.map_or_else(|| "-".into(), |s| format!("{s:.1}s"))
}

async fn execute(cli: Cli) -> anyhow::Result<ExitCode> {
    let raw: RawCommonConfig = telemetry_shared::config::from_env().context("invalid configuration")?;
    let config = CommonConfig::try_from(raw).context("invalid configuration")?;
    let keys = Keyspace::new(&config.etcd_namespace);
    let client = etcd::connect(&config).await.with_context(|| {
        format!(
            "cannot reach etcd at {} (ETCD_ENDPOINTS)",
            config.etcd_endpoints.join(",")
        )
    })?;
    match cli.command {
        Command::Queue => {
            let report = telemetry_admin::queue(&client, &keys).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                println!("queue depth {}   lag {}", report.depth, age(report.lag_s));
                println!("{:>9} {:>8} {:>10}  owner", "partition", "depth", "oldest");
                for p in &report.partitions {
                    println!(
                        "{:>9} {:>8} {:>10}  {}",
                        p.partition,
                        p.depth,
                        age(p.oldest_age_s),
                        p.owner.as_deref().unwrap_or("-")
                    );
                }
            }
        }
        Command::DeadLetters(DeadLetters::List { limit }) => {
            let letters = telemetry_admin::dead_letters(&client, &keys, limit).await?;
            if cli.json {
                print_json(&letters)?;
            } else {
                println!("{} dead letter(s)", letters.len());
                for d in &letters {
                    println!(
                        "{}  {}  {}  {}",
                        d.id, d.letter.failed_at, d.letter.collector, d.letter.reason
                    );
                }
            }
        }
        Command::DeadLetters(DeadLetters::Show { id }) => {
            print_json(&telemetry_admin::show_dead_letter(&client, &keys, &id).await?)?;
        }
        Command::DeadLetters(DeadLetters::Replay { ids }) => {
            for id in &ids {
                let queue_key = telemetry_admin::replay(&client, &keys, id).await?;
                println!("replayed {id} -> {queue_key}");
            }
        }
        Command::DeadLetters(DeadLetters::Purge { ids, all }) => {
            let removed = if all {
                telemetry_admin::purge_all(&client, &keys).await?
            } else {
                telemetry_admin::purge(&client, &keys, &ids).await? as i64
            };
            println!("purged {removed} dead letter(s)");
        }
        Command::Audit { expect } => {
            let report = telemetry_admin::audit(&client, &keys, expect).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                println!("{:<32} {:>6} {:>9}  indexed", "host", "gpu_id", "records");
                for g in &report.gpus {
                    println!(
                        "{:<32} {:>6} {:>9}  {}",
                        g.hostname, g.gpu_id, g.records, g.indexed
                    );
                }
                println!(
                    "data keys {}   counted records {}   GPUs with data {}   indexed GPUs {}   queue {}   dead letters {}   (revision {})",
                    report.data_keys,
                    report.counted_records,
                    report.gpus_with_data,
                    report.indexed_gpus,
                    report.queue_depth,
                    report.dead_letters,
                    report.revision
                );
                for p in &report.problems {
                    println!("PROBLEM: {p}");
                }
            }
            if !report.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status => {
            let report = telemetry_admin::status(&client, &keys).await?;
            if cli.json {
                print_json(&report)?;
            } else {
                println!("{:<32} {:>6} {:>28}  partitions", "collector", "ttl", "started");
                for c in &report.collectors {
                    let parts: Vec<String> = c.partitions.iter().map(|p| p.to_string()).collect();
                    println!(
                        "{:<32} {:>5}s {:>28}  {}",
                        c.id,
                        c.ttl_s,
                        c.started_at,
                        parts.join(",")
                    );
                }
                if !report.unowned.is_empty() {
                    println!("unowned partitions: {:?}", report.unowned);
                }
                for (p, owner) in &report.orphaned {
                    println!("partition {p} is claimed by {owner}, which is not registered (claim expiring)");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli).await {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
