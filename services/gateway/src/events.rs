//! What the gateway reports: every metric it exports, with its help text, and one event type
//! per thing that happens. Each event's `emit` writes its log line and updates its metrics
//! together (see [`telemetry_shared::observe::InternalEvent`]), so a signal is added here and
//! nowhere else: the handlers, the store and the hub only construct events.
//!
//! Every metric name is a constant used both by the table and by the event that updates it, so
//! the table and the emitted metrics cannot drift apart (a unit test emits every event and
//! compares the rendered names with the table).

use std::time::Duration;

use telemetry_shared::observe::{InternalEvent, MetricDef};

const HTTP_REQUESTS: &str = "gateway_http_requests_total";
const HTTP_DURATION: &str = "gateway_http_request_duration_seconds";
const UNREADABLE: &str = "gateway_unreadable_records_total";
const FALLBACK_SCANS: &str = "gateway_newest_fallback_scans_total";
const PAGE_SCANNED: &str = "gateway_telemetry_page_scanned_records";
const LIVE_RECORDS: &str = "gateway_live_records_total";
const LIVE_GAPS: &str = "gateway_live_gaps_total";
const WS_SUBSCRIBERS: &str = "gateway_ws_subscribers";
const WS_SENT: &str = "gateway_ws_records_sent_total";
const WS_REFUSED: &str = "gateway_ws_refused_total";
const WS_SLOW: &str = "gateway_ws_slow_closed_total";
const PAGES: &str = "gateway_telemetry_pages_total";
const WINDOW_RECORDS: &str = "gateway_window_records";
const WINDOW_BYTES: &str = "gateway_window_bytes";
const WINDOW_LOADS: &str = "gateway_window_loads_total";
const AUTH_REFUSED: &str = "gateway_auth_refused_total";
const LIMITED: &str = "gateway_token_limited_total";
const RELOADS: &str = "gateway_file_reloads_total";

/// Every metric of the gateway (the shared ones are added by `observe`).
pub(crate) const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        HTTP_REQUESTS,
        "HTTP requests answered, by method, route and status.",
    )
    .labeled(),
    MetricDef::histogram(HTTP_DURATION, "HTTP request latency, by route.").labeled(),
    MetricDef::counter(
        UNREADABLE,
        "Stored records, index entries or counters that could not be read.",
    ),
    MetricDef::counter(
        FALLBACK_SCANS,
        "Newest-first pages that fell back to a keys-only scan.",
    ),
    MetricDef::histogram(PAGE_SCANNED, "Records examined to answer one telemetry page."),
    MetricDef::counter(LIVE_RECORDS, "Records broadcast by the live feed."),
    MetricDef::counter(
        LIVE_GAPS,
        "Times the live feed lost history to a compaction and closed its subscribers.",
    ),
    MetricDef::gauge(WS_SUBSCRIBERS, "WebSocket subscribers connected."),
    MetricDef::counter(WS_SENT, "Records sent to WebSocket subscribers."),
    MetricDef::counter(WS_REFUSED, "WebSocket upgrades refused at WS_MAX_CONNECTIONS."),
    MetricDef::counter(
        WS_SLOW,
        "WebSocket subscribers closed because they read slower than telemetry arrived.",
    ),
    MetricDef::counter(
        PAGES,
        "Telemetry pages answered, by source: the in-memory window or etcd.",
    )
    .labeled(),
    MetricDef::gauge(WINDOW_RECORDS, "Records held in the in-memory read window."),
    MetricDef::gauge(
        WINDOW_BYTES,
        "Bytes the in-memory read window holds (records' JSON size).",
    ),
    MetricDef::counter(
        WINDOW_LOADS,
        "Times the read window was loaded from etcd (at start, and after a compaction outran it).",
    ),
    MetricDef::counter(
        AUTH_REFUSED,
        "Requests refused with 401, by reason: missing or invalid token.",
    )
    .labeled(),
    MetricDef::counter(
        LIMITED,
        "Requests refused with 429 by a per-token limit: requests (rate) or subscriptions.",
    )
    .labeled(),
    MetricDef::counter(
        RELOADS,
        "Watched files (TLS certificate and key, API tokens) read again after a change, by file \
         and outcome: loaded, or rejected (the previous content stays in use).",
    )
    .labeled(),
];

/// A telemetry page was answered, from memory or from etcd.
#[derive(Debug)]
pub(crate) struct PageServed {
    /// `memory` or `etcd`.
    pub source: &'static str,
}

impl InternalEvent for PageServed {
    fn emit(self) {
        metrics::counter!(PAGES, "source" => self.source).increment(1);
    }
}

/// The read window was loaded.
#[derive(Debug)]
pub(crate) struct WindowLoaded {
    /// The revision it was loaded at.
    pub revision: i64,
    /// GPUs loaded.
    pub gpus: usize,
    /// Records held now.
    pub records: usize,
    /// Bytes held now.
    pub bytes: usize,
}

impl InternalEvent for WindowLoaded {
    fn emit(self) {
        tracing::info!(
            revision = self.revision,
            gpus = self.gpus,
            records = self.records,
            bytes = self.bytes,
            "read window loaded"
        );
        metrics::counter!(WINDOW_LOADS).increment(1);
        WindowSize {
            records: self.records,
            bytes: self.bytes,
        }
        .emit();
    }
}

/// The read window's size, as sampled.
#[derive(Debug)]
pub(crate) struct WindowSize {
    /// Records held.
    pub records: usize,
    /// Bytes held.
    pub bytes: usize,
}

impl InternalEvent for WindowSize {
    fn emit(self) {
        metrics::gauge!(WINDOW_RECORDS).set(self.records as f64);
        metrics::gauge!(WINDOW_BYTES).set(self.bytes as f64);
    }
}

/// An HTTP request was answered (the trace layer logs the request itself).
#[derive(Debug)]
pub(crate) struct HttpRequestAnswered {
    /// The request method.
    pub method: String,
    /// The matched route template, or `unmatched`.
    pub route: String,
    /// The response status.
    pub status: u16,
    /// Time to the response head.
    pub elapsed: Duration,
}

impl InternalEvent for HttpRequestAnswered {
    fn emit(self) {
        tracing::debug!(
            method = %self.method,
            route = %self.route,
            status = self.status,
            elapsed = ?self.elapsed,
            "answered"
        );
        metrics::counter!(HTTP_REQUESTS, "method" => self.method, "route" => self.route.clone(), "status" => self.status.to_string())
            .increment(1);
        metrics::histogram!(HTTP_DURATION, "route" => self.route).record(self.elapsed.as_secs_f64());
    }
}

/// A stored value could not be decoded and was skipped.
pub(crate) struct UnreadableSkipped<'a> {
    /// What it was: `telemetry record`, `GPU index entry` or `stats counter`.
    pub what: &'static str,
    /// Its etcd key.
    pub key: &'a str,
    /// Why it could not be read.
    pub error: &'a dyn std::fmt::Display,
}

impl InternalEvent for UnreadableSkipped<'_> {
    fn emit(self) {
        tracing::warn!(key = %self.key, error = %self.error, "skipping an unreadable {}", self.what);
        metrics::counter!(UNREADABLE).increment(1);
    }
}

/// A newest-first page could not find a small enough time window and scanned the keys.
#[derive(Debug)]
pub(crate) struct NewestFallbackScan;

impl InternalEvent for NewestFallbackScan {
    fn emit(self) {
        tracing::debug!("newest-first page: probes did not converge; scanning keys");
        metrics::counter!(FALLBACK_SCANS).increment(1);
    }
}

/// A telemetry page was assembled.
#[derive(Debug)]
pub(crate) struct TelemetryPageRead {
    /// Records examined (more than returned when a metric filter skips records).
    pub scanned: usize,
    /// Records returned.
    pub returned: usize,
}

impl InternalEvent for TelemetryPageRead {
    fn emit(self) {
        tracing::trace!(scanned = self.scanned, returned = self.returned, "telemetry page");
        metrics::histogram!(PAGE_SCANNED).record(self.scanned as f64);
    }
}

/// The live feed offered one revision's records to its subscribers.
#[derive(Debug)]
pub(crate) struct LiveBroadcast {
    /// The revision.
    pub revision: i64,
    /// Records in it.
    pub records: usize,
}

impl InternalEvent for LiveBroadcast {
    fn emit(self) {
        tracing::trace!(revision = self.revision, records = self.records, "live broadcast");
        metrics::counter!(LIVE_RECORDS).increment(self.records as u64);
    }
}

/// The live feed fell behind a compaction: history is lost and every subscriber is closed.
#[derive(Debug)]
pub(crate) struct LiveGap {
    /// The last revision broadcast before the gap.
    pub lost_after: i64,
    /// The compaction revision etcd reported.
    pub compacted: i64,
    /// Where the feed resumes.
    pub resumed_at: i64,
}

impl InternalEvent for LiveGap {
    fn emit(self) {
        tracing::error!(
            lost_after = self.lost_after,
            compacted = self.compacted,
            resumed_at = self.resumed_at,
            "live feed: history was compacted while the watch was behind; subscribers are closed"
        );
        metrics::counter!(LIVE_GAPS).increment(1);
    }
}

/// A WebSocket subscriber attached to the live feed.
#[derive(Debug)]
pub(crate) struct Subscribed;

impl InternalEvent for Subscribed {
    fn emit(self) {
        tracing::debug!("WebSocket subscriber attached");
        metrics::gauge!(WS_SUBSCRIBERS).increment(1.0);
    }
}

/// A WebSocket subscriber left the live feed.
#[derive(Debug)]
pub(crate) struct Unsubscribed;

impl InternalEvent for Unsubscribed {
    fn emit(self) {
        tracing::debug!("WebSocket subscriber detached");
        metrics::gauge!(WS_SUBSCRIBERS).decrement(1.0);
    }
}

/// Records went out on a WebSocket.
#[derive(Debug)]
pub(crate) struct RecordsSent {
    /// How many.
    pub records: usize,
}

impl InternalEvent for RecordsSent {
    fn emit(self) {
        metrics::counter!(WS_SENT).increment(self.records as u64);
    }
}

/// A WebSocket upgrade was refused: every slot is taken.
#[derive(Debug)]
pub(crate) struct UpgradeRefused {
    /// `WS_MAX_CONNECTIONS`.
    pub limit: usize,
}

impl InternalEvent for UpgradeRefused {
    fn emit(self) {
        tracing::warn!(
            limit = self.limit,
            "WebSocket upgrade refused: WS_MAX_CONNECTIONS reached"
        );
        metrics::counter!(WS_REFUSED).increment(1);
    }
}

/// A subscriber's buffer overflowed; the hub dropped it.
#[derive(Debug)]
pub(crate) struct SlowSubscriberDropped {
    /// The revision that did not fit.
    pub revision: i64,
}

impl InternalEvent for SlowSubscriberDropped {
    fn emit(self) {
        tracing::info!(
            revision = self.revision,
            "WebSocket subscriber too slow; closing it"
        );
        metrics::counter!(WS_SLOW).increment(1);
    }
}

/// A request to a protected route came without a valid token (401).
#[derive(Debug)]
pub(crate) struct AuthRefused {
    /// `missing` or `invalid`.
    pub reason: &'static str,
    /// The route asked for.
    pub route: String,
}

impl InternalEvent for AuthRefused {
    fn emit(self) {
        tracing::debug!(reason = self.reason, route = %self.route, "request refused: no valid token");
        metrics::counter!(AUTH_REFUSED, "reason" => self.reason).increment(1);
    }
}

/// A token went past one of its limits (429).
#[derive(Debug)]
pub(crate) struct TokenLimited {
    /// `requests` or `subscriptions`.
    pub limit: &'static str,
    /// The token's fingerprint (never the token).
    pub token: String,
}

impl InternalEvent for TokenLimited {
    fn emit(self) {
        tracing::debug!(limit = self.limit, token = %self.token, "request refused: token limit");
        metrics::counter!(LIMITED, "limit" => self.limit).increment(1);
    }
}

/// A watched file changed and was read again.
#[derive(Debug)]
pub(crate) struct FileReloaded<'a> {
    /// What the file is: `tls` (certificate and key) or `tokens`.
    pub file: &'static str,
    /// Where it is.
    pub path: &'a str,
    /// `Ok(summary)` when the new content is in use, `Err(why)` when it was rejected.
    pub outcome: Result<String, String>,
}

impl InternalEvent for FileReloaded<'_> {
    fn emit(self) {
        let outcome = match &self.outcome {
            Ok(summary) => {
                tracing::info!(file = self.file, path = self.path, %summary, "reloaded");
                "loaded"
            }
            Err(error) => {
                tracing::error!(
                    file = self.file,
                    path = self.path,
                    %error,
                    "the changed file is unusable; still using the previous one"
                );
                "rejected"
            }
        };
        metrics::counter!(RELOADS, "file" => self.file, "outcome" => outcome).increment(1);
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use metrics_exporter_prometheus::PrometheusBuilder;
    use telemetry_shared::observe::{MetricKind, emit};

    use super::*;

    /// Emits one of every event into a private recorder and returns its exposition.
    fn render_every_event() -> String {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            emit(HttpRequestAnswered {
                method: "GET".into(),
                route: "/health".into(),
                status: 200,
                elapsed: Duration::from_millis(3),
            });
            emit(UnreadableSkipped {
                what: "telemetry record",
                key: "/k",
                error: &"bad",
            });
            emit(NewestFallbackScan);
            emit(TelemetryPageRead {
                scanned: 3,
                returned: 2,
            });
            emit(LiveBroadcast {
                revision: 5,
                records: 2,
            });
            emit(LiveGap {
                lost_after: 4,
                compacted: 6,
                resumed_at: 7,
            });
            emit(Subscribed);
            emit(Unsubscribed);
            emit(RecordsSent { records: 2 });
            emit(UpgradeRefused { limit: 1 });
            emit(SlowSubscriberDropped { revision: 8 });
            emit(PageServed { source: "memory" });
            emit(WindowLoaded {
                revision: 9,
                gpus: 1,
                records: 2,
                bytes: 3,
            });
            emit(AuthRefused {
                reason: "missing",
                route: "/api/v1/gpus".into(),
            });
            emit(TokenLimited {
                limit: "requests",
                token: "sha256:00".into(),
            });
            emit(FileReloaded {
                file: "tokens",
                path: "/t",
                outcome: Ok("2 tokens".into()),
            });
        });
        handle.render()
    }

    #[test]
    fn every_event_metric_is_in_the_table_and_every_table_metric_is_emitted() {
        let text = render_every_event();
        let rendered: BTreeSet<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        let table: BTreeSet<&str> = METRICS.iter().map(|d| d.name).collect();
        assert_eq!(rendered, table, "{text}");
        for def in METRICS {
            let suffix_ok = match def.kind {
                MetricKind::Counter => def.name.ends_with("_total"),
                MetricKind::Gauge | MetricKind::Histogram => !def.name.ends_with("_total"),
            };
            assert!(suffix_ok, "{} breaks the naming convention", def.name);
            assert!(def.name.starts_with("gateway_"), "{}", def.name);
        }
    }
}
