//! Batch selection: which pending queue entries go into the next commit, what each becomes
//! (a record or a dead letter), and which index entries go with them. Pure: the partition task
//! owns the state and the I/O; everything here is unit-tested without etcd.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, Instant},
};

use std::sync::Arc;

use telemetry_shared::{
    Keyspace,
    etcd::{MAX_TXN_BYTES, MAX_TXN_OPS},
    message::is_idempotency_key,
    model::{DeadLetter, GpuInfo},
    profiles::ProfileCache,
    record::{self, Profile, ProfileBook, ProfileId},
};

use crate::{
    commit::{IndexUpdates, Item},
    config::Columns,
    validate::{Context, Record, validate},
};

/// A queue entry waiting in an owned partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pending {
    /// The payload.
    pub value: Vec<u8>,
    /// The entry's `mod_revision` (compared when it is settled).
    pub revision: i64,
}

/// How often a GPU's `last_seen` is rewritten at most.
const INDEX_REFRESH: Duration = Duration::from_secs(1);

/// Most value bytes in one partition batch (the combiner merges batches up to
/// [`MAX_TXN_BYTES`]).
const MAX_BATCH_BYTES: usize = MAX_TXN_BYTES * 3 / 4;

/// What the index already holds for a partition's GPUs, as this collector last wrote it.
#[derive(Debug, Default)]
pub(crate) struct Known {
    gpus: HashMap<String, (GpuInfo, Instant)>,
    hosts: HashSet<String>,
}

impl Known {
    /// Remembers index entries that landed.
    pub(crate) fn landed(&mut self, index: IndexUpdates, at: Instant) {
        for gpu in index.gpus {
            self.gpus.insert(gpu.uuid.clone(), (gpu, at));
        }
        self.hosts.extend(index.hosts);
    }

    /// Does `info` need writing: a new GPU, a changed description, or a `last_seen` older than
    /// [`INDEX_REFRESH`]?
    fn is_stale(&self, record: &Record, now: Instant) -> bool {
        match self.gpus.get(&record.uuid) {
            None => true,
            Some((known, at)) => {
                known.hostname != record.hostname
                    || known.gpu_id != record.gpu_id
                    || known.device != record.device
                    || known.model != record.model
                    || (now.duration_since(*at) >= INDEX_REFRESH && known.last_seen < record.timestamp)
            }
        }
    }
}

/// What a batch needs from its collector to turn payloads into items.
pub(crate) struct Transform<'a> {
    /// Key layout.
    pub keys: &'a Keyspace,
    /// Which fields identify a GPU.
    pub columns: &'a Columns,
    /// Recorded in dead letters.
    pub collector_id: &'a str,
    /// Most items per batch (`BATCH_SIZE`).
    pub batch_size: usize,
    /// Profiles known to be stored (read from etcd, or written by this collector).
    pub profiles: &'a ProfileCache,
}

/// The next batch: items in key order, and the index entries and profiles they need.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// What to do with each entry.
    pub items: Vec<Item>,
    /// Index entries to write with them.
    pub index: IndexUpdates,
    /// Profiles to store with them (new ones, for messages that arrived as JSON).
    pub profiles: Vec<(ProfileId, Arc<Profile>)>,
}

/// Operation budget of one partition batch: two compares are the fence and the counter, one
/// success operation is the counter.
const COMPARE_BUDGET: usize = MAX_TXN_OPS - 2;
const OP_BUDGET: usize = MAX_TXN_OPS - 1;

/// Takes the next batch from the head of the partition, within the operation and byte budgets
/// (at least one item, whatever its size).
pub(crate) fn select(
    pending: &BTreeMap<String, Pending>,
    known: &Known,
    transform: &Transform<'_>,
    book: &mut ProfileBook,
    now: Instant,
) -> Batch {
    let mut batch = Batch {
        items: Vec::with_capacity(transform.batch_size.min(pending.len())),
        ..Batch::default()
    };
    let (mut compares, mut ops, mut bytes) = (0, 0, 0);
    for (queue_key, entry) in pending {
        if batch.items.len() == transform.batch_size {
            break;
        }
        let item = to_item(queue_key, entry, transform, book);
        let (gpu, host) = match &item {
            Item::Record { record, .. } => index_needs(record, known, &batch.index, now),
            _ => (None, None),
        };
        let profile = match &item {
            Item::Record { record, .. }
                if transform.profiles.get(record.profile.0).is_none()
                    && !batch.profiles.iter().any(|(id, _)| *id == record.profile.0) =>
            {
                Some(record.profile.clone())
            }
            _ => None,
        };
        let cost = item.ops()
            + usize::from(gpu.is_some())
            + usize::from(host.is_some())
            + usize::from(profile.is_some());
        let size = entry.value.len() + profile.as_ref().map_or(0, |(_, p)| p.encode().len());
        if compares + item.compares() > COMPARE_BUDGET
            || ops + cost > OP_BUDGET
            || (!batch.items.is_empty() && bytes + size > MAX_BATCH_BYTES)
        {
            break;
        }
        compares += item.compares();
        ops += cost;
        bytes += size;
        batch.index.gpus.extend(gpu);
        batch.index.hosts.extend(host);
        batch.profiles.extend(profile);
        batch.items.push(item);
    }
    refresh_last_seen(&mut batch);
    batch
}

/// A pending entry as an item: a validated record, or a dead letter with the reason.
fn to_item(queue_key: &str, entry: &Pending, transform: &Transform<'_>, book: &mut ProfileBook) -> Item {
    let queue_id = queue_key.rsplit('/').next().unwrap_or_default();
    let mut ctx = Context {
        keys: transform.keys,
        columns: transform.columns,
        profiles: transform.profiles,
        book,
    };
    match validate(&entry.value, queue_id, &mut ctx) {
        Ok(record) => Item::Record {
            queue_key: queue_key.to_string(),
            revision: entry.revision,
            record: Box::new(record),
        },
        Err(reason) => {
            let mut letter = DeadLetter::new(queue_key, reason, &entry.value, transform.collector_id);
            letter.entry_revision = entry.revision;
            letter.idempotency_key = idempotency_key_of(&entry.value);
            Item::Dead {
                queue_key: queue_key.to_string(),
                revision: entry.revision,
                dead_key: transform
                    .keys
                    .deadletter(&transform.keys.dead_letter_id(queue_key)),
                letter: Box::new(letter),
            }
        }
    }
}

/// The idempotency key of an entry that failed validation, if it can be read (a lean queue
/// entry carries it in its header; a JSON one may still parse).
fn idempotency_key_of(payload: &[u8]) -> Option<String> {
    if record::is_lean(payload) {
        return record::header(payload).ok()?.explicit_key;
    }
    let value: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let key = value.get("idempotency_key")?.as_str()?;
    is_idempotency_key(key).then(|| key.to_string())
}

/// The index entries `record` needs that neither the index (as `known`) nor the batch so far
/// (`index`) has. A GPU already in the batch only moves its `last_seen` forward.
fn index_needs(
    record: &Record,
    known: &Known,
    index: &IndexUpdates,
    now: Instant,
) -> (Option<GpuInfo>, Option<String>) {
    let in_batch = index.gpus.iter().any(|g| g.uuid == record.uuid);
    let gpu = (!in_batch && known.is_stale(record, now)).then(|| GpuInfo {
        uuid: record.uuid.clone(),
        hostname: record.hostname.clone(),
        gpu_id: record.gpu_id.clone(),
        device: record.device.clone(),
        model: record.model.clone(),
        last_seen: record.timestamp,
    });
    let host = (!known.hosts.contains(&record.hostname) && !index.hosts.contains(&record.hostname))
        .then(|| record.hostname.clone());
    (gpu, host)
}

/// Moves `last_seen` of the batch's GPU entries forward to their newest record.
fn refresh_last_seen(batch: &mut Batch) {
    for item in &batch.items {
        if let Item::Record { record, .. } = item
            && let Some(gpu) = batch.index.gpus.iter_mut().find(|g| g.uuid == record.uuid)
            && gpu.last_seen < record.timestamp
        {
            gpu.last_seen = record.timestamp;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::tests::message_payload;

    fn pending(entries: &[(&str, Vec<u8>)]) -> BTreeMap<String, Pending> {
        entries
            .iter()
            .enumerate()
            .map(|(n, (id, value))| {
                (
                    Keyspace::new("/t").queue_entry(1, id),
                    Pending {
                        value: value.clone(),
                        revision: 10 + n as i64,
                    },
                )
            })
            .collect()
    }

    fn select_from(pending: &BTreeMap<String, Pending>, known: &Known, batch_size: usize) -> Batch {
        let (keys, columns) = (Keyspace::new("/t"), Columns::default());
        let profiles = ProfileCache::new();
        let transform = Transform {
            keys: &keys,
            columns: &columns,
            collector_id: "c",
            batch_size,
            profiles: &profiles,
        };
        select(
            pending,
            known,
            &transform,
            &mut ProfileBook::new(),
            Instant::now(),
        )
    }

    #[test]
    fn a_batch_respects_batch_size_and_the_operation_budget() {
        let entries: Vec<(String, Vec<u8>)> = (0..100u128)
            .map(|n| message_payload(n, "host-1", n as u32 % 8))
            .collect();
        let refs: Vec<(&str, Vec<u8>)> = entries.iter().map(|(id, v)| (id.as_str(), v.clone())).collect();
        let pending = pending(&refs);
        assert_eq!(select_from(&pending, &Known::default(), 10).items.len(), 10);
        // JSON records claim their markers (3 operations, 2 compares); the 8 GPUs, their 8 new
        // profiles and the host cost one operation each.
        let batch = select_from(&pending, &Known::default(), 100);
        let ops: usize =
            batch.items.iter().map(Item::ops).sum::<usize>() + batch.index.ops() + batch.profiles.len();
        assert!(ops <= OP_BUDGET && ops + 3 > OP_BUDGET, "{ops}");
        assert_eq!(
            (
                batch.index.gpus.len(),
                batch.index.hosts.len(),
                batch.profiles.len()
            ),
            (8, 1, 8)
        );
    }

    #[test]
    fn known_gpus_and_hosts_are_not_written_again() {
        let (id, value) = message_payload(1, "host-1", 0);
        let pending = pending(&[(&id, value)]);
        let first = select_from(&pending, &Known::default(), 10);
        let mut known = Known::default();
        known.landed(first.index, Instant::now());
        let again = select_from(&pending, &known, 10);
        assert_eq!(again.index, IndexUpdates::default());
    }

    #[test]
    fn an_invalid_entry_becomes_a_dead_letter_with_its_whole_payload() {
        let payload = format!(
            "{{\"schema_version\": \"v9\", \"idempotency_key\": \"{}\", \"pad\": \"{}\"}}",
            "ab".repeat(32),
            "x".repeat(100_000)
        )
        .into_bytes();
        let id = ulid::Ulid::from_parts(1, 1).to_string();
        let pending = pending(&[(&id, payload.clone())]);
        let batch = select_from(&pending, &Known::default(), 10);
        let Item::Dead { letter, dead_key, .. } = &batch.items[0] else {
            panic!("dead letter expected");
        };
        assert_eq!(dead_key, &Keyspace::new("/t").deadletter(&id));
        assert_eq!(letter.payload_bytes(), Ok(payload));
        assert_eq!(letter.entry_revision, 10);
        assert_eq!(letter.idempotency_key.as_deref(), Some("ab".repeat(32).as_str()));
    }

    #[test]
    fn large_entries_go_one_per_batch() {
        let big: Vec<(String, Vec<u8>)> = (0..3u128)
            .map(|n| {
                let (id, _) = message_payload(n, "h", 0);
                (id, vec![b'x'; 600 * 1024])
            })
            .collect();
        let refs: Vec<(&str, Vec<u8>)> = big.iter().map(|(id, v)| (id.as_str(), v.clone())).collect();
        assert_eq!(select_from(&pending(&refs), &Known::default(), 42).items.len(), 1);
    }
}
