//! What the collector reports: every metric it exports, with its help text. Each thing that
//! happens is one event type whose `emit` writes the log line and the metrics together
//! (see [`telemetry_shared::observe::InternalEvent`]).

use telemetry_shared::observe::MetricDef;

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
    MetricDef::counter("collector_commits_total", "Commit transactions that landed."),
    MetricDef::counter(
        "collector_commit_errors_total",
        "Commit attempts that failed (etcd unavailable or outcome unknown) and were retried.",
    ),
    MetricDef::counter(
        "collector_fence_refusals_total",
        "Commits refused because the partition's owner key no longer carries this collector's lease.",
    ),
    MetricDef::counter(
        "collector_partition_acquisitions_total",
        "Queue partitions this collector acquired.",
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
        "Duration of one partition batch's commit.",
    ),
    MetricDef::histogram(
        "collector_partitions_per_commit",
        "Partition batches merged into one commit transaction.",
    ),
];
