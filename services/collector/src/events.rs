//! What the collector reports. Each thing that happens is one event type whose `emit` writes
//! the log line and updates the metrics together (Vector's `internal_events`), and [`METRICS`]
//! lists every metric with its help text, so a new signal is added here and nowhere else.

use std::time::Duration;

use telemetry_shared::observe::{InternalEvent, MetricDef};

use crate::commit::{CommitError, Effects, UnreadableStats};

/// Every metric of the collector (the shared ones are added by `observe`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter("collector_processed_total", "Telemetry records stored."),
    MetricDef::counter(
        "collector_duplicates_total",
        "Messages absorbed because their idempotency key was already processed.",
    ),
    MetricDef::counter(
        "collector_dead_lettered_total",
        "Messages moved to the dead letters.",
    ),
    MetricDef::counter("collector_commits_total", "Partition batches committed."),
    MetricDef::counter(
        "collector_landed_earlier_total",
        "Queue entries found already settled by an earlier attempt whose reply was lost.",
    ),
    MetricDef::counter(
        "collector_vanished_total",
        "Queue entries removed by someone else before this collector settled them.",
    ),
    MetricDef::counter(
        "collector_commit_errors_total",
        "Commits that failed in a way retrying the same transaction does not fix; the batch is rebuilt.",
    ),
    MetricDef::counter(
        "collector_fence_refusals_total",
        "Commits refused because the partition's owner key no longer carries this collector's lease.",
    ),
    MetricDef::counter(
        "collector_unreadable_stats_total",
        "Partition loads refused because the partition's stats counter is not readable.",
    ),
    MetricDef::counter(
        "collector_partition_acquisitions_total",
        "Queue partitions this collector acquired.",
    ),
    MetricDef::counter(
        "collector_partition_resyncs_total",
        "Partitions ranged again because their watch fell behind a compaction.",
    ),
    MetricDef::counter("collector_sessions_total", "Session leases granted."),
    MetricDef::counter("collector_sessions_lost_total", "Session leases lost."),
    MetricDef::gauge("collector_queue_depth", "Messages in the queue, as last read."),
    MetricDef::gauge(
        "collector_lag_seconds",
        "Age of the oldest message waiting in the partitions this collector owns.",
    ),
    MetricDef::gauge(
        "collector_partitions_owned",
        "Queue partitions this collector owns.",
    ),
    MetricDef::histogram(
        "collector_commit_seconds",
        "Time from submitting a partition batch to its commit.",
    ),
    MetricDef::histogram(
        "collector_partitions_per_commit",
        "Partition batches merged into one commit transaction.",
    ),
];

/// A session lease was granted and the collector registered under it.
pub(crate) struct SessionStarted<'a> {
    pub collector: &'a str,
    pub lease: i64,
    pub ttl: Duration,
}

impl InternalEvent for SessionStarted<'_> {
    fn emit(self) {
        tracing::info!(collector = self.collector, lease = self.lease, ttl = ?self.ttl, "session started");
        metrics::counter!("collector_sessions_total").increment(1);
    }
}

/// The session lease was lost (not renewed in time, or unknown to etcd).
pub(crate) struct SessionLost<'a> {
    pub lease: i64,
    pub reason: &'a str,
}

impl InternalEvent for SessionLost<'_> {
    fn emit(self) {
        tracing::warn!(
            lease = self.lease,
            reason = self.reason,
            "session lease lost; stopping commits"
        );
        metrics::counter!("collector_sessions_lost_total").increment(1);
    }
}

/// A partition was acquired and loaded.
pub(crate) struct PartitionAcquired {
    pub partition: u32,
    pub pending: usize,
}

impl InternalEvent for PartitionAcquired {
    fn emit(self) {
        tracing::info!(
            partition = self.partition,
            pending = self.pending,
            "partition acquired"
        );
        metrics::counter!("collector_partition_acquisitions_total").increment(1);
    }
}

/// A partition's watch lost history and the partition was ranged again.
pub(crate) struct PartitionResynced {
    pub partition: u32,
}

impl InternalEvent for PartitionResynced {
    fn emit(self) {
        tracing::warn!(
            partition = self.partition,
            "partition watch fell behind a compaction; ranged again"
        );
        metrics::counter!("collector_partition_resyncs_total").increment(1);
    }
}

/// The partitions owned changed.
pub(crate) struct PartitionsOwned {
    pub count: usize,
}

impl InternalEvent for PartitionsOwned {
    fn emit(self) {
        metrics::gauge!("collector_partitions_owned").set(self.count as f64);
    }
}

/// Several partitions' batches went into one transaction.
pub(crate) struct GroupCommit {
    pub partitions: usize,
}

impl InternalEvent for GroupCommit {
    fn emit(self) {
        metrics::histogram!("collector_partitions_per_commit").record(self.partitions as f64);
    }
}

/// A partition batch landed.
pub(crate) struct BatchCommitted<'a> {
    pub partition: u32,
    pub effects: Effects,
    /// (queue key, reason) of each dead letter written.
    pub dead_letters: &'a [(String, String)],
    pub elapsed: Duration,
}

impl InternalEvent for BatchCommitted<'_> {
    fn emit(self) {
        let e = self.effects;
        tracing::debug!(
            partition = self.partition,
            records = e.records,
            duplicates = e.duplicates,
            dead = e.dead,
            "batch committed"
        );
        for (queue_key, reason) in self.dead_letters {
            tracing::warn!(partition = self.partition, %queue_key, %reason, "invalid message dead-lettered");
        }
        if e.landed_earlier > 0 {
            tracing::info!(
                partition = self.partition,
                entries = e.landed_earlier,
                "an earlier attempt whose reply was lost had settled these entries; not settling them again"
            );
        }
        if e.vanished > 0 {
            tracing::warn!(
                partition = self.partition,
                entries = e.vanished,
                "queue entries were removed by someone else before they were settled"
            );
        }
        metrics::counter!("collector_commits_total").increment(1);
        metrics::counter!("collector_processed_total").increment(e.records as u64);
        metrics::counter!("collector_duplicates_total").increment(e.duplicates as u64);
        metrics::counter!("collector_dead_lettered_total").increment(e.dead as u64);
        metrics::counter!("collector_landed_earlier_total").increment(e.landed_earlier as u64);
        metrics::counter!("collector_vanished_total").increment(e.vanished as u64);
        metrics::histogram!("collector_commit_seconds").record(self.elapsed.as_secs_f64());
    }
}

/// A commit failed in a way the committer does not retry by itself.
pub(crate) struct CommitFailed<'a> {
    pub partition: u32,
    pub error: &'a CommitError,
    /// The first failure of an outage (later ones are logged at debug level).
    pub first: bool,
}

impl InternalEvent for CommitFailed<'_> {
    fn emit(self) {
        if self.first {
            tracing::error!(partition = self.partition, error = %self.error, "commit failed; rebuilding the batch and retrying with backoff");
        } else {
            tracing::debug!(partition = self.partition, error = %self.error, "commit failed again");
        }
        metrics::counter!("collector_commit_errors_total").increment(1);
    }
}

/// A commit was refused by the fence: the partition is no longer ours.
pub(crate) struct FenceRefused {
    pub partition: u32,
}

impl InternalEvent for FenceRefused {
    fn emit(self) {
        tracing::warn!(
            partition = self.partition,
            "commit refused by the fence: partition is no longer ours"
        );
        metrics::counter!("collector_fence_refusals_total").increment(1);
    }
}

/// A partition's stats counter is not readable; the partition waits instead of resetting it.
pub(crate) struct StatsUnreadable<'a> {
    pub error: &'a UnreadableStats,
    pub first: bool,
}

impl InternalEvent for StatsUnreadable<'_> {
    fn emit(self) {
        if self.first {
            tracing::error!(key = %self.error.key, error = %self.error, "partition not loaded");
        }
        metrics::counter!("collector_unreadable_stats_total").increment(1);
    }
}

/// The periodic report: queue depth, lag and progress.
pub(crate) struct Progress {
    pub depth: i64,
    pub lag: Duration,
    pub records_per_s: f64,
    pub totals: crate::Totals,
    /// Something changed since the last report (only then is a line logged).
    pub changed: bool,
}

impl InternalEvent for Progress {
    fn emit(self) {
        metrics::gauge!("collector_queue_depth").set(self.depth as f64);
        metrics::gauge!("collector_lag_seconds").set(self.lag.as_secs_f64());
        if self.changed {
            let t = self.totals;
            tracing::info!(
                records_per_s = format!("{:.1}", self.records_per_s),
                processed = t.processed,
                duplicates = t.duplicates,
                dead_lettered = t.dead_lettered,
                fence_refusals = t.fence_refusals,
                queue_depth = self.depth,
                lag_s = self.lag.as_secs_f64(),
                "progress"
            );
        }
    }
}
