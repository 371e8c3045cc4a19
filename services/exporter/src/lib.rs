//! The exporter: the stored telemetry, exactly once, into Prometheus-compatible storage by
//! remote write.
//!
//! Files in data-flow order:
//! - `owner` makes this process the one active exporter of its name (a leased owner key;
//!   standing by while another holds it);
//! - `source` follows the stored records after the checkpoint in revision order (catching up
//!   from the data keys when etcd compacted the history);
//! - `convert` turns a record into its samples (`shared::exposition`, like the gateway's
//!   `/metrics/gpus`), or the reason it cannot be exported;
//! - `batch` cuts requests (never two samples of one series in one request);
//! - `remote_write` is the wire format; `send` sends a request and reads its answer, and bisects
//!   a refused one down to the records responsible;
//! - `checkpoint` is the fenced transaction that advances the position after an
//!   acknowledgement, with the rejected records;
//! - `export` is the loop around them; `server` checks the TSDB's configuration at start;
//! - [`events`]: what the exporter logs and counts.
//!
//! [`run`] is the entry point; the binary reads its config, connects, and calls it. Why the
//! result is exactly once is argued in docs/design.md ("Exporter").

mod batch;
mod checkpoint;
pub mod config;
mod convert;
pub mod events;
mod export;
mod owner;
mod remote_write;
mod send;
mod server;
mod source;

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace,
    etcd::current_revision,
    health::{Check, Health},
    model::ExportCheckpoint,
    observe::emit,
    profiles::ProfileCache,
};
use tokio_util::sync::CancellationToken;

pub use config::{ExporterConfig, ServerCheck};

/// What an exporter did, as returned by [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records whose samples landed.
    pub records: u64,
    /// Samples that landed.
    pub samples: u64,
    /// Records rejected.
    pub rejected: u64,
    /// Records found expired before export.
    pub expired: u64,
    /// Remote-write requests sent (every attempt).
    pub requests: u64,
}

/// Errors that end an exporter.
#[derive(Debug, thiserror::Error)]
pub enum ExporterError {
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// `SERVER_CHECK=require` and the server would store re-sent samples twice.
    #[error("the remote-write server is unsafe for exactly-once export (SERVER_CHECK=require): {0}")]
    UnsafeServer(String),
    /// Stored state an operator must repair.
    #[error("{0}")]
    Fatal(String),
}

/// What the export loop shares with the lag reporter.
#[derive(Debug, Default)]
struct Progress {
    active: AtomicBool,
    /// The source follows the live watch and nothing is pending.
    caught_up: AtomicBool,
    checkpoint_revision: AtomicI64,
    /// Processing time (Unix ms) of the last record passed; 0 = none.
    last_record_ms: AtomicI64,
    /// Processing time (Unix ms) of the oldest record pending; 0 = none.
    oldest_pending_ms: AtomicI64,
    records: AtomicU64,
    samples: AtomicU64,
    rejected: AtomicU64,
    expired: AtomicU64,
    requests: AtomicU64,
}

impl Progress {
    fn set_checkpoint(&self, cp: &ExportCheckpoint) {
        self.checkpoint_revision.store(cp.revision, Ordering::Relaxed);
        let ms = cp.last_record_time.map_or(0, |t| t.unix_millis());
        self.last_record_ms.store(ms, Ordering::Relaxed);
    }

    fn set_pending(&self, pending: &VecDeque<batch::Pending>, live: bool) {
        let oldest = pending.iter().find_map(|p| match p {
            batch::Pending::Record(item) => Some(item.time.map_or(0, |t| t.unix_millis())),
            batch::Pending::Mark(_) => None,
        });
        self.oldest_pending_ms
            .store(oldest.unwrap_or(0), Ordering::Relaxed);
        self.caught_up
            .store(live && pending.is_empty(), Ordering::Relaxed);
    }

    /// Adds what moved between two checkpoints to the totals.
    fn add(&self, old: &ExportCheckpoint, new: &ExportCheckpoint) {
        self.records
            .fetch_add(new.records - old.records, Ordering::Relaxed);
        self.samples
            .fetch_add(new.samples - old.samples, Ordering::Relaxed);
        self.rejected
            .fetch_add(new.rejected - old.rejected, Ordering::Relaxed);
        self.expired
            .fetch_add(new.expired - old.expired, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
        Totals {
            records: self.records.load(Ordering::Relaxed),
            samples: self.samples.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
        }
    }
}

/// Everything the export needs, shared by its tasks.
struct Context {
    config: ExporterConfig,
    source: Arc<source::SourceContext>,
    sender: send::Sender,
    /// Whether a request may hold several samples of one series (from the server check).
    rule: batch::SeriesRule,
    progress: Progress,
}

/// Runs the exporter until `shutdown`: checks the server, becomes the active exporter of its
/// name (or stands by until it can), and exports from the checkpoint. On shutdown it finishes
/// the request in flight and its checkpoint, and revokes its lease so a standby takes over at
/// once.
pub async fn run(
    config: ExporterConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Totals, ExporterError> {
    let health = Health::new("exporter", &shutdown);
    run_with_health(config, client, shutdown, health).await
}

/// [`run`], reporting to `health`: the export loop is a watched loop, and the readiness check
/// `export` says whether this exporter's work is current (standing by, or active with its lag
/// under half of `RETENTION`).
pub async fn run_with_health(
    config: ExporterConfig,
    client: Client,
    shutdown: CancellationToken,
    health: Health,
) -> Result<Totals, ExporterError> {
    health.set_etcd(&client);
    let check = health.check("export", "checking the remote-write server");
    let sender = send::Sender::new(config.remote_write_url.clone(), config.request_timeout)?;
    let rule = check_server(&config, &sender).await?;
    let ctx = Arc::new(Context {
        source: Arc::new(source::SourceContext {
            client: client.clone(),
            keys: Keyspace::new(&config.common.etcd_namespace),
            columns: config.columns.clone(),
            profiles: ProfileCache::new(),
        }),
        sender,
        rule,
        progress: Progress::default(),
        config,
    });
    check.pass("standing by until this exporter owns its name");
    let reporter = tokio::spawn(report(ctx.clone(), check, shutdown.clone()));
    let result = health.watch("export", serve(&ctx, &client, &shutdown)).await;
    reporter.abort();
    let totals = ctx.progress.totals();
    emit(events::Stopped { totals: &totals });
    result.map(|()| totals)
}

/// One ownership after another until shutdown.
async fn serve(
    ctx: &Arc<Context>,
    client: &Client,
    shutdown: &CancellationToken,
) -> Result<(), ExporterError> {
    let config = &ctx.config;
    loop {
        let Some(lease) = owner::acquire(
            client,
            &ctx.source.keys,
            &config.name,
            &config.exporter_id,
            config.lease_ttl,
            shutdown,
        )
        .await
        else {
            return Ok(());
        };
        ctx.progress.active.store(true, Ordering::Relaxed);
        let end = export::session(ctx, &lease, shutdown).await;
        ctx.progress.active.store(false, Ordering::Relaxed);
        if let Err(err) = lease.revoke(client).await {
            tracing::debug!(error = %err, "could not revoke the owner lease; it expires after its TTL");
        }
        match end {
            export::End::Shutdown => return Ok(()),
            export::End::Lost(reason) => emit(events::Deactivated { reason: &reason }),
            export::End::Fatal(why) => return Err(ExporterError::Fatal(why)),
        }
    }
}

/// Asks the server what it is and judges it (`server.rs`), as `SERVER_CHECK` says; returns
/// how requests may be cut for it.
async fn check_server(
    config: &ExporterConfig,
    sender: &send::Sender,
) -> Result<batch::SeriesRule, ExporterError> {
    if config.server_check == ServerCheck::Off {
        return Ok(batch::SeriesRule::OnePerSeries);
    }
    let server = server::detect(sender.http(), sender.url()).await;
    let findings = server::judge(&server, config.retention);
    let mut warnings = findings.unsafe_.clone();
    warnings.extend(findings.warnings);
    let rule = server::series_rule(&server);
    emit(events::ServerChecked {
        url: sender.url().as_str(),
        server: server.name(),
        several_per_series: rule == batch::SeriesRule::Repeats,
        warnings: &warnings,
    });
    if config.server_check == ServerCheck::Require && !findings.unsafe_.is_empty() {
        return Err(ExporterError::UnsafeServer(findings.unsafe_.join("; ")));
    }
    Ok(rule)
}

/// Every few seconds while active: lag in seconds and revisions, and warnings as it approaches
/// `RETENTION` or `COMPACTION_WINDOW` (at most once a minute each).
async fn report(ctx: Arc<Context>, check: Check, shutdown: CancellationToken) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut warned: Option<Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let p = &ctx.progress;
        if !p.active.load(Ordering::Relaxed) {
            check.pass("standing by until this exporter owns its name");
            continue;
        }
        let caught_up = p.caught_up.load(Ordering::Relaxed);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let oldest = match p.oldest_pending_ms.load(Ordering::Relaxed) {
            0 if caught_up => now_ms,
            0 => match p.last_record_ms.load(Ordering::Relaxed) {
                0 => now_ms,
                ms => ms,
            },
            ms => ms,
        };
        let seconds = ((now_ms - oldest) as f64 / 1000.0).max(0.0);
        let revisions = if caught_up {
            0
        } else {
            current_revision(&ctx.source.client, &ctx.source.keys.data_prefix())
                .await
                .map_or(0, |r| r - p.checkpoint_revision.load(Ordering::Relaxed))
                .max(0)
        };
        let behind = Duration::from_secs_f64(seconds);
        if behind >= ctx.config.retention / 2 {
            check.fail(format!(
                "active, {seconds:.0}s behind: records may expire before they are exported (RETENTION {:?})",
                ctx.config.retention
            ));
        } else {
            check.pass(format!(
                "active, checkpoint revision {}, {seconds:.1}s behind",
                p.checkpoint_revision.load(Ordering::Relaxed)
            ));
        }
        let may_warn = warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        let lag = Duration::from_secs_f64(seconds);
        let config = &ctx.config;
        let retention = (may_warn && lag >= config.retention / 2).then_some(config.retention);
        let window = config.compaction_window;
        let compaction = (may_warn && !window.is_zero() && lag >= window / 2).then_some(window);
        if retention.is_some() || compaction.is_some() {
            warned = Some(Instant::now());
        }
        emit(events::Lag {
            seconds,
            revisions,
            retention,
            compaction,
        });
    }
}
