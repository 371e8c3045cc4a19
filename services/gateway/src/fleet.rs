//! The whole fleet at a glance, from the window's latest record per GPU and metric: as JSON for
//! the dashboard (`/api/v1/gpus/latest`, one request instead of one per GPU) and as Prometheus
//! text for Prometheus and Grafana (`/metrics/gpus`), named and labelled the way dcgm-exporter
//! does (see `telemetry_shared::exposition`), so existing dashboards and alert rules work.
//!
//! The exposition carries no timestamps, like dcgm-exporter: Prometheus stamps each sample
//! with its scrape time. A GPU whose newest record is older than `GPU_METRICS_MAX_AGE` is left
//! out, so Prometheus marks its series stale instead of repeating a value that stopped
//! changing.

use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;
use telemetry_shared::{
    Timestamp,
    config::Columns,
    exposition::{self, Sample},
    model::GpuInfo,
};
use utoipa::ToSchema;

use crate::{rest::GpuView, window::Latest};

/// A metric's latest value.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct LatestValue {
    /// The value column, as stored (a number, a boolean or a string; null when absent).
    #[schema(value_type = Object)]
    pub value: serde_json::Value,
    /// The record's processing time (RFC 3339).
    pub timestamp: String,
    /// The record's message id.
    pub id: String,
}

/// One GPU and the latest value of each of its metrics.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct GpuLatest {
    /// The GPU.
    #[serde(flatten)]
    pub gpu: GpuView,
    /// Metric name → its latest value (empty when no record of the GPU is in the window).
    pub metrics: BTreeMap<String, LatestValue>,
}

/// The fleet's latest values.
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq)]
pub struct FleetLatest {
    /// The etcd revision the values reflect.
    pub revision: i64,
    /// GPUs listed.
    pub count: usize,
    /// The GPUs, by host then gpu_id.
    pub gpus: Vec<GpuLatest>,
}

/// The fleet's latest values: every GPU of `gpus` (the index, by host then gpu_id) on host
/// `hostname` (all if `None`), with its latest record of `metric` (every metric if `None`).
pub(crate) fn latest(
    gpus: &[GpuInfo],
    latest: &Latest,
    revision: i64,
    hostname: Option<&str>,
    metric: Option<&str>,
    value_column: &str,
) -> FleetLatest {
    let gpus: Vec<GpuLatest> = gpus
        .iter()
        .filter(|g| hostname.is_none_or(|h| g.hostname == h))
        .map(|g| {
            let records = latest.get(&(g.hostname.clone(), g.gpu_id.clone()));
            let metrics = records
                .into_iter()
                .flatten()
                .filter_map(|r| Some((r.metric.clone()?, r)))
                .filter(|(m, _)| metric.is_none_or(|want| m == want))
                .map(|(m, r)| {
                    let value = LatestValue {
                        value: r.message.fields.get(value_column).cloned().unwrap_or_default(),
                        timestamp: r.message.timestamp.to_string(),
                        id: r.message.id.to_string(),
                    };
                    (m, value)
                })
                .collect();
            GpuLatest {
                gpu: GpuView::from(g),
                metrics,
            }
        })
        .collect();
    FleetLatest {
        revision,
        count: gpus.len(),
        gpus,
    }
}

/// Help text of the DCGM fields the sample carries (dcgm-exporter's wording); other names get
/// a generic line.
fn help(name: &str) -> String {
    let known = match name {
        "DCGM_FI_DEV_GPU_UTIL" => "GPU utilization (in %).",
        "DCGM_FI_DEV_MEM_COPY_UTIL" => "Memory utilization (in %).",
        "DCGM_FI_DEV_ENC_UTIL" => "Encoder utilization (in %).",
        "DCGM_FI_DEV_DEC_UTIL" => "Decoder utilization (in %).",
        "DCGM_FI_DEV_FB_FREE" => "Framebuffer memory free (in MiB).",
        "DCGM_FI_DEV_FB_USED" => "Framebuffer memory used (in MiB).",
        "DCGM_FI_DEV_GPU_TEMP" => "GPU temperature (in C).",
        "DCGM_FI_DEV_POWER_USAGE" => "Power draw (in W).",
        "DCGM_FI_DEV_SM_CLOCK" => "SM clock frequency (in MHz).",
        "DCGM_FI_DEV_MEM_CLOCK" => "Memory clock frequency (in MHz).",
        _ => "",
    };
    if known.is_empty() {
        format!("Latest value of {name} per GPU, from the telemetry pipeline.")
    } else {
        known.to_string()
    }
}

/// The Prometheus text exposition (format 0.0.4) of the latest samples of every GPU whose
/// newest record is at most `max_age` old at `now`. Families and series are sorted, so the
/// output is stable.
pub(crate) fn exposition(latest: &Latest, columns: &Columns, now: Timestamp, max_age: Duration) -> String {
    let cutoff = now
        .as_datetime()
        .checked_sub_signed(chrono::TimeDelta::from_std(max_age).unwrap_or(chrono::TimeDelta::MAX))
        .map_or(i64::MIN, |t| t.timestamp_millis());
    let mut families: BTreeMap<String, Vec<Sample>> = BTreeMap::new();
    for records in latest.values() {
        let newest = records.iter().map(|r| r.message.timestamp.unix_millis()).max();
        if newest.is_none_or(|t| t < cutoff) {
            continue;
        }
        for record in records {
            // A record that cannot be a sample (no numeric value, a bad name) is left out.
            for sample in exposition::samples(&record.message, columns).unwrap_or_default() {
                families.entry(sample.name.clone()).or_default().push(sample);
            }
        }
    }
    let mut out = String::new();
    for (name, mut samples) in families {
        samples.sort_by(|a, b| a.labels.cmp(&b.labels));
        samples.dedup_by(|a, b| a.labels == b.labels);
        out.push_str(&format!("# HELP {name} {}\n# TYPE {name} gauge\n", help(&name)));
        for sample in samples {
            out.push_str(&name);
            if !sample.labels.is_empty() {
                out.push('{');
                for (i, (label, value)) in sample.labels.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(label);
                    out.push('=');
                    exposition::escape_label_value(value, &mut out);
                }
                out.push('}');
            }
            out.push_str(&format!(" {}\n", sample.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, sync::Arc};

    use telemetry_shared::{Fields, Message, SchemaVersion};

    use super::*;
    use crate::record::Record;

    fn record(host: &str, gpu: &str, metric: &str, value: f64, at: &str) -> Arc<Record> {
        let mut fields = Fields::new();
        fields.insert("metric_name".into(), metric.into());
        fields.insert("gpu_id".into(), gpu.parse::<f64>().unwrap_or(0.0).into());
        fields.insert("uuid".into(), format!("GPU-{host}-{gpu}").into());
        fields.insert("Hostname".into(), host.into());
        fields.insert("value".into(), value.into());
        let message = Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::nil(),
            timestamp: Timestamp::parse(at).expect("time"),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        };
        let key = format!("/d/{host}/{gpu}/{at}_x");
        Arc::new(Record::new(key, 1, host, gpu, message, &Columns::default()))
    }

    #[test]
    fn the_exposition_is_sorted_labelled_and_leaves_out_silent_gpus() {
        let mut latest = HashMap::new();
        latest.insert(
            ("h1".to_string(), "0".to_string()),
            vec![
                record("h1", "0", "DCGM_FI_DEV_GPU_UTIL", 87.0, "2026-11-30T00:00:00Z"),
                record("h1", "0", "DCGM_FI_DEV_GPU_TEMP", 41.5, "2026-11-30T00:00:00Z"),
            ],
        );
        latest.insert(
            ("h2".to_string(), "1".to_string()),
            vec![record(
                "h2",
                "1",
                "DCGM_FI_DEV_GPU_UTIL",
                5.0,
                "2026-11-29T00:00:00Z",
            )],
        );
        let now = Timestamp::parse("2026-11-30T00:01:00Z").expect("time");
        let text = exposition(&latest, &Columns::default(), now, Duration::from_secs(300));
        let expected = "# HELP DCGM_FI_DEV_GPU_TEMP GPU temperature (in C).\n\
                        # TYPE DCGM_FI_DEV_GPU_TEMP gauge\n\
                        DCGM_FI_DEV_GPU_TEMP{Hostname=\"h1\",UUID=\"GPU-h1-0\",gpu=\"0\"} 41.5\n\
                        # HELP DCGM_FI_DEV_GPU_UTIL GPU utilization (in %).\n\
                        # TYPE DCGM_FI_DEV_GPU_UTIL gauge\n\
                        DCGM_FI_DEV_GPU_UTIL{Hostname=\"h1\",UUID=\"GPU-h1-0\",gpu=\"0\"} 87\n";
        assert_eq!(text, expected);
    }
}
