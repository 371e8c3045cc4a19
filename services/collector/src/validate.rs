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
    Keyspace, Message, Timestamp,
    keys::is_key_segment,
    message::{field_text, is_idempotency_key},
    profiles::ProfileCache,
    record::{self, Form, Profile, ProfileBook, ProfileId},
    schema,
};

use crate::config::Columns;

/// A message that passed validation.
#[derive(Debug, Clone)]
pub struct Record {
    /// The message's processing time.
    pub timestamp: Timestamp,
    /// The message's idempotency key.
    pub idempotency_key: String,
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
pub enum MarkerMode {
    /// No marker: the key derives from the entry's stream position and values (a lean entry of
    /// a CSV row), and the stream's checkpoint let that position be enqueued once. This entry is the only one of its key, so the compare that it is still queued at
    /// the revision read (with its delete in the same transaction) stores it once.
    Fenced,
    /// The producer wrote the marker with the queue entry (the streamer does for scraped
    /// samples): the commit compares that the marker still has the entry's revision, i.e. this
    /// message holds it.
    Held,
    /// No marker was written (another producer): the commit writes it, if it does not exist.
    Claim,
}

/// What validation needs besides the payload.
pub struct Context<'a> {
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
fn segment(value: Option<&Value>, column: &str) -> Result<String, String> {
    let text = match value {
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
fn optional(value: Option<&Value>) -> Option<String> {
    value
        .and_then(field_text)
        .filter(|t| !t.is_empty())
        .map(|t| t.into_owned())
}

/// The identifying fields of a message, by the configured columns.
struct Identity {
    hostname: String,
    gpu_id: String,
    uuid: String,
    device: Option<String>,
    model: Option<String>,
}

impl Identity {
    fn of<'v>(columns: &Columns, get: impl Fn(&str) -> Option<&'v Value>) -> Result<Self, String> {
        Ok(Identity {
            hostname: segment(get(&columns.hostname), &columns.hostname)?,
            gpu_id: segment(get(&columns.gpu_id), &columns.gpu_id)?,
            uuid: segment(get(&columns.uuid), &columns.uuid)?,
            device: optional(get(&columns.device)),
            model: optional(get(&columns.model)),
        })
    }
}

/// Validates and migrates one queued payload. `queue_id` is the id part of its queue key, which
/// must match the message id (a mismatch means the entry was not written by a producer that
/// follows the layout).
pub fn validate(payload: &[u8], queue_id: &str, ctx: &mut Context<'_>) -> Result<Record, String> {
    if record::is_lean(payload) {
        lean(payload, queue_id, ctx)
    } else {
        json(payload, queue_id, ctx)
    }
}

/// A lean entry (the streamer's), read against its profile without building its message: the
/// stored record is the entry without its processing time (and without its idempotency key
/// when that is the derived one), which is what encoding the decoded message would give.
fn lean(payload: &[u8], queue_id: &str, ctx: &mut Context<'_>) -> Result<Record, String> {
    let id: ulid::Ulid = queue_id
        .parse()
        .map_err(|_| format!("queue key id {queue_id:?} is not a ULID"))?;
    // The parser also takes lower case and wraps ids past the 128 bits; the data key is made
    // from the canonical form, so only that is accepted.
    if id.to_string() != queue_id {
        return Err(format!(
            "queue key id {queue_id:?} is not a canonical ULID ({id})"
        ));
    }
    let head = record::header(payload).map_err(|e| e.to_string())?;
    let profile_id = head.profile;
    let profile = ctx
        .profiles
        .get(profile_id)
        .ok_or_else(|| record::RecordError::UnknownProfile(profile_id).to_string())?;
    let view = record::View::read(payload, head, &profile).map_err(|e| e.to_string())?;
    let timestamp = view
        .header
        .timestamp
        .ok_or_else(|| record::RecordError::Malformed("no processing time").to_string())?;
    let derived = view.derived_key();
    let idempotency_key = view
        .header
        .explicit_key
        .clone()
        .or_else(|| derived.clone())
        .ok_or_else(|| record::RecordError::Malformed("no idempotency key").to_string())?;
    if !is_idempotency_key(&idempotency_key) {
        return Err("idempotency_key must be 64 lower-case hex digits".into());
    }
    let who = Identity::of(ctx.columns, |c| view.get(c))?;
    // A key that derives from the entry's stream position and values was deduplicated by the
    // stream's checkpoint (a CSV row's); one the producer chose (a scraped sample's) by its
    // marker.
    let derives = derived.as_deref() == Some(idempotency_key.as_str());
    let marker = if derives {
        MarkerMode::Fenced
    } else {
        MarkerMode::Held
    };
    let encoded = view.stored(payload, derives);
    drop(view);
    Ok(finish(
        ctx.keys,
        id,
        timestamp,
        idempotency_key,
        who,
        encoded,
        (profile_id, profile),
        marker,
    ))
}

/// A JSON entry (another producer, or an older release) of any schema version, migrated to
/// `v1` and given a profile of its GPU's messages.
fn json(payload: &[u8], queue_id: &str, ctx: &mut Context<'_>) -> Result<Record, String> {
    let message: Message = schema::decode(payload).map_err(|e| e.to_string())?.0;
    if message.id.to_string() != queue_id {
        return Err(format!(
            "message id {} does not match its queue key ({queue_id})",
            message.id
        ));
    }
    if !is_idempotency_key(&message.idempotency_key) {
        return Err("idempotency_key must be 64 lower-case hex digits".into());
    }
    let who = Identity::of(ctx.columns, |c| message.fields.get(c))?;
    let choice = ctx
        .book
        .choose(format!("{}/{}", who.hostname, who.gpu_id).as_bytes(), &message);
    let encoded =
        record::encode(&message, &choice.profile, choice.id, Form::Stored).map_err(|e| e.to_string())?;
    Ok(finish(
        ctx.keys,
        message.id,
        message.timestamp,
        message.idempotency_key,
        who,
        encoded,
        (choice.id, choice.profile),
        MarkerMode::Claim,
    ))
}

#[allow(clippy::too_many_arguments)]
fn finish(
    keys: &Keyspace,
    id: ulid::Ulid,
    timestamp: Timestamp,
    idempotency_key: String,
    who: Identity,
    encoded: Vec<u8>,
    profile: (ProfileId, Arc<Profile>),
    marker: MarkerMode,
) -> Record {
    let data_key = keys.data_record(
        &who.hostname,
        &who.gpu_id,
        &timestamp.to_string(),
        &id.to_string(),
    );
    Record {
        timestamp,
        idempotency_key,
        hostname: who.hostname,
        gpu_id: who.gpu_id,
        uuid: who.uuid,
        device: who.device,
        model: who.model,
        data_key,
        encoded,
        profile,
        marker,
    }
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
            assert_eq!(stored, msg);
            assert_eq!(
                (rec.timestamp, &rec.idempotency_key),
                (msg.timestamp, &msg.idempotency_key)
            );
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
        profiles.insert(id, profile.clone());
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
        assert_eq!((rec.marker, rec.profile.0), (MarkerMode::Held, id));
        // A queue key whose id is not the canonical ULID (lower case here) is refused: the
        // data key would name another id.
        let lower = msg.id.to_string().to_lowercase();
        let err = validate(
            &payload,
            &lower,
            &mut Context {
                keys: &keys,
                columns: &Columns::default(),
                profiles: &profiles,
                book: &mut book,
            },
        )
        .expect_err("not canonical");
        assert!(err.contains("canonical"), "{err}");
        assert_eq!(
            (rec.timestamp, &rec.idempotency_key),
            (msg.timestamp, &msg.idempotency_key)
        );
        // The entry is not decoded and re-encoded, but the stored record is the same bytes.
        assert_eq!(
            rec.encoded,
            record::encode(&msg, &profile, id, Form::Stored).expect("fits")
        );
        assert_eq!(
            record::decode(&rec.encoded, &profile, msg.id, Some(msg.timestamp)),
            Ok(msg)
        );
    }
}
