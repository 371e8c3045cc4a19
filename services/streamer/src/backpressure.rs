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
use telemetry_shared::{
    etcd::{EtcdError, count_prefix, is_retryable},
    observe::emit,
    retry::{Backoff, Policy},
};
use tokio_util::sync::CancellationToken;

use crate::events::{BackpressureReleased, BackpressureWait, QueueDepthRead};

/// How stale the estimate may get before it is refreshed.
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// How long a waiting worker sleeps between depth checks: from 50 ms, growing to 400 ms while
/// the queue stays full (jittered, so workers do not poll in step), until shutdown.
const WAIT: Policy = Policy {
    min: Duration::from_millis(50),
    max: Duration::from_millis(400),
    max_retries: None,
};

/// The shared queue-depth gauge.
pub(crate) struct DepthGauge {
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
    pub(crate) fn new(client: Client, prefix: String, max: u64) -> Self {
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
    pub(crate) fn estimate(&self) -> i64 {
        self.estimate.load(Ordering::Relaxed)
    }

    /// Reads the depth from etcd and resets the estimate to it. `serializable` reads the local
    /// member (cheap, possibly stale); otherwise the read is linearizable.
    async fn refresh(&self, serializable: bool) -> Result<i64, EtcdError> {
        let depth = count_prefix(&mut self.client.clone(), &self.prefix, serializable).await?;
        self.estimate.store(depth, Ordering::Relaxed);
        if let Ok(mut at) = self.refreshed.lock() {
            *at = Some(Instant::now());
        }
        emit(QueueDepthRead { depth });
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
    pub(crate) async fn admit(&self, n: usize, shutdown: &CancellationToken) -> Result<(), EtcdError> {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if self.max == 0 {
            self.estimate.fetch_add(n, Ordering::Relaxed);
            return Ok(());
        }
        let mut backoff = Backoff::new(WAIT, "backpressure wait");
        loop {
            let Full(depth) = match self.try_admit(n).await? {
                Some(full) => full,
                None => return Ok(()),
            };
            emit(BackpressureWait {
                depth,
                max: self.max,
                first: !self.waiting_logged.swap(true, Ordering::Relaxed),
            });
            // The policy retries until shutdown, so `Exhausted` cannot happen.
            backoff.wait(shutdown).await.map_err(|_| EtcdError::Cancelled)?;
        }
    }

    /// One admission attempt: `None` if the chunk of `n` fits (it is then counted in the
    /// estimate), `Some(Full(depth))` if the queue is full.
    async fn try_admit(&self, n: i64) -> Result<Option<Full>, EtcdError> {
        let _guard = self.admission.lock().await;
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
        if depth >= self.max {
            return Ok(Some(Full(depth)));
        }
        self.estimate.fetch_add(n, Ordering::Relaxed);
        if self.waiting_logged.swap(false, Ordering::Relaxed) {
            emit(BackpressureReleased { depth, max: self.max });
        }
        Ok(None)
    }
}

/// The queue is at the limit: the depth as read.
struct Full(i64);
