//! The checkpoint: where the export is, and the fenced transaction that moves it.
//!
//! The position is a revision and, within it, a data key: records are exported in revision
//! order and in key order within a revision (one revision can hold several records of one
//! series, which must go in different requests, so a position can fall inside a revision).
//! Everything at or before the position has landed, been rejected, or is known to have expired.
//!
//! A checkpoint advance is one transaction that compares the owner key's lease (only the active
//! exporter moves it) and the checkpoint's own `mod_revision` (nobody moved it since it was
//! read), and puts the new checkpoint with the entries of the records it rejects, evicting the
//! oldest entries beyond `REJECTED_KEEP`. It is written only after the TSDB acknowledged
//! everything it passes. Building it ([`plan`]) and reading its answer ([`classify`]) are pure.

use std::collections::BTreeSet;

use etcd_client::{Compare, CompareOp, TxnOp, TxnOpResponse, TxnResponse};
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::{BoundedTxn, EtcdError},
    model::{ExportCheckpoint, ExportGap, MAX_EXPORT_GAPS, Member, RejectedRecord},
};

use crate::{batch::Mark, convert::Item};

/// Is a record (`revision`, `key`) after the checkpoint, i.e. still to be exported?
pub(crate) fn is_after(checkpoint: &ExportCheckpoint, revision: i64, key: &str) -> bool {
    revision > checkpoint.revision
        || (revision == checkpoint.revision && checkpoint.key.as_deref().is_some_and(|k| key > k))
}

/// The first revision a follower of the checkpoint must read (its own revision again when the
/// position is inside it).
pub(crate) fn first_revision(checkpoint: &ExportCheckpoint) -> i64 {
    if checkpoint.key.is_some() {
        checkpoint.revision.max(1)
    } else {
        checkpoint.revision + 1
    }
}

/// Records the checkpoint accounts for: exported, rejected or expired. With the stats counters
/// (records ever written) this tells how many expired unseen (`source.rs`).
pub(crate) fn accounted(checkpoint: &ExportCheckpoint) -> u64 {
    checkpoint.records + checkpoint.rejected + checkpoint.expired
}

/// One checkpoint write: the new checkpoint and the rejected records it adds.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Advance {
    /// The checkpoint to write.
    pub checkpoint: ExportCheckpoint,
    /// (etcd key, entry) of each record rejected in this step.
    pub rejected: Vec<(String, RejectedRecord)>,
}

/// Most rejected records one checkpoint transaction carries (a put each, and at most a delete
/// each to evict, within etcd's 128 operations).
pub(crate) const MAX_REJECTED_PER_TXN: usize = 60;

/// The checkpoint writes that pass `items` (all landed except `rejected`, by index, with why),
/// then `marks`: one write, or more when many records were rejected. `landed_samples` is the
/// samples that landed.
pub(crate) fn advances(
    old: &ExportCheckpoint,
    items: &[Item],
    rejected: &[(usize, String)],
    marks: &[Mark],
    context: &AdvanceContext<'_>,
) -> Vec<Advance> {
    let mut out = Vec::new();
    let mut current = old.clone();
    let mut step: Vec<(String, RejectedRecord)> = Vec::new();
    let mut refused = rejected.iter().peekable();
    for (i, item) in items.iter().enumerate() {
        if refused.peek().is_some_and(|(r, _)| *r == i) {
            let Some((_, reason)) = refused.next() else { break };
            current.rejected += 1;
            step.push((
                context
                    .keys
                    .exporter_rejected(context.name, item.revision, &item.key),
                RejectedRecord {
                    key: item.key.clone(),
                    revision: item.revision,
                    reason: reason.clone(),
                    rejected_at: context.now,
                    exporter: context.exporter.to_string(),
                },
            ));
        } else {
            current.records += 1;
            current.samples += item.sample_count() as u64;
        }
        current.revision = item.revision;
        current.key = Some(item.key.clone());
        if item.time.is_some() {
            current.last_record_time = item.time;
        }
        let last = i + 1 == items.len();
        if step.len() == MAX_REJECTED_PER_TXN && !last {
            out.push(finish(&current, std::mem::take(&mut step), context));
        }
    }
    for mark in marks {
        if mark.revision >= current.revision {
            current.revision = mark.revision;
            current.key = None;
        }
        if let Some(gap) = &mark.gap {
            current.expired += gap.expired.unwrap_or(0);
            current.gaps.push(gap.clone());
            let extra = current.gaps.len().saturating_sub(MAX_EXPORT_GAPS);
            current.gaps.drain(..extra);
        }
    }
    out.push(finish(&current, step, context));
    out
}

/// What an advance is written for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdvanceContext<'a> {
    pub keys: &'a Keyspace,
    pub name: &'a str,
    pub exporter: &'a str,
    pub now: Timestamp,
}

fn finish(
    current: &ExportCheckpoint,
    rejected: Vec<(String, RejectedRecord)>,
    context: &AdvanceContext<'_>,
) -> Advance {
    let mut checkpoint = current.clone();
    checkpoint.updated_at = Some(context.now);
    checkpoint.exporter = context.exporter.to_string();
    Advance { checkpoint, rejected }
}

/// The transaction of one advance. `listed` holds the rejected entries already stored (oldest
/// first); the oldest beyond `keep` are deleted, and `listed` is updated as if it landed.
pub(crate) fn plan(
    keys: &Keyspace,
    name: &str,
    lease: i64,
    expected_mod_revision: i64,
    advance: &Advance,
    listed: &mut BTreeSet<String>,
    keep: usize,
) -> Result<etcd_client::Txn, EtcdError> {
    let owner = keys.exporter_owner(name);
    let checkpoint = keys.exporter_checkpoint(name);
    let mut txn = BoundedTxn::new();
    txn.compare(Compare::lease(owner.as_str(), CompareOp::Equal, lease))
        .compare(Compare::mod_revision(
            checkpoint.as_str(),
            CompareOp::Equal,
            expected_mod_revision,
        ))
        .otherwise(TxnOp::get(owner.as_str(), None))
        .otherwise(TxnOp::get(checkpoint.as_str(), None));
    let value = serde_json::to_vec(&advance.checkpoint).unwrap_or_default();
    txn.then(TxnOp::put(checkpoint.as_str(), value, None));
    for (key, entry) in &advance.rejected {
        let value = serde_json::to_vec(entry).unwrap_or_default();
        txn.then(TxnOp::put(key.as_str(), value, None));
        listed.insert(key.clone());
    }
    while listed.len() > keep {
        let Some(oldest) = listed.pop_first() else { break };
        txn.then(TxnOp::delete(oldest.as_str(), None));
    }
    txn.build()
}

/// What an advance's answer says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Written {
    /// It landed; the checkpoint's new `mod_revision`.
    Landed(i64),
    /// The owner key no longer carries our lease: another exporter is active (its id, if any).
    Fenced(Option<String>),
    /// Still ours, but the checkpoint is not at the revision expected: moved by someone else,
    /// or by an earlier attempt of ours whose answer was lost (the stored one and its
    /// `mod_revision`, if readable).
    Moved(Option<(ExportCheckpoint, i64)>),
}

/// Reads an advance's answer; `lease` is ours.
pub(crate) fn classify(resp: &TxnResponse, lease: i64) -> Written {
    if resp.succeeded() {
        return Written::Landed(resp.header().map_or(0, |h| h.revision()));
    }
    let ops = resp.op_responses();
    let first_kv = |i: usize| match ops.get(i) {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().cloned(),
        _ => None,
    };
    match first_kv(0) {
        Some(kv) if kv.lease() == lease => Written::Moved(first_kv(1).and_then(|kv| {
            serde_json::from_slice::<ExportCheckpoint>(kv.value())
                .ok()
                .map(|cp| (cp, kv.mod_revision()))
        })),
        Some(kv) => Written::Fenced(serde_json::from_slice::<Member>(kv.value()).ok().map(|m| m.id)),
        None => Written::Fenced(None),
    }
}

/// A new gap (see [`ExportGap`]).
pub(crate) fn gap(
    checkpoint: &ExportCheckpoint,
    read_at: i64,
    written: Option<u64>,
    found: u64,
    first_found: Option<Timestamp>,
) -> Option<ExportGap> {
    let expired = written.and_then(|w| w.checked_sub(accounted(checkpoint) + found));
    if expired == Some(0) || (written.is_some() && expired.is_none()) {
        // Nothing lost; or more records exist than the counters ever counted (writers other
        // than the collector), and nothing can be said.
        return None;
    }
    Some(ExportGap {
        from_revision: checkpoint.revision,
        to_revision: read_at,
        expired,
        after: checkpoint.last_record_time,
        before: first_found.or_else(|| Some(Timestamp::now())),
        found_at: Timestamp::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::Converted;
    use telemetry_shared::exposition::Sample;

    fn item(revision: i64, key: &str, ok: bool) -> Item {
        Item {
            revision,
            key: key.into(),
            time: Some(Timestamp::now()),
            outcome: if ok {
                Ok(Converted {
                    samples: vec![Sample {
                        name: "m".into(),
                        labels: Vec::new(),
                        value: 1.0,
                        timestamp_ms: 1,
                    }],
                    series: vec![1],
                })
            } else {
                Err("bad".into())
            },
        }
    }

    fn context(keys: &Keyspace) -> AdvanceContext<'_> {
        AdvanceContext {
            keys,
            name: "e",
            exporter: "x-1",
            now: Timestamp::now(),
        }
    }

    #[test]
    fn positions_order_by_revision_then_key() {
        let cp = ExportCheckpoint {
            revision: 10,
            key: Some("/d/b".into()),
            ..Default::default()
        };
        assert!(!is_after(&cp, 9, "/d/z"));
        assert!(!is_after(&cp, 10, "/d/a"));
        assert!(!is_after(&cp, 10, "/d/b"));
        assert!(is_after(&cp, 10, "/d/c"));
        assert!(is_after(&cp, 11, "/d/a"));
        assert_eq!(first_revision(&cp), 10);
        let whole = ExportCheckpoint {
            revision: 10,
            key: None,
            ..Default::default()
        };
        assert!(!is_after(&whole, 10, "/d/z"));
        assert_eq!(first_revision(&whole), 11);
        assert_eq!(first_revision(&ExportCheckpoint::default()), 1);
    }

    #[test]
    fn an_advance_counts_what_landed_and_what_was_rejected() {
        let keys = Keyspace::new("/t");
        let items = vec![item(5, "a", true), item(5, "b", false), item(6, "c", true)];
        let rejected = vec![(1, "bad".to_string())];
        let old = ExportCheckpoint::default();
        let steps = advances(&old, &items, &rejected, &[], &context(&keys));
        assert_eq!(steps.len(), 1);
        let cp = &steps[0].checkpoint;
        assert_eq!(
            (
                cp.records,
                cp.samples,
                cp.rejected,
                cp.revision,
                cp.key.as_deref()
            ),
            (2, 2, 1, 6, Some("c"))
        );
        assert_eq!(steps[0].rejected.len(), 1);
        assert_eq!(steps[0].rejected[0].1.key, "b");
        assert_eq!(steps[0].rejected[0].1.reason, "bad");
    }

    #[test]
    fn many_rejections_are_written_in_steps_that_each_end_after_a_rejection() {
        let keys = Keyspace::new("/t");
        let items: Vec<Item> = (0..150).map(|i| item(7, &format!("k{i:03}"), false)).collect();
        let rejected: Vec<(usize, String)> = (0..150).map(|i| (i, "bad".to_string())).collect();
        let steps = advances(
            &ExportCheckpoint::default(),
            &items,
            &rejected,
            &[],
            &context(&keys),
        );
        assert_eq!(steps.len(), 3);
        assert_eq!(steps[0].rejected.len(), MAX_REJECTED_PER_TXN);
        assert_eq!(steps[0].checkpoint.key.as_deref(), Some("k059"));
        assert_eq!(steps[0].checkpoint.rejected, 60);
        assert_eq!(steps[2].checkpoint.rejected, 150);
        assert_eq!(steps[2].checkpoint.key.as_deref(), Some("k149"));
    }

    #[test]
    fn a_mark_passes_its_revision_and_records_its_gap() {
        let keys = Keyspace::new("/t");
        let gap = ExportGap {
            from_revision: 3,
            to_revision: 40,
            expired: Some(12),
            after: None,
            before: None,
            found_at: Timestamp::now(),
        };
        let marks = [Mark {
            revision: 40,
            gap: Some(gap.clone()),
        }];
        let steps = advances(
            &ExportCheckpoint::default(),
            &[item(30, "a", true)],
            &[],
            &marks,
            &context(&keys),
        );
        let cp = &steps[0].checkpoint;
        assert_eq!((cp.revision, cp.key.clone(), cp.expired), (40, None, 12));
        assert_eq!(cp.gaps, vec![gap]);
        assert_eq!(accounted(cp), 13);
    }

    #[test]
    fn the_transaction_is_fenced_and_keeps_the_rejected_list_bounded() {
        let keys = Keyspace::new("/t");
        let items = vec![item(5, "a", false), item(6, "b", false)];
        let rejected = vec![(0, "x".to_string()), (1, "y".to_string())];
        let steps = advances(
            &ExportCheckpoint::default(),
            &items,
            &rejected,
            &[],
            &context(&keys),
        );
        let mut listed: BTreeSet<String> = ["/t/exporters/e/rejected/0".to_string()].into();
        plan(&keys, "e", 42, 0, &steps[0], &mut listed, 2).expect("within limits");
        assert_eq!(listed.len(), 2, "the oldest was evicted");
        assert!(!listed.contains("/t/exporters/e/rejected/0"));
    }

    #[test]
    fn gaps_count_records_that_expired_unseen() {
        let cp = ExportCheckpoint {
            revision: 10,
            records: 100,
            rejected: 2,
            expired: 3,
            ..Default::default()
        };
        // 150 ever written; 105 accounted; 30 still there: 15 expired.
        let g = gap(&cp, 99, Some(150), 30, None).expect("a gap");
        assert_eq!((g.from_revision, g.to_revision, g.expired), (10, 99, Some(15)));
        assert_eq!(gap(&cp, 99, Some(135), 30, None), None, "nothing lost");
        assert_eq!(gap(&cp, 99, Some(100), 30, None), None, "counters behind");
        assert_eq!(gap(&cp, 99, None, 30, None).map(|g| g.expired), Some(None));
    }
}
