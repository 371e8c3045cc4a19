//! The sink: enqueues prepared messages into etcd, exactly once.
//!
//! One transaction per chunk of at most [`MAX_ROWS_PER_TXN`] messages:
//!
//! - **compare** the stream checkpoint's `mod_revision` equals the one this worker last saw
//!   (the fence: two streamers with the same stream id cannot both advance it, so each position
//!   of a stream is enqueued once), and, for each message deduplicated by a marker
//!   ([`Dedup::Marker`]: scraped samples), that its dedup marker does not exist
//!   (`create_revision == 0`);
//! - **then** put each queue entry, put each such dedup marker (attached to the current
//!   time-bucket lease), and put the advanced checkpoint, which names this commit;
//! - **else** (sent only when a compare failed) read back the checkpoint and the markers, so the
//!   caller learns whether it lost the fence or which messages were duplicates.
//!
//! Duplicates are absorbed by dropping them and retrying the rest; the checkpoint still moves
//! past them. A write whose outcome is unknown (timeout, leader change) is retried as is: the
//! compares make a second application impossible, and a fence conflict after such an error is
//! told apart by the checkpoint's commit id: ours means our earlier attempt landed.
//!
//! What is decided is pure and unit-tested without etcd: [`plan_txn`] builds the transaction,
//! [`classify`] reads its reply. [`Sink::commit`] only sends, retries and applies the verdict.

use std::{
    collections::HashSet,
    fmt::Display,
    sync::{Arc, Mutex},
    time::Instant,
};

use etcd_client::{
    Client, Compare, CompareOp, GetOptions, GetResponse, PutOptions, TxnOp, TxnOpResponse, TxnResponse,
};
use telemetry_shared::{
    Checkpoint, Keyspace,
    etcd::{
        BoundedTxn, BucketedLease, EtcdError, MAX_TXN_BYTES, MAX_TXN_OPS, SplitTxn, TxnAnswer,
        is_lease_not_found, is_retryable,
    },
    health::Check,
    observe::emit,
    record::{Profile, ProfileId},
    retry::{Backoff, Policy, Stopped},
};
use tokio_util::sync::CancellationToken;

use crate::{
    events::{EnqueueTxn, EtcdRetry},
    transform::Prepared,
};

/// Most messages per transaction: their puts plus the checkpoint's and the origin's (a stream's
/// first transaction writes it) must fit etcd's 128-operation limit (fewer when messages have
/// markers or the transaction also stores new profiles).
pub(crate) const MAX_ROWS_PER_TXN: usize = MAX_TXN_OPS - 2;

/// Largest single encoded message; a bigger row is skipped as malformed.
pub(crate) const MAX_MESSAGE_BYTES: usize = 512 * 1024;

// Any message fits a transaction alone, so a chunk of one always goes through.
const _: () = assert!(MAX_MESSAGE_BYTES <= MAX_TXN_BYTES);

/// How the enqueue of a message is made a single one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dedup {
    /// By the stream's checkpoint alone. The message's key derives from its position (stream
    /// id, pass, row) and its content, and that position is in one file only (the checkpoint
    /// holds the file's fingerprint). The transaction that enqueues a position is the one that
    /// moves the checkpoint past it, fenced by the checkpoint's `mod_revision`, so a position
    /// is enqueued once for as long as the checkpoint exists (no time limit), and no marker is
    /// written. CSV rows.
    Checkpoint,
    /// By a dedup marker too: the key covers content that a later attempt may bring at another
    /// position (a scrape resumed after a crash fetches its target again, and a series'
    /// sample is found at whatever row it now sorts to). Scraped samples.
    Marker,
}

/// A message encoded and ready for the transaction.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    /// Source row number.
    pub row: u64,
    /// The message, its partition and its profile.
    pub prepared: Prepared,
    /// The lean queue entry.
    pub encoded: Vec<u8>,
    /// How its enqueue is deduplicated.
    pub dedup: Dedup,
}

impl Pending {
    /// Operations this message adds to a transaction: its queue entry, and its marker if it
    /// has one.
    pub(crate) fn ops(&self) -> usize {
        match self.dedup {
            Dedup::Checkpoint => 1,
            Dedup::Marker => 2,
        }
    }
}

/// The result of one commit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum CommitOutcome {
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
    /// The stream's checkpoint was deleted after rows were enqueued under it (its origin is
    /// still there). It is what keeps each row from being enqueued twice, so the streamer
    /// refuses instead of starting the file over.
    #[error(
        "the checkpoint of stream {stream} was deleted after rows were enqueued under it; it is \
         what keeps each row from being enqueued twice, so this streamer refuses to send the file \
         again. Restore the checkpoint, or, to send the file again on purpose, start a new stream: \
         set another STREAM_ID"
    )]
    CheckpointDeleted {
        /// The stream id (`STREAM_ID` and the worker suffix).
        stream: String,
    },
    /// The stored checkpoint is not valid JSON.
    #[error("checkpoint of stream {stream} is corrupt: {reason}")]
    CorruptCheckpoint {
        /// The stream id.
        stream: String,
        /// The parse error.
        reason: String,
    },
}

impl SinkError {
    /// Did the operation stop because of shutdown (not a failure)?
    pub(crate) fn is_cancelled(&self) -> bool {
        matches!(self, SinkError::Etcd(EtcdError::Cancelled))
    }
}

impl From<etcd_client::Error> for SinkError {
    fn from(err: etcd_client::Error) -> Self {
        SinkError::Etcd(EtcdError::Client(err))
    }
}

impl From<Stopped> for SinkError {
    /// The sink's retry policies retry until shutdown, so a stopped retry means shutdown.
    fn from(_: Stopped) -> Self {
        SinkError::Etcd(EtcdError::Cancelled)
    }
}

/// A stream's checkpoint as stored: its value (`None` if absent) and `mod_revision` (0 if
/// absent).
pub(crate) type Stored = (Option<Checkpoint>, i64);

/// One enqueue transaction, as plain data: what [`plan_txn`] decided, before it becomes an
/// etcd [`Txn`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TxnPlan {
    /// The stream's checkpoint key.
    pub checkpoint_key: String,
    /// The fence: the `mod_revision` the checkpoint must still have (0: must not exist).
    pub expected_rev: i64,
    /// The advanced checkpoint, as JSON.
    pub checkpoint_value: Vec<u8>,
    /// The stream's origin key, written (with the checkpoint's value) by the transaction that
    /// creates the checkpoint, and by a streamer's first commit to a stream whose origin it has
    /// not seen (a stream an earlier release created has none).
    pub origin_key: Option<String>,
    /// Whether the origin must not exist yet: the checkpoint is being created
    /// (`expected_rev == 0`), and an origin without a checkpoint means it was deleted.
    pub origin_guard: bool,
    /// One write per message, in order.
    pub writes: Vec<EntryWrite>,
    /// The lease the dedup markers are attached to (0 when no message has one).
    pub lease: i64,
    /// Profiles the entries name that are not known to be stored: (key, value).
    pub profiles: Vec<(String, Vec<u8>)>,
}

/// What one message writes: its queue entry and, for [`Dedup::Marker`], its dedup marker.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EntryWrite {
    /// The queue entry's key.
    pub queue_key: String,
    /// The lean queue entry.
    pub value: Vec<u8>,
    /// The dedup marker's key (must not exist yet), if the message has one. Its value is
    /// empty: the marker written in the same transaction as the entry has the entry's revision,
    /// which is what the collector compares.
    pub marker_key: Option<String>,
}

/// Plans the transaction of `request` that enqueues `entries`, with markers on `lease`, storing
/// the `profiles` the entries name that are not known to be stored.
pub(crate) fn plan_txn(
    keys: &Keyspace,
    request: &Request<'_>,
    entries: &[&Pending],
    lease: i64,
    profiles: &[(ProfileId, Arc<Profile>)],
) -> TxnPlan {
    let (stream_id, expected_rev) = (request.stream_id, request.expected_rev);
    let writes = entries
        .iter()
        .map(|pending| {
            let message = &pending.prepared.message;
            EntryWrite {
                queue_key: keys.queue_entry(pending.prepared.partition, &message.id.to_string()),
                value: pending.encoded.clone(),
                marker_key: (pending.dedup == Dedup::Marker)
                    .then(|| keys.dedup_marker(&message.idempotency_key)),
            }
        })
        .collect();
    TxnPlan {
        checkpoint_key: keys.stream_checkpoint(stream_id),
        expected_rev,
        checkpoint_value: request.checkpoint_value.clone(),
        origin_key: (expected_rev == 0 || request.origin == Origin::Unknown)
            .then(|| keys.stream_origin(stream_id)),
        origin_guard: expected_rev == 0,
        writes,
        lease,
        profiles: profiles
            .iter()
            .map(|(id, p)| (keys.profile(*id), p.encode()))
            .collect(),
    }
}

/// How many of `entries` (at least one, if any) fit one transaction: [`Pending::ops`] per
/// message, one per profile not yet `written`, two for the checkpoint and origin, within etcd's operation
/// limit, [`MAX_ROWS_PER_TXN`] and [`MAX_TXN_BYTES`].
pub(crate) fn chunk_len(entries: &[Pending], written: &dyn Fn(ProfileId) -> bool) -> usize {
    let (mut taken, mut bytes, mut message_ops) = (0, 0, 0);
    let mut profiles: Vec<ProfileId> = Vec::new();
    for p in entries {
        let (id, profile) = &p.prepared.profile;
        let new_profile = !written(*id) && !profiles.contains(id);
        let extra_bytes = if new_profile { profile.encode().len() } else { 0 };
        let ops = message_ops + p.ops() + profiles.len() + usize::from(new_profile) + 2;
        if taken > 0
            && (taken == MAX_ROWS_PER_TXN
                || ops > MAX_TXN_OPS
                || bytes + p.encoded.len() + extra_bytes > MAX_TXN_BYTES)
        {
            break;
        }
        taken += 1;
        message_ops += p.ops();
        bytes += p.encoded.len() + extra_bytes;
        if new_profile {
            profiles.push(*id);
        }
    }
    taken
}

/// The distinct profiles `entries` name that `written` does not hold, in first-use order.
pub(crate) fn profiles_to_store(
    entries: &[&Pending],
    written: impl Fn(ProfileId) -> bool,
) -> Vec<(ProfileId, Arc<Profile>)> {
    let mut out: Vec<(ProfileId, Arc<Profile>)> = Vec::new();
    for pending in entries {
        let (id, profile) = &pending.prepared.profile;
        if !written(*id) && !out.iter().any(|(o, _)| o == id) {
            out.push((*id, profile.clone()));
        }
    }
    out
}

impl TxnPlan {
    /// The etcd transaction. Compares: the fence, then one marker compare per write that has
    /// a marker. Success: the queue entry and the marker (if any) of each write, then the
    /// checkpoint. Failure (sent only when a compare fails): the checkpoint, then each marker
    /// (keys only), in the order [`Reply::refused`] reads.
    pub(crate) fn build(&self) -> Result<SplitTxn, EtcdError> {
        let mut txn = BoundedTxn::new();
        txn.compare(Compare::mod_revision(
            self.checkpoint_key.as_str(),
            CompareOp::Equal,
            self.expected_rev,
        ));
        txn.otherwise(TxnOp::get(self.checkpoint_key.as_str(), None));
        if let Some(origin) = self.origin_key.as_deref().filter(|_| self.origin_guard) {
            txn.compare(Compare::create_revision(origin, CompareOp::Equal, 0));
            txn.otherwise(TxnOp::get(origin, Some(GetOptions::new().with_keys_only())));
        }
        for write in &self.writes {
            txn.then(TxnOp::put(write.queue_key.as_str(), write.value.clone(), None));
            let Some(marker) = &write.marker_key else {
                continue;
            };
            txn.compare(Compare::create_revision(marker.as_str(), CompareOp::Equal, 0));
            txn.then(TxnOp::put(
                marker.as_str(),
                Vec::new(),
                Some(PutOptions::new().with_lease(self.lease)),
            ));
            txn.otherwise(TxnOp::get(
                marker.as_str(),
                Some(GetOptions::new().with_keys_only()),
            ));
        }
        for (key, value) in &self.profiles {
            txn.then(TxnOp::put(key.as_str(), value.clone(), None));
        }
        txn.then(TxnOp::put(
            self.checkpoint_key.as_str(),
            self.checkpoint_value.clone(),
            None,
        ));
        if let Some(origin) = &self.origin_key {
            txn.then(TxnOp::put(origin.as_str(), self.checkpoint_value.clone(), None));
        }
        txn.build_split()
    }
}

/// An enqueue transaction's reply, as plain data.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    /// Every compare held: the writes are applied at `revision`.
    Succeeded {
        /// The store revision of the transaction.
        revision: i64,
    },
    /// A compare failed; what the failure branch read.
    Refused {
        /// The checkpoint's value and `mod_revision`, if it exists.
        checkpoint: Option<(Vec<u8>, i64)>,
        /// Does the stream's origin exist? (Read only by a transaction that creates the
        /// checkpoint; `false` otherwise.)
        origin_found: bool,
        /// For each write, in order: does its dedup marker exist? (`false` for a write
        /// without one.)
        markers_found: Vec<bool>,
    },
}

impl Reply {
    /// The reply of a transaction built by [`TxnPlan::build`] that was applied.
    pub(crate) fn applied(resp: &TxnResponse) -> Reply {
        Reply::Succeeded {
            revision: resp.header().map_or(0, |h| h.revision()),
        }
    }

    /// The reply of a transaction built by [`TxnPlan::build`] that was refused, from its
    /// failure branch's reads; `origin_read` says whether it read the origin (a guarded one),
    /// `marked`, for each write in order, whether it has a marker (and so a read).
    pub(crate) fn refused(
        reads: &TxnResponse,
        origin_read: bool,
        marked: impl IntoIterator<Item = bool>,
    ) -> Reply {
        let found = |read: &TxnOpResponse| matches!(read, TxnOpResponse::Get(get) if !get.kvs().is_empty());
        let mut reads = reads.op_responses().into_iter();
        let checkpoint = match reads.next() {
            Some(TxnOpResponse::Get(get)) => get
                .kvs()
                .first()
                .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
            _ => None,
        };
        let origin_found = origin_read && reads.next().is_some_and(|read| found(&read));
        let markers_found = marked
            .into_iter()
            .map(|marked| marked && reads.next().is_some_and(|read| found(&read)))
            .collect();
        Reply::Refused {
            checkpoint,
            origin_found,
            markers_found,
        }
    }
}

/// What a reply means for the commit.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Verdict {
    /// The chunk landed; the checkpoint's new `mod_revision`.
    Committed {
        /// The transaction's revision.
        revision: i64,
    },
    /// The fence held but these writes' markers exist (by index): they are duplicates, to be
    /// dropped before retrying the rest.
    Duplicates(Vec<usize>),
    /// Another writer moved the checkpoint.
    Conflict {
        /// The checkpoint as stored now.
        current: Option<Checkpoint>,
        /// Its `mod_revision`.
        mod_revision: i64,
    },
    /// Refused, yet neither the fence nor a marker explains it. The reads come after the
    /// refusal, so a marker whose lease ended in between (its dedup window was over) is read as
    /// absent; the caller waits and retries, and the retry's compares decide.
    Unexplained,
}

/// Classifies `reply` for a commit of `stream_id` fenced at `expected_rev` towards `target`,
/// which names this commit ([`Checkpoint::commit`]): a moved checkpoint that holds `target`
/// was moved by an earlier attempt of this commit whose reply was lost, so it landed.
pub(crate) fn classify(
    reply: Reply,
    stream_id: &str,
    expected_rev: i64,
    target: &Checkpoint,
) -> Result<Verdict, SinkError> {
    let (checkpoint, origin_found, markers_found) = match reply {
        Reply::Succeeded { revision } => return Ok(Verdict::Committed { revision }),
        Reply::Refused {
            checkpoint,
            origin_found,
            markers_found,
        } => (checkpoint, origin_found, markers_found),
    };
    let (current, mod_revision) = decode_checkpoint(
        stream_id,
        checkpoint.as_ref().map(|(value, rev)| (value.as_slice(), *rev)),
    )?;
    if current.is_none() && origin_found {
        return Err(SinkError::CheckpointDeleted {
            stream: stream_id.to_string(),
        });
    }
    if mod_revision != expected_rev {
        if current.as_ref() == Some(target) {
            return Ok(Verdict::Committed {
                revision: mod_revision,
            });
        }
        return Ok(Verdict::Conflict {
            current,
            mod_revision,
        });
    }
    let found: Vec<usize> = markers_found
        .iter()
        .enumerate()
        .filter_map(|(i, found)| found.then_some(i))
        .collect();
    if found.is_empty() {
        return Ok(Verdict::Unexplained);
    }
    Ok(Verdict::Duplicates(found))
}

fn encode_checkpoint(stream_id: &str, checkpoint: &Checkpoint) -> Result<Vec<u8>, SinkError> {
    serde_json::to_vec(checkpoint).map_err(|e| SinkError::CorruptCheckpoint {
        stream: stream_id.to_string(),
        reason: e.to_string(),
    })
}

/// Decodes a stored checkpoint (its value and `mod_revision`).
fn decode_checkpoint(stream_id: &str, stored: Option<(&[u8], i64)>) -> Result<Stored, SinkError> {
    match stored {
        None => Ok((None, 0)),
        Some((value, mod_revision)) => {
            let cp: Checkpoint = serde_json::from_slice(value).map_err(|e| SinkError::CorruptCheckpoint {
                stream: stream_id.to_string(),
                reason: e.to_string(),
            })?;
            Ok((Some(cp), mod_revision))
        }
    }
}

/// What stays the same across the attempts of one commit.
pub(crate) struct Request<'a> {
    /// The stream.
    pub stream_id: &'a str,
    /// The fence: the `mod_revision` the checkpoint must still have (0: must not exist).
    pub expected_rev: i64,
    /// The advanced checkpoint, as JSON.
    pub checkpoint_value: Vec<u8>,
    /// Whether the stream's origin is known to be stored.
    pub origin: Origin,
}

/// What a streamer knows of a stream's origin key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// Read or written by this process.
    Stored,
    /// Not seen yet: the next commit writes it.
    Unknown,
}

/// Writes chunks of messages into the queue; cheap to clone (one per worker).
#[derive(Clone)]
pub(crate) struct Sink {
    client: Client,
    keys: Keyspace,
    markers: Arc<BucketedLease>,
    shutdown: CancellationToken,
    /// Profiles known to be stored (written by a transaction that landed, by any worker).
    written: Arc<Mutex<HashSet<ProfileId>>>,
    /// Streams whose origin is known to be stored (read, or written by a commit that landed).
    origins: Arc<Mutex<HashSet<String>>>,
    /// Readiness: fails while etcd requests are being retried, passes at each commit.
    commits: Check,
}

impl Sink {
    /// A sink writing below `keys`, attaching dedup markers to leases from `markers`.
    pub(crate) fn new(
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
            written: Arc::default(),
            origins: Arc::default(),
            commits: Check::detached(),
        }
    }

    /// Reports the sink's state to readiness `check`.
    pub(crate) fn reporting_to(mut self, check: Check) -> Self {
        self.commits = check;
        self
    }

    /// Is profile `id` known to be stored?
    pub(crate) fn is_written(&self, id: ProfileId) -> bool {
        self.written.lock().is_ok_and(|w| w.contains(&id))
    }

    fn origin_known(&self, stream_id: &str) -> bool {
        self.origins.lock().is_ok_and(|o| o.contains(stream_id))
    }

    fn mark_origin(&self, stream_id: &str) {
        if let Ok(mut origins) = self.origins.lock() {
            origins.insert(stream_id.to_string());
        }
    }

    fn mark_written(&self, profiles: &[(ProfileId, Arc<Profile>)]) {
        if let Ok(mut written) = self.written.lock() {
            written.extend(profiles.iter().map(|(id, _)| *id));
        }
    }

    /// Reads a stream's checkpoint and its `mod_revision` (0 when it does not exist yet),
    /// retrying while etcd is unavailable.
    pub(crate) async fn read_checkpoint(&self, stream_id: &str) -> Result<Stored, SinkError> {
        let resp = self
            .get(&self.keys.stream_checkpoint(stream_id), "checkpoint read")
            .await?;
        decode_checkpoint(
            stream_id,
            resp.kvs().first().map(|kv| (kv.value(), kv.mod_revision())),
        )
    }

    /// Reads a stream's checkpoint as [`Sink::read_checkpoint`] does; `None` if it was deleted
    /// after it was created (its origin is there, it is not).
    pub(crate) async fn read_checkpoint_unless_deleted(
        &self,
        stream_id: &str,
    ) -> Result<Option<Stored>, SinkError> {
        let stored = self.read_checkpoint(stream_id).await?;
        if stored.0.is_some() {
            return Ok(Some(stored));
        }
        let origin = self
            .get(&self.keys.stream_origin(stream_id), "origin read")
            .await?;
        if !origin.kvs().is_empty() {
            self.mark_origin(stream_id);
        }
        if origin.kvs().is_empty() {
            return Ok(Some(stored));
        }
        // The origin is written with the stream's first checkpoint, so one that appeared between
        // the two reads is a same-id streamer's first commit; none now means it was deleted.
        let again = self.read_checkpoint(stream_id).await?;
        Ok(again.0.is_some().then_some(again))
    }

    /// Commits `entries` and advances the checkpoint to `target`, fenced by `expected_rev`.
    /// `entries` must be at most [`MAX_ROWS_PER_TXN`] long and under
    /// [`telemetry_shared::etcd::MAX_TXN_BYTES`].
    pub(crate) async fn commit(
        &self,
        stream_id: &str,
        expected_rev: i64,
        target: &Checkpoint,
        entries: &[&Pending],
    ) -> Result<CommitOutcome, SinkError> {
        // Named by a fresh id, the target tells our own landed attempt apart from another
        // writer's, whatever position that one reached.
        let target = Checkpoint {
            commit: Some(ulid::Ulid::from_datetime(std::time::SystemTime::now()).to_string()),
            ..target.clone()
        };
        let request = Request {
            stream_id,
            expected_rev,
            checkpoint_value: encode_checkpoint(stream_id, &target)?,
            origin: if self.origin_known(stream_id) {
                Origin::Stored
            } else {
                Origin::Unknown
            },
        };
        let mut live: Vec<&Pending> = entries.to_vec();
        // Every profile the chunk names is stored with it, even one a duplicate named: later
        // entries may name it too.
        let profiles = profiles_to_store(&live, |id| self.is_written(id));
        let mut duplicates = Vec::new();
        let mut backoff = Backoff::new(Policy::FAST, "enqueue transaction");
        loop {
            let Some(reply) = self.attempt(&request, &live, &profiles, &mut backoff).await? else {
                continue;
            };
            let revision = match classify(reply, stream_id, expected_rev, &target)? {
                Verdict::Committed { revision } => revision,
                Verdict::Conflict {
                    current,
                    mod_revision,
                } => {
                    return Ok(CommitOutcome::Conflict {
                        current,
                        mod_revision,
                    });
                }
                Verdict::Duplicates(found) => {
                    let (kept, absorbed) = absorb(live, &found);
                    live = kept;
                    duplicates.extend(absorbed);
                    continue;
                }
                Verdict::Unexplained => {
                    tracing::warn!(stream = %stream_id, "dedup compare failed but no marker found; retrying");
                    backoff.wait(&self.shutdown).await?;
                    continue;
                }
            };
            self.mark_written(&profiles);
            self.mark_origin(stream_id);
            self.commits.pass("committing");
            return Ok(CommitOutcome::Committed {
                revision,
                enqueued: live.len(),
                duplicates,
            });
        }
    }

    /// One attempt of `request` with the `live` entries: takes the marker lease (if a message
    /// has a marker), builds and sends the transaction. `Ok(None)` after a failure worth
    /// retrying (the backoff has been waited). An attempt whose outcome is unknown (a timeout,
    /// a leader change) is retried like any other: its compares make a second application
    /// impossible, and [`classify`] recognises its landing by the checkpoint's commit id.
    async fn attempt(
        &self,
        request: &Request<'_>,
        live: &[&Pending],
        profiles: &[(ProfileId, Arc<Profile>)],
        backoff: &mut Backoff,
    ) -> Result<Option<Reply>, SinkError> {
        let marked = || live.iter().map(|p| p.dedup == Dedup::Marker);
        let lease = if marked().any(|m| m) {
            match self.markers.current().await {
                Ok(lease) => lease,
                Err(EtcdError::Client(err)) if is_retryable(&err) => {
                    self.retry(backoff, &err).await?;
                    return Ok(None);
                }
                Err(err) => return Err(err.into()),
            }
        } else {
            0
        };
        let plan = plan_txn(&self.keys, request, live, lease, profiles);
        let origin_read = plan.origin_guard;
        let txn = plan.build()?;
        match self.send(request.stream_id, live.len(), txn).await {
            Ok(TxnAnswer::Applied(resp)) => {
                backoff.succeeded();
                Ok(Some(Reply::applied(&resp)))
            }
            Ok(TxnAnswer::Refused(Ok(reads))) => {
                backoff.succeeded();
                Ok(Some(Reply::refused(&reads, origin_read, marked())))
            }
            // Refused for certain (nothing applied), but what failed is unread: try again.
            Ok(TxnAnswer::Refused(Err(err))) if is_retryable(&err) => {
                self.retry(backoff, &err).await?;
                Ok(None)
            }
            Ok(TxnAnswer::Refused(Err(err))) => Err(err.into()),
            Err(err) if is_lease_not_found(&err) => {
                self.markers.invalidate(lease);
                self.retry(backoff, &err).await?;
                Ok(None)
            }
            Err(err) if is_retryable(&err) => {
                self.retry(backoff, &err).await?;
                Ok(None)
            }
            Err(err) => Err(err.into()),
        }
    }

    /// Sends one transaction attempt and times it.
    async fn send(
        &self,
        stream_id: &str,
        messages: usize,
        txn: SplitTxn,
    ) -> Result<TxnAnswer, etcd_client::Error> {
        let started = Instant::now();
        let result = txn.send(&mut self.client.clone()).await;
        let outcome = match &result {
            Ok(TxnAnswer::Applied(_)) => "committed",
            Ok(TxnAnswer::Refused(_)) => "refused",
            Err(_) => "error",
        };
        emit(EnqueueTxn {
            stream: stream_id,
            messages,
            seconds: started.elapsed().as_secs_f64(),
            outcome,
        });
        result
    }

    /// Reads `key`, retrying while etcd is unavailable.
    async fn get(&self, key: &str, what: &'static str) -> Result<GetResponse, SinkError> {
        let mut backoff = Backoff::new(Policy::ETCD, what);
        loop {
            match self.client.clone().get(key, None).await {
                Ok(resp) => {
                    backoff.succeeded();
                    return Ok(resp);
                }
                Err(err) if is_retryable(&err) => self.retry(&mut backoff, &err).await?,
                Err(err) => return Err(err.into()),
            }
        }
    }

    /// Counts and logs a retryable failure, then waits the backoff (or returns at shutdown).
    async fn retry(&self, backoff: &mut Backoff, error: &(dyn Display + Sync)) -> Result<(), SinkError> {
        emit(EtcdRetry { backoff, error });
        self.commits
            .fail(format!("etcd requests are failing (retrying): {error}"));
        backoff.wait(&self.shutdown).await?;
        Ok(())
    }
}

/// Splits `live` into the entries to retry and the rows of those at the `found` indices
/// (duplicates).
fn absorb<'a>(live: Vec<&'a Pending>, found: &[usize]) -> (Vec<&'a Pending>, Vec<u64>) {
    let mut kept = Vec::with_capacity(live.len());
    let mut absorbed = Vec::with_capacity(found.len());
    for (i, pending) in live.into_iter().enumerate() {
        if found.contains(&i) {
            absorbed.push(pending.row);
        } else {
            kept.push(pending);
        }
    }
    (kept, absorbed)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{source::ColumnTypes, transform::MessageBuilder};

    /// A CSV message for `row` whose encoded form is `bytes` long.
    pub(crate) fn pending(row: u64, bytes: usize) -> Pending {
        let mut builder = MessageBuilder::new(vec!["a".into()], ColumnTypes::all_auto(1), &[]);
        Pending {
            row,
            prepared: builder.build("s-w0", 0, row, &[row.to_string()]),
            encoded: vec![b'x'; bytes],
            dedup: Dedup::Checkpoint,
        }
    }

    /// The same with a dedup marker (as a scraped sample has).
    fn marked(row: u64, bytes: usize) -> Pending {
        Pending {
            dedup: Dedup::Marker,
            ..pending(row, bytes)
        }
    }

    fn checkpoint(row: u64, pass_complete: bool) -> Checkpoint {
        Checkpoint {
            pass: 0,
            row,
            pass_complete,
            source_fingerprint: Some("sha256:ab".into()),
            scrape_time: None,
            commit: Some("01JD0000000000000000000000".into()),
        }
    }

    fn refused(stored: Option<&Checkpoint>, rev: i64, markers_found: Vec<bool>) -> Reply {
        Reply::Refused {
            checkpoint: stored.map(|cp| (serde_json::to_vec(cp).expect("encodes"), rev)),
            origin_found: false,
            markers_found,
        }
    }

    fn request(stream_id: &str, expected_rev: i64, origin: Origin) -> Request<'_> {
        Request {
            stream_id,
            expected_rev,
            checkpoint_value: b"{}".to_vec(),
            origin,
        }
    }

    #[test]
    fn the_plan_fences_the_checkpoint_and_guards_each_marker() {
        let keys = Keyspace::new("/t");
        let entries = [pending(1, 10), marked(2, 20)];
        let refs: Vec<&Pending> = entries.iter().collect();
        let profiles = profiles_to_store(&refs, |_| false);
        // These test messages have no partition columns, so each is its own group and profile.
        assert_eq!(profiles.len(), 2);
        let twice: Vec<&Pending> = vec![&entries[0], &entries[0]];
        assert_eq!(profiles_to_store(&twice, |_| false).len(), 1, "each profile once");
        let plan = plan_txn(&keys, &request("s-w0", 42, Origin::Stored), &refs, 7, &profiles);
        assert_eq!(plan.profiles.len(), 2);
        assert!(profiles_to_store(&refs, |_| true).is_empty());
        assert_eq!(
            (plan.checkpoint_key.as_str(), plan.expected_rev, plan.lease),
            ("/t/streams/s-w0/checkpoint", 42, 7)
        );
        assert_eq!(plan.origin_key, None, "a known origin is not written again");
        // The commit that creates the checkpoint creates the origin, which must not exist.
        let first = plan_txn(&keys, &request("s-w0", 0, Origin::Unknown), &refs, 7, &profiles);
        assert_eq!(
            (first.origin_key.as_deref(), first.origin_guard),
            (Some("/t/streams/s-w0/origin"), true)
        );
        // A stream an earlier release created has no origin: the first commit puts one.
        let legacy = plan_txn(&keys, &request("s-w0", 42, Origin::Unknown), &refs, 7, &profiles);
        assert_eq!(
            (legacy.origin_key.as_deref(), legacy.origin_guard),
            (Some("/t/streams/s-w0/origin"), false)
        );
        assert_eq!(plan.writes.len(), 2);
        for (write, entry) in plan.writes.iter().zip(&entries) {
            let message = &entry.prepared.message;
            assert_eq!(write.value, entry.encoded);
            assert_eq!(
                write.queue_key,
                keys.queue_entry(entry.prepared.partition, &message.id.to_string())
            );
            let marker = (entry.dedup == Dedup::Marker).then(|| keys.dedup_marker(&message.idempotency_key));
            assert_eq!(write.marker_key, marker);
        }
        assert_eq!(plan.writes[0].marker_key, None, "a CSV row has no marker");
        plan.build().expect("two messages fit");
    }

    #[test]
    fn a_full_chunk_fits_etcds_operation_limit_and_one_more_does_not() {
        let keys = Keyspace::new("/t");
        let entries: Vec<Pending> = (1..=MAX_ROWS_PER_TXN as u64 + 1).map(|r| pending(r, 1)).collect();
        let refs: Vec<&Pending> = entries.iter().collect();
        assert_eq!(chunk_len(&entries, &|_| true), MAX_ROWS_PER_TXN);
        let full = plan_txn(
            &keys,
            &request("s", 0, Origin::Stored),
            &refs[..MAX_ROWS_PER_TXN],
            1,
            &[],
        );
        full.build()
            .expect("126 rows, the checkpoint and the origin: 128 operations");
        let over = plan_txn(&keys, &request("s", 0, Origin::Stored), &refs, 1, &[]);
        assert!(matches!(over.build(), Err(EtcdError::TxnTooLarge { ops: 129 })));
        // With markers, two operations per message.
        let marked: Vec<Pending> = (1..=64).map(|r| marked(r, 1)).collect();
        assert_eq!(chunk_len(&marked, &|_| true), 63);
        let refs: Vec<&Pending> = marked.iter().collect();
        plan_txn(&keys, &request("s", 0, Origin::Stored), &refs[..63], 1, &[])
            .build()
            .expect("63 marked messages, the checkpoint and the origin: 128 operations");
    }

    #[test]
    fn a_successful_reply_is_committed() {
        let target = checkpoint(5, false);
        assert_eq!(
            classify(Reply::Succeeded { revision: 9 }, "s", 3, &target).expect("valid"),
            Verdict::Committed { revision: 9 }
        );
    }

    #[test]
    fn found_markers_under_an_unmoved_fence_are_duplicates() {
        let stored = checkpoint(2, false);
        let reply = refused(Some(&stored), 3, vec![false, true, false, true]);
        assert_eq!(
            classify(reply, "s", 3, &checkpoint(6, false)).expect("valid"),
            Verdict::Duplicates(vec![1, 3])
        );
        // A first commit: no checkpoint yet, fence at 0.
        let reply = refused(None, 0, vec![true]);
        assert_eq!(
            classify(reply, "s", 0, &checkpoint(1, false)).expect("valid"),
            Verdict::Duplicates(vec![0])
        );
    }

    #[test]
    fn a_moved_checkpoint_is_a_conflict_unless_it_holds_our_own_commit() {
        let target = checkpoint(6, false);
        let other = checkpoint(9, false);
        let conflict = |stored: Option<&Checkpoint>| {
            classify(refused(stored, 8, vec![true, true]), "s", 3, &target).expect("valid")
        };
        assert_eq!(
            conflict(Some(&other)),
            Verdict::Conflict {
                current: Some(other.clone()),
                mod_revision: 8
            }
        );
        let same_position = Checkpoint {
            commit: Some("01JD0000000000000000000001".into()),
            ..target.clone()
        };
        assert_eq!(
            conflict(Some(&same_position)),
            Verdict::Conflict {
                current: Some(same_position.clone()),
                mod_revision: 8
            },
            "our position written by another commit is theirs"
        );
        assert_eq!(
            conflict(Some(&target)),
            Verdict::Committed { revision: 8 },
            "our own commit landed: an earlier attempt whose reply was lost"
        );
        // Deleted under us.
        assert_eq!(
            classify(refused(None, 0, vec![false]), "s", 3, &target).expect("valid"),
            Verdict::Conflict {
                current: None,
                mod_revision: 0
            }
        );
    }

    #[test]
    fn a_refusal_nothing_explains_and_a_corrupt_checkpoint_are_reported() {
        let stored = checkpoint(2, false);
        assert_eq!(
            classify(refused(Some(&stored), 3, vec![false]), "s", 3, &stored).expect("valid"),
            Verdict::Unexplained
        );
        let corrupt = Reply::Refused {
            checkpoint: Some((b"not json".to_vec(), 3)),
            origin_found: false,
            markers_found: vec![],
        };
        let err = classify(corrupt, "s-w0", 3, &stored).expect_err("corrupt");
        assert!(err.to_string().contains("s-w0"), "{err}");
    }

    #[test]
    fn an_origin_without_a_checkpoint_is_a_deleted_checkpoint() {
        let target = checkpoint(1, false);
        let deleted = Reply::Refused {
            checkpoint: None,
            origin_found: true,
            markers_found: vec![false],
        };
        let err = classify(deleted, "s-w0", 0, &target).expect_err("deleted");
        assert!(matches!(err, SinkError::CheckpointDeleted { .. }), "{err}");
        // A same-id streamer created both first: a conflict to adopt.
        let other = checkpoint(9, false);
        let created = Reply::Refused {
            checkpoint: Some((serde_json::to_vec(&other).expect("encodes"), 5)),
            origin_found: true,
            markers_found: vec![false],
        };
        assert_eq!(
            classify(created, "s-w0", 0, &target).expect("valid"),
            Verdict::Conflict {
                current: Some(other),
                mod_revision: 5
            }
        );
    }

    /// Against a real etcd: a stream's first commit creates its origin; once the checkpoint is
    /// deleted, a commit planned as a stream's first (revision 0) is refused as a deleted
    /// checkpoint instead of recreating it, and nothing is enqueued twice. A stream with a
    /// checkpoint but no origin (an earlier release's) gets one from its next commit.
    #[tokio::test]
    async fn a_first_commit_cannot_recreate_a_deleted_checkpoint() {
        let (_server, client) = telemetry_harness::strict_etcd().await.expect("etcd starts");
        let keys = Keyspace::new("/sink-origin");
        let lease = Arc::new(BucketedLease::new(
            client.clone(),
            std::time::Duration::from_secs(60),
        ));
        let sink = Sink::new(client.clone(), keys.clone(), lease, CancellationToken::new());
        let count = |prefix: String| {
            let mut client = client.clone();
            async move {
                let options = GetOptions::new().with_prefix().with_count_only();
                client.get(prefix, Some(options)).await.expect("count").count()
            }
        };
        let first = [pending(1, 10)];
        let refs: Vec<&Pending> = first.iter().collect();
        let outcome = sink
            .commit("s-w0", 0, &checkpoint(1, false), &refs)
            .await
            .expect("commits");
        assert!(
            matches!(outcome, CommitOutcome::Committed { enqueued: 1, .. }),
            "{outcome:?}"
        );
        assert_eq!(count(keys.stream_origin("s-w0")).await, 1);
        client
            .clone()
            .delete(keys.stream_checkpoint("s-w0"), None)
            .await
            .expect("delete checkpoint");
        let again = [pending(1, 10)];
        let refs: Vec<&Pending> = again.iter().collect();
        let err = sink
            .commit("s-w0", 0, &checkpoint(1, false), &refs)
            .await
            .expect_err("refused");
        assert!(matches!(err, SinkError::CheckpointDeleted { .. }), "{err}");
        assert_eq!(count(keys.queue_prefix()).await, 1, "row 1 enqueued once");
        assert_eq!(count(keys.stream_checkpoint("s-w0")).await, 0, "not recreated");

        // An earlier release's stream: a checkpoint, no origin.
        let legacy = serde_json::to_vec(&checkpoint(1, false)).expect("json");
        let put = client
            .clone()
            .put(keys.stream_checkpoint("old-w0"), legacy, None)
            .await
            .expect("put");
        let rev = put.header().map_or(0, |h| h.revision());
        let next = [pending(2, 10)];
        let refs: Vec<&Pending> = next.iter().collect();
        let fresh = Sink::new(
            client.clone(),
            keys.clone(),
            Arc::new(BucketedLease::new(
                client.clone(),
                std::time::Duration::from_secs(60),
            )),
            CancellationToken::new(),
        );
        let outcome = fresh
            .commit("old-w0", rev, &checkpoint(2, false), &refs)
            .await
            .expect("commits");
        assert!(matches!(outcome, CommitOutcome::Committed { .. }), "{outcome:?}");
        assert_eq!(
            count(keys.stream_origin("old-w0")).await,
            1,
            "the origin is written"
        );
    }

    #[test]
    fn absorbing_drops_the_duplicates_and_keeps_the_order() {
        let entries = [pending(1, 1), pending(2, 1), pending(3, 1)];
        let live: Vec<&Pending> = entries.iter().collect();
        let (kept, absorbed) = absorb(live, &[1]);
        assert_eq!(kept.iter().map(|p| p.row).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(absorbed, vec![2]);
    }

    #[test]
    fn checkpoints_from_the_previous_release_still_decode() {
        let (cp, rev) =
            decode_checkpoint("s", Some((br#"{"pass":2,"row":7,"pass_complete":false}"#, 5))).expect("valid");
        let cp = cp.expect("present");
        assert_eq!((cp.pass, cp.row, rev), (2, 7, 5));
        assert_eq!(cp.source_fingerprint, None);
        assert_eq!(decode_checkpoint("s", None).expect("absent"), (None, 0));
    }
}
