//! The sink: enqueues prepared messages into etcd, exactly once.
//!
//! One transaction per chunk of at most [`MAX_ROWS_PER_TXN`] messages:
//!
//! - **compare** the stream checkpoint's `mod_revision` equals the one this worker last saw
//!   (the fence: two streamers with the same stream id cannot both advance it), and each
//!   message's dedup marker does not exist (`create_revision == 0`);
//! - **then** put each queue entry, put each dedup marker (attached to the current time-bucket
//!   lease), and put the advanced checkpoint;
//! - **else** read back the checkpoint and the markers, so the caller learns in the same round
//!   trip whether it lost the fence or which messages were duplicates.
//!
//! Duplicates are absorbed by dropping them and retrying the rest; the checkpoint still moves
//! past them. A write whose outcome is unknown (timeout, leader change) is retried as is: the
//! compares make a second application impossible, and a fence conflict after such an error is
//! checked against the queue to tell "our earlier attempt landed" from "someone else moved".

use std::{sync::Arc, time::Duration};

use etcd_client::{Client, Compare, CompareOp, GetOptions, PutOptions, TxnOp, TxnOpResponse};
use telemetry_shared::{
    Checkpoint, Keyspace,
    etcd::{
        BoundedTxn, BucketedLease, EtcdError, MAX_TXN_OPS, is_indeterminate, is_lease_not_found, is_retryable,
    },
};
use tokio_util::sync::CancellationToken;

use crate::transform::Prepared;

/// Most messages per transaction: two puts each plus the checkpoint put must fit etcd's
/// 128-operation limit.
pub const MAX_ROWS_PER_TXN: usize = (MAX_TXN_OPS - 1) / 2;

/// Most value bytes per transaction, well under etcd's 1.5 MiB request limit.
pub const MAX_TXN_BYTES: usize = 1024 * 1024;

/// Largest single encoded message; a bigger row is skipped as malformed.
pub const MAX_MESSAGE_BYTES: usize = 512 * 1024;

/// A message encoded and ready for the transaction.
#[derive(Debug, Clone)]
pub struct Pending {
    /// Source row number.
    pub row: u64,
    /// The message and its partition.
    pub prepared: Prepared,
    /// The message as JSON.
    pub encoded: Vec<u8>,
}

/// The result of one commit.
#[derive(Debug, Clone, PartialEq)]
pub enum CommitOutcome {
    /// The chunk landed: `enqueued` messages are in the queue, `duplicates` rows were absorbed,
    /// and the checkpoint now has `revision` as its `mod_revision`.
    Committed {
        /// The checkpoint's new `mod_revision`.
        revision: i64,
        /// Messages written.
        enqueued: usize,
        /// Row numbers absorbed as duplicates.
        duplicates: Vec<u64>,
    },
    /// The checkpoint moved under us: `current` is what it is now (at `mod_revision`).
    Conflict {
        /// The checkpoint as stored now (`None` if deleted).
        current: Option<Checkpoint>,
        /// Its `mod_revision` (0 if absent).
        mod_revision: i64,
    },
}

/// Errors of the sink.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// An etcd error that retrying will not fix.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The stored checkpoint is not valid JSON.
    #[error("checkpoint of stream {stream} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The stream id.
        stream: String,
        /// The parse error.
        reason: String,
    },
}

impl From<etcd_client::Error> for SinkError {
    fn from(err: etcd_client::Error) -> Self {
        SinkError::Etcd(EtcdError::Client(err))
    }
}

/// Writes chunks of messages into the queue; cheap to clone (one per worker).
#[derive(Clone)]
pub struct Sink {
    client: Client,
    keys: Keyspace,
    markers: Arc<BucketedLease>,
    shutdown: CancellationToken,
}

impl Sink {
    /// A sink writing below `keys`, attaching dedup markers to leases from `markers`.
    pub fn new(
        client: Client,
        keys: Keyspace,
        markers: Arc<BucketedLease>,
        shutdown: CancellationToken,
    ) -> Self {
        Sink {
            client,
            keys,
            markers,
            shutdown,
        }
    }

    /// Reads a stream's checkpoint and its `mod_revision` (0 when it does not exist yet),
    /// retrying while etcd is unavailable.
    pub async fn read_checkpoint(&self, stream_id: &str) -> Result<(Option<Checkpoint>, i64), SinkError> {
        let key = self.keys.stream_checkpoint(stream_id);
        let mut backoff = Backoff::new();
        loop {
            match self.client.clone().get(key.as_str(), None).await {
                Ok(resp) => return decode_checkpoint(stream_id, resp.kvs().first()),
                Err(err) if is_retryable(&err) => backoff.wait(&self.shutdown, &err).await?,
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Commits `entries` and advances the checkpoint to `target`, fenced by `expected_rev`.
    /// `entries` must be at most [`MAX_ROWS_PER_TXN`] long and under [`MAX_TXN_BYTES`].
    pub async fn commit(
        &self,
        stream_id: &str,
        expected_rev: i64,
        target: Checkpoint,
        entries: &[Pending],
    ) -> Result<CommitOutcome, SinkError> {
        let checkpoint_key = self.keys.stream_checkpoint(stream_id);
        let checkpoint_value = serde_json::to_vec(&target).map_err(|e| SinkError::CorruptCheckpoint {
            stream: stream_id.to_string(),
            reason: e.to_string(),
        })?;
        let mut live: Vec<&Pending> = entries.iter().collect();
        let mut duplicates = Vec::new();
        let mut uncertain = false;
        let mut backoff = Backoff::new();
        loop {
            let lease = match self.markers.current().await {
                Ok(lease) => lease,
                Err(EtcdError::Client(err)) if is_retryable(&err) => {
                    backoff.wait(&self.shutdown, &err).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let markers: Vec<String> = live
                .iter()
                .map(|p| self.keys.enqueued_marker(&p.prepared.message.idempotency_key))
                .collect();
            let mut txn = BoundedTxn::new();
            txn.compare(Compare::mod_revision(
                checkpoint_key.as_str(),
                CompareOp::Equal,
                expected_rev,
            ));
            txn.otherwise(TxnOp::get(checkpoint_key.as_str(), None));
            for (pending, marker) in live.iter().zip(&markers) {
                let message = &pending.prepared.message;
                txn.compare(Compare::create_revision(marker.as_str(), CompareOp::Equal, 0));
                txn.then(TxnOp::put(
                    self.keys
                        .queue_entry(pending.prepared.partition, &message.id.to_string()),
                    pending.encoded.clone(),
                    None,
                ));
                txn.then(TxnOp::put(
                    marker.as_str(),
                    message.id.to_string(),
                    Some(PutOptions::new().with_lease(lease)),
                ));
                txn.otherwise(TxnOp::get(
                    marker.as_str(),
                    Some(GetOptions::new().with_keys_only()),
                ));
            }
            txn.then(TxnOp::put(
                checkpoint_key.as_str(),
                checkpoint_value.clone(),
                None,
            ));
            let started = std::time::Instant::now();
            let result = self.client.clone().txn(txn.build()?).await;
            metrics::histogram!("streamer_txn_seconds").record(started.elapsed().as_secs_f64());
            let resp = match result {
                Ok(resp) => resp,
                Err(err) if is_lease_not_found(&err) => {
                    self.markers.invalidate(lease);
                    backoff.wait(&self.shutdown, &err).await?;
                    continue;
                }
                Err(err) if is_retryable(&err) => {
                    uncertain |= is_indeterminate(&err);
                    backoff.wait(&self.shutdown, &err).await?;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            if resp.succeeded() {
                let revision = resp.header().map_or(0, |h| h.revision());
                return Ok(CommitOutcome::Committed {
                    revision,
                    enqueued: live.len(),
                    duplicates,
                });
            }
            let responses = resp.op_responses();
            let mut responses = responses.into_iter();
            let (current, mod_revision) = match responses.next() {
                Some(TxnOpResponse::Get(get)) => decode_checkpoint(stream_id, get.kvs().first())?,
                _ => (None, 0),
            };
            if mod_revision != expected_rev {
                if uncertain && current == Some(target) && self.landed(live.first().copied()).await? {
                    // Our earlier attempt (whose reply was lost) is the one that landed.
                    return Ok(CommitOutcome::Committed {
                        revision: mod_revision,
                        enqueued: live.len(),
                        duplicates,
                    });
                }
                return Ok(CommitOutcome::Conflict {
                    current,
                    mod_revision,
                });
            }
            let before = live.len();
            let mut keep = Vec::with_capacity(live.len());
            for (pending, resp) in live.into_iter().zip(responses) {
                let exists = matches!(&resp, TxnOpResponse::Get(get) if !get.kvs().is_empty());
                if exists {
                    tracing::debug!(row = pending.row, key = %pending.prepared.message.idempotency_key, "duplicate absorbed");
                    duplicates.push(pending.row);
                } else {
                    keep.push(pending);
                }
            }
            live = keep;
            if live.len() == before {
                // Unreachable while etcd applies compares and reads atomically; do not spin.
                tracing::warn!("dedup compare failed but no marker found; retrying");
                backoff.idle(&self.shutdown).await?;
            }
        }
    }

    /// Is `pending`'s queue entry present (or already consumed, per its processed marker)?
    async fn landed(&self, pending: Option<&Pending>) -> Result<bool, SinkError> {
        let Some(pending) = pending else {
            return Ok(true);
        };
        let message = &pending.prepared.message;
        let marker = self.keys.enqueued_marker(&message.idempotency_key);
        let mut backoff = Backoff::new();
        let resp = loop {
            match self.client.clone().get(marker.as_str(), None).await {
                Ok(resp) => break resp,
                Err(err) if is_retryable(&err) => backoff.wait(&self.shutdown, &err).await?,
                Err(err) => return Err(err.into()),
            }
        };
        Ok(resp
            .kvs()
            .first()
            .is_some_and(|kv| kv.value() == message.id.to_string().as_bytes()))
    }
}

fn decode_checkpoint(
    stream_id: &str,
    kv: Option<&etcd_client::KeyValue>,
) -> Result<(Option<Checkpoint>, i64), SinkError> {
    match kv {
        None => Ok((None, 0)),
        Some(kv) => {
            let cp: Checkpoint =
                serde_json::from_slice(kv.value()).map_err(|e| SinkError::CorruptCheckpoint {
                    stream: stream_id.to_string(),
                    reason: e.to_string(),
                })?;
            Ok((Some(cp), kv.mod_revision()))
        }
    }
}

/// Capped exponential backoff that logs once per outage and gives up on shutdown.
pub(crate) struct Backoff {
    delay: Duration,
    warned: bool,
}

impl Backoff {
    pub(crate) fn new() -> Self {
        Backoff {
            delay: Duration::from_millis(50),
            warned: false,
        }
    }

    pub(crate) async fn wait(
        &mut self,
        shutdown: &CancellationToken,
        err: &etcd_client::Error,
    ) -> Result<(), SinkError> {
        if !self.warned {
            tracing::warn!(error = %err, "etcd unavailable; retrying with backoff");
            self.warned = true;
        }
        metrics::counter!("streamer_etcd_retries_total").increment(1);
        tokio::select! {
            _ = shutdown.cancelled() => return Err(SinkError::Etcd(EtcdError::Cancelled)),
            _ = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }

    /// Waits one backoff step without an error to report.
    pub(crate) async fn idle(&mut self, shutdown: &CancellationToken) -> Result<(), SinkError> {
        tokio::select! {
            _ = shutdown.cancelled() => return Err(SinkError::Etcd(EtcdError::Cancelled)),
            _ = tokio::time::sleep(self.delay) => {}
        }
        self.delay = (self.delay * 2).min(Duration::from_secs(5));
        Ok(())
    }
}
