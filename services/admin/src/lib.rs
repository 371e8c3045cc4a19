//! `telemetry-admin`: what an operator needs to look into and repair a running pipeline.
//!
//! Each command is a function over an etcd client and the [`Keyspace`] that returns a
//! serializable report; the binary prints it as a table or, with `--json`, as JSON. The key
//! layout comes from `shared/`, like every service's.
//!
//! - [`queue`]: depth and lag per partition;
//! - [`dead_letters`], [`show_dead_letter`], [`replay`], [`purge`]: the dead-letter prefix;
//! - [`audit`]: data keys per GPU against the index and the stats counters;
//! - [`status`]: collectors, their leases and the partitions they own;
//! - [`exporters`]: each exporter's position, lag, owner, rejected records and the records that
//!   expired before it could export them.
//! - [`auth`]: `auth setup`, one etcd user and role per service with the least privilege.

use std::collections::BTreeMap;

use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};
use serde::Serialize;
use telemetry_shared::{
    Keyspace,
    etcd::{EtcdError, count_prefix, for_each_key, range_prefix},
    keys::{QUEUE_PARTITIONS, prefix_end},
    model::{DeadLetter, ExportCheckpoint, GpuInfo, Member, PartitionStats, RejectedRecord},
};
use thiserror::Error;

pub mod auth;

/// Why a command failed.
#[derive(Debug, Error)]
pub enum AdminError {
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Someone else changed it first (nothing was written).
    #[error("{0}")]
    Conflict(String),
    /// Stored data we cannot read.
    #[error("{0}")]
    Corrupt(String),
    /// The command cannot run as asked (a missing option, a file it cannot use).
    #[error("{0}")]
    Usage(String),
}

impl From<etcd_client::Error> for AdminError {
    fn from(err: etcd_client::Error) -> Self {
        AdminError::Etcd(EtcdError::from(err))
    }
}

/// One queue partition.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PartitionQueue {
    /// The partition.
    pub partition: u32,
    /// Messages waiting.
    pub depth: i64,
    /// Age in seconds of the oldest waiting message (from its ULID), if any.
    pub oldest_age_s: Option<f64>,
    /// The collector owning it, if any.
    pub owner: Option<String>,
}

/// `queue`: depth and lag.
#[derive(Debug, Clone, Serialize)]
pub struct QueueReport {
    /// Messages waiting in all partitions.
    pub depth: i64,
    /// Age in seconds of the oldest waiting message.
    pub lag_s: Option<f64>,
    /// Per partition.
    pub partitions: Vec<PartitionQueue>,
}

fn age_of(id: &str) -> Option<f64> {
    let ulid = ulid::Ulid::from_string(id).ok()?;
    let ms = ulid.timestamp_ms() as i64;
    Some(((chrono::Utc::now().timestamp_millis() - ms) as f64 / 1000.0).max(0.0))
}

async fn owners(client: &Client, keys: &Keyspace) -> Result<BTreeMap<u32, String>, AdminError> {
    let (pairs, _) = range_prefix(client, &keys.owners_prefix(), 1000).await?;
    Ok(pairs
        .into_iter()
        .filter_map(|(k, v)| {
            let p = keys.parse_owner(&k)?;
            Some((p, String::from_utf8_lossy(&v).into_owned()))
        })
        .collect())
}

/// Depth, oldest message and owner of every partition.
pub async fn queue(client: &Client, keys: &Keyspace) -> Result<QueueReport, AdminError> {
    let owners = owners(client, keys).await?;
    let mut partitions = Vec::new();
    for p in 0..QUEUE_PARTITIONS {
        let prefix = keys.queue_partition_prefix(p);
        let resp = client
            .clone()
            .get(
                prefix.as_bytes(),
                Some(
                    GetOptions::new()
                        .with_range(prefix_end(&prefix))
                        .with_keys_only()
                        .with_limit(1),
                ),
            )
            .await?;
        let oldest = resp.kvs().first().and_then(|kv| {
            keys.parse_queue_entry(&String::from_utf8_lossy(kv.key()))
                .and_then(|(_, id)| age_of(id))
        });
        partitions.push(PartitionQueue {
            partition: p,
            depth: resp.count(),
            oldest_age_s: oldest,
            owner: owners.get(&p).cloned(),
        });
    }
    Ok(QueueReport {
        depth: partitions.iter().map(|p| p.depth).sum(),
        lag_s: partitions.iter().filter_map(|p| p.oldest_age_s).reduce(f64::max),
        partitions,
    })
}

/// A stored dead letter and its id.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDeadLetter {
    /// The id (the key's last segment).
    pub id: String,
    /// The record.
    #[serde(flatten)]
    pub letter: DeadLetter,
}

/// Every dead letter (at most `limit`, oldest id first).
pub async fn dead_letters(
    client: &Client,
    keys: &Keyspace,
    limit: usize,
) -> Result<Vec<StoredDeadLetter>, AdminError> {
    let (pairs, _) = range_prefix(client, &keys.deadletter_prefix(), 500).await?;
    pairs
        .into_iter()
        .take(limit)
        .map(|(k, v)| parse_dead_letter(keys, &k, &v))
        .collect()
}

fn parse_dead_letter(keys: &Keyspace, key: &str, value: &[u8]) -> Result<StoredDeadLetter, AdminError> {
    let id = keys.parse_deadletter(key).unwrap_or(key).to_string();
    let letter = serde_json::from_slice(value)
        .map_err(|e| AdminError::Corrupt(format!("dead letter {id} is not readable: {e}")))?;
    Ok(StoredDeadLetter { id, letter })
}

fn check_id(id: &str) -> Result<(), AdminError> {
    if telemetry_shared::keys::is_key_segment(id) {
        Ok(())
    } else {
        Err(AdminError::NotFound(format!("{id:?} is not a dead-letter id")))
    }
}

async fn read_dead_letter(
    client: &Client,
    keys: &Keyspace,
    id: &str,
) -> Result<(StoredDeadLetter, i64), AdminError> {
    check_id(id)?;
    let key = keys.deadletter(id);
    let resp = client.clone().get(key.as_bytes(), None).await?;
    let kv = resp.kvs().first().ok_or_else(|| {
        AdminError::NotFound(format!("no dead letter with id {id} (see `dead-letters list`)"))
    })?;
    Ok((parse_dead_letter(keys, &key, kv.value())?, kv.mod_revision()))
}

/// One dead letter.
pub async fn show_dead_letter(
    client: &Client,
    keys: &Keyspace,
    id: &str,
) -> Result<StoredDeadLetter, AdminError> {
    Ok(read_dead_letter(client, keys, id).await?.0)
}

/// Puts a dead letter's payload back on the queue, byte for byte, under its original queue key,
/// and removes the dead letter, in one transaction: it lands only if the dead letter is
/// unchanged since it was read and the queue key is free, so two operators replaying at once
/// replay it once.
///
/// The message's dedup marker decides whether it may be stored: a marker that still has the
/// dead-lettered entry's revision is the message's own and is moved to the replayed entry (in
/// the same transaction); no marker lets the collector claim one (or, for a CSV row, which has
/// none, store it: its entry is the only one of its key); a marker of another message means the
/// key was stored since, and the replay is refused instead of storing it twice.
pub async fn replay(client: &Client, keys: &Keyspace, id: &str) -> Result<String, AdminError> {
    let (stored, revision) = read_dead_letter(client, keys, id).await?;
    let letter = &stored.letter;
    let queue_key = letter.queue_key.clone();
    if keys.parse_queue_entry(&queue_key).is_none() {
        return Err(AdminError::Corrupt(format!(
            "dead letter {id} names {queue_key:?}, which is not a queue key of this namespace"
        )));
    }
    let payload = letter
        .payload_bytes()
        .map_err(|e| AdminError::Corrupt(format!("dead letter {id} cannot be replayed: {e}")))?;
    let dead_key = keys.deadletter(id);
    let mut compares = vec![
        Compare::mod_revision(dead_key.as_bytes(), CompareOp::Equal, revision),
        Compare::create_revision(queue_key.as_bytes(), CompareOp::Equal, 0),
    ];
    let mut ops = vec![
        TxnOp::delete(dead_key.as_bytes(), None),
        TxnOp::put(queue_key.as_bytes(), payload, None),
    ];
    if let Some(key) = &letter.idempotency_key {
        let (compare, put) = marker_for_replay(client, keys, id, key, letter.entry_revision).await?;
        compares.push(compare);
        ops.extend(put);
    }
    let resp = client
        .clone()
        .txn(Txn::new().when(compares).and_then(ops))
        .await?;
    if !resp.succeeded() {
        return Err(AdminError::Conflict(format!(
            "dead letter {id}, its queue key {queue_key} or its dedup marker changed meanwhile; \
             nothing was written (run `dead-letters show {id}` and try again)"
        )));
    }
    Ok(queue_key)
}

/// The compare (and the marker write, if any) a replay of a message with idempotency key `key`,
/// dead-lettered from an entry at `entry_revision`, needs.
async fn marker_for_replay(
    client: &Client,
    keys: &Keyspace,
    id: &str,
    key: &str,
    entry_revision: i64,
) -> Result<(Compare, Option<TxnOp>), AdminError> {
    let marker = keys.dedup_marker(key);
    let resp = client.clone().get(marker.as_str(), None).await?;
    match resp.kvs().first() {
        None => Ok((
            Compare::create_revision(marker.as_str(), CompareOp::Equal, 0),
            None,
        )),
        Some(kv) if entry_revision > 0 && kv.mod_revision() == entry_revision => Ok((
            Compare::mod_revision(marker.as_str(), CompareOp::Equal, entry_revision),
            // Rewritten in the replay's transaction, the marker has the new entry's revision.
            Some(TxnOp::put(
                marker.as_str(),
                Vec::new(),
                Some(etcd_client::PutOptions::new().with_ignore_lease()),
            )),
        )),
        Some(_) => Err(AdminError::Conflict(format!(
            "a message with the same idempotency key as dead letter {id} has been stored since; \
             replaying it would store it twice (purge it instead)"
        ))),
    }
}

/// Deletes the given dead letters (each only if it exists); returns how many were removed.
pub async fn purge(client: &Client, keys: &Keyspace, ids: &[String]) -> Result<usize, AdminError> {
    let mut removed = 0;
    for id in ids {
        check_id(id)?;
        let resp = client
            .clone()
            .delete(keys.deadletter(id).as_bytes(), None)
            .await?;
        if resp.deleted() == 0 {
            return Err(AdminError::NotFound(format!(
                "no dead letter with id {id} ({removed} removed before it)"
            )));
        }
        removed += 1;
    }
    Ok(removed)
}

/// Deletes every dead letter; returns how many.
pub async fn purge_all(client: &Client, keys: &Keyspace) -> Result<i64, AdminError> {
    let prefix = keys.deadletter_prefix();
    let resp = client
        .clone()
        .delete(
            prefix.as_bytes(),
            Some(etcd_client::DeleteOptions::new().with_range(prefix_end(&prefix))),
        )
        .await?;
    Ok(resp.deleted())
}

/// One GPU in the audit.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct GpuCount {
    /// Host.
    pub hostname: String,
    /// GPU id within the host.
    pub gpu_id: String,
    /// Data keys stored.
    pub records: u64,
    /// Whether the GPU index has an entry for it.
    pub indexed: bool,
}

/// `audit`: data keys per GPU, against the index and the counters.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    /// Data keys stored.
    pub data_keys: u64,
    /// The partition counters' total of records written.
    pub counted_records: u64,
    /// GPUs with data.
    pub gpus_with_data: usize,
    /// GPUs in the index.
    pub indexed_gpus: usize,
    /// Per GPU, by host then gpu_id.
    pub gpus: Vec<GpuCount>,
    /// Messages waiting.
    pub queue_depth: i64,
    /// Dead letters stored.
    pub dead_letters: i64,
    /// Problems found (empty when consistent).
    pub problems: Vec<String>,
    /// The revision the data keys were counted at.
    pub revision: i64,
}

/// Counts every data key per GPU (keys only, paged, at one revision) and checks it against
/// the GPU index and the stats counters. Retention expiry removes keys without lowering the
/// counters, so fewer keys than counted is reported as a note, not a problem, unless
/// `expect` says exactly how many there must be.
pub async fn audit(client: &Client, keys: &Keyspace, expect: Option<u64>) -> Result<AuditReport, AdminError> {
    let mut problems = Vec::new();
    let mut per_gpu: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut total = 0u64;
    let revision = for_each_key(client, &keys.data_prefix(), 5000, |key| {
        total += 1;
        match keys.parse_data_record(key) {
            Some(parts) => {
                *per_gpu
                    .entry((parts.hostname.to_string(), parts.gpu_id.to_string()))
                    .or_default() += 1
            }
            None => problems.push(format!("unexpected key under the data prefix: {key}")),
        }
    })
    .await?;
    let indexed = read_index(client, keys, &mut problems).await?;
    let counted = read_counted_records(client, keys, &mut problems).await?;
    let gpus: Vec<GpuCount> = per_gpu
        .into_iter()
        .map(|((hostname, gpu_id), records)| GpuCount {
            indexed: indexed.contains(&(hostname.clone(), gpu_id.clone())),
            hostname,
            gpu_id,
            records,
        })
        .collect();
    problems.extend(consistency_problems(&gpus, total, counted, expect));
    let mut counter = client.clone();
    Ok(AuditReport {
        data_keys: total,
        counted_records: counted,
        gpus_with_data: gpus.len(),
        indexed_gpus: indexed.len(),
        gpus,
        queue_depth: count_prefix(&mut counter, &keys.queue_prefix(), false).await?,
        dead_letters: count_prefix(&mut counter, &keys.deadletter_prefix(), false).await?,
        problems,
        revision,
    })
}

/// The (host, gpu_id) pairs the GPU index holds; unreadable entries are reported.
async fn read_index(
    client: &Client,
    keys: &Keyspace,
    problems: &mut Vec<String>,
) -> Result<std::collections::BTreeSet<(String, String)>, AdminError> {
    let (index, _) = range_prefix(client, &keys.gpu_index_prefix(), 1000).await?;
    let mut indexed = std::collections::BTreeSet::new();
    for (key, value) in &index {
        match serde_json::from_slice::<GpuInfo>(value) {
            Ok(g) => {
                indexed.insert((g.hostname, g.gpu_id));
            }
            Err(e) => problems.push(format!("unreadable index entry {key}: {e}")),
        }
    }
    Ok(indexed)
}

/// The counters' total of records written; unreadable counters are reported.
async fn read_counted_records(
    client: &Client,
    keys: &Keyspace,
    problems: &mut Vec<String>,
) -> Result<u64, AdminError> {
    let (counters, _) = range_prefix(client, &keys.stats_prefix(), 100).await?;
    let mut counted = 0u64;
    for (key, value) in &counters {
        match serde_json::from_slice::<PartitionStats>(value) {
            Ok(s) => counted += s.records,
            Err(e) => problems.push(format!("unreadable stats counter {key}: {e}")),
        }
    }
    Ok(counted)
}

/// What the audit's numbers say is wrong: GPUs with data but no index entry, more data keys
/// than the counters ever wrote, or a count other than the one expected.
fn consistency_problems(gpus: &[GpuCount], total: u64, counted: u64, expect: Option<u64>) -> Vec<String> {
    let mut problems: Vec<String> = gpus
        .iter()
        .filter(|g| !g.indexed)
        .map(|g| {
            format!(
                "{}/{} has {} records but no index entry",
                g.hostname, g.gpu_id, g.records
            )
        })
        .collect();
    if total > counted {
        problems.push(format!(
            "{total} data keys but the counters say {counted} records were written"
        ));
    }
    if let Some(n) = expect
        && n != total
    {
        problems.push(format!("expected exactly {n} data keys, found {total}"));
    }
    problems
}

/// A registered collector.
#[derive(Debug, Clone, Serialize)]
pub struct CollectorStatus {
    /// Its id.
    pub id: String,
    /// Its session lease.
    pub lease: i64,
    /// Seconds left on the lease (-1 if it has expired).
    pub ttl_s: i64,
    /// When it registered.
    pub started_at: String,
    /// Partitions it owns.
    pub partitions: Vec<u32>,
}

/// `status`: collectors and their claims.
#[derive(Debug, Clone, Serialize)]
pub struct StatusReport {
    /// Registered collectors.
    pub collectors: Vec<CollectorStatus>,
    /// Partitions with no owner.
    pub unowned: Vec<u32>,
    /// Partitions owned by an id that is not registered (a claim about to expire).
    pub orphaned: BTreeMap<u32, String>,
}

/// Collectors, their leases and their partitions.
pub async fn status(client: &Client, keys: &Keyspace) -> Result<StatusReport, AdminError> {
    let (members, _) = range_prefix(client, &keys.members_prefix(), 1000).await?;
    let owners = owners(client, keys).await?;
    let mut collectors = Vec::new();
    for (key, value) in members {
        let member: Member = serde_json::from_slice(&value)
            .map_err(|e| AdminError::Corrupt(format!("unreadable registration {key}: {e}")))?;
        let ttl = client
            .clone()
            .lease_time_to_live(member.lease, None)
            .await
            .map(|r| r.ttl())
            .unwrap_or(-1);
        collectors.push(CollectorStatus {
            partitions: owners
                .iter()
                .filter(|(_, o)| **o == member.id)
                .map(|(p, _)| *p)
                .collect(),
            id: member.id,
            lease: member.lease,
            ttl_s: ttl,
            started_at: member.started_at.to_string(),
        });
    }
    let unowned = (0..QUEUE_PARTITIONS)
        .filter(|p| !owners.contains_key(p))
        .collect();
    let orphaned = owners
        .into_iter()
        .filter(|(_, o)| !collectors.iter().any(|c| c.id == *o))
        .collect();
    Ok(StatusReport {
        collectors,
        unowned,
        orphaned,
    })
}

/// `exporter status`: one exporter.
#[derive(Debug, Clone, Serialize)]
pub struct ExporterStatus {
    /// Its name (`EXPORTER_NAME`).
    pub name: String,
    /// The active process, if any (id and lease).
    pub owner: Option<Member>,
    /// Where it is.
    pub checkpoint: ExportCheckpoint,
    /// etcd's current revision.
    pub current_revision: i64,
    /// Revisions between the checkpoint and now (some of them may not be records).
    pub lag_revisions: i64,
    /// Seconds since the processing time of the last record it passed.
    pub last_record_age_s: Option<f64>,
    /// Records rejected, newest last (at most the number asked for).
    pub rejected: Vec<RejectedRecord>,
    /// Rejected entries stored (the newest `REJECTED_KEEP`).
    pub rejected_listed: i64,
}

/// Every exporter (or the one named), with up to `rejected` of its newest rejected records.
pub async fn exporters(
    client: &Client,
    keys: &Keyspace,
    name: Option<&str>,
    rejected: usize,
) -> Result<Vec<ExporterStatus>, AdminError> {
    let (entries, current_revision) = range_prefix(client, &keys.exporters_prefix(), 1000).await?;
    let mut names: Vec<String> = entries
        .iter()
        .filter_map(|(k, _)| keys.parse_exporter_checkpoint(k).map(str::to_string))
        .collect();
    if let Some(name) = name {
        names.retain(|n| n == name);
        if names.is_empty() {
            return Err(AdminError::NotFound(format!(
                "no exporter named {name:?} has a checkpoint (see `exporter status`)"
            )));
        }
    }
    let mut out = Vec::new();
    for name in names {
        out.push(exporter(client, keys, &name, current_revision, rejected).await?);
    }
    Ok(out)
}

async fn exporter(
    client: &Client,
    keys: &Keyspace,
    name: &str,
    current_revision: i64,
    rejected: usize,
) -> Result<ExporterStatus, AdminError> {
    let get = |key: String| async move {
        let resp = client.clone().get(key.as_bytes(), None).await?;
        Ok::<_, AdminError>(resp.kvs().first().map(|kv| kv.value().to_vec()))
    };
    let checkpoint: ExportCheckpoint = match get(keys.exporter_checkpoint(name)).await? {
        Some(v) => serde_json::from_slice(&v)
            .map_err(|e| AdminError::Corrupt(format!("exporter {name}: unreadable checkpoint: {e}")))?,
        None => ExportCheckpoint::default(),
    };
    let owner = get(keys.exporter_owner(name))
        .await?
        .and_then(|v| serde_json::from_slice::<Member>(&v).ok());
    let prefix = keys.exporter_rejected_prefix(name);
    let listed = count_prefix(&mut client.clone(), &prefix, false).await?;
    let newest = client
        .clone()
        .get(
            prefix.as_bytes(),
            Some(
                GetOptions::new()
                    .with_range(prefix_end(&prefix))
                    .with_sort(etcd_client::SortTarget::Key, etcd_client::SortOrder::Descend)
                    .with_limit(i64::try_from(rejected).unwrap_or(i64::MAX)),
            ),
        )
        .await?;
    let mut rejected: Vec<RejectedRecord> = newest
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice(kv.value()).ok())
        .collect();
    rejected.reverse();
    let now_ms = chrono::Utc::now().timestamp_millis();
    Ok(ExporterStatus {
        name: name.to_string(),
        owner,
        last_record_age_s: checkpoint
            .last_record_time
            .map(|t| ((now_ms - t.unix_millis()) as f64 / 1000.0).max(0.0)),
        lag_revisions: (current_revision - checkpoint.revision).max(0),
        current_revision,
        checkpoint,
        rejected,
        rejected_listed: listed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(h: &str, g: &str, records: u64, indexed: bool) -> GpuCount {
        GpuCount {
            hostname: h.into(),
            gpu_id: g.into(),
            records,
            indexed,
        }
    }

    #[test]
    fn the_audit_flags_unindexed_gpus_extra_keys_and_wrong_totals() {
        let gpus = [gpu("h", "0", 3, true), gpu("h", "1", 2, false)];
        let problems = consistency_problems(&gpus, 5, 4, Some(6));
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].contains("h/1"));
        // Retention expiry (fewer keys than counted) is not a problem.
        assert!(consistency_problems(&gpus[..1], 3, 10, None).is_empty());
    }
}
