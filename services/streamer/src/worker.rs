//! One worker: streams the whole file under its own stream id, pass after pass.
//!
//! A pass starts from the stream's checkpoint: rows up to the checkpoint's row are skipped, the
//! rest are rate-limited, turned into messages, batched and committed through the [`Sink`]
//! (each transaction also advances the checkpoint). When another streamer with the same stream
//! id advanced the checkpoint (a fence conflict), the worker adopts the stored position: rows it
//! holds beyond that position are retried, rows at or before it are dropped.

use std::{num::NonZeroU32, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use telemetry_shared::{Checkpoint, etcd::EtcdError};
use tokio_util::sync::CancellationToken;

use crate::{
    StreamerError,
    backpressure::DepthGauge,
    config::StreamerConfig,
    progress::Stats,
    sink::{CommitOutcome, MAX_MESSAGE_BYTES, MAX_ROWS_PER_TXN, MAX_TXN_BYTES, Pending, Sink, SinkError},
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

/// What one worker shares with the others.
pub(crate) struct Shared {
    pub config: StreamerConfig,
    pub sink: Sink,
    pub gauge: Arc<DepthGauge>,
    pub stats: Arc<Stats>,
    pub types: ColumnTypes,
    pub shutdown: CancellationToken,
}

/// An entry of a batch: a message to enqueue, or a malformed row that only moves the checkpoint.
enum Entry {
    Message(Box<Pending>),
    Skip(u64),
}

impl Entry {
    fn row(&self) -> u64 {
        match self {
            Entry::Message(p) => p.row,
            Entry::Skip(row) => *row,
        }
    }
}

/// How a pass ended.
enum PassEnd {
    /// Every row of the pass is settled (by us or by a same-id streamer).
    Complete,
    /// Shutdown was requested.
    Shutdown,
    /// The stored checkpoint is on another pass: start over from it.
    Restart,
}

/// A worker's state within one pass.
struct Pass<'a> {
    shared: &'a Shared,
    stream_id: &'a str,
    pass: u64,
    /// `mod_revision` of the checkpoint as we last saw or wrote it (the fence).
    expected_rev: i64,
    /// Last row whose fate is committed.
    committed_row: u64,
    /// Messages this worker enqueued in this pass.
    enqueued: u64,
}

fn rate_limiter(rate: Option<f64>) -> Option<DefaultDirectRateLimiter> {
    let rate = rate?;
    let period = Duration::from_secs_f64(1.0 / rate);
    // A period of zero only happens for absurd rates; treat those as unlimited.
    let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::MIN);
    Some(RateLimiter::direct(quota))
}

/// Runs worker `index` until its work is done (one-shot) or shutdown.
pub(crate) async fn run(shared: Arc<Shared>, index: u32) -> Result<(), StreamerError> {
    let stream_id = shared.config.worker_stream_id(index);
    let limiter = rate_limiter(shared.config.rate);
    let mut first_pass = None;
    loop {
        if shared.shutdown.is_cancelled() {
            return Ok(());
        }
        let (checkpoint, rev) = match shared.sink.read_checkpoint(&stream_id).await {
            Ok(found) => found,
            Err(SinkError::Etcd(EtcdError::Cancelled)) => return Ok(()),
            Err(err) => return Err(sink_err(err)),
        };
        let (pass, after_row) = match checkpoint {
            None => (0, 0),
            Some(cp) if cp.pass_complete => {
                if !shared.config.loop_mode {
                    tracing::info!(
                        stream = %stream_id, pass = cp.pass,
                        "this stream's pass is already complete; nothing to do (use another STREAM_ID to stream the file again)"
                    );
                    return Ok(());
                }
                (cp.pass + 1, 0)
            }
            Some(cp) => (cp.pass, cp.row),
        };
        // A one-shot streamer finishes the pass it started with; if a same-id streamer in loop
        // mode has moved the stream on to a later pass, that pass is not ours to stream.
        match first_pass {
            Some(first) if !shared.config.loop_mode && pass > first => {
                tracing::info!(stream = %stream_id, pass = first, "pass completed by another streamer with the same id");
                return Ok(());
            }
            None => first_pass = Some(pass),
            _ => {}
        }
        tracing::info!(stream = %stream_id, pass, resume_after_row = after_row, "starting pass");
        let mut state = Pass {
            shared: &shared,
            stream_id: &stream_id,
            pass,
            expected_rev: rev,
            committed_row: after_row,
            enqueued: 0,
        };
        match state.stream(limiter.as_ref()).await? {
            PassEnd::Shutdown => return Ok(()),
            PassEnd::Restart => continue,
            PassEnd::Complete => {
                shared.stats.add_pass();
                tracing::info!(stream = %stream_id, pass, "pass complete");
                if !shared.config.loop_mode {
                    return Ok(());
                }
                if state.enqueued == 0 {
                    // A pass that enqueued nothing (empty file, or every row malformed): do not
                    // spin through the file as fast as it can be read.
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
}

/// Rows to hold before flushing: `BATCH_SIZE`, rounded down to whole transactions when it is
/// larger than one, so that the default of 100 does not become transactions of 63 and 37.
fn flush_at(batch_size: usize) -> usize {
    if batch_size > MAX_ROWS_PER_TXN {
        batch_size / MAX_ROWS_PER_TXN * MAX_ROWS_PER_TXN
    } else {
        batch_size
    }
}

fn sink_err(err: SinkError) -> StreamerError {
    StreamerError::Sink(err)
}

impl Pass<'_> {
    async fn stream(&mut self, limiter: Option<&DefaultDirectRateLimiter>) -> Result<PassEnd, StreamerError> {
        let config = &self.shared.config;
        let mut source = CsvSource::open(&config.csv_path)?;
        let mut builder = MessageBuilder::new(
            source.headers().to_vec(),
            self.shared.types.clone(),
            &config.partition_columns,
        );
        let mut batch: Vec<Entry> = Vec::with_capacity(config.batch_size);
        let mut last_row = 0;
        loop {
            if self.shared.shutdown.is_cancelled() {
                // Rows already read are committed (the in-flight work), then we stop.
                return Ok(match self.flush(&mut batch, None).await? {
                    Some(end) => end,
                    None => PassEnd::Shutdown,
                });
            }
            let Some(item) = source.next_item()? else {
                // End of file: the last flush also marks the pass complete.
                return Ok(match self.flush(&mut batch, Some(last_row)).await? {
                    Some(end) => end,
                    None if self.shared.shutdown.is_cancelled() => PassEnd::Shutdown,
                    None => PassEnd::Complete,
                });
            };
            last_row = item.row();
            if item.row() <= self.committed_row {
                continue;
            }
            match item {
                SourceItem::Malformed(bad) => {
                    tracing::warn!(stream = %self.stream_id, row = bad.row, line = bad.line, reason = %bad.reason, "skipping malformed row");
                    batch.push(Entry::Skip(bad.row));
                }
                SourceItem::Row(row) => {
                    if let Some(limiter) = limiter
                        && limiter.check().is_err()
                    {
                        // About to wait for a token: send what we have first, so that slow
                        // rates are not held back by batching.
                        if let Some(end) = self.flush(&mut batch, None).await? {
                            return Ok(end);
                        }
                        tokio::select! {
                            _ = self.shared.shutdown.cancelled() => continue,
                            _ = limiter.until_ready() => {}
                        }
                    }
                    let prepared = builder.build(self.stream_id, self.pass, row.row, &row.values);
                    let encoded = serde_json::to_vec(&prepared.message).map_err(StreamerError::Encode)?;
                    if encoded.len() > MAX_MESSAGE_BYTES {
                        tracing::warn!(stream = %self.stream_id, row = row.row, line = row.line, bytes = encoded.len(), "skipping row too large for etcd");
                        batch.push(Entry::Skip(row.row));
                    } else {
                        batch.push(Entry::Message(Box::new(Pending {
                            row: row.row,
                            prepared,
                            encoded,
                        })));
                    }
                }
            }
            if batch.len() >= flush_at(config.batch_size)
                && let Some(end) = self.flush(&mut batch, None).await?
            {
                return Ok(end);
            }
        }
    }

    /// Commits `batch` in transactions of at most [`MAX_ROWS_PER_TXN`] messages. With
    /// `complete_at = Some(last_row)` the final transaction also marks the pass complete (even
    /// when the batch is empty). Returns `Some(end)` when the pass must end early.
    async fn flush(
        &mut self,
        batch: &mut Vec<Entry>,
        complete_at: Option<u64>,
    ) -> Result<Option<PassEnd>, StreamerError> {
        let mut entries: Vec<Entry> = std::mem::take(batch);
        loop {
            entries.retain(|e| e.row() > self.committed_row);
            if entries.is_empty() && complete_at.is_none() {
                return Ok(None);
            }
            // The next chunk: as many entries as fit the operation and byte limits.
            let mut messages = 0;
            let mut bytes = 0;
            let mut take = 0;
            for entry in &entries {
                if let Entry::Message(p) = entry {
                    // At least one message per chunk, whatever its size (it is under
                    // MAX_MESSAGE_BYTES), so that the loop always makes progress.
                    if messages > 0
                        && (messages == MAX_ROWS_PER_TXN || bytes + p.encoded.len() > MAX_TXN_BYTES)
                    {
                        break;
                    }
                    messages += 1;
                    bytes += p.encoded.len();
                }
                take += 1;
            }
            let rest = entries.split_off(take);
            let chunk = entries;
            let is_last = rest.is_empty();
            let chunk_last_row = chunk.last().map_or(self.committed_row, Entry::row);
            let target = match complete_at {
                Some(last_row) if is_last => Checkpoint {
                    pass: self.pass,
                    row: last_row.max(chunk_last_row).max(self.committed_row),
                    pass_complete: true,
                },
                _ => Checkpoint {
                    pass: self.pass,
                    row: chunk_last_row,
                    pass_complete: false,
                },
            };
            let pending: Vec<Pending> = chunk
                .iter()
                .filter_map(|e| match e {
                    Entry::Message(p) => Some(Pending::clone(p)),
                    Entry::Skip(_) => None,
                })
                .collect();
            // Only chunks that add messages wait for queue room: a checkpoint-only commit (skipped
            // rows, end of pass) never makes the queue deeper.
            if !pending.is_empty() {
                match self
                    .shared
                    .gauge
                    .admit(pending.len(), &self.shared.shutdown)
                    .await
                {
                    Ok(()) => {}
                    Err(EtcdError::Cancelled) => return Ok(Some(PassEnd::Shutdown)),
                    Err(err) => return Err(StreamerError::Sink(SinkError::Etcd(err))),
                }
            }
            let outcome = match self
                .shared
                .sink
                .commit(self.stream_id, self.expected_rev, target, &pending)
                .await
            {
                Ok(outcome) => outcome,
                Err(SinkError::Etcd(EtcdError::Cancelled)) => return Ok(Some(PassEnd::Shutdown)),
                Err(err) => return Err(sink_err(err)),
            };
            match outcome {
                CommitOutcome::Committed {
                    revision,
                    enqueued,
                    duplicates,
                } => {
                    self.expected_rev = revision;
                    self.committed_row = target.row;
                    self.shared.stats.add_enqueued(enqueued as u64);
                    self.shared.stats.add_duplicates(duplicates.len() as u64);
                    let skipped = chunk.iter().filter(|e| matches!(e, Entry::Skip(_))).count();
                    self.shared.stats.add_skipped(skipped as u64);
                    self.enqueued += enqueued as u64;
                    if target.pass_complete {
                        return Ok(None);
                    }
                    entries = rest;
                }
                CommitOutcome::Conflict {
                    current,
                    mod_revision,
                } => {
                    self.shared.stats.add_conflict();
                    tracing::info!(stream = %self.stream_id, ?current, "checkpoint advanced by another streamer with the same stream id; adopting its position");
                    self.expected_rev = mod_revision;
                    match current {
                        Some(cp) if cp.pass == self.pass && cp.pass_complete => {
                            return Ok(Some(PassEnd::Complete));
                        }
                        Some(cp) if cp.pass == self.pass => {
                            self.committed_row = self.committed_row.max(cp.row);
                            let mut all = chunk;
                            all.extend(rest);
                            entries = all;
                        }
                        _ => return Ok(Some(PassEnd::Restart)),
                    }
                }
            }
        }
    }
}
