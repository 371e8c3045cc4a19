//! The transform: a CSV row becomes a `v1` message with its idempotency key and queue
//! partition.
//!
//! The module is public for the benchmarks, which build messages without etcd.

use std::time::SystemTime;

use std::sync::Arc;

use serde_json::Value;
use telemetry_shared::{
    Fields, Message, SchemaVersion, SourcePosition, Timestamp,
    keys::partition_of,
    record::{self, Profile, ProfileBook, ProfileId, derive_key},
};
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

/// Builds messages for one stream: holds the column typing, the partition columns, a
/// monotonic ULID generator and the stream's profiles (what rows of one GPU have in common).
pub struct MessageBuilder {
    headers: Vec<String>,
    types: ColumnTypes,
    partition_columns: Option<Vec<usize>>,
    ids: ulid::Generator,
    profiles: ProfileBook,
}

/// A message ready to enqueue.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The message.
    pub message: Message,
    /// Its queue partition.
    pub partition: u32,
    /// The profile its lean form names (stored with the first transaction that needs it).
    pub profile: (ProfileId, Arc<Profile>),
    /// The lean queue entry.
    pub encoded: Vec<u8>,
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
            profiles: ProfileBook::new(),
        }
    }

    /// Whether partitioning uses the configured columns (false: falls back to the key).
    #[cfg(test)]
    fn partitions_by_columns(&self) -> bool {
        self.partition_columns.is_some()
    }

    /// The message for data row `row` of pass `pass` of stream `stream_id`, with its lean form.
    pub fn build(&mut self, stream_id: &str, pass: u64, row: u64, values: &[String]) -> Prepared {
        let mut fields = Fields::with_capacity(self.headers.len());
        for (i, (name, raw)) in self.headers.iter().zip(values).enumerate() {
            fields.insert(name.clone(), typed_value(raw, self.types.kind(i)));
        }
        let key = derive_key(stream_id, pass, row, fields.iter());
        // The partition key (by default `Hostname/gpu_id`) also groups rows for their profiles.
        let group = match &self.partition_columns {
            Some(cols) => {
                let mut pk = Vec::with_capacity(64);
                for (n, &i) in cols.iter().enumerate() {
                    if n > 0 {
                        pk.push(b'/');
                    }
                    pk.extend_from_slice(values[i].as_bytes());
                }
                pk
            }
            None => key.as_bytes().to_vec(),
        };
        // The generator only fails after 2^80 ids within one millisecond.
        let id = self
            .ids
            .generate()
            .unwrap_or_else(|_| Ulid::from_datetime(SystemTime::now()));
        let message = Message {
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
        };
        let choice = self.profiles.choose(&group, &message);
        // The profile was made from this stream's messages, so the message fits it.
        let encoded =
            record::encode(&message, &choice.profile, choice.id, record::Form::Queue).unwrap_or_default();
        Prepared {
            partition: partition_of(&group),
            profile: (choice.id, choice.profile),
            encoded,
            message,
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
    fn key_depends_on_position_and_typed_content_only() {
        let mut b = MessageBuilder::new(vec!["a".into(), "b".into()], ColumnTypes::all_auto(2), &[]);
        let v = vec!["1".to_string(), "x".to_string()];
        let k = b.build("s", 0, 1, &v).message.idempotency_key;
        assert_eq!(k.len(), 64);
        assert_eq!(k, b.build("s", 0, 1, &v).message.idempotency_key);
        assert_ne!(k, b.build("s", 1, 1, &v).message.idempotency_key);
        assert_ne!(k, b.build("s", 0, 2, &v).message.idempotency_key);
        assert_ne!(k, b.build("t", 0, 1, &v).message.idempotency_key);
        let v2 = vec!["1x".to_string(), "".to_string()];
        assert_ne!(
            k,
            b.build("s", 0, 1, &v2).message.idempotency_key,
            "length prefixes keep fields apart"
        );
    }

    #[test]
    fn the_queue_entry_decodes_to_the_message() {
        let headers = vec!["Hostname".to_string(), "gpu_id".to_string(), "value".to_string()];
        let mut b = MessageBuilder::new(
            headers,
            ColumnTypes::all_auto(3),
            &["Hostname".into(), "gpu_id".into()],
        );
        for row in 1..=3u64 {
            let p = b.build("s", 0, row, &["h1".into(), "0".into(), row.to_string()]);
            let back = record::decode(&p.encoded, &p.profile.1, p.message.id, None).expect("decodes");
            assert_eq!(back, p.message);
        }
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
