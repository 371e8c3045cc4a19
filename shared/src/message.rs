//! The message model: what travels through the queue and what is stored as telemetry.
//!
//! The current (`v1`) form is [`Message`]. Older wire forms and their conversions live in
//! [`crate::schema`], which depends on this module (never the other way round); everything
//! inside the services works on [`Message`].

use std::fmt;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use ulid::Ulid;

use crate::version::SchemaVersion;

/// The fields of a message: column name → scalar JSON value (number, bool or string), in the
/// order of the source's columns.
pub type Fields = serde_json::Map<String, serde_json::Value>;

/// A point in time, always written as fixed-width RFC 3339 UTC with microseconds
/// (`2026-11-23T08:11:31.123456Z`), so that lexical key order is time order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(DateTime<Utc>);

impl Timestamp {
    /// The current time, truncated to microseconds (the stored precision).
    pub fn now() -> Self {
        Self::from_datetime(Utc::now())
    }

    /// Wraps a `DateTime`, truncated to microseconds.
    pub fn from_datetime(dt: DateTime<Utc>) -> Self {
        let micros = dt.timestamp_micros();
        Timestamp(DateTime::from_timestamp_micros(micros).unwrap_or(dt))
    }

    /// Milliseconds since the Unix epoch (the `v1beta1` representation).
    pub fn unix_millis(&self) -> i64 {
        self.0.timestamp_millis()
    }

    /// From milliseconds since the Unix epoch; `None` if out of range.
    pub fn from_unix_millis(ms: i64) -> Option<Self> {
        DateTime::from_timestamp_millis(ms).map(Timestamp)
    }

    /// Parses any RFC 3339 time (any offset, any precision) and normalizes it to UTC.
    pub fn parse(text: &str) -> Result<Self, chrono::ParseError> {
        DateTime::parse_from_rfc3339(text).map(|dt| Self::from_datetime(dt.with_timezone(&Utc)))
    }

    /// The inner `DateTime`.
    pub fn as_datetime(&self) -> DateTime<Utc> {
        self.0
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.to_rfc3339_opts(SecondsFormat::Micros, true))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Timestamp::parse(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid RFC 3339 timestamp {text:?}: {e}")))
    }
}

/// Where a message came from: which stream, which pass over the source, which data row
/// (1-based, header excluded). Together with the row's content it determines the idempotency
/// key, so a re-sent row is recognised as the same message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePosition {
    /// The stream id (`STREAM_ID` plus worker suffix).
    pub stream_id: String,
    /// Pass over the source, starting at 0; loop mode increments it at each end of file.
    pub pass: u64,
    /// Data row number, 1-based.
    pub row: u64,
}

/// A telemetry message in the current schema version (`v1`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// Always [`SchemaVersion::V1`] for this type.
    pub schema_version: SchemaVersion,
    /// Unique id of this message (a ULID, so ids sort by creation time).
    pub id: Ulid,
    /// Processing time: when the streamer produced the message.
    pub timestamp: Timestamp,
    /// Hex SHA-256 over what identifies the row (never the id or the processing time).
    pub idempotency_key: String,
    /// Source position, if the producer recorded one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<SourcePosition>,
    /// The row's fields.
    pub fields: Fields,
}

/// A stream's progress, stored at [`crate::keys::Keyspace::stream_checkpoint`] and advanced in
/// the same transaction as each enqueued batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Checkpoint {
    /// The pass in progress (or just completed, if `pass_complete`).
    pub pass: u64,
    /// The last data row of `pass` whose fate is settled (enqueued, absorbed as a duplicate,
    /// or skipped as malformed).
    pub row: u64,
    /// True once every row of `pass` is settled.
    #[serde(default)]
    pub pass_complete: bool,
    /// Fingerprint of the source the stream was started with (the streamer writes
    /// `sha256:<hex>` of the whole file). `row` is a position in that file only, so a streamer
    /// given another file under the same stream id refuses to resume. Absent in checkpoints
    /// written before it existed; the next commit records the current file's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_fingerprint: Option<String>,
    /// For a scraped target's stream: the time of the scrape `pass` numbers (fixed-width RFC
    /// 3339). Every message of that scrape is stamped with it and its idempotency key covers
    /// it, so a scrape resumed after a crash reuses it and its committed samples are absorbed.
    /// `row` then counts the samples of that scrape settled so far. Absent for CSV streams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scrape_time: Option<String>,
    /// A ULID naming the commit that wrote this checkpoint, fresh for every commit. A writer
    /// whose reply was lost (a timeout, a leader change) finds its own id here if its
    /// transaction landed, and another writer's (or none) if it did not. Absent in checkpoints
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
}

/// A field value as text, the one way every component compares and prints field values:
/// strings as they are, whole numbers without a fraction (`3.0` is `"3"`, so a `gpu_id` read as
/// a number still names key segments and filters as `3`), other numbers in their shortest form,
/// booleans as `true`/`false`. `None` for null and for anything that is not a scalar.
pub fn field_text(value: &serde_json::Value) -> Option<std::borrow::Cow<'_, str>> {
    use serde_json::Value;
    match value {
        Value::String(s) => Some(std::borrow::Cow::Borrowed(s.as_str())),
        Value::Number(n) => Some(std::borrow::Cow::Owned(match n.as_f64() {
            Some(f) if n.is_f64() && f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", f as i64),
            _ => n.to_string(),
        })),
        Value::Bool(b) => Some(std::borrow::Cow::Borrowed(if *b { "true" } else { "false" })),
        Value::Null | Value::Array(_) | Value::Object(_) => None,
    }
}

/// Is `hex` a well-formed idempotency key (64 lower-case hex digits)?
pub fn is_idempotency_key(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_fixed_width_and_ordered() {
        let a = Timestamp::parse("2026-11-23T08:11:31Z").expect("valid");
        let b = Timestamp::parse("2026-11-23T09:11:31.5+01:00").expect("valid");
        assert_eq!(a.to_string(), "2026-11-23T08:11:31.000000Z");
        assert_eq!(b.to_string(), "2026-11-23T08:11:31.500000Z");
        assert_eq!(a.to_string().len(), b.to_string().len());
        assert!(a.to_string() < b.to_string());
        assert_eq!(Timestamp::now().to_string().len(), 27);
    }

    #[test]
    fn message_round_trips() {
        let mut fields = Fields::new();
        fields.insert("gpu_id".into(), serde_json::json!(0.0));
        let msg = Message {
            schema_version: SchemaVersion::V1,
            id: Ulid::from_parts(1, 2),
            timestamp: Timestamp::now(),
            idempotency_key: "a".repeat(64),
            source: Some(SourcePosition {
                stream_id: "s".into(),
                pass: 0,
                row: 1,
            }),
            fields,
        };
        let json = serde_json::to_string(&msg).expect("serializes");
        let back: Message = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, msg);
    }

    #[test]
    fn field_text_is_one_rendering_for_every_component() {
        use serde_json::json;
        assert_eq!(
            field_text(&json!("DCGM_FI_DEV_GPU_UTIL")).as_deref(),
            Some("DCGM_FI_DEV_GPU_UTIL")
        );
        assert_eq!(field_text(&json!(3.0)).as_deref(), Some("3"));
        assert_eq!(field_text(&json!(3)).as_deref(), Some("3"));
        assert_eq!(field_text(&json!(-0.5)).as_deref(), Some("-0.5"));
        assert_eq!(field_text(&json!(true)).as_deref(), Some("true"));
        assert_eq!(field_text(&json!(null)), None);
        assert_eq!(field_text(&json!([1])), None);
    }

    #[test]
    fn idempotency_key_shape() {
        assert!(is_idempotency_key(&"0f".repeat(32)));
        assert!(!is_idempotency_key(&"0F".repeat(32)));
        assert!(!is_idempotency_key("abc"));
    }
}
