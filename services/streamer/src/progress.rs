//! Progress counters, the periodic progress log line and the one-shot progress bar.

use std::{
    io::IsTerminal,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::backpressure::DepthGauge;

/// Counters shared by all workers of a process. Each is also exported as a Prometheus metric.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages written to the queue.
    pub enqueued: AtomicU64,
    /// Rows absorbed because their idempotency key was already enqueued.
    pub duplicates: AtomicU64,
    /// Malformed rows skipped.
    pub skipped: AtomicU64,
    /// Fence conflicts: another streamer with the same stream id advanced the checkpoint.
    pub conflicts: AtomicU64,
    /// Passes completed (all workers).
    pub passes: AtomicU64,
}

/// A snapshot of [`Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Messages written to the queue.
    pub enqueued: u64,
    /// Rows absorbed as duplicates.
    pub duplicates: u64,
    /// Malformed rows skipped.
    pub skipped: u64,
    /// Fence conflicts.
    pub conflicts: u64,
    /// Passes completed.
    pub passes: u64,
}

impl Stats {
    /// Reads all counters.
    pub fn totals(&self) -> Totals {
        Totals {
            enqueued: self.enqueued.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn add_enqueued(&self, n: u64) {
        self.enqueued.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("streamer_rows_enqueued_total").increment(n);
    }

    pub(crate) fn add_duplicates(&self, n: u64) {
        self.duplicates.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("streamer_duplicates_total").increment(n);
    }

    pub(crate) fn add_skipped(&self, n: u64) {
        self.skipped.fetch_add(n, Ordering::Relaxed);
        metrics::counter!("streamer_rows_skipped_total").increment(n);
    }

    pub(crate) fn add_conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("streamer_checkpoint_conflicts_total").increment(1);
    }

    pub(crate) fn add_pass(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("streamer_passes_total").increment(1);
    }
}

/// Reports progress until `stop` is cancelled: a log line every `interval`, or, when
/// `bar_total` is given and stderr is a terminal, a progress bar.
pub fn spawn_reporter(
    stats: Arc<Stats>,
    gauge: Arc<DepthGauge>,
    interval: Duration,
    bar_total: Option<u64>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let bar = bar_total
            .filter(|_| std::io::stderr().is_terminal())
            .map(|total| {
                let bar = indicatif::ProgressBar::new(total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{elapsed_precise} [{wide_bar}] {pos}/{len} rows ({per_sec}, eta {eta}) {msg}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                );
                bar
            });
        let mut last = stats.totals();
        let mut last_at = Instant::now();
        let mut ticker = tokio::time::interval(if bar.is_some() {
            Duration::from_millis(200)
        } else {
            interval
        });
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = stats.totals();
            if let Some(bar) = &bar {
                bar.set_position(now.enqueued + now.duplicates + now.skipped);
                bar.set_message(format!(
                    "dup {} skipped {} depth {}",
                    now.duplicates,
                    now.skipped,
                    gauge.estimate()
                ));
                continue;
            }
            let secs = last_at.elapsed().as_secs_f64().max(1e-9);
            let rate = (now.enqueued - last.enqueued) as f64 / secs;
            tracing::info!(
                rows_per_s = format!("{rate:.1}"),
                total = now.enqueued,
                skipped = now.skipped,
                duplicates = now.duplicates,
                conflicts = now.conflicts,
                queue_depth = gauge.estimate(),
                "progress"
            );
            last = now;
            last_at = Instant::now();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
    })
}
