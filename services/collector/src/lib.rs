//! The collector: claims queued telemetry through leased partitions and commits it exactly
//! once.
//!
//! - [`group`] decides which partitions this collector owns (a consumer group over leased owner
//!   keys) and feeds them from one queue watch;
//! - [`partition`] is the source of one owned partition;
//! - [`validate`] is the transform: any schema version → a `v1` record, or a dead letter;
//! - [`commit`] is the sink: one fenced transaction per batch;
//! - [`session`] keeps the lease alive on its own timer and notices when it is lost.
//!
//! [`run`] is the entry point; the binary reads its config, connects, and calls it.

pub mod commit;
pub mod config;
pub mod events;
pub mod group;
pub mod partition;
pub mod session;
pub mod validate;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace,
    etcd::{BucketedLease, EtcdError, count_prefix},
    keys::QUEUE_PARTITIONS,
};
use tokio_util::sync::CancellationToken;

pub use config::CollectorConfig;

/// Counters of one collector process (also exported as Prometheus metrics).
#[derive(Debug, Default)]
pub struct Counters {
    /// Records committed.
    pub processed: AtomicU64,
    /// Duplicates absorbed.
    pub duplicates: AtomicU64,
    /// Messages dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Commits the fence refused.
    pub fence_refusals: AtomicU64,
    /// Commit transactions that landed.
    pub commits: AtomicU64,
}

impl Counters {
    fn add(&self, processed: u64, duplicates: u64, dead: u64) {
        self.processed.fetch_add(processed, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.dead_lettered.fetch_add(dead, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("collector_commits_total").increment(1);
        metrics::counter!("collector_processed_total").increment(processed);
        metrics::counter!("collector_duplicates_total").increment(duplicates);
        metrics::counter!("collector_dead_lettered_total").increment(dead);
    }

    /// A snapshot.
    pub fn totals(&self) -> Totals {
        Totals {
            processed: self.processed.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            fence_refusals: self.fence_refusals.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
        }
    }
}

/// What a collector did, as returned by [`run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Records committed.
    pub processed: u64,
    /// Duplicates absorbed.
    pub duplicates: u64,
    /// Messages dead-lettered.
    pub dead_lettered: u64,
    /// Commits the fence refused.
    pub fence_refusals: u64,
    /// Commit transactions that landed.
    pub commits: u64,
}

/// Errors that end a collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    /// etcd refused in a way retrying does not fix.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// Runs the collector until `shutdown`: joins the group, processes its partitions, and on
/// shutdown finishes in-flight batches and revokes its lease so its partitions move at once.
/// Lost sessions are replaced; etcd outages are retried with backoff.
pub async fn run(
    config: CollectorConfig,
    client: Client,
    shutdown: CancellationToken,
) -> Result<Totals, CollectorError> {
    let keys = Keyspace::new(&config.common.etcd_namespace);
    let counters = Arc::new(Counters::default());
    let oldest: Arc<[AtomicI64]> = (0..QUEUE_PARTITIONS).map(|_| AtomicI64::new(0)).collect();
    let ctx = Arc::new(partition::PartitionContext {
        client: client.clone(),
        keys: keys.clone(),
        combiner: commit::Combiner::start(Arc::new(commit::Committer::new(
            client.clone(),
            keys.clone(),
            Arc::new(BucketedLease::new(client.clone(), config.dedup_ttl)),
            Arc::new(BucketedLease::new(client.clone(), config.retention)),
        ))),
        columns: config.columns.clone(),
        batch_size: config.batch_size,
        collector_id: config.collector_id.clone(),
        counters: counters.clone(),
        oldest: oldest.clone(),
    });
    let reporter = tokio::spawn(report(
        client.clone(),
        keys.clone(),
        counters.clone(),
        oldest,
        shutdown.clone(),
    ));
    tracing::info!(collector = %config.collector_id, lease_ttl = ?config.lease_ttl, "collector starting");
    let mut delay = Duration::from_millis(100);
    let mut warned = false;
    while !shutdown.is_cancelled() {
        let session = match session::Session::start(&client, &keys, &config.collector_id, config.lease_ttl)
            .await
        {
            Ok(session) => session,
            Err(err) => {
                if !warned {
                    tracing::warn!(error = %err, "cannot start a session (etcd unavailable?); retrying with backoff");
                    warned = true;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        if warned {
            tracing::info!("etcd reachable again");
            warned = false;
        }
        match group::coordinate(
            &client,
            &keys,
            &config.collector_id,
            &session,
            ctx.clone(),
            &shutdown,
        )
        .await
        {
            Ok(group::End::Shutdown) | Err(EtcdError::Cancelled) => {
                session.revoke(&client).await;
                break;
            }
            Ok(group::End::SessionLost) => {
                tracing::warn!("session lost; partitions dropped; starting a new session");
                // Best effort: if etcd still knows the lease, free our keys at once.
                session.revoke(&client).await;
                delay = Duration::from_millis(100);
            }
            Err(err) => {
                tracing::warn!(error = %err, "group coordination failed; restarting the session");
                session.revoke(&client).await;
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(delay) => {}
                }
                // Back off for real while coordination keeps failing.
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    reporter.abort();
    let totals = counters.totals();
    tracing::info!(
        processed = totals.processed,
        duplicates = totals.duplicates,
        dead_lettered = totals.dead_lettered,
        fence_refusals = totals.fence_refusals,
        commits = totals.commits,
        "collector stopped"
    );
    Ok(totals)
}

/// Every few seconds: queue depth, lag (age of the oldest message in owned partitions) and
/// progress, as metrics and a log line.
async fn report(
    client: Client,
    keys: Keyspace,
    counters: Arc<Counters>,
    oldest: Arc<[AtomicI64]>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut last = counters.totals();
    let mut last_at = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let depth = count_prefix(&mut client.clone(), &keys.queue_prefix(), true)
            .await
            .unwrap_or(-1);
        let now_ms = chrono::Utc::now().timestamp_millis();
        let lag_ms = oldest
            .iter()
            .map(|o| o.load(Ordering::Relaxed))
            .filter(|ms| *ms > 0)
            .map(|ms| now_ms - ms)
            .max()
            .unwrap_or(0);
        metrics::gauge!("collector_queue_depth").set(depth as f64);
        metrics::gauge!("collector_lag_seconds").set(lag_ms as f64 / 1000.0);
        let now = counters.totals();
        let rate = (now.processed - last.processed) as f64 / last_at.elapsed().as_secs_f64().max(1e-9);
        if now != last {
            tracing::info!(
                records_per_s = format!("{rate:.1}"),
                processed = now.processed,
                duplicates = now.duplicates,
                dead_lettered = now.dead_lettered,
                fence_refusals = now.fence_refusals,
                queue_depth = depth,
                lag_s = lag_ms as f64 / 1000.0,
                "progress"
            );
        }
        last = now;
        last_at = std::time::Instant::now();
    }
}
