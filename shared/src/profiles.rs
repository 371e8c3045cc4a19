//! Reading lean records back: a process-wide cache of the profiles they name, and decoding of
//! stored records of either form (lean, or the JSON of releases before lean records).
//!
//! Profiles are immutable (their id is derived from their content), so a cached profile never
//! goes stale. A profile is written no later than the first record that names it, so any reader
//! that has seen a record finds its profile.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
};

use etcd_client::{Client, GetOptions, Txn, TxnOp, TxnOpResponse};
use ulid::Ulid;

use crate::{
    Keyspace,
    etcd::{EtcdError, MAX_TXN_OPS},
    keys::DataKey,
    message::{Message, Timestamp},
    record::{self, Profile, ProfileId, RecordError},
};

/// Why a stored record cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The lean form is damaged or names an unknown profile.
    #[error(transparent)]
    Record(#[from] RecordError),
    /// The JSON form is not a `v1` message.
    #[error("not a v1 message: {0}")]
    Json(#[from] serde_json::Error),
    /// The key's id or time does not parse.
    #[error("the key's {0} does not parse")]
    Key(&'static str),
}

/// The profiles this process has read, by id. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ProfileCache {
    known: Arc<RwLock<HashMap<ProfileId, Arc<Profile>>>>,
}

impl ProfileCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// A cached profile.
    pub fn get(&self, id: ProfileId) -> Option<Arc<Profile>> {
        self.known.read().ok()?.get(&id).cloned()
    }

    /// Remembers a profile (one this process wrote, or read).
    pub fn insert(&self, id: ProfileId, profile: Arc<Profile>) {
        if let Ok(mut known) = self.known.write() {
            known.insert(id, profile);
        }
    }

    /// Reads the profiles of `ids` that are not cached yet (up to 128 per transaction). A
    /// profile etcd does not have stays unknown; decoding a record that names it then fails with
    /// [`RecordError::UnknownProfile`].
    pub async fn load(
        &self,
        client: &Client,
        keys: &Keyspace,
        ids: impl IntoIterator<Item = ProfileId>,
    ) -> Result<(), EtcdError> {
        let mut missing: Vec<ProfileId> = match self.known.read() {
            Ok(known) => ids.into_iter().filter(|id| !known.contains_key(id)).collect(),
            Err(_) => ids.into_iter().collect(),
        };
        missing.sort();
        missing.dedup();
        for chunk in missing.chunks(MAX_TXN_OPS) {
            let ops = chunk
                .iter()
                .map(|id| TxnOp::get(keys.profile(*id), None))
                .collect::<Vec<_>>();
            let resp = client.clone().txn(Txn::new().and_then(ops)).await?;
            for (id, op) in chunk.iter().zip(resp.op_responses()) {
                let TxnOpResponse::Get(get) = op else { continue };
                let Some(kv) = get.kvs().first() else { continue };
                match serde_json::from_slice::<Profile>(kv.value()) {
                    Ok(profile) => self.insert(*id, Arc::new(profile)),
                    Err(err) => tracing::warn!(profile = %id, error = %err, "unreadable profile"),
                }
            }
        }
        Ok(())
    }

    /// Reads every stored profile (a reader starting up, or the admin).
    pub async fn load_all(&self, client: &Client, keys: &Keyspace) -> Result<usize, EtcdError> {
        let (entries, _) = crate::etcd::range_entries(client, &keys.profiles_prefix(), 1000).await?;
        let mut loaded = 0;
        for entry in entries {
            let Some(id) = entry
                .key
                .rsplit('/')
                .next()
                .and_then(|s| s.parse::<ProfileId>().ok())
            else {
                continue;
            };
            if let Ok(profile) = serde_json::from_slice::<Profile>(&entry.value) {
                self.insert(id, Arc::new(profile));
                loaded += 1;
            }
        }
        Ok(loaded)
    }

    /// The profile a lean payload names, if it is lean (`None` for JSON).
    pub fn needs(payload: &[u8]) -> Option<ProfileId> {
        record::profile_of(payload)
    }

    /// Decodes a stored record from its key and value, lean or JSON. Lean records need their
    /// profile cached ([`ProfileCache::load`]).
    pub fn decode_stored(&self, key: &DataKey<'_>, value: &[u8]) -> Result<Message, ReadError> {
        if !record::is_lean(value) {
            return Ok(serde_json::from_slice(value)?);
        }
        let id: Ulid = key.message_id.parse().map_err(|_| ReadError::Key("message id"))?;
        let timestamp = Timestamp::parse(key.timestamp).map_err(|_| ReadError::Key("timestamp"))?;
        self.decode_lean(value, id, Some(timestamp))
    }

    /// Decodes a lean payload (a queue entry carries its own time; a stored record does not).
    pub fn decode_lean(
        &self,
        value: &[u8],
        id: Ulid,
        timestamp: Option<Timestamp>,
    ) -> Result<Message, ReadError> {
        let head = record::header(value)?;
        let profile = self
            .get(head.profile)
            .ok_or(RecordError::UnknownProfile(head.profile))?;
        Ok(record::decode(value, &profile, id, timestamp)?)
    }
}

/// Does etcd have profile `id`? (Count-only: for writers deciding whether to write it.)
pub async fn exists(client: &Client, keys: &Keyspace, id: ProfileId) -> Result<bool, EtcdError> {
    let resp = client
        .clone()
        .get(keys.profile(id), Some(GetOptions::new().with_count_only()))
        .await?;
    Ok(resp.count() > 0)
}
