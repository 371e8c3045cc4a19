//! Scraped samples → messages shaped like rows of the DCGM CSV dump.
//!
//! A sample becomes the fields a `dcgm_sample.csv` row has, under the same names, so the
//! collector's default columns (`HOSTNAME_COLUMN=Hostname`, `GPU_ID_COLUMN=gpu_id`,
//! `UUID_COLUMN=uuid`) find the GPU without any change:
//!
//! | field | from |
//! |---|---|
//! | `timestamp` | the sample's own timestamp if the exposition gave one, else the scrape time |
//! | `metric_name` | the metric name |
//! | `gpu_id` | label `gpu` |
//! | `device`, `modelName`, `Hostname` | the labels of those names |
//! | `uuid` | label `UUID` |
//! | every other label | a field of the label's name (`label_{name}` if that name is one of these fields) |
//! | `value` | the value (a number; `NaN` and `±Inf` as strings, which JSON cannot carry as numbers) |
//! | `labels_raw` | every label as `name="value",…` (sorted), as the CSV's column carries it, so the exporter gives the series dcgm-exporter's labels back |
//! | `target` | the scraped URL |
//! | `scrape_time` | the scrape time |
//!
//! Identity fields are present only when the sample has the label. The message's own time is
//! the scrape time, and its idempotency key covers the target, the scrape time and the series
//! (name and labels) and nothing else ([`scrape_key`]): a scrape retried after a crash, which
//! reuses the checkpointed scrape time, gives every series it had already enqueued the same key.

use std::sync::Arc;

use serde_json::Value;
use sha2::{Digest, Sha256};
use telemetry_shared::{
    Fields, Message, SchemaVersion, SourcePosition, Timestamp,
    exposition::escape_label_value,
    keys::partition_of,
    record::{self, ProfileBook},
};
use ulid::Ulid;

use super::parse::Series;
use crate::{
    sink::{Dedup, Pending},
    transform::Prepared,
};

/// Labels that become fields under another name, like the CSV names them.
const RENAMED: [(&str, &str); 2] = [("gpu", "gpu_id"), ("UUID", "uuid")];

/// Labels kept under their own name, in the CSV's column order.
const IDENTITY: [&str; 3] = ["device", "modelName", "Hostname"];

/// The fields the source itself writes; a label of one of these names is prefixed `label_`.
const OWN: [&str; 8] = [
    "timestamp",
    "metric_name",
    "value",
    "labels_raw",
    "target",
    "scrape_time",
    "gpu_id",
    "uuid",
];

/// The idempotency key of `series` scraped from `target` at `scrape_time`: hex SHA-256 over a
/// versioned, length-prefixed encoding of the three.
pub(crate) fn scrape_key(target: &str, scrape_time: &str, series: &Series) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"telemetry-scrape/v1\0");
    let mut part = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    part(target.as_bytes());
    part(scrape_time.as_bytes());
    part(series.name.as_bytes());
    for (name, value) in &series.labels {
        part(name.as_bytes());
        part(value.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// The fields of `series` (see the module docs).
pub(crate) fn fields(series: &Series, target: &str, scrape_time: &Timestamp) -> Fields {
    let label = |name: &str| series.labels.iter().find(|(n, _)| n == name).map(|(_, v)| v);
    let mut fields = Fields::with_capacity(series.labels.len() + 8);
    let sample_time = series
        .timestamp_ms
        .and_then(Timestamp::from_unix_millis)
        .unwrap_or(*scrape_time);
    fields.insert("timestamp".into(), Value::String(sample_time.to_string()));
    fields.insert("metric_name".into(), Value::String(series.name.clone()));
    for (label_name, field) in [RENAMED[0]]
        .into_iter()
        .chain(IDENTITY.iter().map(|n| (*n, *n)))
        .chain([RENAMED[1]])
    {
        if let Some(value) = label(label_name) {
            fields.insert(field.into(), Value::String(value.clone()));
        }
    }
    for (name, value) in &series.labels {
        let kept = RENAMED.iter().any(|(l, _)| l == name) || IDENTITY.contains(&name.as_str());
        if kept {
            continue;
        }
        let field = if OWN.contains(&name.as_str()) {
            format!("label_{name}")
        } else {
            name.clone()
        };
        fields.insert(field, Value::String(value.clone()));
    }
    let value = if series.value.is_finite() {
        Value::from(series.value)
    } else if series.value.is_nan() {
        Value::String("NaN".into())
    } else if series.value > 0.0 {
        Value::String("+Inf".into())
    } else {
        Value::String("-Inf".into())
    };
    fields.insert("value".into(), value);
    let mut raw = String::new();
    for (i, (name, value)) in series.labels.iter().enumerate() {
        if i > 0 {
            raw.push(',');
        }
        raw.push_str(name);
        raw.push('=');
        escape_label_value(value, &mut raw);
    }
    fields.insert("labels_raw".into(), Value::String(raw));
    fields.insert("target".into(), Value::String(target.to_string()));
    fields.insert("scrape_time".into(), Value::String(scrape_time.to_string()));
    fields
}

/// Turns the samples of one scrape into queue entries: one builder per target, kept across
/// scrapes for its profiles and its monotonic ids.
pub(crate) struct Converter {
    stream_id: String,
    target: String,
    ids: ulid::Generator,
    profiles: ProfileBook,
}

impl Converter {
    /// A converter for `target`, whose stream id is `stream_id`.
    pub(crate) fn new(stream_id: &str, target: &str) -> Self {
        Converter {
            stream_id: stream_id.to_string(),
            target: target.to_string(),
            ids: ulid::Generator::new(),
            profiles: ProfileBook::new(),
        }
    }

    /// The entries of scrape `seq` at `scrape_time`, numbered from `first_row`, in series order
    /// (sorted by name and labels, so that a scrape is cut into the same chunks each time it is
    /// read the same).
    pub(crate) fn entries(
        &mut self,
        mut series: Vec<Series>,
        seq: u64,
        scrape_time: &Timestamp,
        first_row: u64,
    ) -> Vec<Pending> {
        series.sort_by(|a, b| (&a.name, &a.labels).cmp(&(&b.name, &b.labels)));
        series.dedup_by(|a, b| a.name == b.name && a.labels == b.labels);
        let time_text = scrape_time.to_string();
        let mut out = Vec::with_capacity(series.len());
        for (i, s) in series.iter().enumerate() {
            let row = first_row + i as u64;
            let fields = fields(s, &self.target, scrape_time);
            let group = group_of(&fields, &self.target, &s.name);
            let id = self
                .ids
                .generate()
                .unwrap_or_else(|_| Ulid::from_datetime(std::time::SystemTime::now()));
            let message = Message {
                schema_version: SchemaVersion::CURRENT,
                id,
                timestamp: *scrape_time,
                idempotency_key: scrape_key(&self.target, &time_text, s),
                source: Some(SourcePosition {
                    stream_id: self.stream_id.clone(),
                    pass: seq,
                    row,
                }),
                fields,
            };
            let choice = self.profiles.choose(&group, &message);
            // The profile was made for this message's group, so the message fits it.
            let encoded =
                record::encode(&message, &choice.profile, choice.id, record::Form::Queue).unwrap_or_default();
            out.push(Pending {
                row,
                prepared: Prepared {
                    partition: partition_of(&group),
                    profile: (choice.id, Arc::clone(&choice.profile)),
                    encoded: Vec::new(),
                    message,
                },
                encoded,
                dedup: Dedup::Marker,
            });
        }
        out
    }
}

/// The partition key: `Hostname/gpu_id` like the CSV's default partition columns (so one GPU's
/// messages share a partition whichever source sent them), else the target and metric name.
fn group_of(fields: &Fields, target: &str, metric: &str) -> Vec<u8> {
    match (fields.get("Hostname"), fields.get("gpu_id")) {
        (Some(Value::String(host)), Some(Value::String(gpu))) => format!("{host}/{gpu}").into_bytes(),
        _ => format!("{target}/{metric}").into_bytes(),
    }
}

/// Does `series` carry a GPU's identity (`Hostname`, `gpu` and `UUID`)?
pub(crate) fn is_gpu_series(series: &Series) -> bool {
    ["Hostname", "gpu", "UUID"]
        .iter()
        .all(|l| series.labels.iter().any(|(n, v)| n == l && !v.is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dcgm(gpu: &str, value: f64) -> Series {
        Series {
            name: "DCGM_FI_DEV_GPU_UTIL".into(),
            labels: vec![
                ("DCGM_FI_DRIVER_VERSION".into(), "535.129.03".into()),
                ("Hostname".into(), "h1".into()),
                ("UUID".into(), format!("GPU-{gpu}")),
                ("device".into(), format!("nvidia{gpu}")),
                ("gpu".into(), gpu.into()),
                ("modelName".into(), "NVIDIA H100 80GB HBM3".into()),
            ],
            value,
            timestamp_ms: None,
        }
    }

    fn at() -> Timestamp {
        Timestamp::parse("2026-12-01T00:00:15.000000Z").expect("valid")
    }

    #[test]
    fn a_dcgm_sample_is_named_like_a_csv_row() {
        let f = fields(&dcgm("3", 87.0), "http://h1:9400/metrics", &at());
        let names: Vec<&str> = f.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            [
                "timestamp",
                "metric_name",
                "gpu_id",
                "device",
                "modelName",
                "Hostname",
                "uuid",
                "DCGM_FI_DRIVER_VERSION",
                "value",
                "labels_raw",
                "target",
                "scrape_time"
            ]
        );
        assert_eq!(f["gpu_id"], json!("3"));
        assert_eq!(f["uuid"], json!("GPU-3"));
        assert_eq!(f["value"], json!(87.0));
        assert_eq!(f["timestamp"], json!("2026-12-01T00:00:15.000000Z"));
        // The exporter's label set is dcgm-exporter's again.
        let message = Message {
            schema_version: SchemaVersion::CURRENT,
            id: Ulid::nil(),
            timestamp: at(),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields: f,
        };
        let samples =
            telemetry_shared::exposition::samples(&message, &telemetry_shared::config::Columns::default())
                .expect("a sample");
        assert_eq!(samples[0].labels, dcgm("3", 87.0).labels);
    }

    #[test]
    fn colliding_labels_are_prefixed_and_odd_values_stay_text() {
        let mut s = Series {
            name: "x".into(),
            labels: vec![("target".into(), "t".into()), ("value".into(), "v".into())],
            value: f64::NAN,
            timestamp_ms: Some(1_700_000_000_000),
        };
        let f = fields(&s, "http://a/metrics", &at());
        assert_eq!(f["label_target"], json!("t"));
        assert_eq!(f["label_value"], json!("v"));
        assert_eq!(f["target"], json!("http://a/metrics"));
        assert_eq!(f["value"], json!("NaN"));
        assert_eq!(f["timestamp"], json!("2023-11-14T22:13:20.000000Z"));
        assert!(!f.contains_key("gpu_id"));
        s.value = f64::NEG_INFINITY;
        assert_eq!(fields(&s, "t", &at())["value"], json!("-Inf"));
    }

    #[test]
    fn the_key_covers_target_time_and_series_only() {
        let t = "2026-12-01T00:00:15.000000Z";
        let k = scrape_key("http://a/metrics", t, &dcgm("0", 1.0));
        assert_eq!(
            k,
            scrape_key("http://a/metrics", t, &dcgm("0", 2.0)),
            "not the value"
        );
        assert_ne!(k, scrape_key("http://b/metrics", t, &dcgm("0", 1.0)));
        assert_ne!(
            k,
            scrape_key("http://a/metrics", "2026-12-01T00:00:30.000000Z", &dcgm("0", 1.0))
        );
        assert_ne!(k, scrape_key("http://a/metrics", t, &dcgm("1", 1.0)));
    }

    #[test]
    fn entries_are_sorted_numbered_partitioned_by_gpu_and_decode() {
        let mut c = Converter::new("scrape-ab", "http://h1:9400/metrics");
        let entries = c.entries(vec![dcgm("1", 5.0), dcgm("0", 7.0), dcgm("0", 7.0)], 4, &at(), 11);
        assert_eq!(entries.len(), 2, "a repeated series is one sample");
        assert_eq!(entries[0].prepared.message.fields["gpu_id"], json!("0"));
        assert_eq!((entries[0].row, entries[1].row), (11, 12));
        assert_eq!(entries[0].prepared.partition, partition_of(b"h1/0"));
        for e in &entries {
            let (id, profile) = &e.prepared.profile;
            let back = record::decode(&e.encoded, profile, e.prepared.message.id, None).expect("decodes");
            assert_eq!(back, e.prepared.message);
            assert_eq!(record::header(&e.encoded).expect("lean").profile, *id);
            assert_eq!(back.timestamp, at());
        }
        assert!(is_gpu_series(&dcgm("0", 1.0)));
        assert!(!is_gpu_series(&Series {
            name: "up".into(),
            labels: vec![],
            value: 1.0,
            timestamp_ms: None
        }));
    }
}
