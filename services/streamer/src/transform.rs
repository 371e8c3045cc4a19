//! The transform: a CSV row becomes a `v1` message with its idempotency key and queue
//! partition.
//!
//! The module is public for the benchmarks, which build messages without etcd.

use std::time::SystemTime;

use serde_json::Value;
use sha2::{Digest, Sha256};
use telemetry_shared::{Fields, Message, SchemaVersion, SourcePosition, Timestamp, keys::partition_of};
use ulid::Ulid;

use crate::source::{ColumnKind, ColumnTypes};

/// Turns one cell into JSON according to its column's kind (see [`ColumnTypes`]).
pub(crate) fn typed_value(raw: &str, kind: ColumnKind) -> Value {
    let is_true = raw.eq_ignore_ascii_case("true");
    let is_false = raw.eq_ignore_ascii_case("false");
    match kind {
        ColumnKind::Bool if is_true || raw == "1" => Value::Bool(true),
        ColumnKind::Bool if is_false || raw == "0" => Value::Bool(false),
        _ if is_true => Value::Bool(true),
        _ if is_false => Value::Bool(false),
        _ => match parse_number(raw) {
            Some(n) => Value::from(n),
            None => Value::String(raw.to_string()),
        },
    }
}

/// A finite decimal number, as f64. Rust's parser also accepts `inf`, `NaN` and the like, which
/// JSON cannot carry; those stay strings. Surrounding white space makes a string too.
fn parse_number(raw: &str) -> Option<f64> {
    let first = raw.as_bytes().first()?;
    if !(first.is_ascii_digit() || matches!(first, b'-' | b'+' | b'.')) {
        return None;
    }
    raw.parse::<f64>().ok().filter(|n| n.is_finite())
}

/// The idempotency key of a row: hex SHA-256 over a versioned, length-prefixed encoding of its
/// source position (stream, pass, row) and its content (column names and raw values). The
/// message id and the processing time are deliberately not part of it, so a retried or re-sent
/// row gets the same key.
pub(crate) fn idempotency_key(
    stream_id: &str,
    pass: u64,
    row: u64,
    headers: &[String],
    values: &[String],
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"telemetry-row/v1\0");
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(stream_id.as_bytes());
    field(&pass.to_be_bytes());
    field(&row.to_be_bytes());
    for (name, value) in headers.iter().zip(values) {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    hex::encode(hasher.finalize())
}

/// Builds messages for one stream: holds the column typing, the partition columns and a
/// monotonic ULID generator.
pub struct MessageBuilder {
    headers: Vec<String>,
    types: ColumnTypes,
    partition_columns: Option<Vec<usize>>,
    ids: ulid::Generator,
}

/// A message ready to enqueue.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The message.
    pub message: Message,
    /// Its queue partition.
    pub partition: u32,
}

impl MessageBuilder {
    /// A builder for rows with these `headers`. `partition_columns` names the columns whose
    /// values pick the queue partition (so one GPU's rows stay in order); if any is missing from
    /// the header, the idempotency key picks it instead.
    pub fn new(headers: Vec<String>, types: ColumnTypes, partition_columns: &[String]) -> Self {
        let indices: Option<Vec<usize>> = partition_columns
            .iter()
            .map(|c| headers.iter().position(|h| h == c))
            .collect();
        let partition_columns = indices.filter(|v| !v.is_empty());
        MessageBuilder {
            headers,
            types,
            partition_columns,
            ids: ulid::Generator::new(),
        }
    }

    /// Whether partitioning uses the configured columns (false: falls back to the key).
    #[cfg(test)]
    fn partitions_by_columns(&self) -> bool {
        self.partition_columns.is_some()
    }

    /// The message for data row `row` of pass `pass` of stream `stream_id`.
    pub fn build(&mut self, stream_id: &str, pass: u64, row: u64, values: &[String]) -> Prepared {
        let key = idempotency_key(stream_id, pass, row, &self.headers, values);
        let mut fields = Fields::with_capacity(self.headers.len());
        for (i, (name, raw)) in self.headers.iter().zip(values).enumerate() {
            fields.insert(name.clone(), typed_value(raw, self.types.kind(i)));
        }
        let partition = match &self.partition_columns {
            Some(cols) => {
                let mut pk = Vec::with_capacity(64);
                for (n, &i) in cols.iter().enumerate() {
                    if n > 0 {
                        pk.push(b'/');
                    }
                    pk.extend_from_slice(values[i].as_bytes());
                }
                partition_of(&pk)
            }
            None => partition_of(key.as_bytes()),
        };
        // The generator only fails after 2^80 ids within one millisecond.
        let id = self
            .ids
            .generate()
            .unwrap_or_else(|_| Ulid::from_datetime(SystemTime::now()));
        Prepared {
            message: Message {
                schema_version: SchemaVersion::CURRENT,
                id,
                timestamp: Timestamp::now(),
                idempotency_key: key,
                source: Some(SourcePosition {
                    stream_id: stream_id.to_string(),
                    pass,
                    row,
                }),
                fields,
            },
            partition,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn cells_are_typed() {
        use ColumnKind::*;
        assert_eq!(typed_value("42", Auto), json!(42.0));
        assert_eq!(typed_value("-1.5e3", Auto), json!(-1500.0));
        assert_eq!(typed_value("0", Auto), json!(0.0));
        assert_eq!(typed_value("1", Auto), json!(1.0));
        assert_eq!(typed_value("TRUE", Auto), json!(true));
        assert_eq!(typed_value("false", Auto), json!(false));
        assert_eq!(typed_value("1", Bool), json!(true));
        assert_eq!(typed_value("0", Bool), json!(false));
        assert_eq!(typed_value("", Bool), json!(""));
        assert_eq!(typed_value("NaN", Auto), json!("NaN"));
        assert_eq!(typed_value("inf", Auto), json!("inf"));
        assert_eq!(typed_value(" 5", Auto), json!(" 5"));
        assert_eq!(typed_value("", Auto), json!(""));
        assert_eq!(typed_value("GPU-5fd4", Auto), json!("GPU-5fd4"));
    }

    #[test]
    fn key_depends_on_position_and_content_only() {
        let h = vec!["a".to_string(), "b".to_string()];
        let v = vec!["1".to_string(), "x".to_string()];
        let k = idempotency_key("s", 0, 1, &h, &v);
        assert_eq!(k.len(), 64);
        assert_eq!(k, idempotency_key("s", 0, 1, &h, &v));
        assert_ne!(k, idempotency_key("s", 1, 1, &h, &v));
        assert_ne!(k, idempotency_key("s", 0, 2, &h, &v));
        assert_ne!(k, idempotency_key("t", 0, 1, &h, &v));
        let v2 = vec!["1x".to_string(), "".to_string()];
        assert_ne!(
            k,
            idempotency_key("s", 0, 1, &h, &v2),
            "length prefixes keep fields apart"
        );
    }

    #[test]
    fn same_row_twice_gets_same_key_but_new_id() {
        let headers = vec!["Hostname".to_string(), "gpu_id".to_string()];
        let mut b = MessageBuilder::new(
            headers,
            ColumnTypes::all_auto(2),
            &["Hostname".into(), "gpu_id".into()],
        );
        assert!(b.partitions_by_columns());
        let values = vec!["h1".to_string(), "0".to_string()];
        let a = b.build("s", 0, 1, &values);
        let c = b.build("s", 0, 1, &values);
        assert_eq!(a.message.idempotency_key, c.message.idempotency_key);
        assert_ne!(a.message.id, c.message.id);
        assert!(a.message.id < c.message.id, "ids are monotonic");
        assert_eq!(a.partition, c.partition);
        assert_eq!(a.message.fields["gpu_id"], json!(0.0));
    }
}
