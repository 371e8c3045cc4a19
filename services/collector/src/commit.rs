//! The sink: one fenced transaction per batch, in which every effect of the batch lands or none
//! does.
//!
//! - **compare** the partition's owner key still carries this collector's lease (the fence: a
//!   collector that lost its lease, or whose partition moved, cannot land anything), and each
//!   record's processed marker does not exist yet;
//! - **then** per record: put the telemetry key (retention lease), put the processed marker
//!   (dedup lease), delete the queue entry; per dead letter: put it, delete the queue entry;
//!   per duplicate: delete the queue entry; plus the partition's stats counter (an absolute
//!   value, so a retried commit writes the same value) and GPU/host index entries;
//! - **else** read the owner key and the markers, to tell a lost fence from duplicates from our
//!   own earlier attempt that landed although its reply was lost.
//!
//! The queue entry is only ever removed in the transaction that writes its effect, so nothing
//! is acknowledged before it is durable, and a crash at any point loses nothing.

use std::{collections::HashSet, sync::Arc};

use etcd_client::{Client, Compare, CompareOp, PutOptions, TxnOp, TxnOpResponse};
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::{BoundedTxn, BucketedLease, EtcdError, MAX_TXN_OPS, is_lease_not_found},
    model::{DeadLetter, GpuInfo, PartitionStats},
};

use crate::validate::Record;

/// What to do with one queue entry.
#[derive(Debug, Clone)]
pub enum Item {
    /// Store it as telemetry.
    Record {
        /// Its queue key.
        queue_key: String,
        /// The validated record.
        record: Box<Record>,
    },
    /// Its idempotency key was already processed: remove it without an effect.
    Duplicate {
        /// Its queue key.
        queue_key: String,
    },
    /// Invalid: move it to the dead-letter prefix with the reason.
    Dead {
        /// Its queue key.
        queue_key: String,
        /// The dead-letter key.
        dead_key: String,
        /// The dead-letter record.
        letter: Box<DeadLetter>,
    },
}

impl Item {
    /// The queue key the item removes.
    pub fn queue_key(&self) -> &str {
        match self {
            Item::Record { queue_key, .. } | Item::Duplicate { queue_key } | Item::Dead { queue_key, .. } => {
                queue_key
            }
        }
    }

    /// Success-branch operations this item needs.
    pub fn ops(&self) -> usize {
        match self {
            Item::Record { .. } => 3,
            Item::Dead { .. } => 2,
            Item::Duplicate { .. } => 1,
        }
    }
}

/// Index entries to write with a batch.
#[derive(Debug, Default, Clone)]
pub struct IndexUpdates {
    /// GPU index entries.
    pub gpus: Vec<GpuInfo>,
    /// New host names.
    pub hosts: Vec<String>,
}

impl IndexUpdates {
    /// Operations these need.
    pub fn ops(&self) -> usize {
        self.gpus.len() + self.hosts.len()
    }
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Everything landed; `stats` is the partition's counter now.
    Committed {
        /// The partition's stats after this batch.
        stats: PartitionStats,
        /// Records stored.
        records: usize,
        /// Duplicates absorbed.
        duplicates: usize,
        /// Messages dead-lettered.
        dead: usize,
    },
    /// The fence refused the commit: this collector no longer owns the partition.
    FenceLost,
}

/// Applies batches; shared by a collector's partition tasks.
pub struct Committer {
    client: Client,
    keys: Keyspace,
    dedup: Arc<BucketedLease>,
    retention: Arc<BucketedLease>,
}

fn stats_after(base: &PartitionStats, items: &[Item]) -> PartitionStats {
    let mut stats = *base;
    for item in items {
        match item {
            Item::Record { record, .. } => {
                stats.records += 1;
                let ts: Timestamp = record.message.timestamp;
                stats.earliest = Some(stats.earliest.map_or(ts, |e| e.min(ts)));
                stats.latest = Some(stats.latest.map_or(ts, |l| l.max(ts)));
            }
            Item::Duplicate { .. } => stats.duplicates += 1,
            Item::Dead { .. } => stats.dead_letters += 1,
        }
    }
    stats
}

impl Committer {
    /// A committer writing below `keys`.
    pub fn new(
        client: Client,
        keys: Keyspace,
        dedup: Arc<BucketedLease>,
        retention: Arc<BucketedLease>,
    ) -> Self {
        Committer {
            client,
            keys,
            dedup,
            retention,
        }
    }

    /// Commits `items` for `partition`, fenced by `lease`, on top of the partition's counter
    /// `base`. Records whose key turns out to be processed already become duplicates and the
    /// batch is retried; `items` is updated to what was finally committed.
    pub async fn commit(
        &self,
        partition: u32,
        lease: i64,
        base: &PartitionStats,
        items: &mut Vec<Item>,
        index: &IndexUpdates,
    ) -> Result<Outcome, EtcdError> {
        let owner_key = self.keys.owner(partition);
        let stats_key = self.keys.partition_stats(partition);
        // Two records with one idempotency key in a batch: the later one is a duplicate (etcd
        // also refuses a transaction that writes one key twice).
        let mut seen = HashSet::new();
        for item in items.iter_mut() {
            if let Item::Record { queue_key, record } = item
                && !seen.insert(record.message.idempotency_key.clone())
            {
                *item = Item::Duplicate {
                    queue_key: queue_key.clone(),
                };
            }
        }
        loop {
            let dedup_lease = self.dedup.current().await?;
            let retention_lease = self.retention.current().await?;
            let stats = stats_after(base, items);
            let mut txn = BoundedTxn::new();
            txn.compare(Compare::lease(owner_key.as_str(), CompareOp::Equal, lease));
            txn.otherwise(TxnOp::get(owner_key.as_str(), None));
            let mut markers = Vec::new();
            for item in items.iter() {
                match item {
                    Item::Record { queue_key, record } => {
                        let marker = self.keys.processed_marker(&record.message.idempotency_key);
                        txn.compare(Compare::create_revision(marker.as_str(), CompareOp::Equal, 0));
                        txn.otherwise(TxnOp::get(marker.as_str(), None));
                        txn.then(TxnOp::put(
                            record.data_key.as_str(),
                            record.encoded.clone(),
                            Some(PutOptions::new().with_lease(retention_lease)),
                        ));
                        txn.then(TxnOp::put(
                            marker.as_str(),
                            record.message.id.to_string(),
                            Some(PutOptions::new().with_lease(dedup_lease)),
                        ));
                        txn.then(TxnOp::delete(queue_key.as_str(), None));
                        markers.push(record.message.id.to_string());
                    }
                    Item::Duplicate { queue_key } => {
                        txn.then(TxnOp::delete(queue_key.as_str(), None));
                    }
                    Item::Dead {
                        queue_key,
                        dead_key,
                        letter,
                    } => {
                        txn.then(TxnOp::put(
                            dead_key.as_str(),
                            serde_json::to_vec(letter).unwrap_or_default(),
                            None,
                        ));
                        txn.then(TxnOp::delete(queue_key.as_str(), None));
                    }
                }
            }
            for gpu in &index.gpus {
                txn.then(TxnOp::put(
                    self.keys.gpu_index(&gpu.uuid),
                    serde_json::to_vec(gpu).unwrap_or_default(),
                    None,
                ));
            }
            for host in &index.hosts {
                txn.then(TxnOp::put(self.keys.host_index(host), host.as_str(), None));
            }
            txn.then(TxnOp::put(
                stats_key.as_str(),
                serde_json::to_vec(&stats).unwrap_or_default(),
                None,
            ));
            debug_assert!(txn.ops() <= MAX_TXN_OPS);
            let resp = match self.client.clone().txn(txn.build()?).await {
                Ok(resp) => resp,
                Err(err) if is_lease_not_found(&err) => {
                    // One of the bucket leases expired or was revoked: grant new ones.
                    self.dedup.invalidate(dedup_lease);
                    self.retention.invalidate(retention_lease);
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if resp.succeeded() {
                return Ok(Outcome::Committed {
                    stats,
                    records: items.iter().filter(|i| matches!(i, Item::Record { .. })).count(),
                    duplicates: items
                        .iter()
                        .filter(|i| matches!(i, Item::Duplicate { .. }))
                        .count(),
                    dead: items.iter().filter(|i| matches!(i, Item::Dead { .. })).count(),
                });
            }
            let mut responses = resp.op_responses().into_iter();
            let owner_lease = match responses.next() {
                Some(TxnOpResponse::Get(get)) => get.kvs().first().map_or(0, |kv| kv.lease()),
                _ => 0,
            };
            if owner_lease != lease {
                metrics::counter!("collector_fence_refusals_total").increment(1);
                return Ok(Outcome::FenceLost);
            }
            // The fence held, so some markers exist. Ours (same message id) means our earlier
            // attempt landed and its reply was lost: the whole batch is done. Others' are
            // duplicates to absorb.
            let mut own = 0;
            let mut dup_queue_keys = HashSet::new();
            let record_keys: Vec<String> = items
                .iter()
                .filter_map(|i| match i {
                    Item::Record { queue_key, .. } => Some(queue_key.clone()),
                    _ => None,
                })
                .collect();
            for ((resp, our_id), queue_key) in responses.zip(&markers).zip(&record_keys) {
                if let TxnOpResponse::Get(get) = resp
                    && let Some(kv) = get.kvs().first()
                {
                    if kv.value() == our_id.as_bytes() {
                        own += 1;
                    } else {
                        dup_queue_keys.insert(queue_key.clone());
                    }
                }
            }
            if own > 0 && dup_queue_keys.is_empty() {
                tracing::info!(
                    partition,
                    "an earlier attempt of this batch landed; not applying it again"
                );
                return Ok(Outcome::Committed {
                    stats,
                    records: items.iter().filter(|i| matches!(i, Item::Record { .. })).count(),
                    duplicates: items
                        .iter()
                        .filter(|i| matches!(i, Item::Duplicate { .. }))
                        .count(),
                    dead: items.iter().filter(|i| matches!(i, Item::Dead { .. })).count(),
                });
            }
            for item in items.iter_mut() {
                if dup_queue_keys.contains(item.queue_key()) {
                    tracing::debug!(
                        queue_key = item.queue_key(),
                        "duplicate idempotency key; absorbing"
                    );
                    *item = Item::Duplicate {
                        queue_key: item.queue_key().to_string(),
                    };
                }
            }
        }
    }
}
