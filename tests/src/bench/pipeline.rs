//! The pipeline's own figures, each on an in-process [`Pipeline`] over the bench's etcd: the
//! streamer alone, end to end through collectors, and enqueue-to-commit latency.

use std::{
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use etcd_client::Client;
use telemetry_shared::{
    Keyspace,
    watch::{Follow, Update},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{Percentiles, percentiles};
use crate::Pipeline;

/// The etcd every phase runs on: services connect to `endpoint`, in-process ones share `client`.
#[derive(Clone)]
pub struct Target {
    /// `ETCD_ENDPOINTS`.
    pub endpoint: String,
    /// The shared client.
    pub client: Client,
    /// The etcd process, for its CPU time.
    pub pid: u32,
}

/// What an end-to-end run measured.
#[derive(Debug, Clone, Copy)]
pub struct E2eRun {
    /// Messages per second, from the streamer's start until all are stored.
    pub rate: f64,
    /// Messages enqueued (and stored).
    pub messages: u64,
    /// etcd CPU seconds the run took.
    pub etcd_cpu: f64,
    /// CPU seconds of the bench process (the in-process streamer and collectors) during it.
    pub services_cpu: f64,
}

impl Target {
    /// A pipeline on this etcd under `namespace`, with nothing started yet.
    fn pipeline(&self, namespace: &str) -> crate::PipelineBuilder {
        Pipeline::builder()
            .shared_etcd(self.endpoint.clone(), &self.client)
            .namespace(namespace)
    }
}

/// The streamer alone (`RATE=0`, no backpressure), one-shot over `csv` with `workers` workers
/// in the default namespace. Returns messages per second and messages enqueued.
pub async fn streamer_rate(target: &Target, csv: &Path, workers: u32) -> anyhow::Result<(f64, u64)> {
    let pipeline = target.pipeline("").start().await?;
    let env = pipeline
        .streamer_env_for(csv, &format!("bench-{workers}"))
        .set("WORKERS", workers)
        .set("PROGRESS_INTERVAL", "1h");
    let started = Instant::now();
    let totals = pipeline.stream(env).await?;
    let secs = started.elapsed().as_secs_f64();
    Ok((totals.enqueued as f64 / secs, totals.enqueued))
}

/// Streamer workers in the end-to-end phase: etcd's throughput comes from many transactions in
/// flight, so the producer side runs as many as a real deployment would (e.g. 2 streamers x 8).
pub const E2E_WORKERS: usize = 16;

/// End to end: `collectors` collectors drain while a [`E2E_WORKERS`]-worker streamer enqueues
/// `csv`; returns messages per second from the streamer's start until the queue is empty and
/// all are stored, and the messages enqueued.
pub async fn e2e_rate(target: &Target, csv: &Path, collectors: usize) -> anyhow::Result<E2eRun> {
    let pipeline = target
        .pipeline(&format!("/e2e{collectors}"))
        .collectors(collectors)
        .collector_ids("bench-")
        .collector_env(&[("LEASE_TTL", "10s")])
        .start()
        .await?;
    // Give the group up to 20 s to own all 32 partitions before timing.
    let _ = pipeline.wait_owned(Duration::from_secs(20)).await;
    let env = pipeline
        .streamer_env_for(csv, "e2e")
        .set("WORKERS", E2E_WORKERS)
        .set("PROGRESS_INTERVAL", "1h");
    let cpu_before = super::ideal::cpu_seconds(target.pid)?;
    let own_before = super::ideal::cpu_seconds(std::process::id())?;
    let started = Instant::now();
    let totals = pipeline.stream(env).await?;
    // Polls only the (small) queue while draining; a count over the growing data prefix would
    // itself load etcd and skew the figure. Once the queue is empty, it checks the data count.
    pipeline
        .wait_drained(i64::try_from(totals.enqueued)?, Duration::from_secs(3600))
        .await;
    let secs = started.elapsed().as_secs_f64();
    let etcd_cpu = super::ideal::cpu_seconds(target.pid)? - cpu_before;
    let services_cpu = super::ideal::cpu_seconds(std::process::id())? - own_before;
    let stopped = pipeline.shutdown().await?;
    eprintln!(
        "  {collectors} collector(s): {} records in {} commits ({:.1} per commit)",
        stopped.processed(),
        stopped.commits(),
        stopped.processed() as f64 / stopped.commits().max(1) as f64
    );
    Ok(E2eRun {
        rate: totals.enqueued as f64 / secs,
        messages: totals.enqueued,
        etcd_cpu,
        services_cpu,
    })
}

/// What the storage phase measured.
#[derive(Debug, Clone, Copy)]
pub struct Footprint {
    /// Records stored.
    pub records: u64,
    /// etcd's backend size before the run (compacted and defragmented), bytes.
    pub before: i64,
    /// Its size after the run, once the queue was empty, compacted and defragmented.
    pub after: i64,
}

impl Footprint {
    /// Backend bytes per stored record.
    pub fn per_record(&self) -> f64 {
        (self.after - self.before) as f64 / self.records.max(1) as f64
    }
}

/// Compacts etcd at its current revision and defragments it; returns the backend's size.
pub async fn compacted_size(client: &Client) -> anyhow::Result<i64> {
    let mut client = client.clone();
    super::raw::compact_and_defragment(&mut client).await?;
    Ok(client.status().await?.db_size())
}

/// etcd backend bytes per stored record: `csv` through one streamer worker and `collectors`
/// collectors; the backend size after the queue is empty, compaction and defragmentation, minus
/// the size before, divided by the records stored (markers, profiles, indexes and counters
/// included).
pub async fn footprint(target: &Target, csv: &Path, collectors: usize) -> anyhow::Result<Footprint> {
    let before = compacted_size(&target.client).await?;
    let pipeline = target
        // The default namespace (none), as a deployment runs: a namespace would add its length
        // to every key.
        .pipeline("")
        .collectors(collectors)
        .collector_ids("bench-")
        .start()
        .await?;
    let env = pipeline
        .streamer_env_for(csv, "footprint")
        .set("PROGRESS_INTERVAL", "1h");
    let totals = pipeline.stream(env).await?;
    pipeline
        .wait_drained(i64::try_from(totals.enqueued)?, Duration::from_secs(3600))
        .await;
    let records = pipeline.probe().data_count().await;
    pipeline.shutdown().await?;
    print_key_breakdown(&target.client, "/", records).await?;
    let after = compacted_size(&target.client).await?;
    Ok(Footprint {
        records: u64::try_from(records).unwrap_or(0),
        before,
        after,
    })
}

/// Prints, per key family under `prefix` (the first path segment after it, and one more under
/// `telemetry/`), how many keys there are and their mean key and value sizes per stored record:
/// what the backend's bytes per record are made of.
async fn print_key_breakdown(client: &Client, prefix: &str, records: i64) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let mut families: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    for (full_key, value) in telemetry_harness::range_all(client, prefix).await? {
        let key = &full_key[prefix.len()..];
        let mut parts = key.split('/');
        let family = match (parts.next(), parts.next()) {
            (Some(first @ ("telemetry" | "index" | "queue")), Some(second)) => format!("{first}/{second}"),
            (Some(first), _) => first.to_string(),
            _ => String::new(),
        };
        if !families.contains_key(&family) {
            eprintln!("    e.g. {key} = {:?}", String::from_utf8_lossy(&value));
        }
        let entry = families.entry(family).or_default();
        entry.0 += 1;
        entry.1 += full_key.len() as u64;
        entry.2 += value.len() as u64;
    }
    let per = |n: u64| n as f64 / records.max(1) as f64;
    eprintln!("  keys under {prefix} once the queue is empty, per stored record ({records} records):");
    for (family, (keys, key_bytes, value_bytes)) in &families {
        eprintln!(
            "    {family:<24} {keys:>8} keys  {:>6.2} keys/record  key {:>6.1} B  value {:>6.1} B (per record)",
            per(*keys),
            per(*key_bytes),
            per(*value_bytes)
        );
    }
    Ok(())
}

/// Enqueue-to-commit latency: `collectors` in-process collectors drain while a streamer with
/// `workers` workers enqueues every row of `csv` (one pass each) at `rate` rows/s per worker,
/// so the queue stays short. A watch on the data prefix sees every stored record; its latency is
/// the wall-clock arrival of the watch event minus the message's `timestamp` (set by the
/// streamer when it built the message, just before its enqueue transaction). It therefore
/// includes the streamer's transaction, the collector's pickup and commit, and the watch
/// delivery to this process.
pub async fn enqueue_to_commit(
    target: &Target,
    csv: &Path,
    workers: usize,
    rate: f64,
    collectors: usize,
) -> anyhow::Result<Percentiles> {
    let pipeline = target
        .pipeline("/latency")
        .collectors(collectors)
        .collector_ids("bench-")
        .collector_env(&[("LEASE_TTL", "10s")])
        .start()
        .await?;
    pipeline.wait_owned(Duration::from_secs(20)).await?;
    let watch = LatencyWatch::start(&pipeline).await?;
    let env = pipeline
        .streamer_env_for(csv, "latency")
        .unset("MAX_QUEUE_DEPTH")
        .set("RATE", rate)
        .set("WORKERS", workers)
        .set("PROGRESS_INTERVAL", "1h");
    let expected = pipeline.stream(env).await?.enqueued;
    let samples = watch.finish(expected, Duration::from_secs(60)).await?;
    pipeline.shutdown().await?;
    anyhow::ensure!(
        samples.len() as u64 == expected,
        "{} records stored, {expected} enqueued",
        samples.len()
    );
    Ok(percentiles(samples))
}

/// A watch on the data prefix that records, for every stored record, the milliseconds from
/// the timestamp in its key to the arrival of its watch event.
struct LatencyWatch {
    samples: Arc<Mutex<Vec<f64>>>,
    seen: Arc<AtomicU64>,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
}

impl LatencyWatch {
    /// Starts watching from the next revision.
    async fn start(pipeline: &Pipeline) -> anyhow::Result<Self> {
        let client = pipeline.client();
        let from =
            telemetry_shared::etcd::current_revision(client, &pipeline.keys().data_prefix()).await? + 1;
        let follow = Follow::new(client, pipeline.keys().data_prefix(), from).without_deletes();
        let (samples, seen, stop) = (
            Arc::default(),
            Arc::new(AtomicU64::new(0)),
            CancellationToken::new(),
        );
        let task = tokio::spawn(Self::follow(
            follow,
            pipeline.keys().clone(),
            Arc::clone(&samples),
            Arc::clone(&seen),
            stop.clone(),
        ));
        Ok(LatencyWatch {
            samples,
            seen,
            stop,
            task,
        })
    }

    async fn follow(
        mut follow: Follow,
        keys: Keyspace,
        samples: Arc<Mutex<Vec<f64>>>,
        seen: Arc<AtomicU64>,
        stop: CancellationToken,
    ) -> anyhow::Result<()> {
        loop {
            let changes = match follow.next(&stop).await {
                None => return Ok(()),
                Some(Update::Compacted { .. }) => anyhow::bail!("the data watch fell behind a compaction"),
                Some(Update::Changes { changes, .. }) => changes,
            };
            let arrived = chrono::Utc::now();
            let mut batch = Vec::new();
            for change in changes {
                // The record's key carries its processing time.
                let key = change.key_str();
                let written = keys
                    .parse_data_record(&key)
                    .and_then(|parts| telemetry_shared::Timestamp::parse(parts.timestamp).ok())
                    .with_context(|| format!("stored record {key}"))?;
                let micros = (arrived - written.as_datetime())
                    .num_microseconds()
                    .unwrap_or(i64::MAX);
                batch.push(micros as f64 / 1000.0);
            }
            seen.fetch_add(batch.len() as u64, Ordering::Relaxed);
            samples
                .lock()
                .map_err(|_| anyhow::anyhow!("poisoned"))?
                .extend(batch);
        }
    }

    /// Waits up to `timeout` until `expected` records were seen, stops the watch, and returns
    /// the samples; fails if fewer were seen.
    async fn finish(self, expected: u64, timeout: Duration) -> anyhow::Result<Vec<f64>> {
        let deadline = Instant::now() + timeout;
        while self.seen.load(Ordering::Relaxed) < expected
            && !self.task.is_finished()
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = self.seen.load(Ordering::Relaxed);
        self.stop.cancel();
        self.task.await??;
        anyhow::ensure!(
            seen >= expected,
            "the data watch saw {seen} of {expected} records within {timeout:?} of the streamer's end"
        );
        let samples = std::mem::take(&mut *self.samples.lock().map_err(|_| anyhow::anyhow!("poisoned"))?);
        Ok(samples)
    }
}
