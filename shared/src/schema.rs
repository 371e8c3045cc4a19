//! The older wire forms of the telemetry payload and the conversions between them.
//!
//! The direction is one way: [`crate::version`] names the versions, [`crate::message`] is the
//! current form, and this module (which knows both) converts between them.
//!
//! Three versions exist; `v1` is current. Producers may still enqueue the older ones, the
//! collector migrates everything to `v1` before storing it, and the gateway converts `v1` back
//! down when a client asks for an older version. Both directions use the code here and nothing
//! else, so the collector and the gateway can never disagree.
//!
//! | version | id | time | fields | source position |
//! |---|---|---|---|---|
//! | `v1beta1` | `message_id` | `timestamp_ms` (Unix milliseconds) | `payload` | no |
//! | `v1beta2` | `id` | `timestamp` (RFC 3339, any offset) | `fields` | no |
//! | `v1` | `id` | `timestamp` (fixed-width RFC 3339 UTC, µs) | `fields` | optional `source` |
//!
//! The JSON Schema of each version is in `schemas/{version}.json` and embedded
//! ([`SchemaVersion::json_schema`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use thiserror::Error;
use ulid::Ulid;

use crate::{
    message::{Fields, Message, Timestamp, is_idempotency_key},
    version::{SchemaVersion, UnknownVersion},
};

/// Why a payload could not be read as a message of any version.
#[derive(Debug, Error)]
pub enum SchemaError {
    /// Not JSON at all.
    #[error("payload is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    /// JSON, but without a usable `schema_version`.
    #[error("payload has no string schema_version")]
    MissingVersion,
    /// A version name we do not know.
    #[error(transparent)]
    UnknownVersion(#[from] UnknownVersion),
    /// The payload does not match its version's shape.
    #[error("payload does not match schema {version}: {reason}")]
    Invalid {
        /// The version the payload claimed.
        version: SchemaVersion,
        /// What is wrong.
        reason: String,
    },
}

/// The `v1beta1` wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageV1beta1 {
    /// Always `v1beta1`.
    pub schema_version: SchemaVersion,
    /// The message id (ULID).
    pub message_id: Ulid,
    /// Processing time in Unix milliseconds.
    pub timestamp_ms: i64,
    /// Idempotency key.
    pub idempotency_key: String,
    /// The row's fields.
    pub payload: Fields,
}

/// The `v1beta2` wire form.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageV1beta2 {
    /// Always `v1beta2`.
    pub schema_version: SchemaVersion,
    /// The message id (ULID).
    pub id: Ulid,
    /// Processing time, RFC 3339.
    pub timestamp: Timestamp,
    /// Idempotency key.
    pub idempotency_key: String,
    /// The row's fields.
    pub fields: Fields,
}

fn invalid(version: SchemaVersion, reason: impl Into<String>) -> SchemaError {
    SchemaError::Invalid {
        version,
        reason: reason.into(),
    }
}

/// Checks what serde's shape check cannot: key format and scalar field values.
fn check_common(version: SchemaVersion, idempotency_key: &str, fields: &Fields) -> Result<(), SchemaError> {
    if !is_idempotency_key(idempotency_key) {
        return Err(invalid(
            version,
            "idempotency_key must be 64 lower-case hex digits",
        ));
    }
    for (name, value) in fields {
        if name.is_empty() {
            return Err(invalid(version, "field names must not be empty"));
        }
        if !(value.is_string() || value.is_number() || value.is_boolean() || value.is_null()) {
            return Err(invalid(version, format!("field {name:?} is not a scalar")));
        }
    }
    Ok(())
}

impl MessageV1beta1 {
    /// Migrates one step up, to `v1beta2`.
    pub fn upgrade(self) -> Result<MessageV1beta2, SchemaError> {
        let timestamp = Timestamp::from_unix_millis(self.timestamp_ms)
            .ok_or_else(|| invalid(SchemaVersion::V1beta1, "timestamp_ms out of range"))?;
        Ok(MessageV1beta2 {
            schema_version: SchemaVersion::V1beta2,
            id: self.message_id,
            timestamp,
            idempotency_key: self.idempotency_key,
            fields: self.payload,
        })
    }
}

impl MessageV1beta2 {
    /// Migrates one step up, to `v1` (no source position is known).
    pub fn upgrade(self) -> Message {
        Message {
            schema_version: SchemaVersion::V1,
            id: self.id,
            timestamp: self.timestamp,
            idempotency_key: self.idempotency_key,
            source: None,
            fields: self.fields,
        }
    }

    /// Converts one step down, to `v1beta1` (milliseconds precision).
    pub fn downgrade(self) -> MessageV1beta1 {
        MessageV1beta1 {
            schema_version: SchemaVersion::V1beta1,
            message_id: self.id,
            timestamp_ms: self.timestamp.unix_millis(),
            idempotency_key: self.idempotency_key,
            payload: self.fields,
        }
    }
}

impl Message {
    /// Converts one step down, to `v1beta2` (drops the source position).
    pub fn downgrade(self) -> MessageV1beta2 {
        MessageV1beta2 {
            schema_version: SchemaVersion::V1beta2,
            id: self.id,
            timestamp: self.timestamp,
            idempotency_key: self.idempotency_key,
            fields: self.fields,
        }
    }

    /// Renders this message as a JSON value of the requested version.
    pub fn to_version(&self, version: SchemaVersion) -> Value {
        // Serializing these plain structs cannot fail; fall back to Null rather than panic.
        let result = match version {
            SchemaVersion::V1 => serde_json::to_value(self),
            SchemaVersion::V1beta2 => serde_json::to_value(self.clone().downgrade()),
            SchemaVersion::V1beta1 => serde_json::to_value(self.clone().downgrade().downgrade()),
        };
        result.unwrap_or(Value::Null)
    }
}

/// Reads a payload of any supported version, validates it and migrates it to `v1`.
/// Returns the message and the version it arrived in.
pub fn decode(bytes: &[u8]) -> Result<(Message, SchemaVersion), SchemaError> {
    let value: Value = serde_json::from_slice(bytes).map_err(SchemaError::NotJson)?;
    decode_value(value)
}

/// Like [`decode`], from an already parsed JSON value.
pub fn decode_value(value: Value) -> Result<(Message, SchemaVersion), SchemaError> {
    let version: SchemaVersion = value
        .get("schema_version")
        .and_then(Value::as_str)
        .ok_or(SchemaError::MissingVersion)?
        .parse()?;
    let shape = |e: serde_json::Error| invalid(version, e.to_string());
    let message = match version {
        SchemaVersion::V1 => {
            let m: Message = serde_json::from_value(value).map_err(shape)?;
            check_common(version, &m.idempotency_key, &m.fields)?;
            m
        }
        SchemaVersion::V1beta2 => {
            let m: MessageV1beta2 = serde_json::from_value(value).map_err(shape)?;
            check_common(version, &m.idempotency_key, &m.fields)?;
            m.upgrade()
        }
        SchemaVersion::V1beta1 => {
            let m: MessageV1beta1 = serde_json::from_value(value).map_err(shape)?;
            check_common(version, &m.idempotency_key, &m.payload)?;
            m.upgrade()?.upgrade()
        }
    };
    Ok((message, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::SourcePosition;
    use serde_json::json;

    fn sample() -> Message {
        let mut fields = Fields::new();
        fields.insert("Hostname".into(), json!("host-1"));
        fields.insert("gpu_id".into(), json!(3.0));
        fields.insert("ok".into(), json!(true));
        Message {
            schema_version: SchemaVersion::V1,
            id: Ulid::from_parts(1_700_000_000_000, 42),
            timestamp: Timestamp::parse("2026-11-23T08:00:00.123Z").expect("valid"),
            idempotency_key: "ab".repeat(32),
            source: Some(SourcePosition {
                stream_id: "s".into(),
                pass: 1,
                row: 2,
            }),
            fields,
        }
    }

    #[test]
    fn versions_parse_and_print() {
        for v in SchemaVersion::ALL {
            assert_eq!(v.as_str().parse::<SchemaVersion>(), Ok(v));
        }
        assert!("v2".parse::<SchemaVersion>().is_err());
    }

    #[test]
    fn every_version_round_trips_through_decode() {
        let msg = sample();
        for v in SchemaVersion::ALL {
            let wire = msg.to_version(v);
            assert_eq!(wire["schema_version"], v.as_str());
            let (back, seen) = decode_value(wire).expect("decodes");
            assert_eq!(seen, v);
            assert_eq!(back.id, msg.id);
            assert_eq!(back.fields, msg.fields);
            assert_eq!(back.idempotency_key, msg.idempotency_key);
            // v1beta1 keeps milliseconds only; the sample has no sub-millisecond part.
            assert_eq!(back.timestamp, msg.timestamp);
            if v == SchemaVersion::V1 {
                assert_eq!(back.source, msg.source);
            } else {
                assert_eq!(back.source, None);
            }
        }
    }

    #[test]
    fn bad_payloads_are_explained() {
        assert!(matches!(decode(b"not json"), Err(SchemaError::NotJson(_))));
        assert!(matches!(decode(b"{}"), Err(SchemaError::MissingVersion)));
        assert!(matches!(
            decode(br#"{"schema_version":"v9"}"#),
            Err(SchemaError::UnknownVersion(_))
        ));
        let mut wire = sample().to_version(SchemaVersion::V1);
        wire["fields"]["nested"] = json!({"a": 1});
        let err = decode_value(wire).expect_err("nested field");
        assert!(err.to_string().contains("not a scalar"), "{err}");
        let mut wire = sample().to_version(SchemaVersion::V1beta1);
        wire["idempotency_key"] = json!("short");
        assert!(decode_value(wire).is_err());
        let mut wire = sample().to_version(SchemaVersion::V1beta2);
        wire["extra"] = json!(1);
        assert!(decode_value(wire).is_err());
    }

    #[test]
    fn embedded_json_schemas_are_json_and_named() {
        for v in SchemaVersion::ALL {
            let schema: Value = serde_json::from_str(v.json_schema()).expect("schema is JSON");
            assert_eq!(schema["properties"]["schema_version"]["const"], v.as_str());
        }
    }
}
