//! The transform: a stored record (its data key, value and revision) becomes its samples, named
//! and labelled by `shared::exposition` exactly as the gateway's `/metrics/gpus` shows them, or
//! the reason it cannot become any (which makes it a rejected record, never a stalled stream).

use std::hash::{DefaultHasher, Hash as _, Hasher as _};

use telemetry_shared::{
    Keyspace, Timestamp,
    config::Columns,
    exposition::{self, Sample},
    profiles::ProfileCache,
    record::ProfileId,
};

/// A stored record as etcd gave it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// The revision it was written at.
    pub revision: i64,
    /// Its data key.
    pub key: String,
    /// Its value (lean or JSON).
    pub value: Vec<u8>,
}

/// A record converted: where it sits in the export order, and its samples or why it has none.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Item {
    /// The revision it was written at.
    pub revision: i64,
    /// Its data key (the order within a revision).
    pub key: String,
    /// Its processing time (from the key), if the key has one.
    pub time: Option<Timestamp>,
    /// Its samples, or why it cannot be exported.
    pub outcome: Result<Converted, String>,
}

/// The samples of a record and the identity of each one's series.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Converted {
    /// The samples (at least one).
    pub samples: Vec<Sample>,
    /// A hash of each sample's series (name and labels): two samples of one series never share
    /// a request. A collision only ends a request early, which is always safe.
    pub series: Vec<u64>,
}

impl Item {
    /// Samples this item adds to a request (0 for a rejected one).
    pub fn sample_count(&self) -> usize {
        self.outcome.as_ref().map_or(0, |c| c.samples.len())
    }
}

/// The identity of a sample's series.
pub(crate) fn series_of(sample: &Sample) -> u64 {
    let mut hasher = DefaultHasher::new();
    sample.name.hash(&mut hasher);
    sample.labels.hash(&mut hasher);
    hasher.finish()
}

/// The profiles the lean records among `records` name (to load before [`convert`]).
pub(crate) fn profiles_needed(records: &[Record]) -> Vec<ProfileId> {
    records
        .iter()
        .filter_map(|r| ProfileCache::needs(&r.value))
        .collect()
}

/// Converts one record; its profile must be cached already.
pub(crate) fn convert(keys: &Keyspace, profiles: &ProfileCache, columns: &Columns, record: Record) -> Item {
    let parts = keys.parse_data_record(&record.key);
    let time = parts.and_then(|p| Timestamp::parse(p.timestamp).ok());
    let outcome = match parts {
        None => Err("not a telemetry record key".to_string()),
        Some(parts) => profiles
            .decode_stored(&parts, &record.value)
            .map_err(|e| format!("unreadable record: {e}"))
            .and_then(|message| exposition::samples(&message, columns).map_err(|e| e.to_string()))
            .and_then(|samples| {
                if samples.is_empty() {
                    Err("no numeric field to export".to_string())
                } else {
                    Ok(Converted {
                        series: samples.iter().map(series_of).collect(),
                        samples,
                    })
                }
            }),
    };
    Item {
        revision: record.revision,
        key: record.key,
        time,
        outcome,
    }
}

/// Puts one revision's records in export order: by key (a watch gives a transaction's changes in
/// operation order, a range in key order; the export order must not depend on which one read
/// them).
pub(crate) fn order(records: &mut [Record]) {
    records.sort_by(|a, b| (a.revision, &a.key).cmp(&(b.revision, &b.key)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use telemetry_shared::{Fields, Message, SchemaVersion};

    fn record(value: serde_json::Value) -> Record {
        let keys = Keyspace::new("/t");
        let mut fields = Fields::new();
        fields.insert("metric_name".into(), "DCGM_FI_DEV_GPU_TEMP".into());
        fields.insert("Hostname".into(), "h1".into());
        fields.insert("gpu_id".into(), 0.0.into());
        fields.insert("uuid".into(), "GPU-1".into());
        fields.insert("value".into(), value);
        let message = Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::nil(),
            timestamp: Timestamp::parse("2026-01-01T00:00:00.000000Z").expect("time"),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        };
        Record {
            revision: 7,
            key: keys.data_record(
                "h1",
                "0",
                "2026-01-01T00:00:00.000000Z",
                &ulid::Ulid::nil().to_string(),
            ),
            value: serde_json::to_vec(&message).expect("json"),
        }
    }

    fn convert_one(r: Record) -> Item {
        convert(&Keyspace::new("/t"), &ProfileCache::new(), &Columns::default(), r)
    }

    #[test]
    fn a_record_becomes_its_sample_with_its_series() {
        let item = convert_one(record(55.0.into()));
        let converted = item.outcome.expect("converted");
        assert_eq!(converted.samples.len(), 1);
        assert_eq!(converted.samples[0].name, "DCGM_FI_DEV_GPU_TEMP");
        assert_eq!(converted.samples[0].value, 55.0);
        assert_eq!(converted.series, vec![series_of(&converted.samples[0])]);
        assert!(item.time.is_some());
        // Another value of the same series has the same identity.
        let other = convert_one(record(60.0.into())).outcome.expect("converted");
        assert_eq!(other.series, converted.series);
    }

    #[test]
    fn records_without_a_sample_say_why() {
        let item = convert_one(record("n/a".into()));
        assert_eq!(item.outcome, Err("field \"value\" is not a number".into()));
        let mut bad = record(1.0.into());
        bad.value = b"{not json".to_vec();
        assert!(
            convert_one(bad)
                .outcome
                .is_err_and(|e| e.starts_with("unreadable record"))
        );
        let mut stray = record(1.0.into());
        stray.key = "/t/telemetry/data/oops".into();
        assert_eq!(
            convert_one(stray).outcome,
            Err("not a telemetry record key".into())
        );
    }

    #[test]
    fn a_revision_is_ordered_by_key() {
        let r = |rev, key: &str| Record {
            revision: rev,
            key: key.into(),
            value: Vec::new(),
        };
        let mut records = vec![r(5, "b"), r(5, "a"), r(4, "z")];
        order(&mut records);
        let keys: Vec<&str> = records.iter().map(|r| r.key.as_str()).collect();
        assert_eq!(keys, vec!["z", "a", "b"]);
    }
}
