//! One owned queue partition: the source of the collector.
//!
//! On acquisition the task reads the partition's stats counter and ranges over the partition
//! once (paged, at one revision); after that it learns of new entries only from the
//! partition's own watch (started just after the range), keeping the events newer than its
//! range. It never
//! polls the queue with ranges, which would re-scan deleted keys (tombstones) until etcd
//! compacts. Entries are committed in key (ULID) order, so one GPU's records are written in
//! order.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::{EtcdError, MAX_TXN_OPS, current_revision, is_retryable},
    model::{DeadLetter, GpuInfo, PartitionStats},
    watch::{ChangeKind, Follow, Update},
};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;

use crate::{
    Counters,
    commit::{Combiner, IndexUpdates, Item, Outcome, SubBatch},
    config::Columns,
    session::Liveness,
    validate::validate,
};

/// Aborts a task when dropped (the feeder ends with its partition task).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Follows one partition of the queue from revision `from` and forwards its changes. After a
/// compaction it asks for a resync and follows from the then current revision (the partition
/// task ranges again and keeps only events newer than that range).
async fn feed(
    client: Client,
    prefix: String,
    from: i64,
    tx: UnboundedSender<QueueEvent>,
    stop: CancellationToken,
) {
    let mut follow = Follow::new(&client, prefix, from);
    while let Some(update) = follow.next(&stop).await {
        match update {
            Update::Changes { changes, .. } => {
                for change in changes {
                    let key = change.key_str().into_owned();
                    let event = match change.kind {
                        ChangeKind::Put => QueueEvent::Put {
                            key,
                            value: change.value,
                            revision: change.mod_revision,
                        },
                        ChangeKind::Delete => QueueEvent::Delete { key },
                    };
                    if tx.send(event).is_err() {
                        return;
                    }
                }
            }
            Update::Compacted { compact_revision, .. } => {
                tracing::warn!(
                    compact_revision,
                    "partition watch fell behind a compaction; resyncing"
                );
                let now = current_revision(&client).await.unwrap_or(compact_revision);
                follow.resume_from(now.max(compact_revision) + 1);
                if tx.send(QueueEvent::Resync).is_err() {
                    return;
                }
            }
        }
    }
}

/// A change to the queue, from the partition's watch.
#[derive(Debug)]
pub enum QueueEvent {
    /// A queue entry was written at `revision`.
    Put {
        /// Its key.
        key: String,
        /// Its payload.
        value: Vec<u8>,
        /// The revision of the write.
        revision: i64,
    },
    /// A queue entry was removed.
    Delete {
        /// Its key.
        key: String,
    },
    /// The watch was interrupted past a compaction: range the partition again.
    Resync,
}

/// Why a partition task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop (rebalance or shutdown); the in-flight batch was finished.
    Released,
    /// The fence refused a commit: someone else owns the partition now.
    FenceLost,
    /// The session was lost.
    SessionLost,
}

/// What a partition task needs from its collector.
pub struct PartitionContext {
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
    /// Shared counters.
    pub counters: Arc<Counters>,
    /// Per partition: Unix ms of its oldest pending message (0 = none), for the lag gauge.
    pub oldest: Arc<[AtomicI64]>,
}

/// Most value bytes in one partition batch (the combiner merges batches up to 1 MiB).
const MAX_BATCH_BYTES: usize = 768 * 1024;

/// Most payload bytes kept in a dead letter; the rest is cut (and said so).
const MAX_DEAD_PAYLOAD: usize = 64 * 1024;

/// The id a dead letter is stored under: the queue key's message id when it is a ULID (the
/// layout's `/deadletter/{ULID}`), otherwise a digest of the whole queue key, so two malformed
/// keys can never share (and overwrite) one dead letter.
fn dead_letter_id(keys: &Keyspace, queue_key: &str) -> String {
    if let Some((_, id)) = keys.parse_queue_entry(queue_key)
        && id.parse::<ulid::Ulid>().is_ok()
    {
        return id.to_string();
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in queue_key.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("key-{hash:016x}")
}

/// The payload as text for a dead letter, cut to [`MAX_DEAD_PAYLOAD`] bytes.
fn capped_payload(payload: &[u8]) -> String {
    let cut = payload.len() > MAX_DEAD_PAYLOAD;
    let mut text = String::from_utf8_lossy(&payload[..payload.len().min(MAX_DEAD_PAYLOAD)]).into_owned();
    if cut {
        text.push_str(&format!("... [cut: {} bytes in all]", payload.len()));
    }
    text
}

/// How often a GPU's `last_seen` is rewritten at most.
const INDEX_REFRESH: Duration = Duration::from_secs(1);

struct State {
    pending: BTreeMap<String, Vec<u8>>,
    range_rev: i64,
    needs_resync: bool,
    stats: PartitionStats,
    stats_rev: i64,
    gpus: HashMap<String, (GpuInfo, Instant)>,
    hosts: HashSet<String>,
}

/// Runs the partition until released, fenced out, or the session is lost.
pub async fn run(
    ctx: Arc<PartitionContext>,
    partition: u32,
    lease: i64,
    liveness: Liveness,
    stop: CancellationToken,
) -> Exit {
    let exit = run_inner(ctx.clone(), partition, lease, liveness, stop).await;
    // No longer ours: its backlog is no longer this collector's lag.
    if let Some(slot) = ctx.oldest.get(partition as usize) {
        slot.store(0, Ordering::Relaxed);
    }
    exit
}

async fn run_inner(
    ctx: Arc<PartitionContext>,
    partition: u32,
    lease: i64,
    liveness: Liveness,
    stop: CancellationToken,
) -> Exit {
    let mut state = State {
        pending: BTreeMap::new(),
        range_rev: 0,
        needs_resync: false,
        stats: PartitionStats::default(),
        stats_rev: 0,
        gpus: HashMap::new(),
        hosts: HashSet::new(),
    };
    let mut backoff = Duration::from_millis(50);
    // Initial load, retried while etcd is unavailable.
    loop {
        match load(&ctx, partition, &mut state).await {
            Ok(()) => break,
            Err(err) => {
                tracing::warn!(partition, error = %err, "loading partition failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Exit::Released,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    tracing::info!(partition, pending = state.pending.len(), "partition acquired");
    // This partition's own watch, from just after the range: each queue event reaches only the
    // collector that owns its partition.
    let (tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let feeder = tokio::spawn(feed(
        ctx.client.clone(),
        ctx.keys.queue_partition_prefix(partition),
        state.range_rev + 1,
        tx,
        stop.clone(),
    ));
    let _feeder = AbortOnDrop(feeder);
    let mut failing = false;
    loop {
        while let Ok(event) = events.try_recv() {
            apply(&ctx, partition, &mut state, event).await;
        }
        if state.needs_resync {
            // A resync that failed (etcd unavailable) is retried with backoff until it succeeds.
            if let Err(err) = range_all(&ctx, partition, &mut state).await {
                tracing::debug!(partition, error = %err, "resync failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return Exit::Released,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
            state.needs_resync = false;
        }
        update_oldest(&ctx, partition, &state);
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
                    Some(event) => apply(&ctx, partition, &mut state, event).await,
                    None => return Exit::Released,
                },
            }
            continue;
        }
        let (items, index) = next_batch(&ctx, &state);
        let started = Instant::now();
        let sub = SubBatch {
            partition,
            lease,
            base: state.stats,
            stats_rev: state.stats_rev,
            items,
            index: index.clone(),
        };
        match ctx.combiner.commit(sub).await {
            Ok((
                Outcome::Committed {
                    stats,
                    stats_rev,
                    records,
                    duplicates,
                    dead,
                },
                items,
            )) => {
                metrics::histogram!("collector_commit_seconds").record(started.elapsed().as_secs_f64());
                state.stats = stats;
                state.stats_rev = stats_rev;
                for item in &items {
                    state.pending.remove(item.queue_key());
                }
                let now = Instant::now();
                for gpu in index.gpus {
                    state.gpus.insert(gpu.uuid.clone(), (gpu, now));
                }
                state.hosts.extend(index.hosts);
                ctx.counters.add(records as u64, duplicates as u64, dead as u64);
                backoff = Duration::from_millis(50);
                if failing {
                    tracing::info!(partition, "commits succeed again");
                    failing = false;
                }
            }
            Ok((Outcome::FenceLost, _)) => {
                tracing::warn!(
                    partition,
                    "commit refused by the fence: partition is no longer ours"
                );
                ctx.counters.fence_refusals.fetch_add(1, Ordering::Relaxed);
                return Exit::FenceLost;
            }
            Err(err) => {
                // Log once per outage (and when it ends), not at every retry.
                let retryable = !matches!(&err, EtcdError::Client(e) if !is_retryable(e));
                if !failing {
                    if retryable {
                        tracing::warn!(partition, error = %err, "commit outcome unknown or etcd unavailable; retrying with backoff");
                    } else {
                        tracing::error!(partition, error = %err, "commit failed; retrying with backoff");
                    }
                    failing = true;
                } else {
                    tracing::debug!(partition, error = %err, "commit retry failed");
                }
                metrics::counter!("collector_commit_errors_total").increment(1);
                tokio::select! {
                    _ = stop.cancelled() => return Exit::Released,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn load(ctx: &PartitionContext, partition: u32, state: &mut State) -> Result<(), EtcdError> {
    let mut client = ctx.client.clone();
    let stats = client.get(ctx.keys.partition_stats(partition), None).await?;
    state.stats = stats
        .kvs()
        .first()
        .and_then(|kv| serde_json::from_slice(kv.value()).ok())
        .unwrap_or_default();
    state.stats_rev = stats.kvs().first().map_or(0, |kv| kv.mod_revision());
    range_all(ctx, partition, state).await
}

/// Ranges over the partition at one revision, in pages small enough for gRPC's message limit.
/// The result replaces `pending` only when complete, so a failed range loses nothing.
async fn range_all(ctx: &PartitionContext, partition: u32, state: &mut State) -> Result<(), EtcdError> {
    let prefix = ctx.keys.queue_partition_prefix(partition);
    let (entries, revision) = telemetry_shared::etcd::range_prefix(&ctx.client, &prefix, 500).await?;
    state.pending = entries.into_iter().collect();
    state.range_rev = revision;
    Ok(())
}

async fn apply(ctx: &PartitionContext, partition: u32, state: &mut State, event: QueueEvent) {
    match event {
        // Entries written at or before our range are already known (or already committed).
        QueueEvent::Put { key, value, revision } if revision > state.range_rev => {
            state.pending.insert(key, value);
        }
        QueueEvent::Put { .. } => {}
        QueueEvent::Delete { key } => {
            state.pending.remove(&key);
        }
        QueueEvent::Resync => {
            if let Err(err) = range_all(ctx, partition, state).await {
                tracing::warn!(partition, error = %err, "resync failed; retrying with backoff");
                state.needs_resync = true;
            }
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

/// Takes the next batch from the head of the partition, within the operation budget.
fn next_batch(ctx: &PartitionContext, state: &State) -> (Vec<Item>, IndexUpdates) {
    // One operation is reserved for the stats counter.
    let budget = MAX_TXN_OPS - 1;
    let mut used = 0;
    let mut bytes = 0;
    let mut items = Vec::new();
    let mut index = IndexUpdates::default();
    let now = Instant::now();
    for (queue_key, payload) in &state.pending {
        if items.len() == ctx.batch_size {
            break;
        }
        let queue_id = queue_key.rsplit('/').next().unwrap_or_default();
        let item = match validate(payload, queue_id, &ctx.keys, &ctx.columns) {
            Ok(record) => Item::Record {
                queue_key: queue_key.clone(),
                record: Box::new(record),
            },
            Err(reason) => {
                tracing::warn!(queue_key = %queue_key, %reason, "invalid message; dead-lettering");
                Item::Dead {
                    queue_key: queue_key.clone(),
                    dead_key: ctx.keys.deadletter(&dead_letter_id(&ctx.keys, queue_key)),
                    letter: Box::new(DeadLetter {
                        queue_key: queue_key.clone(),
                        reason,
                        payload: capped_payload(payload),
                        failed_at: Timestamp::now(),
                        collector: ctx.collector_id.clone(),
                    }),
                }
            }
        };
        // Index entries this record needs (new GPU or host, changed description, or stale).
        let mut extra_gpu = None;
        let mut extra_host = None;
        if let Item::Record { record, .. } = &item {
            let info = GpuInfo {
                uuid: record.uuid.clone(),
                hostname: record.hostname.clone(),
                gpu_id: record.gpu_id.clone(),
                device: record.device.clone(),
                model: record.model.clone(),
                last_seen: record.message.timestamp,
            };
            let in_batch = index.gpus.iter().position(|g| g.uuid == info.uuid);
            match in_batch {
                Some(i) => {
                    if index.gpus[i].last_seen < info.last_seen {
                        index.gpus[i].last_seen = info.last_seen;
                    }
                }
                None => {
                    let stale = match state.gpus.get(&info.uuid) {
                        None => true,
                        Some((known, at)) => {
                            known.hostname != info.hostname
                                || known.gpu_id != info.gpu_id
                                || known.device != info.device
                                || known.model != info.model
                                || (now.duration_since(*at) >= INDEX_REFRESH
                                    && known.last_seen < info.last_seen)
                        }
                    };
                    if stale {
                        extra_gpu = Some(info);
                    }
                }
            }
            if !state.hosts.contains(&record.hostname) && !index.hosts.contains(&record.hostname) {
                extra_host = Some(record.hostname.clone());
            }
        }
        let cost = item.ops() + usize::from(extra_gpu.is_some()) + usize::from(extra_host.is_some());
        let size = match &item {
            Item::Record { record, .. } => record.encoded.len(),
            Item::Dead { letter, .. } => letter.payload.len() + letter.reason.len(),
            _ => 0,
        };
        // Within the operation budget and, after the first item, the request-size budget.
        if used + cost > budget || (!items.is_empty() && bytes + size > MAX_BATCH_BYTES) {
            break;
        }
        used += cost;
        bytes += size;
        index.gpus.extend(extra_gpu);
        index.hosts.extend(extra_host);
        items.push(item);
    }
    (items, index)
}
