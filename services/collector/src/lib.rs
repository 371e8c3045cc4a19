//! The collector: claims queued telemetry through leased partitions and commits it exactly
//! once.
//!
//! - `group` decides which partitions this collector owns (a consumer group over leased owner
//!   keys) and runs a task per owned partition;
//! - `feed` is the source of one owned partition (a range once, then its watch);
//! - [`validate`] is the transform: any schema version → a `v1` record, or a dead letter (public
//!   for the benchmarks);
//! - `batch` picks the next batch of a partition; `partition` is the loop around it;
//! - `commit` is the sink: one fenced transaction per batch (group commit across partitions);
//! - `session` keeps the lease alive on its own timer and notices when it is lost;
//! - [`events`]: what the collector logs and counts.
//!
//! [`run`] is the entry point; the binary reads its config, connects, and calls it.

mod batch;
mod commit;
pub mod config;
pub mod events;
mod feed;
mod group;
mod partition;
mod session;
pub mod validate;

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::Client;
use telemetry_shared::{
    Keyspace,
    etcd::{EtcdError, count_prefix},
    health::{Check, Health},
    keys::QUEUE_PARTITIONS,
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio_util::sync::CancellationToken;

pub use config::CollectorConfig;

/// Counters of one collector process (also exported as Prometheus metrics).
#[derive(Debug, Default)]
struct Counters {
    processed: AtomicU64,
    duplicates: AtomicU64,
    dead_lettered: AtomicU64,
    fence_refusals: AtomicU64,
    commits: AtomicU64,
}

impl Counters {
    fn add(&self, effects: &commit::Effects) {
        self.processed
            .fetch_add(effects.records as u64, Ordering::Relaxed);
        self.duplicates
            .fetch_add(effects.duplicates as u64, Ordering::Relaxed);
        self.dead_lettered
            .fetch_add(effects.dead as u64, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
    }

    fn totals(&self) -> Totals {
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
    let health = Health::new("collector", &shutdown);
    run_with_health(config, client, shutdown, health).await
}

/// [`run`], reporting to `health`: the session loop is a watched loop, and the readiness
/// checks `session` (a live session) and `partitions` (every partition assigned here owned
/// and loaded) say whether the collector's work is current.
pub async fn run_with_health(
    config: CollectorConfig,
    client: Client,
    shutdown: CancellationToken,
    health: Health,
) -> Result<Totals, CollectorError> {
    health.set_etcd(&client);
    let checks = Checks {
        session: health.check("session", "starting a session"),
        partitions: health.check("partitions", "waiting for a session"),
    };
    let keys = Keyspace::new(&config.common.etcd_namespace);
    let counters = Arc::new(Counters::default());
    let oldest: Arc<[AtomicI64]> = (0..QUEUE_PARTITIONS).map(|_| AtomicI64::new(0)).collect();
    let committer = commit::Committer::new(
        client.clone(),
        keys.clone(),
        config.dedup_ttl,
        config.retention,
        shutdown.clone(),
    );
    let ctx = Arc::new(partition::PartitionContext {
        client: client.clone(),
        keys: keys.clone(),
        combiner: commit::Combiner::start(Arc::new(committer)),
        columns: config.columns.clone(),
        batch_size: config.batch_size,
        collector_id: config.collector_id.clone(),
        counters: counters.clone(),
        profiles: telemetry_shared::profiles::ProfileCache::new(),
        oldest: oldest.clone(),
        loaded: Default::default(),
    });
    let reporter = tokio::spawn(report(
        client.clone(),
        keys.clone(),
        counters.clone(),
        oldest,
        shutdown.clone(),
    ));
    tracing::info!(collector = %config.collector_id, lease_ttl = ?config.lease_ttl, "collector starting");
    health
        .watch(
            "sessions",
            serve_sessions(&config, &client, &keys, ctx, &checks, &shutdown),
        )
        .await;
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

/// The collector's readiness checks.
struct Checks {
    /// A session (lease and registration) is alive.
    session: Check,
    /// Every partition assigned here is owned and loaded.
    partitions: Check,
}

/// One session after another until shutdown: a lost session is replaced at once, a failing one
/// after the shared backoff. Every session's lease is revoked when it ends, so its partitions
/// move at once.
async fn serve_sessions(
    config: &CollectorConfig,
    client: &Client,
    keys: &Keyspace,
    ctx: Arc<partition::PartitionContext>,
    checks: &Checks,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(Policy::ETCD, "collector session");
    while !shutdown.is_cancelled() {
        let session =
            match session::Session::start(client, keys, &config.collector_id, config.lease_ttl).await {
                Ok(session) => session,
                Err(err) => {
                    checks.session.fail(format!("cannot start a session: {err}"));
                    match backoff.retry_after(&err, shutdown).await {
                        Ok(()) => continue,
                        Err(_) => break,
                    }
                }
            };
        checks
            .session
            .pass(format!("lease {:x}, TTL {:?}", session.lease, config.lease_ttl));
        let end = group::coordinate(
            client,
            keys,
            &config.collector_id,
            &session,
            ctx.clone(),
            &checks.partitions,
            shutdown,
        )
        .await;
        session.revoke(client).await;
        checks.partitions.fail("waiting for a session");
        match end {
            Ok(group::End::Shutdown) | Err(EtcdError::Cancelled) => break,
            Ok(group::End::SessionLost) => {
                checks.session.fail("the session was lost; starting a new one");
                tracing::warn!("session lost; partitions dropped; starting a new session");
                backoff.succeeded();
            }
            Err(err) => {
                checks.session.fail(format!("the session ended: {err}"));
                if backoff.retry_after(&err, shutdown).await.is_err() {
                    break;
                }
            }
        }
    }
}

/// Every few seconds: queue depth, lag (age of the oldest message in owned partitions) and
/// progress.
async fn report(
    client: Client,
    keys: Keyspace,
    counters: Arc<Counters>,
    oldest: Arc<[AtomicI64]>,
    shutdown: CancellationToken,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(5));
    let mut last = counters.totals();
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let depth = count_prefix(&mut client.clone(), &keys.queue_prefix(), true)
            .await
            .unwrap_or(-1);
        let now = counters.totals();
        emit(events::Progress {
            depth,
            lag: lag(&oldest),
            records_per_s: (now.processed - last.processed) as f64
                / last_at.elapsed().as_secs_f64().max(1e-9),
            totals: now,
            changed: now != last,
        });
        last = now;
        last_at = Instant::now();
    }
}

/// Age of the oldest pending message among `oldest` (Unix ms per partition, 0 = none).
fn lag(oldest: &[AtomicI64]) -> Duration {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let ms = oldest
        .iter()
        .map(|o| o.load(Ordering::Relaxed))
        .filter(|ms| *ms > 0)
        .map(|ms| now_ms - ms)
        .max()
        .unwrap_or(0);
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}
