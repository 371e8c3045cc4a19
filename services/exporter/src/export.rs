//! The loop of an active exporter: records from the source, cut into requests, delivered, and
//! the checkpoint advanced after each acknowledgement.
//!
//! One request is in flight at a time, and the next is built only after the checkpoint of the
//! previous one landed in etcd. That is what limits a crash's damage to one request that
//! landed without its checkpoint (`batch.rs`); pipelining requests would allow two, and the
//! second's samples would make the first's re-send out of order.
//!
//! A request is sent only while the owner lease was confirmed recently (a process paused past
//! its lease must not send on behalf of a name another exporter now holds). A request the
//! server refuses for its content is bisected (`send.rs`); one it does not acknowledge is
//! retried with backoff for as long as it takes.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant},
};

use telemetry_shared::{
    Timestamp,
    etcd::{EtcdError, for_each_key},
    exposition::Sample,
    lease::KeptLease,
    model::ExportCheckpoint,
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    Context,
    batch::{self, Mark, Pending},
    checkpoint::{self, Advance, AdvanceContext, Written},
    convert::Item,
    events, remote_write,
    send::{Bisect, Outcome},
    source::{self, Chunk},
};

/// Why an active exporter's session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Shutdown was requested.
    Shutdown,
    /// The name is no longer ours (fence, lost lease).
    Lost(String),
    /// Something an operator must repair (an unreadable checkpoint).
    Fatal(String),
}

/// Entries held in memory at most (records read but not yet exported).
const MAX_PENDING: usize = 50_000;

/// Runs the export while `lease` owns the name.
pub(crate) async fn session(ctx: &Arc<Context>, lease: &KeptLease, shutdown: &CancellationToken) -> End {
    loop {
        match phase(ctx, lease, shutdown).await {
            Ok(()) => emit(events::SourceRestart),
            Err(end) => return end,
        }
    }
}

/// The state of one phase (one source, from one checkpoint).
struct Phase {
    checkpoint: ExportCheckpoint,
    /// The checkpoint key's `mod_revision` (0: not written yet), for the advance's compare.
    mod_revision: i64,
    /// Rejected-record entries stored, oldest first.
    listed: BTreeSet<String>,
    pending: VecDeque<Pending>,
    /// When the oldest record in `pending` started waiting for its request.
    waiting_since: Option<Instant>,
    live: bool,
    restart: bool,
    source_open: bool,
}

/// Exports from the stored checkpoint until the source asks for a restart (`Ok`) or the
/// session ends.
async fn phase(ctx: &Arc<Context>, lease: &KeptLease, shutdown: &CancellationToken) -> Result<(), End> {
    let (checkpoint, mod_revision) = read_state(ctx, shutdown).await?;
    let listed = read_listed(ctx, shutdown).await?;
    ctx.progress.set_checkpoint(&checkpoint);
    let stop = CancellationToken::new();
    let _stop_source = stop.clone().drop_guard();
    let (tx, mut rx) = mpsc::channel(64);
    tokio::spawn(source::run(ctx.source.clone(), checkpoint.clone(), tx, stop));
    let mut phase = Phase {
        checkpoint,
        mod_revision,
        listed,
        pending: VecDeque::new(),
        waiting_since: None,
        live: false,
        restart: false,
        source_open: true,
    };
    let lost = lease.lost();
    loop {
        ctx.progress.set_pending(&phase.pending, phase.live);
        if matches!(phase.pending.front(), Some(Pending::Mark(_))) {
            export(ctx, lease, &mut phase, 0, shutdown).await?;
            continue;
        }
        let cut = batch::cut(&phase.pending, ctx.config.batch_samples, ctx.rule);
        let waited = phase
            .waiting_since
            .is_some_and(|t| t.elapsed() >= ctx.config.batch_wait);
        let due = cut.complete
            || waited
            || phase.restart
            || !phase.source_open
            || phase.pending.len() >= MAX_PENDING;
        if cut.records > 0 && due && !shutdown.is_cancelled() {
            export(ctx, lease, &mut phase, cut.records, shutdown).await?;
            continue;
        }
        if phase.pending.is_empty() && phase.restart {
            return Ok(());
        }
        if phase.pending.is_empty() && !phase.source_open {
            // The source ended without asking for a restart: start over from the checkpoint.
            return Ok(());
        }
        let deadline = phase
            .waiting_since
            .map(|t| t + ctx.config.batch_wait)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            _ = lost.cancelled() => return Err(lost_end(lease)),
            chunk = rx.recv(), if phase.source_open && phase.pending.len() < MAX_PENDING => {
                absorb(&mut phase, chunk);
            }
            _ = tokio::time::sleep_until(deadline.into()), if phase.waiting_since.is_some() => {}
        }
    }
}

fn lost_end(lease: &KeptLease) -> End {
    End::Lost(
        lease
            .lost_reason()
            .unwrap_or_else(|| "the owner lease was lost".into()),
    )
}

fn absorb(phase: &mut Phase, chunk: Option<Chunk>) {
    match chunk {
        None => phase.source_open = false,
        Some(Chunk::Records(items)) => {
            if phase.waiting_since.is_none() && !items.is_empty() {
                phase.waiting_since = Some(Instant::now());
            }
            phase.pending.extend(items.into_iter().map(Pending::Record));
        }
        Some(Chunk::Mark(mark)) => phase.pending.push_back(Pending::Mark(mark)),
        Some(Chunk::Live) => phase.live = true,
        Some(Chunk::Restart) => {
            phase.restart = true;
            phase.live = false;
        }
    }
}

/// Exports the first `records` pending records (and the marks right after them): delivers
/// them, then advances the checkpoint.
async fn export(
    ctx: &Context,
    lease: &KeptLease,
    phase: &mut Phase,
    records: usize,
    shutdown: &CancellationToken,
) -> Result<(), End> {
    let items: Vec<Item> = phase
        .pending
        .drain(..records)
        .filter_map(|p| match p {
            Pending::Record(item) => Some(item),
            Pending::Mark(_) => None,
        })
        .collect();
    let mut marks: Vec<Mark> = Vec::new();
    while let Some(Pending::Mark(_)) = phase.pending.front() {
        if let Some(Pending::Mark(mark)) = phase.pending.pop_front() {
            marks.push(mark);
        }
    }
    phase.waiting_since = (!phase.pending.is_empty()).then(Instant::now);
    let rejected = deliver(ctx, &items, lease, shutdown).await?;
    let context = AdvanceContext {
        keys: &ctx.source.keys,
        name: &ctx.config.name,
        exporter: &ctx.config.exporter_id,
        now: Timestamp::now(),
    };
    let old = phase.checkpoint.clone();
    for advance in checkpoint::advances(&old, &items, &rejected, &marks, &context) {
        write(ctx, lease, phase, &advance, shutdown).await?;
        phase.checkpoint = advance.checkpoint;
    }
    let named: Vec<(String, String)> = rejected
        .iter()
        .filter_map(|(i, reason)| Some((items.get(*i)?.key.clone(), reason.clone())))
        .collect();
    let samples = (phase.checkpoint.samples - old.samples) as usize;
    emit(events::BatchExported {
        records: items.len(),
        samples,
        rejected: &named,
        checkpoint: &phase.checkpoint,
        expired: phase.checkpoint.expired - old.expired,
    });
    ctx.progress.add(&old, &phase.checkpoint);
    ctx.progress.set_checkpoint(&phase.checkpoint);
    Ok(())
}

/// Sends `items` (bisecting refused requests); returns the rejected ones (index, reason): those
/// that cannot become samples and those the server refused.
async fn deliver(
    ctx: &Context,
    items: &[Item],
    lease: &KeptLease,
    shutdown: &CancellationToken,
) -> Result<Vec<(usize, String)>, End> {
    let mut rejected: Vec<(usize, String)> = Vec::new();
    let mut sendable: Vec<usize> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        match &item.outcome {
            Ok(_) => sendable.push(i),
            Err(reason) => rejected.push((i, reason.clone())),
        }
    }
    let mut bisect = Bisect::new(sendable.len());
    let mut backoff = Backoff::new(Policy::ETCD, "remote write");
    let mut failing = false;
    // Sending needs the lease confirmed within the last two thirds of its TTL.
    let margin = lease.ttl() / 3;
    while let Some(range) = bisect.next() {
        let samples: Vec<&Sample> = sendable[range]
            .iter()
            .filter_map(|i| items[*i].outcome.as_ref().ok())
            .flat_map(|c| c.samples.iter())
            .collect();
        let body = remote_write::encode(samples.iter().copied());
        loop {
            wait_confirmed(lease, margin, shutdown).await?;
            let started = Instant::now();
            let outcome = ctx.sender.send(body.clone()).await;
            let retry = matches!(outcome, Outcome::Retry(_) | Outcome::Misconfigured(_));
            emit(events::RequestAnswered {
                outcome: &outcome,
                samples: samples.len(),
                elapsed: started.elapsed(),
                first_failure: retry && !failing,
            });
            ctx.progress.requests.fetch_add(1, Ordering::Relaxed);
            match outcome {
                Outcome::Landed | Outcome::Refused(_) if failing => {
                    emit(events::RequestsRecovered);
                    failing = false;
                    backoff.succeeded();
                }
                _ => {}
            }
            match outcome {
                Outcome::Landed => {
                    bisect.landed();
                    break;
                }
                Outcome::Refused(reason) => {
                    bisect.refused(reason);
                    break;
                }
                Outcome::Retry(_) | Outcome::Misconfigured(_) => {
                    failing = true;
                    if backoff.wait(shutdown).await.is_err() {
                        return Err(End::Shutdown);
                    }
                }
            }
        }
    }
    rejected.extend(bisect.rejected().into_iter().map(|(j, why)| (sendable[j], why)));
    rejected.sort_by_key(|(i, _)| *i);
    Ok(rejected)
}

/// Waits until etcd confirmed the lease within the last `ttl - margin` (a slow renewal during a
/// leader election, say); the lease's own timer decides when it is lost instead.
async fn wait_confirmed(
    lease: &KeptLease,
    margin: Duration,
    shutdown: &CancellationToken,
) -> Result<(), End> {
    let lost = lease.lost();
    while !lease.is_alive_for(margin) {
        tokio::select! {
            _ = shutdown.cancelled() => return Err(End::Shutdown),
            _ = lost.cancelled() => return Err(lost_end(lease)),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    Ok(())
}

/// Writes one checkpoint advance, retrying while etcd is unreachable. An attempt whose outcome
/// was unknown and that landed is recognised by the stored checkpoint being the one written.
async fn write(
    ctx: &Context,
    lease: &KeptLease,
    phase: &mut Phase,
    advance: &Advance,
    shutdown: &CancellationToken,
) -> Result<(), End> {
    let mut backoff = Backoff::new(Policy::ETCD, "exporter checkpoint");
    loop {
        let mut listed = phase.listed.clone();
        let txn = checkpoint::plan(
            &ctx.source.keys,
            &ctx.config.name,
            lease.id(),
            phase.mod_revision,
            advance,
            &mut listed,
            ctx.config.rejected_keep,
        )
        .map_err(|e| End::Fatal(e.to_string()))?;
        match ctx.source.client.clone().txn(txn).await {
            Ok(resp) => match checkpoint::classify(&resp, lease.id()) {
                Written::Landed(revision) => {
                    phase.mod_revision = revision;
                    phase.listed = listed;
                    emit(events::CheckpointWritten);
                    return Ok(());
                }
                Written::Moved(Some((stored, revision))) if stored == advance.checkpoint => {
                    // An earlier attempt whose answer was lost landed.
                    phase.mod_revision = revision;
                    phase.listed = listed;
                    emit(events::CheckpointWritten);
                    return Ok(());
                }
                Written::Moved(_) => {
                    emit(events::Fenced { by: None });
                    return Err(End::Lost("the checkpoint was moved by another process".into()));
                }
                Written::Fenced(by) => {
                    emit(events::Fenced { by: by.as_deref() });
                    return Err(End::Lost("another exporter is active".into()));
                }
            },
            Err(err) => {
                if lease.lost().is_cancelled() {
                    return Err(lost_end(lease));
                }
                if backoff.retry_after(&err, shutdown).await.is_err() {
                    return Err(End::Shutdown);
                }
            }
        }
    }
}

/// The stored checkpoint and its `mod_revision` (a default one and 0 when there is none).
async fn read_state(ctx: &Context, shutdown: &CancellationToken) -> Result<(ExportCheckpoint, i64), End> {
    let key = ctx.source.keys.exporter_checkpoint(&ctx.config.name);
    let mut backoff = Backoff::new(Policy::ETCD, "exporter checkpoint read");
    loop {
        match ctx.source.client.clone().get(key.as_str(), None).await {
            Ok(resp) => {
                let Some(kv) = resp.kvs().first() else {
                    return Ok((ExportCheckpoint::default(), 0));
                };
                return serde_json::from_slice::<ExportCheckpoint>(kv.value())
                    .map(|cp| (cp, kv.mod_revision()))
                    .map_err(|e| {
                        End::Fatal(format!(
                            "the checkpoint {key} is unreadable ({e}); repair or delete it (deleting it exports every stored record again)"
                        ))
                    });
            }
            Err(err) => {
                if backoff.retry_after(&err, shutdown).await.is_err() {
                    return Err(End::Shutdown);
                }
            }
        }
    }
}

/// The rejected-record entries stored, oldest first.
async fn read_listed(ctx: &Context, shutdown: &CancellationToken) -> Result<BTreeSet<String>, End> {
    let prefix = ctx.source.keys.exporter_rejected_prefix(&ctx.config.name);
    let mut backoff = Backoff::new(Policy::ETCD, "exporter rejected list");
    loop {
        let mut listed = BTreeSet::new();
        match for_each_key(&ctx.source.client, &prefix, 5000, |k| {
            listed.insert(k.to_string());
        })
        .await
        {
            Ok(_) => return Ok(listed),
            Err(EtcdError::Cancelled) => return Err(End::Shutdown),
            Err(err) => {
                if backoff.retry_after(&err, shutdown).await.is_err() {
                    return Err(End::Shutdown);
                }
            }
        }
    }
}
