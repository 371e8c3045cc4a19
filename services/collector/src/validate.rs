//! The transform: a queued payload becomes a `v1` telemetry record, or a reason to
//! dead-letter it.
//!
//! Every schema version is accepted and migrated to `v1` with the conversion code in
//! `telemetry_shared::schema` (the gateway uses the same code in the other direction). A record
//! needs a host name, a GPU id and a GPU UUID from its fields (column names are configurable);
//! a missing or unusable one is a validation error, never "unknown". Old source timestamps are
//! fine: the record is keyed by the message's processing time.
//!
//! A lean queue entry (the streamer's) is decoded with its profile; a JSON one (another
//! producer, or an older release) is given a profile here. Either way the stored record is the
//! lean form against that profile.

use std::sync::Arc;

use serde_json::Value;
use telemetry_shared::{
    Keyspace, Message,
    keys::is_key_segment,
    message::{field_text, is_idempotency_key},
    profiles::ProfileCache,
    record::{self, Form, Profile, ProfileBook, ProfileId},
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
    /// The lean record stored there.
    pub encoded: Vec<u8>,
    /// The profile the record names.
    pub profile: (ProfileId, Arc<Profile>),
    /// How its dedup marker is expected to be found.
    pub marker: MarkerMode,
}

/// How a record's dedup marker is settled in its commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MarkerMode {
    /// The producer wrote the marker with the queue entry (the streamer does): the commit
    /// compares that the marker still has the entry's revision, i.e. this message holds it.
    Held,
    /// No marker was written (another producer): the commit writes it, if it does not exist.
    Claim,
}

/// What validation needs besides the payload.
pub(crate) struct Context<'a> {
    /// Key layout.
    pub keys: &'a Keyspace,
    /// Which fields identify a GPU.
    pub columns: &'a Columns,
    /// Profiles read so far (a lean entry's must be here).
    pub profiles: &'a ProfileCache,
    /// Profiles for messages that arrive as JSON.
    pub book: &'a mut ProfileBook,
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
pub(crate) fn validate(payload: &[u8], queue_id: &str, ctx: &mut Context<'_>) -> Result<Record, String> {
    let (message, lean_profile) = if record::is_lean(payload) {
        let id = queue_id
            .parse()
            .map_err(|_| format!("queue key id {queue_id:?} is not a ULID"))?;
        let head = record::header(payload).map_err(|e| e.to_string())?;
        let profile = ctx
            .profiles
            .get(head.profile)
            .ok_or_else(|| record::RecordError::UnknownProfile(head.profile).to_string())?;
        let message = record::decode(payload, &profile, id, None).map_err(|e| e.to_string())?;
        (message, Some((head.profile, profile)))
    } else {
        (schema::decode(payload).map_err(|e| e.to_string())?.0, None)
    };
    if message.id.to_string() != queue_id {
        return Err(format!(
            "message id {} does not match its queue key ({queue_id})",
            message.id
        ));
    }
    if !is_idempotency_key(&message.idempotency_key) {
        return Err("idempotency_key must be 64 lower-case hex digits".into());
    }
    let hostname = segment(&message.fields, &ctx.columns.hostname)?;
    let gpu_id = segment(&message.fields, &ctx.columns.gpu_id)?;
    let uuid = segment(&message.fields, &ctx.columns.uuid)?;
    let (profile, marker) = match lean_profile {
        Some(profile) => (profile, MarkerMode::Held),
        // A JSON message gets a profile of its GPU's messages.
        None => {
            let choice = ctx
                .book
                .choose(format!("{hostname}/{gpu_id}").as_bytes(), &message);
            ((choice.id, choice.profile), MarkerMode::Claim)
        }
    };
    let encoded = record::encode(&message, &profile.1, profile.0, Form::Stored).map_err(|e| e.to_string())?;
    let data_key = ctx.keys.data_record(
        &hostname,
        &gpu_id,
        &message.timestamp.to_string(),
        &message.id.to_string(),
    );
    Ok(Record {
        device: optional(&message.fields, &ctx.columns.device),
        model: optional(&message.fields, &ctx.columns.model),
        message,
        hostname,
        gpu_id,
        uuid,
        data_key,
        encoded,
        profile,
        marker,
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

    fn check(payload: &[u8], id: &str, columns: &Columns) -> Result<Record, String> {
        let keys = Keyspace::new("");
        let profiles = ProfileCache::new();
        let mut book = ProfileBook::new();
        validate(
            payload,
            id,
            &mut Context {
                keys: &keys,
                columns,
                profiles: &profiles,
                book: &mut book,
            },
        )
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
        let msg = message(dcgm_fields());
        let id = msg.id.to_string();
        for version in SchemaVersion::ALL {
            let payload = serde_json::to_vec(&msg.to_version(version)).expect("json");
            let rec = check(&payload, &id, &Columns::default()).expect("valid");
            assert_eq!(rec.marker, MarkerMode::Claim);
            assert_eq!(
                (rec.hostname.as_str(), rec.gpu_id.as_str(), rec.uuid.as_str()),
                ("host-1", "3", "GPU-abc")
            );
            assert_eq!(
                rec.data_key,
                format!("/telemetry/data/host-1/3/2026-11-23T08:00:00.000000Z_{id}")
            );
            assert_eq!(rec.model.as_deref(), Some("H100"));
            let stored =
                record::decode(&rec.encoded, &rec.profile.1, msg.id, Some(msg.timestamp)).expect("lean");
            assert_eq!(stored, rec.message);
        }
    }

    #[test]
    fn invalid_messages_say_why() {
        let cols = Columns::default();
        let msg = message(dcgm_fields());
        let id = msg.id.to_string();
        let reason =
            |m: &Message| check(&serde_json::to_vec(m).expect("json"), &id, &cols).expect_err("invalid");
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
            check(b"garbage", &id, &cols)
                .expect_err("not json")
                .contains("not JSON")
        );
        let payload = serde_json::to_vec(&msg).expect("json");
        assert!(
            check(&payload, "01OTHER", &cols)
                .expect_err("id")
                .contains("does not match")
        );
    }

    #[test]
    fn a_lean_entry_is_decoded_with_its_profile_or_refused_without_it() {
        let msg = message(dcgm_fields());
        let profile = Arc::new(Profile::of(&msg));
        let id = profile.id();
        let payload = record::encode(&msg, &profile, id, Form::Queue).expect("fits");
        let err = check(&payload, &msg.id.to_string(), &Columns::default()).expect_err("unknown profile");
        assert!(err.contains("does not exist"), "{err}");
        let keys = Keyspace::new("");
        let profiles = ProfileCache::new();
        profiles.insert(id, profile);
        let mut book = ProfileBook::new();
        let rec = validate(
            &payload,
            &msg.id.to_string(),
            &mut Context {
                keys: &keys,
                columns: &Columns::default(),
                profiles: &profiles,
                book: &mut book,
            },
        )
        .expect("valid");
        assert_eq!(
            (rec.marker, rec.profile.0, rec.message),
            (MarkerMode::Held, id, msg)
        );
    }
}
