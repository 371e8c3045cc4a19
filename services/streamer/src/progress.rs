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

/// Counters shared by all workers of a process, updated only by the events in
/// [`crate::events`] (which record the matching Prometheus metrics at the same time).
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Messages written to the queue.
    enqueued: AtomicU64,
    /// Rows absorbed because their idempotency key was already enqueued.
    duplicates: AtomicU64,
    /// Malformed rows skipped.
    skipped: AtomicU64,
    /// Fence conflicts: another streamer with the same stream id advanced the checkpoint.
    conflicts: AtomicU64,
    /// Passes completed (all workers).
    passes: AtomicU64,
}

/// What a streamer run did, summed over its workers.
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
    pub(crate) fn totals(&self) -> Totals {
        Totals {
            enqueued: self.enqueued.load(Ordering::Relaxed),
            duplicates: self.duplicates.load(Ordering::Relaxed),
            skipped: self.skipped.load(Ordering::Relaxed),
            conflicts: self.conflicts.load(Ordering::Relaxed),
            passes: self.passes.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn record_commit(&self, enqueued: u64, duplicates: u64, skipped: u64) {
        self.enqueued.fetch_add(enqueued, Ordering::Relaxed);
        self.duplicates.fetch_add(duplicates, Ordering::Relaxed);
        self.skipped.fetch_add(skipped, Ordering::Relaxed);
    }

    pub(crate) fn record_conflict(&self) {
        self.conflicts.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn record_pass(&self) {
        self.passes.fetch_add(1, Ordering::Relaxed);
    }
}

/// The progress reporter task.
pub(crate) struct Reporter {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Reporter {
    /// Stops the reporter (clearing its bar) and waits for it.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Reports progress until stopped: a log line every `interval`, or, when `bar_total` is given
/// and stderr is a terminal, a progress bar.
pub(crate) fn spawn_reporter(
    stats: Arc<Stats>,
    gauge: Arc<DepthGauge>,
    interval: Duration,
    bar_total: Option<u64>,
) -> Reporter {
    let stop = CancellationToken::new();
    let task = tokio::spawn(report(stats, gauge, interval, bar_total, stop.clone()));
    Reporter { stop, task }
}

async fn report(
    stats: Arc<Stats>,
    gauge: Arc<DepthGauge>,
    interval: Duration,
    bar_total: Option<u64>,
    stop: CancellationToken,
) {
    let bar = bar_total
        .filter(|_| std::io::stderr().is_terminal())
        .map(progress_bar);
    let mut line = ProgressLine::new(stats.totals());
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
        match &bar {
            Some(bar) => {
                bar.set_position(now.enqueued + now.duplicates + now.skipped);
                bar.set_message(format!(
                    "dup {} skipped {} depth {}",
                    now.duplicates,
                    now.skipped,
                    gauge.estimate()
                ));
            }
            None => line.log(now, gauge.estimate()),
        }
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} rows ({per_sec}, eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// The periodic progress log line: the rate since the previous line and the totals.
struct ProgressLine {
    last: Totals,
    last_at: Instant,
}

impl ProgressLine {
    fn new(totals: Totals) -> Self {
        ProgressLine {
            last: totals,
            last_at: Instant::now(),
        }
    }

    fn log(&mut self, now: Totals, queue_depth: i64) {
        let secs = self.last_at.elapsed().as_secs_f64().max(1e-9);
        let rate = now.enqueued.saturating_sub(self.last.enqueued) as f64 / secs;
        tracing::info!(
            rows_per_s = format!("{rate:.1}"),
            total = now.enqueued,
            skipped = now.skipped,
            duplicates = now.duplicates,
            conflicts = now.conflicts,
            queue_depth,
            "progress"
        );
        self.last = now;
        self.last_at = Instant::now();
    }
}
