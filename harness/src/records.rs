//! Reading back what the pipeline wrote, in either form (lean records with their profiles, or
//! the JSON of earlier releases): queued messages and stored telemetry records.

use std::collections::BTreeMap;

use etcd_client::Client;
use telemetry_shared::{Keyspace, Message, profiles::ProfileCache};

use crate::{HarnessError, range_all};

fn io(context: String, err: impl std::fmt::Display) -> HarnessError {
    HarnessError::Io {
        context,
        source: std::io::Error::other(err.to_string()),
    }
}

async fn profiles(client: &Client, keys: &Keyspace) -> Result<ProfileCache, HarnessError> {
    let cache = ProfileCache::new();
    cache
        .load_all(client, keys)
        .await
        .map_err(|e| io("reading profiles".into(), e))?;
    Ok(cache)
}

/// Every message in the queue, decoded, by queue key.
pub async fn queued_messages(
    client: &Client,
    keys: &Keyspace,
) -> Result<BTreeMap<String, Message>, HarnessError> {
    let cache = profiles(client, keys).await?;
    let mut out = BTreeMap::new();
    for (key, value) in range_all(client, &keys.queue_prefix()).await? {
        let message = if telemetry_shared::record::is_lean(&value) {
            let id = key
                .rsplit('/')
                .next()
                .and_then(|id| id.parse().ok())
                .ok_or_else(|| io(format!("queue key {key}"), "no message id"))?;
            cache
                .decode_lean(&value, id, None)
                .map_err(|e| io(format!("queue entry {key}"), e))?
        } else {
            serde_json::from_slice(&value).map_err(|e| io(format!("queue entry {key}"), e))?
        };
        out.insert(key, message);
    }
    Ok(out)
}

/// Every stored telemetry record, decoded, by data key.
pub async fn stored_records(
    client: &Client,
    keys: &Keyspace,
) -> Result<BTreeMap<String, Message>, HarnessError> {
    let cache = profiles(client, keys).await?;
    let mut out = BTreeMap::new();
    for (key, value) in range_all(client, &keys.data_prefix()).await? {
        let parts = keys
            .parse_data_record(&key)
            .ok_or_else(|| io(format!("data key {key}"), "not a record key"))?;
        let message = cache
            .decode_stored(&parts, &value)
            .map_err(|e| io(format!("record {key}"), e))?;
        out.insert(key, message);
    }
    Ok(out)
}
