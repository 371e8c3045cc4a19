//! The scrape source's throughput: a streamer process scraping `targets` simulated
//! dcgm-exporters of [`SIM_SERIES`] series each (one [`ExpositionServer`] on loopback serves
//! them all, each on its own path), every `interval`, with no queue limit. After a warm-up (one
//! whole round of scrapes enqueued), the queue's growth over `window` gives the samples scraped
//! and enqueued per second, and the streamer's CPU time (`/proc/<pid>/stat`, utime + stime)
//! over the same window gives its CPU per 1,000 samples. With 1,000 targets of 80 series every
//! second the targets ask for 80,000 samples/s, more than etcd takes: the figure is the
//! streamer's ceiling on this etcd, and ticks that cannot keep up are skipped, not queued.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use telemetry_harness::{Env, ExpositionServer, ProcessSpec, exposition::SIM_SERIES};
use telemetry_shared::{Keyspace, etcd::count_prefix};

use super::{ideal::cpu_seconds, pipeline::Target};

/// What a scrape run measured.
#[derive(Debug, Clone, Copy)]
pub struct ScrapeRun {
    /// Samples enqueued per second over the window.
    pub samples_per_s: f64,
    /// Samples the targets offered per second (targets × series / interval).
    pub offered_per_s: f64,
    /// Streamer CPU milliseconds per 1,000 samples enqueued.
    pub cpu_ms_per_1000: f64,
    /// Samples enqueued in the window.
    pub samples: u64,
    /// The window's length, seconds.
    pub seconds: f64,
    /// Failed scrapes (the streamer's `streamer_scrape_failures_total`, summed).
    pub failures: u64,
}

/// Runs the streamer binary from `bin_dir` against `targets` simulated targets (see the module
/// docs) under namespace `/scrape` and measures it over `window`.
pub async fn scrape_phase(
    target: &Target,
    bin_dir: &Path,
    targets: usize,
    interval: Duration,
    window: Duration,
) -> anyhow::Result<ScrapeRun> {
    let server = ExpositionServer::start().await?;
    let urls: Vec<String> = (0..targets).map(|i| server.target_url(i)).collect();
    let metrics_port = telemetry_harness::free_port()?;
    let env = Env::etcd(target.endpoint.clone(), "/scrape")
        .scraper(&urls, &format!("{}ms", interval.as_millis()))
        .set("SCRAPE_LEASE_TTL", "30s")
        .set("MAX_QUEUE_DEPTH", 0)
        .set("METRICS_PORT", metrics_port);
    let path = bin_dir.join("telemetry-streamer");
    anyhow::ensure!(
        path.is_file(),
        "{} not found: build it with `cargo build --release --bins -p telemetry-streamer`",
        path.display()
    );
    let mut streamer = ProcessSpec::new(path)
        .env(env)
        .rust_log("warn")
        .inherit_log()
        .start()?;
    let pid = streamer.pid();
    let queue = Keyspace::new("/scrape").queue_prefix();
    let mut client = target.client.clone();
    let round = (targets * SIM_SERIES) as i64;
    let warm = Instant::now();
    loop {
        let depth = count_prefix(&mut client, &queue, true).await?;
        if depth >= round {
            break;
        }
        anyhow::ensure!(streamer.is_running(), "the streamer exited:\n{}", streamer.log());
        anyhow::ensure!(
            warm.elapsed() < Duration::from_secs(300),
            "one round of scrapes not enqueued within 300 s ({depth} of {round})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (count0, cpu0, t0) = (
        count_prefix(&mut client, &queue, true).await?,
        cpu_seconds(pid)?,
        Instant::now(),
    );
    tokio::time::sleep(window).await;
    let (count1, cpu1, t1) = (
        count_prefix(&mut client, &queue, true).await?,
        cpu_seconds(pid)?,
        Instant::now(),
    );
    let metrics = telemetry_harness::scrape_metrics(metrics_port)
        .await
        .unwrap_or_default();
    streamer.stop(Duration::from_secs(30)).await?;
    let samples = (count1 - count0).max(0) as u64;
    let seconds = (t1 - t0).as_secs_f64();
    Ok(ScrapeRun {
        samples_per_s: samples as f64 / seconds,
        offered_per_s: (targets * SIM_SERIES) as f64 / interval.as_secs_f64(),
        cpu_ms_per_1000: if samples == 0 {
            0.0
        } else {
            (cpu1 - cpu0) * 1000.0 / samples as f64 * 1000.0
        },
        samples,
        seconds,
        failures: failures(&metrics),
    })
}

/// The sum of `streamer_scrape_failures_total` in a `/metrics` text.
fn failures(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("streamer_scrape_failures_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}
