//! Lean records: the compact form of a message on the queue and in the store.
//!
//! Most of a telemetry row never changes for its GPU: host, GPU id, UUID, device, model, the
//! long `labels_raw`, empty columns. A [`Profile`] holds a whole set of fields once, stored under
//! `/index/profiles/{id}` where the id is derived from its content (so writing it is idempotent
//! and any writer may write it). A lean record names its profile and carries only the fields
//! that differ from it, plus what varies per message (source position, idempotency key when it
//! cannot be recomputed, processing time on the queue). Decoding with the profile gives back
//! exactly the [`Message`] that was encoded, field order included, so every schema version is
//! rendered from it as before.
//!
//! Layout (all integers little-endian or LEB128 varints):
//!
//! | bytes | what |
//! |---|---|
//! | 1 | [`MAGIC`] (a JSON payload starts with `{` instead) |
//! | 1 | flags: timestamp present, source present, idempotency key explicit |
//! | 8 | profile id |
//! | 8 | processing time, Unix µs (queue entries only; a stored record has it in its key) |
//! | varint, varint | source pass and row (the stream id is in the profile) |
//! | 32 | idempotency key, unless it is [`derive_key`] of the message |
//! | varint | number of fields (the profile's) |
//! | ⌈n/8⌉ | bitmap: field `i` is overridden |
//! | … | each overridden value: a tag and its payload (a string may be an edit of the profile's: kept prefix and suffix lengths and the bytes between) |
//!
//! The idempotency key stays SHA-256. [`derive_key`] defines it over the message's source
//! position and typed fields, so a record written by the streamer need not store it: a reader
//! recomputes it. A message whose key was made any other way keeps it explicitly.

use std::{borrow::Cow, collections::HashMap, sync::Arc};

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};
use sha2::{Digest, Sha256};
use ulid::Ulid;

use crate::{
    SchemaVersion,
    message::{Fields, Message, SourcePosition, Timestamp},
};

/// First byte of a lean record; JSON payloads start with `{`.
pub const MAGIC: u8 = 0xB1;

const FLAG_TIMESTAMP: u8 = 1;
const FLAG_SOURCE: u8 = 2;
const FLAG_EXPLICIT_KEY: u8 = 4;

const TAG_NULL: u8 = 0;
const TAG_FALSE: u8 = 1;
const TAG_TRUE: u8 = 2;
const TAG_F64: u8 = 3;
/// An f64 with an integral value, written as a zigzag varint (most telemetry values).
const TAG_F64_INT: u8 = 4;
const TAG_I64: u8 = 5;
const TAG_U64: u8 = 6;
const TAG_STR: u8 = 7;
/// A string written as an edit of the profile's string in the same field: the length of the
/// prefix and of the suffix kept from it, and the bytes between (a metric name, a label set
/// that differs from the profile's by one label value, a timestamp one second later).
const TAG_STR_EDIT: u8 = 8;

/// Why bytes are not a lean record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// Not a lean record at all (or cut short).
    #[error("not a lean record: {0}")]
    Malformed(&'static str),
    /// The record's profile is unknown to etcd.
    #[error("profile {0} does not exist (was /index/profiles/ edited by hand?)")]
    UnknownProfile(ProfileId),
    /// The record does not fit its profile.
    #[error("record does not fit profile {profile}: {reason}")]
    Mismatch {
        /// The profile.
        profile: ProfileId,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Is `bytes` a lean record (rather than JSON)?
pub fn is_lean(bytes: &[u8]) -> bool {
    bytes.first() == Some(&MAGIC)
}

/// A profile's id: the first 8 bytes of the SHA-256 of its canonical JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProfileId(pub [u8; 8]);

impl std::fmt::Display for ProfileId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::str::FromStr for ProfileId {
    type Err = RecordError;

    fn from_str(s: &str) -> Result<Self, RecordError> {
        let bytes = hex::decode(s).map_err(|_| RecordError::Malformed("profile id is not hex"))?;
        let id: [u8; 8] = bytes
            .try_into()
            .map_err(|_| RecordError::Malformed("profile id is not 8 bytes"))?;
        Ok(ProfileId(id))
    }
}

/// What a set of messages has in common: their stream and every field, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// The stream the messages came from, if they carry a source position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// The fields, in the source's column order.
    pub fields: Fields,
}

impl Profile {
    /// The profile of `message`: its stream and all its fields.
    pub fn of(message: &Message) -> Self {
        Profile {
            stream_id: message.source.as_ref().map(|s| s.stream_id.clone()),
            fields: message.fields.clone(),
        }
    }

    /// The canonical stored form (JSON, field order kept).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Its content-derived id.
    pub fn id(&self) -> ProfileId {
        let digest = Sha256::digest(self.encode());
        let mut id = [0u8; 8];
        id.copy_from_slice(&digest[..8]);
        ProfileId(id)
    }

    /// Does `message` fit (same stream, same field names in the same order)?
    pub fn fits(&self, message: &Message) -> bool {
        self.stream_id.as_deref() == message.source.as_ref().map(|s| s.stream_id.as_str())
            && self.fields.len() == message.fields.len()
            && self.fields.keys().zip(message.fields.keys()).all(|(a, b)| a == b)
    }

    /// Bytes the overrides of `message` would take against this profile.
    fn override_cost(&self, message: &Message) -> usize {
        let mut buf = Vec::new();
        self.fields
            .values()
            .zip(message.fields.values())
            .filter(|(a, b)| a != b)
            .map(|(base, v)| {
                buf.clear();
                write_override(&mut buf, base, v);
                buf.len()
            })
            .sum()
    }
}

/// The idempotency key of a message from a stream: hex SHA-256 over a versioned, length-prefixed
/// encoding of its source position (stream, pass, row) and its typed fields (names and values).
/// The message id and the processing time are not part of it, so a re-sent row gets the same
/// key.
pub fn derive_key<'a>(
    stream_id: &str,
    pass: u64,
    row: u64,
    fields: impl Iterator<Item = (&'a String, &'a Value)>,
) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"telemetry-row/v2\0");
    hash_field(&mut hasher, &[stream_id.as_bytes()]);
    hash_field(&mut hasher, &[&pass.to_be_bytes()]);
    hash_field(&mut hasher, &[&row.to_be_bytes()]);
    let mut value = Vec::with_capacity(32);
    for (name, v) in fields {
        hash_field(&mut hasher, &[name.as_bytes()]);
        value.clear();
        match v {
            // What `write_value` writes for a string (its tag, its length, its bytes), hashed
            // without copying the string.
            Value::String(text) => {
                value.push(TAG_STR);
                write_varint(&mut value, text.len() as u64);
                hash_field(&mut hasher, &[&value, text.as_bytes()]);
            }
            other => {
                write_value(&mut value, other, false);
                hash_field(&mut hasher, &[&value]);
            }
        }
    }
    hex32(&hasher.finalize().into())
}

/// Hashes one length-prefixed field made of `parts`.
fn hash_field(hasher: &mut Sha256, parts: &[&[u8]]) {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    hasher.update((len as u64).to_be_bytes());
    for part in parts {
        hasher.update(part);
    }
}

/// 32 bytes as 64 lower-case hex digits.
pub(crate) fn hex32(bytes: &[u8; 32]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// The key [`derive_key`] gives `message`, if it has a source position.
fn derived_key_of(message: &Message) -> Option<String> {
    let s = message.source.as_ref()?;
    Some(derive_key(&s.stream_id, s.pass, s.row, message.fields.iter()))
}

/// Which lean form to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// A queue entry: with the processing time (its key has only the id) and the idempotency
    /// key (so a collector or an operator can name its dedup marker without the profile).
    Queue,
    /// A stored record: the processing time is in its key, and the idempotency key is left out
    /// when [`derive_key`] gives it.
    Stored,
}

/// Encodes `message` against `profile` (which it must fit; otherwise a new profile is
/// needed) in `form`.
pub fn encode(
    message: &Message,
    profile: &Profile,
    id: ProfileId,
    form: Form,
) -> Result<Vec<u8>, RecordError> {
    if !profile.fits(message) {
        return Err(RecordError::Mismatch {
            profile: id,
            reason: "other stream or other columns",
        });
    }
    let with_timestamp = form == Form::Queue;
    let derived =
        form == Form::Stored && derived_key_of(message).is_some_and(|k| k == message.idempotency_key);
    let explicit = if derived {
        None
    } else {
        let key = hex::decode(&message.idempotency_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or(RecordError::Malformed("idempotency key is not 32 hex bytes"))?;
        Some(key)
    };
    let mut out = Vec::with_capacity(64);
    out.push(MAGIC);
    let mut flags = 0;
    if with_timestamp {
        flags |= FLAG_TIMESTAMP;
    }
    if message.source.is_some() {
        flags |= FLAG_SOURCE;
    }
    if explicit.is_some() {
        flags |= FLAG_EXPLICIT_KEY;
    }
    out.push(flags);
    out.extend_from_slice(&id.0);
    if with_timestamp {
        out.extend_from_slice(&message.timestamp.as_datetime().timestamp_micros().to_le_bytes());
    }
    if let Some(s) = &message.source {
        write_varint(&mut out, s.pass);
        write_varint(&mut out, s.row);
    }
    if let Some(key) = explicit {
        out.extend_from_slice(&key);
    }
    let n = message.fields.len();
    write_varint(&mut out, n as u64);
    let bitmap_at = out.len();
    out.resize(bitmap_at + n.div_ceil(8), 0);
    for (i, (base, value)) in profile.fields.values().zip(message.fields.values()).enumerate() {
        if base != value {
            out[bitmap_at + i / 8] |= 1 << (i % 8);
            write_override(&mut out, base, value);
        }
    }
    Ok(out)
}

/// The profile a lean record names, read from its fixed place without parsing the rest of the
/// header (`None`: not a lean record, or cut short).
pub fn profile_of(bytes: &[u8]) -> Option<ProfileId> {
    if !is_lean(bytes) {
        return None;
    }
    let id: [u8; 8] = bytes.get(2..10)?.try_into().ok()?;
    Some(ProfileId(id))
}

/// The part of a lean record that needs no profile to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The profile it is encoded against.
    pub profile: ProfileId,
    /// The processing time, if the record carries it.
    pub timestamp: Option<Timestamp>,
    /// Source pass and row, if any.
    pub source: Option<(u64, u64)>,
    /// The idempotency key, when it is stored (not derivable).
    pub explicit_key: Option<String>,
    body: usize,
}

/// Reads a lean record's header.
pub fn header(bytes: &[u8]) -> Result<Header, RecordError> {
    let mut r = Reader { bytes, at: 0 };
    if r.byte()? != MAGIC {
        return Err(RecordError::Malformed("wrong magic byte"));
    }
    let flags = r.byte()?;
    let profile = ProfileId(r.array()?);
    let timestamp = if flags & FLAG_TIMESTAMP != 0 {
        let micros = i64::from_le_bytes(r.array()?);
        let dt = chrono::DateTime::from_timestamp_micros(micros)
            .ok_or(RecordError::Malformed("timestamp out of range"))?;
        Some(Timestamp::from_datetime(dt))
    } else {
        None
    };
    let source = if flags & FLAG_SOURCE != 0 {
        Some((r.varint()?, r.varint()?))
    } else {
        None
    };
    let explicit_key = if flags & FLAG_EXPLICIT_KEY != 0 {
        Some(hex32(&r.array::<32>()?))
    } else {
        None
    };
    Ok(Header {
        profile,
        timestamp,
        source,
        explicit_key,
        body: r.at,
    })
}

/// Decodes a lean record with its profile into the message it was made from. `id` comes from
/// the record's key; `timestamp` too, for a stored record (a queue entry carries its own).
pub fn decode(
    bytes: &[u8],
    profile: &Profile,
    id: Ulid,
    timestamp: Option<Timestamp>,
) -> Result<Message, RecordError> {
    View::read(bytes, header(bytes)?, profile)?.into_message(id, timestamp)
}

/// A lean record read against its profile without building its message: every field's value
/// is borrowed from the profile unless the record overrides it. A collector needs a few
/// fields, the idempotency key and the stored form of a queue entry, not a copy of the whole
/// profile per message.
#[derive(Debug)]
pub struct View<'p> {
    /// The record's header.
    pub header: Header,
    profile: &'p Profile,
    values: Vec<Cow<'p, Value>>,
}

impl<'p> View<'p> {
    /// Reads the body of `bytes` (whose header is `header`) against `profile`, checking every
    /// override and that nothing trails.
    pub fn read(bytes: &[u8], header: Header, profile: &'p Profile) -> Result<Self, RecordError> {
        let mismatch = |reason| RecordError::Mismatch {
            profile: header.profile,
            reason,
        };
        let mut r = Reader {
            bytes,
            at: header.body,
        };
        let n = usize::try_from(r.varint()?).map_err(|_| RecordError::Malformed("field count"))?;
        if n != profile.fields.len() {
            return Err(mismatch("field count differs"));
        }
        let bitmap = r.take(n.div_ceil(8))?.to_vec();
        let mut values = Vec::with_capacity(n);
        for (i, base) in profile.fields.values().enumerate() {
            values.push(if bitmap[i / 8] & (1 << (i % 8)) != 0 {
                Cow::Owned(r.override_of(base)?)
            } else {
                Cow::Borrowed(base)
            });
        }
        if r.at != bytes.len() {
            return Err(RecordError::Malformed("trailing bytes"));
        }
        if header.source.is_some() && profile.stream_id.is_none() {
            return Err(mismatch("source position without a stream"));
        }
        // What `encode` refuses (the profile's stream is not the message's) is never read.
        if header.source.is_none() && profile.stream_id.is_some() {
            return Err(mismatch(
                "a stream's profile for a message without a source position",
            ));
        }
        Ok(View {
            header,
            profile,
            values,
        })
    }

    /// The value of field `name`, if the profile has it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.profile
            .fields
            .keys()
            .position(|k| k == name)
            .and_then(|i| self.values.get(i))
            .map(|v| &**v)
    }

    /// The fields, in order.
    pub fn fields(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.profile.fields.keys().zip(self.values.iter().map(|v| &**v))
    }

    /// The key [`derive_key`] gives the record's message, if it has a source position.
    pub fn derived_key(&self) -> Option<String> {
        let (pass, row) = self.header.source?;
        let stream_id = self.profile.stream_id.as_deref()?;
        Some(derive_key(stream_id, pass, row, self.fields()))
    }

    /// The record's idempotency key: the stored one, else the derived one.
    pub fn idempotency_key(&self) -> Option<String> {
        self.header.explicit_key.clone().or_else(|| self.derived_key())
    }

    /// The message the record was made from.
    pub fn into_message(self, id: Ulid, timestamp: Option<Timestamp>) -> Result<Message, RecordError> {
        let timestamp = self
            .header
            .timestamp
            .or(timestamp)
            .ok_or(RecordError::Malformed("no processing time"))?;
        let idempotency_key = self
            .idempotency_key()
            .ok_or(RecordError::Malformed("no idempotency key"))?;
        let source = match (self.header.source, &self.profile.stream_id) {
            (Some((pass, row)), Some(stream_id)) => Some(SourcePosition {
                stream_id: stream_id.clone(),
                pass,
                row,
            }),
            _ => None,
        };
        let fields = self
            .profile
            .fields
            .keys()
            .cloned()
            .zip(self.values.into_iter().map(Cow::into_owned))
            .collect();
        Ok(Message {
            schema_version: SchemaVersion::V1,
            id,
            timestamp,
            idempotency_key,
            source,
            fields,
        })
    }

    /// The stored form of this record, read from `bytes` (a queue entry): what
    /// [`encode`]`(.., Form::Stored)` makes of its message, without building the message. The
    /// processing time goes (a stored record's key carries it), and so does the idempotency key
    /// when `key_is_derived` (the caller checked it against [`View::derived_key`]); the body is
    /// kept byte for byte.
    pub fn stored(&self, bytes: &[u8], key_is_derived: bool) -> Vec<u8> {
        let body = bytes.get(self.header.body..).unwrap_or_default();
        let mut out = Vec::with_capacity(2 + 8 + 10 + 32 + body.len());
        out.push(MAGIC);
        let mut flags = 0;
        if self.header.source.is_some() {
            flags |= FLAG_SOURCE;
        }
        // The stored key's 32 bytes end where the body starts.
        let explicit = match &self.header.explicit_key {
            Some(_) if !key_is_derived => self
                .header
                .body
                .checked_sub(32)
                .and_then(|start| bytes.get(start..self.header.body)),
            _ => None,
        };
        if explicit.is_some() {
            flags |= FLAG_EXPLICIT_KEY;
        }
        out.push(flags);
        out.extend_from_slice(&self.header.profile.0);
        if let Some((pass, row)) = self.header.source {
            write_varint(&mut out, pass);
            write_varint(&mut out, row);
        }
        if let Some(key) = explicit {
            out.extend_from_slice(key);
        }
        out.extend_from_slice(body);
        out
    }
}

/// Chooses a profile for each message of one stream, and says when a new one is needed.
///
/// Messages are grouped by a caller-chosen key (the GPU, in practice). Each group keeps a few
/// recent profiles; a message uses the one it differs least from. A new profile (the message's
/// own fields) is made when none fits, or when the best costs more than
/// [`ProfileBook::MAX_OVERRIDE`] bytes of overrides, but at most twice per
/// [`ProfileBook::WINDOW`] messages of a group, so a column that changes on every row (a
/// free-text note, say) is carried as an override instead of making a profile per message.
#[derive(Debug, Default)]
pub struct ProfileBook {
    groups: HashMap<Vec<u8>, Group>,
}

#[derive(Debug, Default)]
struct Group {
    profiles: Vec<(ProfileId, Arc<Profile>)>,
    seen: u64,
    recent_new: Vec<u64>,
}

/// The profile chosen for a message.
#[derive(Debug, Clone)]
pub struct Choice {
    /// Its id.
    pub id: ProfileId,
    /// The profile.
    pub profile: Arc<Profile>,
    /// True the first time this book hands it out: the caller must make sure it is stored.
    pub new: bool,
}

impl ProfileBook {
    /// Overrides beyond this many bytes make a new profile worthwhile.
    pub const MAX_OVERRIDE: usize = 64;
    /// At most two new profiles per this many messages of a group.
    pub const WINDOW: u64 = 64;
    /// Profiles kept per group.
    const KEEP: usize = 4;

    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// The profile for `message` of group `group`.
    pub fn choose(&mut self, group: &[u8], message: &Message) -> Choice {
        let g = self.groups.entry(group.to_vec()).or_default();
        g.seen += 1;
        let best = g
            .profiles
            .iter()
            .enumerate()
            .filter(|(_, (_, p))| p.fits(message))
            .map(|(i, (_, p))| (i, p.override_cost(message)))
            .min_by_key(|(_, cost)| *cost);
        let seen = g.seen;
        g.recent_new.retain(|at| seen - at < Self::WINDOW);
        let may_add = g.recent_new.len() < 2;
        match best {
            Some((i, cost)) if cost <= Self::MAX_OVERRIDE || !may_add => {
                let (id, profile) = g.profiles.remove(i);
                // Most recently used first.
                g.profiles.insert(0, (id, profile.clone()));
                Choice {
                    id,
                    profile,
                    new: false,
                }
            }
            _ => {
                let profile = Arc::new(Profile::of(message));
                let id = profile.id();
                g.recent_new.push(seen);
                g.profiles.insert(0, (id, profile.clone()));
                g.profiles.truncate(Self::KEEP);
                Choice {
                    id,
                    profile,
                    new: true,
                }
            }
        }
    }

    /// Forgets that `id` was handed out, so it is offered as new again (its write did not
    /// land).
    pub fn unwritten(&mut self, id: ProfileId) {
        for g in self.groups.values_mut() {
            g.profiles.retain(|(p, _)| *p != id);
        }
    }
}

/// Writes `value`, which differs from the profile's `base`: as an edit of `base` when both are
/// strings and the edit is shorter, as a value otherwise.
fn write_override(out: &mut Vec<u8>, base: &Value, value: &Value) {
    if let (Value::String(base), Value::String(text)) = (base, value) {
        let (a, b) = (base.as_bytes(), text.as_bytes());
        let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        let room = a.len().min(b.len()) - prefix;
        let suffix = a
            .iter()
            .rev()
            .zip(b.iter().rev())
            .take(room)
            .take_while(|(x, y)| x == y)
            .count();
        let middle = &b[prefix..b.len() - suffix];
        let edit_len = 1 + varint_len(prefix) + varint_len(suffix) + varint_len(middle.len()) + middle.len();
        let whole_len = 1 + varint_len(b.len()) + b.len();
        if edit_len < whole_len {
            out.push(TAG_STR_EDIT);
            write_varint(out, prefix as u64);
            write_varint(out, suffix as u64);
            write_varint(out, middle.len() as u64);
            out.extend_from_slice(middle);
            return;
        }
    }
    write_value(out, value, true);
}

/// Bytes [`write_varint`] takes for `n`.
fn varint_len(n: usize) -> usize {
    (usize::BITS - n.leading_zeros()).max(1).div_ceil(7) as usize
}

fn write_varint(out: &mut Vec<u8>, mut n: u64) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// Writes one value: a tag and its payload. `compact` writes integral f64s as varints (in
/// records); the key derivation uses the plain form so it does not depend on that choice.
fn write_value(out: &mut Vec<u8>, v: &Value, compact: bool) {
    match v {
        Value::Null => out.push(TAG_NULL),
        Value::Bool(false) => out.push(TAG_FALSE),
        Value::Bool(true) => out.push(TAG_TRUE),
        Value::Number(n) => {
            if let Some(u) = n.as_u64().filter(|_| !n.is_f64()) {
                out.push(TAG_U64);
                write_varint(out, u);
            } else if let Some(i) = n.as_i64().filter(|_| !n.is_f64()) {
                out.push(TAG_I64);
                write_varint(out, zigzag(i));
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if compact && f.fract() == 0.0 && f.abs() < 9.0e15 && !(f == 0.0 && f.is_sign_negative()) {
                    out.push(TAG_F64_INT);
                    write_varint(out, zigzag(f as i64));
                } else {
                    out.push(TAG_F64);
                    out.extend_from_slice(&f.to_le_bytes());
                }
            }
        }
        Value::String(s) => {
            out.push(TAG_STR);
            write_varint(out, s.len() as u64);
            out.extend_from_slice(s.as_bytes());
        }
        // Fields are scalars (validated before encoding); anything else is kept as its JSON text.
        other => {
            let text = other.to_string();
            out.push(TAG_STR);
            write_varint(out, text.len() as u64);
            out.extend_from_slice(text.as_bytes());
        }
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], RecordError> {
        let end = self.at.checked_add(n).filter(|e| *e <= self.bytes.len());
        let end = end.ok_or(RecordError::Malformed("cut short"))?;
        let slice = &self.bytes[self.at..end];
        self.at = end;
        Ok(slice)
    }

    fn byte(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], RecordError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn varint(&mut self) -> Result<u64, RecordError> {
        let mut n = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            n |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(n);
            }
        }
        Err(RecordError::Malformed("varint too long"))
    }

    /// An overridden value of a field whose profile value is `base`.
    fn override_of(&mut self, base: &Value) -> Result<Value, RecordError> {
        if self.bytes.get(self.at) != Some(&TAG_STR_EDIT) {
            return self.value();
        }
        self.at += 1;
        let Value::String(base) = base else {
            return Err(RecordError::Malformed(
                "a string edit of a value that is no string",
            ));
        };
        let base = base.as_bytes();
        let mut len = || usize::try_from(self.varint()?).map_err(|_| RecordError::Malformed("length"));
        let (prefix, suffix, middle) = (len()?, len()?, len()?);
        if prefix.checked_add(suffix).is_none_or(|kept| kept > base.len()) {
            return Err(RecordError::Malformed("a string edit longer than its base"));
        }
        let mut text = Vec::with_capacity(prefix + middle + suffix);
        text.extend_from_slice(&base[..prefix]);
        text.extend_from_slice(self.take(middle)?);
        text.extend_from_slice(&base[base.len() - suffix..]);
        String::from_utf8(text)
            .map(Value::String)
            .map_err(|_| RecordError::Malformed("string is not UTF-8"))
    }

    fn value(&mut self) -> Result<Value, RecordError> {
        Ok(match self.byte()? {
            TAG_NULL => Value::Null,
            TAG_FALSE => Value::Bool(false),
            TAG_TRUE => Value::Bool(true),
            TAG_F64 => Number::from_f64(f64::from_le_bytes(self.array()?))
                .map(Value::Number)
                .ok_or(RecordError::Malformed("non-finite number"))?,
            TAG_F64_INT => Value::from(unzigzag(self.varint()?) as f64),
            TAG_I64 => Value::from(unzigzag(self.varint()?)),
            TAG_U64 => Value::from(self.varint()?),
            TAG_STR => {
                let len = usize::try_from(self.varint()?).map_err(|_| RecordError::Malformed("length"))?;
                let text = std::str::from_utf8(self.take(len)?)
                    .map_err(|_| RecordError::Malformed("string is not UTF-8"))?;
                Value::String(text.to_string())
            }
            _ => return Err(RecordError::Malformed("unknown value tag")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn dcgm(metric: &str, value: f64, row: u64) -> Message {
        let mut fields = Fields::new();
        fields.insert("timestamp".into(), json!("2025-07-18T20:42:34Z"));
        fields.insert("metric_name".into(), json!(metric));
        fields.insert("gpu_id".into(), json!(0.0));
        fields.insert("device".into(), json!("nvidia0"));
        fields.insert("uuid".into(), json!("GPU-5fd4f087-86f3-7a43-b711-4771313afc50"));
        fields.insert("modelName".into(), json!("NVIDIA H100 80GB HBM3"));
        fields.insert("Hostname".into(), json!("mtv5-dgx1-hgpu-031"));
        fields.insert("container".into(), json!(""));
        fields.insert("value".into(), json!(value));
        // Like the DCGM dump: the label set names the metric.
        let labels = format!(
            "DCGM_FI_DRIVER_VERSION=\"535.129.03\",Hostname=\"mtv5-dgx1-hgpu-031\",\
             UUID=\"GPU-5fd4f087-86f3-7a43-b711-4771313afc50\",__name__=\"{metric}\",device=\"nvidia0\",\
             gpu=\"0\",instance=\"mtv5-dgx1-hgpu-031:9400\",job=\"dgx_dcgm_exporter\",\
             modelName=\"NVIDIA H100 80GB HBM3\""
        );
        fields.insert("labels_raw".into(), json!(labels));
        let source = SourcePosition {
            stream_id: "dcgm-w0".into(),
            pass: 0,
            row,
        };
        let key = derive_key(&source.stream_id, 0, row, fields.iter());
        Message {
            schema_version: SchemaVersion::V1,
            id: Ulid::from_parts(1_700_000_000_000, u128::from(row)),
            timestamp: Timestamp::parse("2026-11-30T08:00:00.123456Z").expect("valid"),
            idempotency_key: key,
            source: Some(source),
            fields,
        }
    }

    #[test]
    fn a_record_decodes_to_exactly_the_message_it_was_made_from() {
        let first = dcgm("DCGM_FI_DEV_DEC_UTIL", 0.0, 1);
        let profile = Profile::of(&first);
        let id = profile.id();
        for msg in [
            first.clone(),
            dcgm("DCGM_FI_DEV_POWER_USAGE", 284.5, 2),
            dcgm("X", -3.0, 300),
        ] {
            let queued = encode(&msg, &profile, id, Form::Queue).expect("fits");
            assert_eq!(decode(&queued, &profile, msg.id, None), Ok(msg.clone()));
            assert_eq!(profile_of(&queued), Some(id));
            let stored = encode(&msg, &profile, id, Form::Stored).expect("fits");
            assert_eq!(
                decode(&stored, &profile, msg.id, Some(msg.timestamp)),
                Ok(msg.clone())
            );
            // Same JSON, byte for byte, in every version.
            let back = decode(&stored, &profile, msg.id, Some(msg.timestamp)).expect("decodes");
            for v in SchemaVersion::ALL {
                assert_eq!(back.to_version(v).to_string(), msg.to_version(v).to_string());
            }
        }
    }

    #[test]
    fn a_queue_entry_becomes_the_stored_record_encode_makes_without_building_its_message() {
        let first = dcgm("DCGM_FI_DEV_DEC_UTIL", 0.0, 1);
        let profile = Profile::of(&first);
        let mut foreign = dcgm("DCGM_FI_DEV_POWER_USAGE", 284.5, 2);
        foreign.idempotency_key = "ab".repeat(32);
        let mut unsourced = dcgm("M", 1.5, 3);
        unsourced.source = None;
        let unsourced_profile = Profile::of(&unsourced);
        for (msg, profile) in [
            (first.clone(), &profile),
            (dcgm("DCGM_FI_DEV_POWER_USAGE", 284.5, 2), &profile),
            (foreign, &profile),
            (unsourced, &unsourced_profile),
        ] {
            let pid = profile.id();
            let queued = encode(&msg, profile, pid, Form::Queue).expect("fits");
            let view = View::read(&queued, header(&queued).expect("header"), profile).expect("reads");
            assert_eq!(
                view.idempotency_key().as_deref(),
                Some(msg.idempotency_key.as_str())
            );
            assert_eq!(view.get("Hostname"), msg.fields.get("Hostname"));
            assert_eq!(view.get("value"), msg.fields.get("value"));
            assert_eq!(view.get("no such column"), None);
            let derived = view.derived_key().as_deref() == Some(msg.idempotency_key.as_str());
            assert_eq!(
                view.stored(&queued, derived),
                encode(&msg, profile, pid, Form::Stored).expect("fits"),
                "{}",
                msg.idempotency_key
            );
        }
    }

    #[test]
    fn the_derived_key_is_pinned() {
        // Every stored record's key is recomputed from this function: its bytes must never
        // change. The value below was computed by the first release of it.
        let mut fields = Fields::new();
        fields.insert("s".into(), json!("GPU-5fd4f087 \"quoted\", ünïcode"));
        fields.insert("empty".into(), json!(""));
        fields.insert("int".into(), json!(3.0));
        fields.insert("frac".into(), json!(-284.5));
        fields.insert("t".into(), json!(true));
        fields.insert("f".into(), json!(false));
        fields.insert("n".into(), Value::Null);
        fields.insert("u".into(), json!(18_446_744_073_709_551_615u64));
        fields.insert("i".into(), json!(-9_007_199_254_740_993i64));
        fields.insert("long".into(), json!("x".repeat(300)));
        assert_eq!(
            derive_key("dcgm-w0", 2, 1234, fields.iter()),
            "370a273104786988b8edd17f8562eeeb50d2f351ac321a7753ab46a11aac3de6"
        );
    }

    #[test]
    fn a_record_without_a_source_is_not_read_against_a_streams_profile() {
        let sourced = dcgm("M", 1.0, 1);
        let mut unsourced = sourced.clone();
        unsourced.source = None;
        let own = Profile::of(&unsourced);
        let bytes = encode(&unsourced, &own, own.id(), Form::Queue).expect("fits its own");
        let streams = Profile::of(&sourced);
        // `encode` refuses this pairing, so `View::read` (and `decode`) refuse it too.
        assert!(encode(&unsourced, &streams, streams.id(), Form::Queue).is_err());
        assert!(matches!(
            View::read(&bytes, header(&bytes).expect("header"), &streams),
            Err(RecordError::Mismatch { .. })
        ));
        assert!(View::read(&bytes, header(&bytes).expect("header"), &own).is_ok());
    }

    #[test]
    fn a_dcgm_record_is_small() {
        let first = dcgm("DCGM_FI_DEV_DEC_UTIL", 0.0, 1);
        let profile = Profile::of(&first);
        let msg = dcgm("DCGM_FI_DEV_POWER_USAGE", 284.5, 1234);
        let stored = encode(&msg, &profile, profile.id(), Form::Stored).expect("fits");
        // Header 2, profile id 8, source 3, field count and bitmap 3, the metric name as an edit
        // of the profile's (4 + "POWER_USAGE" 11), the value 9, and the labels as an edit (5 +
        // "POWER_USAGE" 11): the 270 characters of labels stay in the profile and the key is
        // recomputed.
        assert_eq!(stored.len(), 56);
    }

    #[test]
    fn strings_are_written_as_edits_of_the_profile_and_read_back_exactly() {
        let base = dcgm("DCGM_FI_DEV_DEC_UTIL", 0.0, 1);
        let profile = Profile::of(&base);
        for (from, to) in [
            ("abc", "abXc"),
            ("abc", ""),
            ("", "new"),
            ("aaaa", "aa"),
            ("aa", "aaaa"),
            ("héllo wörld", "héllo wôrld"),
            ("日本語", "日本人"),
            ("x", "😀x"),
        ] {
            let mut profile = profile.clone();
            profile.fields.insert("container".into(), json!(from));
            let mut msg = base.clone();
            msg.fields.insert("container".into(), json!(to));
            msg.idempotency_key = derive_key("dcgm-w0", 0, 1, msg.fields.iter());
            let bytes = encode(&msg, &profile, profile.id(), Form::Stored).expect("fits");
            assert_eq!(
                decode(&bytes, &profile, msg.id, Some(msg.timestamp)),
                Ok(msg.clone()),
                "{from:?} -> {to:?}"
            );
        }
    }

    #[test]
    fn a_string_edit_that_does_not_fit_its_base_is_refused() {
        let mut msg = dcgm("M", 1.0, 1);
        msg.fields.insert("container".into(), json!("abcdef"));
        let profile = Profile::of(&msg);
        let mut other = msg.clone();
        other.fields.insert("container".into(), json!("abXdef"));
        other.idempotency_key = derive_key("dcgm-w0", 0, 1, other.fields.iter());
        let good = encode(&other, &profile, profile.id(), Form::Stored).expect("fits");
        let at = good.len() - 5;
        assert_eq!(&good[at..], &[TAG_STR_EDIT, 2, 3, 1, b'X']);
        // Keeping more of "abcdef" than it has, or taking more bytes than are left.
        for bad in [[TAG_STR_EDIT, 4, 3, 1, b'X'], [TAG_STR_EDIT, 2, 3, 9, b'X']] {
            let mut bytes = good.clone();
            bytes[at..].copy_from_slice(&bad);
            assert!(decode(&bytes, &profile, other.id, Some(other.timestamp)).is_err());
        }
    }

    #[test]
    fn varint_len_is_what_write_varint_writes() {
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 2_097_152, u32::MAX as usize] {
            let mut buf = Vec::new();
            write_varint(&mut buf, n as u64);
            assert_eq!(varint_len(n), buf.len(), "{n}");
        }
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        let profile = Profile::of(&dcgm("M", 1.0, 1));
        for bytes in [
            &b""[..],
            &[MAGIC],
            &[MAGIC, 0xff, 1, 2],
            &[MAGIC, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff],
        ] {
            assert!(decode(bytes, &profile, Ulid::nil(), Some(Timestamp::now())).is_err());
            // The profile id is read from its place, or not at all when cut short.
            assert_eq!(profile_of(bytes).is_some(), bytes.len() >= 10);
        }
    }
}
