//! A stored telemetry record as the gateway serves it: decoded once (lean or JSON), with the
//! fields the filters read, and its JSON rendered at most once per schema version however many
//! pages, subscribers and windows hold it.

use std::sync::{Arc, OnceLock};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace, Message, SchemaVersion,
    config::Columns,
    message::field_text,
    observe::emit,
    profiles::ProfileCache,
    retry::{Backoff, Policy, Stopped},
    watch::Change,
};
use tokio_util::sync::CancellationToken;

use crate::events::UnreadableSkipped;

/// One stored record.
#[derive(Debug)]
pub struct Record {
    /// Its etcd key.
    pub key: String,
    /// The etcd revision of its write.
    pub revision: i64,
    /// Host, from the key.
    pub hostname: String,
    /// GPU id within the host, from the key.
    pub gpu_id: String,
    /// GPU UUID, from the fields.
    pub uuid: Option<String>,
    /// Metric name, from the fields (as text, see [`field_text`]).
    pub metric: Option<String>,
    /// The record (`v1`).
    pub message: Message,
    rendered: [OnceLock<String>; 3],
}

impl Record {
    /// A record stored under `key` at `revision` (`key` must be a data key of `columns`' layout).
    pub fn new(
        key: String,
        revision: i64,
        hostname: &str,
        gpu_id: &str,
        message: Message,
        columns: &Columns,
    ) -> Self {
        let text = |column: &str| {
            message
                .fields
                .get(column)
                .and_then(field_text)
                .map(|t| t.into_owned())
        };
        Record {
            revision,
            hostname: hostname.to_string(),
            gpu_id: gpu_id.to_string(),
            uuid: text(&columns.uuid),
            metric: text(&columns.metric),
            key,
            message,
            rendered: Default::default(),
        }
    }

    /// The record as JSON in `version`, rendered once per version.
    pub fn payload(&self, version: SchemaVersion) -> &str {
        let slot = match version {
            SchemaVersion::V1 => 0,
            SchemaVersion::V1beta2 => 1,
            SchemaVersion::V1beta1 => 2,
        };
        self.rendered[slot].get_or_init(|| self.message.to_version(version).to_string())
    }
}

/// What records are decoded with: the key layout, the columns the filters read, and the
/// profiles of lean records. One per gateway, shared by the store, the live feed and the
/// window.
#[derive(Debug, Clone)]
pub struct Decoder {
    /// Key layout.
    pub keys: Keyspace,
    /// Which fields the filters read.
    pub columns: Columns,
    /// Profiles read so far.
    pub profiles: ProfileCache,
}

impl Decoder {
    /// Reads a record written under the data prefix at `revision`; `None` (logged and counted)
    /// if the key or value is not one. Lean records need their profile loaded
    /// ([`Decoder::load`]).
    pub fn decode(&self, key: &[u8], value: &[u8], revision: i64) -> Option<Arc<Record>> {
        let key = String::from_utf8_lossy(key).into_owned();
        let parts = self.keys.parse_data_record(&key)?;
        match self.profiles.decode_stored(&parts, value) {
            Ok(message) => {
                let (hostname, gpu_id) = (parts.hostname.to_string(), parts.gpu_id.to_string());
                Some(Arc::new(Record::new(
                    key,
                    revision,
                    &hostname,
                    &gpu_id,
                    message,
                    &self.columns,
                )))
            }
            Err(error) => {
                emit(UnreadableSkipped {
                    what: "telemetry record",
                    key: &key,
                    error: &error,
                });
                None
            }
        }
    }

    /// Reads the profiles `values` name that are not cached yet.
    pub async fn load<'a>(
        &self,
        client: &Client,
        values: impl Iterator<Item = &'a [u8]>,
    ) -> Result<(), telemetry_shared::etcd::EtcdError> {
        let ids = values.filter_map(ProfileCache::needs);
        self.profiles.load(client, &self.keys, ids).await
    }

    /// [`Decoder::load`] for watch changes, retrying while etcd is unavailable; `Err` only at
    /// shutdown.
    pub async fn prepare(
        &self,
        client: &Client,
        changes: &[Change],
        shutdown: &CancellationToken,
    ) -> Result<(), Stopped> {
        let mut backoff = Backoff::new(Policy::ETCD, "reading record profiles");
        loop {
            match self
                .load(client, changes.iter().map(|c| c.value.as_slice()))
                .await
            {
                Ok(()) => return Ok(()),
                Err(err) => backoff.retry_after(&err, shutdown).await?,
            }
        }
    }
}
