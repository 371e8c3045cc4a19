//! The scrape source: dcgm-exporter (or any Prometheus exposition) endpoints in, queued
//! messages out, exactly once per scrape.
//!
//! Each target is a stream of its own, `scrape-{hash of its URL}`, with the CSV streams'
//! fenced checkpoint (`/streams/{id}/checkpoint`), written through the same [`Sink`]: every
//! chunk's transaction compares the checkpoint's `mod_revision` and each message's dedup marker,
//! and puts the entries, the markers and the advanced checkpoint. For a target the checkpoint's
//! `pass` numbers the scrape, `scrape_time` is its time, `row` counts its samples settled so far,
//! and `pass_complete` says the whole scrape is enqueued.
//!
//! - **Exactly once per scrape.** A message's idempotency key covers the target, the scrape time
//!   and the series (name and labels) only. A scrape of more samples than one transaction holds
//!   (etcd's 128 operations, 1 MiB) takes several; its first chunk records the scrape time in the
//!   checkpoint. A streamer that finds a scrape unfinished (it crashed, or was fenced out, between
//!   chunks) finishes that scrape under its recorded time: it scrapes the target again and
//!   enqueues the answer under the old time, and the markers absorb every series the earlier
//!   attempt already enqueued. No series of that scrape is lost or doubled; the rest of its
//!   values are from the second fetch. A scrape whose first chunk never landed left nothing: the
//!   next scrape gets a new time. ([`plan`] decides; see docs/design.md.)
//! - **One owner per target.** A streamer scrapes a target only while it holds
//!   `/scrapes/{id}/owner`, created with `create_revision == 0` on its lease; others stand by and
//!   take over when the lease ends. The checkpoint's fence keeps a paused former owner from
//!   writing over the new one's progress, and the keys keep any scrape from landing twice.
//! - **Failures stay with their target.** Each target runs its own task on its own schedule
//!   (spread over the interval by a hash of its URL), with `SCRAPE_TIMEOUT` on the whole fetch.
//!   A target that is down, slow or serves something else is counted
//!   (`streamer_scrape_failures_total{target,reason}`, `streamer_scrape_up{target}`), logged when
//!   its state changes, and tried again at its next tick.

mod convert;
mod fetch;
mod parse;

use std::{
    collections::HashMap,
    hash::{Hash as _, Hasher as _},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use sha2::{Digest, Sha256};
use telemetry_shared::{
    Checkpoint, Keyspace, Timestamp,
    etcd::{EtcdError, is_retryable},
    lease::KeptLease,
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio::{sync::Mutex, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use crate::{
    StreamerError,
    backpressure::DepthGauge,
    config::{Keep, ScrapeConfig, TargetList, parse_target_list},
    events::{
        CheckpointConflict, EtcdRetry, ScrapeChunkCommitted, ScrapeCompleted, ScrapeFailed, ScrapeResumed,
        ScrapeSucceeded, TargetOwnership,
    },
    progress::Stats,
    sink::{CommitOutcome, Pending, Sink, chunk_len},
};

use self::{convert::Converter, fetch::FetchError};

/// How often a target file is checked for changes.
const FILE_POLL: Duration = Duration::from_secs(1);

/// Most enqueue transactions in flight at once across all targets: etcd commits a few
/// concurrent transactions together far better than a thousand (which it answers with
/// "request timed out"), and a target waiting for a slot never holds up its fetch.
const COMMIT_SLOTS: usize = 16;

/// The stream id of a target: `scrape-` and the first 16 hex digits of the SHA-256 of its URL.
pub fn target_stream_id(url: &str) -> String {
    format!("scrape-{}", &hex::encode(Sha256::digest(url.as_bytes()))[..16])
}

/// What the next scrape of a target is, from its stored checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Plan {
    /// The scrape's number.
    pub seq: u64,
    /// Its time: new, or the unfinished scrape's own.
    pub time: Timestamp,
    /// Samples of it already settled (0 for a new scrape).
    pub settled: u64,
    /// True when it finishes a scrape an earlier attempt began.
    pub resumed: bool,
}

/// Decides the next scrape: an unfinished one is finished under its own time; otherwise a new
/// one starts, numbered after the last, at `now` (or just after the last scrape's time, if the
/// clock went back).
pub(crate) fn plan(stored: Option<&Checkpoint>, now: Timestamp) -> Plan {
    let stored_time = stored
        .and_then(|cp| cp.scrape_time.as_deref())
        .and_then(|t| Timestamp::parse(t).ok());
    match (stored, stored_time) {
        (None, _) => Plan {
            seq: 0,
            time: now,
            settled: 0,
            resumed: false,
        },
        (Some(cp), Some(time)) if !cp.pass_complete => Plan {
            seq: cp.pass,
            time,
            settled: cp.row,
            resumed: true,
        },
        (Some(cp), last) => {
            let after_last =
                last.map(|t| Timestamp::from_datetime(t.as_datetime() + chrono::Duration::microseconds(1)));
            Plan {
                seq: cp.pass + 1,
                time: after_last.map_or(now, |t| t.max(now)),
                settled: 0,
                resumed: false,
            }
        }
    }
}

/// The checkpoint after a chunk of `taken` samples of scrape `plan`, `settled` before it.
fn advanced(plan: &Plan, settled: u64, taken: usize, complete: bool) -> Checkpoint {
    Checkpoint {
        pass: plan.seq,
        row: settled + taken as u64,
        pass_complete: complete,
        source_fingerprint: None,
        scrape_time: Some(plan.time.to_string()),
        commit: None,
    }
}

/// The first tick of a target: spread over the interval by a hash of its URL, so that a
/// thousand targets do not all fire at once.
fn first_tick_offset(url: &str, interval: Duration) -> Duration {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    url.hash(&mut hasher);
    let millis = interval.as_millis().max(1) as u64;
    Duration::from_millis(hasher.finish() % millis)
}

/// What every target task shares.
pub(crate) struct Ctx {
    pub config: ScrapeConfig,
    pub client: Client,
    pub keys: Keyspace,
    pub sink: Sink,
    pub gauge: Arc<DepthGauge>,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
    http: reqwest::Client,
    /// The lease this process owns targets on (granted again if lost).
    lease: Mutex<Option<Arc<KeptLease>>>,
    /// This process's id, the value of its owner keys.
    owner_id: String,
    /// Admission of enqueue transactions ([`COMMIT_SLOTS`]).
    commit_slots: tokio::sync::Semaphore,
}

impl Ctx {
    /// The shared state of a scraping streamer.
    pub(crate) fn new(
        config: ScrapeConfig,
        client: Client,
        keys: Keyspace,
        sink: Sink,
        gauge: Arc<DepthGauge>,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
    ) -> Self {
        // Timeouts are applied per scrape (connect and body together).
        let http = reqwest::Client::builder()
            .user_agent(concat!("telemetry-streamer/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Ctx {
            config,
            client,
            keys,
            sink,
            gauge,
            stats,
            shutdown,
            http,
            lease: Mutex::new(None),
            owner_id: ulid::Ulid::from_datetime(std::time::SystemTime::now()).to_string(),
            commit_slots: tokio::sync::Semaphore::new(COMMIT_SLOTS),
        }
    }

    /// The ownership lease, granted (again) if there is none or it was lost. `None` at
    /// shutdown.
    async fn lease(&self) -> Result<Option<Arc<KeptLease>>, StreamerError> {
        let mut slot = self.lease.lock().await;
        if let Some(lease) = slot.as_ref()
            && lease.lost_reason().is_none()
        {
            return Ok(Some(lease.clone()));
        }
        let mut backoff = Backoff::new(Policy::ETCD, "scrape ownership lease grant");
        loop {
            match KeptLease::grant(&self.client, self.config.lease_ttl).await {
                Ok(lease) => {
                    let lease = Arc::new(lease);
                    *slot = Some(lease.clone());
                    return Ok(Some(lease));
                }
                Err(EtcdError::Client(err)) if is_retryable(&err) => {
                    emit(EtcdRetry {
                        backoff: &mut backoff,
                        error: &err,
                    });
                    if backoff.wait(&self.shutdown).await.is_err() {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(StreamerError::Sink(err.into())),
            }
        }
    }

    /// Ends the ownership lease, which deletes every owner key on it at once.
    async fn release_all(&self) {
        if let Some(lease) = self.lease.lock().await.take() {
            match Arc::try_unwrap(lease) {
                Ok(lease) => {
                    if let Err(err) = lease.revoke(&self.client).await {
                        tracing::warn!(error = %err, "could not revoke the scrape ownership lease; its targets are taken over when it expires");
                    }
                }
                // A task still holds it (it is ending): the lease expires after its TTL.
                Err(_) => tracing::debug!("scrape lease still shared at shutdown"),
            }
        }
    }

    /// Makes this process the owner of `key` if nobody is: `true` if it owns it (now or
    /// already) on `lease`.
    async fn claim(&self, key: &str, lease: i64) -> Result<Option<bool>, StreamerError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.owner_id.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key, None)]);
        let mut backoff = Backoff::new(Policy::ETCD, "scrape ownership claim");
        loop {
            match self.client.clone().txn(txn.clone()).await {
                Ok(resp) if resp.succeeded() => return Ok(Some(true)),
                Ok(resp) => {
                    let owner_lease = resp.op_responses().into_iter().find_map(|r| match r {
                        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.lease()),
                        _ => None,
                    });
                    return Ok(Some(owner_lease == Some(lease)));
                }
                Err(err) if is_retryable(&err) => {
                    emit(EtcdRetry {
                        backoff: &mut backoff,
                        error: &err,
                    });
                    if backoff.wait(&self.shutdown).await.is_err() {
                        return Ok(None);
                    }
                }
                Err(err) => return Err(StreamerError::Sink(err.into())),
            }
        }
    }

    /// Gives up `key` if this process owns it on `lease` (a target removed from the list).
    async fn release(&self, key: &str, lease: i64) {
        let txn = Txn::new()
            .when([Compare::lease(key, CompareOp::Equal, lease)])
            .and_then([TxnOp::delete(key, None)]);
        if let Err(err) = self.client.clone().txn(txn).await {
            tracing::warn!(key, error = %err, "could not release a scrape target; another streamer takes it when the lease ends");
        }
    }
}

/// A target's failure state, for logging once per change.
#[derive(Default)]
struct Health {
    /// Failed scrapes in a row.
    failures: u64,
    /// The reason of the last failure, if the last scrape failed.
    failing: Option<&'static str>,
}

/// How one scrape cycle ended.
enum CycleEnd {
    /// The scrape is enqueued, or the target failed (counted): wait for the next tick.
    Done,
    /// Another writer moved the checkpoint: check ownership and plan again at once.
    Conflict,
    /// Shutdown.
    Shutdown,
}

/// One target's task.
struct Target {
    ctx: Arc<Ctx>,
    url: String,
    stream_id: String,
    owner_key: String,
    converter: Converter,
    health: Health,
}

impl Target {
    fn new(ctx: Arc<Ctx>, url: String) -> Self {
        let stream_id = target_stream_id(&url);
        Target {
            owner_key: ctx.keys.scrape_owner(&stream_id),
            converter: Converter::new(&stream_id, &url),
            ctx,
            url,
            stream_id,
            health: Health::default(),
        }
    }

    /// Scrapes on schedule while it owns the target, until `stop` or shutdown.
    async fn run(mut self, stop: CancellationToken) -> Result<(), StreamerError> {
        let interval = self.ctx.config.interval;
        let mut next = tokio::time::Instant::now() + first_tick_offset(&self.url, interval);
        let mut owned: Option<i64> = None;
        let result = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                _ = tokio::time::sleep_until(next) => {}
            }
            next += interval;
            let now = tokio::time::Instant::now();
            if next < now {
                next = now + interval;
            }
            match self.tick(&mut owned).await {
                Ok(true) => {}
                Ok(false) => break Ok(()),
                Err(err) => break Err(err),
            }
        };
        if let Some(lease) = owned {
            if !self.ctx.shutdown.is_cancelled() {
                self.ctx.release(&self.owner_key, lease).await;
            }
            emit(TargetOwnership {
                target: &self.url,
                owned: false,
            });
        }
        result
    }

    /// One tick: (re)claim the target, then scrape it; after a fence conflict, claim and plan
    /// again at once (once). `false` at shutdown.
    async fn tick(&mut self, owned: &mut Option<i64>) -> Result<bool, StreamerError> {
        for _ in 0..2 {
            let Some(lease) = self.ctx.lease().await? else {
                return Ok(false);
            };
            let Some(owns) = self.ctx.claim(&self.owner_key, lease.id()).await? else {
                return Ok(false);
            };
            let now_owned = owns.then_some(lease.id());
            if now_owned.is_some() != owned.is_some() {
                emit(TargetOwnership {
                    target: &self.url,
                    owned: owns,
                });
            }
            *owned = now_owned;
            if !owns {
                return Ok(true);
            }
            match self.cycle().await? {
                CycleEnd::Done => return Ok(true),
                CycleEnd::Shutdown => return Ok(false),
                CycleEnd::Conflict => continue,
            }
        }
        Ok(true)
    }

    /// Reads the checkpoint, scrapes, and enqueues the scrape in as many transactions as it
    /// needs.
    async fn cycle(&mut self) -> Result<CycleEnd, StreamerError> {
        let ctx = self.ctx.clone();
        let (stored, mut rev) = match ctx.sink.read_checkpoint(&self.stream_id).await {
            Ok(found) => found,
            Err(err) if err.is_cancelled() => return Ok(CycleEnd::Shutdown),
            Err(err) => return Err(err.into()),
        };
        let plan = plan(stored.as_ref(), Timestamp::now());
        let started = Instant::now();
        let series = match fetch::fetch(&ctx.http, &self.url, ctx.config.timeout).await {
            Ok(series) => series,
            Err(err) => {
                self.failed(&err);
                return Ok(CycleEnd::Done);
            }
        };
        emit(ScrapeSucceeded {
            target: &self.url,
            seconds: started.elapsed().as_secs_f64(),
            after_failures: std::mem::take(&mut self.health.failures),
        });
        self.health.failing = None;
        let series: Vec<_> = match ctx.config.keep {
            Keep::All => series,
            Keep::Gpu => series.into_iter().filter(convert::is_gpu_series).collect(),
        };
        if plan.resumed {
            emit(ScrapeResumed {
                target: &self.url,
                seq: plan.seq,
                time: &plan.time.to_string(),
                settled: plan.settled,
            });
        }
        let entries = self
            .converter
            .entries(series, plan.seq, &plan.time, plan.settled + 1);
        let mut settled = plan.settled;
        let mut rest: &[Pending] = &entries;
        loop {
            let taken = chunk_len(rest, &|id| ctx.sink.is_written(id));
            let complete = taken == rest.len();
            let target = advanced(&plan, settled, taken, complete);
            let chunk: Vec<&Pending> = rest[..taken].iter().collect();
            if !chunk.is_empty() {
                match ctx.gauge.admit(chunk.len(), &ctx.shutdown).await {
                    Ok(()) => {}
                    Err(EtcdError::Cancelled) => return Ok(CycleEnd::Shutdown),
                    Err(err) => return Err(StreamerError::Sink(err.into())),
                }
            }
            let Ok(_slot) = ctx.commit_slots.acquire().await else {
                return Ok(CycleEnd::Shutdown);
            };
            let outcome = match ctx.sink.commit(&self.stream_id, rev, &target, &chunk).await {
                Ok(outcome) => outcome,
                Err(err) if err.is_cancelled() => return Ok(CycleEnd::Shutdown),
                Err(err) => return Err(err.into()),
            };
            match outcome {
                CommitOutcome::Committed {
                    revision,
                    enqueued,
                    duplicates,
                } => {
                    emit(ScrapeChunkCommitted {
                        stats: &ctx.stats,
                        target: &self.url,
                        enqueued: enqueued as u64,
                        duplicates: duplicates.len() as u64,
                    });
                    rev = revision;
                    settled = target.row;
                    rest = &rest[taken..];
                    if complete {
                        emit(ScrapeCompleted {
                            target: &self.url,
                            seq: plan.seq,
                            time: &plan.time.to_string(),
                            samples: entries.len(),
                        });
                        return Ok(CycleEnd::Done);
                    }
                }
                CommitOutcome::Conflict { current, .. } => {
                    emit(CheckpointConflict {
                        stats: &ctx.stats,
                        stream: &self.stream_id,
                        current: current.as_ref(),
                    });
                    return Ok(CycleEnd::Conflict);
                }
            }
        }
    }

    fn failed(&mut self, err: &FetchError) {
        let reason = err.reason();
        let changed = self.health.failing != Some(reason);
        self.health.failing = Some(reason);
        self.health.failures += 1;
        emit(ScrapeFailed {
            target: &self.url,
            reason,
            error: err,
            changed,
        });
    }
}

/// The target list now: the configured URLs, or the file's (`None` if the file cannot be read).
fn read_targets(list: &TargetList) -> Result<Vec<String>, std::io::Error> {
    match list {
        TargetList::Urls(urls) => Ok(urls.clone()),
        TargetList::File(path) => Ok(valid_targets(path, &std::fs::read_to_string(path)?)),
    }
}

/// The URLs of a target file; entries that are not `http://` URLs are logged and left out.
fn valid_targets(path: &Path, text: &str) -> Vec<String> {
    let (good, bad): (Vec<String>, Vec<String>) = parse_target_list(text)
        .into_iter()
        .partition(|u| crate::config::is_target_url(u));
    for url in bad {
        tracing::warn!(file = %path.display(), entry = %url, "not an http:// URL (https is not supported); ignored");
    }
    good
}

/// The running target tasks, by URL: each one's stop token and task.
type Tasks = HashMap<String, (CancellationToken, JoinHandle<Result<(), StreamerError>>)>;

/// Errors of the scrape source that end the streamer.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the scrape target file {path} (SCRAPE_TARGETS): {source}")]
pub struct TargetFileError {
    path: String,
    #[source]
    source: std::io::Error,
}

/// Runs the scrape source until shutdown: one task per target, the list re-read from its file
/// when that changes. A target file that cannot be read at start is an error; later, the last
/// list read stays in force (logged once).
pub(crate) async fn run(ctx: Arc<Ctx>) -> Result<(), StreamerError> {
    let mut targets: Tasks = HashMap::new();
    let mut unreadable = false;
    let mut first = true;
    let result = loop {
        match read_targets(&ctx.config.targets) {
            Ok(urls) => {
                if unreadable {
                    tracing::info!("the scrape target file is readable again");
                    unreadable = false;
                }
                update_targets(&ctx, &mut targets, &urls).await;
            }
            Err(err) if first => {
                let path = match &ctx.config.targets {
                    TargetList::File(p) => p.display().to_string(),
                    TargetList::Urls(_) => String::new(),
                };
                break Err(StreamerError::Targets(TargetFileError { path, source: err }));
            }
            Err(err) => {
                if !unreadable {
                    tracing::warn!(error = %err, "cannot read the scrape target file; keeping the last list");
                }
                unreadable = true;
            }
        }
        first = false;
        if let Some(failed) = finished_with_error(&mut targets).await {
            break Err(failed);
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break Ok(()),
            _ = tokio::time::sleep(FILE_POLL) => {}
        }
    };
    for (_, (stop, _)) in targets.iter() {
        stop.cancel();
    }
    for (_, (_, task)) in targets.drain() {
        if let Ok(Err(err)) = task.await {
            tracing::error!(error = %err, "scrape target task failed");
        }
    }
    ctx.release_all().await;
    result
}

/// Starts tasks for new targets and stops those of removed ones.
async fn update_targets(ctx: &Arc<Ctx>, targets: &mut Tasks, urls: &[String]) {
    let removed: Vec<String> = targets.keys().filter(|u| !urls.contains(u)).cloned().collect();
    for url in removed {
        if let Some((stop, task)) = targets.remove(&url) {
            tracing::info!(target_url = %url, "scrape target removed from the list");
            stop.cancel();
            let _ = task.await;
        }
    }
    for url in urls {
        if !targets.contains_key(url) {
            let stop = ctx.shutdown.child_token();
            let task = tokio::spawn(Target::new(ctx.clone(), url.clone()).run(stop.clone()));
            targets.insert(url.clone(), (stop, task));
        }
    }
}

/// The error of a target task that ended with one (it is removed from `targets`).
async fn finished_with_error(targets: &mut Tasks) -> Option<StreamerError> {
    let done: Vec<String> = targets
        .iter()
        .filter(|(_, (_, task))| task.is_finished())
        .map(|(url, _)| url.clone())
        .collect();
    for url in done {
        if let Some((_, task)) = targets.remove(&url) {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(err)) => return Some(err),
                Err(join) => return Some(StreamerError::Worker(join.to_string())),
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> Timestamp {
        Timestamp::parse(text).expect("valid")
    }

    fn cp(pass: u64, row: u64, complete: bool, time: &str) -> Checkpoint {
        Checkpoint {
            pass,
            row,
            pass_complete: complete,
            source_fingerprint: None,
            scrape_time: Some(time.into()),
            commit: None,
        }
    }

    #[test]
    fn an_unfinished_scrape_is_finished_under_its_own_time() {
        let now = at("2026-12-01T00:01:00Z");
        assert_eq!(
            plan(None, now),
            Plan {
                seq: 0,
                time: now,
                settled: 0,
                resumed: false
            }
        );
        let t = "2026-12-01T00:00:45.000000Z";
        assert_eq!(
            plan(Some(&cp(7, 63, false, t)), now),
            Plan {
                seq: 7,
                time: at(t),
                settled: 63,
                resumed: true
            }
        );
        assert_eq!(
            plan(Some(&cp(7, 80, true, t)), now),
            Plan {
                seq: 8,
                time: now,
                settled: 0,
                resumed: false
            }
        );
        // A clock that went back still gives a later scrape time, so no key repeats.
        let later = "2026-12-01T00:05:00.000000Z";
        assert_eq!(
            plan(Some(&cp(7, 80, true, later)), now).time,
            at("2026-12-01T00:05:00.000001Z")
        );
    }

    #[test]
    fn each_chunk_records_the_scrape_time_and_the_samples_settled() {
        let p = Plan {
            seq: 3,
            time: at("2026-12-01T00:00:15Z"),
            settled: 63,
            resumed: true,
        };
        let cp = advanced(&p, 63, 17, true);
        assert_eq!((cp.pass, cp.row, cp.pass_complete), (3, 80, true));
        assert_eq!(cp.scrape_time.as_deref(), Some("2026-12-01T00:00:15.000000Z"));
        let json = serde_json::to_string(&cp).expect("encodes");
        assert!(!json.contains("source_fingerprint"), "{json}");
    }

    #[test]
    fn targets_have_stable_distinct_stream_ids_and_spread_ticks() {
        let a = target_stream_id("http://h1:9400/metrics");
        assert_eq!(a, target_stream_id("http://h1:9400/metrics"));
        assert_ne!(a, target_stream_id("http://h2:9400/metrics"));
        assert!(telemetry_shared::keys::is_key_segment(&a));
        let interval = Duration::from_secs(15);
        assert!(first_tick_offset("http://h1:9400/metrics", interval) < interval);
    }
}
