//! The sink: one fenced transaction per batch, in which every effect of the batch lands or none
//! does.
//!
//! - **compare** the partition's owner key still carries this collector's lease (the fence: a
//!   collector that lost its lease, or whose partition moved, cannot land anything), the
//!   partition's stats counter is at the revision last seen (so it is never computed from a
//!   stale base), and each record's processed marker does not exist yet;
//! - **then** per record: put the telemetry key (retention lease), put the processed marker
//!   (dedup lease), delete the queue entry; per dead letter: put it, delete the queue entry;
//!   per duplicate: delete the queue entry; plus the partition's stats counter (an absolute
//!   value) and GPU/host index entries;
//! - **else** read the owner key, the stats counter and the markers, to tell a lost fence from
//!   duplicates from our own earlier attempt that landed although its reply was lost (whose
//!   records become `Landed` and whose counter becomes the new base).
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
    /// A record whose effect an earlier attempt already landed (its processed marker carries
    /// this message's id): nothing left to write, but it counts as stored.
    Landed {
        /// Its queue key.
        queue_key: String,
        /// The record.
        record: Box<Record>,
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
            Item::Record { queue_key, .. }
            | Item::Landed { queue_key, .. }
            | Item::Duplicate { queue_key }
            | Item::Dead { queue_key, .. } => queue_key,
        }
    }

    /// Success-branch operations this item needs.
    pub fn ops(&self) -> usize {
        match self {
            Item::Record { .. } => 3,
            Item::Dead { .. } => 2,
            Item::Duplicate { .. } => 1,
            Item::Landed { .. } => 0,
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
        /// The stats key's `mod_revision` after this batch (the next batch's fence on it).
        stats_rev: i64,
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
            // A `Landed` record is already in the counter value read back from etcd.
            Item::Landed { .. } => {}
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

/// One partition's share of a transaction.
#[derive(Debug, Clone)]
pub struct SubBatch {
    /// The partition.
    pub partition: u32,
    /// The lease its owner key must carry (the fence).
    pub lease: i64,
    /// The partition's stats counter before this batch.
    pub base: PartitionStats,
    /// The stats key's `mod_revision` as last seen (0 if absent). Compared in the commit, so a
    /// counter value is never computed from a stale base: after an attempt whose outcome was
    /// unknown (and which may have landed) the failure branch returns the current value.
    pub stats_rev: i64,
    /// What to do with each queue entry (records found to be duplicates are rewritten).
    pub items: Vec<Item>,
    /// Index entries to write.
    pub index: IndexUpdates,
}

impl SubBatch {
    /// Compares this sub-batch adds (owner fence, stats revision, one per record). The
    /// failure branch reads one key per compare, so this also bounds it.
    pub fn compares(&self) -> usize {
        2 + self.records()
    }

    /// Value bytes the sub-batch writes (records and dead letters), for the request-size budget.
    pub fn bytes(&self) -> usize {
        self.items
            .iter()
            .map(|i| match i {
                Item::Record { record, .. } => record.encoded.len() + 128,
                Item::Dead { letter, .. } => letter.payload.len() + letter.reason.len() + 256,
                _ => 64,
            })
            .sum::<usize>()
            + 512 * (self.index.ops() + 1)
    }

    /// Success-branch operations (items, index, stats counter).
    pub fn success_ops(&self) -> usize {
        self.items.iter().map(Item::ops).sum::<usize>() + self.index.ops() + 1
    }

    fn records(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i, Item::Record { .. }))
            .count()
    }

    fn stored(&self) -> usize {
        self.items
            .iter()
            .filter(|i| matches!(i, Item::Record { .. } | Item::Landed { .. }))
            .count()
    }

    fn committed(&self, stats_rev: i64) -> Outcome {
        Outcome::Committed {
            stats_rev,
            stats: stats_after(&self.base, &self.items),
            records: self.stored(),
            duplicates: self
                .items
                .iter()
                .filter(|i| matches!(i, Item::Duplicate { .. }))
                .count(),
            dead: self
                .items
                .iter()
                .filter(|i| matches!(i, Item::Dead { .. }))
                .count(),
        }
    }

    /// Within one sub-batch, a second record with an idempotency key already in it is a
    /// duplicate (etcd also refuses a transaction that writes one key twice).
    fn mark_inner_duplicates(&mut self, seen: &mut HashSet<String>) {
        for item in self.items.iter_mut() {
            if let Item::Record { queue_key, record } = item
                && !seen.insert(record.message.idempotency_key.clone())
            {
                *item = Item::Duplicate {
                    queue_key: queue_key.clone(),
                };
            }
        }
    }
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

    /// Commits several partitions' sub-batches in one transaction (group commit), each fenced
    /// by its own owner key. Returns one outcome per sub-batch, in order. A sub-batch whose
    /// fence fails is dropped from the transaction and reported as [`Outcome::FenceLost`];
    /// records found already processed become duplicates; the rest is retried until it lands.
    pub async fn commit_many(&self, subs: &mut [SubBatch]) -> Result<Vec<Outcome>, EtcdError> {
        let mut seen = HashSet::new();
        for sub in subs.iter_mut() {
            sub.mark_inner_duplicates(&mut seen);
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; subs.len()];
        loop {
            let live: Vec<usize> = (0..subs.len()).filter(|i| outcomes[*i].is_none()).collect();
            if live.is_empty() {
                return Ok(outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Outcome::FenceLost))
                    .collect());
            }
            let dedup_lease = self.dedup.current().await?;
            let retention_lease = self.retention.current().await?;
            let mut txn = BoundedTxn::new();
            // Failure-branch reads, per live sub-batch: owner key, then each record's marker.
            let mut expect: Vec<(usize, Vec<(String, String)>)> = Vec::new();
            let mut index_keys = HashSet::new();
            for &i in &live {
                let sub = &subs[i];
                let owner_key = self.keys.owner(sub.partition);
                let stats_key = self.keys.partition_stats(sub.partition);
                txn.compare(Compare::lease(owner_key.as_str(), CompareOp::Equal, sub.lease));
                txn.otherwise(TxnOp::get(owner_key.as_str(), None));
                txn.compare(Compare::mod_revision(
                    stats_key.as_str(),
                    CompareOp::Equal,
                    sub.stats_rev,
                ));
                txn.otherwise(TxnOp::get(stats_key.as_str(), None));
                let mut markers = Vec::new();
                for item in &sub.items {
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
                            markers.push((queue_key.clone(), record.message.id.to_string()));
                        }
                        Item::Duplicate { queue_key } => {
                            txn.then(TxnOp::delete(queue_key.as_str(), None));
                        }
                        Item::Landed { .. } => {}
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
                // Index keys can be shared between partitions (one host's GPUs hash to several):
                // write each once per transaction, which etcd requires.
                for gpu in &sub.index.gpus {
                    let key = self.keys.gpu_index(&gpu.uuid);
                    if index_keys.insert(key.clone()) {
                        txn.then(TxnOp::put(key, serde_json::to_vec(gpu).unwrap_or_default(), None));
                    }
                }
                for host in &sub.index.hosts {
                    let key = self.keys.host_index(host);
                    if index_keys.insert(key.clone()) {
                        txn.then(TxnOp::put(key, host.as_str(), None));
                    }
                }
                txn.then(TxnOp::put(
                    self.keys.partition_stats(sub.partition),
                    serde_json::to_vec(&stats_after(&sub.base, &sub.items)).unwrap_or_default(),
                    None,
                ));
                expect.push((i, markers));
            }
            debug_assert!(txn.ops() <= MAX_TXN_OPS);
            let resp = match self.client.clone().txn(txn.build()?).await {
                Ok(resp) => resp,
                Err(err) if is_lease_not_found(&err) => {
                    // A bucket lease expired or was revoked: grant new ones and retry.
                    self.dedup.invalidate(dedup_lease);
                    self.retention.invalidate(retention_lease);
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if resp.succeeded() {
                // Every stats key in the transaction now has its revision.
                let revision = resp.header().map_or(0, |h| h.revision());
                for &i in &live {
                    outcomes[i] = Some(subs[i].committed(revision));
                }
                continue;
            }
            // Which compares failed? Walk the failure reads in the order they were added. A
            // marker carrying our own message id means an earlier attempt (whose reply was lost)
            // landed that record: it becomes `Landed`, never applied twice. A marker with another
            // id is a duplicate to absorb. An owner key without our lease is a lost fence.
            let responses = resp.op_responses();
            let mut responses = responses.iter();
            for (i, markers) in &expect {
                let owner_lease = match responses.next() {
                    Some(TxnOpResponse::Get(get)) => get.kvs().first().map_or(0, |kv| kv.lease()),
                    _ => 0,
                };
                // The counter as it is now: the base for the retry (it includes whatever an
                // earlier attempt of ours landed).
                if let Some(TxnOpResponse::Get(get)) = responses.next() {
                    let (current, rev) = get.kvs().first().map_or((PartitionStats::default(), 0), |kv| {
                        (
                            serde_json::from_slice(kv.value()).unwrap_or_default(),
                            kv.mod_revision(),
                        )
                    });
                    subs[*i].base = current;
                    subs[*i].stats_rev = rev;
                }
                let mut own = HashSet::new();
                let mut dups = HashSet::new();
                for (queue_key, our_id) in markers {
                    if let Some(TxnOpResponse::Get(get)) = responses.next()
                        && let Some(kv) = get.kvs().first()
                    {
                        if kv.value() == our_id.as_bytes() {
                            own.insert(queue_key.clone());
                        } else {
                            dups.insert(queue_key.clone());
                        }
                    }
                }
                if owner_lease != subs[*i].lease {
                    metrics::counter!("collector_fence_refusals_total").increment(1);
                    outcomes[*i] = Some(Outcome::FenceLost);
                    continue;
                }
                if !own.is_empty() {
                    tracing::info!(
                        partition = subs[*i].partition,
                        records = own.len(),
                        "an earlier attempt landed these records; not applying them again"
                    );
                }
                for item in subs[*i].items.iter_mut() {
                    let key = item.queue_key().to_string();
                    if dups.contains(&key) {
                        tracing::debug!(queue_key = %key, "duplicate idempotency key; absorbing");
                        *item = Item::Duplicate { queue_key: key };
                    } else if own.contains(&key)
                        && let Item::Record { record, .. } = item
                    {
                        *item = Item::Landed {
                            queue_key: key,
                            record: record.clone(),
                        };
                    }
                }
            }
        }
    }
}

/// A batch submitted to the [`Combiner`], with where to send its outcome.
struct Submission {
    sub: SubBatch,
    reply: tokio::sync::oneshot::Sender<Result<(Outcome, Vec<Item>), EtcdError>>,
}

/// Group commit: partition tasks submit their batches here, and whatever has queued up while
/// earlier transactions were in flight is merged into one transaction (within etcd's 128
/// operations). Each partition still has at most one batch in flight, so its order holds; the
/// merge turns many small per-partition commits into few full ones.
#[derive(Clone)]
pub struct Combiner {
    tx: tokio::sync::mpsc::UnboundedSender<Submission>,
}

/// Most value bytes in one commit transaction, well under etcd's 1.5 MiB request limit.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Transactions the combiner keeps in flight at once.
pub const COMMITS_IN_FLIGHT: usize = 8;

impl Combiner {
    /// Starts the combiner over `committer`; it stops when every handle is dropped.
    pub fn start(committer: Arc<Committer>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(combine(committer, rx));
        Combiner { tx }
    }

    /// Commits `sub` (possibly together with other partitions' batches) and returns its outcome
    /// and its items as finally committed (records may have become duplicates).
    pub async fn commit(&self, sub: SubBatch) -> Result<(Outcome, Vec<Item>), EtcdError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Submission { sub, reply })
            .map_err(|_| EtcdError::Cancelled)?;
        rx.await.map_err(|_| EtcdError::Cancelled)?
    }
}

async fn combine(committer: Arc<Committer>, mut rx: tokio::sync::mpsc::UnboundedReceiver<Submission>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(COMMITS_IN_FLIGHT));
    let mut held: Option<Submission> = None;
    loop {
        // Wait for room for another transaction, then for work.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let first = match held.take() {
            Some(s) => s,
            None => match rx.recv().await {
                Some(s) => s,
                None => return,
            },
        };
        let mut compares = first.sub.compares();
        let mut ops = first.sub.success_ops();
        let mut bytes = first.sub.bytes();
        let mut partitions = HashSet::from([first.sub.partition]);
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            // Within etcd's operation and request-size limits, and never two batches of one
            // partition (they would write its stats key twice).
            if compares + next.sub.compares() > MAX_TXN_OPS
                || ops + next.sub.success_ops() > MAX_TXN_OPS
                || bytes + next.sub.bytes() > MAX_TXN_BYTES
                || partitions.contains(&next.sub.partition)
            {
                held = Some(next);
                break;
            }
            compares += next.sub.compares();
            ops += next.sub.success_ops();
            bytes += next.sub.bytes();
            partitions.insert(next.sub.partition);
            group.push(next);
        }
        let committer = committer.clone();
        tokio::spawn(async move {
            let (mut subs, replies): (Vec<SubBatch>, Vec<_>) =
                group.into_iter().map(|s| (s.sub, s.reply)).unzip();
            metrics::histogram!("collector_partitions_per_commit").record(subs.len() as f64);
            let result = committer.commit_many(&mut subs).await;
            drop(permit);
            match result {
                Ok(outcomes) => {
                    for ((reply, outcome), sub) in replies.into_iter().zip(outcomes).zip(subs) {
                        let _ = reply.send(Ok((outcome, sub.items)));
                    }
                }
                Err(err) => {
                    let text = err.to_string();
                    let mut first = Some(err);
                    for reply in replies {
                        let e = first.take().unwrap_or_else(|| {
                            EtcdError::Client(etcd_client::Error::InvalidArgs(text.clone()))
                        });
                        let _ = reply.send(Err(e));
                    }
                }
            }
        });
    }
}
