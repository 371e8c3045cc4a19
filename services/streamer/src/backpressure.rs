//! Backpressure: keeps the queue depth under `MAX_QUEUE_DEPTH`.
//!
//! One gauge per process is shared by its workers. It keeps an estimate of the queue depth,
//! refreshed from etcd (a count-only range, which transfers no keys) when it is older than
//! [`REFRESH_EVERY`] or when admitting a chunk would reach the limit. A worker must be admitted
//! before each transaction: while the depth is at or above the limit it waits, so no row is
//! dropped, and since each worker adds at most one chunk after seeing a depth below the limit,
//! the depth exceeds the limit by at most one chunk per worker.

use std::{
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicI64, Ordering},
    },
    time::{Duration, Instant},
};

use etcd_client::Client;
use telemetry_shared::etcd::{EtcdError, count_prefix, is_retryable};
use tokio_util::sync::CancellationToken;

/// How stale the estimate may get before it is refreshed.
pub const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// How long a waiting worker sleeps between depth checks.
const WAIT_STEP: Duration = Duration::from_millis(100);

/// The shared queue-depth gauge.
pub struct DepthGauge {
    client: Client,
    prefix: String,
    max: i64,
    estimate: AtomicI64,
    refreshed: Mutex<Option<Instant>>,
    waiting_logged: AtomicBool,
    /// Held across refresh, check and add, so a refresh cannot erase another worker's
    /// admission and two workers cannot both take the last room on one reading.
    admission: tokio::sync::Mutex<()>,
}

impl DepthGauge {
    /// A gauge over the keys below `prefix`; `max == 0` disables the limit (depth is still
    /// measured for progress reports).
    pub fn new(client: Client, prefix: String, max: u64) -> Self {
        DepthGauge {
            client,
            prefix,
            max: i64::try_from(max).unwrap_or(i64::MAX),
            estimate: AtomicI64::new(0),
            refreshed: Mutex::new(None),
            waiting_logged: AtomicBool::new(false),
            admission: tokio::sync::Mutex::new(()),
        }
    }

    /// The latest estimate of the queue depth.
    pub fn estimate(&self) -> i64 {
        self.estimate.load(Ordering::Relaxed)
    }

    /// Reads the depth from etcd and resets the estimate to it. `serializable` reads the local
    /// member (cheap, possibly stale); otherwise the read is linearizable.
    pub async fn refresh(&self, serializable: bool) -> Result<i64, EtcdError> {
        let depth = count_prefix(&mut self.client.clone(), &self.prefix, serializable).await?;
        self.estimate.store(depth, Ordering::Relaxed);
        if let Ok(mut at) = self.refreshed.lock() {
            *at = Some(Instant::now());
        }
        metrics::gauge!("streamer_queue_depth").set(depth as f64);
        Ok(depth)
    }

    fn stale(&self) -> bool {
        self.refreshed
            .lock()
            .map(|at| at.is_none_or(|t| t.elapsed() >= REFRESH_EVERY))
            .unwrap_or(true)
    }

    /// Waits until a chunk of `n` messages may be written, then counts it in the estimate.
    /// Returns `Err(Cancelled)` if shutdown arrives while waiting.
    pub async fn admit(&self, n: usize, shutdown: &CancellationToken) -> Result<(), EtcdError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.max == 0 {
            self.estimate.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        loop {
            let guard = self.admission.lock().await;
            let near_limit = self.estimate() + n >= self.max;
            if self.stale() || near_limit {
                // Near the limit the count must be current (a lagging member could under-count).
                match self.refresh(!near_limit).await {
                    Ok(_) => {}
                    // An unreachable etcd will fail the write too; let the sink's retry handle it.
                    Err(EtcdError::Client(err)) if is_retryable(&err) => {}
                    Err(err) => return Err(err),
                }
            }
            let depth = self.estimate();
            if depth < self.max {
                self.estimate.fetch_add(n, Ordering::Relaxed);
                if self.waiting_logged.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        depth,
                        max = self.max,
                        "queue depth below MAX_QUEUE_DEPTH; resuming"
                    );
                }
                return Ok(());
            }
            drop(guard);
            if !self.waiting_logged.swap(true, Ordering::Relaxed) {
                tracing::info!(
                    depth,
                    max = self.max,
                    "queue depth at MAX_QUEUE_DEPTH; waiting for collectors"
                );
            }
            metrics::counter!("streamer_backpressure_waits_total").increment(1);
            tokio::select! {
                _ = shutdown.cancelled() => return Err(EtcdError::Cancelled),
                _ = tokio::time::sleep(WAIT_STEP) => {}
            }
        }
    }
}
