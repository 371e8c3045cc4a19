//! What the gateway reports: every metric it exports, with its help text. Each thing that
//! happens is one event type whose `emit` writes the log line and the metrics together
//! (see [`telemetry_shared::observe::InternalEvent`]).

use telemetry_shared::observe::MetricDef;

/// Every metric of the gateway (the shared ones are added by `observe`).
pub const METRICS: &[MetricDef] = &[
    MetricDef::counter(
        "gateway_http_requests_total",
        "HTTP requests answered, by method, route and status.",
    ),
    MetricDef::histogram(
        "gateway_http_request_duration_seconds",
        "HTTP request latency, by route.",
    ),
    MetricDef::counter(
        "gateway_etcd_read_retries_total",
        "etcd reads retried after a retryable error.",
    ),
    MetricDef::counter(
        "gateway_unreadable_records_total",
        "Stored records or index entries that could not be read.",
    ),
    MetricDef::counter(
        "gateway_newest_fallback_scans_total",
        "Newest-first pages that fell back to a keys-only scan.",
    ),
    MetricDef::histogram(
        "gateway_telemetry_page_scanned",
        "Records examined to answer one telemetry page.",
    ),
    MetricDef::counter(
        "gateway_live_records_total",
        "Records broadcast by the live feed.",
    ),
    MetricDef::counter(
        "gateway_live_gaps_total",
        "Times the live feed lost history to a compaction and closed its subscribers.",
    ),
    MetricDef::gauge("gateway_ws_subscribers", "WebSocket subscribers connected."),
    MetricDef::counter(
        "gateway_ws_records_sent_total",
        "Records sent to WebSocket subscribers.",
    ),
    MetricDef::counter(
        "gateway_ws_refused_total",
        "WebSocket upgrades refused at WS_MAX_CONNECTIONS.",
    ),
    MetricDef::counter(
        "gateway_ws_slow_closed_total",
        "WebSocket subscribers closed because they read slower than telemetry arrived.",
    ),
];
