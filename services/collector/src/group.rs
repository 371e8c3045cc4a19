//! The consumer group: which collector owns which queue partition.
//!
//! Collectors register under `/collectors/members/` with their session lease. Every collector
//! computes the same assignment from the sorted member list (partition `p` goes to member
//! `p mod n`), so the split is fair (sizes differ by at most one) and converges without any
//! coordinator. A collector acquires a partition assigned to it once its owner key is free
//! (`create_revision == 0`, put with its lease) and releases a partition assigned elsewhere
//! after finishing the in-flight batch. A crashed collector's keys vanish with its lease, so
//! its partitions move after about one lease TTL; a collector that shuts down revokes its lease,
//! so they move at once.
//!
//! One watch on `/collectors/` (a shared `Follow`) follows membership and ownership; each owned
//! partition has its own watch (see `feed`). A watch that breaks is re-created from the last
//! complete revision; one that fell behind a compaction reloads what it follows.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use telemetry_shared::{
    Keyspace,
    etcd::EtcdError,
    health::Check,
    keys::QUEUE_PARTITIONS,
    observe::emit,
    watch::{ChangeKind, Follow, Update},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::{
    events,
    partition::{self, Exit, PartitionContext},
    session::Session,
};

/// Why the coordinator returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// Shutdown was requested; partitions were released.
    Shutdown,
    /// The session was lost; start a new one.
    SessionLost,
}

/// The partitions `me` should own among `members`.
pub(crate) fn assignment(members: &BTreeSet<String>, me: &str) -> BTreeSet<u32> {
    let sorted: Vec<&String> = members.iter().collect();
    if sorted.is_empty() {
        return BTreeSet::new();
    }
    (0..QUEUE_PARTITIONS)
        .filter(|p| sorted[*p as usize % sorted.len()] == me)
        .collect()
}

/// Bound on the coordinator's own RPCs (acquire, release, re-register).
const RPC_TIMEOUT: Duration = Duration::from_secs(2);

struct Owned {
    stop: CancellationToken,
    task: JoinHandle<Exit>,
}

struct Group<'a> {
    client: Client,
    keys: Keyspace,
    me: String,
    session: &'a Session,
    ctx: Arc<PartitionContext>,
    members: BTreeSet<String>,
    /// Partition → lease of its owner key.
    owners: HashMap<u32, i64>,
    owned: BTreeMap<u32, Owned>,
    /// Readiness check: the assigned partitions are loaded.
    partitions: Check,
}

/// Runs the group protocol for one session until shutdown or session loss.
pub(crate) async fn coordinate(
    client: &Client,
    keys: &Keyspace,
    me: &str,
    session: &Session,
    ctx: Arc<PartitionContext>,
    partitions: &Check,
    shutdown: &CancellationToken,
) -> Result<End, EtcdError> {
    let mut group = Group {
        partitions: partitions.clone(),
        client: client.clone(),
        keys: keys.clone(),
        me: me.to_string(),
        session,
        ctx,
        members: BTreeSet::new(),
        owners: HashMap::new(),
        owned: BTreeMap::new(),
    };
    let group_rev = group.load_membership().await?;
    let mut follow = Follow::new(client, keys.collectors_prefix(), group_rev + 1);
    let lost = session.lost();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result: Result<End, EtcdError> = async {
        loop {
            group.rebalance().await;
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(End::Shutdown),
                _ = lost.cancelled() => return Ok(End::SessionLost),
                _ = tick.tick() => {}
                update = follow.next(shutdown) => match update {
                    None => return Ok(End::Shutdown),
                    Some(Update::Changes { changes, .. }) => {
                        for change in &changes {
                            group.on_group_event(change.kind, &change.key_str(), change.lease);
                        }
                    }
                    Some(Update::Compacted { .. }) => {
                        tracing::warn!("membership watch fell behind a compaction; reloading");
                        let rev = group.load_membership().await?;
                        follow.resume_from(rev + 1);
                    }
                },
            }
        }
    }
    .await;
    // Always stop the partition tasks (finishing their in-flight commits), even when the loop
    // ended on an error: a task left running would keep committing under a dead session.
    group.release_all(matches!(result, Ok(End::Shutdown))).await;
    result
}

impl Group<'_> {
    /// Reads members and owners; returns the revision of the snapshot.
    async fn load_membership(&mut self) -> Result<i64, EtcdError> {
        let resp = self
            .client
            .clone()
            .get(
                self.keys.collectors_prefix(),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        self.members.clear();
        self.owners.clear();
        for kv in resp.kvs() {
            self.on_group_event(ChangeKind::Put, &String::from_utf8_lossy(kv.key()), kv.lease());
        }
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    fn on_group_event(&mut self, kind: ChangeKind, key: &str, lease: i64) {
        if let Some(id) = self.keys.parse_member(key) {
            match kind {
                ChangeKind::Put => self.members.insert(id.to_string()),
                ChangeKind::Delete => self.members.remove(id),
            };
        } else if let Some(p) = self.keys.parse_owner(key) {
            match kind {
                ChangeKind::Put => self.owners.insert(p, lease),
                ChangeKind::Delete => self.owners.remove(&p),
            };
        }
    }

    /// Brings ownership toward the assignment: reaps ended tasks, releases partitions that
    /// belong elsewhere, acquires free partitions that belong here.
    async fn rebalance(&mut self) {
        let finished: Vec<u32> = self
            .owned
            .iter()
            .filter(|(_, o)| o.task.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in finished {
            if let Some(owned) = self.owned.remove(&p) {
                let exit = owned.task.await.unwrap_or(Exit::Released);
                tracing::info!(partition = p, ?exit, "partition task ended");
            }
        }
        if !self.session.is_alive() {
            return;
        }
        let desired = assignment(&self.members, &self.me);
        self.report_readiness(&desired);
        let to_release: Vec<u32> = self
            .owned
            .keys()
            .filter(|p| !desired.contains(p))
            .copied()
            .collect();
        for p in to_release {
            self.release(p).await;
        }
        // Re-register if our registration vanished while the session lives (deleted by hand,
        // or by another process that used the same COLLECTOR_ID).
        if !self.members.contains(&self.me) {
            self.reregister().await;
        }
        for p in desired.iter().copied() {
            if self.owned.contains_key(&p) {
                continue;
            }
            match self.owners.get(&p) {
                // Ours but no task runs (an acquire whose reply was lost, or a task that ended):
                // adopt it.
                Some(lease) if *lease == self.session.lease => self.start_task(p),
                Some(_) => {}
                None => self.acquire(p).await,
            }
        }
        // Owner keys with our lease for partitions assigned elsewhere and not running here (a
        // release whose delete failed): free them, or the new assignee waits for ever.
        let stranded: Vec<u32> = self
            .owners
            .iter()
            .filter(|(p, lease)| {
                **lease == self.session.lease && !desired.contains(p) && !self.owned.contains_key(p)
            })
            .map(|(p, _)| *p)
            .collect();
        for p in stranded {
            self.free_owner_key(p).await;
        }
        emit(events::PartitionsOwned {
            count: self.owned.len(),
        });
    }

    /// Readiness: every partition assigned here is owned and loaded.
    fn report_readiness(&self, desired: &BTreeSet<u32>) {
        let missing = self.ctx.not_loaded(desired);
        if missing.is_empty() {
            self.partitions.pass(format!(
                "{} of {QUEUE_PARTITIONS} partitions owned and loaded",
                desired.len()
            ));
        } else {
            self.partitions.fail(format!(
                "{} of the {} partitions assigned here are not loaded yet (first: {}); a \
                 previous owner's lease may still hold them",
                missing.len(),
                desired.len(),
                missing[0]
            ));
        }
    }

    async fn acquire(&mut self, p: u32) {
        let key = self.keys.owner(p);
        let lease = self.session.lease;
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key.as_str(), CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(
                key.as_str(),
                self.me.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )]);
        // Bounded, so an etcd outage cannot hold the loop (and shutdown) for long; a lost reply
        // is repaired by the adoption in `rebalance` once the watch shows the key is ours.
        match tokio::time::timeout(RPC_TIMEOUT, self.client.clone().txn(txn)).await {
            Ok(Ok(resp)) if resp.succeeded() => {
                self.owners.insert(p, lease);
                self.start_task(p);
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => tracing::debug!(partition = p, error = %err, "acquire failed; will retry"),
            Err(_) => tracing::debug!(partition = p, "acquire timed out; will retry"),
        }
    }

    fn start_task(&mut self, p: u32) {
        let stop = CancellationToken::new();
        let task = tokio::spawn(partition::run(
            self.ctx.clone(),
            p,
            self.session.lease,
            self.session.liveness(),
            stop.clone(),
        ));
        self.owned.insert(p, Owned { stop, task });
    }

    async fn reregister(&mut self) {
        let member = telemetry_shared::model::Member {
            id: self.me.clone(),
            lease: self.session.lease,
            started_at: telemetry_shared::Timestamp::now(),
        };
        let mut client = self.client.clone();
        let put = client.put(
            self.keys.member(&self.me),
            serde_json::to_vec(&member).unwrap_or_default(),
            Some(PutOptions::new().with_lease(self.session.lease)),
        );
        match tokio::time::timeout(RPC_TIMEOUT, put).await {
            Ok(Ok(_)) => {
                tracing::warn!("our registration had vanished; registered again");
                self.members.insert(self.me.clone());
            }
            _ => tracing::debug!("re-registration failed; will retry"),
        }
    }

    /// Deletes a partition's owner key if it still carries our lease.
    async fn free_owner_key(&mut self, p: u32) {
        let key = self.keys.owner(p);
        let txn = Txn::new()
            .when(vec![Compare::lease(
                key.as_str(),
                CompareOp::Equal,
                self.session.lease,
            )])
            .and_then(vec![TxnOp::delete(key.as_str(), None)]);
        match tokio::time::timeout(RPC_TIMEOUT, self.client.clone().txn(txn)).await {
            Ok(Ok(_)) => {
                self.owners.remove(&p);
            }
            _ => tracing::warn!(partition = p, "could not free owner key; will retry"),
        }
    }

    /// Stops the partition's task (it finishes its in-flight batch) and frees the owner key.
    async fn release(&mut self, p: u32) {
        let Some(owned) = self.owned.remove(&p) else {
            return;
        };
        owned.stop.cancel();
        let _ = owned.task.await;
        self.free_owner_key(p).await;
        tracing::info!(partition = p, "partition released");
    }

    async fn release_all(&mut self, graceful: bool) {
        for owned in self.owned.values() {
            owned.stop.cancel();
        }
        let partitions: Vec<u32> = self.owned.keys().copied().collect();
        for p in partitions {
            if let Some(owned) = self.owned.remove(&p) {
                let _ = owned.task.await;
            }
        }
        if graceful {
            tracing::info!("all partitions stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_is_fair_total_and_disjoint() {
        for n in 1..=10 {
            let members: BTreeSet<String> = (0..n).map(|i| format!("c{i}")).collect();
            let mut all = BTreeSet::new();
            let sizes: Vec<usize> = members
                .iter()
                .map(|m| {
                    let mine = assignment(&members, m);
                    for p in &mine {
                        assert!(all.insert(*p), "partition {p} assigned twice");
                    }
                    mine.len()
                })
                .collect();
            assert_eq!(all.len() as u32, QUEUE_PARTITIONS);
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{sizes:?}");
        }
        assert!(assignment(&BTreeSet::new(), "x").is_empty());
    }
}
