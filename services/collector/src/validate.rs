//! The transform: a queued payload becomes a `v1` telemetry record, or a reason to
//! dead-letter it.
//!
//! Every schema version is accepted and migrated to `v1` with the conversion code in
//! `telemetry_shared::schema` (the gateway uses the same code in the other direction). A record
//! needs a host name, a GPU id and a GPU UUID from its fields (column names are configurable);
//! a missing or unusable one is a validation error, never "unknown". Old source timestamps are
//! fine: the record is keyed by the message's processing time.

use serde_json::Value;
use telemetry_shared::{
    Keyspace, Message,
    keys::is_key_segment,
    message::{field_text, is_idempotency_key},
    schema,
};

use crate::config::Columns;

/// A message that passed validation.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// The message, migrated to `v1`.
    pub message: Message,
    /// Host name (a key segment).
    pub hostname: String,
    /// GPU id within the host (a key segment).
    pub gpu_id: String,
    /// GPU UUID.
    pub uuid: String,
    /// Device name, if present.
    pub device: Option<String>,
    /// Model name, if present.
    pub model: Option<String>,
    /// The data key it will be stored under.
    pub data_key: String,
    /// The `v1` JSON stored there.
    pub encoded: Vec<u8>,
}

/// A field value as a key segment (see [`field_text`]): a missing, null or non-scalar value, or
/// one that cannot be a key segment, is a validation error.
fn segment(fields: &telemetry_shared::Fields, column: &str) -> Result<String, String> {
    let text = match fields.get(column) {
        None | Some(Value::Null) => return Err(format!("missing field {column:?}")),
        Some(value) => {
            field_text(value).ok_or_else(|| format!("field {column:?} is not a scalar: {value}"))?
        }
    };
    if !is_key_segment(&text) {
        return Err(format!(
            "field {column:?} = {text:?} cannot be used in a key (empty, too long, or contains '/')"
        ));
    }
    Ok(text.into_owned())
}

/// An optional descriptive field as text; empty counts as absent.
fn optional(fields: &telemetry_shared::Fields, column: &str) -> Option<String> {
    fields
        .get(column)
        .and_then(field_text)
        .filter(|t| !t.is_empty())
        .map(|t| t.into_owned())
}

/// Validates and migrates one queued payload. `queue_id` is the id part of its queue key, which
/// must match the message id (a mismatch means the entry was not written by a producer that
/// follows the layout).
pub(crate) fn validate(
    payload: &[u8],
    queue_id: &str,
    keys: &Keyspace,
    columns: &Columns,
) -> Result<Record, String> {
    let (message, _) = schema::decode(payload).map_err(|e| e.to_string())?;
    if message.id.to_string() != queue_id {
        return Err(format!(
            "message id {} does not match its queue key ({queue_id})",
            message.id
        ));
    }
    if !is_idempotency_key(&message.idempotency_key) {
        return Err("idempotency_key must be 64 lower-case hex digits".into());
    }
    let hostname = segment(&message.fields, &columns.hostname)?;
    let gpu_id = segment(&message.fields, &columns.gpu_id)?;
    let uuid = segment(&message.fields, &columns.uuid)?;
    let device = optional(&message.fields, &columns.device);
    let model = optional(&message.fields, &columns.model);
    let id = message.id.to_string();
    let data_key = keys.data_record(&hostname, &gpu_id, &message.timestamp.to_string(), &id);
    let encoded = serde_json::to_vec(&message).map_err(|e| format!("cannot encode: {e}"))?;
    Ok(Record {
        message,
        hostname,
        gpu_id,
        uuid,
        device,
        model,
        data_key,
        encoded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use telemetry_shared::{Fields, SchemaVersion, Timestamp};

    fn message(fields: Fields) -> Message {
        Message {
            schema_version: SchemaVersion::V1,
            id: ulid::Ulid::from_parts(1_700_000_000_000, 7),
            timestamp: Timestamp::parse("2026-11-23T08:00:00Z").expect("valid"),
            idempotency_key: "ab".repeat(32),
            source: None,
            fields,
        }
    }

    fn dcgm_fields() -> Fields {
        let mut f = Fields::new();
        f.insert("Hostname".into(), json!("host-1"));
        f.insert("gpu_id".into(), json!(3.0));
        f.insert("uuid".into(), json!("GPU-abc"));
        f.insert("device".into(), json!("nvidia3"));
        f.insert("modelName".into(), json!("H100"));
        f
    }

    #[test]
    fn valid_messages_of_every_version_become_records() {
        let keys = Keyspace::new("");
        let msg = message(dcgm_fields());
        let id = msg.id.to_string();
        for version in SchemaVersion::ALL {
            let payload = serde_json::to_vec(&msg.to_version(version)).expect("json");
            let rec = validate(&payload, &id, &keys, &Columns::default()).expect("valid");
            assert_eq!(
                (rec.hostname.as_str(), rec.gpu_id.as_str(), rec.uuid.as_str()),
                ("host-1", "3", "GPU-abc")
            );
            assert_eq!(
                rec.data_key,
                format!("/telemetry/data/host-1/3/2026-11-23T08:00:00.000000Z_{id}")
            );
            assert_eq!(rec.model.as_deref(), Some("H100"));
            let stored: Message = serde_json::from_slice(&rec.encoded).expect("v1");
            assert_eq!(stored.schema_version, SchemaVersion::V1);
        }
    }

    #[test]
    fn invalid_messages_say_why() {
        let keys = Keyspace::new("");
        let cols = Columns::default();
        let msg = message(dcgm_fields());
        let id = msg.id.to_string();
        let reason = |m: &Message| {
            validate(&serde_json::to_vec(m).expect("json"), &id, &keys, &cols).expect_err("invalid")
        };
        let mut m = msg.clone();
        m.fields.shift_remove("Hostname");
        assert!(reason(&m).contains("missing field \"Hostname\""));
        let mut m = msg.clone();
        m.fields.insert("uuid".into(), json!(""));
        assert!(reason(&m).contains("uuid"));
        let mut m = msg.clone();
        m.fields.insert("Hostname".into(), json!("a/b"));
        assert!(reason(&m).contains("cannot be used in a key"));
        assert!(
            validate(b"garbage", &id, &keys, &cols)
                .expect_err("not json")
                .contains("not JSON")
        );
        let payload = serde_json::to_vec(&msg).expect("json");
        assert!(
            validate(&payload, "01OTHER", &keys, &cols)
                .expect_err("id")
                .contains("does not match")
        );
    }
}
