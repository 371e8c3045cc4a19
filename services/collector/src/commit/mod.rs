//! The sink: one fenced transaction per batch, in which every effect of the batch lands or none
//! does. [`plan`] builds the transaction and reads etcd's answer; this module sends it, retries,
//! and merges batches of several partitions into one transaction ([`Combiner`]).
//!
//! The queue entry is only ever removed in the transaction that writes its effect, so nothing
//! is acknowledged before it is durable, and a crash at any point loses nothing. Every entry is
//! compared at the revision it was read at, so an attempt whose reply was lost (a timeout, a
//! leader change) and is then retried settles nothing twice: its entries are gone, and the
//! counter it moved is the retry's new base.

mod plan;
#[cfg(test)]
pub(crate) mod tests;

use std::{collections::HashSet, sync::Arc};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::{
        BucketedLease, EtcdError, MAX_TXN_BYTES, MAX_TXN_OPS, TxnAnswer, is_indeterminate,
        is_lease_not_found, is_retryable,
    },
    model::{DeadLetter, GpuInfo, PartitionStats},
    observe::emit,
    record::{Profile, ProfileId},
    retry::{Backoff, Policy},
};
use tokio_util::sync::CancellationToken;

use crate::{
    events,
    validate::{MarkerMode, Record},
};
pub(crate) use plan::{Found, UnreadableStats, parse_stats};

/// What to do with one queue entry, read at `revision`.
#[derive(Debug, Clone)]
pub(crate) enum Item {
    /// Store it as telemetry.
    Record {
        /// Its queue key.
        queue_key: String,
        /// The entry's `mod_revision` when it was read.
        revision: i64,
        /// The validated record.
        record: Box<Record>,
    },
    /// Its idempotency key was already processed: remove it without an effect.
    Duplicate {
        /// Its queue key.
        queue_key: String,
        /// The entry's `mod_revision` when it was read.
        revision: i64,
    },
    /// Invalid: move it to the dead letters with the reason.
    Dead {
        /// Its queue key.
        queue_key: String,
        /// The entry's `mod_revision` when it was read.
        revision: i64,
        /// The dead-letter key.
        dead_key: String,
        /// The dead letter.
        letter: Box<DeadLetter>,
    },
}

impl Item {
    /// The queue key the item removes.
    pub(crate) fn queue_key(&self) -> &str {
        match self {
            Item::Record { queue_key, .. }
            | Item::Duplicate { queue_key, .. }
            | Item::Dead { queue_key, .. } => queue_key,
        }
    }

    /// The queue entry's revision when it was read.
    pub(crate) fn revision(&self) -> i64 {
        match self {
            Item::Record { revision, .. }
            | Item::Duplicate { revision, .. }
            | Item::Dead { revision, .. } => *revision,
        }
    }

    /// Success-branch operations this item may need. A held marker counts as a claimed one:
    /// a refused attempt may find it gone (expired after `DEDUP_TTL`) and switch the record to
    /// claiming it, one put more, and the retry must still fit etcd's limit.
    pub(crate) fn ops(&self) -> usize {
        match self {
            Item::Record { record, .. } => match record.marker {
                MarkerMode::Fenced => 2,
                MarkerMode::Held | MarkerMode::Claim => 3,
            },
            Item::Dead { .. } => 2,
            Item::Duplicate { .. } => 1,
        }
    }

    /// Compares (and failure-branch reads) this item needs.
    pub(crate) fn compares(&self) -> usize {
        match self {
            Item::Record { record, .. } if record.marker == MarkerMode::Fenced => 1,
            Item::Record { .. } => 2,
            Item::Dead { .. } | Item::Duplicate { .. } => 1,
        }
    }

    /// Value bytes the item writes, for the request-size budget.
    fn bytes(&self) -> usize {
        match self {
            Item::Record { record, .. } => record.encoded.len() + record.data_key.len() + 128,
            Item::Dead { letter, .. } => {
                letter.payload.as_ref().map_or(0, String::len)
                    + letter.payload_base64.as_ref().map_or(0, String::len)
                    + letter.reason.len()
                    + 512
            }
            Item::Duplicate { queue_key, .. } => queue_key.len() + 64,
        }
    }
}

/// Index entries to write with a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct IndexUpdates {
    /// GPU index entries.
    pub gpus: Vec<GpuInfo>,
    /// New host names.
    pub hosts: Vec<String>,
}

impl IndexUpdates {
    /// Operations these need.
    pub(crate) fn ops(&self) -> usize {
        self.gpus.len() + self.hosts.len()
    }
}

/// One partition's batch, as submitted for commit.
#[derive(Debug, Clone)]
pub(crate) struct SubBatch {
    /// The partition.
    pub partition: u32,
    /// The lease its owner key must carry (the fence).
    pub lease: i64,
    /// The partition's stats counter before this batch.
    pub base: PartitionStats,
    /// The stats key's `mod_revision` as last seen (0 if absent). Compared in the commit, so a
    /// counter value is never computed from a stale base.
    pub stats_rev: i64,
    /// What to do with each queue entry.
    pub items: Vec<Item>,
    /// Index entries to write.
    pub index: IndexUpdates,
    /// Profiles the records name that are not known to be stored (a JSON message's new
    /// profile): written in the same transaction as the first record that names them.
    pub profiles: Vec<(ProfileId, Arc<Profile>)>,
    /// True when an earlier attempt with these entries ended with an unknown outcome: entries
    /// found gone were then settled by that attempt (and count as this batch's effects).
    pub uncertain: bool,
}

impl SubBatch {
    /// Compares the sub-batch adds (owner fence, stats revision, per item). The failure branch
    /// reads one key per compare, so this also bounds it.
    pub(crate) fn compares(&self) -> usize {
        2 + self.items.iter().map(Item::compares).sum::<usize>()
    }

    /// Success-branch operations (items, index, profiles, stats counter).
    pub(crate) fn success_ops(&self) -> usize {
        self.items.iter().map(Item::ops).sum::<usize>() + self.index.ops() + self.profiles.len() + 1
    }

    /// Value bytes the sub-batch writes.
    pub(crate) fn bytes(&self) -> usize {
        self.items.iter().map(Item::bytes).sum::<usize>()
            + 512 * (self.index.ops() + 1)
            + self.profiles.iter().map(|(_, p)| p.encode().len()).sum::<usize>()
    }

    /// The partition's counter once this batch has landed.
    pub(crate) fn stats_after(&self) -> PartitionStats {
        let mut stats = self.base;
        for item in &self.items {
            match item {
                Item::Record { record, .. } => {
                    stats.records += 1;
                    let ts: Timestamp = record.timestamp;
                    stats.earliest = Some(stats.earliest.map_or(ts, |e| e.min(ts)));
                    stats.latest = Some(stats.latest.map_or(ts, |l| l.max(ts)));
                }
                Item::Duplicate { .. } => stats.duplicates += 1,
                Item::Dead { .. } => stats.dead_letters += 1,
            }
        }
        stats
    }

    /// Within the batches of one transaction, a second record with an idempotency key already
    /// in it is a duplicate (etcd also refuses a transaction that writes one key twice).
    fn mark_inner_duplicates(&mut self, seen: &mut HashSet<String>) {
        for item in self.items.iter_mut() {
            if let Item::Record {
                queue_key,
                revision,
                record,
            } = item
                && !seen.insert(record.idempotency_key.clone())
            {
                *item = Item::Duplicate {
                    queue_key: queue_key.clone(),
                    revision: *revision,
                };
            }
        }
    }
}

/// What a batch's commit settled, counted once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Effects {
    /// Records stored.
    pub records: usize,
    /// Duplicates absorbed.
    pub duplicates: usize,
    /// Messages dead-lettered.
    pub dead: usize,
    /// Entries an earlier attempt of ours (whose reply was lost) had already settled.
    pub landed_earlier: usize,
    /// Entries removed by someone else before we could settle them.
    pub vanished: usize,
}

/// How a commit ended.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Outcome {
    /// Everything landed.
    Committed {
        /// The partition's counter after this batch.
        stats: PartitionStats,
        /// The counter key's `mod_revision` after this batch.
        stats_rev: i64,
        /// What was settled.
        effects: Effects,
        /// The dead letters written (for their log lines).
        dead_letters: Vec<(String, String)>,
    },
    /// The fence refused the commit: this collector no longer owns the partition.
    FenceLost,
}

/// Why a commit did not end with an [`Outcome`].
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum CommitError {
    /// etcd refused in a way retrying does not fix (the batch is rebuilt and tried again).
    #[error("etcd: {0}")]
    Etcd(Arc<EtcdError>),
    /// The partition's counter cannot be read.
    #[error(transparent)]
    UnreadableStats(#[from] UnreadableStats),
    /// Shutdown came first; the outcome of the last attempt is unknown.
    #[error("shutting down")]
    Cancelled,
}

impl From<EtcdError> for CommitError {
    fn from(err: EtcdError) -> Self {
        match err {
            EtcdError::Cancelled => CommitError::Cancelled,
            other => CommitError::Etcd(Arc::new(other)),
        }
    }
}

/// Sends commits; shared by a collector's partition tasks (through the [`Combiner`]).
pub(crate) struct Committer {
    client: Client,
    keys: Keyspace,
    dedup: BucketedLease,
    retention: BucketedLease,
    shutdown: CancellationToken,
}

impl Committer {
    /// A committer writing below `keys`, with processed markers kept `dedup` long and records
    /// `retention` long. Retries stop at `shutdown`.
    pub(crate) fn new(
        client: Client,
        keys: Keyspace,
        dedup: std::time::Duration,
        retention: std::time::Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Committer {
            dedup: BucketedLease::new(client.clone(), dedup),
            retention: BucketedLease::new(client.clone(), retention),
            client,
            keys,
            shutdown,
        }
    }

    async fn leases(&self) -> Result<plan::Leases, EtcdError> {
        Ok(plan::Leases {
            dedup: self.dedup.current().await?,
            retention: self.retention.current().await?,
        })
    }

    /// Commits several partitions' batches in one transaction (group commit), each fenced by its
    /// own owner key, retrying while etcd is unavailable. Returns one outcome per batch, in
    /// order. A batch whose fence fails is dropped from the transaction and reported as
    /// [`Outcome::FenceLost`]; entries already settled are dropped; records already processed
    /// become duplicates; the rest is retried until it lands.
    pub(crate) async fn commit_many(&self, subs: &mut [SubBatch]) -> Result<Vec<Outcome>, CommitError> {
        let mut seen = HashSet::new();
        for sub in subs.iter_mut() {
            sub.mark_inner_duplicates(&mut seen);
        }
        let mut outcomes: Vec<Option<Outcome>> = vec![None; subs.len()];
        let mut effects = vec![Effects::default(); subs.len()];
        let mut backoff = Backoff::new(Policy::FAST, "collector commit");
        loop {
            let live: Vec<usize> = (0..subs.len()).filter(|i| outcomes[*i].is_none()).collect();
            if live.is_empty() {
                return Ok(outcomes
                    .into_iter()
                    .map(|o| o.unwrap_or(Outcome::FenceLost))
                    .collect());
            }
            let leases = match self.leases().await {
                Ok(leases) => leases,
                Err(EtcdError::Client(err)) if is_retryable(&err) => {
                    backoff
                        .retry_after(&err, &self.shutdown)
                        .await
                        .map_err(|_| CommitError::Cancelled)?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let plan::Plan { txn, reads } = plan::build(&self.keys, subs, &live, leases);
            let answer = match txn.build_split()?.send(&mut self.client.clone()).await {
                Ok(answer) => answer,
                Err(err) if is_lease_not_found(&err) => {
                    // A bucket lease expired or was revoked: grant new ones and retry.
                    self.dedup.invalidate(leases.dedup);
                    self.retention.invalidate(leases.retention);
                    continue;
                }
                Err(err) if is_retryable(&err) => {
                    if is_indeterminate(&err) {
                        for &i in &live {
                            subs[i].uncertain = true;
                        }
                    }
                    backoff
                        .retry_after(&err, &self.shutdown)
                        .await
                        .map_err(|_| CommitError::Cancelled)?;
                    continue;
                }
                Err(err) => return Err(EtcdError::from(err).into()),
            };
            let resp = match answer {
                TxnAnswer::Applied(resp) => {
                    backoff.succeeded();
                    let revision = resp.header().map_or(0, |h| h.revision());
                    for &i in &live {
                        outcomes[i] = Some(committed(&subs[i], effects[i], revision));
                    }
                    continue;
                }
                TxnAnswer::Refused(Ok(reads)) => {
                    backoff.succeeded();
                    reads
                }
                // Refused for certain (nothing applied), but what failed is unread: try again.
                TxnAnswer::Refused(Err(err)) if is_retryable(&err) => {
                    backoff
                        .retry_after(&err, &self.shutdown)
                        .await
                        .map_err(|_| CommitError::Cancelled)?;
                    continue;
                }
                TxnAnswer::Refused(Err(err)) => return Err(EtcdError::from(err).into()),
            };
            let found = plan::found(resp);
            for (i, verdict) in reads.classify(&self.keys, subs, &found)? {
                match verdict {
                    plan::Verdict::FenceLost => outcomes[i] = Some(Outcome::FenceLost),
                    plan::Verdict::Retry(repair) => {
                        let dropped = repair.apply(&mut subs[i]);
                        let settled = dropped.records + dropped.duplicates + dropped.dead;
                        if subs[i].uncertain {
                            effects[i].records += dropped.records;
                            effects[i].duplicates += dropped.duplicates;
                            effects[i].dead += dropped.dead;
                            effects[i].landed_earlier += settled;
                        } else {
                            effects[i].vanished += settled;
                        }
                    }
                }
            }
        }
    }
}

/// The outcome of a batch that landed, with what earlier attempts had already settled.
fn committed(sub: &SubBatch, mut effects: Effects, stats_rev: i64) -> Outcome {
    let mut dead_letters = Vec::new();
    for item in &sub.items {
        match item {
            Item::Record { .. } => effects.records += 1,
            Item::Duplicate { .. } => effects.duplicates += 1,
            Item::Dead {
                queue_key, letter, ..
            } => {
                effects.dead += 1;
                dead_letters.push((queue_key.clone(), letter.reason.clone()));
            }
        }
    }
    Outcome::Committed {
        stats: sub.stats_after(),
        stats_rev,
        effects,
        dead_letters,
    }
}

/// A batch submitted to the [`Combiner`], with where to send its outcome.
struct Submission {
    sub: SubBatch,
    reply: tokio::sync::oneshot::Sender<Result<Outcome, CommitError>>,
}

/// Group commit: partition tasks submit their batches here, and whatever has queued up while
/// earlier transactions were in flight is merged into one transaction (within etcd's 128
/// operations and the request-size budget). Each partition still has at most one batch in
/// flight, so its order holds; the merge turns many small per-partition commits into few full
/// ones.
#[derive(Clone)]
pub(crate) struct Combiner {
    tx: tokio::sync::mpsc::UnboundedSender<Submission>,
}

/// Transactions the combiner keeps in flight at once.
const COMMITS_IN_FLIGHT: usize = 8;

impl Combiner {
    /// Starts the combiner over `committer`; it stops when every handle is dropped.
    pub(crate) fn start(committer: Arc<Committer>) -> Self {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(combine(committer, rx));
        Combiner { tx }
    }

    /// Commits `sub` (possibly together with other partitions' batches).
    pub(crate) async fn commit(&self, sub: SubBatch) -> Result<Outcome, CommitError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Submission { sub, reply })
            .map_err(|_| CommitError::Cancelled)?;
        rx.await.map_err(|_| CommitError::Cancelled)?
    }
}

/// Running totals of a transaction being assembled.
#[derive(Default)]
struct Budget {
    compares: usize,
    ops: usize,
    bytes: usize,
    partitions: HashSet<u32>,
}

impl Budget {
    /// Adds `sub` if it fits within etcd's limits and its partition is not in yet (a second
    /// batch of one partition would write its counter twice).
    fn admit(&mut self, sub: &SubBatch) -> bool {
        let fits = self.partitions.is_empty()
            || (self.compares + sub.compares() <= MAX_TXN_OPS
                && self.ops + sub.success_ops() <= MAX_TXN_OPS
                && self.bytes + sub.bytes() <= MAX_TXN_BYTES
                && !self.partitions.contains(&sub.partition));
        if fits {
            self.compares += sub.compares();
            self.ops += sub.success_ops();
            self.bytes += sub.bytes();
            self.partitions.insert(sub.partition);
        }
        fits
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
        let mut budget = Budget::default();
        budget.admit(&first.sub);
        let mut group = vec![first];
        while let Ok(next) = rx.try_recv() {
            if !budget.admit(&next.sub) {
                held = Some(next);
                break;
            }
            group.push(next);
        }
        let committer = committer.clone();
        tokio::spawn(async move {
            let (mut subs, replies): (Vec<SubBatch>, Vec<_>) =
                group.into_iter().map(|s| (s.sub, s.reply)).unzip();
            emit(events::GroupCommit {
                partitions: subs.len(),
            });
            let result = committer.commit_many(&mut subs).await;
            drop(permit);
            match result {
                Ok(outcomes) => {
                    for (reply, outcome) in replies.into_iter().zip(outcomes) {
                        let _ = reply.send(Ok(outcome));
                    }
                }
                Err(err) => {
                    for reply in replies {
                        let _ = reply.send(Err(err.clone()));
                    }
                }
            }
        });
    }
}
