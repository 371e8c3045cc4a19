//! The pure half of a commit: the transaction to send for some partition batches, and what
//! etcd's answer means when the transaction's compares fail. No I/O here: the caller
//! ([`super::Committer`]) sends the transaction and loops; everything that decides is here and
//! unit-tested without etcd.
//!
//! Per partition batch the transaction
//! - **compares** that the partition's owner key still carries the batch's lease (the fence), that
//!   the partition's stats counter is at the revision the batch's base was read at, that every
//!   queue entry is still there at the revision it was read at (so an entry a lost-reply attempt
//!   already settled is never settled again), and that each record holds its idempotency key's
//!   dedup marker: the marker the streamer wrote with the entry still has the entry's revision
//!   ([`MarkerMode::Held`]), or, for a producer that writes no markers, none exists yet
//!   ([`MarkerMode::Claim`]);
//! - **then** writes each record (data key, queue delete, and the marker when claiming), each dead
//!   letter (dead letter, queue delete), each duplicate (queue delete), new profiles, the index
//!   entries and the counter;
//! - **else** reads one key per compare, in the same order, so a failed attempt tells which
//!   compare failed. These reads are sent only when a compare fails, as a read-only transaction
//!   of their own ([`BoundedTxn::build_split`]): a commit that succeeds does not carry them.

use std::collections::HashSet;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, TxnOp, TxnOpResponse, TxnResponse};
use telemetry_shared::{Keyspace, etcd::BoundedTxn, model::PartitionStats};

use super::{Item, SubBatch};
use crate::validate::MarkerMode;

/// The bucket leases a commit attaches keys to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leases {
    /// Processed markers live for `DEDUP_TTL`.
    pub dedup: i64,
    /// Telemetry records live for `RETENTION`.
    pub retention: i64,
}

/// One failure-branch read, reduced to what classification needs (`None`: the key is absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Found {
    /// The value (empty for keys-only reads).
    pub value: Vec<u8>,
    /// The key's lease.
    pub lease: i64,
    /// The key's last write.
    pub mod_revision: i64,
}

/// What a failure-branch read is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    Owner { sub: usize },
    Stats { sub: usize },
    Entry { sub: usize, item: usize },
    Marker { sub: usize, item: usize },
}

/// What each failure-branch read of a transaction is about, in order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Reads(Vec<Read>);

/// A transaction and the meaning of its failure-branch reads.
pub(crate) struct Plan {
    /// The transaction to send.
    pub txn: BoundedTxn,
    /// How to read its failure branch.
    pub reads: Reads,
}

/// Builds the transaction for the batches `live` of `subs`.
pub(crate) fn build(keys: &Keyspace, subs: &[SubBatch], live: &[usize], leases: Leases) -> Plan {
    let mut builder = Builder {
        keys,
        leases,
        txn: BoundedTxn::new(),
        reads: Vec::new(),
        shared_keys: HashSet::new(),
    };
    for &i in live {
        builder.batch(i, &subs[i]);
    }
    Plan {
        txn: builder.txn,
        reads: Reads(builder.reads),
    }
}

/// A transaction being assembled, with the meaning of each failure-branch read.
struct Builder<'a> {
    keys: &'a Keyspace,
    leases: Leases,
    txn: BoundedTxn,
    reads: Vec<Read>,
    /// Index and profile keys already written: several partitions' records can need the same
    /// one (a host's GPUs hash to several partitions), and etcd refuses a transaction that
    /// writes a key twice.
    shared_keys: HashSet<String>,
}

impl Builder<'_> {
    /// Compares `cmp` and reads `key` (keys only, unless `full`) if it fails.
    fn guard(&mut self, cmp: Compare, key: &str, full: bool, read: Read) {
        self.txn.compare(cmp);
        let options = (!full).then(|| GetOptions::new().with_keys_only());
        self.txn.otherwise(TxnOp::get(key, options));
        self.reads.push(read);
    }

    /// Puts `key` unless an earlier batch of this transaction did.
    fn put_shared(&mut self, key: String, value: Vec<u8>) {
        if self.shared_keys.insert(key.clone()) {
            self.txn.then(TxnOp::put(key, value, None));
        }
    }

    fn batch(&mut self, i: usize, sub: &SubBatch) {
        let owner = self.keys.owner(sub.partition);
        let fence = Compare::lease(owner.as_str(), CompareOp::Equal, sub.lease);
        self.guard(fence, &owner, true, Read::Owner { sub: i });
        let stats = self.keys.partition_stats(sub.partition);
        let base = Compare::mod_revision(stats.as_str(), CompareOp::Equal, sub.stats_rev);
        self.guard(base, &stats, true, Read::Stats { sub: i });
        for (n, item) in sub.items.iter().enumerate() {
            self.item(i, n, item);
        }
        for (id, profile) in &sub.profiles {
            self.put_shared(self.keys.profile(*id), profile.encode());
        }
        for gpu in &sub.index.gpus {
            self.put_shared(
                self.keys.gpu_index(&gpu.uuid),
                serde_json::to_vec(gpu).unwrap_or_default(),
            );
        }
        for host in &sub.index.hosts {
            self.put_shared(self.keys.host_index(host), host.as_bytes().to_vec());
        }
        let counter = serde_json::to_vec(&sub.stats_after()).unwrap_or_default();
        self.txn.then(TxnOp::put(stats, counter, None));
    }

    fn item(&mut self, i: usize, n: usize, item: &Item) {
        let queue_key = item.queue_key();
        let entry = Compare::mod_revision(queue_key, CompareOp::Equal, item.revision());
        self.guard(entry, queue_key, false, Read::Entry { sub: i, item: n });
        match item {
            Item::Record { record, revision, .. } => {
                // A CSV row's entry is the only one of its key (its stream's checkpoint saw to
                // that): the entry compare above settles it once, and it has no marker.
                let marker = (record.marker != MarkerMode::Fenced)
                    .then(|| self.keys.dedup_marker(&record.idempotency_key));
                if let Some(marker) = &marker {
                    let held = match record.marker {
                        MarkerMode::Held => {
                            Compare::mod_revision(marker.as_str(), CompareOp::Equal, *revision)
                        }
                        _ => Compare::create_revision(marker.as_str(), CompareOp::Equal, 0),
                    };
                    self.guard(held, marker, false, Read::Marker { sub: i, item: n });
                }
                let retention = PutOptions::new().with_lease(self.leases.retention);
                self.txn.then(TxnOp::put(
                    record.data_key.as_str(),
                    record.encoded.clone(),
                    Some(retention),
                ));
                if let Some(marker) = marker
                    && record.marker == MarkerMode::Claim
                {
                    let dedup = PutOptions::new().with_lease(self.leases.dedup);
                    self.txn.then(TxnOp::put(marker, Vec::new(), Some(dedup)));
                }
            }
            Item::Dead { dead_key, letter, .. } => {
                let letter = serde_json::to_vec(letter).unwrap_or_default();
                self.txn.then(TxnOp::put(dead_key.as_str(), letter, None));
            }
            Item::Duplicate { .. } => {}
        }
        self.txn.then(TxnOp::delete(queue_key, None));
    }
}

/// The failure-branch reads of a response, in order.
pub(crate) fn found(resp: TxnResponse) -> Vec<Option<Found>> {
    resp.op_responses()
        .into_iter()
        .map(|op| match op {
            TxnOpResponse::Get(mut get) => get.take_kvs().into_iter().next().map(|kv| Found {
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
                value: kv.into_key_value().1,
            }),
            _ => None,
        })
        .collect()
}

/// What a batch's failed compares mean.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// The owner key no longer carries the batch's lease: the partition is not ours.
    FenceLost,
    /// Still ours: retry after applying this.
    Retry(Repair),
}

/// How to rebuild a batch whose compares failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct Repair {
    /// The counter as stored now, and its revision: the base of the retry.
    pub base: PartitionStats,
    /// The counter key's revision (0: absent).
    pub stats_rev: i64,
    /// Items whose queue entry is gone or was rewritten: already settled (by an earlier attempt
    /// of ours whose reply was lost, or by whoever removed it); they are dropped.
    pub gone: Vec<usize>,
    /// Records whose idempotency key another message already stored: absorbed as duplicates.
    pub duplicates: Vec<usize>,
    /// Records whose marker was found otherwise than expected: held by them after all (the
    /// entry's revision), or not there (expired, or never written).
    pub markers: Vec<(usize, MarkerMode)>,
}

/// A stats counter that is not readable: committing on a guessed base would corrupt it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the stats counter {key} is not readable ({reason}); refusing to overwrite it. Restore it, or delete it to restart the partition's counts at zero"
)]
pub(crate) struct UnreadableStats {
    /// The counter's key.
    pub key: String,
    /// Why it does not parse.
    pub reason: String,
}

/// Reads a stored stats counter (`None`: absent, which is a zero counter).
pub(crate) fn parse_stats(
    key: &str,
    found: Option<&Found>,
) -> Result<(PartitionStats, i64), UnreadableStats> {
    match found {
        None => Ok((PartitionStats::default(), 0)),
        Some(f) => serde_json::from_slice(&f.value)
            .map(|stats| (stats, f.mod_revision))
            .map_err(|e| UnreadableStats {
                key: key.to_string(),
                reason: e.to_string(),
            }),
    }
}

impl Reads {
    /// Classifies a failed attempt from its failure-branch reads (see [`found`]).
    pub(crate) fn classify(
        &self,
        keys: &Keyspace,
        subs: &[SubBatch],
        found: &[Option<Found>],
    ) -> Result<Vec<(usize, Verdict)>, UnreadableStats> {
        let mut repairs: Vec<(usize, Repair, bool)> = Vec::new();
        for (read, found) in self.0.iter().zip(found) {
            match *read {
                Read::Owner { sub } => {
                    let ours = found.as_ref().is_some_and(|f| f.lease == subs[sub].lease);
                    repairs.push((sub, Repair::default(), ours));
                }
                Read::Stats { sub } => {
                    let key = keys.partition_stats(subs[sub].partition);
                    let (base, rev) = parse_stats(&key, found.as_ref())?;
                    if let Some((_, repair, _)) = repairs.last_mut() {
                        repair.base = base;
                        repair.stats_rev = rev;
                    }
                }
                Read::Entry { sub, item } => {
                    let expected = subs[sub].items[item].revision();
                    let still_there = found.as_ref().is_some_and(|f| f.mod_revision == expected);
                    if !still_there && let Some((_, repair, _)) = repairs.last_mut() {
                        repair.gone.push(item);
                    }
                }
                Read::Marker { sub, item } => {
                    let Some((_, repair, _)) = repairs.last_mut() else {
                        continue;
                    };
                    if repair.gone.contains(&item) {
                        continue;
                    }
                    let entry_revision = subs[sub].items[item].revision();
                    match found {
                        Some(f) if f.mod_revision == entry_revision => {
                            repair.markers.push((item, MarkerMode::Held))
                        }
                        Some(_) => repair.duplicates.push(item),
                        None => repair.markers.push((item, MarkerMode::Claim)),
                    }
                }
            }
        }
        Ok(repairs
            .into_iter()
            .map(|(sub, repair, ours)| {
                (
                    sub,
                    if ours {
                        Verdict::Retry(repair)
                    } else {
                        Verdict::FenceLost
                    },
                )
            })
            .collect())
    }
}

/// What [`Repair::apply`] took out of a batch, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Dropped {
    /// Records whose entries were gone.
    pub records: usize,
    /// Duplicates whose entries were gone.
    pub duplicates: usize,
    /// Dead letters whose entries were gone.
    pub dead: usize,
}

impl Repair {
    /// Rebuilds `sub` for the retry: new base, gone items out, duplicates rewritten. Returns what
    /// was dropped.
    pub(crate) fn apply(&self, sub: &mut SubBatch) -> Dropped {
        sub.base = self.base;
        sub.stats_rev = self.stats_rev;
        let mut dropped = Dropped::default();
        let items = std::mem::take(&mut sub.items);
        for (n, item) in items.into_iter().enumerate() {
            if self.gone.contains(&n) {
                match item {
                    Item::Record { .. } => dropped.records += 1,
                    Item::Duplicate { .. } => dropped.duplicates += 1,
                    Item::Dead { .. } => dropped.dead += 1,
                }
                continue;
            }
            let item = match item {
                Item::Record {
                    queue_key, revision, ..
                } if self.duplicates.contains(&n) => Item::Duplicate { queue_key, revision },
                Item::Record {
                    queue_key,
                    revision,
                    mut record,
                } => {
                    if let Some((_, mode)) = self.markers.iter().find(|(i, _)| *i == n) {
                        record.marker = *mode;
                    }
                    Item::Record {
                        queue_key,
                        revision,
                        record,
                    }
                }
                other => other,
            };
            sub.items.push(item);
        }
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::tests::{dead_item, record_item, sub_batch};
    use telemetry_shared::etcd::MAX_TXN_OPS;

    fn keys() -> Keyspace {
        Keyspace::new("/t")
    }

    const LEASES: Leases = Leases {
        dedup: 1,
        retention: 2,
    };

    #[test]
    fn a_batch_compares_every_entry_and_marker_within_the_limits() {
        let sub = sub_batch(
            3,
            vec![record_item("a", 10), dead_item("b", 11), record_item("c", 12)],
        );
        let plan = build(&keys(), &[sub], &[0], LEASES);
        // owner + stats + 3 entries + 2 markers.
        assert_eq!(plan.reads.0.len(), 7);
        // Claimed records (the test data is JSON): data + marker + delete; the dead letter:
        // letter + delete; the counter.
        assert_eq!(plan.txn.ops(), 9);
        assert!(plan.txn.build().is_ok());
    }

    #[test]
    fn held_markers_that_turn_out_absent_are_claimed_within_the_limit() {
        // As many held records as the budget admits (a scraped sample holds its marker).
        let held = |name: &str, revision| match record_item(name, revision) {
            Item::Record {
                queue_key,
                revision,
                mut record,
            } => {
                record.marker = MarkerMode::Held;
                Item::Record {
                    queue_key,
                    revision,
                    record,
                }
            }
            other => other,
        };
        let mut items = Vec::new();
        let mut sub = sub_batch(1, vec![]);
        while sub.success_ops() + 3 <= MAX_TXN_OPS {
            items.push(held(&format!("m{}", items.len()), 10 + items.len() as i64));
            sub.items = items.clone();
        }
        assert!(
            build(&keys(), std::slice::from_ref(&sub), &[0], LEASES)
                .txn
                .build()
                .is_ok()
        );
        // Every marker expired meanwhile: the retry claims them all, and still fits.
        let repair = Repair {
            markers: (0..sub.items.len()).map(|i| (i, MarkerMode::Claim)).collect(),
            ..Repair::default()
        };
        repair.apply(&mut sub);
        let plan = build(&keys(), &[sub], &[0], LEASES);
        assert!(plan.txn.ops() <= MAX_TXN_OPS, "{}", plan.txn.ops());
        assert!(plan.txn.build().is_ok());
    }

    #[test]
    fn a_lost_fence_is_told_apart_from_a_stale_base() {
        let subs = vec![
            sub_batch(1, vec![record_item("a", 10)]),
            sub_batch(2, vec![record_item("b", 20)]),
        ];
        let plan = build(&keys(), &subs, &[0, 1], LEASES);
        let stats = serde_json::to_vec(&PartitionStats {
            records: 7,
            ..Default::default()
        })
        .expect("json");
        let found = vec![
            // sub 0: owner moved on.
            Some(Found {
                lease: 99,
                ..Default::default()
            }),
            None,
            Some(Found {
                mod_revision: 10,
                ..Default::default()
            }),
            None,
            // sub 1: ours, but the counter moved (an earlier attempt landed).
            Some(Found {
                lease: subs[1].lease,
                ..Default::default()
            }),
            Some(Found {
                value: stats,
                mod_revision: 30,
                ..Default::default()
            }),
            None,
            Some(Found::default()),
        ];
        let verdicts = plan.reads.classify(&keys(), &subs, &found).expect("readable");
        assert_eq!(verdicts[0], (0, Verdict::FenceLost));
        let (1, Verdict::Retry(repair)) = &verdicts[1] else {
            panic!("{verdicts:?}");
        };
        assert_eq!((repair.base.records, repair.stats_rev), (7, 30));
        // The entry is gone: the earlier attempt settled it; its marker says nothing more.
        assert_eq!(
            (repair.gone.clone(), repair.duplicates.clone()),
            (vec![0], vec![])
        );
        assert!(repair.markers.is_empty());
    }

    #[test]
    fn a_retry_after_a_lost_reply_settles_nothing_twice() {
        // The earlier attempt landed: every entry is gone, the counter moved.
        let mut sub = sub_batch(
            1,
            vec![record_item("a", 10), dead_item("b", 11), record_item("c", 12)],
        );
        let repair = Repair {
            base: PartitionStats {
                records: 2,
                dead_letters: 1,
                ..Default::default()
            },
            stats_rev: 40,
            gone: vec![0, 1, 2],
            duplicates: vec![],
            markers: vec![],
        };
        let dropped = repair.apply(&mut sub);
        assert_eq!(
            dropped,
            Dropped {
                records: 2,
                duplicates: 0,
                dead: 1
            }
        );
        assert!(sub.items.is_empty());
        // The retry writes the stored counter unchanged: nothing counted a second time.
        assert_eq!(sub.stats_after(), repair.base);
    }

    #[test]
    fn a_record_whose_key_was_stored_by_another_message_becomes_a_duplicate() {
        let mut sub = sub_batch(1, vec![record_item("a", 10), record_item("b", 11)]);
        let repair = Repair {
            duplicates: vec![1],
            ..Default::default()
        };
        repair.apply(&mut sub);
        assert!(matches!(sub.items[1], Item::Duplicate { revision: 11, .. }));
        assert_eq!(sub.stats_after().duplicates, 1);
    }

    #[test]
    fn an_unreadable_counter_is_refused_not_reset() {
        let found = Found {
            value: b"not json".to_vec(),
            ..Default::default()
        };
        let err = parse_stats("/t/stats/partitions/01", Some(&found)).expect_err("refused");
        assert!(err.to_string().contains("/t/stats/partitions/01"), "{err}");
        assert_eq!(parse_stats("k", None), Ok((PartitionStats::default(), 0)));
    }
}
