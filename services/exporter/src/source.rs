//! The source: every stored record after the checkpoint, in export order (revision, then key),
//! converted, exactly once.
//!
//! - **Follow** (`shared::watch::Follow`, puts only) from the checkpoint's revision: complete
//!   revisions, never half, re-watched from the last complete one after any break.
//! - **Catch-up from the data keys**, when there is no checkpoint yet, or etcd has compacted the
//!   history the follow needs: every data key with a `mod_revision` after the checkpoint is
//!   listed (keys only, in pages, at one revision R), sorted into export order, read at R in
//!   transactions of 128 gets, converted and sent on; then a [`Mark`] at R, and the follow
//!   goes on from R + 1. Nothing that still exists is lost. What no longer exists (its
//!   retention lease ended before the export reached it) is counted against the collectors'
//!   stats counters, read at R: records ever written, minus those the checkpoint accounts for,
//!   minus those found, expired unseen. The mark carries that gap and its time span to the
//!   checkpoint.
//! - A compaction met after records were already handed on ends the source with
//!   [`Chunk::Restart`]: the loop exports what it holds, and a new source starts from the
//!   checkpoint (then catching up), so the expired count is always taken against the checkpoint.

use std::sync::Arc;

use etcd_client::{Client, GetOptions, Txn, TxnOp, TxnOpResponse};
use telemetry_shared::{
    Keyspace, Timestamp,
    config::Columns,
    etcd::{EtcdError, MAX_TXN_OPS, kv},
    keys::prefix_end,
    model::{ExportCheckpoint, PartitionStats},
    observe::emit,
    profiles::ProfileCache,
    retry::{Backoff, Policy},
    watch::{ChangeKind, Follow, Update},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::{
    batch::Mark,
    checkpoint,
    convert::{self, Item, Record},
    events,
};

/// What the source hands the export loop.
#[derive(Debug)]
pub(crate) enum Chunk {
    /// Records, in export order.
    Records(Vec<Item>),
    /// Everything up to a revision has been read (the end of a catch-up).
    Mark(Mark),
    /// The source follows the live watch now (lag is counted from the checkpoint until then).
    Live,
    /// History was compacted after records were handed on: export what is held, then start a
    /// new source from the checkpoint.
    Restart,
}

/// What the source needs.
#[derive(Clone)]
pub(crate) struct SourceContext {
    pub client: Client,
    pub keys: Keyspace,
    pub columns: Columns,
    pub profiles: ProfileCache,
}

/// Keys listed per page while catching up.
const LIST_PAGE: i64 = 5000;

/// Runs until `stop`, the receiver is gone, or a [`Chunk::Restart`] was sent.
pub(crate) async fn run(
    ctx: Arc<SourceContext>,
    start: ExportCheckpoint,
    tx: mpsc::Sender<Chunk>,
    stop: CancellationToken,
) {
    let mut delivered = false;
    let mut first = checkpoint::first_revision(&start);
    let mut catch_up_needed = start.revision == 0 && start.key.is_none();
    let mut backoff = Backoff::new(Policy::ETCD, "exporter catch-up");
    loop {
        if catch_up_needed {
            emit(events::CatchUpStarted { checkpoint: &start });
            match catch_up(&ctx, &start, &tx, &stop, &mut delivered).await {
                Ok(read_at) => {
                    backoff.succeeded();
                    first = read_at + 1;
                }
                Err(_) if delivered => {
                    let _ = tx.send(Chunk::Restart).await;
                    return;
                }
                Err(err) => {
                    if backoff.retry_after(&err, &stop).await.is_err() {
                        return;
                    }
                    continue;
                }
            }
        }
        if tx.send(Chunk::Live).await.is_err() {
            return;
        }
        match follow(&ctx, &start, first, &tx, &stop, &mut delivered).await {
            Followed::Stopped => return,
            Followed::Compacted if delivered => {
                let _ = tx.send(Chunk::Restart).await;
                return;
            }
            Followed::Compacted => catch_up_needed = true,
        }
    }
}

enum Followed {
    Stopped,
    Compacted,
}

async fn follow(
    ctx: &SourceContext,
    start: &ExportCheckpoint,
    from: i64,
    tx: &mpsc::Sender<Chunk>,
    stop: &CancellationToken,
    delivered: &mut bool,
) -> Followed {
    let mut follow = Follow::new(&ctx.client, ctx.keys.data_prefix(), from).without_deletes();
    loop {
        match follow.next(stop).await {
            None => return Followed::Stopped,
            Some(Update::Compacted { .. }) => return Followed::Compacted,
            Some(Update::Changes { changes, .. }) => {
                let mut records: Vec<Record> = changes
                    .into_iter()
                    .filter(|c| c.kind == ChangeKind::Put)
                    .map(|c| Record {
                        revision: c.mod_revision,
                        key: String::from_utf8_lossy(&c.key).into_owned(),
                        value: c.value,
                    })
                    .filter(|r| checkpoint::is_after(start, r.revision, &r.key))
                    .collect();
                if records.is_empty() {
                    continue;
                }
                convert::order(&mut records);
                let Some(items) = convert_all(ctx, records, stop).await else {
                    return Followed::Stopped;
                };
                if tx.send(Chunk::Records(items)).await.is_err() {
                    return Followed::Stopped;
                }
                *delivered = true;
            }
        }
    }
}

/// Loads the profiles `records` name (retrying while etcd is unreachable), then converts them.
/// `None` at shutdown.
async fn convert_all(
    ctx: &SourceContext,
    records: Vec<Record>,
    stop: &CancellationToken,
) -> Option<Vec<Item>> {
    let needed = convert::profiles_needed(&records);
    let mut backoff = Backoff::new(Policy::ETCD, "exporter profile read");
    while let Err(err) = ctx
        .profiles
        .load(&ctx.client, &ctx.keys, needed.iter().copied())
        .await
    {
        backoff.retry_after(&err, stop).await.ok()?;
    }
    Some(
        records
            .into_iter()
            .map(|r| convert::convert(&ctx.keys, &ctx.profiles, &ctx.columns, r))
            .collect(),
    )
}

/// Catches up from the data keys (see the module docs); returns the revision it read at.
async fn catch_up(
    ctx: &SourceContext,
    start: &ExportCheckpoint,
    tx: &mpsc::Sender<Chunk>,
    stop: &CancellationToken,
    delivered: &mut bool,
) -> Result<i64, EtcdError> {
    let (listed, read_at) = list_after(&ctx.client, &ctx.keys.data_prefix(), start).await?;
    let written = written_at(&ctx.client, &ctx.keys, read_at).await?;
    let first_found = listed
        .first()
        .and_then(|(_, key)| ctx.keys.parse_data_record(key))
        .and_then(|parts| Timestamp::parse(parts.timestamp).ok());
    let gap = checkpoint::gap(start, read_at, written, listed.len() as u64, first_found);
    emit(events::CatchUpListed {
        from: start.revision,
        read_at,
        found: listed.len(),
        gap: gap.as_ref(),
    });
    for chunk in listed.chunks(MAX_TXN_OPS) {
        let records = read_values(&ctx.client, chunk, read_at).await?;
        let Some(items) = convert_all(ctx, records, stop).await else {
            return Err(EtcdError::Cancelled);
        };
        if tx.send(Chunk::Records(items)).await.is_err() {
            return Err(EtcdError::Cancelled);
        }
        *delivered = true;
    }
    let mark = Mark {
        revision: read_at,
        gap,
    };
    tx.send(Chunk::Mark(mark))
        .await
        .map_err(|_| EtcdError::Cancelled)?;
    *delivered = true;
    Ok(read_at)
}

/// Every data key after `start` as (mod_revision, key), in export order, listed at one
/// revision (returned).
async fn list_after(
    client: &Client,
    prefix: &str,
    start: &ExportCheckpoint,
) -> Result<(Vec<(i64, String)>, i64), EtcdError> {
    let end = prefix_end(prefix);
    let mut kv = kv(client);
    let mut from = prefix.as_bytes().to_vec();
    let mut read_at = 0;
    let mut out = Vec::new();
    loop {
        let mut options = GetOptions::new()
            .with_range(end.clone())
            .with_keys_only()
            .with_limit(LIST_PAGE);
        if read_at > 0 {
            options = options.with_revision(read_at);
        }
        let resp = kv.get(from.clone(), Some(options)).await?;
        if read_at == 0 {
            read_at = resp.header().map_or(0, |h| h.revision());
        }
        for item in resp.kvs() {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            if checkpoint::is_after(start, item.mod_revision(), &key) {
                out.push((item.mod_revision(), key));
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => break,
        }
    }
    out.sort();
    Ok((out, read_at))
}

/// The records the collectors' stats counters say were ever written, at `revision`; `None`
/// when a counter is unreadable.
async fn written_at(client: &Client, keys: &Keyspace, revision: i64) -> Result<Option<u64>, EtcdError> {
    let prefix = keys.stats_prefix();
    let options = GetOptions::new()
        .with_range(prefix_end(&prefix))
        .with_revision(revision);
    let resp = kv(client).get(prefix.as_bytes(), Some(options)).await?;
    let mut total = 0u64;
    for item in resp.kvs() {
        match serde_json::from_slice::<PartitionStats>(item.value()) {
            Ok(stats) => total += stats.records,
            Err(_) => return Ok(None),
        }
    }
    Ok(Some(total))
}

/// The values of `listed` keys at `revision` (one transaction; at most 128 keys).
async fn read_values(
    client: &Client,
    listed: &[(i64, String)],
    revision: i64,
) -> Result<Vec<Record>, EtcdError> {
    let ops: Vec<TxnOp> = listed
        .iter()
        .map(|(_, key)| TxnOp::get(key.as_str(), Some(GetOptions::new().with_revision(revision))))
        .collect();
    let resp = kv(client).txn(Txn::new().and_then(ops)).await?;
    let mut records = Vec::with_capacity(listed.len());
    for ((mod_revision, key), op) in listed.iter().zip(resp.op_responses()) {
        let TxnOpResponse::Get(get) = op else { continue };
        if let Some(item) = get.kvs().first() {
            records.push(Record {
                revision: *mod_revision,
                key: key.clone(),
                value: item.value().to_vec(),
            });
        }
    }
    Ok(records)
}
