//! The streamer: CSV rows in, queued telemetry messages out, exactly once.
//!
//! The pipeline inside is `source → transform → sink`:
//! - [`source`] reads the CSV (RFC 4180) and numbers its rows;
//! - [`transform`] turns a row into a `v1` message with a ULID, the processing time and an
//!   idempotency key;
//! - [`sink`] enqueues chunks of messages in etcd transactions that also write each message's
//!   dedup marker (guarded by a compare) and advance the stream's fenced checkpoint.
//!
//! Around it: [`worker`]s (each streams the whole file under its own stream id, at its own
//! rate), [`backpressure`] (waits while the queue is full) and [`progress`] (log lines, bar,
//! counters). [`run`] is the entry point; the binary is a thin wrapper that reads the config,
//! connects and calls it.

pub mod backpressure;
pub mod config;
pub mod events;
pub mod progress;
pub mod sink;
pub mod source;
pub mod transform;
mod worker;

use std::sync::Arc;

use etcd_client::Client;
use telemetry_shared::{Keyspace, etcd::BucketedLease};
use tokio_util::sync::CancellationToken;

pub use config::{Flags, StreamerConfig};
pub use progress::Totals;

/// Errors that end a streamer run.
#[derive(Debug, thiserror::Error)]
pub enum StreamerError {
    /// The CSV file cannot be read.
    #[error(transparent)]
    Source(#[from] source::SourceError),
    /// etcd refused in a way retrying does not fix.
    #[error(transparent)]
    Sink(#[from] sink::SinkError),
    /// A message could not be encoded (should not happen for CSV input).
    #[error("cannot encode message: {0}")]
    Encode(#[source] serde_json::Error),
    /// A worker task panicked or was aborted.
    #[error("worker failed: {0}")]
    Worker(String),
}

/// Streams `config.csv_path` into the queue until done (one-shot) or until `shutdown` is
/// cancelled, and returns the totals. In-flight transactions are finished, never cut, so the
/// checkpoint is always consistent with the queue.
pub async fn run(
    config: StreamerConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Totals, StreamerError> {
    // One scan decides column types, checks the file is readable and counts rows for progress.
    let types = source::ColumnTypes::scan(&config.csv_path)?;
    let keys = Keyspace::new(&config.common.etcd_namespace);
    let markers = Arc::new(BucketedLease::new(client.clone(), config.dedup_ttl));
    let sink = sink::Sink::new(client.clone(), keys.clone(), markers, shutdown.clone());
    let gauge = Arc::new(backpressure::DepthGauge::new(
        client.clone(),
        keys.queue_prefix(),
        config.max_queue_depth,
    ));
    let stats = Arc::new(progress::Stats::default());
    tracing::info!(
        csv = %config.csv_path.display(),
        rows = types.data_rows(),
        workers = config.workers,
        rate = ?config.rate,
        loop_mode = config.loop_mode,
        stream_id = %config.stream_id,
        "streamer starting"
    );
    let bar_total = (!config.loop_mode).then(|| types.data_rows() * u64::from(config.workers));
    let stop_reporter = CancellationToken::new();
    let reporter = progress::spawn_reporter(
        stats.clone(),
        gauge.clone(),
        config.progress_interval,
        bar_total,
        stop_reporter.clone(),
    );
    let workers = config.workers;
    let shared = Arc::new(worker::Shared {
        config,
        sink,
        gauge,
        stats: stats.clone(),
        types,
        shutdown,
    });
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..workers {
        tasks.spawn(worker::run(shared.clone(), index));
    }
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        let result = joined.unwrap_or_else(|e| Err(StreamerError::Worker(e.to_string())));
        if let Err(err) = result {
            tracing::error!(error = %err, "worker failed; stopping the others");
            shared.shutdown.cancel();
            first_error.get_or_insert(err);
        }
    }
    stop_reporter.cancel();
    let _ = reporter.await;
    let totals = stats.totals();
    tracing::info!(
        enqueued = totals.enqueued,
        duplicates = totals.duplicates,
        skipped = totals.skipped,
        conflicts = totals.conflicts,
        passes = totals.passes,
        "streamer stopped"
    );
    match first_error {
        Some(err) => Err(err),
        None => Ok(totals),
    }
}
