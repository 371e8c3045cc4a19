//! The streamer: CSV rows in, queued telemetry messages out, exactly once. With
//! `SCRAPE_TARGETS` it also (or only) scrapes dcgm-exporter endpoints: `scrape` fetches, parses
//! and converts each scrape into DCGM-shaped messages and enqueues them through the same `sink`,
//! exactly once per scrape, one streamer owning each target on a leased key.
//!
//! The pipeline inside is `source → transform → sink`:
//! - [`source`] reads the CSV (RFC 4180), numbers its rows and fingerprints the file;
//! - [`transform`] turns a row into a `v1` message with a ULID, the processing time and an
//!   idempotency key;
//! - `sink` enqueues chunks of messages in etcd transactions that advance the stream's fenced
//!   checkpoint, which records the file's fingerprint: the checkpoint compare is what lets each
//!   row be enqueued once (a scraped sample also has a dedup marker, guarded by a compare).
//!
//! Around it: `worker`s (each streams the whole file under its own stream id, at its own
//! rate), `backpressure` (waits while the queue is full), `progress` (log lines, bar,
//! counters) and [`events`] (every log line that goes with a metric, and the metric table).
//! [`run`] is the entry point; the binary is a thin wrapper that reads the config, connects and
//! calls it. `source` and `transform` are public for the benchmarks.

mod backpressure;
mod config;
pub mod events;
mod progress;
mod scrape;
mod sink;
pub mod source;
pub mod transform;
mod worker;

use std::sync::Arc;

use etcd_client::Client;
use telemetry_shared::{Keyspace, etcd::BucketedLease, health::Health};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

pub use config::{Flags, Keep, ScrapeConfig, StreamerConfig, TargetList};
pub use progress::Totals;
pub use scrape::{TargetFileError, target_stream_id};
pub use sink::SinkError;
pub use source::SourceError;

/// Errors that end a streamer run.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    /// The CSV file cannot be read.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// etcd refused in a way retrying does not fix.
    #[error(transparent)]
    Sink(#[from] SinkError),
    /// The stream's checkpoint was written while streaming another file (or this file before
    /// it was edited): its row number is not a position in this one.
    #[error(
        "stream {stream} was started with a different file: its checkpoint (pass {pass}, row {row}) \
         is a position in a file with fingerprint {stored}, but {path} has fingerprint {current}; \
         resuming would skip or repeat rows. To stream this file, start a new stream: set another \
         STREAM_ID"
    )]
    DifferentFile {
        /// The stream id (`STREAM_ID` and the worker suffix).
        stream: String,
        /// The file given now.
        path: String,
        /// The fingerprint in the checkpoint.
        stored: String,
        /// The fingerprint of the file given now.
        current: String,
        /// The checkpoint's pass.
        pass: u64,
        /// The checkpoint's row.
        row: u64,
    },
    /// A message could not be encoded (should not happen for CSV input).
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// The scrape target file cannot be read at start.
    #[error(transparent)]
    Targets(#[from] TargetFileError),
    /// A worker task panicked or was aborted.
    #[error("worker failed: {0}")]
    Worker(String),
}

/// Streams `config.csv_path` into the queue until done (one-shot) or until `shutdown` is
/// cancelled, and scrapes the `SCRAPE_TARGETS` (if any) until shutdown; returns the totals.
/// In-flight transactions are finished, never cut, so every checkpoint is always consistent with
/// the queue. A stream whose checkpoint was written for another file is refused before anything
/// is enqueued ([`StreamerError::DifferentFile`]).
pub async fn run(
    config: StreamerConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Totals, StreamerError> {
    let health = Health::new("streamer", &shutdown);
    run_with_health(config, client, shutdown, health).await
}

/// [`run`], reporting to `health`: each worker (and the scrape source) is a watched loop, and
/// the readiness check `stream` passes once the workers stream and fails while etcd requests are
/// being retried.
pub async fn run_with_health(
    config: StreamerConfig,
    client: Client,
    shutdown: CancellationToken,
    health: Health,
) -> Result<Totals, StreamerError> {
    health.set_etcd(&client);
    let stream = health.check("stream", "reading the source and the stream checkpoints");
    let keys = Keyspace::new(&config.common.etcd_namespace);
    let markers = Arc::new(BucketedLease::new(client.clone(), config.dedup_ttl));
    let sink =
        sink::Sink::new(client.clone(), keys.clone(), markers, shutdown.clone()).reporting_to(stream.clone());
    let gauge = Arc::new(backpressure::DepthGauge::new(
        client.clone(),
        keys.queue_prefix(),
        config.max_queue_depth,
    ));
    let stats = Arc::new(progress::Stats::default());
    let mut scraping = config.scrape.clone().map(|scrape| {
        tracing::info!(
            targets = ?scrape.targets,
            interval = ?scrape.interval,
            timeout = ?scrape.timeout,
            "scraping targets"
        );
        let ctx = Arc::new(scrape::Ctx::new(
            scrape,
            client.clone(),
            keys.clone(),
            sink.clone(),
            gauge.clone(),
            stats.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(health.watch("scrape", scrape::run(ctx)))
    });
    let result = match config.csv_path.clone() {
        Some(csv_path) => {
            let csv = Csv {
                config,
                csv_path,
                sink,
                gauge,
                stats: stats.clone(),
                shutdown: shutdown.clone(),
            };
            let result = stream_csv(csv, &health, &stream).await;
            if result.is_err() {
                shutdown.cancel();
            }
            result
        }
        None => {
            stream.pass("scraping");
            // The CSV workers' progress line, for the scraped samples alone.
            let reporter = progress::spawn_reporter(stats.clone(), gauge, config.progress_interval, None);
            let scraped = match scraping.take() {
                Some(task) => task
                    .await
                    .unwrap_or_else(|e| Err(StreamerError::Worker(e.to_string()))),
                None => Ok(()),
            };
            reporter.stop().await;
            scraped
        }
    };
    let scraped = match scraping {
        Some(task) => {
            // A one-shot CSV run that ended leaves the scraping running until shutdown.
            task.await
                .unwrap_or_else(|e| Err(StreamerError::Worker(e.to_string())))
        }
        None => Ok(()),
    };
    let totals = stats.totals();
    tracing::info!(
        enqueued = totals.enqueued,
        duplicates = totals.duplicates,
        skipped = totals.skipped,
        conflicts = totals.conflicts,
        passes = totals.passes,
        "streamer stopped"
    );
    result.and(scraped).map(|()| totals)
}

/// What the CSV source needs.
struct Csv {
    config: StreamerConfig,
    csv_path: std::path::PathBuf,
    sink: sink::Sink,
    gauge: Arc<backpressure::DepthGauge>,
    stats: Arc<progress::Stats>,
    shutdown: CancellationToken,
}

/// Streams the CSV file with `WORKERS` workers until done (one-shot) or shutdown.
async fn stream_csv(
    csv: Csv,
    health: &Health,
    stream: &telemetry_shared::health::Check,
) -> Result<(), StreamerError> {
    let Csv {
        config,
        csv_path,
        sink,
        gauge,
        stats,
        shutdown,
    } = csv;
    // One scan decides column types, fingerprints the file and counts rows for progress.
    let scan = source::scan(&csv_path)?;
    if !same_file_for_every_worker(&config, &csv_path, &sink, &scan.fingerprint).await? {
        return Ok(());
    }
    stream.pass(format!("{} worker(s) streaming", config.workers));
    tracing::info!(
        csv = %csv_path.display(),
        rows = scan.types.data_rows(),
        fingerprint = %scan.fingerprint,
        workers = config.workers,
        rate = ?config.rate,
        loop_mode = config.loop_mode,
        stream_id = %config.stream_id,
        "streamer starting"
    );
    let bar_total = (!config.loop_mode).then(|| scan.types.data_rows() * u64::from(config.workers));
    let reporter =
        progress::spawn_reporter(stats.clone(), gauge.clone(), config.progress_interval, bar_total);
    let workers = config.workers;
    let shared = Arc::new(worker::Shared {
        config,
        csv_path,
        sink,
        gauge,
        stats,
        types: scan.types,
        fingerprint: scan.fingerprint,
        shutdown,
    });
    let mut tasks = JoinSet::new();
    for index in 0..workers {
        tasks.spawn(health.watch(&format!("worker {index}"), worker::run(shared.clone(), index)));
    }
    let result = join_workers(tasks, &shared.shutdown).await;
    reporter.stop().await;
    result
}

/// Checks, before any worker starts, that no worker's stream was started with another file.
/// `Ok(false)` if shutdown came while etcd was unreachable.
async fn same_file_for_every_worker(
    config: &StreamerConfig,
    csv_path: &std::path::Path,
    sink: &sink::Sink,
    fingerprint: &str,
) -> Result<bool, StreamerError> {
    for index in 0..config.workers {
        let stream_id = config.worker_stream_id(index);
        let (checkpoint, _) = match sink.read_checkpoint(&stream_id).await {
            Ok(stored) => stored,
            Err(err) if err.is_cancelled() => return Ok(false),
            Err(err) => return Err(err.into()),
        };
        worker::check_source(&stream_id, csv_path, fingerprint, checkpoint.as_ref())?;
    }
    Ok(true)
}

/// Waits for every worker; the first failure cancels the others and is returned.
async fn join_workers(
    mut tasks: JoinSet<Result<(), StreamerError>>,
    shutdown: &CancellationToken,
) -> Result<(), StreamerError> {
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| Err(StreamerError::Worker(e.to_string())));
        if let Err(err) = result {
            tracing::error!(error = %err, "worker failed; stopping the others");
            shutdown.cancel();
            first_error.get_or_insert(err);
        }
    }
    first_error.map_or(Ok(()), Err)
}
