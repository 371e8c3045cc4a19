//! One owned queue partition: loaded, fed by its watch, and committed in key (ULID) order, so
//! one GPU's records are written in order, until it is released, fenced out, or the session is
//! lost. The decisions live in [`crate::batch`] (what goes into a batch) and [`crate::commit`]
//! (the transaction); this is the loop that waits.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Instant,
};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace,
    etcd::EtcdError,
    model::PartitionStats,
    observe::emit,
    profiles::ProfileCache,
    record::{Profile, ProfileBook, ProfileId},
    retry::{Backoff, Policy},
};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_util::sync::CancellationToken;

use crate::{
    batch::{self, Known, Pending, Transform},
    commit::{Combiner, CommitError, IndexUpdates, Outcome, SubBatch, UnreadableStats, parse_stats},
    config::Columns,
    events,
    feed::{self, QueueEvent},
    session::Liveness,
};

/// Why a partition task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Asked to stop (rebalance or shutdown); the in-flight batch was finished.
    Released,
    /// The fence refused a commit: someone else owns the partition now.
    FenceLost,
    /// The session was lost.
    SessionLost,
}

/// What a partition task needs from its collector.
pub(crate) struct PartitionContext {
    /// etcd client.
    pub client: Client,
    /// Key layout.
    pub keys: Keyspace,
    /// The group committer.
    pub combiner: Combiner,
    /// Which fields identify GPUs.
    pub columns: Columns,
    /// Messages per transaction.
    pub batch_size: usize,
    /// This collector's id (recorded in dead letters).
    pub collector_id: String,
    /// The process's counters.
    pub counters: Arc<crate::Counters>,
    /// Profiles read or written so far (lean entries name them).
    pub profiles: ProfileCache,
    /// Per partition: Unix ms of its oldest pending message (0 = none), for the lag gauge.
    pub oldest: Arc<[AtomicI64]>,
    /// Partitions whose task has loaded its state and follows its feed (readiness).
    pub loaded: std::sync::Mutex<std::collections::BTreeSet<u32>>,
}

impl PartitionContext {
    fn set_loaded(&self, partition: u32, loaded: bool) {
        let mut set = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if loaded {
            set.insert(partition);
        } else {
            set.remove(&partition);
        }
    }

    /// The partitions of `wanted` not loaded yet.
    pub(crate) fn not_loaded(&self, wanted: &std::collections::BTreeSet<u32>) -> Vec<u32> {
        let set = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        wanted.difference(&set).copied().collect()
    }
}

/// Aborts a task when dropped (the feed ends with its partition task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct State {
    pending: BTreeMap<String, Pending>,
    range_rev: i64,
    needs_resync: bool,
    stats: PartitionStats,
    stats_rev: i64,
    known: Known,
    /// Profiles for messages that arrive as JSON.
    book: ProfileBook,
    /// The last commit attempt ended without a known outcome.
    uncertain: bool,
}

/// Why loading a partition failed.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error(transparent)]
    Stats(#[from] UnreadableStats),
}

/// Runs the partition until released, fenced out, or the session is lost.
pub(crate) async fn run(
    ctx: Arc<PartitionContext>,
    partition: u32,
    lease: i64,
    liveness: Liveness,
    stop: CancellationToken,
) -> Exit {
    let exit = run_inner(&ctx, partition, lease, liveness, stop).await;
    ctx.set_loaded(partition, false);
    // No longer ours: its backlog is no longer this collector's lag.
    if let Some(slot) = ctx.oldest.get(partition as usize) {
        slot.store(0, Ordering::Relaxed);
    }
    exit
}

async fn run_inner(
    ctx: &PartitionContext,
    partition: u32,
    lease: i64,
    liveness: Liveness,
    stop: CancellationToken,
) -> Exit {
    let Some(mut state) = load_until_ready(ctx, partition, &stop).await else {
        return Exit::Released;
    };
    ctx.set_loaded(partition, true);
    emit(events::PartitionAcquired {
        partition,
        pending: state.pending.len(),
    });
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let _feed = AbortOnDrop(tokio::spawn(feed::feed(
        ctx.client.clone(),
        ctx.keys.queue_partition_prefix(partition),
        state.range_rev + 1,
        tx,
        stop.clone(),
    )));
    let mut backoff = Backoff::new(Policy::FAST, "partition commit");
    loop {
        if let Err(err) = catch_up(ctx, partition, &mut state, &mut events).await {
            if backoff.retry_after(&err, &stop).await.is_err() {
                return Exit::Released;
            }
            continue;
        }
        update_oldest(ctx, partition, &state);
        if stop.is_cancelled() {
            return Exit::Released;
        }
        if !liveness.is_alive() {
            return Exit::SessionLost;
        }
        if state.pending.is_empty() {
            tokio::select! {
                _ = stop.cancelled() => return Exit::Released,
                event = events.recv() => match event {
                    Some(event) => state.apply(event),
                    None => return Exit::Released,
                },
            }
            continue;
        }
        match commit_next(ctx, partition, lease, &mut state).await {
            Ok(None) => backoff.succeeded(),
            Ok(Some(exit)) => return exit,
            Err(err) => {
                emit(events::CommitFailed {
                    partition,
                    error: &err,
                    first: !backoff.is_failing(),
                });
                if backoff.retry_after(&err, &stop).await.is_err() {
                    return Exit::Released;
                }
            }
        }
    }
}

/// Loads the partition's counter and entries, retrying while etcd is unavailable or the
/// counter is unreadable (which is refused, never reset: an operator restores or deletes it).
/// `None` when stopped first.
async fn load_until_ready(ctx: &PartitionContext, partition: u32, stop: &CancellationToken) -> Option<State> {
    let mut backoff = Backoff::new(Policy::ETCD, "loading a partition");
    loop {
        match load(ctx, partition).await {
            Ok(state) => {
                backoff.succeeded();
                return Some(state);
            }
            Err(LoadError::Stats(err)) => {
                emit(events::StatsUnreadable {
                    error: &err,
                    first: !backoff.is_failing(),
                });
                backoff.failed(&err);
                backoff.wait(stop).await.ok()?;
            }
            Err(err) => backoff.retry_after(&err, stop).await.ok()?,
        }
    }
}

async fn load(ctx: &PartitionContext, partition: u32) -> Result<State, LoadError> {
    let key = ctx.keys.partition_stats(partition);
    let resp = telemetry_shared::etcd::kv(&ctx.client)
        .get(key.as_str(), None)
        .await
        .map_err(EtcdError::from)?;
    let found = resp.kvs().first().map(|kv| crate::commit::Found {
        value: kv.value().to_vec(),
        lease: kv.lease(),
        mod_revision: kv.mod_revision(),
    });
    let (stats, stats_rev) = parse_stats(&key, found.as_ref())?;
    let snapshot = feed::range(&ctx.client, &ctx.keys.queue_partition_prefix(partition)).await?;
    Ok(State {
        pending: snapshot.entries,
        range_rev: snapshot.revision,
        needs_resync: false,
        stats,
        stats_rev,
        known: Known::default(),
        book: ProfileBook::new(),
        uncertain: false,
    })
}

/// Applies what the feed has delivered, and ranges again if it lost history.
async fn catch_up(
    ctx: &PartitionContext,
    partition: u32,
    state: &mut State,
    events: &mut UnboundedReceiver<QueueEvent>,
) -> Result<(), EtcdError> {
    while let Ok(event) = events.try_recv() {
        state.apply(event);
    }
    if state.needs_resync {
        let snapshot = feed::range(&ctx.client, &ctx.keys.queue_partition_prefix(partition)).await?;
        state.pending = snapshot.entries;
        state.range_rev = snapshot.revision;
        state.needs_resync = false;
        emit(events::PartitionResynced { partition });
    }
    Ok(())
}

impl State {
    fn apply(&mut self, event: QueueEvent) {
        match event {
            // Entries written at or before our range are already known (or already settled).
            QueueEvent::Put { key, entry } if entry.revision > self.range_rev => {
                self.pending.insert(key, entry);
            }
            QueueEvent::Put { .. } => {}
            QueueEvent::Resync => self.needs_resync = true,
        }
    }

    /// Forgets entries settled at the revision they were read at (an entry rewritten since
    /// stays pending, as its new version).
    fn settled(&mut self, items: &[(String, i64)]) {
        for (key, revision) in items {
            if self.pending.get(key).is_some_and(|p| p.revision == *revision) {
                self.pending.remove(key);
            }
        }
    }
}

/// Commits the next batch. `Ok(Some(exit))` when the partition must be given up.
async fn commit_next(
    ctx: &PartitionContext,
    partition: u32,
    lease: i64,
    state: &mut State,
) -> Result<Option<Exit>, CommitError> {
    // The profiles the next batch's lean entries name (written by their producer with them).
    let heads = state.pending.values().take(ctx.batch_size);
    ctx.profiles
        .load(
            &ctx.client,
            &ctx.keys,
            heads.filter_map(|p| ProfileCache::needs(&p.value)),
        )
        .await?;
    let transform = Transform {
        keys: &ctx.keys,
        columns: &ctx.columns,
        collector_id: &ctx.collector_id,
        batch_size: ctx.batch_size,
        profiles: &ctx.profiles,
    };
    let batch = batch::select(
        &state.pending,
        &state.known,
        &transform,
        &mut state.book,
        Instant::now(),
    );
    let submitted: Vec<(String, i64)> = batch
        .items
        .iter()
        .map(|i| (i.queue_key().to_string(), i.revision()))
        .collect();
    let (index, profiles) = (batch.index.clone(), batch.profiles.clone());
    let sub = SubBatch {
        partition,
        lease,
        base: state.stats,
        stats_rev: state.stats_rev,
        items: batch.items,
        index: batch.index,
        profiles: batch.profiles,
        uncertain: state.uncertain,
    };
    let started = Instant::now();
    let outcome = ctx.combiner.commit(sub).await;
    // Errors that reach here were not applied, except an attempt cut short by shutdown.
    state.uncertain = matches!(outcome, Err(CommitError::Cancelled));
    Ok(landed(
        ctx,
        partition,
        state,
        outcome?,
        Landed {
            submitted,
            index,
            profiles,
            started,
        },
    ))
}

/// What a batch carried, for bookkeeping once it is settled.
struct Landed {
    submitted: Vec<(String, i64)>,
    index: IndexUpdates,
    profiles: Vec<(ProfileId, Arc<Profile>)>,
    started: Instant,
}

/// Updates the partition's state after a commit; `Some(exit)` when the partition is lost.
fn landed(
    ctx: &PartitionContext,
    partition: u32,
    state: &mut State,
    outcome: Outcome,
    batch: Landed,
) -> Option<Exit> {
    match outcome {
        Outcome::Committed {
            stats,
            stats_rev,
            effects,
            dead_letters,
        } => {
            state.stats = stats;
            state.stats_rev = stats_rev;
            state.settled(&batch.submitted);
            state.known.landed(batch.index, Instant::now());
            for (id, profile) in batch.profiles {
                ctx.profiles.insert(id, profile);
            }
            ctx.counters.add(&effects);
            emit(events::BatchCommitted {
                partition,
                effects,
                dead_letters: &dead_letters,
                elapsed: batch.started.elapsed(),
            });
            None
        }
        Outcome::FenceLost => {
            ctx.counters.fence_refusals.fetch_add(1, Ordering::Relaxed);
            emit(events::FenceRefused { partition });
            Some(Exit::FenceLost)
        }
    }
}

fn update_oldest(ctx: &PartitionContext, partition: u32, state: &State) {
    let oldest = state
        .pending
        .keys()
        .next()
        .and_then(|k| k.rsplit('/').next())
        .and_then(|id| id.parse::<ulid::Ulid>().ok())
        .map_or(0, |u| i64::try_from(u.timestamp_ms()).unwrap_or(0));
    if let Some(slot) = ctx.oldest.get(partition as usize) {
        slot.store(oldest, Ordering::Relaxed);
    }
}
