//! What the streamer reports: every metric it exports, with its help text. Each thing that
//! happens is one event type whose `emit` writes the log line and the metrics together
//! (see [`telemetry_shared::observe::InternalEvent`]).

use telemetry_shared::observe::MetricDef;

/// Every metric of the streamer (the shared ones are added by `observe`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter("streamer_rows_enqueued_total", "Rows enqueued as new messages."),
    MetricDef::counter(
        "streamer_duplicates_total",
        "Rows absorbed because their idempotency key was already enqueued.",
    ),
    MetricDef::counter(
        "streamer_rows_skipped_total",
        "Malformed or oversized rows skipped.",
    ),
    MetricDef::counter(
        "streamer_checkpoint_conflicts_total",
        "Commits refused because a streamer with the same stream id moved the checkpoint.",
    ),
    MetricDef::counter("streamer_passes_total", "Passes over the source completed."),
    MetricDef::counter(
        "streamer_backpressure_waits_total",
        "Times a worker waited because the queue was at MAX_QUEUE_DEPTH.",
    ),
    MetricDef::counter(
        "streamer_etcd_retries_total",
        "Enqueue transactions retried after etcd was unavailable or the outcome was unknown.",
    ),
    MetricDef::gauge("streamer_queue_depth", "Messages in the queue, as last read."),
    MetricDef::histogram(
        "streamer_txn_seconds",
        "Duration of one enqueue transaction (messages, dedup markers and checkpoint).",
    ),
];
