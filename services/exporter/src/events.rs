//! What the exporter reports. Each thing that happens is one event type whose `emit` writes
//! the log line and updates the metrics together (Vector's `internal_events`), and [`METRICS`]
//! lists every metric with its help text, so a new signal is added here and nowhere else.

use std::time::Duration;

use telemetry_shared::{
    model::{ExportCheckpoint, ExportGap},
    observe::{InternalEvent, MetricDef},
};

/// Every metric of the exporter (the shared ones are added by `observe`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        "exporter_records_exported_total",
        "Records whose samples the TSDB acknowledged.",
    ),
    MetricDef::counter(
        "exporter_samples_exported_total",
        "Samples the TSDB acknowledged.",
    ),
    MetricDef::counter(
        "exporter_records_rejected_total",
        "Records rejected: they cannot become valid samples, or the TSDB refused them.",
    ),
    MetricDef::counter(
        "exporter_records_expired_total",
        "Records that expired in etcd before the export reached them (found while catching up).",
    ),
    MetricDef::counter(
        "exporter_requests_total",
        "Remote-write requests sent, by outcome (landed, refused, retried, misconfigured).",
    )
    .labeled(),
    MetricDef::histogram(
        "exporter_request_seconds",
        "Time from sending a remote-write request to its answer.",
    ),
    MetricDef::histogram(
        "exporter_request_samples",
        "Samples per remote-write request sent.",
    ),
    MetricDef::counter(
        "exporter_checkpoints_total",
        "Checkpoint advances written to etcd.",
    ),
    MetricDef::gauge(
        "exporter_checkpoint_revision",
        "The etcd revision of the checkpoint: every record up to it has been exported.",
    ),
    MetricDef::gauge(
        "exporter_lag_seconds",
        "Age of the oldest record read but not yet exported (0 when caught up).",
    ),
    MetricDef::gauge(
        "exporter_lag_revisions",
        "etcd revisions between the checkpoint and the store's current revision (0 when caught up).",
    ),
    MetricDef::gauge(
        "exporter_active",
        "1 while this process is the active exporter of its name, 0 while it stands by.",
    ),
    MetricDef::counter(
        "exporter_activations_total",
        "Times this process became the active exporter of its name.",
    ),
    MetricDef::counter(
        "exporter_fence_refusals_total",
        "Checkpoint advances refused because the owner key no longer carries this process's lease.",
    ),
    MetricDef::counter(
        "exporter_catch_ups_total",
        "Catch-ups from the data keys (first start, or history compacted).",
    ),
];

/// What the start-up check found out about the server.
pub(crate) struct ServerChecked<'a> {
    pub url: &'a str,
    pub server: &'a str,
    /// Requests may hold several samples of one series.
    pub several_per_series: bool,
    pub warnings: &'a [String],
}

impl InternalEvent for ServerChecked<'_> {
    fn emit(self) {
        tracing::info!(
            url = self.url,
            server = self.server,
            samples_per_series = if self.several_per_series { "several" } else { "one" },
            "remote-write server checked"
        );
        for warning in self.warnings {
            tracing::warn!(url = self.url, server = self.server, "{warning}");
        }
    }
}

/// This process became the active exporter.
pub(crate) struct BecameActive<'a> {
    pub name: &'a str,
    pub exporter: &'a str,
    pub lease: i64,
}

impl InternalEvent for BecameActive<'_> {
    fn emit(self) {
        tracing::info!(
            name = self.name,
            exporter = self.exporter,
            lease = self.lease,
            "active exporter"
        );
        metrics::counter!("exporter_activations_total").increment(1);
        metrics::gauge!("exporter_active").set(1.0);
    }
}

/// Another process is the active exporter; this one stands by.
pub(crate) struct StandingBy<'a> {
    pub name: &'a str,
    pub active: Option<&'a str>,
}

impl InternalEvent for StandingBy<'_> {
    fn emit(self) {
        tracing::info!(
            name = self.name,
            active = self.active.unwrap_or("?"),
            "another exporter of this name is active; standing by"
        );
        metrics::gauge!("exporter_active").set(0.0);
    }
}

/// This process stopped being the active exporter.
pub(crate) struct Deactivated<'a> {
    pub reason: &'a str,
}

impl InternalEvent for Deactivated<'_> {
    fn emit(self) {
        tracing::warn!(reason = self.reason, "no longer the active exporter");
        metrics::gauge!("exporter_active").set(0.0);
    }
}

/// A catch-up from the data keys began.
pub(crate) struct CatchUpStarted<'a> {
    pub checkpoint: &'a ExportCheckpoint,
}

impl InternalEvent for CatchUpStarted<'_> {
    fn emit(self) {
        if self.checkpoint.revision == 0 {
            tracing::info!("no checkpoint yet: exporting every stored record, then following");
        } else {
            tracing::warn!(
                checkpoint = self.checkpoint.revision,
                "etcd compacted the history after the checkpoint: catching up from the data keys"
            );
        }
        metrics::counter!("exporter_catch_ups_total").increment(1);
    }
}

/// A catch-up listed what still exists, and what expired unseen.
pub(crate) struct CatchUpListed<'a> {
    pub from: i64,
    pub read_at: i64,
    pub found: usize,
    pub gap: Option<&'a ExportGap>,
}

impl InternalEvent for CatchUpListed<'_> {
    fn emit(self) {
        tracing::info!(
            from = self.from,
            read_at = self.read_at,
            found = self.found,
            "catching up"
        );
        if let Some(gap) = self.gap {
            let span = |t: &Option<telemetry_shared::Timestamp>| {
                t.as_ref().map_or_else(|| "?".to_string(), |t| t.to_string())
            };
            match gap.expired {
                Some(n) => tracing::error!(
                    expired = n,
                    after = %span(&gap.after),
                    before = %span(&gap.before),
                    "records expired in etcd before they could be exported"
                ),
                None => tracing::error!(
                    after = %span(&gap.after),
                    before = %span(&gap.before),
                    "records may have expired before they could be exported (the stats counters are unreadable)"
                ),
            }
        }
    }
}

/// History was compacted under a live follow; the source restarts from the checkpoint.
pub(crate) struct SourceRestart;

impl InternalEvent for SourceRestart {
    fn emit(self) {
        tracing::warn!("the watch fell behind a compaction; restarting from the checkpoint");
    }
}

/// A request was answered (or not).
pub(crate) struct RequestAnswered<'a> {
    pub outcome: &'a crate::send::Outcome,
    pub samples: usize,
    pub elapsed: Duration,
    /// The first failure since the last success (later ones are logged at debug level).
    pub first_failure: bool,
}

impl InternalEvent for RequestAnswered<'_> {
    fn emit(self) {
        use crate::send::Outcome;
        metrics::counter!("exporter_requests_total", "outcome" => self.outcome.label()).increment(1);
        metrics::histogram!("exporter_request_seconds").record(self.elapsed.as_secs_f64());
        metrics::histogram!("exporter_request_samples").record(self.samples as f64);
        match self.outcome {
            Outcome::Landed => {}
            Outcome::Refused(reason) => {
                tracing::debug!(samples = self.samples, %reason, "request refused; bisecting")
            }
            Outcome::Retry(reason) if self.first_failure => {
                tracing::warn!(%reason, "remote write failed; retrying with backoff (nothing is dropped)")
            }
            Outcome::Misconfigured(reason) if self.first_failure => tracing::error!(
                %reason,
                "the remote-write server refuses every request (URL, receiver or authentication?); retrying with backoff"
            ),
            Outcome::Retry(reason) | Outcome::Misconfigured(reason) => {
                tracing::debug!(%reason, "remote write failed again")
            }
        }
    }
}

/// Requests work again after failures.
pub(crate) struct RequestsRecovered;

impl InternalEvent for RequestsRecovered {
    fn emit(self) {
        tracing::info!("remote write works again");
    }
}

/// A batch was exported and its checkpoint written.
pub(crate) struct BatchExported<'a> {
    pub records: usize,
    pub samples: usize,
    /// (data key, reason) of each record rejected.
    pub rejected: &'a [(String, String)],
    pub checkpoint: &'a ExportCheckpoint,
    pub expired: u64,
}

impl InternalEvent for BatchExported<'_> {
    fn emit(self) {
        for (key, reason) in self.rejected {
            tracing::warn!(%key, %reason, "record rejected: it cannot be exported");
        }
        tracing::debug!(
            records = self.records,
            samples = self.samples,
            revision = self.checkpoint.revision,
            "batch exported"
        );
        let landed = self.records - self.rejected.len();
        metrics::counter!("exporter_records_exported_total").increment(landed as u64);
        metrics::counter!("exporter_samples_exported_total").increment(self.samples as u64);
        metrics::counter!("exporter_records_rejected_total").increment(self.rejected.len() as u64);
        metrics::counter!("exporter_records_expired_total").increment(self.expired);
        metrics::gauge!("exporter_checkpoint_revision").set(self.checkpoint.revision as f64);
    }
}

/// A checkpoint advance landed.
pub(crate) struct CheckpointWritten;

impl InternalEvent for CheckpointWritten {
    fn emit(self) {
        metrics::counter!("exporter_checkpoints_total").increment(1);
    }
}

/// A checkpoint advance was refused: another exporter is active, or moved the checkpoint.
pub(crate) struct Fenced<'a> {
    pub by: Option<&'a str>,
}

impl InternalEvent for Fenced<'_> {
    fn emit(self) {
        tracing::warn!(
            active = self.by.unwrap_or("?"),
            "checkpoint advance refused by the fence: another exporter is active"
        );
        metrics::counter!("exporter_fence_refusals_total").increment(1);
    }
}

/// The periodic report: lag, and whether it approaches what etcd keeps.
pub(crate) struct Lag {
    pub seconds: f64,
    pub revisions: i64,
    /// Set when the lag approaches `RETENTION` (records may expire before export).
    pub retention: Option<Duration>,
    /// Set when the lag approaches `COMPACTION_WINDOW` (the follow may have to catch up).
    pub compaction: Option<Duration>,
}

impl InternalEvent for Lag {
    fn emit(self) {
        metrics::gauge!("exporter_lag_seconds").set(self.seconds);
        metrics::gauge!("exporter_lag_revisions").set(self.revisions as f64);
        if let Some(retention) = self.retention {
            tracing::error!(
                lag_s = self.seconds,
                retention = %humantime::format_duration(retention),
                "the export lags by more than half of RETENTION: records may expire before they are exported"
            );
        }
        if let Some(window) = self.compaction {
            tracing::warn!(
                lag_s = self.seconds,
                compaction_window = %humantime::format_duration(window),
                "the export lags by more than half of the compaction window: it may have to catch up from the data keys"
            );
        }
    }
}

/// The exporter stopped.
pub(crate) struct Stopped<'a> {
    pub totals: &'a crate::Totals,
}

impl InternalEvent for Stopped<'_> {
    fn emit(self) {
        let t = self.totals;
        tracing::info!(
            records = t.records,
            samples = t.samples,
            rejected = t.rejected,
            expired = t.expired,
            "exporter stopped"
        );
        metrics::gauge!("exporter_active").set(0.0);
    }
}
