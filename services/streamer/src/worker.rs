//! One worker: streams the whole file under its own stream id, pass after pass.
//!
//! A pass starts from the stream's checkpoint: rows up to the checkpoint's row are skipped, the
//! rest are rate-limited, turned into messages, batched and committed through the [`Sink`]
//! (each transaction also advances the checkpoint). When another streamer with the same stream
//! id advanced the checkpoint (a fence conflict), the worker adopts the stored position: rows it
//! holds beyond that position are retried, rows at or before it are dropped.
//!
//! The decisions are pure functions, unit-tested below: where a pass starts ([`plan_start`]),
//! whether a checkpoint belongs to this file ([`check_source`]), which entries the next
//! transaction takes and where it moves the checkpoint ([`next_chunk`]), and what a conflict
//! leaves to do ([`adopt`]).

use std::{num::NonZeroU32, path::Path, sync::Arc, time::Duration};

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use telemetry_shared::{
    Checkpoint,
    etcd::{MAX_TXN_BYTES, MAX_TXN_OPS},
    observe::emit,
    record::ProfileId,
};
use tokio_util::sync::CancellationToken;

use crate::{
    StreamerError,
    backpressure::DepthGauge,
    config::StreamerConfig,
    events::{CheckpointConflict, ChunkCommitted, PassCompleted, RowSkipped, SkipReason},
    progress::Stats,
    sink::{CommitOutcome, Dedup, MAX_MESSAGE_BYTES, MAX_ROWS_PER_TXN, Pending, Sink, SinkError},
    source::{ColumnTypes, CsvSource, SourceItem},
    transform::MessageBuilder,
};

/// What one worker shares with the others.
pub(crate) struct Shared {
    pub config: StreamerConfig,
    /// The CSV file.
    pub csv_path: std::path::PathBuf,
    pub sink: Sink,
    pub gauge: Arc<DepthGauge>,
    pub stats: Arc<Stats>,
    pub types: ColumnTypes,
    /// The source file's fingerprint, written into every checkpoint.
    pub fingerprint: String,
    pub shutdown: CancellationToken,
}

/// Refuses a checkpoint written for another file: its row number is a position in that file,
/// so resuming would skip or repeat rows. A checkpoint without a fingerprint (written before
/// fingerprints existed) is accepted, and the next commit records this file's.
pub(crate) fn check_source(
    stream: &str,
    path: &Path,
    fingerprint: &str,
    checkpoint: Option<&Checkpoint>,
) -> Result<(), StreamerError> {
    match checkpoint {
        Some(cp) if cp.source_fingerprint.as_deref().is_some_and(|f| f != fingerprint) => {
            Err(StreamerError::DifferentFile {
                stream: stream.to_string(),
                path: path.display().to_string(),
                stored: cp.source_fingerprint.clone().unwrap_or_default(),
                current: fingerprint.to_string(),
                pass: cp.pass,
                row: cp.row,
            })
        }
        _ => Ok(()),
    }
}

/// What a worker does next, given the stored checkpoint.
#[derive(Debug, PartialEq, Eq)]
enum Start {
    /// Stream `pass`, resuming after `after_row`.
    Pass { pass: u64, after_row: u64 },
    /// One-shot, and the stream's pass is already complete: nothing to do.
    AlreadyComplete { pass: u64 },
    /// One-shot, and a same-id streamer in loop mode moved the stream past our pass, which
    /// it therefore completed.
    CompletedByOther { pass: u64 },
}

/// Where to start, from the stored checkpoint, the mode, and the pass this worker started with
/// (`None` at its first start).
fn plan_start(checkpoint: Option<&Checkpoint>, loop_mode: bool, first_pass: Option<u64>) -> Start {
    let (pass, after_row) = match checkpoint {
        None => (0, 0),
        Some(cp) if cp.pass_complete && !loop_mode => return Start::AlreadyComplete { pass: cp.pass },
        Some(cp) if cp.pass_complete => (cp.pass + 1, 0),
        Some(cp) => (cp.pass, cp.row),
    };
    match first_pass {
        Some(first) if !loop_mode && pass > first => Start::CompletedByOther { pass: first },
        _ => Start::Pass { pass, after_row },
    }
}

/// An entry of a batch: a message to enqueue, or a malformed row that only moves the checkpoint.
#[derive(Debug)]
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

    fn message(&self) -> Option<&Pending> {
        match self {
            Entry::Message(p) => Some(p),
            Entry::Skip(_) => None,
        }
    }
}

/// The next transaction of a flush: the first `take` entries, and the checkpoint it writes.
#[derive(Debug, PartialEq, Eq)]
struct Chunk {
    take: usize,
    target: Checkpoint,
}

/// The next transaction for `entries` (the held rows after `committed_row`, in order) of
/// `pass`: as many entries as fit etcd's operation limit ([`Pending::ops`] per message, one per
/// profile not yet `written`, two for the checkpoint and origin) and [`MAX_TXN_BYTES`], but at
/// least one message.
/// With `complete_at = Some(last_row)` the transaction that takes the last entry also marks the
/// pass complete, even with no entries. `None`: nothing to commit.
fn next_chunk(
    entries: &[Entry],
    pass: u64,
    committed_row: u64,
    complete_at: Option<u64>,
    fingerprint: &str,
    written: &dyn Fn(ProfileId) -> bool,
) -> Option<Chunk> {
    if entries.is_empty() && complete_at.is_none() {
        return None;
    }
    let (mut messages, mut message_ops, mut bytes, mut take) = (0, 0, 0, 0);
    let mut profiles: Vec<ProfileId> = Vec::new();
    for entry in entries {
        if let Some(p) = entry.message() {
            let (id, profile) = &p.prepared.profile;
            let new_profile = !written(*id) && !profiles.contains(id);
            let extra_bytes = if new_profile { profile.encode().len() } else { 0 };
            let ops = message_ops + p.ops() + profiles.len() + usize::from(new_profile) + 2;
            // At least one message per chunk, whatever its size (it is under
            // MAX_MESSAGE_BYTES), so that a flush always makes progress.
            if messages > 0
                && (messages == MAX_ROWS_PER_TXN
                    || ops > MAX_TXN_OPS
                    || bytes + p.encoded.len() + extra_bytes > MAX_TXN_BYTES)
            {
                break;
            }
            messages += 1;
            message_ops += p.ops();
            bytes += p.encoded.len() + extra_bytes;
            if new_profile {
                profiles.push(*id);
            }
        }
        take += 1;
    }
    let chunk_last_row = entries[..take].last().map_or(committed_row, Entry::row);
    let (row, pass_complete) = match complete_at {
        Some(last_row) if take == entries.len() => (last_row.max(chunk_last_row).max(committed_row), true),
        _ => (chunk_last_row, false),
    };
    Some(Chunk {
        take,
        target: Checkpoint {
            pass,
            row,
            pass_complete,
            source_fingerprint: Some(fingerprint.to_string()),
            scrape_time: None,
            commit: None,
        },
    })
}

/// What is left to do after a same-id streamer moved the checkpoint to `current`.
#[derive(Debug, PartialEq, Eq)]
enum Adoption {
    /// It completed our pass.
    Complete,
    /// It is in our pass: rows up to `committed_row` are settled; retry the rest.
    Resume { committed_row: u64 },
    /// It is on another pass (or gone): start over from what is stored.
    Restart,
}

fn adopt(current: Option<&Checkpoint>, pass: u64, committed_row: u64) -> Adoption {
    match current {
        Some(cp) if cp.pass == pass && cp.pass_complete => Adoption::Complete,
        Some(cp) if cp.pass == pass => Adoption::Resume {
            committed_row: committed_row.max(cp.row),
        },
        _ => Adoption::Restart,
    }
}

/// Rows to hold before flushing: `BATCH_SIZE`, rounded down to whole transactions when it is
/// larger than one, so that 200 does not become transactions of 126 and 74.
fn flush_at(batch_size: usize) -> usize {
    if batch_size > MAX_ROWS_PER_TXN {
        batch_size / MAX_ROWS_PER_TXN * MAX_ROWS_PER_TXN
    } else {
        batch_size
    }
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
    while !shared.shutdown.is_cancelled() {
        let Some((pass, after_row, rev)) = next_pass(&shared, &stream_id, first_pass).await? else {
            return Ok(());
        };
        first_pass.get_or_insert(pass);
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
            PassEnd::Restart => {}
            PassEnd::Complete => {
                emit(PassCompleted {
                    stats: &shared.stats,
                    stream: &stream_id,
                    pass,
                });
                if !shared.config.loop_mode {
                    return Ok(());
                }
                // A pass that enqueued nothing (empty file, or every row malformed): do not
                // spin through the file as fast as it can be read.
                if state.enqueued == 0 {
                    tokio::select! {
                        _ = shared.shutdown.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }
    Ok(())
}

/// Reads the stream's checkpoint and decides the pass to stream: `(pass, after_row,
/// mod_revision)`, or `None` when there is nothing (more) to do or shutdown came first.
async fn next_pass(
    shared: &Shared,
    stream_id: &str,
    first_pass: Option<u64>,
) -> Result<Option<(u64, u64, i64)>, StreamerError> {
    let (checkpoint, rev) = match shared.sink.read_checkpoint_unless_deleted(stream_id).await {
        Ok(Some(found)) => found,
        Ok(None) => {
            return Err(SinkError::CheckpointDeleted {
                stream: stream_id.to_string(),
            }
            .into());
        }
        Err(err) if err.is_cancelled() => return Ok(None),
        Err(err) => return Err(err.into()),
    };
    let path = &shared.csv_path;
    check_source(stream_id, path, &shared.fingerprint, checkpoint.as_ref())?;
    match plan_start(checkpoint.as_ref(), shared.config.loop_mode, first_pass) {
        Start::Pass { pass, after_row } => Ok(Some((pass, after_row, rev))),
        Start::AlreadyComplete { pass } => {
            tracing::info!(
                stream = %stream_id, pass,
                "this stream's pass is already complete; nothing to do (use another STREAM_ID to stream the file again)"
            );
            Ok(None)
        }
        Start::CompletedByOther { pass } => {
            tracing::info!(stream = %stream_id, pass, "pass completed by another streamer with the same id");
            Ok(None)
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

impl Pass<'_> {
    /// Reads the file, holds the rows after the checkpoint in a batch and flushes it every
    /// [`flush_at`] rows, before waiting for the rate limiter, at shutdown and at end of file.
    async fn stream(&mut self, limiter: Option<&DefaultDirectRateLimiter>) -> Result<PassEnd, StreamerError> {
        let config = &self.shared.config;
        let mut source = CsvSource::open(&self.shared.csv_path)?;
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
                let end = self.flush(&mut batch, None).await?;
                return Ok(end.unwrap_or(PassEnd::Shutdown));
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
            if let (SourceItem::Row(_), Some(limiter)) = (&item, limiter)
                && limiter.check().is_err()
            {
                // About to wait for a token: send what we have first, so that slow rates are
                // not held back by batching.
                if let Some(end) = self.flush(&mut batch, None).await? {
                    return Ok(end);
                }
                tokio::select! {
                    _ = self.shared.shutdown.cancelled() => continue,
                    _ = limiter.until_ready() => {}
                }
            }
            batch.push(self.entry(&mut builder, item)?);
            if batch.len() >= flush_at(config.batch_size)
                && let Some(end) = self.flush(&mut batch, None).await?
            {
                return Ok(end);
            }
        }
    }

    /// The batch entry for a row read: its message, or a skip (logged) if it cannot be one.
    fn entry(&self, builder: &mut MessageBuilder, item: SourceItem) -> Result<Entry, StreamerError> {
        let row = match item {
            SourceItem::Row(row) => row,
            SourceItem::Malformed(bad) => {
                emit(RowSkipped {
                    stream: self.stream_id,
                    row: bad.row,
                    line: bad.line,
                    reason: SkipReason::Malformed(&bad.reason),
                });
                return Ok(Entry::Skip(bad.row));
            }
        };
        let mut prepared = builder.build(self.stream_id, self.pass, row.row, &row.values);
        let encoded = std::mem::take(&mut prepared.encoded);
        if encoded.len() > MAX_MESSAGE_BYTES {
            emit(RowSkipped {
                stream: self.stream_id,
                row: row.row,
                line: row.line,
                reason: SkipReason::TooLarge { bytes: encoded.len() },
            });
            return Ok(Entry::Skip(row.row));
        }
        Ok(Entry::Message(Box::new(Pending {
            row: row.row,
            prepared,
            encoded,
            dedup: Dedup::Checkpoint,
        })))
    }

    /// Commits `batch` in transactions chosen by [`next_chunk`]. With `complete_at =
    /// Some(last_row)` the final transaction also marks the pass complete (even when the batch
    /// is empty). Returns `Some(end)` when the pass must end early.
    async fn flush(
        &mut self,
        batch: &mut Vec<Entry>,
        complete_at: Option<u64>,
    ) -> Result<Option<PassEnd>, StreamerError> {
        let mut entries: Vec<Entry> = std::mem::take(batch);
        loop {
            entries.retain(|e| e.row() > self.committed_row);
            let Some(Chunk { take, target }) = next_chunk(
                &entries,
                self.pass,
                self.committed_row,
                complete_at,
                &self.shared.fingerprint,
                &|id| self.shared.sink.is_written(id),
            ) else {
                return Ok(None);
            };
            let chunk = &entries[..take];
            let messages: Vec<&Pending> = chunk.iter().filter_map(Entry::message).collect();
            let outcome = match self.commit(&target, &messages).await? {
                Some(outcome) => outcome,
                None => return Ok(Some(PassEnd::Shutdown)),
            };
            match outcome {
                CommitOutcome::Committed {
                    revision,
                    enqueued,
                    duplicates,
                } => {
                    emit(ChunkCommitted {
                        stats: &self.shared.stats,
                        stream: self.stream_id,
                        checkpoint: &target,
                        enqueued: enqueued as u64,
                        duplicates: &duplicates,
                        skipped: chunk.iter().filter(|e| e.message().is_none()).count() as u64,
                    });
                    self.expected_rev = revision;
                    self.committed_row = target.row;
                    self.enqueued += enqueued as u64;
                    if target.pass_complete {
                        return Ok(None);
                    }
                }
                CommitOutcome::Conflict {
                    current,
                    mod_revision,
                } => {
                    if let Some(end) = self.adopt(current.as_ref(), mod_revision)? {
                        return Ok(Some(end));
                    }
                }
            }
        }
    }

    /// Waits for queue room (only chunks that add messages wait: a checkpoint-only commit never
    /// makes the queue deeper), then commits. `None` at shutdown.
    async fn commit(
        &self,
        target: &Checkpoint,
        messages: &[&Pending],
    ) -> Result<Option<CommitOutcome>, StreamerError> {
        let shared = self.shared;
        if !messages.is_empty() {
            match shared.gauge.admit(messages.len(), &shared.shutdown).await {
                Ok(()) => {}
                Err(telemetry_shared::etcd::EtcdError::Cancelled) => return Ok(None),
                Err(err) => return Err(StreamerError::Sink(err.into())),
            }
        }
        match shared
            .sink
            .commit(self.stream_id, self.expected_rev, target, messages)
            .await
        {
            Ok(outcome) => Ok(Some(outcome)),
            Err(err) if err.is_cancelled() => Ok(None),
            Err(err) => Err(err.into()),
        }
    }

    /// Takes over the position a same-id streamer stored (`current`, at `mod_revision`), after
    /// checking it streams the same file. `Some(end)` if the pass ends here.
    fn adopt(
        &mut self,
        current: Option<&Checkpoint>,
        mod_revision: i64,
    ) -> Result<Option<PassEnd>, StreamerError> {
        emit(CheckpointConflict {
            stats: &self.shared.stats,
            stream: self.stream_id,
            current,
        });
        if current.is_none() && self.expected_rev != 0 {
            return Err(SinkError::CheckpointDeleted {
                stream: self.stream_id.to_string(),
            }
            .into());
        }
        let shared = self.shared;
        check_source(self.stream_id, &shared.csv_path, &shared.fingerprint, current)?;
        self.expected_rev = mod_revision;
        Ok(match adopt(current, self.pass, self.committed_row) {
            Adoption::Complete => Some(PassEnd::Complete),
            Adoption::Resume { committed_row } => {
                self.committed_row = committed_row;
                None
            }
            Adoption::Restart => Some(PassEnd::Restart),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::tests::pending;

    const FP: &str = "sha256:aa";

    fn cp(pass: u64, row: u64, pass_complete: bool) -> Checkpoint {
        Checkpoint {
            pass,
            row,
            pass_complete,
            source_fingerprint: Some(FP.into()),
            scrape_time: None,
            commit: None,
        }
    }

    fn message(row: u64, bytes: usize) -> Entry {
        Entry::Message(Box::new(pending(row, bytes)))
    }

    #[test]
    fn a_pass_starts_after_the_checkpoint() {
        assert_eq!(
            plan_start(None, false, None),
            Start::Pass {
                pass: 0,
                after_row: 0
            }
        );
        assert_eq!(
            plan_start(Some(&cp(2, 40, false)), false, None),
            Start::Pass {
                pass: 2,
                after_row: 40
            }
        );
        assert_eq!(
            plan_start(Some(&cp(2, 40, true)), true, None),
            Start::Pass {
                pass: 3,
                after_row: 0
            },
            "loop mode starts the next pass"
        );
        assert_eq!(
            plan_start(Some(&cp(2, 40, true)), false, None),
            Start::AlreadyComplete { pass: 2 }
        );
        assert_eq!(
            plan_start(Some(&cp(3, 5, false)), false, Some(2)),
            Start::CompletedByOther { pass: 2 },
            "a one-shot worker does not stream a pass a looping same-id streamer began"
        );
        assert_eq!(
            plan_start(Some(&cp(3, 5, false)), true, Some(2)),
            Start::Pass {
                pass: 3,
                after_row: 5
            }
        );
    }

    #[test]
    fn a_checkpoint_of_another_file_is_refused() {
        let path = Path::new("/data/b.csv");
        check_source("s-w0", path, FP, None).expect("a new stream");
        check_source("s-w0", path, FP, Some(&cp(0, 3, true))).expect("the same file");
        let legacy = Checkpoint {
            source_fingerprint: None,
            ..cp(0, 3, false)
        };
        check_source("s-w0", path, FP, Some(&legacy)).expect("a checkpoint without a fingerprint");
        let err = check_source("s-w0", path, "sha256:bb", Some(&cp(0, 3, false))).expect_err("another file");
        let text = err.to_string();
        for part in [
            "s-w0",
            "different file",
            "/data/b.csv",
            "sha256:aa",
            "sha256:bb",
            "STREAM_ID",
        ] {
            assert!(text.contains(part), "{part:?} missing from: {text}");
        }
    }

    #[test]
    fn a_chunk_takes_at_most_126_messages_and_skips_ride_along() {
        let mut entries: Vec<Entry> = (2..=140).map(|r| message(r, 100)).collect();
        entries.insert(0, Entry::Skip(1));
        let chunk = next_chunk(&entries, 1, 0, None, FP, &|_| true).expect("a chunk");
        assert_eq!(chunk.take, 1 + MAX_ROWS_PER_TXN);
        assert_eq!(
            chunk.target,
            Checkpoint {
                pass: 1,
                row: 1 + MAX_ROWS_PER_TXN as u64,
                pass_complete: false,
                source_fingerprint: Some(FP.into()),
                scrape_time: None,
                commit: None,
            }
        );
        // A skip after the 126th message still fits: it writes nothing but the checkpoint.
        let entries: Vec<Entry> = (1..=126)
            .map(|r| message(r, 1))
            .chain([Entry::Skip(127)])
            .collect();
        assert_eq!(
            next_chunk(&entries, 0, 0, None, FP, &|_| true)
                .expect("chunk")
                .take,
            127
        );
    }

    #[test]
    fn a_chunk_stays_under_the_byte_limit_but_always_takes_one_message() {
        let big = MAX_MESSAGE_BYTES;
        let entries = vec![message(1, big), message(2, big), message(3, big)];
        let chunk = next_chunk(&entries, 0, 0, None, FP, &|_| true).expect("chunk");
        assert_eq!(chunk.take, 2, "two of 512 KiB fill 1 MiB");
        let huge = vec![message(1, MAX_TXN_BYTES + 1), message(2, 1)];
        assert_eq!(
            next_chunk(&huge, 0, 0, None, FP, &|_| true).expect("chunk").take,
            1
        );
    }

    #[test]
    fn the_last_chunk_of_a_pass_marks_it_complete() {
        assert_eq!(next_chunk(&[], 0, 5, None, FP, &|_| true), None, "nothing to do");
        let end = next_chunk(&[], 0, 5, Some(9), FP, &|_| true).expect("checkpoint-only commit");
        assert_eq!((end.take, end.target.row, end.target.pass_complete), (0, 9, true));
        let entries = vec![message(6, 1), Entry::Skip(7)];
        let last = next_chunk(&entries, 0, 5, Some(7), FP, &|_| true).expect("chunk");
        assert_eq!(
            (last.take, last.target.row, last.target.pass_complete),
            (2, 7, true)
        );
        // Not the last chunk: the pass is not complete yet.
        let entries: Vec<Entry> = (6..=200).map(|r| message(r, 1)).collect();
        let first = next_chunk(&entries, 0, 5, Some(200), FP, &|_| true).expect("chunk");
        assert_eq!((first.target.row, first.target.pass_complete), (131, false));
        assert_eq!(first.target.source_fingerprint.as_deref(), Some(FP));
    }

    #[test]
    fn a_conflict_adopts_the_stored_position() {
        assert_eq!(adopt(Some(&cp(0, 9, true)), 0, 3), Adoption::Complete);
        assert_eq!(
            adopt(Some(&cp(0, 9, false)), 0, 3),
            Adoption::Resume { committed_row: 9 }
        );
        assert_eq!(
            adopt(Some(&cp(0, 2, false)), 0, 3),
            Adoption::Resume { committed_row: 3 },
            "never goes back"
        );
        assert_eq!(adopt(Some(&cp(1, 0, false)), 0, 3), Adoption::Restart);
        assert_eq!(adopt(None, 0, 3), Adoption::Restart);
    }

    #[test]
    fn batches_flush_in_whole_transactions() {
        assert_eq!(flush_at(100), 100);
        assert_eq!(flush_at(200), 126);
        assert_eq!(flush_at(1000), 882);
        assert_eq!(flush_at(10), 10);
    }
}
