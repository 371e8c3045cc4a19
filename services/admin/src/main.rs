//! `telemetry-admin`: the operations CLI. etcd is found through the same variables as the
//! services (`ETCD_ENDPOINTS`, `ETCD_NAMESPACE`, and the TLS and user ones); commands and their
//! arguments are flags.
//! A configuration error exits with status 2; a failed command or audit with status 1.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use telemetry_admin::auth;
use telemetry_shared::{
    CommonConfig, ConfigError, Keyspace,
    config::{LogConfig, RawCommonConfig, RawLogConfig},
    etcd, observe,
};

telemetry_shared::env_config! {
    /// The variables telemetry-admin reads: where etcd is, and logging.
    struct RawAdminConfig {
        flatten common: RawCommonConfig;
        flatten log: RawLogConfig;
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "telemetry-admin",
    version,
    about = "Inspect and repair a GPU telemetry pipeline in etcd",
    after_help = telemetry_shared::config::env_help::<RawAdminConfig>()
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
    /// etcd users and roles of the pipeline.
    #[command(subcommand)]
    Auth(Auth),
    /// Exporters: position, lag, owner, rejected records, records expired before export.
    #[command(subcommand)]
    Exporter(Exporter),
}

#[derive(Subcommand, Debug)]
enum Auth {
    /// Create, if missing, the root user and one role and user per service (streamer, collector,
    /// gateway, exporter, admin) with the least privilege on the key prefixes under
    /// ETCD_NAMESPACE; make each role's permissions exactly those; print what exists. Run it
    /// again at any time: it changes only what differs. Once authentication is on, run it as
    /// root (ETCD_USERNAME=root).
    Setup {
        /// Directory of password files, one per user named like the user: a new user's password
        /// is read from its file, or generated and written there (0600). Never printed.
        #[arg(long)]
        password_dir: Option<std::path::PathBuf>,
        /// Prefix of the user and role names [default: telemetry- plus the namespace, e.g.
        /// telemetry-prod- for /prod].
        #[arg(long)]
        name_prefix: Option<String>,
        /// Turn etcd's authentication on at the end.
        #[arg(long)]
        enable: bool,
    },
}

#[derive(Subcommand, Debug)]
enum Exporter {
    /// Each exporter's checkpoint, lag, owner and losses, with its newest rejected records.
    Status {
        /// Only this exporter (EXPORTER_NAME).
        #[arg(long)]
        name: Option<String>,
        /// Show up to this many of the newest rejected records.
        #[arg(long, default_value_t = 20)]
        rejected: usize,
    },
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

fn load() -> Result<(CommonConfig, LogConfig), ConfigError> {
    let raw: RawAdminConfig = telemetry_shared::config::from_env()?;
    Ok((
        CommonConfig::try_from(&raw.common)?,
        LogConfig::try_from(&raw.log)?,
    ))
}

#[tokio::main]
async fn execute(cli: Cli, config: CommonConfig) -> anyhow::Result<ExitCode> {
    let keys = Keyspace::new(&config.etcd_namespace);
    let client = match etcd::connect(&config).await {
        Ok(client) => client,
        Err(etcd::EtcdError::Config(err)) => err.exit(),
        Err(err @ etcd::EtcdError::Refused(_)) => return Err(err.into()),
        Err(err) => {
            return Err(err).with_context(|| {
                format!(
                    "cannot reach etcd at {} (ETCD_ENDPOINTS)",
                    config.etcd_endpoints.join(",")
                )
            });
        }
    };
    let (client, keys) = (&client, &keys);
    match cli.command {
        Command::Queue => {
            let report = telemetry_admin::queue(client, keys).await?;
            output(cli.json, &report, print_queue)?;
        }
        Command::DeadLetters(DeadLetters::List { limit }) => {
            let letters = telemetry_admin::dead_letters(client, keys, limit).await?;
            output(cli.json, &letters, print_dead_letters)?;
        }
        Command::DeadLetters(DeadLetters::Show { id }) => {
            print_json(&telemetry_admin::show_dead_letter(client, keys, &id).await?)?;
        }
        Command::DeadLetters(DeadLetters::Replay { ids }) => {
            for id in &ids {
                let queue_key = telemetry_admin::replay(client, keys, id).await?;
                println!("replayed {id} -> {queue_key}");
            }
        }
        Command::DeadLetters(DeadLetters::Purge { ids, all }) => {
            let removed = if all {
                telemetry_admin::purge_all(client, keys).await?
            } else {
                telemetry_admin::purge(client, keys, &ids).await? as i64
            };
            println!("purged {removed} dead letter(s)");
        }
        Command::Audit { expect } => {
            let report = telemetry_admin::audit(client, keys, expect).await?;
            output(cli.json, &report, print_audit)?;
            if !report.problems.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Status => {
            let report = telemetry_admin::status(client, keys).await?;
            output(cli.json, &report, print_status)?;
        }
        Command::Auth(Auth::Setup {
            password_dir,
            name_prefix,
            enable,
        }) => {
            let options = auth::SetupOptions {
                password_dir,
                name_prefix: name_prefix.unwrap_or_else(|| auth::default_name_prefix(keys)),
                enable,
            };
            let report = auth::setup(client, keys, &options)
                .await
                .map_err(|err| match &err {
                    telemetry_admin::AdminError::Etcd(etcd::EtcdError::Client(
                        etcd_client::Error::GRpcStatus(s),
                    )) if s.code() == tonic::Code::PermissionDenied => {
                        anyhow::anyhow!(
                            "{err}: with authentication on, auth setup must run as root (ETCD_USERNAME=root)"
                        )
                    }
                    _ => err.into(),
                })?;
            output(cli.json, &report, print_auth)?;
        }
        Command::Exporter(Exporter::Status { name, rejected }) => {
            let report = telemetry_admin::exporters(client, keys, name.as_deref(), rejected).await?;
            output(cli.json, &report, print_exporters)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints `value` as JSON with `--json`, else as the table `table` prints.
fn output<T: serde::Serialize>(json: bool, value: &T, table: fn(&T)) -> anyhow::Result<()> {
    if json {
        print_json(value)
    } else {
        table(value);
        Ok(())
    }
}

fn print_queue(report: &telemetry_admin::QueueReport) {
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

fn print_dead_letters(letters: &Vec<telemetry_admin::StoredDeadLetter>) {
    println!("{} dead letter(s)", letters.len());
    for d in letters {
        println!(
            "{}  {}  {}  {}",
            d.id, d.letter.failed_at, d.letter.collector, d.letter.reason
        );
    }
}

fn print_audit(report: &telemetry_admin::AuditReport) {
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

fn print_status(report: &telemetry_admin::StatusReport) {
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

fn print_auth(report: &auth::SetupReport) {
    println!(
        "{:<32} {:<10} {:<8}  password",
        "user (and role)", "service", "status"
    );
    for u in &report.users {
        println!("{:<32} {:<10} {:<8}  {}", u.user, u.service, u.status, u.password);
    }
    println!();
    println!(
        "{:<32} {:<28} {:<9} {:<8}  why",
        "role", "prefix", "access", "status"
    );
    for g in &report.grants {
        println!(
            "{:<32} {:<28} {:<9} {:<8}  {}",
            g.role, g.prefix, g.access, g.status, g.why
        );
    }
    println!();
    println!("authentication: {}", report.authentication);
}

fn print_exporters(report: &Vec<telemetry_admin::ExporterStatus>) {
    if report.is_empty() {
        println!("no exporter has a checkpoint yet");
    }
    for e in report {
        let cp = &e.checkpoint;
        let owner = e.owner.as_ref().map_or("none (stopped)".to_string(), |o| {
            format!("{} (lease {:x})", o.id, o.lease)
        });
        println!("exporter {}   active: {owner}", e.name);
        println!(
            "  checkpoint revision {}{}   etcd revision {}   lag {} revisions, last record {} ago",
            cp.revision,
            cp.key
                .as_deref()
                .map_or(String::new(), |k| format!(" (inside, after {k})")),
            e.current_revision,
            e.lag_revisions,
            age(e.last_record_age_s)
        );
        println!(
            "  exported {} records ({} samples)   rejected {}   expired before export {}",
            cp.records, cp.samples, cp.rejected, cp.expired
        );
        for gap in &cp.gaps {
            let t = |t: &Option<telemetry_shared::Timestamp>| t.map_or("?".to_string(), |t| t.to_string());
            let n = gap
                .expired
                .map_or("an unknown number of".to_string(), |n| n.to_string());
            println!(
                "  gap: {n} records expired between {} and {} (revisions {}..{}, found {})",
                t(&gap.after),
                t(&gap.before),
                gap.from_revision,
                gap.to_revision,
                gap.found_at
            );
        }
        if !e.rejected.is_empty() {
            println!("  newest rejected records ({} listed):", e.rejected_listed);
        }
        for r in &e.rejected {
            println!("    {}  {}  {}", r.rejected_at, r.key, r.reason);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (config, log) = load().unwrap_or_else(|err| err.exit());
    observe::init_tracing(&log);
    match execute(cli, config) {
        Ok(code) => code,
        Err(err) => log.exit_failure(&err),
    }
}
