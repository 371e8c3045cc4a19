//! Read access to what the collector stored: health, the GPU index, pages of one GPU's
//! records, and the stats counters. Every read here is bounded: a page costs O(limit) keys
//! whichever end it starts from, and stats read 32 counters and index counts, never the data.
//!
//! Range reads go through a KV client with a 64 MiB decode limit ([`etcd::kv`]), since a page
//! of large records is more than tonic's default 4 MiB; a page whose response is larger still
//! is read again in smaller reads. Every read is idempotent and retried with the workspace's
//! one policy ([`Policy::READ`]) when etcd is unreachable or between leaders.

use std::{
    collections::VecDeque,
    sync::Arc,
    time::{Duration, Instant},
};

use etcd_client::{Client, GetOptions, KeyValue, KvClient, Txn, TxnOp, TxnOpResponse};
use serde::Serialize;
use telemetry_shared::{
    Keyspace, Timestamp,
    etcd::{self, EtcdError, is_retryable, is_too_large, range_prefix},
    model::{GpuInfo, PartitionStats},
    observe::emit,
    retry::{Policy, retry},
};
use tokio::sync::RwLock;
use utoipa::ToSchema;

use crate::{
    error::ApiError,
    events::{NewestFallbackScan, TelemetryPageRead, UnreadableSkipped},
    page::{Page, Read, Scan},
    query::{Order, TelemetryQuery},
    record::{Decoder, Record},
};

/// How long a cached copy of the GPU index is used before it is re-read.
const DIRECTORY_MAX_AGE: Duration = Duration::from_secs(5);
/// A lookup miss re-reads the index, but not more often than this.
const DIRECTORY_MISS_REFRESH: Duration = Duration::from_millis(250);
/// The first window a newest-first page probes, back from its upper bound.
const FIRST_WINDOW: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Probes before a newest-first page falls back to a keys-only scan.
const MAX_PROBES: usize = 16;
/// Pages of the keys-only fallback scan.
const SCAN_PAGE: i64 = 5000;
/// Timeout of the health probe.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(3);

/// etcd as seen by `/health`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct EtcdHealth {
    /// The member that answered.
    pub member_id: u64,
    /// The store's current revision.
    pub revision: i64,
    /// The cluster leader's member id.
    pub leader: u64,
    /// etcd's version.
    pub version: String,
    /// Size of the member's backend database in bytes.
    pub db_size_bytes: i64,
}

/// Totals for `/api/v1/stats`, read from the per-partition counters and index counts in one
/// transaction (one consistent revision).
#[derive(Debug, Clone, Serialize, ToSchema, PartialEq, Eq)]
pub struct Stats {
    /// Telemetry records written.
    pub total_records: u64,
    /// GPUs in the index.
    pub unique_gpus: u64,
    /// Hosts in the index.
    pub unique_hosts: u64,
    /// Oldest record timestamp written.
    #[schema(format = DateTime)]
    pub earliest_timestamp: Option<String>,
    /// Newest record timestamp written.
    #[schema(format = DateTime)]
    pub latest_timestamp: Option<String>,
    /// Messages waiting in the queue.
    pub queue_depth: u64,
    /// Messages dead-lettered (counter).
    pub dead_letters: u64,
    /// Dead letters currently stored (not yet replayed or purged).
    pub dead_letters_stored: u64,
    /// Duplicate messages the collectors absorbed.
    pub duplicates_absorbed: u64,
    /// The etcd revision these numbers were read at.
    pub revision: i64,
}

/// One read's records, in the order asked for.
#[derive(Debug, Default)]
struct RawPage {
    /// Records (key, value), in page order.
    records: Vec<KeyValue>,
    /// True if the range holds records beyond the ones returned.
    more: bool,
}

/// Reads from etcd through one client.
pub(crate) struct Store {
    client: Client,
    /// Range reads: the same connection, with a 64 MiB decode limit.
    kv: KvClient,
    keys: Keyspace,
    directory: RwLock<Option<(Instant, Arc<Vec<GpuInfo>>)>>,
    /// Decodes records (shared with the live feed and the window).
    decoder: Decoder,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// Runs an idempotent read with the workspace's read policy (a few jittered retries when etcd
/// is unreachable or between leaders: a client may be pinned to a member that just died, and
/// the next attempt can reach another).
async fn read_with_retry<T, F, Fut>(read: F) -> Result<T, EtcdError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    Ok(retry(Policy::READ, is_retryable, read).await?)
}

impl Store {
    /// A store over `client`, reading records with `decoder` (and keys below its keyspace).
    pub(crate) fn new(client: Client, decoder: Decoder) -> Self {
        Store {
            kv: etcd::kv(&client),
            client,
            keys: decoder.keys.clone(),
            directory: RwLock::new(None),
            decoder,
        }
    }

    /// Decodes records read from etcd, loading the profiles they name first.
    async fn decode(&self, kvs: &[KeyValue]) -> Result<Vec<(String, Option<Arc<Record>>)>, EtcdError> {
        self.decoder
            .load(&self.client, kvs.iter().map(|kv| kv.value()))
            .await?;
        Ok(kvs
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                let record = self.decoder.decode(kv.key(), kv.value(), kv.mod_revision());
                (key, record)
            })
            .collect())
    }

    /// The newest `n` records of a GPU at `revision`, newest first, and whether older ones
    /// exist (the window's load).
    pub(crate) async fn newest_records(
        &self,
        gpu: &GpuInfo,
        n: usize,
        revision: i64,
    ) -> Result<(Vec<Arc<Record>>, bool), EtcdError> {
        let prefix = self.keys.gpu_data_prefix(&gpu.hostname, &gpu.gpu_id);
        let hi = telemetry_shared::keys::prefix_end(&prefix);
        let read = Read {
            lo: prefix.as_bytes(),
            hi: &hi,
            n,
        };
        let mut at = revision;
        let page = self
            .page(&prefix, Order::Desc, Some(gpu.last_seen), read, &mut at)
            .await?;
        let records = self
            .decode(&page.records)
            .await?
            .into_iter()
            .filter_map(|(_, r)| r)
            .collect();
        Ok((records, page.more))
    }

    /// The key layout.
    pub(crate) fn keys(&self) -> &Keyspace {
        &self.keys
    }

    /// The etcd client (the live feed and replays watch through it).
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    /// Asks the member we are connected to for its status, with a short timeout.
    pub(crate) async fn health(&self) -> Result<EtcdHealth, String> {
        let mut client = self.client.clone();
        match tokio::time::timeout(HEALTH_TIMEOUT, client.status()).await {
            Err(_) => Err(format!("etcd did not answer within {HEALTH_TIMEOUT:?}")),
            Ok(Err(err)) => Err(format!("etcd: {err}")),
            Ok(Ok(status)) => Ok(EtcdHealth {
                member_id: status.header().map_or(0, |h| h.member_id()),
                revision: header_revision(status.header()),
                leader: status.leader(),
                version: status.version().to_string(),
                db_size_bytes: status.db_size(),
            }),
        }
    }

    /// Every GPU in the index, read now.
    pub(crate) async fn gpus(&self) -> Result<Arc<Vec<GpuInfo>>, EtcdError> {
        let prefix = self.keys.gpu_index_prefix();
        let retryable = |err: &EtcdError| matches!(err, EtcdError::Client(e) if is_retryable(e));
        let (pairs, _) = retry(Policy::READ, retryable, || {
            range_prefix(&self.client, &prefix, 1000)
        })
        .await?;
        let mut gpus: Vec<GpuInfo> = pairs
            .iter()
            .filter_map(|(key, value)| match serde_json::from_slice::<GpuInfo>(value) {
                Ok(info) => Some(info),
                Err(error) => {
                    emit(UnreadableSkipped {
                        what: "GPU index entry",
                        key,
                        error: &error,
                    });
                    None
                }
            })
            .collect();
        gpus.sort_by(|a, b| {
            (a.hostname.as_str(), gpu_order(&a.gpu_id)).cmp(&(b.hostname.as_str(), gpu_order(&b.gpu_id)))
        });
        let gpus = Arc::new(gpus);
        *self.directory.write().await = Some((Instant::now(), gpus.clone()));
        Ok(gpus)
    }

    /// The GPU index, as cached (re-read when older than a few seconds).
    pub(crate) async fn gpus_cached(&self) -> Result<Arc<Vec<GpuInfo>>, EtcdError> {
        self.directory(false).await
    }

    /// The cached GPU index (re-read when older than a few seconds, or on a miss when `miss`).
    async fn directory(&self, miss: bool) -> Result<Arc<Vec<GpuInfo>>, EtcdError> {
        if let Some((at, gpus)) = &*self.directory.read().await {
            let age = at.elapsed();
            if age < DIRECTORY_MAX_AGE && !(miss && age > DIRECTORY_MISS_REFRESH) {
                return Ok(gpus.clone());
            }
        }
        self.gpus().await
    }

    /// Finds the GPU a telemetry request names: `{id}` is a UUID, or a gpu_id together with
    /// `hostname`. A bare gpu_id is accepted only if exactly one host has it.
    pub async fn resolve_gpu(&self, id: &str, hostname: Option<&str>) -> Result<GpuInfo, ApiError> {
        let lookup = |gpus: &[GpuInfo]| -> Vec<GpuInfo> {
            if let Some(found) = gpus.iter().find(|g| g.uuid == id) {
                return vec![found.clone()];
            }
            gpus.iter()
                .filter(|g| g.gpu_id == id && hostname.is_none_or(|h| g.hostname == h))
                .cloned()
                .collect()
        };
        let mut found = lookup(&self.directory(false).await?);
        if found.is_empty() {
            found = lookup(&self.directory(true).await?);
        }
        match found.len() {
            0 => Err(ApiError::not_found(match hostname {
                Some(h) => format!("no GPU {id:?} on host {h:?} (and no GPU has UUID {id:?})"),
                None => format!("no GPU has UUID or gpu_id {id:?}"),
            })),
            1 => {
                let gpu = found.remove(0);
                if let Some(h) = hostname
                    && gpu.hostname != h
                {
                    return Err(ApiError::not_found(format!(
                        "GPU {id:?} is on host {:?}, not {h:?}",
                        gpu.hostname
                    )));
                }
                Ok(gpu)
            }
            n => Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "ambiguous_gpu_id",
                format!(
                    "gpu_id {id:?} exists on {n} hosts; add ?hostname= or use the GPU's UUID \
                     (see /api/v1/gpus)"
                ),
            )),
        }
    }

    /// One page of `gpu`'s records for `query` (see [`crate::page`]) read from etcd at
    /// revision `at` (the current one if `None`), and the revision it was read at.
    pub(crate) async fn telemetry_page(
        &self,
        gpu: &GpuInfo,
        query: &TelemetryQuery,
        at: Option<i64>,
    ) -> Result<(Page, i64), EtcdError> {
        let prefix = self.keys.gpu_data_prefix(&gpu.hostname, &gpu.gpu_id);
        let mut scan = Scan::new(query, &prefix);
        let mut revision = at.unwrap_or(0);
        while let Some(read) = scan.next_read() {
            let n = read.n;
            match self
                .page(&prefix, query.order, Some(gpu.last_seen), read, &mut revision)
                .await
            {
                Ok(page) => scan.absorb(self.decode(&page.records).await?, page.more),
                Err(EtcdError::Client(err)) if is_too_large(&err) && scan.shrink_reads(n) => {}
                Err(err) => return Err(err),
            }
        }
        let page = scan.finish();
        emit(TelemetryPageRead {
            scanned: page.scanned,
            returned: page.records.len(),
        });
        Ok((page, revision))
    }

    async fn range(
        &self,
        lo: &[u8],
        hi: &[u8],
        options: GetOptions,
    ) -> Result<etcd_client::GetResponse, EtcdError> {
        let options = options.with_range(hi.to_vec());
        read_with_retry(|| {
            let (mut kv, options) = (self.kv.clone(), options.clone());
            async move { kv.get(lo.to_vec(), Some(options)).await }
        })
        .await
    }

    /// How many records `[lo, hi)` holds (a count-only read, which touches only etcd's index).
    async fn count(&self, lo: &[u8], hi: &[u8], revision: &mut i64) -> Result<usize, EtcdError> {
        let resp = self
            .range(lo, hi, at(GetOptions::new().with_count_only(), *revision))
            .await?;
        pin(revision, &resp);
        Ok(resp.count().max(0) as usize)
    }

    /// Up to `read.n` records of `[read.lo, read.hi)` under `prefix` in `order`, all read at one
    /// revision (`revision`, or the current one if 0, which is then stored there).
    /// `newest_hint` is the newest record time known for the range (the GPU's `last_seen`);
    /// newest-first pages probe back from it.
    async fn page(
        &self,
        prefix: &str,
        order: Order,
        newest_hint: Option<Timestamp>,
        read: Read<'_>,
        revision: &mut i64,
    ) -> Result<RawPage, EtcdError> {
        if read.lo >= read.hi || read.n == 0 {
            return Ok(RawPage::default());
        }
        match order {
            Order::Asc => {
                let limit = GetOptions::new().with_limit(read.n as i64);
                let mut resp = self.range(read.lo, read.hi, at(limit, *revision)).await?;
                pin(revision, &resp);
                Ok(RawPage {
                    more: resp.more(),
                    records: resp.take_kvs(),
                })
            }
            Order::Desc => self.newest(prefix, read, newest_hint, revision).await,
        }
    }

    /// The newest `read.n` records of `[read.lo, read.hi)`, newest first, in O(n) reads.
    ///
    /// etcd can only return the *first* keys of a range cheaply (a descending sort reads the
    /// whole range). Keys start with a fixed-width timestamp, so this probes time windows back
    /// from the top of the range with count-only requests until a window holds between n and
    /// about 4n records ([`next_window`]), then reads just that window. Bursty data that
    /// defeats the probes falls back to a keys-only scan.
    async fn newest(
        &self,
        prefix: &str,
        read: Read<'_>,
        newest_hint: Option<Timestamp>,
        revision: &mut i64,
    ) -> Result<RawPage, EtcdError> {
        let Read { lo, hi, n } = read;
        let ceiling = 4 * n + 64;
        let top = top_time(prefix, hi, newest_hint);
        let mut window = FIRST_WINDOW;
        let mut start = lo.to_vec();
        for _ in 0..MAX_PROBES {
            start = window_start(prefix, lo, top, window);
            let whole = start.as_slice() <= lo;
            let count = self.count(&start, hi, revision).await?;
            if count <= ceiling && (count >= n || whole) {
                return self.read_window(lo, &start, read, whole, *revision).await;
            }
            window = next_window(window, count, n);
        }
        emit(NewestFallbackScan);
        self.newest_by_scan(&start, hi, n, revision).await
    }

    /// Reads the window `[start, read.hi)` a probe chose and keeps its newest `read.n` records;
    /// `whole` says the window starts at `read.lo` (nothing older is in range).
    async fn read_window(
        &self,
        lo: &[u8],
        start: &[u8],
        read: Read<'_>,
        whole: bool,
        revision: i64,
    ) -> Result<RawPage, EtcdError> {
        let mut resp = self
            .range(start, read.hi, at(GetOptions::new(), revision))
            .await?;
        let mut records = resp.take_kvs();
        records.reverse();
        let fetched = records.len();
        records.truncate(read.n);
        let more = if fetched > read.n {
            true
        } else if whole {
            false
        } else {
            self.any_below(lo, start, revision).await?
        };
        Ok(RawPage { records, more })
    }

    /// Is there a record in `[lo, below)`?
    async fn any_below(&self, lo: &[u8], below: &[u8], revision: i64) -> Result<bool, EtcdError> {
        if lo >= below {
            return Ok(false);
        }
        let mut revision = revision;
        Ok(self.count(lo, below, &mut revision).await? > 0)
    }

    /// Fallback of [`Store::newest`]: walk the keys of `[start, hi)` (keys only), keep the last
    /// `n`, then read their values. The records below `start` are reported through `more`.
    async fn newest_by_scan(
        &self,
        start: &[u8],
        hi: &[u8],
        n: usize,
        revision: &mut i64,
    ) -> Result<RawPage, EtcdError> {
        let mut last: VecDeque<Vec<u8>> = VecDeque::with_capacity(n + 1);
        let mut from = start.to_vec();
        let mut seen = 0usize;
        loop {
            let keys_only = GetOptions::new().with_keys_only().with_limit(SCAN_PAGE);
            let mut resp = self.range(&from, hi, at(keys_only, *revision)).await?;
            pin(revision, &resp);
            let more = resp.more();
            for kv in resp.take_kvs() {
                seen += 1;
                last.push_back(kv.key().to_vec());
                if last.len() > n {
                    last.pop_front();
                }
            }
            match last.back() {
                Some(key) if more => {
                    from = key.clone();
                    from.push(0);
                }
                _ => break,
            }
        }
        let Some(first) = last.front() else {
            return Ok(RawPage::default());
        };
        let mut resp = self.range(first, hi, at(GetOptions::new(), *revision)).await?;
        let mut records = resp.take_kvs();
        records.reverse();
        Ok(RawPage {
            more: seen > records.len(),
            records,
        })
    }

    /// Was any record written in revisions `from..=to`? (A replay over revisions without any
    /// would wait for the next write.) On an error, assumes yes.
    pub(crate) async fn any_written(&self, from: i64, to: i64) -> bool {
        let options = GetOptions::new()
            .with_prefix()
            .with_count_only()
            .with_min_mod_revision(from)
            .with_max_mod_revision(to);
        match self.kv.clone().get(self.keys.data_prefix(), Some(options)).await {
            Ok(resp) => resp.count() > 0,
            Err(_) => true,
        }
    }

    /// Sums the partition counters and counts the index, queue and dead letters, in one
    /// transaction (one consistent revision).
    pub(crate) async fn stats(&self) -> Result<Stats, EtcdError> {
        let ops = stats_ops(&self.keys);
        let resp = read_with_retry(|| {
            let (mut kv, ops) = (self.kv.clone(), ops.clone());
            async move { kv.txn(Txn::new().and_then(ops)).await }
        })
        .await?;
        let revision = header_revision(resp.header());
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let total = gets.next().map(|g| sum_counters(g.kvs())).unwrap_or_default();
        let mut count = || gets.next().map_or(0, |g| g.count().max(0) as u64);
        Ok(Stats {
            total_records: total.records,
            unique_gpus: count(),
            unique_hosts: count(),
            queue_depth: count(),
            dead_letters_stored: count(),
            dead_letters: total.dead_letters,
            duplicates_absorbed: total.duplicates,
            earliest_timestamp: total.earliest.map(|t| t.to_string()),
            latest_timestamp: total.latest.map(|t| t.to_string()),
            revision,
        })
    }
}

/// The reads of [`Store::stats`]: the partition counters, then count-only reads of the GPU
/// index, the host index, the queue and the dead letters, in that order.
fn stats_ops(keys: &Keyspace) -> Vec<TxnOp> {
    let range = |prefix: String| {
        let end = telemetry_shared::keys::prefix_end(&prefix);
        (prefix, end)
    };
    let (stats_lo, stats_hi) = range(keys.stats_prefix());
    let mut ops = vec![TxnOp::get(stats_lo, Some(GetOptions::new().with_range(stats_hi)))];
    for prefix in [
        keys.gpu_index_prefix(),
        keys.host_index_prefix(),
        keys.queue_prefix(),
        keys.deadletter_prefix(),
    ] {
        let (lo, hi) = range(prefix);
        ops.push(TxnOp::get(
            lo,
            Some(GetOptions::new().with_range(hi).with_count_only()),
        ));
    }
    ops
}

/// The sum of the partition counters; an unreadable one is reported and left out.
fn sum_counters(counters: &[KeyValue]) -> PartitionStats {
    let mut total = PartitionStats::default();
    for kv in counters {
        match serde_json::from_slice::<PartitionStats>(kv.value()) {
            Ok(s) => {
                total.records += s.records;
                total.duplicates += s.duplicates;
                total.dead_letters += s.dead_letters;
                total.earliest = min_some(total.earliest, s.earliest);
                total.latest = total.latest.max(s.latest);
            }
            Err(error) => emit(UnreadableSkipped {
                what: "stats counter",
                key: &String::from_utf8_lossy(kv.key()),
                error: &error,
            }),
        }
    }
    total
}

/// The next window to probe after one of `window` held `count` records, aiming at about `2n`:
/// widened (2× to 16×) when it held fewer than `n`, narrowed in proportion otherwise.
fn next_window(window: chrono::TimeDelta, count: usize, n: usize) -> chrono::TimeDelta {
    if count < n {
        let factor = (2 * n).checked_div(count).map_or(16, |f| f.clamp(2, 16));
        window
            .checked_mul(factor as i32)
            .unwrap_or(chrono::TimeDelta::MAX)
    } else {
        let micros =
            (window.num_microseconds().unwrap_or(i64::MAX) as f64 * (2 * n) as f64 / count as f64).max(1.0);
        chrono::TimeDelta::microseconds(micros as i64)
    }
}

fn min_some(a: Option<Timestamp>, b: Option<Timestamp>) -> Option<Timestamp> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Sort key of a gpu_id: numeric ids in numeric order, then others.
fn gpu_order(id: &str) -> (u64, &str) {
    (id.parse().unwrap_or(u64::MAX), id)
}

fn at(options: GetOptions, revision: i64) -> GetOptions {
    if revision > 0 {
        options.with_revision(revision)
    } else {
        options
    }
}

fn pin(revision: &mut i64, resp: &etcd_client::GetResponse) {
    if *revision == 0 {
        *revision = header_revision(resp.header());
    }
}

/// The time to probe back from: the timestamp that opens `hi` (a cursor or `end_time` bound)
/// if it has one, otherwise the later of now and the newest record known (plus a margin, as
/// `last_seen` is updated about once a second).
fn top_time(prefix: &str, hi: &[u8], newest_hint: Option<Timestamp>) -> Timestamp {
    std::str::from_utf8(hi)
        .ok()
        .and_then(|k| k.strip_prefix(prefix))
        .and_then(|rest| rest.get(..27))
        .and_then(|ts| Timestamp::parse(ts).ok())
        .unwrap_or_else(|| {
            let now = Timestamp::now();
            let hint = newest_hint
                .and_then(|t| t.as_datetime().checked_add_signed(chrono::TimeDelta::seconds(5)))
                .map(Timestamp::from_datetime);
            hint.map_or(now, |h| h.max(now))
        })
}

/// The first key of the window `[top - window, …)`, never below `lo`.
fn window_start(prefix: &str, lo: &[u8], top: Timestamp, window: chrono::TimeDelta) -> Vec<u8> {
    match top.as_datetime().checked_sub_signed(window) {
        Some(t) if t.timestamp() > 0 => {
            let key = format!("{prefix}{}", Timestamp::from_datetime(t)).into_bytes();
            key.max(lo.to_vec())
        }
        _ => lo.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    #[test]
    fn probe_windows_widen_when_sparse_and_narrow_when_dense() {
        let minute = TimeDelta::seconds(60);
        assert_eq!(next_window(minute, 0, 100), minute * 16, "empty: widest step");
        assert_eq!(next_window(minute, 50, 100), minute * 4, "aims at 2n");
        assert_eq!(next_window(minute, 99, 100), minute * 2, "at least doubles");
        assert_eq!(next_window(minute, 1000, 100), TimeDelta::seconds(12));
        assert!(next_window(TimeDelta::MAX, 0, 1) >= TimeDelta::MAX, "no overflow");
        assert!(next_window(TimeDelta::microseconds(1), 1_000_000, 1) >= TimeDelta::microseconds(1));
    }

    #[test]
    fn the_page_window_starts_at_the_cursor_or_end_bound_time() {
        let prefix = "/d/h/0/";
        let hi = format!("{prefix}2026-01-01T00:00:10.000000Z_01ARZ3NDEKTSV4RRFFQ69G5FAV");
        let top = top_time(prefix, hi.as_bytes(), None);
        assert_eq!(top.to_string(), "2026-01-01T00:00:10.000000Z");
        let start = window_start(prefix, prefix.as_bytes(), top, TimeDelta::seconds(10));
        assert_eq!(start, format!("{prefix}2026-01-01T00:00:00.000000Z").into_bytes());
        // Never below the range's own lower bound.
        let lo = format!("{prefix}2026-01-01T00:00:05").into_bytes();
        assert_eq!(window_start(prefix, &lo, top, TimeDelta::seconds(10)), lo);
    }
}
