//! What the streamer reports: every metric it exports, with its help text, and one event type
//! per thing that happens. Each event's `emit` writes its log line and its metrics (and the
//! process's [`Totals`](crate::Totals) counters) together, so names, labels and levels never
//! drift apart (see [`telemetry_shared::observe::InternalEvent`]). A new signal is added here:
//! a name constant, a row in [`METRICS`] and the event that records it.

use std::fmt::Display;

use telemetry_shared::{
    Checkpoint,
    observe::{InternalEvent, MetricDef},
    retry::Backoff,
};

use crate::progress::Stats;

const ROWS_ENQUEUED: &str = "streamer_rows_enqueued_total";
const DUPLICATES: &str = "streamer_duplicates_total";
const ROWS_SKIPPED: &str = "streamer_rows_skipped_total";
const CONFLICTS: &str = "streamer_checkpoint_conflicts_total";
const PASSES: &str = "streamer_passes_total";
const BACKPRESSURE_WAITS: &str = "streamer_backpressure_waits_total";
const ETCD_RETRIES: &str = "streamer_etcd_retries_total";
const QUEUE_DEPTH: &str = "streamer_queue_depth";
const TXN_SECONDS: &str = "streamer_txn_seconds";
const SCRAPE_UP: &str = "streamer_scrape_up";
const SCRAPES: &str = "streamer_scrapes_total";
const SCRAPE_FAILURES: &str = "streamer_scrape_failures_total";
const SCRAPE_SAMPLES: &str = "streamer_scrape_samples_total";
const SCRAPE_SECONDS: &str = "streamer_scrape_duration_seconds";
const TARGETS_OWNED: &str = "streamer_scrape_targets_owned";

/// Every metric of the streamer (the shared ones are added by `observe`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        ROWS_ENQUEUED,
        "Rows (and scraped samples) enqueued as new messages.",
    ),
    MetricDef::counter(
        DUPLICATES,
        "Rows absorbed because their idempotency key was already enqueued.",
    ),
    MetricDef::counter(
        ROWS_SKIPPED,
        "Malformed or oversized rows skipped (counted when the checkpoint moves past them).",
    ),
    MetricDef::counter(
        CONFLICTS,
        "Commits refused because a streamer with the same stream id moved the checkpoint.",
    ),
    MetricDef::counter(PASSES, "Passes over the source completed."),
    MetricDef::counter(
        BACKPRESSURE_WAITS,
        "Times a worker waited because the queue was at MAX_QUEUE_DEPTH.",
    ),
    MetricDef::counter(
        ETCD_RETRIES,
        "etcd requests (enqueue transactions, checkpoint reads, lease grants) retried after etcd \
         was unavailable or the outcome was unknown.",
    ),
    MetricDef::gauge(QUEUE_DEPTH, "Messages in the queue, as last read."),
    MetricDef::histogram(
        TXN_SECONDS,
        "Duration of one enqueue transaction attempt (messages, dedup markers and checkpoint).",
    ),
    MetricDef::gauge(
        SCRAPE_UP,
        "1 if the last scrape of the target succeeded, 0 if it failed (targets this streamer owns).",
    )
    .labeled(),
    MetricDef::counter(SCRAPES, "Scrapes of the target completely enqueued.").labeled(),
    MetricDef::counter(
        SCRAPE_FAILURES,
        "Scrapes of the target that failed, by reason: down, timeout, http, malformed.",
    )
    .labeled(),
    MetricDef::counter(SCRAPE_SAMPLES, "Samples of the target enqueued as new messages.").labeled(),
    MetricDef::histogram(
        SCRAPE_SECONDS,
        "Duration of one scrape: fetching and parsing the target's exposition.",
    ),
    MetricDef::gauge(TARGETS_OWNED, "Scrape targets this streamer owns and scrapes."),
];

/// A chunk of a scrape landed: its samples are queued and the target's checkpoint moved.
pub(crate) struct ScrapeChunkCommitted<'a> {
    /// The process's counters.
    pub stats: &'a Stats,
    /// The target's URL.
    pub target: &'a str,
    /// Samples written.
    pub enqueued: u64,
    /// Samples absorbed (already enqueued by an earlier attempt of this scrape).
    pub duplicates: u64,
}

impl InternalEvent for ScrapeChunkCommitted<'_> {
    fn emit(self) {
        self.stats.record_commit(self.enqueued, self.duplicates, 0);
        metrics::counter!(ROWS_ENQUEUED).increment(self.enqueued);
        metrics::counter!(DUPLICATES).increment(self.duplicates);
        metrics::counter!(SCRAPE_SAMPLES, "target" => self.target.to_string()).increment(self.enqueued);
    }
}

/// A scrape of a target is completely enqueued.
pub(crate) struct ScrapeCompleted<'a> {
    /// The target's URL.
    pub target: &'a str,
    /// The scrape's number in the target's stream.
    pub seq: u64,
    /// The scrape time.
    pub time: &'a str,
    /// Samples in the scrape.
    pub samples: usize,
}

impl InternalEvent for ScrapeCompleted<'_> {
    fn emit(self) {
        tracing::debug!(target_url = %self.target, seq = self.seq, time = %self.time, samples = self.samples, "scrape enqueued");
        metrics::counter!(SCRAPES, "target" => self.target.to_string()).increment(1);
    }
}

/// A target answered with exposition text that parsed (whether or not it is then enqueued).
pub(crate) struct ScrapeSucceeded<'a> {
    /// The target's URL.
    pub target: &'a str,
    /// Seconds spent fetching and parsing.
    pub seconds: f64,
    /// How many failed scrapes this one ends (0: the target was up already).
    pub after_failures: u64,
}

impl InternalEvent for ScrapeSucceeded<'_> {
    fn emit(self) {
        if self.after_failures > 0 {
            tracing::info!(target_url = %self.target, failed_scrapes = self.after_failures, "scrape target is up again");
        }
        metrics::gauge!(SCRAPE_UP, "target" => self.target.to_string()).set(1.0);
        metrics::histogram!(SCRAPE_SECONDS).record(self.seconds);
    }
}

/// A scrape failed: the target is down, slow, or serves something that is not exposition text.
/// Logged once per change of state (first failure, or another kind of failure); counted every
/// time.
pub(crate) struct ScrapeFailed<'a> {
    /// The target's URL.
    pub target: &'a str,
    /// down, timeout, http or malformed.
    pub reason: &'static str,
    /// What went wrong.
    pub error: &'a (dyn Display + Sync),
    /// Whether this failure changes the target's state (then it is logged).
    pub changed: bool,
}

impl InternalEvent for ScrapeFailed<'_> {
    fn emit(self) {
        if self.changed {
            tracing::warn!(
                target_url = %self.target, reason = self.reason, error = %self.error,
                "scrape target failing; retrying every SCRAPE_INTERVAL (logged again when it changes)"
            );
        }
        metrics::gauge!(SCRAPE_UP, "target" => self.target.to_string()).set(0.0);
        metrics::counter!(SCRAPE_FAILURES, "target" => self.target.to_string(), "reason" => self.reason)
            .increment(1);
    }
}

/// This streamer took a target over or gave it up.
pub(crate) struct TargetOwnership<'a> {
    /// The target's URL.
    pub target: &'a str,
    /// True: it owns the target now; false: it no longer does.
    pub owned: bool,
}

impl InternalEvent for TargetOwnership<'_> {
    fn emit(self) {
        if self.owned {
            tracing::info!(target_url = %self.target, "scraping target (owner)");
            metrics::gauge!(TARGETS_OWNED).increment(1.0);
        } else {
            tracing::info!(target_url = %self.target, "no longer scraping target (another streamer owns it, or it was removed)");
            metrics::gauge!(TARGETS_OWNED).decrement(1.0);
        }
    }
}

/// A scrape that a crashed (or fenced-out) streamer left half enqueued is finished.
pub(crate) struct ScrapeResumed<'a> {
    /// The target's URL.
    pub target: &'a str,
    /// The scrape's number.
    pub seq: u64,
    /// Its scrape time (kept).
    pub time: &'a str,
    /// Samples already settled.
    pub settled: u64,
}

impl InternalEvent for ScrapeResumed<'_> {
    fn emit(self) {
        tracing::info!(
            target_url = %self.target, seq = self.seq, time = %self.time, settled = self.settled,
            "resuming an unfinished scrape with its own scrape time; samples already enqueued are absorbed"
        );
    }
}

/// A transaction landed: its messages are queued and the checkpoint moved past its rows.
/// Every row-fate counter is recorded here, once per committed row, so two same-id streamers
/// never count one row twice.
pub(crate) struct ChunkCommitted<'a> {
    /// The process's counters.
    pub stats: &'a Stats,
    /// The stream id.
    pub stream: &'a str,
    /// The checkpoint the transaction wrote.
    pub checkpoint: &'a Checkpoint,
    /// Messages written.
    pub enqueued: u64,
    /// Rows absorbed as duplicates.
    pub duplicates: &'a [u64],
    /// Rows skipped (malformed or too large).
    pub skipped: u64,
}

impl InternalEvent for ChunkCommitted<'_> {
    fn emit(self) {
        let duplicates = self.duplicates.len() as u64;
        tracing::debug!(
            stream = %self.stream,
            pass = self.checkpoint.pass,
            row = self.checkpoint.row,
            pass_complete = self.checkpoint.pass_complete,
            enqueued = self.enqueued,
            duplicates = ?self.duplicates,
            skipped = self.skipped,
            "chunk committed"
        );
        self.stats.record_commit(self.enqueued, duplicates, self.skipped);
        metrics::counter!(ROWS_ENQUEUED).increment(self.enqueued);
        metrics::counter!(DUPLICATES).increment(duplicates);
        metrics::counter!(ROWS_SKIPPED).increment(self.skipped);
    }
}

/// Why a row cannot become a message.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SkipReason<'a> {
    /// The source rejected it (field count, UTF-8, quoting).
    Malformed(&'a str),
    /// Its encoded message is larger than etcd should carry.
    TooLarge {
        /// The encoded size.
        bytes: usize,
    },
}

/// A row was read that cannot become a message. Logged when read; counted (in
/// [`ChunkCommitted`]) when the checkpoint moves past it.
pub(crate) struct RowSkipped<'a> {
    /// The stream id.
    pub stream: &'a str,
    /// The data row number.
    pub row: u64,
    /// The line of the file it starts on.
    pub line: u64,
    /// Why.
    pub reason: SkipReason<'a>,
}

impl InternalEvent for RowSkipped<'_> {
    fn emit(self) {
        match self.reason {
            SkipReason::Malformed(reason) => tracing::warn!(
                stream = %self.stream, row = self.row, line = self.line, %reason,
                "skipping malformed row"
            ),
            SkipReason::TooLarge { bytes } => tracing::warn!(
                stream = %self.stream, row = self.row, line = self.line, bytes,
                "skipping row too large for etcd"
            ),
        }
    }
}

/// A commit was refused because a streamer with the same stream id moved the checkpoint.
pub(crate) struct CheckpointConflict<'a> {
    /// The process's counters.
    pub stats: &'a Stats,
    /// The stream id.
    pub stream: &'a str,
    /// The checkpoint as stored now.
    pub current: Option<&'a Checkpoint>,
}

impl InternalEvent for CheckpointConflict<'_> {
    fn emit(self) {
        tracing::info!(
            stream = %self.stream,
            current = ?self.current,
            "checkpoint advanced by another streamer with the same stream id; adopting its position"
        );
        self.stats.record_conflict();
        metrics::counter!(CONFLICTS).increment(1);
    }
}

/// Every row of a pass is settled.
pub(crate) struct PassCompleted<'a> {
    /// The process's counters.
    pub stats: &'a Stats,
    /// The stream id.
    pub stream: &'a str,
    /// The pass.
    pub pass: u64,
}

impl InternalEvent for PassCompleted<'_> {
    fn emit(self) {
        tracing::info!(stream = %self.stream, pass = self.pass, "pass complete");
        self.stats.record_pass();
        metrics::counter!(PASSES).increment(1);
    }
}

/// The queue depth was read from etcd.
pub(crate) struct QueueDepthRead {
    /// Messages in the queue.
    pub depth: i64,
}

impl InternalEvent for QueueDepthRead {
    fn emit(self) {
        tracing::trace!(depth = self.depth, "queue depth read");
        metrics::gauge!(QUEUE_DEPTH).set(self.depth as f64);
    }
}

/// A worker waits because the queue is at `MAX_QUEUE_DEPTH`.
pub(crate) struct BackpressureWait {
    /// The depth as last read.
    pub depth: i64,
    /// `MAX_QUEUE_DEPTH`.
    pub max: i64,
    /// Whether this is the first wait since the queue last had room (logged at info level;
    /// the waits that follow at debug level).
    pub first: bool,
}

impl InternalEvent for BackpressureWait {
    fn emit(self) {
        if self.first {
            tracing::info!(
                depth = self.depth,
                max = self.max,
                "queue depth at MAX_QUEUE_DEPTH; waiting for collectors"
            );
        } else {
            tracing::debug!(depth = self.depth, max = self.max, "queue still full; waiting");
        }
        metrics::counter!(BACKPRESSURE_WAITS).increment(1);
    }
}

/// The queue has room again after workers waited.
pub(crate) struct BackpressureReleased {
    /// The depth as last read.
    pub depth: i64,
    /// `MAX_QUEUE_DEPTH`.
    pub max: i64,
}

impl InternalEvent for BackpressureReleased {
    fn emit(self) {
        tracing::info!(
            depth = self.depth,
            max = self.max,
            "queue depth below MAX_QUEUE_DEPTH; resuming"
        );
    }
}

/// An etcd request failed in a way retrying fixes, and will be retried. The log line is the
/// shared [`Backoff`]'s: a warning when an outage begins, debug lines while it lasts.
pub(crate) struct EtcdRetry<'a> {
    /// The retry loop's state.
    pub backoff: &'a mut Backoff,
    /// What failed.
    pub error: &'a dyn Display,
}

impl InternalEvent for EtcdRetry<'_> {
    fn emit(self) {
        self.backoff.failed(self.error);
        metrics::counter!(ETCD_RETRIES).increment(1);
    }
}

/// An enqueue transaction attempt returned (landed, refused, or failed).
pub(crate) struct EnqueueTxn<'a> {
    /// The stream id.
    pub stream: &'a str,
    /// Messages it carried.
    pub messages: usize,
    /// How long etcd took to answer.
    pub seconds: f64,
    /// `committed`, `refused` or `error`.
    pub outcome: &'static str,
}

impl InternalEvent for EnqueueTxn<'_> {
    fn emit(self) {
        tracing::trace!(
            stream = %self.stream,
            messages = self.messages,
            seconds = self.seconds,
            outcome = self.outcome,
            "enqueue transaction"
        );
        metrics::histogram!(TXN_SECONDS).record(self.seconds);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use telemetry_shared::{observe::emit, retry::Policy};

    use super::*;

    /// Emits one of every event, renders the process's Prometheus exposition, and checks that
    /// the metrics emitted are exactly the table's and that `promtool check metrics` is happy.
    #[test]
    fn every_event_metric_is_in_the_table_and_promtool_is_clean() {
        let handle = telemetry_shared::observe::prometheus("streamer", env!("CARGO_PKG_VERSION"), METRICS)
            .expect("the first recorder of this test process");
        let stats = Stats::default();
        let checkpoint = Checkpoint::default();
        emit(ChunkCommitted {
            stats: &stats,
            stream: "s",
            checkpoint: &checkpoint,
            enqueued: 3,
            duplicates: &[4],
            skipped: 1,
        });
        emit(RowSkipped {
            stream: "s",
            row: 5,
            line: 6,
            reason: SkipReason::Malformed("has 2 fields"),
        });
        emit(CheckpointConflict {
            stats: &stats,
            stream: "s",
            current: Some(&checkpoint),
        });
        emit(PassCompleted {
            stats: &stats,
            stream: "s",
            pass: 0,
        });
        emit(QueueDepthRead { depth: 7 });
        emit(ScrapeChunkCommitted {
            stats: &stats,
            target: "http://a/metrics",
            enqueued: 3,
            duplicates: 1,
        });
        emit(ScrapeCompleted {
            target: "http://a/metrics",
            seq: 1,
            time: "t",
            samples: 4,
        });
        emit(ScrapeSucceeded {
            target: "http://a/metrics",
            seconds: 0.1,
            after_failures: 1,
        });
        emit(ScrapeFailed {
            target: "http://b/metrics",
            reason: "timeout",
            error: &"slow",
            changed: true,
        });
        emit(TargetOwnership {
            target: "http://a/metrics",
            owned: true,
        });
        emit(ScrapeResumed {
            target: "http://a/metrics",
            seq: 1,
            time: "t",
            settled: 63,
        });
        emit(BackpressureWait {
            depth: 7,
            max: 7,
            first: true,
        });
        emit(BackpressureReleased { depth: 1, max: 7 });
        let mut backoff = Backoff::new(Policy::FAST, "test");
        emit(EtcdRetry {
            backoff: &mut backoff,
            error: &"unavailable",
        });
        emit(EnqueueTxn {
            stream: "s",
            messages: 3,
            seconds: 0.002,
            outcome: "committed",
        });
        let totals = stats.totals();
        assert_eq!(
            (
                totals.enqueued,
                totals.duplicates,
                totals.skipped,
                totals.conflicts,
                totals.passes
            ),
            (6, 2, 1, 1, 1),
            "a scraped chunk counts like a CSV chunk"
        );

        let text = handle.render();
        let emitted: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| *name != "streamer_build_info")
            // The shared metrics (retries, watches) are registered at start, unused or not.
            .filter(|name| {
                !telemetry_shared::observe::SHARED_METRICS
                    .iter()
                    .any(|m| m.name == *name)
            })
            .collect();
        let table: BTreeSet<&str> = METRICS.iter().map(|m| m.name).collect();
        assert_eq!(emitted, table, "emitted metrics and the table differ:\n{text}");
        assert!(
            text.contains("streamer_txn_seconds_bucket{le=\"0.0025\"} 1"),
            "durations are histograms with buckets:\n{text}"
        );
        if let Err(complaints) = telemetry_harness::promtool_check_metrics(&text) {
            panic!("promtool check metrics:\n{complaints}\n{text}");
        }
    }
}
