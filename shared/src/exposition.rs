//! Telemetry records as Prometheus samples, named and labelled the way NVIDIA's dcgm-exporter
//! does, so dashboards and alert rules written for it (Grafana's NVIDIA DCGM dashboard, id
//! 12239) work unchanged. The gateway's `/metrics/gpus` and the exporter's remote write both
//! use this, so a series has the same identity wherever it is read.
//!
//! For a DCGM-shaped record (one with a metric-name column):
//! - the **name** is the metric-name column (`DCGM_FI_DEV_GPU_UTIL`);
//! - the **value** is the value column (a number; `true`/`false` are 1 and 0);
//! - the **labels** are `gpu` (the GPU-id column), `UUID`, `device`, `modelName`, `Hostname`,
//!   then `pod`, `namespace` and `container` when not empty, then every label carried in
//!   `labels_raw` (dcgm-exporter's own label set, e.g. `DCGM_FI_DRIVER_VERSION`) that is not one
//!   of those, except `__name__`, `instance` and `job`, which Prometheus sets when it scrapes.
//!
//! A record of a CSV without a metric-name column becomes one sample per numeric field that is
//! not an identity or label column, named `telemetry_{field}` (characters a metric name cannot
//! hold become `_`), with the same labels.

use serde_json::Value;

use crate::{
    config::Columns,
    message::{Message, field_text},
};

/// One sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name.
    pub name: String,
    /// Labels, sorted by name, without `__name__`.
    pub labels: Vec<(String, String)>,
    /// The value.
    pub value: f64,
    /// The record's time, Unix milliseconds.
    pub timestamp_ms: i64,
}

/// Why a record gives no sample.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SampleError {
    /// The value column is missing or not a number.
    #[error("field {column:?} is not a number")]
    NoValue {
        /// The value column.
        column: String,
    },
    /// The metric name cannot be a Prometheus metric name.
    #[error("{name:?} is not a valid metric name")]
    BadName {
        /// The name found.
        name: String,
    },
}

/// Is `name` a valid Prometheus metric name?
pub fn is_metric_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

/// Is `name` a valid label name (and not reserved)?
pub fn is_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    !name.starts_with("__")
        && chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A field's numeric value: numbers as they are, booleans as 1 and 0.
fn number(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

/// The label set of `message`'s GPU (see the module docs), sorted by name.
pub fn labels(message: &Message, columns: &Columns) -> Vec<(String, String)> {
    let text = |column: &str| {
        message
            .fields
            .get(column)
            .and_then(field_text)
            .map(|t| t.into_owned())
            .filter(|t| !t.is_empty())
    };
    let mut labels: Vec<(String, String)> = Vec::new();
    let identity = [
        ("gpu", columns.gpu_id.as_str()),
        ("UUID", columns.uuid.as_str()),
        ("device", columns.device.as_str()),
        ("modelName", columns.model.as_str()),
        ("Hostname", columns.hostname.as_str()),
        ("pod", "pod"),
        ("namespace", "namespace"),
        ("container", "container"),
    ];
    for (label, column) in identity {
        if let Some(value) = text(column) {
            labels.push((label.to_string(), value));
        }
    }
    if let Some(Value::String(raw)) = message.fields.get("labels_raw") {
        for (name, value) in parse_labels_raw(raw) {
            let taken = labels.iter().any(|(n, _)| *n == name);
            if !taken && is_label_name(&name) && name != "instance" && name != "job" && !value.is_empty() {
                labels.push((name, value));
            }
        }
    }
    labels.sort();
    labels
}

/// The columns that are identity or labels, never values of their own.
fn label_columns(columns: &Columns) -> [&str; 9] {
    [
        columns.hostname.as_str(),
        columns.gpu_id.as_str(),
        columns.uuid.as_str(),
        columns.device.as_str(),
        columns.model.as_str(),
        "pod",
        "namespace",
        "container",
        "labels_raw",
    ]
}

/// The samples of `message` (see the module docs).
pub fn samples(message: &Message, columns: &Columns) -> Result<Vec<Sample>, SampleError> {
    let timestamp_ms = message.timestamp.unix_millis();
    let labels = labels(message, columns);
    match message.fields.get(&columns.metric) {
        Some(name) => {
            let name = field_text(name).map(|t| t.into_owned()).unwrap_or_default();
            if !is_metric_name(&name) {
                return Err(SampleError::BadName { name });
            }
            let value = message
                .fields
                .get(&columns.value)
                .and_then(number)
                .ok_or_else(|| SampleError::NoValue {
                    column: columns.value.clone(),
                })?;
            Ok(vec![Sample {
                name,
                labels,
                value,
                timestamp_ms,
            }])
        }
        None => {
            let skip = label_columns(columns);
            Ok(message
                .fields
                .iter()
                .filter(|(name, _)| !skip.contains(&name.as_str()) && *name != &columns.metric)
                .filter_map(|(name, value)| {
                    Some(Sample {
                        name: format!("telemetry_{}", sanitize(name)),
                        labels: labels.clone(),
                        value: number(value)?,
                        timestamp_ms,
                    })
                })
                .collect())
        }
    }
}

/// `name` with every character a metric name cannot hold replaced by `_`.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Parses dcgm-exporter's label set as a CSV column carries it:
/// `name="value",name="value",...`, with `\"`, `\\` and `\n` escapes in values. Malformed
/// parts are skipped.
pub fn parse_labels_raw(raw: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = raw.trim();
    while !rest.is_empty() {
        let Some((name, after)) = rest.split_once('=') else {
            break;
        };
        let Some(after) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => break,
                },
                '"' => {
                    end = Some(i + 1);
                    break;
                }
                other => value.push(other),
            }
        }
        let Some(end) = end else { break };
        out.push((name.trim().to_string(), value));
        rest = after[end..].trim_start_matches(',').trim_start();
    }
    out
}

/// Writes a label value as the text exposition format wants it (quoted, escaped).
pub fn escape_label_value(value: &str, out: &mut String) {
    out.push('"');
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            other => out.push(other),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Fields, SchemaVersion, Timestamp};
    use serde_json::json;

    const RAW: &str = r#"DCGM_FI_DRIVER_VERSION="535.129.03",Hostname="mtv5-dgx1-hgpu-031",UUID="GPU-5fd4",__name__="DCGM_FI_DEV_GPU_UTIL",device="nvidia0",gpu="0",instance="mtv5-dgx1-hgpu-031:9400",job="dgx_dcgm_exporter",modelName="NVIDIA H100 80GB HBM3""#;

    fn dcgm() -> Message {
        let mut f = Fields::new();
        f.insert("timestamp".into(), json!("2025-07-18T20:42:34Z"));
        f.insert("metric_name".into(), json!("DCGM_FI_DEV_GPU_UTIL"));
        f.insert("gpu_id".into(), json!(0.0));
        f.insert("device".into(), json!("nvidia0"));
        f.insert("uuid".into(), json!("GPU-5fd4"));
        f.insert("modelName".into(), json!("NVIDIA H100 80GB HBM3"));
        f.insert("Hostname".into(), json!("mtv5-dgx1-hgpu-031"));
        f.insert("container".into(), json!(""));
        f.insert("pod".into(), json!(""));
        f.insert("namespace".into(), json!(""));
        f.insert("value".into(), json!(87.0));
        f.insert("labels_raw".into(), json!(RAW));
        Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::nil(),
            timestamp: Timestamp::parse("2026-11-30T00:00:00.5Z").expect("valid"),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields: f,
        }
    }

    #[test]
    fn a_dcgm_record_is_named_and_labelled_like_dcgm_exporter() {
        let samples = samples(&dcgm(), &Columns::default()).expect("a sample");
        assert_eq!(samples.len(), 1);
        let s = &samples[0];
        assert_eq!(
            (s.name.as_str(), s.value, s.timestamp_ms),
            ("DCGM_FI_DEV_GPU_UTIL", 87.0, 1_795_996_800_500)
        );
        let names: Vec<&str> = s.labels.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            vec![
                "DCGM_FI_DRIVER_VERSION",
                "Hostname",
                "UUID",
                "device",
                "gpu",
                "modelName"
            ]
        );
        assert!(
            s.labels.contains(&("gpu".into(), "0".into())),
            "gpu_id 0.0 is gpu=\"0\""
        );
    }

    #[test]
    fn records_that_cannot_be_samples_say_why() {
        let mut m = dcgm();
        m.fields.insert("value".into(), json!("n/a"));
        assert!(matches!(
            samples(&m, &Columns::default()),
            Err(SampleError::NoValue { .. })
        ));
        let mut m = dcgm();
        m.fields.insert("metric_name".into(), json!("1 bad name"));
        assert!(matches!(
            samples(&m, &Columns::default()),
            Err(SampleError::BadName { .. })
        ));
    }

    #[test]
    fn a_record_without_a_metric_column_gives_a_sample_per_numeric_field() {
        let mut m = dcgm();
        m.fields.shift_remove("metric_name");
        m.fields.insert("fan speed".into(), json!(30.0));
        m.fields.insert("throttled".into(), json!(true));
        let names: Vec<String> = samples(&m, &Columns::default())
            .expect("samples")
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(
            names,
            vec!["telemetry_value", "telemetry_fan_speed", "telemetry_throttled"]
        );
    }

    #[test]
    fn labels_raw_parses_escapes_and_skips_garbage() {
        let parsed = parse_labels_raw(r#"a="x\"y",b="1\\2",c="line\nnext""#);
        assert_eq!(
            parsed,
            vec![
                ("a".into(), "x\"y".into()),
                ("b".into(), "1\\2".into()),
                ("c".into(), "line\nnext".into())
            ]
        );
        assert_eq!(parse_labels_raw(r#"a="unterminated"#), vec![]);
        assert_eq!(parse_labels_raw(""), vec![]);
        let mut out = String::new();
        escape_label_value("a\"b\\c\nd", &mut out);
        assert_eq!(out, r#""a\"b\\c\nd""#);
    }
}
